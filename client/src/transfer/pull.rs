//! Downloads of many files without a round trip or two flushes each: `Download` requests go
//! out ahead of their answers within a bounded window and the answers are read in order
//! (spec §4), dealt out over up to [`MAX_CONNECTIONS`] connections of the session so the
//! server reads several files at once; the files land through a [`GroupCommit`]: each
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
use crate::conn::{Client, Transferred};
use crate::context::Ctx;
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
/// Most connections a download uses, the first one included. The server answers each
/// connection's requests in order, one at a time: a few connections let it read several
/// files at once, which is what a cold page cache needs (1,000 files of 4 KiB in 20
/// folders, caches dropped: median 364 ms over one connection, 264 ms over two, here).
const MAX_CONNECTIONS: usize = 4;
/// Pipelined files that make another connection worth opening.
const FILES_PER_CONNECTION: usize = 64;
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

/// One connection's window: the requests sent on it and not yet answered, in order.
#[derive(Default)]
struct Lane {
    ahead: VecDeque<Ahead>,
    bytes: u64,
    frames: usize,
}

impl Lane {
    /// Whether another request of `bytes` file bytes and a `frame`-byte frame fits (one
    /// always does when nothing is outstanding).
    fn has_room(&self, bytes: u64, frame: usize) -> bool {
        self.ahead.is_empty()
            || (self.ahead.len() < AHEAD_REQUESTS
                && self.bytes + bytes <= AHEAD_BYTES
                && self.frames + frame <= AHEAD_REQUEST_BYTES)
    }

    /// Whether more than half the window is in use: refilling waits until it is not, so
    /// requests go out in bunches (one write, one TLS record).
    fn busy(&self) -> bool {
        self.ahead.len() > AHEAD_REQUESTS / 2
            || self.bytes > AHEAD_BYTES / 2
            || self.frames > AHEAD_REQUEST_BYTES / 2
    }
}

/// The windows of requests sent ahead, one per connection, and the batch being staged.
struct Pipeline<'p> {
    steps: &'p [Step],
    /// The first step not yet considered for sending.
    next: usize,
    /// One window per connection.
    lanes: Vec<Lane>,
    /// The lane of each request sent and not yet answered, in plan order: the order in
    /// which answers are read.
    order: VecDeque<usize>,
    /// The lane the next request goes to: files are dealt out in turn.
    turn: usize,
    /// Received and verified, waiting for the flush.
    batch: GroupCommit<Staged>,
    batch_bytes: u64,
    /// The previous batch's flush, running meanwhile.
    flushing: Option<JoinHandle<Flushed>>,
}

impl<'p> Pipeline<'p> {
    fn new(steps: &'p [Step], lanes: usize) -> Self {
        Pipeline {
            steps,
            next: 0,
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            order: VecDeque::new(),
            turn: 0,
            batch: GroupCommit::new(),
            batch_bytes: 0,
            flushing: None,
        }
    }

    /// Sends requests for the pipelined files from step `from` on, dealt out to the
    /// connections in turn, each up to its window, one write per connection. Stops at a
    /// file that does not go through the pipeline.
    async fn fill(&mut self, conns: &mut [&mut Client], from: usize) -> Result<()> {
        self.next = self.next.max(from);
        if self.lanes[self.turn].busy() {
            return Ok(());
        }
        let mut requests: Vec<Vec<Request>> = vec![Vec::new(); self.lanes.len()];
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
            let lane = &mut self.lanes[self.turn];
            if !lane.has_room(bytes, frame) {
                break;
            }
            requests[self.turn].push(Request::Download {
                path: job.remote.clone(),
                offset: 0,
            });
            lane.ahead.push_back(Ahead {
                step: self.next,
                bytes,
                frame,
            });
            lane.bytes += bytes;
            lane.frames += frame;
            self.order.push_back(self.turn);
            self.turn = (self.turn + 1) % self.lanes.len();
            self.next += 1;
        }
        for (conn, requests) in conns.iter_mut().zip(requests) {
            if !requests.is_empty() {
                conn.send_ahead(&requests).await?;
            }
        }
        Ok(())
    }

    /// Reads the answer for step `step` (the oldest one sent) and stages its file.
    async fn receive(
        &mut self,
        conns: &mut [&mut Client],
        step: usize,
        job: &FileJob,
    ) -> Result<()> {
        let lane = self.order.pop_front();
        let sent = lane.and_then(|l| Some((l, self.lanes[l].ahead.pop_front()?)));
        let lane = match sent {
            Some((l, a)) if a.step == step => {
                self.lanes[l].bytes -= a.bytes;
                self.lanes[l].frames -= a.frame;
                l
            }
            _ => {
                return Err(ClientError::Protocol(
                    "internal error: downloads answered out of order".into(),
                ));
            }
        };
        let Direction::Down(dest) = &job.direction else {
            return Err(ClientError::Protocol(
                "internal error: an upload in a download".into(),
            ));
        };
        let started = Instant::now();
        let (transferred, part) = conns[lane]
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

/// Opens the extra connections a plan is worth: one per [`FILES_PER_CONNECTION`]
/// pipelined files, up to [`MAX_CONNECTIONS`] in all, at once; fewer if the server refuses.
async fn extra_connections(ctx: &Ctx, plan: &Plan) -> Vec<Client> {
    let files = plan
        .steps
        .iter()
        .filter(|s| matches!(s, Step::File(job) if pipelined(job)))
        .count();
    let wanted = (files / FILES_PER_CONNECTION).clamp(1, MAX_CONNECTIONS) - 1;
    let one = |n: usize| async move {
        if n < wanted {
            ctx.connect_extra().await
        } else {
            None
        }
    };
    // Three at most besides the first, opened together.
    const _: () = assert!(MAX_CONNECTIONS == 4);
    let (a, b, c) = tokio::join!(one(0), one(1), one(2));
    [a, b, c].into_iter().flatten().collect()
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
    let mut extra = extra_connections(ctx, &plan).await;
    let mut conns: Vec<&mut Client> = std::iter::once(client).chain(extra.iter_mut()).collect();
    let mut pipeline = Pipeline::new(&plan.steps, conns.len());
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
                    let r = match pipeline.fill(&mut conns, i).await {
                        Ok(()) => pipeline.receive(&mut conns, i, job).await,
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
                    transfer_one(ctx, conns[0], job, &overall, resume)
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
    drop(conns);
    for c in extra {
        c.close().await;
    }
}
