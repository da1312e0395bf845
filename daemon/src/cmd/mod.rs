//! Request dispatch: the one place that checks a request is allowed in this state and for this
//! role, then hands it to the module that implements it.

mod auth;
pub mod batch;
mod context;
mod errors;
mod files;
mod keys;
mod shutdown;
mod transfer;

pub use context::{Auth, Ctx, Flow, Outcome};

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, ErrorCode, Request, Response, Role};

use crate::state::State;

/// What a request needs before it may run.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    /// Allowed as the very first frame.
    Hello,
    /// Needs a completed hello.
    Greeted,
    /// Needs an authenticated session with at least this role.
    Role(Role),
}

fn access(req: &Request) -> Access {
    match req {
        Request::Hello { .. } => Access::Hello,
        Request::Login { .. }
        | Request::Authenticate { .. }
        | Request::Ping
        | Request::KeyLogin { .. }
        | Request::KeyProof { .. } => Access::Greeted,
        Request::Shutdown { .. } => Access::Role(Role::Superuser),
        Request::Logout
        | Request::WhoAmI
        | Request::List { .. }
        | Request::Upload { .. }
        | Request::UploadEnd { .. }
        | Request::UploadFrom { .. }
        | Request::Download { .. }
        | Request::DownloadFrom { .. }
        | Request::Delete { .. }
        | Request::Rename { .. }
        | Request::Mkdir { .. }
        | Request::Put { .. }
        | Request::Commit => Access::Role(Role::User),
    }
}

/// Answers a refusal at a session cap with `Busy` (the message says which cap) and closes.
pub async fn refuse_session<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    why: &crate::admission::Refusal,
) -> Result<Flow, ConnError> {
    conn.write_frame(&Response::error(ErrorCode::Busy, why.to_string()))
        .await?;
    Ok(Flow::Close)
}

/// Sends an error response and keeps the connection.
pub(crate) async fn reply_error<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    code: ErrorCode,
    message: impl Into<String>,
) -> Result<Flow, ConnError> {
    conn.write_frame(&Response::error(code, message)).await?;
    Ok(Flow::Continue)
}

/// Checks access, then runs the request.
pub async fn dispatch<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    req: Request,
) -> Result<Flow, ConnError> {
    let need = access(&req);
    if need != Access::Hello && !ctx.greeted {
        conn.write_frame(&Response::error(
            ErrorCode::BadRequest,
            "the first message must be Hello",
        ))
        .await?;
        return Ok(Flow::Close);
    }
    // A version 1 peer has no such messages: to a version 1 server they would not even decode.
    if ctx.version < 2
        && matches!(
            req,
            Request::DownloadFrom { .. } | Request::UploadFrom { .. }
        )
    {
        conn.write_frame(&Response::error(
            ErrorCode::BadRequest,
            "DownloadFrom and UploadFrom need protocol version 2; this connection speaks version 1",
        ))
        .await?;
        return Ok(Flow::Close);
    }
    if ctx.version < 3 && matches!(req, Request::Put { .. } | Request::Commit) {
        conn.write_frame(&Response::error(
            ErrorCode::BadRequest,
            format!(
                "Put and Commit need protocol version 3; this connection speaks version {}",
                ctx.version
            ),
        ))
        .await?;
        return Ok(Flow::Close);
    }
    if ctx.version < 3 && matches!(req, Request::KeyLogin { .. } | Request::KeyProof { .. }) {
        conn.write_frame(&Response::error(
            ErrorCode::BadRequest,
            format!(
                "KeyLogin and KeyProof need protocol version 3; this connection speaks version {}",
                ctx.version
            ),
        ))
        .await?;
        return Ok(Flow::Close);
    }
    // A key challenge is good for the one request right after it, whatever that is.
    let challenge = ctx.key_challenge.take();
    // Any other request first commits a pending batch, so what it sees (a listing, a
    // download, a rename) includes every file put before it.
    if ctx.batch.pending() && !matches!(req, Request::Put { .. } | Request::Commit) {
        batch::settle(ctx, conn).await?;
        batch::commit_pending(ctx).await;
    }
    // One session per connection, as in SSH: a second login would leave the first session's
    // token live but unreachable, and whose connection this is ambiguous. After Logout (or
    // once the session is revoked) the connection may log in again.
    if matches!(
        req,
        Request::Login { .. } | Request::Authenticate { .. } | Request::KeyLogin { .. }
    ) && session_alive(ctx)
        && let Some(auth) = &ctx.auth
    {
        return reply_error(
            conn,
            ErrorCode::BadRequest,
            format!(
                "already logged in as {}; send Logout first, or use another connection",
                auth.user
            ),
        )
        .await;
    }
    if let Access::Role(role) = need {
        // A refusal of a pipelined Put is answered after the Puts before it.
        if ctx.auth.is_none() {
            if !batch::before_refusal(ctx, conn, &req).await? {
                return Ok(Flow::Close);
            }
            return reply_error(conn, ErrorCode::NotAuthenticated, "not logged in").await;
        }
        // Re-check on every request: logout elsewhere, a password change or an account
        // deletion ends the session even on a connection that is already open.
        if !session_alive(ctx) {
            if !batch::before_refusal(ctx, conn, &req).await? {
                return Ok(Flow::Close);
            }
            return reply_error(
                conn,
                ErrorCode::SessionExpired,
                "session expired or revoked; log in again",
            )
            .await;
        }
        if ctx.session().role < role {
            if !batch::before_refusal(ctx, conn, &req).await? {
                return Ok(Flow::Close);
            }
            let auth = ctx.session();
            tracing::warn!(user = %auth.user, peer = %ctx.peer, needed = %role, "permission denied");
            let op = if role == Role::Superuser {
                "shutdown"
            } else {
                "request"
            };
            ctx.audit(op, None, Outcome::failed(ErrorCode::PermissionDenied));
            return reply_error(
                conn,
                ErrorCode::PermissionDenied,
                format!("permission denied: this needs the {role} role"),
            )
            .await;
        }
    }
    match req {
        Request::Hello { version, agent } => auth::hello(ctx, conn, version, &agent).await,
        Request::Login { user, password } => auth::login(ctx, conn, &user, &password).await,
        Request::Authenticate { token } => auth::authenticate(ctx, conn, &token).await,
        Request::Logout => auth::logout(ctx, conn).await,
        Request::WhoAmI => auth::whoami(ctx, conn).await,
        Request::Ping => {
            conn.write_frame(&Response::Ok).await?;
            Ok(Flow::Continue)
        }
        Request::List { path } => files::list(ctx, conn, path).await,
        Request::Delete { path } => files::delete(ctx, conn, path).await,
        Request::Rename { from, to } => files::rename(ctx, conn, from, to).await,
        Request::Mkdir { path } => files::mkdir(ctx, conn, path).await,
        Request::Upload { path, size, offset } => {
            transfer::upload(ctx, conn, path, size, offset).await
        }
        Request::Download { path, offset } => {
            transfer::download(ctx, conn, path, offset, None).await
        }
        Request::DownloadFrom {
            path,
            offset,
            prefix,
        } => transfer::download(ctx, conn, path, offset, Some(prefix)).await,
        Request::UploadEnd { .. } | Request::UploadFrom { .. } => {
            conn.write_frame(&Response::error(
                ErrorCode::BadRequest,
                "UploadEnd or UploadFrom without an upload in progress",
            ))
            .await?;
            Ok(Flow::Close)
        }
        Request::Shutdown { password } => shutdown::shutdown(ctx, conn, &password).await,
        Request::Put { path, size, digest } => batch::put(ctx, conn, path, size, digest).await,
        Request::Commit => batch::commit(ctx, conn).await,
        Request::KeyLogin { user, public_key } => {
            keys::key_login(ctx, conn, user, public_key).await
        }
        Request::KeyProof { signature } => keys::key_proof(ctx, conn, challenge, &signature).await,
    }
}

/// Whether the connection's session is still valid (not logged out elsewhere, expired, or
/// revoked by a password or role change or an account deletion); forgets it if not.
fn session_alive(ctx: &mut Ctx) -> bool {
    let alive = ctx
        .auth
        .as_ref()
        .is_some_and(|auth| session_valid(&ctx.state, &auth.token));
    if !alive {
        ctx.auth = None;
    }
    alive
}

/// Whether the session of `token` is still valid: one `stat` of the sessions journal (reading
/// only what other processes appended), one of the users file, and a hash of the token. Also
/// what a running transfer repeats to stop when its session ends.
pub(super) fn session_valid(state: &State, token: &str) -> bool {
    state
        .sessions
        .validate(token, |u| state.accounts.lookup(u).map(|(_, g)| g))
        .is_some()
}
