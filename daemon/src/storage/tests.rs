//! Storage tests written against the seam ([`Tree`], [`Store`]), so that each runs on every
//! backend in [`BACKENDS`]: the local filesystem, and the object store on the real 3-node
//! Garage cluster of `xfer_tests::cluster` (which fails, never skips, when Garage is missing).
//! What only one backend can show (symlinks planted on disk, temp files left by a crash,
//! resume records read by another node) is tested beside that backend. Where the backends
//! differ by design, the test says so and asserts each one's behaviour.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use xfer_proto::limits::MAX_PATH_DEPTH;
use xfer_proto::{Entry, EntryKind};

use super::*;

/// A backend the storage tests run against.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    /// Folders under a temp storage root.
    Local,
    /// A fresh prefix of the test bucket on the Garage cluster, with small parts.
    Object,
}

/// Every backend the tests run against.
pub(crate) const BACKENDS: &[Backend] = &[Backend::Local, Backend::Object];

/// Part size of the object fixture: small, so that multipart uploads and resume show with
/// little data (Garage accepts parts under S3's 5 MiB).
const PART: u64 = 64 << 10;

/// A store and one user's tree on `backend`, alive as long as this is.
pub(crate) struct Fixture {
    /// The temp folder under the store, removed on drop.
    _dir: tempfile::TempDir,
    /// The store.
    pub store: Store,
    /// The tree of `alice`.
    pub tree: Tree,
    /// What an interrupted upload keeps for resume is a multiple of this: any byte on the
    /// local backend (1), whole parts on the object store (by design: a part is stored
    /// only once complete).
    pub unit: u64,
}

/// Builds a fresh, empty store on `backend` and opens `alice`'s tree in it.
pub(crate) async fn fixture(backend: Backend) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (store, unit) = match backend {
        Backend::Local => (
            Store::Local(local::LocalStore::open(&dir.path().join("root")).unwrap()),
            1,
        ),
        Backend::Object => (Store::Object(object_store_fixture().await), PART),
    };
    let tree = store.user_tree("alice").await.unwrap();
    Fixture {
        _dir: dir,
        store,
        tree,
        unit,
    }
}

/// An object store on the test cluster under a prefix no other test uses, answering.
async fn object_store_fixture() -> object::ObjectStore {
    let g = xfer_tests::cluster::garage().s3();
    let settings = crate::config::StorageSettings {
        kind: crate::config::StorageKind::S3,
        bucket: g.bucket.clone(),
        endpoint: g.endpoint.clone(),
        region: g.region.clone(),
        allow_http: true,
        prefix: xfer_tests::cluster::unique_prefix("seam"),
        part_size: PART,
        upload_lease_secs: 5,
        ..Default::default()
    };
    let creds = object::Credentials::new(g.access_key_id.clone(), g.secret_access_key.clone());
    let s = object::ObjectStore::open(&settings, creds).unwrap();
    // The layout may take a moment to reach the S3 endpoint after the cluster starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.check().await {
            Ok(()) => return s,
            Err(e) if Instant::now() >= deadline => panic!("the test bucket never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `len` bytes that differ with `seed`.
fn bytes(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

/// Writes `data` after what `up` holds, on a blocking thread, as the body pipeline does.
pub(crate) async fn write(up: &Upload, data: &[u8]) {
    let mut w = up.writer().unwrap();
    let data = data.to_vec();
    tokio::task::spawn_blocking(move || {
        // Uneven pieces, as TLS records arrive.
        for piece in data.chunks(10_000) {
            w.write_all(piece).unwrap();
        }
    })
    .await
    .unwrap();
}

/// Uploads `data` to `remote` in one go.
pub(crate) async fn put(tree: &Tree, remote: &str, data: &[u8]) {
    let up = tree
        .begin_upload(remote, data.len() as u64, 0, Staging::Temp)
        .await
        .unwrap();
    write(&up, data).await;
    tree.commit(up, blake3::hash(data).as_bytes())
        .await
        .unwrap();
}

/// Whether `body` is the streamed kind `backend` hands out (not read whole).
fn streamed(backend: Backend, body: &ReadBody) -> bool {
    matches!(
        (backend, body),
        (Backend::Local, ReadBody::File(_)) | (Backend::Object, ReadBody::Object(_))
    )
}

/// The whole content of `remote`, read through the seam.
pub(crate) async fn read(tree: &Tree, remote: &str) -> Result<Vec<u8>, StorageError> {
    let h = tree.open_read(remote, true).await?;
    let data = match h.body {
        ReadBody::File(mut f) => {
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            data
        }
        ReadBody::Object(o) => {
            let mut r = o.reader(0).await?;
            tokio::task::spawn_blocking(move || {
                let mut data = Vec::new();
                r.read_to_end(&mut data).unwrap();
                data
            })
            .await
            .unwrap()
        }
        ReadBody::Whole { buf, digest } => {
            let data = buf[WHOLE_READ_ROOM..].to_vec();
            assert_eq!(digest, *blake3::hash(&data).as_bytes());
            data
        }
    };
    assert_eq!(data.len() as u64, h.size);
    Ok(data)
}

/// The entries of `remote`, sorted by name.
pub(crate) async fn list(tree: &Tree, remote: &str) -> Result<Vec<Entry>, StorageError> {
    let mut listing = tree.list(remote);
    let mut out = Vec::new();
    while let Some(batch) = listing.next().await {
        let batch = batch?;
        assert!(!batch.is_empty() && batch.len() <= LIST_BATCH);
        out.extend(batch);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

async fn names(tree: &Tree, remote: &str) -> Vec<String> {
    list(tree, remote)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn resumable(up_to: u64) -> Staging {
    Staging::Resumable {
        up_to,
        ttl: Duration::from_secs(60),
        max_bytes: 1 << 20,
    }
}

#[tokio::test]
async fn upload_commit_list_download_delete() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        put(&t, "a.txt", b"hello").await;
        t.mkdir("sub/deeper").await.unwrap();
        put(&t, "sub/b", b"").await;
        assert_eq!(names(&t, "").await, vec!["a.txt", "sub"], "{b:?}");
        let entries = list(&t, "").await.unwrap();
        assert_eq!(
            (entries[0].kind, entries[0].size),
            (EntryKind::File, 5),
            "{b:?}"
        );
        assert_eq!(entries[1].kind, EntryKind::Dir, "{b:?}");
        // A file lists as itself.
        assert_eq!(names(&t, "sub/b").await, vec!["b"], "{b:?}");
        assert_eq!(read(&t, "a.txt").await.unwrap(), b"hello");
        assert_eq!(read(&t, "sub/b").await.unwrap(), b"");
        let r = t.delete("sub").await;
        assert!(matches!(r, Err(StorageError::NotEmpty(_))), "{b:?}: {r:?}");
        t.delete("a.txt").await.unwrap();
        let r = read(&t, "a.txt").await;
        assert!(matches!(r, Err(StorageError::NotFound(_))), "{b:?}: {r:?}");
        let r = list(&t, "missing").await;
        assert!(matches!(r, Err(StorageError::NotFound(_))), "{b:?}: {r:?}");
        let r = read(&t, "sub").await;
        assert!(
            matches!(r, Err(StorageError::WrongKind(..))),
            "{b:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn a_big_folder_lists_in_bounded_batches_and_completely() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        let n = LIST_BATCH * 2 + 5;
        for i in 0..n {
            put(&t, &format!("f{i:04}"), b"x").await;
        }
        // `list` checks each batch is at most LIST_BATCH entries.
        let got = names(&t, "").await;
        let want: Vec<String> = (0..n).map(|i| format!("f{i:04}")).collect();
        assert_eq!(got, want, "{b:?}");
    }
}

#[tokio::test]
async fn a_dropped_listing_stops_its_walk() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        for i in 0..LIST_BATCH * 4 {
            put(&t, &format!("f{i}"), b"").await;
        }
        let mut listing = t.list("");
        assert!(listing.next().await.unwrap().is_ok());
        drop(listing);
        // The walk ends rather than waiting forever for a reader: the tree stays usable.
        put(&t, "after", b"1").await;
        assert_eq!(read(&t, "after").await.unwrap(), b"1");
    }
}

#[tokio::test]
async fn whole_reads_come_read_and_partial_reads_from_an_offset() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        let small: Vec<u8> = (0..WHOLE_READ_MAX).map(|i| (i % 251) as u8).collect();
        let big: Vec<u8> = (0..WHOLE_READ_MAX + 1).map(|i| (i % 249) as u8).collect();
        put(&t, "small", &small).await;
        put(&t, "big", &big).await;
        let h = t.open_read("small", true).await.unwrap();
        assert_eq!(h.size, small.len() as u64);
        match &h.body {
            ReadBody::Whole { buf, digest } => {
                assert_eq!(&buf[WHOLE_READ_ROOM..], &small[..], "{b:?}");
                assert_eq!(digest, blake3::hash(&small).as_bytes(), "{b:?}");
                // Room for a trailer without moving the data.
                assert!(buf.capacity() >= buf.len() + WHOLE_READ_ROOM, "{b:?}");
            }
            other => panic!("{b:?}: a small whole read came as {other:?}"),
        }
        let h = t.open_read("big", true).await.unwrap();
        assert!(streamed(b, &h.body), "{b:?}: {:?}", h.body);
        // From an offset: the prefix hasher covers exactly the bytes before it.
        let h = t.open_read("small", false).await.unwrap();
        assert!(streamed(b, &h.body), "{b:?}: {:?}", h.body);
        assert_eq!(h.stored, None);
        let prefix = h.prefix_hasher(1000).await.unwrap();
        assert_eq!(prefix.finalize(), blake3::hash(&small[..1000]), "{b:?}");
        let r = h.prefix_hasher(small.len() as u64 + 1).await;
        assert!(r.is_err(), "{b:?}: a prefix longer than the file");
    }
}

#[tokio::test]
async fn a_committed_big_upload_keeps_its_digest_for_whole_reads() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        let data: Vec<u8> = (0..(1usize << 20) + 3).map(|i| (i % 253) as u8).collect();
        put(&t, "big", &data).await;
        let h = t.open_read("big", true).await.unwrap();
        // The local backend keeps it in an extended attribute, which the test's own disk
        // may refuse: then there is no digest, never a wrong one. The object store keeps it
        // beside the object, always.
        if matches!(b, Backend::Object) {
            assert!(h.stored.is_some(), "{b:?}: no stored digest");
        }
        if let Some(d) = h.stored {
            assert_eq!(d, *blake3::hash(&data).as_bytes(), "{b:?}");
        }
        // Only whole reads are offered it.
        assert_eq!(t.open_read("big", false).await.unwrap().stored, None);
    }
}

#[tokio::test]
async fn an_uncommitted_upload_leaves_the_old_version() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        put(&t, "f", b"old").await;
        {
            let up = t.begin_upload("f", 3, 0, Staging::Temp).await.unwrap();
            write(&up, b"ne").await;
        }
        assert_eq!(read(&t, "f").await.unwrap(), b"old", "{b:?}");
        let up = t.begin_upload("f", 3, 0, Staging::Temp).await.unwrap();
        write(&up, b"new").await;
        up.discard().await;
        assert_eq!(read(&t, "f").await.unwrap(), b"old", "{b:?}");
        assert_eq!(names(&t, "").await, vec!["f"], "{b:?}");
    }
}

#[tokio::test]
async fn uploads_are_refused_where_they_cannot_land() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        t.mkdir("d").await.unwrap();
        let r = t.begin_upload("d", 1, 0, Staging::Temp).await;
        assert!(
            matches!(r, Err(StorageError::WrongKind(..))),
            "{b:?}: {r:?}"
        );
        let r = t.begin_upload("missing/f", 1, 0, Staging::Temp).await;
        assert!(matches!(r, Err(StorageError::NotFound(_))), "{b:?}: {r:?}");
        let r = t.begin_upload("f", 11, 10, Staging::Temp).await;
        assert!(matches!(r, Err(StorageError::TooLarge(10))), "{b:?}: {r:?}");
        // A folder put in the way during the transfer is found at the commit.
        let up = t.begin_upload("late", 1, 0, Staging::Temp).await.unwrap();
        write(&up, b"1").await;
        t.mkdir("late").await.unwrap();
        let r = t.commit(up, blake3::hash(b"1").as_bytes()).await;
        assert!(
            matches!(r, Err(StorageError::WrongKind(..))),
            "{b:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn an_interrupted_resumable_upload_is_kept_apart_and_offered_again() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = &fx.tree;
        // Sizes in units of what a backend keeps (see `Fixture::unit`): on the local
        // backend these are the bytes themselves.
        let u = fx.unit;
        let (new, abc) = (bytes(3 * u, 1), bytes(3 * u, 2));
        let whole = [new.clone(), abc.clone()].concat();
        t.mkdir("d").await.unwrap();
        put(t, "d/f", b"old").await;
        {
            let up = t
                .begin_upload("d/f", 6 * u, 0, resumable(6 * u))
                .await
                .unwrap();
            assert_eq!(up.held(), 0);
            assert!(up.resumable() && !up.held_elsewhere(), "{b:?}");
            write(&up, &new).await;
            // As a broken connection leaves it (the object store writes its record then).
            up.interrupt().await;
        }
        // Invisible: the old version is still there and nothing else in the tree.
        assert_eq!(read(t, "d/f").await.unwrap(), b"old", "{b:?}");
        assert_eq!(names(t, "d").await, vec!["f"], "{b:?}");
        assert_eq!(
            fx.store.partial_usage("alice").await.unwrap(),
            3 * u,
            "{b:?}"
        );
        // The same file under another spelling of its path.
        let up = t
            .begin_upload("d//f", 6 * u, 0, resumable(6 * u))
            .await
            .unwrap();
        assert_eq!((up.held(), up.key()), (3 * u, "d/f"), "{b:?}");
        // While it runs, the local backend counts it at its declared size; the object store
        // counts what its parts hold (its budget check adds the declared size at the start).
        let running = match b {
            Backend::Local => 6 * u,
            Backend::Object => 3 * u,
        };
        assert_eq!(
            fx.store.partial_usage("alice").await.unwrap(),
            running,
            "{b:?}"
        );
        // A second upload of the same path is staged apart.
        let other = t
            .begin_upload("d/f", 6 * u, 0, resumable(6 * u))
            .await
            .unwrap();
        assert!(other.held_elsewhere() && !other.resumable(), "{b:?}");
        assert_eq!(other.held(), 0);
        other.discard().await;
        assert_eq!(
            up.held_digest().await.unwrap(),
            *blake3::hash(&new).as_bytes(),
            "{b:?}"
        );
        write(&up, &abc).await;
        t.commit(up, blake3::hash(&whole).as_bytes()).await.unwrap();
        assert!(read(t, "d/f").await.unwrap() == whole, "{b:?}");
        assert_eq!(fx.store.partial_usage("alice").await.unwrap(), 0, "{b:?}");
        // Asking to start over, or a file smaller than what is held, empties it.
        let interrupt = |remote: &'static str| async move {
            let up = t
                .begin_upload(remote, 10 * u, 0, resumable(10 * u))
                .await
                .unwrap();
            write(&up, &bytes(5 * u, 3)).await;
            up.interrupt().await;
        };
        interrupt("g").await;
        let up = t.begin_upload("g", 10 * u, 0, resumable(0)).await.unwrap();
        assert_eq!(up.held(), 0, "{b:?}");
        up.interrupt().await;
        interrupt("g").await;
        let up = t
            .begin_upload("g", 4 * u, 0, resumable(4 * u))
            .await
            .unwrap();
        assert_eq!(up.held(), 0, "{b:?}");
        up.interrupt().await;
        // A restarted one holds nothing; a discarded one is gone.
        interrupt("h").await;
        let mut up = t
            .begin_upload("h", 10 * u, 0, resumable(10 * u))
            .await
            .unwrap();
        assert_eq!(up.held(), 5 * u, "{b:?}");
        up.restart().await.unwrap();
        assert_eq!(up.held(), 0);
        write(&up, &bytes(5 * u, 4)).await;
        up.discard().await;
        assert_eq!(
            t.begin_upload("h", 10 * u, 0, resumable(10 * u))
                .await
                .unwrap()
                .held(),
            0
        );
        // Staged data is never listed.
        assert_eq!(names(t, "").await, vec!["d"], "{b:?}");
    }
}

#[tokio::test]
async fn partials_expire_and_are_swept() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = &fx.tree;
        let u = fx.unit;
        let up = t
            .begin_upload("f", 10 * u, 0, resumable(10 * u))
            .await
            .unwrap();
        write(&up, &bytes(5 * u, 1)).await;
        up.interrupt().await;
        assert_eq!(
            fx.store
                .sweep_partials(Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            fx.store
                .sweep_partials(Duration::from_millis(1))
                .await
                .unwrap(),
            1
        );
        assert_eq!(fx.store.partial_usage("alice").await.unwrap(), 0, "{b:?}");
        assert_eq!(
            t.begin_upload("f", 10 * u, 0, resumable(10 * u))
                .await
                .unwrap()
                .held(),
            0
        );
    }
}

#[tokio::test]
async fn staged_files_appear_only_at_the_batch_commit() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        put(&t, "old", b"old").await;
        let cache = StageCache::default();
        let mut staged = Vec::new();
        for (remote, data) in [("a/b/one", &b"1"[..]), ("a/two", b"22"), ("old", b"new")] {
            staged.push(t.stage(remote, data.to_vec(), &cache).await.unwrap());
        }
        // Missing folders are made at once; the files wait for the commit.
        assert_eq!(names(&t, "").await, vec!["a", "old"], "{b:?}");
        assert_eq!(names(&t, "a").await, vec!["b"], "{b:?}");
        assert_eq!(read(&t, "old").await.unwrap(), b"old", "{b:?}");
        let done = t.commit_batch(staged).await.unwrap();
        let remotes: Vec<&str> = done.iter().map(|(s, _)| s.remote()).collect();
        assert_eq!(remotes, ["a/b/one", "a/two", "old"], "{b:?}");
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{b:?}");
        assert_eq!(read(&t, "a/b/one").await.unwrap(), b"1");
        assert_eq!(read(&t, "a/two").await.unwrap(), b"22");
        assert_eq!(read(&t, "old").await.unwrap(), b"new");
    }
}

#[tokio::test]
async fn staged_files_never_committed_leave_nothing() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        let cache = StageCache::default();
        let staged = t.stage("x", b"data".to_vec(), &cache).await.unwrap();
        drop(staged);
        // Dropped before it ended: its file goes when it does.
        drop(t.stage("y", b"data".to_vec(), &cache));
        assert_eq!(
            t.stage("z", Vec::new(), &cache).await.unwrap().remote(),
            "z"
        );
        assert!(names(&t, "").await.is_empty(), "{b:?}");
        // Refusals come from the staging itself.
        t.mkdir("d").await.unwrap();
        let r = t.stage("d", b"1".to_vec(), &cache).await;
        assert!(
            matches!(r, Err(StorageError::WrongKind(..))),
            "{b:?}: {r:?}"
        );
        let r = t.stage("../x", b"1".to_vec(), &cache).await;
        assert!(
            matches!(r, Err(StorageError::BadPath { .. })),
            "{b:?}: {r:?}"
        );
        put(&t, "file", b"").await;
        let r = t.stage("file/x", b"1".to_vec(), &cache).await;
        assert!(
            matches!(r, Err(StorageError::WrongKind(..))),
            "{b:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn rename_moves_into_folders_and_refuses_loops() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        put(&t, "f", b"1").await;
        t.mkdir("d").await.unwrap();
        assert_eq!(t.rename("f", "d", 100).await.unwrap(), "d/f");
        assert_eq!(read(&t, "d/f").await.unwrap(), b"1", "{b:?}");
        assert!(t.rename("d", "d/inner", 100).await.is_err());
        assert_eq!(t.rename("d/f", "g", 100).await.unwrap(), "g");
        let r = t.rename("missing", "x", 100).await;
        assert!(matches!(r, Err(StorageError::NotFound(_))), "{b:?}: {r:?}");
        // A file is replaced, a folder never.
        put(&t, "h", b"2").await;
        assert_eq!(t.rename("h", "g", 100).await.unwrap(), "g");
        assert_eq!(read(&t, "g").await.unwrap(), b"2", "{b:?}");
        t.mkdir("e/d").await.unwrap();
        let r = t.rename("d", "e", 100).await;
        assert!(
            matches!(r, Err(StorageError::AlreadyExists(_))),
            "{b:?}: {r:?}"
        );
        assert_eq!(names(&t, "").await, vec!["d", "e", "g"], "{b:?}");
    }
}

/// `name/1/2/.../n`: a folder whose deepest entry is `n` levels below it.
async fn chain(t: &Tree, name: &str, n: usize) -> String {
    let mut path = name.to_string();
    for i in 1..=n {
        path.push_str(&format!("/{i}"));
    }
    t.mkdir(&path).await.unwrap();
    path
}

#[tokio::test]
async fn renames_never_build_paths_past_the_depth_limit() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        // `deep` reaches 60 levels below the root (depth 1 + 59 below it).
        chain(&t, "deep", MAX_PATH_DEPTH - 5).await;
        let five = chain(&t, "b", 4).await;
        // Into a folder 5 levels down: its deepest entry would be 65 levels deep.
        let err = t.rename("deep", &five, 1000).await.unwrap_err();
        assert!(
            matches!(err, StorageError::TooDeep { depth: 65, .. }),
            "{b:?}: {err}"
        );
        assert!(err.to_string().contains("64 levels"), "{err}");
        assert_eq!(
            names(&t, "").await,
            vec!["b", "deep"],
            "{b:?}: nothing moved"
        );
        // One level less is fine, and so is moving it back up (with no walk).
        assert_eq!(
            t.rename("deep", "b/1/2/3", 1000).await.unwrap(),
            "b/1/2/3/deep"
        );
        assert_eq!(
            t.rename("b/1/2/3/deep", "deep", 1000).await.unwrap(),
            "deep"
        );
    }
}

#[tokio::test]
async fn renames_never_build_paths_past_the_length_limit() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        // 16 levels of 250-byte names: a path of 4,015 bytes, within the 4,096 limit.
        let names: Vec<String> = (0..16)
            .map(|i| char::from(b'a' + i).to_string().repeat(250))
            .collect();
        t.mkdir(&names.join("/")).await.unwrap();
        let q = "q".repeat(250);
        t.mkdir(&q).await.unwrap();
        // Inside `q`, the deepest path would be 251 bytes longer: 4,266.
        let err = t.rename(&names[0], &q, 1000).await.unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::TooDeep {
                    depth: 17,
                    len: 4266,
                    ..
                }
            ),
            "{b:?}: {err}"
        );
        assert!(err.to_string().contains("4096 bytes"), "{err}");
        // A shorter name at the same level is fine.
        assert_eq!(t.rename(&names[0], "s", 1000).await.unwrap(), "s");
    }
}

#[tokio::test]
async fn a_folder_too_big_to_check_is_not_moved_deeper() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        t.mkdir("big/sub").await.unwrap();
        for i in 0..10 {
            put(&t, &format!("big/sub/f{i}"), b"").await;
        }
        t.mkdir("into").await.unwrap();
        let err = t.rename("big", "into", 5).await.unwrap_err();
        assert!(
            matches!(err, StorageError::TooBigToCheck { max: 5, .. }),
            "{b:?}: {err}"
        );
        assert!(err.to_string().contains("subfolders separately"), "{err}");
        // A move that makes nothing deeper or longer needs no walk at all.
        assert_eq!(t.rename("big", "bag", 5).await.unwrap(), "bag");
        assert_eq!(t.rename("bag", "into", 20).await.unwrap(), "into/bag");
    }
}

#[tokio::test]
async fn bad_paths_are_refused_by_every_operation() {
    for &b in BACKENDS {
        let fx = fixture(b).await;
        let t = fx.tree.clone();
        let bad_path = |r: Result<_, StorageError>| matches!(r, Err(StorageError::BadPath { .. }));
        for bad in ["..", "../x", "/etc/passwd", "a/../../x", "x\0y"] {
            assert!(
                bad_path(list(&t, bad).await.map(|_| ())),
                "{b:?} list {bad}"
            );
            assert!(bad_path(t.open_read(bad, true).await.map(|_| ())), "{bad}");
            let up = t.begin_upload(bad, 1, 0, Staging::Temp).await;
            assert!(bad_path(up.map(|_| ())), "{b:?} upload {bad}");
            assert!(bad_path(t.delete(bad).await), "{b:?} delete {bad}");
            assert!(bad_path(t.mkdir(bad).await), "{b:?} mkdir {bad}");
            assert!(bad_path(t.rename("x", bad, 10).await.map(|_| ())), "{bad}");
        }
        // The root itself is no file to read, delete or move.
        assert!(t.delete("").await.is_err(), "{b:?}");
        assert!(t.open_read("", true).await.is_err(), "{b:?}");
        assert!(t.rename("", "x", 10).await.is_err(), "{b:?}");
        // ...but it lists.
        assert!(list(&t, "").await.unwrap().is_empty());
    }
}
