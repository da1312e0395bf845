//! The whole-file BLAKE3 of an upload built from per-part chaining values, so that parts can
//! be hashed as they arrive, their hashes kept in the resume record, and the digest of the
//! whole file (or of a part-aligned prefix, for a resume offer) rebuilt on any node without
//! reading the data again.
//!
//! BLAKE3 is a binary tree over 1 KiB chunks whose left subtrees are always the largest power
//! of two of chunks smaller than the input. A part of `part_size` bytes (a power of two, at
//! least one chunk) at an offset that is a multiple of `part_size` is therefore a complete
//! subtree, and every split above the parts falls on a part boundary: its chaining value
//! ([`blake3::hazmat::HasherExt::finalize_non_root`]) is all the tree needs from it. An input
//! of one part or less has no parent node, so its digest is the part's own root hash, kept
//! apart ([`PartHash::root`]). Tests check the result against [`blake3::hash`].

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

/// Why a digest could not be rebuilt from the parts given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    /// The part size is not a power of two of at least one BLAKE3 chunk.
    #[error("part size {0} is not a power of two of at least 1024 bytes")]
    BadPartSize(u64),
    /// The number of chaining values does not cover the length.
    #[error("{parts} parts of {part_size} bytes cannot make {len} bytes")]
    Mismatch {
        /// Parts given.
        parts: usize,
        /// Their size.
        part_size: u64,
        /// The length asked for.
        len: u64,
    },
}

/// Whether `part_size` can cut a BLAKE3 tree into whole subtrees.
pub fn valid_part_size(part_size: u64) -> bool {
    part_size.is_power_of_two() && part_size >= blake3::CHUNK_LEN as u64
}

/// Number of parts of `part_size` bytes a file of `len` bytes has (an empty file has one,
/// empty, part).
pub fn part_count(len: u64, part_size: u64) -> u64 {
    len.div_ceil(part_size).max(1)
}

/// Hashes one part as its bytes arrive.
#[derive(Debug, Clone)]
pub struct PartHasher {
    /// Positioned at the part's offset in the file.
    hasher: blake3::Hasher,
    /// Whether this is the first part, the only one whose root hash can be needed.
    first: bool,
    /// Bytes hashed: an empty part has no chaining value (only an empty file has one).
    len: u64,
}

/// What a finished part contributes to the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHash {
    /// Its chaining value (valid only as a subtree of a longer input).
    pub cv: ChainingValue,
    /// For the first part only: its root hash, the digest of the file's first part alone,
    /// which a resume offer of one part and a file of one part need.
    pub root: Option<[u8; 32]>,
}

impl PartHasher {
    /// Starts the part that begins at byte `offset` (a multiple of the part size).
    pub fn new(offset: u64) -> PartHasher {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(offset);
        PartHasher {
            hasher,
            first: offset == 0,
            len: 0,
        }
    }

    /// Adds the next bytes of the part.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// The part's chaining value (and root hash, for the first part). An empty part, which
    /// only an empty file has, gets zeros: its root hash is all that is ever used.
    pub fn finish(&self) -> PartHash {
        PartHash {
            cv: if self.len == 0 {
                [0; 32]
            } else {
                self.hasher.finalize_non_root()
            },
            root: self.first.then(|| *self.hasher.finalize().as_bytes()),
        }
    }
}

/// The chaining value of the part at `offset` holding `data` (convenience for tests and
/// one-shot use).
pub fn part_cv(offset: u64, data: &[u8]) -> ChainingValue {
    let mut h = PartHasher::new(offset);
    h.update(data);
    h.finish().cv
}

/// The BLAKE3 digest of the first `len` bytes of a file cut into parts of `part_size` bytes,
/// from the hashes of the parts that cover them: all of them full but the last. Used for the
/// whole file (`len` = its size) and for a resume offer (`len` = parts done x part size).
pub fn digest(part_size: u64, len: u64, parts: &[PartHash]) -> Result<[u8; 32], TreeError> {
    if !valid_part_size(part_size) {
        return Err(TreeError::BadPartSize(part_size));
    }
    let mismatch = || TreeError::Mismatch {
        parts: parts.len(),
        part_size,
        len,
    };
    if parts.len() as u64 != part_count(len, part_size) {
        return Err(mismatch());
    }
    if parts.len() == 1 {
        return parts[0].root.ok_or_else(mismatch);
    }
    let cvs: Vec<ChainingValue> = parts.iter().map(|p| p.cv).collect();
    let (left, right) = split(part_size, len, &cvs);
    Ok(*merge_subtrees_root(&left, &right, Mode::Hash).as_bytes())
}

/// The two children of the subtree over `len` bytes made of `cvs` (at least two parts), as
/// BLAKE3 splits it: the left one the largest power of two of chunks below `len`, which is a
/// whole number of parts since parts are powers of two themselves.
fn split(part_size: u64, len: u64, cvs: &[ChainingValue]) -> (ChainingValue, ChainingValue) {
    let left_len = blake3::hazmat::left_subtree_len(len);
    let left_parts = (left_len / part_size) as usize;
    let left = subtree(part_size, left_len, &cvs[..left_parts]);
    let right = subtree(part_size, len - left_len, &cvs[left_parts..]);
    (left, right)
}

fn subtree(part_size: u64, len: u64, cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (left, right) = split(part_size, len, cvs);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        // Not periodic in the part size, so a part hashed at the wrong offset shows.
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn parts_of(bytes: &[u8], part_size: u64) -> Vec<PartHash> {
        let n = part_count(bytes.len() as u64, part_size);
        (0..n)
            .map(|i| {
                let start = (i * part_size) as usize;
                let end = (start + part_size as usize).min(bytes.len());
                let mut h = PartHasher::new(start as u64);
                // In uneven pieces, as a body arrives.
                for piece in bytes[start..end].chunks(1000) {
                    h.update(piece);
                }
                h.finish()
            })
            .collect()
    }

    #[test]
    fn equals_blake3_for_every_shape_of_file() {
        for part_size in [1024u64, 4096, 16384] {
            let p = part_size as usize;
            for len in [
                0,
                1,
                1023,
                1024,
                1025,
                p - 1,
                p,
                p + 1,
                2 * p,
                2 * p + 1,
                3 * p + 17,
                4 * p,
                5 * p - 1,
                7 * p,
                8 * p + 1,
                13 * p + 999,
            ] {
                let bytes = data(len);
                let parts = parts_of(&bytes, part_size);
                assert_eq!(
                    digest(part_size, len as u64, &parts).unwrap(),
                    *blake3::hash(&bytes).as_bytes(),
                    "part size {part_size}, length {len}"
                );
            }
        }
    }

    #[test]
    fn a_part_aligned_prefix_has_the_digest_of_those_bytes_alone() {
        let part_size = 4096u64;
        let bytes = data(11 * 4096 + 5);
        let parts = parts_of(&bytes, part_size);
        for k in 1..=11usize {
            let len = k as u64 * part_size;
            assert_eq!(
                digest(part_size, len, &parts[..k]).unwrap(),
                *blake3::hash(&bytes[..len as usize]).as_bytes(),
                "{k} parts"
            );
        }
    }

    #[test]
    fn the_one_shot_cv_is_the_streamed_one() {
        let bytes = data(4096);
        let mut h = PartHasher::new(8192);
        h.update(&bytes);
        assert_eq!(part_cv(8192, &bytes), h.finish().cv);
        assert_eq!(h.finish().root, None, "only the first part has a root hash");
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let parts = parts_of(&data(3 * 4096), 4096);
        assert!(matches!(
            digest(4096, 4 * 4096, &parts),
            Err(TreeError::Mismatch { .. })
        ));
        assert_eq!(
            digest(3000, 3 * 4096, &parts),
            Err(TreeError::BadPartSize(3000))
        );
        assert!(!valid_part_size(512));
        assert!(valid_part_size(8 << 20));
        assert_eq!(part_count(0, 4096), 1);
        assert_eq!(part_count(4096, 4096), 1);
        assert_eq!(part_count(4097, 4096), 2);
    }
}
