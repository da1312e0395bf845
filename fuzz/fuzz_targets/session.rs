//! Drives xferd's real per-connection state machine, `xferd::handler::serve_session`, over an
//! in-memory pipe with sequences of well-formed requests, upload bodies and raw bytes.
//!
//! One daemon state per process (logging at trace level into a sink) lives in a temp folder
//! (`$XFER_FUZZ_TMPDIR`, else /dev/shm when there is one, else the system temp folder): a
//! config from `xferd::init`, two accounts (`fuzz`, a user, and `admin`, a superuser) and a
//! session token for each, made once so inputs authenticate without paying for argon2id.
//! Before each input the users' trees are reset to a fixed layout that includes symbolic links
//! pointing out of the tree and a "secret" outside it, and each input connects from a new
//! loopback address so per-source state starts empty.
//!
//! After each input the target checks:
//! - nothing panicked and the session ended within a deadline (the client always closes);
//! - every byte the server sent is a valid frame or an announced download body, the first
//!   answer is `Hello` or a closing error (or only `ShuttingDown` when the input starts with the
//!   daemon already stopping), nothing follows a closing answer, file answers only
//!   come after an authentication succeeded, and a download's digest matches its body;
//! - the server never sent the storage path, the outside secret's name or its content, unless
//!   the client had sent that string first;
//! - nothing was created, changed or deleted outside the storage root, the staging folder is
//!   empty once the session is over, the planted links are intact, and a user who never
//!   authenticated has an untouched tree.
#![no_main]

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_proto::frame::{encode_frame, parse_frame};
use xfer_proto::limits::{MAX_ENTRIES_PER_FRAME, MAX_PASSWORD_LEN};
use xfer_proto::{Connection, ErrorCode, PROTOCOL_VERSION, Request, Response, Role};
use xferd::accounts::UsersFile;
use xferd::config::Config;
use xferd::server::Daemon;
use xferd::state::State;

const USER: &str = "fuzz";
const USER_PW: &str = "fuzz-password";
const ADMIN: &str = "admin";
const ADMIN_PW: &str = "admin-password";
/// Deadline for one whole input; the server's own deadlines are far shorter.
const INPUT_DEADLINE: Duration = Duration::from_secs(30);
/// What the server's connection uses for each read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Input: a sequence of operations, decoded from the fuzzer's bytes by `arbitrary`
// ---------------------------------------------------------------------------------------------

#[derive(Arbitrary, Debug)]
struct Input {
    /// How the session starts (the zero variant: hello and the user's token).
    start: Start,
    /// Then these, in order, written without waiting for answers.
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Start {
    HelloAuthUser,
    HelloAuthAdmin,
    Hello,
    Nothing,
    /// The daemon is already shutting down when the connection arrives.
    ShuttingDown,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Hello(Version, String),
    AuthUser,
    AuthAdmin,
    AuthToken(String),
    Login(UserName, Password),
    Logout,
    WhoAmI,
    Ping,
    List(FPath),
    /// A well-formed upload: header, body and trailer.
    Upload {
        path: FPath,
        data: Vec<u8>,
        size: SizeAdj,
        trailer: Trailer,
    },
    /// An upload header alone, with any size and offset.
    UploadHeader {
        path: FPath,
        size: u64,
        offset: u64,
    },
    UploadEnd([u8; 32]),
    /// The answer to a resume offer, with any offset.
    UploadFrom(Offset),
    Download {
        path: FPath,
        offset: Offset,
    },
    /// A resumed download with any prefix digest (or the right one for a prefix of `data`).
    DownloadFrom {
        path: FPath,
        offset: Offset,
        prefix: [u8; 32],
    },
    Delete(FPath),
    Rename(FPath, FPath),
    Mkdir(FPath),
    Shutdown(Password),
    /// Any bytes under a correct length prefix.
    RawFrame(Vec<u8>),
    /// Any bytes at all.
    RawBytes(Vec<u8>),
    /// A batched upload (protocol 3): header and body, with the right or a wrong digest.
    Put {
        path: FPath,
        data: Vec<u8>,
        size: SizeAdj,
        trailer: Trailer,
    },
    Commit,
    /// A key login (protocol 3); refused here, where the connection has no TLS to bind to.
    KeyLogin(UserName, [u8; 32]),
    /// A key proof with any signature.
    KeyProof(Vec<u8>),
    /// A long-lived token (protocol 3), with any scope and lifetime.
    TokenCreate {
        read_only: bool,
        path: FPath,
        expires_secs: u64,
    },
    TokenList,
    TokenRevoke(String),
}

#[derive(Arbitrary, Debug)]
enum Version {
    Current,
    Other(u16),
}

#[derive(Arbitrary, Debug)]
enum UserName {
    User,
    Admin,
    Unknown,
    TooLong,
    Raw(String),
}

/// Only the right password of a known account is checked with argon2id (tens of
/// milliseconds); every other password is sent longer than the limit, which the server
/// refuses without hashing, so the fuzzer does not spend its time in argon2.
#[derive(Arbitrary, Debug)]
enum Password {
    Right,
    Wrong,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum SizeAdj {
    Exact,
    Fewer(u8),
    More(u8),
    Huge(u64),
}

#[derive(Arbitrary, Debug)]
enum Trailer {
    Right,
    Wrong([u8; 32]),
    Missing,
}

#[derive(Arbitrary, Debug)]
enum Offset {
    Zero,
    Small(u8),
    Any(u64),
}

impl Offset {
    fn value(&self) -> u64 {
        match self {
            Offset::Zero => 0,
            Offset::Small(n) => *n as u64,
            Offset::Any(n) => *n,
        }
    }
}

/// A remote path: parts joined with `/` (an empty first part makes it absolute).
#[derive(Arbitrary, Debug)]
struct FPath(Vec<Part>);

#[derive(Arbitrary, Debug)]
enum Part {
    /// Names of the reset layout (see `plant`).
    File,
    Dir,
    DirFile,
    LinkDir,
    LinkFile,
    LinkUp,
    New,
    Other,
    DotDot,
    Dot,
    Empty,
    Unicode,
    Nul,
    Backslash,
    Newline,
    Long255,
    Long256,
    Raw(String),
}

impl Part {
    fn text(&self) -> String {
        match self {
            Part::File => "a".into(),
            Part::Dir => "d".into(),
            Part::DirFile => "f".into(),
            Part::LinkDir => "ln-dir".into(),
            Part::LinkFile => "ln-file".into(),
            Part::LinkUp => "ln-up".into(),
            Part::New => "new".into(),
            Part::Other => "b".into(),
            Part::DotDot => "..".into(),
            Part::Dot => ".".into(),
            Part::Empty => String::new(),
            Part::Unicode => "été 字".into(),
            Part::Nul => "x\0y".into(),
            Part::Backslash => "..\\x".into(),
            Part::Newline => "a\nb".into(),
            Part::Long255 => "n".repeat(255),
            Part::Long256 => "n".repeat(256),
            Part::Raw(s) => s.clone(),
        }
    }
}

impl FPath {
    fn text(&self) -> String {
        self.0.iter().map(Part::text).collect::<Vec<_>>().join("/")
    }
}

// ---------------------------------------------------------------------------------------------
// The fixture: one daemon state per process
// ---------------------------------------------------------------------------------------------

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// The folder holding everything: config, keys, users, state, storage, outside.
    base: PathBuf,
    /// The folder holding every process's `base`.
    parent: PathBuf,
    config: Config,
    state: Arc<State>,
    /// A second daemon state on the same folder, shutting down from the start (loading one
    /// costs an argon2id hash, so it is made once).
    stopped: Arc<State>,
    user_token: String,
    admin_token: String,
    /// Strings the server must never send unless the client sent them first.
    markers: Vec<Vec<u8>>,
    /// The outside secret's content, hashed (compared by hash so the fuzzer cannot learn it).
    secret_hash: [u8; 32],
    /// `storage/fuzz` right after a reset.
    pristine_user_tree: Tree,
    /// Where the planted links point, by path under the storage root.
    links: BTreeMap<PathBuf, PathBuf>,
    /// Inputs run so far.
    inputs: u32,
}

/// A folder's content: relative path to kind, size (files) and target (links). No times.
type Tree = BTreeMap<PathBuf, String>;

fn snapshot(dir: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("link -> {}", target.display()));
            } else if ft.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else if ft.is_file() {
                out.insert(rel, format!("file {} bytes", meta.len()));
            } else {
                out.insert(rel, "other".into());
            }
        }
    }
    let mut out = Tree::new();
    walk(dir, dir, &mut out);
    out
}

fn temp_parent() -> PathBuf {
    if let Some(dir) = std::env::var_os("XFER_FUZZ_TMPDIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    // tmpfs makes the daemon's fsyncs free.
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A session token for `user` at the account's current generation (a new account's
/// generation is time-derived, so it is looked up rather than assumed).
fn login(state: &State, user: &str) -> String {
    let (_, generation) = state.accounts.lookup(user).expect("the fixture's account");
    state.sessions.create(user, generation, "fuzz").0
}

/// Something unguessable, so the strings the server must not leak are not in any input.
fn random_hex(tag: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let seed = format!("{tag}/{}/{now}", std::process::id());
    blake3::hash(seed.as_bytes()).to_hex()[..32].to_string()
}

impl Fixture {
    fn new() -> Fixture {
        // Every log line is formatted (and thrown away): the daemon logs client-supplied
        // names and errors, and that formatting is code the fuzzer should run too (with the
        // daemon's own field formatter, which escapes and cuts what clients send).
        tracing_subscriber::fmt()
            .fmt_fields(xferd::logging::SafeFields)
            .with_writer(std::io::sink)
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .init();
        let parent = temp_parent().join("xfer-fuzz-session");
        std::fs::create_dir_all(&parent).unwrap();
        // Folders of earlier runs whose process is gone (libFuzzer exits without destructors).
        for entry in std::fs::read_dir(&parent).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let alive = Path::new("/proc").join(&name).exists();
            if !alive || name == std::process::id().to_string() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let base = parent.join(std::process::id().to_string());
        std::fs::create_dir_all(&base).unwrap();
        let config_path = base.join("xferd.toml");
        xferd::init::init(&xferd::init::InitOptions {
            config: config_path.clone(),
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        })
        .expect("xferd init");
        let mut config = Config::load(&config_path).expect("config");
        config.limits.login_timeout_secs = 10;
        config.limits.idle_timeout_secs = 10;
        config.limits.io_timeout_secs = IO_TIMEOUT.as_secs();
        let mut users = UsersFile::default();
        users.add(USER, Role::User, USER_PW).unwrap();
        users.add(ADMIN, Role::Superuser, ADMIN_PW).unwrap();
        users.save(&config.users_file).unwrap();

        let secret_name = format!("secret-{}", random_hex("name"));
        let secret = format!("SECRET-{}", random_hex("content"));
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join(&secret_name), &secret).unwrap();
        let links = BTreeMap::from([
            (PathBuf::from("fuzz/ln-dir"), outside.clone()),
            (PathBuf::from("fuzz/ln-file"), outside.join(&secret_name)),
            (PathBuf::from("fuzz/ln-up"), PathBuf::from("..")),
            (PathBuf::from("fuzz/d/ln-root"), PathBuf::from("../..")),
        ]);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let state = rt
            .block_on(Daemon::load(config.clone()))
            .expect("daemon loads")
            .state()
            .clone();
        let stopped = rt
            .block_on(Daemon::load(config.clone()))
            .expect("daemon loads")
            .state()
            .clone();
        stopped.shutdown_handle().trigger("fuzz fixture");
        let user_token = login(&state, USER);
        let admin_token = login(&state, ADMIN);
        let markers = vec![
            base.as_os_str().as_encoded_bytes().to_vec(),
            secret_name.into_bytes(),
            secret.as_bytes().to_vec(),
        ];
        let mut fx = Fixture {
            rt,
            base,
            parent,
            config,
            state,
            stopped,
            user_token,
            admin_token,
            markers,
            secret_hash: *blake3::hash(secret.as_bytes()).as_bytes(),
            pristine_user_tree: Tree::new(),
            links,
            inputs: 0,
        };
        fx.reset();
        fx.pristine_user_tree = snapshot(&fx.config.root.join(USER));
        fx
    }

    /// Live state, sessions and a fresh storage layout before each input.
    fn reset(&mut self) {
        if self.state.shutdown_handle().is_triggered() {
            // An input shut the daemon down: start a new one on the same folder.
            self.state = self
                .rt
                .block_on(Daemon::load(self.config.clone()))
                .expect("daemon reloads")
                .state()
                .clone();
        }
        let state = self.state.clone();
        let valid = |token: &str| {
            state
                .sessions
                .validate(token, |u| state.accounts.lookup(u).map(|(_, g)| g))
                .is_some()
        };
        if !valid(&self.user_token) {
            self.user_token = login(&state, USER);
        }
        if !valid(&self.admin_token) {
            self.admin_token = login(&state, ADMIN);
        }
        let root = &self.config.root;
        for user in [USER, ADMIN] {
            let dir = root.join(user);
            if std::fs::symlink_metadata(&dir).is_ok() {
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
        let home = root.join(USER);
        std::fs::create_dir(&home).unwrap();
        std::fs::write(home.join("a"), b"hello, fuzz\n").unwrap();
        std::fs::create_dir(home.join("d")).unwrap();
        std::fs::write(home.join("d/f"), b"").unwrap();
        for (link, target) in &self.links {
            symlink(target, root.join(link)).unwrap();
        }
    }
}

static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();

// ---------------------------------------------------------------------------------------------
// Turning the input into bytes
// ---------------------------------------------------------------------------------------------

struct Script<'a> {
    fx: &'a Fixture,
    /// One write per operation.
    chunks: Vec<Vec<u8>>,
    /// Right passwords still sent as such in this input (see [`Password`]).
    hashes_left: u32,
}

impl Script<'_> {
    fn frame(&mut self, req: &Request) {
        let mut buf = Vec::new();
        if encode_frame(req, &mut buf).is_ok() {
            self.chunks.push(buf);
        }
    }

    /// The password to send; `right` is the account's, or None for an unknown account.
    fn password(&mut self, pw: &Password, right: Option<&str>) -> String {
        let too_long = |s: &str| {
            let pad = (MAX_PASSWORD_LEN + 1).saturating_sub(s.len());
            format!("{s}{}", "p".repeat(pad))
        };
        match (pw, right) {
            (Password::Right, Some(right)) if self.hashes_left > 0 => {
                self.hashes_left -= 1;
                right.to_string()
            }
            (Password::Right, _) | (Password::Wrong, _) => too_long("wrong"),
            (Password::Raw(s), _) => too_long(s),
        }
    }

    fn start(&mut self, start: &Start) {
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            agent: "xfer-fuzz".into(),
        };
        match start {
            Start::HelloAuthUser => {
                self.frame(&hello);
                self.op(&Op::AuthUser);
            }
            Start::HelloAuthAdmin => {
                self.frame(&hello);
                self.op(&Op::AuthAdmin);
            }
            Start::Hello => self.frame(&hello),
            Start::Nothing => {}
            Start::ShuttingDown => {
                self.frame(&hello);
                self.op(&Op::AuthUser);
            }
        }
    }

    fn op(&mut self, op: &Op) {
        let req = match op {
            Op::Hello(version, agent) => Request::Hello {
                version: match version {
                    Version::Current => PROTOCOL_VERSION,
                    Version::Other(v) => *v,
                },
                agent: agent.clone(),
            },
            Op::AuthUser => Request::Authenticate {
                token: self.fx.user_token.clone(),
            },
            Op::AuthAdmin => Request::Authenticate {
                token: self.fx.admin_token.clone(),
            },
            Op::AuthToken(token) => Request::Authenticate {
                token: token.clone(),
            },
            Op::Login(user, pw) => {
                let (user, right) = match user {
                    UserName::User => (USER.to_string(), Some(USER_PW)),
                    UserName::Admin => (ADMIN.to_string(), Some(ADMIN_PW)),
                    UserName::Unknown => ("nobody".to_string(), None),
                    UserName::TooLong => ("u".repeat(65), None),
                    UserName::Raw(s) => (s.clone(), None),
                };
                let password = self.password(pw, right);
                Request::Login { user, password }
            }
            Op::Logout => Request::Logout,
            Op::WhoAmI => Request::WhoAmI,
            Op::Ping => Request::Ping,
            Op::List(p) => Request::List { path: p.text() },
            Op::Upload {
                path,
                data,
                size,
                trailer,
            } => {
                let len = data.len() as u64;
                let size = match size {
                    SizeAdj::Exact => len,
                    SizeAdj::Fewer(n) => len.saturating_sub(*n as u64),
                    SizeAdj::More(n) => len + *n as u64,
                    SizeAdj::Huge(n) => *n,
                };
                self.frame(&Request::Upload {
                    path: path.text(),
                    size,
                    offset: 0,
                });
                self.chunks.push(data.clone());
                match trailer {
                    Trailer::Right => self.frame(&Request::UploadEnd {
                        digest: *blake3::hash(data).as_bytes(),
                    }),
                    Trailer::Wrong(digest) => self.frame(&Request::UploadEnd { digest: *digest }),
                    Trailer::Missing => {}
                }
                return;
            }
            Op::UploadHeader { path, size, offset } => Request::Upload {
                path: path.text(),
                size: *size,
                offset: *offset,
            },
            Op::UploadEnd(digest) => Request::UploadEnd { digest: *digest },
            Op::UploadFrom(offset) => Request::UploadFrom {
                offset: offset.value(),
            },
            Op::Download { path, offset } => Request::Download {
                path: path.text(),
                offset: offset.value(),
            },
            Op::DownloadFrom {
                path,
                offset,
                prefix,
            } => Request::DownloadFrom {
                path: path.text(),
                offset: offset.value(),
                prefix: *prefix,
            },
            Op::Delete(p) => Request::Delete { path: p.text() },
            Op::Rename(from, to) => Request::Rename {
                from: from.text(),
                to: to.text(),
            },
            Op::Mkdir(p) => Request::Mkdir { path: p.text() },
            Op::Shutdown(pw) => Request::Shutdown {
                password: self.password(pw, Some(ADMIN_PW)),
            },
            Op::RawFrame(body) => {
                let mut buf = (body.len() as u32).to_be_bytes().to_vec();
                buf.extend_from_slice(body);
                self.chunks.push(buf);
                return;
            }
            Op::RawBytes(bytes) => {
                self.chunks.push(bytes.clone());
                return;
            }
            Op::Put {
                path,
                data,
                size,
                trailer,
            } => {
                let len = data.len() as u64;
                let size = match size {
                    SizeAdj::Exact => len,
                    SizeAdj::Fewer(n) => len.saturating_sub(*n as u64),
                    SizeAdj::More(n) => len + *n as u64,
                    SizeAdj::Huge(n) => *n,
                };
                let digest = match trailer {
                    Trailer::Wrong(digest) => *digest,
                    Trailer::Right | Trailer::Missing => *blake3::hash(data).as_bytes(),
                };
                self.frame(&Request::Put {
                    path: path.text(),
                    size,
                    digest,
                });
                self.chunks.push(data.clone());
                return;
            }
            Op::Commit => Request::Commit,
            Op::KeyLogin(user, public_key) => Request::KeyLogin {
                user: match user {
                    UserName::User => USER.to_string(),
                    UserName::Admin => ADMIN.to_string(),
                    UserName::Unknown => "nobody".to_string(),
                    UserName::TooLong => "u".repeat(65),
                    UserName::Raw(s) => s.clone(),
                },
                public_key: *public_key,
            },
            Op::KeyProof(signature) => Request::KeyProof {
                signature: signature.clone(),
            },
            Op::TokenCreate {
                read_only,
                path,
                expires_secs,
            } => Request::TokenCreate {
                name: "fuzz".into(),
                expires_secs: *expires_secs,
                read_only: *read_only,
                path: path.text(),
            },
            Op::TokenList => Request::TokenList,
            Op::TokenRevoke(id) => Request::TokenRevoke { id: id.clone() },
        };
        self.frame(&req);
    }
}

// ---------------------------------------------------------------------------------------------
// Checking what the server said
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Observed {
    /// Users a `Session` or `LoggedIn` answer named.
    users: BTreeSet<String>,
    /// Tokens handed out by `LoggedIn`, revoked after the input.
    tokens: Vec<String>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn check_output(fx: &Fixture, sent: &[u8], out: &[u8], stopping: bool) -> Observed {
    for marker in &fx.markers {
        if contains(out, marker) && !contains(sent, marker) {
            panic!(
                "the server sent {:?}, which the client never sent",
                String::from_utf8_lossy(marker)
            );
        }
    }
    let mut seen = Observed::default();
    let mut buf = out;
    let mut first = true;
    let mut authenticated = false;
    let mut closing: Option<Response> = None;
    while !buf.is_empty() {
        if let Some(last) = &closing {
            panic!(
                "the server sent {} more bytes after {last:?}, which closes the connection",
                buf.len()
            );
        }
        let (resp, used) = match parse_frame::<Response>(buf) {
            Ok(x) => x,
            Err(e) => panic!(
                "the server sent an invalid frame ({e}); {} bytes left",
                buf.len()
            ),
        };
        buf = &buf[used..];
        if first {
            first = false;
            if stopping {
                assert!(
                    matches!(resp, Response::ShuttingDown { .. }) && buf.is_empty(),
                    "a stopping daemon answered {resp:?} and {} more bytes",
                    buf.len()
                );
                break;
            }
            match &resp {
                Response::Hello { version, .. } => assert_eq!(*version, PROTOCOL_VERSION),
                Response::Error {
                    code: ErrorCode::BadRequest | ErrorCode::VersionMismatch,
                    ..
                } => closing = Some(resp.clone()),
                other => panic!("first answer is {other:?}"),
            }
            continue;
        }
        match resp {
            Response::Hello { .. } => panic!("a second Hello answer"),
            Response::LoggedIn { token, session } => {
                authenticated = true;
                assert!(token.starts_with(xferd::sessions::TOKEN_PREFIX));
                seen.users.insert(session.user);
                seen.tokens.push(token);
            }
            Response::Session(info) => {
                authenticated = true;
                seen.users.insert(info.user);
            }
            Response::Ok => {}
            Response::Entries { entries, .. } => {
                assert!(authenticated, "a listing before any authentication");
                assert!(entries.len() <= MAX_ENTRIES_PER_FRAME);
                for e in &entries {
                    assert!(!e.name.is_empty() && !e.name.contains('/'), "{e:?}");
                }
            }
            Response::UploadReady { offset } => {
                assert!(authenticated, "an upload before any authentication");
                assert_eq!(offset, 0);
            }
            Response::UploadDone { .. } => assert!(authenticated),
            Response::Committed { .. } => {
                assert!(authenticated, "a commit before any authentication")
            }
            Response::TokenCreated { token, info } => {
                assert!(authenticated, "a token before any authentication");
                assert!(token.starts_with(xferd::sessions::TOKEN_PREFIX));
                assert!(!info.id.is_empty());
                seen.tokens.push(token);
            }
            Response::Tokens { tokens, .. } => {
                assert!(authenticated, "a token listing before any authentication");
                assert!(tokens.len() <= xfer_proto::limits::MAX_TOKENS_PER_FRAME);
            }
            Response::Account { session, .. } => {
                assert!(authenticated, "an account before any authentication");
                seen.users.insert(session.user);
            }
            Response::UploadResume { offset, .. } => {
                assert!(authenticated, "a resume offer before any authentication");
                assert!(offset > 0, "a resume offer of nothing");
            }
            Response::DownloadReady { size, offset, .. } => {
                assert!(authenticated, "a download before any authentication");
                assert!(
                    offset <= size,
                    "DownloadReady offset {offset} > size {size}"
                );
                let n = usize::try_from(size - offset).unwrap();
                assert!(
                    buf.len() >= n,
                    "download body cut short: {} of {n} bytes",
                    buf.len()
                );
                let body = &buf[..n];
                buf = &buf[n..];
                assert_ne!(
                    *blake3::hash(body).as_bytes(),
                    fx.secret_hash,
                    "the server sent the file outside the storage root"
                );
                match parse_frame::<Response>(buf) {
                    Ok((Response::DownloadEnd { digest }, used)) => {
                        buf = &buf[used..];
                        if offset == 0 {
                            assert_eq!(digest, *blake3::hash(body).as_bytes(), "download digest");
                        }
                    }
                    other => panic!("after a download body: {other:?}"),
                }
            }
            Response::DownloadEnd { .. } => panic!("DownloadEnd without DownloadReady"),
            Response::KeyChallenge { .. } => panic!("a key challenge on a connection without TLS"),
            Response::Error { .. } => {}
            Response::ShuttingDown { .. } => closing = Some(resp.clone()),
        }
    }
    assert!(!(stopping && first), "a stopping daemon said nothing");
    seen
}

/// Everything on disk outside the users' trees is as it was; inside them, only what the
/// protocol allows.
fn check_disk(fx: &Fixture, seen: &Observed) {
    let expect_names = |dir: &Path, allowed: &[&str]| {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                allowed.contains(&name.as_str()),
                "unexpected `{name}` in {}",
                dir.display()
            );
        }
    };
    for entry in std::fs::read_dir(&fx.parent).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            name.bytes().all(|b| b.is_ascii_digit()) && entry.path().is_dir(),
            "unexpected `{name}` in {}",
            fx.parent.display()
        );
    }
    expect_names(
        &fx.base,
        &[
            "xferd.toml",
            "users.toml",
            "cert.pem",
            "key.pem",
            "storage",
            "state",
            "outside",
        ],
    );
    expect_names(
        &fx.config.state_dir,
        &["sessions.jsonl", "sessions.lock", "audit.log", "usage"],
    );
    let outside = snapshot(&fx.base.join("outside"));
    assert_eq!(outside.len(), 1, "outside folder changed: {outside:?}");
    for (name, what) in &outside {
        let content = std::fs::read(fx.base.join("outside").join(name)).unwrap();
        assert_eq!(
            *blake3::hash(&content).as_bytes(),
            fx.secret_hash,
            "the outside secret changed ({what})"
        );
    }
    let root = &fx.config.root;
    expect_names(
        root,
        &[
            xferd::storage::local::TMP_DIR,
            xferd::storage::local::partial::PARTIAL_DIR,
            USER,
            ADMIN,
        ],
    );
    // Interrupted uploads may stay for resume, but only as plain files named by a hash.
    for (rel, what) in snapshot(&root.join(xferd::storage::local::partial::PARTIAL_DIR)) {
        let name = rel.file_name().unwrap().to_string_lossy().into_owned();
        let is_user_dir = rel.components().count() == 1 && what == "dir";
        let is_partial = rel.components().count() == 2
            && what.starts_with("file")
            && name.len() == 64
            && name.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(
            is_user_dir || is_partial,
            "unexpected partial entry {rel:?} ({what})"
        );
    }
    let staged = snapshot(&root.join(xferd::storage::local::TMP_DIR));
    assert!(
        staged.is_empty(),
        "staging folder not empty after the session: {staged:?}"
    );
    // The planted links are where they were and nothing else is a link.
    let links: BTreeMap<PathBuf, PathBuf> = snapshot(root)
        .into_iter()
        .filter(|(_, what)| what.starts_with("link"))
        .map(|(rel, _)| {
            let target = std::fs::read_link(root.join(&rel)).unwrap();
            (rel, target)
        })
        .collect();
    let planted: BTreeSet<&PathBuf> = fx.links.values().collect();
    let now: BTreeSet<&PathBuf> = links.values().collect();
    assert_eq!(now, planted, "symbolic links changed: {links:?}");
    assert_eq!(
        links.len(),
        fx.links.len(),
        "symbolic links changed: {links:?}"
    );
    for rel in links.keys() {
        assert!(
            rel.starts_with(USER),
            "link moved out of the user's tree: {rel:?}"
        );
    }
    if !seen.users.contains(USER) {
        assert_eq!(
            snapshot(&root.join(USER)),
            fx.pristine_user_tree,
            "`{USER}` never authenticated, yet its tree changed"
        );
    }
    if !seen.users.contains(ADMIN) {
        assert!(
            std::fs::symlink_metadata(root.join(ADMIN)).is_err(),
            "`{ADMIN}` never authenticated, yet it has a folder"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------------------------

fn run(fx: &mut Fixture, input: &Input) {
    fx.reset();
    let mut script = Script {
        fx,
        chunks: Vec::new(),
        hashes_left: 1,
    };
    script.start(&input.start);
    for op in &input.ops {
        script.op(op);
    }
    let chunks = script.chunks;
    let sent: Vec<u8> = chunks.concat();
    let stopping = matches!(input.start, Start::ShuttingDown);
    let state = if stopping {
        fx.stopped.clone()
    } else {
        fx.state.clone()
    };
    // A new source address for each input: the daemon's per-source state (failed-login
    // penalties) then starts empty for every input, as it would for a new client.
    fx.inputs = fx.inputs.wrapping_add(1);
    let peer = SocketAddr::from((
        std::net::Ipv4Addr::from(0x7f00_0000 | (fx.inputs & 0x00ff_ffff)),
        40000,
    ));
    let out = fx.rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let conn = Connection::new(server, IO_TIMEOUT);
        let serve = xferd::handler::serve_session(state, conn, peer, Instant::now());
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async move {
            for chunk in chunks {
                if wr.write_all(&chunk).await.is_err() {
                    // The server closed; it may have had every reason to.
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        let read = async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let all = async { tokio::join!(serve, write, read).2 };
        match tokio::time::timeout(INPUT_DEADLINE, all).await {
            Ok(out) => out,
            Err(_) => {
                panic!("the session did not end within {INPUT_DEADLINE:?} of the client closing")
            }
        }
    });
    let seen = check_output(fx, &sent, &out, stopping);
    check_disk(fx, &seen);
    for token in &seen.tokens {
        fx.state.sessions.revoke(token);
    }
}

fuzz_target!(|input: Input| {
    let fixture = FIXTURE.get_or_init(|| Mutex::new(Fixture::new()));
    let mut fx = fixture.lock().unwrap_or_else(|e| e.into_inner());
    run(&mut fx, &input);
});
