//! The accept loop (admission itself is [`crate::admission`]) and the one shutdown mechanism.
//!
//! Shutdown, whoever starts it (the `Shutdown` request, SIGTERM, SIGINT or a test's future),
//! goes through [`ShutdownHandle::trigger`]: a watch channel flips to true, the accept loop stops
//! and drops the listener at once, every connection task sees the flip; idle ones tell their
//! client and close immediately, busy ones finish their transfer. After the grace period the
//! remaining tasks are aborted, which drops their pending uploads and so deletes the temp files.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::state::{ShutdownHandle, State};

/// A loaded daemon, ready to serve.
pub struct Daemon {
    /// Shared state.
    state: Arc<State>,
}

impl Daemon {
    /// Loads users, certificate, sessions and storage; fails with a message naming the problem.
    pub async fn load(config: Config) -> anyhow::Result<Daemon> {
        Ok(Daemon {
            state: Arc::new(State::load(config).await?),
        })
    }

    /// The shared state (for tests and the CLI).
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// A handle that starts shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.state.shutdown_handle()
    }

    /// Checks that the storage backend answers (see [`crate::storage::Store::check`]); [`Daemon::run`]
    /// checks it too, this lets `xferd serve` do it before it tells systemd it is ready.
    pub async fn check_storage(&self) -> anyhow::Result<()> {
        self.state.storage.check().await
    }

    /// Reloads the config's limits, the users file and the certificate (see
    /// [`State::reload`]).
    pub fn reload(&self) -> anyhow::Result<()> {
        self.state.reload()
    }

    /// Deletes expired partial uploads now and then for as long as the daemon runs. The period
    /// follows the (reloadable) lifetime: a quarter of it, between 1 s and 1 h.
    async fn sweep_partials(state: Arc<State>) {
        loop {
            let ttl = state.limits().partial_upload_ttl();
            // With resume off, whatever is left expires after the default lifetime.
            let ttl = ttl.unwrap_or(Duration::from_secs(86400));
            match state.storage.sweep_partials(ttl).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "expired partial uploads deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot sweep partial uploads"),
            }
            let period = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
            tokio::time::sleep(period).await;
        }
    }

    /// Serves connections from `listener` until `shutdown` completes or a superuser shuts the
    /// daemon down, then shuts down gracefully. Returns once every connection is closed.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let state = self.state;
        // A store that does not answer fails the start, with what to check.
        state.storage.check().await?;
        let admission = state.admission.clone();
        let mut tasks = JoinSet::new();
        let mut stop = state.shutdown_rx();
        let handle = state.shutdown_handle();
        tokio::pin!(shutdown);
        tracing::info!(listen = %listener.local_addr()?, fingerprint = %state.fingerprint(), "accepting connections");
        let sweeper = tokio::spawn(Self::sweep_partials(state.clone()));

        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut shutdown => { handle.trigger("signal"); break; }
                _ = stop.wait_for(|v| *v) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Over a cap, refuse at once (with a line saying why): waiting would let
                    // idle connections hold the accept queue and starve everyone else.
                    let ticket = match admission.admit(peer.ip()) {
                        Ok(ticket) => ticket,
                        Err(why) => {
                            admission.refuse(tcp, peer.ip(), &why);
                            continue;
                        }
                    };
                    let state = state.clone();
                    tasks.spawn(crate::handler::handle_tcp(state, tcp, peer, ticket));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(listener);
        sweeper.abort();
        let limits = state.limits();
        let open = tasks.len();
        tracing::info!(
            connections = open,
            grace_secs = limits.shutdown_grace_secs,
            "stopped accepting; closing connections"
        );
        let drained = tokio::time::timeout(limits.shutdown_grace(), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "grace period over; aborting transfers still in flight"
            );
            tasks.shutdown().await;
        }
        state.quotas.close();
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Loads `config` and serves `listener` until `shutdown` completes (see [`Daemon::run`]).
/// Tests bind 127.0.0.1:0 and stop the daemon with a oneshot.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Daemon::load(config).await?.run(listener, shutdown).await
}

/// Binds the configured (or overridden) address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))
}
