//! End-to-end tests of the real `xferd` binary: init, accounts, check, fingerprint, and serve
//! with its shutdown paths (SIGTERM and the superuser's request) while other clients are idle
//! or in the middle of a transfer.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Serving, XFERD, set_config, setup, upload_bytes, wait_for, xferd};

use xfer::addr::ServerAddr;
use xfer::conn::Client;
use xfer_proto::fingerprint::Fingerprint;

#[test]
fn init_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/xferd.toml");
    let out = xferd(
        &config,
        &[
            "init",
            "--listen",
            "127.0.0.1:7999",
            "--hostname",
            "files.example.org",
        ],
        "",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let fp_line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .expect("init prints the fingerprint")
        .to_string();
    let fp = xferd(&config, &["fingerprint"], "");
    assert_eq!(fp.stdout.trim(), fp_line);
    assert_eq!(fp.stdout.lines().count(), 1);
    Fingerprint::parse(&fp_line).unwrap();

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("etc/key.pem")), 0o600);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:7999\""));
    assert!(
        text.lines().filter(|l| l.starts_with('#')).count() > 10,
        "commented"
    );

    let again = xferd(&config, &["init"], "");
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    assert_eq!(xferd(&config, &["fingerprint"], "").stdout.trim(), fp_line);
    let forced = xferd(&config, &["init", "--force"], "");
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert_ne!(xferd(&config, &["fingerprint"], "").stdout.trim(), fp_line);
}

#[test]
fn user_commands_store_only_argon2id_hashes() {
    let (_dir, config) = setup(10);
    let users_path = config.parent().unwrap().join("users.toml");
    let users = std::fs::read_to_string(&users_path).unwrap();
    assert!(users.contains("$argon2id$v=19$m=19456,t=2,p=1$"), "{users}");
    assert!(!users.contains("root-pw") && !users.contains("alice-pw"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&users_path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let list = xferd(&config, &["user", "list"], "");
    assert!(list.stdout.contains("root\tsuperuser") && list.stdout.contains("alice\tuser"));
    let json = xferd(&config, &["user", "list", "--json"], "");
    assert!(json.stdout.contains("\"superuser\""));

    let dup = xferd(
        &config,
        &["user", "add", "alice", "--password-stdin"],
        "x\n",
    );
    assert_ne!(dup.code, 0);
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);
    for bad in ["../x", "a/b", ".hidden", "has space"] {
        let out = xferd(&config, &["user", "add", bad, "--password-stdin"], "x\n");
        assert_ne!(out.code, 0, "{bad}");
        assert!(out.stderr.contains("invalid user name"), "{}", out.stderr);
    }
    let no_tty = xferd(&config, &["user", "add", "carol"], "");
    assert_ne!(no_tty.code, 0);
    assert!(
        no_tty.stderr.contains("--password-stdin"),
        "{}",
        no_tty.stderr
    );

    let before = std::fs::read_to_string(&users_path).unwrap();
    assert_eq!(
        xferd(
            &config,
            &["user", "passwd", "alice", "--password-stdin"],
            "new\n"
        )
        .code,
        0
    );
    assert_ne!(std::fs::read_to_string(&users_path).unwrap(), before);
    assert_eq!(xferd(&config, &["user", "del", "alice"], "").code, 0);
    assert!(
        !xferd(&config, &["user", "list"], "")
            .stdout
            .contains("alice")
    );
    assert_ne!(xferd(&config, &["user", "del", "alice"], "").code, 0);

    let check = xferd(&config, &["check"], "");
    assert_eq!(check.code, 0, "{}", check.stderr);
    // XFERD_CONFIG selects the file when --config is absent.
    let out = Command::new(XFERD)
        .args(["user", "list"])
        .env("XFERD_CONFIG", &config)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("root"));
}

#[test]
fn user_key_commands_add_list_and_delete_login_keys() {
    let (dir, config) = setup(10);
    let users_path = config.parent().unwrap().join("users.toml");
    let key = dir.path().join("id");
    let (public_file, line, id) = xfer::keys::keygen(&key, false).unwrap();
    // As one argument, as separate words, and from a file.
    let add = xferd(&config, &["user", "key", "add", "alice", &line], "");
    assert_eq!(add.code, 0, "{}", add.stderr);
    assert!(add.stdout.contains(&id), "{}", add.stdout);
    let again: Vec<&str> = ["user", "key", "add", "alice"]
        .into_iter()
        .chain(line.split(' '))
        .collect();
    let dup = xferd(&config, &again, "");
    assert_ne!(dup.code, 0);
    assert!(dup.stderr.contains("already has key"), "{}", dup.stderr);
    let (other_file, _, other_id) = xfer::keys::keygen(&dir.path().join("other"), false).unwrap();
    let add = xferd(
        &config,
        &[
            "user",
            "key",
            "add",
            "root",
            "--file",
            other_file.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    let users = std::fs::read_to_string(&users_path).unwrap();
    assert!(users.contains(line.split(' ').nth(1).unwrap()), "{users}");
    // Refusals: not a key, not ed25519, no such user, neither argument.
    for (args, says) in [
        (
            vec!["user", "key", "add", "alice", "ssh-ed25519 !!!"],
            "bad public key",
        ),
        (
            vec![
                "user",
                "key",
                "add",
                "alice",
                "ssh-rsa",
                "AAAAB3NzaC1yc2EAAAADAQABAAABAQ",
            ],
            "bad public key",
        ),
        (vec!["user", "key", "add", "nobody", &line], "no user named"),
        (vec!["user", "key", "add", "alice"], "required"),
    ] {
        let out = xferd(&config, &args, "");
        assert_ne!(out.code, 0, "{args:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    // list: text and JSON.
    let list = xferd(&config, &["user", "key", "list", "alice"], "");
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(
        list.stdout.starts_with(&format!("{id}\tssh-ed25519\t")),
        "{}",
        list.stdout
    );
    assert!(!list.stdout.contains(&other_id));
    let json = xferd(&config, &["user", "key", "list", "alice", "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    assert_eq!(v[0]["key"], line.as_str());
    assert!(v[0]["added"].as_str().unwrap().ends_with('Z'));
    // del: the ID without its prefix works too; then the key is gone.
    let del = xferd(
        &config,
        &[
            "user",
            "key",
            "del",
            "alice",
            id.strip_prefix("SHA256:").unwrap(),
        ],
        "",
    );
    assert_eq!(del.code, 0, "{}", del.stderr);
    assert!(
        del.stdout.contains("sessions are revoked"),
        "{}",
        del.stdout
    );
    let gone = xferd(&config, &["user", "key", "del", "alice", &id], "");
    assert_ne!(gone.code, 0);
    assert!(gone.stderr.contains("has no key"), "{}", gone.stderr);
    assert_eq!(
        xferd(&config, &["user", "key", "list", "alice"], "").stdout,
        ""
    );
    assert!(public_file.exists());
    let check = xferd(&config, &["check"], "");
    assert_eq!(check.code, 0, "{}", check.stderr);
}

#[test]
fn a_weak_hash_or_unknown_key_stops_the_daemon_naming_the_culprit() {
    let (_dir, config) = setup(10);
    let users_path = config.parent().unwrap().join("users.toml");
    let text = std::fs::read_to_string(&users_path).unwrap();
    let weak = text.replacen("v=19$m=19456,t=2,p=1", "v=19$m=19456,t=1,p=1", 1);
    std::fs::write(&users_path, &weak).unwrap();
    let check = xferd(&config, &["check"], "");
    assert_ne!(check.code, 0);
    assert!(check.stderr.contains("t=1"), "{}", check.stderr);
    let serve = xferd(&config, &["serve"], "");
    assert_ne!(serve.code, 0);
    assert!(
        serve.stderr.contains("user `alice`") || serve.stderr.contains("user `root`"),
        "{}",
        serve.stderr
    );
    std::fs::write(&users_path, &text).unwrap();

    // A damaged sessions file is found by check, before serve would trip on it.
    let state = config.parent().unwrap().join("state");
    std::fs::write(state.join("sessions.json"), b"{ not json").unwrap();
    let check = xferd(&config, &["check"], "");
    assert_ne!(check.code, 0);
    assert!(check.stderr.contains("sessions"), "{}", check.stderr);
    std::fs::remove_file(state.join("sessions.json")).unwrap();

    let cfg = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{cfg}\nmax_speed = 3\n")).unwrap();
    let check = xferd(&config, &["check"], "");
    assert_ne!(check.code, 0);
    assert!(check.stderr.contains("max_speed"), "{}", check.stderr);
}

/// After shutdown starts: the idle client hears of it, and the daemon exits 0 well inside the
/// (long) grace period, since only transfers get one.
async fn idle_client_is_told_and_the_daemon_exits_0_at_once(
    serving: &mut Serving,
    idle: &mut Client,
) {
    let notice = idle.wait_for_notice(Duration::from_secs(10)).await;
    assert!(
        matches!(notice, Err(xfer::ClientError::ServerShuttingDown)),
        "{notice:?}"
    );
    let (code, took) = serving.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_at_once_despite_an_idle_client_and_tells_it() {
    // A long grace period: if idle clients were waited for, the exit would take 30 s.
    let (_dir, config) = setup(30);
    let mut serving = Serving::start(&config);
    let mut idle = serving.client("alice", "alice-pw").await;
    idle.ping().await.unwrap();

    serving.signal(rustix::process::Signal::TERM);
    idle_client_is_told_and_the_daemon_exits_0_at_once(&mut serving, &mut idle).await;
    // The listener is gone.
    assert!(
        Client::connect(&serving.addr, serving.fingerprint, None)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superuser_shutdown_ends_the_daemon_with_exit_0_while_another_client_idles() {
    let (_dir, config) = setup(30);
    let mut serving = Serving::start(&config);
    let mut idle = serving.client("alice", "alice-pw").await;
    let mut admin = serving.client("root", "root-pw").await;

    // A plain user is refused, and the daemon keeps serving.
    let err = idle.shutdown("alice-pw").await.unwrap_err();
    assert_eq!(err.exit_code(), 4, "{err}");
    let err = admin.shutdown("wrong").await.unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    idle.ping().await.unwrap();

    admin.shutdown("root-pw").await.unwrap();
    idle_client_is_told_and_the_daemon_exits_0_at_once(&mut serving, &mut idle).await;
    let log = serving.log.lock().unwrap().clone();
    assert!(log.contains("shutdown requested by superuser"), "{log}");
    assert!(
        !log.contains("root-pw") && !log.contains("alice-pw"),
        "no password in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_in_flight_gets_the_grace_period_then_is_kept_invisible_for_resume() {
    let (dir, config) = setup(2);
    let mut serving = Serving::start(&config);
    // Keep an older version to prove it survives.
    let storage = dir.path().join("storage");
    let mut c = serving.client("alice", "alice-pw").await;
    upload_bytes(&mut c, dir.path(), "big", b"old version").await;

    // Start an upload by hand and stall it after 1 MiB.
    let _conn = common::stalled_upload(&serving, "big", 64 << 20, 1 << 20).await;
    // Wait until the partial data is on the server's disk.
    let tmp = storage.join(".xfer-tmp");
    let partial_len = || common::partial_bytes(&storage, "alice");
    wait_for(
        "the partial upload on disk",
        Duration::from_secs(10),
        || partial_len() > 0,
    )
    .await;

    serving.signal(rustix::process::Signal::TERM);
    let (code, took) = serving.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, 0);
    assert!(
        took >= Duration::from_millis(1500),
        "the transfer got its grace period: {took:?}"
    );
    assert_eq!(
        std::fs::read(storage.join("alice/big")).unwrap(),
        b"old version"
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(storage.join("alice")).unwrap().count(),
        1,
        "nothing partial is visible"
    );
    assert!(partial_len() > 0, "the received part is kept for resume");
    let log = serving.log.lock().unwrap().clone();
    assert!(log.contains("grace period over"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_creates_everything_and_prints_a_working_login() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(XFERD)
        .args(["quickstart", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("XFERD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The banner (stdout) carries the password and fingerprint; the log (stderr) the port.
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(("out".into(), line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(("err".into(), line));
        }
    });
    let (mut password, mut fingerprint, mut addr) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while password.is_none() || fingerprint.is_none() || addr.is_none() {
        let (stream, line) = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("quickstart output");
        let t = line.trim();
        if stream == "out" && t.len() == 24 && !t.contains(' ') {
            password = Some(t.to_string());
        }
        if let Some(fp) = t.split("--fingerprint ").nth(1) {
            fingerprint = Some(Fingerprint::parse(fp.trim()).unwrap());
        }
        if let Some(rest) = t.split("listen=").nth(1) {
            addr = rest
                .split_whitespace()
                .next()
                .map(|a| ServerAddr::parse(a).unwrap());
        }
    }
    let (password, fingerprint, addr) = (password.unwrap(), fingerprint.unwrap(), addr.unwrap());
    assert!(dir.path().join("xferd-data/xferd.toml").exists());
    let mut admin = Client::connect(&addr, fingerprint, None).await.unwrap();
    let (_, info) = admin.login("admin", &password).await.unwrap();
    assert_eq!(info.role, xfer_proto::Role::Superuser);
    admin.shutdown(&password).await.unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The password is not written anywhere but as a hash.
    let users = std::fs::read_to_string(dir.path().join("xferd-data/users.toml")).unwrap();
    assert!(!users.contains(&password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_systemd_and_reloads_on_sighup_without_dropping_sessions() {
    let (dir, config) = setup(10);
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let serving = Serving::start_with_env(&config, &[("NOTIFY_SOCKET", &notify_path)]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // A new account made while the daemon runs works after a reload.
    let add = xferd(
        &config,
        &["user", "add", "carol", "--password-stdin"],
        "carol-pw\n",
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    serving.signal(rustix::process::Signal::HUP);
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        msg.contains("RELOADING=1") && msg.contains("MONOTONIC_USEC="),
        "{msg}"
    );
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    serving
        .client("carol", "carol-pw")
        .await
        .ping()
        .await
        .unwrap();

    let mut open = serving.client("alice", "alice-pw").await;
    let old_fp = serving.fingerprint;

    // A broken certificate is refused and the old one kept.
    let cert = dir.path().join("cert.pem");
    let good_cert = std::fs::read(&cert).unwrap();
    std::fs::write(&cert, b"not a certificate").unwrap();
    serving.signal(rustix::process::Signal::HUP);
    wait_for("a reload failure logged", Duration::from_secs(10), || {
        serving.logged("reload failed")
    })
    .await;
    Client::connect(&serving.addr, old_fp, None).await.unwrap();
    std::fs::write(&cert, good_cert).unwrap();

    // A new key and a new user take effect; the open session is not dropped.
    let out = xferd(&config, &["init", "--force", "--listen", "127.0.0.1:0"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let new_fp = Fingerprint::parse(xferd(&config, &["fingerprint"], "").stdout.trim()).unwrap();
    assert_ne!(new_fp, old_fp);
    serving.signal(rustix::process::Signal::HUP);
    let start = Instant::now();
    loop {
        let n = notify.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    let start = Instant::now();
    while Client::connect(&serving.addr, new_fp, None).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "new key never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(Client::connect(&serving.addr, old_fp, None).await.is_err());
    open.ping()
        .await
        .expect("the session opened before the reload still works");
    open.list("").await.unwrap();

    // Limits reload too: with 1 connection per source waiting to log in, a second one from
    // 127.0.0.1 is refused, and says so; the logged-in `open` does not count.
    set_config(&config, &[("max_startups_per_source", "1")]);
    serving.signal(rustix::process::Signal::HUP);
    wait_for("the reload logged", Duration::from_secs(10), || {
        serving.logged("reloaded config limits")
    })
    .await;
    let mut second = Client::connect(&serving.addr, new_fp, None).await.unwrap();
    second.ping().await.unwrap();
    let refused = Client::connect(&serving.addr, new_fp, None)
        .await
        .err()
        .expect("refused");
    assert!(
        refused
            .to_string()
            .contains("too many connections from 127.0.0.1 (1)"),
        "{refused}"
    );
    assert_eq!(refused.exit_code(), 7);
    // A broken config is refused on reload and the running limits stay.
    set_config(&config, &[("max_connections", "0")]);
    serving.signal(rustix::process::Signal::HUP);
    wait_for("the bad config reported", Duration::from_secs(10), || {
        serving.log.lock().unwrap().matches("reload failed").count() >= 2
    })
    .await;
    assert!(serving.logged("limits.max_connections"));
    open.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_lists_and_revokes_sessions_of_the_running_daemon() {
    let (_dir, config) = setup(10);
    let serving = Serving::start(&config);
    let mut alice = serving.client("alice", "alice-pw").await;
    let mut root = serving.client("root", "root-pw").await;
    let list = xferd(&config, &["session", "list"], "");
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(
        list.stdout.contains("alice") && list.stdout.contains("root"),
        "{}",
        list.stdout
    );
    assert!(!list.stdout.contains("xfer1_"), "tokens are never shown");
    let json = xferd(
        &config,
        &["session", "list", "--user", "alice", "--json"],
        "",
    );
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let id = v[0]["id"].as_str().unwrap().to_string();

    let out = xferd(&config, &["session", "revoke", &id], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let err = alice.list("").await.unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    root.ping().await.expect("other sessions untouched");
    assert_ne!(xferd(&config, &["session", "revoke", "zz"], "").code, 0);
    let out = xferd(&config, &["session", "revoke", "--all"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(root.list("").await.unwrap_err().exit_code(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sees_tokens_with_their_scope_and_revokes_them() {
    let (_dir, config) = setup(10);
    let serving = Serving::start(&config);
    let mut alice = serving.client("alice", "alice-pw").await;
    let (token, info) = xfer::tokens::create(&mut alice, "nightly", 3600, true, "backups/h1")
        .await
        .unwrap();
    let json = xferd(&config, &["session", "list", "--json"], "");
    assert_eq!(json.code, 0, "{}", json.stderr);
    assert!(!json.stdout.contains(&token[6..]), "tokens are never shown");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let listed = v.as_array().unwrap();
    let login = listed.iter().find(|s| s["kind"] == "login").unwrap();
    assert!(login.get("path").is_none(), "{login}");
    let t = listed.iter().find(|s| s["kind"] == "token").unwrap();
    assert_eq!(
        (
            &t["id"],
            &t["user"],
            &t["name"],
            &t["read_only"],
            &t["path"]
        ),
        (
            &serde_json::json!(info.id),
            &serde_json::json!("alice"),
            &serde_json::json!("nightly"),
            &serde_json::json!(true),
            &serde_json::json!("backups/h1")
        )
    );
    let text = xferd(&config, &["session", "list"], "").stdout;
    let line = text.lines().find(|l| l.starts_with(&info.id)).unwrap();
    assert!(
        line.ends_with("\ttoken name=nightly read-only path=backups/h1"),
        "{line}"
    );

    let mut script = xfer::conn::Client::connect(&serving.addr, serving.fingerprint, None)
        .await
        .unwrap();
    script.authenticate(&token).await.unwrap();
    let out = xferd(&config, &["session", "revoke", &info.id], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("revoked 1"), "{}", out.stdout);
    assert_eq!(script.list("backups/h1").await.unwrap_err().exit_code(), 3);
    alice.ping().await.expect("the login that made it stays");
    assert!(
        xfer::tokens::list(&mut alice).await.unwrap().is_empty(),
        "gone from the owner's list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_journal_the_log_has_no_timestamps_or_colours_of_its_own() {
    let (_dir, config) = setup(10);
    let mut serving = Serving::start_with_env(&config, &[("JOURNAL_STREAM", Path::new("8:12345"))]);
    serving
        .client("alice", "alice-pw")
        .await
        .ping()
        .await
        .unwrap();
    serving.signal(rustix::process::Signal::TERM);
    assert_eq!(serving.wait_exit(Duration::from_secs(20)).await.0, 0);
    let log = serving.log.lock().unwrap().clone();
    assert!(log.contains("login succeeded"), "{log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("20"),
            "timestamp under the journal: {line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "colour under the journal: {line:?}"
        );
    }
}

#[test]
fn xferd_prints_completions_and_its_manual_page() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("none.toml");
    let out = xferd(&config, &["completions", "bash"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("_xferd()") && out.stdout.contains("quickstart"));
    let man = xferd(&config, &["man"], "");
    assert_eq!(man.code, 0, "{}", man.stderr);
    assert!(man.stdout.contains(".TH xferd 8"), "{}", man.stdout);
}
