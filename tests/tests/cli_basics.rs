//! The binary's edges: `--version` and `--help` work, and without permission to load
//! eBPF the agent exits non-zero with a one-line reason instead of panicking.

use std::process::Command;

use anyhow::{Context, Result};
use connect_tests::{
    agent::{NO_WORKLOAD_API, agent_binary},
    lab::TestCgroup,
};

#[test]
fn version_and_help() -> Result<()> {
    let bin = agent_binary()?;
    let v = Command::new(&bin).arg("--version").output()?;
    assert!(v.status.success());
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("connect-agent "),
        "{v:?}"
    );
    let h = Command::new(&bin).arg("--help").output()?;
    assert!(h.status.success());
    let help = String::from_utf8_lossy(&h.stdout);
    for word in [
        "--cgroup",
        "--config-dir",
        "--data-dir",
        "--dev",
        "intention",
        "services",
        "ca",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
    Ok(())
}

#[test]
fn without_privileges_the_agent_says_why_in_one_line() -> Result<()> {
    connect_tests::lab::require_privileges()?;
    let cg = TestCgroup::create("unprivileged")?;
    let dir = tempfile_dir("unprivileged")?;
    // Drop to nobody with setpriv (util-linux): no CAP_BPF, no root.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_binary()?)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--http-addr", "127.0.0.1:0"])
        .args(NO_WORKLOAD_API)
        .output()
        .context("running setpriv")?;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !out.status.success(),
        "the agent must fail without privileges"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line, got:\n{stderr}");
    assert!(
        stderr.contains("root"),
        "the reason names what is missing: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

fn tempfile_dir(name: &str) -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("connect-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
