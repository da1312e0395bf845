//! Password guesses are limited per source wherever a password is checked: at login and when
//! a superuser's shutdown request re-checks it; token guesses are limited too, without
//! locking out valid tokens from the same source. In-process daemon, real TLS on loopback.

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

/// Sends `Authenticate { token }` and returns the answer's error code (`None`: accepted).
async fn token_answer(conn: &mut xfer_tests::RawConn, token: &str) -> Option<ErrorCode> {
    match xfer_tests::raw_call(
        conn,
        &Request::Authenticate {
            token: token.into(),
        },
    )
    .await
    {
        Response::Session(_) => None,
        Response::Error { code, .. } => Some(code),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_rate_limited_without_renewing_the_penalty_and_good_ones_still_work() {
    // Long steps, so that nothing here depends on how fast the machine is: two failures make
    // 200 s of penalty, 50 s over the threshold.
    let server = TestServer::start_with(|c| {
        c.penalties.per_failure_secs = 100;
        c.penalties.threshold_secs = 150;
        c.penalties.max_secs = 1000;
    });
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let mut conn = xfer_tests::raw_connect(&server).await;
    xfer_tests::raw_hello(&mut conn).await;
    let Response::LoggedIn { token: good, .. } = xfer_tests::raw_call(
        &mut conn,
        &Request::Login {
            user: "alice".into(),
            password: xfer_tests::password_of("alice").into(),
        },
    )
    .await
    else {
        panic!("login");
    };

    let bad = "xfer1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let mut conn = xfer_tests::raw_connect(&server).await;
    xfer_tests::raw_hello(&mut conn).await;
    for _ in 0..2 {
        assert_eq!(
            token_answer(&mut conn, bad).await,
            Some(ErrorCode::SessionExpired)
        );
    }
    let limit = server.state.penalties.refused_for(ip).expect("penalised");
    assert!(limit <= std::time::Duration::from_secs(50), "{limit:?}");
    // Over the threshold, a bad token is refused as rate-limited, and the connection closed...
    assert_eq!(
        token_answer(&mut conn, bad).await,
        Some(ErrorCode::RateLimited)
    );
    assert!(conn.read_frame::<Response>().await.is_err(), "closed");
    // ...as often as the guesser likes, without the penalty growing.
    for _ in 0..10 {
        let mut conn = xfer_tests::raw_connect(&server).await;
        xfer_tests::raw_hello(&mut conn).await;
        assert_eq!(
            token_answer(&mut conn, bad).await,
            Some(ErrorCode::RateLimited)
        );
    }
    let left = server
        .state
        .penalties
        .refused_for(ip)
        .expect("still penalised");
    assert!(left <= limit, "the penalty grew from {limit:?} to {left:?}");
    // A user behind the same address keeps their session...
    let mut conn = xfer_tests::raw_connect(&server).await;
    xfer_tests::raw_hello(&mut conn).await;
    assert_eq!(token_answer(&mut conn, &good).await, None);
    let listed = xfer_tests::raw_call(&mut conn, &Request::List { path: "".into() }).await;
    assert!(matches!(listed, Response::Entries { .. }), "{listed:?}");
    // ...while passwords from it are still refused unchecked.
    let mut conn = xfer_tests::raw_connect(&server).await;
    xfer_tests::raw_hello(&mut conn).await;
    let answer = xfer_tests::raw_call(
        &mut conn,
        &Request::Login {
            user: "alice".into(),
            password: xfer_tests::password_of("alice").into(),
        },
    )
    .await;
    assert!(
        matches!(
            answer,
            Response::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        ),
        "{answer:?}"
    );
}
