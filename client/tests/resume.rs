//! Resumed transfers through a counting, stalling TCP relay: a killed upload or download, a
//! daemon restart, a changed file and an expired partial, each measured in the bytes that
//! really crossed the wire the second time.
//!
//! `XFER_RESUME_MIB` sets the size of the interrupted files (default 24 MiB); the tests print
//! `FIGURES` lines (run with `--nocapture`).

use std::process::{Child, Stdio};
use std::time::Duration;

use xfer_tests::{ClientHome, Proxy, TestServer, noise, password_of, write_file};

const LONG: Duration = Duration::from_secs(60);

fn size() -> u64 {
    std::env::var("XFER_RESUME_MIB")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(24)
        << 20
}

/// A client home logged in as `user` through `proxy`.
fn via(proxy: &Proxy, server: &TestServer, user: &str) -> ClientHome {
    let h = ClientHome::new(env!("CARGO_BIN_EXE_xfer"));
    let target = format!("{user}@{}", proxy.server());
    h.run_with_stdin(
        &[
            "login",
            &target,
            "--password-stdin",
            "--fingerprint",
            &server.fingerprint,
        ],
        &format!("{}\n", password_of(user)),
    )
    .expect_code(0);
    h
}

/// `server` behind a new counting proxy, and a client home logged in as alice through it.
fn relayed(server: TestServer) -> (TestServer, Proxy, ClientHome) {
    let proxy = Proxy::start(server.addr);
    let h = via(&proxy, &server, "alice");
    (server, proxy, h)
}

/// Starts `xfer ARGS` and returns once the proxy has stalled it at `up`/`down` bytes.
fn stalled(h: &ClientHome, proxy: &Proxy, args: &[&str], up: u64, down: u64) -> Child {
    proxy.set_caps(up, down);
    let child = h.command(args).stdin(Stdio::null()).spawn().unwrap();
    proxy.wait_for(up, down, LONG);
    // Let the capped bytes reach the other end's file before anything else happens.
    std::thread::sleep(Duration::from_millis(200));
    child
}

/// Kills a stalled client with SIGKILL and lifts the caps for the next connection.
fn kill(mut child: Child, proxy: &Proxy) {
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.set_caps(u64::MAX, u64::MAX);
}

/// Starts `xfer ARGS`, waits until the proxy has stalled it at `up`/`down` bytes, kills it
/// with SIGKILL, and lifts the caps for the next connection.
fn kill_when_stalled(h: &ClientHome, proxy: &Proxy, args: &[&str], up: u64, down: u64) {
    kill(stalled(h, proxy, args, up, down), proxy);
}

/// Downloads `remote` into a new folder `dl` and kills the client after `cut` bytes came
/// through; returns the folder.
fn interrupted_download(h: &ClientHome, proxy: &Proxy, remote: &str, cut: u64) -> String {
    std::fs::create_dir(h.path("dl")).unwrap();
    let dl = h.path("dl").to_str().unwrap().to_string();
    kill_when_stalled(h, proxy, &["download", remote, "--to", &dl], u64::MAX, cut);
    dl
}

/// Runs `xfer ARGS --json`, which must succeed, and returns its transfer summary.
fn summary(h: &ClientHome, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let stdout = h.run(&args).expect_code(0).stdout;
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Bytes sent must be the missing part plus protocol and TLS overhead (records, handshake,
/// frames): never the whole file again.
fn assert_only_missing_sent(sent: u64, size: u64, held: u64) {
    let missing = size - held;
    assert!(sent >= missing, "sent {sent} < missing {missing}");
    assert!(
        sent <= missing + missing / 100 + (64 << 10),
        "sent {sent} bytes for {missing} missing of {size}"
    );
}

#[test]
fn a_killed_upload_resumes_sending_only_the_missing_bytes() {
    let (server, proxy, h) = relayed(TestServer::start());
    write_file(&h.path("big"), b"old version");
    h.run(&["upload", "big"]).expect_code(0);
    let size = size();
    let data = noise(size as usize, 7);
    write_file(&h.path("big"), &data);
    let mut held = 0;
    // Killed twice, each time after about a quarter of the file: the second attempt resumes
    // from the first, and about half is held at the end.
    for round in 1..=2u64 {
        kill_when_stalled(&h, &proxy, &["upload", "big"], size / 4, u64::MAX);
        assert_eq!(
            std::fs::read(server.user_dir("alice").join("big")).unwrap(),
            b"old version",
            "round {round}: the old version is untouched"
        );
        let names: Vec<_> = std::fs::read_dir(server.user_dir("alice"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["big"], "nothing partial is visible");
        let now = server.released_partial_bytes("alice", LONG);
        // Each attempt adds at most what its connection carried.
        assert!(now > held && now <= held + size / 4, "round {round}: {now}");
        held = now;
    }
    let v = summary(&h, &["upload", "big"]);
    let (sent, _) = proxy.last_counts();
    assert_eq!(v["files"][0]["resumed_from"], held, "{v}");
    assert_eq!(v["files"][0]["sent"], size - held, "{v}");
    assert_only_missing_sent(sent, size, held);
    assert!(std::fs::read(server.user_dir("alice").join("big")).unwrap() == data);
    assert_eq!(server.released_partial_bytes("alice", LONG), 0);
    eprintln!(
        "FIGURES resume upload: {size} bytes, {held} kept after kill -9; the resumed run sent {sent} bytes on the wire ({:.2}% of the file)",
        sent as f64 * 100.0 / size as f64
    );
    // Without --json the line says so too.
    kill_when_stalled(&h, &proxy, &["upload", "big"], size / 2, u64::MAX);
    // As in the rounds above: once the daemon has let go of the partial (on a loaded machine
    // it can take longer than a retry waits for a holder, and the retry then starts afresh).
    assert!(server.released_partial_bytes("alice", LONG) > 0);
    let out = h.run(&["upload", "big"]).expect_code(0);
    assert!(out.stderr.contains("resumed at"), "{}", out.stderr);
}

#[test]
fn a_killed_download_resumes_into_its_part_file() {
    let (_server, proxy, h) = relayed(TestServer::start());
    let size = size();
    let data = noise(size as usize, 9);
    write_file(&h.path("big"), &data);
    h.run(&["upload", "big"]).expect_code(0);
    let dl = interrupted_download(&h, &proxy, "big", size / 2);
    let dl = dl.as_str();
    let part = h.path("dl/big.part");
    let held = std::fs::metadata(&part).expect("a .part is left").len();
    assert!(held > 0 && held <= size / 2, "{held}");
    assert!(!h.path("dl/big").exists(), "nothing under the final name");
    let v = summary(&h, &["download", "big", "--to", dl]);
    let (_, received) = proxy.last_counts();
    assert_eq!(v["files"][0]["resumed_from"], held, "{v}");
    assert_only_missing_sent(received, size, held);
    assert!(std::fs::read(h.path("dl/big")).unwrap() == data);
    assert!(!part.exists());
    eprintln!(
        "FIGURES resume download: {size} bytes, {held} kept in big.part after kill -9; the resumed run received {received} bytes on the wire ({:.2}% of the file)",
        received as f64 * 100.0 / size as f64
    );
}

#[test]
fn a_changed_file_or_no_resume_starts_over_cleanly() {
    let (server, proxy, h) = relayed(TestServer::start());
    let size = 4u64 << 20;
    let mut data = noise(size as usize, 1);
    write_file(&h.path("f"), &data);

    // Upload: the local file changes (same size) after an interruption.
    kill_when_stalled(&h, &proxy, &["upload", "f"], size / 2, u64::MAX);
    assert!(server.released_partial_bytes("alice", LONG) > 0);
    data[10] ^= 0xff;
    write_file(&h.path("f"), &data);
    let v = summary(&h, &["upload", "f"]);
    assert_eq!(v["files"][0]["resumed_from"], 0, "{v}");
    assert!(proxy.last_counts().0 >= size);
    assert!(std::fs::read(server.user_dir("alice").join("f")).unwrap() == data);

    // --no-resume sends everything even when the server holds a matching prefix.
    kill_when_stalled(&h, &proxy, &["upload", "f"], size / 2, u64::MAX);
    assert!(server.released_partial_bytes("alice", LONG) > 0);
    let v = summary(&h, &["upload", "f", "--no-resume"]);
    assert_eq!(v["files"][0]["resumed_from"], 0, "{v}");

    // Download: the remote file changes after an interruption.
    let dl = interrupted_download(&h, &proxy, "f", size / 2);
    let dl = dl.as_str();
    assert!(std::fs::metadata(h.path("dl/f.part")).unwrap().len() > 0);
    let newer = noise(size as usize + 5, 2);
    write_file(&h.path("f"), &newer);
    h.run(&["upload", "f"]).expect_code(0);
    let v = summary(&h, &["download", "f", "--to", dl]);
    assert_eq!(v["files"][0]["resumed_from"], 0, "{v}");
    assert!(
        std::fs::read(h.path("dl/f")).unwrap() == newer,
        "no mix of versions"
    );
    assert!(!h.path("dl/f.part").exists());
}

#[test]
fn an_upload_resumes_across_a_daemon_restart() {
    let (server, proxy, h) = relayed(TestServer::start_with(|c| c.limits.shutdown_grace_secs = 1));
    let size = size();
    let data = noise(size as usize, 3);
    write_file(&h.path("big"), &data);
    // The client stays alive and stalled while the daemon stops: the grace period ends,
    // the transfer is aborted and its data kept.
    let child = stalled(&h, &proxy, &["upload", "big"], size / 2, u64::MAX);
    let (result, dir, config, addr) = server.stop();
    result.unwrap();
    kill(child, &proxy);
    let server = TestServer::launch(dir, config, Some(addr), |c| {
        c.limits.shutdown_grace_secs = 1
    });
    let held = server.released_partial_bytes("alice", LONG);
    assert!(held > 0);
    let v = summary(&h, &["upload", "big"]);
    assert_eq!(v["files"][0]["resumed_from"], held, "{v}");
    assert_only_missing_sent(proxy.last_counts().0, size, held);
    assert!(std::fs::read(server.user_dir("alice").join("big")).unwrap() == data);
}

#[test]
fn expired_partial_uploads_are_deleted() {
    let (server, proxy, h) = relayed(TestServer::start_with(|c| {
        c.limits.partial_upload_ttl_secs = 1
    }));
    let size = 4u64 << 20;
    write_file(&h.path("f"), &noise(size as usize, 4));
    kill_when_stalled(&h, &proxy, &["upload", "f"], size / 2, u64::MAX);
    let dir = server
        .config()
        .root
        .join(xferd::storage::local::partial::PARTIAL_DIR)
        .join("alice");
    let start = std::time::Instant::now();
    while std::fs::read_dir(&dir).unwrap().count() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "not swept");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = summary(&h, &["upload", "f"]);
    assert_eq!(v["files"][0]["resumed_from"], 0, "{v}");
}

#[test]
fn a_retry_takes_over_from_an_upload_whose_link_went_silent() {
    let (server, proxy, h) = relayed(TestServer::start());
    let size = 8u64 << 20;
    let data = noise(size as usize, 8);
    write_file(&h.path("f"), &data);
    // The server never hears that this client died: it would wait for its 30 s timeout.
    proxy.set_freeze(true);
    kill_when_stalled(&h, &proxy, &["upload", "f"], size / 2, u64::MAX);
    proxy.set_freeze(false);
    let started = std::time::Instant::now();
    let v = summary(&h, &["upload", "f"]);
    let resumed = v["files"][0]["resumed_from"].as_u64().unwrap();
    assert!(
        resumed > 0,
        "the retry resumed from the stalled attempt's data: {v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no wait for the old connection's timeout: {:?}",
        started.elapsed()
    );
    assert!(std::fs::read(server.user_dir("alice").join("f")).unwrap() == data);
}
