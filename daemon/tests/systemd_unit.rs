//! Checks `systemd/xferd.service` with systemd's own tools: it must verify cleanly with
//! ExecStart pointed at the built binary, and its exposure score must stay at 1.5 or lower.
//! Skipped, with a message, where systemd-analyze is not installed.

use std::process::Command;

fn unit_for_built_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = include_str!("../../systemd/xferd.service")
        .replace("/usr/bin/xferd", env!("CARGO_BIN_EXE_xferd"));
    let path = dir.join("xferd.service");
    std::fs::write(&path, unit).unwrap();
    path
}

fn analyze(args: &[&str]) -> Option<std::process::Output> {
    Command::new("systemd-analyze").args(args).output().ok()
}

#[test]
fn the_unit_verifies_and_its_exposure_is_at_most_1_5() {
    xfer_tests::require_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_built_binary(dir.path());
    let unit = unit.to_str().unwrap();

    let verify = analyze(&["verify", unit]).unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("xferd.service"),
        "systemd-analyze verify warned about the unit:\n{stderr}"
    );

    let security = analyze(&["security", "--offline=true", unit]).unwrap();
    let out = String::from_utf8_lossy(&security.stdout).into_owned()
        + &String::from_utf8_lossy(&security.stderr);
    let score: f64 = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for xferd.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{out}"));
    eprintln!("FIGURES systemd-analyze security: exposure {score}");
    assert!(score <= 1.5, "exposure {score} is above 1.5:\n{out}");
}
