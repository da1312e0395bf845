//! Password checks on a fixed pool of threads, each with its argon2 memory allocated once.
//!
//! An argon2id check at OWASP's parameters fills 19 MiB. Allocated afresh per check on tokio's
//! blocking pool, that memory stayed resident: glibc gives each thread its own arena and raises
//! its mmap threshold to the size of the first large block freed, so later 19 MiB blocks came
//! from arenas that never shrink (120 logins left 1,991 MiB resident, 300 failed ones 451 MiB).
//! Here `max_concurrent_logins` threads each own one block buffer for the daemon's lifetime and
//! reuse it for every check, so password checks hold at most threads × the largest m_cost in
//! use (38 MiB with two threads at the default parameters), whatever the number of logins.
//!
//! A buffer grows once, and stays grown, when a hash asks for more memory than it has (an admin
//! may choose stronger parameters than OWASP's). Results are those of
//! [`argon2::PasswordVerifier`]: the same parameters, salt and output length come from the PHC
//! string, and the outputs are compared in constant time.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use argon2::password_hash::{Output, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

/// A hash that unknown user names are checked against, so that they take the same path and
/// the same time as a known name with a wrong password. It is a constant, not made at start,
/// because its result is never used (an unknown name is denied whatever it says), and because
/// hashing at start would free a 19 MiB block on the main thread, which is what raises glibc's
/// mmap threshold for every later allocation.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$ox/U53P84IvAzj4/vg02aw$rMhE9cX5UBIJj9XNVi9aqOalk8KLeJk5Kgbub1FR5YA";

/// Checks passwords against PHC strings in argon2 memory that it keeps between checks.
#[derive(Default)]
pub struct Verifier {
    /// The argon2 working memory; as large as the largest hash checked so far needed.
    blocks: Vec<Block>,
}

/// Why a check could not be run at all (as opposed to a wrong password).
#[derive(Debug, thiserror::Error)]
enum CheckError {
    /// The PHC string does not parse or names parameters argon2 refuses.
    #[error("malformed hash: {0}")]
    Phc(#[from] argon2::password_hash::Error),
    /// argon2 refused the inputs.
    #[error("argon2: {0}")]
    Argon2(#[from] argon2::Error),
    /// The memory the hash asks for cannot be had.
    #[error("cannot allocate {kib} KiB of argon2 memory")]
    Memory {
        /// What the hash's parameters need.
        kib: usize,
    },
}

impl Verifier {
    /// True if `password` matches the PHC string `hash`; false if it does not, or if the hash
    /// cannot be checked (which the users file's validation already rules out).
    pub fn verify(&mut self, hash: &str, password: &str) -> bool {
        match self.check(hash, password) {
            Ok(matched) => matched,
            Err(e) => {
                // Only parameters reach the message, never the password or the hash's output.
                tracing::error!(error = %e, "password check failed to run");
                false
            }
        }
    }

    /// KiB of argon2 memory this verifier holds now.
    pub fn memory_kib(&self) -> usize {
        self.blocks.len() * Block::SIZE / 1024
    }

    fn check(&mut self, hash: &str, password: &str) -> Result<bool, CheckError> {
        let parsed = PasswordHash::new(hash)?;
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Ok(false);
        };
        // The same choices as `PasswordVerifier` makes through `hash_password_customized`.
        let algorithm = Algorithm::try_from(parsed.algorithm)?;
        let version = match parsed.version {
            Some(v) => Version::try_from(v)?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed)?;
        let mut salt_buf = [0u8; Salt::MAX_LENGTH];
        let salt = salt.decode_b64(&mut salt_buf)?;
        let needed = params.block_count();
        self.grow_to(needed)?;
        let mut out_buf = [0u8; Output::MAX_LENGTH];
        let out = &mut out_buf[..expected.len()];
        Argon2::new(algorithm, version, params).hash_password_into_with_memory(
            password.as_bytes(),
            salt,
            out,
            &mut self.blocks[..needed],
        )?;
        // `Output`'s equality is constant-time.
        Ok(Output::new(out)? == expected)
    }

    /// Makes the buffer at least `needed` blocks; it is never shrunk, so a thread that checks
    /// a strong hash once keeps that memory (the bound is documented as the largest m_cost).
    fn grow_to(&mut self, needed: usize) -> Result<(), CheckError> {
        if let Some(more) = needed.checked_sub(self.blocks.len()).filter(|&n| n > 0) {
            // A huge m_cost is an error to report, not an abort of the whole daemon.
            self.blocks
                .try_reserve_exact(more)
                .map_err(|_| CheckError::Memory {
                    kib: needed * Block::SIZE / 1024,
                })?;
            self.blocks.resize(needed, Block::default());
        }
        Ok(())
    }
}

/// What became of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The password matches the hash.
    Match,
    /// It does not (or the hash cannot be checked, or the pool is gone).
    Mismatch,
    /// All threads are busy and the queue is full: the check was not run.
    Busy,
}

/// One check waiting for, or running on, a pool thread.
struct Job {
    /// PHC string to check against.
    hash: String,
    /// The password offered.
    password: String,
    /// Where the answer goes; closed if the login was abandoned (client gone, shutdown).
    reply: oneshot::Sender<bool>,
    /// Keeps the job counted until a thread is done with it, so that abandoned jobs still in
    /// the queue count too and the queue cannot grow past its cap.
    slot: Slot,
}

/// A place in the pool's count of jobs; given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Threads that check passwords, each reusing one argon2 buffer, with a bounded queue.
///
/// Dropping the pool closes the queue: each thread finishes the check it is running, if any,
/// and exits. Nothing waits for them, so shutdown never hangs on a check.
pub struct PasswordPool {
    /// The queue the threads take jobs from.
    jobs: mpsc::Sender<Job>,
    /// Its receiving end, shared by the threads (each takes the lock to wait for a job).
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Jobs queued or running (abandoned ones included until a thread discards them).
    jobs_in_pool: Arc<AtomicUsize>,
    /// Most jobs in the pool: one running per thread plus the permitted queue.
    capacity: usize,
}

impl PasswordPool {
    /// Starts `threads` checking threads (at least one) that admit `max_queued` waiting checks
    /// beyond the ones they are running. Memory is allocated by each thread on its first check.
    pub fn start(threads: usize, max_queued: usize) -> std::io::Result<PasswordPool> {
        let threads = threads.max(1);
        let pool = PasswordPool::without_threads(threads.saturating_add(max_queued));
        for i in 0..threads {
            pool.spawn_thread(i)?;
        }
        Ok(pool)
    }

    /// A pool whose queue takes `capacity` jobs, with no thread yet to run them.
    fn without_threads(capacity: usize) -> PasswordPool {
        let (jobs, rx) = mpsc::channel();
        PasswordPool {
            jobs,
            queue: Arc::new(Mutex::new(rx)),
            jobs_in_pool: Arc::new(AtomicUsize::new(0)),
            capacity,
        }
    }

    /// Starts pool thread number `i`.
    fn spawn_thread(&self, i: usize) -> std::io::Result<()> {
        let queue = self.queue.clone();
        std::thread::Builder::new()
            .name(format!("xferd-argon2-{i}"))
            .spawn(move || work(&queue))
            .map(drop)
    }

    /// Checks `password` against the PHC string `hash` on a pool thread; `Busy` at once if
    /// the pool is full.
    pub async fn check(&self, hash: String, password: String) -> Checked {
        match self.submit(hash, password) {
            Some(answer) => match answer.await {
                Ok(true) => Checked::Match,
                Ok(false) | Err(_) => Checked::Mismatch,
            },
            None => Checked::Busy,
        }
    }

    /// Queues a check and returns where its answer will come, or `None` if the pool is full.
    fn submit(&self, hash: String, password: String) -> Option<oneshot::Receiver<bool>> {
        if self.jobs_in_pool.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.jobs_in_pool.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let slot = Slot(self.jobs_in_pool.clone());
        let (reply, answer) = oneshot::channel();
        let job = Job {
            hash,
            password,
            reply,
            slot,
        };
        // Fails only if every thread is gone; the dropped reply then reads as a mismatch.
        let _ = self.jobs.send(job);
        Some(answer)
    }
}

/// A pool thread: takes jobs until the pool is dropped, with one buffer for all of them.
fn work(queue: &Mutex<mpsc::Receiver<Job>>) {
    let mut verifier = Verifier::default();
    loop {
        // Only one idle thread waits in `recv`; the others wait for the lock.
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(Job {
            hash,
            password,
            reply,
            slot,
        }) = job
        else {
            return;
        };
        if reply.is_closed() {
            // The login was abandoned while it waited: no one would read the answer.
            continue;
        }
        // A panic inside argon2 would otherwise take a thread out of the pool for good.
        let matched =
            std::panic::catch_unwind(AssertUnwindSafe(|| verifier.verify(&hash, &password)))
                .unwrap_or(false);
        // Leave the count before answering, so the caller's next check finds the place free.
        drop(slot);
        let _ = reply.send(matched);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};

    /// What the argon2 crate's own verifier says.
    fn reference(hash: &str, password: &str) -> bool {
        PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    }

    fn hash_with(alg: Algorithm, version: Version, params: Params, password: &str) -> String {
        let salt = SaltString::encode_b64(b"sixteen byte slt").unwrap();
        Argon2::new(alg, version, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn answers_like_the_argon2_verifier_and_one_buffer_serves_every_hash() {
        let owasp = crate::accounts::hash_password("correct horse").unwrap();
        let stronger = hash_with(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(32 * 1024, 3, 2, None).unwrap(),
            "correct horse",
        );
        let small_old_and_short = hash_with(
            Algorithm::Argon2i,
            Version::V0x10,
            Params::new(64, 1, 1, Some(16)).unwrap(),
            "correct horse",
        );
        let argon2d = hash_with(
            Algorithm::Argon2d,
            Version::V0x13,
            Params::new(256, 2, 4, Some(64)).unwrap(),
            "correct horse",
        );
        let mut v = Verifier::default();
        // Order matters: the buffer grows for the stronger hash, then smaller hashes use a
        // prefix of it, and a buffer dirty from the last check must not change any answer.
        for hash in [
            &owasp,
            &stronger,
            &small_old_and_short,
            &argon2d,
            &owasp,
            DUMMY_HASH,
        ] {
            for password in ["correct horse", "wrong horse", "", "correct horse "] {
                assert_eq!(
                    v.verify(hash, password),
                    reference(hash, password),
                    "{hash} / {password:?}"
                );
            }
            assert_eq!(v.verify(hash, "correct horse"), hash != DUMMY_HASH);
        }
        assert!(v.verify(DUMMY_HASH, "unknown users are checked against this"));
        assert_eq!(
            v.memory_kib(),
            32 * 1024,
            "grown once to the largest m_cost"
        );
        for broken in [
            "",
            "plaintext",
            "$argon2id$v=19$m=19456,t=2,p=1",
            "$md5$x$y",
        ] {
            assert!(!v.verify(broken, "correct horse"));
            assert!(!reference(broken, "correct horse"));
        }
    }

    #[test]
    fn the_dummy_hash_costs_what_a_default_account_costs() {
        crate::accounts::check_hash(DUMMY_HASH).unwrap();
        let params = Params::try_from(&PasswordHash::new(DUMMY_HASH).unwrap()).unwrap();
        let mine = crate::accounts::hash_password("x").unwrap();
        let default = Params::try_from(&PasswordHash::new(&mine).unwrap()).unwrap();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.m_cost(), default.t_cost(), default.p_cost())
        );
    }

    #[tokio::test]
    async fn the_pool_checks_and_refuses_beyond_its_queue() {
        let hash = crate::accounts::hash_password("pw").unwrap();
        let pool = PasswordPool::start(2, 3).unwrap();
        assert_eq!(pool.check(hash.clone(), "pw".into()).await, Checked::Match);
        assert_eq!(
            pool.check(hash.clone(), "nope".into()).await,
            Checked::Mismatch
        );
        assert_eq!(
            pool.check(DUMMY_HASH.into(), "pw".into()).await,
            Checked::Mismatch
        );
        // Without threads to run them, jobs stay in the queue: 2 running + 3 queued fit, the
        // sixth is refused without being queued.
        let pool = PasswordPool::without_threads(5);
        let answers: Vec<_> = (0..5)
            .map(|_| pool.submit(hash.clone(), "pw".into()).expect("room"))
            .collect();
        assert!(pool.submit(hash.clone(), "pw".into()).is_none());
        assert_eq!(pool.check(hash.clone(), "pw".into()).await, Checked::Busy);
        pool.spawn_thread(0).unwrap();
        for answer in answers {
            assert_eq!(answer.await, Ok(true));
        }
        // Every place came back, so a full round fits again.
        let again: Vec<_> = (0..5)
            .map(|_| pool.submit(hash.clone(), "pw".into()).expect("room"))
            .collect();
        for answer in again {
            assert_eq!(answer.await, Ok(true));
        }
    }

    #[tokio::test]
    async fn abandoned_checks_keep_their_place_until_discarded() {
        let hash = crate::accounts::hash_password("pw").unwrap();
        let pool = PasswordPool::without_threads(2);
        // Two logins abandoned (their clients left) while waiting: the pool is full until a
        // thread has thrown their jobs away, so abandoning cannot grow the queue.
        drop(pool.submit(hash.clone(), "pw".into()).unwrap());
        drop(pool.submit(hash.clone(), "pw".into()).unwrap());
        assert!(pool.submit(hash.clone(), "pw".into()).is_none());
        pool.spawn_thread(0).unwrap();
        // Discarding costs no hashing, and then there is room again.
        let mut tries = 0;
        let answer = loop {
            match pool.submit(hash.clone(), "pw".into()) {
                Some(answer) => break answer,
                None => {
                    tries += 1;
                    assert!(tries < 10_000, "abandoned jobs never left the pool");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        };
        assert_eq!(answer.await, Ok(true));
    }

    #[tokio::test]
    async fn dropping_the_pool_ends_its_threads_and_pending_checks() {
        let hash = crate::accounts::hash_password("pw").unwrap();
        let pool = PasswordPool::without_threads(4);
        let queue = Arc::downgrade(&pool.queue);
        let queued = pool.submit(hash.clone(), "pw".into()).unwrap();
        drop(pool);
        // Never run, and no one left to run it: the waiter hears so instead of hanging.
        assert!(queued.await.is_err());
        assert_eq!(queue.strong_count(), 0);

        let pool = PasswordPool::start(2, 4).unwrap();
        let queue = Arc::downgrade(&pool.queue);
        let running = pool.submit(hash, "pw".into()).unwrap();
        drop(pool);
        // Already taken or still queued when the queue closed, the check still gets answered.
        assert_eq!(running.await, Ok(true));
        // Each thread holds the queue until it exits.
        let mut tries = 0;
        while queue.strong_count() > 0 {
            tries += 1;
            assert!(tries < 10_000, "pool threads still running");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}
