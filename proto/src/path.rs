//! The syntax of remote paths: the one check both sides apply before a path touches a filesystem.
//!
//! A remote path is relative to the user's root, uses `/` as separator, and may only contain
//! normal names: no `..`, no `.`, no absolute paths, no NUL or other control characters, no
//! backslashes (so a path means the same on every platform), and bounded lengths. The server
//! then resolves the checked components beneath the user's root without following symlinks.

use crate::limits::{MAX_NAME_LEN, MAX_PATH_DEPTH, MAX_PATH_LEN};

/// Why a remote path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The path is longer than the protocol allows.
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// The path has more components than the protocol allows.
    #[error("path is deeper than {MAX_PATH_DEPTH} folders")]
    TooDeep,
    /// One component is longer than a file name may be.
    #[error("a name in the path is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    /// The path starts at the filesystem root.
    #[error("absolute paths are not allowed; paths are relative to your storage root")]
    Absolute,
    /// The path has a `..` component.
    #[error("`..` is not allowed in paths")]
    ParentDir,
    /// The path has a `.` component.
    #[error("`.` is not allowed as a name")]
    CurrentDir,
    /// A control character, NUL or backslash.
    #[error("path contains a forbidden character ({0:?})")]
    ForbiddenChar(char),
    /// The path names nothing where a name is required.
    #[error("empty path: name a file or folder inside your storage root")]
    Empty,
}

/// Splits a remote path into its checked components. Empty components from repeated or
/// trailing slashes are dropped (`a//b/` is `a/b`); the empty path is the root (no components).
pub fn components(path: &str) -> Result<Vec<&str>, PathError> {
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if let Some(c) = path.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(PathError::ForbiddenChar(c));
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" => continue,
            "." => return Err(PathError::CurrentDir),
            ".." => return Err(PathError::ParentDir),
            name if name.len() > MAX_NAME_LEN => return Err(PathError::NameTooLong),
            name => out.push(name),
        }
    }
    if out.len() > MAX_PATH_DEPTH {
        return Err(PathError::TooDeep);
    }
    Ok(out)
}

/// Like [`components`] but refuses the root: for operations that need a name.
pub fn named_components(path: &str) -> Result<Vec<&str>, PathError> {
    let parts = components(path)?;
    if parts.is_empty() {
        return Err(PathError::Empty);
    }
    Ok(parts)
}

/// Checks a single file name (for example the base name of an upload).
pub fn check_name(name: &str) -> Result<(), PathError> {
    // `a/` would pass as the one component `a`: a name is that component exactly.
    if name.contains('/') {
        return Err(PathError::ForbiddenChar('/'));
    }
    let parts = named_components(name)?;
    if parts.len() != 1 {
        return Err(PathError::ForbiddenChar('/'));
    }
    Ok(())
}

/// Joins a remote folder and a name with `/`.
pub fn join(dir: &str, name: &str) -> String {
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_split() {
        assert_eq!(components("").unwrap(), Vec::<&str>::new());
        assert_eq!(components("a").unwrap(), vec!["a"]);
        assert_eq!(components("a//b/").unwrap(), vec!["a", "b"]);
        assert_eq!(
            components("dossier été/naïve file.txt").unwrap(),
            vec!["dossier été", "naïve file.txt"]
        );
        assert_eq!(components("..foo/...").unwrap(), vec!["..foo", "..."]);
        assert_eq!(components("%2e%2e%2f").unwrap(), vec!["%2e%2e%2f"]);
    }

    #[test]
    fn traversal_corpus_is_refused() {
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "/etc/passwd",
            "x\0y",
            "..\\x",
            "a\\b",
            ".",
            "./a",
            "a/./b",
            "a\nb",
            "\u{7f}",
        ] {
            assert!(components(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(named_components("").unwrap_err(), PathError::Empty);
    }

    #[test]
    fn lengths_are_capped() {
        assert_eq!(
            components(&"a".repeat(256)).unwrap_err(),
            PathError::NameTooLong
        );
        assert!(components(&"a".repeat(255)).is_ok());
        assert_eq!(
            components(&"a/".repeat(65)).unwrap_err(),
            PathError::TooDeep
        );
        assert_eq!(
            components(&"a".repeat(MAX_PATH_LEN + 1)).unwrap_err(),
            PathError::TooLong
        );
    }

    #[test]
    fn a_name_is_one_component_exactly() {
        assert!(check_name("trail").is_ok());
        for bad in ["trail/", "/trail", "a/b", "", "..", "."] {
            assert!(check_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn join_handles_root_and_slashes() {
        assert_eq!(join("", "f"), "f");
        assert_eq!(join("d/", "f"), "d/f");
        assert_eq!(join("d", "f"), "d/f");
    }
}
