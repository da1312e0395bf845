//! Tests of the object backend that need no server: paths and keys, credentials, settings.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::config::{Config, StorageKind};
use xfer_proto::path::components;

const SECRET: &str = "s3cr3t-never-shown-0123456789";

fn settings() -> StorageSettings {
    StorageSettings {
        kind: StorageKind::S3,
        bucket: "b".into(),
        // Nothing listens there: these tests make no request.
        endpoint: "http://127.0.0.1:9".into(),
        allow_http: true,
        prefix: "p".into(),
        ..Default::default()
    }
}

fn store() -> ObjectStore {
    ObjectStore::open(&settings(), Credentials::new("GKid".into(), SECRET.into())).unwrap()
}

#[test]
fn paths_follow_the_local_rules_before_any_key_is_built() {
    let t = store().user_tree("alice");
    let r = t.resolve("a//b/", true).unwrap();
    assert_eq!(r.canonical, "a/b");
    assert_eq!(r.key_text, "p/alice/a/b");
    assert_eq!(r.dir_prefix(), "p/alice/a/b/");
    assert_eq!(t.resolve("", false).unwrap().key_text, "p/alice");
    for bad in [
        "..",
        "../x",
        "/etc/passwd",
        "a/../../x",
        "x\0y",
        "a\\b",
        ".",
        "a/./b",
    ] {
        assert!(
            matches!(
                t.resolve(bad, false),
                Err(ObjectError::Tree(StorageError::BadPath { .. }))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        t.resolve("", true),
        Err(ObjectError::Tree(StorageError::BadPath { .. }))
    ));
}

#[test]
fn no_user_path_can_name_a_folder_marker_or_internal_state() {
    // The marker has a backslash, which the path rules refuse.
    assert!(components(FOLDER_MARKER).is_err());
    assert!(components(&format!("d/{FOLDER_MARKER}")).is_err());
    let s = store();
    let rec = s.inner.internal_key("partial", "alice", "a/b", "");
    let hash = blake3::hash(b"a/b").to_hex();
    assert_eq!(rec.as_ref(), format!("p/.xfer/partial/alice/{hash}.json"));
    // User names never start with `.`, so `.xfer` is no user's tree.
    assert!(
        !s.user_tree("alice")
            .resolve("x", true)
            .unwrap()
            .key_text
            .contains(".xfer")
    );
}

#[test]
fn big_files_get_bigger_parts_to_stay_within_ten_thousand() {
    let u = UploadSettings {
        part_size: 8 << 20,
        parts_in_flight: 2,
        lease: Duration::from_secs(10),
    };
    assert_eq!(u.part_size_for(0), 8 << 20);
    assert_eq!(u.part_size_for(10_000 * (8 << 20)), 8 << 20);
    assert_eq!(u.part_size_for(10_000 * (8 << 20) + 1), 16 << 20);
    assert_eq!(u.part_size_for(5 << 40), 1 << 30);
}

#[test]
fn secrets_stay_out_of_debug_output_and_messages() {
    let s = store();
    assert!(!format!("{s:?}").contains(SECRET));
    let c = Credentials::new("GKid".into(), SECRET.into());
    assert!(!format!("{c:?}").contains(SECRET));
    assert!(format!("{c:?}").contains("GKid"));
    let e = ObjectError::Store {
        op: "reading",
        path: "f".into(),
        source: object_store::Error::Generic {
            store: "S3",
            source: "connection refused to http://127.0.0.1:9/b/p/alice/f".into(),
        },
    };
    assert_eq!(
        e.client_message(),
        "reading `f` failed on the server's storage"
    );
}

#[test]
fn a_credentials_file_must_be_private_and_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.toml");
    std::fs::write(
        &path,
        format!("access_key_id = \"GKid\"\nsecret_access_key = \"{SECRET}\"\n"),
    )
    .unwrap();
    let with_file = StorageSettings {
        credentials_file: Some(path.clone()),
        ..settings()
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Credentials::load(&with_file).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(err.contains("644"), "{err}");
    assert!(!err.contains(SECRET));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = Credentials::load(&with_file).unwrap();
    assert_eq!(c.access_key_id, "GKid");
    assert_eq!(c.secret_access_key, SECRET);
    // A malformed file: the message says what is expected and never quotes the file.
    std::fs::write(
        &path,
        format!("access_key_id = \"GKid\"\nsecret_access_key = {SECRET}\n"),
    )
    .unwrap();
    let err = Credentials::load(&with_file).unwrap_err().to_string();
    assert!(err.contains("secret_access_key = \"...\""), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
    let missing = StorageSettings {
        credentials_file: Some(dir.path().join("nope.toml")),
        ..settings()
    };
    assert!(matches!(
        Credentials::load(&missing),
        Err(CredentialsError::Read { .. })
    ));
}

#[test]
fn storage_config_is_checked_and_says_what_to_do() {
    let load = |text: &str| Config::from_str(std::path::Path::new("/etc/xferd/xferd.toml"), text);
    let c = load("").unwrap();
    assert_eq!(c.storage.kind, StorageKind::Local);
    assert_eq!(c.storage.part_size, 8 << 20);
    assert_eq!(c.storage.parts_in_flight, 2);
    for (text, key, hint) in [
        ("kind = \"s3\"", "storage.bucket", "name the bucket"),
        (
            "kind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:3900\"",
            "storage.endpoint",
            "allow_http = true",
        ),
        (
            "kind = \"s3\"\nbucket = \"b\"\nendpoint = \"s3.example.com\"",
            "storage.endpoint",
            "https://",
        ),
        (
            "kind = \"s3\"\nbucket = \"b\"\npart_size = 6291456",
            "storage.part_size",
            "power of two",
        ),
        (
            "kind = \"s3\"\nbucket = \"b\"\nparts_in_flight = 0",
            "storage.parts_in_flight",
            "greater than 0",
        ),
        (
            "kind = \"s3\"\nbucket = \"b\"\nprefix = \"/x\"",
            "storage.prefix",
            "`a/b`",
        ),
    ] {
        let err = load(&format!("[storage]\n{text}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(hint), "{text}: {err}");
    }
    let err = load("[storage]\nkind = \"gcs\"\n").unwrap_err().to_string();
    assert!(err.contains("gcs"), "{err}");
    let c = load(
        "[storage]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:3900\"\nallow_http = true\nregion = \"garage\"\ncredentials_file = \"s3.toml\"\n",
    )
    .unwrap();
    assert_eq!(
        c.storage.credentials_file.as_deref(),
        Some(std::path::Path::new("/etc/xferd/s3.toml"))
    );
}
