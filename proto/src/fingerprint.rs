//! Server identity: the fingerprint clients pin, computed from the certificate's public key.
//!
//! The fingerprint is `SHA256:` followed by the unpadded standard base64 of the SHA-256 of the
//! certificate's DER-encoded SubjectPublicKeyInfo, the same shape as OpenSSH's. Hashing the key
//! rather than the whole certificate means a renewed certificate with the same key keeps its pin.

use base64::Engine;
use sha2::{Digest, Sha256};

/// Why a fingerprint could not be computed or parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    /// The certificate is not valid DER X.509.
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// The text is not `SHA256:` + 43 base64 characters.
    #[error("`{0}` is not a fingerprint (expected SHA256: followed by 43 base64 characters)")]
    BadFormat(String),
}

/// A SHA-256 public-key fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(spki_der).into())
    }

    /// Fingerprint of the public key inside a DER-encoded X.509 certificate.
    pub fn of_certificate(cert_der: &[u8]) -> Result<Self, FingerprintError> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| FingerprintError::BadCertificate(e.to_string()))?;
        Ok(Self::of_spki(cert.tbs_certificate.subject_pki.raw))
    }

    /// Parses `SHA256:<base64>`; the prefix is case-insensitive and base64 padding is optional.
    pub fn parse(text: &str) -> Result<Self, FingerprintError> {
        let bad = || FingerprintError::BadFormat(text.to_string());
        let text = text.trim();
        let (prefix, b64) = text.split_once(':').ok_or_else(bad)?;
        if !prefix.eq_ignore_ascii_case("sha256") {
            return Err(bad());
        }
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|_| bad())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(Fingerprint(arr))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.0)
        )
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let fp = Fingerprint::of_spki(b"some key");
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:"));
        assert_eq!(text.len(), 7 + 43);
        assert_eq!(Fingerprint::parse(&text).unwrap(), fp);
        assert_eq!(Fingerprint::parse(&format!("{text}=")).unwrap(), fp);
        assert_eq!(
            Fingerprint::parse(&text.replace("SHA256", "sha256")).unwrap(),
            fp
        );
    }

    #[test]
    fn bad_fingerprints_are_refused() {
        for bad in ["", "SHA256:", "MD5:abcd", "SHA256:!!!!", "SHA256:YWJj"] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_certificate_is_refused() {
        assert!(Fingerprint::of_certificate(b"not a certificate").is_err());
    }
}
