//! The object backend against a real S3 store: the 3-node Garage cluster of
//! [`xfer_tests::cluster`] (replication factor 3), which fails with a message saying how to
//! build Garage when it is missing (never skips). Each test works under a prefix of its own.

use std::io::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt;
use xfer_proto::EntryKind;
use xferd::config::StorageSettings;
use xferd::storage::StorageError;
use xferd::storage::object::{ObjectError, ObjectStore, ObjectUpload, Resume};

/// Parts of 64 KiB: Garage accepts parts under S3's 5 MiB, which keeps these tests small.
const PART: u64 = 64 << 10;

/// A store on the test Garage under `prefix`, as a node configured with `[storage]` would
/// open it: each call is a fresh client, like another node.
async fn store(prefix: &str) -> ObjectStore {
    store_with_lease(prefix, 2).await
}

async fn store_with_lease(prefix: &str, lease_secs: u64) -> ObjectStore {
    let g = xfer_tests::cluster::garage().s3();
    let settings = StorageSettings {
        part_size: PART,
        parts_in_flight: 2,
        upload_lease_secs: lease_secs,
        ..g.storage(&unique(prefix))
    };
    g.open(&settings).await
}

fn unique(name: &str) -> String {
    xfer_tests::cluster::test_prefix(name)
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect()
}

/// Writes `bytes` through the blocking writer, as the body pipeline will.
async fn feed(mut up: ObjectUpload, bytes: Vec<u8>) -> ObjectUpload {
    tokio::task::spawn_blocking(move || {
        // Uneven pieces, as TLS records arrive.
        for piece in bytes.chunks(10_000) {
            up.write_all(piece).unwrap();
        }
        up
    })
    .await
    .unwrap()
}

async fn read_all(s: &ObjectStore, user: &str, path: &str, offset: u64) -> Vec<u8> {
    let r = s.user_tree(user).open_read(path, offset).await.unwrap();
    let mut out = Vec::new();
    let mut stream = r.into_stream();
    while let Some(piece) = stream.next().await {
        out.extend_from_slice(&piece.unwrap());
    }
    out
}

async fn put(s: &ObjectStore, user: &str, path: &str, bytes: &[u8]) {
    let t = s.user_tree(user);
    let up = t
        .begin_upload(path, bytes.len() as u64, 0, None)
        .await
        .unwrap();
    let up = feed(up, bytes.to_vec()).await;
    t.commit(up, blake3::hash(bytes).as_bytes()).await.unwrap();
}

/// Whether the store still has the multipart upload `id` to `key` open: a part can be sent
/// to it only then.
async fn still_open(key: &str, id: &str) -> bool {
    use object_store::multipart::MultipartStore;
    let g = xfer_tests::cluster::garage().s3();
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&g.bucket)
        .with_region(&g.region)
        .with_endpoint(&g.endpoint)
        .with_allow_http(true)
        .with_access_key_id(&g.access_key_id)
        .with_secret_access_key(&g.secret_access_key)
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        })
        .build()
        .unwrap();
    s3.put_part(
        &object_store::path::Path::from(key),
        &id.to_string(),
        9,
        object_store::PutPayload::from_static(b"probe"),
    )
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_parts_downloads_byte_identical_from_any_offset() {
    let s = store("t-roundtrip").await;
    let t = s.user_tree("alice");
    let bytes = data((3 * PART + 17) as usize, 1);
    put(&s, "alice", "big.bin", &bytes).await;
    assert_eq!(read_all(&s, "alice", "big.bin", 0).await, bytes);
    assert_eq!(
        read_all(&s, "alice", "big.bin", PART + 5).await,
        &bytes[(PART + 5) as usize..]
    );
    assert!(
        read_all(&s, "alice", "big.bin", bytes.len() as u64)
            .await
            .is_empty()
    );
    let r = t.open_read("big.bin", 0).await.unwrap();
    assert_eq!(r.size, bytes.len() as u64);
    assert_eq!(
        r.stored,
        Some(*blake3::hash(&bytes).as_bytes()),
        "multipart digest kept"
    );
    // Small and empty files: one PUT each, digest in the metadata.
    put(&s, "alice", "small", b"hello").await;
    put(&s, "alice", "empty", b"").await;
    let small = t.open_read("small", 0).await.unwrap();
    assert_eq!(small.stored, Some(*blake3::hash(b"hello").as_bytes()));
    assert_eq!(read_all(&s, "alice", "small", 0).await, b"hello");
    assert_eq!(read_all(&s, "alice", "empty", 0).await, b"");
    // The blocking reader gives the same bytes.
    let r = t.open_read("big.bin", 3).await.unwrap();
    let handle = tokio::runtime::Handle::current();
    let got = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut r.into_blocking_reader(handle), &mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert_eq!(got, &bytes[3..]);
    // Another user sees none of it.
    assert!(matches!(
        s.user_tree("bob").open_read("big.bin", 0).await,
        Err(ObjectError::Tree(StorageError::NotFound(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_mismatch_leaves_nothing_visible_and_nothing_pending() {
    let s = store("t-mismatch").await;
    let t = s.user_tree("alice");
    put(&s, "alice", "f", b"old version").await;
    let bytes = data((2 * PART + 100) as usize, 2);
    let up = t
        .begin_upload("f", bytes.len() as u64, 0, Some(resume(bytes.len() as u64)))
        .await
        .unwrap();
    // The async writer, for callers that are not on a blocking thread.
    let mut up = up;
    for piece in bytes.chunks(7_000) {
        up.write(piece).await.unwrap();
    }
    let id = up.upload_id().unwrap().to_string();
    let err = t.commit(up, &[7; 32]).await.unwrap_err();
    assert!(matches!(err, ObjectError::DigestMismatch(_)), "{err}");
    assert_eq!(read_all(&s, "alice", "f", 0).await, b"old version");
    // Nothing to resume from, and no record left: the upload was aborted on the store.
    let again = t
        .begin_upload("f", bytes.len() as u64, 0, Some(resume(bytes.len() as u64)))
        .await
        .unwrap();
    assert_eq!(again.held(), 0);
    again.discard().await;
    assert_eq!(s.partial_usage("alice").await.unwrap(), 0);
    assert!(
        !still_open(&format!("{}/alice/f", unique("t-mismatch")), &id).await,
        "aborted on the store"
    );
    // A single-PUT file with a wrong digest is not stored either.
    let up = t.begin_upload("g", 3, 0, None).await.unwrap();
    let up = feed(up, b"abc".to_vec()).await;
    assert!(matches!(
        t.commit(up, &[0; 32]).await,
        Err(ObjectError::DigestMismatch(_))
    ));
    assert!(t.stat("g").await.unwrap().is_none());
}

fn resume(up_to: u64) -> Resume {
    Resume {
        up_to,
        ttl: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_on_another_node_from_its_last_part() {
    let a = store("t-resume").await;
    let bytes = data((5 * PART + 999) as usize, 3);
    let size = bytes.len() as u64;
    {
        let t = a.user_tree("alice");
        t.mkdir("d").await.unwrap();
        let up = t
            .begin_upload("d//f", size, 0, Some(resume(size)))
            .await
            .unwrap();
        assert_eq!(up.held(), 0);
        assert!(up.resumable());
        // Two whole parts and a bit, then the connection breaks.
        let up = feed(up, bytes[..(2 * PART + 10) as usize].to_vec()).await;
        up.interrupt().await;
    }
    // Invisible meanwhile.
    assert!(a.user_tree("alice").stat("d/f").await.unwrap().is_none());
    assert_eq!(a.partial_usage("alice").await.unwrap(), 2 * PART);
    // Node B: a fresh client, the same path under another spelling.
    let b = store("t-resume").await;
    let t = b.user_tree("alice");
    let up = t
        .begin_upload("d/f", size, 0, Some(resume(size)))
        .await
        .unwrap();
    assert_eq!(up.held(), 2 * PART, "the two finished parts are offered");
    assert_eq!(
        up.held_digest(),
        Some(*blake3::hash(&bytes[..(2 * PART) as usize]).as_bytes())
    );
    // Only the missing bytes are sent.
    let up = feed(up, bytes[(2 * PART) as usize..].to_vec()).await;
    t.commit(up, blake3::hash(&bytes).as_bytes()).await.unwrap();
    assert_eq!(read_all(&a, "alice", "d/f", 0).await, bytes);
    assert_eq!(b.partial_usage("alice").await.unwrap(), 0, "record gone");
    // A client that wants to start over gets a fresh upload.
    let up = t
        .begin_upload("d/f", size, 0, Some(resume(size)))
        .await
        .unwrap();
    let up = feed(up, bytes[..(PART + 1) as usize].to_vec()).await;
    up.interrupt().await;
    let up = t
        .begin_upload("d/f", size, 0, Some(resume(0)))
        .await
        .unwrap();
    assert_eq!(up.held(), 0);
    up.discard().await;
    assert_eq!(b.partial_usage("alice").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_upload_is_not_taken_over_until_its_lease_runs_out() {
    let a = store_with_lease("t-lease", 5).await;
    let bytes = data((3 * PART) as usize, 4);
    let size = bytes.len() as u64;
    let t = a.user_tree("alice");
    let first = t
        .begin_upload("f", size, 0, Some(resume(size)))
        .await
        .unwrap();
    let first = feed(first, bytes[..(PART + 1) as usize].to_vec()).await;
    // Held and renewed by the first: another node's attempt runs apart, not resumable.
    let b = store_with_lease("t-lease", 5).await;
    let tb = b.user_tree("alice");
    let second = tb
        .begin_upload("f", size, 0, Some(resume(size)))
        .await
        .unwrap();
    assert!(second.held_elsewhere());
    assert!(!second.resumable());
    assert_eq!(second.held(), 0);
    let second = feed(second, bytes.clone()).await;
    tb.commit(second, blake3::hash(&bytes).as_bytes())
        .await
        .unwrap();
    // The first one's node dies: its claim holds until the lease runs out, then another
    // attempt resumes its finished part.
    let held_parts_at_death = {
        // Wait until its first part is recorded (the driver writes after each part).
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.partial_usage("alice").await.unwrap() < PART {
            assert!(
                Instant::now() < deadline,
                "the first part was never recorded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        PART
    };
    first.abandon();
    let early = tb
        .begin_upload("f", size, 0, Some(resume(size)))
        .await
        .unwrap();
    assert!(early.held_elsewhere(), "the dead node's lease still holds");
    early.discard().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let third = tb
        .begin_upload("f", size, 0, Some(resume(size)))
        .await
        .unwrap();
    assert!(!third.held_elsewhere());
    assert_eq!(third.held(), held_parts_at_death);
    third.discard().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_mkdir_rename_and_delete_behave_like_the_local_tree() {
    let s = store("t-tree").await;
    let t = s.user_tree("alice");
    t.mkdir("sub/deeper").await.unwrap();
    t.mkdir("sub/deeper").await.unwrap();
    put(&s, "alice", "a.txt", b"hello").await;
    put(&s, "alice", "sub/b", b"").await;
    let names = |v: Vec<xfer_proto::Entry>| -> Vec<(String, EntryKind)> {
        v.into_iter().map(|e| (e.name, e.kind)).collect()
    };
    assert_eq!(
        names(t.list("", 100).await.unwrap()),
        vec![
            ("a.txt".into(), EntryKind::File),
            ("sub".into(), EntryKind::Dir)
        ]
    );
    assert_eq!(
        names(t.list("sub", 100).await.unwrap()),
        vec![
            ("b".into(), EntryKind::File),
            ("deeper".into(), EntryKind::Dir)
        ]
    );
    assert!(
        t.list("sub/deeper", 100).await.unwrap().is_empty(),
        "marker hidden"
    );
    let one = t.list("a.txt", 100).await.unwrap();
    assert_eq!((one[0].name.as_str(), one[0].size), ("a.txt", 5));
    assert!(matches!(
        t.list("nope", 100).await,
        Err(ObjectError::Tree(StorageError::NotFound(_)))
    ));
    // A file in the way of a folder and the reverse.
    assert!(matches!(
        t.mkdir("a.txt/x").await,
        Err(ObjectError::Tree(StorageError::WrongKind(..)))
    ));
    assert!(matches!(
        t.begin_upload("sub", 1, 0, None).await,
        Err(ObjectError::Tree(StorageError::WrongKind(..)))
    ));
    assert!(matches!(
        t.begin_upload("missing/f", 1, 0, None).await,
        Err(ObjectError::Tree(StorageError::NotFound(_)))
    ));
    // Delete: a file; a folder only when empty.
    assert!(matches!(
        t.delete("sub").await,
        Err(ObjectError::Tree(StorageError::NotEmpty(_)))
    ));
    t.delete("sub/deeper").await.unwrap();
    assert!(t.stat("sub/deeper").await.unwrap().is_none());
    assert!(matches!(
        t.delete("sub/deeper").await,
        Err(ObjectError::Tree(StorageError::NotFound(_)))
    ));
    // Rename: into a folder, a file over a file, refusals as local.
    assert_eq!(t.rename("a.txt", "sub", 100).await.unwrap(), "sub/a.txt");
    assert_eq!(read_all(&s, "alice", "sub/a.txt", 0).await, b"hello");
    assert!(t.stat("a.txt").await.unwrap().is_none());
    assert!(matches!(
        t.rename("sub", "sub/inner", 100).await,
        Err(ObjectError::Tree(StorageError::WrongKind(..)))
    ));
    assert!(matches!(
        t.rename("missing", "x", 100).await,
        Err(ObjectError::Tree(StorageError::NotFound(_)))
    ));
    assert!(matches!(
        t.rename("sub/a.txt", "nowhere/x", 100).await,
        Err(ObjectError::Tree(StorageError::NotFound(_)))
    ));
    put(&s, "alice", "other", b"x").await;
    assert!(matches!(
        t.rename("sub", "other", 100).await,
        Err(ObjectError::Tree(StorageError::WrongKind(..)))
    ));
    // A big file keeps its stored digest through a rename.
    let bytes = data((2 * PART + 1) as usize, 5);
    put(&s, "alice", "sub/big", &bytes).await;
    assert_eq!(t.rename("sub/big", "big2", 100).await.unwrap(), "big2");
    let r = t.open_read("big2", 0).await.unwrap();
    assert_eq!(r.stored, Some(*blake3::hash(&bytes).as_bytes()));
    // A folder moves with everything inside it, markers included.
    t.mkdir("sub/empty").await.unwrap();
    assert_eq!(t.rename("sub", "moved", 100).await.unwrap(), "moved");
    assert!(t.stat("sub").await.unwrap().is_none());
    assert_eq!(
        names(t.list("moved", 100).await.unwrap()),
        vec![
            ("a.txt".into(), EntryKind::File),
            ("b".into(), EntryKind::File),
            ("empty".into(), EntryKind::Dir)
        ]
    );
    // Deeper than the check allows to look at: refused, nothing moved.
    t.mkdir("into").await.unwrap();
    assert!(matches!(
        t.rename("moved", "into", 2).await,
        Err(ObjectError::Tree(StorageError::TooBigToCheck { .. }))
    ));
    assert!(t.stat("moved/b").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_aborts_expired_uploads_and_spares_running_ones() {
    let s = store("t-sweep").await;
    let t = s.user_tree("alice");
    let bytes = data((3 * PART) as usize, 6);
    let size = bytes.len() as u64;
    let up = t
        .begin_upload("old", size, 0, Some(resume(size)))
        .await
        .unwrap();
    let up = feed(up, bytes[..PART as usize].to_vec()).await;
    let id = up.upload_id().unwrap().to_string();
    up.interrupt().await;
    assert!(
        still_open(&format!("{}/alice/old", unique("t-sweep")), &id).await,
        "kept for resume"
    );
    let running = t
        .begin_upload("new", size, 0, Some(resume(size)))
        .await
        .unwrap();
    assert_eq!(
        s.sweep_partials(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The running one renews its record (every lease / 3): only the interrupted one expired.
    assert_eq!(s.sweep_partials(Duration::from_secs(1)).await.unwrap(), 1);
    assert!(
        !still_open(&format!("{}/alice/old", unique("t-sweep")), &id).await,
        "aborted by the sweeper"
    );
    let again = t
        .begin_upload("old", size, 0, Some(resume(size)))
        .await
        .unwrap();
    assert_eq!(again.held(), 0, "swept: nothing to resume");
    again.discard().await;
    running.discard().await;
    assert_eq!(s.partial_usage("alice").await.unwrap(), 0);
}
