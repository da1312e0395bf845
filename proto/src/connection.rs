//! A connection that speaks frames: owns the stream, reads and writes one message at a time,
//! and puts a deadline on every read and write so a silent peer cannot hold it forever.

use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::{BodyError, BodySink, BodySource, FileSink, FileSource, SendHash};
use crate::frame::{self, FrameError, HEADER_LEN};
use crate::message::Digest;
use crate::records::{Plain, WriteRecords};
use crate::tls_stream::TlsStream;

/// Why reading or writing on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed by the peer")]
    Closed,
    /// The peer closed or broke the connection in the middle of a frame or body.
    #[error("connection broke in the middle of a message")]
    Truncated,
    /// No progress within the deadline; the string names the phase.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The peer sent a frame we cannot decode.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The transport failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// How a connection reaches its stream's record path (see [`Connection::over_tls`]).
type RecordPath<S> = for<'a> fn(&'a mut S) -> &'a mut (dyn WriteRecords + Send + 'a);

/// A framed connection over any byte stream (TLS in practice, in-memory pipes in tests).
pub struct Connection<S> {
    /// The byte stream: [`crate::tls_stream::TlsStream`] in practice, which reads and writes
    /// in pieces of up to `limits::CHUNK_LEN`, so no buffer is needed above or below it.
    stream: S,
    /// Reused encode buffer, so writing a frame does not allocate each time.
    wbuf: Vec<u8>,
    /// Deadline for each write, and for each read of a body to make progress.
    io_timeout: Duration,
    /// Deadline for the rest of a frame once its first byte has arrived: a peer trickling a
    /// frame a byte at a time is dropped when it passes.
    frame_timeout: Duration,
    /// Least bytes per second a body must move (0: no floor); see [`crate::body::Pacing`].
    min_body_rate: u64,
    /// Start of the next frame's header, read by [`Connection::input_ready`] to learn that
    /// input was waiting; the next read starts with these bytes.
    peeked: [u8; HEADER_LEN],
    /// How many bytes of `peeked` hold data.
    peeked_len: usize,
    /// For a TLS stream, the way to its record path, which sends file bodies sealed where
    /// they were read (`records`); `None` sends them as plain writes. A function, because
    /// the connection is generic over its stream and Rust cannot ask "is `S` a TLS stream?"
    /// inside `send_body`: the constructor that knows it leaves the answer here.
    records: Option<RecordPath<S>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a stream; `io_timeout` bounds every read and write.
    pub fn new(stream: S, io_timeout: Duration) -> Self {
        Connection {
            stream,
            wbuf: Vec::with_capacity(1024),
            io_timeout,
            frame_timeout: io_timeout,
            min_body_rate: 0,
            peeked: [0; HEADER_LEN],
            peeked_len: 0,
            records: None,
        }
    }

    /// Sets the least rate, in bytes per second over each I/O timeout, at which a body must
    /// move; a slower one fails with a timeout (see [`crate::body::Pacing`]). 0 (the default)
    /// keeps only the per-read deadline.
    pub fn set_min_body_rate(&mut self, bytes_per_sec: u64) {
        self.min_body_rate = bytes_per_sec;
    }

    fn pacing(&self) -> crate::body::Pacing {
        crate::body::Pacing {
            io_timeout: self.io_timeout,
            min_rate: self.min_body_rate,
        }
    }

    /// Sets the deadline for completing a frame once it has started.
    pub fn set_frame_timeout(&mut self, timeout: Duration) {
        self.frame_timeout = timeout;
    }

    /// The underlying stream, mutably (for body transfers).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads the next frame, waiting at most `first_byte` for it to start (an idle or login
    /// deadline) and then at most the frame timeout ([`Connection::set_frame_timeout`]) for
    /// the rest. A clean close between frames is [`ConnError::Closed`].
    pub async fn read_frame_within<T: DeserializeOwned>(
        &mut self,
        first_byte: Duration,
        phase: &'static str,
    ) -> Result<T, ConnError> {
        let mut header = [0u8; HEADER_LEN];
        let n = if self.peeked_len > 0 {
            let n = std::mem::take(&mut self.peeked_len);
            header[..n].copy_from_slice(&self.peeked[..n]);
            n
        } else {
            tokio::time::timeout(first_byte, self.stream.read(&mut header))
                .await
                .map_err(|_| ConnError::Timeout(phase))??
        };
        if n == 0 {
            return Err(ConnError::Closed);
        }
        // One deadline for the whole rest of the frame, however the bytes are spread out.
        let rest = async {
            if n < HEADER_LEN {
                read_exact_or_truncated(&mut self.stream, &mut header[n..]).await?;
            }
            let len = frame::frame_len(&header)?;
            // The length was checked against the cap above, so this allocation is bounded.
            let mut body = vec![0u8; len];
            read_exact_or_truncated(&mut self.stream, &mut body).await?;
            Ok::<_, ConnError>(frame::decode_body(&body)?)
        };
        tokio::time::timeout(self.frame_timeout, rest)
            .await
            .map_err(|_| ConnError::Timeout("reading a frame"))?
    }

    /// Reads the next frame within the I/O timeout.
    pub async fn read_frame<T: DeserializeOwned>(&mut self) -> Result<T, ConnError> {
        self.read_frame_within(self.io_timeout, "waiting for a reply")
            .await
    }

    /// Writes one frame and flushes it.
    pub async fn write_frame<T: Serialize>(&mut self, msg: &T) -> Result<(), ConnError> {
        self.wbuf.clear();
        frame::encode_frame(msg, &mut self.wbuf)?;
        let fut = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.io_timeout, fut)
            .await
            .map_err(|_| ConnError::Timeout("sending a frame"))??;
        Ok(())
    }

    /// Closes the write side (TLS close_notify), bounded by the I/O timeout.
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.io_timeout, self.stream.shutdown()).await;
    }

    /// Streams bytes `offset..size` of `file` as a raw body and returns the digest of the whole
    /// file (bytes `0..size`). The prefix is not sent: `prefix` is a hasher that has already
    /// absorbed bytes `0..offset` (see [`crate::body::hash_prefix`]), or `None` to hash them here.
    pub async fn send_body(
        &mut self,
        file: std::fs::File,
        offset: u64,
        size: u64,
        prefix: Option<blake3::Hasher>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<Digest, BodyError> {
        let hash = match prefix {
            Some(h) => SendHash::Prefix(h),
            None => SendHash::FromStart,
        };
        let digest = self
            .send_body_from(FileSource::new(file), offset, size, hash, progress)
            .await?;
        // Hashing was asked for, so there is a digest.
        Ok(digest.unwrap_or_default())
    }

    /// Streams the whole of `file` (`size` bytes) as a raw body without hashing it, for a
    /// sender that knows its digest already (the daemon's stored digest).
    pub async fn send_body_unhashed(
        &mut self,
        file: std::fs::File,
        size: u64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), BodyError> {
        self.send_body_from(FileSource::new(file), 0, size, SendHash::Skip, progress)
            .await?;
        Ok(())
    }

    /// Streams bytes `offset..size` from `source` as a raw body (a [`FileSource`] seeks to
    /// `offset` itself; a [`crate::body::ReadSource`] must be there already), on the
    /// stream's record path if it has one. Returns the whole file's digest, hashed as
    /// `hash` says: `None` only for [`SendHash::Skip`].
    pub async fn send_body_from<B: BodySource>(
        &mut self,
        source: B,
        offset: u64,
        size: u64,
        hash: SendHash,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<Option<Digest>, BodyError> {
        let pacing = self.pacing();
        match self.records {
            Some(records) => {
                let w = records(&mut self.stream);
                crate::body::send(w, source, offset, size, hash, pacing, progress).await
            }
            None => {
                let mut w = Plain(&mut self.stream);
                crate::body::send(&mut w, source, offset, size, hash, pacing, progress).await
            }
        }
    }

    /// Receives a raw body of `size - offset` bytes into `file` (positioned by this call at
    /// `offset`), and returns the digest of the whole file and the file. `prefix` is as for
    /// [`Connection::send_body`]. On a local write failure the rest of the body is read and
    /// discarded, so the connection stays usable.
    pub async fn recv_body(
        &mut self,
        file: std::fs::File,
        offset: u64,
        size: u64,
        prefix: Option<blake3::Hasher>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(Digest, std::fs::File), BodyError> {
        self.recv_body_into(FileSink::new(file, prefix), offset, size, progress)
            .await
    }

    /// Receives a raw body of `size - offset` bytes into `sink`, which holds the first
    /// `offset` bytes already, and returns the whole file's digest as the sink computed it
    /// and what the sink leaves. On a local failure ([`BodyError::Local`] with `in_sync`) the
    /// rest of the body is read and discarded, so the connection stays usable; on a network
    /// failure the sink was given every byte that arrived (see [`BodySink`]).
    pub async fn recv_body_into<K: BodySink>(
        &mut self,
        sink: K,
        offset: u64,
        size: u64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(Digest, K::Done), BodyError> {
        let pacing = self.pacing();
        crate::body::recv(&mut self.stream, sink, offset, size, pacing, progress).await
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send> Connection<TlsStream<IO>> {
    /// Wraps a TLS stream as [`Connection::new`] does, and sends file bodies on it without
    /// copying them: each chunk is read from the file into the slots of the TLS records that
    /// carry it, and sealed there.
    pub fn over_tls(stream: TlsStream<IO>, io_timeout: Duration) -> Self {
        let mut conn = Connection::new(stream, io_timeout);
        conn.records = Some(tls_records::<IO>);
        conn
    }
}

impl<S> Connection<S> {
    /// Whether file bodies go out on the stream's record path.
    #[cfg(test)]
    pub(crate) fn sends_records(&self) -> bool {
        self.records.is_some()
    }
}

fn tls_records<IO: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: &mut TlsStream<IO>,
) -> &mut (dyn WriteRecords + Send + '_) {
    stream
}

/// Batched uploads (protocol 3): small bodies held in memory, and frames written without a
/// flush each, so a client can pipeline many `Put`s into few writes.
impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Reads a small raw body (a `Put`'s) whole into `buf`, under the body deadlines and the
    /// rate floor ([`Connection::set_min_body_rate`]).
    pub async fn recv_small_body(&mut self, buf: &mut [u8]) -> Result<(), ConnError> {
        let pacing = self.pacing();
        crate::body::recv_small(&mut self.stream, buf, pacing).await
    }

    /// Writes one frame without flushing: it leaves with the next flush (an explicit
    /// [`Connection::flush`] or any [`Connection::write_frame`]).
    pub async fn queue_frame<T: Serialize>(&mut self, msg: &T) -> Result<(), ConnError> {
        self.wbuf.clear();
        frame::encode_frame(msg, &mut self.wbuf)?;
        tokio::time::timeout(self.io_timeout, self.stream.write_all(&self.wbuf))
            .await
            .map_err(|_| ConnError::Timeout("sending a frame"))??;
        Ok(())
    }

    /// Writes a small raw body (a `Put`'s) without flushing, under the body deadlines.
    pub async fn queue_small_body(&mut self, body: &[u8]) -> Result<(), ConnError> {
        let pacing = self.pacing();
        crate::body::send_small(&mut self.stream, body, pacing).await
    }

    /// Whether the peer has already sent more (the start of a next frame, or the end of the
    /// stream, or an error), found without waiting. Bytes read to learn it are kept for the
    /// next frame read. A server that answers pipelined requests uses it to decide whether
    /// it may leave answers unflushed: only while more input is waiting, because a peer
    /// that waits for those answers sends nothing more.
    pub fn input_ready(&mut self) -> bool {
        if self.peeked_len > 0 {
            return true;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut buf = tokio::io::ReadBuf::new(&mut self.peeked);
        match std::pin::Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf) {
            std::task::Poll::Pending => false,
            std::task::Poll::Ready(Ok(())) => {
                self.peeked_len = buf.filled().len();
                // 0 bytes: the end of the stream, which the next read reports.
                true
            }
            // The next read meets the error again, or the end of the stream.
            std::task::Poll::Ready(Err(_)) => true,
        }
    }

    /// Sends whatever queued frames and bodies are still buffered.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        tokio::time::timeout(self.io_timeout, self.stream.flush())
            .await
            .map_err(|_| ConnError::Timeout("sending a frame"))??;
        Ok(())
    }
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ConnError> {
    match r.read_exact(buf).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ConnError::Truncated),
        Err(e) => Err(ConnError::Io(e)),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Request;

    #[tokio::test]
    async fn frames_cross_a_pipe() {
        let (a, b) = tokio::io::duplex(1024);
        let mut a = Connection::new(a, Duration::from_secs(5));
        let mut b = Connection::new(b, Duration::from_secs(5));
        a.write_frame(&Request::Ping).await.unwrap();
        a.write_frame(&Request::List { path: "x".into() })
            .await
            .unwrap();
        assert_eq!(b.read_frame::<Request>().await.unwrap(), Request::Ping);
        assert_eq!(
            b.read_frame::<Request>().await.unwrap(),
            Request::List { path: "x".into() }
        );
        drop(a);
        assert!(matches!(
            b.read_frame::<Request>().await,
            Err(ConnError::Closed)
        ));
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_without_reading_the_body() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = Connection::new(b, Duration::from_secs(5));
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            b.read_frame::<Request>().await,
            Err(ConnError::Frame(FrameError::TooLarge(_)))
        ));
    }

    #[tokio::test]
    async fn close_mid_frame_is_truncated() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = Connection::new(b, Duration::from_secs(5));
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(
            b.read_frame::<Request>().await,
            Err(ConnError::Truncated)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (_a, b) = tokio::io::duplex(1024);
        let mut b = Connection::new(b, Duration::from_secs(5));
        let err = b
            .read_frame_within::<Request>(Duration::from_secs(30), "waiting for login")
            .await
            .unwrap_err();
        assert!(matches!(err, ConnError::Timeout("waiting for login")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stalls_mid_frame_times_out() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = Connection::new(b, Duration::from_secs(5));
        a.write_all(&[0, 0]).await.unwrap();
        let err = b
            .read_frame_within::<Request>(Duration::from_secs(30), "idle")
            .await
            .unwrap_err();
        assert!(matches!(err, ConnError::Timeout("reading a frame")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_trickling_one_byte_a_second_is_dropped_at_the_frame_deadline() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut b = Connection::new(b, Duration::from_secs(30));
        b.set_frame_timeout(Duration::from_secs(10));
        let mut frame = Vec::new();
        crate::frame::encode_frame(
            &Request::List {
                path: "x".repeat(100),
            },
            &mut frame,
        )
        .unwrap();
        let trickle = tokio::spawn(async move {
            for byte in frame {
                if a.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = tokio::time::Instant::now();
        let err = b
            .read_frame_within::<Request>(Duration::from_secs(900), "idle")
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnError::Timeout("reading a frame")),
            "{err:?}"
        );
        assert!(started.elapsed() <= Duration::from_secs(11));
        trickle.abort();
    }
}
