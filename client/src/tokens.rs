//! Long-lived tokens: `xfer token create/list/revoke`, and using one instead of a stored
//! session (`XFER_TOKEN` or `--token-file F`, with `--server HOST:PORT`), for cron jobs and
//! scripts that must not hold a password. A token never goes on the command line: argv is
//! visible to every user of the machine.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use xfer_proto::fingerprint::Fingerprint;
use xfer_proto::limits::{MAX_TOKEN_LEN, MAX_TOKEN_NAME_LEN};
use xfer_proto::{ErrorCode, Request, Response, TokenInfo};

use crate::addr::ServerAddr;
use crate::conn::{Client, unexpected};
use crate::context::Ctx;
use crate::error::{ClientError, Result, printable};
use crate::state::{StateDir, StoredSession};

/// The environment variable a token is read from.
pub const TOKEN_ENV: &str = "XFER_TOKEN";

/// Prefix every xfer token starts with (the server's `TOKEN_PREFIX`).
const TOKEN_PREFIX: &str = "xfer1_";

/// Most `TokenInfo`s a listing may bring, so a misbehaving server cannot grow memory without
/// bound (servers cap tokens per user far below this).
const MAX_LISTED: usize = 100_000;

/// `xfer token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a long-lived token for scripts and print it (only it) on stdout, once; use it
    /// with `XFER_TOKEN` or `--token-file F`, and `--server HOST:PORT`.
    Create {
        /// How long it lives: 90d, 12h, 30m, 2w, 3600s [default: 90 days, or the server's
        /// limit if lower]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<u64>,
        /// Refuse every write (upload, delete, rename, mkdir)
        #[arg(long)]
        read_only: bool,
        /// Limit it to this remote folder and what is below it
        #[arg(long, value_name = "DIR")]
        path: Option<String>,
        /// A label for `xfer token list`
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List your tokens: id, name, scope, expiry (never the tokens themselves).
    List,
    /// Revoke one of your tokens by the id `xfer token list` shows.
    Revoke {
        /// The token's id (6 or more of its hex digits)
        id: String,
    },
}

/// A lifetime like `90d`, `12h`, `30m`, `2w` or `3600s`, in seconds.
fn parse_duration(text: &str) -> std::result::Result<u64, String> {
    let secs = humantime::parse_duration(text)
        .map_err(|e| format!("{e}: write it like 90d, 12h, 30m, 2w or 3600s"))?
        .as_secs();
    if secs == 0 {
        return Err("a token must live at least one second".into());
    }
    Ok(secs)
}

/// Where `XFER_TOKEN` or `--token-file` points a command: the server, its pin and the token.
#[derive(Clone)]
pub(crate) struct TokenAuth {
    /// The server, as `--server` named it.
    server: ServerAddr,
    /// Its key from known servers or `--fingerprint`.
    pin: Fingerprint,
    /// The token (secret).
    token: String,
    /// Where it came from, for messages.
    origin: String,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field("server", &self.server.to_string())
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Reads a token from `--token-file` (if given) or `XFER_TOKEN` (if set); `None` when neither
/// is, and the command uses the stored session.
fn read_token(token_file: Option<&Path>) -> Result<Option<(String, String)>> {
    let (text, origin) = match token_file {
        Some(path) => {
            let shown = path.display();
            let fail = |e: std::io::Error| {
                ClientError::local(
                    format!(
                        "cannot read the token file `{shown}` given to --token-file (save the output of `xfer token create` there, mode 0600)"
                    ),
                    e,
                )
            };
            let meta = std::fs::metadata(path).map_err(fail)?;
            if !meta.is_file() || meta.len() > 2 * MAX_TOKEN_LEN as u64 {
                return Err(ClientError::Usage(format!(
                    "`{shown}` given to --token-file is not a token file: it should hold the one line `xfer token create` printed"
                )));
            }
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    eprintln!(
                        "xfer: warning: the token file `{shown}` can be read by other users (mode {mode:o}); run `chmod 600 {shown}`"
                    );
                }
            }
            (
                std::fs::read_to_string(path).map_err(fail)?,
                format!("the token in `{shown}`"),
            )
        }
        None => match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => (t, format!("the token in {TOKEN_ENV}")),
            _ => return Ok(None),
        },
    };
    let token = text.trim().to_string();
    if !token.starts_with(TOKEN_PREFIX)
        || token.len() > MAX_TOKEN_LEN
        || token.contains(char::is_whitespace)
    {
        return Err(ClientError::Usage(format!(
            "{origin} is not an xfer token: it should be the one line (xfer1_...) that `xfer token create` printed"
        )));
    }
    Ok(Some((token, origin)))
}

/// The token a command should use instead of the stored session, if `--token-file` or
/// `XFER_TOKEN` gives one: it needs `--server`, and the server's key from known servers or
/// `--fingerprint` (never trusted on first sight: a token is as good as a password).
pub(crate) fn resolve(
    state: &StateDir,
    server: Option<&str>,
    token_file: Option<&Path>,
    fingerprint: Option<&str>,
) -> Result<Option<TokenAuth>> {
    let Some((token, origin)) = read_token(token_file)? else {
        return Ok(None);
    };
    let Some(key) = server else {
        return Err(ClientError::Usage(format!(
            "{origin} needs --server HOST:PORT to say which server it is for"
        )));
    };
    let server = ServerAddr::parse(key)?;
    let key = server.to_string();
    let given = fingerprint
        .map(Fingerprint::parse)
        .transpose()
        .map_err(|e| ClientError::Usage(format!("--fingerprint: {e}")))?;
    let pinned = state.known_servers()?.get(&key);
    let pin = match (pinned, given) {
        (Some(pinned), Some(given)) if pinned != given => {
            return Err(ClientError::FingerprintMismatch {
                server: key,
                expected: given,
                seen: pinned,
            });
        }
        (Some(pin), _) | (None, Some(pin)) => pin,
        (None, None) => return Err(ClientError::UnpinnedForToken { server: key }),
    };
    Ok(Some(TokenAuth {
        server,
        pin,
        token,
        origin,
    }))
}

/// Connects to the token's server, checks its key, and authenticates with the token. The
/// returned session stands in for a stored one (it is never saved).
pub(crate) async fn connect(
    auth: &TokenAuth,
    bind: Option<IpAddr>,
) -> Result<(Client, String, StoredSession)> {
    let key = auth.server.to_string();
    let mut client = Client::connect(&auth.server, auth.pin, bind).await?;
    match client.authenticate(&auth.token).await {
        Ok(info) => {
            let stored = StoredSession {
                user: printable(&info.user),
                role: info.role,
                token: auth.token.clone(),
                expires: info.expires,
            };
            Ok((client, key, stored))
        }
        Err(ClientError::Server {
            code: ErrorCode::SessionExpired | ErrorCode::NotAuthenticated,
            ..
        }) => Err(ClientError::Server {
            code: ErrorCode::SessionExpired,
            message: format!(
                "{} was refused by {key}: it expired or was revoked; make a new one with `xfer token create`",
                auth.origin
            ),
        }),
        Err(e) => Err(e),
    }
}

/// [`connect`] for a command's extra connections: `None` on any failure within `wait`.
pub(crate) async fn connect_extra(
    auth: &TokenAuth,
    bind: Option<IpAddr>,
    wait: Duration,
) -> Option<Client> {
    tokio::time::timeout(wait, connect(auth, bind))
        .await
        .ok()?
        .ok()
        .map(|(c, _, _)| c)
}

async fn call(client: &mut Client, req: &Request) -> Result<Response> {
    client.conn.write_frame(req).await?;
    client.read().await
}

/// Asks the server for a token; returns it and what it may do.
pub async fn create(
    client: &mut Client,
    name: &str,
    expires_secs: u64,
    read_only: bool,
    path: &str,
) -> Result<(String, TokenInfo)> {
    let req = Request::TokenCreate {
        name: name.into(),
        expires_secs,
        read_only,
        path: path.into(),
    };
    match call(client, &req).await? {
        Response::TokenCreated { token, info } => Ok((token, info)),
        other => Err(unexpected(&other)),
    }
}

/// This user's tokens.
pub async fn list(client: &mut Client) -> Result<Vec<TokenInfo>> {
    let mut out = Vec::new();
    let mut reply = call(client, &Request::TokenList).await?;
    loop {
        match reply {
            Response::Tokens { tokens, done } => {
                out.extend(tokens);
                if out.len() > MAX_LISTED {
                    return Err(ClientError::Protocol(format!(
                        "the server listed more than {MAX_LISTED} tokens"
                    )));
                }
                if done {
                    return Ok(out);
                }
            }
            other => return Err(unexpected(&other)),
        }
        reply = client.read().await?;
    }
}

/// Revokes one of this user's tokens.
pub async fn revoke(client: &mut Client, id: &str) -> Result<()> {
    match call(client, &Request::TokenRevoke { id: id.into() }).await? {
        Response::Ok => Ok(()),
        other => Err(unexpected(&other)),
    }
}

/// The scope in words, for people.
fn scope_text(info: &TokenInfo) -> String {
    let access = if info.read_only {
        "read-only"
    } else {
        "read-write"
    };
    if info.path.is_empty() {
        format!("{access}, whole tree")
    } else {
        format!("{access}, limited to {}", printable(&info.path))
    }
}

fn json_of(info: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": info.id,
        "name": info.name,
        "created": xfer_util::format_time(info.created),
        "expires": xfer_util::format_time(info.expires),
        "read_only": info.read_only,
        "path": info.path,
    })
}

/// Runs `xfer token ...`.
pub(crate) async fn run(ctx: &Ctx, cmd: TokenCommand) -> Result<()> {
    if let TokenCommand::Create {
        name: Some(name), ..
    } = &cmd
        && (name.len() > MAX_TOKEN_NAME_LEN || name.chars().any(char::is_control))
    {
        return Err(ClientError::Usage(format!(
            "--name: at most {MAX_TOKEN_NAME_LEN} bytes, without control characters"
        )));
    }
    let (mut client, key, stored) = ctx.connect().await?;
    let result = match cmd {
        TokenCommand::Create {
            expires,
            read_only,
            path,
            name,
        } => {
            let (token, info) = create(
                &mut client,
                name.as_deref().unwrap_or(""),
                expires.unwrap_or(0),
                read_only,
                path.as_deref().unwrap_or(""),
            )
            .await?;
            // The token alone on stdout, so `xfer token create > FILE` is the whole setup.
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}")
                .and_then(|()| out.flush())
                .map_err(|e| ClientError::local("writing the token to standard output", e))?;
            ctx.status(format_args!(
                "Token {} for {}@{key}: {}, expires {}. It is shown only this once; revoke it with `xfer token revoke {}`.",
                info.id,
                stored.user,
                scope_text(&info),
                xfer_util::format_time(info.expires),
                info.id
            ));
            Ok(())
        }
        TokenCommand::List => {
            let tokens = list(&mut client).await?;
            if ctx.json {
                let v: Vec<_> = tokens.iter().map(json_of).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for t in &tokens {
                    let name = if t.name.is_empty() {
                        "-".to_string()
                    } else {
                        printable(&t.name)
                    };
                    println!(
                        "{}  {name}  {}  expires {}",
                        printable(&t.id),
                        scope_text(t),
                        xfer_util::format_time(t.expires)
                    );
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            revoke(&mut client, &id).await?;
            ctx.status(format_args!("Revoked token {id} on {key}."));
            Ok(())
        }
    };
    client.close().await;
    result
}

/// Where the options that pick a token live, for [`Ctx`]: `--token-file` and `--fingerprint`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenOptions {
    /// `--token-file F`.
    pub(crate) token_file: Option<PathBuf>,
    /// `--fingerprint FP`.
    pub(crate) fingerprint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2w"), Ok(14 * 86400));
        assert_eq!(parse_duration("3600s"), Ok(3600));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("90d"));
    }
}
