//! Reading a password without it ever being in argv: the first line of stdin when the user
//! asked for that (`--password-stdin`, for scripts), else a no-echo prompt on the terminal,
//! else a clear error rather than a prompt nobody can answer.

use std::io::{BufRead, IsTerminal};

/// Why no password was read. The texts are what both binaries print.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Not from stdin, and stdin is no terminal to prompt on (a usage error: exit 2 in `xfer`).
    #[error("no terminal to ask for the password on; pass --password-stdin and pipe it in")]
    NoTerminal,
    /// Reading stdin or the terminal failed.
    #[error("{context}")]
    Read {
        /// What was being read (`reading the password from standard input`, ...).
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Asked twice (`confirm`) and the two answers differ.
    #[error("the passwords do not match; nothing was changed")]
    Mismatch,
}

/// Reads a password: the first line of stdin with `from_stdin`, else a no-echo prompt on the
/// terminal showing `prompt` (asked a second time when `confirm`, which a new password wants).
pub fn read_password(
    from_stdin: bool,
    prompt: &str,
    confirm: bool,
) -> Result<String, PasswordError> {
    if from_stdin {
        return first_line(std::io::stdin().lock()).map_err(|source| PasswordError::Read {
            context: "reading the password from standard input",
            source,
        });
    }
    if !std::io::stdin().is_terminal() {
        return Err(PasswordError::NoTerminal);
    }
    let read = |prompt: &str| {
        rpassword::prompt_password(prompt).map_err(|source| PasswordError::Read {
            context: "reading the password",
            source,
        })
    };
    let pw = read(prompt)?;
    if confirm && read("Retype password: ")? != pw {
        return Err(PasswordError::Mismatch);
    }
    Ok(pw)
}

/// The first line of `input` without its line end (`\n` or `\r\n`); the whole input if it has
/// no line end, so a password piped with `printf %s` works.
pub fn first_line(mut input: impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    if let Some(l) = line.strip_suffix('\n') {
        let l = l.strip_suffix('\r').unwrap_or(l);
        line.truncate(l.len());
    }
    Ok(line)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn first_line_drops_the_line_end_and_keeps_everything_else() {
        let line = |s: &str| first_line(s.as_bytes()).unwrap();
        assert_eq!(line("hunter2\n"), "hunter2");
        assert_eq!(line("hunter2\r\n"), "hunter2");
        assert_eq!(line("hunter2"), "hunter2");
        assert_eq!(line(" spaced pass \nsecond line\n"), " spaced pass ");
        assert_eq!(
            line("ends in cr\r"),
            "ends in cr\r",
            "a lone CR is part of it"
        );
        assert_eq!(line("\n"), "");
        assert_eq!(line(""), "");
    }

    #[test]
    fn first_line_refuses_what_is_not_utf8() {
        let e = first_line(&b"\xff\xfe\n"[..]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_read_error_shows_its_context_and_keeps_the_cause() {
        let e = PasswordError::Read {
            context: "reading the password",
            source: std::io::Error::other("gone"),
        };
        assert_eq!(e.to_string(), "reading the password");
        assert_eq!(std::error::Error::source(&e).unwrap().to_string(), "gone");
    }
}
