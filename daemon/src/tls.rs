//! The daemon's TLS identity: making a key and self-signed certificate with rcgen, loading
//! them into a TLS 1.3-only rustls config that insists on the `xfer/1` ALPN, and computing the
//! fingerprint clients pin.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use xfer_proto::fingerprint::Fingerprint;

/// Why the TLS identity could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("reading {what} `{path}`: {message}")]
    Read {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The certificate and key do not make a usable TLS config (for example they do not match).
    #[error("certificate `{cert}` and key `{key}` cannot be used together: {message}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The TLS library's message.
        message: String,
    },
    /// Generating a key or certificate failed.
    #[error("generating the certificate: {0}")]
    Generate(String),
}

/// A freshly generated identity, in PEM.
pub struct GeneratedIdentity {
    /// Self-signed certificate.
    pub cert_pem: String,
    /// Private key (PKCS#8).
    pub key_pem: String,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
}

/// Makes an ECDSA P-256 key and a self-signed certificate whose SANs are `hostnames` plus
/// localhost, 127.0.0.1 and ::1.
pub fn generate(hostnames: &[String]) -> Result<GeneratedIdentity, TlsError> {
    let mut sans: Vec<String> = hostnames.to_vec();
    for default in ["localhost", "127.0.0.1", "::1"] {
        if !sans.iter().any(|s| s == default) {
            sans.push(default.into());
        }
    }
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        hostnames.first().map(String::as_str).unwrap_or("xferd"),
    );
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let fingerprint = Fingerprint::of_spki(&key.public_key_der());
    Ok(GeneratedIdentity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        fingerprint,
    })
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Read {
        what: "certificate",
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate found in the file".into()));
    }
    Ok(certs)
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_of(cert_path: &Path) -> Result<Fingerprint, TlsError> {
    fingerprint_of_loaded(cert_path, &load_certs(cert_path)?)
}

/// The fingerprint of the end-entity certificate of a chain already read from `cert_path`.
fn fingerprint_of_loaded(
    cert_path: &Path,
    certs: &[CertificateDer<'static>],
) -> Result<Fingerprint, TlsError> {
    Fingerprint::of_certificate(&certs[0]).map_err(|e| TlsError::Read {
        what: "certificate",
        path: cert_path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Builds the server's TLS config from PEM files: TLS 1.3 only, ALPN `xfer/1`, and the
/// cipher suite chosen by the server's preference (`xfer_proto::tls::provider`'s order).
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Arc<ServerConfig>, Fingerprint), TlsError> {
    let certs = load_certs(cert_path)?;
    let fingerprint = fingerprint_of_loaded(cert_path, &certs)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Read {
        what: "private key",
        path: key_path.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Ok(meta) = std::fs::metadata(key_path)
        && meta.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(path = %key_path.display(), "private key is readable by every user; chmod 600 (or 640 with a dedicated group) it");
    }
    let config_err = |message: String| TlsError::Config {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        message,
    };
    let provider = Arc::new(xfer_proto::tls::provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(xfer_proto::tls::VERSIONS)
        .map_err(|e| config_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| config_err(e.to_string()))?;
    config.alpn_protocols = vec![xfer_proto::ALPN.to_vec()];
    // The provider lists the suites in the server's order of preference (AES-128-GCM first);
    // without this, the client's order wins and OpenSSL clients get AES-256-GCM.
    config.ignore_client_order = true;
    // After the handshake, xfer_proto::tls_stream seals and opens records itself.
    config.enable_secret_extraction = true;
    Ok((Arc::new(config), fingerprint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_loads_and_fingerprints_match() {
        let dir = tempfile::tempdir().unwrap();
        let id = generate(&["files.example.org".into()]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, &id.cert_pem).unwrap();
        std::fs::write(&key, &id.key_pem).unwrap();
        let (_, fp) = server_config(&cert, &key).unwrap();
        assert_eq!(fp, id.fingerprint);
        assert_eq!(fingerprint_of(&cert).unwrap(), id.fingerprint);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = generate(&[]).unwrap();
        let b = generate(&[]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, &a.cert_pem).unwrap();
        std::fs::write(&key, &b.key_pem).unwrap();
        assert!(server_config(&cert, &key).is_err());
    }

    /// Runs a TLS handshake in memory between the daemon's config and a client offering
    /// `suites` in that order; returns the suite both sides settled on.
    fn negotiate(suites: Vec<rustls::SupportedCipherSuite>) -> rustls::SupportedCipherSuite {
        let dir = tempfile::tempdir().unwrap();
        let id = generate(&[]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &id.cert_pem).unwrap();
        std::fs::write(&key, &id.key_pem).unwrap();
        let (server_config, _) = server_config(&cert, &key).unwrap();
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..xfer_proto::tls::provider()
        });
        let (client_config, _) =
            xfer::verifier::pinned_config(Some(id.fingerprint), provider).unwrap();
        let mut client =
            rustls::ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap())
                .unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        let chosen = server.negotiated_cipher_suite().unwrap();
        assert_eq!(
            client.negotiated_cipher_suite().unwrap().suite(),
            chosen.suite()
        );
        chosen
    }

    #[test]
    fn the_servers_cipher_preference_holds_whatever_the_clients_order() {
        use rustls::crypto::ring::cipher_suite::*;
        // OpenSSL's order: AES-256-GCM first.
        let chosen = negotiate(vec![
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
        ]);
        assert_eq!(chosen.suite(), TLS13_AES_128_GCM_SHA256.suite());
        // A client without AES-128-GCM gets the server's next choice.
        let chosen = negotiate(vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ]);
        assert_eq!(chosen.suite(), TLS13_AES_256_GCM_SHA384.suite());
    }

    #[test]
    fn garbage_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "hello").unwrap();
        let err = fingerprint_of(&cert).unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");
    }
}
