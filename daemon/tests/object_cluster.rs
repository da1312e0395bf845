//! The real `xferd` on `[storage] kind = "s3"` against the 3-node Garage cluster of
//! [`xfer_tests::cluster`] (which fails, never skips, when Garage is missing): every command
//! end to end, resume after a killed client, two daemons sharing one bucket (one of them
//! killed mid-upload and the upload resumed through the other), and a Garage node stopped
//! while an upload and a download run.
//!
//! Accounts and sessions are the store's (the first daemon puts its users file there), so a
//! token from one node works on the other, and a logout on one is refused on the other within
//! 5 s.
//! And as a user would run it: the real `xfer` binary through HAProxy (TCP, round robin) in
//! front of two nodes, one login then a batch of commands, each on whichever node answers.
//! Each test works under a key prefix of its own in the shared bucket.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Serving, set_config, setup, stalled_upload, xfer_bin};
use xfer::conn::{Client, Hooks};
use xfer::part::Dest;
use xfer::put::{PutFile, put_batch};
use xfer_proto::EntryKind;
use xfer_tests::cluster::HaProxy;
use xfer_tests::{ClientHome, noise, tricky_bytes, write_file};

/// The smallest part size the config accepts: a file past it is a multipart upload.
const PART: u64 = 8 << 20;

/// Seconds a claim on a resume record lasts: a node that died holds its upload this long.
const LEASE_SECS: u64 = 3;

/// A daemon's config folder, on `prefix` of the test bucket.
struct Node {
    /// The folder (config, users, key, certificate, state).
    dir: PathBuf,
    /// Its config file.
    config: PathBuf,
}

/// A first node's folder: `xferd init`, users `root` and `alice`, storage on the bucket.
fn first_node(prefix: &str) -> (tempfile::TempDir, Node) {
    let (tmp, config) = setup(5);
    let s3 = xfer_tests::cluster::garage().s3();
    set_config(
        &config,
        &[
            ("kind", "\"s3\""),
            ("bucket", &format!("\"{}\"", s3.bucket)),
            ("endpoint", &format!("\"{}\"", s3.endpoint)),
            ("region", &format!("\"{}\"", s3.region)),
            ("allow_http", "true"),
            ("prefix", &format!("\"{prefix}\"")),
            ("upload_lease_secs", &LEASE_SECS.to_string()),
        ],
    );
    let dir = tmp.path().to_path_buf();
    // No `xferd user import`: the first daemon to start puts its users file in the bucket.
    (tmp, Node { dir, config })
}

/// Runs `xferd ARGS` on `node`'s config with the bucket's credentials in its environment.
fn with_bucket(node: &Node, args: &[&str]) -> String {
    let s3 = xfer_tests::cluster::garage().s3();
    let out = common::run_xferd(Path::new(common::XFERD), &node.config, args, "", |c| {
        c.env("AWS_ACCESS_KEY_ID", &s3.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_access_key);
    });
    assert!(
        out.status.success(),
        "xferd {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Another node of the same cluster: the same config, users file, TLS key and certificate
/// (so the client's pin holds, and tokens are signed alike), its own state folder.
fn another_node(first: &Node) -> (tempfile::TempDir, Node) {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["xferd.toml", "users.toml", "cert.pem", "key.pem"] {
        std::fs::copy(first.dir.join(f), tmp.path().join(f)).unwrap();
    }
    let dir = tmp.path().to_path_buf();
    let config = dir.join("xferd.toml");
    (tmp, Node { dir, config })
}

/// `xferd serve` on `node`, with the bucket's credentials in its environment.
fn serve(node: &Node) -> Serving {
    let s3 = xfer_tests::cluster::garage().s3();
    let (id, secret) = (
        PathBuf::from(&s3.access_key_id),
        PathBuf::from(&s3.secret_access_key),
    );
    Serving::start_with_env(
        &node.config,
        &[
            ("AWS_ACCESS_KEY_ID", id.as_path()),
            ("AWS_SECRET_ACCESS_KEY", secret.as_path()),
        ],
    )
}

fn data(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect()
}

/// Writes `contents` to `dir/name` and returns its path.
fn local_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// Downloads `remote` into `dir` and returns its bytes.
async fn fetch(c: &mut Client, dir: &Path, remote: &str) -> Vec<u8> {
    let name = format!("got-{}", remote.replace('/', "_"));
    let _ = std::fs::remove_file(dir.join(&name));
    let to = Dest::new(dir, &name).unwrap();
    c.download(remote, &to, true, Hooks::default())
        .await
        .unwrap_or_else(|e| panic!("downloading {remote}: {e}"));
    std::fs::read(dir.join(&name)).unwrap()
}

async fn names(c: &mut Client, dir: &str) -> Vec<String> {
    let mut n: Vec<String> = c
        .list(dir)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_on_the_object_store() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-commands");
    let (_tmp, node) = first_node(&prefix);
    let serving = serve(&node);
    let mut c = serving.client("alice", "alice-pw").await;
    let work = tempfile::tempdir().unwrap();

    c.mkdir("docs/deep").await.unwrap();
    // Small files go as one batch of Puts, each stored in one PUT at the commit.
    let smalls: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("docs/s{i}"), data(1000 * i + 1, i as u8)))
        .collect();
    let files: Vec<PutFile> = smalls
        .iter()
        .map(|(remote, bytes)| PutFile {
            local: local_file(work.path(), &remote.replace('/', "_"), bytes),
            remote: remote.clone(),
        })
        .collect();
    let committed = put_batch(&mut c, &files, &mut |i, r| {
        r.unwrap_or_else(|e| panic!("put {i}: {e}"));
    })
    .await
    .unwrap();
    assert_eq!(committed, 5);
    // A big one as a multipart upload (three parts), and an empty one.
    let big = data(2 * PART + 12_345, 7);
    let local = local_file(work.path(), "big", &big);
    let sent = c.upload(&local, "docs/big", true, Hooks::default()).await;
    assert_eq!(sent.unwrap().resumed_from, 0);
    let empty = local_file(work.path(), "empty", b"");
    c.upload(&empty, "empty", true, Hooks::default())
        .await
        .unwrap();

    let listed = c.list("docs").await.unwrap();
    let big_entry = listed.iter().find(|e| e.name == "big").unwrap();
    assert_eq!(
        (big_entry.kind, big_entry.size),
        (EntryKind::File, big.len() as u64)
    );
    assert!(
        listed
            .iter()
            .any(|e| e.name == "deep" && e.kind == EntryKind::Dir)
    );
    assert_eq!(listed.len(), 7, "{listed:?}");
    for (remote, bytes) in &smalls {
        assert!(
            fetch(&mut c, work.path(), remote).await == *bytes,
            "{remote}"
        );
    }
    assert!(fetch(&mut c, work.path(), "docs/big").await == big);
    assert!(fetch(&mut c, work.path(), "empty").await.is_empty());

    // Rename a file, then a folder (copy + delete of each object under it).
    c.rename("docs/s0", "docs/deep/moved").await.unwrap();
    c.rename("docs", "papers").await.unwrap();
    assert_eq!(names(&mut c, "").await, vec!["empty", "papers"]);
    assert!(fetch(&mut c, work.path(), "papers/deep/moved").await == smalls[0].1);
    assert!(fetch(&mut c, work.path(), "papers/big").await == big);
    // Delete: a folder only when empty.
    assert!(c.delete("papers/deep").await.is_err());
    c.delete("papers/deep/moved").await.unwrap();
    c.delete("papers/deep").await.unwrap();
    c.delete("empty").await.unwrap();
    assert_eq!(
        names(&mut c, "papers").await,
        vec!["big", "s1", "s2", "s3", "s4"]
    );
    let gone = Dest::new(work.path(), "gone").unwrap();
    assert!(
        c.download("empty", &gone, true, Hooks::default())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_after_a_killed_client() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-resume");
    let (_tmp, node) = first_node(&prefix);
    let serving = serve(&node);
    let work = tempfile::tempdir().unwrap();
    // The first attempt sends 0xAB bytes (see `stalled_upload`): the file starts with them.
    let sent_first = 2 * PART + 4096;
    let mut contents = vec![0xAB; sent_first as usize];
    contents.extend(data(PART + 777, 3));
    let size = contents.len() as u64;
    let conn = stalled_upload(&serving, "f", size, sent_first as usize).await;
    // Wait until the parts it sent are stored, then kill the client.
    let store = object_store(&prefix).await;
    wait_until("two parts stored", Duration::from_secs(60), || async {
        store.partial_usage("alice").await.unwrap() >= 2 * PART
    })
    .await;
    drop(conn);

    let mut c = serving.client("alice", "alice-pw").await;
    let local = local_file(work.path(), "f", &contents);
    let done = c.upload(&local, "f", true, Hooks::default()).await.unwrap();
    // Only the missing bytes travelled: the whole parts stored before were kept.
    assert_eq!(done.resumed_from, 2 * PART);
    assert_eq!(done.digest, *blake3::hash(&contents).as_bytes());
    assert!(fetch(&mut c, work.path(), "f").await == contents);
    assert_eq!(store.partial_usage("alice").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_serve_the_same_files() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-two-nodes");
    let (_ta, a) = first_node(&prefix);
    let (_tb, b) = another_node(&a);
    let (node_a, node_b) = (serve(&a), serve(&b));
    assert_eq!(node_a.fingerprint, node_b.fingerprint);
    let work = tempfile::tempdir().unwrap();
    // One login, on A; B takes its token.
    let mut on_a = Client::connect(&node_a.addr, node_a.fingerprint, None)
        .await
        .unwrap();
    let (token, _) = on_a.login("alice", "alice-pw").await.unwrap();
    let mut on_b = Client::connect(&node_b.addr, node_b.fingerprint, None)
        .await
        .unwrap();
    on_b.authenticate(&token).await.unwrap();
    let big = data(PART + 99, 5);
    let small = data(300, 6);
    on_a.upload(
        &local_file(work.path(), "big", &big),
        "big",
        true,
        Hooks::default(),
    )
    .await
    .unwrap();
    on_a.upload(
        &local_file(work.path(), "small", &small),
        "small",
        true,
        Hooks::default(),
    )
    .await
    .unwrap();
    assert_eq!(names(&mut on_b, "").await, vec!["big", "small"]);
    assert!(fetch(&mut on_b, work.path(), "big").await == big);
    assert!(fetch(&mut on_b, work.path(), "small").await == small);
    // And back: a change through B is what A sees.
    on_b.rename("small", "renamed").await.unwrap();
    assert_eq!(names(&mut on_a, "").await, vec!["big", "renamed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_node_ends_the_session_on_the_other_within_5_s() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-revoke");
    let (_ta, a) = first_node(&prefix);
    let (_tb, b) = another_node(&a);
    let (node_a, node_b) = (serve(&a), serve(&b));
    let mut on_a = Client::connect(&node_a.addr, node_a.fingerprint, None)
        .await
        .unwrap();
    let (token, _) = on_a.login("alice", "alice-pw").await.unwrap();
    let b_accepts = || async {
        let mut c = Client::connect(&node_b.addr, node_b.fingerprint, None)
            .await
            .unwrap();
        c.authenticate(&token).await.is_ok()
    };
    assert!(b_accepts().await, "B refused a token A issued");
    let logged_out = Instant::now();
    on_a.logout().await.unwrap();
    wait_until("B to refuse the token", Duration::from_secs(5), || async {
        !b_accepts().await
    })
    .await;
    eprintln!(
        "refused on B {:?} after the logout on A",
        logged_out.elapsed()
    );
    // A password change through the store ends every session too, on every node.
    let (token, _) = Client::connect(&node_b.addr, node_b.fingerprint, None)
        .await
        .unwrap()
        .login("alice", "alice-pw")
        .await
        .unwrap();
    let mut on_a = Client::connect(&node_a.addr, node_a.fingerprint, None)
        .await
        .unwrap();
    on_a.authenticate(&token).await.unwrap();
    with_bucket(&a, &["user", "del", "alice"]);
    wait_until(
        "A to refuse a deleted account's token",
        Duration::from_secs(5),
        || async {
            let mut c = Client::connect(&node_a.addr, node_a.fingerprint, None)
                .await
                .unwrap();
            c.authenticate(&token).await.is_err()
        },
    )
    .await;
}

/// Key login with `[storage] kind = "s3"`: `xferd user key add` and `del` edit the store's
/// users object (the same path as `user passwd`), and every node follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_through_the_store_logs_in_on_every_node_and_its_deletion_ends_sessions() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-keys");
    let (ta, a) = first_node(&prefix);
    // This test polls with key logins that fail until a node has read the change: none of
    // them may make the source a penalised one.
    set_config(&a.config, &[("per_failure_secs", "0")]);
    let (_tb, b) = another_node(&a);
    // The first node puts its users file in the bucket; the other reads it from there.
    let node_a = serve(&a);
    let node_b = serve(&b);
    let file = ta.path().join("id");
    let (_, line, id) = xfer::keys::keygen(&file, false).unwrap();
    let key = xfer::keys::load(&file, false).unwrap();
    let out = with_bucket(&a, &["user", "key", "add", "alice", &line]);
    assert!(out.contains(&id), "{out}");
    assert!(with_bucket(&b, &["user", "key", "list", "alice"]).starts_with(&id));
    let key_login = |node: &Serving| {
        let (addr, fp) = (node.addr.clone(), node.fingerprint);
        let key = &key;
        async move {
            let mut c = Client::connect(&addr, fp, None).await.unwrap();
            c.key_login("alice", key).await.ok().map(|(token, _)| token)
        }
    };
    let start = Instant::now();
    let token = loop {
        if let Some(token) = key_login(&node_b).await {
            break token;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "B never took the key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_until("A to take the key", Duration::from_secs(5), || async {
        key_login(&node_a).await.is_some()
    })
    .await;
    with_bucket(&b, &["user", "key", "del", "alice", &id]);
    wait_until(
        "A to refuse a session of a deleted key's user",
        Duration::from_secs(5),
        || async {
            let mut c = Client::connect(&node_a.addr, node_a.fingerprint, None)
                .await
                .unwrap();
            c.authenticate(&token).await.is_err()
        },
    )
    .await;
    wait_until("B to refuse the key", Duration::from_secs(5), || async {
        key_login(&node_b).await.is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_node_killed_midway_resumes_on_another() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-takeover");
    let (_ta, a) = first_node(&prefix);
    let (_tb, b) = another_node(&a);
    let mut node_a = serve(&a);
    let node_b = serve(&b);
    let work = tempfile::tempdir().unwrap();
    let sent_first = 2 * PART + 100;
    let mut contents = vec![0xAB; sent_first as usize];
    contents.extend(data(PART / 2, 9));
    let size = contents.len() as u64;
    let _conn = stalled_upload(&node_a, "big", size, sent_first as usize).await;
    let store = object_store(&prefix).await;
    wait_until(
        "two parts stored through A",
        Duration::from_secs(60),
        || async { store.partial_usage("alice").await.unwrap() >= 2 * PART },
    )
    .await;
    // kill -9: A writes nothing more; its claim on the upload runs out after the lease.
    node_a.child.kill().unwrap();
    node_a.wait_exit(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 1)).await;

    let mut on_b = node_b.client("alice", "alice-pw").await;
    let local = local_file(work.path(), "big", &contents);
    let done = on_b
        .upload(&local, "big", true, Hooks::default())
        .await
        .unwrap();
    assert_eq!(
        done.resumed_from,
        2 * PART,
        "only the missing bytes are sent"
    );
    assert_eq!(done.digest, *blake3::hash(&contents).as_bytes());
    assert!(fetch(&mut on_b, work.path(), "big").await == contents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_go_on_while_a_garage_node_is_down() {
    let garage = xfer_tests::cluster::garage();
    let prefix = xfer_tests::cluster::unique_prefix("e2e-quorum");
    let (_tmp, node) = first_node(&prefix);
    let serving = serve(&node);
    let work = tempfile::tempdir().unwrap();
    let contents = data(3 * PART + 5, 11);
    let local = local_file(work.path(), "f", &contents);

    // The node stops once the upload is under way.
    let progress = Arc::new(AtomicU64::new(0));
    let seen = progress.clone();
    let mut c = serving.client("alice", "alice-pw").await;
    let upload = tokio::spawn(async move {
        let hooks = Hooks {
            on_progress: Box::new(move |n| seen.store(n, Ordering::Relaxed)),
            ..Hooks::default()
        };
        let r = c.upload(&local, "f", true, hooks).await.map(|_| ());
        (c, r)
    });
    wait_until("the upload under way", Duration::from_secs(60), || async {
        progress.load(Ordering::Relaxed) >= PART
    })
    .await;
    let down = tokio::task::block_in_place(|| garage.stop_node(3));
    let (mut c, uploaded) = upload.await.unwrap();
    uploaded.expect("the upload succeeds with one Garage node down");
    // A download while it is still down reads the same bytes.
    assert!(fetch(&mut c, work.path(), "f").await == contents);
    tokio::task::block_in_place(|| down.start());
    assert!(fetch(&mut c, work.path(), "f").await == contents);
}

/// Every file under `dir` by relative path, with its bytes, and every folder.
fn tree_of(dir: &Path) -> (BTreeMap<String, Vec<u8>>, Vec<String>) {
    let (mut files, mut dirs) = (BTreeMap::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                dirs.push(rel);
                stack.push(p);
            } else {
                files.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    dirs.sort();
    (files, dirs)
}

/// The `name`s of `xfer list [DIR] --json`, sorted.
fn listed(home: &ClientHome, dir: &str) -> Vec<String> {
    let mut args = vec!["list", "--json"];
    if !dir.is_empty() {
        args.insert(1, dir);
    }
    let out = home.run(&args).expect_code(0).stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut n: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {out}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// The audit log of `node` as (op, result) pairs.
fn audited(node: &Node) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(node.dir.join("state/audit.log")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (field("op"), field("result"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_xfer_binary_through_haproxy_round_robin_over_two_nodes() {
    let prefix = xfer_tests::cluster::unique_prefix("e2e-haproxy");
    let (_ta, a) = first_node(&prefix);
    let (_tb, b) = another_node(&a);
    let (node_a, node_b) = (serve(&a), serve(&b));
    let backend = |s: &Serving| -> std::net::SocketAddr { s.addr.to_string().parse().unwrap() };
    let lb = HaProxy::start(&[backend(&node_a), backend(&node_b)]);
    let home = ClientHome::new(xfer_bin());
    let fp = node_a.fingerprint.to_string();

    // One login, through the balancer: one pin and one token, whichever node answers later.
    let target = format!("alice@{}", lb.addr);
    home.run_with_stdin(
        &["login", &target, "--password-stdin", "--fingerprint", &fp],
        "alice-pw\n",
    )
    .expect_code(0);
    // Each command below is a new connection: round robin alternates the nodes.
    home.run(&["whoami"]).expect_code(0);

    // A folder: every byte value, noise past one part (a multipart upload), an empty file, an
    // empty folder, nesting.
    write_file(&home.path("tree/a.txt"), b"a");
    write_file(&home.path("tree/sub/tricky"), &tricky_bytes());
    write_file(
        &home.path("tree/sub/noise"),
        &noise(PART as usize + 4321, 1),
    );
    write_file(&home.path("tree/sub/deeper/empty"), b"");
    std::fs::create_dir_all(home.path("tree/hollow")).unwrap();
    home.run(&["upload", "-r", "tree"]).expect_code(0);
    assert_eq!(listed(&home, ""), vec!["tree"]);
    assert_eq!(listed(&home, "tree"), vec!["a.txt", "hollow", "sub"]);
    assert_eq!(listed(&home, "tree/sub"), vec!["deeper", "noise", "tricky"]);
    std::fs::create_dir(home.path("back")).unwrap();
    home.run(&["download", "-r", "tree", "--to", "back"])
        .expect_code(0);
    assert!(
        tree_of(&home.path("back/tree")) == tree_of(&home.path("tree")),
        "the folder came back different"
    );

    // Tree changes, each checked through the next command (on the other node).
    home.run(&["mkdir", "tree/made/deep"]).expect_code(0);
    home.run(&["rename", "tree/a.txt", "tree/made/a.txt"])
        .expect_code(0);
    home.run(&["rename", "tree/sub", "moved"]).expect_code(0);
    home.run(&["delete", "moved/deeper/empty", "moved/deeper"])
        .expect_code(0);
    assert_eq!(listed(&home, ""), vec!["moved", "tree"]);
    assert_eq!(listed(&home, "tree"), vec!["hollow", "made"]);
    assert_eq!(listed(&home, "tree/made"), vec!["a.txt", "deep"]);
    assert_eq!(listed(&home, "moved"), vec!["noise", "tricky"]);
    home.run(&[
        "download",
        "moved/tricky",
        "tree/made/a.txt",
        "--to",
        "back",
    ])
    .expect_code(0);
    assert!(std::fs::read(home.path("back/tricky")).unwrap() == tricky_bytes());
    assert_eq!(std::fs::read(home.path("back/a.txt")).unwrap(), b"a");
    home.run(&["download", "moved/deeper/empty"]).expect_code(5);

    // A big file, several parts, up and down.
    let big = noise(3 * PART as usize + 12_345, 2);
    write_file(&home.path("big.bin"), &big);
    home.run(&["upload", "big.bin", "--to", "moved"])
        .expect_code(0);
    home.run(&["download", "moved/big.bin", "--to", "big.back"])
        .expect_code(0);
    assert!(std::fs::read(home.path("big.back")).unwrap() == big);
    home.run(&["delete", "moved/big.bin"]).expect_code(0);
    assert_eq!(listed(&home, "moved"), vec!["noise", "tricky"]);

    // Both nodes served, and every operation audited succeeded but the one download of a
    // deleted file. A node audits just after it answered: let the last line land (the count
    // stays the same over two reads).
    let (mut on_a, mut on_b) = (audited(&a), audited(&b));
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (now_a, now_b) = (audited(&a), audited(&b));
        let settled = (now_a.len(), now_b.len()) == (on_a.len(), on_b.len());
        (on_a, on_b) = (now_a, now_b);
        if settled {
            break;
        }
    }
    eprintln!("node A audited {on_a:?}\nnode B audited {on_b:?}");
    let failed: Vec<_> = on_a
        .iter()
        .chain(&on_b)
        .filter(|(_, r)| r != "ok")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "download");
    for (node, ops) in [("A", &on_a), ("B", &on_b)] {
        for op in ["list", "download"] {
            assert!(
                ops.iter().any(|(o, r)| o == op && r == "ok"),
                "node {node} served no {op}: {ops:?}"
            );
        }
    }
}

/// The object store the daemons of a test use, for looking at its resume records.
async fn object_store(prefix: &str) -> xferd::storage::object::ObjectStore {
    let s3 = xfer_tests::cluster::garage().s3();
    s3.open(&s3.storage(prefix)).await
}

/// Polls `done` until it holds, failing the test after `limit`.
async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
