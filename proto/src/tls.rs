//! The TLS crypto both sides use: rustls' ring provider, TLS 1.3 only, with AES-128-GCM
//! preferred (it is about a third cheaper than AES-256-GCM per byte and as safe for this use),
//! then AES-256-GCM, then ChaCha20-Poly1305 for CPUs without AES instructions.

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, default_provider};

/// The crypto provider for xfer connections.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    }
}

/// The only protocol version xfer accepts.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
