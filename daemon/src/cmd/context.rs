//! What every command is given: the daemon's shared [`State`] and this connection's own
//! (hello, session, batch), with the audit helpers over both. The connection loop
//! (`handler`) owns one per connection and lends it to each command; a command takes
//! everything it needs from it and its arguments, so commands never reach back into the loop.

use std::net::SocketAddr;
use std::sync::Arc;

use xfer_proto::{ErrorCode, Role};

use crate::state::State;
use crate::storage::Tree;

/// An authenticated session on this connection.
pub struct Auth {
    /// Account name.
    pub user: String,
    /// Account role at authentication.
    pub role: Role,
    /// The session token, to re-check before each request and to revoke on logout.
    pub token: String,
    /// Session expiry, seconds since the epoch.
    pub expires: i64,
    /// The user's storage tree.
    pub tree: Tree,
    /// Set when the session is a long-lived token: what the dispatcher limits it to.
    pub scope: Option<crate::sessions::TokenScope>,
}

/// Per-connection state the commands read and change.
pub struct Ctx {
    /// Shared daemon state.
    pub state: Arc<State>,
    /// The client's address, for logs.
    pub peer: SocketAddr,
    /// Whether the client has sent a valid `Hello`.
    pub greeted: bool,
    /// The protocol version agreed in the hello (decides which features the client knows).
    pub version: u16,
    /// The session, once authenticated.
    pub auth: Option<Auth>,
    /// Failed logins or token checks on this connection.
    pub failures: u32,
    /// This connection's place in admission: unauthenticated, then a session of its user.
    pub ticket: crate::admission::Ticket,
    /// Files staged by `Put` and not yet committed (protocol 3); deleted if the connection
    /// ends first.
    pub(crate) batch: super::batch::Batch,
    /// This connection's TLS channel binding (RFC 9266), which a key login signs; `None`
    /// over a stream without TLS (in-memory tests), where key login is refused.
    pub channel_binding: Option<[u8; xfer_proto::tls_stream::CHANNEL_BINDING_LEN]>,
    /// The `KeyChallenge` just sent, which only the next request may answer.
    pub(crate) key_challenge: Option<super::keys::Challenge>,
}

impl Ctx {
    /// A connection from `peer`, admitted with `ticket`, before its hello.
    pub fn new(state: Arc<State>, peer: SocketAddr, ticket: crate::admission::Ticket) -> Ctx {
        Ctx {
            state,
            peer,
            greeted: false,
            version: 0,
            auth: None,
            failures: 0,
            ticket,
            batch: Default::default(),
            channel_binding: None,
            key_challenge: None,
        }
    }

    /// The authenticated session, for commands the dispatcher only runs with one.
    pub fn session(&self) -> &Auth {
        self.auth
            .as_ref()
            .expect("the dispatcher checked the session")
    }

    /// Makes this connection one of `user`'s sessions for admission (it leaves the
    /// unauthenticated pool), or says which session cap is full.
    pub fn enter_session(&mut self, user: &str) -> Result<(), crate::admission::Refusal> {
        self.ticket
            .enter_session(user)
            .inspect_err(|why| self.state.admission.log_refusal(self.peer.ip(), why))
    }

    /// Records an operation in the audit trail as the authenticated user.
    pub fn audit(&self, op: &str, path: Option<&str>, outcome: Outcome<'_>) {
        let user = self.auth.as_ref().map_or("", |a| a.user.as_str());
        self.audit_as(user, op, path, outcome);
    }

    /// Records an operation in the audit trail under `user` (a failed login's name).
    pub fn audit_as(&self, user: &str, op: &str, path: Option<&str>, outcome: Outcome<'_>) {
        self.state.audit.record(crate::audit::Event {
            user,
            source: self.peer.to_string(),
            op,
            path,
            to: outcome.to,
            bytes: outcome.bytes,
            resumed_from: outcome.resumed_from.filter(|&o| o > 0),
            digest: outcome
                .digest
                .map(|d| blake3::Hash::from_bytes(*d).to_hex().to_string()),
            token_id: outcome.token_id,
            result: match outcome.error {
                None => "ok".into(),
                Some(code) => format!("{code:?}"),
            },
            ..Default::default()
        });
    }
}

/// How an audited operation ended, and what it moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome<'a> {
    /// The error code, if it failed.
    pub error: Option<ErrorCode>,
    /// Rename target.
    pub to: Option<&'a str>,
    /// Bytes that crossed the network.
    pub bytes: Option<u64>,
    /// Where a resumed transfer started.
    pub resumed_from: Option<u64>,
    /// Digest of the file transferred.
    pub digest: Option<&'a xfer_proto::Digest>,
    /// Id of the token a token operation made or revoked (never the token).
    pub token_id: Option<&'a str>,
}

impl Outcome<'_> {
    /// Success with nothing else to say.
    pub fn ok() -> Self {
        Outcome::default()
    }
    /// Failure with `code`.
    pub fn failed(code: ErrorCode) -> Self {
        Outcome {
            error: Some(code),
            ..Default::default()
        }
    }
}

/// What the connection loop does after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Read the next request.
    Continue,
    /// Close the connection.
    Close,
}
