//! List, delete, rename and mkdir: the requests that manage a user's tree without a body.

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::{MAX_ENTRIES_PER_FRAME, MAX_FRAME_LEN};
use xfer_proto::{Connection, Entry, Response};

use super::{blocking, reply_error};
use crate::handler::{Ctx, Flow, Outcome};
use crate::storage::StorageError;

/// Most bytes an `Entry` takes in a frame besides its name (the name's length varint, kind,
/// size and time varints), rounded up.
const ENTRY_OVERHEAD: usize = 32;

async fn report<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    op: &'static str,
    path: &str,
    e: StorageError,
) -> Result<Flow, ConnError> {
    tracing::info!(user = %ctx.session().user, op, error = %e, "request failed");
    ctx.audit(op, Some(path), Outcome::failed(e.code()));
    reply_error(conn, e.code(), e.client_message()).await
}

pub(super) async fn list<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    // Entries are read on a blocking thread and sent as each frame fills, in directory
    // order (the client sorts), so a folder of a million files costs the server a couple of
    // frames of memory, not the whole listing per connection.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<Entry>, StorageError>>(2);
    let t = ctx.session().tree.clone();
    let p = path.clone();
    let walker = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(MAX_ENTRIES_PER_FRAME);
        // A frame is also sent early when its names grow long: a name that is not UTF-8 on
        // disk comes out up to three times its 255 bytes, and 128 of those would not fit in
        // one frame (the connection would close instead of listing).
        let mut bytes = 0;
        let walked = t.list_each(&p, |e| {
            bytes += e.name.len() + ENTRY_OVERHEAD;
            batch.push(e);
            if batch.len() < MAX_ENTRIES_PER_FRAME && bytes <= MAX_FRAME_LEN / 2 {
                return true;
            }
            bytes = 0;
            tx.blocking_send(Ok(std::mem::take(&mut batch))).is_ok()
        });
        let _ = match walked {
            Ok(()) if batch.is_empty() => Ok(()),
            Ok(()) => tx.blocking_send(Ok(batch)),
            Err(e) => tx.blocking_send(Err(e)),
        };
    });
    // One batch is held back, so the last frame can say `done`.
    let mut held: Option<Vec<Entry>> = None;
    while let Some(item) = rx.recv().await {
        match item {
            Ok(batch) => {
                if let Some(prev) = held.replace(batch) {
                    conn.write_frame(&Response::Entries {
                        entries: prev,
                        done: false,
                    })
                    .await?;
                }
            }
            // Before any frame, this is the whole answer; after some, it ends the listing.
            Err(e) => return report(ctx, conn, "list", &path, e).await,
        }
    }
    let _ = walker.await;
    conn.write_frame(&Response::Entries {
        entries: held.unwrap_or_default(),
        done: true,
    })
    .await?;
    ctx.audit("list", Some(&path), Outcome::ok());
    Ok(Flow::Continue)
}

/// A change to the tree that answers `Ok`: delete, rename and mkdir. `f` returns where a
/// rename put the entry (the audit's `to`), `None` for the others.
async fn change<S, F>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    op: &'static str,
    path: String,
    f: F,
) -> Result<Flow, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&crate::storage::local::UserTree, &str) -> Result<Option<String>, StorageError>
        + Send
        + 'static,
{
    let t = ctx.session().tree.clone();
    let p = path.clone();
    match blocking(move || f(&t, &p)).await {
        Ok(to) => {
            tracing::info!(user = %ctx.session().user, op, path = %path, to = to.as_deref().unwrap_or(""), "done");
            ctx.audit(
                op,
                Some(&path),
                Outcome {
                    to: to.as_deref(),
                    ..Outcome::ok()
                },
            );
            conn.write_frame(&Response::Ok).await?;
            Ok(Flow::Continue)
        }
        Err(e) => report(ctx, conn, op, &path, e).await,
    }
}

pub(super) async fn delete<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    change(ctx, conn, "delete", path, |t, p| t.delete(p).map(|()| None)).await
}

pub(super) async fn rename<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    from: String,
    to: String,
) -> Result<Flow, ConnError> {
    let max_check = ctx.state.limits().max_rename_check_entries;
    change(ctx, conn, "rename", from, move |t, f| {
        t.rename(f, &to, max_check).map(Some)
    })
    .await
}

pub(super) async fn mkdir<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    change(ctx, conn, "mkdir", path, |t, p| t.mkdir(p).map(|()| None)).await
}
