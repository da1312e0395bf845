//! The connection context every command runs in: the state folder (pins, sessions) and the
//! global flags, and connecting with them: the stored session's server, its pin, its token,
//! and the OpenSSH-style warning when the key changed. The command line and the transfer
//! commands both use it; it uses neither.

use std::net::IpAddr;
use std::path::Path;

use xfer_proto::ErrorCode;

use crate::addr::ServerAddr;
use crate::conn::Client;
use crate::error::{ClientError, Result};
use crate::progress::Progress;
use crate::state::{KnownServers, StateDir, StoredSession};

/// How long [`Ctx::connect_extra`] tries.
const EXTRA_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What every command needs: the state folder and the global flags.
pub(crate) struct Ctx {
    /// Pins and sessions.
    pub(crate) state: StateDir,
    /// `--server`, normalised to `HOST:PORT`: which stored session to use.
    pub(crate) server: Option<String>,
    /// `--bind`: the local address to connect from.
    pub(crate) bind: Option<IpAddr>,
    /// `--json`: print data as JSON.
    pub(crate) json: bool,
    /// `-q`: no status lines.
    pub(crate) quiet: bool,
    /// Progress bars (drawn only on a terminal).
    pub(crate) progress: Progress,
    /// `--token-file` and `--fingerprint`: a token to use instead of the stored session.
    tokens: crate::tokens::TokenOptions,
}

impl Ctx {
    /// Opens the state folder (`config_dir`, else the default one) and checks `server`.
    pub(crate) fn new(
        config_dir: Option<&Path>,
        server: Option<&str>,
        bind: Option<IpAddr>,
        json: bool,
        quiet: bool,
        tokens: crate::tokens::TokenOptions,
    ) -> Result<Ctx> {
        let dir = match config_dir {
            Some(d) => d.to_path_buf(),
            None => crate::state::default_dir().ok_or_else(|| {
                ClientError::Usage(
                    "cannot find a config folder: set HOME or XFER_CONFIG_DIR, or pass --config-dir".into(),
                )
            })?,
        };
        let server = server
            .map(|s| ServerAddr::parse(s).map(|a| a.to_string()))
            .transpose()?;
        Ok(Ctx {
            state: StateDir::open(&dir)?,
            server,
            bind,
            json,
            quiet,
            progress: Progress::new(quiet),
            tokens,
        })
    }

    /// The token `--token-file` or `XFER_TOKEN` gives, if any (see [`crate::tokens::resolve`]).
    fn token(&self) -> Result<Option<crate::tokens::TokenAuth>> {
        crate::tokens::resolve(
            &self.state,
            self.server.as_deref(),
            self.tokens.token_file.as_deref(),
            self.tokens.fingerprint.as_deref(),
        )
    }

    /// Prints a status line on stderr unless `-q`.
    pub(crate) fn status(&self, msg: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// Connects to the selected server with its pin and authenticates with the stored token.
    pub(crate) async fn connect(&self) -> Result<(Client, String, StoredSession)> {
        if let Some(auth) = self.token()? {
            return crate::tokens::connect(&auth, self.bind).await;
        }
        let (key, stored) = self.state.sessions()?.select(self.server.as_deref())?;
        let client = self.connect_as(&key, &stored).await?;
        Ok((client, key, stored))
    }

    /// Another connection on the same session, for a command that spreads its work over
    /// several: one attempt (a refusal at a server limit is not retried) within
    /// [`EXTRA_CONNECT_WAIT`], and `None` on any failure, since the first connection can do
    /// the work alone.
    pub(crate) async fn connect_extra(&self) -> Option<Client> {
        if let Some(auth) = self.token().ok()? {
            return crate::tokens::connect_extra(&auth, self.bind, EXTRA_CONNECT_WAIT).await;
        }
        let (key, stored) = self
            .state
            .sessions()
            .ok()?
            .select(self.server.as_deref())
            .ok()?;
        let server = ServerAddr::parse(&key).ok()?;
        let pin = self.state.known_servers().ok()?.get(&key)?;
        let attempt = async {
            let (tls, seen) = crate::conn::connect_tls_once(&server, Some(pin), self.bind)
                .await
                .ok()?;
            let mut client = Client::greet(tls, server.clone(), seen).await.ok()?;
            client.authenticate(&stored.token).await.ok()?;
            Some(client)
        };
        tokio::time::timeout(EXTRA_CONNECT_WAIT, attempt)
            .await
            .ok()
            .flatten()
    }

    /// [`Ctx::connect`] for a session the caller has already read, so that a command which
    /// also rewrites `sessions.toml` reads it once.
    pub(crate) async fn connect_as(&self, key: &str, stored: &StoredSession) -> Result<Client> {
        let server = ServerAddr::parse(key)?;
        let known = self.state.known_servers()?;
        let pin = known.get(key).ok_or_else(|| {
            ClientError::Other(format!(
                "no pinned key for {key} in `{}` - run `xfer login {}@{key}`",
                self.state.known_servers_path().display(),
                stored.user
            ))
        })?;
        let mut client = Client::connect(&server, pin, self.bind)
            .await
            .inspect_err(|e| self.warn_key_changed(e, &known))?;
        match client.authenticate(&stored.token).await {
            Ok(_) => Ok(client),
            Err(ClientError::Server {
                code: ErrorCode::SessionExpired | ErrorCode::NotAuthenticated,
                ..
            }) => Err(ClientError::Server {
                code: ErrorCode::SessionExpired,
                message: format!(
                    "session for {key} expired or was revoked - run `xfer login {}@{key}`",
                    stored.user
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// The OpenSSH-style warning for a changed key; `known` is the pin file as just read.
    pub(crate) fn warn_key_changed(&self, e: &ClientError, known: &KnownServers) {
        if let ClientError::KeyChanged {
            server,
            pinned,
            seen,
        } = e
        {
            let path = self.state.known_servers_path();
            let line = known
                .line_of(server)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            eprintln!(
                "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
                 @    WARNING: SERVER IDENTIFICATION HAS CHANGED!          @\n\
                 @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
                 IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
                 Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n\
                 It is also possible that the server's key has just been replaced.\n\
                 The key pinned for {server} is\n    {pinned}\n\
                 The server now presents\n    {seen}\n\
                 The pin is in {}{line}. Nothing was sent to the server.\n\
                 If you know the key was replaced on purpose, remove the old pin with:\n    xfer forget {server}",
                path.display()
            );
        }
    }
}
