//! The frame codec: a big-endian `u32` length, then that many bytes of one postcard-encoded message.
//!
//! Parsing is split the mini-redis way: [`parse_frame`] first checks whether a whole frame is in
//! the buffer ([`FrameError::Incomplete`] is not an error, just "read more"), checks the length
//! against [`MAX_FRAME_LEN`] before anything is allocated, and only then decodes. A frame whose
//! message does not use every byte is malformed: trailing bytes are never silently ignored.

use serde::{Serialize, de::DeserializeOwned};

use crate::limits::MAX_FRAME_LEN;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not enough bytes yet; read more and try again.
    #[error("incomplete frame")]
    Incomplete,
    /// The length prefix is larger than the protocol allows.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message (unknown tag, bad varint, invalid UTF-8, ...).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The message decoded but left bytes unused.
    #[error("malformed frame: {0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Reads the length prefix from the start of `buf`, checking it against the cap.
pub fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    let header = buf
        .first_chunk::<HEADER_LEN>()
        .ok_or(FrameError::Incomplete)?;
    let len = u32::from_be_bytes(*header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes one message body (the bytes after the prefix); every byte must be used.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Parses one frame from the start of `buf`, returning the message and the bytes consumed.
pub fn parse_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), FrameError> {
    let len = frame_len(buf)?;
    let body = buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(FrameError::Incomplete)?;
    Ok((decode_body(body)?, HEADER_LEN + len))
}

/// Encodes `msg` as one frame (prefix + body) appended to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    // Encoding in place (not into a taken Vec) lets any failure cut `out` back to what it held.
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Entry, EntryKind, ErrorCode, Request, Response, Role, SessionInfo};

    fn round_trip<T>(msg: T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf).unwrap();
        let (back, used) = parse_frame::<T>(&buf).unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, buf.len());
    }

    #[test]
    fn requests_round_trip() {
        let all = vec![
            Request::Hello {
                version: 1,
                agent: "xfer/0.1".into(),
            },
            Request::Login {
                user: "älice".into(),
                password: "p a s s\0".into(),
            },
            Request::Authenticate { token: "t".into() },
            Request::Logout,
            Request::WhoAmI,
            Request::List { path: "".into() },
            Request::Upload {
                path: "a b/c".into(),
                size: u64::MAX,
                offset: 0,
            },
            Request::UploadEnd { digest: [7; 32] },
            Request::Download {
                path: "x".into(),
                offset: 5,
            },
            Request::Delete { path: "x".into() },
            Request::Rename {
                from: "a".into(),
                to: "b".into(),
            },
            Request::Mkdir { path: "d".into() },
            Request::Shutdown {
                password: "pw".into(),
            },
            Request::Ping,
        ];
        for r in all {
            round_trip(r);
        }
    }

    #[test]
    fn responses_round_trip() {
        let session = SessionInfo {
            user: "bob".into(),
            role: Role::Superuser,
            expires: -1,
        };
        let all = vec![
            Response::Hello {
                version: 1,
                agent: "xferd".into(),
            },
            Response::LoggedIn {
                token: "tok".into(),
                session: session.clone(),
            },
            Response::Session(session),
            Response::Ok,
            Response::Entries {
                entries: vec![Entry {
                    name: "f".into(),
                    kind: EntryKind::File,
                    size: 3,
                    modified: 1_700_000_000,
                }],
                done: true,
            },
            Response::UploadReady { offset: 0 },
            Response::UploadDone {
                size: 1,
                digest: [1; 32],
            },
            Response::DownloadReady {
                size: 10,
                offset: 0,
                modified: 0,
            },
            Response::DownloadEnd { digest: [2; 32] },
            Response::error(ErrorCode::NotFound, "no such file"),
            Response::ShuttingDown {
                message: "bye".into(),
            },
        ];
        for r in all {
            round_trip(r);
        }
    }

    #[test]
    fn the_spec_example_encodes_byte_for_byte() {
        // proto/README.md, section 2: `Request::List { path: "docs" }`.
        let mut buf = Vec::new();
        encode_frame(
            &Request::List {
                path: "docs".into(),
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(buf, [0, 0, 0, 6, 5, 4, b'd', b'o', b'c', b's']);
        // And the variant numbers the spec's tables give.
        let tag = |r: &Request| postcard::to_allocvec(r).unwrap()[0];
        assert_eq!(tag(&Request::Ping), 13);
        assert_eq!(tag(&Request::UploadFrom { offset: 0 }), 14);
        assert_eq!(
            tag(&Request::DownloadFrom {
                path: String::new(),
                offset: 0,
                prefix: [0; 32]
            }),
            15
        );
        assert_eq!(
            tag(&Request::Shutdown {
                password: String::new()
            }),
            12
        );
        let rtag = |r: &Response| postcard::to_allocvec(r).unwrap()[0];
        assert_eq!(
            rtag(&Response::ShuttingDown {
                message: String::new()
            }),
            10
        );
        assert_eq!(
            rtag(&Response::UploadResume {
                offset: 0,
                prefix: [0; 32]
            }),
            11
        );
        assert_eq!(
            postcard::to_allocvec(&ErrorCode::Internal).unwrap(),
            vec![15]
        );
    }

    #[test]
    fn truncated_frames_are_incomplete_not_malformed() {
        let mut buf = Vec::new();
        encode_frame(
            &Request::Login {
                user: "alice".into(),
                password: "secret".into(),
            },
            &mut buf,
        )
        .unwrap();
        for cut in 0..buf.len() {
            assert_eq!(
                parse_frame::<Request>(&buf[..cut]).unwrap_err(),
                FrameError::Incomplete,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut buf = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        assert_eq!(
            parse_frame::<Request>(&buf).unwrap_err(),
            FrameError::TooLarge(MAX_FRAME_LEN + 1)
        );
        buf = u32::MAX.to_be_bytes().to_vec();
        assert!(matches!(
            parse_frame::<Request>(&buf),
            Err(FrameError::TooLarge(_))
        ));
        // Exactly at the cap is allowed (then incomplete, as no body followed).
        buf = (MAX_FRAME_LEN as u32).to_be_bytes().to_vec();
        assert_eq!(
            parse_frame::<Request>(&buf).unwrap_err(),
            FrameError::Incomplete
        );
    }

    #[test]
    fn unknown_tag_is_malformed() {
        // Tag 200 is far beyond the last variant.
        let buf = [0, 0, 0, 2, 200, 1];
        assert!(matches!(
            parse_frame::<Request>(&buf),
            Err(FrameError::Malformed(_))
        ));
        let buf = [0, 0, 0, 1, 99];
        assert!(matches!(
            parse_frame::<Response>(&buf),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut buf = Vec::new();
        encode_frame(&Request::Ping, &mut buf).unwrap();
        // Grow the declared length by one and append a stray byte.
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) + 1;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        buf.push(0);
        assert_eq!(
            parse_frame::<Request>(&buf).unwrap_err(),
            FrameError::TrailingBytes(1)
        );
    }

    #[test]
    fn empty_body_is_malformed() {
        assert!(matches!(
            parse_frame::<Request>(&[0, 0, 0, 0]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn string_length_beyond_the_body_is_malformed_without_allocating() {
        // Login { user: <claims 2^32 bytes> }: tag 1, then a huge varint length.
        let body = [1u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        assert!(matches!(
            parse_frame::<Request>(&buf),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        let body = [5u8, 2, 0xff, 0xfe]; // List { path: <2 invalid bytes> }
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        assert!(matches!(
            parse_frame::<Request>(&buf),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn encoding_an_oversized_message_fails_and_leaves_the_buffer_as_it_was() {
        let mut buf = vec![9, 9];
        let big = Request::List {
            path: "x".repeat(MAX_FRAME_LEN + 10),
        };
        assert!(matches!(
            encode_frame(&big, &mut buf),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(buf, vec![9, 9]);
    }

    #[test]
    fn two_frames_back_to_back_parse_one_at_a_time() {
        let mut buf = Vec::new();
        encode_frame(&Request::Ping, &mut buf).unwrap();
        encode_frame(&Request::Logout, &mut buf).unwrap();
        let (a, used) = parse_frame::<Request>(&buf).unwrap();
        let (b, used2) = parse_frame::<Request>(&buf[used..]).unwrap();
        assert_eq!((a, b), (Request::Ping, Request::Logout));
        assert_eq!(used + used2, buf.len());
    }
}
