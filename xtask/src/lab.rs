//! `cargo xtask lab up|status|down`: a multi-node Connect lab on one machine.
//!
//! Each node is a network namespace with its own address in 198.18.0.0/24, joined to
//! the others by a bridge that lives in a namespace of its own (nothing touches the
//! host's interfaces). Each node runs an etcd member and a Connect agent with the
//! cluster's state in etcd, and its applications live in a cgroup of its own. Demo
//! services: a socat echo server on the last node and a `web` client cgroup on the
//! first. Everything `up` starts is recorded in target/lab/state.json so that `down`
//! removes exactly that — processes by PID, namespaces and cgroups by name — even if
//! `up` failed halfway.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::{
    netns::{self, Netns},
    util,
};

const BRIDGE_NS: &str = "clab-bridge";
const BRIDGE: &str = "clabbr0";
const SUBNET_PREFIX: &str = "198.18.0";
const ECHO_PORT: u16 = 8181;

#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Start N nodes (default 3): namespaces, bridge, etcd members, agents, demo services.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
    },
    /// Show nodes, services and intentions.
    Status,
    /// Stop everything `up` started and remove its namespaces and cgroups.
    Down,
}

/// What `up` made, so `down` can undo exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LabState {
    nodes: Vec<NodeState>,
    namespaces: Vec<String>,
    cgroups: Vec<PathBuf>,
    pids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeState {
    name: String,
    ns: String,
    ip: String,
    cgroup: PathBuf,
}

fn lab_dir() -> PathBuf {
    util::workspace_root().join("target/lab")
}

fn state_path() -> PathBuf {
    lab_dir().join("state.json")
}

fn load_state() -> Result<LabState> {
    match std::fs::read(state_path()) {
        Ok(b) => serde_json::from_slice(&b).context("reading target/lab/state.json"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LabState::default()),
        Err(e) => Err(e).context("reading target/lab/state.json"),
    }
}

fn save_state(s: &LabState) -> Result<()> {
    std::fs::create_dir_all(lab_dir())?;
    std::fs::write(state_path(), serde_json::to_vec_pretty(s)?)
        .context("writing target/lab/state.json")
}

pub fn run(args: LabArgs) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask lab needs root (namespaces, cgroups, eBPF): run it with sudo");
    }
    match args.command {
        LabCommand::Up { nodes } => up(nodes),
        LabCommand::Status => status(),
        LabCommand::Down => down(),
    }
}

fn up(n: u8) -> Result<()> {
    if !(1..=20).contains(&n) {
        bail!("--nodes must be between 1 and 20");
    }
    if !load_state()?.namespaces.is_empty() {
        bail!("a lab is already up (target/lab/state.json): run `cargo xtask lab down` first");
    }
    let tc = crate::bootstrap::run(true)?;
    crate::ebpf::build(&tc)?;
    util::cargo(&[
        "build",
        "--release",
        "-p",
        "connect-agent",
        "--bin",
        "connect-agent",
    ])?;
    let agent = util::workspace_root().join("target/release/connect-agent");

    let mut st = LabState::default();
    let result = up_inner(n, &agent, &mut st);
    // Record whatever was made, even on failure, so `down` can clean it.
    save_state(&st)?;
    if let Err(e) = result {
        eprintln!("xtask: lab up failed; run `cargo xtask lab down` to clean up");
        return Err(e);
    }
    println!(
        "lab is up with {n} nodes; `cargo xtask lab status` shows it, `cargo xtask lab down` removes it"
    );
    Ok(())
}

fn up_inner(n: u8, agent: &Path, st: &mut LabState) -> Result<()> {
    let cg_root = cgroup2_mount()?.join("connect-lab");
    std::fs::create_dir_all(&cg_root).with_context(|| format!("creating {}", cg_root.display()))?;
    st.cgroups.push(cg_root.clone());

    let br = Netns::create(BRIDGE_NS)?.keep();
    st.namespaces.push(br.name.clone());
    br.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    br.ip(&["link", "set", BRIDGE, "up"])?;

    let nodes: Vec<NodeState> = (1..=n)
        .map(|i| NodeState {
            name: format!("n{i}"),
            ns: format!("clab-n{i}"),
            ip: format!("{SUBNET_PREFIX}.{}", 10 + u16::from(i)),
            cgroup: cg_root.join(format!("n{i}")),
        })
        .collect();
    for node in &nodes {
        let ns = Netns::create(&node.ns)?.keep();
        st.namespaces.push(ns.name.clone());
        netns::veth_to_bridge(
            &ns,
            "eth0",
            &format!("{}/24", node.ip),
            &br,
            &format!("clab-{}", node.name),
            BRIDGE,
        )?;
        std::fs::create_dir_all(&node.cgroup)
            .with_context(|| format!("creating {}", node.cgroup.display()))?;
        st.cgroups.push(node.cgroup.clone());
    }
    st.nodes = nodes.clone();

    // etcd: one member per node.
    let initial: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}=http://{}:2380", n.name, n.ip))
        .collect();
    let initial = initial.join(",");
    for node in &nodes {
        let data = lab_dir().join(format!("etcd-{}", node.name));
        let _ = std::fs::remove_dir_all(&data);
        let log = std::fs::File::create(lab_dir().join(format!("etcd-{}.log", node.name)))?;
        let pid = spawn_detached(
            Netns::existing(&node.ns).command("etcd").args([
                "--name",
                &node.name,
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &format!("http://{}:2379,http://127.0.0.1:2379", node.ip),
                "--advertise-client-urls",
                &format!("http://{}:2379", node.ip),
                "--listen-peer-urls",
                &format!("http://{}:2380", node.ip),
                "--initial-advertise-peer-urls",
                &format!("http://{}:2380", node.ip),
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "connect-lab",
            ]),
            log,
        )?;
        st.pids.push(pid);
    }
    let endpoints: Vec<String> = nodes.iter().map(|n| format!("{}:2379", n.ip)).collect();
    let store = format!("etcd://{}", endpoints.join(","));
    for node in &nodes {
        netns::wait_port(
            &Netns::existing(&node.ns),
            &format!("{}:2379", node.ip),
            Duration::from_secs(30),
        )?;
    }

    // Agents.
    for node in &nodes {
        let data = lab_dir().join(format!("agent-{}", node.name));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(lab_dir().join(format!("agent-{}.log", node.name)))?;
        let ns = Netns::existing(&node.ns);
        let pid = spawn_detached(
            ns.command(agent).args([
                "--store",
                &store,
                "--server",
                "--data-dir",
                &data.to_string_lossy(),
                "--node-name",
                &node.name,
                "--advertise-addr",
                &node.ip,
                "--cgroup",
                &node.cgroup.to_string_lossy(),
            ]),
            log,
        )?;
        st.pids.push(pid);
        netns::wait_port(&ns, "127.0.0.1:8500", Duration::from_secs(30))?;
    }

    // Demo: a socat echo on the last node, registered as `socat`; `web` on the first.
    let last = nodes.last().context("at least one node")?;
    let first = nodes.first().context("at least one node")?;
    let socat_cg = last.cgroup.join("socat");
    std::fs::create_dir_all(&socat_cg)?;
    st.cgroups.push(socat_cg.clone());
    let ns_last = Netns::existing(&last.ns);
    let log = std::fs::File::create(lab_dir().join("socat.log"))?;
    let pid = spawn_detached(
        &mut ns_last.command_in_cgroup(
            &socat_cg,
            "socat",
            &[
                format!("tcp-l:{ECHO_PORT},fork,reuseaddr"),
                "exec:/bin/cat".to_owned(),
            ],
        ),
        log,
    )?;
    st.pids.push(pid);
    register(&ns_last, agent, "socat", ECHO_PORT, "socat")?;
    let web_cg = first.cgroup.join("web");
    std::fs::create_dir_all(&web_cg)?;
    st.cgroups.push(web_cg);
    let ns_first = Netns::existing(&first.ns);
    register(&ns_first, agent, "web", 8080, "web")?;
    Ok(())
}

fn register(ns: &Netns, agent: &Path, name: &str, port: u16, cgroup: &str) -> Result<()> {
    let def = lab_dir().join(format!("{name}.json"));
    let body = serde_json::json!({"service": {"name": name, "port": port, "cgroup": cgroup, "connect": {"proxy": {}}}});
    std::fs::write(&def, serde_json::to_vec_pretty(&body)?)?;
    util::run_status(ns.command(agent).args(["services", "register"]).arg(&def))
}

/// Starts a process in its own session so it outlives xtask; returns its PID. `setsid`
/// execs (our child is not a group leader, so it need not fork), and nsenter and the
/// cgroup shell exec too, so the PID is the service's own.
fn spawn_detached(cmd: &mut Command, log: std::fs::File) -> Result<u32> {
    let err = log.try_clone()?;
    let child = Command::new("setsid")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting `{}`", util::describe(cmd)))?;
    Ok(child.id())
}

fn status() -> Result<()> {
    let st = load_state()?;
    if st.nodes.is_empty() {
        println!("no lab is up (`cargo xtask lab up`)");
        return Ok(());
    }
    let agent = util::workspace_root().join("target/release/connect-agent");
    println!("node   address          agent      etcd");
    for node in &st.nodes {
        let ns = Netns::existing(&node.ns);
        let agent_up = port_open(&ns, "127.0.0.1:8500");
        let etcd_up = port_open(&ns, &format!("{}:2379", node.ip));
        println!(
            "{:<6} {:<16} {:<10} {}",
            node.name,
            node.ip,
            if agent_up { "up" } else { "DOWN" },
            if etcd_up { "up" } else { "DOWN" }
        );
    }
    if let Some(first) = st.nodes.first() {
        let ns = Netns::existing(&first.ns);
        println!("\nservices:");
        let _ = util::status(ns.command(&agent).args(["services", "list"]));
        println!("\nintentions:");
        let _ = util::status(ns.command(&agent).args(["intention", "list"]));
    }
    Ok(())
}

fn port_open(ns: &Netns, addr: &str) -> bool {
    netns::wait_port(ns, addr, Duration::from_millis(200)).is_ok()
}

fn down() -> Result<()> {
    let st = load_state()?;
    // Agents first (they detach their eBPF programs on SIGTERM), then etcd and demos;
    // only the PIDs `up` recorded.
    for pid in st.pids.iter().rev() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && st
            .pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in &st.pids {
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
    }
    for ns in st.namespaces.iter().rev() {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    for cg in st.cgroups.iter().rev() {
        let _ = std::fs::remove_dir(cg);
    }
    let _ = std::fs::remove_file(state_path());
    println!("lab is down");
    Ok(())
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 mount in /proc/mounts: Connect needs cgroup v2")
}
