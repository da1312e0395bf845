//! The stored digest: a big upload's verified BLAKE3 kept on the file as an extended attribute, so a whole-file download can send it without hashing every byte again.
//!
//! The record holds the file's size and modification time (nanoseconds, as `fstat` gives them
//! after the last write) beside the digest; it is used only while both still match. A file
//! changed behind the daemon's back with the same size and mtime to the nanosecond keeps a
//! stale record: the client, which verifies every download, then fails it, never accepts
//! wrong data. A file that rots on disk fails the same way, which hashing on read never caught.

use std::fs::File;

use rustix::fs::XattrFlags;
use xfer_proto::Digest;

/// The extended attribute holding the record.
pub const ATTR: &str = "user.xfer.blake3";

/// Smallest file worth a record: below it hashing costs little, and batched small files
/// are committed without one.
pub const MIN_SIZE: u64 = 1 << 20;

/// Format version, the record's first byte.
const VERSION: u8 = 1;

/// Version, digest, size (u64 LE), mtime in nanoseconds (i64 LE).
const RECORD_LEN: usize = 1 + 32 + 8 + 8;

/// Size and mtime in nanoseconds of the open file, as `fstat` reports them now.
fn stamp(file: &File) -> std::io::Result<(u64, i64)> {
    let st = rustix::fs::fstat(file)?;
    let nanos = (st.st_mtime as i64)
        .checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(st.st_mtime_nsec as i64))
        .ok_or_else(|| std::io::Error::other("mtime out of range"))?;
    Ok((st.st_size as u64, nanos))
}

/// Records `digest` (verified to be the file's contents) on `file`, written for the last
/// time, if it is at least [`MIN_SIZE`]. A filesystem that refuses user attributes (tmpfs
/// without them, no space for one) only costs the hashing on download: logged and ignored.
pub fn record(file: &File, digest: &Digest) {
    if let Err(e) = try_record(file, digest) {
        tracing::debug!(error = %e, "cannot store the upload's digest; downloads will hash it");
    }
}

fn try_record(file: &File, digest: &Digest) -> std::io::Result<()> {
    let (size, mtime) = stamp(file)?;
    if size < MIN_SIZE {
        return Ok(());
    }
    let mut value = [0u8; RECORD_LEN];
    value[0] = VERSION;
    value[1..33].copy_from_slice(digest);
    value[33..41].copy_from_slice(&size.to_le_bytes());
    value[41..49].copy_from_slice(&mtime.to_le_bytes());
    put(file, &value)
}

fn put(file: &File, value: &[u8]) -> std::io::Result<()> {
    Ok(rustix::fs::fsetxattr(
        file,
        ATTR,
        value,
        XattrFlags::empty(),
    )?)
}

/// The digest recorded on `file`, if there is a record of this version and the file's size
/// and mtime are still those it was taken at.
pub fn stored(file: &File) -> Option<Digest> {
    let mut value = [0u8; RECORD_LEN + 1];
    // A longer value is not a record this version wrote: the spare byte tells.
    let n = rustix::fs::fgetxattr(file, ATTR, &mut value[..]).ok()?;
    if n != RECORD_LEN || value[0] != VERSION {
        return None;
    }
    let (size, mtime) = stamp(file).ok()?;
    let digest: Digest = value[1..33].try_into().ok()?;
    let rec_size = u64::from_le_bytes(value[33..41].try_into().ok()?);
    let rec_mtime = i64::from_le_bytes(value[41..49].try_into().ok()?);
    (rec_size == size && rec_mtime == mtime).then_some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn big_file(dir: &std::path::Path) -> (File, Digest) {
        let data: Vec<u8> = (0..MIN_SIZE as usize + 7)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap();
        f.write_all(&data).unwrap();
        (f, *blake3::hash(&data).as_bytes())
    }

    /// These tests need a temp folder that keeps user attributes (ext4, XFS, tmpfs since
    /// Linux 6.6): fail saying so rather than pass without checking anything.
    fn require_xattrs(f: &File) {
        if let Err(e) = rustix::fs::fsetxattr(f, "user.xfer.probe", b"1", XattrFlags::empty()) {
            panic!("the temp folder keeps no user xattrs ({e}); point TMPDIR at one that does");
        }
    }

    #[test]
    fn a_record_is_read_back_while_size_and_mtime_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (f, digest) = big_file(dir.path());
        require_xattrs(&f);
        assert_eq!(stored(&f), None);
        record(&f, &digest);
        assert_eq!(stored(&f), Some(digest));
        // A write changes the mtime: the record no longer counts.
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(stored(&f), None);
    }

    #[test]
    fn small_files_and_foreign_values_get_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let (f, digest) = big_file(dir.path());
        require_xattrs(&f);
        rustix::fs::fsetxattr(&f, ATTR, b"garbage", XattrFlags::empty()).unwrap();
        assert_eq!(stored(&f), None);
        let mut long = vec![VERSION; RECORD_LEN + 1];
        long[1..33].copy_from_slice(&digest);
        rustix::fs::fsetxattr(&f, ATTR, &long, XattrFlags::empty()).unwrap();
        assert_eq!(stored(&f), None);
        f.set_len(10).unwrap();
        rustix::fs::fremovexattr(&f, ATTR).unwrap();
        record(&f, &digest);
        assert_eq!(stored(&f), None);
    }

    #[test]
    fn a_file_refusing_xattrs_is_no_error() {
        // Linux refuses user attributes on device files, as some filesystems do on all.
        let f = File::options().write(true).open("/dev/null").unwrap();
        assert!(put(&f, &[0; RECORD_LEN]).is_err());
        record(&f, &[0; 32]);
        assert_eq!(stored(&f), None);
    }
}
