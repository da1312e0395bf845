//! Limits on everything that comes from the network, shared by both sides so they agree.

/// Largest frame body (the bytes after the 4-byte length prefix). Control messages only;
/// file bodies travel outside frames.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Longest remote path, in bytes, after normalisation.
pub const MAX_PATH_LEN: usize = 4096;

/// Longest single path component (a file or folder name), in bytes: the common filesystem limit.
pub const MAX_NAME_LEN: usize = 255;

/// Deepest remote path, in components.
pub const MAX_PATH_DEPTH: usize = 64;

/// Longest user name, in bytes.
pub const MAX_USER_LEN: usize = 64;

/// Longest password accepted, in bytes; longer ones are refused before any hashing.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Longest session token, in bytes. Room for a signed token (s3 mode) that carries its scope:
/// a user name, a path of [`MAX_PATH_LEN`] bytes and 77 bytes of fields, in base64.
pub const MAX_TOKEN_LEN: usize = 6144;

/// Longest label of a long-lived token (`TokenCreate`), in bytes.
pub const MAX_TOKEN_NAME_LEN: usize = 64;

/// Most tokens in one `Tokens` frame: each may carry a path of [`MAX_PATH_LEN`] bytes, so a
/// full frame stays well under [`MAX_FRAME_LEN`].
pub const MAX_TOKENS_PER_FRAME: usize = 8;

/// Longest free-text message (agent strings, error messages) shown or logged; longer ones are
/// cut.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Size of each buffer in the body pipeline: large reads and writes are what make TLS and
/// file I/O fast (measured: 256 KiB doubled loopback throughput against rustls' default).
pub const CHUNK_LEN: usize = 256 * 1024;

/// Size of each buffer a receiver fills from the network before its file thread writes and
/// hashes it. Larger than [`CHUNK_LEN`] because each buffer costs a hand-off between the network
/// task and the file thread (two wake-ups and a `write`): at 1 MiB the receiving side of a
/// 512 MiB transfer spent 5-9% less CPU than at 256 KiB (`bench/ab.py --sides`).
pub const RECV_CHUNK_LEN: usize = 1024 * 1024;

/// Buffers in flight per transfer: bounds a receiver's memory to `RECV_CHUNK_LEN *
/// PIPELINE_DEPTH` and a sender's to about `CHUNK_LEN * PIPELINE_DEPTH`.
pub const PIPELINE_DEPTH: usize = 4;

/// Most directory entries in one `Entries` frame; a listing spans as many frames as it needs.
pub const MAX_ENTRIES_PER_FRAME: usize = 128;

/// Most entries a client accepts in one listing, so a misbehaving server cannot grow its
/// memory without bound (about 300 MB at the longest names).
pub const MAX_LIST_ENTRIES: usize = 1_000_000;

/// Largest file a `Put` may carry (protocol 3); bigger files go through `Upload`. Small
/// enough that a server holds a whole body in memory while it verifies it.
pub const MAX_PUT_LEN: u64 = 1024 * 1024;

/// Most `Put`s a client may have sent without having read their answers (protocol 3): the
/// answers they are owed then fit in any socket buffer, so a client that writes before it
/// reads cannot deadlock with a server that answers each `Put` before it reads the next.
pub const MAX_PUTS_IN_FLIGHT: usize = 64;
