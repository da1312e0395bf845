//! End-to-end tests of the real `xfer` binary against a daemon running in-process: every
//! command of the contract, its exit codes and its guarantees, as a user would run them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use xfer_tests::{ClientHome, Run, TestServer, noise, password_of, tricky_bytes, write_file};

fn home() -> ClientHome {
    ClientHome::new(env!("CARGO_BIN_EXE_xfer"))
}

/// Makes sure `script` (util-linux) can run a command on a pseudo-terminal.
fn need_script() {
    xfer_tests::require_tool("script", "bsdutils");
}

fn logged_in(server: &TestServer, user: &str) -> ClientHome {
    let h = home();
    h.login(server, user).expect_code(0);
    h
}

/// Writes `data` to the local file `name` and uploads it under the same name.
fn uploaded(h: &ClientHome, name: &str, data: &[u8]) {
    write_file(&h.path(name), data);
    h.run(&["upload", name]).expect_code(0);
}

/// Runs `xfer ARGS`, which must succeed, and parses its standard output as JSON.
fn json_of(h: &ClientHome, args: &[&str]) -> serde_json::Value {
    let out = h.run(args).expect_code(0).stdout;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `xfer login TARGET --password-stdin EXTRA...` with `password` typed on standard input.
fn login_piped(h: &ClientHome, target: &str, extra: &[&str], password: &str) -> Run {
    let mut args = vec!["login", target, "--password-stdin"];
    args.extend_from_slice(extra);
    h.run_with_stdin(&args, &format!("{password}\n"))
}

/// Permission bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `xfer ARGS` with `h`'s state folder, run by `script` on a pseudo-terminal in `h`'s folder.
fn on_a_pty(h: &ClientHome, args: &str) -> Command {
    let cmd = format!(
        "{} --config-dir {} {args}",
        h.bin.display(),
        h.config_dir().display()
    );
    let mut script = Command::new("script");
    script
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .current_dir(h.dir.path());
    script
}

#[test]
fn round_trip_keeps_every_byte_of_tricky_empty_and_oddly_named_files() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("eof and bytes.bin", tricky_bytes()),
        ("empty", Vec::new()),
        ("naïve café ü.txt", "héllo wörld\nEOF\n".as_bytes().to_vec()),
        ("big.bin", noise(3 * 1024 * 1024 + 7, 42)),
    ];
    let mut args = vec!["upload".to_string()];
    for (name, data) in &files {
        let p = h.path(&format!("src/{name}"));
        write_file(&p, data);
        args.push(p.to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.run(&args).expect_code(0);

    // The server holds exactly the bytes, under exactly the names.
    for (name, data) in &files {
        let stored = std::fs::read(server.user_dir("alice").join(name)).unwrap();
        assert_eq!(&stored, data, "{name} on the server");
    }

    std::fs::create_dir(h.path("dl")).unwrap();
    let mut args = vec!["download", "--to", "dl"];
    args.extend(files.iter().map(|(n, _)| *n));
    h.run(&args).expect_code(0);
    for (name, data) in &files {
        let got = std::fs::read(h.path(&format!("dl/{name}"))).unwrap();
        assert_eq!(&got, data, "{name} downloaded");
    }
    // No temp or part files left behind on either side.
    let leftovers: Vec<_> = std::fs::read_dir(h.path("dl"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(std::fs::read_dir(server.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn list_shows_name_size_time_and_kind_in_text_and_json() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    uploaded(&h, "a.txt", b"12345");
    h.run(&["mkdir", "photos/2026"]).expect_code(0);

    let text = h.run(&["list"]).expect_code(0).stdout;
    assert!(text.contains("a.txt") && text.contains("photos/"), "{text}");
    assert!(text.contains(" 5 "), "{text}");

    let v = json_of(&h, &["ls", "--json"]);
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    let a = arr.iter().find(|e| e["name"] == "a.txt").unwrap();
    assert_eq!(a["size"], 5);
    assert_eq!(a["kind"], "file");
    assert!(a["modified"].as_str().unwrap().starts_with("20"));
    let d = arr.iter().find(|e| e["name"] == "photos").unwrap();
    assert_eq!(d["kind"], "dir");

    let sub = h.run(&["list", "photos", "--json"]).expect_code(0).stdout;
    assert!(sub.contains("\"2026\""), "{sub}");
    h.run(&["list", "missing"]).expect_code(5);
}

#[test]
fn a_large_folder_lists_completely_across_frames() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let dir = server.user_dir("alice").join("many");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..300 {
        std::fs::write(dir.join(format!("file-{i:03}-{}", "x".repeat(200))), b"").unwrap();
    }
    let v = json_of(&h, &["ls", "many", "--json"]);
    assert_eq!(v.as_array().unwrap().len(), 300);
}

#[test]
fn upload_replaces_the_old_version_and_into_a_folder_with_to() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    write_file(&h.path("f"), b"old");
    h.run(&["put", "f"]).expect_code(0);
    write_file(&h.path("f"), b"new content");
    h.run(&["put", "f"]).expect_code(0);
    assert_eq!(
        std::fs::read(server.user_dir("alice").join("f")).unwrap(),
        b"new content"
    );
    h.run(&["mkdir", "docs"]).expect_code(0);
    h.run(&["upload", "f", "--to", "docs"]).expect_code(0);
    assert!(server.user_dir("alice").join("docs/f").exists());
    // Into a folder that does not exist: not found, and nothing created.
    h.run(&["upload", "f", "--to", "nope"]).expect_code(5);
    assert!(!server.user_dir("alice").join("nope").exists());
    // A missing local file is a local failure.
    let r = h.run(&["upload", "no-such-file"]).expect_code(1);
    assert!(r.stderr.contains("no-such-file"), "{}", r.stderr);
}

#[test]
fn delete_rename_mkdir_do_what_they_say() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let root = server.user_dir("alice");
    uploaded(&h, "a", b"A");
    h.run(&["mkdir", "d1/d2"]).expect_code(0);
    assert!(root.join("d1/d2").is_dir());
    h.run(&["mv", "a", "b"]).expect_code(0);
    assert!(!root.join("a").exists() && root.join("b").exists());
    h.run(&["rename", "b", "d1"]).expect_code(0);
    assert!(root.join("d1/b").exists());
    h.run(&["rename", "missing", "x"]).expect_code(5);
    let r = h.run(&["rm", "d1"]).expect_code(1);
    assert!(r.stderr.contains("not empty"), "{}", r.stderr);
    h.run(&["delete", "d1/b", "d1/d2"]).expect_code(0);
    h.run(&["rm", "d1"]).expect_code(0);
    assert!(!root.join("d1").exists());
    h.run(&["rm", "d1"]).expect_code(5);
    // A file where a folder is wanted.
    uploaded(&h, "f", b"x");
    h.run(&["mkdir", "f/sub"]).expect_code(1);
}

#[test]
fn users_see_only_their_own_tree() {
    let server = TestServer::start();
    let alice = logged_in(&server, "alice");
    let bob = logged_in(&server, "bob");
    uploaded(&alice, "secret.txt", b"alice only");

    let listing = bob.run(&["list", "--json"]).expect_code(0).stdout;
    assert_eq!(listing.trim(), "[]");
    bob.run(&["download", "secret.txt"]).expect_code(5);
    bob.run(&["download", "../alice/secret.txt"]).expect_code(4);
    bob.run(&["rm", "../alice/secret.txt"]).expect_code(4);
    bob.run(&["mv", "../alice/secret.txt", "mine.txt"])
        .expect_code(4);
    bob.run(&["list", "../alice"]).expect_code(4);
    assert!(server.user_dir("alice").join("secret.txt").exists());
    assert!(!bob.path("secret.txt").exists());
}

#[test]
fn traversal_and_absolute_paths_are_refused_by_every_command() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    uploaded(&h, "f", b"x");
    for bad in [
        "..",
        "../x",
        "a/../../x",
        "/etc/passwd",
        "x\\..\\y",
        "..\\x",
        "./f",
        ".",
        "a/./b",
        "tab\there",
    ] {
        let r = h.run(&["list", bad]);
        assert_eq!(r.code, 4, "list {bad}: {r:?}");
        assert_eq!(h.run(&["download", bad]).code, 4, "download {bad}");
        assert_eq!(h.run(&["rm", bad]).code, 4, "rm {bad}");
        assert_eq!(h.run(&["mkdir", bad]).code, 4, "mkdir {bad}");
        assert_eq!(h.run(&["mv", bad, "y"]).code, 4, "mv from {bad}");
        assert_eq!(h.run(&["mv", "f", bad]).code, 4, "mv to {bad}");
        assert_eq!(
            h.run(&["upload", "f", "--to", bad]).code,
            4,
            "upload --to {bad}"
        );
    }
    let long = "n".repeat(300);
    assert_eq!(h.run(&["mkdir", &long]).code, 4);
    assert_eq!(h.run(&["upload", "f", "--to", &long]).code, 4);
    // The empty path names the root, which cannot be deleted, downloaded or created.
    assert_eq!(h.run(&["rm", ""]).code, 4);
    assert_eq!(h.run(&["mkdir", ""]).code, 4);
    assert_eq!(h.run(&["mv", "", "x"]).code, 4);
    // Percent-encoding means nothing here: it is a literal name, kept inside the tree.
    h.run(&["mkdir", "%2e%2e%2f"]).expect_code(0);
    assert!(server.user_dir("alice").join("%2e%2e%2f").is_dir());
    assert!(!server.dir.path().join("x").exists());
    assert!(!server.config().root.join("x").exists());
}

#[test]
fn wrong_password_and_unknown_user_fail_alike_with_exit_3() {
    let server = TestServer::start();
    let h = home();
    let login = |user: &str, pw: &str| h.login_with(&server, user, pw, &[]);
    let wrong = login("alice", "nope").expect_code(3);
    let unknown = login("mallory", "nope").expect_code(3);
    let last = |s: &str| s.lines().last().unwrap_or_default().to_string();
    assert_eq!(last(&wrong.stderr), last(&unknown.stderr));
    assert!(wrong.stderr.contains("wrong user name or password"));
    // Nothing stored after a failed login, and the password is nowhere on disk.
    let sessions =
        std::fs::read_to_string(h.config_dir().join("sessions.toml")).unwrap_or_default();
    assert!(!sessions.contains("alice"));
    login("alice", "alice-pw").expect_code(0);
    for entry in std::fs::read_dir(h.config_dir()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("alice-pw"));
    }
}

#[test]
fn not_logged_in_says_how_to_log_in() {
    let server = TestServer::start();
    let h = home();
    let r = h.run(&["list"]).expect_code(3);
    assert!(r.stderr.contains("not logged in"), "{}", r.stderr);
    assert!(r.stderr.contains("xfer login"), "{}", r.stderr);
    let r = h
        .run(&["--server", &server.server(), "list"])
        .expect_code(3);
    assert!(
        r.stderr
            .contains(&format!("xfer login USER@{}", server.server())),
        "{}",
        r.stderr
    );
    // Without --password-stdin and without a terminal: a clear usage error.
    let r = h
        .run(&[
            "login",
            &format!("alice@{}", server.server()),
            "--fingerprint",
            &server.fingerprint,
        ])
        .expect_code(2);
    assert!(r.stderr.contains("--password-stdin"), "{}", r.stderr);
}

#[test]
fn state_files_are_private_and_hold_a_token_not_the_password() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    assert_eq!(mode(&h.config_dir()), 0o700);
    for name in ["known_servers", "sessions.toml"] {
        assert_eq!(mode(&h.config_dir().join(name)), 0o600, "{name}");
    }
    let known = std::fs::read_to_string(h.config_dir().join("known_servers")).unwrap();
    assert!(known.contains(&format!("{} {}", server.server(), server.fingerprint)));
    let sessions = std::fs::read_to_string(h.config_dir().join("sessions.toml")).unwrap();
    assert!(sessions.contains("xfer1_"));
    assert!(!sessions.contains("alice-pw"));
}

#[test]
fn whoami_and_logout_which_revokes_the_token_on_the_server() {
    let server = TestServer::start();
    let h = logged_in(&server, "root");
    let who = h.run(&["whoami"]).expect_code(0).stdout;
    assert!(
        who.contains("root") && who.contains("superuser") && who.contains(&server.server()),
        "{who}"
    );
    let v = json_of(&h, &["whoami", "--json"]);
    assert_eq!(v["user"], "root");
    assert_eq!(v["role"], "superuser");

    let saved = std::fs::read(h.config_dir().join("sessions.toml")).unwrap();
    h.run(&["logout"]).expect_code(0);
    let r = h.run(&["whoami"]).expect_code(3);
    let expected = format!(
        "xfer: error: not logged in to {0} - run `xfer login root@{0}`",
        server.server()
    );
    assert_eq!(r.stderr.trim(), expected);
    // Putting the old token back does not help: the server revoked it.
    std::fs::write(h.config_dir().join("sessions.toml"), saved).unwrap();
    let r = h.run(&["whoami"]).expect_code(3);
    assert!(r.stderr.contains("xfer login"), "{}", r.stderr);
}

#[test]
fn a_password_change_or_account_deletion_revokes_sessions() {
    let server = TestServer::start();
    let alice = logged_in(&server, "alice");
    let bob = logged_in(&server, "bob");
    alice.run(&["list"]).expect_code(0);
    server.edit_users(|u| u.set_password("alice", "new-pw").unwrap());
    alice.run(&["list"]).expect_code(3);
    bob.run(&["list"]).expect_code(0);
    server.edit_users(|u| u.remove("bob").unwrap());
    bob.run(&["list"]).expect_code(3);
    // A role change ends the session too (the old token carried the old role).
    let root = logged_in(&server, "root");
    root.run(&["whoami"]).expect_code(0);
    server.edit_users(|u| u.set_role("root", xfer_proto::Role::User).unwrap());
    root.run(&["whoami"]).expect_code(3);
}

#[test]
fn sessions_survive_a_daemon_restart() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    uploaded(&h, "f", b"persist");
    let (result, dir, config, addr) = server.stop();
    result.unwrap();
    let server = TestServer::launch(dir, config, Some(addr), |_| {});
    let r = h.run(&["list"]).expect_code(0);
    assert!(r.stdout.contains('f'));
    drop(server);
}

#[test]
fn first_contact_needs_a_fingerprint_or_accept_new() {
    let server = TestServer::start();
    let h = home();
    let target = format!("alice@{}", server.server());
    // No terminal, no flag: refused before the password is sent.
    let r = login_piped(&h, &target, &[], "alice-pw").expect_code(6);
    assert!(r.stderr.contains(&server.fingerprint), "{}", r.stderr);
    assert!(r.stderr.contains("--accept-new"), "{}", r.stderr);
    // A wrong fingerprint: refused, nothing pinned.
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let r = login_piped(&h, &target, &["--fingerprint", wrong], "alice-pw").expect_code(6);
    assert!(
        r.stderr.contains(wrong) && r.stderr.contains(&server.fingerprint),
        "{}",
        r.stderr
    );
    let known = std::fs::read_to_string(h.config_dir().join("known_servers")).unwrap_or_default();
    assert!(!known.contains(&server.server()));
    // A malformed fingerprint is a usage error.
    login_piped(&h, &target, &["--fingerprint", "SHA256:nope"], "alice-pw").expect_code(2);
    // --accept-new pins it.
    login_piped(&h, &target, &["--accept-new"], "alice-pw").expect_code(0);
    let known = std::fs::read_to_string(h.config_dir().join("known_servers")).unwrap();
    assert!(known.contains(&server.fingerprint));
}

#[test]
fn a_changed_server_key_is_refused_before_any_password_is_sent() {
    let mut server = TestServer::start();
    let h = logged_in(&server, "alice");
    let old = server.fingerprint.clone();
    let new = server.rotate_key();
    assert_ne!(old, new);

    let r = h.run(&["list"]).expect_code(6);
    assert!(r.stderr.contains("HAS CHANGED"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&old) && r.stderr.contains(&new),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("xfer forget {}", server.server())),
        "{}",
        r.stderr
    );

    // Logging in again is refused too, even with --accept-new, and the password never leaves.
    let target = format!("alice@{}", server.server());
    login_piped(&h, &target, &["--accept-new"], "alice-pw").expect_code(6);
    let log_users_before =
        std::fs::read_to_string(server.config().state_dir.join("sessions.jsonl")).unwrap();
    login_piped(&h, &target, &["--fingerprint", &new], "alice-pw").expect_code(6);
    let log_users_after =
        std::fs::read_to_string(server.config().state_dir.join("sessions.jsonl")).unwrap();
    assert_eq!(
        log_users_before, log_users_after,
        "no login reached the server"
    );

    // After a deliberate `forget`, the new key can be pinned.
    h.run(&["forget", &server.server()]).expect_code(0);
    h.login(&server, "alice").expect_code(0);
    h.run(&["list"]).expect_code(0);
}

#[test]
fn only_a_superuser_with_the_right_password_can_shut_down() {
    let mut server = TestServer::start();
    let alice = logged_in(&server, "alice");
    let root = logged_in(&server, "root");
    let r = alice
        .run_with_stdin(&["shutdown", "--password-stdin"], "alice-pw\n")
        .expect_code(4);
    assert!(r.stderr.contains("superuser"), "{}", r.stderr);
    root.run_with_stdin(&["shutdown", "--password-stdin"], "wrong\n")
        .expect_code(3);
    assert!(server.is_running());
    alice.run(&["list"]).expect_code(0);

    root.run_with_stdin(&["shutdown", "--password-stdin"], "root-pw\n")
        .expect_code(0);
    let result = server
        .wait(Duration::from_secs(5))
        .expect("daemon stopped after shutdown");
    result.unwrap();
    // The daemon is gone: connecting now fails with "cannot reach".
    alice.run(&["list"]).expect_code(7);
}

#[test]
fn recursive_upload_and_download_keep_the_tree_and_empty_folders() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    write_file(&h.path("tree/a.txt"), b"a");
    write_file(&h.path("tree/sub/b.bin"), &tricky_bytes());
    write_file(&h.path("tree/sub/deeper/c"), b"");
    std::fs::create_dir_all(h.path("tree/empty")).unwrap();
    h.run(&["upload", "tree"]).expect_code(1);
    h.run(&["upload", "-r", "tree"]).expect_code(0);
    let root = server.user_dir("alice");
    assert!(root.join("tree/empty").is_dir());
    assert_eq!(
        std::fs::read(root.join("tree/sub/b.bin")).unwrap(),
        tricky_bytes()
    );

    std::fs::create_dir(h.path("back")).unwrap();
    h.run(&["download", "-r", "tree", "--to", "back"])
        .expect_code(0);
    assert!(h.path("back/tree/empty").is_dir());
    assert_eq!(std::fs::read(h.path("back/tree/a.txt")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(h.path("back/tree/sub/b.bin")).unwrap(),
        tricky_bytes()
    );
    assert_eq!(
        std::fs::read(h.path("back/tree/sub/deeper/c")).unwrap(),
        b""
    );
}

/// Every file under `dir` (relative path and content), and whether any `.part` is there.
fn files_under(dir: &Path) -> (std::collections::BTreeMap<String, Vec<u8>>, Vec<String>) {
    let mut files = std::collections::BTreeMap::new();
    let mut parts = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if rel.ends_with(".part") || rel.contains(".xfer-part") {
                parts.push(rel);
            } else {
                files.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    (files, parts)
}

#[test]
fn a_tree_of_many_small_files_downloads_byte_identical_over_batches() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let root = server.user_dir("alice").join("many");
    // More files than one group commit holds, nested, and of every kind of size: empty,
    // tiny, one read on each side, bigger than one read (still pipelined), and big enough
    // to go alone and resumable.
    for d in 0..6 {
        for f in 0..50 {
            let name = format!("d{d}/sub{}/f{f:03}", f % 3);
            write_file(
                &root.join(name),
                &noise(f * 97 % 5000, (d * 100 + f) as u64),
            );
        }
    }
    write_file(&root.join("empty"), b"");
    write_file(&root.join("d0/tricky"), &tricky_bytes());
    write_file(&root.join("d1/mid"), &noise(1_000_000, 7));
    write_file(&root.join("d2/big"), &noise(9_000_000, 8));
    write_file(&root.join("d5/zz-last"), b"after the big one");
    std::fs::create_dir(h.path("back")).unwrap();
    let v = json_of(&h, &["--json", "download", "-r", "many", "--to", "back"]);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["transferred"], 305);
    let (want, _) = files_under(&root);
    let (got, parts) = files_under(&h.path("back/many"));
    assert!(parts.is_empty(), "left behind: {parts:?}");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the downloaded tree differs");
    // Again over the same files: each is replaced whole.
    std::fs::write(root.join("d3/sub0/f000"), b"new content").unwrap();
    h.run(&["download", "-r", "many", "--to", "back"])
        .expect_code(0);
    let (again, parts) = files_under(&h.path("back/many"));
    assert!(parts.is_empty(), "left behind: {parts:?}");
    assert_eq!(again["d3/sub0/f000"], b"new content");
}

#[test]
fn download_to_a_new_name_and_errors_for_bad_targets() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    uploaded(&h, "f", b"data");
    h.run(&["download", "f", "--to", "renamed"]).expect_code(0);
    assert_eq!(std::fs::read(h.path("renamed")).unwrap(), b"data");
    h.run(&["download", "f", "f", "--to", "not-a-dir"])
        .expect_code(1);
    h.run(&["mkdir", "d"]).expect_code(0);
    h.run(&["download", "d"]).expect_code(1);
}

#[test]
fn bind_selects_the_source_address() {
    let server = TestServer::start();
    let h = home();
    let r = h.login_with(&server, "alice", "alice-pw", &["--bind", "127.0.0.2"]);
    r.expect_code(0);
    let sessions =
        std::fs::read_to_string(server.config().state_dir.join("sessions.jsonl")).unwrap();
    assert!(sessions.contains("127.0.0.2"), "{sessions}");
}

#[test]
fn usage_errors_exit_2_and_unreachable_servers_exit_7() {
    let h = home();
    h.run(&["frobnicate"]).expect_code(2);
    h.run(&["upload"]).expect_code(2);
    login_piped(&h, "no-at-sign", &[], "x").expect_code(2);
    // A port where nothing listens.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let target = format!("alice@127.0.0.1:{port}");
    let r = login_piped(&h, &target, &["--accept-new"], "x").expect_code(7);
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "one line: {}", r.stderr);
}

#[test]
fn a_brute_forced_source_is_refused_while_others_log_in() {
    let server = TestServer::start();
    let attacker = home();
    let login_from = |h: &ClientHome, bind: &str, pw: &str| {
        h.login_with(&server, "alice", pw, &["--bind", bind])
    };
    for i in 0..10 {
        login_from(&attacker, "127.0.0.2", &format!("guess-{i}")).expect_code(3);
    }
    // The right password from the penalised address is refused without being checked...
    let r = login_from(&attacker, "127.0.0.2", "alice-pw").expect_code(3);
    assert!(r.stderr.contains("too many failed logins"), "{}", r.stderr);
    assert!(r.stderr.contains("try again in"), "{}", r.stderr);
    // ...while another address logs in at once.
    let other = home();
    login_from(&other, "127.0.0.3", "alice-pw").expect_code(0);
    other.run(&["--bind", "127.0.0.3", "list"]).expect_code(0);
}

#[test]
fn symlinks_planted_in_a_tree_lead_nowhere_for_any_command() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let root = server.user_dir("alice");
    let outside = server.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"not yours").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("filelink")).unwrap();
    std::os::unix::fs::symlink("../../", root.join("uplink")).unwrap();
    write_file(&h.path("f"), b"payload");
    std::fs::create_dir(h.path("dl")).unwrap();

    let refused = |args: &[&str]| {
        let r = h.run(args);
        assert!(
            r.code == 4 || r.code == 1,
            "{args:?} should be refused: {r:?}"
        );
    };
    refused(&["list", "dirlink"]);
    refused(&["list", "uplink"]);
    refused(&["download", "dirlink/secret", "--to", "dl"]);
    refused(&["download", "filelink", "--to", "dl"]);
    refused(&["download", "-r", "dirlink", "--to", "dl"]);
    refused(&["upload", "f", "--to", "dirlink"]);
    refused(&["upload", "f", "--to", "uplink"]);
    refused(&["rm", "dirlink/secret"]);
    refused(&["mv", "dirlink/secret", "stolen"]);
    h.run(&["upload", "f"]).expect_code(0);
    refused(&["mv", "f", "dirlink/x"]);
    refused(&["mv", "f", "dirlink"]);
    assert!(root.join("f").exists());
    h.run(&["rm", "f"]).expect_code(0);
    refused(&["mkdir", "dirlink/sub"]);
    refused(&["mkdir", "uplink/sub"]);
    // A file upload whose name is a planted link must not write through it.
    std::fs::rename(h.path("f"), h.path("filelink")).unwrap();
    refused(&["upload", "filelink"]);

    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"not yours");
    assert!(!outside.join("f").exists() && !outside.join("sub").exists());
    assert!(!h.path("dl/secret").exists() && !h.path("dl/filelink").exists());
    // Listing the root shows the links as "other", never what they point to.
    let v = json_of(&h, &["list", "--json"]);
    for e in v.as_array().unwrap() {
        assert_eq!(e["kind"], "other", "{e}");
    }
}

#[test]
fn every_operation_lands_in_the_audit_log_without_secrets() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    uploaded(&h, "f", b"audited");
    h.run(&["download", "f", "--to", "copy"]).expect_code(0);
    h.run(&["mv", "f", "g"]).expect_code(0);
    h.run(&["rm", "missing"]).expect_code(5);
    let bob = format!("bob@{}", server.server());
    login_piped(&h, &bob, &[], "not-bobs-password").expect_code(3);
    let text = std::fs::read_to_string(server.config().audit_log).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let find = |op: &str, result: &str| {
        events
            .iter()
            .find(|e| e["op"] == op && e["result"] == result)
            .unwrap_or_else(|| panic!("no {op}/{result} in {text}"))
    };
    let up = find("upload", "ok");
    assert_eq!(up["user"], "alice");
    assert_eq!(up["path"], "f");
    assert_eq!(up["bytes"], 7);
    assert_eq!(up["digest"], blake3::hash(b"audited").to_hex().as_str());
    assert!(up["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(up["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(find("download", "ok")["bytes"], 7);
    assert_eq!(find("rename", "ok")["to"], "g");
    assert_eq!(find("delete", "NotFound")["path"], "missing");
    assert_eq!(find("login", "AuthFailed")["user"], "bob");
    assert!(!text.contains("not-bobs-password") && !text.contains("alice-pw"));
    assert!(!text.contains("xfer1_"), "no tokens in the audit log");
}

#[test]
fn completions_and_the_manual_page_are_generated_from_the_command_line_definition() {
    let h = home();
    let bash = h.run(&["completions", "bash"]).expect_code(0).stdout;
    assert!(
        bash.contains("_xfer()") && bash.contains("upload"),
        "{bash}"
    );
    let zsh = h.run(&["completions", "zsh"]).expect_code(0).stdout;
    assert!(zsh.starts_with("#compdef xfer"), "{zsh}");
    let fish = h.run(&["completions", "fish"]).expect_code(0).stdout;
    assert!(fish.contains("complete -c xfer"), "{fish}");
    h.run(&["completions", "tcsh-please"]).expect_code(2);
    let man = h.run(&["man"]).expect_code(0).stdout;
    assert!(man.contains(".TH xfer 1") && man.contains("login"), "{man}");
    // None of this needs or creates the state folder.
    assert!(!h.config_dir().exists());
}

#[test]
fn the_shell_runs_commands_from_a_pipe_over_one_connection() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    write_file(&h.path("notes one.txt"), b"shell upload");
    std::fs::create_dir(h.path("back")).unwrap();
    let script = "\
# a comment, then the old menu's operations
mkdir docs
upload 'notes one.txt' --to docs
ls docs
download docs/'notes one.txt' --to back
whoami
help
rename docs/'notes one.txt' docs/renamed.txt
rm docs/missing
ls --json docs
quit
ls
";
    let r = h.run_with_stdin(&["shell"], script);
    // One failure (rm of a missing file): reported, the rest still ran, exit code 5.
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("docs/missing"), "{}", r.stderr);
    assert!(r.stdout.contains("notes one.txt"), "{}", r.stdout);
    assert!(r.stdout.contains("alice (user)"), "{}", r.stdout);
    assert!(r.stdout.contains("\"renamed.txt\""), "{}", r.stdout);
    assert_eq!(
        std::fs::read(h.path("back/notes one.txt")).unwrap(),
        b"shell upload"
    );
    assert!(server.user_dir("alice").join("docs/renamed.txt").exists());
    // `quit` ended it: the last `ls` never ran, so "renamed.txt" is listed once (by --json).
    assert_eq!(r.stdout.matches("renamed.txt").count(), 1, "{}", r.stdout);
    // All of it over a single connection: one "connection open" would be ideal to check, but
    // the client side is what matters here; the audit trail shows one source port.
    let audit = std::fs::read_to_string(server.config().audit_log).unwrap();
    let ports: std::collections::BTreeSet<_> = audit
        .lines()
        .filter(|l| l.contains("\"op\":\"mkdir\"") || l.contains("\"op\":\"rename\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["source"].clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ports.len(), 1, "{ports:?}");
    // A clean script exits 0; an unknown command is a usage error (2).
    h.run_with_stdin(&["shell"], "ls\nwhoami\n").expect_code(0);
    h.run_with_stdin(&["shell"], "frobnicate\nls\n")
        .expect_code(2);
    // A pipe is a script, not a person: nothing is kept.
    assert!(!h.config_dir().join("shell_history").exists());
}

#[test]
fn a_transfer_summary_is_printed_and_available_as_json() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    write_file(&h.path("a"), b"one");
    write_file(&h.path("b"), b"two!");
    let r = h.run(&["upload", "a", "b", "missing"]).expect_code(1);
    assert!(
        r.stderr.contains("uploaded 2 file(s)") && r.stderr.contains("1 failed"),
        "{}",
        r.stderr
    );
    let v = json_of(&h, &["--json", "upload", "a", "b"]);
    assert_eq!(v["operation"], "uploaded");
    assert_eq!(v["transferred"], 2);
    assert_eq!(v["bytes"], 7);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["files"][1]["to"], "b");
    assert_eq!(
        v["files"][1]["blake3"],
        blake3::hash(b"two!").to_hex().as_str()
    );
    std::fs::create_dir(h.path("dl")).unwrap();
    let v = json_of(&h, &["--json", "download", "a", "--to", "dl"]);
    assert_eq!(v["operation"], "downloaded");
    assert_eq!(v["bytes"], 3);
}

#[test]
fn progress_is_drawn_on_a_terminal_and_never_on_a_pipe() {
    need_script();
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    write_file(&h.path("big"), &noise(96 << 20, 3));
    // On a pipe: one status line, no bar, no carriage-return redraws.
    let r = h.run(&["upload", "big"]).expect_code(0);
    assert!(
        !r.stderr.contains('\r') && !r.stderr.contains('%'),
        "{:?}",
        r.stderr
    );
    // Under a pseudo-terminal (`script` runs it on one): the bar is drawn.
    let upload_big = format!("upload {}", h.path("big").display());
    let out = on_a_pty(&h, &upload_big).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains('%') && text.contains("MiB"),
        "no progress bar in {text:?}"
    );
    // Several files: an overall bar counts them too.
    write_file(&h.path("small"), b"x");
    let two = format!("{upload_big} {}", h.path("small").display());
    let out = on_a_pty(&h, &two).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/2 files"), "no overall bar in {text:?}");
    // And -q silences it even on a terminal.
    let out = on_a_pty(&h, &format!("{upload_big} -q")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains('%'), "{text:?}");
}

#[test]
fn the_shell_edits_lines_and_keeps_a_private_history_on_a_terminal() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    need_script();
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let mut child = on_a_pty(&h, "shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let screen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let screen = Arc::clone(&screen);
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    let wait_for = |what: &str, done: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&text()) {
            assert!(Instant::now() < deadline, "waited for {what}: {:?}", text());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Type only while the editor is reading, as a person would: it turns bracketed paste on
    // each time it takes the terminal, so that marks each prompt. (A Ctrl-C typed while a
    // command runs would be a real SIGINT.)
    let prompts = |n: usize| move |t: &str| t.matches("\x1b[?2004h").count() >= n;
    let mut keys = child.stdin.take().unwrap();
    let mut type_keys = |k: &str| {
        keys.write_all(k.as_bytes()).unwrap();
        keys.flush().unwrap();
    };
    wait_for("the first prompt", &prompts(1));
    assert!(text().contains("xfer> "), "{:?}", text());
    // Tab completes the command name.
    type_keys("who\t\r");
    wait_for("whoami's answer", &|t| t.contains("alice (user)"));
    // A leading space: runs, but stays out of the history.
    wait_for("the second prompt", &prompts(2));
    type_keys(" mkdir hidden-dir\r");
    wait_for("the third prompt", &prompts(3));
    assert!(server.user_dir("alice").join("hidden-dir").is_dir());
    // Ctrl-C drops the line (were it run, the unknown command would make the exit code 2).
    type_keys("frobnicate\x03");
    wait_for("a fresh prompt after Ctrl-C", &prompts(4));
    type_keys("ls\r");
    wait_for("the listing", &|t| t.matches("hidden-dir").count() >= 2);
    wait_for("the prompt after ls", &prompts(5));
    type_keys("quit\r");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the shell did not quit: {:?}", text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    assert!(status.success(), "{status:?}: {:?}", text());
    let path = h.config_dir().join("shell_history");
    assert_eq!(mode(&path), 0o600);
    let history = std::fs::read_to_string(&path).unwrap();
    assert!(
        history.contains("whoami") && history.contains("ls") && history.contains("quit"),
        "{history}"
    );
    assert!(
        !history.contains("hidden-dir") && !history.contains("frobnicate"),
        "{history}"
    );
}

#[test]
fn first_contact_on_a_terminal_shows_the_key_and_asks() {
    need_script();
    let server = TestServer::start();
    let h = home();
    let login = format!("login alice@{}", server.server());
    // `script` runs the login on a pseudo-terminal and types our standard input into it.
    let on_a_terminal = |typed: &str| {
        let mut child = on_a_pty(&h, &login)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for line in typed.lines() {
            // One line at a time, as a person would, after the prompt had time to appear.
            std::thread::sleep(Duration::from_millis(500));
            stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = on_a_terminal("no");
    assert_eq!(code, Some(6), "{text}");
    assert!(
        text.contains("can't be established") && text.contains(&server.fingerprint),
        "{text}"
    );
    assert!(text.contains("nothing was sent"), "{text}");
    let known = std::fs::read_to_string(h.config_dir().join("known_servers")).unwrap_or_default();
    assert!(!known.contains(&server.server()), "{known}");

    let (code, text) = on_a_terminal(&format!("yes\n{}", password_of("alice")));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("Logged in"), "{text}");
    assert!(
        !text.contains(password_of("alice")),
        "the password is not echoed: {text}"
    );
    h.run(&["whoami"]).expect_code(0);
}

#[test]
fn a_tree_of_small_and_big_files_uploads_in_one_batch_byte_identical() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let big = xfer_tests::noise(xfer_proto::limits::MAX_PUT_LEN as usize + 1, 7);
    for i in 0..60 {
        write_file(
            &h.path(&format!("t/d{}/f{i}", i % 4)),
            &xfer_tests::noise(i * 131, i as u64),
        );
    }
    write_file(&h.path("t/tricky"), &tricky_bytes());
    write_file(&h.path("t/only-big/big"), &big);
    std::fs::create_dir_all(h.path("t/empty/inner")).unwrap();
    // An older version of one file is replaced.
    write_file(&server.user_dir("alice").join("t/d0/f0"), b"old");
    let out = h.run(&["--json", "upload", "-r", "t"]).expect_code(0);
    let summary: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(summary["transferred"], 62);
    assert_eq!(summary["failed"], 0);
    let root = server.user_dir("alice");
    for i in 0..60 {
        let rel = format!("t/d{}/f{i}", i % 4);
        assert_eq!(
            std::fs::read(root.join(&rel)).unwrap(),
            std::fs::read(h.path(&rel)).unwrap(),
            "{rel}"
        );
    }
    assert_eq!(
        std::fs::read(root.join("t/tricky")).unwrap(),
        tricky_bytes()
    );
    assert_eq!(std::fs::read(root.join("t/only-big/big")).unwrap(), big);
    assert!(root.join("t/empty/inner").is_dir());
    // Nothing staged is left behind.
    assert_eq!(std::fs::read_dir(server.tmp_dir()).unwrap().count(), 0);
}

/// The value of the daemon's stored-digest attribute on `path`, if the filesystem keeps it.
fn stored_digest_attr(path: &Path) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::getxattr(path, "user.xfer.blake3", &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

#[test]
fn a_big_upload_stores_its_digest_and_downloads_are_verified_against_it() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let data = noise(2 << 20, 7);
    uploaded(&h, "big", &data);
    h.run(&["download", "big", "--to", "back"]).expect_code(0);
    assert_eq!(std::fs::read(h.path("back")).unwrap(), data);
    let on_server = server.user_dir("alice").join("big");
    let probe = server.user_dir("alice").join("probe");
    write_file(&probe, b"");
    if let Err(e) =
        rustix::fs::setxattr(&probe, "user.probe", b"1", rustix::fs::XattrFlags::empty())
    {
        panic!(
            "the test server's root keeps no user xattrs ({e}); point TMPDIR at a filesystem that does"
        );
    }
    let record = stored_digest_attr(&on_server).expect("a big upload stores its digest");
    assert_eq!(&record[1..33], blake3::hash(&data).as_bytes());

    // A stale record (same size and mtime, wrong digest) is sent as is, and the client's
    // verification catches it: the download fails, nothing wrong is delivered silently.
    let mut stale = record.clone();
    stale[1] ^= 0xff;
    rustix::fs::setxattr(
        &on_server,
        "user.xfer.blake3",
        &stale,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let run = h.run(&["download", "big", "--to", "stale"]).expect_code(8);
    assert!(!h.path("stale").exists(), "{}", run.stderr);

    // Changed behind the daemon's back (new bytes, new mtime): the record no longer counts
    // and the download hashes the file as it is.
    let changed = noise(2 << 20, 8);
    std::fs::write(&on_server, &changed).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&on_server)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    h.run(&["download", "big", "--to", "changed"])
        .expect_code(0);
    assert_eq!(std::fs::read(h.path("changed")).unwrap(), changed);

    // Without the attribute at all, downloads hash as always.
    rustix::fs::removexattr(&on_server, "user.xfer.blake3").unwrap();
    h.run(&["download", "big", "--to", "plain"]).expect_code(0);
    assert_eq!(std::fs::read(h.path("plain")).unwrap(), changed);

    // A small upload gets no record: it is hashed on download, cheaply.
    uploaded(&h, "small", &noise(1000, 9));
    assert_eq!(
        stored_digest_attr(&server.user_dir("alice").join("small")),
        None
    );
}
