//! The README's cluster section, run as written: its server block in one network
//! namespace (198.18.0.10), its client block in another (198.18.0.11), joined by a
//! veth. The only changes are directories: the test's own in place of
//! `/etc/connect`, `/var/lib` and `/var/log`. The server block makes etcd's
//! certificates, starts etcd (https, client certificates required), creates
//! Connect's etcd roles and users, starts a server agent and makes the client
//! node's token; the files it says to copy are copied; the client block starts a
//! client agent (no `--server-addr`: it finds the server in the catalog),
//! registers `web` and prints the SPIFFE ID of web's leaf, which the server signed.
//! Then the README's claim that the client's etcd user cannot read the keys.
//!
//! Each block runs in a PID namespace of its own (`unshare --pid --kill-child`), so
//! that ending the one process the test started ends every daemon the block put
//! in the background, and in a mount namespace of its own whose `/run` is an
//! empty tmpfs, as a host of its own has: its agent serves the Workload API on
//! the default `/run/connect/workload.sock` there, not on the machine's.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use connect_tests::{
    agent::{agent_binary, private_tempdir},
    lab::{TestNetns, require_privileges, veth},
};

/// How long a block may take (certificates, etcd's start, two agents).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// The `sh` block after `<!-- readme-cluster: NAME -->` in the README.
fn block(readme: &str, name: &str) -> Result<String> {
    let marker = format!("<!-- readme-cluster: {name} -->");
    let at = readme
        .find(&marker)
        .with_context(|| format!("the README has no {marker}"))?;
    let rest = &readme[at + marker.len()..];
    let start = rest
        .find("```sh\n")
        .with_context(|| format!("no sh block after {marker}"))?
        + "```sh\n".len();
    let len = rest[start..]
        .find("```")
        .with_context(|| format!("the block after {marker} does not end"))?;
    Ok(rest[start..start + len].to_owned())
}

/// The directories a block uses instead of the system's.
struct Host {
    etc: PathBuf,
    lib: PathBuf,
    log: PathBuf,
}

impl Host {
    fn new(root: &Path, name: &str) -> Result<Self> {
        let h = Self {
            etc: root.join(name).join("etc"),
            lib: root.join(name).join("lib"),
            log: root.join(name).join("log"),
        };
        for d in [&h.etc, &h.lib, &h.log] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(h)
    }

    fn localize(&self, script: &str) -> String {
        script
            .replace("/etc/connect", &self.etc.display().to_string())
            .replace("/var/lib", &self.lib.display().to_string())
            .replace("/var/log", &self.log.display().to_string())
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["connect-etcd.log", "connect-agent.log"] {
            if let Ok(text) = fs::read_to_string(self.log.join(name)) {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                out.push_str(&format!("--- {name} (last lines) ---\n"));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// A block running in `ns`, in a PID namespace of its own; killed on drop.
struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    done: PathBuf,
}

impl Running {
    fn start(ns: &TestNetns, script: &str, dir: &Path, name: &str) -> Result<Self> {
        let done = dir.join(format!("{name}.done"));
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let bin_dir = agent_binary()?
            .parent()
            .context("the agent binary's directory")?
            .to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // The host's own /run, then the block as pasted, then a marker, then a
        // process that keeps the PID namespace (and the daemons in it) alive
        // until the test ends it.
        let wrapped = format!(
            "set -euo pipefail\nmount -t tmpfs -o mode=0755,size=1m connect-readme-run /run\n{script}\ntouch '{}'\nexec sleep 600\n",
            done.display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(["unshare", "--pid", "--fork", "--kill-child", "--mount"])
            .args(["--propagation", "private", "bash", "-c"])
            .arg(wrapped)
            .env("PATH", path)
            .env_remove("CONNECT_HTTP_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout)?)
            .stderr(fs::File::create(&stderr)?)
            .spawn()
            .context("starting the block (ip netns exec, unshare, bash)")?;
        Ok(Self {
            child,
            stdout,
            stderr,
            done,
        })
    }

    /// Waits until the block ran to its end; fails with its output if it stopped.
    fn wait_done(&mut self, host: &Host) -> Result<String> {
        let deadline = Instant::now() + BLOCK_TIMEOUT;
        loop {
            if self.done.exists() {
                return Ok(fs::read_to_string(&self.stdout).unwrap_or_default());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the block stopped ({status}):\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
                    fs::read_to_string(&self.stdout).unwrap_or_default(),
                    fs::read_to_string(&self.stderr).unwrap_or_default(),
                    host.logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the block did not finish within {BLOCK_TIMEOUT:?}:\n--- stderr ---\n{}\n{}",
                    fs::read_to_string(&self.stderr).unwrap_or_default(),
                    host.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // unshare, by PID; --kill-child takes the namespace's init, and the
        // kernel every other process of the PID namespace, with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_readme_cluster_steps_work_as_written() -> Result<()> {
    require_privileges()?;
    for tool in ["etcd", "etcdctl", "openssl", "curl", "unshare"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} is needed (run `sudo cargo xtask bootstrap`)"
        );
    }
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .context("reading the README")?;
    let (server_block, client_block) = (block(&readme, "server")?, block(&readme, "client")?);

    let root = private_tempdir("connect-readme-cluster-")?;
    let (server, client) = (
        Host::new(root.path(), "server")?,
        Host::new(root.path(), "client")?,
    );
    let server_ns = TestNetns::create("rdm-s")?;
    let client_ns = TestNetns::create("rdm-c")?;
    veth(&server_ns, "198.18.0.10/24", &client_ns, "198.18.0.11/24")?;

    let started = Instant::now();
    let mut s = Running::start(
        &server_ns,
        &server.localize(&server_block),
        root.path(),
        "server",
    )?;
    s.wait_done(&server)?;
    let server_took = started.elapsed();

    // "Copy to /etc/connect on the client host".
    for f in [
        "etcd-ca.pem",
        "agent.pem",
        "agent.key",
        "etcd-user-connect-client-1",
        "agent-token-c1",
        "management-token",
    ] {
        fs::copy(server.etc.join(f), client.etc.join(f))
            .with_context(|| format!("copying {f} to the client host"))?;
    }

    let started = Instant::now();
    let mut c = Running::start(
        &client_ns,
        &client.localize(&client_block),
        root.path(),
        "client",
    )?;
    let out = c.wait_done(&client)?;
    let client_took = started.elapsed();
    let uri = out
        .lines()
        .find_map(|l| l.strip_prefix("\"ServiceURI\":\""))
        .map(|u| u.trim_end_matches('"').to_owned())
        .with_context(|| format!("the client block printed no ServiceURI:\n{out}"))?;
    ensure!(
        uri.starts_with("spiffe://") && uri.ends_with("/ns/default/dc/dc1/svc/web"),
        "web's leaf names {uri}"
    );
    let agent_log = fs::read_to_string(client.log.join("connect-agent.log")).unwrap_or_default();
    ensure!(
        agent_log.contains("server agents found in the catalog")
            && agent_log.contains("https://198.18.0.10:8501"),
        "the client found the server in the catalog:\n{}",
        client.logs()
    );

    // The README's last claim, with the server's user beside it (it reads them).
    let etcdctl = |user_file: &Path| -> Result<std::process::Output> {
        let user = fs::read_to_string(user_file)?.trim().to_owned();
        Command::new("ip")
            .args(["netns", "exec", &client_ns.name, "etcdctl"])
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", "https://198.18.0.10:2379", "--cacert"])
            .arg(client.etc.join("etcd-ca.pem"))
            .arg("--cert")
            .arg(client.etc.join("agent.pem"))
            .arg("--key")
            .arg(client.etc.join("agent.key"))
            .args([
                "--user",
                &user,
                "get",
                "--prefix",
                "--keys-only",
                "/connect/secrets/",
            ])
            .output()
            .context("etcdctl")
    };
    let denied = etcdctl(&client.etc.join("etcd-user-connect-client-1"))?;
    ensure!(
        !denied.status.success()
            && String::from_utf8_lossy(&denied.stderr).contains("permission denied"),
        "the client's etcd user: {denied:?}"
    );
    let keys = etcdctl(&server.etc.join("etcd-user-connect-server-1"))?;
    ensure!(
        keys.status.success()
            && String::from_utf8_lossy(&keys.stdout).contains("/connect/secrets/ca/keys/"),
        "the server's etcd user reads the CA keys: {keys:?}"
    );
    println!(
        "README cluster: server block {server_took:.1?}, client block {client_took:.1?}; web's leaf {uri}"
    );
    drop((c, s));
    Ok(())
}
