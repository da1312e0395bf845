//! Sessions and accounts shared by several nodes, against a real S3 store: the 3-node Garage
//! cluster of [`xfer_tests::cluster`], which fails with how to build Garage when it is missing
//! (never skips). Each "node" is its own client, accounts and session store on the same
//! bucket and prefix, as two daemons would have; each test has a prefix of its own.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use xfer_proto::Role;
use xferd::accounts::Accounts;
use xferd::config::SessionSettings;
use xferd::sessions::SessionStore;
use xferd::shared::SharedStore;
use xferd::shared::sessions::SharedSessions;
use xferd::shared::token::{KEY_LEN, SessionKey};
use xferd::shared::users::UsersObject;

/// The bucket's internal objects under `prefix`, through a fresh client (another node).
async fn shared(prefix: &str) -> SharedStore {
    let g = xfer_tests::cluster::garage().s3();
    SharedStore::of(
        &g.open(&g.storage(&xfer_tests::cluster::test_prefix(prefix)))
            .await,
    )
}

/// Sessions as deployed: a 2 s poll, the same key file on every node.
fn settings(max_per_user: usize) -> SessionSettings {
    SessionSettings {
        max_per_user,
        ..Default::default()
    }
}

/// One node: its own client, accounts and sessions on the shared bucket.
struct Node {
    accounts: Accounts,
    sessions: SessionStore,
}

impl Node {
    async fn start(prefix: &str, max_per_user: usize) -> Node {
        let store = shared(prefix).await;
        let settings = settings(max_per_user);
        let accounts = Accounts::from_store(
            UsersObject::new(store.clone()),
            settings.sync_interval(),
            1,
            4,
        )
        .await
        .unwrap();
        let sessions =
            SharedSessions::open(store, SessionKey::from_bytes(&[42; KEY_LEN]), &settings)
                .await
                .unwrap();
        Node {
            accounts,
            sessions: SessionStore::Shared(sessions),
        }
    }

    /// Logs `user` in (as the daemon's login does after the password check), registered.
    async fn login(&self, user: &str) -> String {
        let (_, generation) = self.accounts.lookup(user).unwrap();
        self.sessions
            .create_registered(user, generation, "127.0.0.1:1")
            .await
            .unwrap()
            .0
    }

    /// What the daemon checks on every request.
    fn accepts(&self, token: &str) -> bool {
        self.sessions
            .validate(token, |u| self.accounts.lookup(u).map(|(_, g)| g))
            .is_some()
    }
}

/// Waits (polling, with a deadline of 5 s from `since`, the promise made to users) until
/// `cond` holds.
async fn within_5s(since: Instant, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = since + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A users object with `names` (password "pw"), put in place as `xferd user import` does.
async fn import(prefix: &str, names: &[&str]) {
    let mut file = xferd::accounts::UsersFile::default();
    for n in names {
        file.add(n, Role::User, "pw").unwrap();
    }
    UsersObject::new(shared(prefix).await)
        .import(&file, false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_node_a_works_on_b_and_a_revocation_on_a_reaches_b_within_5s() {
    import("t-revoke", &["alice"]).await;
    let (a, b) = (
        Node::start("t-revoke", 10).await,
        Node::start("t-revoke", 10).await,
    );
    let token = a.login("alice").await;
    assert!(a.accepts(&token));
    assert!(b.accepts(&token), "a token from A on B");
    // A node restarted later knows it too (nothing was in A's memory only).
    let c = Node::start("t-revoke", 10).await;
    assert!(c.accepts(&token));
    // Logout on A (the daemon's path: sync, written in the background).
    let t0 = Instant::now();
    assert!(a.sessions.revoke(&token));
    assert!(!a.accepts(&token), "at once on A");
    within_5s(t0, "B refuses the revoked token", || !b.accepts(&token)).await;
    within_5s(t0, "C refuses the revoked token", || !c.accepts(&token)).await;
    // And a node started after the revocation refuses it from the start.
    assert!(!Node::start("t-revoke", 10).await.accepts(&token));
    // `xferd session revoke ID` from an administrator's machine: the registry alone.
    let other = b.login("alice").await;
    let admin =
        xferd::shared::sessions::SharedRegistry::new(shared("t-revoke").await, &settings(10));
    let listed = admin.list().await.unwrap();
    assert_eq!(listed.len(), 1, "the revoked session left the registry");
    let t0 = Instant::now();
    assert_eq!(
        admin
            .revoke_matching(Some(&listed[0].0), None)
            .await
            .unwrap()
            .len(),
        1
    );
    within_5s(t0, "both nodes refuse the session revoked by id", || {
        !a.accepts(&other) && !b.accepts(&other)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_from_node_a_carries_its_scope_to_b_and_is_revoked_by_its_owner() {
    import("t-scoped", &["alice"]).await;
    let (a, b) = (
        Node::start("t-scoped", 1).await,
        Node::start("t-scoped", 1).await,
    );
    let (_, generation) = a.accounts.lookup("alice").unwrap();
    let scope = xferd::sessions::TokenScope {
        name: "nightly".into(),
        read_only: true,
        path: "backups/h1".into(),
    };
    let (token, id, _) = a
        .sessions
        .create_token("alice", generation, "127.0.0.1:1", scope.clone(), 3600, 4)
        .await
        .unwrap();
    // B enforces the scope the token itself carries.
    let on_b = b
        .sessions
        .validate(&token, |u| b.accounts.lookup(u).map(|(_, g)| g))
        .unwrap();
    let got = on_b.token.unwrap();
    assert_eq!((got.read_only, got.path.as_str()), (true, "backups/h1"));
    // Two logins on B with max_per_user 1 evict a login, never the token.
    let l1 = b.login("alice").await;
    let l2 = b.login("alice").await;
    assert!(!b.accepts(&l1) && b.accepts(&l2) && b.accepts(&token));
    // Listed with its name by the owner (any node) and by the administrator.
    let mine = b.sessions.tokens_of("alice").await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].0, id);
    assert_eq!(mine[0].1.token.as_ref(), Some(&scope));
    let admin =
        xferd::shared::sessions::SharedRegistry::new(shared("t-scoped").await, &settings(1));
    let listed = admin.list().await.unwrap();
    assert!(listed.iter().any(|(i, r)| *i == id && r.kind() == "token"));
    // Revoked by its owner on B: refused on A within 5 s; the login stays.
    let t0 = Instant::now();
    assert_eq!(b.sessions.revoke_token("bob", &id).await.unwrap(), 0);
    assert_eq!(b.sessions.revoke_token("alice", &id).await.unwrap(), 1);
    assert!(!b.accepts(&token), "at once on B");
    within_5s(t0, "A refuses the revoked token", || !a.accepts(&token)).await;
    assert!(a.accepts(&l2));
    assert!(b.sessions.tokens_of("alice").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_through_the_store_ends_old_tokens_on_every_node_within_5s() {
    import("t-passwd", &["alice", "bob"]).await;
    let (a, b) = (
        Node::start("t-passwd", 10).await,
        Node::start("t-passwd", 10).await,
    );
    let alice = a.login("alice").await;
    let bob = a.login("bob").await;
    assert!(b.accepts(&alice) && b.accepts(&bob));
    // `xferd user passwd alice` on A's machine: an edit of the users object.
    let t0 = Instant::now();
    UsersObject::new(shared("t-passwd").await)
        .edit(|u| u.set_password("alice", "new"))
        .await
        .unwrap();
    within_5s(t0, "both nodes refuse alice's old token", || {
        !a.accepts(&alice) && !b.accepts(&alice)
    })
    .await;
    assert!(
        a.accepts(&bob) && b.accepts(&bob),
        "bob's session is untouched"
    );
    // The new password's sessions work everywhere.
    let fresh = b.login("alice").await;
    assert!(a.accepts(&fresh));
    assert!(matches!(
        a.accounts.verify("alice", "new").await,
        xferd::accounts::VerifyOutcome::Ok { .. }
    ));
    // A role change and a deleted account, the same way.
    let t0 = Instant::now();
    UsersObject::new(shared("t-passwd").await)
        .edit(|u| u.set_role("alice", Role::Superuser))
        .await
        .unwrap();
    within_5s(t0, "a role change ends the session", || !b.accepts(&fresh)).await;
    let t0 = Instant::now();
    UsersObject::new(shared("t-passwd").await)
        .edit(|u| u.remove("bob"))
        .await
        .unwrap();
    within_5s(t0, "a deleted account's session ends", || {
        !a.accepts(&bob) && !b.accepts(&bob)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_session_limit_holds_across_nodes() {
    import("t-limit", &["alice"]).await;
    let (a, b) = (
        Node::start("t-limit", 2).await,
        Node::start("t-limit", 2).await,
    );
    let t1 = a.login("alice").await;
    let t2 = b.login("alice").await;
    let t0 = Instant::now();
    // The third login, on A, evicts the oldest, made on A; the fourth, on B, the next.
    let t3 = a.login("alice").await;
    within_5s(t0, "the oldest session ends on both nodes", || {
        !a.accepts(&t1) && !b.accepts(&t1)
    })
    .await;
    let t0 = Instant::now();
    let t4 = b.login("alice").await;
    within_5s(t0, "the next oldest ends on both nodes", || {
        !a.accepts(&t2) && !b.accepts(&t2)
    })
    .await;
    for t in [&t3, &t4] {
        assert!(a.accepts(t) && b.accepts(t));
    }
    assert_eq!(a.sessions.list().await.unwrap().len(), 2);
}

/// What the README says about conditional requests on Garage: a conditional GET answers "not
/// modified" (the 2 s poll of the users object costs no transfer), but `If-Match` on
/// PutObject is not checked, so the users object's edits have a last-writer-wins window
/// there. When a Garage version starts refusing the stale write, this fails: update the
/// README and the `shared::users` notes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_answers_conditional_gets_but_does_not_check_if_match_on_put() {
    use object_store::{PutMode, UpdateVersion};
    let store = shared("t-ifmatch").await;
    let key = store.key(&["probe"]);
    let first = store
        .put(&key, b"one".to_vec(), PutMode::Overwrite)
        .await
        .unwrap();
    store
        .put(&key, b"two".to_vec(), PutMode::Overwrite)
        .await
        .unwrap();
    let stale = store
        .put(
            &key,
            b"three".to_vec(),
            PutMode::Update(UpdateVersion {
                e_tag: first,
                version: None,
            }),
        )
        .await;
    let now = store.e_tag(&key).await.unwrap();
    assert!(matches!(
        store.get(&key, now, 1024).await.unwrap(),
        xferd::shared::Fetched::NotModified
    ));
    assert!(
        stale.is_ok(),
        "Garage refused a write with a stale If-Match ({stale:?}): conditional writes work now"
    );
}

/// Runs the real `xferd` with `args`, `stdin` piped in, and no store credentials in its
/// environment (the config's credentials file is what it must use).
fn xferd(config: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    common::run_xferd(Path::new(common::XFERD), config, args, stdin, |c| {
        c.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY");
    })
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xferd_user_and_session_commands_work_on_the_store_in_s3_mode() {
    use std::os::unix::fs::PermissionsExt;
    let g = xfer_tests::cluster::garage().s3();
    let prefix = xfer_tests::cluster::test_prefix("t-cli");
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("s3.toml");
    std::fs::write(
        &creds,
        format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            g.access_key_id, g.secret_access_key
        ),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("xferd.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nkind = \"s3\"\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"{}\"\nallow_http = true\nprefix = \"{}\"\ncredentials_file = \"s3.toml\"\n",
            g.bucket, g.endpoint, g.region, prefix
        ),
    )
    .unwrap();
    let tls = xferd::tls::generate(&[]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &tls.cert_pem).unwrap();
    xfer_util::fs::write_atomic(
        &dir.path().join("key.pem"),
        tls.key_pem.as_bytes(),
        xfer_util::fs::Mode::KeepOr(0o600),
    )
    .unwrap();
    // The key every node gets a copy of.
    ok(&xferd(&config, &["session", "keygen"], ""));
    let key_file = dir.path().join("session.key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = xferd(&config, &["session", "keygen"], "");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // Nothing in the store yet: `check` says how to put accounts there.
    let check = xferd(&config, &["check"], "");
    assert!(!check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(stderr.contains("xferd user import"), "{stderr}");
    // The local users file goes into the store once.
    let mut local = xferd::accounts::UsersFile::default();
    local.add("alice", Role::User, "pw").unwrap();
    let users_file = dir.path().join("old-users.toml");
    local.save(&users_file).unwrap();
    let import = ["user", "import", users_file.to_str().unwrap()];
    assert!(ok(&xferd(&config, &import, "")).contains("imported 1"));
    let twice = xferd(&config, &import, "");
    assert!(String::from_utf8_lossy(&twice.stderr).contains("--replace"));
    ok(&xferd(
        &config,
        &["user", "add", "bob", "--password-stdin"],
        "pw\n",
    ));
    let listed = ok(&xferd(&config, &["user", "list"], ""));
    assert!(
        listed.contains("alice\tuser") && listed.contains("bob\tuser"),
        "{listed}"
    );
    assert!(ok(&xferd(&config, &["check"], "")).contains("2 users"));
    // A node with that key and store: bob logs in; the command line sees the session.
    let store = shared("t-cli").await;
    let settings = settings(10);
    let accounts = Accounts::from_store(
        UsersObject::new(store.clone()),
        settings.sync_interval(),
        1,
        4,
    )
    .await
    .unwrap();
    let sessions = SharedSessions::open(store, SessionKey::load(&key_file).unwrap(), &settings)
        .await
        .unwrap();
    let (_, generation) = accounts.lookup("bob").unwrap();
    let (token, _) = sessions
        .create_registered("bob", generation, "192.0.2.7:4000")
        .await
        .unwrap();
    let accepts = || {
        sessions
            .validate(&token, |u| accounts.lookup(u).map(|(_, g)| g))
            .is_some()
    };
    assert!(accepts());
    let listed = ok(&xferd(&config, &["session", "list"], ""));
    assert!(listed.contains("bob\t192.0.2.7:4000"), "{listed}");
    // `xferd user passwd` on the store ends it on the node within 5 s, and in the registry.
    let t0 = Instant::now();
    ok(&xferd(
        &config,
        &["user", "passwd", "bob", "--password-stdin"],
        "new\n",
    ));
    within_5s(t0, "the node refuses bob's old token", || !accepts()).await;
    assert!(
        ok(&xferd(&config, &["session", "list"], ""))
            .trim()
            .is_empty()
    );
    // `session revoke --user` and `user del` through the registry too.
    let (_, generation) = accounts.lookup("bob").unwrap();
    let (token2, _) = sessions
        .create_registered("bob", generation, "x")
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(ok(&xferd(&config, &["session", "revoke", "--user", "bob"], "")).contains("revoked 1"));
    within_5s(t0, "the node refuses the revoked token", || {
        sessions
            .validate(&token2, |u| accounts.lookup(u).map(|(_, g)| g))
            .is_none()
    })
    .await;
    assert!(ok(&xferd(&config, &["user", "del", "bob"], "")).contains("deleted `bob`"));
    within_5s(Instant::now(), "bob's account is gone on the node", || {
        accounts.lookup("bob").is_none()
    })
    .await;
    // A group-readable key is refused.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let check = xferd(&config, &["check"], "");
    assert!(String::from_utf8_lossy(&check.stderr).contains("chmod 600"));
}
