//! The audit trail: one JSON line per operation (time, user, source address, operation, path,
//! bytes, digest, result) appended to a file opened in append mode, mode 0600. Reopened on
//! SIGHUP so log rotation works. Failures to write are logged, never fatal to a request.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One audited operation.
#[derive(Debug, Serialize, Default)]
pub struct Event<'a> {
    /// RFC 3339 UTC time.
    pub time: String,
    /// Account name, or the name tried for a failed login.
    pub user: &'a str,
    /// Client address.
    pub source: String,
    /// What was done: login, keylogin, logout, list, upload, download, delete, rename, mkdir,
    /// shutdown, token_create, token_revoke, token_scope (a request refused by a token's scope).
    pub op: &'a str,
    /// Remote path, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    /// Second path (rename target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<&'a str>,
    /// Bytes that crossed the network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Where a resumed transfer started (bytes already on the receiving side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
    /// BLAKE3 of the file, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Id of the token made or revoked (`token_create`, `token_revoke`); never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<&'a str>,
    /// "ok", or the error code.
    pub result: String,
}

/// Most bytes one audited string may take in the log once JSON-escaped. Twice the longest
/// valid path, because a valid path can hold `"`s (two bytes escaped) but no control character
/// or `\\`: every path that could name a file is kept whole, and only a refused one (a 64 KiB
/// run of control characters once cost 390 KB of audit log per request) is cut.
pub const MAX_AUDITED_STRING: usize = 2 * xfer_proto::limits::MAX_PATH_LEN;

/// Bytes `c` takes in serde_json's output.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `s`, or its start cut at [`MAX_AUDITED_STRING`] escaped bytes followed by
/// `…(N bytes)`, N being its whole length.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += json_len(c);
        if used > MAX_AUDITED_STRING {
            return format!("{}…({} bytes)", &s[..i], s.len()).into();
        }
    }
    s.into()
}

/// The audit log file.
pub struct AuditLog {
    /// Where it is.
    path: PathBuf,
    /// The open file; `None` if it could not be opened (already logged).
    file: Mutex<Option<File>>,
}

fn open(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl AuditLog {
    /// Opens (creating) the audit log; the daemon refuses to start if it cannot.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new(Some(open(path)?)),
        })
    }

    /// Reopens the file (after rotation).
    pub fn reopen(&self) -> std::io::Result<()> {
        let f = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        Ok(())
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event as one line (a single write, so lines never interleave). Client
    /// strings are bounded first (see [`clip`]).
    pub fn record(&self, event: Event<'_>) {
        let (user, path, to) = (clip(event.user), event.path.map(clip), event.to.map(clip));
        let event = Event {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            user: &user,
            path: path.as_deref(),
            to: to.as_deref(),
            ..event
        };
        let Ok(mut line) = serde_json::to_vec(&event) else {
            return;
        };
        line.push(b'\n');
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = guard.as_mut()
            && let Err(e) = f.write_all(&line)
        {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_appended() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let log = AuditLog::open(&p).unwrap();
        log.record(Event {
            user: "alice",
            source: "127.0.0.1:5".into(),
            op: "upload",
            path: Some("a \"b\"\n"),
            bytes: Some(3),
            result: "ok".into(),
            ..Default::default()
        });
        log.reopen().unwrap();
        log.record(Event {
            user: "bob",
            op: "login",
            result: "AuthFailed".into(),
            ..Default::default()
        });
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["path"], "a \"b\"\n");
        assert_eq!(lines[0]["bytes"], 3);
        assert_eq!(lines[1]["result"], "AuthFailed");
        assert!(lines[1]["time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn refused_huge_strings_are_cut_and_valid_paths_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let log = AuditLog::open(&p).unwrap();
        // The costliest valid path: 4096 bytes that each escape to two.
        let longest_valid = "\"".repeat(xfer_proto::limits::MAX_PATH_LEN);
        let refused = "\u{1}".repeat(65_000);
        log.record(Event {
            user: &refused,
            op: "rename",
            path: Some(&refused),
            to: Some(&longest_valid),
            result: "InvalidPath".into(),
            ..Default::default()
        });
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 1);
        // Was 3 x 390 KB: every string costs at most the cap, plus the marker.
        assert!(
            text.len() < 3 * MAX_AUDITED_STRING + 400,
            "{} bytes",
            text.len()
        );
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["to"], longest_valid.as_str());
        let path = line["path"].as_str().unwrap();
        assert!(path.ends_with("…(65000 bytes)"), "{path}");
        assert!(path.starts_with("\u{1}\u{1}"));
        assert_eq!(line["user"], line["path"]);
    }
}
