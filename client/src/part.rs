//! The `.part` file a download is written to and resumed from: `NAME.part` beside the target,
//! renamed over the target only after the whole file's digest matched.
//!
//! A download holds its `.part` locked ([`xfer_proto::staging`]), so two downloads to the
//! same target at once cannot write into one file: the second one finds it locked and writes
//! to a private temp file instead (it cannot resume, but it cannot corrupt either).

use std::fs::File;
use std::path::{Path, PathBuf};

/// Where a download to `target` is staged.
pub fn part_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    target.with_file_name(name)
}

/// A staged download.
#[derive(Debug)]
pub struct Part {
    /// The open file (locked if `resumable`).
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Bytes already in it from an earlier attempt.
    pub held: u64,
    /// `NAME.part`, kept if the transfer breaks; else a private temp file, deleted.
    pub resumable: bool,
}

fn folder_of(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl Part {
    /// Opens `NAME.part` for `target`, keeping its content when `keep` (to resume) and
    /// emptying it otherwise; falls back to a private temp file when another download holds it.
    pub fn open(target: &Path, keep: bool) -> std::io::Result<Part> {
        let path = part_path(target);
        if let Some(file) = xfer_proto::staging::open_locked(&path)? {
            let mut held = file.metadata()?.len();
            if !keep && held > 0 {
                file.set_len(0)?;
                held = 0;
            }
            return Ok(Part {
                file,
                path,
                held,
                resumable: true,
            });
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (file, temp) = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".xfer-part")
            .tempfile_in(folder_of(target))?
            .into_parts();
        Ok(Part {
            file,
            path: temp.keep().map_err(|e| e.error)?,
            held: 0,
            resumable: false,
        })
    }

    /// Empties it for a fresh start.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.held = 0;
        Ok(())
    }

    /// Makes it the target: fsync, rename over `target`, fsync the folder.
    pub fn commit(self, target: &Path) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, target)?;
        if let Ok(d) = File::open(folder_of(target)) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Ends a transfer that failed: a resumable `.part` stays when `keep`, anything else goes.
    pub fn abandon(self, keep: bool) {
        if !(keep && self.resumable) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_part_is_kept_locked_and_resumed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("f.bin");
        assert_eq!(part_path(&target), d.path().join("f.bin.part"));
        let mut p = Part::open(&target, true).unwrap();
        assert!(p.resumable);
        p.file.write_all(b"abc").unwrap();
        // A second download of the same target meanwhile gets a private file.
        let other = Part::open(&target, true).unwrap();
        assert!(!other.resumable);
        other.abandon(true);
        p.abandon(true);
        let p = Part::open(&target, true).unwrap();
        assert_eq!(p.held, 3);
        p.commit(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"abc");
        assert!(!part_path(&target).exists());
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Not keeping empties it.
        let mut p = Part::open(&target, true).unwrap();
        p.file.write_all(b"xyz").unwrap();
        p.abandon(true);
        assert_eq!(Part::open(&target, false).unwrap().held, 0);
    }
}
