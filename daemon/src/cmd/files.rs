//! List, delete, rename and mkdir: the requests that manage a user's tree without a body.

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::MAX_ENTRIES_PER_FRAME;
use xfer_proto::{Connection, Response};

use super::{blocking, reply_error};
use crate::handler::{Ctx, Flow, Outcome};
use crate::storage::StorageError;

fn tree(ctx: &Ctx) -> crate::storage::UserTree {
    ctx.auth
        .as_ref()
        .expect("dispatcher checked the session")
        .tree
        .clone()
}

fn user(ctx: &Ctx) -> &str {
    &ctx.auth
        .as_ref()
        .expect("dispatcher checked the session")
        .user
}

async fn report<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    op: &'static str,
    path: &str,
    e: StorageError,
) -> Result<Flow, ConnError> {
    tracing::info!(user = %user(ctx), op, error = %e, "request failed");
    ctx.audit(op, Some(path), Outcome::failed(e.code()));
    reply_error(conn, e.code(), e.client_message()).await
}

pub(super) async fn list<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    let t = tree(ctx);
    let p = path.clone();
    let entries = match blocking(move || t.list(&p)).await {
        Ok(e) => e,
        Err(e) => return report(ctx, conn, "list", &path, e).await,
    };
    ctx.audit("list", Some(&path), Outcome::ok());
    let mut chunks = entries.chunks(MAX_ENTRIES_PER_FRAME).peekable();
    if chunks.peek().is_none() {
        conn.write_frame(&Response::Entries {
            entries: Vec::new(),
            done: true,
        })
        .await?;
    }
    while let Some(chunk) = chunks.next() {
        conn.write_frame(&Response::Entries {
            entries: chunk.to_vec(),
            done: chunks.peek().is_none(),
        })
        .await?;
    }
    Ok(Flow::Continue)
}

/// Runs a tree operation that answers `Ok` on success; `describe` turns its result into the
/// log line's detail.
async fn simple<S, T, F>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    op: &'static str,
    path: &str,
    f: F,
    describe: impl FnOnce(T) -> String,
) -> Result<Flow, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(crate::storage::UserTree) -> Result<T, StorageError> + Send + 'static,
{
    let t = tree(ctx);
    match blocking(move || f(t)).await {
        Ok(value) => {
            let target = describe(value);
            tracing::info!(user = %user(ctx), op, target = %target, "done");
            let to = (op == "rename").then_some(target.as_str());
            ctx.audit(
                op,
                Some(path),
                Outcome {
                    to,
                    ..Outcome::ok()
                },
            );
            conn.write_frame(&Response::Ok).await?;
            Ok(Flow::Continue)
        }
        Err(e) => report(ctx, conn, op, path, e).await,
    }
}

pub(super) async fn delete<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    let p = path.clone();
    simple(
        ctx,
        conn,
        "delete",
        &path.clone(),
        move |t| t.delete(&p),
        |()| path,
    )
    .await
}

pub(super) async fn rename<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    from: String,
    to: String,
) -> Result<Flow, ConnError> {
    let f = from.clone();
    simple(
        ctx,
        conn,
        "rename",
        &from,
        move |t| t.rename(&f, &to),
        |dest| dest,
    )
    .await
}

pub(super) async fn mkdir<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    let p = path.clone();
    simple(
        ctx,
        conn,
        "mkdir",
        &path.clone(),
        move |t| t.mkdir(&p),
        |()| path,
    )
    .await
}
