//! Privileged test fixtures: a cgroup of the test's own under the cgroup2 mount, and
//! processes started inside it. Each is removed in `Drop`, also when the test fails.
//!
//! Tests that need root, cgroup v2 or BTF call [`require_privileges`] first and fail
//! with a message naming what is missing; they never pass by skipping.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Fails unless the test runs as root on a kernel with cgroup v2 and BTF.
pub fn require_privileges() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this test needs root (eBPF, cgroups): run `sudo cargo xtask test`");
    }
    cgroup2_mount()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this test needs a kernel with BTF (/sys/kernel/btf/vmlinux is missing)");
    }
    Ok(())
}

pub use xtask::cgroup2_mount;

/// A cgroup directory made for one test, removed (after its processes) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    pub path: PathBuf,
    children: Vec<TestCgroup>,
}

impl TestCgroup {
    /// `<cgroup2>/connect-test-<name>-<pid>`.
    pub fn create(name: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(format!("connect-test-{name}-{}", std::process::id()));
        if path.exists() {
            // Left by an earlier run of this very process id: remove it first.
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self {
            path,
            children: Vec::new(),
        })
    }

    /// A child cgroup (e.g. one per service), removed before this one.
    pub fn child(&mut self, name: &str) -> Result<&Path> {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        self.children.push(Self {
            path,
            children: Vec::new(),
        });
        Ok(&self.children[self.children.len() - 1].path)
    }

    /// The cgroup v2 id (the inode number of the directory), as eBPF reports it.
    pub fn id(&self) -> Result<u64> {
        cgroup_id(&self.path)
    }
}

/// The cgroup v2 id of a cgroup directory.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.children.clear();
        // Programs an agent (or a test's Redirector) attached here are pinned and
        // outlive it by design: remove the pins, or they outlive the test.
        let _ = connect_agent::redirect::Redirector::detach(&self.path);
        // Processes the test started are gone by now (Proc guards drop first); a
        // cgroup with processes left cannot be removed, so retry briefly.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A process started inside a cgroup, killed by its PID on drop.
#[derive(Debug)]
pub struct CgroupProc {
    child: Option<Child>,
}

impl CgroupProc {
    /// Runs `program args` inside `cgroup`: a shell moves itself into the cgroup and
    /// execs the program, so it starts there from its first instruction (and keeps the
    /// shell's PID). stdout and stderr are piped for [`CgroupProc::output`].
    pub fn spawn(cgroup: &Path, program: &str, args: &[&str]) -> Result<Self> {
        let child = xtask::command_in(Some(cgroup), None, program, args)
            .spawn()
            .with_context(|| format!("starting {program} in {}", cgroup.display()))?;
        Ok(Self { child: Some(child) })
    }

    /// Waits (bounded) for the process to end and returns its exit code and output.
    pub fn output(mut self, timeout: Duration) -> Result<(i32, String, String)> {
        let mut child = self.child.take().context("already collected")?;
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait()?.is_some() {
                let out = child.wait_with_output()?;
                return Ok((
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("process did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for CgroupProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Names of eBPF programs attached to a cgroup, from `bpftool cgroup show` (the
/// kernel's view, independent of our loader).
pub fn attached_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("running bpftool (install the bpftool package)")?;
    if !out.status.success() {
        bail!(
            "bpftool cgroup show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("bpftool JSON")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Accepts one connection on `l` within `timeout`: what a test's stand-in for the
/// outbound listener gets when eBPF redirects a client. The peer is IPv4 (the
/// listener is, and redirected IPv6 sockets arrive v4-mapped).
pub fn accept_redirected(
    l: &std::net::TcpListener,
    timeout: Duration,
) -> Result<(std::net::TcpStream, std::net::SocketAddrV4)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, std::net::SocketAddr::V4(peer))) => {
                s.set_nonblocking(false)?;
                return Ok((s, peer));
            }
            Ok((_, peer)) => bail!("IPv6 peer {peer} on an IPv4 listener"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no redirected connection arrived within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Polls `f` until it returns true or the deadline passes.
pub fn assert_eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace made for one test, deleted on drop. Processes run in it with
/// `nsenter --net=` (not `ip netns exec`, which remounts /sys and hides cgroup2).
#[derive(Debug)]
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// `ctest-<name>-<pid>` (short: interface and namespace names are bounded).
    pub fn create(name: &str) -> Result<Self> {
        let name = format!("ct-{name}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `program args` in this namespace and, if given, inside `cgroup`.
    pub fn spawn(&self, cgroup: Option<&Path>, program: &str, args: &[&str]) -> Result<CgroupProc> {
        let child = xtask::command_in(cgroup, Some(&self.name), program, args)
            .spawn()
            .with_context(|| format!("starting {program} in {}", self.name))?;
        Ok(CgroupProc { child: Some(child) })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Joins two namespaces with a veth pair; addresses in CIDR form from 198.18.0.0/15.
/// Returns the interface names (a's, b's), unique within the test process.
pub fn veth(a: &TestNetns, a_addr: &str, b: &TestNetns, b_addr: &str) -> Result<(String, String)> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let (ai, bi) = (format!("va{pid}x{n}"), format!("vb{pid}x{n}"));
    run(Command::new("ip").args([
        "link", "add", &ai, "netns", &a.name, "type", "veth", "peer", "name", &bi, "netns", &b.name,
    ]))?;
    a.ip(&["addr", "add", a_addr, "dev", &ai])?;
    b.ip(&["addr", "add", b_addr, "dev", &bi])?;
    a.ip(&["link", "set", &ai, "up"])?;
    b.ip(&["link", "set", &bi, "up"])?;
    Ok((ai, bi))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
