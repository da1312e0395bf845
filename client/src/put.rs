//! Batched upload of small files (protocol 3): local files read ahead on blocking threads,
//! `Put` frames and bodies pipelined over the connection within a bounded window, answers
//! read in order, and one `Commit` at the end, so a tree of small files costs neither a
//! round trip nor a sync per file.
//!
//! Why the read-ahead: the files are often cold (not in the page cache), and one read at a
//! time would leave the network idle behind the disk; [`READ_AHEAD`] reads in flight keep
//! both busy. Memory stays bounded by [`READ_AHEAD`] times
//! [`xfer_proto::limits::MAX_PUT_LEN`].

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;

use tokio::task::JoinHandle;
use xfer_proto::limits::{MAX_PUT_LEN, MAX_PUTS_IN_FLIGHT};
use xfer_proto::{Digest, ErrorCode, Request, Response};

use crate::conn::{Client, Transferred, unexpected};
use crate::error::{ClientError, Result};

/// Local files being read at once, ahead of the network.
pub const READ_AHEAD: usize = 32;

/// One file of a batch.
#[derive(Debug, Clone)]
pub struct PutFile {
    /// The local file.
    pub local: PathBuf,
    /// Where it goes on the server.
    pub remote: String,
}

/// A local file read whole, with its digest.
type ReadResult = std::io::Result<(Vec<u8>, Digest)>;

/// Reads `local` whole (at most [`MAX_PUT_LEN`] bytes; a file that grew past that since it
/// was planned is an error) and hashes it.
fn read_whole(local: PathBuf) -> ReadResult {
    let file = std::fs::File::open(&local)?;
    let len = file.metadata()?.len();
    let mut data = Vec::with_capacity(len.min(MAX_PUT_LEN) as usize);
    file.take(MAX_PUT_LEN + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_PUT_LEN {
        return Err(std::io::Error::other(format!(
            "it grew past {MAX_PUT_LEN} bytes while being uploaded; upload it again"
        )));
    }
    let digest = *blake3::hash(&data).as_bytes();
    Ok((data, digest))
}

/// Whether a server answer to one `Put` ends the whole batch rather than that one file: the
/// session is gone, or the server closes after it.
fn ends_batch(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => matches!(
            code,
            ErrorCode::BadRequest
                | ErrorCode::NotAuthenticated
                | ErrorCode::SessionExpired
                | ErrorCode::ShuttingDown
        ),
        _ => true,
    }
}

/// Uploads `files` (each at most [`MAX_PUT_LEN`] bytes) as one batch over a protocol 3
/// connection and commits it. `on_answer(i, outcome)` is called for each file in order as
/// the server answers it (or as reading it fails locally); an `Ok` there means received and
/// verified, not yet visible. Returns the number of files the server committed, once the
/// `Commit` is answered: only then are they durable and visible. An `Err` means the batch
/// ended early (connection lost, session ended) or the commit failed; files answered before
/// may or may not be visible.
pub async fn put_batch(
    client: &mut Client,
    files: &[PutFile],
    on_answer: &mut (dyn FnMut(usize, Result<Transferred>) + Send),
) -> Result<u64> {
    if client.broken {
        return Err(ClientError::Broken(
            xfer_proto::connection::ConnError::Closed,
        ));
    }
    let result = pipeline(client, files, on_answer).await;
    if result.is_err() {
        client.broken = true;
    }
    result
}

async fn pipeline(
    client: &mut Client,
    files: &[PutFile],
    on_answer: &mut (dyn FnMut(usize, Result<Transferred>) + Send),
) -> Result<u64> {
    let mut reads: VecDeque<(usize, JoinHandle<ReadResult>)> = VecDeque::new();
    let mut next = 0;
    // Puts sent and not yet answered: index, size, digest.
    let mut in_flight: VecDeque<(usize, u64, Digest)> = VecDeque::new();
    let mut unflushed = false;
    loop {
        while reads.len() < READ_AHEAD && next < files.len() {
            let local = files[next].local.clone();
            reads.push_back((next, tokio::task::spawn_blocking(move || read_whole(local))));
            next += 1;
        }
        if in_flight.len() >= MAX_PUTS_IN_FLIGHT || (reads.is_empty() && !in_flight.is_empty()) {
            if unflushed {
                client.conn.flush().await?;
                unflushed = false;
            }
            answer(client, &mut in_flight, on_answer).await?;
            continue;
        }
        let Some((i, read)) = reads.pop_front() else {
            break;
        };
        // Let the server work on what is queued while this file comes off the disk.
        if unflushed && !read.is_finished() {
            client.conn.flush().await?;
            unflushed = false;
        }
        let read = read
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let (data, digest) = match read {
            Ok(x) => x,
            Err(e) => {
                let local = files[i].local.display().to_string();
                on_answer(i, Err(ClientError::local(format!("reading `{local}`"), e)));
                continue;
            }
        };
        let size = data.len() as u64;
        client
            .conn
            .queue_frame(&Request::Put {
                path: files[i].remote.clone(),
                size,
                digest,
            })
            .await?;
        client.conn.queue_small_body(&data).await?;
        in_flight.push_back((i, size, digest));
        unflushed = true;
    }
    client.conn.write_frame(&Request::Commit).await?;
    match client.read().await? {
        Response::Committed { files } => Ok(files),
        other => Err(unexpected(&other)),
    }
}

/// Reads the answer to the oldest `Put` in flight and hands it to `on_answer`; an answer
/// that ends the batch is returned as the error.
async fn answer(
    client: &mut Client,
    in_flight: &mut VecDeque<(usize, u64, Digest)>,
    on_answer: &mut (dyn FnMut(usize, Result<Transferred>) + Send),
) -> Result<()> {
    let Some((i, size, digest)) = in_flight.pop_front() else {
        return Ok(());
    };
    match client.read().await {
        Ok(Response::UploadDone { size: s, digest: d }) if s == size && d == digest => {
            on_answer(
                i,
                Ok(Transferred {
                    size,
                    digest,
                    resumed_from: 0,
                }),
            );
            Ok(())
        }
        Ok(Response::UploadDone { .. }) => Err(ClientError::Verification(
            "the server staged a file with a different size or digest than was sent".into(),
        )),
        Ok(other) => Err(unexpected(&other)),
        Err(e) if !ends_batch(&e) => {
            on_answer(i, Err(e));
            Ok(())
        }
        Err(e) => Err(e),
    }
}
