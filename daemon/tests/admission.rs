//! Two-stage admission against the real `xferd` and `xfer` binaries over loopback, with many
//! 127.0.x.y source addresses: a flood of idle connections from 64 addresses never makes a
//! logged-in user's command fail and lets a new login through within 2 tries; 48 parallel
//! uploads from one address all succeed; a refusal tells the user which limit it was.
//! Figures (daemon RSS, login latency, tries) are printed as FIGURES lines.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::{Out, Serving, proc_kib, set_config, setup, wait_for, xfer_bin};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// Runs `xfer --config-dir HOME/config ARGS` with `stdin`.
fn xfer<A: AsRef<std::ffi::OsStr>>(home: &Path, args: &[A], stdin: &str) -> Out {
    let mut child = Command::new(xfer_bin())
        .arg("--config-dir")
        .arg(home.join("config"))
        .args(args)
        .env_remove("XFER_CONFIG_DIR")
        .current_dir(home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xfer");
    {
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`xfer`] on the blocking pool, so that the flood's tasks keep running meanwhile.
async fn xfer_async<A: AsRef<str>>(home: &Path, args: &[A], stdin: &str) -> Out {
    let (home, stdin) = (home.to_path_buf(), stdin.to_string());
    let args: Vec<String> = args.iter().map(|s| s.as_ref().to_string()).collect();
    tokio::task::spawn_blocking(move || xfer(&home, &args, &stdin))
        .await
        .unwrap()
}

/// `xfer login USER@SERVER` with the test password `USER-pw`, from `home`.
async fn login(serving: &Serving, home: &Path, user: &str) -> Out {
    xfer_async(home, &login_args(serving, user), &format!("{user}-pw\n")).await
}

/// `out` failed with the connection exit code (7) and told the user `why`.
fn assert_refused(out: &Out, why: &str) {
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert!(out.stderr.contains(why), "{}", out.stderr);
}

fn login_args(serving: &Serving, user: &str) -> Vec<String> {
    vec![
        "login".into(),
        format!("{user}@{}", serving.addr),
        "--password-stdin".into(),
        "--fingerprint".into(),
        serving.fingerprint.to_string(),
    ]
}

fn dst(serving: &Serving) -> SocketAddr {
    format!("{}:{}", serving.addr.host, serving.addr.port)
        .parse()
        .unwrap()
}

async fn tcp_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(dst).await
}

/// Raises this process's open-file soft limit to its hard limit (the flood holds 1,280).
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// What the flood saw.
#[derive(Default)]
struct FloodStats {
    /// TCP connections opened.
    connects: AtomicU64,
    /// Refusal lines received.
    refusal_lines: AtomicU64,
    /// Connections the daemon closed (refused, evicted or past a deadline).
    dropped: AtomicU64,
}

/// Holds one idle TCP connection from `src` open, reconnecting about a second after the
/// daemon drops it, until `stop` flips.
async fn hold(
    src: IpAddr,
    dst: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
    stats: Arc<FloodStats>,
    seed: u64,
) {
    let mut buf = [0u8; 512];
    let mut n = seed;
    while !*stop.borrow() {
        if let Ok(mut s) = tcp_from(src, dst).await {
            stats.connects.fetch_add(1, Relaxed);
            let mut first = true;
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if first && buf[..k].starts_with(b"xfer-refused: ") {
                                stats.refusal_lines.fetch_add(1, Relaxed);
                            }
                            first = false;
                        }
                    },
                    _ = stop.changed() => return,
                }
            }
            stats.dropped.fetch_add(1, Relaxed);
        }
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let pause = Duration::from_millis(1000 + (n >> 33) % 500);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_from_64_addresses_neither_fails_a_user_nor_keeps_a_new_login_out() {
    let nofile = raise_nofile();
    assert!(nofile >= 2048, "open-file hard limit {nofile} is too small");
    let (dir, config) = setup(10);
    let serving = Serving::start(&config);
    let pid = serving.child.id();
    let home = tempfile::tempdir().unwrap();
    let alice = home.path().join("alice");
    let newcomer = home.path().join("root");
    std::fs::create_dir_all(&alice).unwrap();
    std::fs::create_dir_all(&newcomer).unwrap();
    let out = login(&serving, &alice, "alice").await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rss_before = proc_kib(pid, "VmRSS");

    // 64 addresses x 20 idle TCP connections that never speak, reconnecting when dropped.
    let target = dst(&serving);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stats = Arc::new(FloodStats::default());
    let mut flood = tokio::task::JoinSet::new();
    for a in 1..=64u8 {
        for i in 0..20u64 {
            let src: IpAddr = format!("127.0.1.{a}").parse().unwrap();
            flood.spawn(hold(
                src,
                target,
                stop_rx.clone(),
                stats.clone(),
                u64::from(a) * 100 + i,
            ));
        }
    }
    wait_for(
        "the flood to open 1,280 connections and be refused",
        Duration::from_secs(120),
        || stats.connects.load(Relaxed) >= 1280 && stats.refusal_lines.load(Relaxed) >= 100,
    )
    .await;
    // Let it run into the shortened deadlines and the reconnects.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_flood = proc_kib(pid, "VmRSS");

    // (a) The logged-in user's commands, each on a new connection, all work.
    let data = xfer_tests::noise(256 * 1024, 9);
    std::fs::write(alice.join("payload.bin"), &data).unwrap();
    // With -v the client logs each refused attempt it retried by itself.
    let mut user_retries = 0;
    for round in 0..3 {
        let to = alice.join(format!("back{round}"));
        std::fs::create_dir(&to).unwrap();
        let to = to.to_str().unwrap();
        for cmd in [
            &["-v", "list"][..],
            &["-v", "upload", "payload.bin"],
            &["-v", "download", "payload.bin", "--to", to],
        ] {
            let out = xfer_async(&alice, cmd, "").await;
            assert_eq!(out.code, 0, "{cmd:?} round {round}: {}", out.stderr);
            user_retries += out.stderr.matches("; retrying").count();
        }
        assert_eq!(
            std::fs::read(Path::new(to).join("payload.bin")).unwrap(),
            data
        );
    }

    // (b) A new login gets through within 2 tries; -v shows each refused attempt the client
    // retried by itself, and those count as tries too.
    let mut args = login_args(&serving, "root");
    args.insert(0, "-v".into());
    let mut tries = 0;
    let mut invocations = 0;
    let started = Instant::now();
    let mut logged_in = false;
    while invocations < 2 && !logged_in {
        invocations += 1;
        let out = xfer_async(&newcomer, &args, "root-pw\n").await;
        tries += 1 + out.stderr.matches("; retrying").count();
        logged_in = out.code == 0;
        if !logged_in {
            eprintln!("login attempt failed: {}", out.stderr);
        }
    }
    let login_latency = started.elapsed();
    assert!(logged_in, "the new login did not get through");
    assert!(tries <= 2, "the new login took {tries} tries");
    let rss_after = proc_kib(pid, "VmRSS");
    let hwm = proc_kib(pid, "VmHWM");

    stop_tx.send(true).unwrap();
    while flood.join_next().await.is_some() {}
    let log = serving.log.lock().unwrap().clone();
    let refusal_log_lines = log.matches("connection refused").count();
    eprintln!(
        "FIGURES admission flood: 64 addresses x 20 idle connections, {} connects, {} refusal lines received, {} drops; daemon RSS {rss_before} KiB before, {rss_flood} KiB under flood, {rss_after} KiB after the commands, peak {hwm} KiB; new login {login_latency:?} in {tries} tries ({invocations} invocations); the logged-in user's 9 commands all succeeded, with {user_retries} refused attempts retried; {refusal_log_lines} refusal log lines",
        stats.connects.load(Relaxed),
        stats.refusal_lines.load(Relaxed),
        stats.dropped.load(Relaxed),
    );
    // Refusals are logged at info, rate-limited: at most a line per source and minute
    // (the flood lasts under a few minutes; thousands were refused).
    assert!(log.contains("connection refused"), "{log}");
    assert!(
        refusal_log_lines <= 65 * 4,
        "{refusal_log_lines} refusal lines"
    );
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_eight_parallel_uploads_from_one_address_all_succeed() {
    let (dir, config) = setup(10);
    let serving = Serving::start(&config);
    let home = tempfile::tempdir().unwrap();
    assert_eq!(login(&serving, home.path(), "alice").await.code, 0);
    let files: Vec<(String, Vec<u8>)> = (0..48u64)
        .map(|i| (format!("f{i:02}.bin"), xfer_tests::noise(64 * 1024, i + 1)))
        .collect();
    for (name, data) in &files {
        std::fs::write(home.path().join(name), data).unwrap();
    }
    let children: Vec<_> = files
        .iter()
        .map(|(name, _)| {
            Command::new(xfer_bin())
                .arg("--config-dir")
                .arg(home.path().join("config"))
                .args(["upload", name])
                .current_dir(home.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn xfer upload")
        })
        .collect();
    let mut failures = Vec::new();
    for (child, (name, _)) in children.into_iter().zip(&files) {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    for (name, data) in &files {
        let stored = std::fs::read(dir.path().join("storage/alice").join(name)).unwrap();
        assert_eq!(&stored, data, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_the_per_source_cap_tells_the_user_which_limit() {
    let (_dir, config) = setup(10);
    set_config(
        &config,
        &[
            ("max_startups_per_source", "2"),
            ("handshake_timeout_secs", "120"),
        ],
    );
    let serving = Serving::start(&config);
    let home = tempfile::tempdir().unwrap();
    let out = login(&serving, home.path(), "alice").await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    // Two idle connections from 127.0.3.1 fill its share.
    let src: IpAddr = "127.0.3.1".parse().unwrap();
    let _held = [
        tcp_from(src, dst(&serving)).await.unwrap(),
        tcp_from(src, dst(&serving)).await.unwrap(),
    ];
    let out = xfer_async(home.path(), &["--bind", "127.0.3.1", "list"], "").await;
    assert_refused(
        &out,
        "the server refused the connection: too many connections from 127.0.3.1 (2)",
    );
    assert!(!out.stderr.contains("reset"), "{}", out.stderr);
    // The same user from another address is not affected.
    let out = xfer_async(home.path(), &["--bind", "127.0.3.2", "list"], "").await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    // The daemon logged the refusal at info, once for the minute, with a count.
    wait_for("the refusal logged", Duration::from_secs(10), || {
        serving.logged("source=127.0.3.1")
    })
    .await;
    let log = serving.log.lock().unwrap().clone();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused") && l.contains("source=127.0.3.1"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("refused=1"), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_at_the_session_cap_is_told_the_server_is_busy_and_others_are_not() {
    let (_dir, config) = setup(10);
    set_config(&config, &[("max_sessions_per_user", "2")]);
    let serving = Serving::start(&config);
    let home = tempfile::tempdir().unwrap();
    assert_eq!(login(&serving, home.path(), "alice").await.code, 0);
    let _one = serving.client("alice", "alice-pw").await;
    let _two = serving.client("alice", "alice-pw").await;
    let out = xfer_async(home.path(), &["list"], "").await;
    assert_refused(&out, "server busy: too many sessions for alice (2)");
    let mut root = serving.client("root", "root-pw").await;
    root.ping().await.unwrap();
    drop(_one);
    // The place comes back once the daemon has seen the connection close.
    let start = Instant::now();
    loop {
        let out = xfer_async(home.path(), &["list"], "").await;
        if out.code == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{}", out.stderr);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
