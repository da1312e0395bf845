//! End-to-end tests of long-lived tokens through the real `xfer` binary: `xfer token
//! create/list/revoke`, a token used with `XFER_TOKEN` or `--token-file` and `--server`
//! instead of a login, and the scope the server enforces (read-only, one folder).

use std::path::Path;

use xfer_tests::{ClientHome, Run, TestServer, write_file};

fn home() -> ClientHome {
    ClientHome::new(env!("CARGO_BIN_EXE_xfer"))
}

fn logged_in(server: &TestServer, user: &str) -> ClientHome {
    let h = home();
    h.login(server, user).expect_code(0);
    h
}

/// `xfer token create ARGS` on `h`'s login; returns the token it printed.
fn create(h: &ClientHome, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let run = h.run(&all).expect_code(0);
    let token = run.stdout.trim_end_matches('\n');
    assert!(token.starts_with("xfer1_"), "{run:#?}");
    assert!(!token.contains('\n'), "only the token on stdout: {run:#?}");
    assert!(run.stderr.contains("shown only this once"), "{run:#?}");
    token.to_string()
}

/// A machine with no login at all: its own empty state folder.
struct Script {
    home: ClientHome,
    server: String,
    fingerprint: String,
}

impl Script {
    fn new(server: &TestServer) -> Script {
        Script {
            home: home(),
            server: server.server(),
            fingerprint: server.fingerprint.clone(),
        }
    }

    /// `xfer --server S --fingerprint FP ARGS` with `XFER_TOKEN=token`.
    fn run(&self, token: &str, args: &[&str]) -> Run {
        let mut all = vec!["--server", &self.server, "--fingerprint", &self.fingerprint];
        all.extend_from_slice(args);
        output(self.home.command(&all).env("XFER_TOKEN", token))
    }
}

fn output(cmd: &mut std::process::Command) -> Run {
    let out = cmd.output().expect("xfer runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file under `dir` with its bytes, as relative paths.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_token_is_made_listed_used_without_a_login_and_revoked() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let token = create(&h, &["--name", "nightly backup", "--expires", "30d"]);
    let listed = h.run(&["token", "list", "--json"]).expect_code(0).stdout;
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 1, "{listed}");
    assert_eq!(arr[0]["name"], "nightly backup");
    assert_eq!(arr[0]["read_only"], false);
    assert_eq!(arr[0]["path"], "");
    assert!(!listed.contains("xfer1_"), "never the token: {listed}");
    let id = arr[0]["id"].as_str().unwrap().to_string();
    let text = h.run(&["token", "list"]).expect_code(0).stdout;
    assert!(
        text.contains(&id) && text.contains("nightly backup"),
        "{text}"
    );

    // A script on another machine: no login, the token from the environment.
    let script = Script::new(&server);
    write_file(&script.home.path("report.txt"), b"made by cron");
    script.run(&token, &["upload", "report.txt"]).expect_code(0);
    assert_eq!(
        std::fs::read(server.user_dir("alice").join("report.txt")).unwrap(),
        b"made by cron"
    );
    let who = script.run(&token, &["whoami"]).expect_code(0).stdout;
    assert!(who.contains("alice"), "{who}");
    // Nothing about the token was stored on the script's machine.
    let state = script.home.config_dir();
    if state.exists() {
        for f in std::fs::read_dir(&state).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap_or_default();
            assert!(!text.contains(&token[6..]), "the token was saved: {text}");
        }
    }
    // The same from a file.
    let file = script.home.path("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let from_file = output(&mut script.home.command(&[
        "--server",
        &script.server,
        "--fingerprint",
        &script.fingerprint,
        "--token-file",
        file.to_str().unwrap(),
        "list",
    ]));
    let from_file = from_file.expect_code(0);
    assert!(from_file.stdout.contains("report.txt"), "{from_file:#?}");

    // Revoked by its owner: refused at once, exit 3, with what to do.
    h.run(&["token", "revoke", &id]).expect_code(0);
    let refused = script.run(&token, &["list"]).expect_code(3);
    assert!(refused.stderr.contains("xfer token create"), "{refused:#?}");
    h.run(&["token", "revoke", &id]).expect_code(5);
    h.run(&["token", "revoke", "zz"]).expect_code(5);
    assert_eq!(h.run(&["token", "list"]).expect_code(0).stdout, "");
    // The owner's login is untouched.
    h.run(&["list"]).expect_code(0);

    // Both ends are in the audit trail, by id; the token never is.
    let audit = std::fs::read_to_string(server.config().audit_log).unwrap();
    assert!(!audit.contains(&token[6..]), "{audit}");
    for op in ["token_create", "token_revoke"] {
        let line = audit
            .lines()
            .find(|l| l.contains(&format!("\"op\":\"{op}\"")))
            .unwrap_or_else(|| panic!("no {op} in {audit}"));
        assert!(line.contains(&id), "{line}");
    }
}

#[test]
fn an_expired_token_is_refused() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let token = create(&h, &["--expires", "1s"]);
    let script = Script::new(&server);
    // Expiry is in whole seconds: two of them are surely past it.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    script.run(&token, &["list"]).expect_code(3);
    h.run(&["token", "create", "--expires", "5000d"])
        .expect_code(1);
}

#[test]
fn a_read_only_token_reads_and_every_write_exits_4_changing_nothing() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    write_file(&h.path("keep.txt"), b"original");
    h.run(&["upload", "keep.txt"]).expect_code(0);
    h.run(&["mkdir", "dir"]).expect_code(0);
    let token = create(&h, &["--read-only", "--name", "reader"]);
    let listed = h.run(&["token", "list"]).expect_code(0).stdout;
    assert!(listed.contains("read-only"), "{listed}");
    let script = Script::new(&server);
    let before = tree(&server.user_dir("alice"));

    script.run(&token, &["list"]).expect_code(0);
    script
        .run(&token, &["download", "keep.txt", "--to", "got.txt"])
        .expect_code(0);
    assert_eq!(
        std::fs::read(script.home.path("got.txt")).unwrap(),
        b"original"
    );

    write_file(&script.home.path("keep.txt"), b"overwritten");
    write_file(&script.home.path("new.txt"), b"new");
    for args in [
        &["upload", "keep.txt"][..],
        &["upload", "new.txt"],
        &["delete", "keep.txt"],
        &["rename", "keep.txt", "moved.txt"],
        &["mkdir", "other"],
    ] {
        let run = script.run(&token, args).expect_code(4);
        assert!(run.stderr.contains("read-only"), "{args:?}: {run:#?}");
    }
    assert_eq!(tree(&server.user_dir("alice")), before, "nothing changed");
}

#[test]
fn a_path_scoped_token_works_inside_its_folder_only() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    h.run(&["mkdir", "backups/host1"]).expect_code(0);
    h.run(&["mkdir", "backups/host10"]).expect_code(0);
    write_file(&h.path("secret.txt"), b"not for the backup job");
    h.run(&["upload", "secret.txt"]).expect_code(0);
    let token = create(&h, &["--path", "backups//host1/", "--name", "host1"]);
    let v: serde_json::Value =
        serde_json::from_str(&h.run(&["token", "list", "--json"]).expect_code(0).stdout).unwrap();
    assert_eq!(v[0]["path"], "backups/host1", "normalised");
    let script = Script::new(&server);

    write_file(&script.home.path("db.dump"), b"dump");
    script
        .run(&token, &["upload", "db.dump", "--to", "backups/host1"])
        .expect_code(0);
    script
        .run(&token, &["list", "backups/host1"])
        .expect_code(0);
    script
        .run(&token, &["mkdir", "backups/host1/2026"])
        .expect_code(0);
    script
        .run(
            &token,
            &[
                "rename",
                "backups/host1/db.dump",
                "backups/host1/2026/db.dump",
            ],
        )
        .expect_code(0);
    assert_eq!(
        std::fs::read(server.user_dir("alice").join("backups/host1/2026/db.dump")).unwrap(),
        b"dump"
    );

    let before = tree(&server.user_dir("alice"));
    for args in [
        &["list"][..],
        &["list", "backups"],
        &["list", "backups/host10"],
        &["download", "secret.txt"],
        &["download", "backups/host1/../../secret.txt"],
        &["download", "backups/host1/../host10"],
        &["upload", "db.dump"],
        &["upload", "db.dump", "--to", "backups"],
        &["upload", "db.dump", "--to", "backups/host1/.."],
        &["rename", "backups/host1/2026/db.dump", "stolen.dump"],
        &["rename", "secret.txt", "backups/host1/secret.txt"],
        &["delete", "secret.txt"],
        &["mkdir", "elsewhere"],
    ] {
        script.run(&token, args).expect_code(4);
    }
    assert_eq!(tree(&server.user_dir("alice")), before, "nothing changed");
    assert!(!script.home.path("secret.txt").exists());
}

#[test]
fn a_token_cannot_make_list_or_revoke_tokens() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let token = create(&h, &[]);
    let id = serde_json::from_str::<serde_json::Value>(
        &h.run(&["token", "list", "--json"]).expect_code(0).stdout,
    )
    .unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let script = Script::new(&server);
    for args in [
        &["token", "create"][..],
        &["token", "list"],
        &["token", "revoke", &id],
    ] {
        let run = script.run(&token, args).expect_code(4);
        assert!(run.stderr.contains("xfer login"), "{run:#?}");
    }
    // Still there and still working.
    script.run(&token, &["list"]).expect_code(0);
}

#[test]
fn a_token_needs_a_server_a_checked_key_and_a_readable_file() {
    let server = TestServer::start();
    let h = logged_in(&server, "alice");
    let token = create(&h, &[]);
    let fresh = home();
    // No --server: which server is it for?
    let run = output(fresh.command(&["list"]).env("XFER_TOKEN", &token)).expect_code(2);
    assert!(run.stderr.contains("--server"), "{run:#?}");
    // A server whose key nobody checked: the token is not sent.
    let run = output(
        fresh
            .command(&["--server", &server.server(), "list"])
            .env("XFER_TOKEN", &token),
    )
    .expect_code(6);
    assert!(run.stderr.contains("--fingerprint"), "{run:#?}");
    // Pinned by a login on this machine: no --fingerprint needed.
    output(
        h.command(&["--server", &server.server(), "list"])
            .env("XFER_TOKEN", &token),
    )
    .expect_code(0);
    // A wrong --fingerprint for a pinned server is refused before anything is sent.
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    output(
        h.command(&["--server", &server.server(), "--fingerprint", wrong, "list"])
            .env("XFER_TOKEN", &token),
    )
    .expect_code(6);
    // A missing token file names the file and what to put there.
    let missing = fresh.path("no-such-token");
    let run = output(&mut fresh.command(&[
        "--server",
        &server.server(),
        "--fingerprint",
        &server.fingerprint,
        "--token-file",
        missing.to_str().unwrap(),
        "list",
    ]))
    .expect_code(1);
    assert!(
        run.stderr.contains("no-such-token") && run.stderr.contains("xfer token create"),
        "{run:#?}"
    );
    // Something that is not a token.
    let run = output(
        fresh
            .command(&[
                "--server",
                &server.server(),
                "--fingerprint",
                &server.fingerprint,
                "list",
            ])
            .env("XFER_TOKEN", "hunter2"),
    )
    .expect_code(2);
    assert!(!run.stderr.contains("hunter2"), "{run:#?}");
}

#[test]
fn a_password_change_ends_tokens_and_the_cap_says_what_to_do() {
    let server = TestServer::start_with(|c| c.sessions.max_tokens_per_user = 1);
    let h = logged_in(&server, "alice");
    let token = create(&h, &[]);
    let run = h.run(&["token", "create"]).expect_code(7);
    assert!(
        run.stderr.contains("xfer token revoke") && run.stderr.contains("max_tokens_per_user"),
        "{run:#?}"
    );
    let script = Script::new(&server);
    script.run(&token, &["list"]).expect_code(0);
    server.edit_users(|u| u.set_password("alice", "new-pw").unwrap());
    script.run(&token, &["list"]).expect_code(3);
}
