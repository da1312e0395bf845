//! The storage ends of a transfer body, whatever the backend: where an upload's bytes go
//! ([`UploadSink`]) and where a download's come from ([`DownloadSource`]). The body pipeline
//! (`xfer_proto::body`) runs them on its one blocking thread; the commands call one upload
//! function and one download function, and the backend difference stays here.
//!
//! - Local files: [`FileSink`] (hashes as it writes, going on from the resume check's hasher)
//!   and [`FileSource`] (one `readv` per chunk, hashes a prefix itself if asked).
//! - Object store: the upload's own writer, which cuts parts and hashes each as a subtree of
//!   the BLAKE3 tree, so the sink's digest is the upload's and the body is hashed once; and a
//!   blocking reader over a ranged GET from the offset, which the pipeline hashes (or not, when
//!   a stored digest is sent).

use std::io::{self, IoSliceMut, Read};
use std::time::Duration;

use xfer_proto::Digest;
use xfer_proto::body::{BodySink, BodySource, Cancel, FileSink, FileSource, ReadSource};

use super::object::{BlockingReader, ObjectWriter};
use super::{ReadBody, StorageError, Upload};

/// Where an upload's body goes (see [`Upload::sink`]). Dropped before the end (a broken
/// connection, a failed write), it only lets go of the upload: the connection, which still
/// holds the [`Upload`], decides whether to keep or discard what arrived.
// Moved once per body into the blocking thread, as the FileSink alone was: boxing the
// hasher inside would add an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum UploadSink {
    /// The staged file, hashed here.
    Local(FileSink),
    /// The object upload's writer, which hashes its parts itself.
    Object(ObjectWriter),
}

impl Upload {
    /// The sink for a body that starts at the agreed offset. `prefix` is the hasher the
    /// resume check left (see [`Upload::resume_offer`]); a local file whose prefix was not
    /// hashed yet is hashed from the file, an object upload needs none (its parts' chaining
    /// values stand for the held bytes).
    pub fn sink(&self, prefix: Option<blake3::Hasher>) -> io::Result<UploadSink> {
        match self {
            Upload::Local(u) => Ok(UploadSink::Local(FileSink::new(
                u.file().try_clone()?,
                prefix,
            ))),
            Upload::Object(u) => Ok(UploadSink::Object(u.writer())),
        }
    }
}

impl BodySink for UploadSink {
    type Done = ();

    fn start_allowance(&self, offset: u64) -> Duration {
        match self {
            UploadSink::Local(s) => s.start_allowance(offset),
            UploadSink::Object(_) => Duration::ZERO,
        }
    }

    fn start(&mut self, offset: u64, total: u64, cancel: &Cancel<'_>) -> io::Result<()> {
        match self {
            UploadSink::Local(s) => s.start(offset, total, cancel),
            // The upload goes on after its held parts by itself.
            UploadSink::Object(_) => Ok(()),
        }
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self {
            UploadSink::Local(s) => s.write(chunk),
            UploadSink::Object(w) => io::Write::write_all(w, chunk),
        }
    }

    fn finish(self) -> io::Result<(Digest, ())> {
        match self {
            UploadSink::Local(s) => s.finish().map(|(d, _)| (d, ())),
            UploadSink::Object(w) => w.digest().map(|d| (d, ())),
        }
    }
}

/// Where a download's body comes from (see [`ReadBody::source`]).
#[derive(Debug)]
pub enum DownloadSource {
    /// A local file.
    Local(FileSource),
    /// A ranged GET from the offset, read from the blocking thread.
    Object(ReadSource<BlockingReader>),
    /// A file read whole already, from the offset.
    Memory(ReadSource<io::Cursor<Vec<u8>>>),
}

impl ReadBody {
    /// The source of a body from `offset`. An object's GET starts here, so a store that
    /// fails is still answered as an error, before the body is promised. (A file read whole
    /// is usually sent in one write without the pipeline; as a source it reads from memory.)
    pub async fn source(self, offset: u64) -> Result<DownloadSource, StorageError> {
        match self {
            ReadBody::File(f) => Ok(DownloadSource::Local(FileSource::new(f))),
            ReadBody::Object(o) => Ok(DownloadSource::Object(ReadSource(o.reader(offset).await?))),
            ReadBody::Whole { buf, .. } => {
                let mut data = io::Cursor::new(buf);
                data.set_position(super::WHOLE_READ_ROOM as u64 + offset);
                Ok(DownloadSource::Memory(ReadSource(data)))
            }
        }
    }
}

impl Read for DownloadSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            DownloadSource::Local(s) => s.read(buf),
            DownloadSource::Object(s) => s.read(buf),
            DownloadSource::Memory(s) => s.read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            DownloadSource::Local(s) => s.read_vectored(bufs),
            DownloadSource::Object(s) => s.read_vectored(bufs),
            DownloadSource::Memory(s) => s.read_vectored(bufs),
        }
    }
}

impl BodySource for DownloadSource {
    fn start(
        &mut self,
        offset: u64,
        total: u64,
        prefix: Option<&mut blake3::Hasher>,
        cancel: &Cancel<'_>,
    ) -> io::Result<()> {
        match self {
            DownloadSource::Local(s) => s.start(offset, total, prefix, cancel),
            DownloadSource::Object(s) => s.start(offset, total, prefix, cancel),
            DownloadSource::Memory(s) => s.start(offset, total, prefix, cancel),
        }
    }

    fn consumed(&mut self, len: usize) {
        match self {
            DownloadSource::Local(s) => s.consumed(len),
            DownloadSource::Object(s) => s.consumed(len),
            DownloadSource::Memory(s) => s.consumed(len),
        }
    }
}
