//! Feeds arbitrary bytes to the frame decoder as both message types.
//!
//! Checks: nothing panics; `frame_len` never accepts a length over `MAX_FRAME_LEN`; `Incomplete`
//! only when the buffer really is short; a frame that parses re-encodes with `encode_frame` and
//! parses back to an equal message using every byte; `decode_body` on the body agrees with
//! `parse_frame`; and a buffer read as a stream of frames (as a connection would) behaves the
//! same way frame after frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use xfer_proto::frame::{
    FrameError, HEADER_LEN, decode_body, encode_frame, frame_len, parse_frame,
};
use xfer_proto::limits::MAX_FRAME_LEN;
use xfer_proto::{Request, Response};

fn check_len(buf: &[u8]) -> Option<usize> {
    match frame_len(buf) {
        Ok(len) => {
            assert!(len <= MAX_FRAME_LEN, "frame_len accepted {len} bytes");
            assert!(buf.len() >= HEADER_LEN);
            assert_eq!(
                len,
                u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize
            );
            Some(len)
        }
        Err(FrameError::Incomplete) => {
            assert!(buf.len() < HEADER_LEN, "a full header reported incomplete");
            None
        }
        Err(FrameError::TooLarge(len)) => {
            assert!(len > MAX_FRAME_LEN, "TooLarge({len}) is within the cap");
            None
        }
        Err(e) => panic!("frame_len returned {e:?}"),
    }
}

/// Parses one frame from the start of `buf`; returns the bytes it used.
fn check<T>(buf: &[u8]) -> Option<usize>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let len = check_len(buf);
    match parse_frame::<T>(buf) {
        Ok((msg, used)) => {
            let len = len.expect("parse_frame accepted a frame frame_len refused");
            assert_eq!(used, HEADER_LEN + len);
            assert!(used <= buf.len());
            let body = &buf[HEADER_LEN..used];
            assert_eq!(decode_body::<T>(body).as_ref(), Ok(&msg));
            let mut out = Vec::new();
            encode_frame(&msg, &mut out).expect("a decoded message re-encodes");
            let (back, used2) = parse_frame::<T>(&out).expect("a re-encoded frame parses");
            assert_eq!(back, msg, "round trip changed the message");
            assert_eq!(used2, out.len());
            // postcard is self-delimiting: re-encoding never needs more bytes than were read.
            assert!(
                out.len() <= used,
                "re-encoding grew {used} -> {}",
                out.len()
            );
            Some(used)
        }
        Err(FrameError::Incomplete) => {
            match len {
                Some(len) => assert!(buf.len() < HEADER_LEN + len, "complete frame incomplete"),
                None => assert!(buf.len() < HEADER_LEN, "full header reported incomplete"),
            }
            None
        }
        Err(FrameError::TooLarge(n)) => {
            assert!(n > MAX_FRAME_LEN);
            assert!(len.is_none());
            None
        }
        Err(FrameError::Malformed(_)) | Err(FrameError::TrailingBytes(_)) => {
            let len = len.expect("a body was decoded only after a valid header");
            let body = &buf[HEADER_LEN..HEADER_LEN + len];
            assert!(decode_body::<T>(body).is_err());
            None
        }
    }
}

fn stream<T>(mut buf: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    for _ in 0..64 {
        match check::<T>(buf) {
            Some(used) if used > 0 => buf = &buf[used..],
            _ => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    stream::<Request>(data);
    stream::<Response>(data);
    // Also the bytes as one body under a header that claims exactly them, so the decoder is
    // reached even when the input's own first four bytes make no sense as a length.
    if data.len() <= MAX_FRAME_LEN {
        let mut framed = (data.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(data);
        check::<Request>(&framed);
        check::<Response>(&framed);
    }
});
