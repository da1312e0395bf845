//! Talking to a server: TCP (optionally from a chosen source address), TLS 1.3 with the pinning
//! verifier, the hello, and one method per request. A `Client` is one connection; the CLI opens
//! one per command and runs every file of the command over it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use xfer_proto::body::{BodyError, hash_prefix, hashing_allowance};
use xfer_proto::connection::ConnError;
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::limits::CHUNK_LEN;
use xfer_proto::message::SessionInfo;
use xfer_proto::{Connection, Digest, Entry, ErrorCode, PROTOCOL_VERSION, Request, Response};

use crate::addr::ServerAddr;
use crate::error::{ClientError, Result};
use crate::part::{Dest, Part, part_path};
use crate::verifier::pinned_config;

/// Time allowed to open the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for each read or write; a login may wait for a busy server's password check.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Connection attempts when the server refuses at a limit (its refusal line, or a close
/// before the handshake), with growing random pauses between them: a burst of parallel jobs
/// from one host then gets through, and a server that keeps refusing is reported in seconds.
pub const REFUSAL_ATTEMPTS: u32 = 6;
/// First pause after a refusal; it doubles up to [`REFUSAL_MAX_PAUSE`], each taken from
/// half to one and a half times that.
pub const REFUSAL_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between refused attempts.
pub const REFUSAL_MAX_PAUSE: Duration = Duration::from_secs(2);
/// Bytes of the server's first reply kept to explain a failed handshake.
const FIRST_BYTES: usize = xfer_proto::MAX_REFUSAL_LINE;
/// Largest body read in one go on the connection's task and written with one `pwrite`; larger
/// ones go through the body pipeline ([`xfer_proto::body`]).
pub const SMALL_BODY: usize = CHUNK_LEN;
/// How long a client looks for the server's reason after it cut an upload off: the frame
/// is already there if it was sent, so this only bounds waiting on a dead link.
const REASON_WAIT: Duration = Duration::from_secs(2);

/// The TLS stream the client speaks frames over.
pub type TlsStream = xfer_proto::tls_stream::TlsStream<Recorder<TcpStream>>;

/// A stream that keeps a copy of the first bytes read from it, so that a failed TLS
/// handshake can be explained by what the server sent (a refusal line). After those bytes it
/// only passes data through.
pub struct Recorder<S> {
    /// The stream.
    inner: S,
    /// Where the first bytes go; `None` once enough were kept.
    first: Option<Arc<Mutex<Vec<u8>>>>,
}

impl<S> Recorder<S> {
    fn new(inner: S) -> (Self, Arc<Mutex<Vec<u8>>>) {
        let first = Arc::new(Mutex::new(Vec::new()));
        (
            Recorder {
                inner,
                first: Some(first.clone()),
            },
            first,
        )
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(first)) = (&polled, &self.first) {
            let mut kept = first.lock().unwrap_or_else(|e| e.into_inner());
            let room = FIRST_BYTES - kept.len();
            let new = &buf.filled()[before..];
            kept.extend_from_slice(&new[..new.len().min(room)]);
            if kept.len() >= FIRST_BYTES {
                drop(kept);
                self.first = None;
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The reason in a server's refusal line (spec §1), escaped and capped; `None` if `first`
/// is not one.
pub fn refusal_reason(first: &[u8]) -> Option<String> {
    let rest = first.strip_prefix(xfer_proto::REFUSAL_PREFIX.trim_end().as_bytes())?;
    let line = &rest[..rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())];
    let line = &line[..line.len().min(xfer_proto::MAX_REFUSAL_LINE)];
    let text = crate::error::printable(String::from_utf8_lossy(line).trim());
    Some(if text.is_empty() {
        "no reason given".into()
    } else {
        text
    })
}

/// What the user is told when the server closed right after connect without a word.
pub const CLOSED_BEFORE_HANDSHAKE: &str = "the server closed the connection before the TLS handshake: it may be at its connection limit for your address; try again in a few seconds";

/// An open, greeted connection.
pub struct Client {
    /// The framed connection (crate-visible for the batched upload in [`crate::put`]).
    pub(crate) conn: Connection<TlsStream>,
    /// Which server this is.
    pub server: ServerAddr,
    /// The key the server proved it holds.
    pub fingerprint: Fingerprint,
    /// The server's agent string from its hello.
    pub server_agent: String,
    /// The protocol version agreed in the hello (2 and up can resume).
    pub version: u16,
    /// Set when a failed transfer left the stream unusable.
    pub(crate) broken: bool,
}

/// What a finished upload reports.
#[derive(Debug, Clone, Copy)]
pub struct Transferred {
    /// Bytes in the file.
    pub size: u64,
    /// BLAKE3 of the file, as both sides computed it.
    pub digest: Digest,
    /// Bytes that were already on the receiving side from an interrupted attempt and did not
    /// travel again (0 for a full transfer).
    pub resumed_from: u64,
}

/// Hooks a transfer reports to (positions count from the start of the file).
pub struct Hooks<'a> {
    /// The file's size, once known.
    pub on_size: Box<dyn FnMut(u64) + Send + 'a>,
    /// Where the transfer starts: above 0 when it resumes.
    pub on_start: Box<dyn FnMut(u64) + Send + 'a>,
    /// Bytes of the file done so far.
    pub on_progress: Box<dyn FnMut(u64) + Send + 'a>,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Hooks {
            on_size: Box::new(|_| {}),
            on_start: Box::new(|_| {}),
            on_progress: Box::new(|_| {}),
        }
    }
}

async fn tcp_connect(server: &ServerAddr, bind: Option<IpAddr>) -> Result<TcpStream> {
    let fail = |reason: String| ClientError::Connect {
        server: server.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((server.host.as_str(), server.port)),
    )
    .await
    .map_err(|_| fail("name lookup timed out".into()))?
    .map_err(|e| fail(format!("cannot resolve `{}`: {e}", server.host)))?
    .filter(|a| bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
    .collect();
    if addrs.is_empty() {
        return Err(fail(match bind {
            Some(b) => format!("no address of the same family as --bind {b}"),
            None => "the name has no addresses".into(),
        }));
    }
    let mut last = (addrs[0], String::new());
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| fail(e.to_string()))?;
        if let Some(b) = bind {
            socket
                .bind(SocketAddr::new(b, 0))
                .map_err(|e| fail(format!("cannot use local address {b} (--bind): {e}")))?;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            // The address is named only when the host name was not one already.
            Ok(Err(e)) => last = (addr, crate::error::io_text(&e)),
            Err(_) => last = (addr, "connection timed out".into()),
        }
    }
    let (addr, why) = last;
    let same = server.host.trim_matches(['[', ']']) == addr.ip().to_string();
    Err(fail(if same {
        format!("{why} - is xferd running there, and is the port right?")
    } else {
        format!("{addr}: {why} - is xferd running there, and is the port right?")
    }))
}

/// Connects and completes the TLS handshake. With `pin`, the server must hold that key
/// ([`ClientError::KeyChanged`] otherwise, before anything is sent); without, any key is
/// accepted and returned so the caller can decide before sending anything. A refusal at a
/// limit is retried ([`REFUSAL_ATTEMPTS`]); the last one is reported as
/// [`ClientError::Refused`].
pub async fn connect_tls(
    server: &ServerAddr,
    pin: Option<Fingerprint>,
    bind: Option<IpAddr>,
) -> Result<(TlsStream, Fingerprint)> {
    let started = std::time::Instant::now();
    let mut pause = REFUSAL_PAUSE;
    for attempt in 1.. {
        match connect_tls_once(server, pin, bind).await {
            Err(ClientError::Refused { reason, .. }) if attempt < REFUSAL_ATTEMPTS => {
                let wait = jitter(pause);
                tracing::info!(
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    "{reason}; retrying"
                );
                tokio::time::sleep(wait).await;
                pause = (pause * 2).min(REFUSAL_MAX_PAUSE);
            }
            Err(ClientError::Refused { server, reason }) => {
                return Err(ClientError::Refused {
                    server,
                    reason: format!(
                        "{reason} (refused {attempt} times in {} s)",
                        started.elapsed().as_secs().max(1)
                    ),
                });
            }
            other => return other,
        }
    }
    unreachable!("the attempts loop returns")
}

/// `d` times a random factor from 0.5 to 1.5, so that parallel clients refused together do
/// not come back together.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos()),
    );
    d.mul_f64(0.5 + (h.finish() % 1000) as f64 / 1000.0)
}

/// One attempt of [`connect_tls`], without retrying a refusal.
pub async fn connect_tls_once(
    server: &ServerAddr,
    pin: Option<Fingerprint>,
    bind: Option<IpAddr>,
) -> Result<(TlsStream, Fingerprint)> {
    let tcp = tcp_connect(server, bind).await?;
    let (tcp, first) = Recorder::new(tcp);
    let fail = |reason: String| ClientError::Connect {
        server: server.to_string(),
        reason,
    };
    let (mut config, verifier) = pinned_config(pin, Arc::new(xfer_proto::tls::provider()))
        .map_err(|e| fail(e.to_string()))?;
    // After the handshake, xfer_proto::tls_stream seals and opens records itself.
    config.enable_secret_extraction = true;
    let name = ServerName::try_from(server.host.clone())
        .map_err(|_| ClientError::Usage(format!("`{}` is not a valid host name", server.host)))?;
    let handshake = xfer_proto::tls_stream::connect(tcp, Arc::new(config), name);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => Err(fail("TLS handshake timed out".into())),
        Ok(Err(e)) => {
            let first = first.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(reason) = refusal_reason(&first) {
                return Err(ClientError::Refused {
                    server: server.to_string(),
                    reason: format!("the server refused the connection: {reason}"),
                });
            }
            use std::io::ErrorKind as K;
            let closed = matches!(
                e.kind(),
                K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
            );
            match (pin, verifier.seen()) {
                (Some(pinned), Some(seen)) if pinned != seen => Err(ClientError::KeyChanged {
                    server: server.to_string(),
                    pinned,
                    seen,
                }),
                _ if closed && first.is_empty() => Err(ClientError::Refused {
                    server: server.to_string(),
                    reason: CLOSED_BEFORE_HANDSHAKE.into(),
                }),
                _ => Err(fail(format!("TLS handshake failed: {e}"))),
            }
        }
        Ok(Ok(tls)) => {
            if tls.alpn_protocol() != Some(xfer_proto::ALPN) {
                return Err(fail(
                    "the server does not speak the xfer protocol (no ALPN xfer/1)".into(),
                ));
            }
            let seen = verifier
                .seen()
                .ok_or_else(|| fail("the server presented no certificate".into()))?;
            Ok((tls, seen))
        }
    }
}

impl Client {
    /// Sends the hello on a verified TLS stream.
    pub async fn greet(
        tls: TlsStream,
        server: ServerAddr,
        fingerprint: Fingerprint,
    ) -> Result<Client> {
        let mut client = Client {
            conn: Connection::over_tls(tls, IO_TIMEOUT),
            server,
            fingerprint,
            server_agent: String::new(),
            version: PROTOCOL_VERSION,
            broken: false,
        };
        let reply = client
            .call(&Request::Hello {
                version: PROTOCOL_VERSION,
                agent: crate::AGENT.into(),
            })
            .await?;
        match reply {
            Response::Hello { agent, version } => {
                client.server_agent = agent;
                client.version = version.min(PROTOCOL_VERSION);
                Ok(client)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Connects to a pinned server and greets it.
    pub async fn connect(
        server: &ServerAddr,
        pin: Fingerprint,
        bind: Option<IpAddr>,
    ) -> Result<Client> {
        let (tls, seen) = connect_tls(server, Some(pin), bind).await?;
        Client::greet(tls, server.clone(), seen).await
    }

    pub(crate) async fn read(&mut self) -> Result<Response> {
        self.read_within(IO_TIMEOUT).await
    }

    async fn read_within(&mut self, wait: Duration) -> Result<Response> {
        match self
            .conn
            .read_frame_within::<Response>(wait, "waiting for a reply")
            .await?
        {
            Response::Error {
                code: ErrorCode::ShuttingDown,
                ..
            }
            | Response::ShuttingDown { .. } => Err(ClientError::ServerShuttingDown),
            Response::Error { code, message } => Err(ClientError::server(code, &message)),
            other => Ok(other),
        }
    }

    pub(crate) async fn call(&mut self, req: &Request) -> Result<Response> {
        self.call_within(req, IO_TIMEOUT).await
    }

    async fn call_within(&mut self, req: &Request, wait: Duration) -> Result<Response> {
        if self.broken {
            return Err(ClientError::Broken(
                xfer_proto::connection::ConnError::Closed,
            ));
        }
        self.conn.write_frame(req).await?;
        self.read_within(wait).await
    }

    async fn expect_ok(&mut self, req: &Request) -> Result<()> {
        match self.call(req).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Trades a password for a session token.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<(String, SessionInfo)> {
        match self
            .call(&Request::Login {
                user: user.into(),
                password: password.into(),
            })
            .await?
        {
            Response::LoggedIn { token, session } => Ok((token, session)),
            other => Err(unexpected(&other)),
        }
    }

    /// Logs in with a key (protocol 3, spec §8): `KeyLogin`, then the signature of the
    /// challenge bound to this TLS connection; the new token and session, as [`Self::login`].
    pub async fn key_login(
        &mut self,
        user: &str,
        key: &crate::keys::LoginKey,
    ) -> Result<(String, SessionInfo)> {
        if self.version < 3 {
            return Err(ClientError::Other(format!(
                "the server speaks protocol version {}; key login needs version 3 (a newer xferd)",
                self.version
            )));
        }
        let public_key = key.public_key();
        let nonce = match self
            .call(&Request::KeyLogin {
                user: user.into(),
                public_key,
            })
            .await?
        {
            Response::KeyChallenge { nonce } => nonce,
            other => return Err(unexpected(&other)),
        };
        let binding = *self.conn.get_mut().channel_binding();
        let message = xfer_proto::key_login::signed_message(&binding, &nonce, user, &public_key)
            .ok_or_else(|| ClientError::Usage("the user name is too long".into()))?;
        match self
            .call(&Request::KeyProof {
                signature: key.sign(&message).to_vec(),
            })
            .await?
        {
            Response::LoggedIn { token, session } => Ok((token, session)),
            other => Err(unexpected(&other)),
        }
    }

    /// Authenticates this connection with a stored token.
    pub async fn authenticate(&mut self, token: &str) -> Result<SessionInfo> {
        match self
            .call(&Request::Authenticate {
                token: token.into(),
            })
            .await?
        {
            Response::Session(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Who this connection is authenticated as.
    pub async fn whoami(&mut self) -> Result<SessionInfo> {
        match self.call(&Request::WhoAmI).await? {
            Response::Session(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes the session on the server.
    pub async fn logout(&mut self) -> Result<()> {
        self.expect_ok(&Request::Logout).await
    }

    /// Lists a remote folder (or describes one file).
    pub async fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        self.send_ahead(&[Request::List { path: path.into() }])
            .await?;
        self.read_listing(path).await
    }

    /// Sends `requests` in one write without waiting for their answers, which the caller
    /// then reads in the same order (spec §4: only `List` and `Download` from offset 0 may
    /// be sent ahead like this). The caller bounds how many are outstanding.
    pub(crate) async fn send_ahead(&mut self, requests: &[Request]) -> Result<()> {
        if self.broken {
            return Err(ClientError::Broken(ConnError::Closed));
        }
        let mut buf = Vec::new();
        for r in requests {
            xfer_proto::frame::encode_frame(r, &mut buf).map_err(ConnError::from)?;
        }
        let stream = self.conn.get_mut();
        let sent = tokio::time::timeout(IO_TIMEOUT, async {
            stream.write_all(&buf).await?;
            stream.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(ClientError::Broken(ConnError::Io(e)))
            }
            Err(_) => {
                self.broken = true;
                Err(ClientError::Broken(ConnError::Timeout("sending requests")))
            }
        }
    }

    /// Reads the answer to a `List` of `path` that was sent already.
    pub(crate) async fn read_listing(&mut self, path: &str) -> Result<Vec<Entry>> {
        if self.broken {
            return Err(ClientError::Broken(ConnError::Closed));
        }
        let mut out = Vec::new();
        loop {
            match self.read().await? {
                Response::Entries { entries, done } => {
                    if out.len() + entries.len() > xfer_proto::limits::MAX_LIST_ENTRIES {
                        self.broken = true;
                        return Err(ClientError::Other(format!(
                            "the listing of `{path}` has more than {} entries; list a subfolder",
                            xfer_proto::limits::MAX_LIST_ENTRIES
                        )));
                    }
                    out.extend(entries);
                    if done {
                        // Servers send folders in directory order.
                        out.sort_by(|a, b| a.name.cmp(&b.name));
                        return Ok(out);
                    }
                }
                other => {
                    // Answers are read in order: past an unexpected one, none is trusted.
                    self.broken = true;
                    return Err(unexpected(&other));
                }
            }
        }
    }

    /// Deletes a remote file or empty folder.
    pub async fn delete(&mut self, path: &str) -> Result<()> {
        self.expect_ok(&Request::Delete { path: path.into() }).await
    }

    /// Renames or moves a remote file or folder.
    pub async fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        self.expect_ok(&Request::Rename {
            from: from.into(),
            to: to.into(),
        })
        .await
    }

    /// Creates a remote folder (and missing parents).
    pub async fn mkdir(&mut self, path: &str) -> Result<()> {
        self.expect_ok(&Request::Mkdir { path: path.into() }).await
    }

    /// Asks the daemon to shut down (superuser, password again).
    pub async fn shutdown(&mut self, password: &str) -> Result<()> {
        self.expect_ok(&Request::Shutdown {
            password: password.into(),
        })
        .await
    }

    /// No-op round trip.
    pub async fn ping(&mut self) -> Result<()> {
        self.expect_ok(&Request::Ping).await
    }

    /// Waits for the next unsolicited message (for idle clients: the shutdown notice).
    pub async fn wait_for_notice(&mut self, within: Duration) -> Result<Response> {
        match self
            .conn
            .read_frame_within::<Response>(within, "waiting")
            .await?
        {
            Response::ShuttingDown { .. } => Err(ClientError::ServerShuttingDown),
            other => Ok(other),
        }
    }

    /// Uploads the local file `local` to the remote path `remote`; the server commits it only
    /// after verifying its BLAKE3 digest, and the digests of both sides are compared again.
    /// With `resume`, data the server kept from an interrupted upload of the same path is not
    /// sent again if it equals this file's beginning (compared by digest, not by sending it).
    pub async fn upload(
        &mut self,
        local: &Path,
        remote: &str,
        resume: bool,
        mut hooks: Hooks<'_>,
    ) -> Result<Transferred> {
        let ctx = || format!("reading `{}`", local.display());
        let file = std::fs::File::open(local).map_err(|e| ClientError::local(ctx(), e))?;
        let meta = file.metadata().map_err(|e| ClientError::local(ctx(), e))?;
        if meta.is_dir() {
            return Err(ClientError::Other(format!(
                "`{}` is a folder; folders are uploaded with -r",
                local.display()
            )));
        }
        let size = meta.len();
        (hooks.on_size)(size);
        let wanted = if resume && self.version >= 2 { size } else { 0 };
        let reply = self
            .call_within(
                &Request::Upload {
                    path: remote.into(),
                    size,
                    offset: wanted,
                },
                // The server may first hash what it holds of this file.
                IO_TIMEOUT + hashing_allowance(wanted),
            )
            .await?;
        let (offset, prefix) = match reply {
            Response::UploadReady { offset: 0 } => (0, None),
            Response::UploadResume { offset, prefix } if offset > 0 && offset <= wanted => {
                // Resume only if what the server holds is this file's beginning.
                let ours = hash_prefix(&file, offset).await;
                let agreed = match ours {
                    Ok(h) if *h.finalize().as_bytes() == prefix => Some(h),
                    _ => None,
                };
                let from = if agreed.is_some() { offset } else { 0 };
                self.conn
                    .write_frame(&Request::UploadFrom { offset: from })
                    .await?;
                (from, agreed)
            }
            other => return Err(unexpected(&other)),
        };
        (hooks.on_start)(offset);
        let mut progress = hooks.on_progress;
        let digest = match self
            .conn
            .send_body(file, offset, size, prefix, &mut |n| progress(offset + n))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.broken = true;
                return Err(match e {
                    BodyError::Local { source, .. } => ClientError::local(ctx(), source),
                    BodyError::SourceChanged => ClientError::Other(format!(
                        "`{}` shrank while it was being uploaded; nothing was saved on the server",
                        local.display()
                    )),
                    BodyError::Net(e) => self.reason_for_cut(e).await,
                });
            }
        };
        self.conn
            .write_frame(&Request::UploadEnd { digest })
            .await?;
        match self.read().await? {
            Response::UploadDone { size: s, digest: d } if s == size && d == digest => {
                Ok(Transferred {
                    size,
                    digest,
                    resumed_from: offset,
                })
            }
            Response::UploadDone { .. } => Err(ClientError::Verification(format!(
                "the server committed `{remote}` with a different size or digest than was sent"
            ))),
            other => Err(unexpected(&other)),
        }
    }

    /// Downloads the remote file `remote` to `dest` through `NAME.part` beside it
    /// (see [`crate::part`]), renamed into place only after the digest matches. With
    /// `resume`, bytes already in the `.part` from an interrupted attempt are kept if the
    /// server's file starts with the same bytes (compared by digest); a `.part` is left
    /// behind when the connection breaks, so the next attempt can resume.
    pub async fn download(
        &mut self,
        remote: &str,
        dest: &Dest,
        resume: bool,
        hooks: Hooks<'_>,
    ) -> Result<Transferred> {
        let resume = resume && self.version >= 2;
        let target = dest.path();
        let mut part = Part::open(dest, resume).map_err(|e| {
            ClientError::local(format!("creating `{}`", part_path(&target).display()), e)
        })?;
        let result = self.download_into(remote, &target, &mut part, hooks).await;
        match result {
            Ok(done) => {
                part.commit(dest)
                    .map_err(|e| ClientError::local(format!("saving `{}`", target.display()), e))?;
                Ok(done)
            }
            Err(e) => {
                // Only a broken connection leaves something worth resuming; a bad digest or
                // a local failure says the bytes held cannot be trusted or cannot grow.
                let keep = matches!(e, ClientError::Broken(_) | ClientError::ServerShuttingDown);
                part.abandon(keep);
                Err(e)
            }
        }
    }

    async fn download_into(
        &mut self,
        remote: &str,
        target: &Path,
        part: &mut Part,
        mut hooks: Hooks<'_>,
    ) -> Result<Transferred> {
        let write_err = |e| ClientError::local(format!("writing `{}`", target.display()), e);
        let held = part.held;
        let ours = if held > 0 {
            match hash_prefix(&part.file, held).await {
                Ok(h) => Some(h),
                Err(_) => {
                    part.restart().map_err(write_err)?;
                    None
                }
            }
        } else {
            None
        };
        let request = match &ours {
            Some(h) => Request::DownloadFrom {
                path: remote.into(),
                offset: held,
                prefix: *h.finalize().as_bytes(),
            },
            None => Request::Download {
                path: remote.into(),
                offset: 0,
            },
        };
        // The server first hashes as many bytes as the .part holds.
        let wait = IO_TIMEOUT + hashing_allowance(held);
        let (size, offset, prefix) = match self.call_within(&request, wait).await? {
            Response::DownloadReady {
                size, offset: 0, ..
            } => {
                if part.held > 0 {
                    part.restart().map_err(write_err)?;
                }
                (size, 0, None)
            }
            Response::DownloadReady { size, offset, .. } if offset == held && offset <= size => {
                (size, offset, ours)
            }
            other => return Err(unexpected(&other)),
        };
        (hooks.on_size)(size);
        (hooks.on_start)(offset);
        let mut progress = hooks.on_progress;
        let received = self
            .receive_body(&part.file, target, offset, size, prefix, &mut |n| {
                progress(offset + n)
            })
            .await?;
        let digest = self.finish_download(remote, received).await?;
        Ok(Transferred {
            size,
            digest,
            resumed_from: offset,
        })
    }

    /// Reads the answer to a `Download { offset: 0 }` of `remote` sent ahead with
    /// [`Client::send_ahead`], into the staging file that `open` creates once the server
    /// says it is sending (so a refused download creates nothing). The staged file comes
    /// back verified and not yet durable; on any failure it is already deleted (a small file
    /// needs no resume).
    pub(crate) async fn receive_ahead(
        &mut self,
        remote: &str,
        target: &Path,
        open: impl FnOnce() -> std::io::Result<Part>,
    ) -> Result<(Transferred, Part)> {
        if self.broken {
            return Err(ClientError::Broken(ConnError::Closed));
        }
        let size = match self.read().await? {
            Response::DownloadReady {
                size, offset: 0, ..
            } => size,
            other => {
                // Answers are read in order: past an unexpected one, none is trusted.
                self.broken = true;
                return Err(unexpected(&other));
            }
        };
        let part = match open() {
            Ok(part) => part,
            Err(e) => {
                // The body is on its way: read it past, so the answers after it stay in step.
                self.discard_body(size).await?;
                self.read_end().await?;
                return Err(ClientError::local(
                    format!("creating `{}`", part_path(target).display()),
                    e,
                ));
            }
        };
        let done = async {
            let received = self
                .receive_body(&part.file, target, 0, size, None, &mut |_| {})
                .await?;
            self.finish_download(remote, received).await
        }
        .await;
        match done {
            Ok(digest) => Ok((
                Transferred {
                    size,
                    digest,
                    resumed_from: 0,
                },
                part,
            )),
            Err(e) => {
                part.abandon(false);
                Err(e)
            }
        }
    }

    /// Receives a download's body (bytes `offset..size`) into `file`. The outer error means
    /// the connection is lost; the inner one is a local failure after which the stream is
    /// still in step (the rest of the body was read and dropped). A small body is read in
    /// one go and written here: handing it to a blocking thread cost more than the write.
    async fn receive_body(
        &mut self,
        file: &std::fs::File,
        target: &Path,
        offset: u64,
        size: u64,
        prefix: Option<blake3::Hasher>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<Result<Digest>> {
        let write_err = |e| ClientError::local(format!("writing `{}`", target.display()), e);
        let total = size.saturating_sub(offset);
        if total <= SMALL_BODY as u64 && (offset == 0 || prefix.is_some()) {
            let mut buf = vec![0u8; total as usize];
            self.read_raw(&mut buf).await?;
            let mut hasher = prefix.unwrap_or_default();
            hasher.update(&buf);
            progress(total);
            use std::os::unix::fs::FileExt;
            return Ok(match file.write_all_at(&buf, offset) {
                Ok(()) => Ok(*hasher.finalize().as_bytes()),
                Err(e) => Err(write_err(e)),
            });
        }
        let file = match file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                // Nothing of the body was read yet: drop it whole.
                self.discard_body(total).await?;
                return Ok(Err(write_err(e)));
            }
        };
        match self
            .conn
            .recv_body(file, offset, size, prefix, progress)
            .await
        {
            Ok((digest, _)) => Ok(Ok(digest)),
            Err(BodyError::Local { source, in_sync }) => {
                if !in_sync {
                    self.broken = true;
                }
                Ok(Err(write_err(source)))
            }
            Err(BodyError::Net(e)) => {
                self.broken = true;
                Err(ClientError::Broken(e))
            }
            Err(BodyError::SourceChanged) => {
                self.broken = true;
                Err(ClientError::Protocol("unexpected source change".into()))
            }
        }
    }

    /// Reads the `DownloadEnd` after a body and checks its digest against what arrived.
    async fn finish_download(&mut self, remote: &str, received: Result<Digest>) -> Result<Digest> {
        if self.broken {
            received?;
            return Err(ClientError::Broken(ConnError::Closed));
        }
        let claimed = self.read_end().await?;
        let digest = received?;
        if claimed != digest {
            return Err(ClientError::Verification(format!(
                "`{remote}` arrived corrupted (digest mismatch); nothing was saved"
            )));
        }
        Ok(digest)
    }

    /// Reads the `DownloadEnd` after a body: the digest the server computed.
    async fn read_end(&mut self) -> Result<Digest> {
        match self.read().await? {
            Response::DownloadEnd { digest } => Ok(digest),
            other => {
                self.broken = true;
                Err(unexpected(&other))
            }
        }
    }

    /// Fills `buf` from the stream within the I/O deadline; a failure loses the connection.
    async fn read_raw(&mut self, buf: &mut [u8]) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let read = tokio::time::timeout(IO_TIMEOUT, self.conn.get_mut().read_exact(buf)).await;
        let e = match read {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => ConnError::Truncated,
            Ok(Err(e)) => ConnError::Io(e),
            Err(_) => ConnError::Timeout("receiving file data"),
        };
        self.broken = true;
        Err(ClientError::Broken(e))
    }

    /// Reads `len` body bytes and drops them, a chunk at a time.
    async fn discard_body(&mut self, len: u64) -> Result<()> {
        let mut buf = vec![0u8; (len.min(CHUNK_LEN as u64) as usize).max(1)];
        let mut left = len;
        while left > 0 {
            let n = (buf.len() as u64).min(left) as usize;
            self.read_raw(&mut buf[..n]).await?;
            left -= n as u64;
        }
        Ok(())
    }

    /// After an upload body was cut off: the error the server sent before closing, if it
    /// did (its session ended, say), so the user learns why instead of "connection reset".
    async fn reason_for_cut(&mut self, broke: ConnError) -> ClientError {
        match self.read_within(REASON_WAIT).await {
            Err(e @ (ClientError::Server { .. } | ClientError::ServerShuttingDown)) => e,
            _ => ClientError::Broken(broke),
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        self.conn.shutdown().await;
    }
}

pub(crate) fn unexpected(r: &Response) -> ClientError {
    let name = format!("{r:?}");
    let name = name
        .split([' ', '(', '{'])
        .next()
        .unwrap_or("?")
        .to_string();
    ClientError::Protocol(format!("unexpected reply `{name}` from the server"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_refusal_line_is_read_escaped_and_capped() {
        assert_eq!(
            refusal_reason(
                b"xfer-refused: too many connections from 203.0.113.9 (10); try again\nrest"
            )
            .as_deref(),
            Some("too many connections from 203.0.113.9 (10); try again")
        );
        assert_eq!(
            refusal_reason(b"xfer-refused: \x1b[2Jgotcha").as_deref(),
            Some("\\u{1b}[2Jgotcha")
        );
        let long = [b"xfer-refused: ".as_slice(), &[b'x'; 1000]].concat();
        assert!(refusal_reason(&long).unwrap().len() <= xfer_proto::MAX_REFUSAL_LINE);
        // A TLS record (a ServerHello or an alert) is not a refusal.
        assert_eq!(refusal_reason(&[0x16, 0x03, 0x03, 0x00, 0x7a]), None);
        assert_eq!(refusal_reason(b""), None);
    }

    /// A server on 127.0.0.1 that answers every connection with `serve`.
    async fn fake_server<F, Fut>(serve: F) -> ServerAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp));
            }
        });
        ServerAddr::parse(&addr.to_string()).unwrap()
    }

    #[tokio::test]
    async fn the_servers_refusal_line_is_what_the_user_reads() {
        let server = fake_server(|mut tcp| async move {
            let _ = tcp
                .write_all(b"xfer-refused: too many connections from 127.0.0.1 (10); try again in a few seconds\n")
                .await;
            let _ = tcp.shutdown().await;
            let mut sink = [0u8; 4096];
            while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        let err = connect_tls_once(&server, None, None).await.err().unwrap();
        assert_eq!(err.exit_code(), 7);
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach {server}: the server refused the connection: too many connections from 127.0.0.1 (10); try again in a few seconds"
            )
        );
    }

    #[tokio::test]
    async fn a_close_right_after_connect_is_explained_as_a_possible_limit() {
        let server = fake_server(|tcp| async move { drop(tcp) }).await;
        let err = connect_tls_once(&server, None, None).await.err().unwrap();
        assert_eq!(err.exit_code(), 7);
        assert!(err.to_string().contains(CLOSED_BEFORE_HANDSHAKE), "{err}");
        assert!(!err.to_string().contains("reset"), "{err}");
    }
}
