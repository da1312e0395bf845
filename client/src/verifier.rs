//! The server identity check: a rustls verifier that pins the SHA-256 of the server's public
//! key (SPKI) instead of trusting certificate authorities, like OpenSSH's known_hosts.
//!
//! The pin alone is not enough: anyone can present a copy of the server's certificate. What
//! proves the peer holds the matching private key is the TLS 1.3 CertificateVerify signature,
//! so that check is delegated, unchanged, to rustls with the provider's algorithms.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use xfer_proto::fingerprint::Fingerprint;

/// Accepts exactly the pinned key (or, with no pin, any key, recording it so the caller can
/// decide before sending anything), and always verifies the handshake signature.
#[derive(Debug)]
pub struct PinVerifier {
    /// The fingerprint the server must have; `None` on first contact.
    expected: Option<Fingerprint>,
    /// The fingerprint the server presented, for the caller's decision and messages.
    seen: Mutex<Option<Fingerprint>>,
    /// Signature algorithms of the crypto provider in use.
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinVerifier {
    /// A verifier for `expected` (or first contact) using `provider`'s algorithms.
    pub fn new(
        expected: Option<Fingerprint>,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Arc<Self> {
        Arc::new(PinVerifier {
            expected,
            seen: Mutex::new(None),
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// The fingerprint the server presented, once the handshake got that far.
    pub fn seen(&self) -> Option<Fingerprint> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The client's TLS config: `provider`'s suites, TLS 1.3 only, ALPN `xfer/1`, and the server's
/// key checked by a [`PinVerifier`] for `expected` (returned too, for what it saw).
pub fn pinned_config(
    expected: Option<Fingerprint>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<(rustls::ClientConfig, Arc<PinVerifier>), Error> {
    let verifier = PinVerifier::new(expected, &provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(xfer_proto::tls::VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![xfer_proto::ALPN.to_vec()];
    Ok((config, verifier))
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let fp = Fingerprint::of_certificate(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        match self.expected {
            Some(expected) if expected != fp => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // xfer speaks TLS 1.3 only; a 1.2 handshake never gets here, and must not pass if it did.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;

    struct Identity {
        cert: CertificateDer<'static>,
        key: rcgen::KeyPair,
    }

    fn identity() -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Identity {
            cert: cert.der().clone(),
            key,
        }
    }

    fn fp(id: &Identity) -> Fingerprint {
        Fingerprint::of_certificate(&id.cert).unwrap()
    }

    /// A server that presents `cert` but signs the handshake with `signer`: what an attacker
    /// holding a copy of the real certificate, but not its private key, can do.
    #[derive(Debug)]
    struct Presents(Arc<CertifiedKey>);

    impl ResolvesServerCert for Presents {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    async fn handshake(
        cert: &Identity,
        signer: &Identity,
        pin: Option<Fingerprint>,
    ) -> (Result<(), String>, Option<Fingerprint>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signer.key.serialize_der()));
        let signing_key = provider.key_provider.load_private_key(der).unwrap();
        let certified = CertifiedKey::new(vec![cert.cert.clone()], signing_key);
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Presents(Arc::new(certified))));
        let verifier = PinVerifier::new(pin, &provider);
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let server = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
        let client = connector
            .connect(ServerName::try_from("localhost").unwrap(), a)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = server.await;
        (client, verifier.seen())
    }

    #[tokio::test]
    async fn the_pinned_key_with_its_own_signature_passes() {
        let id = identity();
        let (result, seen) = handshake(&id, &id, Some(fp(&id))).await;
        result.unwrap();
        assert_eq!(seen, Some(fp(&id)));
    }

    #[tokio::test]
    async fn a_signature_by_another_key_is_rejected_even_with_the_pinned_certificate() {
        let server = identity();
        let attacker = identity();
        // The pin matches the presented certificate; only the signature gives the attacker away.
        let (result, seen) = handshake(&server, &attacker, Some(fp(&server))).await;
        let err = result.unwrap_err();
        assert!(err.to_lowercase().contains("signature"), "{err}");
        assert_eq!(seen, Some(fp(&server)));
        // Same on first contact: without the key, no handshake completes at all.
        let (result, _) = handshake(&server, &attacker, None).await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_different_key_fails_the_pin_and_is_recorded() {
        let pinned = identity();
        let other = identity();
        let (result, seen) = handshake(&other, &other, Some(fp(&pinned))).await;
        assert!(result.is_err());
        assert_eq!(seen, Some(fp(&other)));
    }

    #[tokio::test]
    async fn first_contact_accepts_any_key_that_signs_and_records_it() {
        let id = identity();
        let (result, seen) = handshake(&id, &id, None).await;
        result.unwrap();
        assert_eq!(seen, Some(fp(&id)));
    }
}
