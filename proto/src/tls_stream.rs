//! TLS 1.3 over any async byte stream, with at most one user-space copy of each byte: rustls
//! runs the handshake (its unbuffered API) and then hands over the traffic secrets through
//! its kernel-connection API, and this module seals and opens the records in place with ring.
//!
//! Why: rustls 0.23 copies every received record into a fresh `Vec` before anyone can read it
//! (`take_received_plaintext`, in the buffered and the unbuffered API alike; in-place
//! decryption is still a TODO there), and tokio-rustls then copies it again into the caller's
//! buffer. Profiles of a 512 MiB transfer put that `memmove` at 31% of the downloading
//! client's CPU and 14% of the uploading daemon's, with the copies on the sending side (a
//! fresh `Vec` per record, then a `BufStream`) another 7-8%. Here a large read goes from
//! the socket straight into the caller's buffer and each record is decrypted there, ring
//! moving the plaintext down over the headers and tags in the same pass (no user-space copy
//! of application data; small reads, such as frames, go through `rbuf` with one copy);
//! a write copies the caller's bytes once into `wbuf`, where they are encrypted, and
//! leaves in one `write` of up to [`CHUNK_LEN`]; a file body skips even that copy, read
//! into the slots of its records and sealed there (`records`, [`WriteRecords`] below).
//! The kernel-connection API is rustls'
//! own answer for "does its own encryption and decryption" (it was made for kTLS, which this
//! kernel lacks); rustls keeps the handshake, the certificate checks, ALPN, session tickets
//! and the key schedule of key updates.
//!
//! The unbuffered API has no `export_keying_material`, which key login needs for its channel
//! binding (RFC 9266 `tls-exporter`): each connection gets its own copy of the config whose
//! [`KeyLog`] keeps only the exporter master secret, and [`TlsStream::channel_binding`] is
//! the RFC 8446 §7.5 exporter computed from it with ring's HKDF, once, at the end of the
//! handshake (the secret is wiped right after).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use ring::{aead, digest, hkdf};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::hash::HashAlgorithm;
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{
    ClientConfig, ConnectionTrafficSecrets, ExtractedSecrets, KeyLog, ServerConfig,
    SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use zeroize::Zeroizing;

use crate::limits::CHUNK_LEN;
use crate::records::{OVERHEAD, RecordBuf, WriteRecords};

/// A record header: content type, legacy version, length.
pub(crate) const HEADER_LEN: usize = 5;
/// Most plaintext in one record (RFC 8446 §5.1).
pub(crate) const MAX_PLAIN: usize = 1 << 14;
/// The AEAD tag of every TLS 1.3 suite.
pub(crate) const TAG_LEN: usize = 16;
/// Most bytes after a header (RFC 8446 §5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// The largest record on the wire.
const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHER;
/// Receive buffer, for handshake flights (rustls takes messages up to 64 KiB) and for reads
/// too small to take records directly (frames, the end of a chunk).
const READ_CAP: usize = 64 * 1024 + MAX_RECORD;
/// Most plaintext one write takes, so that `wbuf` stays one chunk of records.
const WRITE_PLAIN: usize = CHUNK_LEN;
/// Send buffer: a chunk and the overhead of its records, plus room for a key update.
const WRITE_CAP: usize = WRITE_PLAIN + (WRITE_PLAIN / MAX_PLAIN + 2) * (HEADER_LEN + 1 + TAG_LEN);
/// Records sent under one key before it is replaced: AES-GCM is good for 2^24.5 records
/// (RFC 8446 §5.5), so this keeps far below it (64 GiB of 16 KiB records).
const REKEY_AFTER: u64 = 1 << 22;
/// Most bytes of post-handshake messages buffered while they arrive in pieces.
const MAX_HANDSHAKE: usize = 64 * 1024;
/// Most empty records in a row, as in rustls (`ALLOWED_CONSECUTIVE_EMPTY_FRAGMENTS_MAX`): a
/// peer that sends nothing else keeps the reader busy without ever handing it data.
const MAX_EMPTY_IN_A_ROW: u8 = 32;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPLICATION_DATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_INTERNAL_ERROR: u8 = 80;
/// A key update that does not ask for one back.
const KEY_UPDATE: [u8; 5] = [HS_KEY_UPDATE, 0, 0, 1, 0];
/// The record that carries it.
pub(crate) const KEY_UPDATE_RECORD: usize = KEY_UPDATE.len() + OVERHEAD;

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection without a TLS close_notify",
    )
}

fn invalid(what: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A fatal error in the records the peer sent, and the alert that tells it why (RFC 8446
/// §6.2: "send an appropriate fatal alert and ... close the connection without sending or
/// receiving any additional data"). None for an alert the peer sent itself.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
struct Fatal {
    alert: Option<u8>,
    what: String,
}

/// A fatal error in what the peer sent, answered with `alert`.
fn fatal(alert: u8, what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        Fatal {
            alert: Some(alert),
            what: what.into(),
        },
    )
}

/// The kind and text of an error that ended one direction, returned by every later call.
type Ended = Option<(io::ErrorKind, String)>;

/// The error that ended a direction, again.
fn ended(e: &Ended) -> Option<io::Error> {
    e.as_ref()
        .map(|(kind, what)| io::Error::new(*kind, what.clone()))
}

/// The label of the RFC 9266 `tls-exporter` channel binding.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// Bytes of the channel binding (RFC 9266: 32).
pub const CHANNEL_BINDING_LEN: usize = 32;
/// The [`KeyLog`] label of the exporter master secret.
const EXPORTER_SECRET: &str = "EXPORTER_SECRET";

/// One connection's [`KeyLog`]: keeps the exporter master secret and nothing else (rustls
/// derives it on both sides at the end of every TLS 1.3 handshake).
#[derive(Debug, Default)]
struct ExporterSecret(Mutex<Option<Zeroizing<Vec<u8>>>>);

impl KeyLog for ExporterSecret {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == EXPORTER_SECRET {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Zeroizing::new(secret.to_vec()));
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == EXPORTER_SECRET
    }
}

impl ExporterSecret {
    /// The channel binding of the handshake that logged the secret (which is wiped).
    fn channel_binding(
        &self,
        suite: Option<SupportedCipherSuite>,
    ) -> io::Result<[u8; CHANNEL_BINDING_LEN]> {
        let secret = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| invalid("the TLS handshake gave no exporter secret"))?;
        let hash = suite
            .and_then(|s| s.tls13())
            .map(|s| s.common.hash_provider.algorithm())
            .ok_or_else(|| invalid("no TLS 1.3 cipher suite was negotiated"))?;
        let mut out = [0u8; CHANNEL_BINDING_LEN];
        tls13_exporter(&secret, hash, CHANNEL_BINDING_LABEL, b"", &mut out)?;
        Ok(out)
    }
}

/// An output length for ring's HKDF.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446 §7.1) of `prk` into `out`.
fn expand_label(prk: &hkdf::Prk, label: &[u8], context: &[u8], out: &mut [u8]) -> io::Result<()> {
    let failed = |_| invalid("TLS exporter: HKDF expansion failed");
    let length = u16::try_from(out.len())
        .map_err(|_| invalid("TLS exporter: output too long"))?
        .to_be_bytes();
    let label_len = [u8::try_from(b"tls13 ".len() + label.len())
        .map_err(|_| invalid("TLS exporter: label too long"))?];
    let context_len =
        [u8::try_from(context.len()).map_err(|_| invalid("TLS exporter: context too long"))?];
    let info = [
        &length[..],
        &label_len,
        b"tls13 ",
        label,
        &context_len,
        context,
    ];
    prk.expand(&info, Len(out.len()))
        .map_err(failed)?
        .fill(out)
        .map_err(failed)
}

/// The TLS 1.3 exporter (RFC 8446 §7.5) from the exporter master secret `secret` of a suite
/// whose hash is `hash`:
/// `HKDF-Expand-Label(Derive-Secret(secret, label, ""), "exporter", Hash(context), len)`.
fn tls13_exporter(
    secret: &[u8],
    hash: HashAlgorithm,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> io::Result<()> {
    let (hkdf_alg, digest_alg) = match hash {
        HashAlgorithm::SHA256 => (hkdf::HKDF_SHA256, &digest::SHA256),
        HashAlgorithm::SHA384 => (hkdf::HKDF_SHA384, &digest::SHA384),
        other => return Err(invalid(format!("TLS exporter: unsupported hash {other:?}"))),
    };
    let mut derived = Zeroizing::new(vec![0u8; digest_alg.output_len()]);
    let empty = digest::digest(digest_alg, b"");
    expand_label(
        &hkdf::Prk::new_less_safe(hkdf_alg, secret),
        label,
        empty.as_ref(),
        &mut derived,
    )?;
    let context = digest::digest(digest_alg, context);
    expand_label(
        &hkdf::Prk::new_less_safe(hkdf_alg, &derived),
        b"exporter",
        context.as_ref(),
        out,
    )
}

/// Connects as a client: the handshake runs on `io` with `config` (which must have
/// `enable_secret_extraction` set), then the stream is ready for application data.
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<TlsStream<IO>> {
    // A copy per connection, for its own key log: a handful of `Arc`s and small `Vec`s,
    // nothing next to the handshake's key exchange and signature.
    let exporter = Arc::new(ExporterSecret::default());
    let mut config = ClientConfig::clone(&config);
    config.key_log = exporter.clone();
    let conn = UnbufferedClientConnection::new(Arc::new(config), name).map_err(invalid)?;
    handshake(conn, io, &exporter).await
}

/// Accepts as a server, as [`connect`] does for a client.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ServerConfig>,
) -> io::Result<TlsStream<IO>> {
    let exporter = Arc::new(ExporterSecret::default());
    let mut config = ServerConfig::clone(&config);
    config.key_log = exporter.clone();
    let conn = UnbufferedServerConnection::new(Arc::new(config)).map_err(invalid)?;
    handshake(conn, io, &exporter).await
}

/// A TLS 1.3 connection after its handshake, as an async byte stream.
pub struct TlsStream<IO> {
    /// The transport.
    io: IO,
    /// What rustls keeps after the handshake: the key schedule and the session store.
    kernel: Kernel,
    /// The protocol agreed by ALPN.
    alpn: Option<Vec<u8>>,
    /// The RFC 9266 `tls-exporter` channel binding of this connection.
    channel_binding: [u8; CHANNEL_BINDING_LEN],
    /// Keys and sequence number for records read.
    rx: Keys,
    /// Keys and sequence number for records written.
    tx: Keys,
    /// Received bytes: plaintext `pstart..pend` not yet read (decrypted in place), then
    /// records `cstart..cend` not yet opened.
    rbuf: Box<[u8]>,
    /// Plaintext not yet handed out.
    pstart: usize,
    /// End of that plaintext.
    pend: usize,
    /// Start of the unopened records.
    cstart: usize,
    /// End of the bytes received.
    cend: usize,
    /// Application data that came with the end of the handshake, handed out first.
    early: Vec<u8>,
    /// A post-handshake message that spans records, until it is whole.
    handshake: Vec<u8>,
    /// Sealed records not yet written: `wbuf[wpos..]`, after those of `sealed`.
    wbuf: Vec<u8>,
    /// How much of `wbuf` the transport took.
    wpos: usize,
    /// A body chunk's records, sealed where the file thread read them ([`RecordBuf`]) and
    /// not yet written: `sealed[spos..]`. Written before `wbuf`, which is empty when they
    /// are sealed. Once written, the buffer goes back to the next chunk's [`RecordBuf`];
    /// a flush (the end of a body) lets it go.
    sealed: Vec<u8>,
    /// How much of `sealed` the transport took.
    spos: usize,
    /// The peer sent close_notify: reads end cleanly.
    read_closed: bool,
    /// We sent close_notify: no more writes.
    write_closed: bool,
    /// The peer asked for a key update; ours goes out before our next record.
    key_update_owed: bool,
    /// Sequence number at which the sending key is replaced.
    rekey_after: u64,
    /// Empty records received in a row (see [`MAX_EMPTY_IN_A_ROW`]).
    empty_in_a_row: u8,
    /// The error that ended reading: a record sequence that failed once is never read on
    /// (reading on past a forged record would skip it, since its sequence number is spent).
    read_error: Ended,
    /// The error that ended writing: after a transport error the records already sealed are
    /// gone, and a caller retrying its bytes must not get them sealed again.
    write_error: Ended,
}

/// The client's or the server's kernel connection.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> io::Result<Keys> {
        let next = match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        };
        Keys::new(next.map_err(|e| fatal(ALERT_INTERNAL_ERROR, e.to_string()))?)
    }

    fn update_rx(&mut self) -> io::Result<Keys> {
        let next = match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        };
        Keys::new(next.map_err(|e| fatal(ALERT_INTERNAL_ERROR, e.to_string()))?)
    }

    fn new_session_ticket(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Kernel::Client(k) => k
                .handle_new_session_ticket(payload)
                .map_err(|e| fatal(ALERT_DECODE_ERROR, e.to_string())),
            Kernel::Server(_) => Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "the client sent a session ticket",
            )),
        }
    }
}

/// One direction's AEAD key, IV and record sequence number.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(invalid("unsupported TLS cipher suite")),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("unusable TLS traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("unusable TLS IV"))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3), which uses up its sequence number.
    fn next_nonce(&mut self) -> io::Result<aead::Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| fatal(ALERT_INTERNAL_ERROR, "TLS record sequence exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }

    /// Opens the record `buf[at..at + len]` (its header included) and writes its plaintext
    /// to `buf[to..]`, where `to <= at + HEADER_LEN`: ring decrypts and moves in one pass.
    /// Returns the inner content type and the length of the content before it.
    fn open(
        &mut self,
        buf: &mut [u8],
        at: usize,
        len: usize,
        to: usize,
    ) -> io::Result<(u8, usize)> {
        let header = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]];
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_within(
                nonce,
                aead::Aad::from(header),
                &mut buf[to..at + len],
                at + HEADER_LEN - to..,
            )
            .map_err(|_| fatal(ALERT_BAD_RECORD_MAC, "a TLS record failed authentication"))?;
        // Content, type and padding together are at most 2^14 + 1 bytes (RFC 8446 §5.4).
        if plain.len() > MAX_PLAIN + 1 {
            return Err(fatal(ALERT_RECORD_OVERFLOW, "TLS record overflow"));
        }
        // The content type is the last byte that is not padding.
        let typ_at = plain.iter().rposition(|&b| b != 0).ok_or_else(|| {
            fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "TLS record without a content type",
            )
        })?;
        if typ_at > MAX_PLAIN {
            return Err(fatal(ALERT_RECORD_OVERFLOW, "TLS record overflow"));
        }
        Ok((plain[typ_at], typ_at))
    }
}

/// Seals `record` in place under `tx` as a record of inner content type `typ`: its content
/// lies after [`HEADER_LEN`] bytes of room for the header, and is followed by one byte of
/// room for the content type and [`TAG_LEN`] for the tag.
fn seal_record(tx: &mut Keys, typ: u8, record: &mut [u8]) -> io::Result<()> {
    let len = record.len() - HEADER_LEN;
    let header = [CT_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
    let (head, body) = record.split_at_mut(HEADER_LEN);
    head.copy_from_slice(&header);
    let (inner, tag_room) = body.split_at_mut(len - TAG_LEN);
    if let Some(last) = inner.last_mut() {
        *last = typ;
    }
    let nonce = tx.next_nonce()?;
    let tag = tx
        .key
        .seal_in_place_separate_tag(nonce, aead::Aad::from(header), inner)
        .map_err(|_| invalid("sealing a TLS record failed"))?;
    tag_room.copy_from_slice(tag.as_ref());
    Ok(())
}

/// The length of the record at the start of `bytes` (header included) if it is all there;
/// an error if its header is not that of a protected TLS 1.3 record (RFC 8446 §5.2: type
/// application_data, version 0x0303, at most 2^14 + 256 bytes). After the handshake a
/// change_cipher_spec is refused too (§5).
fn whole_record(bytes: &[u8]) -> io::Result<Option<usize>> {
    let [typ, major, minor, hi, lo, ..] = *bytes else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if typ != CT_APPLICATION_DATA {
        return Err(fatal(ALERT_UNEXPECTED_MESSAGE, "unprotected TLS record"));
    }
    if [major, minor] != [3, 3] {
        return Err(fatal(ALERT_DECODE_ERROR, "malformed TLS record"));
    }
    if len > MAX_CIPHER {
        return Err(fatal(ALERT_RECORD_OVERFLOW, "TLS record overflow"));
    }
    if len <= TAG_LEN {
        return Err(fatal(ALERT_BAD_RECORD_MAC, "TLS record too short"));
    }
    Ok((bytes.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

/// What the handshake loop does with a connection that is still handshaking, on either side.
trait Handshaking {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn alpn(&self) -> Option<Vec<u8>>;
    fn suite(&self) -> Option<SupportedCipherSuite>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshaking for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn alpn(&self) -> Option<Vec<u8>> {
        self.alpn_protocol().map(<[u8]>::to_vec)
    }
    fn suite(&self) -> Option<SupportedCipherSuite> {
        self.negotiated_cipher_suite()
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    }
}

impl Handshaking for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn alpn(&self) -> Option<Vec<u8>> {
        self.alpn_protocol().map(<[u8]>::to_vec)
    }
    fn suite(&self) -> Option<SupportedCipherSuite> {
        self.negotiated_cipher_suite()
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    }
}

/// What the handshake loop does next, once rustls' state has been handled.
enum Step {
    Continue,
    /// close_notify: fine once the handshake is over, the end of the data that came with it.
    PeerClosed,
    Send,
    Receive,
    Done,
}

/// Appends a handshake record rustls wants sent to `out`.
fn encode<D>(enc: &mut EncodeTlsData<'_, D>, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.resize(start + 1024, 0);
    loop {
        match enc.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(start + required_size, 0);
            }
            Err(e) => return Err(invalid(e.to_string())),
        }
    }
}

async fn handshake<C: Handshaking, IO: AsyncRead + AsyncWrite + Unpin>(
    mut conn: C,
    mut io: IO,
    exporter: &ExporterSecret,
) -> io::Result<TlsStream<IO>> {
    // The buffer is the stream's receive buffer afterwards.
    let mut rbuf = vec![0u8; READ_CAP].into_boxed_slice();
    let mut filled = 0;
    let mut out = Vec::new();
    let mut early = Vec::new();
    // A peer may send its Finished, data and close_notify in one go.
    let mut read_closed = false;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut rbuf[..filled]);
        let step = match state {
            Err(e) => {
                // rustls queued an alert that says why; the peer learns it as it would from
                // the buffered API, if the transport still takes it.
                if let Ok(ConnectionState::EncodeTlsData(mut enc)) = conn.process(&mut []).state {
                    let mut alert = Vec::new();
                    if encode(&mut enc, &mut alert).is_ok() {
                        let _ = io.write_all(&alert).await;
                        let _ = io.flush().await;
                    }
                }
                return Err(invalid(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                encode(&mut enc, &mut out)?;
                Step::Continue
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Step::Send
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Receive,
            // A server may send before the client's Finished; the secrets are only final after.
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
                Step::Continue
            }
            Ok(ConnectionState::PeerClosed) => Step::PeerClosed,
            Ok(ConnectionState::Closed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed TLS during the handshake",
                ));
            }
            Ok(other) => return Err(invalid(format!("unexpected TLS state {other:?}"))),
        };
        rbuf.copy_within(discard..filled, 0);
        filled -= discard;
        let step = match step {
            Step::Done if conn.handshaking() => Step::Receive,
            step => step,
        };
        match step {
            Step::PeerClosed if conn.handshaking() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed TLS during the handshake",
                ));
            }
            Step::PeerClosed => read_closed = true,
            Step::Continue => {}
            Step::Send => {
                io.write_all(&out).await?;
                io.flush().await?;
                out.clear();
            }
            Step::Receive => {
                if filled == rbuf.len() {
                    return Err(invalid("TLS handshake message too large"));
                }
                match io.read(&mut rbuf[filled..]).await? {
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection during the TLS handshake",
                        ));
                    }
                    n => filled += n,
                }
            }
            Step::Done => break,
        }
    }
    let alpn = conn.alpn();
    let channel_binding = exporter.channel_binding(conn.suite())?;
    let (secrets, kernel) = conn.into_kernel().map_err(invalid)?;
    Ok(TlsStream {
        io,
        kernel,
        alpn,
        channel_binding,
        rx: Keys::new(secrets.rx)?,
        tx: Keys::new(secrets.tx)?,
        rbuf,
        pstart: 0,
        pend: 0,
        cstart: 0,
        cend: filled,
        early,
        handshake: Vec::new(),
        wbuf: Vec::with_capacity(WRITE_CAP),
        wpos: 0,
        sealed: Vec::new(),
        spos: 0,
        read_closed,
        write_closed: false,
        key_update_owed: false,
        rekey_after: REKEY_AFTER,
        empty_in_a_row: 0,
        read_error: None,
        write_error: None,
    })
}

impl<IO> TlsStream<IO> {
    /// The protocol agreed by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// This connection's RFC 9266 `tls-exporter` channel binding: the TLS exporter with
    /// label [`CHANNEL_BINDING_LABEL`], no context, [`CHANNEL_BINDING_LEN`] bytes. Both ends
    /// of one connection compute the same value; any other connection has another.
    pub fn channel_binding(&self) -> &[u8; CHANNEL_BINDING_LEN] {
        &self.channel_binding
    }

    /// The transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Opens the next whole record in `rbuf`, if there is one; its application data becomes
    /// `pstart..pend`. Only called when that range is empty.
    fn open_record(&mut self) -> io::Result<bool> {
        if self.read_closed {
            return Ok(false);
        }
        let Some(len) = whole_record(&self.rbuf[self.cstart..self.cend])? else {
            return Ok(false);
        };
        let at = self.cstart;
        self.cstart += len;
        let to = at + HEADER_LEN;
        let (typ, n) = self.rx.open(&mut self.rbuf, at, len, to)?;
        self.check_order(typ, n)?;
        if typ == CT_APPLICATION_DATA {
            self.pstart = to;
            self.pend = to + n;
        } else {
            let body = self.rbuf[to..to + n].to_vec();
            self.control(typ, &body)?;
        }
        Ok(true)
    }

    /// Refuses a record of inner type `typ` and `n` bytes of content where RFC 8446 §5.1
    /// forbids it: between the records of one handshake message, or an empty handshake one;
    /// and more than [`MAX_EMPTY_IN_A_ROW`] empty ones in a row.
    fn check_order(&mut self, typ: u8, n: usize) -> io::Result<()> {
        if n > 0 {
            self.empty_in_a_row = 0;
        } else if self.empty_in_a_row == MAX_EMPTY_IN_A_ROW {
            return Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "too many empty TLS records",
            ));
        } else {
            self.empty_in_a_row += 1;
        }
        if typ != CT_HANDSHAKE && !self.handshake.is_empty() {
            return Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "a TLS record inside a handshake message",
            ));
        }
        if typ == CT_HANDSHAKE && n == 0 {
            return Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "empty TLS handshake record",
            ));
        }
        Ok(())
    }

    /// Acts on a record that is not application data: an alert or post-handshake messages.
    fn control(&mut self, typ: u8, body: &[u8]) -> io::Result<()> {
        match typ {
            CT_ALERT => match *body {
                [_, ALERT_CLOSE_NOTIFY] => self.read_closed = true,
                [_, ALERT_USER_CANCELED] => {}
                [_, code] => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        Fatal {
                            alert: None,
                            what: format!("the peer sent TLS alert {code}"),
                        },
                    ));
                }
                _ => return Err(fatal(ALERT_DECODE_ERROR, "malformed TLS alert")),
            },
            CT_HANDSHAKE => {
                if self.handshake.len() + body.len() > MAX_HANDSHAKE {
                    return Err(fatal(
                        ALERT_UNEXPECTED_MESSAGE,
                        "post-handshake message too large",
                    ));
                }
                self.handshake.extend_from_slice(body);
                self.post_handshake()?;
            }
            _ => {
                return Err(fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    "unexpected TLS record type",
                ));
            }
        }
        Ok(())
    }

    /// Handles the whole post-handshake messages buffered: session tickets and key updates.
    fn post_handshake(&mut self) -> io::Result<()> {
        let mut msgs = std::mem::take(&mut self.handshake);
        let mut at = 0;
        while let [typ, a, b, c, rest @ ..] = &msgs[at..] {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            let Some(payload) = rest.get(..len) else {
                break;
            };
            at += 4 + len;
            match *typ {
                HS_NEW_SESSION_TICKET => self.kernel.new_session_ticket(payload)?,
                HS_KEY_UPDATE => {
                    // A key update must end its record (RFC 8446 §5.1).
                    if at != msgs.len() {
                        return Err(fatal(
                            ALERT_UNEXPECTED_MESSAGE,
                            "key update not at a record boundary",
                        ));
                    }
                    match payload {
                        [0] => {}
                        [1] => self.key_update_owed = true,
                        [_] => return Err(fatal(ALERT_ILLEGAL_PARAMETER, "malformed key update")),
                        _ => return Err(fatal(ALERT_DECODE_ERROR, "malformed key update")),
                    }
                    self.rx = self.kernel.update_rx()?;
                }
                _ => {
                    return Err(fatal(
                        ALERT_UNEXPECTED_MESSAGE,
                        "unexpected post-handshake message",
                    ));
                }
            }
        }
        msgs.drain(..at);
        self.handshake = msgs;
        Ok(())
    }

    /// Appends one sealed record of inner type `typ` to `wbuf`.
    fn seal(&mut self, typ: u8, plain: &[u8]) -> io::Result<()> {
        if typ == CT_APPLICATION_DATA && self.tx.seq >= self.rekey_after {
            self.send_key_update()?;
        }
        let at = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0; HEADER_LEN]);
        self.wbuf.extend_from_slice(plain);
        self.wbuf.extend_from_slice(&[0; 1 + TAG_LEN]);
        seal_record(&mut self.tx, typ, &mut self.wbuf[at..])
    }

    /// Seals a body chunk's records where they lie in `buf`, under the keys and sequence
    /// numbers [`TlsStream::seal`] would give them: a key update owed or due goes in
    /// between (moving the records after it, once in millions of records).
    fn seal_records(&mut self, buf: &mut RecordBuf) -> io::Result<()> {
        let (records, lens) = buf
            .records_mut()
            .ok_or_else(|| invalid("a record buffer partly sent as plaintext"))?;
        let mut at = 0;
        if self.key_update_owed {
            splice_in(records, at, &self.key_update_record()?);
            at += KEY_UPDATE_RECORD;
        }
        for len in lens {
            if self.tx.seq >= self.rekey_after {
                splice_in(records, at, &self.key_update_record()?);
                at += KEY_UPDATE_RECORD;
            }
            let end = at + len + OVERHEAD;
            let record = records
                .get_mut(at..end)
                .ok_or_else(|| invalid("a record buffer shorter than its records"))?;
            seal_record(&mut self.tx, CT_APPLICATION_DATA, record)?;
            at = end;
        }
        Ok(())
    }

    /// Sends a key update (not asking for one back) and switches to the next sending key.
    fn send_key_update(&mut self) -> io::Result<()> {
        let record = self.key_update_record()?;
        self.wbuf.extend_from_slice(&record);
        Ok(())
    }

    /// Seals a key update (not asking for one back) and switches to the next sending key;
    /// the record must go out before any record sealed after it.
    fn key_update_record(&mut self) -> io::Result<[u8; KEY_UPDATE_RECORD]> {
        let mut record = [0; KEY_UPDATE_RECORD];
        record[HEADER_LEN..HEADER_LEN + KEY_UPDATE.len()].copy_from_slice(&KEY_UPDATE);
        seal_record(&mut self.tx, CT_HANDSHAKE, &mut record)?;
        self.tx = self.kernel.update_tx()?;
        self.key_update_owed = false;
        Ok(record)
    }

    fn pay_key_update(&mut self) -> io::Result<()> {
        if self.key_update_owed && !self.write_closed {
            self.send_key_update()?;
        }
        Ok(())
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Reads more of the stream into `rbuf`, at most a record's worth: this path serves
    /// small reads (frames), and bytes for a large one are better left for the direct path.
    /// An end of stream without close_notify is an error, as in rustls (a truncation attack
    /// looks exactly like it).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cstart == self.cend {
            self.cstart = 0;
            self.cend = 0;
        } else if self.rbuf.len() - self.cend < MAX_RECORD {
            // The partial record at the end moves to the front: at most one record's bytes.
            self.rbuf.copy_within(self.cstart..self.cend, 0);
            self.cend -= self.cstart;
            self.cstart = 0;
        }
        let room = &mut self.rbuf[self.cend..];
        let want = room.len().min(MAX_RECORD);
        let mut buf = ReadBuf::new(&mut room[..want]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        match buf.filled().len() {
            0 => Poll::Ready(Err(eof())),
            n => {
                self.cend += n;
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Reads records straight into the caller's buffer and opens them there, each plaintext
    /// moved down over the headers and tags as it is decrypted: application data is never
    /// copied in user space. Only a partial record at either end is, from and back to
    /// `rbuf`. Called with no plaintext pending, no whole record in `rbuf`, and room in
    /// `buf` for what `rbuf` holds and a whole record. Reads until the transport has nothing
    /// more or `buf` no room; `holding` says the caller already has data for its reader, so
    /// that waiting, the end of the stream or a transport error is left for the next call.
    /// Returns whether the caller may go on reading.
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        holding: bool,
    ) -> Poll<io::Result<bool>> {
        let dst = buf.initialize_unfilled();
        let tail = self.cend - self.cstart;
        dst[..tail].copy_from_slice(&self.rbuf[self.cstart..self.cend]);
        self.cstart = 0;
        self.cend = 0;
        // dst[..out] is plaintext, dst[rec..have] records not yet opened.
        let (mut out, mut rec, mut have) = (0, 0, tail);
        let mut result = Poll::Ready(Ok(true));
        // Read while the record under way can still complete in dst.
        while !self.read_closed && dst.len() - rec >= MAX_RECORD {
            let mut room = ReadBuf::new(&mut dst[have..]);
            let stop = match Pin::new(&mut self.io).poll_read(cx, &mut room) {
                Poll::Pending => Some(Poll::Pending),
                Poll::Ready(Err(e)) => Some(Poll::Ready(Err(e))),
                Poll::Ready(Ok(())) if room.filled().is_empty() => Some(Poll::Ready(Err(eof()))),
                Poll::Ready(Ok(())) => {
                    have += room.filled().len();
                    None
                }
            };
            if let Some(stop) = stop {
                result = if out == 0 && !holding {
                    stop
                } else {
                    Poll::Ready(Ok(false))
                };
                break;
            }
            while !self.read_closed {
                let Some(len) = whole_record(&dst[rec..have])? else {
                    break;
                };
                let (typ, n) = self.rx.open(dst, rec, len, out)?;
                rec += len;
                self.check_order(typ, n)?;
                if typ == CT_APPLICATION_DATA {
                    out += n;
                } else {
                    let body = dst[out..out + n].to_vec();
                    self.control(typ, &body)?;
                }
            }
        }
        if !self.read_closed {
            self.rbuf[..have - rec].copy_from_slice(&dst[rec..have]);
            self.cend = have - rec;
        }
        buf.advance(out);
        result
    }

    /// Writes `sealed`, then `wbuf`, out. A transport error ends writing for good (see
    /// `write_error`).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = poll_write_out(&mut self.io, cx, &self.sealed, &mut self.spos);
        if let Poll::Ready(Ok(())) = written {
            written = poll_write_out(&mut self.io, cx, &self.wbuf, &mut self.wpos);
        }
        match ready!(written) {
            Ok(()) => {
                self.wbuf.clear();
                self.wpos = 0;
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(self.end_writing(e))),
        }
    }

    /// Ends writing with `e`, and drops the records that cannot go out now.
    fn end_writing(&mut self, e: io::Error) -> io::Error {
        if self.write_error.is_none() {
            self.write_error = Some((e.kind(), e.to_string()));
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.spos = self.sealed.len();
        e
    }

    /// Ends reading with `e`. A fatal error in what the peer sent ends writing too, after
    /// the alert that says why, which goes out now if the transport takes it (or with
    /// `poll_shutdown`).
    fn end_reading(&mut self, cx: &mut Context<'_>, e: &io::Error) {
        let saved = (e.kind(), e.to_string());
        self.read_error = Some(saved.clone());
        let Some(fatal) = e.get_ref().and_then(|e| e.downcast_ref::<Fatal>()) else {
            return;
        };
        if self.write_error.is_none() {
            if let Some(alert) = fatal.alert.filter(|_| !self.write_closed) {
                if self.seal(CT_ALERT, &[2, alert]).is_ok() {
                    let _ = self.poll_drain(cx);
                }
            }
            self.write_error = Some(saved);
        }
        self.write_closed = true;
    }
}

/// Inserts `record` into `records` at `at`, growing the buffer by the record only: the
/// buffer goes back round a body's pipeline, and the doubling a `Vec` does when it grows
/// would leave it twice the size of a chunk for the rest of the body.
fn splice_in(records: &mut Vec<u8>, at: usize, record: &[u8]) {
    records.reserve_exact(record.len());
    records.splice(at..at, record.iter().copied());
}

/// Writes `bytes[*pos..]` to `io`, counting in `pos` what it took.
fn poll_write_out<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    cx: &mut Context<'_>,
    bytes: &[u8],
    pos: &mut usize,
) -> Poll<io::Result<()>> {
    while *pos < bytes.len() {
        match ready!(Pin::new(&mut *io).poll_write(cx, &bytes[*pos..]))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            n => *pos += n,
        }
    }
    Poll::Ready(Ok(()))
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = ended(&this.read_error) {
            return Poll::Ready(Err(e));
        }
        let read = this.poll_read_records(cx, buf);
        if let Poll::Ready(Err(e)) = &read {
            this.end_reading(cx, e);
        }
        read
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// `poll_read`, until an error ends reading.
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if !this.early.is_empty() {
            let n = buf.remaining().min(this.early.len());
            buf.put_slice(&this.early[..n]);
            this.early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        while buf.remaining() > 0 {
            if this.pstart < this.pend {
                let n = buf.remaining().min(this.pend - this.pstart);
                buf.put_slice(&this.rbuf[this.pstart..this.pstart + n]);
                this.pstart += n;
                continue;
            }
            if this.open_record()? {
                continue;
            }
            if this.read_closed {
                break;
            }
            let holding = buf.filled().len() > before;
            if buf.remaining() >= this.cend - this.cstart + MAX_RECORD {
                if !ready!(this.poll_read_direct(cx, buf, holding))? {
                    break;
                }
            } else if holding {
                break;
            } else {
                ready!(this.poll_fill(cx))?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = ended(&this.write_error) {
            return Poll::Ready(Err(e));
        }
        ready!(this.poll_drain(cx))?;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS close_notify already sent",
            )));
        }
        let n = buf.len().min(WRITE_PLAIN);
        let sealed = this.pay_key_update().and_then(|()| {
            buf[..n]
                .chunks(MAX_PLAIN)
                .try_for_each(|piece| this.seal(CT_APPLICATION_DATA, piece))
        });
        if let Err(e) = sealed {
            return Poll::Ready(Err(this.end_writing(e)));
        }
        // Start sending now; what the transport does not take yet goes with the next write
        // or flush. The bytes are sealed and spent either way: a transport error here ends
        // writing and comes back from the next call, so that a caller that retries cannot
        // get them sealed a second time, under another sequence number.
        let _ = this.poll_drain(cx);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = ended(&this.write_error) {
            return Poll::Ready(Err(e));
        }
        // A key update sealed now goes out after the body records still queued in
        // `sealed`, which were sealed under the key before it.
        if let Err(e) = this.pay_key_update() {
            return Poll::Ready(Err(this.end_writing(e)));
        }
        ready!(this.poll_drain(cx))?;
        // A body ends with a flush: its last buffer is not kept while the connection idles.
        this.sealed = Vec::new();
        this.spos = 0;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed && this.write_error.is_none() {
            let sealed = this
                .pay_key_update()
                .and_then(|()| this.seal(CT_ALERT, &[1, ALERT_CLOSE_NOTIFY]));
            if let Err(e) = sealed {
                this.end_writing(e);
            }
            this.write_closed = true;
        }
        // What is still queued goes out first: records, close_notify, or the alert of a
        // fatal error (`wbuf` is empty after a transport error).
        let drained = ready!(this.poll_drain(cx));
        let shut = ready!(Pin::new(&mut this.io).poll_shutdown(cx));
        match ended(&this.write_error) {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(drained.and(shut)),
        }
    }
}

/// A body chunk's records sealed where they lie and written from there: the same records,
/// keys and guarantees as `poll_write`, without the copy into `wbuf`.
impl<IO: AsyncRead + AsyncWrite + Unpin> WriteRecords for TlsStream<IO> {
    fn poll_write_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut RecordBuf,
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = ended(&self.write_error) {
            return Poll::Ready(Err(e));
        }
        // The records sealed before (key updates, frames, the last chunk) go first, and the
        // buffer of the last chunk comes free for this one's to take its place.
        ready!(self.poll_drain(cx))?;
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS close_notify already sent",
            )));
        }
        let n = buf.unsent();
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        if let Err(e) = self.seal_records(buf) {
            return Poll::Ready(Err(self.end_writing(e)));
        }
        // The sealed records are the stream's now, and the caller's buffer holds none of
        // them: as in `poll_write`, a transport error from here on ends writing and comes
        // back from the next call, and nothing is ever sealed twice.
        buf.swap_out(&mut self.sealed);
        self.spos = 0;
        let _ = self.poll_drain(cx);
        Poll::Ready(Ok(n))
    }
}

/// Helpers for tests and for the fuzz target (`fuzz/fuzz_targets/tls_records.rs`, through
/// the `fuzzing` feature): a real handshake over an in-memory pipe, and a peer that can send
/// records no correct peer sends. Not an API.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod testing {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::DuplexStream;

    /// A server config for a fresh self-signed "localhost", and a client config that trusts it.
    pub fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        configs_with(crate::tls::provider())
    }

    /// [`configs`] with the crypto of `provider` (to pin a cipher suite).
    pub fn configs_with(
        provider: rustls::crypto::CryptoProvider,
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let provider = Arc::new(provider);
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(crate::tls::VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.alpn_protocols = vec![crate::ALPN.to_vec()];
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(crate::tls::VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![crate::ALPN.to_vec()];
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// The name the certificate of [`configs`] is for.
    pub fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    /// A client and a server after a real handshake over an in-memory pipe, with fresh
    /// configs.
    pub async fn pair() -> (TlsStream<DuplexStream>, TlsStream<DuplexStream>) {
        pair_with(&configs()).await
    }

    /// A client and a server after a real handshake with `configs`.
    pub async fn pair_with(
        configs: &(Arc<ServerConfig>, Arc<ClientConfig>),
    ) -> (TlsStream<DuplexStream>, TlsStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (c, s) = tokio::join!(
            connect(a, configs.1.clone(), localhost()),
            accept(b, configs.0.clone())
        );
        (c.unwrap(), s.unwrap())
    }

    /// Queues, as `s`'s next record, `inner` (content, content type and padding, as given)
    /// under the header `typ`, `version`, sealed with `s`'s sending key: records no correct
    /// sender writes, but that authenticate. `inner` is cut to what a header can describe.
    pub fn queue_raw<IO>(s: &mut TlsStream<IO>, typ: u8, version: [u8; 2], inner: &[u8]) {
        let inner = &inner[..inner.len().min(usize::from(u16::MAX) - TAG_LEN)];
        let len = inner.len() + TAG_LEN;
        let header = [typ, version[0], version[1], (len >> 8) as u8, len as u8];
        let at = s.wbuf.len() + HEADER_LEN;
        s.wbuf.extend_from_slice(&header);
        s.wbuf.extend_from_slice(inner);
        let nonce = s.tx.next_nonce().unwrap();
        let tag =
            s.tx.key
                .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut s.wbuf[at..])
                .unwrap();
        s.wbuf.extend_from_slice(tag.as_ref());
    }

    /// Queues `content` as one record of inner type `typ`, as `s` would send it (a key
    /// update first when one is due). `content` is cut to one record.
    pub fn queue<IO>(s: &mut TlsStream<IO>, typ: u8, content: &[u8]) {
        s.seal(typ, &content[..content.len().min(MAX_PLAIN)])
            .unwrap();
    }

    /// Makes `s` replace its sending key after `records` more records.
    pub fn rekey_after<IO>(s: &mut TlsStream<IO>, records: u64) {
        s.rekey_after = s.tx.seq + records;
    }

    /// Takes the records queued on `s`, as they would go on the wire.
    pub fn take_wire<IO>(s: &mut TlsStream<IO>) -> Vec<u8> {
        let mut wire = s.sealed[s.spos..].to_vec();
        s.spos = s.sealed.len();
        wire.extend_from_slice(&s.wbuf[s.wpos..]);
        s.wpos = 0;
        s.wbuf.clear();
        wire
    }

    /// The transport under `s`, to write bytes of one's own choosing to the peer.
    pub fn transport<IO>(s: &mut TlsStream<IO>) -> &mut IO {
        &mut s.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testing::{configs, localhost, pair, queue_raw};
    use tokio::io::DuplexStream;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Sends `payload` with writes of `piece` bytes, then closes; returns what the reader got.
    async fn transfer<W, R>(mut w: W, mut r: R, payload: Vec<u8>, piece: usize) -> (W, Vec<u8>)
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let send = async {
            for chunk in payload.chunks(piece) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
            w
        };
        let recv = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(send, recv)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_close_notify_ends_the_stream() {
        let (client, server) = pair().await;
        assert_eq!(client.alpn_protocol(), Some(crate::ALPN));
        assert_eq!(server.alpn_protocol(), Some(crate::ALPN));
        let (cr, cw) = tokio::io::split(client);
        let (sr, sw) = tokio::io::split(server);
        let up = data(3 * CHUNK_LEN + 12_345);
        let down = data(MAX_PLAIN * 5 + 1);
        let ((_, got_up), (_, got_down)) = tokio::join!(
            transfer(cw, sr, up.clone(), 100_000),
            transfer(sw, cr, down.clone(), 7)
        );
        assert_eq!(got_up, up);
        assert_eq!(got_down, down);
    }

    #[tokio::test]
    async fn key_updates_both_ways_keep_the_stream_readable() {
        let (mut client, mut server) = pair().await;
        // A new sending key every 3 records, on both sides.
        client.rekey_after = 3;
        server.rekey_after = 3;
        let payload = data(40 * MAX_PLAIN + 3);
        let (client, got) = transfer(client, &mut server, payload.clone(), MAX_PLAIN).await;
        assert_eq!(got, payload);
        // 42 records went out (41 of data and close_notify): only new keys start over.
        assert!(
            client.tx.seq <= 3,
            "the client changed keys: {}",
            client.tx.seq
        );
        assert!(server.rx.seq <= 3, "the server followed: {}", server.rx.seq);
    }

    #[tokio::test]
    async fn small_and_large_reads_mix_across_records_and_key_updates() {
        let (mut client, mut server) = pair().await;
        client.rekey_after = 5;
        let payload = data(3 * CHUNK_LEN + 4321);
        let send = async {
            for chunk in payload.chunks(100_000) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
        };
        // Alternate frame-sized reads (through rbuf) and chunk-sized ones (straight into
        // the buffer), so that partial records move between the two.
        let recv = async {
            let mut got = Vec::new();
            let mut big = vec![0u8; CHUNK_LEN];
            for i in 0.. {
                let want = if i % 2 == 0 {
                    3
                } else {
                    big.len() - i % 7 * 1000
                };
                let n = server.read(&mut big[..want]).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&big[..n]);
            }
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert_eq!(got.len(), payload.len());
        assert!(got == payload, "the bytes differ");
    }

    #[tokio::test]
    async fn a_key_update_request_is_answered_before_the_next_record() {
        let (mut client, mut server) = pair().await;
        // The server asks for a key update back, as rustls does on request.
        server
            .seal(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 1])
            .unwrap();
        server.tx = server.kernel.update_tx().unwrap();
        server.write_all(b"after").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        assert!(client.key_update_owed);
        client.write_all(b"reply").await.unwrap();
        client.flush().await.unwrap();
        assert!(!client.key_update_owed);
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply");
        assert_eq!(
            server.rx.seq, 1,
            "the reply came under the client's new key"
        );
    }

    #[tokio::test]
    async fn a_changed_byte_fails_authentication() {
        let (server, client) = configs();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (wire, mut tap) = tokio::io::duplex(64 * 1024);
        // The client talks to `a`; a relay copies `b` to `wire` and flips one byte of the
        // first application-data record after the handshake.
        let relay = tokio::spawn(async move {
            let mut b = b;
            let (mut br, mut bw) = tokio::io::split(&mut b);
            let (mut tr, mut tw) = tokio::io::split(&mut tap);
            let to_server = async {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = 0usize;
                loop {
                    let n = br.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    // ClientHello and Finished come first; the last byte sent is then
                    // inside the tag of the application record written below.
                    seen += n;
                    if seen > 1000 {
                        buf[n - 1] ^= 1;
                    }
                    tw.write_all(&buf[..n]).await.unwrap();
                }
            };
            let to_client = tokio::io::copy(&mut tr, &mut bw);
            let _ = tokio::join!(to_server, to_client);
        });
        let (c, s) = tokio::join!(connect(a, client, localhost()), accept(wire, server));
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.write_all(&[5u8; 2000]).await.unwrap();
        c.flush().await.unwrap();
        let mut got = vec![0u8; 2000];
        let err = s.read_exact(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        relay.abort();
    }

    #[tokio::test]
    async fn an_end_without_close_notify_is_an_error_not_an_end() {
        let (client, mut server) = pair().await;
        drop(client);
        let mut got = Vec::new();
        let err = server.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Inner plaintext: `content`, then its type.
    fn inner(content: &[u8], typ: u8) -> Vec<u8> {
        [content, &[typ]].concat()
    }

    /// Records a peer must not send, each with the alert the reader answers with.
    #[allow(clippy::type_complexity)]
    fn refusals() -> Vec<(&'static str, u8, Box<dyn Fn(&mut TlsStream<DuplexStream>)>)> {
        let v = [3, 3];
        vec![
            (
                "a changed byte",
                ALERT_BAD_RECORD_MAC,
                Box::new(|s| {
                    s.seal(CT_APPLICATION_DATA, b"forged").unwrap();
                    let last = s.wbuf.len() - 1;
                    s.wbuf[last] ^= 1;
                }),
            ),
            (
                "padding past 2^14 + 1 bytes of inner plaintext",
                ALERT_RECORD_OVERFLOW,
                Box::new(move |s| {
                    let mut body = inner(&[b'x'; MAX_PLAIN], CT_APPLICATION_DATA);
                    body.push(0);
                    queue_raw(s, CT_APPLICATION_DATA, v, &body);
                }),
            ),
            (
                "content past 2^14 bytes",
                ALERT_RECORD_OVERFLOW,
                Box::new(move |s| {
                    let body = inner(&[b'x'; MAX_PLAIN + 1], CT_APPLICATION_DATA);
                    queue_raw(s, CT_APPLICATION_DATA, v, &body);
                }),
            ),
            (
                "a legacy version other than 0x0303",
                ALERT_DECODE_ERROR,
                Box::new(|s| queue_raw(s, CT_APPLICATION_DATA, [3, 1], &inner(b"hi", 23))),
            ),
            (
                "a change_cipher_spec record after the handshake",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(|s| s.wbuf.extend_from_slice(&[20, 3, 3, 0, 1, 1])),
            ),
            (
                "a protected change_cipher_spec",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(move |s| queue_raw(s, CT_APPLICATION_DATA, v, &inner(&[1], 20))),
            ),
            (
                "all padding, no content type",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(move |s| queue_raw(s, CT_APPLICATION_DATA, v, &[0, 0, 0])),
            ),
            (
                "an empty handshake record",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(move |s| queue_raw(s, CT_APPLICATION_DATA, v, &[CT_HANDSHAKE])),
            ),
            (
                "application data inside a handshake message",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(|s| {
                    s.seal(CT_HANDSHAKE, &[HS_NEW_SESSION_TICKET, 0, 0])
                        .unwrap();
                    s.seal(CT_APPLICATION_DATA, b"between").unwrap();
                }),
            ),
            (
                "a key update that does not end its record",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(|s| {
                    let two = [HS_KEY_UPDATE, 0, 0, 1, 0, HS_KEY_UPDATE, 0, 0, 1, 0];
                    s.seal(CT_HANDSHAKE, &two).unwrap();
                }),
            ),
            (
                "a key update with a request value that does not exist",
                ALERT_ILLEGAL_PARAMETER,
                Box::new(|s| s.seal(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 7]).unwrap()),
            ),
            (
                "a malformed session ticket",
                ALERT_DECODE_ERROR,
                Box::new(|s| {
                    s.seal(CT_HANDSHAKE, &[HS_NEW_SESSION_TICKET, 0, 0, 1, 0])
                        .unwrap()
                }),
            ),
            (
                "a handshake message the client never expects",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(|s| s.seal(CT_HANDSHAKE, &[13, 0, 0, 0]).unwrap()),
            ),
            (
                "more than 32 empty records in a row",
                ALERT_UNEXPECTED_MESSAGE,
                Box::new(|s| {
                    for _ in 0..=MAX_EMPTY_IN_A_ROW {
                        s.seal(CT_APPLICATION_DATA, b"").unwrap();
                    }
                }),
            ),
            (
                "a malformed alert",
                ALERT_DECODE_ERROR,
                Box::new(|s| s.seal(CT_ALERT, &[2, 40, 0]).unwrap()),
            ),
        ]
    }

    #[tokio::test]
    async fn a_bad_record_is_refused_with_its_alert_and_ends_the_stream_for_good() {
        for (what, alert, queue) in refusals() {
            // A frame-sized read goes through rbuf, a chunk-sized one opens records in place.
            for read_len in [100, CHUNK_LEN] {
                let (mut client, mut server) = pair().await;
                queue(&mut server);
                // A good record follows: it must not come out after the failure.
                server.write_all(b"after").await.unwrap();
                server.shutdown().await.unwrap();
                let mut got = vec![0u8; read_len];
                let err = client.read(&mut got).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
                let again = client.read(&mut got).await;
                assert!(
                    again.is_err(),
                    "{what}: read on after a fatal error: {again:?}"
                );
                assert!(
                    client.write_all(b"more").await.is_err(),
                    "{what}: wrote on after a fatal error"
                );
                // The server learns why.
                drop(client);
                let err = server.read(&mut got).await.unwrap_err();
                assert_eq!(
                    err.kind(),
                    io::ErrorKind::ConnectionAborted,
                    "{what}: {err}"
                );
                assert_eq!(err.to_string(), format!("the peer sent TLS alert {alert}"));
            }
        }
    }

    #[tokio::test]
    async fn a_fatal_alert_from_the_peer_ends_the_stream_for_good() {
        let (mut client, mut server) = pair().await;
        server.seal(CT_ALERT, &[2, 40]).unwrap();
        server.write_all(b"after").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 100];
        let err = client.read(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
        let again = client.read(&mut got).await;
        assert!(again.is_err(), "read on after a fatal alert: {again:?}");
    }

    /// A transport whose next write fails when `fail` is set.
    struct FailingWrite<IO> {
        io: IO,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for FailingWrite<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<IO: AsyncWrite + Unpin> AsyncWrite for FailingWrite<IO> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.fail.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn bytes_sealed_before_a_transport_error_are_never_sealed_again() {
        let (server_config, client_config) = configs();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let a = FailingWrite {
            io: a,
            fail: fail.clone(),
        };
        let (c, s) = tokio::join!(
            connect(a, client_config, localhost()),
            accept(b, server_config)
        );
        let (mut client, mut server) = (c.unwrap(), s.unwrap());
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        // A caller that tries again after an error, as write_all's callers may.
        let mut sent = 0;
        for _ in 0..2 {
            if let Ok(n) = client.write(&b"abc"[sent..]).await {
                sent += n;
            }
            if sent == 3 {
                break;
            }
        }
        assert!(
            client.flush().await.is_err(),
            "the transport error was lost"
        );
        let _ = client.shutdown().await;
        drop(client);
        let mut got = Vec::new();
        let _ = server.read_to_end(&mut got).await;
        assert!(
            got.len() <= 3,
            "bytes sealed twice: {:?}",
            String::from_utf8_lossy(&got)
        );
    }

    /// Sends `payload` from a file through record buffers, a chunk at a time, with a frame
    /// written the ordinary way after every `frame_every` chunks; returns the client.
    async fn send_records<IO: AsyncRead + AsyncWrite + Unpin>(
        client: &mut TlsStream<IO>,
        payload: &[u8],
        frame_every: usize,
    ) {
        use crate::records::write_records;
        let mut file = io::Cursor::new(payload);
        let mut buf = RecordBuf::new();
        for (i, chunk) in payload.chunks(CHUNK_LEN).enumerate() {
            buf.fill_from(&mut file, chunk.len()).unwrap();
            while buf.unsent() > 0 {
                write_records(client, &mut buf).await.unwrap();
            }
            if (i + 1) % frame_every == 0 {
                client.write_all(b"frame").await.unwrap();
            }
        }
        client.shutdown().await.unwrap();
    }

    /// What `send_records` puts in the stream.
    fn with_frames(payload: &[u8], frame_every: usize) -> Vec<u8> {
        let mut want = Vec::new();
        for (i, chunk) in payload.chunks(CHUNK_LEN).enumerate() {
            want.extend_from_slice(chunk);
            if (i + 1) % frame_every == 0 {
                want.extend_from_slice(b"frame");
            }
        }
        want
    }

    #[tokio::test]
    async fn records_sealed_in_place_read_back_whole_across_key_updates() {
        // Every few records a key update, at a different place in each chunk; one owed to
        // the peer goes in front of the first chunk.
        for every in [1, 3, 16, 17] {
            let (mut client, mut server) = pair().await;
            server
                .seal(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 1])
                .unwrap();
            server.tx = server.kernel.update_tx().unwrap();
            server.write_all(b"x").await.unwrap();
            server.flush().await.unwrap();
            let mut x = [0u8; 1];
            client.read_exact(&mut x).await.unwrap();
            assert!(client.key_update_owed);
            testing::rekey_after(&mut client, every);
            let payload = data(3 * CHUNK_LEN + MAX_PLAIN + 4321);
            let send = send_records(&mut client, &payload, 2);
            // Frame-sized and chunk-sized reads, as the receiving side of a body makes.
            let recv = async {
                let mut got = Vec::new();
                let mut big = vec![0u8; CHUNK_LEN];
                for i in 0.. {
                    let want = if i % 3 == 0 { 5 } else { big.len() - i % 7 };
                    let n = server.read(&mut big[..want]).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&big[..n]);
                }
                got
            };
            let ((), got) = tokio::join!(send, recv);
            let want = with_frames(&payload, 2);
            assert_eq!(got.len(), want.len(), "every {every}");
            assert!(got == want, "the bytes differ (every {every})");
            assert!(!client.key_update_owed);
            // At most `rekey_after` records of data under the last key, then close_notify.
            assert!(
                server.rx.seq <= client.rekey_after + 1,
                "the server followed the key updates: {} records under the last key",
                server.rx.seq
            );
        }
    }

    #[tokio::test]
    async fn records_sealed_in_place_are_those_the_copying_path_seals() {
        let (mut a, _) = pair().await;
        let (mut b, _) = pair().await;
        // Two streams with the same sending key and sequence number (key updates differ:
        // each has its own key schedule).
        b.tx = Keys {
            key: a.tx.key.clone(),
            iv: a.tx.iv,
            seq: a.tx.seq,
        };
        let payload = data(2 * MAX_PLAIN + 99);
        let mut buf = RecordBuf::new();
        buf.fill_from(&mut io::Cursor::new(&payload), payload.len())
            .unwrap();
        a.seal_records(&mut buf).unwrap();
        let (in_place, _) = buf.records_mut().unwrap();
        let in_place = in_place.clone();
        for piece in payload.chunks(MAX_PLAIN) {
            b.seal(CT_APPLICATION_DATA, piece).unwrap();
        }
        assert!(in_place == testing::take_wire(&mut b));
    }

    #[tokio::test]
    async fn records_sealed_before_a_transport_error_are_never_sealed_again() {
        let (server_config, client_config) = configs();
        // Room on the wire for two records and a bit: the rest of a chunk waits.
        let (a, b) = tokio::io::duplex(2 * MAX_RECORD + 100);
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let a = FailingWrite {
            io: a,
            fail: fail.clone(),
        };
        let (c, s) = tokio::join!(
            connect(a, client_config, localhost()),
            accept(b, server_config)
        );
        let (mut client, mut server) = (c.unwrap(), s.unwrap());
        let payload = data(2 * CHUNK_LEN);
        let mut file = io::Cursor::new(&payload);
        let mut buf = RecordBuf::new();
        buf.fill_from(&mut file, CHUNK_LEN).unwrap();
        let n = crate::records::write_records(&mut client, &mut buf)
            .await
            .unwrap();
        assert_eq!(n, CHUNK_LEN, "the chunk was taken whole");
        assert_eq!(buf.unsent(), 0, "the caller keeps nothing to send again");
        let seq = client.tx.seq;
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            client.flush().await.is_err(),
            "the transport error was lost"
        );
        // A caller that tries again, with the same buffer and with the next chunk.
        let again = crate::records::write_records(&mut client, &mut buf).await;
        assert!(again.is_err(), "wrote on after a transport error");
        buf.fill_from(&mut file, CHUNK_LEN).unwrap();
        let next = crate::records::write_records(&mut client, &mut buf).await;
        assert!(next.is_err(), "wrote on after a transport error");
        assert_eq!(client.tx.seq, seq, "records sealed after the error");
        assert_eq!(buf.unsent(), CHUNK_LEN, "a refused chunk was taken");
        drop(client);
        let mut got = Vec::new();
        let end = server.read_to_end(&mut got).await;
        assert!(end.is_err(), "the cut stream ended cleanly");
        assert!(!got.is_empty(), "nothing went out before the error");
        assert!(
            payload.starts_with(&got),
            "bytes other than a prefix arrived"
        );
    }

    #[tokio::test]
    async fn records_are_refused_after_close_notify() {
        let (mut client, _server) = pair().await;
        client.shutdown().await.unwrap();
        let mut buf = RecordBuf::new();
        buf.fill_from(&mut &b"late"[..], 4).unwrap();
        let err = crate::records::write_records(&mut client, &mut buf)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(buf.unsent(), 4);
    }

    /// What a reader made of a mangled stream: the bytes it handed out, and how it ended.
    struct Outcome {
        got: Vec<u8>,
        end: io::Result<()>,
        after: io::Result<usize>,
    }

    /// Seals `payload` as the server would (with key updates every few records and a
    /// close_notify), lets `mangle` change the bytes on the wire, and reads them as the
    /// client with reads of the `reads` sizes in turn.
    async fn read_mangled(
        configs: &(Arc<ServerConfig>, Arc<ClientConfig>),
        payload: &[u8],
        mangle: impl FnOnce(&mut Vec<u8>),
        reads: &[usize],
    ) -> Outcome {
        let (mut client, mut server) = testing::pair_with(configs).await;
        server.rekey_after = server.tx.seq + 2;
        for piece in payload.chunks(MAX_PLAIN) {
            server.seal(CT_APPLICATION_DATA, piece).unwrap();
        }
        server.seal(CT_ALERT, &[1, ALERT_CLOSE_NOTIFY]).unwrap();
        let mut wire = std::mem::take(&mut server.wbuf);
        mangle(&mut wire);
        let send = async {
            server.io.write_all(&wire).await.unwrap();
            server.io.shutdown().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::new();
            let mut buf = vec![0u8; reads.iter().copied().max().unwrap_or(1)];
            for &len in reads.iter().cycle() {
                match client.read(&mut buf[..len]).await {
                    Ok(0) => {
                        let after = client.read(&mut buf[..len]).await;
                        return Outcome {
                            got,
                            end: Ok(()),
                            after,
                        };
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => {
                        let after = client.read(&mut buf[..len]).await;
                        return Outcome {
                            got,
                            end: Err(e),
                            after,
                        };
                    }
                }
            }
            unreachable!("the reads cycle until the stream ends")
        };
        tokio::join!(send, recv).1
    }

    /// How the bytes on the wire are changed.
    #[derive(Debug, Clone)]
    enum Mangle {
        Not,
        /// Cut at this fraction of the length.
        Truncate(proptest::sample::Index),
        /// Xor these bytes (never 0) in.
        Flip(Vec<(proptest::sample::Index, u8)>),
        /// Insert these bytes.
        Insert(proptest::sample::Index, Vec<u8>),
        /// Replace everything with these bytes.
        Random(Vec<u8>),
    }

    fn mangles() -> impl proptest::strategy::Strategy<Value = Mangle> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Mangle::Not),
            any::<prop::sample::Index>().prop_map(Mangle::Truncate),
            prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4)
                .prop_map(Mangle::Flip),
            (
                any::<prop::sample::Index>(),
                prop::collection::vec(any::<u8>(), 1..40)
            )
                .prop_map(|(at, bytes)| Mangle::Insert(at, bytes)),
            prop::collection::vec(any::<u8>(), 0..40_000).prop_map(Mangle::Random),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// Whatever happens to the bytes on the wire, the reader hands out only a prefix of
        /// what was sent (never unauthenticated bytes), never panics, ends with an error
        /// unless the stream was left whole, and fails again when read after an error.
        #[test]
        fn mangled_records_never_come_out_as_data(
            payload_len in 0usize..70_000,
            mangle in mangles(),
            reads in proptest::collection::vec(
                proptest::prop_oneof![1usize..64, 1usize..CHUNK_LEN + 2 * MAX_RECORD],
                1..6,
            ),
        ) {
            static CONFIGS: std::sync::OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> =
                std::sync::OnceLock::new();
            let configs = CONFIGS.get_or_init(configs);
            let payload = data(payload_len);
            let whole = matches!(mangle, Mangle::Not);
            let apply = |wire: &mut Vec<u8>| match mangle {
                Mangle::Not => {}
                Mangle::Truncate(at) => wire.truncate(at.index(wire.len())),
                Mangle::Flip(flips) => {
                    for (at, x) in flips {
                        let at = at.index(wire.len());
                        wire[at] ^= x;
                    }
                }
                Mangle::Insert(at, bytes) => {
                    let at = at.index(wire.len());
                    wire.splice(at..at, bytes);
                }
                Mangle::Random(bytes) => *wire = bytes,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let out = rt.block_on(read_mangled(configs, &payload, apply, &reads));
            proptest::prop_assert!(
                payload.starts_with(&out.got),
                "handed out {} bytes that were not sent", out.got.len()
            );
            if whole {
                proptest::prop_assert!(out.end.is_ok(), "{:?}", out.end);
                proptest::prop_assert_eq!(out.got.len(), payload.len());
                proptest::prop_assert!(matches!(out.after, Ok(0)), "{:?}", out.after);
            } else {
                proptest::prop_assert!(out.end.is_err(), "a mangled stream ended cleanly");
                proptest::prop_assert!(out.after.is_err(), "read on after an error");
            }
        }
    }

    /// A transport that passes its first write on and holds the rest until shutdown, so that
    /// the peer receives them all at once.
    struct HoldWrites<IO> {
        io: IO,
        first: bool,
        held: Vec<u8>,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for HoldWrites<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<IO: AsyncWrite + Unpin> AsyncWrite for HoldWrites<IO> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if std::mem::replace(&mut self.first, false) {
                return Pin::new(&mut self.io).poll_write(cx, buf);
            }
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = &mut *self;
            while !this.held.is_empty() {
                let n = ready!(Pin::new(&mut this.io).poll_write(cx, &this.held))?;
                this.held.drain(..n);
            }
            Pin::new(&mut this.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_finished_data_and_close_notify_at_once_is_served() {
        let (server_config, client_config) = configs();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let a = HoldWrites {
            io: a,
            first: true,
            held: Vec::new(),
        };
        let client = async {
            let mut c = connector.connect(localhost(), a).await.unwrap();
            c.write_all(b"request").await.unwrap();
            c.shutdown().await.unwrap();
            c
        };
        let (_c, s) = tokio::join!(client, accept(b, server_config));
        let mut s = s.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
    }

    #[tokio::test]
    async fn a_failed_handshake_tells_the_peer_why() {
        // The client trusts another certificate: it refuses the server's with an alert.
        let (server_config, _) = configs();
        let (_, client_config) = configs();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (c, s) = tokio::join!(
            connect(a, client_config, localhost()),
            accept(b, server_config)
        );
        let c = c.err().unwrap();
        assert_eq!(c.kind(), io::ErrorKind::InvalidData, "{c}");
        assert!(c.to_string().contains("invalid peer certificate"), "{c}");
        let s = s.err().unwrap();
        assert!(s.to_string().contains("received fatal alert"), "{s}");
    }

    #[tokio::test]
    async fn reads_and_writes_cancelled_at_every_wait_lose_and_repeat_nothing() {
        let (server_config, client_config) = configs();
        // A small pipe, so that records arrive in pieces and writes wait often.
        let (a, b) = tokio::io::duplex(777);
        let (c, s) = tokio::join!(
            connect(a, client_config, localhost()),
            accept(b, server_config)
        );
        let (mut client, mut server) = (c.unwrap(), s.unwrap());
        client.rekey_after = client.tx.seq + 3;
        let payload = data(2 * CHUNK_LEN + 5000);
        // Every read and write is given up the first time it would wait, as a timeout
        // around it would, and started again.
        let cancelled = std::cell::Cell::new((0, 0));
        let send = async {
            let mut pos = 0;
            while pos < payload.len() {
                let end = payload.len().min(pos + 50_000);
                tokio::select! {
                    biased;
                    n = client.write(&payload[pos..end]) => pos += n.unwrap(),
                    () = tokio::task::yield_now() => {
                        cancelled.set((cancelled.get().0 + 1, cancelled.get().1));
                    }
                }
            }
            loop {
                tokio::select! {
                    biased;
                    r = client.shutdown() => break r.unwrap(),
                    () = tokio::task::yield_now() => {}
                }
            }
        };
        let recv = async {
            let mut got = Vec::new();
            let mut buf = vec![0u8; CHUNK_LEN];
            for i in 0.. {
                let len = if i % 3 == 0 { 5 } else { CHUNK_LEN - i % 5 };
                tokio::select! {
                    biased;
                    n = server.read(&mut buf[..len]) => match n.unwrap() {
                        0 => break,
                        n => got.extend_from_slice(&buf[..n]),
                    },
                    () = tokio::task::yield_now() => {
                        cancelled.set((cancelled.get().0, cancelled.get().1 + 1));
                    }
                }
            }
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert_eq!(got.len(), payload.len());
        assert!(got == payload, "the bytes differ");
        let (writes, reads) = cancelled.get();
        assert!(
            writes > 0 && reads > 0,
            "cancelled {writes} writes, {reads} reads"
        );
    }

    #[tokio::test]
    async fn key_update_requests_in_a_row_get_one_answer() {
        let (mut client, mut server) = pair().await;
        for _ in 0..5 {
            server
                .seal(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 1])
                .unwrap();
            server.tx = server.kernel.update_tx().unwrap();
        }
        server.write_all(b"after").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        // One write: one key update, then the data, both under the right keys.
        client.pay_key_update().unwrap();
        client.seal(CT_APPLICATION_DATA, b"reply").unwrap();
        let wire = testing::take_wire(&mut client);
        let records = [HEADER_LEN + 5 + 1 + TAG_LEN, HEADER_LEN + 5 + 1 + TAG_LEN];
        assert_eq!(
            wire.len(),
            records.iter().sum::<usize>(),
            "one key update only"
        );
        testing::transport(&mut client)
            .write_all(&wire)
            .await
            .unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply");
        assert_eq!(
            server.rx.seq, 1,
            "the reply came under the client's new key"
        );
    }

    #[tokio::test]
    async fn sequence_numbers_go_on_from_where_rustls_left_them() {
        let (mut client, mut server) = pair().await;
        // rustls' server sent its session tickets under the traffic key: our server goes
        // on after them, and our client reads them with the kernel connection.
        assert!(server.tx.seq > 0, "no ticket sent before the handover");
        assert_eq!(client.rx.seq, 0);
        let tickets = server.tx.seq;
        server.write_all(b"data").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(client.rx.seq, tickets + 1);
    }

    #[tokio::test]
    async fn a_session_ticket_split_over_two_records_is_taken() {
        let (mut client, mut server) = pair().await;
        // lifetime, age_add, nonce, ticket, no extensions.
        let body = [0, 0, 0, 60, 0, 0, 0, 1, 1, 0, 0, 4, 1, 2, 3, 4, 0, 0];
        let msg = [&[HS_NEW_SESSION_TICKET, 0, 0, body.len() as u8][..], &body].concat();
        server.seal(CT_HANDSHAKE, &msg[..5]).unwrap();
        server.seal(CT_HANDSHAKE, &msg[5..]).unwrap();
        server.write_all(b"after").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        assert!(client.handshake.is_empty());
    }

    #[tokio::test]
    async fn empty_records_pass_up_to_the_limit() {
        let (mut client, mut server) = pair().await;
        for _ in 0..2 {
            for _ in 0..MAX_EMPTY_IN_A_ROW {
                server.seal(CT_APPLICATION_DATA, b"").unwrap();
            }
            // Data in between starts the count again.
            server.seal(CT_APPLICATION_DATA, b"x").unwrap();
        }
        server.flush().await.unwrap();
        let mut got = [0u8; 2];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"xx");
    }

    #[tokio::test]
    async fn rustls_peers_understand_these_records_and_key_updates() {
        let (server_config, client_config) = configs();
        // Our client against tokio-rustls' server, and rustls' server asking for a key update.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config.clone());
        let (c, s) = tokio::join!(
            connect(a, client_config.clone(), localhost()),
            acceptor.accept(b)
        );
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let payload = data(2 * CHUNK_LEN + 99);
        s.get_mut().1.refresh_traffic_keys().unwrap();
        let (s, got) = transfer(s, &mut c, payload.clone(), 50_000).await;
        assert_eq!(got, payload);
        c.rekey_after = c.tx.seq + 2;
        let (_, got) = transfer(c, s, payload.clone(), 50_000).await;
        assert_eq!(got, payload);
        // tokio-rustls' client against our server.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let (c, s) = tokio::join!(connector.connect(localhost(), a), accept(b, server_config));
        let (c, mut s) = (c.unwrap(), s.unwrap());
        s.rekey_after = s.tx.seq + 2;
        let (s, got) = transfer(s, c, payload.clone(), 70_000).await;
        assert_eq!(got, payload);
        drop(s);
    }

    /// The channel binding against rustls' own `export_keying_material` on the other end,
    /// both ways, for a suite of each hash; and not the same on two connections.
    #[tokio::test]
    async fn the_channel_binding_is_the_tls_exporter_rustls_computes() {
        use rustls::crypto::ring::cipher_suite;
        for suite in [
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ] {
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..crate::tls::provider()
            };
            let (server_config, client_config) = testing::configs_with(provider);
            // Our client, rustls' server.
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config.clone());
            let (c, s) = tokio::join!(
                connect(a, client_config.clone(), localhost()),
                acceptor.accept(b)
            );
            let (c, s) = (c.unwrap(), s.unwrap());
            assert_eq!(
                s.get_ref().1.negotiated_cipher_suite().unwrap().suite(),
                suite.suite()
            );
            let mut want = [0u8; CHANNEL_BINDING_LEN];
            s.get_ref()
                .1
                .export_keying_material(&mut want, CHANNEL_BINDING_LABEL, None)
                .unwrap();
            assert_eq!(c.channel_binding(), &want, "{suite:?}, our client");
            // rustls' client, our server.
            let (a, b) = tokio::io::duplex(64 * 1024);
            let connector = tokio_rustls::TlsConnector::from(client_config.clone());
            let (c, s) = tokio::join!(
                connector.connect(localhost(), a),
                accept(b, server_config.clone())
            );
            let (c, s) = (c.unwrap(), s.unwrap());
            let mut want = [0u8; CHANNEL_BINDING_LEN];
            c.get_ref()
                .1
                .export_keying_material(&mut want, CHANNEL_BINDING_LABEL, None)
                .unwrap();
            assert_eq!(s.channel_binding(), &want, "{suite:?}, our server");
            // Ours at both ends, twice: equal within a connection, not across.
            let configs = (server_config, client_config);
            let (c1, s1) = testing::pair_with(&configs).await;
            let (c2, s2) = testing::pair_with(&configs).await;
            assert_eq!(c1.channel_binding(), s1.channel_binding());
            assert_eq!(c2.channel_binding(), s2.channel_binding());
            assert_ne!(c1.channel_binding(), c2.channel_binding());
            assert_ne!(c1.channel_binding(), &[0u8; CHANNEL_BINDING_LEN]);
        }
    }
}

/// Review tests of the record path (`WriteRecords`): random interleavings of body chunks,
/// frames, flushes, cancelled calls, key updates owed and due, on a transport that takes
/// writes in pieces and makes them wait; the peer (ours, or rustls) must read exactly the
/// bytes that each call said it took.
#[cfg(test)]
mod record_path_review {
    use super::*;
    use crate::records::{RecordBuf, write_records};
    use testing::{configs, localhost};

    /// xorshift64*: deterministic, so that a failure repeats.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A transport that takes writes in random pieces and often makes them wait.
    struct Choppy<IO> {
        io: IO,
        rng: Rng,
    }

    impl<IO: AsyncRead + Unpin> AsyncRead for Choppy<IO> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<IO: AsyncWrite + Unpin> AsyncWrite for Choppy<IO> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.rng.below(4) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let most = 1 + self.rng.below(40_000) as usize;
            let n = buf.len().min(most);
            Pin::new(&mut self.io).poll_write(cx, &buf[..n])
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// Polls `fut` once with a waker that does nothing, as a timeout that fires at once does.
    fn poll_once<F: std::future::Future>(fut: F) -> Poll<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        fut.as_mut().poll(&mut cx)
    }

    /// Random sends on `client`; returns the bytes it accepted, in order.
    async fn random_sends<IO: AsyncRead + AsyncWrite + Unpin>(
        client: &mut TlsStream<IO>,
        seed: u64,
        ops: usize,
    ) -> Vec<u8> {
        let mut rng = Rng(seed);
        let mut accepted = Vec::new();
        let mut buf = RecordBuf::new();
        let mut content: Vec<u8> = Vec::new();
        let mut stamp = 0u8;
        for _ in 0..ops {
            match rng.below(10) {
                // A body chunk: a fresh fill when the last one went, of any length.
                0..=4 => {
                    if buf.unsent() == 0 {
                        let len = match rng.below(4) {
                            0 => 1 + rng.below(40) as usize,
                            1 => MAX_PLAIN * (1 + rng.below(16) as usize),
                            _ => 1 + rng.below(CHUNK_LEN as u64) as usize,
                        };
                        stamp = stamp.wrapping_add(1);
                        content = (0..len)
                            .map(|i| (i as u8).wrapping_mul(31) ^ stamp)
                            .collect();
                        buf.fill_from(&mut &content[..], len).unwrap();
                    }
                    let n = if rng.below(2) == 0 {
                        match poll_once(write_records(client, &mut buf)) {
                            Poll::Ready(n) => n.unwrap(),
                            Poll::Pending => 0,
                        }
                    } else {
                        write_records(client, &mut buf).await.unwrap()
                    };
                    assert!(n == 0 || n == content.len(), "a TLS stream takes all");
                    if n > 0 {
                        accepted.extend_from_slice(&content);
                        assert!(
                            !client.key_update_owed,
                            "a chunk went before the key update"
                        );
                    }
                }
                // A frame, written as a caller would, maybe given up at its first wait.
                5 | 6 => {
                    let frame: Vec<u8> = (0..1 + rng.below(300) as usize)
                        .map(|i| i as u8 ^ 0x5a)
                        .collect();
                    let n = if rng.below(2) == 0 {
                        match poll_once(client.write(&frame)) {
                            Poll::Ready(n) => n.unwrap(),
                            Poll::Pending => 0,
                        }
                    } else {
                        client.write(&frame).await.unwrap()
                    };
                    accepted.extend_from_slice(&frame[..n]);
                }
                7 => {
                    if rng.below(2) == 0 {
                        if let Poll::Ready(r) = poll_once(client.flush()) {
                            r.unwrap();
                        }
                    } else {
                        client.flush().await.unwrap();
                    }
                }
                // A key update the peer asked for.
                8 => client.key_update_owed = true,
                // One due within a few records.
                _ => client.rekey_after = client.tx.seq + 1 + rng.below(20),
            }
            tokio::task::yield_now().await;
        }
        while buf.unsent() > 0 {
            let n = write_records(client, &mut buf).await.unwrap();
            assert_eq!(n, content.len());
            accepted.extend_from_slice(&content);
        }
        client.shutdown().await.unwrap();
        accepted
    }

    #[tokio::test]
    async fn random_interleavings_of_records_frames_flushes_and_key_updates_read_back_exactly() {
        for seed in 1..=12u64 {
            let (server_config, client_config) = configs();
            let (a, b) = tokio::io::duplex(3 * MAX_RECORD);
            let a = Choppy {
                io: a,
                rng: Rng(seed * 7919),
            };
            let (c, s) = tokio::join!(
                connect(a, client_config, localhost()),
                accept(b, server_config)
            );
            let (mut client, server) = (c.unwrap(), s.unwrap());
            let send = random_sends(&mut client, seed, 120);
            // The receiver drops its end when it fails, so that the sender fails too
            // instead of waiting for room in the pipe.
            let recv = async move {
                let mut server = server;
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.map(|_| got)
            };
            let (accepted, got) = tokio::join!(send, recv);
            let got = got.unwrap_or_else(|e| panic!("seed {seed}: the peer failed: {e}"));
            assert_eq!(got.len(), accepted.len(), "seed {seed}");
            assert!(got == accepted, "seed {seed}: the bytes differ");
        }
    }

    #[tokio::test]
    async fn rustls_reads_records_sealed_in_place_with_key_updates_spliced_in() {
        for seed in 1..=4u64 {
            let (server_config, client_config) = configs();
            let (a, b) = tokio::io::duplex(3 * MAX_RECORD);
            let a = Choppy {
                io: a,
                rng: Rng(seed * 104_729),
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
            let (c, s) = tokio::join!(connect(a, client_config, localhost()), acceptor.accept(b));
            let (mut client, server) = (c.unwrap(), s.unwrap());
            let send = random_sends(&mut client, seed + 100, 80);
            // The receiver drops its end when it fails, so that the sender fails too
            // instead of waiting for room in the pipe.
            let recv = async move {
                let mut server = server;
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.map(|_| got)
            };
            let (accepted, got) = tokio::join!(send, recv);
            let got = got.unwrap_or_else(|e| panic!("seed {seed}: rustls failed: {e}"));
            assert_eq!(got.len(), accepted.len(), "seed {seed}");
            assert!(got == accepted, "seed {seed}: the bytes differ");
        }
    }
}
