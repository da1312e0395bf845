//! xfer-util: the few helpers both binaries (`xferd` and `xfer`) need, kept once so they cannot
//! drift apart again (the two copies of the atomic write had).
//!
//! Map of the crate:
//! - [`fs`]: atomic file replacement (temp file in the same folder, fsync, rename, fsync the
//!   folder) and the folder helpers it rests on.
//! - [`password`]: reading a password: one line of stdin, or a no-echo prompt on the terminal.
//! - [`format`](mod@format): how times and byte counts are shown to people.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod format;
pub mod fs;
pub mod password;

pub use format::{format_bytes, format_time};
pub use fs::{Mode, write_atomic, write_private};
pub use password::{PasswordError, read_password};
