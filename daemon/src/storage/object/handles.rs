//! The object backend's handles as the seam hands them to the commands: an upload that the
//! connection keeps (to commit, discard or give up) while the body's blocking thread writes
//! into it ([`ObjectPending`], [`ObjectWriter`]), a download's source ([`ObjectBody`]) and a
//! batched file held in memory until its commit ([`ObjectStaged`]).
//!
//! An upload is shared between the two sides because either may end it: the body's thread
//! writes every chunk, while the connection may stop it at any moment (a session that ended,
//! a retry that took over) and must then still be able to discard it. A tokio mutex, because
//! the writer holds it across a wait for a part's permit (the store taking a part), which an
//! async task must not block on; the writer takes it with `blocking_lock` on its own thread.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::Mutex;
use xfer_proto::Digest;

use super::{BlockingReader, ObjectError, ObjectHead, ObjectTree, ObjectUpload};

/// An upload in progress, as the seam's `Upload` holds it: what the resume offer needs,
/// read once at its start, and the upload itself behind a lock its writer shares.
#[derive(Debug)]
pub struct ObjectPending {
    /// The upload; `None` once committed or discarded (a writer still around then fails).
    up: Arc<Mutex<Option<ObjectUpload>>>,
    /// The canonical remote path.
    key: String,
    /// Bytes held from an earlier attempt (whole parts).
    held: u64,
    /// Their digest, from the parts' chaining values.
    held_digest: Option<Digest>,
    /// Whether an interruption keeps the parts.
    resumable: bool,
    /// Whether another attempt holds the path's resume record.
    held_elsewhere: bool,
}

impl ObjectPending {
    /// Wraps an upload just begun.
    pub fn new(up: ObjectUpload) -> ObjectPending {
        ObjectPending {
            key: up.key().to_string(),
            held: up.held(),
            held_digest: up.held_digest(),
            resumable: up.resumable(),
            held_elsewhere: up.held_elsewhere(),
            up: Arc::new(Mutex::new(Some(up))),
        }
    }

    /// The canonical remote path.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes held from an interrupted attempt (whole parts), offered for resume.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The BLAKE3 of the held bytes (no hashing: rebuilt from the parts' chaining values).
    pub fn held_digest(&self) -> Option<Digest> {
        self.held_digest
    }

    /// Whether an interruption now would leave parts to resume from.
    pub fn resumable(&self) -> bool {
        self.resumable
    }

    /// Whether it runs apart because another attempt holds the path's resume record.
    pub fn held_elsewhere(&self) -> bool {
        self.held_elsewhere
    }

    /// The blocking writer the body goes through (on a blocking thread only).
    pub fn writer(&self) -> ObjectWriter {
        ObjectWriter {
            up: self.up.clone(),
            key: self.key.clone(),
        }
    }

    /// Drops the held parts, to start from byte 0.
    pub async fn restart(&mut self) -> Result<(), ObjectError> {
        let mut guard = self.up.lock().await;
        let up = guard
            .as_mut()
            .ok_or_else(|| ObjectError::TakenOver(self.key.clone()))?;
        up.restart().await?;
        self.held = 0;
        self.held_digest = None;
        Ok(())
    }

    /// The upload itself, for its commit; `None` if it was already ended.
    pub async fn take(self) -> Option<ObjectUpload> {
        self.up.lock().await.take()
    }

    /// Aborts the upload on the store (nothing to resume from); done when this returns.
    pub async fn discard(self) {
        if let Some(up) = self.take().await {
            up.discard().await;
        }
    }

    /// Stops it as a broken connection would (a resumable upload keeps its parts and
    /// releases its claim), and waits until its record says so.
    pub async fn interrupt(self) {
        if let Some(up) = self.take().await {
            up.interrupt().await;
        }
    }
}

/// The body's side of an [`ObjectPending`]: a blocking [`io::Write`] that cuts parts and
/// sends them, and gives the whole file's digest at the end.
#[derive(Debug)]
pub struct ObjectWriter {
    /// The shared upload.
    up: Arc<Mutex<Option<ObjectUpload>>>,
    /// The canonical remote path, for errors.
    key: String,
}

impl ObjectWriter {
    fn ended(&self) -> io::Error {
        io::Error::other(ObjectError::TakenOver(self.key.clone()))
    }

    /// The BLAKE3 of the whole file, once every byte was written (from the parts' chaining
    /// values: no second pass over the data).
    pub fn digest(&self) -> io::Result<Digest> {
        let guard = self.up.blocking_lock();
        let up = guard.as_ref().ok_or_else(|| self.ended())?;
        up.digest().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the upload of `{}` is not complete", self.key),
            )
        })
    }
}

impl io::Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut guard = self.up.blocking_lock();
        let up = guard.as_mut().ok_or_else(|| self.ended())?;
        up.blocking_write(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A download's bytes on the object store: the version [`ObjectTree::head`] found, read
/// with ranged GETs that must match it.
#[derive(Debug)]
pub struct ObjectBody {
    /// Whose tree.
    tree: ObjectTree,
    /// The version to read.
    head: ObjectHead,
}

impl ObjectBody {
    /// A source for the file `head` describes.
    pub fn new(tree: ObjectTree, head: ObjectHead) -> ObjectBody {
        ObjectBody { tree, head }
    }

    /// Bytes `offset..` as a blocking reader (for the body's blocking thread).
    pub async fn reader(&self, offset: u64) -> Result<BlockingReader, ObjectError> {
        let read = self.tree.read(&self.head, offset, None).await?;
        Ok(read.into_blocking_reader(tokio::runtime::Handle::current()))
    }

    /// BLAKE3 of the first `len` bytes, as a hasher that can go on with the rest: one ranged
    /// GET, hashed on the blocking pool. Fails if the file is shorter; dropping the future
    /// stops the hashing within one piece.
    pub async fn prefix_hasher(&self, len: u64) -> io::Result<blake3::Hasher> {
        if len > self.head.size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let read = self
            .tree
            .read(&self.head, 0, Some(len))
            .await
            .map_err(io::Error::other)?;
        let mut reader = read.into_blocking_reader(tokio::runtime::Handle::current());
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut left = len;
            while left > 0 {
                if stop.load(Ordering::Relaxed) {
                    return Err(io::Error::other("hashing stopped"));
                }
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = io::Read::read(&mut reader, &mut buf[..want])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                h.update(&buf[..n]);
                left -= n as u64;
            }
            Ok(h)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
    }
}

/// Sets its flag when dropped: tells a blocking task its caller went away.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A batched file, verified and held in memory until its commit stores it in one PUT:
/// memory is bounded by the batch's `limits.max_batch_bytes`, and dropping it uncommitted
/// leaves nothing on the store.
#[derive(Debug)]
pub struct ObjectStaged {
    /// The remote path as the client gave it.
    remote: String,
    /// The file.
    data: Bytes,
    /// Its BLAKE3, kept as the object's metadata.
    digest: Digest,
}

impl ObjectStaged {
    /// Checks that `remote` can take a file (creating its missing folders, as `mkdir -p`)
    /// and holds `data` for the commit.
    pub async fn stage(
        tree: &ObjectTree,
        remote: &str,
        data: Vec<u8>,
    ) -> Result<ObjectStaged, ObjectError> {
        tree.check_stage(remote).await?;
        let digest = *blake3::hash(&data).as_bytes();
        Ok(ObjectStaged {
            remote: remote.into(),
            data: Bytes::from(data),
            digest,
        })
    }

    /// The remote path as the client gave it.
    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// Stores it (one PUT, atomic per object).
    pub async fn commit(&self, tree: &ObjectTree) -> Result<(), ObjectError> {
        tree.put_small(&self.remote, self.data.clone(), &self.digest)
            .await
    }
}
