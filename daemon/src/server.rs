//! The accept loop (admission itself is [`crate::admission`]) and the one shutdown mechanism.
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
use tokio::sync::watch;
use tokio::task::JoinSet;
use xfer_proto::fingerprint::Fingerprint;

use crate::accounts::Accounts;
use crate::config::Config;
use crate::sessions::SessionStore;
use crate::storage::Store;

/// Everything a connection needs, shared by all of them.
pub struct State {
    /// The configuration loaded at start.
    pub config: Config,
    /// Accounts, reloadable.
    pub accounts: Accounts,
    /// Session tokens.
    pub sessions: SessionStore,
    /// The storage backend.
    pub storage: Store,
    /// Resumable uploads in progress, so a retry can take over from a stalled one.
    pub uploads: Arc<crate::storage::active::ActiveUploads>,
    /// Each user's transfers and resume checks in progress, against the per-user caps.
    pub usage: Arc<crate::usage::Usage>,
    /// Failed-login penalties per source.
    pub penalties: crate::penalty::Penalties,
    /// The audit trail.
    pub audit: crate::audit::AuditLog,
    /// Limits in force; swapped whole by a reload.
    limits: RwLock<Arc<crate::config::Limits>>,
    /// Two-stage admission: counts and caps (caps follow reloads).
    pub admission: Arc<crate::admission::Admission>,
    /// The open-file limit in force, which the connection cap must fit.
    nofile: u64,
    /// Current TLS configuration and fingerprint, swapped together on reload.
    tls: RwLock<(Arc<rustls::ServerConfig>, Fingerprint)>,
    /// Flips to true once when shutdown starts.
    shutdown: watch::Sender<bool>,
}

impl State {
    /// The limits in force now.
    pub fn limits(&self) -> Arc<crate::config::Limits> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The TLS configuration for new connections (with secret extraction on, for
    /// [`xfer_proto::tls_stream::accept`]).
    pub fn tls_config(&self) -> Arc<rustls::ServerConfig> {
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
        let sessions = SessionStore::open(&config.state_dir, &config.sessions)
            .with_context(|| format!("opening sessions in `{}`", config.state_dir.display()))?;
        let storage = Store::open(&config)
            .with_context(|| format!("opening storage root `{}`", config.root.display()))?;
        let (shutdown, _) = watch::channel(false);
        let limits = RwLock::new(Arc::new(config.limits.clone()));
        for warning in &config.warnings {
            tracing::warn!(config = %config.path.display(), "{warning}");
        }
        let nofile = crate::admission::raise_nofile_limit();
        let admission = crate::admission::Admission::new(
            &config.limits,
            crate::admission::connection_cap(&config.limits, nofile),
        );
        let penalties = crate::penalty::Penalties::new(config.penalties.clone())
            .keyed_by(config.limits.per_source_net_block_size);
        let audit = crate::audit::AuditLog::open(&config.audit_log)
            .with_context(|| format!("opening audit log `{}`", config.audit_log.display()))?;
        Ok(Daemon {
            state: Arc::new(State {
                config,
                accounts,
                sessions,
                storage,
                uploads: Default::default(),
                usage: Default::default(),
                penalties,
                audit,
                limits,
                admission,
                nofile,
                tls: RwLock::new((tls, fingerprint)),
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

    /// Reloads the config's limits, the users file and the certificate (see [`reload`]).
    pub fn reload(&self) -> anyhow::Result<()> {
        reload(&self.state)
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
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Reloads the config's limits, the users file and the certificate (SIGHUP). Everything is
/// loaded and checked before anything is swapped in, so a broken file leaves the running state
/// exactly as it was. Keys naming files, folders or the address need a restart; a change to
/// them is reported and otherwise ignored.
pub fn reload(state: &State) -> anyhow::Result<()> {
    let fresh = Config::load(&state.config.path)?;
    let old = &state.config;
    for (key, same) in [
        ("listen", fresh.listen == old.listen),
        ("root", fresh.root == old.root),
        ("users_file", fresh.users_file == old.users_file),
        ("cert", fresh.cert == old.cert),
        ("key", fresh.key == old.key),
        ("state_dir", fresh.state_dir == old.state_dir),
        ("audit_log", fresh.audit_log == old.audit_log),
        (
            "limits.max_concurrent_logins",
            fresh.limits.max_concurrent_logins == old.limits.max_concurrent_logins,
        ),
        ("penalties", fresh.penalties == old.penalties),
        (
            "limits.per_source_net_block_size",
            fresh.limits.per_source_net_block_size == old.limits.per_source_net_block_size,
        ),
        ("sessions", fresh.sessions == old.sessions),
    ] {
        if !same {
            tracing::warn!(
                key,
                "changed in the config; it takes effect at the next restart"
            );
        }
    }
    let (tls, fingerprint) = crate::tls::server_config(&state.config.cert, &state.config.key)?;
    let users = state.accounts.reload()?;
    *state.tls.write().unwrap_or_else(|e| e.into_inner()) = (tls, fingerprint);
    for warning in &fresh.warnings {
        tracing::warn!(config = %fresh.path.display(), "{warning}");
    }
    state.admission.set_limits(
        &fresh.limits,
        crate::admission::connection_cap(&fresh.limits, state.nofile),
    );
    *state.limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh.limits);
    if let Err(e) = state.audit.reopen() {
        tracing::error!(path = %state.audit.path().display(), error = %e, "cannot reopen the audit log; keeping the old file");
    }
    tracing::info!(users, fingerprint = %fingerprint, "reloaded config limits, users and certificate");
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
