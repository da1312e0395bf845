//! The shutdown request: the dispatcher has already checked the superuser role; this checks the
//! password again (penalised on failure like a login), then starts the daemon's one shutdown
//! path.

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, ErrorCode, Response, Role};

use super::{Ctx, Flow, Outcome};
use crate::accounts::VerifyOutcome;

pub(super) async fn shutdown<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    password: &str,
) -> Result<Flow, ConnError> {
    let user = ctx.session().user.clone();
    // The password is checked again, so it is guessed against like a login and limited alike:
    // without this a stolen superuser token would allow unlimited guesses, a few per
    // connection.
    if let Some(flow) = super::auth::refuse_if_penalised(ctx, conn, "shutdown", &user).await? {
        return Ok(flow);
    }
    let state = ctx.state.clone();
    match state.accounts.verify(&user, password).await {
        VerifyOutcome::Ok { role, .. } if role >= Role::Superuser => {
            tracing::info!(user = %user, peer = %ctx.peer, "shutdown requested by superuser");
            ctx.audit("shutdown", None, Outcome::ok());
            conn.write_frame(&Response::Ok).await?;
            state.shutdown_handle().trigger("shutdown request");
            Ok(Flow::Close)
        }
        VerifyOutcome::Ok { .. } => {
            super::reply_error(
                conn,
                ErrorCode::PermissionDenied,
                "permission denied: shutdown needs the superuser role",
            )
            .await
        }
        VerifyOutcome::Busy => {
            super::reply_error(
                conn,
                ErrorCode::Busy,
                "the server is busy; try again in a moment",
            )
            .await
        }
        VerifyOutcome::Denied => {
            tracing::warn!(user = %user, peer = %ctx.peer, "shutdown refused: wrong password");
            ctx.audit("shutdown", None, Outcome::failed(ErrorCode::AuthFailed));
            super::auth::failed(
                ctx,
                conn,
                ErrorCode::AuthFailed,
                "wrong password; the server keeps running",
            )
            .await
        }
    }
}
