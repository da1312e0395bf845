//! Storage tests written against the seam ([`Tree`], [`Store`]), so that each runs on every
//! backend in [`BACKENDS`]. What only one backend can show (symlinks planted on disk, temp
//! files left by a crash) is tested beside that backend.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use xfer_proto::limits::MAX_PATH_DEPTH;
use xfer_proto::{Entry, EntryKind};

use super::*;

/// A backend the storage tests run against.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    /// Folders under a temp storage root.
    Local,
}

/// Every backend the tests run against.
pub(crate) const BACKENDS: &[Backend] = &[Backend::Local];

/// A store and one user's tree on `backend`, alive as long as this is.
pub(crate) struct Fixture {
    /// The temp folder under the store, removed on drop.
    _dir: tempfile::TempDir,
    /// The store.
    pub store: Store,
    /// The tree of `alice`.
    pub tree: Tree,
}

/// Builds a fresh, empty store on `backend` and opens `alice`'s tree in it.
pub(crate) async fn fixture(backend: Backend) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = match backend {
        Backend::Local => Store::Local(local::LocalStore::open(&dir.path().join("root")).unwrap()),
    };
    let tree = store.user_tree("alice").await.unwrap();
    Fixture {
        _dir: dir,
        store,
        tree,
    }
}

/// Uploads `data` to `remote` in one go.
pub(crate) async fn put(tree: &Tree, remote: &str, data: &[u8]) {
    let up = tree
        .begin_upload(remote, data.len() as u64, 0, Staging::Temp)
        .await
        .unwrap();
    up.file().write_all(data).unwrap();
    tree.commit(up, blake3::hash(data).as_bytes())
        .await
        .unwrap();
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
        assert!(matches!(h.body, ReadBody::File(_)), "{b:?}");
        // From an offset: the prefix hasher covers exactly the bytes before it.
        let h = t.open_read("small", false).await.unwrap();
        assert!(matches!(h.body, ReadBody::File(_)), "{b:?}");
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
        // may refuse: then there is no digest, never a wrong one.
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
            up.file().write_all(b"ne").unwrap();
        }
        assert_eq!(read(&t, "f").await.unwrap(), b"old", "{b:?}");
        let up = t.begin_upload("f", 3, 0, Staging::Temp).await.unwrap();
        up.file().write_all(b"new").unwrap();
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
        up.file().write_all(b"1").unwrap();
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
        t.mkdir("d").await.unwrap();
        put(t, "d/f", b"old").await;
        {
            let up = t.begin_upload("d/f", 6, 0, resumable(6)).await.unwrap();
            assert_eq!(up.held(), 0);
            assert!(up.resumable() && !up.held_elsewhere(), "{b:?}");
            up.file().write_all(b"new").unwrap();
        }
        // Invisible: the old version is still there and nothing else in the tree.
        assert_eq!(read(t, "d/f").await.unwrap(), b"old", "{b:?}");
        assert_eq!(names(t, "d").await, vec!["f"], "{b:?}");
        assert_eq!(fx.store.partial_usage("alice").await.unwrap(), 3, "{b:?}");
        // The same file under another spelling of its path.
        let up = t.begin_upload("d//f", 6, 0, resumable(6)).await.unwrap();
        assert_eq!((up.held(), up.key()), (3, "d/f"), "{b:?}");
        // While it runs, it counts at its declared size, and a second upload of the same
        // path is staged apart.
        assert_eq!(fx.store.partial_usage("alice").await.unwrap(), 6, "{b:?}");
        let other = t.begin_upload("d/f", 6, 0, resumable(6)).await.unwrap();
        assert!(other.held_elsewhere() && !other.resumable(), "{b:?}");
        assert_eq!(other.held(), 0);
        drop(other);
        let prefix = up.prefix_hasher().await.unwrap();
        assert_eq!(prefix.finalize(), blake3::hash(b"new"), "{b:?}");
        let mut f = up.file();
        f.seek(SeekFrom::Start(3)).unwrap();
        f.write_all(b"abc").unwrap();
        t.commit(up, blake3::hash(b"newabc").as_bytes())
            .await
            .unwrap();
        assert_eq!(read(t, "d/f").await.unwrap(), b"newabc", "{b:?}");
        assert_eq!(fx.store.partial_usage("alice").await.unwrap(), 0, "{b:?}");
        // Asking to start over, or a file smaller than what is held, empties it.
        let interrupt = |remote: &'static str| async move {
            let up = t.begin_upload(remote, 10, 0, resumable(10)).await.unwrap();
            up.file().write_all(b"12345").unwrap();
        };
        interrupt("g").await;
        let up = t.begin_upload("g", 10, 0, resumable(0)).await.unwrap();
        assert_eq!(up.held(), 0, "{b:?}");
        drop(up);
        interrupt("g").await;
        assert_eq!(
            t.begin_upload("g", 4, 0, resumable(4))
                .await
                .unwrap()
                .held(),
            0
        );
        // A restarted one holds nothing; a discarded one is gone.
        interrupt("h").await;
        let mut up = t.begin_upload("h", 10, 0, resumable(10)).await.unwrap();
        assert_eq!(up.held(), 5);
        up.restart().await.unwrap();
        assert_eq!(up.held(), 0);
        up.file().write_all(b"12345").unwrap();
        up.discard().await;
        assert_eq!(
            t.begin_upload("h", 10, 0, resumable(10))
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
        {
            let up = t.begin_upload("f", 10, 0, resumable(10)).await.unwrap();
            up.file().write_all(b"12345").unwrap();
        }
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
            t.begin_upload("f", 10, 0, resumable(10))
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
