//! `xferd user` for quotas and the reader role, through the real binary: `add --role reader`,
//! `role NAME reader`, `quota`, `usage [--json] [--rescan]`, and usage in `list`.

mod common;

use common::{setup, xferd};

#[test]
fn quotas_and_readers_are_managed_from_the_command_line() {
    let (dir, config) = setup(1);
    let out = xferd(
        &config,
        &[
            "user",
            "add",
            "carol",
            "--role",
            "reader",
            "--password-stdin",
        ],
        "carol-pw\n",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("added reader `carol`"),
        "{}",
        out.stdout
    );
    let out = xferd(&config, &["user", "role", "alice", "reader"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let users = std::fs::read_to_string(dir.path().join("users.toml")).unwrap();
    assert_eq!(users.matches("role = \"reader\"").count(), 2, "{users}");

    // Files alice already has are counted by one scan when her record is missing.
    let files = dir.path().join("storage/alice");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::fs::write(files.join("a"), vec![0; 1536]).unwrap();
    std::fs::write(files.join("sub/b"), vec![0; 512]).unwrap();
    let out = xferd(
        &config,
        &["user", "quota", "alice", "--bytes", "1MiB", "--files", "10"],
        "",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout.trim(),
        "`alice`: used 2 KiB of 1 MiB, 2 of 10 files"
    );
    let users = std::fs::read_to_string(dir.path().join("users.toml")).unwrap();
    assert!(users.contains("quota_bytes = 1048576"), "{users}");

    let out = xferd(&config, &["user", "usage", "alice", "--json"], "");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["used_bytes"], 2048);
    assert_eq!(v["used_files"], 2);
    assert_eq!(v["quota_bytes"], 1 << 20);
    assert_eq!(v["quota_files"], 10);

    // The record is what `usage` reads; `--rescan` counts again.
    std::fs::write(files.join("c"), b"xyz").unwrap();
    let out = xferd(&config, &["user", "usage", "alice"], "");
    assert!(out.stdout.contains("2 of 10 files"), "{}", out.stdout);
    let out = xferd(&config, &["user", "usage", "alice", "--rescan"], "");
    assert!(out.stdout.contains("3 of 10 files"), "{}", out.stdout);

    // `none` lifts a limit; `default` goes back to the config's.
    let out = xferd(
        &config,
        &[
            "user", "quota", "alice", "--bytes", "none", "--files", "default",
        ],
        "",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(users_text(&dir).contains("quota_bytes = \"none\""));
    assert!(!users_text(&dir).contains("quota_files ="));
    let out = xferd(&config, &["user", "list"], "");
    let alice = out.stdout.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(
        alice.contains("reader") && alice.contains("3 files"),
        "{alice}"
    );

    let bad = xferd(&config, &["user", "quota", "alice", "--bytes", "lots"], "");
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let unknown = xferd(&config, &["user", "usage", "nobody"], "");
    assert_ne!(unknown.code, 0);
    assert!(unknown.stderr.contains("nobody"), "{}", unknown.stderr);
}

fn users_text(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("users.toml")).unwrap()
}
