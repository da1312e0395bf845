//! List, delete, rename and mkdir: the requests that manage a user's tree without a body.

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::{MAX_ENTRIES_PER_FRAME, MAX_FRAME_LEN};
use xfer_proto::{Connection, Entry, Response};

use super::errors::wire;
use super::reply_error;
use super::{Ctx, Flow, Outcome};
use crate::storage::{StorageError, Tree};

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
    let (code, message) = wire(&e);
    ctx.audit(op, Some(path), Outcome::failed(code));
    reply_error(conn, code, message).await
}

pub(super) async fn list<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    // Entries come from storage in batches, in the order it finds them (the client sorts),
    // and are sent as each frame fills, so a folder of a million files costs the server a
    // couple of frames of memory, not the whole listing per connection.
    let mut listing = ctx.session().tree.list(&path);
    let mut frame = Vec::with_capacity(MAX_ENTRIES_PER_FRAME);
    // A frame is also sent early when its names grow long: a name that is not UTF-8 on
    // disk comes out up to three times its 255 bytes, and 128 of those would not fit in
    // one frame (the connection would close instead of listing).
    let mut bytes = 0;
    // One full frame is held back, so the last frame can say `done`.
    let mut held: Option<Vec<Entry>> = None;
    while let Some(item) = listing.next().await {
        let batch = match item {
            Ok(batch) => batch,
            // Before any frame, this is the whole answer; after some, it ends the listing.
            Err(e) => return report(ctx, conn, "list", &path, e).await,
        };
        for e in batch {
            bytes += e.name.len() + ENTRY_OVERHEAD;
            frame.push(e);
            if frame.len() < MAX_ENTRIES_PER_FRAME && bytes <= MAX_FRAME_LEN / 2 {
                continue;
            }
            bytes = 0;
            let full = std::mem::replace(&mut frame, Vec::with_capacity(MAX_ENTRIES_PER_FRAME));
            send_held(conn, &mut held, full).await?;
        }
    }
    if !frame.is_empty() {
        send_held(conn, &mut held, frame).await?;
    }
    conn.write_frame(&Response::Entries {
        entries: held.unwrap_or_default(),
        done: true,
    })
    .await?;
    ctx.audit("list", Some(&path), Outcome::ok());
    Ok(Flow::Continue)
}

/// Holds `frame` back and sends the one held before it, if any, as not the last.
async fn send_held<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    held: &mut Option<Vec<Entry>>,
    frame: Vec<Entry>,
) -> Result<(), ConnError> {
    if let Some(prev) = held.replace(frame) {
        conn.write_frame(&Response::Entries {
            entries: prev,
            done: false,
        })
        .await?;
    }
    Ok(())
}

/// A change to the tree that answers `Ok`: delete, rename and mkdir. `f` returns where a
/// rename put the entry (the audit's `to`), `None` for the others.
async fn change<S, F, Fut>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    op: &'static str,
    path: String,
    f: F,
) -> Result<Flow, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(Tree, String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, StorageError>>,
{
    let t = ctx.session().tree.clone();
    match f(t, path.clone()).await {
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
    let (state, user) = (ctx.state.clone(), ctx.session().user.clone());
    change(ctx, conn, "delete", path, |t, p| async move {
        // The count is loaded first (cheap once it is), so the delete updates it rather
        // than leaving it to a rescan.
        let counted = state.quotas.ensure(&user, &t).await.is_ok();
        let size = if counted {
            t.file_size(&p).await.ok().flatten()
        } else {
            None
        };
        t.delete(&p).await?;
        if let Some(size) = size {
            state.quotas.removed(&user, size);
        }
        Ok(None)
    })
    .await
}

pub(super) async fn rename<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    from: String,
    to: String,
) -> Result<Flow, ConnError> {
    let max_check = ctx.state.limits().max_rename_check_entries;
    let (state, user) = (ctx.state.clone(), ctx.session().user.clone());
    change(ctx, conn, "rename", from, |t, f| async move {
        // A file at the target is replaced: what the count loses. The target is `to`, or
        // `to/NAME` when `to` is a folder; both are looked at before, and the rename says
        // which it was.
        let counted = state.quotas.ensure(&user, &t).await.is_ok();
        let into = xfer_proto::path::join(
            &to,
            f.trim_end_matches('/').rsplit('/').next().unwrap_or(""),
        );
        let (at_to, at_into) = if counted {
            (
                t.file_size(&to).await.ok().flatten(),
                t.file_size(&into).await.ok().flatten(),
            )
        } else {
            (None, None)
        };
        let done = t.rename(&f, &to, max_check).await?;
        let same = |a: &str, b: &str| a.trim_matches('/') == b.trim_matches('/');
        let replaced = if same(&done, &f) {
            None
        } else if same(&done, &to) {
            at_to
        } else if same(&done, &into) {
            at_into
        } else {
            None
        };
        if let Some(size) = replaced {
            state.quotas.removed(&user, size);
        }
        Ok(Some(done))
    })
    .await
}

pub(super) async fn mkdir<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
) -> Result<Flow, ConnError> {
    change(ctx, conn, "mkdir", path, |t, p| async move {
        t.mkdir(&p).await.map(|()| None)
    })
    .await
}
