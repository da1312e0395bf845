//! Daemon memory under password logins (issue 9, "2.3 GiB from 120 logins"): the resident size
//! of a real `xferd serve` before, during and after (a) 120 concurrent password logins each
//! holding an upload open, (b) 300 failed logins for a user that does not exist, (c) 1,000
//! sequential logins, with the median login latency. Each scenario gets a fresh daemon.
//!
//! It prints `FIGURES` lines and asserts only that the logins went through: it is a measurement,
//! so it is ignored in the normal run. `bench/login_rss.sh` builds in release and runs it;
//! `XFERD_BIN=/path/to/xferd` measures another build (the old code) with the same script, which
//! is why the daemon is set up with that binary's own `init` and `user add`.
//! `LOGIN_RSS_ONLY=c` runs only the scenarios named (letters of a, b, c).

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use xfer::addr::ServerAddr;
use xfer::conn::{TlsStream, connect_tls};
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::{Connection, ErrorCode, PROTOCOL_VERSION, Request, Response};

const PASSWORD: &str = "bench-password";

mod common;
use common::binary;

/// Runs `bin` with `--config config ARGS` and returns its output, which must be a success.
fn run(bin: &Path, config: &Path, args: &[&str], stdin: &str) -> String {
    let out = common::xferd_of(bin, config, args, stdin);
    assert_eq!(out.code, 0, "xferd {args:?}: {}", out.stderr);
    out.stdout
}

/// A running daemon with user `bench`, two password-check slots whatever the machine.
struct Daemon {
    _dir: tempfile::TempDir,
    child: Child,
    addr: ServerAddr,
    fingerprint: Fingerprint,
}

impl Daemon {
    fn start(bin: &Path) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("xferd.toml");
        run(bin, &config, &["init", "--listen", "127.0.0.1:0"], "");
        run(
            bin,
            &config,
            &["user", "add", "bench", "--password-stdin"],
            &format!("{PASSWORD}\n"),
        );
        // The default is the number of cores; pin it so that figures compare across machines.
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text.replacen("[limits]\n", "[limits]\nmax_concurrent_logins = 2\n", 1);
        std::fs::write(&config, text).unwrap();
        let fingerprint = Fingerprint::parse(run(bin, &config, &["fingerprint"], "").trim())
            .expect("fingerprint");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("XFERD_LOG", "error,xferd::server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xferd serve");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("daemon logs its listen address");
        Daemon {
            _dir: dir,
            child,
            addr: ServerAddr::parse(&addr).unwrap(),
            fingerprint,
        }
    }

    /// A field of /proc/PID/status, in MiB.
    fn mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    /// Samples VmRSS every 10 ms until dropped; the largest sample is the peak "during".
    fn sampler(&self) -> Sampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicUsize::new(0));
        let path = format!("/proc/{}/status", self.child.id());
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while s.load(Ordering::SeqCst) == 0 {
                if let Ok(status) = std::fs::read_to_string(&path) {
                    let kib = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    p.fetch_max(kib, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Sampler { peak, stop }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Sampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicUsize>,
}

impl Sampler {
    fn peak_mib(&self) -> f64 {
        self.peak.load(Ordering::SeqCst) as f64 / 1024.0
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(1, Ordering::SeqCst);
    }
}

async fn call(conn: &mut Connection<TlsStream>, req: &Request) -> Response {
    conn.write_frame(req).await.unwrap();
    conn.read_frame().await.unwrap()
}

/// Sends a login until it is answered with something other than "busy"; counts the retries.
async fn login(
    conn: &mut Connection<TlsStream>,
    user: &str,
    password: &str,
    busy: &AtomicUsize,
) -> Response {
    loop {
        let req = Request::Login {
            user: user.into(),
            password: password.into(),
        };
        match call(conn, &req).await {
            Response::Error {
                code: ErrorCode::Busy,
                ..
            } => {
                busy.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

fn src(net: u8, host: usize) -> IpAddr {
    format!("127.0.{net}.{}", host + 1).parse().unwrap()
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

/// Settling times after the load: connections closed, then past tokio's 10 s idle-thread
/// lifetime, when anything still resident is kept for good.
async fn after(d: &Daemon) -> (f64, f64) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = d.mib("VmRSS");
    tokio::time::sleep(Duration::from_secs(10)).await;
    (after, d.mib("VmRSS"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures daemon memory; run by bench/login_rss.sh"]
async fn login_rss_figures() {
    let bin = binary();
    println!("FIGURES binary={}", bin.display());

    let only = std::env::var("LOGIN_RSS_ONLY").unwrap_or_else(|_| "abc".into());

    // (a) 120 concurrent password logins, each then holding an upload open, from 30 addresses
    // (4 each, well under any per-source cap).
    if only.contains('a') {
        let d = Daemon::start(&bin);
        let before = d.mib("VmRSS");
        let sampler = d.sampler();
        let busy = Arc::new(AtomicUsize::new(0));
        let (held_tx, mut held_rx) = tokio::sync::mpsc::channel(200);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..120 {
            let (busy, held_tx) = (busy.clone(), held_tx.clone());
            let d = DaemonRef::of(&d);
            tasks.spawn(async move {
                let mut conn = d.connect(src(1, i % 30)).await;
                let r = login(&mut conn, "bench", PASSWORD, &busy).await;
                assert!(matches!(r, Response::LoggedIn { .. }), "{r:?}");
                let r = call(
                    &mut conn,
                    &Request::Upload {
                        path: format!("held-{i}"),
                        size: 1 << 20,
                        offset: 0,
                    },
                )
                .await;
                assert!(matches!(r, Response::UploadReady { .. }), "{r:?}");
                conn.get_mut().write_all(&[0xAB; 65536]).await.unwrap();
                conn.get_mut().flush().await.unwrap();
                held_tx.send(conn).await.unwrap();
            });
        }
        drop(held_tx);
        let mut held = Vec::new();
        while let Some(conn) = held_rx.recv().await {
            held.push(conn);
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let took = start.elapsed();
        assert_eq!(held.len(), 120);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = d.mib("VmRSS");
        let peak = sampler.peak_mib();
        drop(held);
        let (after, settled) = after(&d).await;
        println!(
            "FIGURES scenario=a_120_concurrent_logins_holding_uploads rss_before_mib={before:.0} \
             rss_during_mib={during:.0} rss_peak_mib={peak:.0} rss_after_close_mib={after:.0} \
             rss_settled_mib={settled:.0} hwm_mib={:.0} busy_retries={} all_logged_in_secs={:.1}",
            d.mib("VmHWM"),
            busy.load(Ordering::SeqCst),
            took.as_secs_f64()
        );
    }

    // (b) 300 failed logins for a user that does not exist: 100 addresses x 3 guesses (one
    // connection each, max_auth_attempts), so that no source's penalty reaches the threshold,
    // 16 connections at a time.
    if only.contains('b') {
        let d = Daemon::start(&bin);
        let before = d.mib("VmRSS");
        let sampler = d.sampler();
        let busy = Arc::new(AtomicUsize::new(0));
        assert_eq!(failed_logins(&d, 100, 16, &busy).await, 300);
        let peak = sampler.peak_mib();
        let (after, settled) = after(&d).await;
        println!(
            "FIGURES scenario=b_300_failed_logins_unknown_user rss_before_mib={before:.0} \
             rss_peak_mib={peak:.0} rss_after_mib={after:.0} rss_settled_mib={settled:.0} \
             hwm_mib={:.0} busy_retries={}",
            d.mib("VmHWM"),
            busy.load(Ordering::SeqCst)
        );
    }

    // (c) 1,000 sequential logins, each on a new connection, logged out again so that the
    // session file stays small and the latency is the login's own.
    if only.contains('c') {
        let d = Daemon::start(&bin);
        let before = d.mib("VmRSS");
        let sampler = d.sampler();
        let busy = AtomicUsize::new(0);
        let d_ref = DaemonRef::of(&d);
        let (mut login_rtt, mut connect_and_login) = (Vec::new(), Vec::new());
        let mut rss_at_500 = 0.0;
        for i in 0..1000 {
            let t0 = Instant::now();
            let mut conn = d_ref.connect(src(3, 0)).await;
            let t1 = Instant::now();
            let r = login(&mut conn, "bench", PASSWORD, &busy).await;
            let t2 = Instant::now();
            assert!(matches!(r, Response::LoggedIn { .. }), "{r:?}");
            login_rtt.push(t2 - t1);
            connect_and_login.push(t2 - t0);
            assert_eq!(call(&mut conn, &Request::Logout).await, Response::Ok);
            if i == 499 {
                rss_at_500 = d.mib("VmRSS");
            }
        }
        let rss_at_1000 = d.mib("VmRSS");
        let peak = sampler.peak_mib();
        let (after, settled) = after(&d).await;
        println!(
            "FIGURES scenario=c_1000_sequential_logins rss_before_mib={before:.0} \
             rss_after_500_mib={rss_at_500:.0} rss_after_1000_mib={rss_at_1000:.0} \
             rss_peak_mib={peak:.0} rss_after_mib={after:.0} rss_settled_mib={settled:.0} \
             hwm_mib={:.0} login_median_ms={:.1} connect_and_login_median_ms={:.1}",
            d.mib("VmHWM"),
            median_ms(login_rtt),
            median_ms(connect_and_login)
        );
    }
}

/// Three wrong passwords for a user that does not exist from each of `addresses` sources (one
/// connection each: max_auth_attempts), `parallel` connections at a time, so that no source's
/// penalty reaches the threshold. Returns how many were refused as failed logins.
async fn failed_logins(
    d: &Daemon,
    addresses: usize,
    parallel: usize,
    busy: &Arc<AtomicUsize>,
) -> usize {
    let failed = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let (busy, failed, next) = (busy.clone(), failed.clone(), next.clone());
        let d = DaemonRef::of(d);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= addresses {
                    return;
                }
                let mut conn = d.connect(src(2, i)).await;
                for _ in 0..3 {
                    match login(&mut conn, "nosuchuser", "guess", &busy).await {
                        Response::Error {
                            code: ErrorCode::AuthFailed,
                            ..
                        } => {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    failed.load(Ordering::SeqCst)
}

/// The memory password checks hold is bounded by the pool (two threads here, 19 MiB each at
/// the default parameters), not by how many logins there were: 90 failed logins used to leave
/// one 19 MiB block per blocking-pool thread that ran one (hundreds of MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_leave_no_more_than_the_pools_memory() {
    let d = Daemon::start(&binary());
    let before = d.mib("VmRSS");
    let busy = Arc::new(AtomicUsize::new(0));
    assert_eq!(failed_logins(&d, 30, 8, &busy).await, 90);
    let grown = d.mib("VmRSS") - before;
    println!("FIGURES failed_logins=90 rss_before_mib={before:.0} rss_growth_mib={grown:.0}");
    // Two buffers of 19 MiB, plus room for connection buffers and allocator slack.
    assert!(grown < 2.0 * 19.0 + 30.0, "RSS grew by {grown:.0} MiB");
}

/// What a client task needs of the daemon (the process handle stays with the test).
#[derive(Clone)]
struct DaemonRef {
    addr: ServerAddr,
    fingerprint: Fingerprint,
}

impl DaemonRef {
    fn of(d: &Daemon) -> DaemonRef {
        DaemonRef {
            addr: d.addr.clone(),
            fingerprint: d.fingerprint,
        }
    }

    /// A TLS connection from `src`, greeted.
    async fn connect(&self, src: IpAddr) -> Connection<TlsStream> {
        let (tls, _) = connect_tls(&self.addr, Some(self.fingerprint), Some(src))
            .await
            .expect("connect");
        let mut conn = Connection::new(tls, Duration::from_secs(60));
        let hello = call(
            &mut conn,
            &Request::Hello {
                version: PROTOCOL_VERSION,
                agent: "login-rss".into(),
            },
        )
        .await;
        assert!(matches!(hello, Response::Hello { .. }), "{hello:?}");
        conn
    }
}
