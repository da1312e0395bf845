//! End-to-end tests of key login (spec §8) with the real `xfer` binary against a daemon
//! running in-process: `xfer keygen`, `xfer login --key`, and the refusals (a replayed
//! signature, unknown users and keys, bad signatures) that must look like a wrong password.

use std::path::Path;

use xfer_proto::key_login::signed_message;
use xfer_proto::{ErrorCode, Request, Response};
use xfer_tests::{ClientHome, RawConn, Run, TestServer, raw_call, raw_connect, raw_hello};

fn home() -> ClientHome {
    ClientHome::new(env!("CARGO_BIN_EXE_xfer"))
}

/// `xfer keygen -f NAME` in `h`'s folder, with `stdin` (a passphrase line, or nothing).
fn keygen(h: &ClientHome, name: &str, stdin: Option<&str>) -> Run {
    match stdin {
        Some(line) => h.run_with_stdin(&["keygen", "-f", name, "--passphrase-stdin"], line),
        None => h.run(&["keygen", "-f", name]),
    }
}

/// Registers the public key `file.pub` of `h` as a login key of `user`.
fn allow(server: &TestServer, user: &str, h: &ClientHome, file: &str) {
    let line = std::fs::read_to_string(h.path(&format!("{file}.pub"))).unwrap();
    server.edit_users(|u| {
        u.add_key(user, &line).unwrap();
    });
}

/// `xfer [BEFORE] login --key FILE USER@SERVER --fingerprint FP [EXTRA]`, `stdin` piped in.
fn key_login(
    h: &ClientHome,
    server: &TestServer,
    user: &str,
    file: &str,
    before: &[&str],
    extra: &[&str],
    stdin: &str,
) -> Run {
    let target = format!("{user}@{}", server.server());
    let mut args = before.to_vec();
    args.extend([
        "login",
        "--key",
        file,
        &target,
        "--fingerprint",
        &server.fingerprint,
    ]);
    args.extend_from_slice(extra);
    h.run_with_stdin(&args, stdin)
}

/// The key pair `xfer keygen` wrote to `file` (unencrypted), as ring holds it.
fn pair_of(path: &Path) -> ring::signature::Ed25519KeyPair {
    let key = ssh_key::PrivateKey::from_openssh(std::fs::read_to_string(path).unwrap()).unwrap();
    let pair = key.key_data().ed25519().unwrap();
    ring::signature::Ed25519KeyPair::from_seed_and_public_key(
        pair.private.as_ref(),
        pair.public.as_ref(),
    )
    .unwrap()
}

fn raw_public(pair: &ring::signature::Ed25519KeyPair) -> [u8; 32] {
    use ring::signature::KeyPair;
    pair.public_key().as_ref().try_into().unwrap()
}

/// Sends `KeyLogin` on a greeted connection and returns the nonce.
async fn challenge(conn: &mut RawConn, user: &str, public_key: [u8; 32]) -> [u8; 32] {
    let reply = raw_call(
        conn,
        &Request::KeyLogin {
            user: user.into(),
            public_key,
        },
    )
    .await;
    match reply {
        Response::KeyChallenge { nonce } => nonce,
        other => panic!("no challenge: {other:?}"),
    }
}

/// The message `conn`'s client signs for `nonce`.
fn message_for(conn: &mut RawConn, nonce: &[u8; 32], user: &str, public_key: &[u8; 32]) -> Vec<u8> {
    let binding = *conn.get_mut().channel_binding();
    signed_message(&binding, nonce, user, public_key).unwrap()
}

async fn prove(conn: &mut RawConn, signature: &[u8]) -> Response {
    raw_call(
        conn,
        &Request::KeyProof {
            signature: signature.to_vec(),
        },
    )
    .await
}

fn assert_auth_failed(reply: &Response) {
    match reply {
        Response::Error { code, message } => {
            assert_eq!(*code, ErrorCode::AuthFailed, "{message}");
            assert_eq!(message, "wrong user name or password");
        }
        other => panic!("expected AuthFailed, got {other:?}"),
    }
}

#[test]
fn keygen_writes_a_private_key_and_a_public_line_and_never_overwrites() {
    let h = home();
    let out = keygen(&h, "k", None).expect_code(0);
    let private = std::fs::read_to_string(h.path("k")).unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let public = std::fs::read_to_string(h.path("k.pub")).unwrap();
    assert_eq!(public.lines().count(), 1);
    assert!(public.starts_with("ssh-ed25519 AAAA"), "{public}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.path("k")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The fingerprint it prints is OpenSSH's.
    let fp = ssh_key::PublicKey::from_openssh(&public)
        .unwrap()
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    assert!(out.stderr.contains(&fp), "{}", out.stderr);
    let again = keygen(&h, "k", None).expect_code(1);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(h.path("k")).unwrap(), private);
    // Without -f it goes into the state folder.
    h.run(&["keygen"]).expect_code(0);
    assert!(h.config_dir().join("id_ed25519").exists());
    assert!(h.config_dir().join("id_ed25519.pub").exists());
}

#[test]
fn a_key_login_opens_a_session_like_a_password_login() {
    let server = TestServer::start();
    let h = home();
    keygen(&h, "k", None).expect_code(0);
    allow(&server, "alice", &h, "k");
    let r = key_login(&h, &server, "alice", "k", &[], &[], "").expect_code(0);
    assert!(r.stderr.contains("Logged in"), "{}", r.stderr);
    let who = h.run(&["whoami"]).expect_code(0).stdout;
    assert!(who.contains("alice"), "{who}");
    h.run(&["list"]).expect_code(0);
    // The stored session is a token, not the key.
    let sessions = std::fs::read_to_string(h.config_dir().join("sessions.toml")).unwrap();
    let private = std::fs::read_to_string(h.path("k")).unwrap();
    let body = private.lines().nth(1).unwrap();
    assert!(!sessions.contains(body));
    // Audited like a login.
    let audit = std::fs::read_to_string(server.config().audit_log).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"op\":\"keylogin\"")
            && l.contains("\"result\":\"ok\"")
            && l.contains("\"user\":\"alice\"")),
        "{audit}"
    );
}

#[test]
fn unknown_users_unknown_keys_and_bad_signatures_fail_like_a_wrong_password_and_count() {
    let server = TestServer::start();
    let h = home();
    keygen(&h, "k", None).expect_code(0);
    keygen(&h, "other", None).expect_code(0);
    allow(&server, "alice", &h, "k");
    // Each from an address of its own, so that none is refused for the others' failures.
    let wrong_password = h
        .login_with(&server, "alice", "nope", &["--bind", "127.0.0.3"])
        .expect_code(3);
    let from = |bind: &'static str| ["--bind", bind];
    let unknown_user =
        key_login(&h, &server, "mallory", "k", &from("127.0.0.4"), &[], "").expect_code(3);
    let unknown_key =
        key_login(&h, &server, "alice", "other", &from("127.0.0.5"), &[], "").expect_code(3);
    let others_key = key_login(&h, &server, "bob", "k", &from("127.0.0.6"), &[], "").expect_code(3);
    let last = |r: &Run| r.stderr.lines().last().unwrap_or_default().to_string();
    for r in [&unknown_user, &unknown_key, &others_key] {
        assert_eq!(last(r), last(&wrong_password));
    }
    // A bad signature, on the wire: the same answer.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pair = pair_of(&h.path("k"));
        let public = raw_public(&pair);
        let mut conn = raw_connect(&server).await;
        raw_hello(&mut conn).await;
        let nonce = challenge(&mut conn, "alice", public).await;
        let message = message_for(&mut conn, &nonce, "alice", &public);
        let mut sig = pair.sign(&message).as_ref().to_vec();
        sig[10] ^= 1;
        assert_auth_failed(&prove(&mut conn, &sig).await);
        // A wrong length too, and then the connection has used up its attempts.
        let nonce = challenge(&mut conn, "alice", public).await;
        let _ = nonce;
        assert_auth_failed(&prove(&mut conn, &[0; 12]).await);
        let nonce = challenge(&mut conn, "alice", public).await;
        let message = message_for(&mut conn, &nonce, "alice", &public);
        let mut sig = pair.sign(&message).as_ref().to_vec();
        sig[0] ^= 1;
        assert_auth_failed(&prove(&mut conn, &sig).await);
        // limits.max_auth_attempts (3) failures: closed.
        assert!(
            conn.read_frame::<Response>().await.is_err(),
            "closed after the third failure"
        );
    });
    // Key failures add to the same per-source penalty as wrong passwords: after enough of
    // them from one address (each adds penalties.per_failure_secs, 5, and 15 is the
    // threshold), even the right password is refused there.
    for _ in 0..5 {
        key_login(
            &h,
            &server,
            "alice",
            "other",
            &["--bind", "127.0.0.2"],
            &[],
            "",
        )
        .expect_code(3);
    }
    let r = h
        .login_with(&server, "alice", "alice-pw", &["--bind", "127.0.0.2"])
        .expect_code(3);
    assert!(r.stderr.contains("too many failed logins"), "{}", r.stderr);
    let r = key_login(&h, &server, "alice", "k", &["--bind", "127.0.0.2"], &[], "").expect_code(3);
    assert!(r.stderr.contains("too many failed logins"), "{}", r.stderr);
    // Audited as failed logins, with no key material.
    let audit = std::fs::read_to_string(server.config().audit_log).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"op\":\"keylogin\"")
            && l.contains("AuthFailed")
            && l.contains("\"user\":\"mallory\"")),
        "{audit}"
    );
    let private = std::fs::read_to_string(h.path("k")).unwrap();
    assert!(!audit.contains(private.lines().nth(1).unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_is_refused_on_any_other_connection() {
    let server = TestServer::start();
    let h = home();
    keygen(&h, "k", None).expect_code(0);
    allow(&server, "alice", &h, "k");
    let pair = pair_of(&h.path("k"));
    let public = raw_public(&pair);
    // The victim's connection: the signature it makes, seen by an attacker.
    let mut victim = raw_connect(&server).await;
    raw_hello(&mut victim).await;
    let victim_nonce = challenge(&mut victim, "alice", public).await;
    let victim_msg = message_for(&mut victim, &victim_nonce, "alice", &public);
    let victim_sig = pair.sign(&victim_msg);
    // Replayed as it is on a second connection.
    let mut attacker = raw_connect(&server).await;
    raw_hello(&mut attacker).await;
    let nonce = challenge(&mut attacker, "alice", public).await;
    assert_ne!(nonce, victim_nonce);
    assert_auth_failed(&prove(&mut attacker, victim_sig.as_ref()).await);
    // A relay that gets the victim to sign the attacker's nonce still fails: the victim's
    // connection has another channel binding.
    let nonce = challenge(&mut attacker, "alice", public).await;
    let relayed = pair.sign(&message_for(&mut victim, &nonce, "alice", &public));
    assert_auth_failed(&prove(&mut attacker, relayed.as_ref()).await);
    // The victim's own signature still works where it was made.
    match prove(&mut victim, victim_sig.as_ref()).await {
        Response::LoggedIn { session, .. } => assert_eq!(session.user, "alice"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_must_follow_its_challenge_and_needs_protocol_3() {
    let server = TestServer::start();
    let bad_request_and_close = async |conn: &mut RawConn, req: Request| {
        match raw_call(conn, &req).await {
            Response::Error { code, .. } => assert_eq!(code, ErrorCode::BadRequest),
            other => panic!("{other:?}"),
        }
        assert!(conn.read_frame::<Response>().await.is_err(), "closed");
    };
    let proof = Request::KeyProof {
        signature: vec![0; 64],
    };
    // No challenge at all.
    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    bad_request_and_close(&mut conn, proof.clone()).await;
    // Another request in between spends the challenge.
    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    challenge(&mut conn, "alice", [7; 32]).await;
    assert_eq!(raw_call(&mut conn, &Request::Ping).await, Response::Ok);
    bad_request_and_close(&mut conn, proof.clone()).await;
    // On a connection already logged in: refused, and the session stays.
    let mut conn = xfer_tests::raw_login(&server, "alice").await;
    match raw_call(
        &mut conn,
        &Request::KeyLogin {
            user: "bob".into(),
            public_key: [7; 32],
        },
    )
    .await
    {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("already logged in"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match raw_call(&mut conn, &Request::WhoAmI).await {
        Response::Session(info) => assert_eq!(info.user, "alice"),
        other => panic!("{other:?}"),
    }
    // A version 2 connection has no key login.
    let mut conn = raw_connect(&server).await;
    let hello = raw_call(
        &mut conn,
        &Request::Hello {
            version: 2,
            agent: "old".into(),
        },
    )
    .await;
    assert!(matches!(hello, Response::Hello { version: 2, .. }));
    bad_request_and_close(
        &mut conn,
        Request::KeyLogin {
            user: "alice".into(),
            public_key: [7; 32],
        },
    )
    .await;
}

#[test]
fn an_encrypted_key_takes_its_passphrase_from_stdin() {
    let server = TestServer::start();
    let h = home();
    keygen(&h, "k", Some("open sesame\n")).expect_code(0);
    let key =
        ssh_key::PrivateKey::from_openssh(std::fs::read_to_string(h.path("k")).unwrap()).unwrap();
    assert!(key.is_encrypted());
    allow(&server, "alice", &h, "k");
    // No terminal and no flag: a usage error that says what to do.
    let r = key_login(&h, &server, "alice", "k", &[], &[], "").expect_code(2);
    assert!(r.stderr.contains("--passphrase-stdin"), "{}", r.stderr);
    let r = key_login(
        &h,
        &server,
        "alice",
        "k",
        &[],
        &["--passphrase-stdin"],
        "wrong\n",
    )
    .expect_code(1);
    assert!(r.stderr.contains("wrong passphrase"), "{}", r.stderr);
    key_login(
        &h,
        &server,
        "alice",
        "k",
        &[],
        &["--passphrase-stdin"],
        "open sesame\n",
    )
    .expect_code(0);
    h.run(&["whoami"]).expect_code(0);
}

#[test]
fn keys_made_by_ssh_keygen_log_in_too() {
    xfer_tests::require_tool("ssh-keygen", "openssh-client");
    let server = TestServer::start();
    let h = home();
    let made = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "pass phrase",
            "-C",
            "ci@example",
            "-f",
        ])
        .arg(h.path("id"))
        .status()
        .unwrap();
    assert!(made.success());
    allow(&server, "bob", &h, "id");
    key_login(
        &h,
        &server,
        "bob",
        "id",
        &[],
        &["--passphrase-stdin"],
        "pass phrase\n",
    )
    .expect_code(0);
    // And ssh-keygen reads ours, with the fingerprint we print.
    let out = keygen(&h, "ours", None).expect_code(0);
    let listed = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(h.path("ours.pub"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let fp = listed.split_whitespace().nth(1).unwrap();
    assert!(out.stderr.contains(fp), "{listed} / {}", out.stderr);
    let check = std::process::Command::new("ssh-keygen")
        .args(["-y", "-f"])
        .arg(h.path("ours"))
        .output()
        .unwrap();
    assert!(check.status.success());
    let ours = std::fs::read_to_string(h.path("ours.pub")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&check.stdout)
            .split_whitespace()
            .nth(1),
        ours.split_whitespace().nth(1)
    );
}

#[test]
fn deleting_a_key_ends_the_sessions_of_its_user() {
    let server = TestServer::start();
    let h = home();
    keygen(&h, "k", None).expect_code(0);
    allow(&server, "alice", &h, "k");
    key_login(&h, &server, "alice", "k", &[], &[], "").expect_code(0);
    h.run(&["list"]).expect_code(0);
    let line = std::fs::read_to_string(h.path("k.pub")).unwrap();
    let id = ssh_key::PublicKey::from_openssh(&line)
        .unwrap()
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    server.edit_users(|u| u.remove_key("alice", &id).unwrap());
    let r = h.run(&["list"]).expect_code(3);
    assert!(r.stderr.contains("expired or was revoked"), "{}", r.stderr);
    // And the key no longer logs in.
    key_login(&h, &server, "alice", "k", &[], &[], "").expect_code(3);
}

/// Runs `xfer ARGS` with `h`'s state folder on a pseudo-terminal (`script`), typing each line
/// of `typed` after a pause, as a person answering prompts would; its exit code and screen.
fn on_a_terminal(h: &ClientHome, args: &str, typed: &str) -> (Option<i32>, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let cmd = format!(
        "{} --config-dir {} {args}",
        h.bin.display(),
        h.config_dir().display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .current_dir(h.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in typed.lines() {
        std::thread::sleep(std::time::Duration::from_millis(500));
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn on_a_terminal_the_passphrase_is_asked_twice_at_keygen_and_only_for_an_encrypted_key() {
    xfer_tests::require_tool("script", "bsdutils");
    let server = TestServer::start();
    let h = home();
    let (code, screen) = on_a_terminal(&h, "keygen -f k", "hunter22\nhunter22");
    assert_eq!(code, Some(0), "{screen}");
    assert!(screen.contains("Enter same passphrase again"), "{screen}");
    assert!(!screen.contains("hunter22"), "not echoed: {screen}");
    // Two empty answers: no passphrase.
    let (code, screen) = on_a_terminal(&h, "keygen -f plain", "\n\n");
    assert_eq!(code, Some(0), "{screen}");
    // Mismatched: nothing written.
    let (code, screen) = on_a_terminal(&h, "keygen -f typo", "one\ntwo");
    assert_eq!(code, Some(2), "{screen}");
    assert!(!h.path("typo").exists() && !h.path("typo.pub").exists());
    allow(&server, "alice", &h, "k");
    allow(&server, "bob", &h, "plain");
    let target = |user: &str| {
        format!(
            "login --key {} {user}@{} --fingerprint {}",
            if user == "alice" { "k" } else { "plain" },
            server.server(),
            server.fingerprint
        )
    };
    let (code, screen) = on_a_terminal(&h, &target("alice"), "hunter22");
    assert_eq!(code, Some(0), "{screen}");
    assert!(screen.contains("Passphrase for k"), "{screen}");
    assert!(!screen.contains("hunter22"), "not echoed: {screen}");
    let (code, screen) = on_a_terminal(&h, &target("bob"), "");
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        !screen.contains("Passphrase"),
        "no prompt for a plain key: {screen}"
    );
}
