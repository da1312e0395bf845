//! What a logged-in client can make the real `xferd serve` write in its logs: no forged lines,
//! no terminal escapes, and bounded lines, in the text log on stderr and in the audit trail.

mod common;

use std::time::Duration;

use common::{Serving, setup, wait_for};
use xfer_proto::{ErrorCode, Request, Response};

/// A path built to pass for a failed login from someone else (which a fail2ban-style watcher
/// would punish), to clear the admin's screen, and to make a 60 KB line.
fn forged_path() -> String {
    format!(
        "x\n2026-01-01T00:00:00.000000Z  WARN xferd::cmd::auth: login failed: wrong user name or password user=root peer=10.9.8.7:40000\r\u{1b}[2J\u{1b}]0;owned\u{7}\u{2028}{}",
        "y".repeat(60_000)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_path_cannot_forge_log_lines_or_reach_the_terminal() {
    let (dir, config) = setup(10);
    let serving = Serving::start(&config);
    let mut conn = xfer_tests::raw_connect_to(&serving.addr, serving.fingerprint).await;
    xfer_tests::raw_login_as(&mut conn, "alice", "alice-pw").await;
    // Refused (control characters): the error echoes the path.
    let forged = forged_path();
    match xfer_tests::raw_call(&mut conn, &Request::List { path: forged }).await {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidPath),
        other => panic!("{other:?}"),
    }
    // A valid path that holds a Unicode line separator: not found, also logged.
    let valid = "a\u{2028}2026-01-01 WARN login failed";
    match xfer_tests::raw_call(&mut conn, &Request::Delete { path: valid.into() }).await {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
    wait_for("both refusals in the log", Duration::from_secs(10), || {
        serving
            .log
            .lock()
            .unwrap()
            .matches("request failed")
            .count()
            >= 2
    })
    .await;
    let log = serving.log.lock().unwrap().clone();
    for line in log.lines() {
        assert!(
            !line.contains("login failed") || line.contains("request failed"),
            "a forged line: {line}"
        );
        assert!(line.len() < 4096, "a {}-byte log line", line.len());
    }
    assert!(
        !log.contains(['\u{1b}', '\u{7}', '\r', '\u{2028}']),
        "raw control characters in the log:\n{log}"
    );
    // The refusals are there, escaped, and say how long the path was.
    assert!(log.contains("x\\n2026-01-01"), "{log}");
    assert!(log.contains("\\u{1b}[2J"), "{log}");
    assert!(log.contains(" bytes)"), "{log}");
    assert!(log.contains("a\\u{2028}2026-01-01"), "{log}");

    // The audit trail keeps one bounded JSON line per refusal.
    let audit = std::fs::read_to_string(dir.path().join("state/audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| {
            assert!(
                l.len() < 3 * xferd::audit::MAX_AUDITED_STRING,
                "{} bytes",
                l.len()
            );
            serde_json::from_str(l).unwrap()
        })
        .collect();
    let list = lines.iter().find(|l| l["op"] == "list").unwrap();
    assert!(
        list["path"].as_str().unwrap().ends_with(" bytes)"),
        "{list}"
    );
    let delete = lines.iter().find(|l| l["op"] == "delete").unwrap();
    assert_eq!(delete["path"], valid, "a valid path is audited whole");
}
