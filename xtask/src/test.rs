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
/// Pinned SPIFFE client (py-spiffe) for the Workload API tests: a client we did not write.
const PY_SPIFFE: &str = "spiffe==0.3.2";

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Only fmt, clippy and unit tests (a quick loop while developing; CI runs all).
    #[arg(long)]
    unit_only: bool,
    /// How many test executables run at once (each runs its own tests in parallel
    /// threads too). Integration tests mostly wait on processes and timers, so three
    /// at once on two cores finish well before one after another.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
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
    timed("clippy (eBPF programs)", &mut steps, || {
        let mut cmd = ebpf::nightly_cargo(&tc);
        cmd.args(["clippy", "--release", "--", "-D", "warnings"])
            .current_dir(util::workspace_root().join("connect-ebpf"));
        util::run_status(&mut cmd)
    });
    // One compilation of the workspace serves clippy, the unit tests, the agent binary
    // and the integration tests: clippy-driver is rustc plus clippy's lints, so running
    // it as the workspace's compiler in `cargo test --no-run --all-targets` lints every
    // target while building it, with the workspace's features unified (connect-tests
    // turns on connect-agent's `testing`). Dependencies are built by plain rustc, and
    // cargo replays the lints of unchanged crates, so a warm run still reports them.
    let built = timed("build and lint all targets", &mut steps, || {
        build_test_executables(&["--workspace", "--all-targets"])
    });
    if let Some(built) = &built {
        // clippy's `-D warnings`, counted instead of failing the build, so the tests
        // still run and one run shows every problem.
        steps.push(Step {
            name: "clippy",
            ok: built.warnings == 0,
            elapsed: Duration::ZERO,
            passed: 0,
            failed: 0,
            note: if built.warnings == 0 {
                String::new()
            } else {
                format!("{} warnings (printed above)", built.warnings)
            },
        });
    }
    // `cargo test --all-targets` builds examples as test harnesses; the
    // integration tests run the real programs (`target/debug/examples/*`, e.g.
    // `spiffe_native` in workload_native.rs), so build those too. Same compiler
    // wrapper and features as above: only the examples themselves compile again.
    if built.is_some() {
        timed("build examples", &mut steps, || {
            let mut cmd = util::cargo_cmd();
            cmd.args(["build", "--workspace", "--examples"])
                .env("RUSTC_WORKSPACE_WRAPPER", clippy_driver()?);
            util::run_status(&mut cmd)
        });
    }
    let tests = built.map(|b| b.exes);
    if let Some(tests) = &tests {
        let (unit, integration): (Vec<_>, Vec<_>) = tests
            .iter()
            .cloned()
            .partition(|t| t.package != "connect-tests");
        run_test_executables("unit tests", &mut steps, &unit, &[], args.jobs);
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
            // The VM lab's test (tests/tests/vm_lab.rs) boots the cached box with
            // the release agent: both are made here, before the integration tests
            // run side by side, so that no test builds while others are timed.
            // If this fails, only that test fails (saying why); the others run.
            timed("VM lab box and release agent", &mut steps, || {
                crate::build()?;
                crate::vmlab::build_box()
            });
            // `target/debug/connect-agent`, which the integration tests start, came
            // out of the build above.
            let venv = timed(
                "python venv (py-consul, sslyze, py-spiffe)",
                &mut steps,
                python_venv,
            );
            if venv.is_some() {
                run_test_executables(
                    "integration tests (privileged)",
                    &mut steps,
                    &integration,
                    &args.filter,
                    args.jobs,
                );
            }
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

/// One test executable `cargo test --no-run` built.
#[derive(Debug, Clone)]
struct TestExe {
    package: String,
    /// `<package>::<target>` for the log.
    name: String,
    path: std::path::PathBuf,
}

/// What the lint-and-build step produced.
#[derive(Debug)]
struct Built {
    /// The test executables to run (benches and examples are built and linted,
    /// not run).
    exes: Vec<TestExe>,
    /// Warnings rustc and clippy reported on workspace crates.
    warnings: usize,
}

/// `cargo test --no-run ARGS` with clippy-driver compiling the workspace's crates;
/// prints every diagnostic and returns the executables built and the warning count.
fn build_test_executables(args: &[&str]) -> Result<Built> {
    let driver = clippy_driver()?;
    let mut cmd = util::cargo_cmd();
    cmd.args(["test", "--no-run", "--message-format=json"])
        .args(args)
        .env("RUSTC_WORKSPACE_WRAPPER", &driver)
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", util::describe(&cmd)))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut exes = Vec::new();
    let mut warnings = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            // Build scripts' and cargo's own non-JSON output.
            println!("{line}");
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-message") => {
                let level = msg["message"]["level"].as_str().unwrap_or("");
                if level == "warning" {
                    warnings += 1;
                }
                if let Some(text) = msg["message"]["rendered"].as_str() {
                    eprint!("{text}");
                }
            }
            Some("compiler-artifact") if msg["profile"]["test"] == true => {
                let not_run = msg["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bench" || k == "example"));
                let Some(path) = msg["executable"].as_str() else {
                    continue;
                };
                if not_run {
                    continue;
                }
                let package = package_name(msg["package_id"].as_str().unwrap_or(""));
                let target = msg["target"]["name"].as_str().unwrap_or("?");
                exes.push(TestExe {
                    name: format!("{package}::{target}"),
                    package,
                    path: std::path::PathBuf::from(path),
                });
            }
            _ => {}
        }
    }
    if !child.wait().context("waiting for cargo")?.success() {
        bail!("`{}` failed", util::describe(&cmd));
    }
    exes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Built { exes, warnings })
}

/// A package's name from cargo's package ID: `path+file:///…/connect-agent#0.1.0`
/// or `path+file:///…/tests#connect-tests@0.1.0`.
fn package_name(id: &str) -> String {
    let tail = id.rsplit('/').next().unwrap_or(id);
    match tail.split_once('#') {
        Some((dir, rest)) => match rest.split_once('@') {
            Some((name, _)) => name.to_owned(),
            None => dir.to_owned(),
        },
        None => tail.to_owned(),
    }
}

/// clippy-driver of the toolchain running this cargo (rustup's `clippy` component).
fn clippy_driver() -> Result<std::path::PathBuf> {
    if let Some(cargo) = std::env::var_os("CARGO") {
        let beside = std::path::Path::new(&cargo).with_file_name("clippy-driver");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    let which = util::output(Command::new("rustup").args(["which", "clippy-driver"]))
        .context("clippy-driver not found (install it with `rustup component add clippy`)")?;
    Ok(std::path::PathBuf::from(which.trim()))
}

/// Runs test executables, up to `jobs` at once, each with its output collected and
/// printed whole when it ends (so logs of parallel runs do not interleave), counting
/// passed and failed tests from their `test result:` lines.
fn run_test_executables(
    name: &'static str,
    steps: &mut Vec<Step>,
    exes: &[TestExe],
    extra: &[String],
    jobs: usize,
) {
    println!(
        "\n==> {name} ({} executables, {} at once)",
        exes.len(),
        jobs.max(1)
    );
    let t = Instant::now();
    let queue = std::sync::Mutex::new(exes.iter());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                    let Some(exe) = next else { break };
                    let r = run_one(exe, extra);
                    if let Ok(mut all) = results.lock() {
                        all.push(r);
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let (mut passed, mut failed) = (0, 0);
    let mut broken = Vec::new();
    for r in &results {
        passed += r.passed;
        failed += r.failed;
        if !r.ok {
            broken.push(r.name.clone());
        }
    }
    let ok = broken.is_empty() && results.len() == exes.len();
    steps.push(Step {
        name,
        ok,
        elapsed: t.elapsed(),
        passed,
        failed,
        note: if ok {
            String::new()
        } else {
            format!("failed: {}", broken.join(", "))
        },
    });
}

#[derive(Debug)]
struct ExeResult {
    name: String,
    ok: bool,
    passed: u64,
    failed: u64,
}

fn run_one(exe: &TestExe, extra: &[String]) -> ExeResult {
    let t = Instant::now();
    let mut cmd = Command::new(&exe.path);
    // What `cargo test` gives a test executable, which the tests rely on.
    let manifest = util::workspace_root().join(match exe.package.as_str() {
        "connect-tests" => "tests",
        other => other,
    });
    cmd.args(extra)
        .current_dir(&manifest)
        .env("CARGO_MANIFEST_DIR", &manifest)
        .stdin(Stdio::null());
    let out = cmd.output();
    let (ok, text) = match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), text)
        }
        Err(e) => (false, format!("cannot run {}: {e}", exe.path.display())),
    };
    let (mut passed, mut failed) = (0, 0);
    for line in text.lines() {
        if let Some((p, f)) = parse_result_line(line) {
            passed += p;
            failed += f;
        }
    }
    // One block per executable, written at once.
    println!(
        "\n--- {} ({:.1}s, {})\n{}",
        exe.name,
        t.elapsed().as_secs_f64(),
        if ok { "ok" } else { "FAILED" },
        text.trim_end()
    );
    ExeResult {
        name: exe.name.clone(),
        ok,
        passed,
        failed,
    }
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

/// A venv under target/ with the pinned py-consul (compatibility tests), sslyze
/// (TLS scan of the agent's listeners) and py-spiffe (Workload API tests).
fn python_venv() -> Result<()> {
    let venv = util::workspace_root().join("target/py-venv");
    let python = venv.join("bin/python3");
    let check = Command::new(&python)
        .args([
            "-c",
            "import consul, sslyze, spiffe, importlib.metadata as m; \
             assert m.version('py-consul') == '1.8.0' and m.version('sslyze') == '6.3.1' \
             and m.version('spiffe') == '0.3.2'",
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
        PY_SPIFFE,
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
    use super::{package_name, parse_result_line};

    #[test]
    fn names_packages_from_their_ids() {
        assert_eq!(
            package_name("path+file:///work/main/connect-agent#0.1.0"),
            "connect-agent"
        );
        assert_eq!(
            package_name("path+file:///work/main/tests#connect-tests@0.1.0"),
            "connect-tests"
        );
    }

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
