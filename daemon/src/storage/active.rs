//! The resumable uploads this daemon is running, by user and path, so that a retry can take
//! over from an earlier attempt that stalled. Whatever the backend, only one upload may own a
//! path's partial at a time; this registry is how a retry finds and stops a dead owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// An upload that holds a partial: how to stop it, and when it last made progress.
struct Holder {
    id: u64,
    /// Notified when a newer attempt takes over.
    stop: Notify,
    /// Milliseconds since [`ActiveUploads::epoch`] at the last progress.
    last_progress_ms: AtomicU64,
}

/// The resumable uploads this daemon is running, by user and path. A retry usually arrives
/// while the server has not yet noticed that the previous attempt's connection is gone (a
/// dropped link is only noticed at the transfer timeout); without this, the retry would find
/// the partial locked and start over.
pub struct ActiveUploads {
    holders: Mutex<HashMap<(String, String), Arc<Holder>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Default for ActiveUploads {
    fn default() -> Self {
        ActiveUploads {
            holders: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// What a retry found holding the partial it wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// No upload of this daemon: one being torn down, or another process.
    Nobody,
    /// An upload that is moving (a concurrent one, or a dead one still writing what it had
    /// buffered), left alone.
    Moving,
    /// A stalled upload, now told to stop; its data is free soon.
    Stopped,
}

/// Registration of a running upload; removed on drop.
pub struct Claim {
    owner: Arc<ActiveUploads>,
    key: (String, String),
    holder: Arc<Holder>,
}

impl Claim {
    /// Records progress (the holder is alive).
    pub fn progressed(&self) {
        let now = self.owner.now_ms();
        self.holder.last_progress_ms.store(now, Ordering::Relaxed);
    }

    /// Completes when a newer attempt takes over; the upload must then stop.
    pub async fn stopped(&self) {
        self.holder.stop.notified().await
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut holders = self.owner.lock();
        if holders
            .get(&self.key)
            .is_some_and(|h| h.id == self.holder.id)
        {
            holders.remove(&self.key);
        }
    }
}

impl ActiveUploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Holder>>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers the upload that now holds the partial of `user`'s `path`.
    pub fn claim(self: &Arc<Self>, user: &str, path: &str) -> Claim {
        let holder = Arc::new(Holder {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            stop: Notify::new(),
            last_progress_ms: AtomicU64::new(self.now_ms()),
        });
        let key = (user.to_string(), path.to_string());
        self.lock().insert(key.clone(), holder.clone());
        Claim {
            owner: self.clone(),
            key,
            holder,
        }
    }

    /// Stops the upload holding `user`'s `path` if it has made no progress for `idle`.
    pub fn stop_if_stalled(&self, user: &str, path: &str, idle: Duration) -> Holding {
        let holders = self.lock();
        let Some(h) = holders.get(&(user.to_string(), path.to_string())) else {
            return Holding::Nobody;
        };
        let last = h.last_progress_ms.load(Ordering::Relaxed);
        if self.now_ms().saturating_sub(last) < idle.as_millis() as u64 {
            return Holding::Moving;
        }
        h.stop.notify_one();
        Holding::Stopped
    }
}
