//! Upload and download: size-prefixed raw bodies, verified by BLAKE3 before anything is
//! committed, with the upload staged where only a verified commit makes it visible (a temp
//! file and a rename, or a multipart upload completed on the object store). One upload
//! function and one download function for every backend: the body goes to the upload's
//! sink and comes from the file's source (`storage::body`), and the resume offer comes from
//! the upload itself.
//!
//! What one user's transfers may cost is bounded here: at most
//! `limits.max_transfers_per_user` at once (more are answered `Busy`), bodies that move at
//! least `limits.min_transfer_rate` (see [`xfer_proto::body::Pacing`]), resume checks
//! (hashing a prefix) at most `limits.max_prefix_hashes_per_user` at once and stopped as soon
//! as their client leaves, and a session re-checked every [`SESSION_RECHECK`] during a body
//! and once more before a commit, so a logout elsewhere, a password change or a deleted
//! account stops a transfer in flight.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xfer_proto::body::{BodyError, SendHash, hashing_allowance};
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, Digest, ErrorCode, Request, Response};

use super::errors::wire;
use super::{Ctx, Flow, Outcome};
use super::{reply_error, session_valid};
use crate::state::State;
use crate::storage::active::Holding;
use crate::storage::{ReadBody, Staging, StorageError, Tree, Upload, WHOLE_READ_ROOM};
use crate::usage::Slot;

/// How often a running transfer re-checks its session.
pub const SESSION_RECHECK: Duration = Duration::from_secs(1);

/// Completes with what `check` finds, asking it every [`SESSION_RECHECK`] from one period
/// on (the caller has just checked): what a running transfer watches, its session or quota.
pub(super) async fn recheck<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let mut tick = tokio::time::interval(SESSION_RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Some(found) = check() {
            return found;
        }
    }
}

/// Completes once the session of `token` has ended (checked every [`SESSION_RECHECK`]).
pub(super) async fn session_ended(state: &State, token: &str) {
    recheck(|| (!session_valid(state, token)).then_some(())).await
}

/// Ends an upload whose session has ended (`when`: at which stage, for the log). What arrived
/// is deleted, not kept for whoever logs in next, and the connection forgets the session.
/// Returns the answer for the client.
async fn upload_session_ended(
    ctx: &mut Ctx,
    pending: Upload,
    user: &str,
    path: &str,
    when: &str,
) -> Response {
    pending.discard().await;
    tracing::info!(user = %user, path = %path, "session ended {when}; nothing saved");
    ctx.audit(
        "upload",
        Some(path),
        Outcome::failed(ErrorCode::SessionExpired),
    );
    ctx.auth = None;
    Response::error(
        ErrorCode::SessionExpired,
        format!(
            "session expired or revoked during the upload of `{path}`; nothing was saved; log in again"
        ),
    )
}

/// A transfer under way: one of its user's transfer slots (given back on drop), and the
/// session details it keeps using.
struct Running {
    _slot: Slot,
    user: String,
    tree: Tree,
    token: String,
}

/// Starts an upload or a download: takes one of the user's transfer slots and sets the body
/// rate floor, or answers `Busy` (`Err`, with the flow to return).
async fn begin<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    op: &'static str,
    path: &str,
) -> Result<Result<Running, Flow>, ConnError> {
    let auth = ctx.session();
    let user = &auth.user;
    let limits = ctx.state.limits();
    let max = limits.max_transfers_per_user;
    if let Some(slot) = ctx.state.usage.try_transfer(user, max) {
        conn.set_min_body_rate(limits.min_transfer_rate);
        return Ok(Ok(Running {
            _slot: slot,
            user: user.clone(),
            tree: auth.tree.clone(),
            token: auth.token.clone(),
        }));
    }
    tracing::info!(user = %user, path = %path, max, "{op} refused: too many transfers in progress");
    ctx.audit(op, Some(path), Outcome::failed(ErrorCode::Busy));
    let flow = reply_error(
        conn,
        ErrorCode::Busy,
        format!("too many transfers in progress for {user} ({max}); wait for some to finish, then try again"),
    )
    .await?;
    Ok(Err(flow))
}

/// Runs `work` unless the client leaves first. Until it is answered the client must send
/// nothing, so end of stream, an error or any byte on the read side all mean it is gone (or
/// broke the protocol): `None`, and `work` is dropped, which stops a prefix hash within one
/// chunk (see [`hash_prefix`]).
async fn unless_client_leaves<S: AsyncRead + AsyncWrite + Unpin, T>(
    conn: &mut Connection<S>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let mut probe = [0u8; 1];
    tokio::select! {
        biased;
        done = work => Some(done),
        _ = conn.get_mut().read(&mut probe) => None,
    }
}

/// Runs `hash`, a prefix hash for a resume check, in one of the user's hashing slots
/// (waiting for one), stopping if the client leaves: `None` then, and the connection should
/// close.
async fn hash_for_resume<S: AsyncRead + AsyncWrite + Unpin, T>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    hash: impl Future<Output = std::io::Result<T>>,
) -> Option<std::io::Result<T>> {
    let usage = ctx.state.usage.clone();
    let user = ctx.session().user.clone();
    let max = ctx.state.limits().max_prefix_hashes_per_user;
    let work = async move {
        let _slot = usage.hash_slot(&user, max).await;
        hash.await
    };
    unless_client_leaves(conn, work).await
}

/// Empties the staged file for a fresh start. A failure must not go on: bytes past the new
/// body's end would stay in the file. Returns false after answering with an error (close).
async fn restart<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    pending: &mut Upload,
    path: &str,
) -> Result<bool, ConnError> {
    match pending.restart().await {
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
/// Returns the agreed offset and, when the body's hashing must go on from one, a hasher over
/// the bytes before it (see [`Upload::resume_offer`]), or `None` when the client broke the
/// protocol (already answered; close).
async fn offer_resume<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Connection<S>,
    pending: &mut Upload,
    path: &str,
) -> Result<Option<(u64, Option<blake3::Hasher>)>, ConnError> {
    let held = pending.held();
    let offer = if held > 0 {
        let Some(hashed) = hash_for_resume(ctx, conn, pending.resume_offer()).await else {
            tracing::info!(path = %path, held, "client left before the resume check finished; hashing stopped");
            return Ok(None);
        };
        match hashed {
            Ok(offer) => Some(offer),
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
    let Some((prefix, hasher)) = offer else {
        conn.write_frame(&Response::UploadReady { offset: 0 })
            .await?;
        return Ok(Some((0, None)));
    };
    conn.write_frame(&Response::UploadResume {
        offset: held,
        prefix,
    })
    .await?;
    // The client hashes its own prefix before it answers, which takes a while for big files.
    let wait = ctx.state.limits().io_timeout() + hashing_allowance(held);
    match conn
        .read_frame_within::<Request>(wait, "waiting for UploadFrom")
        .await?
    {
        Request::UploadFrom { offset } if offset == held => Ok(Some((held, hasher))),
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
    let Running {
        _slot,
        user,
        tree,
        token,
    } = match begin(ctx, conn, "upload", &path).await? {
        Ok(running) => running,
        Err(flow) => return Ok(flow),
    };
    let limits = ctx.state.limits();
    let max = limits.max_upload_bytes;
    // Clients older than protocol 2 cannot answer a resume offer: give them a plain temp file.
    let staging = match limits.partial_upload_ttl() {
        Some(ttl) if ctx.version >= 2 => Staging::Resumable {
            up_to,
            ttl,
            max_bytes: limits.max_partial_bytes_per_user,
        },
        _ => Staging::Temp,
    };
    let deadline = Instant::now() + TAKEOVER_WAIT;
    let mut stopped_one = false;
    let mut pending = loop {
        let pending = match tree.begin_upload(&path, size, max, staging).await {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(user = %user, path = %path, error = %e, "upload refused");
                let (code, message) = wire(&e);
                ctx.audit("upload", Some(&path), Outcome::failed(code));
                return reply_error(conn, code, message).await;
            }
        };
        // Another upload holds the partial. A stalled earlier attempt of this retry is
        // stopped and its data taken over. A moving one may be a killed client's last
        // buffered bytes being written (it lets go within moments) or a real concurrent
        // upload: wait for it until the deadline, then go alongside in a temp file.
        if !pending.held_elsewhere() || Instant::now() >= deadline {
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
    // Room in the quota, before anything is said of the body: reserved under one lock, so
    // racing uploads cannot together pass it. Refused, nothing is kept for a resume: the same
    // upload would be refused again.
    let reservation = match super::account::reserve(&ctx.state, &user, &tree, &path, size).await {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            pending.discard().await;
            tracing::info!(user = %user, path = %path, size, "upload refused: {why}");
            let (code, message) = super::account::refused(&path, &why);
            ctx.audit("upload", Some(&path), Outcome::failed(code));
            return reply_error(conn, code, message).await;
        }
        Err(e) => {
            tracing::warn!(user = %user, path = %path, error = %e, "cannot count the user's files for their quota");
            let (code, message) = wire(&e);
            ctx.audit("upload", Some(&path), Outcome::failed(code));
            return reply_error(conn, code, message).await;
        }
    };
    let claim = pending
        .resumable()
        .then(|| ctx.state.uploads.claim(&user, pending.key()));
    let (start, prefix) = match offer_resume(ctx, conn, &mut pending, &path).await? {
        Some(agreed) => agreed,
        None => return Ok(Flow::Close),
    };
    let started = Instant::now();
    let sink = match pending.sink(prefix) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the upload's sink");
            return Ok(Flow::Close);
        }
    };
    let taken_over = async {
        match &claim {
            Some(claim) => claim.stopped().await,
            None => std::future::pending().await,
        }
    };
    let mut progressed = |_| {
        if let Some(claim) = &claim {
            claim.progressed();
        }
    };
    let state = ctx.state.clone();
    let received = tokio::select! {
        r = conn.recv_body_into(sink, start, size, &mut progressed) => r,
        _ = taken_over => {
            // A retry of this upload has taken over; this connection is presumed dead.
            tracing::info!(user = %user, path = %path, "upload taken over by a newer attempt");
            audit_interrupted(ctx, &path, start);
            return Ok(Flow::Close);
        }
        _ = session_ended(&state, &token) => {
            // Stop at once. The client is still sending: the connection closes after this
            // answer.
            let answer = upload_session_ended(ctx, pending, &user, &path, "during the upload body; stopped").await;
            conn.write_frame(&answer).await?;
            return Ok(Flow::Close);
        }
        why = super::account::quota_passed(&state, &user, &reservation) => {
            // The quota was lowered below what the account holds: this upload would pass it.
            // Nothing is kept (a retry would be refused), and the connection closes after the
            // answer, as the client is still sending.
            pending.discard().await;
            tracing::info!(user = %user, path = %path, "upload stopped: {why}");
            ctx.audit("upload", Some(&path), Outcome::failed(ErrorCode::QuotaExceeded));
            conn.write_frame(&Response::error(
                ErrorCode::QuotaExceeded,
                format!("{why} during the upload of `{path}`; nothing was saved"),
            ))
            .await?;
            return Ok(Flow::Close);
        }
    };
    let digest = match received {
        Ok((digest, _)) => digest,
        Err(BodyError::Local { source, in_sync }) => {
            // Deleting the staged data first frees the space; the old version is untouched.
            pending.discard().await;
            tracing::warn!(user = %user, path = %path, error = %source, "upload failed writing on the server");
            if !in_sync {
                return Ok(Flow::Close);
            }
            // The client still sends its trailer; read it so the stream stays in step.
            let _ = conn.read_frame::<Request>().await?;
            let e = StorageError::io("writing", &path, source);
            let (code, message) = wire(&e);
            ctx.audit("upload", Some(&path), Outcome::failed(code));
            return reply_error(conn, code, message).await;
        }
        Err(BodyError::Net(e)) => {
            let kept = if pending.resumable() {
                "partial data kept for resume"
            } else {
                "partial data discarded"
            };
            tracing::info!(user = %user, path = %path, error = %e, "upload interrupted; {kept}");
            audit_interrupted(ctx, &path, start);
            // Kept (or deleted) before the connection ends, so a retry through any node finds
            // it free at once.
            pending.interrupt().await;
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
        pending.discard().await;
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
    // The body may have taken long: the session must still hold when the file appears.
    if !session_valid(&ctx.state, &token) {
        let answer =
            upload_session_ended(ctx, pending, &user, &path, "before the upload's commit").await;
        conn.write_frame(&answer).await?;
        return Ok(Flow::Continue);
    }
    // What the commit replaces, for the count (a look just before it: the target may have
    // changed during the body).
    let replaced = tree.file_size(&path).await.ok().flatten();
    if let Err(e) = tree.commit(pending, &digest).await {
        tracing::warn!(user = %user, path = %path, error = %e, "upload commit failed");
        let (code, message) = wire(&e);
        ctx.audit("upload", Some(&path), Outcome::failed(code));
        return reply_error(conn, code, message).await;
    }
    ctx.state.quotas.commit(reservation, size, replaced);
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
    let Running {
        _slot,
        user,
        tree,
        token,
    } = match begin(ctx, conn, "download", &path).await? {
        Ok(running) => running,
        Err(flow) => return Ok(flow),
    };
    // A small file wanted whole comes read already, and goes out in one write.
    let whole = offset == 0 && prefix.is_none();
    let handle = match tree.open_read(&path, whole).await {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(user = %user, path = %path, error = %e, "download refused");
            let (code, message) = wire(&e);
            ctx.audit("download", Some(&path), Outcome::failed(code));
            return reply_error(conn, code, message).await;
        }
    };
    let (size, modified, stored) = (handle.size, handle.modified, handle.stored);
    if prefix.is_none() && offset > size {
        return reply_error(
            conn,
            ErrorCode::BadRequest,
            format!("offset {offset} is beyond the end of `{path}` ({size} bytes)"),
        )
        .await;
    }
    // Starting past byte 0 needs the digest of the bytes before it: the client's check for
    // `DownloadFrom`, the whole file's digest for both. It is computed before answering, in
    // a hashing slot, and stops if the client leaves meanwhile (`offset = size` with a wrong
    // prefix would otherwise hash a whole file for nobody).
    let hashed = if offset > 0 && offset <= size {
        match hash_for_resume(ctx, conn, handle.prefix_hasher(offset)).await {
            Some(h) => Some(h),
            None => {
                tracing::info!(user = %user, path = %path, offset, "client left before the resume check finished; hashing stopped");
                return Ok(Flow::Close);
            }
        }
    } else {
        None
    };
    let (offset, hasher) = match (prefix, hashed) {
        // A resume: send from `offset` only if the client's bytes are this file's bytes.
        (Some(theirs), Some(Ok(h))) if *h.finalize().as_bytes() == theirs => (offset, Some(h)),
        (Some(_), Some(Ok(_))) => {
            tracing::info!(user = %user, path = %path, offset, "client's partial copy differs; sending the whole file");
            (0, None)
        }
        (Some(_), Some(Err(e))) => {
            tracing::warn!(user = %user, path = %path, error = %e, "cannot hash for resume; sending the whole file");
            (0, None)
        }
        (Some(_), None) => (0, None),
        (None, Some(Ok(h))) => (offset, Some(h)),
        (None, Some(Err(e))) => {
            tracing::warn!(user = %user, path = %path, error = %e, "cannot read the file before the offset");
            ctx.audit(
                "download",
                Some(&path),
                Outcome::failed(ErrorCode::Internal),
            );
            return reply_error(
                conn,
                ErrorCode::Internal,
                format!("reading `{path}` failed on the server"),
            )
            .await;
        }
        (None, None) => (offset, None),
    };
    let source = match handle.body {
        ReadBody::Whole { buf, digest } => {
            return send_whole(ctx, conn, &path, &user, &token, buf, size, modified, digest).await;
        }
        body => match body.source(offset).await {
            Ok(source) => source,
            Err(e) => {
                tracing::warn!(user = %user, path = %path, error = %e, "download refused");
                let (code, message) = wire(&e);
                ctx.audit("download", Some(&path), Outcome::failed(code));
                return reply_error(conn, code, message).await;
            }
        },
    };
    conn.write_frame(&Response::DownloadReady {
        size,
        offset,
        modified,
    })
    .await?;
    let started = Instant::now();
    let state = ctx.state.clone();
    let mut no_progress = |_| {};
    // A whole big file whose upload left its verified digest needs no hashing: the client
    // verifies what arrives against the stored digest all the same.
    let hash = match (stored, hasher) {
        (Some(_), _) => SendHash::Skip,
        (None, Some(h)) => SendHash::Prefix(h),
        (None, None) => SendHash::FromStart,
    };
    let send = async {
        conn.send_body_from(source, offset, size, hash, &mut no_progress)
            .await
            .map(|hashed| hashed.or(stored).unwrap_or_default())
    };
    let sent = tokio::select! {
        r = send => r,
        _ = session_ended(&state, &token) => {
            // The body length was promised and no frame can interrupt it: closing is the
            // only signal; the next request on any connection learns the session ended.
            tracing::info!(user = %user, path = %path, "session ended during the download; stopped");
            ctx.audit("download", Some(&path), Outcome::failed(ErrorCode::SessionExpired));
            ctx.auth = None;
            return Ok(Flow::Close);
        }
    };
    let digest = match sent {
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
    downloaded(ctx, &user, &path, size, offset, &digest, started);
    Ok(Flow::Continue)
}

/// The audit record and log line of a download that sent its whole body (from `offset`).
fn downloaded(
    ctx: &Ctx,
    user: &str,
    path: &str,
    size: u64,
    offset: u64,
    digest: &Digest,
    started: Instant,
) {
    ctx.audit(
        "download",
        Some(path),
        Outcome {
            bytes: Some(size - offset),
            resumed_from: Some(offset),
            digest: Some(digest),
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
}

/// Sends a small download read whole (`buf`: [`WHOLE_READ_ROOM`] free bytes, then the file)
/// with its `DownloadReady` and `DownloadEnd` around it, framed in place, in one write.
#[allow(clippy::too_many_arguments)]
async fn send_whole<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    path: &str,
    user: &str,
    token: &str,
    mut buf: Vec<u8>,
    size: u64,
    modified: i64,
    digest: Digest,
) -> Result<Flow, ConnError> {
    let mut header = Vec::with_capacity(WHOLE_READ_ROOM);
    let framed = xfer_proto::frame::encode_frame(
        &Response::DownloadReady {
            size,
            offset: 0,
            modified,
        },
        &mut header,
    )
    .and_then(|()| xfer_proto::frame::encode_frame(&Response::DownloadEnd { digest }, &mut buf));
    if let Err(e) = framed {
        // Nothing is promised yet: refused like a file that cannot be read.
        let e = StorageError::io("reading", path, std::io::Error::other(e.to_string()));
        tracing::info!(user = %user, path = %path, error = %e, "download refused");
        let (code, message) = wire(&e);
        ctx.audit("download", Some(path), Outcome::failed(code));
        return reply_error(conn, code, message).await;
    }
    // The header always fits the room left for it; were it ever longer, it is copied.
    let start = WHOLE_READ_ROOM.checked_sub(header.len());
    let wire = match start {
        Some(start) => {
            buf[start..WHOLE_READ_ROOM].copy_from_slice(&header);
            &buf[start..]
        }
        None => {
            header.extend_from_slice(&buf[WHOLE_READ_ROOM..]);
            &header[..]
        }
    };
    let started = Instant::now();
    let state = ctx.state.clone();
    let limit = state.limits().io_timeout();
    let stream = conn.get_mut();
    let write = tokio::time::timeout(limit, async {
        stream.write_all(wire).await?;
        stream.flush().await
    });
    let sent = tokio::select! {
        r = write => r,
        _ = session_ended(&state, token) => {
            tracing::info!(user = %user, path = %path, "session ended during the download; stopped");
            ctx.audit("download", Some(path), Outcome::failed(ErrorCode::SessionExpired));
            ctx.auth = None;
            return Ok(Flow::Close);
        }
    };
    if let Err(e) = sent
        .map_err(|_| ConnError::Timeout("sending file data"))
        .and_then(|r| r.map_err(ConnError::Io))
    {
        // The body length was promised; the only honest signal left is closing.
        tracing::warn!(user = %user, path = %path, error = %e, "download aborted");
        ctx.audit("download", Some(path), Outcome::failed(ErrorCode::Internal));
        return Ok(Flow::Close);
    }
    downloaded(ctx, user, path, size, 0, &digest, started);
    Ok(Flow::Continue)
}
