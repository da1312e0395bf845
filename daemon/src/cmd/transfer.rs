//! Upload and download: size-prefixed raw bodies, verified by BLAKE3 before anything is
//! committed, with the upload staged in a temp file that only a verified rename makes visible.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::body::{BodyError, hash_prefix, hashing_allowance};
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, Digest, ErrorCode, Request, Response};

use super::{blocking, reply_error};
use crate::handler::{Ctx, Flow, Outcome};
use crate::partial::Holding;
use crate::storage::{PendingUpload, Staging};

/// Empties the staged file for a fresh start. A failure must not go on: bytes past the new
/// body's end would stay in the file. Returns false after answering with an error (close).
async fn restart<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    pending: &mut PendingUpload,
    path: &str,
) -> Result<bool, ConnError> {
    match pending.restart() {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::error!(path = %path, error = %e, "cannot reset a partial upload");
            conn.write_frame(&Response::error(
                ErrorCode::Internal,
                format!("cannot prepare the upload of `{path}`"),
            ))
            .await?;
            Ok(false)
        }
    }
}

/// Tells the client where to start: `UploadReady { 0 }` when nothing is held, else
/// `UploadResume` with the digest of what is held, and reads the client's `UploadFrom`.
/// Returns the agreed offset and a hasher over the bytes before it, or `None` when the client
/// broke the protocol (already answered; close).
async fn offer_resume<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    pending: &mut PendingUpload,
    path: &str,
) -> Result<Option<(u64, Option<blake3::Hasher>)>, ConnError> {
    let held = pending.held();
    let hasher = if held > 0 {
        match hash_prefix(pending.file(), held).await {
            Ok(h) => Some(h),
            Err(e) => {
                // Unreadable or shorter than it was: not worth resuming from.
                tracing::warn!(path = %path, error = %e, "partial upload unreadable; starting over");
                if !restart(conn, pending, path).await? {
                    return Ok(None);
                }
                None
            }
        }
    } else {
        None
    };
    let Some(hasher) = hasher else {
        conn.write_frame(&Response::UploadReady { offset: 0 })
            .await?;
        return Ok(Some((0, None)));
    };
    conn.write_frame(&Response::UploadResume {
        offset: held,
        prefix: *hasher.finalize().as_bytes(),
    })
    .await?;
    // The client hashes its own prefix before it answers, which takes a while for big files.
    let wait = ctx.state.limits().io_timeout() + hashing_allowance(held);
    match conn
        .read_frame_within::<Request>(wait, "waiting for UploadFrom")
        .await?
    {
        Request::UploadFrom { offset } if offset == held => Ok(Some((held, Some(hasher)))),
        Request::UploadFrom { offset: 0 } => {
            tracing::info!(path = %path, held, "client's file differs from the partial upload; starting over");
            Ok(restart(conn, pending, path).await?.then_some((0, None)))
        }
        _ => {
            conn.write_frame(&Response::error(
                ErrorCode::BadRequest,
                format!("expected UploadFrom with offset 0 or {held}"),
            ))
            .await?;
            Ok(None)
        }
    }
}

/// How long a new upload waits for a stopped or finishing upload of the same path to let go
/// of its partial before it starts over in a temp file of its own.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// An upload without progress for this long may be stopped by a retry of the same path.
const STALLED: Duration = Duration::from_secs(1);

/// Audits an upload that ended mid-body (its data is kept for resume when it can be).
fn audit_interrupted(ctx: &Ctx, path: &str, start: u64) {
    ctx.audit(
        "upload",
        Some(path),
        Outcome {
            resumed_from: Some(start),
            ..Outcome::failed(ErrorCode::BadRequest)
        },
    );
}

fn rate_mb_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

pub(super) async fn upload<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
    size: u64,
    up_to: u64,
) -> Result<Flow, ConnError> {
    let auth = ctx.session();
    let user = auth.user.clone();
    let tree = auth.tree.clone();
    let limits = ctx.state.limits();
    let max = limits.max_upload_bytes;
    // Clients older than protocol 2 cannot answer a resume offer: give them a plain temp file.
    let staging = match limits.partial_upload_ttl() {
        Some(ttl) if ctx.version >= 2 => Staging::Resumable { up_to, ttl },
        _ => Staging::Temp,
    };
    let deadline = Instant::now() + TAKEOVER_WAIT;
    let mut stopped_one = false;
    let mut pending = loop {
        let (t, p) = (tree.clone(), path.clone());
        let pending = match blocking(move || t.begin_upload(&p, size, max, staging)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(user = %user, path = %path, error = %e, "upload refused");
                ctx.audit("upload", Some(&path), Outcome::failed(e.code()));
                return reply_error(conn, e.code(), e.client_message()).await;
            }
        };
        // Another upload holds the partial. A stalled earlier attempt of this retry is
        // stopped and its data taken over. A moving one may be a killed client's last
        // buffered bytes being written (it lets go within moments) or a real concurrent
        // upload: wait for it until the deadline, then go alongside in a temp file.
        let held_elsewhere = matches!(staging, Staging::Resumable { .. }) && !pending.resumable();
        if !held_elsewhere || Instant::now() >= deadline {
            break pending;
        }
        if ctx
            .state
            .uploads
            .stop_if_stalled(&user, pending.key(), STALLED)
            == Holding::Stopped
            && !stopped_one
        {
            stopped_one = true;
            tracing::info!(user = %user, path = %path, "a stalled earlier upload of this path was stopped; resuming from its data");
        }
        drop(pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let claim = pending
        .resumable()
        .then(|| ctx.state.uploads.claim(&user, pending.key()));
    let (start, prefix) = match offer_resume(ctx, conn, &mut pending, &path).await? {
        Some(agreed) => agreed,
        None => return Ok(Flow::Close),
    };
    let started = Instant::now();
    let file = match pending.file().try_clone() {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot clone the staged file's handle");
            return Ok(Flow::Close);
        }
    };
    let received = match &claim {
        Some(claim) => {
            let mut progressed = |_| claim.progressed();
            tokio::select! {
                r = conn.recv_body(file, start, size, prefix, &mut progressed) => r,
                _ = claim.stopped() => {
                    // A retry of this upload has taken over; this connection is presumed dead.
                    tracing::info!(user = %user, path = %path, "upload taken over by a newer attempt");
                    audit_interrupted(ctx, &path, start);
                    return Ok(Flow::Close);
                }
            }
        }
        None => conn.recv_body(file, start, size, prefix, &mut |_| {}).await,
    };
    let digest = match received {
        Ok((digest, _)) => digest,
        Err(BodyError::Local { source, in_sync }) => {
            // Deleting the staged data first frees the space; the old version is untouched.
            pending.discard();
            tracing::warn!(user = %user, path = %path, error = %source, "upload failed writing on the server");
            if !in_sync {
                return Ok(Flow::Close);
            }
            // The client still sends its trailer; read it so the stream stays in step.
            let _ = conn.read_frame::<Request>().await?;
            let e = crate::storage::StorageError::io("writing", &path, source);
            ctx.audit("upload", Some(&path), Outcome::failed(e.code()));
            return reply_error(conn, e.code(), e.client_message()).await;
        }
        Err(BodyError::Net(e)) => {
            let kept = if pending.resumable() {
                "partial data kept for resume"
            } else {
                "partial data discarded"
            };
            tracing::info!(user = %user, path = %path, error = %e, "upload interrupted; {kept}");
            audit_interrupted(ctx, &path, start);
            return Err(e);
        }
        Err(BodyError::SourceChanged) => return Ok(Flow::Close),
    };
    let claimed = match conn.read_frame::<Request>().await? {
        Request::UploadEnd { digest } => digest,
        _ => {
            conn.write_frame(&Response::error(
                ErrorCode::BadRequest,
                "expected UploadEnd after the upload body",
            ))
            .await?;
            return Ok(Flow::Close);
        }
    };
    if claimed != digest {
        // Remove the staged data before answering, so "nothing was saved" is already true.
        pending.discard();
        tracing::warn!(user = %user, path = %path, "upload digest mismatch; discarded");
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
    if let Err(e) = blocking(move || tree.commit(pending)).await {
        tracing::warn!(user = %user, path = %path, error = %e, "upload commit failed");
        ctx.audit("upload", Some(&path), Outcome::failed(e.code()));
        return reply_error(conn, e.code(), e.client_message()).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = size - start;
    tracing::info!(
        user = %user,
        path = %path,
        size,
        bytes = sent,
        resumed_from = start,
        secs = format_args!("{secs:.3}"),
        mb_per_s = format_args!("{:.1}", rate_mb_s(sent, secs)),
        digest = %blake3::Hash::from_bytes(digest).to_hex(),
        "upload complete"
    );
    ctx.audit(
        "upload",
        Some(&path),
        Outcome {
            bytes: Some(sent),
            resumed_from: Some(start),
            digest: Some(&digest),
            ..Outcome::ok()
        },
    );
    conn.write_frame(&Response::UploadDone { size, digest })
        .await?;
    Ok(Flow::Continue)
}

pub(super) async fn download<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: String,
    offset: u64,
    prefix: Option<Digest>,
) -> Result<Flow, ConnError> {
    let auth = ctx.session();
    let user = auth.user.clone();
    let tree = auth.tree.clone();
    let p = path.clone();
    let (file, size, modified) = match blocking(move || tree.open_for_download(&p)).await {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(user = %user, path = %path, error = %e, "download refused");
            ctx.audit("download", Some(&path), Outcome::failed(e.code()));
            return reply_error(conn, e.code(), e.client_message()).await;
        }
    };
    let (offset, hasher) = match prefix {
        // A resume: send from `offset` only if the client's bytes are this file's bytes.
        Some(theirs) if offset > 0 && offset <= size => match hash_prefix(&file, offset).await {
            Ok(h) if *h.finalize().as_bytes() == theirs => (offset, Some(h)),
            Ok(_) => {
                tracing::info!(user = %user, path = %path, offset, "client's partial copy differs; sending the whole file");
                (0, None)
            }
            Err(e) => {
                tracing::warn!(user = %user, path = %path, error = %e, "cannot hash for resume; sending the whole file");
                (0, None)
            }
        },
        Some(_) => (0, None),
        None if offset > size => {
            return reply_error(
                conn,
                ErrorCode::BadRequest,
                format!("offset {offset} is beyond the end of `{path}` ({size} bytes)"),
            )
            .await;
        }
        None => (offset, None),
    };
    conn.write_frame(&Response::DownloadReady {
        size,
        offset,
        modified,
    })
    .await?;
    let started = Instant::now();
    let digest = match conn
        .send_body(file, offset, size, hasher, &mut |_| {})
        .await
    {
        Ok(d) => d,
        Err(e) => {
            // The body length was promised; the only honest signal left is closing.
            tracing::warn!(user = %user, path = %path, error = %e, "download aborted");
            ctx.audit(
                "download",
                Some(&path),
                Outcome::failed(ErrorCode::Internal),
            );
            return Ok(Flow::Close);
        }
    };
    conn.write_frame(&Response::DownloadEnd { digest }).await?;
    ctx.audit(
        "download",
        Some(&path),
        Outcome {
            bytes: Some(size - offset),
            resumed_from: Some(offset),
            digest: Some(&digest),
            ..Outcome::ok()
        },
    );
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        user = %user,
        path = %path,
        bytes = size - offset,
        secs = format_args!("{secs:.3}"),
        mb_per_s = format_args!("{:.1}", rate_mb_s(size - offset, secs)),
        "download complete"
    );
    Ok(Flow::Continue)
}
