//! How big file bodies use the page cache: write-behind where a body is written, drop-behind
//! where it is read, so that the receiver's final fsync finds little left to write and neither
//! end fills memory with a file it will not read again.
//!
//! Why: a 512 MiB body used to go into 512 MiB of dirty page cache, and the final fsync then
//! wrote all of it while the transfer waited: 0.15-0.22 s of a 1.0-1.4 s transfer
//! (`strace -T -e fsync`, the daemon on upload and the client on download). Now the writer
//! starts writeback of each [`WINDOW`] as soon as it is written, so the disk works while the
//! network does, and [`LAG`] windows later drops those pages (clean by then): the fsync took
//! 1-10 ms, and about 8 MiB of the file stays cached instead of all of it. The reader drops
//! what it has read, but only from a file that was not cached when the body started: a file
//! someone just wrote or read keeps its cache (it is probably wanted), and one read cold from
//! disk does not push everything else out.
//!
//! All of it is advice (`posix_fadvise`), which changes speed, never content: errors are
//! ignored, durability still comes from the caller's fsync, and that fsync also reports any
//! error of the writeback started here. Bodies of [`STREAM_MIN`] or less pay no syscall.
//!
//! `POSIX_FADV_DONTNEED` serves both halves of write-behind, because Linux starts writeback
//! (`WB_SYNC_NONE`) of a range's dirty pages before dropping its clean ones: on fresh pages it
//! is `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which rustix does not offer.
//!
//! Measured and not kept: O_DIRECT writes (aligned 256 KiB writes from a staging buffer, the
//! unaligned head and tail through the page cache). They took 5-11% less CPU, but each write
//! waits for the disk on the thread that also hashes, 0.4 ms median and 1.4 ms at the 90th
//! percentile here, and uploads and downloads took 1.1-1.3x as long.

use std::collections::VecDeque;
use std::fs::File;
use std::num::NonZeroU64;

use rustix::fs::{Advice, fadvise};

/// Bodies larger than this get write-behind or drop-behind; smaller ones are left to the
/// kernel, as the advice would cost more than it saves.
pub const STREAM_MIN: u64 = 8 << 20;

/// Bytes between two rounds of advice: 128 rounds for 512 MiB, each well under a millisecond.
pub const WINDOW: u64 = 4 << 20;

/// Windows between starting a window's writeback and dropping its pages, so the writeback has
/// finished (pages still dirty or in flight cannot be dropped and would stay cached).
pub const LAG: usize = 2;

/// Advice on the bytes `from..to` of `file`; a failure only costs speed.
fn advise(file: &File, from: u64, to: u64, advice: Advice) {
    if let Some(len) = NonZeroU64::new(to.saturating_sub(from)) {
        let _ = fadvise(file, from, Some(len), advice);
    }
}

/// Write-behind for one body written sequentially from some offset.
#[derive(Debug)]
pub struct WriteBehind {
    /// End of the bytes written so far (a file offset).
    pos: u64,
    /// Writeback has been started for everything before this.
    started: u64,
    /// Ends of the windows whose writeback was started and whose pages are still cached,
    /// oldest first (at most `lag + 1`).
    in_flight: VecDeque<u64>,
    /// Everything from the body's start to here has been dropped.
    dropped: u64,
    /// Bytes between rounds of advice.
    window: u64,
    /// Windows between starting writeback and dropping.
    lag: usize,
}

impl WriteBehind {
    /// Write-behind for `total` bytes written from `offset`, or `None` for a small body.
    pub fn new(offset: u64, total: u64) -> Option<WriteBehind> {
        (total > STREAM_MIN).then(|| WriteBehind::with_window(offset, WINDOW, LAG))
    }

    /// Write-behind with a given window and lag (tests use small ones).
    pub fn with_window(offset: u64, window: u64, lag: usize) -> WriteBehind {
        WriteBehind {
            pos: offset,
            started: offset,
            in_flight: VecDeque::with_capacity(lag + 1),
            dropped: offset,
            window: window.max(1),
            lag,
        }
    }

    /// Notes that `len` more bytes were written to `file` at the end of the body so far.
    pub fn wrote(&mut self, file: &File, len: usize) {
        self.pos += len as u64;
        if self.pos - self.started < self.window {
            return;
        }
        // The pages just written are all dirty: this only starts their writeback.
        advise(file, self.started, self.pos, Advice::DontNeed);
        self.started = self.pos;
        self.in_flight.push_back(self.pos);
        if self.in_flight.len() > self.lag
            && let Some(end) = self.in_flight.pop_front()
        {
            advise(file, self.dropped, end, Advice::DontNeed);
            self.dropped = end;
        }
    }
}

/// Drop-behind for one body read sequentially from some offset.
#[derive(Debug)]
pub struct ReadBehind {
    /// End of the bytes read so far.
    pos: u64,
    /// Everything from the body's start to here has been dropped.
    dropped: u64,
    /// Bytes between rounds of advice.
    window: u64,
}

impl ReadBehind {
    /// Drop-behind for `total` bytes read from `offset` of `file`, or `None` for a small body
    /// or a file whose first byte is already cached (someone else is using it).
    pub fn new(file: &File, offset: u64, total: u64) -> Option<ReadBehind> {
        if total <= STREAM_MIN {
            return None;
        }
        ReadBehind::with_window(file, offset, WINDOW)
    }

    /// Drop-behind with a given window (tests use small ones), if the file is not cached.
    pub fn with_window(file: &File, offset: u64, window: u64) -> Option<ReadBehind> {
        if is_cached(file, offset) {
            return None;
        }
        // Reads ahead twice as far: the body is read once, from start to end.
        let _ = fadvise(file, offset, None, Advice::Sequential);
        Some(ReadBehind {
            pos: offset,
            dropped: offset,
            window: window.max(1),
        })
    }

    /// Notes that `len` more bytes were read from `file` and are not needed again.
    pub fn read(&mut self, file: &File, len: usize) {
        self.pos += len as u64;
        if self.pos - self.dropped >= self.window {
            advise(file, self.dropped, self.pos, Advice::DontNeed);
            self.dropped = self.pos;
        }
    }
}

/// Whether the byte at `offset` of `file` is in the page cache: a read that must not wait for
/// the disk (`RWF_NOWAIT`) fails with `EAGAIN` only when it is not. Any other answer (an
/// error, end of file) counts as cached, which leaves the cache alone.
pub fn is_cached(file: &File, offset: u64) -> bool {
    let mut byte = [0u8; 1];
    !matches!(
        rustix::io::preadv2(
            file,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        ),
        Err(rustix::io::Errno::AGAIN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::Path;

    const KIB: usize = 1024;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    /// Writes `data` at `offset` of a file in `dir` that holds `offset` bytes already, in
    /// pieces of `piece`, through write-behind with a 64 KiB window; returns what reads back.
    fn write_through(dir: &Path, offset: usize, data: &[u8], piece: usize) -> Vec<u8> {
        let mut file = tempfile::tempfile_in(dir).unwrap();
        file.write_all(&pattern(offset, 0x5a)).unwrap();
        file.seek(SeekFrom::Start(offset as u64)).unwrap();
        let mut behind = WriteBehind::with_window(offset as u64, 64 * KIB as u64, 1);
        for chunk in data.chunks(piece) {
            file.write_all(chunk).unwrap();
            behind.wrote(&file, chunk.len());
        }
        file.sync_all().unwrap();
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut back).unwrap();
        back
    }

    fn sizes() -> Vec<usize> {
        let mut sizes = vec![0, 1, 4095, 4096, 4097];
        for w in [64 * KIB, 256 * KIB, 3 * 64 * KIB] {
            sizes.extend([w - 1, w, w + 1]);
        }
        sizes.push(10 * 64 * KIB + 17);
        sizes
    }

    fn writes_read_back_exactly(dir: &Path) {
        for size in sizes() {
            let data = pattern(size, 0xa5);
            for offset in [0, 5, 4096, 64 * KIB - 3] {
                for piece in [1000, 64 * KIB, 256 * KIB] {
                    let back = write_through(dir, offset, &data, piece);
                    assert_eq!(back.len(), offset + size, "{size} at {offset}, by {piece}");
                    assert_eq!(&back[..offset], &pattern(offset, 0x5a)[..]);
                    assert!(back[offset..] == data[..], "{size} at {offset}, by {piece}");
                }
            }
        }
    }

    #[test]
    fn a_file_written_behind_reads_back_exactly() {
        writes_read_back_exactly(&std::env::temp_dir());
    }

    // tmpfs has no writeback and keeps its pages whatever the advice: nothing may break.
    #[test]
    fn a_file_written_behind_on_tmpfs_reads_back_exactly() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        writes_read_back_exactly(dir.path());
    }

    /// A file in the crate's folder (a disk, where tmp may be tmpfs) whose pages are not
    /// cached.
    fn uncached_file(len: usize) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let mut file = tempfile::tempfile_in(dir.path()).unwrap();
        file.write_all(&pattern(len, 1)).unwrap();
        file.sync_all().unwrap();
        advise(&file, 0, len as u64, Advice::DontNeed);
        (dir, file)
    }

    // The page cache is shared: under the whole suite's parallel I/O a dropped page was once
    // seen cached again (1 run in about 8), so this runs alone, from .ci/run.
    #[test]
    #[ignore = "observes the shared page cache; .ci/run runs it alone"]
    fn a_cold_file_is_dropped_behind_the_reader_and_a_warm_one_is_left() {
        let len = 4 << 20;
        let (_dir, mut file) = uncached_file(len);
        assert!(!is_cached(&file, 0), "the test needs a disk filesystem");
        let mut behind = ReadBehind::with_window(&file, 0, 1 << 20).expect("cold");
        let mut buf = vec![0u8; 256 * KIB];
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        while back.len() < len {
            file.read_exact(&mut buf).unwrap();
            behind.read(&file, buf.len());
            back.extend_from_slice(&buf);
        }
        assert!(back == pattern(len, 1));
        assert!(!is_cached(&file, 0), "the first window was dropped");
        assert!(!is_cached(&file, (len - 1) as u64), "and the last");
        // Now it is cached (read again): whoever reads it next leaves it so.
        let mut again = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut again).unwrap();
        assert!(ReadBehind::with_window(&file, 0, 1 << 20).is_none());
        assert!(is_cached(&file, 0));
    }

    #[test]
    fn small_bodies_get_no_advice() {
        let (_dir, file) = uncached_file(4096);
        assert!(ReadBehind::new(&file, 0, STREAM_MIN).is_none());
        // Past the size, only the cache decides; under a busy suite the "uncached" page is
        // sometimes read back in by the time this runs (seen once), so ask the cache too.
        let cached = is_cached(&file, 0);
        assert_eq!(ReadBehind::new(&file, 0, STREAM_MIN + 1).is_some(), !cached);
        assert!(WriteBehind::new(0, STREAM_MIN).is_none());
        assert!(WriteBehind::new(0, STREAM_MIN + 1).is_some());
    }
}
