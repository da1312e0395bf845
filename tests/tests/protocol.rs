//! Protocol-level end-to-end tests: what a misbehaving or hostile client can send, and what
//! the daemon guarantees in return, over real TLS to an in-process daemon.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_proto::connection::ConnError;
use xfer_proto::{ErrorCode, PROTOCOL_VERSION, Request, Response};
use xfer_tests::{
    RawConn, TestServer, client, raw_call as call, raw_connect, raw_hello, raw_log_in, raw_login,
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

/// Reads one whole `List` answer (it may span frames); the names, sorted.
async fn read_listing(conn: &mut RawConn) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        match conn.read_frame::<Response>().await.unwrap() {
            Response::Entries { entries, done } => {
                names.extend(entries.into_iter().map(|e| e.name));
                if done {
                    names.sort();
                    return names;
                }
            }
            other => panic!("expected a listing, got {other:?}"),
        }
    }
}

/// Reads one whole successful `Download` answer: header, body and trailer; checks the digest.
async fn read_download(conn: &mut RawConn) -> Vec<u8> {
    let size = match conn.read_frame::<Response>().await.unwrap() {
        Response::DownloadReady { size, offset, .. } => {
            assert_eq!(offset, 0);
            size
        }
        other => panic!("expected DownloadReady, got {other:?}"),
    };
    let mut body = vec![0u8; size as usize];
    conn.get_mut().read_exact(&mut body).await.unwrap();
    match conn.read_frame::<Response>().await.unwrap() {
        Response::DownloadEnd { digest } => assert_eq!(digest, *blake3::hash(&body).as_bytes()),
        other => panic!("expected DownloadEnd, got {other:?}"),
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_downloads_sent_in_one_write_are_answered_in_order() {
    let server = TestServer::start();
    let root = server.user_dir("alice");
    let small = xfer_tests::noise(4096, 1);
    // Bigger than one body buffer: this one goes through the daemon's body pipeline.
    let big = xfer_tests::noise(700_000, 2);
    write_file(&root.join("d/a"), &small);
    write_file(&root.join("d/empty"), b"");
    write_file(&root.join("d/sub/big"), &big);
    write_file(&root.join("d/sub/tricky"), &xfer_tests::tricky_bytes());
    let mut conn = raw_login(&server, "alice").await;
    let requests = [
        Request::List { path: "d".into() },
        Request::Download {
            path: "d/a".into(),
            offset: 0,
        },
        Request::Download {
            path: "d/missing".into(),
            offset: 0,
        },
        Request::List {
            path: "d/sub".into(),
        },
        Request::Download {
            path: "d/sub/big".into(),
            offset: 0,
        },
        Request::Download {
            path: "d/empty".into(),
            offset: 0,
        },
        Request::Download {
            path: "d/sub".into(),
            offset: 0,
        },
        Request::Download {
            path: "d/sub/tricky".into(),
            offset: 0,
        },
        Request::Ping,
    ];
    let mut wire = Vec::new();
    for r in &requests {
        xfer_proto::frame::encode_frame(r, &mut wire).unwrap();
    }
    conn.get_mut().write_all(&wire).await.unwrap();
    conn.get_mut().flush().await.unwrap();

    assert_eq!(read_listing(&mut conn).await, ["a", "empty", "sub"]);
    assert_eq!(read_download(&mut conn).await, small);
    let missing = conn.read_frame::<Response>().await.unwrap();
    assert_eq!(error_code(missing), ErrorCode::NotFound);
    assert_eq!(read_listing(&mut conn).await, ["big", "tricky"]);
    assert_eq!(read_download(&mut conn).await, big);
    assert_eq!(read_download(&mut conn).await, b"");
    let folder = conn.read_frame::<Response>().await.unwrap();
    assert_eq!(error_code(folder), ErrorCode::WrongKind);
    assert_eq!(read_download(&mut conn).await, xfer_tests::tricky_bytes());
    assert_eq!(conn.read_frame::<Response>().await.unwrap(), Response::Ok);
    // Nothing more was sent, and the connection is still in step.
    expect_pong(&mut conn).await;
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
    let mut conn = login_speaking(&server, 1).await;
    xfer_tests::raw_start_upload_up_to(&mut conn, "f", 100, 100).await;
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

// ---------------------------------------------------------------------------------------------
// What proto/README.md promises for each request, pinned: the answers, the error codes, and
// which errors close the connection (its table "Errors by request").
// ---------------------------------------------------------------------------------------------

/// Sends `request`, checks it is refused with `code`, and returns the message.
async fn refused_with(conn: &mut RawConn, request: Request, code: ErrorCode) -> String {
    match call(conn, &request).await {
        Response::Error { code: got, message } => {
            assert_eq!(got, code, "answer to {request:?}: {message}");
            message
        }
        other => panic!("expected {code:?} for {request:?}, got {other:?}"),
    }
}

/// Hello with protocol `version`, then alice's login.
async fn login_speaking(server: &TestServer, version: u16) -> RawConn {
    let mut conn = raw_connect(server).await;
    let hello = Request::Hello {
        version,
        agent: "old".into(),
    };
    assert!(matches!(
        call(&mut conn, &hello).await,
        Response::Hello { version: v, .. } if v == version
    ));
    raw_log_in(&mut conn, "alice", xfer_tests::password_of("alice")).await;
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_about_a_frame_sized_path_still_fits_in_a_frame() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    // The largest legal frame: tag (1 byte) + length (3-byte varint) + 65,532 bytes of path.
    let list = Request::List {
        path: "x".repeat(xfer_proto::limits::MAX_FRAME_LEN - 4),
    };
    let mut frame = Vec::new();
    xfer_proto::frame::encode_frame(&list, &mut frame).unwrap();
    assert_eq!(frame.len(), 4 + xfer_proto::limits::MAX_FRAME_LEN);
    let message = refused_with(&mut conn, list, ErrorCode::InvalidPath).await;
    assert!(
        message.len() <= xfer_proto::limits::MAX_MESSAGE_LEN,
        "{}",
        message.len()
    );
    assert!(
        message.contains("longer than"),
        "the reason survives the cut: {message}"
    );
    expect_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_deadline_is_named_for_what_passed() {
    let server = TestServer::start_with(|c| {
        c.limits.frame_timeout_secs = 1;
        c.limits.idle_timeout_secs = 2;
    });
    let closing_message = |r: Response| match r {
        Response::Error {
            code: ErrorCode::BadRequest,
            message,
        } => message,
        other => panic!("expected a closing BadRequest, got {other:?}"),
    };
    // Half a frame after login: the frame deadline, not the login one.
    let mut conn = raw_login(&server, "alice").await;
    conn.get_mut().write_all(&[0, 0]).await.unwrap();
    conn.get_mut().flush().await.unwrap();
    let message = closing_message(conn.read_frame().await.unwrap());
    assert!(message.contains("frame deadline"), "{message}");
    assert!(!message.contains("login"), "{message}");
    assert_closed(&mut conn).await;
    // The same before login (the login deadline is 30 s away).
    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    conn.get_mut().write_all(&[0, 0, 0]).await.unwrap();
    conn.get_mut().flush().await.unwrap();
    let message = closing_message(conn.read_frame().await.unwrap());
    assert!(message.contains("frame deadline"), "{message}");
    assert_closed(&mut conn).await;
    // Nothing at all after login: idle.
    let mut conn = raw_login(&server, "alice").await;
    let message = closing_message(conn.read_frame().await.unwrap());
    assert!(message.contains("idle timeout"), "{message}");
    assert_closed(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_that_keep_the_connection_open() {
    let server = server_with_old_doc();
    let mut conn = raw_login(&server, "alice").await;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        agent: "again".into(),
    };
    refused_with(&mut conn, hello, ErrorCode::BadRequest).await;
    expect_pong(&mut conn).await;
    let past_the_end = Request::Download {
        path: "doc".into(),
        offset: 4,
    };
    refused_with(&mut conn, past_the_end, ErrorCode::BadRequest).await;
    expect_pong(&mut conn).await;
    // A second login on a logged-in connection is refused; the session stays as it was.
    let login = Request::Login {
        user: "bob".into(),
        password: xfer_tests::password_of("bob").into(),
    };
    let message = refused_with(&mut conn, login.clone(), ErrorCode::BadRequest).await;
    assert!(message.contains("already logged in as alice"), "{message}");
    let token = Request::Authenticate {
        token: "xfer1_whatever".into(),
    };
    refused_with(&mut conn, token, ErrorCode::BadRequest).await;
    match call(&mut conn, &Request::WhoAmI).await {
        Response::Session(info) => assert_eq!(info.user, "alice"),
        other => panic!("{other:?}"),
    }
    // After Logout the connection may log in again (within its login deadline).
    assert_eq!(call(&mut conn, &Request::Logout).await, Response::Ok);
    refused_with(&mut conn, Request::WhoAmI, ErrorCode::NotAuthenticated).await;
    assert!(matches!(
        call(&mut conn, &login).await,
        Response::LoggedIn { session, .. } if session.user == "bob"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_a_revoked_session_is_allowed() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    // Revoked elsewhere (`xferd session revoke --user alice`).
    assert_eq!(
        server
            .state
            .sessions
            .revoke_matching(None, Some("alice"))
            .await
            .unwrap(),
        1
    );
    raw_log_in(&mut conn, "alice", xfer_tests::password_of("alice")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_connection_cannot_send_version_2_requests() {
    let server = server_with_old_doc();
    let mut conn = login_speaking(&server, 1).await;
    let resume = Request::DownloadFrom {
        path: "doc".into(),
        offset: 1,
        prefix: *blake3::hash(b"o").as_bytes(),
    };
    let message = refused_with(&mut conn, resume.clone(), ErrorCode::BadRequest).await;
    assert!(message.contains("version 2"), "{message}");
    assert_closed(&mut conn).await;
    let mut conn = login_speaking(&server, 1).await;
    refused_with(
        &mut conn,
        Request::UploadFrom { offset: 0 },
        ErrorCode::BadRequest,
    )
    .await;
    assert_closed(&mut conn).await;
    // Version 2 may.
    let mut conn = login_speaking(&server, 2).await;
    assert!(matches!(
        call(&mut conn, &resume).await,
        Response::DownloadReady {
            size: 3,
            offset: 1,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_works_once_greeted_and_rate_limited_closes() {
    let server = TestServer::start_with(|c| c.penalties.threshold_secs = 0);
    let mut conn = raw_connect(&server).await;
    refused_with(&mut conn, Request::Ping, ErrorCode::BadRequest).await;
    assert_closed(&mut conn).await;
    let mut conn = raw_connect(&server).await;
    raw_hello(&mut conn).await;
    expect_pong(&mut conn).await;
    // One failed login puts this source over a zero threshold; the next login is refused
    // without a password check, and the connection closed.
    let login = |password: &str| Request::Login {
        user: "alice".into(),
        password: password.into(),
    };
    refused_with(&mut conn, login("guess"), ErrorCode::AuthFailed).await;
    expect_pong(&mut conn).await;
    let pw = xfer_tests::password_of("alice");
    let message = refused_with(&mut conn, login(pw), ErrorCode::RateLimited).await;
    assert!(message.contains("try again in"), "{message}");
    assert_closed(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_errors_by_role_and_password() {
    let server = TestServer::start();
    let shutdown = |password: &str| Request::Shutdown {
        password: password.into(),
    };
    let mut conn = raw_login(&server, "alice").await;
    let pw = xfer_tests::password_of("alice");
    refused_with(&mut conn, shutdown(pw), ErrorCode::PermissionDenied).await;
    expect_pong(&mut conn).await;
    let mut conn = raw_login(&server, "root").await;
    refused_with(&mut conn, shutdown("guess"), ErrorCode::AuthFailed).await;
    expect_pong(&mut conn).await;
    assert!(server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkdir_makes_missing_parents_accepts_a_folder_and_refuses_a_file() {
    let server = server_with_old_doc();
    let home = server.user_dir("alice");
    let mut conn = raw_login(&server, "alice").await;
    let mkdir = |path: &str| Request::Mkdir { path: path.into() };
    assert_eq!(call(&mut conn, &mkdir("a/b/c")).await, Response::Ok);
    assert!(home.join("a/b/c").is_dir());
    assert_eq!(call(&mut conn, &mkdir("a/b")).await, Response::Ok);
    refused_with(&mut conn, mkdir("doc"), ErrorCode::WrongKind).await;
    refused_with(&mut conn, mkdir("doc/sub"), ErrorCode::WrongKind).await;
    refused_with(&mut conn, mkdir(""), ErrorCode::InvalidPath).await;
    expect_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_replaces_a_file_moves_into_a_folder_and_never_into_itself() {
    let server = TestServer::start();
    let home = server.user_dir("alice");
    for (name, content) in [("f", "f"), ("g", "g"), ("d/x", "x"), ("e/keep", "k")] {
        write_file(&home.join(name), content.as_bytes());
    }
    std::fs::create_dir_all(home.join("d2/e")).unwrap();
    let mut conn = raw_login(&server, "alice").await;
    let rename = |from: &str, to: &str| Request::Rename {
        from: from.into(),
        to: to.into(),
    };
    // Onto a file: replaced, as `mv` does.
    assert_eq!(call(&mut conn, &rename("f", "g")).await, Response::Ok);
    assert_eq!(std::fs::read(home.join("g")).unwrap(), b"f");
    assert!(!home.join("f").exists());
    // Onto a folder: moved into it.
    assert_eq!(call(&mut conn, &rename("g", "d")).await, Response::Ok);
    assert_eq!(std::fs::read(home.join("d/g")).unwrap(), b"f");
    // Onto itself: a file is left as it is; a folder cannot go into itself.
    assert_eq!(call(&mut conn, &rename("d/g", "d/g")).await, Response::Ok);
    refused_with(&mut conn, rename("d", "d"), ErrorCode::WrongKind).await;
    refused_with(&mut conn, rename("d", "d/x2"), ErrorCode::WrongKind).await;
    // A folder never replaces a file, and never replaces a folder.
    let message = refused_with(&mut conn, rename("e", "d/x"), ErrorCode::WrongKind).await;
    assert!(
        message.contains("`d/x`"),
        "names the file in the way: {message}"
    );
    refused_with(&mut conn, rename("e", "d2"), ErrorCode::AlreadyExists).await;
    assert_eq!(std::fs::read(home.join("e/keep")).unwrap(), b"k");
    // Missing source, missing target folder, and the root.
    refused_with(&mut conn, rename("nope", "n2"), ErrorCode::NotFound).await;
    refused_with(&mut conn, rename("e", "nope/e"), ErrorCode::NotFound).await;
    refused_with(&mut conn, rename("", "r"), ErrorCode::InvalidPath).await;
    refused_with(&mut conn, rename("e", ""), ErrorCode::InvalidPath).await;
    expect_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_of_a_file_is_its_one_entry_and_the_empty_path_is_the_root_only_for_list() {
    let server = server_with_old_doc();
    let mut conn = raw_login(&server, "alice").await;
    match call(&mut conn, &Request::List { path: "doc".into() }).await {
        Response::Entries { entries, done } => {
            assert!(done);
            assert_eq!(entries.len(), 1);
            assert_eq!(
                (entries[0].name.as_str(), entries[0].kind, entries[0].size),
                ("doc", xfer_proto::EntryKind::File, 3)
            );
        }
        other => panic!("{other:?}"),
    }
    match call(&mut conn, &Request::List { path: "".into() }).await {
        Response::Entries { entries, done } => {
            assert!(done);
            assert_eq!(entries.len(), 1, "{entries:?}");
        }
        other => panic!("{other:?}"),
    }
    refused_with(
        &mut conn,
        Request::List {
            path: "nope".into(),
        },
        ErrorCode::NotFound,
    )
    .await;
    // Every other request needs a name.
    let root = || String::new();
    for request in [
        Request::Delete { path: root() },
        Request::Upload {
            path: root(),
            size: 0,
            offset: 0,
        },
        Request::Download {
            path: root(),
            offset: 0,
        },
        Request::Mkdir { path: root() },
    ] {
        refused_with(&mut conn, request, ErrorCode::InvalidPath).await;
    }
    // Files and folders in the wrong place.
    std::fs::create_dir(server.user_dir("alice").join("dir")).unwrap();
    let download_dir = Request::Download {
        path: "dir".into(),
        offset: 0,
    };
    refused_with(&mut conn, download_dir, ErrorCode::WrongKind).await;
    let upload_onto_dir = Request::Upload {
        path: "dir".into(),
        size: 1,
        offset: 0,
    };
    refused_with(&mut conn, upload_onto_dir, ErrorCode::WrongKind).await;
    let upload_no_parent = Request::Upload {
        path: "nope/f".into(),
        size: 1,
        offset: 0,
    };
    refused_with(&mut conn, upload_no_parent, ErrorCode::NotFound).await;
    write_file(&server.user_dir("alice").join("dir/f"), b"");
    refused_with(
        &mut conn,
        Request::Delete { path: "dir".into() },
        ErrorCode::NotEmpty,
    )
    .await;
    refused_with(
        &mut conn,
        Request::Delete {
            path: "nope".into(),
        },
        ErrorCode::NotFound,
    )
    .await;
    expect_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_of_long_names_that_are_not_utf8_still_lists_in_frames_that_fit() {
    use std::os::unix::ffi::OsStrExt;
    let server = TestServer::start();
    let dir = server.user_dir("alice").join("odd");
    std::fs::create_dir_all(&dir).unwrap();
    // Planted by a local process: 255 bytes that are not UTF-8 come out as 255 U+FFFD, 765
    // bytes each; 128 of them (a full frame's count) would need about 100 KB.
    for i in 0..200u8 {
        let mut name = vec![0xff; 255];
        name[0] = b'a' + i % 26;
        name[1] = b'a' + i / 26;
        std::fs::write(dir.join(std::ffi::OsStr::from_bytes(&name)), b"").unwrap();
    }
    let mut conn = raw_login(&server, "alice").await;
    conn.write_frame(&Request::List { path: "odd".into() })
        .await
        .unwrap();
    let mut count = 0;
    loop {
        match conn.read_frame::<Response>().await.unwrap() {
            Response::Entries { entries, done } => {
                count += entries.len();
                if done {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(count, 200);
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
