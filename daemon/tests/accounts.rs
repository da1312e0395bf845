//! Accounts and sessions across changes to the users file: a deleted account's tokens never
//! come back (through the real `xferd` binary), and a users file rewritten in place (an
//! editor's truncate-then-write) never ends sessions (in-process daemon).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{Serving, set_config, setup, xferd};
use xfer::addr::ServerAddr;
use xfer::conn::Client;
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::{ErrorCode, Request, Response};
use xfer_tests::{RawConn, TestServer, raw_call, raw_connect_to, raw_hello};

/// What the daemon answers to `Authenticate { token }` on a fresh connection.
async fn authenticate(
    addr: &ServerAddr,
    fp: Fingerprint,
    token: &str,
) -> Result<String, ErrorCode> {
    let mut conn: RawConn = raw_connect_to(addr, fp).await;
    raw_hello(&mut conn).await;
    match raw_call(
        &mut conn,
        &Request::Authenticate {
            token: token.into(),
        },
    )
    .await
    {
        Response::Session(info) => Ok(info.user),
        Response::Error { code, .. } => Err(code),
        other => panic!("unexpected {other:?}"),
    }
}

/// Logs in on a new connection and returns the session token.
async fn login(addr: &ServerAddr, fp: Fingerprint, user: &str, password: &str) -> String {
    let mut c = Client::connect(addr, fp, None).await.expect("connect");
    c.login(user, password).await.expect("login").0
}

fn add_user(config: &Path, name: &str, password: &str) {
    let out = xferd(
        config,
        &["user", "add", name, "--password-stdin"],
        &format!("{password}\n"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_accounts_tokens_never_come_back_for_a_new_account_of_its_name() {
    let (dir, config) = setup(10);
    // Refused tokens add penalties; this test is about the tokens, not the penalties.
    set_config(
        &config,
        &[("threshold_secs", "100000"), ("max_secs", "200000")],
    );
    add_user(&config, "dave", "dave-pw1");
    let serving = Serving::start(&config);
    let (addr, fp) = (&serving.addr, serving.fingerprint);

    // One token revoked by a password change but never used since (as a thief would keep
    // it), one live when the account is deleted.
    let revoked = login(addr, fp, "dave", "dave-pw1").await;
    let out = xferd(
        &config,
        &["user", "passwd", "dave", "--password-stdin"],
        "dave-pw2\n",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let live = login(addr, fp, "dave", "dave-pw2").await;
    assert_eq!(authenticate(addr, fp, &live).await.as_deref(), Ok("dave"));

    let del = xferd(&config, &["user", "del", "dave"], "");
    assert_eq!(del.code, 0, "{}", del.stderr);
    add_user(&config, "dave", "dave-pw3");
    for token in [&revoked, &live] {
        assert_eq!(
            authenticate(addr, fp, token).await,
            Err(ErrorCode::SessionExpired)
        );
    }
    assert!(del.stdout.contains("revoked 1 session"), "{}", del.stdout);
    let list = xferd(&config, &["session", "list", "--user", "dave"], "");
    assert_eq!(
        list.stdout.trim(),
        "",
        "dave's sessions died with the account"
    );
    assert_eq!(
        serving
            .client("dave", "dave-pw3")
            .await
            .whoami()
            .await
            .unwrap()
            .user,
        "dave"
    );

    // The same when the account is removed and re-created by editing the users file, which
    // revokes nothing: the new account's generation cannot be the old one's.
    let stolen = login(addr, fp, "dave", "dave-pw3").await;
    let users_path = dir.path().join("users.toml");
    let mut users = xferd::accounts::UsersFile::load(&users_path).unwrap();
    users.remove("dave").unwrap();
    users.save(&users_path).unwrap();
    assert_eq!(
        authenticate(addr, fp, &stolen).await,
        Err(ErrorCode::SessionExpired),
        "refused while the account is gone"
    );
    users
        .add("dave", xfer_proto::Role::User, "dave-pw4")
        .unwrap();
    users.save(&users_path).unwrap();
    assert_eq!(
        authenticate(addr, fp, &stolen).await,
        Err(ErrorCode::SessionExpired),
        "a stolen token does not fit the new dave"
    );
}

/// Rewrites `path` in place with `contents` (same inode, as an editor that truncates and
/// writes does), and gives it a modification time no earlier version had, so that any
/// reader comparing stamps notices.
fn rewrite_in_place(path: &Path, contents: &[u8], tick: u64) {
    let mut f = std::fs::File::options()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(contents).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(tick))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_file_rewritten_in_place_never_ends_a_session() {
    let server = TestServer::start();
    let users_path = server.config().users_file;
    let good = std::fs::read(&users_path).unwrap();
    let addr = ServerAddr::parse(&server.server()).unwrap();
    let fp = Fingerprint::parse(&server.fingerprint).unwrap();
    let token = login(&addr, fp, "alice", xfer_tests::password_of("alice")).await;
    let mut alice = Client::connect(&addr, fp, None).await.unwrap();
    alice.authenticate(&token).await.unwrap();
    alice.list("").await.unwrap();

    // Truncated: the read is empty, which must not count as "no accounts".
    rewrite_in_place(&users_path, b"", 1);
    alice
        .list("")
        .await
        .expect("an empty read is not the truth");
    // Half written, cut inside a hash: invalid, the accounts in force stay.
    rewrite_in_place(&users_path, &good[..good.len() / 2], 2);
    alice.list("").await.expect("a torn read is not the truth");
    // Cut just before alice's account: a valid file without her. Her request is refused,
    // but her session is not revoked for good.
    let cut = String::from_utf8_lossy(&good)
        .find("[users.alice]")
        .unwrap();
    rewrite_in_place(&users_path, &good[..cut], 3);
    let err = alice.list("").await.unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");

    // The same content back in place: the session works again.
    rewrite_in_place(&users_path, &good, 4);
    let mut alice = Client::connect(&addr, fp, None).await.unwrap();
    assert_eq!(alice.authenticate(&token).await.unwrap().user, "alice");
    alice.list("").await.unwrap();
    assert_eq!(server.state.sessions.list().await.unwrap().len(), 1);
}

#[test]
fn user_commands_say_so_when_the_sessions_cannot_be_revoked() {
    let (dir, config) = setup(10);
    // A state folder that cannot be opened.
    let state = dir.path().join("state");
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&state, b"not a folder").unwrap();
    // A password change revokes by generation anyway: a warning.
    let out = xferd(
        &config,
        &["user", "passwd", "alice", "--password-stdin"],
        "new-pw\n",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("warning"), "{}", out.stderr);
    // Deleting must take the sessions with it: a failure, saying what to run.
    let out = xferd(&config, &["user", "del", "alice"], "");
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("deleted `alice`")
            && out.stderr.contains("xferd session revoke --user alice"),
        "{}",
        out.stderr
    );
}
