//! Key login (spec §8): `KeyLogin` draws a fresh nonce, `KeyProof` right after it must carry
//! an Ed25519 signature over that nonce, this connection's TLS channel binding, the user name
//! and the key. Whatever is wrong (no such user, no such key, a bad signature) the answer is
//! the wrong password's, with the same penalties.

use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncWrite};
use xfer_proto::connection::ConnError;
use xfer_proto::key_login::{NONCE_LEN, PUBLIC_KEY_LEN, signed_message};
use xfer_proto::limits::MAX_USER_LEN;
use xfer_proto::{Connection, ErrorCode, Response};

use super::auth::{denied, grant, refuse_if_penalised};
use super::{Ctx, Flow, reply_error};

/// A `KeyChallenge` sent and not yet answered; only the next request may answer it.
pub(crate) struct Challenge {
    /// The user name the client asked for (not checked until the proof).
    user: String,
    /// The key it will sign with.
    public_key: [u8; PUBLIC_KEY_LEN],
    /// The nonce sent.
    nonce: [u8; NONCE_LEN],
}

/// Refuses a request with `BadRequest` and closes.
async fn bad_request<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    message: &str,
) -> Result<Flow, ConnError> {
    conn.write_frame(&Response::error(ErrorCode::BadRequest, message))
        .await?;
    Ok(Flow::Close)
}

/// `KeyLogin`: answers a fresh nonce, for a known user and key or not.
pub(super) async fn key_login<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    user: String,
    public_key: [u8; PUBLIC_KEY_LEN],
) -> Result<Flow, ConnError> {
    if ctx.channel_binding.is_none() {
        return bad_request(conn, "key login needs a TLS connection").await;
    }
    if let Some(flow) = refuse_if_penalised(ctx, conn, "keylogin", &user).await? {
        return Ok(flow);
    }
    let mut nonce = [0u8; NONCE_LEN];
    if SystemRandom::new().fill(&mut nonce).is_err() {
        tracing::error!("the system's random generator failed; no key challenge sent");
        return reply_error(conn, ErrorCode::Internal, "cannot make a challenge").await;
    }
    ctx.key_challenge = Some(Challenge {
        user,
        public_key,
        nonce,
    });
    conn.write_frame(&Response::KeyChallenge { nonce }).await?;
    Ok(Flow::Continue)
}

/// `KeyProof`, given the challenge the request before it left (if any).
pub(super) async fn key_proof<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &mut Ctx,
    conn: &mut Connection<S>,
    challenge: Option<Challenge>,
    signature: &[u8],
) -> Result<Flow, ConnError> {
    let (Some(challenge), Some(binding)) = (challenge, ctx.channel_binding) else {
        return bad_request(conn, "KeyProof must come right after a KeyChallenge").await;
    };
    // A penalty may have started (from other connections) since the challenge.
    if let Some(flow) = refuse_if_penalised(ctx, conn, "keylogin", &challenge.user).await? {
        return Ok(flow);
    }
    let user = challenge.user.as_str();
    let message = signed_message(&binding, &challenge.nonce, user, &challenge.public_key);
    let checked = if user.len() <= MAX_USER_LEN {
        crate::keys::check_key_login(
            &ctx.state.accounts.snapshot(),
            user,
            &challenge.public_key,
            message.as_deref(),
            signature,
        )
    } else {
        None
    };
    match checked {
        Some((role, generation)) => {
            // Which key opened the session: an administrator deleting keys wants to know.
            let key = crate::keys::id_of(&challenge.public_key);
            tracing::info!(user = %user, peer = %ctx.peer, key = %key, "key login: signature verified");
            grant(ctx, conn, user, role, generation, "keylogin").await
        }
        None => denied(ctx, conn, user, "keylogin").await,
    }
}
