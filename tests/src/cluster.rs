//! The real engines the scale-out tests run against, not mocks: a 3-node Garage cluster
//! (S3-compatible, replication factor 3) started once per test binary by
//! `tests/cluster/garage.sh`, and HAProxy in TCP mode in front of whatever a test names, started
//! by `tests/cluster/haproxy.sh`. Both live in their own temp folder, on 127.0.0.1 only.
//!
//! A missing `garage` binary or HAProxy fails the test with what to install: these tests never
//! pass without running.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tempfile::TempDir;

/// Nodes in the Garage cluster (and its replication factor).
pub const GARAGE_NODES: usize = 3;

/// Set to a folder to use (or start, and leave running) the Garage cluster there instead of a
/// fresh one per test binary: `tests/cluster/garage.sh start DIR` once, then
/// `XFER_GARAGE_DIR=DIR cargo test ...` as often as you like.
pub const GARAGE_DIR_ENV: &str = "XFER_GARAGE_DIR";

/// What an S3 client needs to reach the test bucket.
#[derive(Clone)]
pub struct S3Settings {
    /// `http://127.0.0.1:PORT` of the node this client talks to.
    pub endpoint: String,
    /// Garage's `s3_region`; requests signed for another region are refused.
    pub region: String,
    /// The one bucket the key may read and write.
    pub bucket: String,
    /// Access key id (`GK...`).
    pub access_key_id: String,
    /// Secret access key: kept out of Debug output and logs.
    pub secret_access_key: String,
}

impl S3Settings {
    /// The `[storage]` settings of a daemon that keeps its files in this bucket under
    /// `prefix` (small 64 KiB parts are left to the caller).
    pub fn storage(&self, prefix: &str) -> xferd::config::StorageSettings {
        xferd::config::StorageSettings {
            kind: xferd::config::StorageKind::S3,
            bucket: self.bucket.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            allow_http: true,
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    /// Opens `settings` with this key, as a node would (a fresh client each call), once the
    /// bucket answers: the layout may take a moment to reach a node after the cluster starts.
    pub async fn open(
        &self,
        settings: &xferd::config::StorageSettings,
    ) -> xferd::storage::object::ObjectStore {
        let store = xferd::storage::object::ObjectStore::open(
            settings,
            xferd::storage::object::Credentials::new(
                self.access_key_id.clone(),
                self.secret_access_key.clone(),
            ),
        )
        .unwrap_or_else(|e| panic!("opening the test bucket: {e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match store.check().await {
                Ok(()) => return store,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the test bucket never answered: {e}"),
            }
        }
    }
}

/// The key prefix of the test named `name` in this run: the same for every call with that
/// name (the "nodes" of one test share it), never reused by another run against a kept
/// cluster ([`GARAGE_DIR_ENV`]).
pub fn test_prefix(name: &str) -> String {
    static PREFIXES: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut known = PREFIXES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, unique)) = known.iter().find(|(n, _)| n == name) {
        return unique.clone();
    }
    let unique = unique_prefix(name);
    known.push((name.to_string(), unique.clone()));
    unique
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The running Garage cluster of this test binary; see [`garage`].
pub struct Garage {
    /// The folder `garage.sh` keeps configs, data, logs and `s3.env` in.
    dir: PathBuf,
    /// Node 1's settings; the others differ only in the endpoint.
    s3: S3Settings,
    /// Each node's S3 port, index 0 = node 1.
    s3_ports: [u16; GARAGE_NODES],
    /// Written while a node is down, so at most one is (the 2-of-3 quorum holds for the tests
    /// running beside a quorum test); read by the tests that need every node up.
    membership: RwLock<()>,
}

/// Starts the Garage cluster on first use (about 2 s) and returns it; every later call in
/// the same test binary gets the same cluster. It stops, and its folder is deleted, when the
/// test binary exits. With [`GARAGE_DIR_ENV`] set, that cluster is used instead (and left
/// running). Panics with the reason, and how to fix it, when the cluster cannot start.
pub fn garage() -> &'static Garage {
    // S3 clients here use reqwest without a built-in TLS provider, like the daemon (which
    // installs ring when it opens a store): a test that talks to the store first needs it too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    static CLUSTER: OnceLock<Result<Garage, String>> = OnceLock::new();
    match CLUSTER.get_or_init(Garage::start) {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    }
}

/// A key prefix no other test (in this binary, or another run against a kept cluster) uses,
/// so tests can share the one bucket.
pub fn unique_prefix(test: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{test}-{}-{nanos}-{n}", std::process::id())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cluster")
        .join(name)
}

/// Runs a cluster script; its stderr carries the reason when it fails.
fn run_script(name: &str, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script(name))
        .args(args)
        .output()
        .map_err(|e| format!("running {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tests/cluster/{name} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Garage {
    fn start() -> Result<Garage, String> {
        let pid = std::process::id().to_string();
        let dir = match std::env::var_os(GARAGE_DIR_ENV) {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                run_script("garage.sh", &["start".as_ref(), dir.as_os_str()])?;
                dir
            }
            None => {
                // Kept on purpose: the script's watcher deletes it when this process exits,
                // after the nodes writing into it have stopped.
                let dir = tempfile::Builder::new()
                    .prefix("xfer-garage-")
                    .tempdir()
                    .map_err(|e| format!("creating the Garage folder: {e}"))?
                    .keep();
                run_script(
                    "garage.sh",
                    &[
                        "start".as_ref(),
                        dir.as_os_str(),
                        "--owner".as_ref(),
                        pid.as_ref(),
                    ],
                )?;
                dir
            }
        };
        let env = read_env(&dir.join("s3.env"))?;
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .ok_or_else(|| format!("{}/s3.env has no {k}", dir.display()))
        };
        let mut s3_ports = [0; GARAGE_NODES];
        for (i, port) in s3_ports.iter_mut().enumerate() {
            let key = format!("XFER_GARAGE_{}_S3_PORT", i + 1);
            *port = get(&key)?
                .parse()
                .map_err(|e| format!("{key} in s3.env: {e}"))?;
        }
        let s3 = S3Settings {
            endpoint: get("XFER_S3_ENDPOINT")?,
            region: get("XFER_S3_REGION")?,
            bucket: get("XFER_S3_BUCKET")?,
            access_key_id: get("AWS_ACCESS_KEY_ID")?,
            secret_access_key: get("AWS_SECRET_ACCESS_KEY")?,
        };
        Ok(Garage {
            dir,
            s3,
            s3_ports,
            membership: RwLock::new(()),
        })
    }

    /// Settings for talking to node 1, which [`Garage::stop_node`] never stops: tests that do
    /// not care which node answers use this.
    pub fn s3(&self) -> S3Settings {
        self.s3.clone()
    }

    /// Settings for talking to node `node` (1-based).
    pub fn node_s3(&self, node: usize) -> S3Settings {
        S3Settings {
            endpoint: format!("http://{}", self.node_addr(node)),
            ..self.s3.clone()
        }
    }

    /// Where node `node` (1-based) serves S3, for a load balancer in front of the nodes.
    pub fn node_addr(&self, node: usize) -> SocketAddr {
        assert!(
            (1..=GARAGE_NODES).contains(&node),
            "Garage nodes are 1..={GARAGE_NODES}, not {node}"
        );
        SocketAddr::from(([127, 0, 0, 1], self.s3_ports[node - 1]))
    }

    /// The folder with the cluster's configs, logs (`node*/garage.log`) and `s3.env`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The S3 settings as the environment variables `s3.env` holds (`XFER_S3_*`, `AWS_*`),
    /// for a child process such as a real `xferd`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("XFER_S3_ENDPOINT", self.s3.endpoint.clone()),
            ("XFER_S3_REGION", self.s3.region.clone()),
            ("XFER_S3_BUCKET", self.s3.bucket.clone()),
            ("AWS_ACCESS_KEY_ID", self.s3.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.s3.secret_access_key.clone()),
        ]
    }

    /// Keeps every node up until the guard is dropped: a test that talks to nodes 2 or 3
    /// (directly, or through a balancer) holds it, since a node stopped under a request breaks
    /// that request. Tests that use only [`Garage::s3`] (node 1) need not.
    pub fn all_up(&self) -> AllUp<'_> {
        AllUp {
            _up: self.membership.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Stops node `node` (2 or 3: node 1 serves [`Garage::s3`] for the other tests) until the
    /// returned guard is dropped or [`NodeDown::start`]ed, which starts it again and waits until
    /// the cluster is healthy. Waits while another node is down or an [`AllUp`] is held.
    pub fn stop_node(&self, node: usize) -> NodeDown<'_> {
        assert!(
            (2..=GARAGE_NODES).contains(&node),
            "only nodes 2..={GARAGE_NODES} may be stopped; node 1 serves the shared endpoint"
        );
        let one = self.membership.write().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = run_script(
            "garage.sh",
            &[
                "stop-node".as_ref(),
                self.dir.as_os_str(),
                node.to_string().as_ref(),
            ],
        ) {
            panic!("{e}");
        }
        let addr = self.node_addr(node);
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
            "Garage node {node} still accepts connections on {addr} after garage.sh stop-node"
        );
        NodeDown {
            garage: self,
            node,
            up: false,
            _one: one,
        }
    }

    fn start_node(&self, node: usize) -> Result<String, String> {
        run_script(
            "garage.sh",
            &[
                "start-node".as_ref(),
                self.dir.as_os_str(),
                node.to_string().as_ref(),
            ],
        )
    }
}

/// Every Garage node stays up while this lives; see [`Garage::all_up`].
pub struct AllUp<'a> {
    _up: RwLockReadGuard<'a, ()>,
}

/// A stopped Garage node; dropping it starts the node again.
pub struct NodeDown<'a> {
    garage: &'a Garage,
    node: usize,
    /// Set once restarted, so Drop does not start it twice.
    up: bool,
    _one: RwLockWriteGuard<'a, ()>,
}

impl NodeDown<'_> {
    /// Which node is down.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Starts the node again and waits until the whole cluster reports healthy.
    pub fn start(mut self) {
        self.up = true;
        if let Err(e) = self.garage.start_node(self.node) {
            panic!("{e}");
        }
    }
}

impl Drop for NodeDown<'_> {
    fn drop(&mut self) {
        if self.up {
            return;
        }
        if let Err(e) = self.garage.start_node(self.node) {
            // A panic while unwinding would abort and hide the test's own failure.
            if std::thread::panicking() {
                eprintln!("restarting Garage node {}: {e}", self.node);
            } else {
                panic!("{e}");
            }
        }
    }
}

/// Parses `KEY=value` lines (what `garage.sh` writes to `s3.env`).
fn read_env(path: &Path) -> Result<HashMap<String, String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// HAProxy in TCP mode, round robin over the backends it was started with, on its own port
/// of 127.0.0.1. Stops on drop.
pub struct HaProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Config, pid file and log.
    dir: TempDir,
}

impl HaProxy {
    /// Starts HAProxy on a free loopback port in front of `backends`. Installs the Debian
    /// package when it is missing and we are root; panics saying what to install otherwise.
    pub fn start(backends: &[SocketAddr]) -> HaProxy {
        assert!(!backends.is_empty(), "HAProxy needs at least one backend");
        crate::require_tool("haproxy", "haproxy");
        let dir = tempfile::Builder::new()
            .prefix("xfer-haproxy-")
            .tempdir()
            .expect("temp dir");
        let backends: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        let mut args: Vec<&std::ffi::OsStr> = vec!["start".as_ref(), dir.path().as_os_str()];
        args.push("0".as_ref());
        args.extend(backends.iter().map(|b| std::ffi::OsStr::new(b.as_str())));
        let port = match run_script("haproxy.sh", &args) {
            Ok(out) => out.trim().parse::<u16>().unwrap_or_else(|e| {
                panic!("haproxy.sh printed {out:?} where a port was expected: {e}")
            }),
            Err(e) => panic!("{e}"),
        };
        HaProxy {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        }
    }

    /// `http://ADDR`, for an S3 client going through the balancer.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        if let Err(e) = run_script(
            "haproxy.sh",
            &["stop".as_ref(), self.dir.path().as_os_str()],
        ) {
            eprintln!("{e}");
        }
    }
}
