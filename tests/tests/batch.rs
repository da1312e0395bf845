//! Batched uploads (protocol 3, `Put` and `Commit`) spoken by hand against an in-process
//! daemon: pipelined puts answered in order, errors that keep the connection in step,
//! nothing visible before a commit, nothing left behind without one, the daemon's own
//! commit at its batch limit, and version 2 clients served as before.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use xfer_proto::connection::ConnError;
use xfer_proto::{Digest, ErrorCode, Request, Response};
use xfer_tests::{RawConn, TestServer, raw_call as call, raw_connect, raw_log_in, raw_login};

fn digest(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// Sends a `Put` frame and its body without reading the answer.
async fn send_put(conn: &mut RawConn, path: &str, data: &[u8], claimed: Digest) {
    conn.queue_frame(&Request::Put {
        path: path.into(),
        size: data.len() as u64,
        digest: claimed,
    })
    .await
    .unwrap();
    conn.get_mut().write_all(data).await.unwrap();
}

async fn answer(conn: &mut RawConn) -> Response {
    conn.read_frame().await.unwrap()
}

fn error_code(r: Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Files in the daemon's temp folder (where staged puts live).
fn staged_files(server: &TestServer) -> usize {
    std::fs::read_dir(server.tmp_dir()).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_puts_are_answered_in_order_and_visible_only_after_commit() {
    let server = TestServer::start();
    let dir = server.user_dir("alice");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("old"), b"old version").unwrap();
    let mut conn = raw_login(&server, "alice").await;
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let data = xfer_tests::noise(i * 97 % 5000, i as u64);
            (format!("d{}/sub/f{i}", i % 3), data)
        })
        .chain([("old".to_string(), b"new version".to_vec())])
        .collect();
    // Every frame and body first, then the answers: the server must not wait for reads.
    for (path, data) in &files {
        send_put(&mut conn, path, data, digest(data)).await;
    }
    conn.flush().await.unwrap();
    for (_, data) in &files {
        assert_eq!(
            answer(&mut conn).await,
            Response::UploadDone {
                size: data.len() as u64,
                digest: digest(data)
            }
        );
    }
    // Staged, not visible: the old version is intact and no new folder holds a file yet.
    assert_eq!(std::fs::read(dir.join("old")).unwrap(), b"old version");
    assert!(!dir.join("d0/sub/f0").exists());
    assert_eq!(staged_files(&server), files.len());
    assert_eq!(
        call(&mut conn, &Request::Commit).await,
        Response::Committed {
            files: files.len() as u64
        }
    );
    for (path, data) in &files {
        assert_eq!(&std::fs::read(dir.join(path)).unwrap(), data, "{path}");
    }
    assert_eq!(staged_files(&server), 0);
    // An empty commit commits nothing.
    assert_eq!(
        call(&mut conn, &Request::Commit).await,
        Response::Committed { files: 0 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_put_mid_batch_is_refused_and_the_connection_stays_in_step() {
    let server = TestServer::start();
    let dir = server.user_dir("alice");
    std::fs::create_dir_all(dir.join("folder")).unwrap();
    std::fs::write(dir.join("plain"), b"x").unwrap();
    let mut conn = raw_login(&server, "alice").await;
    let good = b"good".to_vec();
    let bad = b"corrupted on the way".to_vec();
    send_put(&mut conn, "a", &good, digest(&good)).await;
    send_put(&mut conn, "../escape", &good, digest(&good)).await;
    send_put(&mut conn, "folder", &good, digest(&good)).await;
    send_put(&mut conn, "plain/below", &good, digest(&good)).await;
    send_put(&mut conn, "mismatch", &bad, digest(b"something else")).await;
    send_put(&mut conn, "b", &good, digest(&good)).await;
    conn.flush().await.unwrap();
    assert!(matches!(
        answer(&mut conn).await,
        Response::UploadDone { .. }
    ));
    assert_eq!(error_code(answer(&mut conn).await), ErrorCode::InvalidPath);
    assert_eq!(error_code(answer(&mut conn).await), ErrorCode::WrongKind);
    assert_eq!(error_code(answer(&mut conn).await), ErrorCode::WrongKind);
    assert_eq!(
        error_code(answer(&mut conn).await),
        ErrorCode::VerificationFailed
    );
    assert!(matches!(
        answer(&mut conn).await,
        Response::UploadDone { .. }
    ));
    assert_eq!(
        call(&mut conn, &Request::Commit).await,
        Response::Committed { files: 2 }
    );
    assert_eq!(std::fs::read(dir.join("a")).unwrap(), good);
    assert_eq!(std::fs::read(dir.join("b")).unwrap(), good);
    assert!(
        !dir.join("mismatch").exists(),
        "a bad digest commits nothing"
    );
    assert!(!server.user_dir("escape").exists());
    assert_eq!(staged_files(&server), 0);
    assert_eq!(call(&mut conn, &Request::Ping).await, Response::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_over_the_size_limit_is_a_protocol_error() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    conn.write_frame(&Request::Put {
        path: "big".into(),
        size: xfer_proto::limits::MAX_PUT_LEN + 1,
        digest: [0; 32],
    })
    .await
    .unwrap();
    assert_eq!(error_code(answer(&mut conn).await), ErrorCode::BadRequest);
    assert!(matches!(
        conn.read_frame::<Response>().await,
        Err(ConnError::Closed | ConnError::Io(_) | ConnError::Truncated)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_without_commit_leaves_nothing() {
    let server = TestServer::start();
    let dir = server.user_dir("alice");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep"), b"old").unwrap();
    let mut conn = raw_login(&server, "alice").await;
    for i in 0..10 {
        let data = format!("file {i}").into_bytes();
        send_put(&mut conn, &format!("n{i}"), &data, digest(&data)).await;
    }
    let data = b"new".to_vec();
    send_put(&mut conn, "keep", &data, digest(&data)).await;
    conn.flush().await.unwrap();
    for _ in 0..11 {
        assert!(matches!(
            answer(&mut conn).await,
            Response::UploadDone { .. }
        ));
    }
    assert_eq!(staged_files(&server), 11);
    drop(conn);
    // The daemon notices the close and drops the batch.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while staged_files(&server) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(staged_files(&server), 0, "staged files are deleted");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["keep"]);
    assert_eq!(std::fs::read(dir.join("keep")).unwrap(), b"old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_commits_by_itself_at_the_batch_limit_and_before_other_requests() {
    let server = TestServer::start_with(|c| c.limits.max_batch_files = 3);
    let dir = server.user_dir("alice");
    let mut conn = raw_login(&server, "alice").await;
    for i in 0..3 {
        let data = vec![i as u8; 10];
        send_put(&mut conn, &format!("f{i}"), &data, digest(&data)).await;
    }
    conn.flush().await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            answer(&mut conn).await,
            Response::UploadDone { .. }
        ));
    }
    // The batch reached its limit: the daemon commits it without being asked.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(0..3).all(|i| dir.join(format!("f{i}")).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no commit at the limit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(staged_files(&server), 0);
    // Below the limit a file waits for a commit.
    let data = vec![3; 10];
    send_put(&mut conn, "f3", &data, digest(&data)).await;
    conn.flush().await.unwrap();
    assert!(matches!(
        answer(&mut conn).await,
        Response::UploadDone { .. }
    ));
    assert!(!dir.join("f3").exists());
    assert_eq!(staged_files(&server), 1);
    // Any other request commits first: the listing sees the fourth.
    conn.write_frame(&Request::List { path: "".into() })
        .await
        .unwrap();
    match answer(&mut conn).await {
        Response::Entries {
            entries,
            done: true,
        } => assert_eq!(entries.len(), 4),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        call(&mut conn, &Request::Commit).await,
        Response::Committed { files: 4 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_connection_gets_todays_protocol() {
    let server = TestServer::start();
    let mut conn = raw_connect(&server).await;
    match call(
        &mut conn,
        &Request::Hello {
            version: 2,
            agent: "old".into(),
        },
    )
    .await
    {
        Response::Hello { version, .. } => assert_eq!(version, 2),
        other => panic!("{other:?}"),
    }
    raw_log_in(&mut conn, "alice", xfer_tests::password_of("alice")).await;
    // Today's upload works as before.
    xfer_tests::raw_start_upload(&mut conn, "f", 3).await;
    conn.get_mut().write_all(b"abc").await.unwrap();
    let reply = call(
        &mut conn,
        &Request::UploadEnd {
            digest: digest(b"abc"),
        },
    )
    .await;
    assert_eq!(
        reply,
        Response::UploadDone {
            size: 3,
            digest: digest(b"abc")
        }
    );
    // Put is not version 2: refused, and the connection closed.
    let reply = call(&mut conn, &Request::Commit).await;
    assert_eq!(error_code(reply), ErrorCode::BadRequest);
    assert!(conn.read_frame::<Response>().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_staged_under_an_ended_session_are_never_committed_into_the_next_one() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    let data = b"alice's".to_vec();
    send_put(&mut conn, "mine", &data, digest(&data)).await;
    conn.flush().await.unwrap();
    assert!(matches!(
        answer(&mut conn).await,
        Response::UploadDone { .. }
    ));
    // Alice's account goes away, which ends her session on `conn`.
    server.edit_users(|users| {
        users.users.remove("alice");
    });
    // The next request (any) settles the batch under its own, ended, session: nothing is
    // committed. Then bob logs in on the same connection, and his commit reports it.
    assert_eq!(call(&mut conn, &Request::Ping).await, Response::Ok);
    let reply = call(
        &mut conn,
        &Request::Login {
            user: "bob".into(),
            password: xfer_tests::password_of("bob").into(),
        },
    )
    .await;
    assert!(matches!(reply, Response::LoggedIn { .. }), "{reply:?}");
    let reply = call(&mut conn, &Request::Commit).await;
    assert_eq!(error_code(reply), ErrorCode::SessionExpired);
    assert!(!server.user_dir("bob").join("mine").exists());
    assert!(!server.user_dir("alice").join("mine").exists());
    assert_eq!(staged_files(&server), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_refused_before_login_still_has_its_body_read() {
    let server = TestServer::start();
    let mut conn = raw_connect(&server).await;
    xfer_tests::raw_hello(&mut conn).await;
    let data = b"Ping? no, a body".to_vec();
    send_put(&mut conn, "f", &data, digest(&data)).await;
    conn.flush().await.unwrap();
    assert_eq!(
        error_code(answer(&mut conn).await),
        ErrorCode::NotAuthenticated
    );
    assert_eq!(call(&mut conn, &Request::Ping).await, Response::Ok);
}
