//! Talking to a server: TCP (optionally from a chosen source address), TLS 1.3 with the pinning
//! verifier, the hello, and one method per request. A `Client` is one connection; the CLI opens
//! one per command and runs every file of the command over it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::BufStream;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use xfer_proto::body::BodyError;
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::limits::CHUNK_LEN;
use xfer_proto::message::SessionInfo;
use xfer_proto::{Connection, Digest, Entry, ErrorCode, PROTOCOL_VERSION, Request, Response};

use crate::addr::ServerAddr;
use crate::error::{ClientError, Result};
use crate::verifier::PinVerifier;

/// Time allowed to open the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for each read or write; a login may wait for a busy server's password check.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The TLS stream the client speaks frames over.
pub type TlsStream = tokio_rustls::client::TlsStream<BufStream<TcpStream>>;

/// An open, greeted connection.
pub struct Client {
    /// The framed connection.
    conn: Connection<TlsStream>,
    /// Which server this is.
    pub server: ServerAddr,
    /// The key the server proved it holds.
    pub fingerprint: Fingerprint,
    /// The server's agent string from its hello.
    pub server_agent: String,
    /// Set when a failed transfer left the stream unusable.
    broken: bool,
}

/// What a finished upload reports.
#[derive(Debug, Clone, Copy)]
pub struct Transferred {
    /// Bytes in the file.
    pub size: u64,
    /// BLAKE3 of the file, as both sides computed it.
    pub digest: Digest,
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
    let mut last = String::new();
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
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connection timed out"),
        }
    }
    Err(fail(last))
}

/// Connects and completes the TLS handshake. With `pin`, the server must hold that key
/// ([`ClientError::KeyChanged`] otherwise, before anything is sent); without, any key is
/// accepted and returned so the caller can decide before sending anything.
pub async fn connect_tls(
    server: &ServerAddr,
    pin: Option<Fingerprint>,
    bind: Option<IpAddr>,
) -> Result<(TlsStream, Fingerprint)> {
    let tcp = tcp_connect(server, bind).await?;
    let provider = Arc::new(xfer_proto::tls::provider());
    let verifier = PinVerifier::new(pin, &provider);
    let fail = |reason: String| ClientError::Connect {
        server: server.to_string(),
        reason,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(xfer_proto::tls::VERSIONS)
        .map_err(|e| fail(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![xfer_proto::ALPN.to_vec()];
    let name = ServerName::try_from(server.host.clone())
        .map_err(|_| ClientError::Usage(format!("`{}` is not a valid host name", server.host)))?;
    let io = BufStream::with_capacity(CHUNK_LEN, CHUNK_LEN, tcp);
    let handshake = TlsConnector::from(Arc::new(config)).connect(name, io);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => Err(fail("TLS handshake timed out".into())),
        Ok(Err(e)) => match (pin, verifier.seen()) {
            (Some(pinned), Some(seen)) if pinned != seen => Err(ClientError::KeyChanged {
                server: server.to_string(),
                pinned,
                seen,
            }),
            _ => Err(fail(format!("TLS handshake failed: {e}"))),
        },
        Ok(Ok(tls)) => {
            if tls.get_ref().1.alpn_protocol() != Some(xfer_proto::ALPN) {
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
            conn: Connection::new(tls, IO_TIMEOUT),
            server,
            fingerprint,
            server_agent: String::new(),
            broken: false,
        };
        let reply = client
            .call(&Request::Hello {
                version: PROTOCOL_VERSION,
                agent: crate::AGENT.into(),
            })
            .await?;
        match reply {
            Response::Hello { agent, .. } => {
                client.server_agent = agent;
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

    async fn read(&mut self) -> Result<Response> {
        match self.conn.read_frame::<Response>().await? {
            Response::Error {
                code: ErrorCode::ShuttingDown,
                ..
            }
            | Response::ShuttingDown { .. } => Err(ClientError::ServerShuttingDown),
            Response::Error { code, message } => Err(ClientError::Server {
                code,
                message: crate::error::printable(&message),
            }),
            other => Ok(other),
        }
    }

    async fn call(&mut self, req: &Request) -> Result<Response> {
        if self.broken {
            return Err(ClientError::Broken(
                xfer_proto::connection::ConnError::Closed,
            ));
        }
        self.conn.write_frame(req).await?;
        self.read().await
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
        let mut out = Vec::new();
        let mut reply = self.call(&Request::List { path: path.into() }).await?;
        loop {
            match reply {
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
                        return Ok(out);
                    }
                }
                other => return Err(unexpected(&other)),
            }
            reply = self.read().await?;
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
    pub async fn upload(
        &mut self,
        local: &Path,
        remote: &str,
        progress: &mut (dyn FnMut(u64) + Send),
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
        let offset = match self
            .call(&Request::Upload {
                path: remote.into(),
                size,
                offset: 0,
            })
            .await?
        {
            Response::UploadReady { offset } if offset <= size => offset,
            other => return Err(unexpected(&other)),
        };
        let digest = match self.conn.send_body(file, offset, size, progress).await {
            Ok(d) => d,
            Err(e) => {
                self.broken = true;
                return Err(match e {
                    BodyError::Local { source, .. } => ClientError::local(ctx(), source),
                    BodyError::SourceChanged => ClientError::Other(format!(
                        "`{}` shrank while it was being uploaded; nothing was saved on the server",
                        local.display()
                    )),
                    BodyError::Net(e) => ClientError::Broken(e),
                });
            }
        };
        self.conn
            .write_frame(&Request::UploadEnd { digest })
            .await?;
        match self.read().await? {
            Response::UploadDone { size: s, digest: d } if s == size && d == digest => {
                Ok(Transferred { size, digest })
            }
            Response::UploadDone { .. } => Err(ClientError::Verification(format!(
                "the server committed `{remote}` with a different size or digest than was sent"
            ))),
            other => Err(unexpected(&other)),
        }
    }

    /// Downloads the remote file `remote` to the local path `target` through a temp file in
    /// the same folder, renamed into place only after the digest matches.
    pub async fn download(
        &mut self,
        remote: &str,
        target: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
        on_size: &mut (dyn FnMut(u64) + Send),
    ) -> Result<Transferred> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".xfer-part")
            .tempfile_in(dir)
            .map_err(|e| {
                ClientError::local(format!("creating a file in `{}`", dir.display()), e)
            })?;
        let (size, offset) = match self
            .call(&Request::Download {
                path: remote.into(),
                offset: 0,
            })
            .await?
        {
            Response::DownloadReady { size, offset, .. } if offset == 0 => (size, offset),
            other => return Err(unexpected(&other)),
        };
        on_size(size);
        let file = temp
            .as_file()
            .try_clone()
            .map_err(|e| ClientError::local(format!("writing `{}`", target.display()), e))?;
        let received = self.conn.recv_body(file, offset, size, progress).await;
        let local_error = match received {
            Ok((digest, _)) => Ok(digest),
            Err(BodyError::Local { source, in_sync }) => {
                if !in_sync {
                    self.broken = true;
                }
                Err(ClientError::local(
                    format!("writing `{}`", target.display()),
                    source,
                ))
            }
            Err(BodyError::Net(e)) => {
                self.broken = true;
                return Err(ClientError::Broken(e));
            }
            Err(BodyError::SourceChanged) => {
                self.broken = true;
                return Err(ClientError::Protocol("unexpected source change".into()));
            }
        };
        let claimed = match self.read().await? {
            Response::DownloadEnd { digest } => digest,
            other => return Err(unexpected(&other)),
        };
        let digest = local_error?;
        if claimed != digest {
            return Err(ClientError::Verification(format!(
                "`{remote}` arrived corrupted (digest mismatch); nothing was saved"
            )));
        }
        temp.as_file()
            .sync_all()
            .map_err(|e| ClientError::local(format!("writing `{}`", target.display()), e))?;
        temp.persist(target)
            .map_err(|e| ClientError::local(format!("saving `{}`", target.display()), e.error))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Transferred { size, digest })
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        self.conn.shutdown().await;
    }
}

fn unexpected(r: &Response) -> ClientError {
    let name = format!("{r:?}");
    let name = name
        .split([' ', '(', '{'])
        .next()
        .unwrap_or("?")
        .to_string();
    ClientError::Protocol(format!("unexpected reply `{name}` from the server"))
}
