//! Where a received body's bytes go ([`BodySink`]), and who computes the digest the receiver
//! checks: a local file hashed here as it is written ([`FileSink`]), any writer hashed here
//! ([`HashingSink`]), or a writer that hashes what it takes itself ([`WriteSink`], an object
//! store upload that hashes its parts as a BLAKE3 tree), so no body is hashed twice.
//!
//! A sink runs on the body's one blocking thread; the async side only reads the network.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::time::Duration;

use super::{Cancel, hash_prefix_into, hashing_allowance};
use crate::message::Digest;
use crate::pagecache::WriteBehind;

/// The blocking side of a received body: takes each chunk in order, and at the end gives the
/// digest of the whole file (the held prefix and the body) and what it leaves the caller.
///
/// A sink that does not see the whole body is dropped on the blocking thread, after being
/// given every byte that arrived (a network failure: so a resumed transfer need not send
/// them again), or after its own write failed, or within one chunk of the transfer being
/// dropped. Its `Drop` decides what to keep.
pub trait BodySink: Send + 'static {
    /// What a complete body leaves the caller (the file, for a [`FileSink`]).
    type Done: Send + 'static;

    /// Extra time [`BodySink::start`] may take before the first chunk is taken, on top of
    /// the usual deadline (hashing a held prefix of `offset` bytes). None by default.
    fn start_allowance(&self, offset: u64) -> Duration {
        let _ = offset;
        Duration::ZERO
    }

    /// Gets ready to take the body: `total` bytes that follow the `offset` bytes held (a
    /// resumed transfer). Long work checks `cancel` between chunks. Does nothing by default.
    fn start(&mut self, offset: u64, total: u64, cancel: &Cancel<'_>) -> io::Result<()> {
        let _ = (offset, total, cancel);
        Ok(())
    }

    /// Takes the next bytes of the body, all of them or an error.
    fn write(&mut self, chunk: &[u8]) -> io::Result<()>;

    /// Ends a complete body: the BLAKE3 of the whole file, and what the caller gets.
    fn finish(self) -> io::Result<(Digest, Self::Done)>;
}

/// A local file, written from the offset and hashed here, with write-behind for a big body
/// (see [`crate::pagecache`]): what [`crate::Connection::recv_body`] receives into.
#[derive(Debug)]
pub struct FileSink {
    /// The file, at any position: `start` seeks to the offset.
    file: File,
    /// Has absorbed the held prefix (once `start` ran) and everything written since.
    hasher: blake3::Hasher,
    /// Whether `start` must hash the prefix from the file (no hasher was given).
    hash_prefix: bool,
    /// Write-behind for a big body; set by `start`.
    behind: Option<WriteBehind>,
}

impl FileSink {
    /// Receives into `file`. `prefix` has absorbed the bytes before the offset (see
    /// [`super::hash_prefix`]); `None` hashes them from the file first.
    pub fn new(file: File, prefix: Option<blake3::Hasher>) -> FileSink {
        FileSink {
            file,
            hash_prefix: prefix.is_none(),
            hasher: prefix.unwrap_or_default(),
            behind: None,
        }
    }
}

impl BodySink for FileSink {
    type Done = File;

    fn start_allowance(&self, offset: u64) -> Duration {
        if self.hash_prefix {
            hashing_allowance(offset)
        } else {
            Duration::ZERO
        }
    }

    fn start(&mut self, offset: u64, total: u64, cancel: &Cancel<'_>) -> io::Result<()> {
        if self.hash_prefix {
            hash_prefix_into(&mut self.file, offset, &mut self.hasher, cancel.0)?;
        }
        self.file.seek(SeekFrom::Start(offset))?;
        self.behind = WriteBehind::new(offset, total);
        Ok(())
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.hasher.update(chunk);
        self.file.write_all(chunk)?;
        if let Some(b) = &mut self.behind {
            b.wrote(&self.file, chunk.len());
        }
        Ok(())
    }

    fn finish(self) -> io::Result<(Digest, File)> {
        Ok((*self.hasher.finalize().as_bytes(), self.file))
    }
}

/// Any writer, hashed here: for a destination that computes no digest of its own.
#[derive(Debug)]
pub struct HashingSink<W> {
    /// Where the bytes go.
    writer: W,
    /// Has absorbed the held prefix and everything written since.
    hasher: blake3::Hasher,
}

impl<W> HashingSink<W> {
    /// Receives into `writer`; `prefix` has absorbed the bytes before the offset
    /// (`blake3::Hasher::new()` for a body from byte 0).
    pub fn new(writer: W, prefix: blake3::Hasher) -> HashingSink<W> {
        HashingSink {
            writer,
            hasher: prefix,
        }
    }
}

impl<W: Write + Send + 'static> BodySink for HashingSink<W> {
    type Done = W;

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.hasher.update(chunk);
        self.writer.write_all(chunk)
    }

    fn finish(mut self) -> io::Result<(Digest, W)> {
        self.writer.flush()?;
        Ok((*self.hasher.finalize().as_bytes(), self.writer))
    }
}

/// A writer that hashes what it takes itself (an object store upload, which hashes each
/// part as a subtree of the BLAKE3 tree): `digest` gives the whole file's BLAKE3 once the
/// body is complete, so the body is hashed once, by the writer. Both run on the blocking
/// thread; `digest` is not called for a body cut short.
pub struct WriteSink<W, F> {
    /// Where the bytes go.
    writer: W,
    /// The whole file's digest from the writer, at the end.
    digest: F,
}

impl<W, F> WriteSink<W, F> {
    /// Receives into `writer`, whose digest `digest` reads at the end.
    pub fn new(writer: W, digest: F) -> WriteSink<W, F> {
        WriteSink { writer, digest }
    }
}

impl<W: std::fmt::Debug, F> std::fmt::Debug for WriteSink<W, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteSink")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl<W, F> BodySink for WriteSink<W, F>
where
    W: Write + Send + 'static,
    F: FnOnce(&mut W) -> io::Result<Digest> + Send + 'static,
{
    type Done = W;

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.writer.write_all(chunk)
    }

    fn finish(mut self) -> io::Result<(Digest, W)> {
        self.writer.flush()?;
        let digest = (self.digest)(&mut self.writer)?;
        Ok((digest, self.writer))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::body::BodyError;
    use crate::connection::{ConnError, Connection};
    use crate::limits::{CHUNK_LEN, RECV_CHUNK_LEN};
    use crate::message::Request;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 253) as u8).collect()
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// What a [`Recorder`] saw, shared with the test.
    #[derive(Default)]
    struct Seen {
        started: Option<(u64, u64)>,
        bytes: Vec<u8>,
        writes: usize,
        finished: bool,
        dropped: bool,
    }

    /// A sink with a digest of its own making, that records what it is given and fails its
    /// write number `fail_at` if set.
    struct Recorder {
        seen: Arc<Mutex<Seen>>,
        fail_at: Option<usize>,
    }

    const MARK: Digest = [0xa5; 32];

    impl BodySink for Recorder {
        type Done = &'static str;

        fn start(&mut self, offset: u64, total: u64, _: &Cancel<'_>) -> io::Result<()> {
            self.seen.lock().unwrap().started = Some((offset, total));
            Ok(())
        }

        fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
            let mut seen = self.seen.lock().unwrap();
            seen.writes += 1;
            if Some(seen.writes) == self.fail_at {
                return Err(io::Error::other("the store refused the part"));
            }
            seen.bytes.extend_from_slice(chunk);
            Ok(())
        }

        fn finish(self) -> io::Result<(Digest, &'static str)> {
            self.seen.lock().unwrap().finished = true;
            Ok((MARK, "done"))
        }
    }

    impl Drop for Recorder {
        fn drop(&mut self) {
            self.seen.lock().unwrap().dropped = true;
        }
    }

    fn recorder(fail_at: Option<usize>) -> (Recorder, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let sink = Recorder {
            seen: seen.clone(),
            fail_at,
        };
        (sink, seen)
    }

    fn pipes() -> (
        Connection<tokio::io::DuplexStream>,
        Connection<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let timeout = std::time::Duration::from_secs(10);
        (Connection::new(a, timeout), Connection::new(b, timeout))
    }

    #[tokio::test]
    async fn a_custom_sink_gets_every_byte_in_order_and_its_digest_is_the_answer() {
        let body = data(3 * CHUNK_LEN + 9);
        let (offset, size) = (100, body.len() as u64 + 100);
        let (mut a, mut b) = pipes();
        let (sink, seen) = recorder(None);
        let mut whole = vec![0u8; 100];
        whole.extend_from_slice(&body);
        let src = file_with(&whole);
        let (mut progress, mut sent_progress) = (|_| {}, |_| {});
        let send = a.send_body(src, offset, size, None, &mut sent_progress);
        let recv = b.recv_body_into(sink, offset, size, &mut progress);
        let (sent, received) = tokio::join!(send, recv);
        assert_eq!(sent.unwrap(), *blake3::hash(&whole).as_bytes());
        // The sink's own digest, not one computed beside it.
        assert_eq!(received.unwrap(), (MARK, "done"));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.started, Some((offset, size - offset)));
        assert!(seen.bytes == body, "the bytes differ");
        assert!(seen.finished && seen.dropped);
    }

    #[tokio::test]
    async fn a_writer_that_hashes_itself_is_hashed_once_by_it() {
        let body = data(2 * CHUNK_LEN + 3);
        let size = body.len() as u64;
        let (mut a, mut b) = pipes();
        let calls = Arc::new(Mutex::new(0));
        let counted = calls.clone();
        // The digest comes from the writer (here: hashing what it holds) when the body ends.
        let sink = WriteSink::new(Vec::new(), move |w: &mut Vec<u8>| {
            *counted.lock().unwrap() += 1;
            Ok(*blake3::hash(w).as_bytes())
        });
        let (mut progress, mut sent_progress) = (|_| {}, |_| {});
        let send = a.send_body(file_with(&body), 0, size, None, &mut sent_progress);
        let recv = b.recv_body_into(sink, 0, size, &mut progress);
        let (sent, received) = tokio::join!(send, recv);
        let (digest, got) = received.unwrap();
        assert_eq!(sent.unwrap(), digest);
        assert!(got == body);
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_hashing_sink_goes_on_from_its_prefix() {
        let whole = data(CHUNK_LEN + 77);
        let (offset, size) = (50u64, whole.len() as u64);
        let (mut a, mut b) = pipes();
        let mut prefix = blake3::Hasher::new();
        prefix.update(&whole[..50]);
        let sink = HashingSink::new(Vec::new(), prefix);
        let (mut progress, mut sent_progress) = (|_| {}, |_| {});
        let send = a.send_body(file_with(&whole), offset, size, None, &mut sent_progress);
        let recv = b.recv_body_into(sink, offset, size, &mut progress);
        let (sent, received) = tokio::join!(send, recv);
        let (digest, got) = received.unwrap();
        assert_eq!(digest, *blake3::hash(&whole).as_bytes());
        assert_eq!(sent.unwrap(), digest);
        assert!(got == whole[50..]);
    }

    #[tokio::test]
    async fn a_sink_failing_mid_body_leaves_the_stream_in_step() {
        let body = data(3 * RECV_CHUNK_LEN + 9);
        let size = body.len() as u64;
        let (mut a, mut b) = pipes();
        let (sink, seen) = recorder(Some(2));
        let mut progress = |_| {};
        let send = async {
            let digest = a
                .send_body(file_with(&body), 0, size, None, &mut |_| {})
                .await;
            a.write_frame(&Request::Ping).await.unwrap();
            digest
        };
        let recv = b.recv_body_into(sink, 0, size, &mut progress);
        let (sent, received) = tokio::join!(send, recv);
        sent.unwrap();
        match received.unwrap_err() {
            BodyError::Local { source, in_sync } => {
                assert!(in_sync);
                assert_eq!(source.to_string(), "the store refused the part");
            }
            other => panic!("{other:?}"),
        }
        // The rest of the body was read and dropped: the next frame is the next thing read.
        assert_eq!(b.read_frame::<Request>().await.unwrap(), Request::Ping);
        let seen = seen.lock().unwrap();
        assert!(seen.bytes == body[..RECV_CHUNK_LEN]);
        assert!(!seen.finished && seen.dropped);
    }

    #[tokio::test]
    async fn a_network_failure_hands_the_sink_every_byte_that_arrived() {
        let body = data(3 * CHUNK_LEN);
        // One whole chunk and part of the next, then the connection breaks.
        let arrived = CHUNK_LEN + 12_345;
        let (mut raw, b) = tokio::io::duplex(64 * 1024);
        let mut b = Connection::new(b, std::time::Duration::from_secs(10));
        let (sink, seen) = recorder(None);
        let sender = async {
            raw.write_all(&body[..arrived]).await.unwrap();
            drop(raw);
        };
        let mut progress = |_| {};
        let recv = b.recv_body_into(sink, 0, body.len() as u64, &mut progress);
        let ((), received) = tokio::join!(sender, recv);
        let err = received.unwrap_err();
        assert!(
            matches!(err, BodyError::Net(ConnError::Truncated)),
            "{err:?}"
        );
        // recv waits for the sink's thread, so all of it is there when it returns.
        let seen = seen.lock().unwrap();
        assert!(seen.bytes == body[..arrived], "{} bytes", seen.bytes.len());
        assert!(!seen.finished && seen.dropped);
    }

    #[test]
    fn a_file_sink_hashes_the_prefix_it_was_not_given_and_writes_after_it() {
        let whole = data(1000);
        let mut sink = FileSink::new(file_with(&whole[..400]), None);
        assert!(sink.start_allowance(400) == hashing_allowance(400));
        let flag = AtomicBool::new(false);
        sink.start(400, 600, &Cancel(&flag)).unwrap();
        sink.write(&whole[400..]).unwrap();
        let (digest, mut f) = sink.finish().unwrap();
        assert_eq!(digest, *blake3::hash(&whole).as_bytes());
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert!(back == whole);
        // Cancelled before it starts: the prefix is not hashed.
        flag.store(true, Ordering::Relaxed);
        let mut sink = FileSink::new(file_with(&whole), None);
        assert!(sink.start(1000, 0, &Cancel(&flag)).is_err());
    }
}
