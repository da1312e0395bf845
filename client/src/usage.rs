//! The account as the server reports it: who this session is and how much of the account's
//! quota is used (`Account`, protocol 3; a server of an older protocol answers only who),
//! and how `xfer whoami` prints it.

use xfer_proto::message::SessionInfo;
use xfer_proto::{Request, Response};

use crate::conn::{Client, unexpected};
use crate::error::{Result, printable};

/// What `Account` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Who the session belongs to.
    pub session: SessionInfo,
    /// Usage and quotas; `None` from a server older than protocol 3.
    pub usage: Option<Usage>,
}

/// An account's usage against its quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes stored, reserved by uploads in progress and kept for resume.
    pub used_bytes: u64,
    /// Files stored (and being added).
    pub used_files: u64,
    /// Byte quota; `None` is unlimited.
    pub quota_bytes: Option<u64>,
    /// File quota; `None` is unlimited.
    pub quota_files: Option<u64>,
}

impl Client {
    /// Who this connection is, with the account's usage where the server can tell it.
    pub async fn account(&mut self) -> Result<Account> {
        if self.version < 3 {
            return Ok(Account {
                session: self.whoami().await?,
                usage: None,
            });
        }
        match self.call(&Request::Account).await? {
            Response::Account {
                session,
                used_bytes,
                used_files,
                quota_bytes,
                quota_files,
            } => Ok(Account {
                session,
                usage: Some(Usage {
                    used_bytes,
                    used_files,
                    quota_bytes,
                    quota_files,
                }),
            }),
            other => Err(unexpected(&other)),
        }
    }
}

/// Bytes in binary units as people write them: "1.2 GiB", "10 GiB", "512 B".
pub fn human_bytes(n: u64) -> String {
    let s = bytesize::ByteSize(n).display().iec().to_string();
    s.replacen(".0 ", " ", 1)
}

/// A count with thousands separators: "10,000".
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Usage {
    /// "used 1.2 GiB of 10 GiB, 312 of 10,000 files" (no "of" where there is no quota).
    pub fn line(&self) -> String {
        let bytes = match self.quota_bytes {
            Some(q) => format!("{} of {}", human_bytes(self.used_bytes), human_bytes(q)),
            None => format!("{} (no quota)", human_bytes(self.used_bytes)),
        };
        let files = match self.quota_files {
            Some(q) => format!("{} of {} files", grouped(self.used_files), grouped(q)),
            None => format!("{} files", grouped(self.used_files)),
        };
        format!("used {bytes}, {files}")
    }
}

/// Prints `xfer whoami`: who, on which server, until when, and the usage; or one JSON
/// object.
pub fn print_whoami(account: &Account, server: &str, json: bool) {
    let info = &account.session;
    let expires = xfer_util::format_time(info.expires);
    if json {
        let mut v = serde_json::json!({
            "user": printable(&info.user),
            "role": info.role,
            "server": server,
            "expires": expires,
        });
        if let Some(u) = &account.usage {
            v["used_bytes"] = u.used_bytes.into();
            v["used_files"] = u.used_files.into();
            v["quota_bytes"] = serde_json::json!(u.quota_bytes);
            v["quota_files"] = serde_json::json!(u.quota_files);
        }
        println!("{v}");
    } else {
        println!(
            "{} ({}) on {server}; session expires {expires}",
            printable(&info.user),
            info.role,
        );
        if let Some(u) = &account.usage {
            println!("{}", u.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_as_a_person_writes_it() {
        let u = Usage {
            used_bytes: 1_288_490_189,
            used_files: 312,
            quota_bytes: Some(10 << 30),
            quota_files: Some(10_000),
        };
        assert_eq!(u.line(), "used 1.2 GiB of 10 GiB, 312 of 10,000 files");
        let free = Usage {
            used_bytes: 0,
            used_files: 1_234_567,
            quota_bytes: None,
            quota_files: None,
        };
        assert_eq!(free.line(), "used 0 B (no quota), 1,234,567 files");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
    }
}
