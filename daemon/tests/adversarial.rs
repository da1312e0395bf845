//! The adversarial suite: the real `xferd` binary against scanners, idle and half-open
//! connections, garbage, brute force, crashes and a full disk, over loopback only. Each test
//! checks that the daemon keeps serving; figures (memory, timings) are printed for the record.

mod common;

use std::time::{Duration, Instant};

use common::{Serving, proc_kib, set_config, setup, stalled_upload, upload_bytes, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use xfer::conn::connect_tls;
use xfer_proto::{Connection, ErrorCode, PROTOCOL_VERSION, Request, Response};

async fn tcp_from(src: &str, dst: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{src}:0").parse().unwrap())?;
    socket.connect(dst).await
}

fn dst(serving: &Serving) -> std::net::SocketAddr {
    format!("{}:{}", serving.addr.host, serving.addr.port)
        .parse()
        .unwrap()
}

/// True once the peer has closed `s` (EOF or reset), waiting at most `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_idle_connections_neither_lock_out_a_real_client_nor_linger() {
    let (_dir, config) = setup(10);
    // Room for all 220 in the unauthenticated pool and 20 per address, so that the idlers are
    // dropped by their deadlines, not by admission (daemon/tests/admission.rs covers that).
    set_config(
        &config,
        &[
            ("handshake_timeout_secs", "2"),
            ("login_timeout_secs", "3"),
            ("max_startups", "\"300\""),
            ("max_startups_per_source", "20"),
        ],
    );
    let mut serving = Serving::start(&config);
    let pid = serving.child.id();
    let rss_before = proc_kib(pid, "VmRSS");
    let target = dst(&serving);

    // 180 plain TCP connections that never speak TLS, from 9 addresses (20 each, the cap).
    let mut idle_tcp = Vec::new();
    for a in 1..=9 {
        for _ in 0..20 {
            idle_tcp.push(tcp_from(&format!("127.0.1.{a}"), target).await.unwrap());
        }
    }
    // 40 TLS connections that complete the handshake but never log in, from 2 more addresses.
    let mut idle_tls = Vec::new();
    for a in [20, 21] {
        for _ in 0..20 {
            let tcp = tcp_from(&format!("127.0.1.{a}"), target).await.unwrap();
            let (tls, _) = tls_over(tcp, &serving).await;
            idle_tls.push(tls);
        }
    }
    // A 21st connection from a capped address is closed on arrival.
    let mut over_cap = tcp_from("127.0.1.1", target).await.unwrap();
    assert!(closed_within(&mut over_cap, Duration::from_secs(2)).await);

    // A real client from elsewhere still gets in quickly.
    let started = Instant::now();
    let mut real = serving.client("alice", "alice-pw").await;
    real.ping().await.unwrap();
    let login_time = started.elapsed();
    assert!(
        login_time < Duration::from_secs(2),
        "login took {login_time:?}"
    );
    let rss_held = proc_kib(pid, "VmRSS");

    // Every idle connection is dropped by its deadline (handshake 2 s, login 3 s).
    let started = Instant::now();
    for s in idle_tcp.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "TCP idler not dropped"
        );
    }
    for t in idle_tls.iter_mut() {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(10), t.read(&mut buf)).await;
        assert!(r.is_ok(), "TLS idler not dropped");
    }
    let drop_time = started.elapsed();
    real.ping().await.unwrap();
    let hwm = proc_kib(pid, "VmHWM");
    eprintln!(
        "FIGURES idle-connections: 220 idle held; daemon RSS {rss_before} KiB before, {rss_held} KiB while held, peak {hwm} KiB; real login {login_time:?}; all idlers dropped after {drop_time:?}"
    );
    // 220 connections with 256 KiB buffers each would be 110 MiB if buffers were eager.
    assert!(hwm < 200 * 1024, "peak RSS {hwm} KiB");
    serving.signal(rustix::process::Signal::TERM);
    assert_eq!(serving.wait_exit(Duration::from_secs(20)).await.0, 0);
}

async fn tls_over(
    tcp: TcpStream,
    serving: &Serving,
) -> (tokio_rustls::client::TlsStream<TcpStream>, ()) {
    let provider = std::sync::Arc::new(xfer_proto::tls::provider());
    let (config, _) = xfer::verifier::pinned_config(Some(serving.fingerprint), provider).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    (tls, ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_huge_length_prefixes_cost_nothing_and_harm_no_one() {
    let (_dir, config) = setup(10);
    let mut serving = Serving::start(&config);
    let pid = serving.child.id();
    let mut bystander = serving.client("alice", "alice-pw").await;
    let rss_before = proc_kib(pid, "VmRSS");

    for round in 0..50u32 {
        let (tls, _) = connect_tls(&serving.addr, Some(serving.fingerprint), None)
            .await
            .unwrap();
        let mut conn = Connection::new(tls, Duration::from_secs(10));
        if round % 2 == 0 {
            conn.write_frame(&Request::Hello {
                version: PROTOCOL_VERSION,
                agent: "evil".into(),
            })
            .await
            .unwrap();
            let _ = conn.read_frame::<Response>().await;
        }
        let junk: Vec<u8> = match round % 3 {
            0 => u32::MAX.to_be_bytes().to_vec(),
            1 => (64u32 * 1024 + 1).to_be_bytes().to_vec(),
            _ => xfer_tests::noise(5000, round as u64),
        };
        let _ = conn.get_mut().write_all(&junk).await;
        let _ = conn.get_mut().flush().await;
        match conn.read_frame::<Response>().await {
            Ok(Response::Error { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    bystander.ping().await.unwrap();
    let rss_after = proc_kib(pid, "VmRSS");
    eprintln!(
        "FIGURES garbage: daemon RSS {rss_before} KiB before, {rss_after} KiB after 50 hostile connections"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew from {rss_before} to {rss_after} KiB"
    );
    serving.signal(rustix::process::Signal::TERM);
    assert_eq!(serving.wait_exit(Duration::from_secs(20)).await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_mid_upload_never_damages_the_old_version() {
    let (dir, config) = setup(10);
    let storage = dir.path().join("storage");
    let tmp = storage.join(".xfer-tmp");
    {
        let serving = Serving::start(&config);
        let mut c = serving.client("alice", "alice-pw").await;
        upload_bytes(&mut c, dir.path(), "doc", b"old version").await;
    }
    let partials = storage.join(".xfer-partial/alice");
    let partial_len = || common::partial_bytes(&storage, "alice");
    for round in 0..3 {
        let mut serving = Serving::start(&config);
        let _conn = stalled_upload(&serving, "doc", 64 << 20, 4 << 20).await;
        wait_for(
            "the partial upload on disk",
            Duration::from_secs(20),
            || partial_len() > 0,
        )
        .await;
        serving.child.kill().unwrap(); // SIGKILL: no cleanup at all
        serving.child.wait().unwrap();
        assert_eq!(
            std::fs::read(storage.join("alice/doc")).unwrap(),
            b"old version"
        );
        assert_eq!(std::fs::read_dir(storage.join("alice")).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "round {round}");
        // The received part is kept, invisible, for the next attempt to resume from.
        assert!(partial_len() > 0, "round {round}");
    }
    let serving = Serving::start(&config);
    let mut c = serving.client("alice", "alice-pw").await;
    assert_eq!(c.list("").await.unwrap().len(), 1);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&partials).unwrap().count(), 1);
}

/// A small tmpfs mounted for one test; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it as root"]
async fn a_full_disk_gives_a_clear_error_removes_the_temp_file_and_keeps_serving() {
    let (dir, config) = setup(10);
    let storage = dir.path().join("storage");
    let _mount = Tmpfs::mount(&storage, "8m").expect("mounting an 8 MiB tmpfs (needs root)");
    let serving = Serving::start(&config);
    let work = tempfile::tempdir().unwrap();
    let big = work.path().join("big");
    std::fs::write(&big, xfer_tests::noise(12 << 20, 1)).unwrap();
    let five = work.path().join("five");
    std::fs::write(&five, xfer_tests::noise(5 << 20, 2)).unwrap();

    // Larger than the free space: refused before any data is sent.
    let mut c = serving.client("alice", "alice-pw").await;
    let err = c
        .upload(&big, "big", true, Default::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no space left on the server"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 1);

    // Two uploads that each fit but not together: the disk fills mid-transfer.
    let mut c2 = serving.client("alice", "alice-pw").await;
    let (r1, r2) = tokio::join!(
        c.upload(&five, "a", true, Default::default()),
        c2.upload(&five, "b", true, Default::default())
    );
    let failures: Vec<_> = [&r1, &r2]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert!(!failures.is_empty(), "8 MiB cannot hold two 5 MiB files");
    for e in &failures {
        assert!(e.to_string().contains("no space left on the server"), "{e}");
    }
    // Whatever was committed is complete; nothing partial anywhere.
    for (name, r) in [("a", &r1), ("b", &r2)] {
        let p = storage.join("alice").join(name);
        if r.is_ok() {
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 5 << 20);
        } else {
            assert!(!p.exists());
        }
    }
    assert_eq!(
        std::fs::read_dir(storage.join(".xfer-tmp"))
            .unwrap()
            .count(),
        0
    );
    // The connections that failed are still usable, and the daemon keeps serving.
    c.ping().await.unwrap();
    c2.ping().await.unwrap();
    let mut fresh = serving.client("alice", "alice-pw").await;
    upload_bytes(&mut fresh, work.path(), "small", b"fits").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_fsynced_then_renamed_then_its_folder_fsynced() {
    xfer_tests::require_tool("strace", "strace");
    let (dir, config) = setup(10);
    let trace = dir.path().join("trace.log");
    // Run the daemon under strace, following threads, printing the paths behind descriptors.
    let strace_wrapper = dir.path().join("xferd-traced");
    std::fs::write(
        &strace_wrapper,
        format!(
            "#!/bin/sh\nexec strace -f -y -qq -o {} -e trace=fsync,fdatasync,rename,renameat,renameat2 {} \"$@\"\n",
            trace.display(),
            common::XFERD
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&strace_wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut serving = Serving::start_with_binary(&config, &strace_wrapper);
    let mut c = serving.client("alice", "alice-pw").await;
    upload_bytes(&mut c, dir.path(), "durable.txt", b"durable").await;
    // Signals would go to strace; stop the daemon through the protocol instead.
    let mut root = serving.client("root", "root-pw").await;
    root.shutdown("root-pw").await.unwrap();
    assert_eq!(serving.wait_exit(Duration::from_secs(20)).await.0, 0);

    let log = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let rename = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains("\"durable.txt\"") && l.ends_with("= 0"))
        .unwrap_or_else(|| panic!("no rename to durable.txt in:\n{log}"));
    let temp_name = lines[rename]
        .split('"')
        .nth(1)
        .expect("temp name in the rename");
    let file_sync = lines
        .iter()
        .position(|l| l.contains("sync(") && l.contains(temp_name))
        .unwrap_or_else(|| panic!("no fsync of {temp_name} in:\n{log}"));
    let user_dir = dir.path().join("storage/alice");
    let dir_sync = lines
        .iter()
        .enumerate()
        .skip(rename)
        .find(|(_, l)| l.contains("fsync(") && l.contains(&format!("<{}>", user_dir.display())))
        .map(|(i, _)| i)
        .unwrap_or_else(|| {
            panic!(
                "no fsync of {} after the rename in:\n{log}",
                user_dir.display()
            )
        });
    assert!(
        file_sync < rename && rename < dir_sync,
        "order: {file_sync} {rename} {dir_sync}\n{log}"
    );
}
