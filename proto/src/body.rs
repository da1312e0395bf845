//! File bodies: exactly `size - offset` raw bytes after the header frame, never scanned for
//! markers, moved through a small ring of large buffers between the network task and one
//! blocking thread that does the file I/O and the BLAKE3 hashing with std::fs.
//!
//! What is at the far end of that thread is generic: a sent body comes from a
//! [`BodySource`] (a local file, [`FileSource`], or any reader, [`ReadSource`]), a received
//! one goes to a [`BodySink`] that also owns the digest ([`FileSink`], [`HashingSink`], or
//! [`WriteSink`] for a writer that hashes itself, such as an object store upload). Generic,
//! not `dyn`: a file body makes the same calls it made when this took a `std::fs::File`.
//!
//! Why this shape: per-chunk `tokio::fs` calls each hop to the blocking pool and measured at a
//! third of the speed of large std::fs reads and writes on one blocking thread; hashing on that
//! thread overlaps it with TLS work on the async side. Memory per transfer is bounded by
//! `RECV_CHUNK_LEN * PIPELINE_DEPTH` for a receiver; a sender reads the file straight into TLS
//! records (see `records`), so its buffers are that much plus the records' headers and tags,
//! and on a TLS stream one more such buffer, the chunk the stream is writing (it comes back
//! to the pipeline when written, and goes at the flush that ends the body).

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::connection::ConnError;
use crate::limits::{CHUNK_LEN, PIPELINE_DEPTH, RECV_CHUNK_LEN};
use crate::message::Digest;
use crate::records::{RecordBuf, WriteRecords, write_records};

mod sink;
mod source;

pub use sink::{BodySink, FileSink, HashingSink, WriteSink};
pub use source::{BodySource, FileSource, ReadSource};

/// Why a body transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The local side (the file, or whatever the source or sink stands for) could not be read
    /// or written. `in_sync` tells whether the connection is still at a frame boundary (the
    /// receiver drained the body) or must be closed.
    #[error("{source}")]
    Local {
        /// The file error.
        source: std::io::Error,
        /// Whether the connection can carry further frames.
        in_sync: bool,
    },
    /// The source ended before its announced size (a file truncated while sending).
    #[error("the file shrank while it was being sent")]
    SourceChanged,
    /// The connection failed mid-body.
    #[error(transparent)]
    Net(#[from] ConnError),
}

fn cancelled() -> std::io::Error {
    std::io::Error::other("transfer cancelled")
}

/// Phase named when a body moves slower than the minimum rate (see [`Pacing`]).
pub const TOO_SLOW: &str = "moving file data: slower than the minimum transfer rate";

/// How slow a body may go before it is dropped.
///
/// A deadline per read alone (the only rule before) lets a peer keep a transfer, its blocking
/// thread and its buffers forever by sending one byte just inside each deadline. So, when
/// `min_rate` is set, time spent waiting for the peer is cut into windows of `io_timeout`, and
/// in each window the peer must move `min_rate` bytes per second (or the rest of the body):
/// a trickling peer is dropped at the end of its first window. Time spent on our own side
/// (disk writes, hashing) does not count against the peer; instead each wait for the local
/// side is bounded by `io_timeout` too, so a hung disk or a starved blocking pool cannot keep
/// a transfer alive either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Longest wait for any progress, on the network or (with a rate floor) on the local side.
    pub io_timeout: Duration,
    /// Least bytes per second, measured over each `io_timeout` of waiting for the peer;
    /// 0 keeps only the per-wait deadline (and leaves local waits unbounded).
    pub min_rate: u64,
}

impl Pacing {
    /// The deadline for a wait on the local side (the blocking file thread), if bounded.
    fn local_deadline(&self, extra: Duration) -> Option<Duration> {
        (self.min_rate > 0).then(|| self.io_timeout + extra)
    }
}

/// The rate floor's bookkeeping for one body: progress and window deadlines that only run
/// while waiting for the peer.
struct Floor {
    /// The limits.
    pacing: Pacing,
    /// When the current window ends (pushed back by time spent off the network).
    window_end: Instant,
    /// Bytes the peer still owes in the current window.
    owed: u64,
    /// Bytes of the body not yet moved.
    left: u64,
    /// When the peer last moved a byte (pushed back likewise).
    last_progress: Instant,
    /// When the last network wait ended: the time since then was spent on our side.
    idle_since: Instant,
}

impl Floor {
    fn new(pacing: Pacing, total: u64) -> Floor {
        let now = Instant::now();
        let mut floor = Floor {
            pacing,
            window_end: now,
            owed: 0,
            left: total,
            last_progress: now,
            idle_since: now,
        };
        floor.next_window(now);
        floor
    }

    fn next_window(&mut self, now: Instant) {
        self.window_end = now + self.pacing.io_timeout;
        let per_window = (self.pacing.min_rate as u128 * self.pacing.io_timeout.as_millis() / 1000)
            .min(u64::MAX as u128) as u64;
        self.owed = per_window.min(self.left);
    }

    /// Waits for one network operation that moves bytes, under both deadlines; `stalled`
    /// names the phase when nothing moved for the io timeout.
    async fn wait<F>(&mut self, fut: F, stalled: &'static str) -> Result<usize, ConnError>
    where
        F: Future<Output = std::io::Result<usize>>,
    {
        let resumed = Instant::now();
        let off_network = resumed.saturating_duration_since(self.idle_since);
        self.window_end += off_network;
        self.last_progress += off_network;
        let mut fut = std::pin::pin!(fut);
        let result = loop {
            let stall_at = self.last_progress + self.pacing.io_timeout;
            let until = if self.pacing.min_rate > 0 {
                stall_at.min(self.window_end)
            } else {
                stall_at
            };
            match tokio::time::timeout_at(until, &mut fut).await {
                Ok(Ok(n)) => {
                    let now = Instant::now();
                    if n > 0 {
                        self.last_progress = now;
                        self.left = self.left.saturating_sub(n as u64);
                        self.owed = self.owed.saturating_sub(n as u64);
                    }
                    if self.pacing.min_rate > 0 && now >= self.window_end {
                        self.close_window(now)?;
                    }
                    break Ok(n);
                }
                Ok(Err(e)) => break Err(ConnError::Io(e)),
                Err(_) => {
                    let now = Instant::now();
                    if now >= stall_at {
                        break Err(ConnError::Timeout(stalled));
                    }
                    self.close_window(now)?;
                }
            }
        };
        self.idle_since = Instant::now();
        result
    }

    fn close_window(&mut self, now: Instant) -> Result<(), ConnError> {
        if self.owed > 0 {
            return Err(ConnError::Timeout(TOO_SLOW));
        }
        self.next_window(now);
        Ok(())
    }
}

/// Sets a flag when dropped: a blocking thread checking it stops when the future that owns
/// this guard goes away (a client left, a transfer was cut off).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn cancel_flag() -> (Arc<AtomicBool>, CancelOnDrop) {
    let flag = Arc::new(AtomicBool::new(false));
    (flag.clone(), CancelOnDrop(flag))
}

/// Tells a body's blocking thread that the transfer it serves was dropped: a source or sink
/// doing long work before the first chunk (hashing a held prefix) checks it between chunks.
/// Chunks themselves need no check: the next one never comes.
#[derive(Debug, Clone, Copy)]
pub struct Cancel<'a>(&'a AtomicBool);

impl Cancel<'_> {
    /// Whether the transfer was dropped.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Fails with a "transfer cancelled" error once the transfer was dropped.
    pub fn check(&self) -> std::io::Result<()> {
        if self.requested() {
            Err(cancelled())
        } else {
            Ok(())
        }
    }
}

/// BLAKE3 of the first `len` bytes of `file`, as a hasher that can go on with the rest: a
/// resumed transfer compares `finalize()` of it with the other side's prefix digest, then
/// passes it to the body so the prefix is read once. Runs on the blocking pool; fails with
/// `UnexpectedEof` if the file is shorter than `len`. Dropping the future stops the hashing
/// within one chunk, so a caller that races it against the peer leaving wastes no more work.
pub async fn hash_prefix(file: &std::fs::File, len: u64) -> std::io::Result<blake3::Hasher> {
    let mut file = file.try_clone()?;
    let (cancel, _guard) = cancel_flag();
    tokio::task::spawn_blocking(move || hash_prefix_blocking(&mut file, len, &cancel))
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

fn hash_prefix_blocking(
    file: &mut std::fs::File,
    len: u64,
    cancel: &AtomicBool,
) -> std::io::Result<blake3::Hasher> {
    let mut hasher = blake3::Hasher::new();
    hash_prefix_into(file, len, &mut hasher, cancel)?;
    Ok(hasher)
}

fn hash_prefix_into(
    file: &mut std::fs::File,
    len: u64,
    hasher: &mut blake3::Hasher,
    cancel: &AtomicBool,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; CHUNK_LEN.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let n = (buf.len() as u64).min(left) as usize;
        file.read_exact(&mut buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Waits for the blocking file thread, within `limit` when there is one.
async fn local<T>(
    limit: Option<Duration>,
    fut: impl Future<Output = T>,
    what: &'static str,
) -> Result<T, BodyError> {
    match limit {
        None => Ok(fut.await),
        Some(limit) => tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| BodyError::Local {
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, what),
                in_sync: false,
            }),
    }
}

/// Fills `buf`, under the deadlines of `floor`. On failure, also says how much of `buf` was
/// filled, so a receiver can keep what arrived (it is authenticated by TLS).
async fn read_exact_progress<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    floor: &mut Floor,
) -> Result<(), (usize, ConnError)> {
    let mut filled = 0;
    while filled < buf.len() {
        match floor
            .wait(r.read(&mut buf[filled..]), "receiving file data")
            .await
        {
            Ok(0) => return Err((filled, ConnError::Truncated)),
            Ok(n) => filled += n,
            Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err((filled, ConnError::Truncated));
            }
            Err(e) => return Err((filled, e)),
        }
    }
    Ok(())
}

/// Reads a small body (a `Put`'s, at most [`crate::limits::MAX_PUT_LEN`]) whole into `buf`,
/// under the same deadlines and rate floor as a streamed body. No file and no blocking
/// thread: for a few KiB the hop to a blocking thread would cost more than the copy.
pub(crate) async fn recv_small<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    pacing: Pacing,
) -> Result<(), ConnError> {
    let mut floor = Floor::new(pacing, buf.len() as u64);
    read_exact_progress(r, buf, &mut floor)
        .await
        .map_err(|(_, e)| e)
}

/// Writes a small body from memory under the deadlines of a streamed body, without flushing.
pub(crate) async fn send_small<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    pacing: Pacing,
) -> Result<(), ConnError> {
    let mut floor = Floor::new(pacing, buf.len() as u64);
    write_all_progress(w, buf, &mut floor).await
}

/// Writes all of `buf`, under the deadlines of `floor`.
async fn write_all_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    floor: &mut Floor,
) -> Result<(), ConnError> {
    let mut written = 0;
    while written < buf.len() {
        match floor
            .wait(w.write(&buf[written..]), "sending file data")
            .await?
        {
            0 => return Err(ConnError::Truncated),
            n => written += n,
        }
    }
    Ok(())
}

/// Sends all of `buf`'s content, under the deadlines of `floor`.
async fn write_records_progress<W: WriteRecords + ?Sized>(
    w: &mut W,
    buf: &mut RecordBuf,
    floor: &mut Floor,
) -> Result<(), ConnError> {
    while buf.unsent() > 0 {
        if floor
            .wait(write_records(w, buf), "sending file data")
            .await?
            == 0
        {
            return Err(ConnError::Truncated);
        }
    }
    Ok(())
}

/// How a sent body is hashed, on the blocking thread that reads it.
// Moved once per body into the reader task, as the `Option<Hasher>` before it was: boxing
// would add an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum SendHash {
    /// Goes on from a hasher that has absorbed bytes `0..offset`.
    Prefix(blake3::Hasher),
    /// Hashes bytes `0..offset` first, then the body: a [`FileSource`] can, a
    /// [`ReadSource`] only at offset 0 (see [`BodySource::start`]).
    FromStart,
    /// Does not hash: the caller knows the digest already.
    Skip,
}

/// Sends bytes `offset..size` of `source`; the whole file's digest, unless `hash` is
/// [`SendHash::Skip`]. The source is read into record-shaped buffers, which a TLS stream
/// seals where they lie (see `records`).
pub(crate) async fn send<W: WriteRecords + ?Sized, B: BodySource>(
    w: &mut W,
    mut source: B,
    offset: u64,
    size: u64,
    hash: SendHash,
    pacing: Pacing,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Option<Digest>, BodyError> {
    let total = size.saturating_sub(offset);
    let (full_tx, mut full_rx) = mpsc::channel::<std::io::Result<RecordBuf>>(PIPELINE_DEPTH);
    let (free_tx, free_rx) = std_mpsc::sync_channel::<RecordBuf>(PIPELINE_DEPTH);
    for _ in 0..PIPELINE_DEPTH {
        let _ = free_tx.try_send(RecordBuf::new());
    }
    // Hashing a prefix here (no hasher given) takes a while before the first chunk.
    let from_start = matches!(hash, SendHash::FromStart);
    let first_wait = if from_start {
        hashing_allowance(offset)
    } else {
        Duration::ZERO
    };
    let (cancel, _stop_reader) = cancel_flag();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<Option<blake3::Hasher>> {
        let mut hasher = match hash {
            SendHash::Prefix(h) => Some(h),
            SendHash::FromStart => Some(blake3::Hasher::new()),
            SendHash::Skip => None,
        };
        let result: std::io::Result<()> = (|| {
            let prefix = if from_start { hasher.as_mut() } else { None };
            source.start(offset, total, prefix, &Cancel(&cancel))?;
            let mut left = total;
            while left > 0 {
                let mut buf = free_rx.recv().map_err(|_| cancelled())?;
                let n = (CHUNK_LEN as u64).min(left) as usize;
                buf.fill_from(&mut source, n)?;
                source.consumed(n);
                if let Some(h) = &mut hasher {
                    for slot in buf.slots() {
                        h.update(slot);
                    }
                }
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

    let mut floor = Floor::new(pacing, total);
    let mut sent = 0u64;
    while sent < total {
        let limit = pacing.local_deadline(if sent == 0 {
            first_wait
        } else {
            Duration::ZERO
        });
        let next = local(limit, full_rx.recv(), "reading the file made no progress").await?;
        let mut buf = match next {
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
        let n = buf.unsent();
        write_records_progress(w, &mut buf, &mut floor).await?;
        sent += n as u64;
        progress(sent);
        let _ = free_tx.try_send(buf);
    }
    floor
        .wait(async { w.flush().await.map(|()| 0) }, "sending file data")
        .await?;
    let limit = pacing.local_deadline(if total == 0 {
        first_wait
    } else {
        Duration::ZERO
    });
    let hasher = local(limit, reader, "hashing the file made no progress")
        .await?
        .map_err(|e| BodyError::Local {
            source: std::io::Error::other(e.to_string()),
            in_sync: false,
        })?
        .map_err(|e| BodyError::Local {
            source: e,
            in_sync: false,
        })?;
    Ok(hasher.map(|h| *h.finalize().as_bytes()))
}

/// Receives a body of `size - offset` bytes into `sink`, which was handed the `offset` bytes
/// held before it (a resumed transfer) and gives the whole file's digest at the end. On a
/// local failure the rest of the body is read and dropped, so the stream stays in step; on
/// a network failure the sink gets every byte that arrived first.
pub(crate) async fn recv<R: AsyncRead + Unpin, K: BodySink>(
    r: &mut R,
    mut sink: K,
    offset: u64,
    size: u64,
    pacing: Pacing,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(Digest, K::Done), BodyError> {
    let total = size.saturating_sub(offset);
    let (full_tx, full_rx) = std_mpsc::sync_channel::<Vec<u8>>(PIPELINE_DEPTH);
    let (free_tx, mut free_rx) = mpsc::channel::<Vec<u8>>(PIPELINE_DEPTH);
    let first_wait = sink.start_allowance(offset);
    let (cancel, _stop_writer) = cancel_flag();
    let writer =
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<(Digest, K::Done)>> {
            sink.start(offset, total, &Cancel(&cancel))?;
            let mut written = 0u64;
            while let Ok(buf) = full_rx.recv() {
                sink.write(&buf)?;
                written += buf.len() as u64;
                if free_tx.blocking_send(buf).is_err() {
                    return Err(cancelled());
                }
            }
            if written < total {
                // Cut short: the sink has every byte that arrived, and is dropped here.
                return Ok(None);
            }
            sink.finish().map(Some)
        });

    let mut floor = Floor::new(pacing, total);
    let mut pool: Vec<Vec<u8>> = (0..PIPELINE_DEPTH).map(|_| Vec::new()).collect();
    let mut received = 0u64;
    let mut writer_alive = true;
    let mut waits = 0u64;
    while received < total {
        let n = (RECV_CHUNK_LEN as u64).min(total - received) as usize;
        let mut buf = match pool.pop() {
            Some(buf) => buf,
            None if writer_alive => {
                // The first buffer back may wait for the writer to hash a prefix.
                let extra = if waits == 0 {
                    first_wait
                } else {
                    Duration::ZERO
                };
                waits += 1;
                let limit = pacing.local_deadline(extra);
                match local(limit, free_rx.recv(), "writing the file made no progress").await? {
                    Some(buf) => buf,
                    None => {
                        // The writer failed: keep reading so the stream stays in sync.
                        writer_alive = false;
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        buf.resize(n, 0);
        if let Err((filled, e)) = read_exact_progress(r, &mut buf, &mut floor).await {
            // Keep every byte that arrived, so a resumed transfer need not send it again,
            // and let the writer finish before returning, so the file is complete when the
            // caller releases it.
            if writer_alive {
                buf.truncate(filled);
                let _ = full_tx.try_send(buf);
            }
            drop(full_tx);
            let _ = local(
                pacing.local_deadline(first_wait),
                writer,
                "writing the file made no progress",
            )
            .await;
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
    let limit = pacing.local_deadline(if waits == 0 {
        first_wait
    } else {
        Duration::ZERO
    });
    let joined = local(limit, writer, "writing the file made no progress")
        .await
        .map_err(|e| match e {
            BodyError::Local { source, .. } => BodyError::Local {
                source,
                in_sync: true,
            },
            other => other,
        })?
        .map_err(|e| BodyError::Local {
            source: std::io::Error::other(e.to_string()),
            in_sync: true,
        })?;
    match joined {
        Ok(Some(done)) => Ok(done),
        // Not reached: the body completed, so every byte was handed over.
        Ok(None) => Err(BodyError::Local {
            source: cancelled(),
            in_sync: true,
        }),
        Err(e) => Err(BodyError::Local {
            source: e,
            in_sync: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

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

    // The record path: each chunk read into TLS records and sealed there, with key updates
    // in the middle of chunks, a resumed body, and an unhashed one, on one connection.
    #[tokio::test]
    async fn bodies_sent_as_records_sealed_in_place_arrive_whole() {
        use crate::tls_stream::testing::{pair, rekey_after};
        let (mut client, server) = pair().await;
        rekey_after(&mut client, 5);
        let mut a = Connection::over_tls(client, Duration::from_secs(10));
        let mut b = Connection::over_tls(server, Duration::from_secs(10));
        let data: Vec<u8> = (0..3 * CHUNK_LEN + 16_389)
            .map(|i| (i % 253) as u8)
            .collect();
        let size = data.len() as u64;
        for offset in [0, CHUNK_LEN as u64 + 5] {
            let dst = file_with(&data[..offset as usize]);
            let (mut p1, mut p2) = (|_| {}, |_| {});
            let send = a.send_body(file_with(&data), offset, size, None, &mut p1);
            let recv = b.recv_body(dst, offset, size, None, &mut p2);
            let (sent, received) = tokio::join!(send, recv);
            let (digest, mut out) = received.unwrap();
            assert_eq!(sent.unwrap(), digest);
            assert_eq!(digest, *blake3::hash(&data).as_bytes());
            let mut back = Vec::new();
            out.seek(SeekFrom::Start(0)).unwrap();
            out.read_to_end(&mut back).unwrap();
            assert!(back == data, "the bytes differ (offset {offset})");
        }
        assert!(a.sends_records() && b.sends_records());
        // Frames and bodies both ways after that, on the same streams.
        a.write_frame(&crate::Request::Ping).await.unwrap();
        assert_eq!(
            b.read_frame::<crate::Request>().await.unwrap(),
            crate::Request::Ping
        );
        let (mut p1, mut p2) = (|_| {}, |_| {});
        let send = b.send_body_unhashed(file_with(&data), size, &mut p1);
        let recv = a.recv_body(tempfile::tempfile().unwrap(), 0, size, None, &mut p2);
        let (sent, received) = tokio::join!(send, recv);
        sent.unwrap();
        assert_eq!(received.unwrap().0, *blake3::hash(&data).as_bytes());
    }

    #[tokio::test]
    async fn an_unhashed_body_arrives_whole_and_the_receiver_still_hashes_it() {
        let data: Vec<u8> = (0..3 * CHUNK_LEN + 9).map(|i| (i % 249) as u8).collect();
        let size = data.len() as u64;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let mut b = Connection::new(b, Duration::from_secs(10));
        let src = file_with(&data);
        // Positioned mid-file: the unhashed send starts at byte 0 all the same.
        let mut src_at = src.try_clone().unwrap();
        src_at.seek(SeekFrom::Start(100)).unwrap();
        let send = async move { a.send_body_unhashed(src, size, &mut |_| {}).await.unwrap() };
        let recv = async move {
            b.recv_body(tempfile::tempfile().unwrap(), 0, size, None, &mut |_| {})
                .await
                .unwrap()
        };
        let ((), (digest, mut out)) = tokio::join!(send, recv);
        assert_eq!(digest, *blake3::hash(&data).as_bytes());
        let mut back = Vec::new();
        out.seek(SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    // Above STREAM_MIN, both ends take the page-cache advice path; the source is made cold
    // first so that the sender drops behind itself too, and the receiver resumes mid-block.
    #[tokio::test]
    async fn big_bodies_round_trip_through_write_and_drop_behind() {
        let len = crate::pagecache::STREAM_MIN as usize + CHUNK_LEN + 17;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let src = file_with(&data);
        src.sync_all().unwrap();
        rustix::fs::fadvise(&src, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut a = Connection::new(a, Duration::from_secs(30));
        let mut b = Connection::new(b, Duration::from_secs(30));
        let (size, offset) = (len as u64, (CHUNK_LEN + 5) as u64);
        let dst = file_with(&data[..offset as usize]);
        let (mut sent_progress, mut received_progress) = (|_| {}, |_| {});
        let send = a.send_body(src, offset, size, None, &mut sent_progress);
        let recv = b.recv_body(dst, offset, size, None, &mut received_progress);
        let (sent, received) = tokio::join!(send, recv);
        let (digest, mut out) = received.unwrap();
        assert_eq!(sent.unwrap(), digest);
        assert_eq!(digest, *blake3::hash(&data).as_bytes());
        let mut back = Vec::new();
        out.seek(SeekFrom::Start(0)).unwrap();
        out.read_to_end(&mut back).unwrap();
        assert!(back == data);
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

    /// Writes one byte every 50 ms for as long as the other side reads them.
    fn trickle(mut a: tokio::io::DuplexStream) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while a.write_all(&[7]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    // Real time (see above). A byte every 50 ms never leaves a read waiting for the 1 s
    // deadline, which is all the old per-read rule checked: this body of 100,000 bytes would
    // take 83 minutes. With a floor of 1,000 B/s it must fail at its first 1 s window.
    #[tokio::test]
    async fn a_trickling_sender_is_dropped_by_the_rate_floor() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut b = Connection::new(b, Duration::from_secs(1));
        b.set_min_body_rate(1000);
        let sender = trickle(a);
        let mut progress = |_| {};
        let recv = b.recv_body(
            tempfile::tempfile().unwrap(),
            0,
            100_000,
            None,
            &mut progress,
        );
        let err = tokio::time::timeout(Duration::from_secs(60), recv)
            .await
            .expect("the rate floor ends a trickling body")
            .unwrap_err();
        assert!(
            matches!(err, BodyError::Net(ConnError::Timeout(TOO_SLOW))),
            "{err:?}"
        );
        sender.abort();
    }

    #[tokio::test]
    async fn a_trickling_reader_is_dropped_by_the_rate_floor() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut b = Connection::new(b, Duration::from_secs(1));
        b.set_min_body_rate(1000);
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            while matches!(a.read(&mut byte).await, Ok(1)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let data = vec![1u8; 100_000];
        let mut progress = |_| {};
        let send = b.send_body(file_with(&data), 0, 100_000, None, &mut progress);
        let err = tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .expect("the rate floor ends a trickling download")
            .unwrap_err();
        assert!(
            matches!(err, BodyError::Net(ConnError::Timeout(TOO_SLOW))),
            "{err:?}"
        );
        reader.abort();
    }

    #[tokio::test]
    async fn a_steady_body_above_the_floor_completes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(3 * CHUNK_LEN + 1).collect();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let mut b = Connection::new(b, Duration::from_secs(10));
        a.set_min_body_rate(1000);
        b.set_min_body_rate(1000);
        let size = data.len() as u64;
        let src = file_with(&data);
        let send = async move { a.send_body(src, 0, size, None, &mut |_| {}).await };
        let mut progress = |_| {};
        let recv = b.recv_body(tempfile::tempfile().unwrap(), 0, size, None, &mut progress);
        let (sent, received) = tokio::join!(send, recv);
        assert_eq!(sent.unwrap(), received.unwrap().0);
    }

    #[test]
    fn a_cancelled_prefix_hash_stops() {
        let mut f = file_with(&vec![0u8; 3 * CHUNK_LEN]);
        let (flag, guard) = cancel_flag();
        assert!(hash_prefix_blocking(&mut f, 3 * CHUNK_LEN as u64, &flag).is_ok());
        // Dropping the guard (the future that owned it) is what tells the thread to stop.
        drop(guard);
        let err = hash_prefix_blocking(&mut f, 3 * CHUNK_LEN as u64, &flag).unwrap_err();
        assert_eq!(err.to_string(), cancelled().to_string());
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
