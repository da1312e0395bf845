//! Batched uploads of small files (protocol 3): `Put` stages one verified file of this
//! connection's batch, `Commit` makes the whole batch durable and visible with one sync.
//!
//! Why: a file through `Upload` costs a round trip and two fsyncs (its data, its folder), so
//! a tree of 1,000 small files took 2,000 syncs. A `Put` needs no answer before its body
//! (the client pipelines them) and is only written to an invisible staged file; the commit
//! syncs the filesystem once, renames every file into place, and syncs once more. What one
//! connection may stage is bounded by `limits.max_batch_files` and `limits.max_batch_bytes`:
//! reaching either commits the batch at once.
//!
//! The filesystem work of a `Put` (folders, the staged file, its write) runs on the blocking
//! pool while the connection goes on reading and verifying the next `Put`s: up to
//! [`MAX_STAGING`] per connection at once. Answers still leave in request order, and are
//! flushed whenever no more input is waiting (a client waiting for them sends nothing).

use std::collections::VecDeque;

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::MAX_PUT_LEN;
use xfer_proto::{Connection, Digest, ErrorCode, Response};

use super::errors::wire;
use super::transfer::session_ended;
use super::{Ctx, Flow, Outcome};
use super::{reply_error, session_valid};
use crate::quota::Reservation;
use crate::storage::{StageCache, StageTask, Staged, StorageError, Tree};

/// Most `Put`s of one connection being staged at once (received, not yet answered).
pub const MAX_STAGING: usize = 16;

/// Most body bytes of one connection held in memory while their `Put`s are staged: with
/// [`MAX_STAGING`], what bounds a connection's memory (1 MiB bodies would otherwise hold 16).
pub const MAX_STAGING_BYTES: u64 = 2 * MAX_PUT_LEN;

/// One connection's batch: files staged by `Put` and not yet committed, and what the next
/// `Committed` must report. Dropping it (the connection closed without `Commit`) deletes
/// every staged file (those still being staged are deleted as their staging ends).
#[derive(Default)]
pub struct Batch {
    /// Whose files these are: the session that put them and its tree. A commit checks this
    /// session, never the connection's current one, so files staged under a session that
    /// ended are never committed into whatever account logs in next on the connection.
    owner: Option<Owner>,
    /// `Put`s received and verified whose staging runs, in request order (not yet answered).
    staging: VecDeque<Staging>,
    /// Body bytes those hold.
    staging_bytes: u64,
    /// Staged files in the order they were put (committed in that order).
    staged: Vec<StagedFileInfo>,
    /// Bytes staged.
    bytes: u64,
    /// Files made visible since the last `Committed` answer.
    committed: u64,
    /// Files that failed at a commit since the last answer.
    failed: u64,
    /// The first failure at a commit since the last answer: reported by the next `Commit`.
    first_failure: Option<(ErrorCode, String)>,
    /// What storage keeps between this connection's stagings (the local backend: folders
    /// created or found, open, so each is resolved once), for one session only.
    cache: StageCache,
    /// The session token `cache` was filled under: another session (another user, perhaps)
    /// starts with none.
    cache_token: String,
}

/// The session a batch was staged under.
struct Owner {
    /// Account name, for logs.
    user: String,
    /// The session token, re-checked before the commit.
    token: String,
    /// The tree the files go into.
    tree: Tree,
}

/// A `Put` whose staging runs.
struct Staging {
    /// The remote path, for the answer and the audit trail.
    path: String,
    /// Its size.
    size: u64,
    /// Its verified BLAKE3.
    digest: Digest,
    /// The staging under way.
    task: StageTask,
    /// Its room in the user's quota, until its commit.
    reservation: Reservation,
}

/// A staged file and what its audit line needs.
struct StagedFileInfo {
    /// The staged data.
    file: Staged,
    /// Its size.
    size: u64,
    /// Its verified BLAKE3.
    digest: Digest,
    /// Its room in the user's quota, until its commit.
    reservation: Reservation,
}

impl Batch {
    /// Whether `Put`s are being staged or files wait for a commit.
    pub fn pending(&self) -> bool {
        !self.staged.is_empty() || !self.staging.is_empty()
    }

    /// Deletes everything this batch staged, waiting for the stagings still running, so
    /// that a connection that ends without `Commit` leaves nothing behind by the time it
    /// is closed (dropping the batch would delete those only when their staging ends, after
    /// the connection is gone, and a daemon that exits meanwhile would leave them for the
    /// next start's sweep). Waits at most `limit` for each (a hung disk must not hold the
    /// connection's task forever; a staging abandoned then still deletes its file when it
    /// ends).
    pub async fn discard(&mut self, limit: std::time::Duration) {
        for staging in std::mem::take(&mut self.staging) {
            // The staged file, if any, is deleted when the result is dropped here.
            let _ = tokio::time::timeout(limit, staging.task).await;
        }
        self.staging_bytes = 0;
        self.staged.clear();
        self.bytes = 0;
    }
}

/// Handles `Put`: reads the body (always, so the connection stays in step whatever the
/// answer), verifies it, and starts staging it; answers the `Put`s whose staging has ended,
/// in order, and commits the batch when it reached a limit.
pub(super) async fn put<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
    size: u64,
    digest: Digest,
) -> Result<Flow, ConnError> {
    if size > MAX_PUT_LEN {
        // The body cannot be skipped without reading up to 16 EiB: a protocol error.
        settle(ctx, conn).await?;
        conn.write_frame(&Response::error(
            ErrorCode::BadRequest,
            format!(
                "Put carries at most {MAX_PUT_LEN} bytes; use Upload for `{path}` ({size} bytes)"
            ),
        ))
        .await?;
        return Ok(Flow::Close);
    }
    let limits = ctx.state.limits();
    let auth = ctx.session();
    let (user, token, tree) = (auth.user.clone(), auth.token.clone(), auth.tree.clone());
    let max = limits.max_upload_bytes;
    let mut refusal = None;
    if let Err(source) = xfer_proto::path::named_components(&path) {
        let e = StorageError::BadPath {
            path: path.clone(),
            source,
        };
        refusal = Some(wire(&e));
    } else if max > 0 && size > max {
        refusal = Some(wire(&StorageError::TooLarge(max)));
    }
    // The body counts as one of the user's transfers while it is read.
    let slot = match refusal {
        Some(_) => None,
        None => {
            let slot = ctx
                .state
                .usage
                .try_transfer(&user, limits.max_transfers_per_user);
            if slot.is_none() {
                refusal = Some((
                    ErrorCode::Busy,
                    format!(
                        "too many transfers in progress for {user} ({}); wait for some to finish, then try again",
                        limits.max_transfers_per_user
                    ),
                ));
            }
            slot
        }
    };
    conn.set_min_body_rate(limits.min_transfer_rate);
    let mut buf = vec![0; size as usize];
    let received = tokio::select! {
        r = conn.recv_small_body(&mut buf) => r,
        _ = session_ended(&ctx.state, &token), if slot.is_some() => {
            tracing::info!(user = %user, path = %path, "session ended during a Put body; stopped");
            ctx.audit("upload", Some(&path), Outcome::failed(ErrorCode::SessionExpired));
            ctx.auth = None;
            settle(ctx, conn).await?;
            conn.write_frame(&Response::error(
                ErrorCode::SessionExpired,
                format!("session expired or revoked during the upload of `{path}`; nothing was saved; log in again"),
            ))
            .await?;
            return Ok(Flow::Close);
        }
    };
    drop(slot);
    if let Err(e) = received {
        tracing::info!(user = %user, path = %path, error = %e, "Put body interrupted; nothing staged");
        ctx.audit(
            "upload",
            Some(&path),
            Outcome::failed(ErrorCode::BadRequest),
        );
        return Err(e);
    }
    let mut refusal = refusal.or_else(|| {
        (*blake3::hash(&buf).as_bytes() != digest).then(|| {
            (
                ErrorCode::VerificationFailed,
                format!("`{path}` arrived corrupted (digest mismatch); nothing was saved"),
            )
        })
    });
    // Room in the quota, as for any upload (see `account::reserve`).
    let mut reservation = None;
    if refusal.is_none() {
        match super::account::reserve(&ctx.state, &user, &tree, &path, size).await {
            Ok(Ok(r)) => reservation = Some(r),
            Ok(Err(why)) => refusal = Some(super::account::refused(&path, &why)),
            Err(e) => {
                tracing::warn!(user = %user, path = %path, error = %e, "cannot count the user's files for their quota");
                refusal = Some(wire(&e));
            }
        }
    }
    let (Some(reservation), None) = (reservation, &refusal) else {
        let (code, message) = refusal.unwrap_or((ErrorCode::Internal, String::new()));
        tracing::info!(user = %user, path = %path, %message, "Put refused");
        ctx.audit("upload", Some(&path), Outcome::failed(code));
        // Its answer comes after those of the Puts before it.
        settle(ctx, conn).await?;
        conn.queue_frame(&Response::error(code, message)).await?;
        return finish(ctx, conn).await;
    };
    if ctx.batch.owner.as_ref().is_some_and(|o| o.token != token) {
        // Staged under an earlier session of this connection: settled first, on its own.
        settle(ctx, conn).await?;
        commit_pending(ctx).await;
    }
    let batch = &mut ctx.batch;
    if batch.owner.is_none() {
        batch.owner = Some(Owner {
            user,
            token: token.clone(),
            tree: tree.clone(),
        });
    }
    if batch.cache_token != token {
        batch.cache = Default::default();
        batch.cache_token = token;
    }
    let task = tree.stage(&path, buf, &batch.cache);
    batch.staging_bytes += size;
    batch.staging.push_back(Staging {
        path,
        size,
        digest,
        task,
        reservation,
    });
    // Answer what is done, in order, without waiting; wait only for the oldest when too many
    // are under way.
    while ctx
        .batch
        .staging
        .front()
        .is_some_and(|s| s.task.is_finished())
        || ctx.batch.staging.len() > MAX_STAGING
        || ctx.batch.staging_bytes > MAX_STAGING_BYTES
    {
        answer_oldest(ctx, conn).await?;
    }
    finish(ctx, conn).await
}

/// Before the dispatcher refuses `req`: answers the `Put`s under way first, and if `req` is a
/// `Put`, reads its body so the connection stays in step. Returns false when the body
/// cannot be read (too large to skip: answered here, and the caller closes).
pub(super) async fn before_refusal<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    req: &xfer_proto::Request,
) -> Result<bool, ConnError> {
    settle(ctx, conn).await?;
    if let xfer_proto::Request::Put { size, .. } = req {
        if *size > MAX_PUT_LEN {
            conn.write_frame(&Response::error(
                ErrorCode::BadRequest,
                format!("Put carries at most {MAX_PUT_LEN} bytes"),
            ))
            .await?;
            return Ok(false);
        }
        conn.set_min_body_rate(ctx.state.limits().min_transfer_rate);
        conn.recv_small_body(&mut vec![0; *size as usize]).await?;
    }
    Ok(true)
}

/// Ends a `Put`: if the client has sent nothing more, it may be waiting for the answers, so
/// every `Put` under way is answered and the answers flushed; else they wait for the next
/// requests. Commits the batch when it reached a limit.
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
    if !conn.input_ready() {
        settle(ctx, conn).await?;
        conn.flush().await?;
    }
    let limits = ctx.state.limits();
    let batch = &ctx.batch;
    if batch.staged.len() >= limits.max_batch_files || batch.bytes >= limits.max_batch_bytes {
        commit_pending(ctx).await;
    }
    Ok(Flow::Continue)
}

/// Answers every `Put` still being staged, in order (queued, not flushed: the caller's next
/// frame or flush sends them).
pub(super) async fn settle<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<(), ConnError> {
    while !ctx.batch.staging.is_empty() {
        answer_oldest(ctx, conn).await?;
    }
    Ok(())
}

/// Waits for the oldest staging, records its outcome, and queues its answer.
async fn answer_oldest<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<(), ConnError> {
    let Some(Staging {
        path,
        size,
        digest,
        task,
        reservation,
    }) = ctx.batch.staging.pop_front()
    else {
        return Ok(());
    };
    ctx.batch.staging_bytes -= size;
    match task.await {
        Ok(file) => {
            let batch = &mut ctx.batch;
            batch.staged.push(StagedFileInfo {
                file,
                size,
                digest,
                reservation,
            });
            batch.bytes += size;
            conn.queue_frame(&Response::UploadDone { size, digest })
                .await
        }
        Err(e) => {
            tracing::info!(path = %path, error = %e, "Put refused");
            let (code, message) = wire(&e);
            ctx.audit("upload", Some(&path), Outcome::failed(code));
            conn.queue_frame(&Response::error(code, message)).await
        }
    }
}

/// Handles `Commit`: answers the `Put`s under way, commits what is staged, then answers
/// `Committed` with every file made visible since the last answer, or the first failure
/// since then.
pub(super) async fn commit<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
    settle(ctx, conn).await?;
    commit_pending(ctx).await;
    let batch = &mut ctx.batch;
    let files = std::mem::take(&mut batch.committed);
    let failed = std::mem::take(&mut batch.failed);
    match batch.first_failure.take() {
        None => {
            conn.write_frame(&Response::Committed { files }).await?;
            Ok(Flow::Continue)
        }
        Some((code, message)) => reply_error(
            conn,
            code,
            format!(
                "{failed} file(s) of the batch were not saved ({files} were); the first: {message}"
            ),
        )
        .await,
    }
}

/// Commits the staged files now (at `Commit`, at a batch limit, or before another request):
/// each becomes visible, or counts as failed for the next `Commit` answer. Nothing is
/// committed once the session that staged them has ended. `Put`s still being staged are
/// left for the next commit.
pub(super) async fn commit_pending(ctx: &mut Ctx) {
    let staged = std::mem::take(&mut ctx.batch.staged);
    ctx.batch.bytes = 0;
    let owner = if ctx.batch.staging.is_empty() {
        ctx.batch.owner.take()
    } else {
        ctx.batch.owner.as_ref().map(|o| Owner {
            user: o.user.clone(),
            token: o.token.clone(),
            tree: o.tree.clone(),
        })
    };
    let Some(Owner { user, token, tree }) = owner else {
        return;
    };
    if staged.is_empty() {
        return;
    }
    if !session_valid(&ctx.state, &token) {
        fail_all(
            ctx,
            staged,
            ErrorCode::SessionExpired,
            "the session ended before the commit; log in again",
        );
        if ctx.auth.as_ref().is_some_and(|a| a.token == token) {
            ctx.auth = None;
        }
        return;
    }
    let started = std::time::Instant::now();
    // What each commit replaces, for the quota's count: looked at just before it.
    let replaced = tree
        .file_sizes(staged.iter().map(|s| s.file.remote().to_string()).collect())
        .await;
    let (infos, files): (Vec<_>, Vec<_>) = staged
        .into_iter()
        .zip(replaced)
        .map(|(s, replaced)| ((s.size, s.digest, s.reservation, replaced), s.file))
        .unzip();
    let results = match tree.commit_batch(files).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(user = %user, error = %e, "batch commit failed");
            // The staged files were dropped with the task: nothing became visible.
            record_failure(
                ctx,
                infos.len() as u64,
                ErrorCode::Internal,
                "committing the batch failed on the server".into(),
            );
            return;
        }
    };
    let (mut ok, mut bytes) = (0u64, 0u64);
    let mut counted = Vec::with_capacity(infos.len());
    for ((file, result), (size, digest, reservation, replaced)) in results.into_iter().zip(infos) {
        match result {
            Ok(()) => {
                ok += 1;
                bytes += size;
                counted.push((reservation, size, replaced));
                ctx.audit(
                    "upload",
                    Some(file.remote()),
                    Outcome {
                        bytes: Some(size),
                        digest: Some(&digest),
                        ..Outcome::ok()
                    },
                );
            }
            Err(e) => {
                tracing::warn!(user = %user, path = %file.remote(), error = %e, "batched upload commit failed");
                let (code, message) = wire(&e);
                ctx.audit("upload", Some(file.remote()), Outcome::failed(code));
                record_failure(ctx, 1, code, message);
            }
        }
    }
    ctx.state.quotas.commit_all(counted);
    ctx.batch.committed += ok;
    tracing::info!(
        user = %user,
        files = ok,
        bytes,
        secs = format_args!("{:.3}", started.elapsed().as_secs_f64()),
        "batch committed"
    );
}

fn fail_all(ctx: &mut Ctx, staged: Vec<StagedFileInfo>, code: ErrorCode, message: &str) {
    for s in &staged {
        ctx.audit("upload", Some(s.file.remote()), Outcome::failed(code));
    }
    record_failure(ctx, staged.len() as u64, code, message.into());
}

fn record_failure(ctx: &mut Ctx, n: u64, code: ErrorCode, message: String) {
    ctx.batch.failed += n;
    ctx.batch.first_failure.get_or_insert((code, message));
}
