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
    /// What was done: login, logout, list, upload, download, delete, rename, mkdir, shutdown.
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
    /// "ok", or the error code.
    pub result: String,
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

    /// Appends one event as one line (a single write, so lines never interleave).
    pub fn record(&self, mut event: Event<'_>) {
        event.time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
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
}
