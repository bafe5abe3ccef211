//! Network-namespace nodes for the lab and the benchmarks, driven through `ip` and
//! `nsenter`, with every namespace, link and process removed in `Drop`.
//!
//! Addresses come from 198.18.0.0/15 (the benchmarking range) only. Processes are run
//! in a namespace with `nsenter --net=` rather than `ip netns exec`, because the latter
//! remounts /sys and hides the cgroup2 mount from the process (shared/TOOLCHAIN.md).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{describe, run_status};

/// A network namespace; deleted on drop if this handle created it.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    owned: bool,
}

impl Netns {
    /// Creates `name`, removing a stale namespace of the same name first (left by a
    /// run that was killed), and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        if Path::new("/var/run/netns").join(name).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        run_status(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to a namespace someone else owns (never deleted by this handle).
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// Keeps the namespace after this handle is dropped (the lab's `down` removes it).
    pub fn keep(mut self) -> Self {
        self.owned = false;
        self
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_status(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// A command that runs `program` inside the namespace *and* the cgroup `cgroup`:
    /// the shell moves itself into the cgroup, then execs nsenter, so the program starts
    /// there from its first instruction.
    pub fn command_in_cgroup(&self, cgroup: &Path, program: &str, args: &[String]) -> Command {
        let mut script = format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/var/run/netns/{} -- '{}'",
            cgroup.display(),
            self.name,
            program
        );
        for a in args {
            script.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Joins two namespaces with a veth pair and addresses them (`a_addr`/`b_addr` in CIDR
/// form, e.g. `198.18.1.1/30`). Deleting a namespace deletes its end of the pair.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    run_status(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]))?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Joins a namespace to a bridge in another namespace: `node_if` (addressed with
/// `node_addr`, CIDR) inside `node`, `bridge_port` enslaved to `bridge` inside `br`.
pub fn veth_to_bridge(
    node: &Netns,
    node_if: &str,
    node_addr: &str,
    br: &Netns,
    bridge_port: &str,
    bridge: &str,
) -> Result<()> {
    run_status(Command::new("ip").args([
        "link",
        "add",
        node_if,
        "netns",
        &node.name,
        "type",
        "veth",
        "peer",
        "name",
        bridge_port,
        "netns",
        &br.name,
    ]))?;
    node.ip(&["addr", "add", node_addr, "dev", node_if])?;
    node.ip(&["link", "set", node_if, "up"])?;
    br.ip(&["link", "set", bridge_port, "master", bridge])?;
    br.ip(&["link", "set", bridge_port, "up"])?;
    Ok(())
}

/// A child process killed (by its PID) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", describe(cmd)))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails if the process already exited (it should be serving).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until a TCP connect to `addr` from inside `ns` succeeds.
pub fn wait_port(ns: &Netns, addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let (host, port) = addr.rsplit_once(':').context("address without port")?;
    loop {
        let ok = ns
            .command("nc")
            .args(["-z", "-w", "1", host, port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} in {} after {timeout:?}", ns.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds (user + system) a process used so far, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .context("utime")?
        + f.get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .context("stime")?;
    Ok(ticks / clock_ticks())
}

/// Peak resident set size of a process in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in status")
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
