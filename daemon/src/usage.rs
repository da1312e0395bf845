//! What each user's work in progress costs the daemon right now, counted against per-user
//! caps: transfers running (each holds a blocking thread and up to `RECV_CHUNK_LEN *
//! PIPELINE_DEPTH` bytes of buffers) and prefix hashes running (each reads and hashes up to a
//! whole file before the client gets an answer).
//!
//! Counts are per daemon process and per account name, whichever connection or session the
//! work runs on; a slot is given back when its guard drops, however the work ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Work in progress of one user.
#[derive(Debug, Default)]
struct Counts {
    /// Uploads and downloads running.
    transfers: usize,
    /// Prefix hashes (resume checks) running.
    hashes: usize,
}

/// The kind of work a [`Slot`] counts.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Transfer,
    Hash,
}

/// Per-user counts of expensive work, shared by all connections.
#[derive(Debug, Default)]
pub struct Usage {
    /// Counts of users with some work in progress (others have no entry).
    counts: Mutex<HashMap<String, Counts>>,
    /// Woken whenever a slot is given back, for those waiting for one.
    freed: Notify,
}

/// One unit of counted work; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    /// The counts to give it back to.
    usage: Arc<Usage>,
    /// Whose it is.
    user: String,
    /// What it counts.
    kind: Kind,
}

impl Usage {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Counts>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transfer slot for `user` if fewer than `max` of theirs are running, else `None`
    /// (the caller answers "busy": waiting would let one user queue unbounded work).
    pub fn try_transfer(self: &Arc<Self>, user: &str, max: usize) -> Option<Slot> {
        self.try_take(user, Kind::Transfer, max)
    }

    /// A prefix-hash slot for `user`, waiting until fewer than `max` of theirs run. Waiting
    /// (rather than refusing) suits parallel resumes of one backup job; the caller races this
    /// against the client leaving, and the client's own deadline bounds the wait.
    pub async fn hash_slot(self: &Arc<Self>, user: &str, max: usize) -> Slot {
        loop {
            // Registered before the check, so a slot freed in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_take(user, Kind::Hash, max) {
                return slot;
            }
            freed.await;
        }
    }

    fn try_take(self: &Arc<Self>, user: &str, kind: Kind, max: usize) -> Option<Slot> {
        let mut counts = self.lock();
        let c = counts.entry(user.to_string()).or_default();
        let n = match kind {
            Kind::Transfer => &mut c.transfers,
            Kind::Hash => &mut c.hashes,
        };
        if *n >= max {
            if c.transfers == 0 && c.hashes == 0 {
                counts.remove(user);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            usage: self.clone(),
            user: user.to_string(),
            kind,
        })
    }

    /// Transfers of `user` running now.
    pub fn transfers(&self, user: &str) -> usize {
        self.lock().get(user).map_or(0, |c| c.transfers)
    }

    /// Prefix hashes of `user` running now.
    pub fn hashes(&self, user: &str) -> usize {
        self.lock().get(user).map_or(0, |c| c.hashes)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut counts = self.usage.lock();
            if let Some(c) = counts.get_mut(&self.user) {
                match self.kind {
                    Kind::Transfer => c.transfers = c.transfers.saturating_sub(1),
                    Kind::Hash => c.hashes = c.hashes.saturating_sub(1),
                }
                if c.transfers == 0 && c.hashes == 0 {
                    counts.remove(&self.user);
                }
            }
        }
        self.usage.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_are_capped_per_user_and_come_back() {
        let usage = Arc::new(Usage::default());
        let slots: Vec<_> = (0..3)
            .map(|_| usage.try_transfer("alice", 3).unwrap())
            .collect();
        assert!(usage.try_transfer("alice", 3).is_none());
        // Another user is not affected.
        let bob = usage.try_transfer("bob", 3).unwrap();
        assert_eq!(usage.transfers("alice"), 3);
        drop(slots);
        assert_eq!(usage.transfers("alice"), 0);
        assert!(usage.try_transfer("alice", 3).is_some());
        drop(bob);
        assert!(usage.lock().is_empty(), "no entry kept for idle users");
    }

    #[tokio::test]
    async fn a_hash_waits_for_a_free_slot() {
        let usage = Arc::new(Usage::default());
        let first = usage.hash_slot("alice", 1).await;
        let u = usage.clone();
        let waiter = tokio::spawn(async move {
            let _slot = u.hash_slot("alice", 1).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(usage.hashes("alice"), 1);
        drop(first);
        waiter.await.unwrap();
        assert_eq!(usage.hashes("alice"), 0);
    }
}
