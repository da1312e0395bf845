//! Record-shaped body buffers: the sender's file thread reads a chunk of a file straight into
//! the content slots of the TLS records that will carry it, and a TLS stream seals those
//! records where they lie and sends the buffer as it is.
//!
//! Why: the sending side used to read each chunk into a plain buffer and then copy it into
//! the stream's record buffer to seal it, a memmove measured at 8-10% of the sender's CPU
//! on a 512 MiB transfer (the daemon on a download, the client on an upload), both of which
//! are CPU-bound on two cores. Here each chunk is laid out as records from the start (room
//! for the header before each 16 KiB slot, room for the content type and the tag after it)
//! and filled with one `readv` of the file, so no byte of a body is copied in user space on
//! its way out. A stream without records (the in-memory pipes of tests) gets the slots'
//! content through ordinary writes ([`Plain`]).

use std::future::Future;
use std::io::{self, IoSliceMut, Read};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

use crate::tls_stream::{HEADER_LEN, MAX_PLAIN, TAG_LEN};

/// What a record adds around its content: the header, the inner content type, the tag.
pub(crate) const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Bytes of one full record, and the distance from one slot to the next.
const STRIDE: usize = MAX_PLAIN + OVERHEAD;

/// A chunk of a body laid out as TLS records: record `i` starts at `i * STRIDE` and holds
/// content bytes `i * MAX_PLAIN..` at offset [`HEADER_LEN`] (the last one fewer), with room
/// for the header before and for the content type and tag after.
#[derive(Debug, Default)]
pub(crate) struct RecordBuf {
    /// The records. Between fills it holds whatever it last held, sealed or not, and keeps
    /// its length, so that laying out the next chunk writes no byte that the file read then
    /// overwrites (a `Vec` cannot be lengthened without writing, in safe code).
    buf: Vec<u8>,
    /// Content bytes held.
    len: usize,
    /// How many of them a stream has taken.
    sent: usize,
}

/// Bytes on the wire of `len` content bytes in full records and one short one.
fn wire_len(len: usize) -> usize {
    len + len.div_ceil(MAX_PLAIN) * OVERHEAD
}

impl RecordBuf {
    /// An empty buffer; its memory comes with the first fill.
    pub(crate) fn new() -> RecordBuf {
        RecordBuf::default()
    }

    /// Content bytes not yet taken by a stream.
    pub(crate) fn unsent(&self) -> usize {
        self.len - self.sent
    }

    /// Fills the buffer with the next `len` bytes of `file`, with as few reads as the file
    /// allows (one `readv` for a regular file). `UnexpectedEof` if the file ends first.
    pub(crate) fn fill_from(&mut self, file: &mut impl Read, len: usize) -> io::Result<()> {
        self.len = 0;
        self.sent = 0;
        self.buf.resize(wire_len(len), 0);
        let mut slices: Vec<IoSliceMut<'_>> = self
            .buf
            .chunks_mut(STRIDE)
            .map(|record| {
                let end = record.len() - 1 - TAG_LEN;
                IoSliceMut::new(&mut record[HEADER_LEN..end])
            })
            .collect();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match file.read_vectored(left) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ended before its size",
                    ));
                }
                Ok(n) => IoSliceMut::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.len = len;
        Ok(())
    }

    /// The content, one record's slot at a time.
    pub(crate) fn slots(&self) -> impl Iterator<Item = &[u8]> {
        self.buf
            .chunks(STRIDE)
            .take(self.len.div_ceil(MAX_PLAIN))
            .map(|record| &record[HEADER_LEN..record.len() - 1 - TAG_LEN])
    }

    /// The part of the next slot that no stream has taken yet.
    fn next_unsent(&self) -> &[u8] {
        if self.sent >= self.len {
            return &[];
        }
        let (slot, at) = (self.sent / MAX_PLAIN, self.sent % MAX_PLAIN);
        let content = (self.len - slot * MAX_PLAIN).min(MAX_PLAIN);
        let start = slot * STRIDE + HEADER_LEN;
        &self.buf[start + at..start + content]
    }

    /// The records, laid out for sealing in place, and the content length of each, for a
    /// stream that takes them all at once. `None` once a stream has taken some of the
    /// content as plaintext (no stream mixes the two).
    pub(crate) fn records_mut(
        &mut self,
    ) -> Option<(&mut Vec<u8>, impl Iterator<Item = usize> + use<>)> {
        if self.sent != 0 {
            return None;
        }
        let len = self.len;
        let lens = (0..len.div_ceil(MAX_PLAIN)).map(move |i| (len - i * MAX_PLAIN).min(MAX_PLAIN));
        Some((&mut self.buf, lens))
    }

    /// Hands the sealed records to a stream, which gives back a buffer it has sent for the
    /// next fill: the content counts as taken.
    pub(crate) fn swap_out(&mut self, sent: &mut Vec<u8>) {
        std::mem::swap(&mut self.buf, sent);
        self.sent = self.len;
    }
}

/// A stream a [`RecordBuf`] can be sent on.
pub(crate) trait WriteRecords: AsyncWrite + Unpin {
    /// Takes some of the content of `buf` not yet taken (a TLS stream: all of it, sealed in
    /// place), and returns how many content bytes it took. Like `poll_write`, it takes
    /// nothing when it returns `Pending` or an error.
    fn poll_write_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut RecordBuf,
    ) -> Poll<io::Result<usize>>;
}

/// Sends content of `buf` on `w`: [`WriteRecords::poll_write_records`] as a future.
pub(crate) fn write_records<'a, W: WriteRecords + ?Sized>(
    w: &'a mut W,
    buf: &'a mut RecordBuf,
) -> impl Future<Output = io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| w.poll_write_records(cx, buf))
}

/// Any byte stream, which takes the records' content as ordinary writes.
pub(crate) struct Plain<'a, S>(pub(crate) &'a mut S);

impl<S: AsyncWrite + Unpin> WriteRecords for Plain<'_, S> {
    fn poll_write_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut RecordBuf,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self.0).poll_write(cx, buf.next_unsent()))?;
        buf.sent += n;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Plain<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 + i / 997) as u8).collect()
    }

    /// A reader that hands out at most `most` bytes per call, and is interrupted every
    /// other call.
    struct Dribble<'a> {
        bytes: &'a [u8],
        most: usize,
        calls: usize,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.read_vectored(&mut [IoSliceMut::new(buf)])
        }
        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 2 == 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.most - n).min(self.bytes.len());
                buf[..take].copy_from_slice(&self.bytes[..take]);
                self.bytes = &self.bytes[take..];
                n += take;
                if take < buf.len() {
                    break;
                }
            }
            Ok(n)
        }
    }

    #[test]
    fn slots_hold_the_file_in_order_whatever_the_reads_return() {
        let bytes = data(3 * MAX_PLAIN + 77);
        let mut buf = RecordBuf::new();
        for (len, most) in [(bytes.len(), 1000), (MAX_PLAIN, 5000), (1, 1), (0, 1)] {
            let mut file = Dribble {
                bytes: &bytes,
                most,
                calls: 0,
            };
            buf.fill_from(&mut file, len).unwrap();
            assert_eq!(buf.slots().collect::<Vec<_>>().concat(), &bytes[..len]);
            assert_eq!(buf.buf.len(), wire_len(len));
            assert_eq!(buf.unsent(), len);
        }
    }

    #[test]
    fn a_file_shorter_than_asked_is_unexpected_eof() {
        let mut buf = RecordBuf::new();
        let err = buf.fill_from(&mut &b"abc"[..], 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(buf.unsent(), 0, "a failed fill holds nothing to send");
    }

    #[tokio::test]
    async fn a_plain_stream_gets_the_content_whatever_it_takes_per_write() {
        use tokio::io::AsyncReadExt;
        let bytes = data(2 * MAX_PLAIN + 5);
        let mut buf = RecordBuf::new();
        buf.fill_from(&mut &bytes[..], bytes.len()).unwrap();
        // A pipe smaller than a slot takes each in pieces.
        let (mut a, mut b) = tokio::io::duplex(1000);
        let send = async {
            while buf.unsent() > 0 {
                let n = write_records(&mut Plain(&mut a), &mut buf).await.unwrap();
                assert!(n > 0);
            }
            drop(a);
        };
        let mut got = Vec::new();
        let ((), _) = tokio::join!(send, b.read_to_end(&mut got));
        assert!(got == bytes, "the bytes differ");
    }

    // A key update spliced in between a chunk's records must not let the buffer grow the
    // way a `Vec` grows (to twice its size): the buffer goes round the pipeline for the
    // rest of the body, and a peer asks for a key update whenever it likes.
    #[tokio::test]
    async fn a_key_update_spliced_into_a_chunk_grows_its_buffer_by_the_record_only() {
        use crate::limits::CHUNK_LEN;
        use crate::tls_stream::KEY_UPDATE_RECORD;
        use crate::tls_stream::testing::{pair, rekey_after};
        use tokio::io::AsyncReadExt;
        let (mut client, mut server) = pair().await;
        let bytes = data(2 * CHUNK_LEN);
        let mut file = &bytes[..];
        let mut buf = RecordBuf::new();
        let send = async {
            let mut capacities = Vec::new();
            for _ in 0..2 {
                // Key updates due in the middle of each chunk.
                rekey_after(&mut client, 5);
                buf.fill_from(&mut file, CHUNK_LEN).unwrap();
                write_records(&mut client, &mut buf).await.unwrap();
                // What comes back is the buffer of the chunk before, key updates and all.
                capacities.push((buf.buf.len(), buf.buf.capacity()));
            }
            tokio::io::AsyncWriteExt::shutdown(&mut client)
                .await
                .unwrap();
            capacities
        };
        let mut got = Vec::new();
        let (capacities, read) = tokio::join!(send, server.read_to_end(&mut got));
        read.unwrap();
        assert!(got == bytes, "the bytes differ");
        let (len, capacity) = capacities[1];
        assert!(len > wire_len(CHUNK_LEN), "no key update was spliced in");
        assert!(
            capacity <= len + KEY_UPDATE_RECORD,
            "{len} bytes of records (a chunk and its key updates) in a buffer of {capacity}"
        );
    }
}
