//! The one place a storage failure becomes a wire error: which [`ErrorCode`] the client gets
//! (and so which exit status `xfer` returns) and what it is told. Storage says what went
//! wrong in its own terms and knows nothing of the protocol; every backend's failures meet
//! the same codes here.

use std::io::ErrorKind;

use xfer_proto::ErrorCode;

use crate::storage::StorageError;

/// The wire code and client message for `e`. Internal I/O detail (a server path, an
/// `errno`) stays in the server log: the client learns only which operation on which of its
/// paths failed.
pub(crate) fn wire(e: &StorageError) -> (ErrorCode, String) {
    let code = match e {
        StorageError::BadPath { .. } => ErrorCode::InvalidPath,
        StorageError::Symlink(_) => ErrorCode::PermissionDenied,
        StorageError::NotFound(_) => ErrorCode::NotFound,
        StorageError::WrongKind(..) => ErrorCode::WrongKind,
        StorageError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        StorageError::NotEmpty(_) => ErrorCode::NotEmpty,
        StorageError::NoSpace => ErrorCode::NoSpace,
        StorageError::TooLarge(_) => ErrorCode::PermissionDenied,
        StorageError::TooDeep { .. } | StorageError::TooBigToCheck { .. } => ErrorCode::InvalidPath,
        StorageError::Io { source, .. } if source.kind() == ErrorKind::PermissionDenied => {
            ErrorCode::PermissionDenied
        }
        StorageError::Io { .. } => ErrorCode::Internal,
        StorageError::Corrupted(_) => ErrorCode::VerificationFailed,
        StorageError::Service { .. } => ErrorCode::Internal,
    };
    let message = match e {
        StorageError::Io { op, path, .. } => format!("{op} `{path}` failed on the server"),
        StorageError::Service { message, .. } => message.clone(),
        other => other.to_string(),
    };
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::{BACKENDS, fixture};
    use xfer_proto::limits::MAX_PATH_DEPTH;

    #[test]
    fn io_detail_stays_on_the_server() {
        let e = StorageError::io(
            "writing",
            "a/b",
            std::io::Error::other("/srv/xfer/alice/a/b: EIO"),
        );
        let (code, message) = wire(&e);
        assert_eq!(code, ErrorCode::Internal);
        assert_eq!(message, "writing `a/b` failed on the server");
        let denied = std::io::Error::from(ErrorKind::PermissionDenied);
        let (code, message) = wire(&StorageError::io("opening", "f", denied));
        assert_eq!(code, ErrorCode::PermissionDenied);
        assert!(!message.contains("denied"), "{message}");
    }

    #[test]
    fn io_errors_with_a_meaning_get_its_code() {
        for (kind, code) in [
            (ErrorKind::NotFound, ErrorCode::NotFound),
            (ErrorKind::AlreadyExists, ErrorCode::AlreadyExists),
            (ErrorKind::DirectoryNotEmpty, ErrorCode::NotEmpty),
            (ErrorKind::StorageFull, ErrorCode::NoSpace),
            (ErrorKind::QuotaExceeded, ErrorCode::NoSpace),
            (ErrorKind::IsADirectory, ErrorCode::WrongKind),
            (ErrorKind::NotADirectory, ErrorCode::WrongKind),
        ] {
            let e = StorageError::io("x", "p", std::io::Error::from(kind));
            assert_eq!(wire(&e).0, code, "{kind:?}");
        }
    }

    #[test]
    fn refusals_keep_what_the_user_can_act_on() {
        let (code, message) = wire(&StorageError::TooLarge(10));
        assert_eq!(code, ErrorCode::PermissionDenied);
        assert!(message.contains("10-byte upload limit"), "{message}");
        let (code, message) = wire(&StorageError::Symlink("l/x".into()));
        assert_eq!(code, ErrorCode::PermissionDenied);
        assert!(message.contains("`l/x`"), "{message}");
    }

    #[test]
    fn object_store_failures_tell_the_client_what_failed_not_why() {
        use crate::storage::object::ObjectError;
        let outage = object_store::Error::Generic {
            store: "S3",
            source: "connection refused to http://10.0.0.9:3900/bucket/alice/f".into(),
        };
        let e = StorageError::from(ObjectError::Store {
            op: "storing",
            path: "f".into(),
            source: outage,
        });
        let (code, message) = wire(&e);
        assert_eq!(code, ErrorCode::Internal);
        assert_eq!(message, "storing `f` failed on the server's storage");
        // The detail stays for the server log.
        assert!(e.to_string().contains("connection refused"), "{e}");
        // A body that does not match its digest is refused as on the local backend.
        let (code, message) = wire(&ObjectError::DigestMismatch("f".into()).into());
        assert_eq!(code, ErrorCode::VerificationFailed);
        assert_eq!(
            message,
            "`f` arrived corrupted (digest mismatch); nothing was saved"
        );
        let (code, message) = wire(&ObjectError::Tree(StorageError::NotEmpty("d".into())).into());
        assert_eq!(
            (code, message.as_str()),
            (ErrorCode::NotEmpty, "folder `d` is not empty")
        );
    }

    #[tokio::test]
    async fn refused_paths_are_invalid_paths_on_every_backend() {
        for &b in BACKENDS {
            let fx = fixture(b).await;
            let t = &fx.tree;
            for bad in ["..", "../x", "/etc/passwd", "a/../../x", "x\0y"] {
                let err = t.open_read(bad, true).await.unwrap_err();
                assert_eq!(wire(&err).0, ErrorCode::InvalidPath, "{b:?} {bad}");
            }
            // A rename that would build a path past the limits, as any backend refuses it.
            let mut deep = "deep".to_string();
            for i in 1..MAX_PATH_DEPTH - 4 {
                deep.push_str(&format!("/{i}"));
            }
            t.mkdir(&deep).await.unwrap();
            t.mkdir("b/1/2/3/4").await.unwrap();
            let err = t.rename("deep", "b/1/2/3/4", 1000).await.unwrap_err();
            let (code, message) = wire(&err);
            assert_eq!(code, ErrorCode::InvalidPath, "{b:?}: {err}");
            assert!(message.contains("64 levels"), "{message}");
        }
    }
}
