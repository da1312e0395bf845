//! Batched uploads of small files (protocol 3): `Put` stages one verified file of this
//! connection's batch, `Commit` makes the whole batch durable and visible with one sync.
//!
//! Why: a file through `Upload` costs a round trip and two fsyncs (its data, its folder), so
//! a tree of 1,000 small files took 2,000 journal commits. A `Put` needs no answer before its
//! body (the client pipelines them) and is only written to an invisible temp file; the commit
//! syncs the filesystem once, renames every file into place, and syncs once more. What one
//! connection may stage is bounded by `limits.max_batch_files` and `limits.max_batch_bytes`:
//! reaching either commits the batch at once.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::limits::MAX_PUT_LEN;
use xfer_proto::{Connection, Digest, ErrorCode, Response};

use super::transfer::session_ended;
use super::{blocking, reply_error, session_valid};
use crate::handler::{Ctx, Flow, Outcome};
use crate::storage::StagedFile;

/// One connection's batch: files staged by `Put` and not yet committed, and what the next
/// `Committed` must report. Dropping it (the connection closed without `Commit`) deletes
/// every staged file.
#[derive(Default)]
pub struct Batch {
    /// Whose files are staged: the session that put them and its tree. A commit checks this
    /// session, never the connection's current one, so files staged under a session that
    /// ended are never committed into whatever account logs in next on the connection.
    owner: Option<Owner>,
    /// Staged files in the order they were put (committed in that order).
    staged: Vec<StagedFileInfo>,
    /// Bytes staged.
    bytes: u64,
    /// Files made visible since the last `Committed` answer.
    committed: u64,
    /// Files that failed at a commit since the last answer, and the first failure.
    failed: u64,
    /// The first failure at a commit since the last answer: reported by the next `Commit`.
    first_failure: Option<(ErrorCode, String)>,
    /// Folders this batch has created or found, open, so each is resolved once per batch.
    known_dirs: HashMap<String, OwnedFd>,
    /// The session token `known_dirs` was filled under: another session (another user,
    /// perhaps) starts with none.
    dirs_token: String,
    /// The body buffer, reused from one `Put` to the next.
    buf: Vec<u8>,
}

/// The session a batch was staged under.
struct Owner {
    /// Account name, for logs.
    user: String,
    /// The session token, re-checked before the commit.
    token: String,
    /// The tree the files go into.
    tree: crate::storage::UserTree,
}

/// A staged file and what its audit line needs.
struct StagedFileInfo {
    /// The staged data.
    file: StagedFile,
    /// Its size.
    size: u64,
    /// Its verified BLAKE3.
    digest: Digest,
}

impl Batch {
    /// Whether files are staged and waiting for a commit.
    pub fn pending(&self) -> bool {
        !self.staged.is_empty()
    }
}

/// Handles `Put`: reads the body (always, so the connection stays in step whatever the
/// answer), verifies it, stages it, answers `UploadDone` or an error, and commits the batch
/// when it reached a limit.
pub(super) async fn put<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
    size: u64,
    digest: Digest,
) -> Result<Flow, ConnError> {
    if size > MAX_PUT_LEN {
        // The body cannot be skipped without reading up to 16 EiB: a protocol error.
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
        refusal = Some(crate::storage::StorageError::BadPath {
            path: path.clone(),
            source,
        })
        .map(|e| (e.code(), e.client_message()));
    } else if max > 0 && size > max {
        let e = crate::storage::StorageError::TooLarge(max);
        refusal = Some((e.code(), e.client_message()));
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
    let mut buf = std::mem::take(&mut ctx.batch.buf);
    buf.clear();
    buf.resize(size as usize, 0);
    let received = tokio::select! {
        r = conn.recv_small_body(&mut buf) => r,
        _ = session_ended(&ctx.state, &token), if slot.is_some() => {
            tracing::info!(user = %user, path = %path, "session ended during a Put body; stopped");
            ctx.audit("upload", Some(&path), Outcome::failed(ErrorCode::SessionExpired));
            ctx.auth = None;
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
    if let Some((code, message)) = refusal {
        ctx.batch.buf = buf;
        tracing::info!(user = %user, path = %path, %message, "Put refused");
        ctx.audit("upload", Some(&path), Outcome::failed(code));
        return reply_error(conn, code, message).await;
    }
    if *blake3::hash(&buf).as_bytes() != digest {
        ctx.batch.buf = buf;
        tracing::warn!(user = %user, path = %path, "Put digest mismatch; discarded");
        ctx.audit(
            "upload",
            Some(&path),
            Outcome::failed(ErrorCode::VerificationFailed),
        );
        return reply_error(
            conn,
            ErrorCode::VerificationFailed,
            format!("`{path}` arrived corrupted (digest mismatch); nothing was saved"),
        )
        .await;
    }
    if ctx.batch.dirs_token != token {
        ctx.batch.known_dirs.clear();
        ctx.batch.dirs_token = token.clone();
    }
    let mut known = std::mem::take(&mut ctx.batch.known_dirs);
    let p = path.clone();
    let tree_for_owner = tree.clone();
    let (staged, buf, known) = match blocking(move || {
        let staged = tree.stage(&p, &buf, &mut known);
        Ok((staged, buf, known))
    })
    .await
    {
        Ok(x) => x,
        Err(e) => (Err(e), Vec::new(), HashMap::new()),
    };
    ctx.batch.buf = buf;
    ctx.batch.known_dirs = known;
    let file = match staged {
        Ok(f) => f,
        Err(e) => {
            tracing::info!(user = %user, path = %path, error = %e, "Put refused");
            ctx.audit("upload", Some(&path), Outcome::failed(e.code()));
            return reply_error(conn, e.code(), e.client_message()).await;
        }
    };
    if ctx.batch.owner.as_ref().is_some_and(|o| o.token != token) {
        // Staged under an earlier session of this connection: settled first, on its own.
        commit_pending(ctx).await;
    }
    let batch = &mut ctx.batch;
    if batch.staged.is_empty() {
        batch.owner = Some(Owner {
            user: user.clone(),
            token: token.clone(),
            tree: tree_for_owner,
        });
    }
    batch.staged.push(StagedFileInfo { file, size, digest });
    batch.bytes += size;
    conn.write_frame(&Response::UploadDone { size, digest })
        .await?;
    if batch.staged.len() >= limits.max_batch_files || batch.bytes >= limits.max_batch_bytes {
        commit_pending(ctx).await;
    }
    Ok(Flow::Continue)
}

/// Handles `Commit`: commits what is staged, then answers `Committed` with every file made
/// visible since the last answer, or the first failure since then.
pub(super) async fn commit<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
) -> Result<Flow, ConnError> {
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
/// committed once the session has ended.
pub(super) async fn commit_pending(ctx: &mut Ctx) {
    if !ctx.batch.pending() {
        return;
    }
    let staged = std::mem::take(&mut ctx.batch.staged);
    ctx.batch.bytes = 0;
    let Some(owner) = ctx.batch.owner.take() else {
        return;
    };
    if !session_valid(&ctx.state, &owner.token) {
        fail_all(
            ctx,
            staged,
            ErrorCode::SessionExpired,
            "the session ended before the commit; log in again",
        );
        if ctx.auth.as_ref().is_some_and(|a| a.token == owner.token) {
            ctx.auth = None;
        }
        return;
    }
    let Owner { user, tree, .. } = owner;
    let started = std::time::Instant::now();
    let (infos, files): (Vec<_>, Vec<_>) = staged
        .into_iter()
        .map(|s| ((s.size, s.digest), s.file))
        .unzip();
    let results = match blocking(move || Ok(tree.commit_batch(files))).await {
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
    for ((file, result), (size, digest)) in results.into_iter().zip(infos) {
        match result {
            Ok(()) => {
                ok += 1;
                bytes += size;
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
                ctx.audit("upload", Some(file.remote()), Outcome::failed(e.code()));
                record_failure(ctx, 1, e.code(), e.client_message());
            }
        }
    }
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
