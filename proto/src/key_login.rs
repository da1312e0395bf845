//! Key login's signed message (spec §8): what the client's Ed25519 key signs and the server
//! verifies, bound to one TLS connection by its channel binding and to one attempt by the
//! server's nonce, so that a signature seen once is useless anywhere else.

use crate::tls_stream::CHANNEL_BINDING_LEN;

/// What every signed message starts with: names the protocol and its version, so that a
/// signature made for xfer is never valid for anything else the key signs.
pub const CONTEXT: &[u8] = b"xfer key login v1\0";
/// Bytes of the server's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a raw Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// The message a key login signs: [`CONTEXT`] || channel binding (32) || nonce (32) ||
/// u16 big-endian byte length of `user` || `user` (UTF-8) || public key (32). `None` for a
/// user name longer than 65,535 bytes, which no server accepts anyway.
pub fn signed_message(
    channel_binding: &[u8; CHANNEL_BINDING_LEN],
    nonce: &[u8; NONCE_LEN],
    user: &str,
    public_key: &[u8; PUBLIC_KEY_LEN],
) -> Option<Vec<u8>> {
    let user_len = u16::try_from(user.len()).ok()?;
    let mut m = Vec::with_capacity(
        CONTEXT.len() + CHANNEL_BINDING_LEN + NONCE_LEN + 2 + user.len() + PUBLIC_KEY_LEN,
    );
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(channel_binding);
    m.extend_from_slice(nonce);
    m.extend_from_slice(&user_len.to_be_bytes());
    m.extend_from_slice(user.as_bytes());
    m.extend_from_slice(public_key);
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_message_is_laid_out_as_the_spec_says() {
        let m = signed_message(&[1; 32], &[2; 32], "bob", &[3; 32]).unwrap();
        let mut want = b"xfer key login v1\0".to_vec();
        want.extend([1; 32]);
        want.extend([2; 32]);
        want.extend([0, 3]);
        want.extend(b"bob");
        want.extend([3; 32]);
        assert_eq!(m, want);
        assert_eq!(m.len(), 18 + 32 + 32 + 2 + 3 + 32);
        assert!(signed_message(&[0; 32], &[0; 32], &"x".repeat(65_536), &[0; 32]).is_none());
    }
}
