//! A daemon killed (SIGKILL) in the middle of a batched upload (protocol 3 `Put`s and their
//! `Commit`) leaves every file either in its old version or in its new one, complete, and
//! the staged data is gone once it starts again.

mod common;

use std::time::Duration;

use common::{Serving, setup};
use tokio::io::AsyncWriteExt;
use xfer_proto::{Request, Response};

const FILES: usize = 150;

fn old(i: usize) -> Vec<u8> {
    format!("old version of file {i}\n").into_bytes()
}

fn new(i: usize) -> Vec<u8> {
    xfer_tests::noise(3000 + i * 7, i as u64)
}

fn path(i: usize) -> String {
    format!("d{}/f{i}", i % 5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_batch_leaves_every_file_old_or_new_and_complete() {
    let (dir, config) = setup(1);
    let tree = dir.path().join("storage/alice");
    // The kill lands at a different point of the batch each time: while the Puts stream in,
    // just after the Commit was sent, and a little later, during or after the commit.
    for (round, wait_ms) in [0u64, 30, 100, 250, 600, 1500].into_iter().enumerate() {
        for i in 0..FILES {
            let p = tree.join(path(i));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, old(i)).unwrap();
        }
        let daemon = Serving::start(&config);
        let mut conn = xfer_tests::raw_connect_to(&daemon.addr, daemon.fingerprint).await;
        xfer_tests::raw_login_as(&mut conn, "alice", "alice-pw").await;
        let sent = FILES / 2 + round * FILES / 8;
        for i in 0..FILES {
            let data = new(i);
            conn.queue_frame(&Request::Put {
                path: path(i),
                size: data.len() as u64,
                digest: *blake3::hash(&data).as_bytes(),
            })
            .await
            .unwrap();
            conn.get_mut().write_all(&data).await.unwrap();
            if i == sent {
                conn.flush().await.unwrap();
            }
        }
        conn.queue_frame(&Request::Commit).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        daemon.signal(rustix::process::Signal::KILL);
        drop(daemon);
        let mut new_ones = 0;
        for i in 0..FILES {
            let found = std::fs::read(tree.join(path(i))).unwrap();
            if found == new(i) {
                new_ones += 1;
            } else {
                assert_eq!(found, old(i), "{} is neither old nor new", path(i));
            }
        }
        eprintln!("killed {wait_ms} ms after the commit was sent: {new_ones} new files");
        // Staged data left by the kill is removed when the daemon starts again.
        let restarted = Serving::start(&config);
        let tmp = dir.path().join("storage/.xfer-tmp");
        common::wait_for(
            "the staged files to be removed",
            Duration::from_secs(10),
            || std::fs::read_dir(&tmp).unwrap().count() == 0,
        )
        .await;
        drop(restarted);
        drop(conn);
    }
    // And a batch that is allowed to finish commits everything.
    let daemon = Serving::start(&config);
    let mut conn = xfer_tests::raw_connect_to(&daemon.addr, daemon.fingerprint).await;
    xfer_tests::raw_login_as(&mut conn, "alice", "alice-pw").await;
    for i in 0..FILES {
        let data = new(i);
        conn.queue_frame(&Request::Put {
            path: path(i),
            size: data.len() as u64,
            digest: *blake3::hash(&data).as_bytes(),
        })
        .await
        .unwrap();
        conn.get_mut().write_all(&data).await.unwrap();
    }
    conn.queue_frame(&Request::Commit).await.unwrap();
    conn.flush().await.unwrap();
    for _ in 0..FILES {
        let r: Response = conn.read_frame().await.unwrap();
        assert!(matches!(r, Response::UploadDone { .. }), "{r:?}");
    }
    let r: Response = conn.read_frame().await.unwrap();
    assert_eq!(
        r,
        Response::Committed {
            files: FILES as u64
        }
    );
    for i in 0..FILES {
        assert_eq!(std::fs::read(tree.join(path(i))).unwrap(), new(i));
    }
}
