//! Multi-file commands (`upload`, `download`, `delete`) for the command line and the shell:
//! a plan made first (walking the local or remote tree, so the overall bar knows the total),
//! then every step over one connection, each failure reported and the rest carried on, and a
//! summary at the end.

use std::path::{Path, PathBuf};

use indicatif::{HumanBytes, ProgressBar};
use xfer_proto::{EntryKind, ErrorCode, Request};

use crate::conn::{Client, Hooks, Transferred};
use crate::context::Ctx;
use crate::error::{ClientError, Reported, Result, report};
use crate::part::Dest;
use crate::put::{PutFile, put_batch};
use xfer_proto::limits::MAX_PUT_LEN;

mod args;
mod pull;

pub use args::{DeleteArgs, DownloadArgs, UploadArgs};

/// The outcome of a multi-item command: every failure is printed when it happens, the first
/// one's exit code is kept, and one bad file does not stop the others (a lost connection does).
pub(crate) struct Batch {
    first: Option<u8>,
    failed: usize,
    /// Files moved, for the summary.
    items: Vec<Item>,
    /// When the batch started.
    started: std::time::Instant,
}

/// One file a batch moved.
struct Item {
    from: String,
    to: String,
    /// Bytes in the file.
    bytes: u64,
    /// Bytes that were already on the other side (a resumed transfer).
    resumed_from: u64,
    digest: xfer_proto::Digest,
}

impl Batch {
    fn new() -> Self {
        Batch {
            first: None,
            failed: 0,
            items: Vec::new(),
            started: std::time::Instant::now(),
        }
    }

    /// Records an outcome; returns false when the batch must stop.
    fn record(&mut self, r: Result<()>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                let Reported(code) = report(&e);
                self.failed += 1;
                self.first.get_or_insert(code);
                !e.is_connection_lost()
            }
        }
    }

    /// Prints the summary: JSON on stdout with `--json`, else one status line when more than
    /// one file was involved (a single failure has said everything already).
    fn summarize(&self, ctx: &Ctx, verb: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        let bytes: u64 = self.items.iter().map(|i| i.bytes).sum();
        let sent: u64 = self.items.iter().map(|i| i.bytes - i.resumed_from).sum();
        if ctx.json {
            let files: Vec<_> = self
                .items
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "from": i.from,
                        "to": i.to,
                        "bytes": i.bytes,
                        "resumed_from": i.resumed_from,
                        "sent": i.bytes - i.resumed_from,
                        "blake3": blake3::Hash::from_bytes(i.digest).to_hex().to_string(),
                    })
                })
                .collect();
            let v = serde_json::json!({
                "operation": verb,
                "files": files,
                "transferred": self.items.len(),
                "bytes": bytes,
                "sent": sent,
                "failed": self.failed,
                "seconds": (secs * 1000.0).round() / 1000.0,
            });
            println!("{v}");
        } else if self.items.len() + self.failed > 1 {
            let rate = HumanBytes((sent as f64 / secs.max(1e-6)) as u64);
            let failed = if self.failed > 0 {
                format!("; {} failed", self.failed)
            } else {
                String::new()
            };
            ctx.status(format_args!(
                "{verb} {} file(s), {} in {secs:.1} s ({rate}/s){failed}",
                self.items.len(),
                HumanBytes(bytes)
            ));
        }
    }

    /// The command's result: the first failure's exit code, if any.
    pub(crate) fn finish(self) -> std::result::Result<(), Reported> {
        match self.first {
            None => Ok(()),
            Some(code) => Err(Reported(code)),
        }
    }
}

/// One thing to do, found while planning.
enum Step {
    /// Create a remote folder (upload -r keeps empty folders).
    RemoteDir(String),
    /// Create a local folder (download -r keeps empty folders).
    LocalDir(Dest),
    /// Move one file.
    File(FileJob),
}

/// Which way a file goes, and its local end.
enum Direction {
    /// From this local file.
    Up(PathBuf),
    /// To this local file, confined beneath the folder the user named.
    Down(Dest),
}

/// One file to move.
struct FileJob {
    direction: Direction,
    remote: String,
    /// Known from the local file or a listing; a plain download learns it from the server.
    size: Option<u64>,
}

impl FileJob {
    fn upload(local: PathBuf, remote: String, size: u64) -> Step {
        Step::File(FileJob {
            direction: Direction::Up(local),
            remote,
            size: Some(size),
        })
    }

    fn download(remote: String, dest: Dest, size: Option<u64>) -> Step {
        Step::File(FileJob {
            direction: Direction::Down(dest),
            remote,
            size,
        })
    }
}

/// What a plan adds up to, for the overall bar.
#[derive(Default)]
struct Plan {
    steps: Vec<Step>,
    files: u64,
    bytes: u64,
}

impl Plan {
    fn push(&mut self, step: Step) {
        if let Step::File(job) = &step {
            self.files += 1;
            self.bytes += job.size.unwrap_or(0);
        }
        self.steps.push(step);
    }
}

/// The last component of a local path, checked as a remote name.
fn local_name(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .ok_or_else(|| ClientError::Usage(format!("`{}` does not name a file", path.display())))?;
    let name = name.to_str().ok_or_else(|| {
        ClientError::Other(format!("`{}`: the name is not valid UTF-8", path.display()))
    })?;
    xfer_proto::path::check_name(name)
        .map_err(|e| ClientError::Other(format!("`{}`: {e}", path.display())))?;
    Ok(name.to_string())
}

fn file_size(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ClientError::local(format!("reading `{}`", path.display()), e))?;
    Ok(meta.len())
}

/// Adds a local folder and everything under it to the plan, sorted by name; unreadable or
/// unnameable entries are reported and skipped.
fn plan_upload_tree(local: &Path, remote: String, plan: &mut Plan, batch: &mut Batch) {
    plan.push(Step::RemoteDir(remote.clone()));
    let mut entries: Vec<_> = match std::fs::read_dir(local) {
        Ok(it) => it.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(e) => {
            batch.record(Err(ClientError::local(
                format!("reading folder `{}`", local.display()),
                e,
            )));
            return;
        }
    };
    entries.sort();
    for path in entries {
        let name = match local_name(&path) {
            Ok(n) => n,
            Err(e) => {
                batch.record(Err(e));
                continue;
            }
        };
        let target = xfer_proto::path::join(&remote, &name);
        if path.is_dir() {
            plan_upload_tree(&path, target, plan, batch);
        } else {
            match file_size(&path) {
                Ok(size) => plan.push(FileJob::upload(path, target, size)),
                Err(e) => {
                    batch.record(Err(e));
                }
            }
        }
    }
}

fn plan_upload(args: &UploadArgs, batch: &mut Batch) -> Plan {
    let remote_dir = args.to.as_deref().unwrap_or("");
    let mut plan = Plan::default();
    for local in &args.local {
        let name = match local_name(local) {
            Ok(n) => n,
            Err(e) => {
                batch.record(Err(e));
                continue;
            }
        };
        let remote = xfer_proto::path::join(remote_dir, &name);
        if local.is_dir() {
            if args.recursive {
                plan_upload_tree(local, remote, &mut plan, batch);
            } else {
                batch.record(Err(ClientError::Other(format!(
                    "`{}` is a folder; use -r to upload folders",
                    local.display()
                ))));
            }
            continue;
        }
        match file_size(local) {
            Ok(size) => plan.push(FileJob::upload(local.clone(), remote, size)),
            Err(e) => {
                batch.record(Err(e));
            }
        }
    }
    plan
}

/// Folder listings sent ahead at once while walking a remote tree.
const LIST_AHEAD: usize = 32;

/// Adds a remote folder and everything under it to the plan, from its listings. The tree is
/// listed a level at a time, each level's `List` requests sent together and answered in
/// order (one round trip per level instead of one per folder); the plan is then laid out
/// depth first, each folder's files before its subfolders. A server may send any tree: one
/// deeper than a path may be (64 folders) is cut there with an error instead of growing
/// without end. Returns false when the connection is gone.
async fn plan_download_tree(
    client: &mut Client,
    remote: String,
    dest: Dest,
    plan: &mut Plan,
    batch: &mut Batch,
) -> bool {
    /// A folder found on the way, and what its listing held.
    struct Folder {
        remote: String,
        dest: Dest,
        /// Whether its listing arrived (a folder that cannot be listed is left out).
        listed: bool,
        files: Vec<Step>,
        /// Indexes of its subfolders, in listing order.
        subfolders: Vec<usize>,
    }
    let folder = |remote, dest| Folder {
        remote,
        dest,
        listed: false,
        files: Vec::new(),
        subfolders: Vec::new(),
    };
    let mut folders = vec![folder(remote, dest)];
    let mut level = vec![0];
    let mut alive = true;
    'walk: while !level.is_empty() {
        let mut next_level = Vec::new();
        for chunk in level.chunks(LIST_AHEAD) {
            let requests: Vec<Request> = chunk
                .iter()
                .map(|&f| Request::List {
                    path: folders[f].remote.clone(),
                })
                .collect();
            if let Err(e) = client.send_ahead(&requests).await {
                batch.record(Err(e));
                alive = false;
                break 'walk;
            }
            for &f in chunk {
                let remote = folders[f].remote.clone();
                let entries = match client.read_listing(&remote).await {
                    Ok(e) => e,
                    Err(e) => {
                        if !batch.record(Err(e)) {
                            alive = false;
                            break 'walk;
                        }
                        continue;
                    }
                };
                folders[f].listed = true;
                for entry in entries {
                    if xfer_proto::path::check_name(&entry.name).is_err() {
                        batch.record(Err(ClientError::Other(format!(
                            "skipping `{}` in `{}`: unsafe name",
                            crate::error::printable(&entry.name),
                            crate::error::printable(&remote)
                        ))));
                        continue;
                    }
                    let r = xfer_proto::path::join(&remote, &entry.name);
                    let d = folders[f].dest.child(&entry.name);
                    match entry.kind {
                        EntryKind::Dir if xfer_proto::path::components(&r).is_err() => {
                            batch.record(Err(ClientError::Protocol(format!(
                                "the server listed `{}`, deeper than a path may go ({} folders); skipped",
                                crate::error::printable(&r),
                                xfer_proto::limits::MAX_PATH_DEPTH
                            ))));
                        }
                        EntryKind::Dir => {
                            folders.push(folder(r, d));
                            let sub = folders.len() - 1;
                            folders[f].subfolders.push(sub);
                            next_level.push(sub);
                        }
                        EntryKind::File => {
                            folders[f]
                                .files
                                .push(FileJob::download(r, d, Some(entry.size)))
                        }
                        EntryKind::Other => {}
                    }
                }
            }
        }
        level = next_level;
    }
    let mut stack = vec![0];
    while let Some(f) = stack.pop() {
        let folder = &mut folders[f];
        if !folder.listed {
            continue;
        }
        plan.push(Step::LocalDir(folder.dest.clone()));
        for step in std::mem::take(&mut folder.files) {
            plan.push(step);
        }
        // Reversed, so folders are planned in listing order.
        stack.extend(folder.subfolders.iter().rev());
    }
    alive
}

/// What a remote path names, found in its parent's listing. (Listing the path itself cannot
/// tell a file from a folder holding one entry of the same name.)
async fn remote_kind(client: &mut Client, path: &str) -> Result<EntryKind> {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    client
        .list(parent)
        .await?
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| e.kind)
        .ok_or_else(|| ClientError::Server {
            code: ErrorCode::NotFound,
            message: format!("`{path}` does not exist"),
        })
}

/// Where `--to` puts a download named `name`: inside the folder, or, with one file and a `--to`
/// that is not a folder, under that name (as `cp` would).
fn download_dest(dir: &Path, name: &str, save_as: bool) -> Result<Dest> {
    let (folder, name) = if save_as {
        let folder = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            return Err(ClientError::Usage(format!(
                "`{}` does not name a file with a UTF-8 name",
                dir.display()
            )));
        };
        (folder, name)
    } else {
        (dir, name)
    };
    Dest::new(folder, name)
        .map_err(|e| ClientError::local(format!("opening `{}`", folder.join(name).display()), e))
}

async fn plan_download(client: &mut Client, args: &DownloadArgs, batch: &mut Batch) -> Plan {
    let mut plan = Plan::default();
    let to = args.to.as_deref();
    let dir = to.unwrap_or(Path::new("."));
    // `--to NEW_NAME` with one file saves under that name, as `cp` would.
    let save_as = args.remote.len() == 1 && to.is_some() && !dir.is_dir();
    if !save_as && !dir.is_dir() {
        batch.record(Err(ClientError::Other(format!(
            "`{}` is not a folder",
            dir.display()
        ))));
        return plan;
    }
    for remote in &args.remote {
        let trimmed = remote.trim_end_matches('/');
        let name = trimmed.rsplit('/').next().unwrap_or(trimmed);
        if let Err(e) = xfer_proto::path::check_name(name) {
            let why = xfer_proto::path::named_components(remote)
                .err()
                .unwrap_or(e);
            batch.record(Err(ClientError::Server {
                code: ErrorCode::InvalidPath,
                message: format!("refused path `{remote}`: {why}"),
            }));
            continue;
        }
        let dest = match download_dest(dir, name, save_as) {
            Ok(d) => d,
            Err(e) => {
                batch.record(Err(e));
                continue;
            }
        };
        if !args.recursive {
            plan.push(FileJob::download(trimmed.to_string(), dest, None));
            continue;
        }
        match remote_kind(client, trimmed).await {
            Ok(EntryKind::Dir) => {
                if !plan_download_tree(client, trimmed.to_string(), dest, &mut plan, batch).await {
                    break;
                }
            }
            Ok(_) => plan.push(FileJob::download(trimmed.to_string(), dest, None)),
            Err(e) => {
                if !batch.record(Err(e)) {
                    break;
                }
            }
        }
    }
    plan
}

/// Moves one file with its own bar, feeding the overall bar; prints its line.
async fn transfer_one(
    ctx: &Ctx,
    client: &mut Client,
    job: &FileJob,
    overall: &ProgressBar,
    resume: bool,
) -> Result<Item> {
    let (label, known) = (job.remote.as_str(), job.size);
    let bar = ctx.progress.bar(label, known.unwrap_or(0));
    let base = overall.position();
    let (b1, b2, b3) = (bar.clone(), bar.clone(), bar.clone());
    let (o1, o2, o3) = (overall.clone(), overall.clone(), overall.clone());
    let hooks = Hooks {
        on_size: Box::new(move |size| {
            b1.set_length(size);
            if known.is_none() {
                o1.inc_length(size);
            }
        }),
        on_start: Box::new(move |offset| {
            b2.set_position(offset);
            b2.reset_eta();
            o2.set_position(base + offset);
        }),
        on_progress: Box::new(move |n| {
            b3.set_position(n);
            o3.set_position(base + n);
        }),
    };
    let started = std::time::Instant::now();
    let (result, from, to, verb) = match &job.direction {
        Direction::Up(local) => (
            client.upload(local, &job.remote, resume, hooks).await,
            local.display().to_string(),
            job.remote.clone(),
            "uploaded",
        ),
        Direction::Down(dest) => (
            client.download(&job.remote, dest, resume, hooks).await,
            job.remote.clone(),
            dest.path().display().to_string(),
            "downloaded",
        ),
    };
    bar.finish_and_clear();
    let done: Transferred = result.map_err(|e| with_hint(e, job))?;
    let sent = done.size - done.resumed_from;
    let rate = HumanBytes((sent as f64 / started.elapsed().as_secs_f64().max(1e-6)) as u64);
    let how = if done.resumed_from > 0 {
        format!(
            "resumed at {}, sent {} at {rate}/s",
            HumanBytes(done.resumed_from),
            HumanBytes(sent)
        )
    } else {
        format!("{rate}/s")
    };
    ctx.status(format_args!(
        "{verb} {} -> {} ({}, {how})",
        crate::error::printable(&from),
        crate::error::printable(&to),
        HumanBytes(done.size)
    ));
    Ok(Item {
        from,
        to,
        bytes: done.size,
        resumed_from: done.resumed_from,
        digest: done.digest,
    })
}

/// Adds what to do next to the server's "not found" and "is a folder" answers.
fn with_hint(e: ClientError, job: &FileJob) -> ClientError {
    let ClientError::Server { code, message } = e else {
        return e;
    };
    let remote = &job.remote;
    let hint = match (&job.direction, code) {
        (Direction::Up(_), ErrorCode::NotFound) => match remote.rsplit_once('/') {
            Some((parent, _)) => format!(" - create it with `xfer mkdir {parent}`"),
            None => String::new(),
        },
        (Direction::Down(_), ErrorCode::WrongKind) if message.ends_with("a folder") => {
            format!(" - to download a folder, use `xfer download -r {remote}`")
        }
        _ => String::new(),
    };
    ClientError::Server {
        code,
        message: format!("{message}{hint}"),
    }
}

/// Runs a plan over `client`: folders first as they come, each file with its bar.
async fn run_plan(ctx: &Ctx, client: &mut Client, plan: Plan, resume: bool, batch: &mut Batch) {
    let overall = ctx.progress.overall(plan.files, plan.bytes);
    let mut done_files = 0;
    for step in &plan.steps {
        let keep_going = match step {
            Step::RemoteDir(remote) => batch.record(client.mkdir(remote).await),
            Step::LocalDir(local) => batch.record(local.create_dir_all().map_err(|e| {
                ClientError::local(format!("creating folder `{}`", local.path().display()), e)
            })),
            Step::File(job) => {
                let base = overall.position();
                let r = transfer_one(ctx, client, job, &overall, resume).await;
                // A failed file still counts as handled, so the total stays reachable.
                if let Some(size) = job.size {
                    overall.set_position(base + size);
                }
                done_files += 1;
                overall.set_message(format!("{done_files}/{} files", plan.files));
                record_item(batch, r)
            }
        };
        if !keep_going {
            break;
        }
    }
    overall.finish_and_clear();
}

fn record_item(batch: &mut Batch, r: Result<Item>) -> bool {
    match r {
        Ok(item) => {
            batch.items.push(item);
            true
        }
        Err(e) => batch.record(Err(e)),
    }
}

/// Uploads everything `args` names over `client`: small files as one batch when the server
/// speaks protocol 3 and there are several, everything else one file at a time.
pub(crate) async fn upload_all(ctx: &Ctx, client: &mut Client, args: &UploadArgs) -> Batch {
    let mut batch = Batch::new();
    let plan = plan_upload(args, &mut batch);
    let small = plan
        .steps
        .iter()
        .filter(|s| matches!(s, Step::File(j) if j.size.is_some_and(|n| n <= MAX_PUT_LEN)))
        .count();
    if client.version >= 3 && small >= 2 {
        run_upload_batched(ctx, client, plan, !args.no_resume, &mut batch).await;
    } else {
        run_plan(ctx, client, plan, !args.no_resume, &mut batch).await;
    }
    batch.summarize(ctx, "uploaded");
    batch
}

/// Runs an upload plan with its small files in one batch (protocol 3): first the folders
/// that no small file creates (empty ones, or those holding only big files), then the small
/// files pipelined and committed together, then the big files one by one. A small file's
/// line is printed only once the commit has made it durable and visible.
async fn run_upload_batched(
    ctx: &Ctx,
    client: &mut Client,
    plan: Plan,
    resume: bool,
    batch: &mut Batch,
) {
    let overall = ctx.progress.overall(plan.files, plan.bytes);
    let (mut dirs, mut puts, mut sizes, mut big) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for step in plan.steps {
        match step {
            Step::RemoteDir(remote) => dirs.push(remote),
            Step::File(FileJob {
                direction: Direction::Up(local),
                remote,
                size: Some(size),
            }) if size <= MAX_PUT_LEN => {
                puts.push(PutFile { local, remote });
                sizes.push(size);
            }
            Step::File(job) => big.push(job),
            Step::LocalDir(_) => {}
        }
    }
    // A Put creates its missing folders; the others are made first.
    let mut made = std::collections::HashSet::new();
    for p in &puts {
        let mut cur = p.remote.as_str();
        while let Some((parent, _)) = cur.rsplit_once('/') {
            if !made.insert(parent.to_string()) {
                break;
            }
            cur = parent;
        }
    }
    for dir in dirs.iter().filter(|d| !made.contains(d.as_str())) {
        if !batch.record(client.mkdir(dir).await) {
            overall.finish_and_clear();
            return;
        }
    }
    let started = std::time::Instant::now();
    let mut staged: Vec<Option<Transferred>> = vec![None; puts.len()];
    let mut done_files = 0;
    let files = plan.files;
    let result = {
        let (staged, batch, overall) = (&mut staged, &mut *batch, &overall);
        put_batch(client, &puts, &mut |i, r| {
            overall.inc(sizes[i]);
            done_files += 1;
            overall.set_message(format!("{done_files}/{files} files"));
            match r {
                Ok(t) => staged[i] = Some(t),
                Err(e) => {
                    batch.record(Err(e));
                }
            }
        })
        .await
    };
    let keep_going = match result {
        Ok(_) => {
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            let bytes: u64 = staged.iter().flatten().map(|t| t.size).sum();
            let rate = HumanBytes((bytes as f64 / secs) as u64);
            for (put, done) in puts.into_iter().zip(staged) {
                let Some(done) = done else { continue };
                let from = put.local.display().to_string();
                ctx.status(format_args!(
                    "uploaded {} -> {} ({}, {rate}/s)",
                    crate::error::printable(&from),
                    crate::error::printable(&put.remote),
                    HumanBytes(done.size)
                ));
                batch.items.push(Item {
                    from,
                    to: put.remote,
                    bytes: done.size,
                    resumed_from: 0,
                    digest: done.digest,
                });
            }
            true
        }
        Err(e) => batch.record(Err(e)),
    };
    if keep_going {
        for job in &big {
            let base = overall.position();
            let r = transfer_one(ctx, client, job, &overall, resume).await;
            if let Some(size) = job.size {
                overall.set_position(base + size);
            }
            done_files += 1;
            overall.set_message(format!("{done_files}/{files} files"));
            if !record_item(batch, r) {
                break;
            }
        }
    }
    overall.finish_and_clear();
}

/// Downloads everything `args` names over `client`.
pub(crate) async fn download_all(ctx: &Ctx, client: &mut Client, args: &DownloadArgs) -> Batch {
    let mut batch = Batch::new();
    let plan = plan_download(client, args, &mut batch).await;
    pull::run_download_plan(ctx, client, plan, !args.no_resume, &mut batch).await;
    batch.summarize(ctx, "downloaded");
    batch
}

/// Deletes everything `args` names over `client`.
pub(crate) async fn delete_all(ctx: &Ctx, client: &mut Client, args: &DeleteArgs) -> Batch {
    let mut batch = Batch::new();
    for remote in &args.remote {
        let r = client.delete(remote).await;
        if r.is_ok() {
            ctx.status(format_args!("deleted {remote}"));
        }
        if !batch.record(r) {
            break;
        }
    }
    batch
}

/// A command that works through a list of paths, reporting each failure and going on.
pub(crate) enum BatchCommand<'a> {
    /// `upload`
    Upload(&'a UploadArgs),
    /// `download`
    Download(&'a DownloadArgs),
    /// `delete`
    Delete(&'a DeleteArgs),
}

impl BatchCommand<'_> {
    /// Runs over an open connection (the shell's).
    pub(crate) async fn run(&self, ctx: &Ctx, client: &mut Client) -> Batch {
        match self {
            BatchCommand::Upload(a) => upload_all(ctx, client, a).await,
            BatchCommand::Download(a) => download_all(ctx, client, a).await,
            BatchCommand::Delete(a) => delete_all(ctx, client, a).await,
        }
    }

    /// Connects, runs, closes (the command line's).
    pub(crate) async fn run_connected(&self, ctx: &Ctx) -> std::result::Result<(), Reported> {
        let (mut client, _, _) = ctx.connect().await.map_err(|e| report(&e))?;
        let batch = self.run(ctx, &mut client).await;
        client.close().await;
        batch.finish()
    }
}
