//! Upload and download: size-prefixed raw bodies, verified by BLAKE3 before anything is
//! committed, with the upload staged in a temp file that only a verified rename makes visible.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::body::BodyError;
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, ErrorCode, Request, Response};

use super::{blocking, reply_error};
use crate::handler::{Ctx, Flow, Outcome};

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
    _offset: u64,
) -> Result<Flow, ConnError> {
    let auth = ctx.auth.as_ref().expect("dispatcher checked the session");
    let user = auth.user.clone();
    let tree = auth.tree.clone();
    let max = ctx.state.limits().max_upload_bytes;
    let p = path.clone();
    let pending = match blocking(move || tree.begin_upload(&p, size, max)).await {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(user = %user, path = %path, error = %e, "upload refused");
            ctx.audit("upload", Some(&path), Outcome::failed(e.code()));
            return reply_error(conn, e.code(), e.client_message()).await;
        }
    };
    // Resume is not offered yet: always start from byte 0.
    conn.write_frame(&Response::UploadReady { offset: 0 })
        .await?;
    let started = Instant::now();
    let file = match pending.temp.as_file().try_clone() {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot clone temp file handle");
            return Ok(Flow::Close);
        }
    };
    let received = conn.recv_body(file, 0, size, &mut |_| {}).await;
    let digest = match received {
        Ok((digest, _)) => digest,
        Err(BodyError::Local { source, in_sync }) => {
            // Deleting the temp file first frees the space; the old version is untouched.
            drop(pending);
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
            tracing::info!(user = %user, path = %path, error = %e, "upload interrupted; partial data discarded");
            ctx.audit(
                "upload",
                Some(&path),
                Outcome::failed(ErrorCode::BadRequest),
            );
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
        // Remove the temp file before answering, so "nothing was saved" is already true.
        drop(pending);
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
    let tree = ctx.auth.as_ref().expect("checked").tree.clone();
    if let Err(e) = blocking(move || tree.commit(pending)).await {
        tracing::warn!(user = %user, path = %path, error = %e, "upload commit failed");
        ctx.audit("upload", Some(&path), Outcome::failed(e.code()));
        return reply_error(conn, e.code(), e.client_message()).await;
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        user = %user,
        path = %path,
        bytes = size,
        secs = format_args!("{secs:.3}"),
        mb_per_s = format_args!("{:.1}", rate_mb_s(size, secs)),
        digest = %blake3::Hash::from_bytes(digest).to_hex(),
        "upload complete"
    );
    ctx.audit(
        "upload",
        Some(&path),
        Outcome {
            bytes: Some(size),
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
) -> Result<Flow, ConnError> {
    let auth = ctx.auth.as_ref().expect("dispatcher checked the session");
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
    if offset > size {
        return reply_error(
            conn,
            ErrorCode::BadRequest,
            format!("offset {offset} is beyond the end of `{path}` ({size} bytes)"),
        )
        .await;
    }
    conn.write_frame(&Response::DownloadReady {
        size,
        offset,
        modified,
    })
    .await?;
    let started = Instant::now();
    let digest = match conn.send_body(file, offset, size, &mut |_| {}).await {
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
