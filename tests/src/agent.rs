//! A real `connect-agent` process for tests: started on free loopback ports and a
//! temporary data directory, waited for until its API answers, and stopped by PID
//! in `Drop` (SIGTERM, then SIGKILL) even when the test fails.
//!
//! Each agent serves the Workload API on a socket of its own in a temporary
//! directory ([`AgentProcess::workload_socket`]), never on the default
//! `/run/connect/workload.sock`, which the machine's own agent, or another test's,
//! may serve. Agents a test starts by hand pass [`NO_WORKLOAD_API`] or a path of
//! their own.

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The agent binary `cargo xtask test` builds before the integration tests
/// (`target/debug/connect-agent`, found next to this test executable's directory).
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CONNECT_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // target/debug/deps/<test>-<hash> -> target/debug/connect-agent
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("connect-agent"))
        .context("unexpected test executable location")?;
    if !bin.is_file() {
        bail!(
            "{} is missing: build it first (`cargo build -p connect-agent`, which `cargo xtask test` does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(l.local_addr()?.port())
}

/// `n` distinct loopback ports that were free a moment ago. The listeners are held
/// until all are chosen: one at a time, the kernel may hand out the same port twice
/// (an agent's HTTP and transparent listeners once collided that way).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port"))
        .collect::<Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// Flags for an agent a test starts by hand that must not serve the Workload API
/// on the default socket (it may be the machine's own agent's).
pub const NO_WORKLOAD_API: [&str; 2] = ["--workload-api-socket", "none"];

/// A running agent.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    pub http_addr: SocketAddr,
    /// Where the agent serves DNS (UDP and TCP).
    pub dns_addr: SocketAddr,
    /// Where the agent serves the Workload API: a socket in a temporary directory
    /// of its own unless the test's flags name one (`None`: `none`).
    pub workload_socket: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Where the agent's stderr goes, for failure messages.
    pub log_path: PathBuf,
    owns_data_dir: bool,
    /// The directory of `workload_socket` when the harness chose it.
    _socket_dir: Option<tempfile::TempDir>,
}

/// How [`AgentProcess::start_in_opts`] runs the agent, beyond its flags.
#[derive(Debug, Default, Clone, Copy)]
struct Launch<'a> {
    env: &'a [(&'a str, &'a str)],
    dns_addr: Option<SocketAddr>,
    soft_nofile: Option<u64>,
    run: Run,
}

/// The `/run` an agent sees.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// The machine's, and a `--workload-api-socket` in a directory of its own.
    #[default]
    Machine,
    /// A mount namespace of its own with an empty tmpfs on `/run`, and no
    /// `--workload-api-socket`: the default socket there is its alone.
    Own,
    /// The mount namespace of the agent with this PID (one started [`Run::Own`]),
    /// and no `--workload-api-socket`.
    Of(u32),
}

impl AgentProcess {
    /// Starts `connect-agent --dev` with free loopback ports, plus `extra` flags.
    pub fn start_dev(name: &str, extra: &[&str]) -> Result<Self> {
        Self::start_dev_env(name, extra, &[])
    }

    /// [`AgentProcess::start_dev`] with environment variables (e.g. `RUST_LOG`).
    pub fn start_dev_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_dev_dns(name, None, extra, env)
    }

    /// [`AgentProcess::start_dev_env`] with DNS on `dns_addr` (e.g. port 53 on a
    /// loopback address of the test's own) instead of a free port.
    pub fn start_dev_dns(
        name: &str,
        dns_addr: Option<SocketAddr>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_dev_launch(
            name,
            extra,
            Launch {
                env,
                dns_addr,
                ..Launch::default()
            },
        )
    }

    /// [`AgentProcess::start_dev`] with a soft limit of `soft_nofile` open files
    /// (the hard limit unchanged), as systemd and most shells give a daemon.
    pub fn start_dev_nofile(name: &str, extra: &[&str], soft_nofile: u64) -> Result<Self> {
        Self::start_dev_launch(
            name,
            extra,
            Launch {
                soft_nofile: Some(soft_nofile),
                ..Launch::default()
            },
        )
    }

    /// [`AgentProcess::start_dev`] without `--workload-api-socket`, in a mount
    /// namespace of its own whose `/run` is an empty tmpfs: the agent serves the
    /// default `/run/connect/workload.sock` there, and the machine's `/run` never
    /// sees it. The namespace, and the tmpfs with it, ends with the agent.
    /// [`AgentProcess::workload_socket`] reaches the socket from outside, through
    /// `/proc/<pid>/root`.
    pub fn start_dev_own_run(name: &str, extra: &[&str]) -> Result<Self> {
        Self::start_dev_launch(
            name,
            extra,
            Launch {
                run: Run::Own,
                ..Launch::default()
            },
        )
    }

    /// [`AgentProcess::start_dev`] without `--workload-api-socket`, in the mount
    /// namespace of `other` (started with [`AgentProcess::start_dev_own_run`]):
    /// a second agent on the same host, as far as `/run` goes.
    pub fn start_dev_in_run_of(name: &str, other: &Self, extra: &[&str]) -> Result<Self> {
        let pid = other.pid().context("the other agent is stopped")?;
        Self::start_dev_launch(
            name,
            extra,
            Launch {
                run: Run::Of(pid),
                ..Launch::default()
            },
        )
    }

    fn start_dev_launch(name: &str, extra: &[&str], launch: Launch<'_>) -> Result<Self> {
        let dir = private_dir(name)?;
        let mut p = match Self::start_in_opts(&dir, &["--dev"], extra, launch) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        p.owns_data_dir = true;
        Ok(p)
    }

    /// Starts the agent with `--data-dir dir`, `base` and `extra` flags, on free ports.
    /// The log goes to `agent.log` in `dir`, private (the agent refuses a data
    /// directory holding anything others can read).
    pub fn start_in(dir: &Path, base: &[&str], extra: &[&str]) -> Result<Self> {
        Self::start_in_env(dir, base, extra, &[])
    }

    fn start_in_env(
        dir: &Path,
        base: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_in_opts(
            dir,
            base,
            extra,
            Launch {
                env,
                ..Launch::default()
            },
        )
    }

    fn start_in_opts(
        dir: &Path,
        base: &[&str],
        extra: &[&str],
        launch: Launch<'_>,
    ) -> Result<Self> {
        let Launch {
            env,
            dns_addr,
            soft_nofile,
            run,
        } = launch;
        // The test's own --workload-api-socket, or one in a directory of this
        // agent's own (not in `dir`: the agent refuses a data directory holding a
        // file others may open, and a socket left by a killed agent is one).
        let given = base
            .iter()
            .chain(extra)
            .skip_while(|a| **a != "--workload-api-socket")
            .nth(1);
        let (mut workload_socket, socket_dir, socket_flag) = match given {
            Some(&"none") => (None, None, None),
            Some(p) => (Some(PathBuf::from(p)), None, None),
            None if run != Run::Machine => (None, None, None),
            None => {
                let d = private_tempdir("connect-wl-")?;
                let p = d.path().join("workload.sock");
                (Some(p.clone()), Some(d), Some(p))
            }
        };
        let [http, dns, outbound, inbound] = free_ports::<4>()?;
        let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse()?;
        let dns_addr = match dns_addr {
            Some(a) => a,
            None => format!("127.0.0.1:{dns}").parse()?,
        };
        let outbound = format!("127.0.0.1:{outbound}");
        let inbound = format!("127.0.0.1:{inbound}");
        let log_path = dir.join("agent.log");
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        // util-linux's prlimit sets the limit and execs the agent (same PID);
        // unshare (without --fork) and sh exec it too.
        let mut cmd = match (soft_nofile, run) {
            (Some(n), _) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:"))
                    .arg("--")
                    .arg(agent_binary()?);
                c
            }
            (None, Run::Own) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                    .arg(r#"mount -t tmpfs -o mode=0755,size=1m connect-test-run /run && exec "$0" "$@""#)
                    .arg(agent_binary()?);
                c
            }
            (None, Run::Of(pid)) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--mount=/proc/{pid}/ns/mnt"))
                    .arg("--")
                    .arg(agent_binary()?);
                c
            }
            (None, Run::Machine) => Command::new(agent_binary()?),
        };
        if let Some(p) = &socket_flag {
            cmd.arg("--workload-api-socket").arg(p);
        }
        cmd.args(base)
            .arg("--data-dir")
            .arg(dir)
            .args(["--http-addr", &http_addr.to_string()])
            .args([
                "--dns-addr",
                &dns_addr.to_string(),
                "--outbound-addr",
                &outbound,
                "--inbound-addr",
                &inbound,
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().context("starting connect-agent")?;
        if run != Run::Machine {
            workload_socket =
                Some(Path::new(&format!("/proc/{}/root", child.id())).join(
                    connect_agent::config::DEFAULT_WORKLOAD_API_SOCKET.trim_start_matches('/'),
                ));
        }
        let mut p = Self {
            child: Some(child),
            http_addr,
            dns_addr,
            workload_socket,
            data_dir: dir.to_owned(),
            log_path,
            owns_data_dir: false,
            _socket_dir: socket_dir,
        };
        p.wait_ready(Duration::from_secs(20))?;
        Ok(p)
    }

    /// Waits until `GET /v1/agent/connect/ca/roots` (which needs no ACL token)
    /// answers 200, or fails with the agent's log.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("connect-agent exited early with {status}:\n{}", self.log());
            }
            if http(self.http_addr, "GET", "/v1/agent/connect/ca/roots", None)
                .is_ok_and(|(s, _)| s == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "connect-agent did not answer on {} within {timeout:?}:\n{}",
                    self.http_addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `sig` and waits (bounded) for the process to exit.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, sig).context("signalling the agent")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("connect-agent did not exit within {timeout:?} after {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How long a dropped agent may take to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Drop for AgentProcess {
    /// Stops the agent by its PID: SIGTERM first, so that it stops cleanly and
    /// removes its `--dev` directory, SIGKILL if it is still there after
    /// [`STOP_GRACE`]. Its eBPF programs stay pinned, as they do for users: the
    /// test's [`crate::lab::TestCgroup`] removes them when it drops.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let graceful = i32::try_from(child.id()).is_ok_and(|pid| {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                )
                .is_ok()
            });
            let deadline = Instant::now() + STOP_GRACE;
            while graceful && Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.owns_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// A temporary directory `<prefix>…`, mode 0700 (what the agent demands of its
/// data directory and its key files' directory), removed when dropped.
pub fn private_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary directory")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .context("chmod 700 the temporary directory")?;
    Ok(dir)
}

/// A directory under the system temp dir, named after the test, mode 0700 (what
/// the agent demands of its data directory).
pub fn private_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("connect-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 700 {}", dir.display()))?;
    Ok(dir)
}

/// A minimal HTTP/1.1 request (Connection: close): status and body. Enough for tests
/// to talk to the agent without another HTTP client.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    http_with_token(addr, method, path, body, None)
}

/// [`http`] with an ACL token in `X-Consul-Token`.
pub fn http_with_token(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<(u16, String)> {
    xtask::http1(
        addr,
        &xtask::Request {
            method,
            path,
            body: body.unwrap_or(""),
            token,
            timeout: Duration::from_secs(30),
        },
    )
}
