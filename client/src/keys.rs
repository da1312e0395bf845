//! Key login on the client: `xfer keygen` (an OpenSSH Ed25519 key pair), loading a private
//! key for `xfer login --key` (asking for its passphrase only if it is encrypted), and
//! signing the server's challenge (spec §8).
//!
//! Files are OpenSSH's own formats through the `ssh-key` crate: the private key is
//! `-----BEGIN OPENSSH PRIVATE KEY-----` (with a passphrase: bcrypt-pbkdf and aes256-ctr, as
//! `ssh-keygen` writes it), the public key one `ssh-ed25519 AAAA... comment` line, so
//! `~/.ssh/id_ed25519` works too. Signing is ring's Ed25519.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use ssh_key::private::{Ed25519Keypair, Ed25519PrivateKey, KeypairData};
use ssh_key::public::Ed25519PublicKey;
use ssh_key::{HashAlg, LineEnding, PrivateKey};
use xfer_proto::key_login::{PUBLIC_KEY_LEN, SIGNATURE_LEN};
use xfer_proto::message::SessionInfo;
use zeroize::Zeroizing;

use crate::conn::Client;
use crate::error::{ClientError, Result};

/// The key file `xfer keygen` writes without `-f`, in the state folder.
pub const DEFAULT_KEY_FILE: &str = "id_ed25519";

/// A private key ready to sign a login.
pub struct LoginKey {
    /// The key pair (ring keeps the seed).
    pair: Ed25519KeyPair,
    /// The raw public key, as `KeyLogin` carries it.
    public: [u8; PUBLIC_KEY_LEN],
}

impl LoginKey {
    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.public
    }

    /// Signs `message` (a [`xfer_proto::key_login::signed_message`]).
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

/// How `xfer login` proves who it is: a password, or a key.
pub enum Credential {
    /// A password, for `Login`.
    Password(Zeroizing<String>),
    /// A private key, for `KeyLogin` and `KeyProof`.
    Key(LoginKey),
}

impl Credential {
    /// Logs `user` in on `client` with this credential: the new token and session.
    pub async fn log_in(&self, client: &mut Client, user: &str) -> Result<(String, SessionInfo)> {
        match self {
            Credential::Password(password) => client.login(user, password).await,
            Credential::Key(key) => client.key_login(user, key).await,
        }
    }
}

/// One line of standard input, without its line ending.
fn read_stdin_line(what: &str) -> Result<Zeroizing<String>> {
    xfer_util::password::first_line(std::io::stdin().lock())
        .map(Zeroizing::new)
        .map_err(|e| ClientError::local(format!("reading the {what} from standard input"), e))
}

fn prompt(text: &str) -> Result<Zeroizing<String>> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .map_err(|e| ClientError::local("reading the passphrase", e))
}

/// The passphrase for a new key: one line of stdin with `--passphrase-stdin`, else asked
/// twice on a terminal, else none. Empty means none.
fn new_passphrase(from_stdin: bool) -> Result<Zeroizing<String>> {
    if from_stdin {
        return read_stdin_line("passphrase");
    }
    if !std::io::stdin().is_terminal() {
        return Ok(Zeroizing::new(String::new()));
    }
    let first = prompt("Enter passphrase (empty for no passphrase): ")?;
    let again = prompt("Enter same passphrase again: ")?;
    if first != again {
        return Err(ClientError::Usage(
            "the passphrases do not match; no key was written".into(),
        ));
    }
    Ok(first)
}

/// The comment of a new key: `USER@HOST`, as ssh-keygen writes it.
fn default_comment() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "xfer".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// Writes `contents` to `path` with `mode` from the first byte, and never over an existing
/// file: temp file in the same folder, fsync, link into place (failing if taken), fsync the
/// folder.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = xfer_util::fs::parent_dir(path);
    let write = || -> std::io::Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".xfer-tmp")
            .tempfile_in(dir)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        tmp.write_all(contents)?;
        tmp.as_file().sync_all()?;
        tmp.persist_noclobber(path).map_err(|e| e.error)?;
        xfer_util::fs::sync_dir(dir)
    };
    write().map_err(|e| ClientError::local(format!("writing `{}`", path.display()), e))
}

/// `FILE.pub`.
fn pub_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// `xfer keygen`: writes a new Ed25519 key pair to `file` (0600) and `file.pub` (one line),
/// refusing to replace either. Returns the public key line and its fingerprint.
pub fn keygen(file: &Path, passphrase_stdin: bool) -> Result<(PathBuf, String, String)> {
    let public_file = pub_path(file);
    for f in [file, public_file.as_path()] {
        if f.symlink_metadata().is_ok() {
            return Err(ClientError::Other(format!(
                "`{}` already exists; not overwriting it (pass another file with -f)",
                f.display()
            )));
        }
    }
    let passphrase = new_passphrase(passphrase_stdin)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(seed.as_mut())
        .map_err(|_| ClientError::Other("the system's random generator failed".into()))?;
    let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
        .map_err(|e| ClientError::Other(format!("making the key: {e}")))?;
    let public: [u8; PUBLIC_KEY_LEN] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| ClientError::Other("making the key: odd public key length".into()))?;
    let data = KeypairData::Ed25519(Ed25519Keypair {
        public: Ed25519PublicKey(public),
        private: Ed25519PrivateKey::from_bytes(&seed),
    });
    let mut key = PrivateKey::new(data, default_comment())
        .map_err(|e| ClientError::Other(format!("making the key: {e}")))?;
    if !passphrase.is_empty() {
        key = key
            .encrypt(&mut ssh_key::rand_core::OsRng, passphrase.as_bytes())
            .map_err(|e| ClientError::Other(format!("encrypting the key: {e}")))?;
    }
    let private_text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| ClientError::Other(format!("writing the key: {e}")))?;
    let public_line = key
        .public_key()
        .to_openssh()
        .map_err(|e| ClientError::Other(format!("writing the key: {e}")))?;
    write_new(file, private_text.as_bytes(), 0o600)?;
    write_new(&public_file, format!("{public_line}\n").as_bytes(), 0o644)?;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
    Ok((public_file, public_line, fingerprint))
}

/// `xfer keygen [-f FILE] [--passphrase-stdin]`: FILE defaults to [`DEFAULT_KEY_FILE`] in
/// the state folder `state_dir`.
pub(crate) fn keygen_command(
    ctx: &crate::context::Ctx,
    state_dir: &Path,
    file: Option<PathBuf>,
    passphrase_stdin: bool,
) -> Result<()> {
    let file = file.unwrap_or_else(|| state_dir.join(DEFAULT_KEY_FILE));
    let (public_file, line, fingerprint) = keygen(&file, passphrase_stdin)?;
    ctx.status(format_args!(
        "Wrote the private key to {} and the public key to {}.\n\
         Key fingerprint: {fingerprint}\n\
         On the server, let it log in as NAME with:\n    xferd user key add NAME {line}\n\
         then log in with:\n    xfer login --key {} NAME@HOST",
        file.display(),
        public_file.display(),
        file.display()
    ));
    Ok(())
}

/// Reads a private key for `xfer login --key`: an OpenSSH Ed25519 key, decrypted with a
/// passphrase (from stdin with `passphrase_stdin`, else asked on the terminal) if it is
/// encrypted.
pub fn load(file: &Path, passphrase_stdin: bool) -> Result<LoginKey> {
    let text = Zeroizing::new(
        std::fs::read_to_string(file)
            .map_err(|e| ClientError::local(format!("reading the key `{}`", file.display()), e))?,
    );
    let bad = |why: String| ClientError::Other(format!("key `{}`: {why}", file.display()));
    let mut key = PrivateKey::from_openssh(text.as_bytes()).map_err(|e| {
        bad(format!(
            "not an OpenSSH private key ({e}); make one with `xfer keygen`"
        ))
    })?;
    if key.is_encrypted() {
        let passphrase = if passphrase_stdin {
            read_stdin_line("passphrase")?
        } else if std::io::stdin().is_terminal() {
            prompt(&format!("Passphrase for {}: ", file.display()))?
        } else {
            return Err(ClientError::Usage(format!(
                "the key `{}` is encrypted and there is no terminal to ask for its passphrase on; pass --passphrase-stdin and pipe it in",
                file.display()
            )));
        };
        key = key
            .decrypt(passphrase.as_bytes())
            .map_err(|_| bad("wrong passphrase".into()))?;
    }
    let KeypairData::Ed25519(pair) = key.key_data() else {
        return Err(bad(format!(
            "a {} key; only Ed25519 keys can log in",
            key.algorithm()
        )));
    };
    let public = pair.public.0;
    let pair = Ed25519KeyPair::from_seed_and_public_key(pair.private.as_ref(), &public)
        .map_err(|_| bad("its public half does not match its private half".into()))?;
    Ok(LoginKey { pair, public })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_loads_back_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        let (public_file, line, fp) = keygen(&file, false).unwrap();
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert!(fp.starts_with("SHA256:"), "{fp}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&public_file), 0o644);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let key = load(&file, false).unwrap();
        let parsed = ssh_key::PublicKey::from_openssh(&line).unwrap();
        assert_eq!(parsed.key_data().ed25519().unwrap().0, key.public_key());
        let sig = key.sign(b"m");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.public_key())
            .verify(b"m", &sig)
            .unwrap();
        let err = keygen(&file, false).err().unwrap().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    }
}
