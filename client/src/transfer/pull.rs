//! Downloads of many files over one connection without a round trip or two flushes each:
//! `Download` requests go out ahead of their answers within a bounded window and the
//! answers are read in order (spec §4), and the files land through a [`GroupCommit`]: each
//! written to its `.part`, all made durable by one flush, then renamed into place, then each
//! folder flushed once. The flush of one batch runs on a blocking thread while the next
//! batch arrives.
//!
//! Only files the plan knows to be small go this way: a big file, or one of unknown size,
//! still goes alone through [`Client::download`], with its resumable `.part`. A small file
//! in a batch is not resumed (sending it again costs less than asking), so a failure leaves
//! no `.part` of it behind.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use indicatif::HumanBytes;
use tokio::task::JoinHandle;
use xfer_proto::Request;

use super::{Batch, Direction, FileJob, Item, Plan, Step, record_item, transfer_one, with_hint};
use crate::cli::Ctx;
use crate::conn::{Client, Transferred};
use crate::error::{ClientError, Result};
use crate::part::{GroupCommit, Part};

/// Largest file (by its listed size) fetched through the pipeline; a bigger one goes alone
/// and can resume.
const MAX_PIPELINED_FILE: u64 = 8 << 20;
/// Most requests outstanding.
const AHEAD_REQUESTS: usize = 64;
/// Most bytes of request frames outstanding: while the client writes requests the server
/// may be blocked writing answers the client has not read yet, so what the client writes
/// ahead must fit in the socket buffers between them.
const AHEAD_REQUEST_BYTES: usize = 32 << 10;
/// Most file bytes the outstanding downloads are expected to bring (one is always allowed).
const AHEAD_BYTES: u64 = 16 << 20;
/// Most files in one group commit.
const COMMIT_FILES: usize = 256;
/// Most bytes in one group commit.
const COMMIT_BYTES: u64 = 64 << 20;

/// A file received and staged, waiting for its batch's flush.
struct Staged {
    /// Its step in the plan.
    step: usize,
    transferred: Transferred,
    /// Time from reading its answer to having it staged, for its rate.
    took: Duration,
}

/// What a batch's flush says about each of its files.
type Flushed = Vec<(Staged, std::io::Result<()>)>;

/// Whether `job` goes through the pipeline.
fn pipelined(job: &FileJob) -> bool {
    matches!(job.direction, Direction::Down(_)) && job.size.is_some_and(|s| s <= MAX_PIPELINED_FILE)
}

/// One sent request: its step, the file bytes and request bytes it accounts for.
struct Ahead {
    step: usize,
    bytes: u64,
    frame: usize,
}

/// The window of requests sent ahead and the batch being staged.
struct Pipeline<'p> {
    steps: &'p [Step],
    /// The first step not yet considered for sending.
    next: usize,
    /// Sent and not yet answered, in order.
    ahead: VecDeque<Ahead>,
    ahead_bytes: u64,
    ahead_frames: usize,
    /// Received and verified, waiting for the flush.
    batch: GroupCommit<Staged>,
    batch_bytes: u64,
    /// The previous batch's flush, running meanwhile.
    flushing: Option<JoinHandle<Flushed>>,
}

impl<'p> Pipeline<'p> {
    fn new(steps: &'p [Step]) -> Self {
        Pipeline {
            steps,
            next: 0,
            ahead: VecDeque::new(),
            ahead_bytes: 0,
            ahead_frames: 0,
            batch: GroupCommit::new(),
            batch_bytes: 0,
            flushing: None,
        }
    }

    /// Sends requests for the pipelined files from step `from` on, up to the window, in one
    /// write; nothing while the window is more than half full, so requests go out in bunches.
    /// Stops at a file that does not go through the pipeline.
    async fn fill(&mut self, client: &mut Client, from: usize) -> Result<()> {
        self.next = self.next.max(from);
        if !self.ahead.is_empty()
            && (self.ahead.len() > AHEAD_REQUESTS / 2
                || self.ahead_bytes > AHEAD_BYTES / 2
                || self.ahead_frames > AHEAD_REQUEST_BYTES / 2)
        {
            return Ok(());
        }
        let mut requests = Vec::new();
        while let Some(step) = self.steps.get(self.next) {
            let job = match step {
                Step::File(job) if pipelined(job) => job,
                Step::File(_) => break,
                Step::LocalDir(_) | Step::RemoteDir(_) => {
                    self.next += 1;
                    continue;
                }
            };
            let bytes = job.size.unwrap_or(0);
            // Frame length prefix, enum tag, path length and offset: under 32 bytes.
            let frame = job.remote.len() + 32;
            if !self.ahead.is_empty()
                && (self.ahead.len() >= AHEAD_REQUESTS
                    || self.ahead_bytes + bytes > AHEAD_BYTES
                    || self.ahead_frames + frame > AHEAD_REQUEST_BYTES)
            {
                break;
            }
            requests.push(Request::Download {
                path: job.remote.clone(),
                offset: 0,
            });
            self.ahead.push_back(Ahead {
                step: self.next,
                bytes,
                frame,
            });
            self.ahead_bytes += bytes;
            self.ahead_frames += frame;
            self.next += 1;
        }
        if requests.is_empty() {
            return Ok(());
        }
        client.send_ahead(&requests).await
    }

    /// Reads the answer for step `step` (the oldest one sent) and stages its file.
    async fn receive(&mut self, client: &mut Client, step: usize, job: &FileJob) -> Result<()> {
        match self.ahead.pop_front() {
            Some(a) if a.step == step => {
                self.ahead_bytes -= a.bytes;
                self.ahead_frames -= a.frame;
            }
            _ => {
                return Err(ClientError::Protocol(
                    "internal error: downloads answered out of order".into(),
                ));
            }
        }
        let Direction::Down(dest) = &job.direction else {
            return Err(ClientError::Protocol(
                "internal error: an upload in a download".into(),
            ));
        };
        let started = Instant::now();
        let (transferred, part) = client
            .receive_ahead(&job.remote, &dest.path(), || Part::open(dest, false))
            .await?;
        self.batch_bytes += transferred.size;
        self.batch.push(
            part,
            dest.clone(),
            Staged {
                step,
                transferred,
                took: started.elapsed(),
            },
        );
        Ok(())
    }

    /// Whether the batch is full enough to flush.
    fn batch_full(&self) -> bool {
        self.batch.len() >= COMMIT_FILES || self.batch_bytes >= COMMIT_BYTES
    }

    /// Waits for the previous flush and reports it, then starts flushing the staged batch
    /// on a blocking thread; with `wait`, also waits for that one and reports it.
    async fn flush(&mut self, ctx: &Ctx, batch: &mut Batch, wait: bool) {
        if let Some(flushing) = self.flushing.take() {
            report(ctx, self.steps, batch, flushing.await);
        }
        if !self.batch.is_empty() {
            let staged = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.flushing = Some(tokio::task::spawn_blocking(move || staged.commit()));
        }
        if wait && let Some(flushing) = self.flushing.take() {
            report(ctx, self.steps, batch, flushing.await);
        }
    }
}

/// Prints and records what a batch's flush did to each of its files.
fn report(
    ctx: &Ctx,
    steps: &[Step],
    batch: &mut Batch,
    flushed: std::result::Result<Flushed, tokio::task::JoinError>,
) {
    let flushed = match flushed {
        Ok(f) => f,
        Err(e) => {
            batch.record(Err(ClientError::Other(format!(
                "saving a batch of downloaded files failed: {e}"
            ))));
            return;
        }
    };
    for (staged, outcome) in flushed {
        let Some(Step::File(job)) = steps.get(staged.step) else {
            continue;
        };
        let Direction::Down(dest) = &job.direction else {
            continue;
        };
        let to = dest.path().display().to_string();
        let done = staged.transferred;
        let r = match outcome {
            Ok(()) => {
                let rate =
                    HumanBytes((done.size as f64 / staged.took.as_secs_f64().max(1e-6)) as u64);
                ctx.status(format_args!(
                    "downloaded {} -> {} ({}, {rate}/s)",
                    crate::error::printable(&job.remote),
                    crate::error::printable(&to),
                    HumanBytes(done.size)
                ));
                Ok(Item {
                    from: job.remote.clone(),
                    to,
                    bytes: done.size,
                    resumed_from: 0,
                    digest: done.digest,
                })
            }
            Err(e) => Err(ClientError::local(format!("saving `{to}`"), e)),
        };
        record_item(batch, r);
    }
}

/// Runs a download plan over `client`: folders as they come, small files through the
/// pipeline and group commit, others one at a time as before.
pub(super) async fn run_download_plan(
    ctx: &Ctx,
    client: &mut Client,
    plan: Plan,
    resume: bool,
    batch: &mut Batch,
) {
    let overall = ctx.progress.overall(plan.files, plan.bytes);
    let mut pipeline = Pipeline::new(&plan.steps);
    let mut done_files = 0;
    for (i, step) in plan.steps.iter().enumerate() {
        let keep_going = match step {
            Step::RemoteDir(_) => true,
            Step::LocalDir(local) => batch.record(local.create_dir_all().map_err(|e| {
                ClientError::local(format!("creating folder `{}`", local.path().display()), e)
            })),
            Step::File(job) => {
                let base = overall.position();
                let r = if pipelined(job) {
                    let r = match pipeline.fill(client, i).await {
                        Ok(()) => pipeline.receive(client, i, job).await,
                        Err(e) => Err(e),
                    };
                    if pipeline.batch_full() {
                        pipeline.flush(ctx, batch, false).await;
                    }
                    r.map_err(|e| with_hint(e, job))
                } else {
                    // One at a time from here: what is staged is committed first, so files
                    // are saved in plan order.
                    pipeline.flush(ctx, batch, true).await;
                    transfer_one(ctx, client, job, &overall, resume)
                        .await
                        .map(|item| batch.items.push(item))
                };
                // A failed file still counts as handled, so the total stays reachable.
                if let Some(size) = job.size {
                    overall.set_position(base + size);
                }
                done_files += 1;
                overall.set_message(format!("{done_files}/{} files", plan.files));
                match r {
                    Ok(()) => true,
                    Err(e) => batch.record(Err(e)),
                }
            }
        };
        if !keep_going {
            break;
        }
    }
    // What arrived before a failure is complete and verified: it is saved too.
    pipeline.flush(ctx, batch, true).await;
    overall.finish_and_clear();
}
