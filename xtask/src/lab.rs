//! `cargo xtask lab up|status|down|stop|start|exec`: a multi-node Connect lab on one
//! machine.
//!
//! Each node is a network namespace (`<lab>-n1`, …) with its own address in
//! 198.18.0.0/24, joined to the others by a bridge that lives in a namespace of its own
//! (`<lab>-br`; nothing touches the host's interfaces). Each node runs an etcd member
//! (the members form one cluster) and a Connect agent whose store is that cluster, and
//! its applications live in a cgroup of its own (`<cgroup2>/connect-<lab>/n1`, …).
//! Demo services: a socat echo server (`socat`) on the last node and a `web` client
//! cgroup on the first, with an intention `web => socat` (allow).
//!
//! Everything `up` makes is recorded in `target/lab/<lab>/state.json` as it is made,
//! so that `down` removes exactly that — processes by recorded PID (checked against
//! their start time, so a reused PID is never signalled), namespaces, cgroups and the
//! data directory — even after an `up` that failed halfway, and twice in a row.
//!
//! `--name` picks the lab (default `clab`), so a test can run a lab of its own next to
//! a user's.

mod down;
mod probe;
mod status;
pub(crate) mod tls;

pub use self::probe::{ProbeCommand, probe};
use self::{
    down::{down, leftover_namespaces},
    probe::{echo_in, http_in},
    status::status,
};

use std::{
    fs::OpenOptions,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    netns::{self, Netns},
    util,
};

const SUBNET_PREFIX: &str = "198.18.0";
const BRIDGE: &str = "br0";
const ECHO_PORT: u16 = 8181;
const ETCD_CLIENT: u16 = 2379;
const ETCD_PEER: u16 = 2380;
/// etcd's plain-HTTP `/health` and `/metrics`, on each node's loopback only (the
/// client and peer ports are https with certificate checks).
const ETCD_METRICS: u16 = 2381;
const INBOUND_PORT: u16 = 20000;
const HTTP: &str = "127.0.0.1:8500";
/// How long a process may take to serve after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct LabArgs {
    /// The lab's name: prefix of its namespaces, part of its cgroup, its directory
    /// under target/lab. Lowercase letters and digits, at most 12.
    #[arg(long, global = true, default_value = "clab", value_parser = parse_name)]
    name: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Start N nodes (default 3): namespaces, bridge, etcd members, agents, demo services.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        /// Use this connect-agent binary instead of building target/release/connect-agent.
        #[arg(long, value_name = "PATH")]
        agent_bin: Option<PathBuf>,
    },
    /// Show nodes (agent and etcd up or down), services, intentions.
    Status,
    /// Stop everything `up` started and remove its namespaces, cgroups and data.
    Down,
    /// Stop a node's agent and etcd member (SIGTERM by recorded PID); its data stays.
    Stop {
        /// The node (n1, n2, …).
        node: String,
    },
    /// Start whatever of a node's processes is not running (etcd, agent, demo service)
    /// on its existing data, and wait until it serves.
    Start {
        /// The node (n1, n2, …).
        node: String,
    },
    /// Run a command inside a node's namespace (and a service's cgroup with
    /// --service); the lab's connect-agent binary is first on PATH.
    Exec {
        /// The node (n1, n2, …).
        node: String,
        /// Run inside this service cgroup of the node (e.g. web), so the mesh applies.
        #[arg(long)]
        service: Option<String>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 12
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a lab name is 1-12 lowercase letters and digits, starting with a letter".into())
    }
}

/// What `up` made, so that `down` can undo exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LabState {
    name: String,
    /// The lab's directory: this file, logs, etcd and agent data.
    dir: PathBuf,
    agent_bin: PathBuf,
    /// `<cgroup2>/connect-<lab>`, the parent of every node's cgroup.
    cgroup_root: Option<PathBuf>,
    bridge_ns: Option<String>,
    namespaces: Vec<String>,
    nodes: Vec<NodeState>,
    procs: Vec<ProcRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeState {
    name: String,
    /// Its network namespace.
    ns: String,
    ip: String,
    /// The agent's --cgroup; services have cgroups below it.
    cgroup: PathBuf,
    /// Its veth's end on the bridge (in the bridge namespace): `ip link set … down`
    /// there cuts the node off.
    bridge_port: String,
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    Etcd,
    Agent,
    Socat,
}

/// A process the lab started: what it runs, so that `start` can run it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcRecord {
    node: String,
    role: Role,
    pid: u32,
    /// Start time in clock ticks after boot (/proc/PID/stat field 22): a PID is ours
    /// only while this matches.
    start_time: u64,
    argv: Vec<String>,
    log: PathBuf,
}

impl LabState {
    fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!(
                "no node {name} in lab {} (nodes: {})",
                self.name,
                names.join(" ")
            )
        })
    }

    fn proc(&self, node: &str, role: Role) -> Option<&ProcRecord> {
        self.procs.iter().find(|p| p.node == node && p.role == role)
    }
}

fn labs_dir() -> PathBuf {
    util::workspace_root().join("target/lab")
}

fn lab_dir(name: &str) -> PathBuf {
    labs_dir().join(name)
}

fn state_path(name: &str) -> PathBuf {
    lab_dir(name).join("state.json")
}

fn load_state(name: &str) -> Result<Option<LabState>> {
    let path = state_path(name);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_state(s: &LabState) -> Result<()> {
    std::fs::create_dir_all(&s.dir).with_context(|| format!("creating {}", s.dir.display()))?;
    let path = state_path(&s.name);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: LabArgs) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask lab needs root (namespaces, cgroups, eBPF): run it with sudo");
    }
    let name = args.name;
    match args.command {
        LabCommand::Up { nodes, agent_bin } => up(&name, nodes, agent_bin),
        LabCommand::Status => status(&name),
        LabCommand::Down => down(&name),
        LabCommand::Stop { node } => stop_node(&name, &node),
        LabCommand::Start { node } => start_node(&name, &node),
        LabCommand::Exec {
            node,
            service,
            command,
        } => exec(&name, &node, service.as_deref(), &command),
    }
}

// ---------------------------------------------------------------------------- up

fn up(name: &str, n: u8, agent_bin: Option<PathBuf>) -> Result<()> {
    if !(1..=20).contains(&n) {
        bail!("--nodes must be between 1 and 20");
    }
    if load_state(name)?.is_some() || !leftover_namespaces(name).is_empty() {
        bail!(
            "lab {name} is already up (or left over): run `cargo xtask lab{} down` first",
            name_flag(name)
        );
    }
    for tool in ["ip", "nsenter", "setsid", "etcd", "socat"] {
        ensure!(
            on_path(tool),
            "the lab needs `{tool}` on PATH: run `sudo cargo xtask bootstrap` (Debian packages iproute2, util-linux, etcd-server, socat)"
        );
    }
    let agent = match agent_bin {
        Some(p) => {
            ensure!(p.is_file(), "--agent-bin {} is not a file", p.display());
            std::fs::canonicalize(&p).with_context(|| format!("resolving {}", p.display()))?
        }
        None => {
            let tc = crate::bootstrap::run(true)?;
            crate::build_agent(&tc)?
        }
    };

    let dir = lab_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    let mut st = LabState {
        name: name.to_owned(),
        dir,
        agent_bin: agent,
        ..LabState::default()
    };
    save_state(&st)?;
    let started = Instant::now();
    let result = up_inner(n, &mut st);
    // Record whatever was made, even on failure, so `down` can clean it.
    save_state(&st)?;
    if let Err(e) = result {
        eprintln!(
            "xtask: lab up failed; `cargo xtask lab{} down` removes what it made",
            name_flag(name)
        );
        return Err(e);
    }
    let first = &st.nodes[0];
    let last = &st.nodes[st.nodes.len() - 1];
    println!(
        "lab {name} is up: {n} nodes in {:.1} s\n\n\
         cargo xtask lab{f} status                  nodes, services, intentions\n\
         cargo xtask lab{f} exec {} --service web -- socat - tcp:{}:{ECHO_PORT}\n\
         \x20                                          web on {} talks to socat on {} through both proxies\n\
         cargo xtask lab{f} exec {} -- connect-agent intention list\n\
         cargo xtask lab{f} down                    removes everything",
        started.elapsed().as_secs_f64(),
        first.name,
        last.ip,
        first.name,
        last.name,
        first.name,
        f = name_flag(name),
    );
    Ok(())
}

fn name_flag(name: &str) -> String {
    if name == "clab" {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

fn up_inner(n: u8, st: &mut LabState) -> Result<()> {
    let name = st.name.clone();
    let cg_root = util::cgroup2_mount()?.join(format!("connect-{name}"));
    if !cg_root.exists() {
        std::fs::create_dir(&cg_root)
            .with_context(|| format!("creating cgroup {}", cg_root.display()))?;
    }
    st.cgroup_root = Some(cg_root.clone());
    save_state(st)?;

    let br_name = format!("{name}-br");
    st.namespaces.push(br_name.clone());
    st.bridge_ns = Some(br_name.clone());
    save_state(st)?;
    let br = Netns::create(&br_name)?.keep();
    br.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    br.ip(&["link", "set", BRIDGE, "up"])?;

    for i in 1..=n {
        let node = NodeState {
            name: format!("n{i}"),
            ns: format!("{name}-n{i}"),
            ip: format!("{SUBNET_PREFIX}.{}", 10 + u16::from(i)),
            cgroup: cg_root.join(format!("n{i}")),
            bridge_port: format!("n{i}"),
            dir: st.dir.join(format!("n{i}")),
        };
        st.namespaces.push(node.ns.clone());
        st.nodes.push(node.clone());
        save_state(st)?;
        let ns = Netns::create(&node.ns)?.keep();
        netns::veth_to_bridge(
            &ns,
            "eth0",
            &format!("{}/24", node.ip),
            &br,
            &node.bridge_port,
            BRIDGE,
        )?;
        std::fs::create_dir_all(&node.cgroup)
            .with_context(|| format!("creating cgroup {}", node.cgroup.display()))?;
        for d in [node.dir.join("agent"), node.dir.join("config")] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let nodes = st.nodes.clone();
    println!(
        "xtask: lab {name}: {n} namespaces on bridge {BRIDGE} in {br_name}, cgroups under {}",
        cg_root.display()
    );

    // Demo service definitions, before the agents read them: socat on the last node,
    // web (a client) on the first.
    let first = &nodes[0];
    let last = &nodes[nodes.len() - 1];
    let socat_cg = last.cgroup.join("socat");
    std::fs::create_dir_all(&socat_cg)?;
    std::fs::write(
        last.dir.join("config/socat.json"),
        serde_json::to_vec_pretty(&serde_json::json!(
            {"service": {"name": "socat", "port": ECHO_PORT, "cgroup": "socat"}}
        ))?,
    )?;
    std::fs::create_dir_all(first.cgroup.join("web"))?;
    std::fs::write(
        first.dir.join("config/web.json"),
        serde_json::to_vec_pretty(&serde_json::json!(
            {"service": {"name": "web", "port": 0, "cgroup": "web"}}
        ))?,
    )?;

    // etcd over TLS, for clients and peers: certificates made for this lab.
    let names: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.ip.clone()))
        .collect();
    tls::make(&st.dir, &names)?;
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    let ca = path(tls::ca(&st.dir));
    let (agent_cert, agent_key) = tls::agent(&st.dir);
    let (agent_cert, agent_key) = (path(agent_cert), path(agent_key));

    // etcd: one member per node, all started before any is waited for (a member
    // serves only once a quorum runs).
    let initial: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}=https://{}:{ETCD_PEER}", n.name, n.ip))
        .collect();
    let initial = initial.join(",");
    for node in &nodes {
        let (cert, key) = tls::member(&st.dir, &node.name);
        let (cert, key) = (path(cert), path(key));
        let argv = [
            "nsenter".to_owned(),
            format!("--net=/var/run/netns/{}", node.ns),
            "--".to_owned(),
            "etcd".to_owned(),
            "--name".to_owned(),
            node.name.clone(),
            "--data-dir".to_owned(),
            node.dir.join("etcd").to_string_lossy().into_owned(),
            "--listen-client-urls".to_owned(),
            format!(
                "https://{}:{ETCD_CLIENT},https://127.0.0.1:{ETCD_CLIENT}",
                node.ip
            ),
            "--advertise-client-urls".to_owned(),
            format!("https://{}:{ETCD_CLIENT}", node.ip),
            "--listen-peer-urls".to_owned(),
            format!("https://{}:{ETCD_PEER}", node.ip),
            "--initial-advertise-peer-urls".to_owned(),
            format!("https://{}:{ETCD_PEER}", node.ip),
            "--listen-metrics-urls".to_owned(),
            format!("http://127.0.0.1:{ETCD_METRICS}"),
            "--cert-file".to_owned(),
            cert.clone(),
            "--key-file".to_owned(),
            key.clone(),
            "--trusted-ca-file".to_owned(),
            ca.clone(),
            "--client-cert-auth".to_owned(),
            "--peer-cert-file".to_owned(),
            cert,
            "--peer-key-file".to_owned(),
            key,
            "--peer-trusted-ca-file".to_owned(),
            ca.clone(),
            "--peer-client-cert-auth".to_owned(),
            "--initial-cluster".to_owned(),
            initial.clone(),
            "--initial-cluster-state".to_owned(),
            "new".to_owned(),
            "--initial-cluster-token".to_owned(),
            format!("connect-lab-{name}"),
            // A member that was cut off rejoins without forcing a new election
            // (etcd 3.5's default; 3.4 needs the flag).
            "--pre-vote".to_owned(),
        ];
        spawn_recorded(st, &node.name, Role::Etcd, argv.to_vec(), "etcd.log")?;
    }
    for node in &nodes {
        wait_etcd(st, node)?;
    }
    println!("xtask: lab {name}: etcd cluster of {n} members is healthy");

    // Agents, one after the other: the first one creates the cluster's CA.
    let endpoints: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}:{ETCD_CLIENT}", n.ip))
        .collect();
    let store = format!("etcd://{}", endpoints.join(","));
    for node in &nodes {
        let argv = vec![
            "nsenter".to_owned(),
            format!("--net=/var/run/netns/{}", node.ns),
            "--".to_owned(),
            st.agent_bin.to_string_lossy().into_owned(),
            "--store".to_owned(),
            store.clone(),
            // Every lab node is a server agent: it holds the CA and signs leaves
            // (client agents need etcd users and ACL tokens; see the README).
            "--server".to_owned(),
            "--data-dir".to_owned(),
            node.dir.join("agent").to_string_lossy().into_owned(),
            "--config-dir".to_owned(),
            node.dir.join("config").to_string_lossy().into_owned(),
            "--node-name".to_owned(),
            node.name.clone(),
            "--advertise-addr".to_owned(),
            node.ip.clone(),
            "--inbound-addr".to_owned(),
            format!("{}:{INBOUND_PORT}", node.ip),
            "--http-addr".to_owned(),
            HTTP.to_owned(),
            "--acl-default-policy".to_owned(),
            "allow".to_owned(),
            "--etcd-ca-file".to_owned(),
            ca.clone(),
            "--etcd-cert-file".to_owned(),
            agent_cert.clone(),
            "--etcd-key-file".to_owned(),
            agent_key.clone(),
            "--cgroup".to_owned(),
            node.cgroup.to_string_lossy().into_owned(),
            // The nodes share the machine's /run: each serves the Workload API
            // in its own directory (`lab exec` points workloads at it).
            "--workload-api-socket".to_owned(),
            workload_socket(node).to_string_lossy().into_owned(),
        ];
        spawn_recorded(st, &node.name, Role::Agent, argv, "agent.log")?;
        wait_agent(st, node)?;
    }
    println!("xtask: lab {name}: {n} agents serve");

    // The socat echo server, inside its service cgroup on the last node.
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/var/run/netns/{} -- socat tcp-l:{ECHO_PORT},fork,reuseaddr exec:/bin/cat",
        socat_cg.display(),
        last.ns
    );
    spawn_recorded(
        st,
        &last.name,
        Role::Socat,
        vec!["sh".to_owned(), "-c".to_owned(), script],
        "socat.log",
    )?;
    let ns_first = Netns::existing(&first.ns);
    // The intention, made on the first node, reaches the last through etcd.
    cli(
        st,
        first,
        &["intention", "create", "-allow", "-replace", "web", "socat"],
    )?;
    // Web on the first node reaches socat on the last through both proxies.
    let payload = format!("hello from web on {}", first.name);
    let target = format!("{}:{ECHO_PORT}", last.ip);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last_err = match echo_in(&ns_first, &first.cgroup.join("web"), &target, &payload) {
            Ok(echo) if echo.trim_end() == payload => break,
            Ok(echo) => format!("echo {echo:?}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "web on {} does not reach socat on {} through the mesh ({last_err}); see {}",
                first.name,
                last.name,
                st.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "xtask: lab {name}: web on {} reached socat on {} through both proxies",
        first.name, last.name
    );
    Ok(())
}

/// Starts `argv` detached (own session, so it outlives xtask), its output appended to
/// `<node dir>/<log>`, and records it (replacing an earlier record of the same node
/// and role) before returning.
fn spawn_recorded(
    st: &mut LabState,
    node: &str,
    role: Role,
    argv: Vec<String>,
    log: &str,
) -> Result<()> {
    let log = st.node(node)?.dir.join(log);
    let pid = spawn_detached(&argv, &log)?;
    let start_time = start_time(pid).unwrap_or(0);
    st.procs.retain(|p| !(p.node == node && p.role == role));
    st.procs.push(ProcRecord {
        node: node.to_owned(),
        role,
        pid,
        start_time,
        argv,
        log,
    });
    save_state(st)
}

/// Starts a process in its own session; returns its PID. `setsid` execs (our child is
/// not a group leader, so it need not fork), and nsenter and the cgroup shell exec
/// too, so the PID is the program's own.
fn spawn_detached(argv: &[String], log: &Path) -> Result<u32> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new("setsid")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting `{}`", argv.join(" ")))?;
    Ok(child.id())
}

fn wait_etcd(st: &LabState, node: &NodeState) -> Result<()> {
    let rec = st
        .proc(&node.name, Role::Etcd)
        .context("no etcd recorded")?;
    let ns = Netns::existing(&node.ns);
    let req = format!("GET 127.0.0.1:{ETCD_METRICS} /health");
    wait_until(rec, READY_TIMEOUT, "etcd to report healthy", || {
        http_in(&ns, std::slice::from_ref(&req), 1000)
            .into_iter()
            .next()
            .and_then(Result::ok)
            .is_some_and(|(s, body)| s == 200 && body.contains("true"))
    })
}

fn wait_agent(st: &LabState, node: &NodeState) -> Result<()> {
    let rec = st
        .proc(&node.name, Role::Agent)
        .context("no agent recorded")?;
    let ns = Netns::existing(&node.ns);
    let req = format!("GET {HTTP} /v1/agent/connect/ca/roots");
    wait_until(rec, READY_TIMEOUT, "the agent's API to answer", || {
        http_in(&ns, std::slice::from_ref(&req), 1000)
            .into_iter()
            .next()
            .and_then(Result::ok)
            .is_some_and(|(s, _)| s == 200)
    })
}

/// Polls `ready` until it holds; fails early, with the log's tail, if `rec` exits.
fn wait_until(
    rec: &ProcRecord,
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if !alive(rec) {
            bail!(
                "{} on {} (pid {}) exited while waiting for {what}; {}:\n{}",
                role_name(rec.role),
                rec.node,
                rec.pid,
                rec.log.display(),
                log_tail(&rec.log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what} on {}; {}:\n{}",
                rec.node,
                rec.log.display(),
                log_tail(&rec.log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Etcd => "etcd",
        Role::Agent => "connect-agent",
        Role::Socat => "socat",
    }
}

/// Runs the agent's CLI inside `node`'s namespace (its API is on that loopback).
fn cli(st: &LabState, node: &NodeState, args: &[&str]) -> Result<String> {
    let ns = Netns::existing(&node.ns);
    util::output(
        ns.command(&st.agent_bin)
            .args(args)
            .args(["-http-addr", HTTP]),
    )
}

// ------------------------------------------------------------------- processes

/// Start time of a live, non-zombie process (ticks after boot), or None.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // f[0] is field 3 (state); start time is field 22.
    if f.first().is_some_and(|s| *s == "Z" || *s == "X") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// Whether the recorded process still runs (same PID *and* start time).
fn alive(rec: &ProcRecord) -> bool {
    rec.pid != 0 && start_time(rec.pid).is_some_and(|t| t == rec.start_time)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM to each live recorded process, SIGKILL after [`STOP_GRACE`]; waits until
/// they are gone (bounded). Returns those that would not go.
fn stop_procs(recs: &[&ProcRecord]) -> Vec<u32> {
    let live: Vec<&ProcRecord> = recs.iter().copied().filter(|r| alive(r)).collect();
    for r in &live {
        signal(r.pid, "TERM");
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && live.iter().any(|r| alive(r)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in &live {
        if alive(r) {
            signal(r.pid, "KILL");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && live.iter().any(|r| alive(r)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    live.iter().filter(|r| alive(r)).map(|r| r.pid).collect()
}

fn stop_node(name: &str, node: &str) -> Result<()> {
    let st = load_state(name)?.with_context(|| format!("no lab {name} is up"))?;
    st.node(node)?;
    let agent: Vec<&ProcRecord> = st.proc(node, Role::Agent).into_iter().collect();
    let etcd: Vec<&ProcRecord> = st.proc(node, Role::Etcd).into_iter().collect();
    // The agent first. Its eBPF programs stay attached (pinned) and keep the
    // node's services protected while it is down, as they would in production.
    let mut stuck = stop_procs(&agent);
    stuck.extend(stop_procs(&etcd));
    ensure!(stuck.is_empty(), "processes {stuck:?} would not stop");
    println!("xtask: lab {name}: {node}'s agent and etcd member are stopped");
    Ok(())
}

fn start_node(name: &str, node: &str) -> Result<()> {
    let mut st = load_state(name)?.with_context(|| format!("no lab {name} is up"))?;
    let n = st.node(node)?.clone();
    let mut started = Vec::new();
    for role in [Role::Etcd, Role::Agent, Role::Socat] {
        let Some(rec) = st.proc(node, role).cloned() else {
            continue;
        };
        if alive(&rec) {
            continue;
        }
        let log = rec
            .log
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("{}.log", role_name(role)));
        spawn_recorded(&mut st, node, role, rec.argv.clone(), &log)?;
        match role {
            Role::Etcd => wait_etcd(&st, &n)?,
            Role::Agent => wait_agent(&st, &n)?,
            Role::Socat => {}
        }
        started.push(role_name(role));
    }
    if started.is_empty() {
        println!("xtask: lab {name}: everything on {node} runs already");
    } else {
        println!(
            "xtask: lab {name}: started {} on {node}",
            started.join(", ")
        );
    }
    Ok(())
}

/// Where `node`'s agent serves the Workload API: in the node's directory, since
/// the nodes share the machine's filesystem and so its default
/// `/run/connect/workload.sock`.
fn workload_socket(node: &NodeState) -> PathBuf {
    node.dir.join("workload.sock")
}

fn exec(name: &str, node: &str, service: Option<&str>, command: &[String]) -> Result<()> {
    let st = load_state(name)?.with_context(|| format!("no lab {name} is up"))?;
    let n = st.node(node)?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = st
        .agent_bin
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    dirs.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(dirs)?;
    let mut cmd = match service {
        Some(svc) => {
            let cg = n.cgroup.join(svc);
            ensure!(
                cg.is_dir(),
                "{node} has no service cgroup {svc} ({})",
                cg.display()
            );
            let mut script = format!(
                "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/var/run/netns/{} --",
                cg.display(),
                n.ns
            );
            for a in command {
                script.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
            }
            let mut c = Command::new("sh");
            c.arg("-c").arg(script);
            c
        }
        None => {
            let mut c = Netns::existing(&n.ns).command(&command[0]);
            c.args(&command[1..]);
            c
        }
    };
    // SPIFFE libraries find the node's Workload API here.
    cmd.env("PATH", path).env(
        "SPIFFE_ENDPOINT_SOCKET",
        format!("unix://{}", workload_socket(n).display()),
    );
    let status = util::status(&mut cmd)?;
    std::process::exit(status.code().unwrap_or(1));
}

// ---------------------------------------------------------------------- status

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(program).is_file())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
