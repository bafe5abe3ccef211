//! Compatibility with a Consul client we did not write: py-consul 1.8.0 (installed by
//! `cargo xtask test` into target/py-venv) drives a real agent through registration,
//! CA roots and leaves, intentions and authorize. The checks live in tests/py/compat.py.

use std::process::Command;

use anyhow::{Context, Result, bail};
use connect_tests::agent::AgentProcess;

#[test]
fn py_consul_drives_the_agent() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("../target/py-venv/bin/python3");
    if !python.is_file() {
        bail!(
            "{} is missing: `cargo xtask test` creates the venv with py-consul 1.8.0",
            python.display()
        );
    }
    let agent = AgentProcess::start_dev("py-consul", &[])?;
    let out = Command::new(&python)
        .arg(root.join("py/compat.py"))
        .arg(agent.http_addr.ip().to_string())
        .arg(agent.http_addr.port().to_string())
        .output()
        .context("running compat.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        bail!(
            "py-consul compatibility failed:\n{}\n--- agent log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
    }
    assert!(stdout.contains("all py-consul checks passed"));
    Ok(())
}
