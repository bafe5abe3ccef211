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
    /// Client TLS (`start_tls`): members serve https only and require a client
    /// certificate signed by the test's CA.
    tls: Option<TlsFiles>,
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

/// Certificates made for one TLS cluster (PEM files in the cluster's directory):
/// a CA, the members' server certificate (for 127.0.0.1 and localhost) and a
/// client certificate, both signed by the CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes the certificates under `dir`, the server's for 127.0.0.1 and
    /// localhost; keys are mode 600.
    pub fn make(dir: &Path) -> anyhow::Result<Self> {
        Self::make_for(dir, &[])
    }

    /// [`TlsFiles::make`] with the server certificate also valid for `ips`
    /// (a member other hosts reach at its own address).
    pub fn make_for(dir: &Path, ips: &[&str]) -> anyhow::Result<Self> {
        use xtask::pki::{TestCa, Usage, write};
        let ca = TestCa::new("connect-test etcd CA")?;
        let mut names = vec!["127.0.0.1", "localhost"];
        names.extend_from_slice(ips);
        let (server_pem, server_key_pem) = ca.issue("etcd", &names, Usage::ServerAndClient)?;
        let (client_pem, client_key_pem) = ca.issue("connect-agent", &[], Usage::Client)?;
        let files = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        write(&files.ca, ca.pem(), 0o644)?;
        write(&files.server_cert, &server_pem, 0o644)?;
        write(&files.server_key, &server_key_pem, 0o600)?;
        write(&files.client_cert, &client_pem, 0o644)?;
        write(&files.client_key, &client_key_pem, 0o600)?;
        Ok(files)
    }

    /// The agent's flags for TLS to etcd with the client certificate.
    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            "--etcd-ca-file".into(),
            self.ca.display().to_string(),
            "--etcd-cert-file".into(),
            self.client_cert.display().to_string(),
            "--etcd-key-file".into(),
            self.client_key.display().to_string(),
        ]
    }
}

impl EtcdCluster {
    /// Starts `size` members and waits until each serves linearizable reads.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, false).await
    }

    /// [`EtcdCluster::start`] with client TLS: members serve https only
    /// (`--cert-file`, `--key-file`, `--trusted-ca-file`) and refuse clients
    /// without a certificate of the test's CA (`--client-cert-auth`).
    pub async fn start_tls(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, true).await
    }

    /// The certificates of a [`EtcdCluster::start_tls`] cluster.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    async fn start_with(size: usize, tls: bool) -> anyhow::Result<Self> {
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
        let tls = if tls {
            Some(TlsFiles::make(dir.path()).context("make the test CA and certificates for etcd")?)
        } else {
            None
        };
        let mut cluster = Self { members, tls, dir };
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
                    Client::connect([self.url(i)], Some(self.client_options()?)).await
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
        let urls: Vec<String> = (0..self.members.len()).map(|i| self.url(i)).collect();
        Client::connect(urls, Some(self.client_options()?))
            .await
            .context("connect an etcd client")
    }

    /// Runs `etcdctl` (v3 API) against every member, as `user` (`name:password`)
    /// or without credentials; fails with etcdctl's output unless it succeeds.
    pub fn etcdctl(&self, user: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
        let out = self.etcdctl_output(user, args)?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`EtcdCluster::etcdctl`] that returns the output whatever the exit status.
    pub fn etcdctl_output(
        &self,
        user: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let mut cmd = Command::new("etcdctl");
        let urls: Vec<String> = (0..self.members.len()).map(|i| self.url(i)).collect();
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(urls.join(","))
            .args(["--dial-timeout", "3s", "--command-timeout", "5s"]);
        if let Some(user) = user {
            cmd.arg("--user").arg(user);
        }
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .context("run etcdctl (Debian's etcd-client package)")
    }

    /// Turns on etcd's authentication with the roles the README describes for
    /// Connect under `root` (e.g. `/connect/`): `connect-server` may read and write
    /// everything under it; `connect-client` everything but `<root>secrets/` (not
    /// even readable: the CA's private keys) and, read-only, `<root>ca/` (the
    /// public CA records) and `<root>acl/` (tokens and policies). Creates the
    /// `root` user and one user per `(name, password, role)`. These are exactly the
    /// README's etcdctl steps.
    pub fn enable_connect_auth(
        &self,
        root: &str,
        root_password: &str,
        users: &[(&str, &str, &str)],
    ) -> anyhow::Result<()> {
        for args in connect_auth_steps(root) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.etcdctl(None, &args)?;
        }
        self.etcdctl(
            None,
            &[
                "user",
                "add",
                &format!("root:{root_password}"),
                "--interactive=false",
            ],
        )?;
        self.etcdctl(None, &["user", "grant-role", "root", "root"])?;
        for (name, password, role) in users {
            self.etcdctl(
                None,
                &[
                    "user",
                    "add",
                    &format!("{name}:{password}"),
                    "--interactive=false",
                ],
            )?;
            self.etcdctl(None, &["user", "grant-role", name, role])?;
        }
        self.etcdctl(None, &["auth", "enable"])?;
        Ok(())
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("open {}", m.log.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("open {}", m.log.display()))?;
        let client_url = format!("{scheme}://127.0.0.1:{}", m.client_port);
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
        if let Some(t) = &tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
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
        let endpoint = self.url(i);
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = Client::connect([endpoint.as_str()], Some(self.client_options()?))
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

/// The etcdctl arguments that create the roles `connect-server` and
/// `connect-client` for keys under `root` (which ends in `/`). etcd permissions only
/// grant, so the client role is a list of ranges around the guarded prefixes.
pub fn connect_auth_steps(root: &str) -> Vec<Vec<String>> {
    // The first key after every key that starts with `p/`: `p0`.
    let end = |prefix: &str| format!("{}0", prefix.trim_end_matches('/'));
    let acl = format!("{root}acl/");
    let ca = format!("{root}ca/");
    let secrets = format!("{root}secrets/");
    let v = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        v(&["role", "add", "root"]),
        v(&["role", "add", "connect-server"]),
        v(&[
            "role",
            "grant-permission",
            "connect-server",
            "readwrite",
            "--prefix",
            root,
        ]),
        v(&["role", "add", "connect-client"]),
        v(&[
            "role",
            "grant-permission",
            "connect-client",
            "readwrite",
            root,
            &acl,
        ]),
        v(&[
            "role",
            "grant-permission",
            "connect-client",
            "read",
            "--prefix",
            &acl,
        ]),
        v(&[
            "role",
            "grant-permission",
            "connect-client",
            "readwrite",
            &end(&acl),
            &ca,
        ]),
        v(&[
            "role",
            "grant-permission",
            "connect-client",
            "read",
            "--prefix",
            &ca,
        ]),
        v(&[
            "role",
            "grant-permission",
            "connect-client",
            "readwrite",
            &end(&ca),
            &secrets,
        ]),
        v(&[
            "role",
            "grant-permission",
            "connect-client",
            "readwrite",
            &end(&secrets),
            &end(root),
        ]),
    ]
}

/// A free TCP port on 127.0.0.1 where nothing listens (for "etcd is down" tests).
pub fn unused_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}

impl EtcdCluster {
    /// Member `i`'s URL with its scheme.
    fn url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint(i))
    }

    fn client_options(&self) -> anyhow::Result<ConnectOptions> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_require_leader(true);
        if let Some(t) = &self.tls {
            let read = |p: &Path| fs::read(p).with_context(|| format!("read {}", p.display()));
            o = o.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&t.client_cert)?,
                        read(&t.client_key)?,
                    )),
            );
        }
        Ok(o)
    }
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
