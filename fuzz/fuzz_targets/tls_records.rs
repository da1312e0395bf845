//! Feeds records to `xfer_proto::tls_stream`'s reader after a real handshake: the server side
//! seals application data, records of any inner type, records with any header and inner
//! plaintext (padding, missing or unknown content types, oversized), and bytes of the
//! fuzzer's choosing, with a key update every few records; then one byte may be flipped or
//! the stream cut, and the client reads it all with reads of the fuzzer's sizes (small ones
//! through the stream's buffer, large ones opened in place in the caller's).
//!
//! Checks: nothing panics; the reads end; a read after an error fails too (the stream never
//! reads on past a record it refused); and when the server sent only well-formed records
//! untouched, the client hands out exactly the application data, then a clean end after a
//! close_notify or UnexpectedEof without one. Otherwise what it hands out is always a prefix
//! of the application data sent (never bytes that did not authenticate), as long as every
//! record the server sealed was one a correct peer could send.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_proto::tls_stream::testing;

/// Most plaintext in one record.
const MAX_PLAIN: usize = 1 << 14;
/// Largest read: more than a chunk and two records, so that both read paths run.
const MAX_READ: usize = 300 * 1024;

#[derive(Arbitrary, Debug)]
enum Piece {
    /// Application data, as the server sends it (at most one record's worth).
    Data(Vec<u8>),
    /// A record of any inner type and content, sealed as the server seals.
    Record { typ: u8, content: Vec<u8> },
    /// Any outer header and inner plaintext (content, type and padding), sealed with the
    /// server's key and next sequence number.
    Raw {
        typ: u8,
        version: [u8; 2],
        inner: Vec<u8>,
    },
    /// Bytes straight onto the wire.
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The server replaces its key after this many records (0: never).
    rekey_every: u8,
    pieces: Vec<Piece>,
    /// Whether a close_notify ends what the server sends.
    close: bool,
    /// Cut the wire at this many bytes.
    cut: Option<u32>,
    /// Xor this (when not 0) into the byte at this offset (modulo the length).
    flip: Option<(u32, u8)>,
    /// Sizes of the client's reads, taken in turn.
    reads: Vec<u32>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

type Configs = (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>);

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(testing::configs)
}

fuzz_target!(|input: Input| {
    runtime().block_on(run(input));
});

async fn run(input: Input) {
    let (mut client, mut server) = testing::pair_with(configs()).await;
    if input.rekey_every > 0 {
        testing::rekey_after(&mut server, u64::from(input.rekey_every));
    }
    // The application data sent, and whether everything on the wire is well formed.
    let mut sent = Vec::new();
    let mut well_formed = true;
    // Whether every record sealed is one a correct peer could send, so that what comes out
    // must be a prefix of `sent`.
    let mut honest = true;
    let mut wire = Vec::new();
    for piece in &input.pieces {
        match piece {
            Piece::Data(data) => {
                let data = &data[..data.len().min(MAX_PLAIN)];
                testing::queue(&mut server, 23, data);
                sent.extend_from_slice(data);
            }
            Piece::Record { typ, content } => {
                testing::queue(&mut server, *typ, content);
                well_formed = false;
                // Type 0 is padding: the reader takes the last non-zero byte of the content
                // for the type, as it must, so such a record is not one a peer could send.
                honest &= *typ != 0;
                // An application_data record is data; any other type can only end the
                // stream (or be a harmless ticket, user_canceled, close_notify).
                if *typ == 23 {
                    sent.extend_from_slice(&content[..content.len().min(MAX_PLAIN)]);
                }
            }
            Piece::Raw {
                typ,
                version,
                inner,
            } => {
                testing::queue_raw(&mut server, *typ, *version, inner);
                well_formed = false;
                honest = false;
            }
            Piece::Bytes(bytes) => {
                wire.extend_from_slice(&testing::take_wire(&mut server));
                wire.extend_from_slice(bytes);
                well_formed = false;
            }
        }
        wire.extend_from_slice(&testing::take_wire(&mut server));
    }
    if input.close {
        // close_notify, as poll_shutdown seals it.
        testing::queue(&mut server, 21, &[1, 0]);
        wire.extend_from_slice(&testing::take_wire(&mut server));
    }
    if let Some(cut) = input.cut {
        let cut = cut as usize;
        if cut < wire.len() {
            wire.truncate(cut);
            well_formed = false;
        }
    }
    if let Some((at, x)) = input.flip {
        if x != 0 && !wire.is_empty() {
            let at = at as usize % wire.len();
            wire[at] ^= x;
            well_formed = false;
        }
    }
    let send = async {
        let io = testing::transport(&mut server);
        // The client may stop reading early (an error): the rest need not go.
        let _ = io.write_all(&wire).await;
        let _ = io.shutdown().await;
    };
    let recv = async {
        let reads: Vec<usize> = if input.reads.is_empty() {
            vec![MAX_READ]
        } else {
            input
                .reads
                .iter()
                .map(|&n| (n as usize % MAX_READ).max(1))
                .collect()
        };
        let mut buf = vec![0u8; MAX_READ];
        let mut got = Vec::new();
        for &len in reads.iter().cycle() {
            match client.read(&mut buf[..len]).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    let again = client.read(&mut buf[..len]).await;
                    assert!(again.is_err(), "read on after {e}: {again:?}");
                    return (got, Err(e));
                }
            }
        }
        unreachable!("the reads cycle until the stream ends")
    };
    let ((), (got, end)) = tokio::join!(send, recv);
    // Without a close_notify, the end is always an error.
    if end.is_ok() && well_formed {
        assert!(input.close, "a clean end without close_notify");
    }
    if well_formed {
        assert_eq!(got, sent, "well-formed records read back differently");
        match &end {
            Ok(()) => assert!(input.close),
            Err(e) => assert!(
                !input.close && e.kind() == std::io::ErrorKind::UnexpectedEof,
                "{e}"
            ),
        }
    } else if honest {
        assert!(
            sent.starts_with(&got),
            "handed out bytes that were not sent"
        );
    }
}
