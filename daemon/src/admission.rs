//! Admission: which connections the daemon takes on, in two stages like OpenSSH.
//!
//! *Before authentication* a connection is in the unauthenticated pool, capped per source (an
//! IPv4 address or an IPv6 prefix, [`source_key`]) and in total, with random early drop
//! between a start and a full level (`limits.max_startups`, OpenSSH's MaxStartups). Two
//! departures from OpenSSH keep strangers from locking users out: a source's *first* pending
//! connection is exempt from the random drop below the full level, and at the full level a
//! newcomer from a source holding at least two fewer pending connections than the heaviest
//! source takes the place of that source's oldest one (fair share), so a flood from many
//! addresses cannot hold the pool against a user from another address. Under pressure (more
//! pending connections than the start level) new connections get shorter handshake and login
//! deadlines, so idling costs an attacker more than the daemon.
//!
//! *After authentication* the connection leaves the pool ([`Ticket::enter_session`]) and counts
//! against the session caps, in total and per user, never per address: strangers cannot push a
//! logged-in user out, and one host may run many sessions.
//!
//! A connection refused before TLS gets one plain line ([`REFUSAL_PREFIX`], see
//! proto/README.md §1) so that the user learns why; refusals are logged at info, at most once
//! per source and minute, with a count ([`RefusalLog`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::Limits;

pub use xfer_proto::{MAX_REFUSAL_LINE, REFUSAL_PREFIX};
/// Refused connections kept open at once to drain the client's hello, so that closing does
/// not turn into a reset that destroys the refusal line; beyond this they are closed at once.
pub const MAX_LINGERING: usize = 64;
/// How long a refused connection is drained at most.
pub const LINGER: Duration = Duration::from_secs(1);
/// Shortest TLS handshake deadline under pressure: a client on a slow link still gets through.
pub const HANDSHAKE_FLOOR: Duration = Duration::from_secs(2);
/// Shortest login deadline under pressure: leaves time for a queued password check.
pub const LOGIN_FLOOR: Duration = Duration::from_secs(5);
/// Descriptors one connection may hold at once (socket, user tree, file, staging folder);
/// the fd budget check multiplies the connection cap by this.
pub const FDS_PER_CONNECTION: u64 = 4;
/// Descriptors kept for everything else (listener, logs, users and sessions files, and the
/// refused connections being drained).
pub const FDS_RESERVED: u64 = 64 + MAX_LINGERING as u64;
/// Sources whose refusals are counted for the log at once; beyond, one shared entry counts.
pub const MAX_LOGGED_SOURCES: usize = 4096;
/// Refusals from one source are logged at most once per this period.
pub const LOG_PERIOD: Duration = Duration::from_secs(60);

/// `limits.max_startups`: `start:rate:full` as in OpenSSH's MaxStartups. Below `start`
/// unauthenticated connections every new one is accepted; from `start` on, each is dropped with
/// a probability rising linearly from `rate` % to 100 % at `full`; at `full` all are (but see
/// the fair-share rule in the module docs). A single number `N` means `N:100:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Startups {
    /// Unauthenticated connections accepted without any random drop.
    pub start: usize,
    /// Drop probability in percent at `start`.
    pub rate: u32,
    /// Unauthenticated connections at which every newcomer is dropped.
    pub full: usize,
}

impl Default for Startups {
    fn default() -> Self {
        Startups {
            start: 10,
            rate: 30,
            full: 100,
        }
    }
}

impl TryFrom<String> for Startups {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!(
                "limits.max_startups: `{s}` is not START:RATE:FULL (such as \"10:30:100\") or a number"
            )
        };
        let nums: Vec<&str> = s.split(':').collect();
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
        let (start, rate, full) = match nums.as_slice() {
            [n] => (num(n)?, 100, num(n)?),
            [a, r, f] => (num(a)?, num(r)?, num(f)?),
            _ => return Err(bad()),
        };
        if start == 0 || start > full || rate > 100 {
            return Err(format!(
                "limits.max_startups: `{s}` needs 0 < START <= FULL and RATE between 0 and 100"
            ));
        }
        Ok(Startups {
            start,
            rate: rate as u32,
            full,
        })
    }
}

impl From<Startups> for String {
    fn from(s: Startups) -> String {
        s.to_string()
    }
}

impl Startups {
    /// Whether a newcomer is dropped when `pending` connections wait, given `roll`, a uniform
    /// random number in 0..100 (OpenSSH's `drop_connection`).
    pub fn drops(&self, pending: usize, roll: u32) -> bool {
        if pending < self.start {
            return false;
        }
        if pending >= self.full || self.rate >= 100 {
            return true;
        }
        let p = (100 - self.rate) as usize * (pending - self.start) / (self.full - self.start)
            + self.rate as usize;
        (roll as usize) < p
    }

    /// How far `pending` is from `start` towards `full`, 0.0 to 1.0.
    fn pressure(&self, pending: usize) -> f64 {
        if pending <= self.start {
            return 0.0;
        }
        if self.full <= self.start {
            return 1.0;
        }
        ((pending - self.start) as f64 / (self.full - self.start) as f64).min(1.0)
    }
}

/// `limits.per_source_net_block_size`: `V4:V6` prefix lengths that make one source, as
/// OpenSSH's PerSourceNetBlockSize. The default `32:64` is one IPv4 address or one IPv6 /64
/// (one host usually owns a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetBlockSize {
    /// IPv4 prefix length, 0 to 32.
    pub v4: u8,
    /// IPv6 prefix length, 0 to 128.
    pub v6: u8,
}

impl Default for NetBlockSize {
    fn default() -> Self {
        NetBlockSize { v4: 32, v6: 64 }
    }
}

impl TryFrom<String> for NetBlockSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!(
                "limits.per_source_net_block_size: `{s}` is not V4:V6 prefix lengths such as \"32:64\""
            )
        };
        let (a, b) = s.split_once(':').ok_or_else(bad)?;
        let v4: u8 = a.trim().parse().map_err(|_| bad())?;
        let v6: u8 = b.trim().parse().map_err(|_| bad())?;
        if v4 > 32 || v6 > 128 {
            return Err(format!(
                "limits.per_source_net_block_size: `{s}`: IPv4 up to 32 and IPv6 up to 128"
            ));
        }
        Ok(NetBlockSize { v4, v6 })
    }
}

impl From<NetBlockSize> for String {
    fn from(b: NetBlockSize) -> String {
        format!("{}:{}", b.v4, b.v6)
    }
}

/// The key a source is counted and penalised under: the address with all bits past the
/// configured prefix cleared (an IPv4-mapped IPv6 address counts as IPv4). The one function
/// both admission and the login penalties use.
pub fn source_key(ip: IpAddr, blocks: NetBlockSize) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(blocks.v4)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(blocks.v6))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// A source key as people read it: the bare address for a whole-address block, else
/// `ADDR/PREFIX`.
pub fn source_label(key: IpAddr, blocks: NetBlockSize) -> String {
    match key {
        IpAddr::V4(_) if blocks.v4 == 32 => key.to_string(),
        IpAddr::V6(_) if blocks.v6 == 128 => key.to_string(),
        IpAddr::V4(_) => format!("{key}/{}", blocks.v4),
        IpAddr::V6(_) => format!("{key}/{}", blocks.v6),
    }
}

/// Why a connection or a session was refused; the text is what the client shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The source has its share of unauthenticated connections.
    #[error("too many connections from {label} ({count}); try again in a few seconds")]
    PerSource {
        /// The source, as [`source_label`] writes it.
        label: String,
        /// Its cap.
        count: usize,
    },
    /// The unauthenticated pool is full (or the random early drop chose this one).
    #[error(
        "server busy: too many unauthenticated connections ({count}); try again in a few seconds"
    )]
    Startups {
        /// Unauthenticated connections open.
        count: usize,
    },
    /// The overall connection cap (file descriptors) is reached.
    #[error("server busy: too many connections ({count}); try again later")]
    Connections {
        /// The cap.
        count: usize,
    },
    /// The session cap in total is reached.
    #[error("server busy: too many sessions ({count}); try again later")]
    Sessions {
        /// The cap.
        count: usize,
    },
    /// The user has as many sessions as allowed.
    #[error(
        "server busy: too many sessions for {user} ({count}); close some (or wait for them to end) and try again"
    )]
    UserSessions {
        /// The account.
        user: String,
        /// The cap.
        count: usize,
    },
    /// The connection waited unauthenticated and was closed to make room for another source.
    #[error(
        "server busy: too many unauthenticated connections; this one was closed to make room; try again"
    )]
    Evicted,
}

impl Refusal {
    /// A short name for the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::PerSource { .. } => "per-source cap",
            Refusal::Startups { .. } => "max_startups",
            Refusal::Connections { .. } => "max_connections",
            Refusal::Sessions { .. } => "max_sessions",
            Refusal::UserSessions { .. } => "max_sessions_per_user",
            Refusal::Evicted => "evicted for fair share",
        }
    }

    /// The plain line sent before TLS: prefix, reason, newline; ASCII, capped.
    pub fn line(&self) -> Vec<u8> {
        let mut text: String = format!("{REFUSAL_PREFIX}{self}")
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
            .take(MAX_REFUSAL_LINE - 1)
            .collect();
        text.push('\n');
        text.into_bytes()
    }
}

/// The caps in force, taken from [`Limits`] (and a reload).
#[derive(Debug, Clone, Copy)]
struct Caps {
    /// Unauthenticated pool levels.
    startups: Startups,
    /// Unauthenticated connections per source.
    per_source: usize,
    /// What makes a source.
    blocks: NetBlockSize,
    /// Sessions in total.
    sessions: usize,
    /// Sessions per user.
    per_user: usize,
    /// All connections, the file-descriptor safety net (after the fd budget check).
    connections: usize,
    /// Configured handshake deadline.
    handshake: Duration,
    /// Configured login deadline.
    login: Duration,
    /// Deadlines at full pressure, in percent of the configured ones.
    pressure_percent: u32,
}

impl Caps {
    fn from(limits: &Limits, connections: usize) -> Caps {
        Caps {
            startups: limits.max_startups,
            per_source: limits.max_startups_per_source,
            blocks: limits.per_source_net_block_size,
            sessions: limits.max_sessions,
            per_user: limits.max_sessions_per_user,
            connections,
            handshake: limits.handshake_timeout(),
            login: limits.login_timeout(),
            pressure_percent: limits.pressure_deadline_percent.min(100),
        }
    }

    /// `configured` scaled down with `pressure` (0..1) to `pressure_percent` at full, never
    /// below `floor` (nor above `configured`).
    fn scaled(&self, configured: Duration, floor: Duration, pressure: f64) -> Duration {
        let keep = 1.0 - (1.0 - f64::from(self.pressure_percent) / 100.0) * pressure;
        configured.mul_f64(keep).max(floor).min(configured)
    }
}

/// Where a counted connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// In the unauthenticated pool under this source key.
    Pending(IpAddr),
    /// One of this user's sessions.
    Session(String),
}

/// The counts, under one lock.
#[derive(Default)]
struct Table {
    /// Unauthenticated connections per source: ticket id (increasing, so oldest first) to
    /// the signal that evicts it.
    pending: HashMap<IpAddr, BTreeMap<u64, Arc<Notify>>>,
    /// Unauthenticated connections in total.
    pending_total: usize,
    /// Sessions per user (only users with some).
    sessions: HashMap<String, usize>,
    /// Sessions in total.
    sessions_total: usize,
    /// State of the random early drop's generator.
    rng: u64,
}

impl Table {
    /// A uniform number in 0..100 (xorshift; unpredictability is not needed here).
    fn roll(&mut self) -> u32 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x % 100) as u32
    }

    /// Takes `id` out of `source`'s pending set; false if it was not there (evicted).
    fn unpend(&mut self, source: IpAddr, id: u64) -> bool {
        let Some(set) = self.pending.get_mut(&source) else {
            return false;
        };
        let removed = set.remove(&id).is_some();
        if set.is_empty() {
            self.pending.remove(&source);
        }
        if removed {
            self.pending_total -= 1;
        }
        removed
    }

    /// Evicts the oldest pending connection of `source` (signalling it to close); false if
    /// `source` has none.
    fn evict_oldest(&mut self, source: IpAddr) -> bool {
        let Some((&id, evict)) = self
            .pending
            .get(&source)
            .and_then(|set| set.first_key_value())
        else {
            return false;
        };
        evict.notify_one();
        self.unpend(source, id)
    }
}

/// The admission state of the whole daemon: counts, caps and the refusal log.
pub struct Admission {
    /// Caps in force (a reload swaps them).
    caps: RwLock<Caps>,
    /// Counts.
    table: Mutex<Table>,
    /// Source of ticket ids.
    next_id: AtomicU64,
    /// Refused connections being drained now.
    lingering: AtomicUsize,
    /// Rate limit of refusal log lines.
    log: Mutex<RefusalLog>,
}

/// One admitted connection; dropping it gives its place back.
pub struct Ticket {
    /// The counts to give the place back to.
    admission: Arc<Admission>,
    /// This ticket's id (its age order among pending ones).
    id: u64,
    /// Where it is counted.
    stage: Stage,
    /// Signalled when the connection is evicted from the pool.
    evict: Arc<Notify>,
    /// TLS handshake deadline given at admission.
    handshake: Duration,
    /// Login deadline given at admission.
    login: Duration,
}

impl Admission {
    /// Admission under `limits`; `connections` is the overall cap after the fd budget check
    /// (see [`fit_fd_budget`]).
    pub fn new(limits: &Limits, connections: usize) -> Arc<Admission> {
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.finish() | 1
        };
        Arc::new(Admission {
            caps: RwLock::new(Caps::from(limits, connections)),
            table: Mutex::new(Table {
                rng: seed,
                ..Default::default()
            }),
            next_id: AtomicU64::new(1),
            lingering: AtomicUsize::new(0),
            log: Mutex::new(RefusalLog::default()),
        })
    }

    /// Takes new caps (a reload); connections already admitted stay. The source block size
    /// stays as it was (the counts and the penalties are keyed by it; it needs a restart).
    pub fn set_limits(&self, limits: &Limits, connections: usize) {
        let mut caps = self.caps.write().unwrap_or_else(|e| e.into_inner());
        let blocks = caps.blocks;
        *caps = Caps {
            blocks,
            ..Caps::from(limits, connections)
        };
    }

    fn caps(&self) -> Caps {
        *self.caps.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Stage one: admits a new connection from `ip` into the unauthenticated pool, or says
    /// why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        self.admit_rolling(ip, None)
    }

    /// [`Admission::admit`] with the random early drop's roll (0..100) given, for tests.
    pub fn admit_with_roll(self: &Arc<Self>, ip: IpAddr, roll: u32) -> Result<Ticket, Refusal> {
        self.admit_rolling(ip, Some(roll))
    }

    fn admit_rolling(self: &Arc<Self>, ip: IpAddr, roll: Option<u32>) -> Result<Ticket, Refusal> {
        let caps = self.caps();
        let source = source_key(ip, caps.blocks);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.pending_total + t.sessions_total >= caps.connections {
            return Err(Refusal::Connections {
                count: caps.connections,
            });
        }
        let mine = t.pending.get(&source).map_or(0, |s| s.len());
        if mine >= caps.per_source {
            return Err(Refusal::PerSource {
                label: source_label(source, caps.blocks),
                count: caps.per_source,
            });
        }
        let pending = t.pending_total;
        let roll = roll.unwrap_or_else(|| t.roll());
        // A source's first pending connection is exempt from the random drop below full, so
        // that a user's command is not refused by chance while others flood.
        let exempt = mine == 0 && pending < caps.startups.full;
        let mut evicted = None;
        if !exempt && caps.startups.drops(pending, roll) {
            // Fair share: a lighter source takes the oldest place of the heaviest one.
            let heaviest = t
                .pending
                .iter()
                .max_by_key(|(_, set)| set.len())
                .map(|(k, set)| (*k, set.len()));
            match heaviest {
                Some((victim, n)) if n >= mine + 2 => {
                    t.evict_oldest(victim);
                    evicted = Some(victim);
                }
                _ => return Err(Refusal::Startups { count: pending }),
            }
        }
        let pressure = caps.startups.pressure(t.pending_total + 1);
        let ticket = self.ticket_in(
            &mut t,
            source,
            caps.scaled(caps.handshake, HANDSHAKE_FLOOR, pressure),
            caps.scaled(caps.login, LOGIN_FLOOR, pressure),
        );
        // Logged after the counts are unlocked: the next accept need not wait on the log.
        drop(t);
        if let Some(victim) = evicted {
            self.log_refusal(victim, &Refusal::Evicted);
        }
        Ok(ticket)
    }

    /// Counts a connection that did not come through the listener (in-process streams, the
    /// fuzzer) in the pool without checking any cap.
    pub fn admit_unchecked(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let caps = self.caps();
        let source = source_key(ip, caps.blocks);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        self.ticket_in(&mut t, source, caps.handshake, caps.login)
    }

    fn ticket_in(
        self: &Arc<Self>,
        t: &mut Table,
        source: IpAddr,
        handshake: Duration,
        login: Duration,
    ) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        t.pending
            .entry(source)
            .or_default()
            .insert(id, evict.clone());
        t.pending_total += 1;
        Ticket {
            admission: self.clone(),
            id,
            stage: Stage::Pending(source),
            evict,
            handshake,
            login,
        }
    }

    /// Unauthenticated connections open now.
    pub fn pending(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending_total
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sessions_total
    }

    /// Logs a refusal of `ip`'s source at info, at most once per source and [`LOG_PERIOD`],
    /// with how many were refused since the last line.
    pub fn log_refusal(&self, ip: IpAddr, why: &Refusal) {
        let blocks = self.caps().blocks;
        let source = source_key(ip, blocks);
        let due = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(source, Instant::now());
        // The label is only written (and allocated) for the lines that are due.
        if let Some(count) = due {
            let label = source_label(source, blocks);
            tracing::info!(source = %label, reason = why.kind(), refused = count, "connection refused: {why}");
        }
    }

    /// Sends `why` on a connection refused before TLS, then drains what the client sends for
    /// up to [`LINGER`] (at most [`MAX_LINGERING`] at once), so that the close does not turn
    /// into a reset that would destroy the line before the client reads it.
    pub fn refuse(self: &Arc<Self>, tcp: tokio::net::TcpStream, ip: IpAddr, why: &Refusal) {
        self.log_refusal(ip, why);
        // The socket is fresh, so its send buffer takes the short line at once.
        let _ = tcp.try_write(&why.line());
        if self.lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            self.lingering.fetch_sub(1, Ordering::Relaxed);
            drop(tcp);
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            drain(tcp).await;
            me.lingering.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Half-closes `tcp` and reads whatever arrives until EOF or [`LINGER`].
async fn drain(tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tcp;
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 2048];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// The TLS handshake deadline for this connection (shorter under pressure).
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake
    }

    /// The login deadline for this connection (shorter under pressure).
    pub fn login_timeout(&self) -> Duration {
        self.login
    }

    /// True once the connection has become a session.
    pub fn is_session(&self) -> bool {
        matches!(self.stage, Stage::Session(_))
    }

    /// Completes when the connection is evicted from the pool to make room for another
    /// source (never, once it is a session).
    pub async fn evicted(&self) {
        if self.is_session() {
            return std::future::pending().await;
        }
        self.evict.notified().await
    }

    /// Stage two: the connection authenticated as `user` leaves the unauthenticated pool and
    /// becomes one of `user`'s sessions, unless a session cap is reached.
    pub fn enter_session(&mut self, user: &str) -> Result<(), Refusal> {
        if matches!(&self.stage, Stage::Session(now) if now == user) {
            return Ok(());
        }
        let caps = self.admission.caps();
        let mut t = self
            .admission
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let already = usize::from(self.is_session());
        if t.sessions_total - already >= caps.sessions {
            return Err(Refusal::Sessions {
                count: caps.sessions,
            });
        }
        if t.sessions.get(user).copied().unwrap_or(0) >= caps.per_user {
            return Err(Refusal::UserSessions {
                user: user.to_string(),
                count: caps.per_user,
            });
        }
        match std::mem::replace(&mut self.stage, Stage::Session(user.to_string())) {
            Stage::Pending(source) => {
                t.unpend(source, self.id);
            }
            Stage::Session(old) => leave_session(&mut t, &old),
        }
        *t.sessions.entry(user.to_string()).or_insert(0) += 1;
        t.sessions_total += 1;
        Ok(())
    }
}

fn leave_session(t: &mut Table, user: &str) {
    if let Some(n) = t.sessions.get_mut(user) {
        *n -= 1;
        if *n == 0 {
            t.sessions.remove(user);
        }
    }
    t.sessions_total -= 1;
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self
            .admission
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &self.stage {
            Stage::Pending(source) => {
                t.unpend(*source, self.id);
            }
            Stage::Session(user) => leave_session(&mut t, user),
        }
    }
}

/// Rate limit for refusal log lines: per source, the time of its last line and how many
/// refusals came since. Bounded by [`MAX_LOGGED_SOURCES`]; past it, one shared entry.
#[derive(Default)]
pub struct RefusalLog {
    /// Per source: when its last line was written, refusals since.
    sources: HashMap<IpAddr, (Instant, u64)>,
    /// No entry of `sources` was last logged before this (a lower bound), so that a full
    /// table is swept for expired entries only once one may have expired, not on every
    /// refusal of a new source during a flood.
    oldest: Option<Instant>,
    /// The shared entry for sources beyond the bound.
    overflow: Option<(Instant, u64)>,
}

impl RefusalLog {
    /// Counts a refusal of `source` at `now`; returns the count to log if a line is due.
    pub fn record(&mut self, source: IpAddr, now: Instant) -> Option<u64> {
        if !self.sources.contains_key(&source)
            && self.sources.len() >= MAX_LOGGED_SOURCES
            && self
                .oldest
                .is_none_or(|o| now.saturating_duration_since(o) >= LOG_PERIOD)
        {
            self.sources
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < LOG_PERIOD);
            self.oldest = self.sources.values().map(|&(at, _)| at).min();
        }
        let entry = if self.sources.contains_key(&source) || self.sources.len() < MAX_LOGGED_SOURCES
        {
            self.sources.get_mut(&source)
        } else {
            self.overflow.as_mut()
        };
        match entry {
            Some((at, since)) => {
                *since += 1;
                if now.saturating_duration_since(*at) < LOG_PERIOD {
                    return None;
                }
                let count = *since;
                *at = now;
                *since = 0;
                Some(count)
            }
            None => {
                if self.sources.len() < MAX_LOGGED_SOURCES {
                    self.sources.insert(source, (now, 0));
                    self.oldest = Some(self.oldest.map_or(now, |o| o.min(now)));
                } else {
                    self.overflow = Some((now, 0));
                }
                Some(1)
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit (the default soft limit of 1,024 is
/// too small for hundreds of connections each holding a few descriptors); returns the soft
/// limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let wanted = lim.maximum;
        lim.current = wanted;
        if setrlimit(Resource::Nofile, lim).is_err() {
            tracing::warn!("cannot raise the open-file limit to its hard limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The overall connection cap that fits `nofile` descriptors: `max_connections` or, if that
/// would not fit ([`FDS_PER_CONNECTION`] each, [`FDS_RESERVED`] kept), as many as do.
pub fn fit_fd_budget(max_connections: usize, nofile: u64) -> usize {
    let fits = nofile.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION;
    (max_connections as u64).min(fits).max(1) as usize
}

/// Checks the caps against the open-file limit and logs what does not fit; returns the overall
/// connection cap to use.
pub fn connection_cap(limits: &Limits, nofile: u64) -> usize {
    let cap = fit_fd_budget(limits.max_connections, nofile);
    if cap < limits.max_connections {
        tracing::warn!(
            max_connections = limits.max_connections,
            open_file_limit = nofile,
            using = cap,
            "limits.max_connections does not fit the open-file limit (each connection may hold {FDS_PER_CONNECTION} descriptors); lowered; raise LimitNOFILE / ulimit -n"
        );
    }
    let needed = limits.max_sessions + limits.max_startups.full;
    if cap < needed {
        tracing::warn!(
            max_connections = cap,
            max_sessions = limits.max_sessions,
            max_startups_full = limits.max_startups.full,
            "the connection cap is below limits.max_sessions plus the full level of limits.max_startups: sessions beyond {} will be refused",
            cap.saturating_sub(limits.max_startups.full)
        );
    }
    cap
}

impl fmt::Display for Startups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(edit: impl FnOnce(&mut Limits)) -> Arc<Admission> {
        let mut l = Limits::default();
        edit(&mut l);
        Admission::new(&l, l.max_connections)
    }

    /// Admission with `limits.max_startups = startups` and `per_source` pending per source.
    fn pool(startups: &str, per_source: usize) -> Arc<Admission> {
        pool_with(startups, per_source, |_| {})
    }

    /// [`pool`] with more `edit`s of the limits.
    fn pool_with(
        startups: &str,
        per_source: usize,
        edit: impl FnOnce(&mut Limits),
    ) -> Arc<Admission> {
        limits(|l| {
            l.max_startups = Startups::try_from(startups.to_string()).unwrap();
            l.max_startups_per_source = per_source;
            edit(l);
        })
    }

    #[test]
    fn ipv6_sources_group_by_64_and_the_block_size_is_configurable() {
        let d = NetBlockSize::default();
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1"), d),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            source_key(ip("2001:db8::1"), d),
            source_key(ip("2001:db8::2"), d)
        );
        assert_ne!(
            source_key(ip("2001:db8:0:1::1"), d),
            source_key(ip("2001:db8:0:2::1"), d)
        );
        assert_eq!(source_key(ip("::ffff:10.1.2.3"), d), ip("10.1.2.3"));
        assert_eq!(source_key(ip("10.1.2.3"), d), ip("10.1.2.3"));
        assert_eq!(source_label(ip("2001:db8::"), d), "2001:db8::/64");
        assert_eq!(source_label(ip("10.1.2.3"), d), "10.1.2.3");

        let wide = NetBlockSize::try_from("24:48".to_string()).unwrap();
        assert_eq!(source_key(ip("10.1.2.3"), wide), ip("10.1.2.0"));
        assert_eq!(
            source_key(ip("2001:db8:1:2::1"), wide),
            source_key(ip("2001:db8:1:ffff::1"), wide)
        );
        assert_eq!(source_label(ip("10.1.2.0"), wide), "10.1.2.0/24");
        let all = NetBlockSize { v4: 0, v6: 0 };
        assert_eq!(source_key(ip("192.0.2.7"), all), ip("0.0.0.0"));
        assert_eq!(source_key(ip("2001:db8::7"), all), ip("::"));
        let exact = NetBlockSize { v4: 32, v6: 128 };
        assert_ne!(
            source_key(ip("2001:db8::1"), exact),
            source_key(ip("2001:db8::2"), exact)
        );
        for bad in ["33:64", "32:129", "32", "a:b"] {
            assert!(NetBlockSize::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn max_startups_parses_like_openssh() {
        let s = Startups::try_from("10:30:100".to_string()).unwrap();
        assert_eq!((s.start, s.rate, s.full), (10, 30, 100));
        let n = Startups::try_from("50".to_string()).unwrap();
        assert_eq!((n.start, n.rate, n.full), (50, 100, 50));
        for bad in ["", "10:30", "0:30:100", "20:30:10", "10:101:100", "x"] {
            assert!(Startups::try_from(bad.to_string()).is_err(), "{bad}");
        }
        assert_eq!(String::from(s), "10:30:100");
    }

    #[test]
    fn random_early_drop_rises_from_rate_at_start_to_all_at_full() {
        let s = Startups::default();
        // Below start: never.
        assert!((0..100).all(|r| !s.drops(9, r)));
        // At start: 30 %.
        assert_eq!((0..100).filter(|&r| s.drops(10, r)).count(), 30);
        // Halfway (55 of 10..100): 30 + 70 * 45 / 90 = 65 %.
        assert_eq!((0..100).filter(|&r| s.drops(55, r)).count(), 65);
        // At full and beyond: always.
        assert!((0..100).all(|r| s.drops(100, r) && s.drops(500, r)));
    }

    #[test]
    fn the_random_drop_refuses_between_start_and_full_with_an_injected_roll() {
        let a = pool("2:50:4", 10);
        let src = ip("192.0.2.1");
        let _t1 = a.admit_with_roll(src, 0).unwrap();
        let _t2 = a.admit_with_roll(src, 0).unwrap();
        // 2 pending, start 2: drop probability 50 %.
        assert!(a.admit_with_roll(src, 10).is_err());
        let _t3 = a.admit_with_roll(src, 50).unwrap();
        // 3 pending: 50 + 50 * 1 / 2 = 75 %.
        let r = a.admit_with_roll(src, 74);
        assert!(matches!(r, Err(Refusal::Startups { count: 3 })), "{r:?}");
        let _t4 = a.admit_with_roll(src, 75).unwrap();
        assert!(a.admit_with_roll(src, 99).is_err(), "full");
        // Below full, a source's first connection is exempt from the drop.
        drop(_t4);
        assert!(a.admit_with_roll(src, 0).is_err());
        let _other = a.admit_with_roll(ip("192.0.2.2"), 0).unwrap();
        assert_eq!(a.pending(), 4);
    }

    #[test]
    fn the_per_source_cap_counts_prefixes_and_places_come_back() {
        let a = limits(|l| l.max_startups_per_source = 2);
        let t1 = a.admit_with_roll(ip("2001:db8::1"), 99).unwrap();
        let _t2 = a.admit_with_roll(ip("2001:db8::2"), 99).unwrap();
        let err = a.admit_with_roll(ip("2001:db8::3"), 99).unwrap_err();
        assert_eq!(
            err.to_string(),
            "too many connections from 2001:db8::/64 (2); try again in a few seconds"
        );
        assert!(a.admit_with_roll(ip("2001:db8:0:1::1"), 99).is_ok());
        drop(t1);
        assert!(a.admit_with_roll(ip("2001:db8::3"), 99).is_ok());
    }

    #[test]
    fn a_full_pool_makes_room_for_a_lighter_source_and_not_for_a_heavy_one() {
        let a = pool("4:100:4", 10);
        let heavy = ip("192.0.2.1");
        let held: Vec<Ticket> = (0..4)
            .map(|_| a.admit_with_roll(heavy, 0).unwrap())
            .collect();
        assert!(matches!(
            a.admit_with_roll(heavy, 0),
            Err(Refusal::Startups { .. })
        ));
        // A user from elsewhere takes the oldest place of the heaviest source.
        let user = a.admit_with_roll(ip("198.51.100.7"), 0).unwrap();
        assert_eq!(a.pending(), 4);
        let evicted = held[0].evict.clone();
        // The permit is stored, so the evicted connection sees it even if it was not waiting.
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), evicted.notified())
                    .await
                    .expect("the oldest connection of the heaviest source is evicted")
            });
        // Dropping the evicted ticket does not count it twice.
        drop(held);
        assert_eq!(a.pending(), 1);
        drop(user);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn sessions_leave_the_pool_and_count_per_user_never_per_source() {
        let a = limits(|l| {
            l.max_startups_per_source = 2;
            l.max_sessions_per_user = 3;
            l.max_sessions = 4;
        });
        let src = ip("127.0.0.1");
        let mut alice = Vec::new();
        for _ in 0..3 {
            let mut t = a.admit_with_roll(src, 99).unwrap();
            t.enter_session("alice").unwrap();
            alice.push(t);
        }
        assert_eq!((a.pending(), a.sessions()), (0, 3));
        let mut t = a.admit_with_roll(src, 99).unwrap();
        assert_eq!(
            t.enter_session("alice").unwrap_err().to_string(),
            "server busy: too many sessions for alice (3); close some (or wait for them to end) and try again"
        );
        t.enter_session("bob").unwrap();
        let mut t2 = a.admit_with_roll(src, 99).unwrap();
        assert!(matches!(
            t2.enter_session("carol"),
            Err(Refusal::Sessions { count: 4 })
        ));
        drop(alice);
        t2.enter_session("carol").unwrap();
        assert_eq!(a.sessions(), 2);
        // Logging in again as someone else moves the session.
        t2.enter_session("dave").unwrap();
        assert_eq!(a.sessions(), 2);
        drop((t, t2));
        assert_eq!((a.pending(), a.sessions()), (0, 0));
    }

    #[test]
    fn deadlines_shrink_under_pressure_to_a_floor() {
        let a = pool_with("2:30:6", 100, |l| {
            l.handshake_timeout_secs = 10;
            l.login_timeout_secs = 40;
        });
        let calm = a.admit_with_roll(ip("192.0.2.1"), 99).unwrap();
        assert_eq!(calm.handshake_timeout(), Duration::from_secs(10));
        assert_eq!(calm.login_timeout(), Duration::from_secs(40));
        let mut held = vec![calm];
        for _ in 0..4 {
            held.push(a.admit_with_roll(ip("192.0.2.1"), 99).unwrap());
        }
        let last = held.last().unwrap();
        // 5 pending of full 6 → pressure 0.75.
        assert!(last.login_timeout() < Duration::from_secs(40));
        assert!(last.handshake_timeout() >= HANDSHAKE_FLOOR);
        assert!(last.login_timeout() >= LOGIN_FLOOR);
    }

    #[test]
    fn the_connection_cap_bounds_everything() {
        let a = Admission::new(&Limits::default(), 2);
        let _a = a.admit_with_roll(ip("192.0.2.1"), 99).unwrap();
        let mut b = a.admit_with_roll(ip("192.0.2.2"), 99).unwrap();
        b.enter_session("bob").unwrap();
        assert!(matches!(
            a.admit_with_roll(ip("192.0.2.3"), 99),
            Err(Refusal::Connections { count: 2 })
        ));
    }

    #[test]
    fn the_fd_budget_lowers_the_cap() {
        assert_eq!(fit_fd_budget(4096, 65536), 4096);
        assert_eq!(fit_fd_budget(4096, 1024), (1024 - 128) / 4);
        assert_eq!(fit_fd_budget(4096, 10), 1);
    }

    #[test]
    fn refusal_lines_are_short_plain_ascii() {
        let r = Refusal::PerSource {
            label: "203.0.113.9".into(),
            count: 10,
        };
        assert_eq!(
            r.line(),
            b"xfer-refused: too many connections from 203.0.113.9 (10); try again in a few seconds\n"
        );
        let long = Refusal::UserSessions {
            user: "é\u{1b}".repeat(300),
            count: 1,
        };
        let line = long.line();
        assert!(line.len() <= MAX_REFUSAL_LINE && line.ends_with(b"\n"));
        assert!(
            line.iter()
                .all(|b| b.is_ascii() && (*b >= 0x20 || *b == b'\n'))
        );
    }

    #[test]
    fn refusal_log_lines_are_one_per_source_per_minute_with_a_count() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(log.record(a, t0), Some(1));
        for s in 1..=5 {
            assert_eq!(log.record(a, t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(log.record(ip("192.0.2.2"), t0), Some(1));
        assert_eq!(log.record(a, t0 + Duration::from_secs(61)), Some(6));
        // Bounded: many sources share one entry past the bound.
        for i in 0..(MAX_LOGGED_SOURCES as u32 + 100) {
            log.record(IpAddr::V4(i.into()), t0 + Duration::from_secs(62));
        }
        assert!(log.sources.len() <= MAX_LOGGED_SOURCES);
        assert!(log.overflow.is_some());
    }
}
