//! `Account`: who this session is, and how much of the account's quota is used; and the
//! quota check the upload commands share (before a body, and while one runs).

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::message::SessionInfo;
use xfer_proto::{Connection, ErrorCode, Response};

use super::errors::wire;
use super::transfer::recheck;
use super::{Ctx, Flow, reply_error};
use crate::quota::{Ask, Refusal, Reservation};
use crate::state::State;
use crate::storage::{StorageError, Tree};

pub(super) async fn account<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
    let auth = ctx.session();
    let (user, tree) = (auth.user.clone(), auth.tree.clone());
    let session = SessionInfo {
        user: user.clone(),
        role: auth.role,
        expires: auth.expires,
    };
    if let Err(e) = ctx.state.quotas.ensure(&user, &tree).await {
        tracing::warn!(user = %user, error = %e, "cannot count the user's files");
        let (code, message) = wire(&e);
        return reply_error(conn, code, message).await;
    }
    let resting = resting_partials(&ctx.state, &user).await;
    let used = ctx.state.quotas.used(&user, resting);
    let quota = ctx.state.quota_of(&user);
    conn.write_frame(&Response::Account {
        session,
        used_bytes: used.bytes,
        used_files: used.files,
        quota_bytes: quota.bytes,
        quota_files: quota.files,
    })
    .await?;
    Ok(Flow::Continue)
}

/// What `user`'s kept partial uploads hold; 0 (logged) if they cannot be counted, so that a
/// damaged partial folder does not stop every upload.
async fn resting_partials(state: &State, user: &str) -> u64 {
    match state.storage.resting_partial_usage(user).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "cannot count the user's partial uploads");
            0
        }
    }
}

/// Reserves room for an upload of `size` bytes to `path` in `user`'s quota: first as a new
/// file, and if that does not fit, net of the file it would replace (one look at the target,
/// only when near the quota). `Ok(Err(..))` is a refusal to answer with
/// [`ErrorCode::QuotaExceeded`]; `Err` a storage failure.
pub(super) async fn reserve(
    state: &std::sync::Arc<State>,
    user: &str,
    tree: &Tree,
    path: &str,
    size: u64,
) -> Result<Result<Reservation, Refusal>, StorageError> {
    state.quotas.ensure(user, tree).await?;
    let quota = state.quota_of(user);
    let resting = if quota.bytes.is_some() {
        resting_partials(state, user).await
    } else {
        0
    };
    let first = state.quotas.reserve(
        user,
        quota,
        Ask {
            size,
            replaces: None,
        },
        resting,
    );
    let Err(refusal) = first else {
        return Ok(first);
    };
    match tree.file_size(path).await {
        Ok(Some(old)) => Ok(state.quotas.reserve(
            user,
            quota,
            Ask {
                size,
                replaces: Some(old),
            },
            resting,
        )),
        // Nothing replaced (or the path is refused: the upload's own checks say why).
        _ => Ok(Err(refusal)),
    }
}

/// The message of a refusal before an upload of `path`.
pub(super) fn refused(path: &str, why: &Refusal) -> (ErrorCode, String) {
    (
        ErrorCode::QuotaExceeded,
        format!("{why}; `{path}` was not saved"),
    )
}

/// Completes once `user` is over their quota as it is now set, in a way the upload holding
/// `held` adds to (re-checked every [`super::transfer::SESSION_RECHECK`]), with what is used of what: a
/// running upload stops then.
pub(super) async fn quota_passed(state: &State, user: &str, held: &Reservation) -> Refusal {
    recheck(|| state.quotas.over(user, state.quota_of(user), held)).await
}
