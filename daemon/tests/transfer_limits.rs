//! What a logged-in user's transfers may cost: concurrent transfers per user, a trickling
//! body, the partial-upload store in bytes, prefix hashes for clients that left, and transfers
//! whose session ends mid-way. In-process daemons ([`TestServer`]) for behaviour; the real
//! binary where a figure (CPU time) is measured.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer::addr::ServerAddr;
use xfer::error::ClientError;
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::{ErrorCode, Request, Response};
use xfer_tests::{RawConn, TestServer, raw_call as call, raw_login, raw_start_upload};

/// Waits up to `within` for the server to close `conn`, reading (and dropping) whatever it
/// sends first; the frames it sent, if any, are decoded on the way. Returns the last error
/// frame seen and whether the connection closed.
async fn closed_within(conn: &mut RawConn, within: Duration) -> (Option<Response>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, conn.read_frame::<Response>()).await {
            Err(_) => return (last, false),
            Ok(Ok(r)) => last = Some(r),
            Ok(Err(_)) => return (last, true),
        }
    }
}

/// Sends `bytes` of body and flushes.
async fn send(conn: &mut RawConn, bytes: &[u8]) {
    conn.get_mut().write_all(bytes).await.unwrap();
    conn.get_mut().flush().await.unwrap();
}

fn busy_message(r: &Response) -> &str {
    match r {
        Response::Error {
            code: ErrorCode::Busy,
            message,
        } => message,
        other => panic!("expected Busy, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_past_the_per_user_cap_are_answered_busy() {
    let server = TestServer::start_with(|c| c.limits.max_transfers_per_user = 3);
    xfer_tests::write_file(&server.user_dir("alice").join("f"), &[9u8; 100]);
    // Three uploads of alice's in progress, on three connections.
    let mut running = Vec::new();
    for i in 0..3 {
        let mut conn = raw_login(&server, "alice").await;
        raw_start_upload(&mut conn, &format!("big{i}"), 1_000_000_000).await;
        send(&mut conn, &[1; 10]).await;
        running.push(conn);
    }
    // A fourth transfer of hers, either way, is refused at once and says why.
    let mut conn = raw_login(&server, "alice").await;
    let upload = Request::Upload {
        path: "more".into(),
        size: 10,
        offset: 0,
    };
    let answer = call(&mut conn, &upload).await;
    let message = busy_message(&answer);
    assert!(
        message.contains("too many transfers in progress for alice (3)"),
        "{message}"
    );
    let download = Request::Download {
        path: "f".into(),
        offset: 0,
    };
    busy_message(&call(&mut conn, &download).await);
    // The connection is in step, and other users are not affected.
    assert_eq!(call(&mut conn, &Request::Ping).await, Response::Ok);
    let mut bob = raw_login(&server, "bob").await;
    raw_start_upload(&mut bob, "b", 1).await;
    // The library client reports it as a limit, with the exit code of one (7).
    let mut c = xfer_tests::client(&server, "alice").await;
    let local = server.dir.path().join("local");
    std::fs::write(&local, b"data").unwrap();
    let err = c
        .upload(&local, "local", true, Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::Busy,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 7);
    // One ends: a slot comes back.
    drop(running.pop());
    common::wait_for("a freed transfer slot", Duration::from_secs(20), || {
        server.state.usage.transfers("alice") < 3
    })
    .await;
    assert!(matches!(
        call(&mut conn, &download).await,
        Response::DownloadReady { size: 100, .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_is_dropped_at_the_io_timeout() {
    // Before: the deadline was per read, so one byte every 200 ms kept a 1 GB upload (and
    // its blocking thread) alive forever. Now a body must move min_transfer_rate bytes/s over
    // each io_timeout of waiting.
    let server = TestServer::start_with(|c| {
        c.limits.io_timeout_secs = 2;
        c.limits.min_transfer_rate = 1024;
    });
    let mut conn = raw_login(&server, "alice").await;
    raw_start_upload(&mut conn, "big", 1_000_000_000).await;
    let started = Instant::now();
    let dropped = loop {
        if conn.get_mut().write_all(&[1]).await.is_err() || conn.get_mut().flush().await.is_err() {
            break true;
        }
        // The server closing shows as end of stream on our read side.
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), conn.get_mut().read(&mut probe))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    assert!(dropped, "a 5 B/s upload was still alive after 60 s");
    // What arrived is kept for resume, as for any broken upload.
    assert!(server.released_partial_bytes("alice", Duration::from_secs(20)) > 0);
}

/// A resumable upload to `path` declaring `size`, of which `sent` arrives before the client
/// drops; returns the bytes the server then holds for alice's partials.
async fn interrupted(server: &TestServer, path: &str, size: u64, sent: &[u8]) -> u64 {
    let mut conn = raw_login(server, "alice").await;
    assert_eq!(
        call(&mut conn, &resumable(path, size)).await,
        Response::UploadReady { offset: 0 }
    );
    send(&mut conn, sent).await;
    drop(conn);
    server.released_partial_bytes("alice", Duration::from_secs(20))
}

/// An upload of `size` bytes that offers to resume.
fn resumable(path: &str, size: u64) -> Request {
    Request::Upload {
        path: path.into(),
        size,
        offset: size,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partial_store_keeps_a_bounded_number_of_bytes_per_user() {
    let server = TestServer::start_with(|c| c.limits.max_partial_bytes_per_user = 1000);
    // "a": 600 bytes declared, 500 arrive, then the connection drops.
    assert_eq!(interrupted(&server, "a", 600, &[1; 500]).await, 500);
    // "b": 600 more would make 1100: the older "a" is deleted to make room.
    assert_eq!(interrupted(&server, "b", 600, &[2; 300]).await, 300);
    // Bigger than the whole budget: it runs, but nothing of it is kept.
    assert_eq!(interrupted(&server, "huge", 5000, &[3; 2000]).await, 300);
    // "a" is not offered back; "b" is.
    let mut conn = raw_login(&server, "alice").await;
    assert_eq!(
        call(&mut conn, &resumable("a", 600)).await,
        Response::UploadReady { offset: 0 }
    );
    drop(conn);
    let mut conn = raw_login(&server, "alice").await;
    assert!(matches!(
        call(&mut conn, &resumable("b", 600)).await,
        Response::UploadResume { offset: 300, .. }
    ));
    // The figure a quota would count.
    drop(conn);
    server.released_partial_bytes("alice", Duration::from_secs(20));
    assert_eq!(
        server.state.storage.partial_usage("alice").await.unwrap(),
        300
    );
}

/// A sparse file of `size` bytes in alice's tree (reads as zeros, costs no disk).
fn sparse(server: &TestServer, name: &str, size: u64) {
    std::fs::create_dir_all(server.user_dir("alice")).unwrap();
    let f = std::fs::File::create(server.user_dir("alice").join(name)).unwrap();
    f.set_len(size).unwrap();
}

/// Whether the daemon is running no prefix hash of alice's now.
fn no_hash_running(server: &TestServer) -> bool {
    server.state.usage.hashes("alice") == 0
}

/// Waits for `conn`'s request to start a prefix hash, drops the connection, and waits for
/// the hash to stop.
async fn leave_while_hashing(server: &TestServer, conn: RawConn) {
    common::wait_for("the hash to start", Duration::from_secs(20), || {
        !no_hash_running(server)
    })
    .await;
    drop(conn);
    common::wait_for("the hash to stop", Duration::from_secs(30), || {
        no_hash_running(server)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_check_stops_hashing_when_its_client_leaves() {
    // 1 TiB of zeros takes many minutes to hash: only stopping ends it within the test.
    let server = TestServer::start_with(|c| c.limits.max_partial_bytes_per_user = 2 << 40);
    const SIZE: u64 = 1 << 40;
    sparse(&server, "huge", SIZE);
    let mut conn = raw_login(&server, "alice").await;
    conn.write_frame(&Request::DownloadFrom {
        path: "huge".into(),
        offset: SIZE,
        prefix: [0; 32],
    })
    .await
    .unwrap();
    leave_while_hashing(&server, conn).await;

    // The same for an upload's resume offer over a huge held partial.
    let dir = server
        .user_dir("alice")
        .parent()
        .unwrap()
        .join(xferd::storage::local::partial::PARTIAL_DIR)
        .join("alice");
    std::fs::create_dir_all(&dir).unwrap();
    let held =
        std::fs::File::create(dir.join(xferd::storage::local::partial::PartialDir::name_for("up")))
            .unwrap();
    held.set_len(SIZE).unwrap();
    let mut conn = raw_login(&server, "alice").await;
    conn.write_frame(&Request::Upload {
        path: "up".into(),
        size: SIZE,
        offset: SIZE,
    })
    .await
    .unwrap();
    leave_while_hashing(&server, conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_checks_run_a_bounded_number_at_once_per_user() {
    let server = TestServer::start_with(|c| c.limits.max_prefix_hashes_per_user = 1);
    const SIZE: u64 = 1 << 40;
    sparse(&server, "huge", SIZE);
    let ask = Request::DownloadFrom {
        path: "huge".into(),
        offset: SIZE,
        prefix: [0; 32],
    };
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = raw_login(&server, "alice").await;
        conn.write_frame(&ask).await.unwrap();
        conns.push(conn);
    }
    common::wait_for("a hash to start", Duration::from_secs(20), || {
        !no_hash_running(&server)
    })
    .await;
    // Three asked; one hashes, the others wait (and all three count as transfers).
    for _ in 0..20 {
        assert_eq!(server.state.usage.hashes("alice"), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.state.usage.transfers("alice"), 3);
    drop(conns);
    common::wait_for("every check to stop", Duration::from_secs(30), || {
        no_hash_running(&server) && server.state.usage.transfers("alice") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_account_is_deleted_stops_and_commits_nothing() {
    let server = TestServer::start();
    let mut conn = raw_login(&server, "alice").await;
    xfer_tests::raw_start_upload_up_to(&mut conn, "f", 1000, 1000).await;
    send(&mut conn, &[1; 400]).await;
    // `xferd user del alice` while the body is in flight.
    server.edit_users(|u| u.remove("alice").unwrap());
    let (answer, closed) = closed_within(&mut conn, Duration::from_secs(20)).await;
    match answer {
        Some(Response::Error {
            code: ErrorCode::SessionExpired,
            message,
        }) => assert!(message.contains("nothing was saved"), "{message}"),
        other => panic!("expected SessionExpired, got {other:?}"),
    }
    assert!(closed);
    // The rest of the body has nowhere to go, nothing was committed, nothing is kept.
    let _ = conn.get_mut().write_all(&[1; 600]).await;
    assert!(!server.user_dir("alice").join("f").exists());
    assert_eq!(
        server.released_partial_bytes("alice", Duration::from_secs(20)),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_whose_password_changes_is_cut_off() {
    let server = TestServer::start();
    const SIZE: usize = 64 << 20;
    xfer_tests::write_file(&server.user_dir("alice").join("big"), &vec![5u8; SIZE]);
    let mut conn = raw_login(&server, "alice").await;
    let download = Request::Download {
        path: "big".into(),
        offset: 0,
    };
    assert!(matches!(
        call(&mut conn, &download).await,
        Response::DownloadReady { .. }
    ));
    // Read a little, then `xferd user passwd alice` while the rest waits in the pipeline.
    let mut buf = vec![0u8; 1 << 20];
    conn.get_mut().read_exact(&mut buf).await.unwrap();
    server.edit_users(|u| u.set_password("alice", "new-pw").unwrap());
    common::wait_for("the session check", Duration::from_secs(20), || {
        server.state.usage.transfers("alice") == 0
    })
    .await;
    let mut got = buf.len();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), conn.get_mut().read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the server neither finished nor closed"),
        }
    }
    assert!(
        got < SIZE,
        "the whole file arrived after the password change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_says_why_its_upload_was_cut_off() {
    let server = TestServer::start();
    // A relay that lets 300 KiB of the upload through, then swallows the rest: the upload is
    // still running on the server when alice's session is revoked, and the client is still
    // sending when the server closes.
    let proxy = xfer_tests::Proxy::start(server.addr);
    proxy.set_caps(300 << 10, u64::MAX);
    let addr = ServerAddr::parse(&proxy.server()).unwrap();
    let fp = Fingerprint::parse(&server.fingerprint).unwrap();
    let mut c = xfer::conn::Client::connect(&addr, fp, None).await.unwrap();
    c.login("alice", "alice-pw").await.unwrap();
    // Big enough that the client is still sending when the server stops reading.
    let local = server.dir.path().join("local");
    std::fs::File::create(&local)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let revoke = async {
        common::wait_for(
            "300 KiB to reach the server",
            Duration::from_secs(20),
            || proxy.last_counts().0 >= 300 << 10,
        )
        .await;
        server.edit_users(|u| u.remove("alice").unwrap());
    };
    let (result, ()) = tokio::join!(c.upload(&local, "f", true, Default::default()), revoke);
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::SessionExpired,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 3);
    assert!(err.to_string().contains("log in again"), "{err}");
    assert!(!server.user_dir("alice").join("f").exists());
}

/// A config folder made by `binary` itself (an older one refuses keys it does not know),
/// with `edits` applied and alice added.
fn figures_setup(
    binary: &std::path::Path,
    edits: &[(&str, &str)],
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("xferd.toml");
    let run = |args: &[&str], stdin: &str| {
        let out = common::xferd_of(binary, &config, args, stdin);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    };
    run(&["init", "--listen", "127.0.0.1:0"], "");
    run(&["user", "add", "alice", "--password-stdin"], "alice-pw\n");
    common::set_config(&config, edits);
    (dir, config)
}

/// User plus system CPU seconds the process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(") ").unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Waits until the process has used no CPU for a second (or 300 s have passed); returns the
/// CPU seconds used from `before` and the wall time.
async fn cpu_until_quiet(pid: u32, before: f64, started: Instant) -> (f64, Duration) {
    let mut last = cpu_secs(pid);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_secs(pid);
        if now - last < 0.02 || started.elapsed() > Duration::from_secs(300) {
            return (now - before, started.elapsed());
        }
        last = now;
    }
}

/// FIGURES: 10 `DownloadFrom` requests at the end of a 2 GiB file with a wrong prefix, each
/// from a client that leaves right after sending it, and what they cost the daemon.
/// `cargo test --release -p xferd --test transfer_limits -- --ignored --nocapture figures_`
/// (`XFERD_BIN=/path/to/old/xferd` for the before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn figures_resume_checks_for_clients_that_left() {
    let binary = common::binary();
    let (dir, config) = figures_setup(&binary, &[]);
    let serving = common::Serving::start_with_binary(&config, &binary);
    let pid = serving.child.id();
    const SIZE: u64 = 2 << 30;
    let alice = dir.path().join("storage/alice");
    std::fs::create_dir_all(&alice).unwrap();
    std::fs::File::create(alice.join("big"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut conn = xfer_tests::raw_connect_to(&serving.addr, serving.fingerprint).await;
        xfer_tests::raw_login_as(&mut conn, "alice", "alice-pw").await;
        conns.push(conn);
    }
    let (before, started) = (cpu_secs(pid), Instant::now());
    for mut conn in conns {
        conn.write_frame(&Request::DownloadFrom {
            path: "big".into(),
            offset: SIZE,
            prefix: [0; 32],
        })
        .await
        .unwrap();
        conn.shutdown().await;
    }
    let (cpu, wall) = cpu_until_quiet(pid, before, started).await;
    println!(
        "FIGURES resume checks: binary={} requests=10 file=2GiB cpu_secs={cpu:.2} wall_secs={:.1}",
        binary.display(),
        wall.as_secs_f64()
    );
}

/// FIGURES: 200 uploads of 1 GB each, trickling one byte every 2 s, against io_timeout 3 s:
/// how many start, how many are alive 10 s later, and the daemon's threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints figures; run by hand"]
async fn figures_trickling_uploads() {
    let binary = common::binary();
    let (_dir, config) = figures_setup(
        &binary,
        &[
            ("io_timeout_secs", "3"),
            ("max_connections", "1000"),
            ("max_connections_per_source", "1000"),
        ],
    );
    let serving = common::Serving::start_with_binary(&config, &binary);
    let pid = serving.child.id();
    let threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    let alive = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (mut started, mut busy, mut peak) = (0, 0, 0);
    // One password login, then the token: 200 uploads start within a second or two.
    let mut first = xfer_tests::raw_connect_to(&serving.addr, serving.fingerprint).await;
    let token = xfer_tests::raw_login_as(&mut first, "alice", "alice-pw").await;
    for i in 0..200 {
        let mut conn = xfer_tests::raw_connect_to(&serving.addr, serving.fingerprint).await;
        xfer_tests::raw_hello(&mut conn).await;
        let auth = Request::Authenticate {
            token: token.clone(),
        };
        assert!(matches!(call(&mut conn, &auth).await, Response::Session(_)));
        let upload = Request::Upload {
            path: format!("f{i}"),
            size: 1_000_000_000,
            offset: 0,
        };
        match call(&mut conn, &upload).await {
            Response::UploadReady { .. } => started += 1,
            Response::Error {
                code: ErrorCode::Busy,
                ..
            } => {
                busy += 1;
                continue;
            }
            other => panic!("{other:?}"),
        }
        let alive = alive.clone();
        alive.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let mut probe = [0u8; 64];
            loop {
                if conn.get_mut().write_all(&[1]).await.is_err()
                    || conn.get_mut().flush().await.is_err()
                {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(2), conn.get_mut().read(&mut probe))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => {}
                }
            }
            alive.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
        peak = peak.max(threads());
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!(
        "FIGURES trickling uploads: binary={} asked=200 started={started} busy={busy} alive_10s_later={} peak_threads={peak} threads_now={}",
        binary.display(),
        alive.load(std::sync::atomic::Ordering::SeqCst),
        threads()
    );
}
