//! Request dispatch: the one place that checks a request is allowed in this state, for this
//! role and within this session's token scope, then hands it to the module that implements it.

mod account;
mod auth;
pub mod batch;
mod context;
mod errors;
mod files;
mod keys;
mod shutdown;
mod tokens;
mod transfer;

pub use context::{Auth, Ctx, Flow, Outcome};

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, ErrorCode, Request, Response, Role};

use crate::sessions::TokenScope;
use crate::state::State;

/// What a request needs before it may run.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Need {
    /// Allowed as the very first frame.
    Hello,
    /// Needs a completed hello.
    Greeted,
    /// Needs an authenticated session with at least this role.
    Role(Role),
}

/// What the one check weighs for a request: its state and role, and what a token's scope is
/// held against.
#[derive(Debug)]
struct Access<'a> {
    /// State and role.
    need: Need,
    /// It changes files or stops the daemon: refused to a read-only token.
    writes: bool,
    /// Every remote path it names: each must be inside a path-scoped token's folder.
    paths: [Option<&'a str>; 2],
    /// It creates, lists or revokes tokens: only a password or key login may.
    manages_tokens: bool,
}

impl<'a> Access<'a> {
    fn new(need: Need) -> Self {
        Access {
            need,
            writes: false,
            paths: [None, None],
            manages_tokens: false,
        }
    }
    fn reads(path: &'a str) -> Self {
        Access {
            paths: [Some(path), None],
            ..Access::new(Need::Role(Role::Reader))
        }
    }
    fn writes(paths: [Option<&'a str>; 2]) -> Self {
        Access {
            writes: true,
            paths,
            ..Access::new(Need::Role(Role::User))
        }
    }
}

fn access(req: &Request) -> Access<'_> {
    match req {
        Request::Hello { .. } => Access::new(Need::Hello),
        Request::Login { .. } | Request::Authenticate { .. } | Request::Ping => {
            Access::new(Need::Greeted)
        }
        Request::KeyLogin { .. } | Request::KeyProof { .. } => Access::new(Need::Greeted),
        Request::Shutdown { .. } => Access {
            writes: true,
            ..Access::new(Need::Role(Role::Superuser))
        },
        Request::Logout | Request::WhoAmI | Request::Account => {
            Access::new(Need::Role(Role::Reader))
        }
        Request::List { path }
        | Request::Download { path, .. }
        | Request::DownloadFrom { path, .. } => Access::reads(path),
        Request::Upload { path, .. }
        | Request::Delete { path }
        | Request::Mkdir { path }
        | Request::Put { path, .. } => Access::writes([Some(path), None]),
        Request::Rename { from, to } => Access::writes([Some(from), Some(to)]),
        Request::UploadEnd { .. } | Request::UploadFrom { .. } | Request::Commit => {
            Access::writes([None, None])
        }
        // A reader's tokens can do no more than the reader: the role is checked on each use.
        Request::TokenCreate { .. } | Request::TokenList | Request::TokenRevoke { .. } => Access {
            manages_tokens: true,
            ..Access::new(Need::Role(Role::Reader))
        },
    }
}

/// Why a token session may not make this request, if it may not. Paths are compared by the
/// components the protocol's path rules give (the ones storage resolves), so `a//b/`, `a/b`
/// and `a/b/` are one folder, and a path those rules refuse is outside every scope.
fn scope_refusal(scope: &TokenScope, access: &Access<'_>) -> Option<String> {
    if access.manages_tokens {
        return Some(
            "permission denied: a token cannot create, list or revoke tokens; log in with `xfer login` to manage them".into(),
        );
    }
    if scope.read_only && access.writes {
        return Some("permission denied: this token is read-only".into());
    }
    if scope.path.is_empty() {
        return None;
    }
    let dir = xfer_proto::path::components(&scope.path).unwrap_or_default();
    let inside = |p: &str| {
        xfer_proto::path::components(p)
            .is_ok_and(|parts| !dir.is_empty() && parts.starts_with(&dir))
    };
    if access.paths.iter().flatten().all(|p| inside(p)) {
        return None;
    }
    Some(format!(
        "permission denied: this token is limited to `{}`",
        scope.path
    ))
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
    let access = access(&req);
    if access.need != Need::Hello && !ctx.greeted {
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
    if ctx.version < 3
        && matches!(
            req,
            Request::Put { .. }
                | Request::Commit
                | Request::Account
                | Request::TokenCreate { .. }
                | Request::TokenList
                | Request::TokenRevoke { .. }
        )
    {
        conn.write_frame(&Response::error(
            ErrorCode::BadRequest,
            format!(
                "Put, Commit, Account and the token requests need protocol version 3; this connection speaks version {}",
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
    if let Need::Role(role) = access.need {
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
            let op = match &req {
                Request::Shutdown { .. } => "shutdown",
                Request::Upload { .. } | Request::Put { .. } | Request::Commit => "upload",
                Request::Delete { .. } => "delete",
                Request::Rename { .. } => "rename",
                Request::Mkdir { .. } => "mkdir",
                _ => "request",
            };
            ctx.audit(op, None, Outcome::failed(ErrorCode::PermissionDenied));
            return reply_error(
                conn,
                ErrorCode::PermissionDenied,
                format!("permission denied: this needs the {role} role"),
            )
            .await;
        }
        if let Some(why) = ctx
            .session()
            .scope
            .as_ref()
            .and_then(|scope| scope_refusal(scope, &access))
        {
            if !batch::before_refusal(ctx, conn, &req).await? {
                return Ok(Flow::Close);
            }
            let auth = ctx.session();
            tracing::warn!(user = %auth.user, peer = %ctx.peer, reason = %why, "refused by the token's scope");
            ctx.audit(
                "token_scope",
                access.paths[0],
                Outcome {
                    to: access.paths[1],
                    ..Outcome::failed(ErrorCode::PermissionDenied)
                },
            );
            return reply_error(conn, ErrorCode::PermissionDenied, why).await;
        }
    }
    match req {
        Request::Hello { version, agent } => auth::hello(ctx, conn, version, &agent).await,
        Request::Login { user, password } => auth::login(ctx, conn, &user, &password).await,
        Request::Authenticate { token } => auth::authenticate(ctx, conn, &token).await,
        Request::Logout => auth::logout(ctx, conn).await,
        Request::WhoAmI => auth::whoami(ctx, conn).await,
        Request::Account => account::account(ctx, conn).await,
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
        Request::TokenCreate {
            name,
            expires_secs,
            read_only,
            path,
        } => tokens::create(ctx, conn, &name, expires_secs, read_only, &path).await,
        Request::TokenList => tokens::list(ctx, conn).await,
        Request::TokenRevoke { id } => tokens::revoke(ctx, conn, &id).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(read_only: bool, path: &str) -> TokenScope {
        TokenScope {
            name: String::new(),
            read_only,
            path: path.into(),
        }
    }

    fn refused(s: &TokenScope, req: &Request) -> bool {
        scope_refusal(s, &access(req)).is_some()
    }

    #[test]
    fn a_read_only_token_may_read_but_never_write() {
        let ro = scope(true, "");
        let p = || "a/b".to_string();
        for req in [
            Request::List { path: p() },
            Request::List { path: "".into() },
            Request::Download {
                path: p(),
                offset: 0,
            },
            Request::WhoAmI,
            Request::Logout,
        ] {
            assert!(!refused(&ro, &req), "{req:?}");
        }
        for req in [
            Request::Upload {
                path: p(),
                size: 1,
                offset: 0,
            },
            Request::UploadFrom { offset: 0 },
            Request::UploadEnd { digest: [0; 32] },
            Request::Put {
                path: p(),
                size: 1,
                digest: [0; 32],
            },
            Request::Commit,
            Request::Delete { path: p() },
            Request::Rename { from: p(), to: p() },
            Request::Mkdir { path: p() },
            Request::Shutdown {
                password: String::new(),
            },
        ] {
            assert!(refused(&ro, &req), "{req:?}");
        }
    }

    #[test]
    fn a_path_scoped_token_names_only_its_folder_and_below() {
        let s = scope(false, "backups/host1");
        let list = |path: &str| Request::List { path: path.into() };
        for ok in [
            "backups/host1",
            "backups/host1/",
            "backups//host1",
            "backups/host1/2026/x.tar",
        ] {
            assert!(!refused(&s, &list(ok)), "{ok}");
        }
        for bad in [
            "",
            "backups",
            "backups/host10",
            "backups/host",
            "other",
            "backups/host1/../host2",
            "backups/host1/..",
            "backups/host1/./x",
            "/backups/host1",
            "backups/host1\\..\\x",
            "Backups/host1",
        ] {
            assert!(refused(&s, &list(bad)), "{bad:?}");
        }
        // Both paths of a rename.
        let rename = |from: &str, to: &str| Request::Rename {
            from: from.into(),
            to: to.into(),
        };
        assert!(!refused(&s, &rename("backups/host1/a", "backups/host1/b")));
        assert!(refused(&s, &rename("backups/host1/a", "elsewhere/a")));
        assert!(refused(&s, &rename("elsewhere/a", "backups/host1/a")));
        assert!(!refused(&s, &Request::WhoAmI));
    }

    #[test]
    fn a_token_never_manages_tokens_and_a_login_does() {
        for req in [
            Request::TokenCreate {
                name: String::new(),
                expires_secs: 0,
                read_only: false,
                path: String::new(),
            },
            Request::TokenList,
            Request::TokenRevoke {
                id: "abcdef".into(),
            },
        ] {
            assert!(refused(&scope(false, ""), &req), "{req:?}");
            assert!(access(&req).manages_tokens);
            assert_eq!(access(&req).need, Need::Role(Role::Reader));
        }
    }
}
