//! Where a sent body's bytes come from ([`BodySource`]): a local file, read with one `readv`
//! per chunk straight into the slots of the TLS records that carry it, or any reader (an
//! object store's ranged GET), read into the same slots by a loop of reads.
//!
//! Both run on the body's one blocking thread, which also hashes what it read; the async side
//! only sends the filled buffers. The trait is generic, not a `dyn`, so a file body goes
//! through the very calls it did before the trait existed.

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Seek, SeekFrom};

use super::{Cancel, hash_prefix_into};
use crate::pagecache::ReadBehind;

/// The blocking side of a sent body: the bytes from the body's offset, read into record slots
/// with `read_vectored` (each chunk's slots at once; a source reads as many as it can per call,
/// and is called until all are full or it returns 0, which fails the body as the file having
/// shrunk).
///
/// Implement `read_vectored` when the source can fill several slots per call (a file's
/// `readv`); the default of [`Read`] fills one slot per call, which is correct but slower.
pub trait BodySource: Read + Send + 'static {
    /// Gets ready to read byte `offset` next, for a body of `total` bytes from there. With
    /// `prefix` (the caller asked for [`super::SendHash::FromStart`] at a non-zero offset),
    /// feeds bytes `0..offset` to it first, checking `cancel` between chunks; a source that
    /// cannot read what lies before its position fails with [`io::ErrorKind::Unsupported`].
    fn start(
        &mut self,
        offset: u64,
        total: u64,
        prefix: Option<&mut blake3::Hasher>,
        cancel: &Cancel<'_>,
    ) -> io::Result<()>;

    /// Notes that `len` more bytes of the body were read and will not be needed again (a big
    /// file drops them from the page cache). Does nothing by default.
    fn consumed(&mut self, len: usize) {
        let _ = len;
    }
}

/// A local file: seeks to the offset itself, can hash the prefix before it, reads each chunk
/// with one `readv`, and drops a big file's pages behind it when it was read cold (see
/// [`crate::pagecache`]).
#[derive(Debug)]
pub struct FileSource {
    /// The file, at any position: [`BodySource::start`] seeks.
    file: File,
    /// Drop-behind for a big body of a file that was not cached; set by `start`.
    behind: Option<ReadBehind>,
}

impl FileSource {
    /// Sends from `file` (its position does not matter).
    pub fn new(file: File) -> FileSource {
        FileSource { file, behind: None }
    }
}

impl Read for FileSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    // The reason this type exists: one readv fills a whole chunk's record slots.
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.file.read_vectored(bufs)
    }
}

impl BodySource for FileSource {
    fn start(
        &mut self,
        offset: u64,
        total: u64,
        prefix: Option<&mut blake3::Hasher>,
        cancel: &Cancel<'_>,
    ) -> io::Result<()> {
        match prefix {
            // Reads bytes 0..offset, which leaves the file at the offset.
            Some(hasher) => hash_prefix_into(&mut self.file, offset, hasher, cancel.0)?,
            None => {
                self.file.seek(SeekFrom::Start(offset))?;
            }
        }
        self.behind = ReadBehind::new(&self.file, offset, total);
        Ok(())
    }

    fn consumed(&mut self, len: usize) {
        if let Some(b) = &mut self.behind {
            b.read(&self.file, len);
        }
    }
}

/// Any reader already positioned at the body's first byte, such as an object store's ranged
/// GET read from a blocking thread. It cannot go back to the bytes before its position, so
/// it cannot hash a prefix itself: send it with [`super::SendHash::Prefix`] (a hasher of the
/// prefix obtained elsewhere) or [`super::SendHash::Skip`]; [`super::SendHash::FromStart`]
/// works only at offset 0, and fails with [`io::ErrorKind::Unsupported`] before any byte is
/// sent otherwise.
#[derive(Debug)]
pub struct ReadSource<R>(pub R);

impl<R: Read> Read for ReadSource<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.0.read_vectored(bufs)
    }
}

impl<R: Read + Send + 'static> BodySource for ReadSource<R> {
    fn start(
        &mut self,
        offset: u64,
        _total: u64,
        prefix: Option<&mut blake3::Hasher>,
        _cancel: &Cancel<'_>,
    ) -> io::Result<()> {
        if prefix.is_some() && offset > 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this source cannot hash the bytes before its offset",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;
    use crate::body::{BodyError, SendHash};
    use crate::connection::Connection;
    use crate::limits::CHUNK_LEN;
    use crate::tls_stream::testing::{pair, rekey_after};

    /// A reader that is not a file: at most `most` bytes per call, one slot at a time (the
    /// default `read_vectored`), as a download from an object store hands out its pieces.
    struct Pieces {
        bytes: Vec<u8>,
        at: usize,
        most: usize,
    }

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.most).min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// The rest of `data` from `offset`, as a reader positioned there.
    fn pieces(data: &[u8], offset: u64) -> ReadSource<Pieces> {
        ReadSource(Pieces {
            bytes: data[offset as usize..].to_vec(),
            at: 0,
            most: 7_001,
        })
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn contents(mut f: File) -> Vec<u8> {
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        back
    }

    fn prefix_hasher(data: &[u8], offset: u64) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(&data[..offset as usize]);
        h
    }

    /// Sends `data` from a reader three ways (whole and hashed, resumed with a prefix
    /// hasher, whole and unhashed) and checks each arrives byte for byte.
    async fn reader_bodies_arrive_whole<S>(a: &mut Connection<S>, b: &mut Connection<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let data: Vec<u8> = (0..3 * CHUNK_LEN + 16_389)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let size = data.len() as u64;
        let whole = *blake3::hash(&data).as_bytes();
        let resumed = CHUNK_LEN as u64 + 5;
        for (offset, hash) in [
            (0, SendHash::FromStart),
            (resumed, SendHash::Prefix(prefix_hasher(&data, resumed))),
            (0, SendHash::Skip),
        ] {
            let skip = matches!(hash, SendHash::Skip);
            let dst = file_with(&data[..offset as usize]);
            let (mut p1, mut p2) = (|_| {}, |_| {});
            let send = a.send_body_from(pieces(&data, offset), offset, size, hash, &mut p1);
            let recv = b.recv_body(dst, offset, size, None, &mut p2);
            let (sent, received) = tokio::join!(send, recv);
            let (digest, out) = received.unwrap();
            assert_eq!(digest, whole, "offset {offset}");
            assert_eq!(sent.unwrap(), (!skip).then_some(whole), "offset {offset}");
            assert!(contents(out) == data, "the bytes differ (offset {offset})");
        }
    }

    #[tokio::test]
    async fn a_body_read_from_a_reader_arrives_whole_over_tls() {
        let (mut client, server) = pair().await;
        rekey_after(&mut client, 5);
        let mut a = Connection::over_tls(client, Duration::from_secs(10));
        let mut b = Connection::over_tls(server, Duration::from_secs(10));
        reader_bodies_arrive_whole(&mut a, &mut b).await;
        assert!(a.sends_records());
    }

    #[tokio::test]
    async fn a_body_read_from_a_reader_arrives_whole_over_a_pipe() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let mut b = Connection::new(b, Duration::from_secs(10));
        reader_bodies_arrive_whole(&mut a, &mut b).await;
    }

    #[tokio::test]
    async fn a_reader_cannot_hash_what_lies_before_it() {
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let data = vec![3u8; 100];
        let err = a
            .send_body_from(pieces(&data, 10), 10, 100, SendHash::FromStart, &mut |_| {})
            .await
            .unwrap_err();
        match err {
            BodyError::Local { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::Unsupported)
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_short_reader_is_reported_as_a_changed_source() {
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut a = Connection::new(a, Duration::from_secs(10));
        let err = a
            .send_body_from(pieces(b"abc", 0), 0, 10, SendHash::Skip, &mut |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::SourceChanged), "{err:?}");
    }

    #[test]
    fn a_file_source_seeks_and_hashes_its_prefix_itself() {
        let data: Vec<u8> = (0..=255u8).cycle().take(CHUNK_LEN + 10).collect();
        let mut f = file_with(&data);
        // Anywhere: start seeks.
        f.seek(SeekFrom::Start(3)).unwrap();
        let mut src = FileSource::new(f);
        let flag = std::sync::atomic::AtomicBool::new(false);
        let mut h = blake3::Hasher::new();
        src.start(1000, data.len() as u64 - 1000, Some(&mut h), &Cancel(&flag))
            .unwrap();
        assert_eq!(h.finalize(), blake3::hash(&data[..1000]));
        let mut rest = Vec::new();
        src.read_to_end(&mut rest).unwrap();
        assert!(rest == data[1000..]);
    }
}
