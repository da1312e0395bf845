//! Client failures and the exit code each maps onto (see the contract's table).

use xfer_proto::ErrorCode;
use xfer_proto::connection::ConnError;
use xfer_proto::fingerprint::Fingerprint;

/// Everything that can go wrong in a client command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The command line is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// No stored session for the server (exit 3).
    #[error("{}", not_logged_in(.server.as_deref(), .user.as_deref()))]
    NotLoggedIn {
        /// The server, if one was chosen.
        server: Option<String>,
        /// Who last logged in there, if known.
        user: Option<String>,
    },
    /// The server refused the request (exit code from the error code).
    #[error("{message}")]
    Server {
        /// The server's error class.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The pinned key changed: possible man-in-the-middle (exit 6).
    #[error(
        "the identity of {server} has changed (pinned {pinned}, now presents {seen}); refusing to connect. If the server's key was replaced on purpose, run `xfer forget {server}` and log in again"
    )]
    KeyChanged {
        /// The server.
        server: String,
        /// What we pinned.
        pinned: Fingerprint,
        /// What it presented.
        seen: Fingerprint,
    },
    /// First contact with `--fingerprint` and the key did not match (exit 6).
    #[error("the key of {server} is {seen}, not the expected {expected}; refusing to connect")]
    FingerprintMismatch {
        /// The server.
        server: String,
        /// What the user said to expect.
        expected: Fingerprint,
        /// What it presented.
        seen: Fingerprint,
    },
    /// First contact that nobody confirmed (exit 6).
    #[error(
        "{server} is not a known server (its key is {seen}); confirm it with --fingerprint {seen}, or trust it with --accept-new"
    )]
    UnknownServer {
        /// The server.
        server: String,
        /// Its key.
        seen: Fingerprint,
    },
    /// A token (`XFER_TOKEN`, `--token-file`) for a server whose key is neither pinned nor
    /// given: it is never sent unchecked (exit 6).
    #[error(
        "{server} is not a known server, and a token is only sent to a server whose key is checked: pass --fingerprint FP (from `xferd fingerprint` on the server), or log in to it once with `xfer login USER@{server}` to pin it"
    )]
    UnpinnedForToken {
        /// The server.
        server: String,
    },
    /// The user answered no to the first-contact question (exit 6).
    #[error("server identity not confirmed; nothing was sent")]
    NotConfirmed,
    /// Could not connect (exit 7).
    #[error("cannot reach {server}: {reason}")]
    Connect {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// The server refused the connection at a limit, or closed it before the handshake as a
    /// server at its limit does (exit 7); `reason` says which limit when the server said.
    #[error("cannot reach {server}: {reason}")]
    Refused {
        /// The server.
        server: String,
        /// Why, from the server's refusal line when it sent one.
        reason: String,
    },
    /// The connection broke or timed out (exit 7).
    #[error("connection to the server failed: {0} - check that the server is up and try again")]
    Broken(#[from] ConnError),
    /// The server is shutting down (exit 7).
    #[error("the server is shutting down; try again later")]
    ServerShuttingDown,
    /// A transfer arrived corrupted (exit 8).
    #[error("{0}")]
    Verification(String),
    /// A local file could not be read or written (exit 1).
    #[error("{context}: {}", io_text(.source))]
    Local {
        /// What was being done, naming the file.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server said something that makes no sense here (exit 1).
    #[error("protocol error: {0} - is the server an xferd of a matching version?")]
    Protocol(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

/// Text from the server made safe for a terminal: control characters escaped (no escape
/// sequences can reach the user's terminal) and cut at `MAX_MESSAGE_LEN` characters.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == xfer_proto::limits::MAX_MESSAGE_LEN {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// An I/O error in words, without the `(os error N)` tail.
pub fn io_text(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => "no such file or folder".into(),
        K::PermissionDenied => "permission denied".into(),
        K::AlreadyExists => "it already exists".into(),
        K::StorageFull => "no space left on this disk".into(),
        K::ConnectionRefused => "connection refused".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_string(),
                None => text,
            }
        }
    }
}

fn not_logged_in(server: Option<&str>, user: Option<&str>) -> String {
    let user = user.unwrap_or("USER");
    match server {
        Some(s) => format!("not logged in to {s} - run `xfer login {user}@{s}`"),
        None => format!("not logged in - run `xfer login {user}@HOST[:PORT]`"),
    }
}

impl ClientError {
    /// The documented exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) => 2,
            ClientError::NotLoggedIn { .. } => 3,
            ClientError::Server { code, .. } => code.exit_code(),
            ClientError::KeyChanged { .. }
            | ClientError::FingerprintMismatch { .. }
            | ClientError::UnknownServer { .. }
            | ClientError::UnpinnedForToken { .. }
            | ClientError::NotConfirmed => 6,
            ClientError::Connect { .. }
            | ClientError::Refused { .. }
            | ClientError::Broken(_)
            | ClientError::ServerShuttingDown => 7,
            ClientError::Verification(_) => 8,
            ClientError::Local { .. } | ClientError::Protocol(_) | ClientError::Other(_) => 1,
        }
    }

    /// An error answer from the server, its text made safe for the terminal; a `Busy`
    /// answer always says it was a limit.
    pub fn server(code: ErrorCode, message: &str) -> Self {
        let mut message = printable(message);
        if code == ErrorCode::Busy && !message.contains("busy") {
            message = format!("server busy: {message}");
        }
        ClientError::Server { code, message }
    }

    /// Shorthand for a local I/O failure.
    pub fn local(context: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Local {
            context: context.into(),
            source,
        }
    }

    /// True when the connection cannot carry more requests.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Broken(_)
                | ClientError::ServerShuttingDown
                | ClientError::Connect { .. }
                | ClientError::Refused { .. }
        )
    }
}

/// No terminal to prompt on is a usage error (exit 2), as a missing argument is.
impl From<xfer_util::PasswordError> for ClientError {
    fn from(e: xfer_util::PasswordError) -> Self {
        use xfer_util::PasswordError;
        match e {
            PasswordError::Read { context, source } => ClientError::local(context, source),
            PasswordError::NoTerminal => ClientError::Usage(e.to_string()),
            PasswordError::Mismatch => ClientError::Other(e.to_string()),
        }
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An error that has already been printed, carrying the exit code.
pub struct Reported(pub u8);

/// Prints `e` as the one line a failure gets and keeps its exit code.
pub(crate) fn report(e: &ClientError) -> Reported {
    eprintln!("xfer: error: {e}");
    Reported(e.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        let fp = Fingerprint([0; 32]);
        let cases: Vec<(ClientError, u8)> = vec![
            (ClientError::Usage("x".into()), 2),
            (
                ClientError::NotLoggedIn {
                    server: None,
                    user: None,
                },
                3,
            ),
            (
                ClientError::Server {
                    code: ErrorCode::AuthFailed,
                    message: String::new(),
                },
                3,
            ),
            (
                ClientError::Server {
                    code: ErrorCode::PermissionDenied,
                    message: String::new(),
                },
                4,
            ),
            (
                ClientError::Server {
                    code: ErrorCode::NotFound,
                    message: String::new(),
                },
                5,
            ),
            (
                ClientError::KeyChanged {
                    server: "s".into(),
                    pinned: fp,
                    seen: fp,
                },
                6,
            ),
            (ClientError::Broken(ConnError::Closed), 7),
            (
                ClientError::Refused {
                    server: "s".into(),
                    reason: "r".into(),
                },
                7,
            ),
            (ClientError::server(ErrorCode::Busy, "too many sessions"), 7),
            (ClientError::Verification("x".into()), 8),
            (
                ClientError::server(ErrorCode::QuotaExceeded, "quota exceeded: 1 B of 1 B used"),
                9,
            ),
            (ClientError::Other("x".into()), 1),
        ];
        for (err, code) in cases {
            assert_eq!(err.exit_code(), code, "{err:?}");
        }
    }

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        assert_eq!(printable("no such file"), "no such file");
        assert_eq!(printable("bad\u{1b}[2Jthing\n"), "bad\\u{1b}[2Jthing\\n");
        let long = "x".repeat(5000);
        assert_eq!(
            printable(&long).chars().count(),
            xfer_proto::limits::MAX_MESSAGE_LEN + 1
        );
    }

    #[test]
    fn busy_answers_say_it_was_a_limit() {
        let e = ClientError::server(ErrorCode::Busy, "too many logins in progress");
        assert_eq!(e.to_string(), "server busy: too many logins in progress");
        let e = ClientError::server(ErrorCode::Busy, "server busy: too many sessions for a (1)");
        assert_eq!(e.to_string(), "server busy: too many sessions for a (1)");
    }

    #[test]
    fn not_logged_in_says_what_to_do() {
        let msg = |server: Option<&str>, user: Option<&str>| {
            ClientError::NotLoggedIn {
                server: server.map(String::from),
                user: user.map(String::from),
            }
            .to_string()
        };
        assert_eq!(
            msg(Some("127.0.0.1:7443"), Some("alice")),
            "not logged in to 127.0.0.1:7443 - run `xfer login alice@127.0.0.1:7443`"
        );
        assert_eq!(
            msg(Some("127.0.0.1:7443"), None),
            "not logged in to 127.0.0.1:7443 - run `xfer login USER@127.0.0.1:7443`"
        );
        assert_eq!(
            msg(None, None),
            "not logged in - run `xfer login USER@HOST[:PORT]`"
        );
    }
}
