//! End-to-end tests of quotas and the reader role through the real `xfer` binary: refusals
//! before and during an upload (exit 9, nothing saved, no partial left), racing uploads,
//! batches, the file count, delete, usage across a restart, and a reader's refusals (exit 4).

use std::process::Stdio;
use std::time::Duration;

use xfer_proto::Role;
use xfer_tests::{ClientHome, Proxy, Run, TestServer, noise, write_file};
use xferd::accounts::QuotaSetting;

fn home() -> ClientHome {
    ClientHome::new(env!("CARGO_BIN_EXE_xfer"))
}

fn logged_in(server: &TestServer, user: &str) -> ClientHome {
    let h = home();
    h.login(server, user).expect_code(0);
    h
}

/// Sets `user`'s quotas in the users file (`None`: the config's default).
fn set_quota(server: &TestServer, user: &str, bytes: Option<u64>, files: Option<u64>) {
    server.edit_users(|u| {
        u.set_quota(
            user,
            Some(bytes.map(QuotaSetting::Limit)),
            Some(files.map(QuotaSetting::Limit)),
        )
        .unwrap()
    });
}

/// `xfer whoami --json` of `h`.
fn account(h: &ClientHome) -> serde_json::Value {
    let out = h.run(&["whoami", "--json"]).expect_code(0).stdout;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Bytes and number of the regular files under `user`'s folder on the server.
fn stored(server: &TestServer, user: &str) -> (u64, u64) {
    let r = xferd::quota::scan_folder(&server.user_dir(user)).unwrap();
    (r.bytes, r.files)
}

fn upload(h: &ClientHome, name: &str, len: usize, seed: u64) -> Run {
    write_file(&h.path(name), &noise(len, seed));
    h.run(&["upload", name])
}

#[test]
fn an_upload_over_the_byte_quota_is_refused_before_its_body_with_exit_9() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    set_quota(&server, "alice", Some(1000), None);
    upload(&h, "a", 600, 1).expect_code(0);
    let refused = upload(&h, "b", 600, 2).expect_code(9);
    assert!(
        refused
            .stderr
            .contains("quota exceeded: 600 B of 1000 B used"),
        "{}",
        refused.stderr
    );
    assert!(!server.user_dir("alice").join("b").exists());
    // Replacing a file counts only what it adds.
    upload(&h, "a", 900, 3).expect_code(0);
    assert_eq!(stored(&server, "alice"), (900, 1));
    let v = account(&h);
    assert_eq!(v["used_bytes"], 900);
    assert_eq!(v["used_files"], 1);
    assert_eq!(v["quota_bytes"], 1000);
    assert!(v["quota_files"].is_null());
    let text = h.run(&["whoami"]).expect_code(0).stdout;
    assert!(text.contains("used 900 B of 1000 B, 1 files"), "{text}");
    // A big file goes through `Upload`: refused all the same, before its body.
    set_quota(&server, "alice", Some(2 << 20), None);
    let big = upload(&h, "big", 3 << 20, 4).expect_code(9);
    assert!(big.stderr.contains("quota exceeded"), "{}", big.stderr);
    assert!(!server.user_dir("alice").join("big").exists());
    assert_eq!(
        server.released_partial_bytes("alice", Duration::from_secs(10)),
        0
    );
}

#[test]
fn the_file_count_is_a_quota_too_and_delete_frees_room() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    set_quota(&server, "alice", None, Some(2));
    upload(&h, "one", 10, 1).expect_code(0);
    upload(&h, "two", 10, 2).expect_code(0);
    let refused = upload(&h, "three", 10, 3).expect_code(9);
    assert!(
        refused.stderr.contains("quota exceeded: 2 of 2 files used"),
        "{}",
        refused.stderr
    );
    // A replacement adds no file.
    upload(&h, "two", 20, 4).expect_code(0);
    // A delete makes room.
    h.run(&["delete", "one"]).expect_code(0);
    upload(&h, "three", 10, 3).expect_code(0);
    assert_eq!(stored(&server, "alice"), (30, 2));
    // A rename over a file frees that file.
    h.run(&["rename", "three", "two"]).expect_code(0);
    assert_eq!(account(&h)["used_files"], 1);
    upload(&h, "four", 10, 5).expect_code(0);
    assert_eq!(account(&h)["used_bytes"], 20);
}

#[test]
fn a_batch_of_small_files_stops_at_the_quota() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    set_quota(&server, "alice", Some(1000), None);
    for i in 0..30 {
        write_file(&h.path(&format!("tree/f{i:02}")), &noise(100, i));
    }
    let run = h.run(&["upload", "-r", "tree"]).expect_code(9);
    assert!(run.stderr.contains("quota exceeded"), "{}", run.stderr);
    let (bytes, files) = stored(&server, "alice");
    assert_eq!((bytes, files), (1000, 10), "exactly what fits");
    assert_eq!(account(&h)["used_bytes"], 1000);
}

#[test]
fn racing_uploads_never_pass_the_quota_together() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    const FILE: usize = 3 << 20;
    set_quota(&server, "alice", Some(10 << 20), None);
    for i in 0..6 {
        write_file(&h.path(&format!("r{i}")), &noise(FILE, i));
    }
    let children: Vec<_> = (0..6)
        .map(|i| {
            h.command(&["upload", &format!("r{i}")])
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap_or(-1))
        .collect();
    let ok = codes.iter().filter(|&&c| c == 0).count();
    assert!(
        codes.iter().all(|&c| c == 0 || c == 9),
        "every upload is stored or refused for the quota: {codes:?}"
    );
    let (bytes, files) = stored(&server, "alice");
    assert!(
        bytes <= 10 << 20,
        "{bytes} bytes stored over a 10 MiB quota"
    );
    assert_eq!(files as usize, ok, "{codes:?}");
    assert_eq!(ok, 3, "as many as fit: {codes:?}");
    assert_eq!(
        server.released_partial_bytes("alice", Duration::from_secs(10)),
        0
    );
}

#[test]
fn a_quota_lowered_during_an_upload_stops_it_and_saves_nothing() {
    let server = TestServer::start();
    let proxy = Proxy::start(server.addr);
    let h = home();
    let target = format!("alice@{}", proxy.server());
    h.run_with_stdin(
        &[
            "login",
            &target,
            "--password-stdin",
            "--fingerprint",
            &server.fingerprint,
        ],
        "alice-pw\n",
    )
    .expect_code(0);
    write_file(&h.path("big"), &noise(8 << 20, 7));
    // The body stalls after 2 MiB: the upload is running when the quota changes.
    proxy.set_caps(2 << 20, u64::MAX);
    let child = h
        .command(&["upload", "big"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    proxy.wait_for(2 << 20, u64::MAX, Duration::from_secs(60));
    set_quota(&server, "alice", Some(1 << 20), None);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    assert!(
        stderr.contains("quota exceeded")
            && stderr.contains("during the upload of `big`; nothing was saved"),
        "{stderr}"
    );
    assert!(!server.user_dir("alice").join("big").exists());
    assert_eq!(
        server.released_partial_bytes("alice", Duration::from_secs(10)),
        0,
        "the partial is discarded"
    );
    assert_eq!(std::fs::read_dir(server.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn usage_survives_a_restart_without_a_rescan_and_is_recounted_on_demand() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    set_quota(&server, "alice", Some(1 << 20), Some(100));
    upload(&h, "a", 1000, 1).expect_code(0);
    upload(&h, "b", 500, 2).expect_code(0);
    assert_eq!(account(&h)["used_bytes"], 1500);
    let (result, dir, config_path, addr) = server.stop();
    result.unwrap();
    // A file put there behind the daemon's back: a rescan would count it, the record not.
    let config = xferd::config::Config::load(&config_path).unwrap();
    write_file(&config.root.join("alice/sneaked"), &[0; 7]);
    let server = TestServer::launch(dir, config_path, Some(addr), |_| {});
    let v = account(&h);
    assert_eq!(
        (v["used_bytes"].clone(), v["used_files"].clone()),
        (1500.into(), 2.into())
    );
    // `xferd user usage alice --rescan` counts again; the daemon takes the new count.
    let users = xferd::accounts::UsersFile::load(&config.users_file).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counted = rt
        .block_on(xferd::quota::admin_usage(&config, &users, "alice", true))
        .unwrap();
    assert_eq!((counted.used.bytes, counted.used.files), (1507, 3));
    assert_eq!(counted.text(), "used 1.5 KiB of 1 MiB, 3 of 100 files");
    let v = account(&h);
    assert_eq!(
        (v["used_bytes"].clone(), v["used_files"].clone()),
        (1507.into(), 3.into())
    );
    drop(server);
}

#[test]
fn a_reader_lists_and_downloads_and_every_write_exits_4() {
    let server = TestServer::start();
    server.edit_users(|u| u.add("carol", Role::Reader, "carol-pw").unwrap());
    let h = home();
    h.login_with(&server, "carol", "carol-pw", &[])
        .expect_code(0);
    write_file(&server.user_dir("carol").join("report.txt"), b"hello");
    let listed = h.run(&["list"]).expect_code(0).stdout;
    assert!(listed.contains("report.txt"), "{listed}");
    std::fs::create_dir(h.path("dl")).unwrap();
    h.run(&["download", "report.txt", "--to", "dl"])
        .expect_code(0);
    assert_eq!(std::fs::read(h.path("dl/report.txt")).unwrap(), b"hello");
    let who = h.run(&["whoami"]).expect_code(0).stdout;
    assert!(who.contains("carol (reader)"), "{who}");
    write_file(&h.path("up.txt"), b"x");
    write_file(&h.path("tree/a"), b"x");
    for args in [
        &["upload", "up.txt"][..],
        &["upload", "-r", "tree"],
        &["delete", "report.txt"],
        &["rename", "report.txt", "other.txt"],
        &["mkdir", "new"],
    ] {
        let run = h.run(args).expect_code(4);
        assert!(
            run.stderr.contains("this needs the user role"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert_eq!(stored(&server, "carol"), (5, 1), "nothing changed");
    assert!(!server.user_dir("carol").join("new").exists());
}
