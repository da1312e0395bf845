//! Brute-force defence in the manner of OpenSSH's PerSourcePenalties: every failed password or
//! token check (login, authentication, the shutdown request's password) adds penalty time to
//! its source; a source whose penalty exceeds a threshold has its passwords refused (without
//! spending a password check on them) until the penalty falls back below it.
//! Other sources are unaffected. Sources are keyed by [`crate::admission::source_key`] under
//! `limits.per_source_net_block_size` (default: IPv4 address, IPv6 /64, since one host usually
//! owns a whole /64). The table is bounded: when full, the entry closest to expiry is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Penalty settings (`[penalties]` in the config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PenaltySettings {
    /// Seconds added to a source's penalty by each failed login.
    pub per_failure_secs: u64,
    /// A source is refused while its penalty exceeds this many seconds.
    pub threshold_secs: u64,
    /// Longest penalty a source can accumulate, in seconds.
    pub max_secs: u64,
    /// Most sources tracked at once.
    pub max_sources: usize,
}

impl Default for PenaltySettings {
    fn default() -> Self {
        PenaltySettings {
            per_failure_secs: 5,
            threshold_secs: 15,
            max_secs: 600,
            max_sources: 65_536,
        }
    }
}

/// Per-source penalties.
pub struct Penalties {
    /// The settings in force.
    settings: PenaltySettings,
    /// What makes one source (shared with admission).
    blocks: crate::admission::NetBlockSize,
    /// When each penalised source's penalty runs out.
    until: Mutex<HashMap<IpAddr, Instant>>,
}

impl Penalties {
    /// An empty table.
    pub fn new(settings: PenaltySettings) -> Self {
        Penalties {
            settings,
            blocks: Default::default(),
            until: Mutex::new(HashMap::new()),
        }
    }

    /// Keys sources by `blocks` prefix lengths instead of the default `32:64`.
    pub fn keyed_by(mut self, blocks: crate::admission::NetBlockSize) -> Self {
        self.blocks = blocks;
        self
    }

    fn source_key(&self, ip: IpAddr) -> IpAddr {
        crate::admission::source_key(ip, self.blocks)
    }

    /// If `ip` is refused now, how long until it is allowed again.
    pub fn refused_for(&self, ip: IpAddr) -> Option<Duration> {
        self.refused_for_at(ip, Instant::now())
    }

    fn refused_for_at(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let left = map
            .get(&self.source_key(ip))?
            .saturating_duration_since(now);
        let threshold = Duration::from_secs(self.settings.threshold_secs);
        (left > threshold).then(|| left - threshold)
    }

    /// Records a failed login from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, Instant::now());
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        let key = self.source_key(ip);
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&key) && map.len() >= self.settings.max_sources {
            map.retain(|_, until| *until > now);
            if map.len() >= self.settings.max_sources
                && let Some(oldest) = map.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        let current = map.get(&key).copied().filter(|u| *u > now).unwrap_or(now);
        let extended = current + Duration::from_secs(self.settings.per_failure_secs);
        let cap = now + Duration::from_secs(self.settings.max_secs);
        map.insert(key, extended.min(cap));
    }

    /// Sources currently tracked (for tests and logs).
    pub fn len(&self) -> usize {
        self.until.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_accumulate_past_the_threshold_then_expire() {
        let p = Penalties::new(PenaltySettings::default());
        let t0 = Instant::now();
        let a = ip("127.0.0.2");
        for _ in 0..3 {
            p.record_failure_at(a, t0);
        }
        assert_eq!(
            p.refused_for_at(a, t0),
            None,
            "15 s is not over the threshold"
        );
        p.record_failure_at(a, t0);
        assert_eq!(p.refused_for_at(a, t0), Some(Duration::from_secs(5)));
        for _ in 0..6 {
            p.record_failure_at(a, t0);
        }
        // 10 failures: 50 s of penalty, refused for 35 s.
        assert_eq!(p.refused_for_at(a, t0), Some(Duration::from_secs(35)));
        assert_eq!(
            p.refused_for_at(ip("127.0.0.3"), t0),
            None,
            "others unaffected"
        );
        assert_eq!(p.refused_for_at(a, t0 + Duration::from_secs(36)), None);
    }

    #[test]
    fn penalties_are_capped() {
        let p = Penalties::new(PenaltySettings::default());
        let t0 = Instant::now();
        for _ in 0..1000 {
            p.record_failure_at(ip("10.0.0.1"), t0);
        }
        assert_eq!(
            p.refused_for_at(ip("10.0.0.1"), t0),
            Some(Duration::from_secs(600 - 15))
        );
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64_and_mapped_v4_is_v4() {
        let p = Penalties::new(PenaltySettings::default());
        for _ in 0..10 {
            p.record_failure_at(ip("2001:db8::1"), Instant::now());
            p.record_failure_at(ip("::ffff:10.1.2.3"), Instant::now());
        }
        assert!(p.refused_for(ip("2001:db8::2")).is_some());
        assert!(p.refused_for(ip("10.1.2.3")).is_some());
        let p = Penalties::new(PenaltySettings::default());
        let t0 = Instant::now();
        for _ in 0..10 {
            p.record_failure_at(ip("2001:db8:1:2::5"), t0);
        }
        assert!(p.refused_for_at(ip("2001:db8:1:2::9"), t0).is_some());
        assert!(p.refused_for_at(ip("2001:db8:1:3::9"), t0).is_none());
    }

    #[test]
    fn the_block_size_of_admission_keys_penalties_too() {
        let blocks = crate::admission::NetBlockSize::try_from("24:48".to_string()).unwrap();
        let p = Penalties::new(PenaltySettings::default()).keyed_by(blocks);
        let t0 = Instant::now();
        for _ in 0..10 {
            p.record_failure_at(ip("2001:db8:1:2::5"), t0);
            p.record_failure_at(ip("192.0.2.5"), t0);
        }
        assert!(p.refused_for_at(ip("2001:db8:1:ff::9"), t0).is_some());
        assert!(p.refused_for_at(ip("2001:db8:2::9"), t0).is_none());
        assert!(p.refused_for_at(ip("192.0.2.200"), t0).is_some());
        assert!(p.refused_for_at(ip("192.0.3.5"), t0).is_none());
    }

    #[test]
    fn the_table_is_bounded() {
        let p = Penalties::new(PenaltySettings {
            max_sources: 100,
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..1000u32 {
            p.record_failure_at(IpAddr::V4(i.into()), t0 + Duration::from_millis(i as u64));
        }
        assert!(p.len() <= 100);
        // The newest source is still tracked.
        let newest = IpAddr::V4(999u32.into());
        p.record_failure_at(newest, t0 + Duration::from_secs(1));
        p.record_failure_at(newest, t0 + Duration::from_secs(1));
        p.record_failure_at(newest, t0 + Duration::from_secs(1));
        assert!(
            p.refused_for_at(newest, t0 + Duration::from_secs(1))
                .is_some()
        );
    }
}
