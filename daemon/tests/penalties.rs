//! Password guesses are limited per source wherever a password is checked: at login and when
//! a superuser's shutdown request re-checks it. In-process daemon, real TLS on loopback.

use xfer_proto::{ErrorCode, Request, Response};
use xfer_tests::{TestServer, raw_login};

async fn shutdown_answer(
    conn: &mut xfer_proto::Connection<xfer::conn::TlsStream>,
    password: &str,
) -> Option<ErrorCode> {
    conn.write_frame(&Request::Shutdown {
        password: password.into(),
    })
    .await
    .unwrap();
    match conn.read_frame::<Response>().await.unwrap() {
        Response::Ok => None,
        Response::Error { code, .. } => Some(code),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shutdown_passwords_penalise_the_source_like_failed_logins() {
    let server = TestServer::start();
    // Three wrong guesses use up the connection (max_auth_attempts = 3) and 15 s of penalty,
    // which is not yet over the 15 s threshold.
    let mut conn = raw_login(&server, "root").await;
    for _ in 0..3 {
        assert_eq!(
            shutdown_answer(&mut conn, "guess").await,
            Some(ErrorCode::AuthFailed)
        );
    }
    assert!(conn.read_frame::<Response>().await.is_err(), "closed");
    // A fourth guess on a new session takes the penalty over the threshold...
    let mut conn = raw_login(&server, "root").await;
    assert_eq!(
        shutdown_answer(&mut conn, "guess").await,
        Some(ErrorCode::AuthFailed)
    );
    // ...after which even the right password is refused without being checked.
    assert_eq!(
        shutdown_answer(&mut conn, xfer_tests::password_of("root")).await,
        Some(ErrorCode::RateLimited)
    );
    assert!(server.is_running());
}
