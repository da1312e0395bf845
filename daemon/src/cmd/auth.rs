//! Hello, login with a password, authentication with a token, logout and whoami.

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::MAX_USER_LEN;
use xfer_proto::message::SessionInfo;
use xfer_proto::{Connection, ErrorCode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Response};

use super::reply_error;
use super::{Auth, Ctx, Flow, Outcome};
use crate::accounts::VerifyOutcome;

/// The part of a client-supplied user name that is logged and audited: no valid name is longer
/// than [`MAX_USER_LEN`], so a longer one is cut there (a guesser's 64 KiB names would otherwise
/// fill the audit log). Escaping is the loggers' job: the text log's formatter escapes every
/// field ([`crate::logging`]); the JSON log and the audit trail are JSON.
pub(super) fn tried_name(name: &str) -> &str {
    name.char_indices()
        .nth(MAX_USER_LEN)
        .map_or(name, |(cut, _)| &name[..cut])
}

pub(super) async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    version: u16,
    agent: &str,
) -> Result<Flow, ConnError> {
    if ctx.greeted {
        return reply_error(conn, ErrorCode::BadRequest, "Hello was already sent").await;
    }
    if version < MIN_PROTOCOL_VERSION {
        tracing::info!(peer = %ctx.peer, version, agent = %agent, "protocol version mismatch");
        conn.write_frame(&Response::error(
            ErrorCode::VersionMismatch,
            format!(
                "this server speaks xfer protocol versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}, the client speaks {version}; upgrade the client"
            ),
        ))
        .await?;
        return Ok(Flow::Close);
    }
    ctx.greeted = true;
    // A newer client gets this server's version and must speak it; an older one keeps its own.
    ctx.version = version.min(PROTOCOL_VERSION);
    conn.write_frame(&Response::Hello {
        version: ctx.version,
        agent: crate::AGENT.into(),
    })
    .await?;
    Ok(Flow::Continue)
}

/// Refuses a password check (or a token that did not check out) from a source penalised for
/// failed ones, without spending an argon2 run on it and without adding to the penalty:
/// answers, audits `op` as rate-limited and closes. `None`: go ahead.
pub(super) async fn refuse_if_penalised<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    op: &str,
    user: &str,
) -> Result<Option<Flow>, ConnError> {
    let Some(wait) = ctx.state.penalties.refused_for(ctx.peer.ip()) else {
        return Ok(None);
    };
    tracing::warn!(user = %tried_name(user), peer = %ctx.peer, op, wait_secs = wait.as_secs(), "refused unchecked: source is penalised for failed logins");
    ctx.audit_as(
        tried_name(user),
        op,
        None,
        Outcome::failed(ErrorCode::RateLimited),
    );
    conn.write_frame(&Response::error(
        ErrorCode::RateLimited,
        format!(
            "too many failed logins from {}; try again in {} s",
            ctx.peer.ip().to_canonical(),
            wait.as_secs().max(1)
        ),
    ))
    .await?;
    Ok(Some(Flow::Close))
}

/// Answers a failed password or token check: counts it against the connection and the
/// source's penalty, and closes once the connection has used up its attempts.
pub(super) async fn failed<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    code: ErrorCode,
    message: &str,
) -> Result<Flow, ConnError> {
    ctx.failures += 1;
    ctx.state.penalties.record_failure(ctx.peer.ip());
    conn.write_frame(&Response::error(code, message)).await?;
    if ctx.failures >= ctx.state.limits().max_auth_attempts {
        tracing::warn!(peer = %ctx.peer, attempts = ctx.failures, "too many failed attempts; closing");
        return Ok(Flow::Close);
    }
    Ok(Flow::Continue)
}

/// Refuses a login by password (`op` "login") or by key ("keylogin") with the one answer
/// every such failure gets, whatever failed: logged, audited and counted as a failed attempt.
pub(super) async fn denied<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    user: &str,
    op: &'static str,
) -> Result<Flow, ConnError> {
    tracing::warn!(user = %tried_name(user), peer = %ctx.peer, op, "login failed: wrong user name, password or key");
    ctx.audit_as(
        tried_name(user),
        op,
        None,
        Outcome::failed(ErrorCode::AuthFailed),
    );
    failed(
        ctx,
        conn,
        ErrorCode::AuthFailed,
        "wrong user name or password",
    )
    .await
}

/// Makes this connection `user`'s: opens their storage (creating it on first login).
async fn start_session(
    ctx: &mut Ctx,
    user: &str,
    role: xfer_proto::Role,
    token: String,
    expires: i64,
    scope: Option<crate::sessions::TokenScope>,
) -> std::io::Result<SessionInfo> {
    let tree = ctx.state.storage.user_tree(user).await?;
    ctx.auth = Some(Auth {
        user: user.into(),
        role,
        token,
        expires,
        tree,
        scope,
    });
    Ok(SessionInfo {
        user: user.into(),
        role: wire_role(ctx.version, role),
        expires,
    })
}

/// The role as a peer speaking `version` is told it: a version 1 or 2 client cannot decode
/// `Reader` (tag 2), so a reader shows as `User` there. Only the display differs: the
/// dispatcher enforces the real role.
pub(super) fn wire_role(version: u16, role: xfer_proto::Role) -> xfer_proto::Role {
    if version < 3 && role == xfer_proto::Role::Reader {
        xfer_proto::Role::User
    } else {
        role
    }
}

/// Answers a login or token that checked out but whose storage cannot be opened.
async fn storage_unavailable<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    user: &str,
    e: &std::io::Error,
) -> Result<Flow, ConnError> {
    tracing::error!(user = %user, error = %e, "cannot open the user's storage; no session started");
    reply_error(
        conn,
        ErrorCode::Internal,
        "cannot open your storage on the server",
    )
    .await
}

/// Opens a session for `user`, whose password or key just checked out (`op`, for the log
/// and the audit trail): registers it, opens the user's storage and answers `LoggedIn`.
pub(super) async fn grant<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    user: &str,
    role: xfer_proto::Role,
    generation: u64,
    op: &str,
) -> Result<Flow, ConnError> {
    let state = ctx.state.clone();
    if let Err(why) = ctx.enter_session(user) {
        return super::refuse_session(conn, &why).await;
    }
    // Registered before the token is handed out, so that with several nodes the
    // session is listed, and counted against max_per_user, by the time it is used.
    let created = state
        .sessions
        .create_registered(user, generation, &ctx.peer.to_string())
        .await;
    let (token, rec) = match created {
        Ok(created) => created,
        Err(e) => {
            tracing::error!(user = %user, error = %e, "cannot record a new session; no session started");
            return reply_error(
                conn,
                ErrorCode::Internal,
                "cannot record the session on the server; try again in a moment",
            )
            .await;
        }
    };
    match start_session(ctx, user, role, token.clone(), rec.expires, None).await {
        Ok(session) => {
            tracing::info!(user = %user, peer = %ctx.peer, %role, op, "login succeeded");
            ctx.audit(op, None, Outcome::ok());
            conn.write_frame(&Response::LoggedIn { token, session })
                .await?;
            Ok(Flow::Continue)
        }
        Err(e) => {
            state.sessions.revoke(&token);
            storage_unavailable(conn, user, &e).await
        }
    }
}

pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    user: &str,
    password: &str,
) -> Result<Flow, ConnError> {
    if let Some(flow) = refuse_if_penalised(ctx, conn, "login", user).await? {
        return Ok(flow);
    }
    let state = ctx.state.clone();
    match state.accounts.verify(user, password).await {
        VerifyOutcome::Ok { role, generation } => {
            grant(ctx, conn, user, role, generation, "login").await
        }
        VerifyOutcome::Denied => denied(ctx, conn, user, "login").await,
        VerifyOutcome::Busy => {
            tracing::warn!(peer = %ctx.peer, "login refused: too many logins in progress");
            reply_error(
                conn,
                ErrorCode::Busy,
                "the server is busy; try again in a moment",
            )
            .await
        }
    }
}

pub(super) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    token: &str,
) -> Result<Flow, ConnError> {
    let state = ctx.state.clone();
    // One lookup gives both the generation the token must carry and the role it gets.
    let mut role = None;
    let record = if token.len() <= xfer_proto::limits::MAX_TOKEN_LEN {
        state.sessions.validate(token, |u| {
            let (r, generation) = state.accounts.lookup(u)?;
            role = Some(r);
            Some(generation)
        })
    } else {
        None
    };
    let (Some(record), Some(role)) = (record, role) else {
        // A valid token works from a penalised source (users behind a guesser's NAT keep
        // their sessions), but a bad one gets `RateLimited` and a close, and does not extend
        // the penalty: bad tokens cost no hashing, so counting each would let a guesser renew
        // everyone's lockout at the maximum with a burst of them.
        if let Some(flow) = refuse_if_penalised(ctx, conn, "authenticate", "").await? {
            return Ok(flow);
        }
        tracing::info!(peer = %ctx.peer, "token refused: unknown, expired or revoked");
        return failed(
            ctx,
            conn,
            ErrorCode::SessionExpired,
            "session expired or revoked; log in again",
        )
        .await;
    };
    if let Err(why) = ctx.enter_session(&record.user) {
        return super::refuse_session(conn, &why).await;
    }
    let scope = record.token.clone();
    match start_session(ctx, &record.user, role, token.into(), record.expires, scope).await {
        Ok(session) => {
            tracing::debug!(user = %record.user, peer = %ctx.peer, "token accepted");
            conn.write_frame(&Response::Session(session)).await?;
            Ok(Flow::Continue)
        }
        Err(e) => storage_unavailable(conn, &record.user, &e).await,
    }
}

pub(super) async fn logout<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
    if let Some(auth) = ctx.auth.take() {
        ctx.state.sessions.revoke(&auth.token);
        tracing::info!(user = %auth.user, peer = %ctx.peer, "logged out; session revoked");
        ctx.audit_as(&auth.user, "logout", None, Outcome::ok());
    }
    conn.write_frame(&Response::Ok).await?;
    Ok(Flow::Continue)
}

pub(super) async fn whoami<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
    let auth = ctx.session();
    conn.write_frame(&Response::Session(SessionInfo {
        user: auth.user.clone(),
        role: wire_role(ctx.version, auth.role),
        expires: auth.expires,
    }))
    .await?;
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_shows_as_a_user_to_clients_that_cannot_decode_it() {
        use xfer_proto::Role;
        assert_eq!(wire_role(2, Role::Reader), Role::User);
        assert_eq!(wire_role(1, Role::Reader), Role::User);
        assert_eq!(wire_role(3, Role::Reader), Role::Reader);
        assert_eq!(wire_role(2, Role::Superuser), Role::Superuser);
    }

    #[test]
    fn tried_names_are_cut_at_the_longest_valid_name_on_a_character() {
        assert_eq!(
            tried_name("alice\n"),
            "alice\n",
            "escaping is the loggers' job"
        );
        let long = "é".repeat(MAX_USER_LEN + 10);
        assert_eq!(tried_name(&long), "é".repeat(MAX_USER_LEN));
    }
}
