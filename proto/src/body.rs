//! File bodies: exactly `size - offset` raw bytes after the header frame, never scanned for
//! markers, moved through a small ring of large buffers between the network task and one
//! blocking thread that does the file I/O and the BLAKE3 hashing with std::fs.
//!
//! Why this shape: per-chunk `tokio::fs` calls each hop to the blocking pool and measured at a
//! third of the speed of large std::fs reads and writes on one blocking thread; hashing on that
//! thread overlaps it with TLS work on the async side. Memory per transfer is bounded by
//! `CHUNK_LEN * PIPELINE_DEPTH`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::connection::ConnError;
use crate::limits::{CHUNK_LEN, PIPELINE_DEPTH};
use crate::message::Digest;

/// Why a body transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The local file could not be read or written. `in_sync` tells whether the connection is
    /// still at a frame boundary (the receiver drained the body) or must be closed.
    #[error("{source}")]
    Local {
        /// The file error.
        source: std::io::Error,
        /// Whether the connection can carry further frames.
        in_sync: bool,
    },
    /// The file being sent ended before its announced size (it was truncated while sending).
    #[error("the file shrank while it was being sent")]
    SourceChanged,
    /// The connection failed mid-body.
    #[error(transparent)]
    Net(#[from] ConnError),
}

fn cancelled() -> std::io::Error {
    std::io::Error::other("transfer cancelled")
}

/// BLAKE3 of the first `len` bytes of `file`, as a hasher that can go on with the rest: a
/// resumed transfer compares `finalize()` of it with the other side's prefix digest, then
/// passes it to the body so the prefix is read once. Runs on the blocking pool; fails with
/// `UnexpectedEof` if the file is shorter than `len`.
pub async fn hash_prefix(file: &std::fs::File, len: u64) -> std::io::Result<blake3::Hasher> {
    let mut file = file.try_clone()?;
    tokio::task::spawn_blocking(move || hash_prefix_blocking(&mut file, len))
        .await
        .map_err(std::io::Error::other)?
}

/// Slowest rate at which a peer is expected to read and hash a held prefix (a slow disk):
/// waiting for its answer allows `len` bytes at this rate on top of the usual deadline, so a
/// huge resume is not cut off and a hung peer is not waited on for long.
pub const HASH_RATE_FLOOR: u64 = 50_000_000;

/// Extra time for a peer to hash `len` bytes before it answers (see [`HASH_RATE_FLOOR`]).
pub fn hashing_allowance(len: u64) -> Duration {
    Duration::from_secs(len / HASH_RATE_FLOOR)
}

fn hash_prefix_blocking(file: &mut std::fs::File, len: u64) -> std::io::Result<blake3::Hasher> {
    let mut hasher = blake3::Hasher::new();
    hash_prefix_into(file, len, &mut hasher)?;
    Ok(hasher)
}

fn hash_prefix_into(
    file: &mut std::fs::File,
    len: u64,
    hasher: &mut blake3::Hasher,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK_LEN.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        file.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Fills `buf`, failing only if a single read makes no progress within `timeout`: a slow but
/// steady link is fine, a stalled one is not. On failure, also says how much of `buf` was
/// filled, so a receiver can keep what arrived (it is authenticated by TLS).
async fn read_exact_progress<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<(), (usize, ConnError)> {
    let mut filled = 0;
    while filled < buf.len() {
        match tokio::time::timeout(timeout, r.read(&mut buf[filled..])).await {
            Err(_) => return Err((filled, ConnError::Timeout("receiving file data"))),
            Ok(Ok(0)) => return Err((filled, ConnError::Truncated)),
            Ok(Ok(n)) => filled += n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err((filled, ConnError::Truncated));
            }
            Ok(Err(e)) => return Err((filled, ConnError::Io(e))),
        }
    }
    Ok(())
}

/// Writes all of `buf`, failing only if a single write makes no progress within `timeout`.
async fn write_all_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    timeout: Duration,
) -> Result<(), ConnError> {
    let mut written = 0;
    while written < buf.len() {
        match tokio::time::timeout(timeout, w.write(&buf[written..])).await {
            Err(_) => return Err(ConnError::Timeout("sending file data")),
            Ok(Ok(0)) => return Err(ConnError::Truncated),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(ConnError::Io(e)),
        }
    }
    Ok(())
}

pub(crate) async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut file: std::fs::File,
    offset: u64,
    size: u64,
    prefix: Option<blake3::Hasher>,
    io_timeout: Duration,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Digest, BodyError> {
    let total = size.saturating_sub(offset);
    let (full_tx, mut full_rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(PIPELINE_DEPTH);
    let (free_tx, free_rx) = std_mpsc::sync_channel::<Vec<u8>>(PIPELINE_DEPTH);
    for _ in 0..PIPELINE_DEPTH {
        let _ = free_tx.try_send(Vec::new());
    }
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<blake3::Hasher> {
        let mut hasher = blake3::Hasher::new();
        let result: std::io::Result<()> = (|| {
            match prefix {
                Some(h) => {
                    hasher = h;
                    file.seek(SeekFrom::Start(offset))?;
                }
                None => hash_prefix_into(&mut file, offset, &mut hasher)?,
            }
            let mut left = total;
            while left > 0 {
                let mut buf = free_rx.recv().map_err(|_| cancelled())?;
                let n = (CHUNK_LEN as u64).min(left) as usize;
                buf.resize(n, 0);
                file.read_exact(&mut buf)?;
                hasher.update(&buf);
                left -= n as u64;
                full_tx.blocking_send(Ok(buf)).map_err(|_| cancelled())?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(hasher),
            Err(e) => {
                let _ = full_tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    });

    let mut sent = 0u64;
    while sent < total {
        let buf = match full_rx.recv().await {
            Some(Ok(buf)) => buf,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(BodyError::SourceChanged);
            }
            Some(Err(e)) => {
                return Err(BodyError::Local {
                    source: e,
                    in_sync: false,
                });
            }
            None => {
                return Err(BodyError::Local {
                    source: cancelled(),
                    in_sync: false,
                });
            }
        };
        write_all_progress(w, &buf, io_timeout).await?;
        sent += buf.len() as u64;
        progress(sent);
        let _ = free_tx.try_send(buf);
    }
    match tokio::time::timeout(io_timeout, w.flush()).await {
        Err(_) => return Err(ConnError::Timeout("sending file data").into()),
        Ok(Err(e)) => return Err(ConnError::Io(e).into()),
        Ok(Ok(())) => {}
    }
    let hasher = reader
        .await
        .map_err(|e| BodyError::Local {
            source: std::io::Error::other(e.to_string()),
            in_sync: false,
        })?
        .map_err(|e| BodyError::Local {
            source: e,
            in_sync: false,
        })?;
    Ok(*hasher.finalize().as_bytes())
}

pub(crate) async fn recv<R: AsyncRead + Unpin>(
    r: &mut R,
    mut file: std::fs::File,
    offset: u64,
    size: u64,
    prefix: Option<blake3::Hasher>,
    io_timeout: Duration,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(Digest, std::fs::File), BodyError> {
    let total = size.saturating_sub(offset);
    let (full_tx, full_rx) = std_mpsc::sync_channel::<Vec<u8>>(PIPELINE_DEPTH);
    let (free_tx, mut free_rx) = mpsc::channel::<Vec<u8>>(PIPELINE_DEPTH);
    let writer = tokio::task::spawn_blocking(
        move || -> std::io::Result<(blake3::Hasher, std::fs::File)> {
            let mut hasher = match prefix {
                Some(h) => h,
                None => hash_prefix_blocking(&mut file, offset)?,
            };
            file.seek(SeekFrom::Start(offset))?;
            while let Ok(buf) = full_rx.recv() {
                hasher.update(&buf);
                file.write_all(&buf)?;
                if free_tx.blocking_send(buf).is_err() {
                    return Err(cancelled());
                }
            }
            Ok((hasher, file))
        },
    );

    let mut pool: Vec<Vec<u8>> = (0..PIPELINE_DEPTH).map(|_| Vec::new()).collect();
    let mut received = 0u64;
    let mut writer_alive = true;
    while received < total {
        let n = (CHUNK_LEN as u64).min(total - received) as usize;
        let mut buf = match pool.pop() {
            Some(buf) => buf,
            None if writer_alive => match free_rx.recv().await {
                Some(buf) => buf,
                None => {
                    // The writer failed: keep reading so the stream stays in sync.
                    writer_alive = false;
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        buf.resize(n, 0);
        if let Err((filled, e)) = read_exact_progress(r, &mut buf, io_timeout).await {
            // Keep every byte that arrived, so a resumed transfer need not send it again,
            // and let the writer finish before returning, so the file is complete when the
            // caller releases it.
            if writer_alive {
                buf.truncate(filled);
                let _ = full_tx.try_send(buf);
            }
            drop(full_tx);
            let _ = writer.await;
            return Err(e.into());
        }
        received += n as u64;
        progress(received);
        if writer_alive {
            if let Err(e) = full_tx.try_send(buf) {
                // Only a dead writer can refuse: at most PIPELINE_DEPTH buffers exist.
                writer_alive = false;
                pool.push(match e {
                    std_mpsc::TrySendError::Full(b) | std_mpsc::TrySendError::Disconnected(b) => b,
                });
            }
        } else {
            pool.push(buf);
        }
    }
    drop(full_tx);
    let joined = writer.await.map_err(|e| BodyError::Local {
        source: std::io::Error::other(e.to_string()),
        in_sync: true,
    })?;
    let (hasher, file) = joined.map_err(|e| BodyError::Local {
        source: e,
        in_sync: true,
    })?;
    Ok((*hasher.finalize().as_bytes(), file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Connection;

    fn file_with(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    async fn round_trip(data: Vec<u8>, offset: u64) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let mut b = Connection::new(b, Duration::from_secs(10));
        let size = data.len() as u64;
        let src = file_with(&data);
        // The receiver already holds the prefix, as a resumed transfer would.
        let dst = file_with(&data[..offset as usize]);
        let send = async move {
            a.send_body(src, offset, size, None, &mut |_| {})
                .await
                .unwrap()
        };
        // The receiver brings its own prefix hasher, as a resumed transfer does.
        let prefix = hash_prefix(&dst, offset).await.unwrap();
        let recv = async move {
            b.recv_body(dst, offset, size, Some(prefix), &mut |_| {})
                .await
                .unwrap()
        };
        let (d1, (d2, mut out)) = tokio::join!(send, recv);
        assert_eq!(d1, d2);
        assert_eq!(d1, *blake3::hash(&data).as_bytes());
        let mut back = Vec::new();
        out.seek(SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn bodies_round_trip_exactly() {
        round_trip(Vec::new(), 0).await;
        round_trip(b"EOF\nEOF\r\n\0EOF".to_vec(), 0).await;
        let all: Vec<u8> = (0..=255u8).cycle().take(3 * CHUNK_LEN + 17).collect();
        round_trip(all.clone(), 0).await;
        round_trip(all, (CHUNK_LEN + 5) as u64).await;
    }

    #[tokio::test]
    async fn a_prefix_hasher_continues_to_the_whole_digest() {
        let data: Vec<u8> = (0..=255u8).cycle().take(CHUNK_LEN + 99).collect();
        let f = file_with(&data);
        let mut h = hash_prefix(&f, 1000).await.unwrap();
        assert_eq!(h.finalize(), blake3::hash(&data[..1000]));
        h.update(&data[1000..]);
        assert_eq!(h.finalize(), blake3::hash(&data));
        let short = hash_prefix(&f, data.len() as u64 + 1).await.unwrap_err();
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_short_source_is_reported() {
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let err = a
            .send_body(file_with(b"abc"), 0, 10, None, &mut |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::SourceChanged), "{err:?}");
    }

    // Real time: the blocking writer thread keeps tokio's paused clock from auto-advancing.
    #[tokio::test]
    async fn a_slow_steady_sender_is_fine_and_a_stalled_one_times_out() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut b = Connection::new(b, Duration::from_secs(1));
        let slow = tokio::spawn(async move {
            for byte in 0..15u8 {
                a.write_all(&[byte]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            a
        });
        // 15 bytes over 1.5 s with a 1 s progress deadline: slower than the deadline in
        // total, but never stalled, so it must succeed.
        let (digest, _) = b
            .recv_body(tempfile::tempfile().unwrap(), 0, 15, None, &mut |_| {})
            .await
            .unwrap();
        let expected: Vec<u8> = (0..15u8).collect();
        assert_eq!(digest, *blake3::hash(&expected).as_bytes());
        let _a = slow.await.unwrap();
        let err = b
            .recv_body(tempfile::tempfile().unwrap(), 0, 1, None, &mut |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, BodyError::Net(ConnError::Timeout(_))),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_truncated_body_is_a_network_error() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut b = Connection::new(b, Duration::from_secs(10));
        a.write_all(b"only five").await.unwrap();
        drop(a);
        let err = b
            .recv_body(tempfile::tempfile().unwrap(), 0, 100, None, &mut |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, BodyError::Net(ConnError::Truncated)),
            "{err:?}"
        );
    }
}
