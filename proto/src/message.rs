//! Request and response messages, serialized with postcard inside frames.
//!
//! Variant order is the wire tag: new variants are only ever appended, never reordered.

use serde::{Deserialize, Serialize};

use crate::limits::MAX_MESSAGE_LEN;

/// A BLAKE3 digest of a whole file.
pub type Digest = [u8; 32];

/// What a client asks of the server. One request per frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First frame of every connection: the client's protocol version and a free-text agent name.
    Hello {
        /// The client's [`crate::PROTOCOL_VERSION`].
        version: u16,
        /// Program name and version, for the server's logs.
        agent: String,
    },
    /// Trade a password for a new session token. One session per connection: on one that is
    /// already authenticated this is a `BadRequest` (the connection stays open).
    Login {
        /// Account name.
        user: String,
        /// Password, at most [`crate::limits::MAX_PASSWORD_LEN`] bytes.
        password: String,
    },
    /// Authenticate this connection with a token from an earlier `Login` (a `BadRequest` on
    /// a connection that is already authenticated, as for `Login`).
    Authenticate {
        /// The session token.
        token: String,
    },
    /// Revoke this connection's session token on the server.
    Logout,
    /// Ask who this connection is authenticated as.
    WhoAmI,
    /// List a folder (or describe one file). The server answers with `Entries` frames.
    List {
        /// Remote path relative to the user's root; empty for the root.
        path: String,
    },
    /// Start an upload. The server answers `UploadReady`, then the client sends exactly
    /// `size - offset` raw bytes, then an `UploadEnd` frame.
    Upload {
        /// Remote path of the file to create or replace.
        path: String,
        /// Exact size of the whole file in bytes.
        size: u64,
        /// 0 to start over (any partial upload to this path is discarded); more than 0 asks to
        /// resume from at most this many bytes (protocol 2; the server then may answer
        /// `UploadResume`).
        offset: u64,
    },
    /// Trailer of an upload body: the digest of the whole file (bytes `0..size`).
    UploadEnd {
        /// BLAKE3 of the whole file.
        digest: Digest,
    },
    /// Start a download. The server answers `DownloadReady`, exactly `size - offset` raw bytes,
    /// then a `DownloadEnd` frame.
    Download {
        /// Remote path of the file.
        path: String,
        /// First byte wanted; 0 for the whole file.
        offset: u64,
    },
    /// Delete a file or an empty folder.
    Delete {
        /// Remote path.
        path: String,
    },
    /// Rename or move a file or folder inside the user's tree.
    Rename {
        /// Existing remote path.
        from: String,
        /// New remote path; an existing folder means "move into it".
        to: String,
    },
    /// Create a folder and any missing parents.
    Mkdir {
        /// Remote path.
        path: String,
    },
    /// Stop the daemon. Needs the superuser role and the password again.
    Shutdown {
        /// The caller's password, checked again.
        password: String,
    },
    /// No-op round trip, answered by `Ok`.
    Ping,
    /// Answer to `UploadResume` (protocol 2 only: a version 1 connection that sends it gets
    /// `BadRequest` and is closed): where the body that follows starts. Either the
    /// offered offset (the client's own prefix has the same digest) or 0 (start over; the
    /// server discards what it held).
    UploadFrom {
        /// `0` or the offset the server offered.
        offset: u64,
    },
    /// Start a download that resumes a partial copy (protocol 2 only: a version 1 connection
    /// that sends it gets `BadRequest` and is closed). The server sends from
    /// `offset` if its first `offset` bytes have digest `prefix`, else from 0; `DownloadReady`
    /// says which.
    DownloadFrom {
        /// Remote path of the file.
        path: String,
        /// How many bytes the client already holds.
        offset: u64,
        /// BLAKE3 of the bytes the client holds (`0..offset`).
        prefix: Digest,
    },
    /// Stage a small file in this connection's batch (protocol 3): exactly `size` raw bytes
    /// follow this frame at once, with no answer in between. The server answers `UploadDone`
    /// once the bytes are staged and verified (not yet visible), or an `Error`; the file
    /// becomes visible at the next `Commit` (or an earlier commit of the batch, see the spec).
    Put {
        /// Remote path of the file to create or replace; missing folders are created.
        path: String,
        /// Exact size in bytes, at most [`crate::limits::MAX_PUT_LEN`].
        size: u64,
        /// BLAKE3 of the `size` bytes that follow.
        digest: Digest,
    },
    /// Make every file this connection staged with `Put` durable and visible (protocol 3);
    /// answered by `Committed` or an `Error`.
    Commit,
    /// Start a key login (protocol 3): the server answers `KeyChallenge` whether or not the
    /// user or the key exists, and the client answers that with `KeyProof` (spec §8).
    KeyLogin {
        /// Account name.
        user: String,
        /// The raw 32-byte Ed25519 public key the client will sign with.
        public_key: [u8; 32],
    },
    /// The Ed25519 signature of [`crate::key_login::signed_message`] for the `KeyChallenge`
    /// just received (protocol 3); answered by `LoggedIn` or `Error{AuthFailed}`.
    KeyProof {
        /// 64 bytes.
        signature: Vec<u8>,
    },
    /// Make a long-lived token for automation (protocol 3), answered by `TokenCreated`. Only a
    /// password or key login may: a token session gets `PermissionDenied`.
    TokenCreate {
        /// A label for `token list` (at most [`crate::limits::MAX_TOKEN_NAME_LEN`] bytes).
        name: String,
        /// Lifetime in seconds; 0 for the server's default (90 days, capped by its config).
        expires_secs: u64,
        /// Refuse every request that writes (upload, delete, rename, mkdir, shutdown).
        read_only: bool,
        /// Refuse every path that is not this folder or below it; `""` for the whole tree.
        path: String,
    },
    /// List this user's tokens (protocol 3), answered by `Tokens` frames, the last with
    /// `done` set. Not for token sessions.
    TokenList,
    /// Revoke one of this user's tokens by its id as `TokenList` shows it (protocol 3),
    /// answered by `Ok` or `Error{NotFound}`. Not for token sessions.
    TokenRevoke {
        /// The token's id (at least 6 of its hex digits).
        id: String,
    },
    /// Ask for this session's account: who, and how much of the quota is used (protocol 3);
    /// answered by `Account`.
    Account,
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`.
    Hello {
        /// The server's [`crate::PROTOCOL_VERSION`].
        version: u16,
        /// Program name and version.
        agent: String,
    },
    /// Answer to `Login`: a new session.
    LoggedIn {
        /// The session token (secret).
        token: String,
        /// Session details.
        session: SessionInfo,
    },
    /// Answer to `Authenticate` and `WhoAmI`.
    Session(SessionInfo),
    /// The request succeeded and has nothing else to say.
    Ok,
    /// Part of a listing; the last frame has `done` set.
    Entries {
        /// Up to [`crate::limits::MAX_ENTRIES_PER_FRAME`] entries.
        entries: Vec<Entry>,
        /// True on the final frame of this listing.
        done: bool,
    },
    /// The server is ready for an upload body starting at `offset`.
    UploadReady {
        /// First byte the client must send; always 0 (resuming goes through `UploadResume`).
        offset: u64,
    },
    /// The upload was verified and committed under its final name.
    UploadDone {
        /// Size committed.
        size: u64,
        /// BLAKE3 of the committed file.
        digest: Digest,
    },
    /// The server is about to send a download body.
    DownloadReady {
        /// Size of the whole file.
        size: u64,
        /// First byte that will be sent.
        offset: u64,
        /// Modification time, seconds since the Unix epoch.
        modified: i64,
    },
    /// Trailer of a download body.
    DownloadEnd {
        /// BLAKE3 of the whole file (bytes `0..size`).
        digest: Digest,
    },
    /// The request failed. Build it with [`Response::error`], which bounds the message.
    Error {
        /// Machine-readable class of the failure.
        code: ErrorCode,
        /// Human-readable detail, at most [`MAX_MESSAGE_LEN`] bytes.
        message: String,
    },
    /// Unsolicited: the server is shutting down and will close this connection.
    ShuttingDown {
        /// Human-readable reason.
        message: String,
    },
    /// Answer to an `Upload` that asked to resume (protocol 2), instead of `UploadReady`: the
    /// server holds the first `offset` bytes of an interrupted upload to this path, whose
    /// BLAKE3 is `prefix`. The client answers `UploadFrom`.
    UploadResume {
        /// Bytes the server holds (more than 0, at most the offset the client asked for).
        offset: u64,
        /// BLAKE3 of those bytes.
        prefix: Digest,
    },
    /// Answer to `Commit` (protocol 3): every file staged since the previous `Committed` is
    /// durable and visible under its final name.
    Committed {
        /// How many files were made visible since the previous `Committed` on this
        /// connection (including those the server committed by itself at its batch limits).
        files: u64,
    },
    /// Answer to `KeyLogin` (protocol 3): the nonce the client signs, fresh for each.
    KeyChallenge {
        /// 32 random bytes.
        nonce: [u8; 32],
    },
    /// Answer to `TokenCreate`: the token (its only copy) and what it may do.
    TokenCreated {
        /// The new token (secret; shown once).
        token: String,
        /// Its id, name, times and scope.
        info: TokenInfo,
    },
    /// Part of the answer to `TokenList`; the last frame has `done` set.
    Tokens {
        /// Up to [`crate::limits::MAX_TOKENS_PER_FRAME`] tokens.
        tokens: Vec<TokenInfo>,
        /// True on the final frame.
        done: bool,
    },
    /// Answer to `Account` (protocol 3): the session, and the account's usage against its
    /// quota (see the spec's section 10).
    Account {
        /// Who the session belongs to.
        session: SessionInfo,
        /// Bytes of the user's files, plus what their uploads in progress and kept partial
        /// uploads hold.
        used_bytes: u64,
        /// Files the user has, plus uploads in progress that will add one.
        used_files: u64,
        /// The byte quota, `None` for unlimited.
        quota_bytes: Option<u64>,
        /// The file-count quota, `None` for unlimited.
        quota_files: Option<u64>,
    },
}

/// A long-lived token as `TokenCreated` and `Tokens` describe it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Short id (hex), for `TokenRevoke` and `xferd session revoke`.
    pub id: String,
    /// The label given at creation.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// Expiry time, seconds since the Unix epoch.
    pub expires: i64,
    /// Whether every write is refused.
    pub read_only: bool,
    /// The folder it is limited to; `""` for the whole tree.
    pub path: String,
}

/// Who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Account name.
    pub user: String,
    /// Account role.
    pub role: Role,
    /// When the session expires, seconds since the Unix epoch.
    pub expires: i64,
}

/// Account roles, ordered so that a permission check is a comparison: `Reader < User <
/// Superuser`. The order is by [`Role::rank`], not by declaration: the declaration order is
/// the wire tag (`Reader` came last, as variant 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May manage files in their own tree.
    #[default]
    User,
    /// May also shut the daemon down.
    Superuser,
    /// May only list and download their own files (protocol 3; reported as `User` to older
    /// clients, which cannot decode it).
    Reader,
}

impl Role {
    /// The name used in the users file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Superuser => "superuser",
            Role::Reader => "reader",
        }
    }

    /// Place in the order of privilege: what `Ord` compares.
    pub fn rank(self) -> u8 {
        match self {
            Role::Reader => 0,
            Role::User => 1,
            Role::Superuser => 2,
        }
    }
}

impl PartialOrd for Role {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Role {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reader" => Ok(Role::Reader),
            "user" => Ok(Role::User),
            "superuser" => Ok(Role::Superuser),
            other => Err(format!(
                "unknown role `{other}` (expected `reader`, `user` or `superuser`)"
            )),
        }
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File or folder name (one path component).
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Size in bytes (0 for folders).
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub modified: i64,
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A folder.
    Dir,
    /// Anything else (the server never follows or serves these).
    Other,
}

impl EntryKind {
    /// Lower-case name used in listings and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Other => "other",
        }
    }
}

/// Classes of failure. Each maps onto one of the client's documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request was malformed or not valid in this state (exit 1).
    BadRequest,
    /// The client speaks a protocol version the server does not (exit 1).
    VersionMismatch,
    /// Wrong user name or password (exit 3).
    AuthFailed,
    /// The request needs a logged-in session (exit 3).
    NotAuthenticated,
    /// The session token is unknown, expired or revoked (exit 3).
    SessionExpired,
    /// The role does not allow this, or the path is refused (exit 4).
    PermissionDenied,
    /// The path is not a valid remote path (exit 4).
    InvalidPath,
    /// No such file or folder (exit 5).
    NotFound,
    /// The target exists and the operation will not replace it (exit 1).
    AlreadyExists,
    /// A folder was given where a file is needed, or the reverse (exit 1).
    WrongKind,
    /// A folder to delete is not empty (exit 1).
    NotEmpty,
    /// The received data did not match the stated digest or size (exit 8).
    VerificationFailed,
    /// The server's disk is full (exit 1).
    NoSpace,
    /// The server is at a limit (sessions, logins waiting, a user's transfers); the message
    /// says which; try again (exit 7, like any refusal at a connection or session limit).
    Busy,
    /// The server is shutting down (exit 7).
    ShuttingDown,
    /// Anything else on the server's side (exit 1).
    Internal,
    /// Too many failed logins from this address; refused until its penalty expires (exit 3).
    RateLimited,
    /// The upload would take the account past its byte or file quota, or its quota was
    /// lowered below what it holds during the upload; the message says how much of how much
    /// is used (exit 9).
    QuotaExceeded,
}

impl ErrorCode {
    /// The `xfer` exit code this failure maps onto (see the contract).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::AuthFailed
            | ErrorCode::NotAuthenticated
            | ErrorCode::SessionExpired
            | ErrorCode::RateLimited => 3,
            ErrorCode::PermissionDenied | ErrorCode::InvalidPath => 4,
            ErrorCode::NotFound => 5,
            ErrorCode::ShuttingDown | ErrorCode::Busy => 7,
            ErrorCode::VerificationFailed => 8,
            ErrorCode::QuotaExceeded => 9,
            ErrorCode::BadRequest
            | ErrorCode::VersionMismatch
            | ErrorCode::AlreadyExists
            | ErrorCode::WrongKind
            | ErrorCode::NotEmpty
            | ErrorCode::NoSpace
            | ErrorCode::Internal => 1,
        }
    }
}

impl Response {
    /// An error response; the one way to build one, because it bounds the message.
    ///
    /// Messages often echo what the client sent (a path, a name), and a path can be almost as
    /// long as a frame: echoed whole, the answer would no longer fit in one, and the client
    /// would get a closed connection instead of its error. So a message over
    /// [`MAX_MESSAGE_LEN`] bytes keeps its start and its end (where the reason usually is)
    /// and loses the middle, which any encoded `Error` fits in a frame with room to spare.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error {
            code,
            message: bounded_message(message.into()),
        }
    }
}

/// `message` cut to at most [`MAX_MESSAGE_LEN`] bytes on character boundaries: its first
/// three quarters and its last quarter, joined by `…`.
fn bounded_message(message: String) -> String {
    if message.len() <= MAX_MESSAGE_LEN {
        return message;
    }
    const MARK: &str = "…";
    let keep = MAX_MESSAGE_LEN - MARK.len();
    let mut head = keep * 3 / 4;
    while !message.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = message.len() - (keep - head);
    while !message.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{MARK}{}", &message[..head], &message[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_FRAME_LEN;

    #[test]
    fn an_error_echoing_a_frame_sized_path_still_fits_in_a_frame() {
        for filler in ["x", "é", "😀", "\u{1b}"] {
            let path = filler.repeat(MAX_FRAME_LEN / filler.len());
            let r = Response::error(
                ErrorCode::InvalidPath,
                format!("refused path `{path}`: path is longer than 4096 bytes"),
            );
            let Response::Error { message, .. } = &r else {
                unreachable!()
            };
            assert!(message.len() <= MAX_MESSAGE_LEN, "{}", message.len());
            assert!(message.starts_with("refused path `"), "{message}");
            assert!(
                message.ends_with("`: path is longer than 4096 bytes"),
                "{message}"
            );
            assert!(message.contains('…'));
            let mut frame = Vec::new();
            crate::frame::encode_frame(&r, &mut frame).unwrap();
            assert!(frame.len() <= MAX_MESSAGE_LEN + 16, "{}", frame.len());
        }
    }

    /// The wire tags of the token and account messages are fixed by the spec (proto/README.md
    /// §3, §9, §10).
    #[test]
    fn token_messages_have_their_spec_tags() {
        let tag = |bytes: Vec<u8>| bytes[0];
        let req = |r: &Request| tag(postcard::to_allocvec(r).unwrap());
        let resp = |r: &Response| tag(postcard::to_allocvec(r).unwrap());
        assert_eq!(req(&Request::Commit), 17);
        assert_eq!(
            req(&Request::TokenCreate {
                name: String::new(),
                expires_secs: 0,
                read_only: false,
                path: String::new()
            }),
            20
        );
        assert_eq!(req(&Request::TokenList), 21);
        assert_eq!(req(&Request::TokenRevoke { id: String::new() }), 22);
        assert_eq!(req(&Request::Account), 23);
        assert_eq!(resp(&Response::Committed { files: 0 }), 12);
        let info = TokenInfo {
            id: String::new(),
            name: String::new(),
            created: 0,
            expires: 0,
            read_only: false,
            path: String::new(),
        };
        assert_eq!(
            resp(&Response::TokenCreated {
                token: String::new(),
                info
            }),
            14
        );
        assert_eq!(
            resp(&Response::Tokens {
                tokens: vec![],
                done: true
            }),
            15
        );
        let session = SessionInfo {
            user: String::new(),
            role: Role::User,
            expires: 0,
        };
        assert_eq!(
            resp(&Response::Account {
                session,
                used_bytes: 0,
                used_files: 0,
                quota_bytes: None,
                quota_files: None
            }),
            16
        );
    }

    #[test]
    fn roles_order_by_privilege_and_keep_their_wire_tags() {
        assert!(Role::Reader < Role::User && Role::User < Role::Superuser);
        let mut all = [Role::Superuser, Role::Reader, Role::User];
        all.sort();
        assert_eq!(all, [Role::Reader, Role::User, Role::Superuser]);
        // The tags older peers know stay where they were; `Reader` is the new tag 2.
        for (role, tag) in [(Role::User, 0u8), (Role::Superuser, 1), (Role::Reader, 2)] {
            assert_eq!(postcard::to_allocvec(&role).unwrap(), [tag]);
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
    }

    #[test]
    fn a_quota_refusal_exits_9_and_keeps_its_new_tag() {
        assert_eq!(ErrorCode::QuotaExceeded.exit_code(), 9);
        assert_eq!(
            postcard::to_allocvec(&ErrorCode::QuotaExceeded).unwrap(),
            [17]
        );
    }

    #[test]
    fn a_short_error_message_is_kept_as_it_is() {
        let exact = "m".repeat(MAX_MESSAGE_LEN);
        assert_eq!(
            Response::error(ErrorCode::NotFound, exact.clone()),
            Response::Error {
                code: ErrorCode::NotFound,
                message: exact
            }
        );
    }
}
