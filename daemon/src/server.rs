//! The accept loop, the connection cap and the one shutdown mechanism.
//!
//! Shutdown, whoever starts it (the `Shutdown` request, SIGTERM, SIGINT or a test's future),
//! goes through [`ShutdownHandle::trigger`]: a watch channel flips to true, the accept loop stops
//! and drops the listener at once, every connection task sees the flip; idle ones tell their
//! client and close immediately, busy ones finish their transfer. After the grace period the
//! remaining tasks are aborted, which drops their pending uploads and so deletes the temp files.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use xfer_proto::fingerprint::Fingerprint;

use crate::accounts::Accounts;
use crate::config::Config;
use crate::sessions::SessionStore;
use crate::storage::Storage;

/// Everything a connection needs, shared by all of them.
pub struct State {
    /// The configuration loaded at start.
    pub config: Config,
    /// Accounts, reloadable.
    pub accounts: Accounts,
    /// Session tokens.
    pub sessions: SessionStore,
    /// The storage root.
    pub storage: Storage,
    /// Current TLS acceptor and fingerprint, swapped together on reload.
    tls: RwLock<(TlsAcceptor, Fingerprint)>,
    /// Flips to true once when shutdown starts.
    shutdown: watch::Sender<bool>,
}

impl State {
    /// The TLS acceptor for new connections.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// The fingerprint of the current certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).1
    }

    /// A receiver that sees shutdown start.
    pub fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// A handle that can start shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }
}

/// Starts the daemon's shutdown; cloneable, usable from any task or signal handler.
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Begins shutdown (idempotent). `why` goes to the log.
    pub fn trigger(&self, why: &str) {
        let first = self.0.send_if_modified(|v| !std::mem::replace(v, true));
        if first {
            tracing::info!(reason = why, "shutdown started");
        }
    }

    /// True once shutdown has started.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// A loaded daemon, ready to serve.
pub struct Daemon {
    /// Shared state.
    state: Arc<State>,
}

impl Daemon {
    /// Loads users, certificate, sessions and storage; fails with a message naming the problem.
    pub fn load(config: Config) -> anyhow::Result<Daemon> {
        let accounts = Accounts::load(
            &config.users_file,
            config.limits.max_concurrent_logins,
            config.limits.max_queued_logins,
        )?;
        let (tls, fingerprint) = crate::tls::server_config(&config.cert, &config.key)?;
        let sessions = SessionStore::open(&config.state_dir, config.sessions.ttl_secs)
            .with_context(|| format!("opening sessions in `{}`", config.state_dir.display()))?;
        let storage = Storage::open(&config.root)
            .with_context(|| format!("opening storage root `{}`", config.root.display()))?;
        let (shutdown, _) = watch::channel(false);
        Ok(Daemon {
            state: Arc::new(State {
                config,
                accounts,
                sessions,
                storage,
                tls: RwLock::new((TlsAcceptor::from(tls), fingerprint)),
                shutdown,
            }),
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

    /// Reloads the users file and certificate. Both are loaded and checked before either is
    /// swapped in, so a broken file leaves the running state exactly as it was.
    pub fn reload(&self) -> anyhow::Result<()> {
        reload(&self.state)
    }

    /// Serves connections from `listener` until `shutdown` completes or a superuser shuts the
    /// daemon down, then shuts down gracefully. Returns once every connection is closed.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let state = self.state;
        let limits = state.config.limits.clone();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut tasks = JoinSet::new();
        let mut stop = state.shutdown_rx();
        let handle = state.shutdown_handle();
        tokio::pin!(shutdown);
        tracing::info!(listen = %listener.local_addr()?, fingerprint = %state.fingerprint(), "accepting connections");

        loop {
            let permit = tokio::select! {
                biased;
                _ = &mut shutdown => { handle.trigger("signal"); break; }
                _ = stop.wait_for(|v| *v) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            let accepted = tokio::select! {
                biased;
                _ = &mut shutdown => { handle.trigger("signal"); break; }
                _ = stop.wait_for(|v| *v) => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let state = state.clone();
                    tasks.spawn(async move {
                        crate::handler::handle_tcp(state, tcp, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(listener);
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
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Reloads users and certificate into running state (SIGHUP).
pub fn reload(state: &State) -> anyhow::Result<()> {
    let (tls, fingerprint) = crate::tls::server_config(&state.config.cert, &state.config.key)?;
    let users = state.accounts.reload()?;
    *state.tls.write().unwrap_or_else(|e| e.into_inner()) = (TlsAcceptor::from(tls), fingerprint);
    tracing::info!(users, fingerprint = %fingerprint, "reloaded users and certificate");
    Ok(())
}

/// Loads `config` and serves `listener` until `shutdown` completes (see [`Daemon::run`]).
/// Tests bind 127.0.0.1:0 and stop the daemon with a oneshot.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Daemon::load(config)?.run(listener, shutdown).await
}

/// Binds the configured (or overridden) address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))
}
