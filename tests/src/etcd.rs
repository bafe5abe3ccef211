//! Real etcd clusters for tests: one or more `etcd` processes (Debian's
//! `etcd-server`) on 127.0.0.1 with free ports and a temporary data directory.
//!
//! Members can be stopped (SIGKILL, like a crash) and started again on the same data
//! directory and ports. Every process is killed by its PID when the cluster is
//! dropped, including when a test fails; a test binary that is itself killed takes
//! its members along (`PR_SET_PDEATHSIG`).
//!
//! Not here: anything about Connect's use of etcd (that is `connect_agent::store::etcd`).

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use etcd_client::{Client, CompactionOptions, ConnectOptions, GetOptions};
use tokio::time::Instant;

/// How long a member may take to serve after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd cluster. Create and drop it on one thread (the test's), because
/// the members' death signal follows the thread that started them.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Kept last so it is removed after the processes are gone.
    dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until each serves linearizable reads.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(size > 0, "an etcd cluster needs at least one member");
        let binary = etcd_binary()?;
        // tmpfs when there is one: etcd fsyncs every write, which is slow on disk and
        // irrelevant to what the tests check.
        let mut builder = tempfile::Builder::new();
        builder.prefix("connect-etcd-");
        let dir = match Path::new("/dev/shm").is_dir() {
            true => builder.tempdir_in("/dev/shm"),
            false => builder.tempdir(),
        }
        .context("create a temporary directory for etcd")?;
        let ports = free_ports(2 * size)?;
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Self { members, dir };
        let token = format!(
            "connect-test-{}",
            cluster
                .dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let initial = cluster
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..size {
            cluster.spawn(&binary, i, Some((&initial, &token)))?;
        }
        // Members of a multi-member cluster only serve once a quorum has started, so
        // all are spawned before any is waited for.
        for i in 0..size {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// `127.0.0.1:port` of every member, as `--store etcd://` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// `127.0.0.1:port` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Kills member `i` with SIGKILL (a crash) and waits until it is gone.
    pub fn stop_member(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            child
                .kill()
                .with_context(|| format!("kill etcd member {} (pid {})", m.name, child.id()))?;
            child
                .wait()
                .with_context(|| format!("reap etcd member {}", m.name))?;
        }
        Ok(())
    }

    /// Starts member `i` again on its data directory and ports, and waits until it
    /// serves (which, in a multi-member cluster, needs a quorum of running members).
    pub async fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.members[i].child.is_none(),
            "etcd member {i} is still running"
        );
        let binary = etcd_binary()?;
        self.spawn(&binary, i, None)?;
        self.wait_ready(i).await
    }

    /// Kills every member with SIGKILL, each by its PID, and waits until all are gone:
    /// the whole cluster is down.
    pub fn stop_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.members.len() {
            self.stop_member(i)?;
        }
        Ok(())
    }

    /// Starts every stopped member again on its data directory and ports, and waits
    /// until each serves. All are spawned before any is waited for, since a member
    /// serves only once a quorum runs.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        let binary = etcd_binary()?;
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_none())
            .collect();
        for &i in &stopped {
            self.spawn(&binary, i, None)?;
        }
        for &i in &stopped {
            self.wait_ready(i).await?;
        }
        Ok(())
    }

    /// The PIDs of the running members.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// The index of the member that leads the cluster now, as a running member sees
    /// it; waits (bounded) while there is none, e.g. during an election.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let Ok(mut client) =
                    Client::connect([self.endpoint(i)], Some(client_options())).await
                else {
                    continue;
                };
                let status = tokio::time::timeout(Duration::from_secs(2), client.status()).await;
                if let Ok(Ok(status)) = status
                    && let Some(me) = status.header().map(|h| h.member_id())
                    && status.leader() == me
                {
                    return Ok(i);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no etcd member led the cluster within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of all members, for checks that go around the store under test.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(self.endpoints(), Some(client_options()))
            .await
            .context("connect an etcd client")
    }

    /// The cluster's current revision.
    pub async fn revision(&self) -> anyhow::Result<i64> {
        let resp = self
            .client()
            .await?
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .context("read etcd's revision")?;
        resp.header()
            .map(|h| h.revision())
            .context("etcd response without a header")
    }

    /// Discards the history before `revision`, as an operator's compaction does.
    pub async fn compact(&self, revision: i64) -> anyhow::Result<()> {
        self.client()
            .await?
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .with_context(|| format!("compact etcd at revision {revision}"))?;
        Ok(())
    }

    fn spawn(
        &mut self,
        binary: &Path,
        i: usize,
        bootstrap: Option<(&str, &str)>,
    ) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("open {}", m.log.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("open {}", m.log.display()))?;
        let client_url = format!("http://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            // Short raft timers: a stopped leader is replaced in about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // On a restart the member reads its cluster from its data directory.
        if let Some((initial, token)) = bootstrap {
            cmd.args(["--initial-cluster", initial])
                .args(["--initial-cluster-token", token])
                .args(["--initial-cluster-state", "new"]);
        }
        if let Some(arch) = unsupported_arch() {
            // etcd refuses to start on architectures it does not test unless told.
            cmd.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} for member {}", binary.display(), m.name))?;
        m.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let endpoint = self.endpoint(i);
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = Client::connect([endpoint.as_str()], Some(client_options()))
            .await
            .context("connect an etcd client")?;
        loop {
            let m = &mut self.members[i];
            if let Some(child) = m.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                m.child = None;
                bail!(
                    "etcd member {} exited with {status}; its log:\n{}",
                    m.name,
                    log_tail(&m.log)
                );
            }
            let mut kv = client.kv_client();
            let probe = tokio::time::timeout(Duration::from_secs(2), kv.get("health", None)).await;
            if let Ok(Ok(_)) = probe {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {} did not serve on {endpoint} within {READY_TIMEOUT:?}; its log:\n{}",
                    m.name,
                    log_tail(&m.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                // Kill by PID (Child::kill), then reap so no zombie is left.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A free TCP port on 127.0.0.1 where nothing listens (for "etcd is down" tests).
pub fn unused_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}

fn client_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_require_leader(true)
}

/// `n` distinct ports the kernel considers free now. All listeners are held until
/// every port is chosen so the same port is not handed out twice.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0 to find a free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .context("read a listener's port")
        })
        .collect()
}

fn etcd_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .context(
            "no `etcd` binary on PATH: install Debian's etcd-server package (apt-get install etcd-server)",
        )
}

/// etcd's name for this architecture if etcd 3.4 needs `ETCD_UNSUPPORTED_ARCH` on it.
fn unsupported_arch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" | "aarch64" => None,
        "powerpc64" => Some("ppc64le"),
        "x86" => Some("386"),
        other => Some(other),
    }
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes the prctl
    // syscall, which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read the log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
