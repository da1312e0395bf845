//! The client against a server that lies: listings the real daemon never sends (names with a
//! slash, a folder tree with no bottom). A pinned server can still be compromised, and the
//! client must neither crash nor write outside the folder the user named.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use xfer_proto::message::SessionInfo;
use xfer_proto::{Connection, Entry, EntryKind, ErrorCode, Request, Response, Role};
use xfer_tests::ClientHome;

/// What the fake server lists for `path`.
type Lister = fn(&str) -> Vec<Entry>;

/// How the fake server answers a download of a path.
enum Play {
    /// The file, honestly.
    Send(&'static [u8]),
    /// This error instead.
    Refuse(ErrorCode),
    /// The file, with a digest that does not match it.
    Corrupt(&'static [u8]),
    /// The header for this file, then only its first byte, then the connection closes.
    Cut(&'static [u8]),
}

/// What the fake server does when asked to download `path`.
type Sender = fn(&str) -> Play;

fn entry(name: &str, kind: EntryKind) -> Entry {
    Entry {
        name: name.into(),
        kind,
        size: 3,
        modified: 0,
    }
}

/// Starts a TLS server on 127.0.0.1 that logs anyone in and answers listings with `lister`;
/// returns its address and fingerprint.
async fn fake_server(lister: Lister) -> (String, String, tempfile::TempDir) {
    fake_server_with(lister, |_| Play::Refuse(ErrorCode::Internal)).await
}

/// [`fake_server`] that answers downloads with `sender`.
async fn fake_server_with(lister: Lister, sender: Sender) -> (String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let id = xferd::tls::generate(&[]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &id.cert_pem).unwrap();
    std::fs::write(&key, &id.key_pem).unwrap();
    let (config, fingerprint) = xferd::tls::server_config(&cert, &key).unwrap();
    let acceptor = TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                serve(
                    Connection::new(tls, Duration::from_secs(10)),
                    lister,
                    sender,
                )
                .await;
            });
        }
    });
    (addr, fingerprint.to_string(), dir)
}

async fn serve<S>(mut conn: Connection<S>, lister: Lister, sender: Sender)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let session = SessionInfo {
        user: "eve".into(),
        role: Role::User,
        expires: i64::MAX / 2,
    };
    while let Ok(req) = conn.read_frame::<Request>().await {
        let reply = match req {
            Request::Hello { .. } => Response::Hello {
                version: xfer_proto::PROTOCOL_VERSION,
                agent: "liar/1".into(),
            },
            Request::Login { .. } => Response::LoggedIn {
                token: "xfer1_fake".into(),
                session: session.clone(),
            },
            Request::Authenticate { .. } => Response::Session(session.clone()),
            Request::List { path } => Response::Entries {
                entries: lister(&path),
                done: true,
            },
            Request::Download { path, .. } => {
                let (data, digest) = match sender(&path) {
                    Play::Refuse(code) => {
                        let reply = Response::error(code, format!("`{path}`: refused"));
                        if conn.write_frame(&reply).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Play::Send(data) => (data, *blake3::hash(data).as_bytes()),
                    Play::Corrupt(data) => (data, [7; 32]),
                    Play::Cut(data) => {
                        let ready = Response::DownloadReady {
                            size: data.len() as u64,
                            offset: 0,
                            modified: 0,
                        };
                        let _ = conn.write_frame(&ready).await;
                        let _ = conn.get_mut().write_all(&data[..1]).await;
                        let _ = conn.get_mut().flush().await;
                        return;
                    }
                };
                let ready = Response::DownloadReady {
                    size: data.len() as u64,
                    offset: 0,
                    modified: 0,
                };
                if conn.write_frame(&ready).await.is_err()
                    || conn.get_mut().write_all(data).await.is_err()
                {
                    return;
                }
                Response::DownloadEnd { digest }
            }
            _ => Response::error(ErrorCode::Internal, "not in this play"),
        };
        if conn.write_frame(&reply).await.is_err() {
            return;
        }
    }
}

/// Logs a fresh client home in to the fake server.
fn logged_in(addr: &str, fingerprint: &str) -> ClientHome {
    let h = ClientHome::new(env!("CARGO_BIN_EXE_xfer"));
    h.run_with_stdin(
        &[
            "login",
            &format!("eve@{addr}"),
            "--password-stdin",
            "--fingerprint",
            fingerprint,
        ],
        "pw\n",
    )
    .expect_code(0);
    h
}

/// Every path under `dir`, relative to it.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out
}

/// Logs in to the fake server and runs `download -r top --to to` in a fresh home.
async fn download_top(addr: String, fp: String) -> (ClientHome, xfer_tests::Run) {
    tokio::task::spawn_blocking(move || {
        let h = logged_in(&addr, &fp);
        std::fs::create_dir(h.path("to")).unwrap();
        let run = h.run(&["download", "-r", "top", "--to", "to"]);
        (h, run)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bottomless_tree_is_cut_at_the_path_depth_limit() {
    // Every folder holds a folder named `a`, forever.
    let (addr, fp, _keep) = fake_server(|path| {
        if path.is_empty() {
            vec![entry("top", EntryKind::Dir)]
        } else {
            vec![entry("a", EntryKind::Dir)]
        }
    })
    .await;
    let (h, run) = download_top(addr, fp).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(run.stderr.contains("deeper than a path may go"), "{run:#?}");
    // `top` plus 63 levels of `a`: as deep as a remote path may be, and no deeper.
    let deepest = tree(&h.path("to"))
        .iter()
        .map(|p| p.split('/').count())
        .max();
    assert_eq!(deepest, Some(xfer_proto::limits::MAX_PATH_DEPTH));
}

#[tokio::test(flavor = "multi_thread")]
async fn names_with_a_slash_leave_nothing_behind() {
    let (addr, fp, _keep) = fake_server(|path| match path {
        "" => vec![entry("top", EntryKind::Dir)],
        _ => vec![
            entry("trail/", EntryKind::File),
            entry("../escape", EntryKind::File),
            entry("sub/", EntryKind::Dir),
        ],
    })
    .await;
    let (h, run) = download_top(addr, fp).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(run.stderr.matches("unsafe name").count(), 3, "{run:#?}");
    assert_eq!(tree(&h.path("to")), vec!["top".to_string()]);
    assert!(!h.path("escape").exists());
}

/// `top` holds `a`, `b`, `c` and `d`, three bytes each.
fn four_files(path: &str) -> Vec<Entry> {
    match path {
        "" => vec![entry("top", EntryKind::Dir)],
        _ => ["a", "b", "c", "d"]
            .iter()
            .map(|n| entry(n, EntryKind::File))
            .collect(),
    }
}

/// Logs in and runs `download -r top --to to` where `to/top` already holds an old `b` and
/// `c`; returns the home and the run.
async fn download_over_old(addr: String, fp: String) -> (ClientHome, xfer_tests::Run) {
    tokio::task::spawn_blocking(move || {
        let h = logged_in(&addr, &fp);
        std::fs::create_dir_all(h.path("to/top")).unwrap();
        std::fs::write(h.path("to/top/b"), b"old b").unwrap();
        std::fs::write(h.path("to/top/c"), b"old c").unwrap();
        let run = h.run(&["download", "-r", "top", "--to", "to"]);
        (h, run)
    })
    .await
    .unwrap()
}

/// Every file under `to/top` with its content, sorted.
fn contents(h: &ClientHome) -> Vec<(String, String)> {
    let mut out: Vec<_> = tree(&h.path("to/top"))
        .into_iter()
        .map(|name| {
            let data = std::fs::read(h.path(&format!("to/top/{name}"))).unwrap();
            (name, String::from_utf8_lossy(&data).into_owned())
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_in_a_batch_leave_old_files_whole_and_no_part_files() {
    let (addr, fp, _keep) = fake_server_with(four_files, |path| match path {
        "top/a" => Play::Send(b"new"),
        // Removed on the server between the listing and the download.
        "top/b" => Play::Refuse(ErrorCode::NotFound),
        "top/c" => Play::Corrupt(b"bad"),
        _ => Play::Send(b"ddd"),
    })
    .await;
    let (h, run) = download_over_old(addr, fp).await;
    // The first failure decides the exit code: not found.
    assert_eq!(run.code, 5, "{run:#?}");
    assert!(run.stderr.contains("`top/b`: refused"), "{run:#?}");
    assert!(run.stderr.contains("digest mismatch"), "{run:#?}");
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        contents(&h),
        [
            s("a", "new"),
            s("b", "old b"),
            s("c", "old c"),
            s("d", "ddd")
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_cut_mid_batch_saves_what_arrived_whole_and_nothing_else() {
    let (addr, fp, _keep) = fake_server_with(four_files, |path| match path {
        "top/a" => Play::Send(b"new"),
        _ => Play::Cut(b"cut"),
    })
    .await;
    let (h, run) = download_over_old(addr, fp).await;
    assert_eq!(run.code, 7, "{run:#?}");
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        contents(&h),
        [s("a", "new"), s("b", "old b"), s("c", "old c")]
    );
}
