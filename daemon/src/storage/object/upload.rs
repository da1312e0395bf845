//! Uploads to the object store: S3 multipart uploads straight to the final key, visible only
//! when completed, which happens only after the whole-file BLAKE3 matched the client's.
//!
//! The body is cut into parts of `part_size` bytes (see [`super::UploadSettings`]). The
//! caller's thread fills one part buffer and hashes it as it fills ([`PartHasher`]); a full
//! part goes, with a permit of a semaphore of `parts_in_flight`, to a driver task that sends
//! it (`UploadPart`) and gives the permit back when the store has it. So one upload holds at
//! most `part_size x (parts_in_flight + 1)` bytes, and a slow store slows the body instead of
//! growing memory. The writer side is a plain blocking [`std::io::Write`] (the body pipeline
//! runs on a blocking thread) with an async twin ([`ObjectUpload::write`]).
//!
//! A file of one part or less is held in memory (at most one part) and stored with one PUT at
//! the commit, its digest as object metadata: not resumable, which costs at most one part.
//!
//! Resume across nodes: after each part that extends the run of finished parts, the driver
//! rewrites a small JSON record, `PREFIX/.xfer/partial/USER/<blake3 of the path>.json`, with
//! the upload id, each part's ETag and chaining value, and a claim (owner and lease). Any node
//! that later begins an upload of the same path and size finds it, offers the client
//! `parts done x part_size` with the digest of that prefix (rebuilt from the chaining values,
//! [`tree_hash::digest`]), and goes on with the same upload id. The lease is renewed every
//! third of `upload_lease_secs` while the upload runs and released when it is interrupted, so
//! a second node does not take over a running upload but may take over one whose node died
//! once the lease ran out. Two takers at once cannot corrupt a file: completion lists the
//! ETags of this attempt's parts, which the store refuses if the other one replaced a part,
//! and the digest is checked first anyway.
//!
//! Stopping: a dropped or interrupted upload keeps its parts and record for resume (the
//! driver finishes the parts in flight, writes the record and releases the lease); a
//! non-resumable or discarded one is aborted on the store (`AbortMultipartUpload`) and its
//! record deleted. Uploads that cannot resume still write a record (under a name of their
//! own), so that [`sweep`] can abort them if the daemon dies mid-upload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, ObjectStore as _, ObjectStoreExt, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use xfer_proto::Digest;

use super::tree_hash::{self, PartHash, PartHasher};
use super::{DIGEST_METADATA, INTERNAL, Inner, ObjectError, StoredDigest, hex, now_millis};

/// How a resumable upload may use what an earlier attempt left.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// Largest offset the client accepts (0: start over).
    pub up_to: u64,
    /// Records not renewed for this long are not resumed (and are swept).
    pub ttl: Duration,
}

/// The resume record, as stored (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Format version.
    version: u32,
    /// Whose upload.
    user: String,
    /// The canonical remote path.
    path: String,
    /// The object key the upload completes to.
    key: String,
    /// Declared size.
    size: u64,
    /// Bytes per part (every part but the last).
    part_size: u64,
    /// The store's multipart upload id.
    upload_id: String,
    /// The run of finished parts from the first, in order.
    parts: Vec<RecordPart>,
    /// Hex root hash of the first part alone (the digest of a one-part prefix).
    first_root: Option<String>,
    /// When the upload started (ms since the epoch).
    created: u64,
    /// Last write of this record (ms): expiry counts from here.
    updated: u64,
    /// The attempt holding the claim: node and nonce.
    owner: String,
    /// Until when (ms) the claim holds; 0 when released.
    lease_until: u64,
    /// Whether another attempt may resume it (false: kept only for the sweeper).
    resumable: bool,
}

/// One finished part in a record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordPart {
    /// 1-based part number, as S3 counts.
    number: u64,
    /// The store's ETag for it, needed to complete the upload.
    e_tag: String,
    /// Hex chaining value of its bytes.
    cv: String,
}

const RECORD_VERSION: u32 = 1;

/// A finished part, in memory.
#[derive(Debug, Clone)]
struct DonePart {
    /// The store's ETag.
    e_tag: String,
    /// Its place in the BLAKE3 tree.
    hash: PartHash,
}

/// What the writer hands the driver.
enum Msg {
    /// A full part to send; the permit is given back once the store has it.
    Part {
        index: usize,
        data: Bytes,
        hash: PartHash,
        permit: OwnedSemaphorePermit,
    },
    /// The body is complete: finish the parts in flight and hand them all back.
    Commit,
}

/// An upload in progress. Dropping it keeps a resumable upload's parts for the next attempt
/// (on any node) and aborts any other; [`ObjectUpload::discard`] aborts either.
pub struct ObjectUpload {
    /// The store.
    inner: Arc<Inner>,
    /// The remote path as given, for messages.
    remote: String,
    /// The canonical remote path.
    canonical: String,
    /// Whose.
    user: String,
    /// Where it completes to.
    key: Key,
    /// Declared size.
    size: u64,
    /// Bytes received so far, counting the held prefix (the offset of the next byte).
    written: u64,
    /// The runtime that drives the parts (the blocking writer waits on it).
    handle: tokio::runtime::Handle,
    /// One PUT or a multipart upload.
    body: Body,
}

impl std::fmt::Debug for ObjectUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectUpload")
            .field("remote", &self.remote)
            .field("size", &self.size)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

enum Body {
    /// The whole file in memory (at most one part), stored at the commit.
    Single(Vec<u8>),
    /// A multipart upload.
    Multi(Box<Multi>),
}

/// A part just filled: its index, bytes and hash.
type FullPart = (usize, Bytes, PartHash);

struct Multi {
    /// Bytes per part.
    part_size: u64,
    /// The store's upload id.
    upload_id: String,
    /// Where its record lives.
    record_key: Key,
    /// This attempt's claim, as written in the record.
    claim: String,
    /// Parts an earlier attempt finished (the resume offer).
    held: Vec<DonePart>,
    /// The hash of every part so far, held ones first: the body's digest at the end.
    hashes: Vec<PartHash>,
    /// Whether an interruption keeps it for resume.
    resumable: bool,
    /// Another attempt holds the path's record: this one runs apart, not resumable.
    held_elsewhere: bool,
    /// Read by the driver when the writer goes away without committing.
    keep: Arc<AtomicBool>,
    /// The part being filled.
    buf: Vec<u8>,
    /// Its hash so far.
    hasher: PartHasher,
    /// Its index.
    next_index: usize,
    /// Parts that may be queued or sending at once.
    permits: Arc<Semaphore>,
    /// To the driver; `None` once the driver was told to end.
    tx: Option<mpsc::UnboundedSender<Msg>>,
    /// The driver: every finished part on commit, or why it stopped.
    driver: Option<JoinHandle<Result<Vec<DonePart>, ObjectError>>>,
    /// The record as last written (the driver keeps its own copy up to date).
    record: Record,
}

/// Starts or resumes an upload of `size` bytes of `user` to `key` (checked by the caller).
pub(super) async fn begin(
    inner: Arc<Inner>,
    user: &str,
    remote: &str,
    canonical: &str,
    key: Key,
    size: u64,
    resume: Option<Resume>,
) -> Result<ObjectUpload, ObjectError> {
    let handle = tokio::runtime::Handle::current();
    let part_size = inner.uploads.part_size_for(size);
    let mut up = ObjectUpload {
        inner: inner.clone(),
        remote: remote.into(),
        canonical: canonical.into(),
        user: user.into(),
        key,
        size,
        written: 0,
        handle,
        body: Body::Single(Vec::new()),
    };
    if size <= part_size {
        return Ok(up);
    }
    let mut nonce = [0u8; 8];
    super::rand_bytes(&mut nonce);
    let claim = format!("{}/{}", inner.node, hex(&nonce));
    let Some(resume) = resume else {
        let record_key =
            inner.internal_key("partial", user, canonical, &format!(".{}", hex(&nonce)));
        up.start_fresh(part_size, record_key, claim, false, false)
            .await?;
        return Ok(up);
    };
    let record_key = inner.internal_key("partial", user, canonical, "");
    let now = now_millis();
    match read_record(&inner, &record_key, remote).await? {
        Some(rec)
            if rec.version == RECORD_VERSION
                && rec.resumable
                && rec.user == user
                && rec.path == canonical
                && rec.size == size
                && rec.part_size == part_size
                && now.saturating_sub(rec.updated) <= resume.ttl.as_millis() as u64 =>
        {
            if rec.lease_until > now {
                tracing::info!(path = %remote, owner = %rec.owner, "another attempt holds this upload's resume record; uploading apart, not resumable");
                let apart =
                    inner.internal_key("partial", user, canonical, &format!(".{}", hex(&nonce)));
                up.start_fresh(part_size, apart, claim, false, true).await?;
                return Ok(up);
            }
            let held = done_parts(&rec).ok_or_else(|| ObjectError::Record {
                path: remote.into(),
                source: serde::de::Error::custom("bad chaining value"),
            })?;
            let mut rec = rec;
            rec.owner = claim.clone();
            rec.lease_until = now + inner.uploads.lease.as_millis() as u64;
            rec.updated = now;
            write_record(&inner, &record_key, &rec, remote).await?;
            // Two nodes may take over at once: the last writer wins, the other goes apart.
            let check = read_record(&inner, &record_key, remote).await?;
            if check.is_none_or(|c| c.owner != claim) {
                let apart =
                    inner.internal_key("partial", user, canonical, &format!(".{}", hex(&nonce)));
                up.start_fresh(part_size, apart, claim, false, true).await?;
                return Ok(up);
            }
            let held_bytes = held_len(&held, part_size, size);
            up.written = held_bytes;
            up.body = Body::Multi(Box::new(Multi::new(
                &up,
                part_size,
                rec.upload_id.clone(),
                record_key,
                claim,
                held,
                true,
                false,
                rec,
            )));
            up.spawn_driver();
            tracing::info!(path = %remote, held = held_bytes, "resuming an upload from its record");
            if held_bytes > resume.up_to.min(size) {
                up.restart().await?;
            }
            Ok(up)
        }
        Some(stale) => {
            // Expired, for another size, or of an older format: its parts are of no use.
            abort_upload(&inner, &stale.key, &stale.upload_id).await;
            up.start_fresh(part_size, record_key, claim, true, false)
                .await?;
            Ok(up)
        }
        None => {
            up.start_fresh(part_size, record_key, claim, true, false)
                .await?;
            Ok(up)
        }
    }
}

/// Parts of a record, with their hashes.
fn done_parts(rec: &Record) -> Option<Vec<DonePart>> {
    let first_root = match &rec.first_root {
        Some(h) => Some(super::parse_digest(h)?),
        None => None,
    };
    rec.parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.number != i as u64 + 1 {
                return None;
            }
            Some(DonePart {
                e_tag: p.e_tag.clone(),
                hash: PartHash {
                    cv: super::parse_digest(&p.cv)?,
                    root: if i == 0 { first_root } else { None },
                },
            })
        })
        .collect()
}

/// Bytes the parts `held` cover.
fn held_len(held: &[DonePart], part_size: u64, size: u64) -> u64 {
    (held.len() as u64 * part_size).min(size)
}

impl Multi {
    #[allow(clippy::too_many_arguments)]
    fn new(
        up: &ObjectUpload,
        part_size: u64,
        upload_id: String,
        record_key: Key,
        claim: String,
        held: Vec<DonePart>,
        resumable: bool,
        held_elsewhere: bool,
        record: Record,
    ) -> Multi {
        let next_index = held.len();
        Multi {
            part_size,
            upload_id,
            record_key,
            claim,
            resumable,
            held_elsewhere,
            keep: Arc::new(AtomicBool::new(resumable)),
            buf: Vec::new(),
            hasher: PartHasher::new(next_index as u64 * part_size),
            next_index,
            hashes: held.iter().map(|p| p.hash).collect(),
            held,
            permits: Arc::new(Semaphore::new(up.inner.uploads.parts_in_flight.max(1))),
            tx: None,
            driver: None,
            record,
        }
    }
}

impl ObjectUpload {
    /// Creates a new multipart upload and its record, and starts the driver.
    async fn start_fresh(
        &mut self,
        part_size: u64,
        record_key: Key,
        claim: String,
        resumable: bool,
        held_elsewhere: bool,
    ) -> Result<(), ObjectError> {
        let upload_id = self
            .inner
            .s3
            .create_multipart(&self.key)
            .await
            .map_err(|e| ObjectError::store("starting the upload of", &self.remote, e))?;
        let now = now_millis();
        let record = Record {
            version: RECORD_VERSION,
            user: self.user.clone(),
            path: self.canonical.clone(),
            key: self.key.to_string(),
            size: self.size,
            part_size,
            upload_id: upload_id.clone(),
            parts: Vec::new(),
            first_root: None,
            created: now,
            updated: now,
            owner: claim.clone(),
            lease_until: now + self.inner.uploads.lease.as_millis() as u64,
            resumable,
        };
        if let Err(e) = write_record(&self.inner, &record_key, &record, &self.remote).await {
            abort_upload(&self.inner, &record.key, &upload_id).await;
            return Err(e);
        }
        self.written = 0;
        self.body = Body::Multi(Box::new(Multi::new(
            self,
            part_size,
            upload_id,
            record_key,
            claim,
            Vec::new(),
            resumable,
            held_elsewhere,
            record,
        )));
        self.spawn_driver();
        Ok(())
    }

    fn spawn_driver(&mut self) {
        let Body::Multi(m) = &mut self.body else {
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            inner: self.inner.clone(),
            remote: self.remote.clone(),
            key: self.key.clone(),
            record_key: m.record_key.clone(),
            record: m.record.clone(),
            done: m.held.clone(),
            pending: BTreeMap::new(),
            keep: m.keep.clone(),
        };
        m.tx = Some(tx);
        m.driver = Some(self.handle.spawn(driver.run(rx)));
    }

    /// The remote path as given.
    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// The canonical remote path (`a//b` and `a/b` are one upload).
    pub fn key(&self) -> &str {
        &self.canonical
    }

    /// Bytes held from an interrupted attempt (0 for a fresh start): the resume offer.
    pub fn held(&self) -> u64 {
        match &self.body {
            Body::Multi(m) => held_len(&m.held, m.part_size, self.size),
            Body::Single(_) => 0,
        }
    }

    /// The BLAKE3 of the held prefix, for the resume offer (`None` when nothing is held).
    pub fn held_digest(&self) -> Option<Digest> {
        let Body::Multi(m) = &self.body else {
            return None;
        };
        if m.held.is_empty() {
            return None;
        }
        let hashes: Vec<PartHash> = m.held.iter().map(|p| p.hash).collect();
        tree_hash::digest(m.part_size, self.held(), &hashes).ok()
    }

    /// The BLAKE3 of the whole file once all its bytes were written (`None` before): for a
    /// multipart upload the root of the tree over its parts' chaining values, computed as the
    /// parts were cut, so the body is hashed once. [`ObjectUpload::commit`] checks it again.
    pub fn digest(&self) -> Option<Digest> {
        if self.written != self.size {
            return None;
        }
        match &self.body {
            Body::Single(data) => Some(*blake3::hash(data).as_bytes()),
            Body::Multi(m) => tree_hash::digest(m.part_size, self.size, &m.hashes).ok(),
        }
    }

    /// Whether an interruption now would leave parts to resume from.
    pub fn resumable(&self) -> bool {
        matches!(&self.body, Body::Multi(m) if m.resumable)
    }

    /// Whether it runs apart because another attempt holds the path's resume record.
    pub fn held_elsewhere(&self) -> bool {
        matches!(&self.body, Body::Multi(m) if m.held_elsewhere)
    }

    /// The store's multipart upload id (`None` for a file stored in one PUT), for logs.
    pub fn upload_id(&self) -> Option<&str> {
        match &self.body {
            Body::Multi(m) => Some(&m.upload_id),
            Body::Single(_) => None,
        }
    }

    /// Bytes per part of this upload (0 for one held in memory and stored in one PUT).
    pub fn part_size(&self) -> u64 {
        match &self.body {
            Body::Multi(m) => m.part_size,
            Body::Single(_) => 0,
        }
    }

    /// Drops what an earlier attempt left, to start from byte 0 (before any body byte).
    pub async fn restart(&mut self) -> Result<(), ObjectError> {
        match &mut self.body {
            Body::Single(buf) => {
                buf.clear();
                self.written = 0;
                Ok(())
            }
            Body::Multi(m) => {
                if let Some(d) = m.driver.take() {
                    d.abort();
                }
                m.tx = None;
                let (part_size, record_key, claim) =
                    (m.part_size, m.record_key.clone(), m.claim.clone());
                let (resumable, elsewhere) = (m.resumable, m.held_elsewhere);
                abort_upload(&self.inner, self.key.as_ref(), &m.upload_id).await;
                self.start_fresh(part_size, record_key, claim, resumable, elsewhere)
                    .await
            }
        }
    }

    /// Takes what fits of `data` into the current part: how many bytes, and the part if it
    /// is now full.
    fn take(&mut self, data: &[u8]) -> Result<(usize, Option<FullPart>), ObjectError> {
        let got = self.written + data.len() as u64;
        if got > self.size {
            return Err(ObjectError::SizeMismatch {
                path: self.remote.clone(),
                declared: self.size,
                got,
            });
        }
        match &mut self.body {
            Body::Single(buf) => {
                if buf.capacity() == 0 {
                    buf.reserve_exact(self.size as usize);
                }
                buf.extend_from_slice(data);
                self.written = got;
                Ok((data.len(), None))
            }
            Body::Multi(m) => {
                let index = m.next_index;
                let start = index as u64 * m.part_size;
                let part_len = (self.size - start).min(m.part_size) as usize;
                if m.buf.capacity() == 0 {
                    m.buf.reserve_exact(part_len);
                }
                let n = (part_len - m.buf.len()).min(data.len());
                m.hasher.update(&data[..n]);
                m.buf.extend_from_slice(&data[..n]);
                self.written += n as u64;
                if m.buf.len() < part_len {
                    return Ok((n, None));
                }
                let full = Bytes::from(std::mem::take(&mut m.buf));
                let hash = m.hasher.finish();
                m.hashes.push(hash);
                m.next_index += 1;
                m.hasher = PartHasher::new(m.next_index as u64 * m.part_size);
                Ok((n, Some((index, full, hash))))
            }
        }
    }

    /// Hands a full part to the driver, with the permit that bounds memory.
    fn send(
        &mut self,
        index: usize,
        data: Bytes,
        hash: PartHash,
        permit: OwnedSemaphorePermit,
    ) -> bool {
        let Body::Multi(m) = &mut self.body else {
            return false;
        };
        m.tx.as_ref().is_some_and(|tx| {
            tx.send(Msg::Part {
                index,
                data,
                hash,
                permit,
            })
            .is_ok()
        })
    }

    fn permits(&self) -> Option<Arc<Semaphore>> {
        match &self.body {
            Body::Multi(m) => Some(m.permits.clone()),
            Body::Single(_) => None,
        }
    }

    /// The driver's error after it stopped early.
    async fn driver_failure(&mut self) -> ObjectError {
        let driver = match &mut self.body {
            Body::Multi(m) => m.driver.take(),
            Body::Single(_) => None,
        };
        match driver {
            Some(d) => match d.await {
                Ok(Err(e)) => e,
                _ => ObjectError::TakenOver(self.remote.clone()),
            },
            None => ObjectError::TakenOver(self.remote.clone()),
        }
    }

    /// Adds the next bytes of the body (async callers).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), ObjectError> {
        while !data.is_empty() {
            let (n, full) = self.take(data)?;
            data = &data[n..];
            if let Some((index, bytes, hash)) = full {
                let Some(permits) = self.permits() else {
                    continue;
                };
                let permit = permits
                    .acquire_owned()
                    .await
                    .map_err(|_| ObjectError::TakenOver(self.remote.clone()))?;
                if !self.send(index, bytes, hash, permit) {
                    return Err(self.driver_failure().await);
                }
            }
        }
        Ok(())
    }

    /// Adds the next bytes of the body from a blocking thread (never from async code: it
    /// waits on the runtime while the store takes the parts in flight).
    pub fn blocking_write(&mut self, mut data: &[u8]) -> Result<(), ObjectError> {
        while !data.is_empty() {
            let (n, full) = self.take(data)?;
            data = &data[n..];
            if let Some((index, bytes, hash)) = full {
                let Some(permits) = self.permits() else {
                    continue;
                };
                let handle = self.handle.clone();
                let permit = handle
                    .block_on(permits.acquire_owned())
                    .map_err(|_| ObjectError::TakenOver(self.remote.clone()))?;
                if !self.send(index, bytes, hash, permit) {
                    return Err(handle.block_on(self.driver_failure()));
                }
            }
        }
        Ok(())
    }

    /// Completes the upload if the body hashes to `expected`: the object appears whole,
    /// with its digest recorded, and the resume record goes. On a mismatch the multipart
    /// upload is aborted and nothing appears. Any other failure keeps a resumable upload's
    /// parts for another attempt.
    pub async fn commit(mut self, expected: &Digest) -> Result<(), ObjectError> {
        if self.written != self.size {
            return Err(ObjectError::SizeMismatch {
                path: self.remote.clone(),
                declared: self.size,
                got: self.written,
            });
        }
        let remote = self.remote.clone();
        match std::mem::replace(&mut self.body, Body::Single(Vec::new())) {
            Body::Single(data) => {
                if blake3::hash(&data).as_bytes() != expected {
                    return Err(ObjectError::DigestMismatch(remote));
                }
                let mut attributes = Attributes::new();
                attributes.insert(
                    Attribute::Metadata(DIGEST_METADATA.into()),
                    hex(expected).into(),
                );
                self.inner
                    .s3
                    .put_opts(
                        &self.key,
                        PutPayload::from(data),
                        PutOptions {
                            attributes,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| ObjectError::store("storing", &remote, e))?;
                Ok(())
            }
            Body::Multi(mut m) => {
                if let Some(tx) = m.tx.take() {
                    let _ = tx.send(Msg::Commit);
                }
                let parts = match m.driver.take() {
                    Some(d) => d
                        .await
                        .map_err(|_| ObjectError::TakenOver(remote.clone()))??,
                    None => return Err(ObjectError::TakenOver(remote)),
                };
                let hashes: Vec<PartHash> = parts.iter().map(|p| p.hash).collect();
                let digest = tree_hash::digest(m.part_size, self.size, &hashes).map_err(|_| {
                    ObjectError::SizeMismatch {
                        path: remote.clone(),
                        declared: self.size,
                        got: held_len(&parts, m.part_size, self.size),
                    }
                })?;
                if &digest != expected {
                    abort_upload(&self.inner, self.key.as_ref(), &m.upload_id).await;
                    delete_quietly(&self.inner, &m.record_key).await;
                    return Err(ObjectError::DigestMismatch(remote));
                }
                if m.resumable {
                    let now = read_record(&self.inner, &m.record_key, &remote).await?;
                    if now.is_none_or(|r| r.owner != m.claim) {
                        return Err(ObjectError::TakenOver(remote));
                    }
                }
                let ids = parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.e_tag.clone(),
                    })
                    .collect();
                let done = self
                    .inner
                    .s3
                    .complete_multipart(&self.key, &m.upload_id, ids)
                    .await
                    .map_err(|e| ObjectError::store("completing the upload of", &remote, e))?;
                if let Some(e_tag) = done.e_tag {
                    put_digest(&self.inner, &self.user, &self.canonical, e_tag, expected).await;
                }
                delete_quietly(&self.inner, &m.record_key).await;
                Ok(())
            }
        }
    }

    /// Stops the upload and deletes what it stored (bad digest, failed write): nothing to
    /// resume from. Waits until the store has aborted it.
    pub async fn discard(mut self) {
        if let Body::Multi(m) = &mut self.body {
            m.keep.store(false, Ordering::SeqCst);
            m.tx = None;
            if let Some(d) = m.driver.take() {
                let _ = d.await;
            }
        }
    }

    /// Stops the upload as a broken connection would (a resumable one keeps its parts and
    /// releases its claim), and waits until its record says so.
    pub async fn interrupt(mut self) {
        if let Body::Multi(m) = &mut self.body {
            m.tx = None;
            if let Some(d) = m.driver.take() {
                let _ = d.await;
            }
        }
    }
}

impl ObjectUpload {
    /// Stops without a word to the store, as a node that dies would: the record keeps its
    /// claim until the lease runs out, and the parts stay for whoever resumes. (Tests of
    /// takeover use it; a daemon that stops cleanly drops or interrupts its uploads.)
    pub fn abandon(mut self) {
        if let Body::Multi(m) = &mut self.body
            && let Some(d) = m.driver.take()
        {
            d.abort();
        }
    }
}

impl std::io::Write for ObjectUpload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.blocking_write(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the parts, keeps the record, renews the claim.
struct Driver {
    inner: Arc<Inner>,
    remote: String,
    key: Key,
    record_key: Key,
    /// The record as this driver last wrote it.
    record: Record,
    /// The run of finished parts from the first.
    done: Vec<DonePart>,
    /// Finished parts after a gap (a later part finished before an earlier one).
    pending: BTreeMap<usize, DonePart>,
    /// Whether an interruption keeps the upload.
    keep: Arc<AtomicBool>,
}

impl Driver {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
    ) -> Result<Vec<DonePart>, ObjectError> {
        let mut inflight = FuturesUnordered::new();
        let renew_every = (self.inner.uploads.lease / 3).max(Duration::from_millis(200));
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        let mut committing = false;
        while open || !inflight.is_empty() {
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    Some(Msg::Part { index, data, hash, permit }) => {
                        let inner = self.inner.clone();
                        let key = self.key.clone();
                        let id = self.record.upload_id.clone();
                        inflight.push(async move {
                            let r = inner.s3.put_part(&key, &id, index, PutPayload::from(data)).await;
                            drop(permit);
                            (index, hash, r)
                        });
                    }
                    Some(Msg::Commit) => {
                        committing = true;
                        open = false;
                    }
                    None => open = false,
                },
                Some((index, hash, r)) = inflight.next(), if !inflight.is_empty() => match r {
                    Ok(PartId { content_id }) => {
                        self.pending.insert(index, DonePart { e_tag: content_id, hash });
                        let before = self.done.len();
                        while let Some(p) = self.pending.remove(&self.done.len()) {
                            self.done.push(p);
                        }
                        if self.done.len() > before {
                            self.write(true).await?;
                        }
                    }
                    Err(e) => {
                        drop(inflight);
                        self.stop().await;
                        return Err(ObjectError::store("sending a part of", &self.remote, e));
                    }
                },
                _ = renew.tick() => self.renew().await?,
            }
        }
        if committing {
            Ok(self.done)
        } else {
            self.stop().await;
            Err(ObjectError::TakenOver(self.remote.clone()))
        }
    }

    /// Rewrites the record with the parts done, holding the claim or releasing it.
    async fn write(&mut self, hold: bool) -> Result<(), ObjectError> {
        let now = now_millis();
        self.record.parts = self
            .done
            .iter()
            .enumerate()
            .map(|(i, p)| RecordPart {
                number: i as u64 + 1,
                e_tag: p.e_tag.clone(),
                cv: hex(&p.hash.cv),
            })
            .collect();
        self.record.first_root = self.done.first().and_then(|p| p.hash.root).map(|r| hex(&r));
        self.record.updated = now;
        self.record.lease_until = if hold {
            now + self.inner.uploads.lease.as_millis() as u64
        } else {
            0
        };
        write_record(&self.inner, &self.record_key, &self.record, &self.remote).await
    }

    /// Renews the claim, unless another attempt took the record over: then this one stops.
    async fn renew(&mut self) -> Result<(), ObjectError> {
        if self.record.resumable {
            let now = read_record(&self.inner, &self.record_key, &self.remote).await?;
            if now.is_none_or(|r| r.owner != self.record.owner) {
                return Err(ObjectError::TakenOver(self.remote.clone()));
            }
        }
        self.write(true).await
    }

    /// The writer went away without committing: keep (parts and record, claim released) or
    /// abort (upload and record).
    async fn stop(&mut self) {
        if self.keep.load(Ordering::SeqCst) {
            if let Err(e) = self.write(false).await {
                tracing::warn!(path = %self.remote, error = %e, "cannot update the resume record of an interrupted upload");
            }
        } else {
            abort_upload(&self.inner, self.key.as_ref(), &self.record.upload_id).await;
            delete_quietly(&self.inner, &self.record_key).await;
        }
    }
}

/// Most bytes of a resume record read back: 10,000 parts of an ETag and a chaining value each
/// fit in well under 2 MiB.
const MAX_RECORD_BYTES: u64 = 4 << 20;
/// Most bytes of a stored-digest record read back.
const MAX_DIGEST_RECORD_BYTES: u64 = 4 << 10;

/// The bytes of the small internal object at `key`, `None` if it is missing or larger than
/// `max` (damaged: it is checked before its body is read, so it costs nothing).
async fn read_small(
    inner: &Inner,
    key: &Key,
    max: u64,
) -> Result<Option<Bytes>, object_store::Error> {
    let got = match inner.s3.get(key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    if got.meta.size > max {
        tracing::warn!(key = %key, size = got.meta.size, max, "internal record too large; ignored as damaged");
        return Ok(None);
    }
    let bytes = got.bytes().await?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

async fn read_record(
    inner: &Inner,
    key: &Key,
    remote: &str,
) -> Result<Option<Record>, ObjectError> {
    let Some(bytes) = read_small(inner, key, MAX_RECORD_BYTES)
        .await
        .map_err(|e| ObjectError::store("reading the resume record of", remote, e))?
    else {
        return Ok(None);
    };
    // A damaged record is as good as none: it is replaced (and its upload swept later).
    Ok(serde_json::from_slice(&bytes).ok())
}

async fn write_record(
    inner: &Inner,
    key: &Key,
    rec: &Record,
    remote: &str,
) -> Result<(), ObjectError> {
    let json = serde_json::to_vec(rec).map_err(|source| ObjectError::Record {
        path: remote.into(),
        source,
    })?;
    inner
        .s3
        .put(key, PutPayload::from(json))
        .await
        .map(|_| ())
        .map_err(|e| ObjectError::store("writing the resume record of", remote, e))
}

/// Aborts a multipart upload; one already gone is fine, other failures are logged (the
/// sweeper or a bucket lifecycle rule gets it later).
async fn abort_upload(inner: &Inner, key: &str, upload_id: &str) {
    let Ok(key) = Key::parse(key) else { return };
    match inner.s3.abort_multipart(&key, &upload_id.to_string()).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "cannot abort a multipart upload"),
    }
}

async fn delete_quietly(inner: &Inner, key: &Key) {
    match inner.s3.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "cannot delete an internal record"),
    }
}

/// Records the digest of a multipart object beside it, for its ETag.
async fn put_digest(inner: &Inner, user: &str, canonical: &str, e_tag: String, digest: &Digest) {
    let key = inner.internal_key("digest", user, canonical, "");
    let record = StoredDigest {
        e_tag,
        blake3: hex(digest),
    };
    let Ok(json) = serde_json::to_vec(&record) else {
        return;
    };
    if let Err(e) = inner.s3.put(&key, PutPayload::from(json)).await {
        // Downloads then hash the file themselves: slower, still verified.
        tracing::warn!(error = %e, "cannot record an upload's digest");
    }
}

/// The digest recorded for the object at `canonical` if it is still the version `e_tag`.
pub(super) async fn stored_digest(
    inner: &Inner,
    user: &str,
    canonical: &str,
    e_tag: Option<&str>,
) -> Option<Digest> {
    let key = inner.internal_key("digest", user, canonical, "");
    let bytes = read_small(inner, &key, MAX_DIGEST_RECORD_BYTES)
        .await
        .ok()??;
    let record: StoredDigest = serde_json::from_slice(&bytes).ok()?;
    (Some(record.e_tag.as_str()) == e_tag)
        .then(|| super::parse_digest(&record.blake3))
        .flatten()
}

/// Deletes the digest recorded for `canonical`.
pub(super) async fn forget_digest(inner: &Inner, user: &str, canonical: &str) {
    delete_quietly(inner, &inner.internal_key("digest", user, canonical, "")).await;
}

/// Carries the digest of `from` over to its copy at `to` (whose ETag a copy may change).
pub(super) async fn move_digest(inner: &Inner, user: &str, from: &str, to: &str, to_key: &Key) {
    let key = inner.internal_key("digest", user, from, "");
    let Ok(Some(record)) = read_small(inner, &key, MAX_DIGEST_RECORD_BYTES).await else {
        forget_digest(inner, user, to).await;
        return;
    };
    let Ok(old) = serde_json::from_slice::<StoredDigest>(&record) else {
        return;
    };
    let (Ok(meta), Some(digest)) = (
        inner.s3.head(to_key).await,
        super::parse_digest(&old.blake3),
    ) else {
        return;
    };
    match meta.e_tag {
        Some(e_tag) => put_digest(inner, user, to, e_tag, &digest).await,
        None => forget_digest(inner, user, to).await,
    }
}

/// Aborts uploads whose record was not renewed for `ttl` and deletes the records.
pub(super) async fn sweep(inner: &Inner, ttl: Duration) -> Result<usize, ObjectError> {
    let prefix = format!("{}{INTERNAL}/partial/", inner.root);
    let now = now_millis();
    let ttl_ms = ttl.as_millis() as u64;
    let mut token = None;
    let mut swept = 0;
    loop {
        let page = inner
            .list_deep_page(&prefix, token.take())
            .await
            .map_err(|e| ObjectError::store("listing", "resume records", e))?;
        for obj in &page.result.objects {
            let rec = read_record(inner, &obj.location, "a resume record").await?;
            let expired = match &rec {
                Some(r) => now.saturating_sub(r.updated) > ttl_ms && r.lease_until <= now,
                None => {
                    now.saturating_sub(obj.last_modified.timestamp_millis().max(0) as u64) > ttl_ms
                }
            };
            if !expired {
                continue;
            }
            if let Some(r) = &rec {
                abort_upload(inner, &r.key, &r.upload_id).await;
            }
            delete_quietly(inner, &obj.location).await;
            swept += 1;
        }
        match page.page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    Ok(swept)
}

/// Bytes `user`'s interrupted uploads hold in the store, not counting the resumable upload
/// of the canonical path `except` (one about to be resumed).
pub(super) async fn usage(
    inner: &Inner,
    user: &str,
    except: Option<&str>,
) -> Result<u64, ObjectError> {
    let skip = except.map(|c| inner.internal_key("partial", user, c, ""));
    let prefix = format!("{}{INTERNAL}/partial/{user}/", inner.root);
    let mut token = None;
    let mut total = 0u64;
    loop {
        let page = inner
            .list_deep_page(&prefix, token.take())
            .await
            .map_err(|e| ObjectError::store("listing", "resume records", e))?;
        for obj in &page.result.objects {
            if skip.as_ref() == Some(&obj.location) {
                continue;
            }
            if let Some(r) = read_record(inner, &obj.location, "a resume record").await? {
                total = total.saturating_add((r.parts.len() as u64 * r.part_size).min(r.size));
            }
        }
        match page.page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_gives_back_its_parts() {
        let data: Vec<u8> = (0..3 * 4096 + 5).map(|i| (i % 251) as u8).collect();
        let hashes: Vec<PartHash> = data
            .chunks(4096)
            .enumerate()
            .map(|(i, c)| {
                let mut h = PartHasher::new(i as u64 * 4096);
                h.update(c);
                h.finish()
            })
            .collect();
        let rec = Record {
            version: RECORD_VERSION,
            user: "alice".into(),
            path: "d/f".into(),
            key: "alice/d/f".into(),
            size: data.len() as u64,
            part_size: 4096,
            upload_id: "id".into(),
            parts: hashes[..2]
                .iter()
                .enumerate()
                .map(|(i, h)| RecordPart {
                    number: i as u64 + 1,
                    e_tag: format!("\"tag{i}\""),
                    cv: hex(&h.cv),
                })
                .collect(),
            first_root: hashes[0].root.map(|r| hex(&r)),
            created: 1,
            updated: 2,
            owner: "node/1".into(),
            lease_until: 0,
            resumable: true,
        };
        let json = serde_json::to_string(&rec).unwrap();
        let back: Record = serde_json::from_str(&json).unwrap();
        let parts = done_parts(&back).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].e_tag, "\"tag1\"");
        let held = held_len(&parts, 4096, rec.size);
        assert_eq!(held, 8192);
        let prefix: Vec<PartHash> = parts.iter().map(|p| p.hash).collect();
        assert_eq!(
            tree_hash::digest(4096, held, &prefix).unwrap(),
            *blake3::hash(&data[..8192]).as_bytes()
        );
        // One part held: its root hash is the offer.
        assert_eq!(
            tree_hash::digest(4096, 4096, &prefix[..1]).unwrap(),
            *blake3::hash(&data[..4096]).as_bytes()
        );
        // Parts out of order are refused, not trusted.
        let mut bad = back.clone();
        bad.parts.swap(0, 1);
        assert!(done_parts(&bad).is_none());
    }
}
