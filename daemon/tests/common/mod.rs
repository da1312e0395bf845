//! Helpers shared by the tests that run the real `xferd` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xfer::addr::ServerAddr;
use xfer::conn::Client;
use xfer_proto::fingerprint::Fingerprint;

pub const XFERD: &str = env!("CARGO_BIN_EXE_xferd");

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn xferd(config: &Path, args: &[&str], stdin: &str) -> Out {
    xferd_of(Path::new(XFERD), config, args, stdin)
}

/// The daemon binary tests measure: `XFERD_BIN` (another build, such as the old code), else
/// this build's.
pub fn binary() -> PathBuf {
    std::env::var_os("XFERD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(XFERD))
}

/// Runs the xferd binary `bin` with `--config config ARGS`, feeding `stdin`.
pub fn xferd_of(bin: &Path, config: &Path, args: &[&str], stdin: &str) -> Out {
    let out = run_xferd(bin, config, args, stdin, |_| {});
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The one way these tests run an `xferd` command: `bin --config config ARGS` with `stdin`
/// piped in, `XFERD_CONFIG` unset, and `env` to add or remove anything else (a store's
/// credentials).
pub fn run_xferd(
    bin: &Path,
    config: &Path,
    args: &[&str],
    stdin: &str,
    env: impl FnOnce(&mut Command),
) -> std::process::Output {
    let mut command = Command::new(bin);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("XFERD_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    env(&mut command);
    let mut child = command.spawn().expect("spawn xferd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The `xfer` binary, built once for this test run (a test of the `xferd` package cannot
/// name another package's binary; `cargo build` is a no-op when it is up to date).
pub fn xfer_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Same profile as the xferd under test, so that the binary lands beside it.
        let dir = Path::new(XFERD).parent().expect("bin folder");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let out = Command::new(cargo)
            .args(["build", "-p", "xfer", "--bin", "xfer", "--profile", profile])
            .stdout(Stdio::null())
            .output()
            .expect("run cargo build -p xfer");
        assert!(
            out.status.success(),
            "building xfer failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = Path::new(XFERD).with_file_name("xfer");
        assert!(bin.exists(), "no xfer binary at {}", bin.display());
        bin
    })
}

/// A config folder with users `root` (superuser) and `alice`, added through the CLI.
pub fn setup(grace_secs: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("xferd.toml");
    let out = xferd(&config, &["init", "--listen", "127.0.0.1:0"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "shutdown_grace_secs = 10",
        &format!("shutdown_grace_secs = {grace_secs}"),
    );
    std::fs::write(&config, text).unwrap();
    for (user, role, pw) in [
        ("root", "superuser", "root-pw"),
        ("alice", "user", "alice-pw"),
    ] {
        let out = xferd(
            &config,
            &["user", "add", user, "--role", role, "--password-stdin"],
            &format!("{pw}\n"),
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    (dir, config)
}

/// A running `xferd serve`, its address and its log.
pub struct Serving {
    pub child: Child,
    pub addr: ServerAddr,
    pub fingerprint: Fingerprint,
    pub log: Arc<Mutex<String>>,
}

impl Serving {
    pub fn start(config: &Path) -> Serving {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &Path)]) -> Serving {
        Self::spawn(config, env, Path::new(XFERD))
    }

    /// Starts `binary` (the daemon, or a wrapper script that execs it) with `serve`.
    pub fn start_with_binary(config: &Path, binary: &Path) -> Serving {
        Self::spawn(config, &[], binary)
    }

    fn spawn(config: &Path, env: &[(&str, &Path)], binary: &Path) -> Serving {
        let fp = xferd(config, &["fingerprint"], "");
        assert_eq!(fp.code, 0, "{}", fp.stderr);
        let fingerprint = Fingerprint::parse(fp.stdout.trim()).expect("fingerprint line");
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("XFERD_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xferd serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| {
                // Give the reader a moment to collect the last lines of a daemon that quit.
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "the daemon did not log its listen address ({e}); it said:\n{}",
                    log.lock().unwrap()
                )
            });
        Serving {
            child,
            addr: ServerAddr::parse(&addr).unwrap(),
            fingerprint,
            log,
        }
    }

    /// True once the daemon's log holds `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().contains(text)
    }

    pub async fn client(&self, user: &str, pw: &str) -> Client {
        let mut c = Client::connect(&self.addr, self.fingerprint, None)
            .await
            .expect("connect");
        c.login(user, pw).await.expect("login");
        c
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits for the process to exit; returns its code and how long that took.
    pub async fn wait_exit(&mut self, limit: Duration) -> (i32, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "xferd did not exit within {limit:?}; log:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `key = value` lines in a config file (the key must be present).
pub fn set_config(config: &Path, edits: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(config).unwrap();
    for (key, value) in edits {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no `{key}` in the config"))
            .to_string();
        text = text.replace(&line, &format!("{key} = {value}"));
    }
    std::fs::write(config, text).unwrap();
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Logs in on a raw connection and starts an upload of `size` bytes to `path`, sending
/// `send` bytes of it; returns the connection mid-body.
pub async fn stalled_upload(
    serving: &Serving,
    path: &str,
    size: u64,
    send: usize,
) -> xfer_proto::Connection<xfer::conn::TlsStream> {
    let mut conn = xfer_tests::raw_connect_to(&serving.addr, serving.fingerprint).await;
    xfer_tests::raw_login_as(&mut conn, "alice", "alice-pw").await;
    xfer_tests::raw_start_upload(&mut conn, path, size).await;
    tokio::io::AsyncWriteExt::write_all(conn.get_mut(), &vec![0xAB; send])
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::flush(conn.get_mut())
        .await
        .unwrap();
    conn
}

/// Bytes held in `user`'s partial uploads under `storage` (0 when none).
pub fn partial_bytes(storage: &std::path::Path, user: &str) -> u64 {
    std::fs::read_dir(storage.join(".xfer-partial").join(user))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// Polls `done` until it holds, failing the test after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `contents` to a file in the local folder `dir` and uploads it to `remote`.
pub async fn upload_bytes(c: &mut Client, dir: &Path, remote: &str, contents: &[u8]) {
    let local = dir.join(format!("local-{remote}"));
    std::fs::write(&local, contents).unwrap();
    c.upload(&local, remote, true, Default::default())
        .await
        .unwrap();
}
