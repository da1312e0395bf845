//! Protocol-level end-to-end tests: what a misbehaving or hostile client can send, and what
//! the daemon guarantees in return, over real TLS to an in-process daemon.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_proto::connection::ConnError;
use xfer_proto::{ErrorCode, PROTOCOL_VERSION, Request, Response};
use xfer_tests::{
    RawConn, TestServer, client, raw_call as call, raw_connect, raw_hello, raw_login,
    raw_start_upload as start_upload, write_file,
};

/// A test server where alice already has `doc` containing "old".
fn server_with_old_doc() -> TestServer {
    let server = TestServer::start();
    write_file(&server.user_dir("alice").join("doc"), b"old");
    server
}

fn error_code(r: Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Sends `request` and checks that it is refused with `code`.
async fn expect_error(conn: &mut RawConn, request: Request, code: ErrorCode) {
    // Async functions cannot be #[track_caller]: the request says which call failed.
    let answer = error_code(call(conn, &request).await);
    assert_eq!(answer, code, "answer to {request:?}");
}

/// Sends a ping and checks the connection is still in step.
async fn expect_pong(conn: &mut RawConn) {
    assert_eq!(call(conn, &Request::Ping).await, Response::Ok);
}

async fn assert_closed(conn: &mut RawConn) {
    match conn.read_frame::<Response>().await {
        Err(ConnError::Closed) | Err(ConnError::Io(_)) | Err(ConnError::Truncated) => {}
        other => panic!("expected the server to close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_negotiated_down_and_too_old_ones_refused() {
    let server = TestServer::start();
    // A newer client is told which version to speak.
    let mut conn = raw_connect(&server).await;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION + 1,
        agent: "future".into(),
    };
    match call(&mut conn, &hello).await {
        Response::Hello { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
    // One older than the oldest supported is refused and disconnected.
    let mut conn = raw_connect(&server).await;
    let hello = Request::Hello {
        version: xfer_proto::MIN_PROTOCOL_VERSION - 1,
        agent: "past".into(),
    };
    match call(&mut conn, &hello).await {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::VersionMismatch);
            assert!(message.contains("version"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_closed(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_out_of_order_are_refused() {
    let server = TestServer::start();
    let list_root = || Request::List { path: "".into() };
    let mut conn = raw_connect(&server).await;
    expect_error(&mut conn, list_root(), ErrorCode::BadRequest).await;
    assert_closed(&mut conn).await;

    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    expect_error(&mut conn, list_root(), ErrorCode::NotAuthenticated).await;
    let shutdown = Request::Shutdown {
        password: "x".into(),
    };
    expect_error(&mut conn, shutdown, ErrorCode::NotAuthenticated).await;

    let mut conn = raw_login(&server, "alice").await;
    let stray_end = Request::UploadEnd { digest: [0; 32] };
    expect_error(&mut conn, stray_end, ErrorCode::BadRequest).await;
    assert_closed(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_that_connection_only() {
    let server = TestServer::start();
    let mut conn = raw_connect(&server).await;
    conn.get_mut()
        .write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    conn.get_mut().flush().await.unwrap();
    assert_eq!(
        error_code(conn.read_frame().await.unwrap()),
        ErrorCode::BadRequest
    );
    assert_closed(&mut conn).await;

    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    conn.get_mut()
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .unwrap();
    conn.get_mut().flush().await.unwrap();
    assert_eq!(
        error_code(conn.read_frame().await.unwrap()),
        ErrorCode::BadRequest
    );
    assert_closed(&mut conn).await;

    // The daemon still serves everyone else.
    let mut c = client(&server, "bob").await;
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failed_logins_close_the_connection() {
    let server = TestServer::start();
    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    let login = |password: String| Request::Login {
        user: "alice".into(),
        password,
    };
    for attempt in 1..=3 {
        let guess = login(format!("guess-{attempt}"));
        expect_error(&mut conn, guess, ErrorCode::AuthFailed).await;
    }
    assert_closed(&mut conn).await;
    // An over-long password is refused like a wrong one.
    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    expect_error(&mut conn, login("p".repeat(2000)), ErrorCode::AuthFailed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_mismatch_commits_nothing_and_keeps_the_old_version() {
    let server = server_with_old_doc();
    let mut conn = raw_login(&server, "alice").await;
    start_upload(&mut conn, "doc", 5).await;
    conn.get_mut().write_all(b"hello").await.unwrap();
    let wrong = Request::UploadEnd {
        digest: *blake3::hash(b"HELLO").as_bytes(),
    };
    expect_error(&mut conn, wrong, ErrorCode::VerificationFailed).await;
    assert_eq!(
        std::fs::read(server.user_dir("alice").join("doc")).unwrap(),
        b"old"
    );
    assert_eq!(std::fs::read_dir(server.tmp_dir()).unwrap().count(), 0);
    // The connection is still in step and usable.
    expect_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_upload_leaves_nothing_behind() {
    let server = server_with_old_doc();
    let mut conn = raw_login(&server, "alice").await;
    start_upload(&mut conn, "doc", 10 << 20).await;
    conn.get_mut().write_all(&vec![1u8; 3 << 20]).await.unwrap();
    conn.get_mut().flush().await.unwrap();
    drop(conn);
    let start = Instant::now();
    while std::fs::read_dir(server.tmp_dir()).unwrap().count() != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "temp file left behind"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        std::fs::read(server.user_dir("alice").join("doc")).unwrap(),
        b"old"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_to_one_name_leave_exactly_one_complete_winner() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = xfer_tests::noise(2 << 20, 1);
    let b = xfer_tests::noise(2 << 20, 2);
    let pa = dir.path().join("a");
    let pb = dir.path().join("b");
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    let mut ca = client(&server, "alice").await;
    let mut cb = client(&server, "alice").await;
    let (ra, rb) = tokio::join!(
        ca.upload(&pa, "same", true, Default::default()),
        cb.upload(&pb, "same", true, Default::default())
    );
    ra.unwrap();
    rb.unwrap();
    let stored = std::fs::read(server.user_dir("alice").join("same")).unwrap();
    assert!(stored == a || stored == b, "the file is one upload, whole");
    assert_eq!(std::fs::read_dir(server.tmp_dir()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_from_an_offset_sends_the_rest_and_the_whole_file_digest() {
    let server = TestServer::start();
    let data = xfer_tests::noise(700_000, 9);
    write_file(&server.user_dir("alice").join("f"), &data);
    let mut conn = raw_login(&server, "alice").await;
    let download = |offset| Request::Download {
        path: "f".into(),
        offset,
    };
    match call(&mut conn, &download(300_000)).await {
        Response::DownloadReady { size, offset, .. } => {
            assert_eq!((size, offset), (700_000, 300_000));
        }
        other => panic!("{other:?}"),
    }
    let mut rest = vec![0u8; 400_000];
    conn.get_mut().read_exact(&mut rest).await.unwrap();
    assert_eq!(rest, data[300_000..]);
    assert_eq!(
        conn.read_frame::<Response>().await.unwrap(),
        Response::DownloadEnd {
            digest: *blake3::hash(&data).as_bytes()
        }
    );
    expect_error(&mut conn, download(800_000), ErrorCode::BadRequest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_idle_clients_and_closes_them_at_once() {
    let mut server = TestServer::start();
    let mut idle = raw_login(&server, "alice").await;
    let mut before_login = raw_connect(&server).await;
    raw_hello(&mut before_login).await;
    let mut root = client(&server, "root").await;
    let started = Instant::now();
    root.shutdown("root-pw").await.unwrap();
    assert!(matches!(
        idle.read_frame::<Response>().await.unwrap(),
        Response::ShuttingDown { .. }
    ));
    assert_closed(&mut idle).await;
    assert!(matches!(
        before_login.read_frame::<Response>().await.unwrap(),
        Response::ShuttingDown { .. }
    ));
    server
        .wait(Duration::from_secs(8))
        .expect("daemon stopped")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_at_the_login_deadline() {
    let server = TestServer::start_with(|c| c.limits.login_timeout_secs = 1);
    let mut conn = raw_connect(&server).await;
    let started = Instant::now();
    let r = conn.read_frame::<Response>().await;
    assert!(
        matches!(
            r,
            Ok(Response::Error {
                code: ErrorCode::BadRequest,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_closed(&mut conn).await;
}

/// Bytes held in alice's partial uploads, once the daemon has let go of them all.
fn released(server: &TestServer) -> u64 {
    server.released_partial_bytes("alice", Duration::from_secs(30))
}

/// Starts an upload of 1000 bytes to `f` that accepts resuming from anywhere; returns the
/// server's answer.
async fn ask_to_resume(conn: &mut RawConn) -> Response {
    let upload = Request::Upload {
        path: "f".into(),
        size: 1000,
        offset: 1000,
    };
    call(conn, &upload).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_is_offered_back_by_digest_and_completed() {
    let server = TestServer::start();
    let data = xfer_tests::noise(1000, 5);
    let digest = *blake3::hash(&data).as_bytes();
    // First attempt: 400 bytes, then the connection drops.
    let mut conn = raw_login(&server, "alice").await;
    assert_eq!(
        ask_to_resume(&mut conn).await,
        Response::UploadReady { offset: 0 }
    );
    conn.get_mut().write_all(&data[..400]).await.unwrap();
    conn.get_mut().flush().await.unwrap();
    drop(conn);
    assert_eq!(released(&server), 400);

    // An offset outside {0, held} is a protocol error.
    let offer = Response::UploadResume {
        offset: 400,
        prefix: *blake3::hash(&data[..400]).as_bytes(),
    };
    let mut conn = raw_login(&server, "alice").await;
    assert_eq!(ask_to_resume(&mut conn).await, offer);
    let odd = Request::UploadFrom { offset: 7 };
    expect_error(&mut conn, odd, ErrorCode::BadRequest).await;
    assert_closed(&mut conn).await;
    assert_eq!(released(&server), 400, "a refused answer keeps the data");

    // Accepting the offer: only bytes 400.. travel, and the whole file is verified.
    let mut conn = raw_login(&server, "alice").await;
    assert_eq!(ask_to_resume(&mut conn).await, offer);
    conn.write_frame(&Request::UploadFrom { offset: 400 })
        .await
        .unwrap();
    conn.get_mut().write_all(&data[400..]).await.unwrap();
    assert_eq!(
        call(&mut conn, &Request::UploadEnd { digest }).await,
        Response::UploadDone { size: 1000, digest }
    );
    assert_eq!(
        std::fs::read(server.user_dir("alice").join("f")).unwrap(),
        data
    );
    assert_eq!(released(&server), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_client_is_never_offered_a_resume() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    start_upload(&mut conn, "f", 100).await;
    conn.get_mut().write_all(&[1u8; 50]).await.unwrap();
    conn.get_mut().flush().await.unwrap();
    drop(conn);
    assert_eq!(released(&server), 50);
    let mut conn = raw_connect(&server).await;
    let hello = Request::Hello {
        version: 1,
        agent: "old".into(),
    };
    match call(&mut conn, &hello).await {
        Response::Hello { version, .. } => assert_eq!(version, 1),
        other => panic!("{other:?}"),
    }
    let login = Request::Login {
        user: "alice".into(),
        password: xfer_tests::password_of("alice").into(),
    };
    assert!(matches!(
        call(&mut conn, &login).await,
        Response::LoggedIn { .. }
    ));
    let resumable = Request::Upload {
        path: "f".into(),
        size: 100,
        offset: 100,
    };
    assert_eq!(
        call(&mut conn, &resumable).await,
        Response::UploadReady { offset: 0 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_only_when_the_prefix_digest_matches() {
    let server = TestServer::start();
    let data = xfer_tests::noise(5000, 6);
    let mut conn = raw_login(&server, "alice").await;
    std::fs::write(server.user_dir("alice").join("f"), &data).unwrap();
    for (prefix, expect) in [(&data[..1234], 1234u64), (&data[1..1235], 0)] {
        let resume = Request::DownloadFrom {
            path: "f".into(),
            offset: 1234,
            prefix: *blake3::hash(prefix).as_bytes(),
        };
        match call(&mut conn, &resume).await {
            Response::DownloadReady { size, offset, .. } => {
                assert_eq!((size, offset), (5000, expect));
            }
            other => panic!("{other:?}"),
        }
        let mut body = vec![0u8; (5000 - expect) as usize];
        conn.get_mut().read_exact(&mut body).await.unwrap();
        assert_eq!(body, data[expect as usize..]);
        assert_eq!(
            conn.read_frame::<Response>().await.unwrap(),
            Response::DownloadEnd {
                digest: *blake3::hash(&data).as_bytes()
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_folder_streams_in_full_frames_and_ends_once() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    let dir = server.user_dir("alice").join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..300 {
        std::fs::write(dir.join(format!("f{i:03}")), b"").unwrap();
    }
    conn.write_frame(&Request::List {
        path: "many".into(),
    })
    .await
    .unwrap();
    let mut sizes = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    loop {
        match conn.read_frame::<Response>().await.unwrap() {
            Response::Entries { entries, done } => {
                sizes.push(entries.len());
                names.extend(entries.into_iter().map(|e| e.name));
                if done {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sizes, [128, 128, 44]);
    assert_eq!(names.len(), 300);
    // The connection is in step afterwards.
    expect_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_that_would_build_a_tree_past_64_levels_is_refused() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    // `deep` reaches 60 levels below the root; `b/1/2/3/4` is 5 levels down.
    let chain: Vec<String> = (1..60).map(|i| i.to_string()).collect();
    let deep = server.user_dir("alice").join("deep").join(chain.join("/"));
    std::fs::create_dir_all(deep).unwrap();
    std::fs::create_dir_all(server.user_dir("alice").join("b/1/2/3/4")).unwrap();
    let rename = Request::Rename {
        from: "deep".into(),
        to: "b/1/2/3/4".into(),
    };
    match call(&mut conn, &rename).await {
        Response::Error {
            code: ErrorCode::InvalidPath,
            message,
        } => assert!(
            message.contains("65 levels deep") && message.contains("limited to 64 levels"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(server.user_dir("alice").join("deep").is_dir());
    // One level higher fits exactly.
    let rename = Request::Rename {
        from: "deep".into(),
        to: "b/1/2/3".into(),
    };
    assert_eq!(call(&mut conn, &rename).await, Response::Ok);
}
