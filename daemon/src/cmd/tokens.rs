//! Long-lived tokens for automation: create, list and revoke one's own (protocol 3). The
//! dispatcher has already refused these to token sessions; what a token may do is enforced
//! there too, from the scope its session carries.

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::{MAX_TOKEN_NAME_LEN, MAX_TOKENS_PER_FRAME};
use xfer_proto::{Connection, ErrorCode, Response, TokenInfo};

use super::{Ctx, Flow, Outcome, reply_error};
use crate::sessions::{SessionRecord, TokenRefusal, TokenScope};

/// Fewest hex digits of an id `TokenRevoke` accepts, as `xferd session revoke` does.
const MIN_ID_DIGITS: usize = 6;

fn info(id: String, r: &SessionRecord) -> TokenInfo {
    let scope = r.token.clone().unwrap_or_default();
    TokenInfo {
        id,
        name: scope.name,
        created: r.created,
        expires: r.expires,
        read_only: scope.read_only,
        path: scope.path,
    }
}

pub(super) async fn create<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    name: &str,
    expires_secs: u64,
    read_only: bool,
    path: &str,
) -> Result<Flow, ConnError> {
    if name.len() > MAX_TOKEN_NAME_LEN || name.chars().any(char::is_control) {
        return reply_error(
            conn,
            ErrorCode::BadRequest,
            format!(
                "a token's name is at most {MAX_TOKEN_NAME_LEN} bytes, without control characters"
            ),
        )
        .await;
    }
    // The same rules storage applies, so the scope names exactly what requests will name.
    let path = match xfer_proto::path::components(path) {
        Ok(parts) => parts.join("/"),
        Err(e) => {
            return reply_error(
                conn,
                ErrorCode::InvalidPath,
                format!("refused token path `{path}`: {e}"),
            )
            .await;
        }
    };
    let settings = &ctx.state.config.sessions;
    let max = settings.token_max_secs();
    let ttl = match expires_secs {
        0 => settings.token_default_secs(),
        secs if secs > max => {
            return reply_error(
                conn,
                ErrorCode::BadRequest,
                format!(
                    "tokens live at most {} days on this server (sessions.token_max_days); ask for less",
                    settings.token_max_days
                ),
            )
            .await;
        }
        secs => secs,
    };
    let state = ctx.state.clone();
    let user = ctx.session().user.clone();
    // The generation the token is bound to: a password or role change ends it as a login.
    let Some((_, generation)) = state.accounts.lookup(&user) else {
        return reply_error(
            conn,
            ErrorCode::SessionExpired,
            "session expired or revoked; log in again",
        )
        .await;
    };
    let scope = TokenScope {
        name: name.into(),
        read_only,
        path: path.clone(),
    };
    let made = state
        .sessions
        .create_token(
            &user,
            generation,
            &ctx.peer.to_string(),
            scope,
            ttl,
            settings.max_tokens_per_user,
        )
        .await;
    let (token, listed, record) = match made {
        Ok(made) => made,
        Err(why @ TokenRefusal::TooMany(_)) => {
            ctx.audit(
                "token_create",
                Some(&path),
                Outcome::failed(ErrorCode::Busy),
            );
            return reply_error(conn, ErrorCode::Busy, why.to_string()).await;
        }
        Err(TokenRefusal::Io(e)) => {
            tracing::error!(user = %user, error = %e, "cannot record a new token");
            return reply_error(
                conn,
                ErrorCode::Internal,
                "cannot record the token on the server; try again in a moment",
            )
            .await;
        }
    };
    tracing::info!(user = %user, peer = %ctx.peer, id = %listed, name = %name, read_only, path = %path, expires = record.expires, "token created");
    ctx.audit(
        "token_create",
        Some(&path),
        Outcome {
            token_id: Some(&listed),
            ..Outcome::ok()
        },
    );
    conn.write_frame(&Response::TokenCreated {
        token,
        info: info(listed, &record),
    })
    .await?;
    Ok(Flow::Continue)
}

pub(super) async fn list<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
    let user = ctx.session().user.clone();
    let tokens = match ctx.state.sessions.tokens_of(&user).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(user = %user, error = %e, "cannot list tokens");
            return reply_error(
                conn,
                ErrorCode::Internal,
                "cannot read the tokens on the server; try again in a moment",
            )
            .await;
        }
    };
    let infos: Vec<TokenInfo> = tokens.iter().map(|(id, r)| info(id.clone(), r)).collect();
    let mut chunks = infos.chunks(MAX_TOKENS_PER_FRAME).peekable();
    if chunks.peek().is_none() {
        conn.write_frame(&Response::Tokens {
            tokens: vec![],
            done: true,
        })
        .await?;
    }
    while let Some(chunk) = chunks.next() {
        conn.write_frame(&Response::Tokens {
            tokens: chunk.to_vec(),
            done: chunks.peek().is_none(),
        })
        .await?;
    }
    Ok(Flow::Continue)
}

pub(super) async fn revoke<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    id: &str,
) -> Result<Flow, ConnError> {
    let id = id.to_ascii_lowercase();
    if id.len() < MIN_ID_DIGITS || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return reply_error(
            conn,
            ErrorCode::NotFound,
            "no such token: give its id as `xfer token list` shows it",
        )
        .await;
    }
    let user = ctx.session().user.clone();
    match ctx.state.sessions.revoke_token(&user, &id).await {
        Ok(0) => {
            reply_error(
                conn,
                ErrorCode::NotFound,
                format!("you have no token with id `{id}`; see `xfer token list`"),
            )
            .await
        }
        Ok(n) => {
            tracing::info!(user = %user, peer = %ctx.peer, id = %id, revoked = n, "token revoked");
            ctx.audit(
                "token_revoke",
                None,
                Outcome {
                    token_id: Some(&id),
                    ..Outcome::ok()
                },
            );
            conn.write_frame(&Response::Ok).await?;
            Ok(Flow::Continue)
        }
        Err(e) => {
            tracing::error!(user = %user, error = %e, "cannot revoke a token");
            reply_error(
                conn,
                ErrorCode::Internal,
                "cannot record the revocation on the server; try again in a moment",
            )
            .await
        }
    }
}
