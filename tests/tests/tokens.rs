//! Protocol tests of the token requests (spec §9): version gating, listing across frames,
//! the per-user cap, and what a creation refuses.

use xfer_proto::limits::MAX_TOKENS_PER_FRAME;
use xfer_proto::{ErrorCode, Request, Response};
use xfer_tests::{RawConn, TestServer, raw_call as call, raw_connect, raw_log_in, raw_login};

fn create(name: &str, expires_secs: u64, path: &str) -> Request {
    Request::TokenCreate {
        name: name.into(),
        expires_secs,
        read_only: false,
        path: path.into(),
    }
}

fn error_of(r: Response) -> (ErrorCode, String) {
    match r {
        Response::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Every `Tokens` frame of one listing: (how many in each, done flags).
async fn list_frames(conn: &mut RawConn) -> Vec<(usize, bool)> {
    conn.write_frame(&Request::TokenList).await.unwrap();
    let mut frames = Vec::new();
    loop {
        match conn.read_frame::<Response>().await.unwrap() {
            Response::Tokens { tokens, done } => {
                frames.push((tokens.len(), done));
                if done {
                    return frames;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_list_across_frames_and_stop_at_the_per_user_cap() {
    let max = MAX_TOKENS_PER_FRAME * 2 + 1;
    let server = TestServer::start_with(|c| c.sessions.max_tokens_per_user = max);
    let mut conn = raw_login(&server, "alice").await;
    assert_eq!(list_frames(&mut conn).await, vec![(0, true)]);
    for i in 0..max {
        match call(&mut conn, &create(&format!("t{i}"), 60, "")).await {
            Response::TokenCreated { token, info } => {
                assert!(token.starts_with("xfer1_"));
                assert_eq!(info.name, format!("t{i}"));
                assert_eq!(info.expires - info.created, 60);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        list_frames(&mut conn).await,
        vec![
            (MAX_TOKENS_PER_FRAME, false),
            (MAX_TOKENS_PER_FRAME, false),
            (1, true)
        ]
    );
    let (code, message) = error_of(call(&mut conn, &create("one more", 60, "")).await);
    assert_eq!(code, ErrorCode::Busy);
    assert!(
        message.contains(&max.to_string()) && message.contains("xfer token revoke"),
        "{message}"
    );
    // Another user's cap is their own; logins are not tokens.
    let mut bob = raw_login(&server, "bob").await;
    assert!(matches!(
        call(&mut bob, &create("", 0, "")).await,
        Response::TokenCreated { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_refuses_bad_paths_names_and_lifetimes() {
    let server = TestServer::start_with(|c| c.sessions.token_max_days = 30);
    let mut conn = raw_login(&server, "alice").await;
    for path in ["../x", "a/../b", "/etc", "a\\b", "."] {
        let (code, _) = error_of(call(&mut conn, &create("", 0, path)).await);
        assert_eq!(code, ErrorCode::InvalidPath, "{path}");
    }
    let (code, _) = error_of(call(&mut conn, &create("tab\there", 0, "")).await);
    assert_eq!(code, ErrorCode::BadRequest);
    let (code, _) = error_of(call(&mut conn, &create(&"n".repeat(65), 0, "")).await);
    assert_eq!(code, ErrorCode::BadRequest);
    let (code, message) = error_of(call(&mut conn, &create("", 31 * 86400, "")).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("30 days"), "{message}");
    // The default is 90 days, cut to the cap; a path is kept normalised.
    match call(&mut conn, &create("", 0, "a//b/")).await {
        Response::TokenCreated { info, .. } => {
            assert_eq!(info.expires - info.created, 30 * 86400);
            assert_eq!(info.path, "a/b");
        }
        other => panic!("{other:?}"),
    }
    let (code, _) = error_of(
        call(
            &mut conn,
            &Request::TokenRevoke {
                id: "0123456789ab".into(),
            },
        )
        .await,
    );
    assert_eq!(code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_connection_cannot_send_token_requests() {
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
    let (code, _) = error_of(call(&mut conn, &Request::TokenList).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(conn.read_frame::<Response>().await.is_err(), "closed");
}
