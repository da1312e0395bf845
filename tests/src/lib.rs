//! Test fixtures shared by every end-to-end test: a daemon running in-process in a temp folder
//! (real TLS on 127.0.0.1, real users file, real storage), a client home folder, and a runner
//! for the real `xfer` binary. Everything cleans up on drop. [`cluster`] has the clustered
//! engines (a Garage cluster, HAProxy) the scale-out tests run against.

pub mod cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use xfer::addr::ServerAddr;
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::{Request, Response, Role};
use xferd::accounts::UsersFile;
use xferd::config::Config;
use xferd::server::Daemon;
use xferd::state::State;

/// Accounts every test server starts with: (name, role, password).
pub const USERS: [(&str, Role, &str); 3] = [
    ("alice", Role::User, "alice-pw"),
    ("bob", Role::User, "bob-pw"),
    ("root", Role::Superuser, "root-pw"),
];

/// A daemon running on its own thread and runtime, serving a temp folder.
pub struct TestServer {
    /// The folder holding config, users, certificate and storage.
    pub dir: TempDir,
    /// The config file.
    pub config_path: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its fingerprint, as `xferd fingerprint` prints it.
    pub fingerprint: String,
    /// Shared daemon state (for reloads and shutdown handles).
    pub state: Arc<State>,
    /// The storage root the daemon serves, kept so that path helpers need not re-read the
    /// config file (about 0.5 ms a call in a debug build; polling loops call them often).
    root: PathBuf,
    /// Sends the test's shutdown signal.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The daemon thread; yields `run`'s result.
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a daemon with the default config and the [`USERS`].
    pub fn start() -> TestServer {
        Self::start_with(|_| {})
    }

    /// Starts a daemon after letting `edit` change the loaded config.
    pub fn start_with(edit: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("xferd.toml");
        xferd::init::init(&xferd::init::InitOptions {
            config: config_path.clone(),
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        })
        .expect("xferd init");
        let config = Config::load(&config_path).expect("config");
        let mut users = UsersFile::default();
        for (name, role, pw) in USERS {
            users.add(name, role, pw).expect("add user");
        }
        users.save(&config.users_file).expect("save users");
        Self::launch(dir, config_path, None, edit)
    }

    /// Starts a daemon on an existing folder (a restart), optionally on a fixed address.
    pub fn launch(
        dir: TempDir,
        config_path: PathBuf,
        addr: Option<SocketAddr>,
        edit: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = Config::load(&config_path).expect("config");
        edit(&mut config);
        let root = config.root.clone();
        let std_listener =
            std::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
                .expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        // Loaded on the runtime that serves it (a shared store's background tasks live
        // there), which runs on a thread of its own: the caller may be inside a runtime.
        let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let result = rt.block_on(async move {
                let daemon = match Daemon::load(config).await {
                    Ok(daemon) => daemon,
                    Err(e) => {
                        let _ = loaded_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let _ = loaded_tx.send(Ok(daemon.state().clone()));
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                daemon
                    .run(listener, async move {
                        let _ = stop_rx.await;
                    })
                    .await
            });
            rt.shutdown_timeout(Duration::from_secs(5));
            result
        });
        let state = match loaded_rx.recv() {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => panic!("daemon loads: {e}"),
            Err(_) => panic!("daemon loads: the daemon's thread ended first"),
        };
        let fingerprint = state.fingerprint().to_string();
        TestServer {
            dir,
            config_path,
            addr,
            fingerprint,
            state,
            root,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`, as clients name it.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// The loaded config.
    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("config")
    }

    /// A user's storage folder.
    pub fn user_dir(&self, user: &str) -> PathBuf {
        self.root.join(user)
    }

    /// The folder where uploads are staged.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(xferd::storage::local::TMP_DIR)
    }

    /// Edits the users file as `xferd user ...` would; the daemon notices on its own.
    pub fn edit_users(&self, f: impl FnOnce(&mut UsersFile)) {
        let path = self.config().users_file;
        let mut users = UsersFile::load(&path).expect("users");
        f(&mut users);
        // Make sure the modification time moves even on coarse-grained filesystems.
        std::thread::sleep(Duration::from_millis(20));
        users.save(&path).expect("save users");
    }

    /// Replaces the key and certificate and reloads them (as SIGHUP would); returns the new
    /// fingerprint.
    pub fn rotate_key(&mut self) -> String {
        let config = self.config();
        let id = xferd::tls::generate(&[]).expect("generate");
        std::fs::write(&config.key, &id.key_pem).unwrap();
        std::fs::write(&config.cert, &id.cert_pem).unwrap();
        self.state.reload().expect("reload");
        self.fingerprint = id.fingerprint.to_string();
        self.fingerprint.clone()
    }

    /// Waits up to `timeout` for the daemon to finish on its own (after a wire shutdown).
    pub fn wait(&mut self, timeout: Duration) -> Option<anyhow::Result<()>> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return self.thread.take().map(|t| t.join().expect("daemon thread"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// True while the daemon thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Bytes held in `user`'s partial uploads, once the daemon has let go of them all (an
    /// upload still running holds a lock on its partial); waits up to `timeout`.
    pub fn released_partial_bytes(&self, user: &str, timeout: Duration) -> u64 {
        let dir = self
            .root
            .join(xferd::storage::local::partial::PARTIAL_DIR)
            .join(user);
        let start = std::time::Instant::now();
        'again: loop {
            assert!(start.elapsed() < timeout, "partial uploads still held");
            let mut total = 0;
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let f = std::fs::File::open(e.path()).expect("open partial");
                if !xfer_proto::staging::try_lock(&f).expect("flock a partial upload") {
                    std::thread::sleep(Duration::from_millis(10));
                    continue 'again;
                }
                total += f.metadata().unwrap().len();
            }
            return total;
        }
    }

    /// Stops the daemon and returns `run`'s result and the folder (for a restart).
    pub fn stop(mut self) -> (anyhow::Result<()>, TempDir, PathBuf, SocketAddr) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = self
            .thread
            .take()
            .map(|t| t.join().expect("daemon thread"))
            .unwrap_or(Ok(()));
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (result, dir, self.config_path.clone(), self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client's home: its own state folder, and a runner for the `xfer` binary.
pub struct ClientHome {
    /// The temp folder; `config` inside it is the state folder.
    pub dir: TempDir,
    /// Path of the `xfer` binary under test.
    pub bin: PathBuf,
}

/// What a finished `xfer` run gave.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the whole run unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }
}

impl ClientHome {
    /// A fresh home using the `xfer` binary at `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> ClientHome {
        ClientHome {
            dir: tempfile::tempdir().expect("temp dir"),
            bin: bin.into(),
        }
    }

    /// The state folder passed as `--config-dir`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// A scratch path inside the home.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A command for `xfer ARGS` with this home's state folder and no terminal.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config-dir")
            .arg(self.config_dir())
            .args(args)
            .env_remove("XFER_CONFIG_DIR")
            .env_remove("XFER_TOKEN")
            .current_dir(self.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `xfer ARGS` with `stdin` as its standard input.
    pub fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn xfer");
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            let _ = input.write_all(stdin.as_bytes());
        }
        Run::from(child.wait_with_output().expect("xfer runs"))
    }

    /// Runs `xfer ARGS` with empty standard input.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, "")
    }

    /// Logs in as `user` (password from [`USERS`]) pinning the server's fingerprint.
    pub fn login(&self, server: &TestServer, user: &str) -> Run {
        self.login_with(server, user, password_of(user), &[])
    }

    /// Logs in as `user` with `password` pinning the server's fingerprint; `before` goes in
    /// front of `login` (global options such as `--bind`).
    pub fn login_with(
        &self,
        server: &TestServer,
        user: &str,
        password: &str,
        before: &[&str],
    ) -> Run {
        let target = format!("{user}@{}", server.server());
        let mut args = before.to_vec();
        args.extend([
            "login",
            &target,
            "--password-stdin",
            "--fingerprint",
            &server.fingerprint,
        ]);
        self.run_with_stdin(&args, &format!("{password}\n"))
    }
}

/// The [`USERS`] password of `user`.
pub fn password_of(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(n, _, _)| *n == user)
        .map(|(_, _, p)| *p)
        .expect("known test user")
}

/// Writes `data` to `path`, creating parent folders.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift), for content that compresses badly.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every byte value, then "EOF" lines, CRLFs and NULs: the content that broke marker-based
/// transfers.
pub fn tricky_bytes() -> Vec<u8> {
    let mut v: Vec<u8> = (0..=255u8).collect();
    v.extend_from_slice(b"\nEOF\nEOF\r\nEOF");
    v.extend_from_slice(&[0, 0, b'E', b'O', b'F', 0]);
    v.extend((0..=255u8).rev());
    v.extend_from_slice(b"EOF");
    v
}

/// A raw protocol connection, as the tests that speak the protocol by hand use it.
pub type RawConn = xfer_proto::Connection<xfer::conn::TlsStream>;

/// A raw protocol connection (TLS verified against `fp`), for tests that need to send what
/// the real client never would.
pub async fn raw_connect_to(addr: &ServerAddr, fp: Fingerprint) -> RawConn {
    let (tls, _) = xfer::conn::connect_tls(addr, Some(fp), None)
        .await
        .expect("TLS connect");
    xfer_proto::Connection::new(tls, Duration::from_secs(10))
}

/// Where a test server listens and the key it is pinned by, as a client takes them.
fn address_and_pin(server: &TestServer) -> (ServerAddr, Fingerprint) {
    (
        ServerAddr::parse(&server.server()).unwrap(),
        Fingerprint::parse(&server.fingerprint).unwrap(),
    )
}

/// A raw protocol connection to a test server.
pub async fn raw_connect(server: &TestServer) -> RawConn {
    let (addr, fp) = address_and_pin(server);
    raw_connect_to(&addr, fp).await
}

/// Sends one request and reads the one frame that answers it.
pub async fn raw_call(conn: &mut RawConn, request: &Request) -> Response {
    conn.write_frame(request).await.unwrap();
    conn.read_frame().await.unwrap()
}

/// Sends a hello and checks the answer.
pub async fn raw_hello(conn: &mut RawConn) {
    let reply = raw_call(
        conn,
        &Request::Hello {
            version: xfer_proto::PROTOCOL_VERSION,
            agent: "xfer-tests".into(),
        },
    )
    .await;
    assert!(matches!(reply, Response::Hello { .. }), "{reply:?}");
}

/// Hello, then a login that must succeed; returns the session token.
pub async fn raw_login_as(conn: &mut RawConn, user: &str, password: &str) -> String {
    raw_hello(conn).await;
    raw_log_in(conn, user, password).await
}

/// A login (on a connection already greeted) that must succeed; returns the session token.
pub async fn raw_log_in(conn: &mut RawConn, user: &str, password: &str) -> String {
    let reply = raw_call(
        conn,
        &Request::Login {
            user: user.into(),
            password: password.into(),
        },
    )
    .await;
    match reply {
        Response::LoggedIn { token, .. } => token,
        other => panic!("login as {user} failed: {other:?}"),
    }
}

/// A raw connection to a test server, logged in as `user` with its [`USERS`] password.
pub async fn raw_login(server: &TestServer, user: &str) -> RawConn {
    let mut conn = raw_connect(server).await;
    raw_login_as(&mut conn, user, password_of(user)).await;
    conn
}

/// Sends an `Upload` header and checks the server is ready from byte 0.
pub async fn raw_start_upload(conn: &mut RawConn, path: &str, size: u64) {
    raw_start_upload_up_to(conn, path, size, 0).await;
}

/// Sends an `Upload` header that accepts a resume up to `up_to` and checks the server
/// nevertheless starts from byte 0 (nothing is held, or resume is off for this client).
pub async fn raw_start_upload_up_to(conn: &mut RawConn, path: &str, size: u64, up_to: u64) {
    let reply = raw_call(
        conn,
        &Request::Upload {
            path: path.into(),
            size,
            offset: up_to,
        },
    )
    .await;
    assert_eq!(reply, Response::UploadReady { offset: 0 });
}

/// A logged-in library client for `user`.
pub async fn client(server: &TestServer, user: &str) -> xfer::conn::Client {
    let (addr, fp) = address_and_pin(server);
    let mut c = xfer::conn::Client::connect(&addr, fp, None)
        .await
        .expect("connect");
    c.login(user, password_of(user)).await.expect("login");
    c
}

/// A TCP relay between a client and a test server that counts the bytes of each connection
/// in each direction and can stall a direction after a number of bytes, as a dropped or frozen
/// link would. Used to measure what a resumed transfer really sends.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    /// Per-connection caps for new connections: client to server, server to client.
    caps: std::sync::Mutex<(u64, u64)>,
    /// Whether a stalled connection stays open towards the receiver after the sender died.
    freeze: std::sync::atomic::AtomicBool,
    /// Bytes relayed on each connection so far: (client to server, server to client).
    counts: std::sync::Mutex<Vec<Arc<[std::sync::atomic::AtomicU64; 2]>>>,
}

impl Proxy {
    /// Relays `127.0.0.1:PORT` (a new port) to `target`, without caps.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            caps: std::sync::Mutex::new((u64::MAX, u64::MAX)),
            ..Default::default()
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let (up_cap, down_cap) = *s.caps.lock().unwrap();
                let freeze = s.freeze.load(std::sync::atomic::Ordering::Relaxed);
                let counts: Arc<[std::sync::atomic::AtomicU64; 2]> = Arc::new(Default::default());
                s.counts.lock().unwrap().push(counts.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = counts.clone();
                std::thread::spawn(move || relay(client, server, up_cap, freeze, &up[0]));
                std::thread::spawn(move || relay(s2, c2, down_cap, freeze, &counts[1]));
            }
        });
        Proxy { addr, shared }
    }

    /// `127.0.0.1:PORT` of the proxy, as clients name it.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// Connections opened from now on relay at most `up` bytes to the server and `down` bytes
    /// to the client, then forward nothing more in that direction until the sender closes.
    pub fn set_caps(&self, up: u64, down: u64) {
        *self.shared.caps.lock().unwrap() = (up, down);
    }

    /// With `true`, connections opened from now on keep a stalled direction open towards its
    /// receiver for a minute after the sender died, as a link that silently went dead would:
    /// the receiver learns nothing until its own timeout.
    pub fn set_freeze(&self, freeze: bool) {
        self.shared
            .freeze
            .store(freeze, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes relayed on the most recent connection: (client to server, server to client).
    pub fn last_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared
            .counts
            .lock()
            .unwrap()
            .last()
            .map(|c| (c[0].load(Relaxed), c[1].load(Relaxed)))
            .unwrap_or((0, 0))
    }

    /// Waits until the most recent connection has relayed `up` bytes to the server or `down`
    /// bytes to the client (so a capped direction has stalled).
    pub fn wait_for(&self, up: u64, down: u64, timeout: Duration) {
        let start = std::time::Instant::now();
        loop {
            let (u, d) = self.last_counts();
            if u >= up || d >= down {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "proxy relayed only {u} up / {d} down bytes in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Copies `from` to `to`, counting, until `cap` bytes; then discards the rest until `from`
/// closes and closes both: to the receiver, a link that froze and then dropped.
fn relay(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    cap: u64,
    freeze: bool,
    count: &std::sync::atomic::AtomicU64,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = cap.saturating_sub(count.load(Relaxed));
        if left == 0 {
            // Stalled: forward nothing more, but drain, so the sender's death is seen at once
            // (unread data would hide its FIN) and passed on as a closed connection.
            while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
            if freeze {
                std::thread::sleep(Duration::from_secs(60));
            }
            break;
        }
        let want = buf.len().min(left.min(usize::MAX as u64) as usize);
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                count.fetch_add(n as u64, Relaxed);
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Makes sure the command-line tool `cmd` (from the Debian package `package`) can run: when it
/// is missing and we are root with apt-get, installs it (once per machine, serialised across
/// test processes by a lock file); otherwise panics saying what to install. A test that needs
/// a tool runs it or fails; it never passes without checking anything.
pub fn require_tool(cmd: &str, package: &str) {
    let present = || {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {cmd}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if present() {
        return;
    }
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_thread = APT.lock().unwrap_or_else(|e| e.into_inner());
    // Other test binaries may be installing at the same moment; flock serialises them.
    let script = format!(
        "command -v {cmd} >/dev/null || {{ [ \"$(id -u)\" = 0 ] && command -v apt-get >/dev/null && \
         (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package} >/dev/null 2>&1 || \
          (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package})); }}"
    );
    let _ = Command::new("flock")
        .arg("/tmp/xfer-tests-apt.lock")
        .arg("sh")
        .arg("-c")
        .arg(&script)
        .status();
    assert!(
        present(),
        "this test needs `{cmd}`: install the Debian package `{package}` (apt-get install {package})"
    );
}
