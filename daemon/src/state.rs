//! The daemon's shared state: what every connection and command reads (config, limits,
//! accounts, sessions, storage, the audit trail, admission, per-user usage), loaded once and
//! swapped in part by a reload, and the one shutdown signal.
//!
//! Its own module so that the accept loop (`server`), the connection loop (`handler`) and the
//! commands (`cmd`) can all use it while depending on each other in one direction only.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
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
    /// Each user's stored bytes and files and what their uploads reserve, against quotas.
    pub quotas: Arc<crate::quota::Quotas>,
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
    /// Loads users, certificate, sessions and storage; fails with a message naming the
    /// problem.
    ///
    /// With `[storage] kind = "s3"`, accounts and sessions are the ones every node on the
    /// store shares ([`crate::shared::open`]); otherwise the users file and the session
    /// journal in `state_dir`.
    pub async fn load(config: Config) -> anyhow::Result<State> {
        let (accounts, sessions) = if config.storage.kind == crate::config::StorageKind::S3 {
            // No session journal here, but the audit trail still defaults to this folder.
            crate::fsutil::create_dir_with_mode(&config.state_dir, 0o700).with_context(|| {
                format!("creating the state folder `{}`", config.state_dir.display())
            })?;
            crate::shared::open(&config).await?
        } else {
            let accounts = Accounts::load(
                &config.users_file,
                config.limits.max_concurrent_logins,
                config.limits.max_queued_logins,
            )?;
            let sessions = SessionStore::open(&config.state_dir, &config.sessions)
                .with_context(|| format!("opening sessions in `{}`", config.state_dir.display()))?;
            (accounts, sessions)
        };
        let (tls, fingerprint) = crate::tls::server_config(&config.cert, &config.key)?;
        let storage = Store::open(&config)?;
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
        let local = config.storage.kind == crate::config::StorageKind::Local;
        let quotas = crate::quota::Quotas::open(
            local.then_some(config.state_dir.as_path()),
            Duration::from_secs(config.quota.recount_secs),
        )
        .with_context(|| {
            format!(
                "opening the usage records in `{}`",
                config.state_dir.display()
            )
        })?;
        let audit = crate::audit::AuditLog::open(&config.audit_log)
            .with_context(|| format!("opening audit log `{}`", config.audit_log.display()))?;
        Ok(State {
            config,
            accounts,
            sessions,
            storage,
            uploads: Default::default(),
            usage: Default::default(),
            quotas: Arc::new(quotas),
            penalties,
            audit,
            limits,
            admission,
            nofile,
            tls: RwLock::new((tls, fingerprint)),
            shutdown,
        })
    }

    /// Reloads the config's limits, the users file and the certificate (SIGHUP). Everything
    /// is loaded and checked before anything is swapped in, so a broken file leaves the
    /// running state exactly as it was. Keys naming files, folders or the address need a
    /// restart; a change to them is reported and otherwise ignored.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = Config::load(&self.config.path)?;
        let old = &self.config;
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
        let (tls, fingerprint) = crate::tls::server_config(&self.config.cert, &self.config.key)?;
        let users = self.accounts.reload()?;
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = (tls, fingerprint);
        for warning in &fresh.warnings {
            tracing::warn!(config = %fresh.path.display(), "{warning}");
        }
        self.admission.set_limits(
            &fresh.limits,
            crate::admission::connection_cap(&fresh.limits, self.nofile),
        );
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh.limits);
        if let Err(e) = self.audit.reopen() {
            tracing::error!(path = %self.audit.path().display(), error = %e, "cannot reopen the audit log; keeping the old file");
        }
        tracing::info!(users, fingerprint = %fingerprint, "reloaded config limits, users and certificate");
        Ok(())
    }

    /// The quota in force for `user` now (users file, else config defaults).
    pub fn quota_of(&self, user: &str) -> crate::quota::Quota {
        crate::quota::Quota::of(&self.accounts, &self.config.quota, user)
    }

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
