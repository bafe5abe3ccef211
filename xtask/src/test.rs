//! `cargo xtask test`: every check a change must pass, in one command, with one summary.
//!
//! Steps run in order; a failed step does not stop the ones that do not depend on it,
//! so one run shows every problem. The privileged integration tests need root, cgroup
//! v2, BTF and network namespaces: without them they fail saying what is missing.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{bootstrap, ebpf, util};

/// Pinned so the compatibility test always talks to the same client.
const PY_CONSUL: &str = "py-consul==1.8.0";
/// Pinned TLS scanner for the security tests (an external check of our TLS).
const SSLYZE: &str = "sslyze==6.3.1";

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Only fmt, clippy and unit tests (a quick loop while developing; CI runs all).
    #[arg(long)]
    unit_only: bool,
    /// Extra arguments for the integration test binaries (e.g. a test name filter).
    #[arg(last = true)]
    filter: Vec<String>,
}

#[derive(Debug)]
struct Step {
    name: &'static str,
    ok: bool,
    elapsed: Duration,
    passed: u64,
    failed: u64,
    note: String,
}

pub fn run(args: TestArgs) -> Result<()> {
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();

    let tc = match timed("bootstrap", &mut steps, || {
        bootstrap::check_or_install(!args.unit_only)
    }) {
        Some(tc) => tc,
        None => return finish(&steps, started),
    };
    if timed("build eBPF object", &mut steps, || ebpf::build(&tc)).is_none() {
        return finish(&steps, started);
    }

    timed("fmt", &mut steps, || {
        util::cargo(&["fmt", "--all", "--check"])?;
        let mut cmd = ebpf::nightly_cargo(&tc);
        cmd.args(["fmt", "--check"])
            .current_dir(util::workspace_root().join("connect-ebpf"));
        util::run_status(&mut cmd)
    });
    timed("clippy", &mut steps, || {
        util::cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?;
        let mut cmd = ebpf::nightly_cargo(&tc);
        cmd.args(["clippy", "--release", "--", "-D", "warnings"])
            .current_dir(util::workspace_root().join("connect-ebpf"));
        util::run_status(&mut cmd)
    });
    cargo_tests(
        "unit tests",
        &mut steps,
        &[
            "test",
            "--workspace",
            "--exclude",
            "connect-tests",
            "--no-fail-fast",
        ],
        &[],
    );

    if !args.unit_only {
        timed("vagrant validate", &mut steps, || {
            let mut cmd = Command::new("vagrant");
            cmd.args(["validate", "--ignore-provider"])
                .current_dir(util::workspace_root().join("vagrant"))
                // Keep vagrant's state out of the user's home.
                .env(
                    "VAGRANT_HOME",
                    util::workspace_root().join("target/vagrant-home"),
                )
                .env("CONNECT_BOX", "connect/debian12");
            util::run_status(&mut cmd)
        });
        let built = timed("build agent binary", &mut steps, || {
            util::cargo(&["build", "-p", "connect-agent", "--bin", "connect-agent"])
        });
        let venv = timed("python venv (py-consul, sslyze)", &mut steps, python_venv);
        if built.is_some() && venv.is_some() {
            let mut extra: Vec<&str> = vec!["--"];
            extra.extend(args.filter.iter().map(String::as_str));
            cargo_tests(
                "integration tests (privileged)",
                &mut steps,
                &["test", "-p", "connect-tests", "--no-fail-fast"],
                &extra,
            );
        }
    }
    finish(&steps, started)
}

/// Runs one step, records its outcome, and returns its value if it succeeded.
fn timed<T>(name: &'static str, steps: &mut Vec<Step>, f: impl FnOnce() -> Result<T>) -> Option<T> {
    println!("\n==> {name}");
    let t = Instant::now();
    let r = f();
    let (ok, note) = match &r {
        Ok(_) => (true, String::new()),
        Err(e) => {
            eprintln!("xtask: {name} failed: {e:#}");
            (false, format!("{e:#}"))
        }
    };
    steps.push(Step {
        name,
        ok,
        elapsed: t.elapsed(),
        passed: 0,
        failed: 0,
        note,
    });
    r.ok()
}

/// Runs `cargo test`, streaming its output and counting passed and failed tests.
fn cargo_tests(name: &'static str, steps: &mut Vec<Step>, args: &[&str], extra: &[&str]) {
    println!("\n==> {name}");
    let t = Instant::now();
    let mut cmd = util::cargo_cmd();
    cmd.args(args).args(extra).stdout(Stdio::piped());
    let (mut passed, mut failed) = (0, 0);
    let result: Result<bool> = (|| {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run `{}`", util::describe(&cmd)))?;
        let stdout = child.stdout.take().context("child stdout")?;
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some((p, f)) = parse_result_line(&line) {
                passed += p;
                failed += f;
            }
        }
        Ok(child.wait().context("waiting for cargo test")?.success())
    })();
    let (ok, note) = match result {
        Ok(true) => (true, String::new()),
        Ok(false) => (false, "cargo test failed".to_owned()),
        Err(e) => (false, format!("{e:#}")),
    };
    steps.push(Step {
        name,
        ok,
        elapsed: t.elapsed(),
        passed,
        failed,
        note,
    });
}

/// `test result: ok. 19 passed; 0 failed; 0 ignored; ...` -> (19, 0).
fn parse_result_line(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(word).map(str::trim))
            .and_then(|n| n.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
    };
    Some((count("passed")?, count("failed")?))
}

/// A venv under target/ with the pinned py-consul (compatibility tests) and sslyze
/// (TLS scan of the agent's listeners).
fn python_venv() -> Result<()> {
    let venv = util::workspace_root().join("target/py-venv");
    let python = venv.join("bin/python3");
    let check = Command::new(&python)
        .args([
            "-c",
            "import consul, sslyze, importlib.metadata as m; \
             assert m.version('py-consul') == '1.8.0' and m.version('sslyze') == '6.3.1'",
        ])
        .output();
    if check.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    util::run_status(
        Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg("--clear")
            .arg(&venv),
    )?;
    util::run_status(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        PY_CONSUL,
        SSLYZE,
    ]))?;
    if !python.is_file() {
        bail!("{} missing after creating the venv", python.display());
    }
    Ok(())
}

fn finish(steps: &[Step], started: Instant) -> Result<()> {
    println!("\n==> summary");
    for s in steps {
        let counts = if s.passed + s.failed > 0 {
            format!(" ({} passed, {} failed)", s.passed, s.failed)
        } else {
            String::new()
        };
        println!(
            "  {:<4} {:<34} {:>7.1}s{}{}",
            if s.ok { "ok" } else { "FAIL" },
            s.name,
            s.elapsed.as_secs_f64(),
            counts,
            if s.note.is_empty() {
                String::new()
            } else {
                format!("  — {}", first_line(&s.note))
            }
        );
    }
    let passed: u64 = steps.iter().map(|s| s.passed).sum();
    let failed: u64 = steps.iter().map(|s| s.failed).sum();
    let failed_steps: Vec<&str> = steps.iter().filter(|s| !s.ok).map(|s| s.name).collect();
    println!("  total {:.1}s", started.elapsed().as_secs_f64());
    println!("summary: {passed} passed, {failed} failed");
    if !failed_steps.is_empty() {
        bail!("failed steps: {}", failed_steps.join(", "));
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::parse_result_line;

    #[test]
    fn parses_cargo_test_result_lines() {
        assert_eq!(
            parse_result_line(
                "test result: ok. 19 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((19, 0))
        );
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 17 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((17, 2))
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}
