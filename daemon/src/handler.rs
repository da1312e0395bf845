//! One connection from accept to close: TLS handshake under a deadline, then the session state
//! machine (hello, authentication, requests) until the client leaves, a deadline passes, or the
//! daemon shuts down, in which case an idle client is told and the connection closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use xfer_proto::connection::ConnError;
use xfer_proto::{Connection, ErrorCode, Request, Response};

use crate::cmd::{Ctx, Flow, refuse_session};
use crate::state::State;

/// Runs one accepted TCP connection, admitted with `ticket`, to completion.
pub async fn handle_tcp(
    state: Arc<State>,
    tcp: TcpStream,
    peer: SocketAddr,
    ticket: crate::admission::Ticket,
) {
    let _ = tcp.set_nodelay(true);
    let accepted = Instant::now();
    let mut stop = state.shutdown_rx();
    let limits = state.limits();
    // rustls runs the handshake; records then move through xfer_proto's own large buffers,
    // which read and write many records per syscall and copy each byte once.
    let handshake = tokio::time::timeout(
        ticket.handshake_timeout(),
        xfer_proto::tls_stream::accept(tcp, state.tls_config()),
    );
    let tls = tokio::select! {
        _ = stop.wait_for(|v| *v) => return,
        // Made room for another source; the client learns it from the closed connection.
        _ = ticket.evicted() => return,
        r = handshake => match r {
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Ok(Ok(tls)) => tls,
        },
    };
    if tls.alpn_protocol() != Some(xfer_proto::ALPN) {
        tracing::debug!(%peer, "client did not negotiate ALPN xfer/1; closing");
        return;
    }
    tracing::info!(%peer, "connection open");
    let binding = *tls.channel_binding();
    let mut conn = Connection::over_tls(tls, limits.io_timeout());
    conn.set_frame_timeout(limits.frame_timeout());
    serve_admitted(state, conn, peer, accepted, ticket, Some(binding)).await;
}

/// The session state machine over any stream (TLS in production, in-memory pipes in tests),
/// counted in admission without its caps.
pub async fn serve_session<S: AsyncRead + AsyncWrite + Unpin + Send>(
    state: Arc<State>,
    conn: Connection<S>,
    peer: SocketAddr,
    accepted: Instant,
) {
    let ticket = state.admission.admit_unchecked(peer.ip());
    serve_admitted(state, conn, peer, accepted, ticket, None).await;
}

/// The session state machine for a connection admitted with `ticket`; `channel_binding` is
/// its TLS channel binding, without which key login is refused.
pub async fn serve_admitted<S: AsyncRead + AsyncWrite + Unpin + Send>(
    state: Arc<State>,
    mut conn: Connection<S>,
    peer: SocketAddr,
    accepted: Instant,
    ticket: crate::admission::Ticket,
    channel_binding: Option<[u8; xfer_proto::tls_stream::CHANNEL_BINDING_LEN]>,
) {
    let mut stop = state.shutdown_rx();
    let limits = state.limits();
    let login_deadline = accepted + ticket.login_timeout();
    let mut ctx = Ctx::new(state, peer, ticket);
    ctx.channel_binding = channel_binding;
    loop {
        let authenticated = ctx.auth.is_some();
        let (wait, phase) = if authenticated {
            (limits.idle_timeout(), "idle")
        } else {
            (
                login_deadline.saturating_duration_since(Instant::now()),
                "waiting for login",
            )
        };
        // Before authentication the login deadline bounds everything, including a frame
        // that started in time but trickles in.
        let next = async {
            let read = conn.read_frame_within::<Request>(wait, phase);
            if authenticated {
                read.await
            } else {
                tokio::time::timeout_at(login_deadline.into(), read)
                    .await
                    .unwrap_or(Err(ConnError::Timeout("waiting for login")))
            }
        };
        // `wait_for` is ready at once when shutdown has already started, so a client that sends
        // another request after the flip is told too.
        let mut evicted = false;
        let read = tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => None,
            // Only a connection still waiting to log in is ever evicted.
            _ = ctx.ticket.evicted(), if !authenticated => {
                evicted = true;
                None
            }
            r = next => Some(r),
        };
        if evicted {
            tracing::debug!(%peer, "closed to make room for another source");
            let _ = refuse_session(&mut conn, &crate::admission::Refusal::Evicted).await;
            break;
        }
        let Some(read) = read else {
            notify_shutdown(&mut conn).await;
            break;
        };
        let req = match read {
            Ok(req) => req,
            Err(ConnError::Closed) => break,
            Err(ConnError::Frame(e)) => {
                tracing::info!(%peer, error = %e, "malformed frame; closing");
                let _ = conn
                    .write_frame(&Response::error(ErrorCode::BadRequest, e.to_string()))
                    .await;
                break;
            }
            Err(ConnError::Timeout(phase)) => {
                tracing::info!(%peer, phase, "deadline passed; closing");
                // Name the deadline that passed: a request that started but never finished is
                // not a login problem, even before the login.
                let msg = match phase {
                    "idle" => "idle timeout: no request came in time; closing the connection",
                    "waiting for login" => "login deadline passed; closing the connection",
                    _ => {
                        "a request frame was not completed in time (frame deadline); closing the connection"
                    }
                };
                let _ = conn
                    .write_frame(&Response::error(ErrorCode::BadRequest, msg))
                    .await;
                break;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended");
                break;
            }
        };
        match crate::cmd::dispatch(&mut ctx, &mut conn, req).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended during a request");
                break;
            }
        }
    }
    ctx.batch.discard(limits.io_timeout()).await;
    conn.shutdown().await;
    tracing::info!(%peer, user = ctx.auth.as_ref().map(|a| a.user.as_str()).unwrap_or("-"), "connection closed");
}

async fn notify_shutdown<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Connection<S>) {
    let _ = conn
        .write_frame(&Response::ShuttingDown {
            message: "the server is shutting down".into(),
        })
        .await;
}
