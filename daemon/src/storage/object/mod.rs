//! The S3-compatible object-store backend: users' files as objects `PREFIX/USER/PATH` in one
//! bucket, reached through the `object_store` crate, so that several daemons can serve the
//! same users and files.
//!
//! - Paths follow the local backend's rules ([`xfer_proto::path`]), checked before any key
//!   is built; user names never start with `.`, so `PREFIX/.xfer/` (resume records, stored
//!   digests) never meets a user's tree.
//! - A folder exists when something is stored under `PREFIX/USER/DIR/`; `mkdir` makes that
//!   true for an empty one with a zero-byte marker object `DIR/\xfer-folder`. (S3 tools often
//!   use a `DIR/` key, but `object_store` cannot name a key with a trailing `/`; a backslash
//!   can never be in a user's path, so the marker never collides with a file.)
//! - Uploads are multipart uploads straight to the final key, visible only once complete and
//!   verified ([`upload`]); reads are ranged GETs; rename is copy then delete (not atomic).
//!
//! What is atomic: a file upload (old or new, complete), a delete of one file. What is not: a
//! rename (a crash between copy and delete leaves both names; a folder rename copies every
//! object, then deletes the old ones), and checks then changes across nodes (two nodes may
//! both pass the "target is not a folder" check of concurrent operations).

pub mod handles;
pub mod tree_hash;
pub mod upload;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, ObjectStore as _, ObjectStoreExt,
    PutOptions, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};
use xfer_proto::limits::{MAX_PATH_DEPTH, MAX_PATH_LEN};
use xfer_proto::path::{PathError, named_components};
use xfer_proto::{Digest, Entry, EntryKind};

use crate::config::StorageSettings;
use crate::storage::StorageError;

pub use handles::{ObjectBody, ObjectPending, ObjectStaged, ObjectWriter};
pub use upload::{ObjectUpload, Resume};

/// Name of the zero-byte object that keeps an empty folder in existence. The backslash makes
/// it a name no user path can have.
pub const FOLDER_MARKER: &str = "\\xfer-folder";

/// Hidden prefix (under the configured one) for what the daemon keeps for itself.
pub const INTERNAL: &str = ".xfer";

/// Object metadata key holding the whole-file BLAKE3 (hex) of an object stored in one PUT.
pub const DIGEST_METADATA: &str = "blake3";

/// Most parts S3 allows in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;

/// Keys asked for per list request (S3's own maximum): one page is all a listing holds.
const LIST_PAGE: usize = 1000;

/// Why an object-store operation failed. Messages name the remote path, never a key, an
/// endpoint or a credential.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A refusal the local backend gives too (a bad path, nothing there, the wrong kind, a
    /// move past the path limits...), in the seam's own terms and words.
    #[error(transparent)]
    Tree(#[from] StorageError),
    /// The body does not hash to the digest the client gave: nothing was made visible.
    #[error("the data received for `{0}` does not match its digest")]
    DigestMismatch(String),
    /// The body was longer or shorter than the declared size.
    #[error("the upload of `{path}` declared {declared} bytes but {got} arrived")]
    SizeMismatch {
        /// The remote path.
        path: String,
        /// Size the upload declared.
        declared: u64,
        /// Bytes received (so far, for a body that went past its size).
        got: u64,
    },
    /// Another attempt (on this node or another) claimed the upload's resume record.
    #[error("the upload of `{0}` was taken over by another attempt")]
    TakenOver(String),
    /// The store failed or refused; the message is for the server log only.
    #[error("{op} `{path}` on the object store: {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The remote path (or the internal record) concerned.
        path: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A resume record could not be read or written as JSON.
    #[error("resume record of `{path}`: {source}")]
    Record {
        /// The remote path.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
}

impl ObjectError {
    /// The message to send to the client: the store's details stay in the server log.
    pub fn client_message(&self) -> String {
        match self {
            ObjectError::Store { op, path, .. } => {
                format!("{op} `{path}` failed on the server's storage")
            }
            ObjectError::Record { path, .. } => {
                format!("the resume record of `{path}` is damaged on the server")
            }
            other => other.to_string(),
        }
    }

    /// Classifies a store error on `path` the one way every operation does.
    fn store(op: &'static str, path: &str, source: object_store::Error) -> ObjectError {
        match source {
            object_store::Error::NotFound { .. } => {
                ObjectError::Tree(StorageError::NotFound(path.into()))
            }
            source => ObjectError::Store {
                op,
                path: path.into(),
                source,
            },
        }
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No credentials, or an unreadable or unsafe credentials file.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The settings do not make a valid client (the message names no secret).
    #[error("storage: cannot set up the S3 client: {0}")]
    Client(object_store::Error),
    /// The part size cannot cut a BLAKE3 tree.
    #[error("storage.part_size {0} is not a power of two of at least 1024 bytes")]
    PartSize(u64),
}

/// Why the credentials could not be loaded. Never holds or prints a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Neither a file nor the environment gave both values.
    #[error(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in xferd's environment, or name a file with access_key_id and secret_access_key in storage.credentials_file"
    )]
    Missing,
    /// The file could not be read.
    #[error("reading S3 credentials `{path}`: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error(
        "S3 credentials `{path}` can be read by other users (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not the TOML expected (the parser's message is not repeated: it may quote
    /// the secret).
    #[error(
        "S3 credentials `{path}` must be TOML with exactly access_key_id = \"...\" and secret_access_key = \"...\" (problem near line {line})"
    )]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Where the parser stopped.
        line: usize,
    },
}

/// An access key pair. Its `Debug` shows the key id only.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The access key id (not secret: it names the key in the store's logs).
    pub access_key_id: String,
    /// The secret.
    secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// A key pair given directly (tests, tools).
    pub fn new(access_key_id: String, secret_access_key: String) -> Credentials {
        Credentials {
            access_key_id,
            secret_access_key,
        }
    }

    /// Loads the credentials `settings` name: its `credentials_file` (refused unless only the
    /// owner can read it), else `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub fn load(settings: &StorageSettings) -> Result<Credentials, CredentialsError> {
        match &settings.credentials_file {
            Some(path) => Self::from_file(path),
            None => {
                let id = std::env::var("AWS_ACCESS_KEY_ID").ok();
                let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
                match (id, secret) {
                    (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                        Ok(Credentials::new(id, secret))
                    }
                    _ => Err(CredentialsError::Missing),
                }
            }
        }
    }

    fn from_file(path: &std::path::Path) -> Result<Credentials, CredentialsError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mode = file.metadata().map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &file, &mut text).map_err(read)?;
        toml::from_str(&text).map_err(|e| CredentialsError::Parse {
            path: path.to_path_buf(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1),
        })
    }
}

/// How uploads are cut and paced (from `[storage]`).
#[derive(Debug, Clone, Copy)]
pub struct UploadSettings {
    /// Bytes per part (a power of two), before raising for very big files.
    pub part_size: u64,
    /// Parts of one upload sent at once.
    pub parts_in_flight: usize,
    /// How long a claim on a resume record lasts without renewal.
    pub lease: Duration,
}

impl UploadSettings {
    /// The part size for a file of `size` bytes: the configured one, doubled until the file
    /// fits in [`MAX_PARTS`] parts.
    pub fn part_size_for(&self, size: u64) -> u64 {
        let mut p = self.part_size;
        while size.div_ceil(p) > MAX_PARTS {
            p *= 2;
        }
        p
    }
}

/// The bucket, shared by all users: builds each user's [`ObjectTree`] and sweeps expired
/// uploads.
#[derive(Clone)]
pub struct ObjectStore {
    /// Shared by every tree and upload.
    inner: Arc<Inner>,
}

struct Inner {
    /// The client (it holds the credentials; its own `Debug` redacts them).
    s3: AmazonS3,
    /// The bucket, for messages.
    bucket: String,
    /// `PREFIX/` or empty.
    root: String,
    /// Part size, parallelism, lease.
    uploads: UploadSettings,
    /// This process's name in resume records' claims, so a node knows its own.
    node: String,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore")
            .field("bucket", &self.inner.bucket)
            .field("prefix", &self.inner.root)
            .field("uploads", &self.inner.uploads)
            .finish_non_exhaustive()
    }
}

impl ObjectStore {
    /// A client for the store `settings` describe (validated by the config loader), with the
    /// credentials given. Makes no request: see [`ObjectStore::check`].
    pub fn open(settings: &StorageSettings, creds: Credentials) -> Result<ObjectStore, OpenError> {
        if !tree_hash::valid_part_size(settings.part_size) {
            return Err(OpenError::PartSize(settings.part_size));
        }
        // reqwest is built without a default TLS provider (the workspace uses ring only):
        // install ring for the process unless something already chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = ClientOptions::new()
            .with_allow_http(settings.allow_http)
            .with_connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
            // No deadline on a whole request: a GET streams a file of any size. A read that
            // makes no progress is what fails.
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(settings.request_timeout_secs));
        let retry = RetryConfig {
            max_retries: settings.max_retries,
            retry_timeout: Duration::from_secs(settings.request_timeout_secs * 4),
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(creds.access_key_id)
            .with_secret_access_key(creds.secret_access_key)
            .with_allow_http(settings.allow_http)
            .with_client_options(options)
            .with_retry(retry);
        if !settings.endpoint.is_empty() {
            builder = builder
                .with_endpoint(&settings.endpoint)
                // Path-style: S3-compatible stores rarely have a DNS name per bucket.
                .with_virtual_hosted_style_request(false);
        }
        let s3 = builder.build().map_err(OpenError::Client)?;
        let root = if settings.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", settings.prefix)
        };
        let mut nonce = [0u8; 8];
        rand_bytes(&mut nonce);
        Ok(ObjectStore {
            inner: Arc::new(Inner {
                s3,
                bucket: settings.bucket.clone(),
                root,
                uploads: UploadSettings {
                    part_size: settings.part_size,
                    parts_in_flight: settings.parts_in_flight,
                    lease: Duration::from_secs(settings.upload_lease_secs),
                },
                node: format!("{}-{}-{}", hostname(), std::process::id(), hex(&nonce[..4])),
            }),
        })
    }

    /// Lists one key of the bucket: fails early, with the store's reason, when the bucket,
    /// endpoint or credentials are wrong.
    pub async fn check(&self) -> Result<(), ObjectError> {
        self.inner
            .list_page(&self.inner.root, None, 1)
            .await
            .map(|_| ())
            .map_err(|e| ObjectError::store("listing the bucket", &self.inner.bucket, e))
    }

    /// One user's view. Nothing is created: a user's tree exists once they store something.
    pub fn user_tree(&self, user: &str) -> ObjectTree {
        ObjectTree {
            inner: self.inner.clone(),
            user: user.to_string(),
        }
    }

    /// Aborts the multipart uploads of resume records not renewed for `ttl` and deletes the
    /// records; returns how many.
    pub async fn sweep_partials(&self, ttl: Duration) -> Result<usize, ObjectError> {
        upload::sweep(&self.inner, ttl).await
    }

    /// Bytes `user`'s interrupted uploads hold in the store (their parts done), for a quota.
    pub async fn partial_usage(&self, user: &str) -> Result<u64, ObjectError> {
        upload::usage(&self.inner, user, None).await
    }

    /// The part size, parallelism and lease uploads use.
    pub fn upload_settings(&self) -> UploadSettings {
        self.inner.uploads
    }

    /// The client and the configured prefix (without its `/`), for the state several nodes
    /// share under `PREFIX/.xfer/` besides users' files ([`crate::shared`]).
    pub fn internal(&self) -> (Arc<dyn object_store::ObjectStore>, String) {
        (
            Arc::new(self.inner.s3.clone()),
            self.inner.root.trim_end_matches('/').to_string(),
        )
    }
}

impl Inner {
    /// One page of a listing under `prefix` (a string: it may end with `/`), with `/` as the
    /// delimiter.
    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        max: usize,
    ) -> object_store::Result<object_store::list::PaginatedListResult> {
        self.s3
            .list_paginated(
                Some(prefix),
                PaginatedListOptions {
                    delimiter: Some("/".into()),
                    max_keys: Some(max),
                    page_token: token,
                    ..Default::default()
                },
            )
            .await
    }

    /// One page of every key under `prefix`, at any depth.
    async fn list_deep_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> object_store::Result<object_store::list::PaginatedListResult> {
        self.s3
            .list_paginated(
                Some(prefix),
                PaginatedListOptions {
                    max_keys: Some(LIST_PAGE),
                    page_token: token,
                    ..Default::default()
                },
            )
            .await
    }

    /// A key from its text.
    fn key(&self, path: &str, text: String) -> Result<Key, ObjectError> {
        Key::parse(text).map_err(|_| {
            ObjectError::Tree(StorageError::BadPath {
                path: path.into(),
                source: PathError::ForbiddenChar('/'),
            })
        })
    }

    /// Where internal state `kind` of `user` about the canonical path `canonical` lives:
    /// named by the path's BLAKE3, so nothing a user chooses becomes part of this key.
    fn internal_key(&self, kind: &str, user: &str, canonical: &str, suffix: &str) -> Key {
        let name = blake3::hash(canonical.as_bytes()).to_hex();
        // Every part is ASCII made here (user names are checked at account creation).
        Key::from(format!(
            "{}{INTERNAL}/{kind}/{user}/{name}{suffix}.json",
            self.root
        ))
    }
}

/// What is at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stat {
    /// A file: its size, modification time (Unix seconds) and ETag.
    File {
        /// Bytes.
        size: u64,
        /// Seconds since the epoch.
        modified: i64,
        /// The store's version tag, to read the same version throughout.
        e_tag: Option<String>,
    },
    /// A folder (a marker or anything stored beneath it).
    Dir,
}

/// A path checked against the path rules, with its keys.
#[derive(Debug, Clone)]
struct Resolved {
    /// The checked components.
    parts: Vec<String>,
    /// The canonical remote path (`a/b`), which names internal records.
    canonical: String,
    /// `PREFIX/USER/a/b` (the user's root for the empty path, without the slash).
    key_text: String,
}

impl Resolved {
    /// The key prefix of everything inside it as a folder.
    fn dir_prefix(&self) -> String {
        format!("{}/", self.key_text)
    }
}

/// A download: the object's size, time and stored digest, and its bytes from the offset
/// asked, streamed (one HTTP response; memory is what the HTTP client buffers).
pub struct ObjectRead {
    /// Size of the whole object.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub modified: i64,
    /// The whole-file BLAKE3 recorded at upload, so the download need not hash the file
    /// again before sending it; `None` when none was recorded.
    pub stored: Option<Digest>,
    /// The bytes from the offset to the end, of the very version described above (the GET
    /// carries `If-Match`: a file replaced meanwhile fails the read, never mixes versions).
    stream: BoxStream<'static, Result<Bytes, ObjectError>>,
}

/// A file about to be read (see [`ObjectTree::head`]): what a download announces, and the
/// version its reads must match.
#[derive(Debug, Clone)]
pub struct ObjectHead {
    /// Size of the whole object.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub modified: i64,
    /// The whole-file BLAKE3 recorded at upload, if any.
    pub stored: Option<Digest>,
    /// The remote path, for messages.
    remote: String,
    /// Its key.
    key: Key,
    /// The version read; `None` if the store gave none (then reads are not pinned).
    e_tag: Option<String>,
}

impl ObjectHead {
    /// The remote path it was opened as.
    pub fn remote(&self) -> &str {
        &self.remote
    }
}

impl fmt::Debug for ObjectRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectRead")
            .field("size", &self.size)
            .field("modified", &self.modified)
            .field("stored", &self.stored.map(|d| hex(&d)))
            .finish_non_exhaustive()
    }
}

impl ObjectRead {
    /// The bytes, as a stream for async consumers.
    pub fn into_stream(self) -> BoxStream<'static, Result<Bytes, ObjectError>> {
        self.stream
    }

    /// The bytes as a blocking reader, for a body pipeline running on a blocking thread
    /// (must not be used from async code: each read waits on `handle`).
    pub fn into_blocking_reader(self, handle: tokio::runtime::Handle) -> BlockingReader {
        BlockingReader {
            handle,
            stream: self.stream,
            current: Bytes::new(),
        }
    }
}

/// [`std::io::Read`] over a download's stream, for blocking threads.
pub struct BlockingReader {
    /// The runtime the stream's connection lives on.
    handle: tokio::runtime::Handle,
    /// The rest of the body.
    stream: BoxStream<'static, Result<Bytes, ObjectError>>,
    /// What is left of the last piece received.
    current: Bytes,
}

impl fmt::Debug for BlockingReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingReader")
            .field("buffered", &self.current.len())
            .finish_non_exhaustive()
    }
}

impl std::io::Read for BlockingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A listing read page by page (see [`ObjectTree::list_pages`]).
#[derive(Debug)]
pub struct ObjectListing {
    /// Whose tree.
    tree: ObjectTree,
    /// The remote path listed.
    remote: String,
    /// Where the walk is.
    state: ListState,
    /// Whether anything was found under the folder (the user's root always exists).
    seen_any: bool,
}

/// Where an [`ObjectListing`] is.
#[derive(Debug)]
enum ListState {
    /// Nothing asked yet.
    Start,
    /// Reading the folder `prefix`; `token` names the next page, if any was announced.
    Pages {
        /// The checked path.
        resolved: Resolved,
        /// The next page's token (`None`: the first page).
        token: Option<String>,
    },
    /// Complete, or ended by an error.
    Done,
}

impl ObjectListing {
    /// The next page of entries (possibly empty); `None` once the listing is complete.
    /// After an error, nothing follows.
    pub async fn next_page(&mut self) -> Option<Result<Vec<Entry>, ObjectError>> {
        let r = self.step().await;
        if matches!(r, Some(Err(_))) {
            self.state = ListState::Done;
        }
        r
    }

    async fn step(&mut self) -> Option<Result<Vec<Entry>, ObjectError>> {
        match std::mem::replace(&mut self.state, ListState::Done) {
            ListState::Done => None,
            ListState::Start => {
                let r = match self.tree.resolve(&self.remote, false) {
                    Ok(r) => r,
                    Err(e) => return Some(Err(e)),
                };
                match self.tree.file_meta(&r).await {
                    Err(e) => return Some(Err(e)),
                    Ok(Some(meta)) => {
                        return Some(Ok(vec![Entry {
                            name: r.parts.last().cloned().unwrap_or_default(),
                            kind: EntryKind::File,
                            size: meta.size,
                            modified: meta.last_modified.timestamp(),
                        }]));
                    }
                    Ok(None) => {}
                }
                self.seen_any = r.parts.is_empty();
                self.page(r, None).await
            }
            ListState::Pages { resolved, token } => self.page(resolved, token).await,
        }
    }

    /// Reads the page `token` of the folder `r` and notes where the next one is.
    async fn page(
        &mut self,
        r: Resolved,
        token: Option<String>,
    ) -> Option<Result<Vec<Entry>, ObjectError>> {
        let page = match self
            .tree
            .inner
            .list_page(&r.dir_prefix(), token, LIST_PAGE)
            .await
        {
            Ok(p) => p,
            Err(e) => return Some(Err(ObjectError::store("listing", &r.canonical, e))),
        };
        let mut entries: Vec<Entry> =
            Vec::with_capacity(page.result.objects.len() + page.result.common_prefixes.len());
        for dir in &page.result.common_prefixes {
            self.seen_any = true;
            if let Some(name) = dir.filename() {
                entries.push(Entry {
                    name: name.to_string(),
                    kind: EntryKind::Dir,
                    size: 0,
                    modified: 0,
                });
            }
        }
        for obj in &page.result.objects {
            self.seen_any = true;
            match obj.location.filename() {
                Some(FOLDER_MARKER) | None => {}
                Some(name) => entries.push(Entry {
                    name: name.to_string(),
                    kind: EntryKind::File,
                    size: obj.size,
                    modified: obj.last_modified.timestamp(),
                }),
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        match page.page_token {
            Some(t) => {
                self.state = ListState::Pages {
                    resolved: r,
                    token: Some(t),
                }
            }
            None if !self.seen_any => {
                return Some(Err(ObjectError::Tree(StorageError::NotFound(
                    self.remote.clone(),
                ))));
            }
            None => {}
        }
        Some(Ok(entries))
    }
}

/// One user's view of the bucket: every path they give is checked, then becomes a key
/// under `PREFIX/USER/`.
#[derive(Clone)]
pub struct ObjectTree {
    /// The store.
    inner: Arc<Inner>,
    /// Whose tree (never starts with `.`).
    user: String,
}

impl fmt::Debug for ObjectTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectTree")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ObjectTree {
    /// Checks `remote` with the path rules and builds its key; `need_name` refuses the root.
    fn resolve(&self, remote: &str, need_name: bool) -> Result<Resolved, ObjectError> {
        let parts = super::checked_parts(remote, need_name)?;
        let canonical = parts.join("/");
        let mut key_text = format!("{}{}", self.inner.root, self.user);
        if !canonical.is_empty() {
            key_text.push('/');
            key_text.push_str(&canonical);
        }
        Ok(Resolved {
            parts: parts.into_iter().map(String::from).collect(),
            canonical,
            key_text,
        })
    }

    fn key(&self, r: &Resolved) -> Result<Key, ObjectError> {
        self.inner.key(&r.canonical, r.key_text.clone())
    }

    fn marker_key(&self, r: &Resolved) -> Result<Key, ObjectError> {
        self.inner
            .key(&r.canonical, format!("{}/{FOLDER_MARKER}", r.key_text))
    }

    /// Whether anything is stored under `r` as a folder (the user's root always exists).
    async fn is_dir(&self, r: &Resolved) -> Result<bool, ObjectError> {
        if r.parts.is_empty() {
            return Ok(true);
        }
        let page = self
            .inner
            .list_page(&r.dir_prefix(), None, 1)
            .await
            .map_err(|e| ObjectError::store("looking at", &r.canonical, e))?;
        Ok(!page.result.objects.is_empty() || !page.result.common_prefixes.is_empty())
    }

    /// The file at `r`, if there is one.
    async fn file_meta(
        &self,
        r: &Resolved,
    ) -> Result<Option<object_store::ObjectMeta>, ObjectError> {
        if r.parts.is_empty() {
            return Ok(None);
        }
        match self.inner.s3.head(&self.key(r)?).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ObjectError::store("looking at", &r.canonical, e)),
        }
    }

    async fn stat_resolved(&self, r: &Resolved) -> Result<Option<Stat>, ObjectError> {
        if let Some(meta) = self.file_meta(r).await? {
            return Ok(Some(Stat::File {
                size: meta.size,
                modified: meta.last_modified.timestamp(),
                e_tag: meta.e_tag,
            }));
        }
        Ok(self.is_dir(r).await?.then_some(Stat::Dir))
    }

    /// What is at `remote`: a file, a folder, or nothing.
    pub async fn stat(&self, remote: &str) -> Result<Option<Stat>, ObjectError> {
        let r = self.resolve(remote, false)?;
        self.stat_resolved(&r).await
    }

    /// Hands each entry of a folder (or the one entry of a file) to `each`, page by page
    /// (see [`ObjectTree::list_pages`]); `each` returns false to stop early.
    pub async fn list_each(
        &self,
        remote: &str,
        mut each: impl FnMut(Entry) -> bool + Send,
    ) -> Result<(), ObjectError> {
        let mut pages = self.list_pages(remote);
        while let Some(page) = pages.next_page().await {
            for e in page? {
                if !each(e) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A folder's entries (or the one entry of a file) as pages of at most 1,000
    /// keys, each sorted by name, in key order (name order except that a folder sorts as its
    /// name followed by `/`). Folder markers are not shown; folders show size 0 and time 0.
    pub fn list_pages(&self, remote: &str) -> ObjectListing {
        ObjectListing {
            tree: self.clone(),
            remote: remote.into(),
            state: ListState::Start,
            seen_any: false,
        }
    }

    /// Lists a folder (or describes a single file), sorted by name, at most `max` entries
    /// (more is an error rather than unbounded memory).
    pub async fn list(&self, remote: &str, max: usize) -> Result<Vec<Entry>, ObjectError> {
        let mut out = Vec::new();
        let mut over = false;
        self.list_each(remote, |e| {
            if out.len() >= max {
                over = true;
                return false;
            }
            out.push(e);
            true
        })
        .await?;
        if over {
            return Err(ObjectError::Tree(StorageError::TooBigToCheck {
                from: remote.into(),
                max: max as u64,
            }));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Opens a file for reading from byte `offset`: one HEAD (size, time, stored digest) and
    /// one ranged GET of that very version.
    pub async fn open_read(&self, remote: &str, offset: u64) -> Result<ObjectRead, ObjectError> {
        let head = self.head(remote).await?;
        self.read(&head, offset, None).await
    }

    /// What a download needs to know before it reads: size, time, stored digest, and the
    /// version (ETag) every later [`ObjectTree::read`] of it must match.
    pub async fn head(&self, remote: &str) -> Result<ObjectHead, ObjectError> {
        let r = self.resolve(remote, true)?;
        let key = self.key(&r)?;
        let head = match self
            .inner
            .s3
            .get_opts(
                &key,
                GetOptions {
                    head: true,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(h) => h,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(if self.is_dir(&r).await? {
                    ObjectError::Tree(StorageError::WrongKind(remote.into(), "a folder"))
                } else {
                    ObjectError::Tree(StorageError::NotFound(remote.into()))
                });
            }
            Err(e) => return Err(ObjectError::store("opening", remote, e)),
        };
        let size = head.meta.size;
        let modified = head.meta.last_modified.timestamp();
        let e_tag = head.meta.e_tag.clone();
        let mut stored = head
            .attributes
            .get(&Attribute::Metadata(DIGEST_METADATA.into()))
            .and_then(|v| parse_digest(v.as_ref()));
        if stored.is_none() && e_tag.as_deref().is_some_and(|t| t.contains('-')) {
            // A multipart upload's digest is only known at its end, after the object's
            // metadata is fixed: it is kept beside it, valid for that ETag only.
            stored = upload::stored_digest(&self.inner, &self.user, &r.canonical, e_tag.as_deref())
                .await;
        }
        Ok(ObjectHead {
            size,
            modified,
            stored,
            remote: remote.into(),
            key,
            e_tag,
        })
    }

    /// Bytes `offset..end` (`None`: to the end) of the version `head` describes, streamed; a
    /// file replaced since fails the read (`If-Match`), never mixes versions.
    pub async fn read(
        &self,
        head: &ObjectHead,
        offset: u64,
        end: Option<u64>,
    ) -> Result<ObjectRead, ObjectError> {
        let size = head.size;
        let end = end.unwrap_or(size);
        if offset > size || end > size || offset > end {
            return Err(ObjectError::SizeMismatch {
                path: head.remote.clone(),
                declared: size,
                got: offset.max(end),
            });
        }
        let stream = if offset == end {
            futures::stream::empty().boxed()
        } else {
            let got = self
                .inner
                .s3
                .get_opts(
                    &head.key,
                    GetOptions {
                        range: Some(GetRange::Bounded(offset..end)),
                        if_match: head.e_tag.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| ObjectError::store("reading", &head.remote, e))?;
            let path = head.remote.clone();
            got.into_stream()
                .map_err(move |e| ObjectError::store("reading", &path, e))
                .boxed()
        };
        Ok(ObjectRead {
            size,
            modified: head.modified,
            stored: head.stored,
            stream,
        })
    }

    /// Deletes a file, or a folder with nothing in it but its marker.
    pub async fn delete(&self, remote: &str) -> Result<(), ObjectError> {
        let r = self.resolve(remote, true)?;
        if self.file_meta(&r).await?.is_some() {
            self.inner
                .s3
                .delete(&self.key(&r)?)
                .await
                .map_err(|e| ObjectError::store("deleting", remote, e))?;
            upload::forget_digest(&self.inner, &self.user, &r.canonical).await;
            return Ok(());
        }
        let page = self
            .inner
            .list_page(&r.dir_prefix(), None, 2)
            .await
            .map_err(|e| ObjectError::store("deleting", remote, e))?;
        let res = &page.result;
        if res.objects.is_empty() && res.common_prefixes.is_empty() {
            return Err(ObjectError::Tree(StorageError::NotFound(remote.into())));
        }
        let only_marker = res.common_prefixes.is_empty()
            && res.objects.len() == 1
            && res.objects[0].location.filename() == Some(FOLDER_MARKER);
        if !only_marker {
            return Err(ObjectError::Tree(StorageError::NotEmpty(remote.into())));
        }
        self.inner
            .s3
            .delete(&self.marker_key(&r)?)
            .await
            .map_err(|e| ObjectError::store("deleting", remote, e))
    }

    /// Creates a folder and any missing parents (like `mkdir -p`): a marker at each level
    /// that has none. An existing folder is fine; a file at any level is refused.
    pub async fn mkdir(&self, remote: &str) -> Result<(), ObjectError> {
        let r = self.resolve(remote, true)?;
        for depth in 1..=r.parts.len() {
            let sub = self.resolve(&r.parts[..depth].join("/"), true)?;
            if self.file_meta(&sub).await?.is_some() {
                return Err(ObjectError::Tree(StorageError::WrongKind(
                    sub.canonical,
                    "a file",
                )));
            }
            let marker = self.marker_key(&sub)?;
            match self.inner.s3.head(&marker).await {
                Ok(_) => continue,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(ObjectError::store("creating folder", &sub.canonical, e)),
            }
            self.inner
                .s3
                .put(&marker, PutPayload::new())
                .await
                .map_err(|e| ObjectError::store("creating folder", &sub.canonical, e))?;
        }
        Ok(())
    }

    /// Renames `from` to `to`; if `to` is an existing folder, moves `from` into it. An
    /// existing file at the target is replaced (as `mv` does); a folder never is. Copy then
    /// delete: not atomic (see the module notes). A folder is moved object by object, only
    /// if every path inside it stays within the path limits (checked over at most
    /// `max_check` keys when the move makes paths deeper or longer). Returns the final path.
    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        max_check: u64,
    ) -> Result<String, ObjectError> {
        named_components(to).map_err(|source| {
            ObjectError::Tree(StorageError::BadPath {
                path: to.into(),
                source,
            })
        })?;
        let src = self.resolve(from, true)?;
        let Some(src_stat) = self.stat_resolved(&src).await? else {
            return Err(ObjectError::Tree(StorageError::NotFound(from.into())));
        };
        let mut to_remote = to.trim_end_matches('/').to_string();
        let mut dst = self.resolve(&to_remote, true)?;
        let mut dst_stat = self.stat_resolved(&dst).await?;
        if dst_stat == Some(Stat::Dir) {
            let base = src.parts.last().cloned().unwrap_or_default();
            to_remote = xfer_proto::path::join(&to_remote, &base);
            dst = self.resolve(&to_remote, true)?;
            dst_stat = self.stat_resolved(&dst).await?;
        }
        if dst.parts == src.parts {
            return Ok(to_remote);
        }
        if dst_stat == Some(Stat::Dir) {
            return Err(ObjectError::Tree(StorageError::AlreadyExists(to_remote)));
        }
        if src_stat == Stat::Dir && dst_stat.is_some() {
            return Err(ObjectError::Tree(StorageError::WrongKind(
                to_remote,
                "a file; a folder cannot replace it",
            )));
        }
        if dst.parts.starts_with(&src.parts) {
            return Err(ObjectError::Tree(StorageError::WrongKind(
                to_remote,
                "inside the folder being moved",
            )));
        }
        // The target's folder must exist, as for a local rename.
        let parent = self.resolve(&dst.parts[..dst.parts.len() - 1].join("/"), false)?;
        match self.stat_resolved(&parent).await? {
            Some(Stat::Dir) => {}
            Some(Stat::File { .. }) => {
                return Err(ObjectError::Tree(StorageError::WrongKind(
                    parent.canonical,
                    "not a folder",
                )));
            }
            None => return Err(ObjectError::Tree(StorageError::NotFound(parent.canonical))),
        }
        match src_stat {
            Stat::File { .. } => {
                let (from_key, to_key) = (self.key(&src)?, self.key(&dst)?);
                self.inner
                    .s3
                    .copy(&from_key, &to_key)
                    .await
                    .map_err(|e| ObjectError::store("renaming", from, e))?;
                upload::move_digest(
                    &self.inner,
                    &self.user,
                    &src.canonical,
                    &dst.canonical,
                    &to_key,
                )
                .await;
                self.inner
                    .s3
                    .delete(&from_key)
                    .await
                    .map_err(|e| ObjectError::store("renaming", from, e))?;
                upload::forget_digest(&self.inner, &self.user, &src.canonical).await;
            }
            Stat::Dir => {
                self.rename_dir(from, &src, &to_remote, &dst, max_check)
                    .await?
            }
        }
        Ok(to_remote)
    }

    /// Moves every object under the folder `src` to `dst`: all copies first, then all
    /// deletes, so an interruption leaves everything under at least one of the two names.
    async fn rename_dir(
        &self,
        from: &str,
        src: &Resolved,
        to: &str,
        dst: &Resolved,
        max_check: u64,
    ) -> Result<(), ObjectError> {
        let depth = |r: &Resolved| r.parts.len();
        let len = |r: &Resolved| r.canonical.len();
        let src_prefix = src.dir_prefix();
        let dst_prefix = dst.dir_prefix();
        let store = |e| ObjectError::store("renaming", from, e);
        // Everything inside moves by the same amount: only a move that makes the folder's
        // own path deeper or longer needs the walk (as in the local backend).
        if depth(dst) > depth(src) || len(dst) > len(src) {
            let mut token = None;
            let mut seen = 0u64;
            loop {
                let page = self
                    .inner
                    .list_deep_page(&src_prefix, token.take())
                    .await
                    .map_err(store)?;
                for obj in &page.result.objects {
                    seen += 1;
                    if seen > max_check {
                        return Err(ObjectError::Tree(StorageError::TooBigToCheck {
                            from: from.into(),
                            max: max_check,
                        }));
                    }
                    let inner = &obj.location.as_ref()[src_prefix.len()..];
                    let mut below: Vec<&str> = inner.split('/').collect();
                    if below.last() == Some(&FOLDER_MARKER) {
                        below.pop();
                    }
                    let new_depth = depth(dst) + below.len();
                    let new_len = len(dst) + below.iter().map(|p| p.len() + 1).sum::<usize>();
                    if new_depth > MAX_PATH_DEPTH || new_len > MAX_PATH_LEN {
                        return Err(ObjectError::Tree(StorageError::TooDeep {
                            from: from.into(),
                            to: to.into(),
                            depth: new_depth,
                            len: new_len,
                        }));
                    }
                }
                match page.page_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
        }
        for pass in ["copy", "delete"] {
            let mut token = None;
            loop {
                let page = self
                    .inner
                    .list_deep_page(&src_prefix, token.take())
                    .await
                    .map_err(store)?;
                for obj in &page.result.objects {
                    let inner = &obj.location.as_ref()[src_prefix.len()..];
                    if pass == "copy" {
                        let target = self.inner.key(to, format!("{dst_prefix}{inner}"))?;
                        self.inner
                            .s3
                            .copy(&obj.location, &target)
                            .await
                            .map_err(store)?;
                    } else {
                        self.inner.s3.delete(&obj.location).await.map_err(store)?;
                    }
                }
                match page.page_token {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
        }
        // The folder itself, if it had no marker, must not vanish from its new place
        // when it was empty but for subfolders: they moved with it, so nothing to do.
        Ok(())
    }

    /// Bytes this user's interrupted uploads hold in the store, except a resumable upload of
    /// `remote` (which an upload of it about to begin would take over): for the partial budget.
    pub async fn partial_usage_except(&self, remote: &str) -> Result<u64, ObjectError> {
        let r = self.resolve(remote, true)?;
        upload::usage(&self.inner, &self.user, Some(&r.canonical)).await
    }

    /// The part size an upload of `size` bytes uses: files of at most this much are stored in
    /// one PUT at the commit, not resumable.
    pub fn part_size_for(&self, size: u64) -> u64 {
        self.inner.uploads.part_size_for(size)
    }

    /// Starts (or resumes) an upload of `size` bytes to `remote`; see [`upload`].
    pub async fn begin_upload(
        &self,
        remote: &str,
        size: u64,
        max_bytes: u64,
        resume: Option<Resume>,
    ) -> Result<ObjectUpload, ObjectError> {
        if max_bytes > 0 && size > max_bytes {
            return Err(ObjectError::Tree(StorageError::TooLarge(max_bytes)));
        }
        let r = self.resolve(remote, true)?;
        self.check_upload_target(remote, &r).await?;
        upload::begin(
            self.inner.clone(),
            &self.user,
            remote,
            &r.canonical,
            self.key(&r)?,
            size,
            resume,
        )
        .await
    }

    /// The target of an upload must not be a folder, and its folder must exist.
    async fn check_upload_target(&self, remote: &str, r: &Resolved) -> Result<(), ObjectError> {
        if self.is_dir(r).await? {
            return Err(ObjectError::Tree(StorageError::WrongKind(
                remote.into(),
                "a folder",
            )));
        }
        let parent = self.resolve(&r.parts[..r.parts.len() - 1].join("/"), false)?;
        if self.file_meta(&parent).await?.is_some() {
            return Err(ObjectError::Tree(StorageError::WrongKind(
                parent.canonical,
                "not a folder",
            )));
        }
        if !self.is_dir(&parent).await? {
            return Err(ObjectError::Tree(StorageError::NotFound(parent.canonical)));
        }
        Ok(())
    }

    /// Makes a verified upload visible; see [`ObjectUpload::commit`]. Re-checks that the
    /// target did not become a folder during the transfer.
    pub async fn commit(&self, upload: ObjectUpload, digest: &Digest) -> Result<(), ObjectError> {
        let r = self.resolve(upload.remote(), true)?;
        if self.is_dir(&r).await? {
            let remote = upload.remote().to_string();
            upload.discard().await;
            return Err(ObjectError::Tree(StorageError::WrongKind(
                remote, "a folder",
            )));
        }
        upload.commit(digest).await
    }

    /// Checks that a batched file can be stored at `remote` later: its missing folders are
    /// created now (like `mkdir -p`) and the target must not be a folder.
    pub async fn check_stage(&self, remote: &str) -> Result<(), ObjectError> {
        let r = self.resolve(remote, true)?;
        if r.parts.len() > 1 {
            self.mkdir(&r.parts[..r.parts.len() - 1].join("/")).await?;
        }
        if self.is_dir(&r).await? {
            return Err(ObjectError::Tree(StorageError::WrongKind(
                remote.into(),
                "a folder",
            )));
        }
        Ok(())
    }

    /// Stores a small file in one PUT (atomic per object), with its digest as metadata:
    /// for batched uploads, whose data the caller holds in memory (bounded by
    /// `limits.max_batch_bytes`). Creates missing folders first, like `mkdir -p`.
    pub async fn put_small(
        &self,
        remote: &str,
        data: Bytes,
        digest: &Digest,
    ) -> Result<(), ObjectError> {
        let r = self.resolve(remote, true)?;
        if r.parts.len() > 1 {
            self.mkdir(&r.parts[..r.parts.len() - 1].join("/")).await?;
        }
        if self.is_dir(&r).await? {
            return Err(ObjectError::Tree(StorageError::WrongKind(
                remote.into(),
                "a folder",
            )));
        }
        let mut attributes = Attributes::new();
        attributes.insert(
            Attribute::Metadata(DIGEST_METADATA.into()),
            hex(digest).into(),
        );
        self.inner
            .s3
            .put_opts(
                &self.key(&r)?,
                PutPayload::from(data),
                PutOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ObjectError::store("storing", remote, e))?;
        // A digest kept beside an older multipart version is ignored: the metadata wins.
        Ok(())
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 32-byte digest from 64 hex digits.
pub(crate) fn parse_digest(text: &str) -> Option<Digest> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn rand_bytes(out: &mut [u8]) {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    OsRng.fill_bytes(out);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect()
}

/// Milliseconds since the epoch, as resume records count time.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Something kept beside an object whose digest could not go into its metadata.
#[derive(Debug, Serialize, Deserialize)]
struct StoredDigest {
    /// The ETag of the object it describes: a different one means a different object.
    e_tag: String,
    /// Hex BLAKE3 of the whole object.
    blake3: String,
}

#[cfg(test)]
mod tests;
