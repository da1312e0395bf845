//! Protocol-level tests of the reader role and the `Account` request: what a version 1 or 2
//! peer is told of a reader, which requests a reader may send, and that a refused `Put` keeps
//! the stream in step.

use tokio::io::AsyncWriteExt;
use xfer_proto::{ErrorCode, Request, Response, Role};
use xfer_tests::{RawConn, TestServer, raw_call as call, raw_connect};

/// A server with the reader `carol`.
fn server_with_reader() -> TestServer {
    let server = TestServer::start();
    server.edit_users(|u| u.add("carol", Role::Reader, "carol-pw").unwrap());
    server
}

/// Greets speaking `version`, logs carol in, and returns the role the server reported.
async fn carol_speaking(server: &TestServer, version: u16) -> (RawConn, Role) {
    let mut conn = raw_connect(server).await;
    let hello = Request::Hello {
        version,
        agent: "roles-test".into(),
    };
    assert!(matches!(
        call(&mut conn, &hello).await,
        Response::Hello { .. }
    ));
    let login = Request::Login {
        user: "carol".into(),
        password: "carol-pw".into(),
    };
    match call(&mut conn, &login).await {
        Response::LoggedIn { session, .. } => (conn, session.role),
        other => panic!("login: {other:?}"),
    }
}

fn code_of(r: Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_peers_see_a_reader_as_a_user_and_the_server_still_refuses_its_writes() {
    let server = server_with_reader();
    for version in [1, 2] {
        let (mut conn, role) = carol_speaking(&server, version).await;
        assert_eq!(role, Role::User, "version {version}");
        match call(&mut conn, &Request::WhoAmI).await {
            Response::Session(info) => assert_eq!(info.role, Role::User),
            other => panic!("{other:?}"),
        }
        let mkdir = Request::Mkdir { path: "x".into() };
        assert_eq!(
            code_of(call(&mut conn, &mkdir).await),
            ErrorCode::PermissionDenied
        );
        // `Account` is a version 3 request: refused, and the connection closed.
        assert_eq!(
            code_of(call(&mut conn, &Request::Account).await),
            ErrorCode::BadRequest
        );
        assert!(conn.read_frame::<Response>().await.is_err(), "closed");
    }
    let (mut conn, role) = carol_speaking(&server, 3).await;
    assert_eq!(role, Role::Reader);
    match call(&mut conn, &Request::Account).await {
        Response::Account {
            session,
            used_bytes: 0,
            used_files: 0,
            quota_bytes: None,
            quota_files: None,
        } => assert_eq!(
            (session.user.as_str(), session.role),
            ("carol", Role::Reader)
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readers_put_is_refused_and_the_stream_stays_in_step() {
    let server = server_with_reader();
    let (mut conn, _) = carol_speaking(&server, 3).await;
    let body = b"not to be stored";
    conn.write_frame(&Request::Put {
        path: "p".into(),
        size: body.len() as u64,
        digest: *blake3::hash(body).as_bytes(),
    })
    .await
    .unwrap();
    conn.get_mut().write_all(body).await.unwrap();
    assert_eq!(
        code_of(conn.read_frame().await.unwrap()),
        ErrorCode::PermissionDenied
    );
    // The next request is read as a request, not as the rest of a body.
    assert!(matches!(
        call(&mut conn, &Request::Ping).await,
        Response::Ok
    ));
    assert!(!server.user_dir("carol").join("p").exists());
}
