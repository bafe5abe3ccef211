//! `cargo xtask bench`: Connect (transparent and upstream paths) against a direct
//! connection and a stunnel mTLS pair,
//! on two network-namespace nodes joined by a veth, one setup after another in one run.
//!
//! For each setup: throughput (iperf3, one stream, 10 s), request/response latency of
//! 64-byte messages over one connection (20,000 round trips), new connections per
//! second (16 clients, 10 s), and the proxies' CPU seconds and peak RSS. The table
//! shows every figure also as a ratio to the direct connection and to stunnel; the
//! JSON goes to target/bench/.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::{
    loadgen::Handshakes,
    netns::{self, Netns, Proc},
    util::{self, output},
};

const CLIENT_IP: &str = "198.18.1.1";
const SERVER_IP: &str = "198.18.1.2";
const ECHO_PORT: u16 = 7000;
/// The client node agent's plaintext HTTP API (its default address, in its netns).
const CLIENT_AGENT_API: &str = "127.0.0.1:8500";
const IPERF_PORT: u16 = 5201;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds of each throughput and connection-rate run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Round trips of the latency run.
    #[arg(long, default_value_t = 20_000)]
    round_trips: u32,
    /// Measure only these setups besides the direct connection (every ratio needs
    /// it): any of transparent, upstream, stunnel. All of them by default.
    #[arg(long, value_delimiter = ',', value_parser = ["transparent", "upstream", "stunnel"])]
    only: Vec<String>,
    /// Keep each setup running this many seconds before measuring it, and print the
    /// proxies' PIDs, so a profiler (perf record -p) can be attached.
    #[arg(long, default_value_t = 0)]
    pause: u64,
    /// Each agent's `--worker-threads` (0: one per CPU, the agent's default).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// Each agent's `--proxy-pool-size` (0: no reuse of node-to-node
    /// connections; default: the agent's own).
    #[arg(long)]
    proxy_pool_size: Option<usize>,
}

impl BenchArgs {
    fn wants(&self, setup: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == setup)
    }
}

/// One setup's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub setup: String,
    pub throughput_gbps: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub rr_p999_us: f64,
    pub conn_per_s: f64,
    pub conn_errors: u64,
    /// CPU seconds the proxies used per Gbit carried in the throughput run.
    pub proxy_cpu_s_per_gbit: Option<f64>,
    /// Highest peak RSS among the proxies, MiB.
    pub proxy_peak_rss_mib: Option<f64>,
    /// Share of the client proxy's handshakes in this setup's runs that resumed a
    /// session (Connect only).
    pub resumed_share: Option<f64>,
    /// Share of the client proxy's application connections in this setup's runs
    /// that rode a reused node-to-node connection, without a handshake (Connect
    /// only).
    pub reused_share: Option<f64>,
}

/// Where a setup's client connects, and which processes are its proxies.
struct Target {
    name: String,
    /// For the echo (latency and connection-rate) runs.
    echo: String,
    /// For iperf3: host and port.
    iperf: (String, u16),
    proxies: Vec<u32>,
    /// The cgroup the client runs in (transparent path), if any.
    cgroup: Option<PathBuf>,
    /// The client node agent's HTTP API, for its handshake counters (Connect only).
    agent_api: Option<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask bench needs root (network namespaces): run it with sudo");
    }
    crate::bootstrap::run(true)?;
    let agent_bin = crate::build()?;
    let me = std::env::current_exe().context("locating the xtask binary")?;

    let client = Netns::create("cbench-client")?;
    let server = Netns::create("cbench-server")?;
    netns::veth(
        &client,
        "cb0",
        &format!("{CLIENT_IP}/30"),
        &server,
        "cb1",
        &format!("{SERVER_IP}/30"),
    )?;
    for ns in [&client, &server] {
        // Ten seconds of connection churn leaves many sockets in TIME_WAIT; let new
        // connections reuse them and widen the port range (per-namespace sysctls).
        util::run_status(Command::new("ip").args([
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
            // ... but never the ports Connect's agents listen on: a connection in
            // TIME_WAIT on one of them would keep the agent from binding it.
            "net.ipv4.ip_local_reserved_ports=2379,2380,8500,8600,15001,15201,15443,17000,17443,19191,19192,20000",
        ]))?;
    }

    let mut echo = Proc::spawn(
        "echo server",
        server
            .command(&me)
            .args(["bench-echo", "--listen", &format!("0.0.0.0:{ECHO_PORT}")])
            .stdout(Stdio::null()),
    )?;
    let mut iperf = Proc::spawn(
        "iperf3 server",
        server
            .command("iperf3")
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            // The readiness probe connects and closes, which iperf3 reports as an error.
            .stderr(Stdio::null()),
    )?;
    netns::wait_port(
        &server,
        &format!("127.0.0.1:{ECHO_PORT}"),
        Duration::from_secs(5),
    )?;
    netns::wait_port(
        &server,
        &format!("127.0.0.1:{IPERF_PORT}"),
        Duration::from_secs(5),
    )?;
    echo.check_running()?;
    iperf.check_running()?;

    let mut results = Vec::new();

    // (a) direct plaintext across the veth.
    let direct = Target {
        name: "direct".into(),
        echo: format!("{SERVER_IP}:{ECHO_PORT}"),
        iperf: (SERVER_IP.into(), IPERF_PORT),
        proxies: vec![],
        cgroup: None,
        agent_api: None,
    };
    results.push(measure(&me, &client, &direct, &args)?);

    // (b) and (c): Connect, one agent per node sharing state through etcd.
    if args.wants("transparent") || args.wants("upstream") {
        let connect = ConnectPair::start(&agent_bin, &client, &server, &args)?;
        let transparent = Target {
            name: "connect transparent".into(),
            echo: format!("{SERVER_IP}:{ECHO_PORT}"),
            iperf: (SERVER_IP.into(), IPERF_PORT),
            proxies: connect.pids(),
            cgroup: Some(connect.app_cgroup.clone()),
            agent_api: Some(CLIENT_AGENT_API.into()),
        };
        if args.wants("transparent") {
            results.push(measure(&me, &client, &transparent, &args)?);
        }
        let explicit = Target {
            name: "connect upstream".into(),
            echo: format!("127.0.0.1:{UPSTREAM_ECHO}"),
            iperf: ("127.0.0.1".into(), UPSTREAM_IPERF),
            proxies: connect.pids(),
            cgroup: None,
            agent_api: Some(CLIENT_AGENT_API.into()),
        };
        if args.wants("upstream") {
            results.push(measure(&me, &client, &explicit, &args)?);
        }
        drop(connect);
    }
    println!("(d) Connect with an sk_msg fast path: not built, not measured");

    // (e) stunnel mutual TLS 1.3, the reference peer.
    if args.wants("stunnel") {
        let work = util::workspace_root().join("target/bench/stunnel");
        let stunnel = Stunnel::start(&work, &client, &server)?;
        let st = Target {
            name: "stunnel".into(),
            echo: format!("127.0.0.1:{}", stunnel.echo_port),
            iperf: ("127.0.0.1".into(), stunnel.iperf_port),
            proxies: stunnel.pids(),
            cgroup: None,
            agent_api: None,
        };
        results.push(measure(&me, &client, &st, &args)?);
        drop(stunnel);
    }

    print_table(&results);
    let dir = util::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("bench-{stamp}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn client_cmd(ns: &Netns, cgroup: Option<&Path>, program: &str, args: &[String]) -> Command {
    match cgroup {
        Some(cg) => ns.command_in_cgroup(cg, program, args),
        None => {
            let mut c = ns.command(program);
            c.args(args);
            c
        }
    }
}

fn measure(me: &Path, client: &Netns, t: &Target, args: &BenchArgs) -> Result<Figures> {
    println!("==> {}", t.name);
    if args.pause > 0 {
        println!("    proxies {:?}; measuring in {} s", t.proxies, args.pause);
        std::thread::sleep(Duration::from_secs(args.pause));
    }
    let me_s = me.to_string_lossy().into_owned();
    let handshakes = |api: &str| -> Result<Handshakes> {
        let out = output(
            client
                .command(me)
                .args(["bench-client", "handshakes", "--addr", api]),
        )?;
        serde_json::from_str(&out).context("bench-client handshakes printed no counters")
    };
    let hs_before = t.agent_api.as_deref().map(handshakes).transpose()?;
    let cpu_before: f64 = t
        .proxies
        .iter()
        .map(|p| netns::cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    let iperf_args: Vec<String> = vec![
        "-c".into(),
        t.iperf.0.clone(),
        "-p".into(),
        t.iperf.1.to_string(),
        "-t".into(),
        args.seconds.min(60).to_string(),
        "-J".into(),
    ];
    let out = output(&mut client_cmd(
        client,
        t.cgroup.as_deref(),
        "iperf3",
        &iperf_args,
    ))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 printed no received throughput")?;
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let cpu_after: f64 = t
        .proxies
        .iter()
        .map(|p| netns::cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    let gbits = bytes * 8.0 / 1e9;

    let rr_args = vec![
        "bench-client".into(),
        "rr".into(),
        "--addr".into(),
        t.echo.clone(),
        "--count".into(),
        args.round_trips.to_string(),
    ];
    let rr: serde_json::Value = serde_json::from_str(&output(&mut client_cmd(
        client,
        t.cgroup.as_deref(),
        &me_s,
        &rr_args,
    ))?)?;
    let cps_args = vec![
        "bench-client".into(),
        "cps".into(),
        "--addr".into(),
        t.echo.clone(),
        "--seconds".into(),
        args.seconds.to_string(),
    ];
    let cps: serde_json::Value = serde_json::from_str(&output(&mut client_cmd(
        client,
        t.cgroup.as_deref(),
        &me_s,
        &cps_args,
    ))?)?;
    let peak = t
        .proxies
        .iter()
        .filter_map(|p| netns::peak_rss_kib(*p).ok())
        .max()
        .map(|k| k as f64 / 1024.0);
    let hs_after = t.agent_api.as_deref().map(handshakes).transpose()?;
    let (resumed_share, reused_share) = match (hs_before, hs_after) {
        (Some(before), Some(after)) => {
            let (full, resumed, reused) = (
                after.full.saturating_sub(before.full),
                after.resumed.saturating_sub(before.resumed),
                after.reused.saturating_sub(before.reused),
            );
            println!(
                "    client proxy: {full} full handshakes, {resumed} resumed, {reused} connections on a reused node-to-node connection"
            );
            let all = full + resumed + reused;
            (
                (full + resumed > 0).then(|| resumed as f64 / (full + resumed) as f64),
                (all > 0).then(|| reused as f64 / all as f64),
            )
        }
        _ => (None, None),
    };
    Ok(Figures {
        setup: t.name.clone(),
        throughput_gbps: bps / 1e9,
        rr_p50_us: rr["p50_us"].as_f64().unwrap_or(f64::NAN),
        rr_p99_us: rr["p99_us"].as_f64().unwrap_or(f64::NAN),
        rr_p999_us: rr["p999_us"].as_f64().unwrap_or(f64::NAN),
        conn_per_s: cps["per_second"].as_f64().unwrap_or(0.0),
        conn_errors: cps["errors"].as_u64().unwrap_or(0),
        proxy_cpu_s_per_gbit: (!t.proxies.is_empty() && gbits > 0.0)
            .then(|| (cpu_after - cpu_before) / gbits),
        proxy_peak_rss_mib: peak,
        resumed_share,
        reused_share,
    })
}

fn print_table(results: &[Figures]) {
    let direct = results.iter().find(|r| r.setup == "direct");
    let stunnel = results.iter().find(|r| r.setup == "stunnel");
    println!();
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9} {:>10} {:>12} {:>9}",
        "setup", "Gbit/s", "p50 µs", "p99 µs", "p99.9 µs", "conn/s", "cpu s/Gbit", "RSS MiB"
    );
    for r in results {
        println!(
            "{:<22} {:>10.3} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>12} {:>9}",
            r.setup,
            r.throughput_gbps,
            r.rr_p50_us,
            r.rr_p99_us,
            r.rr_p999_us,
            r.conn_per_s,
            r.proxy_cpu_s_per_gbit
                .map_or("-".into(), |v| format!("{v:.3}")),
            r.proxy_peak_rss_mib
                .map_or("-".into(), |v| format!("{v:.1}")),
        );
        for (label, base) in [("  ÷ direct", direct), ("  ÷ stunnel", stunnel)] {
            if let Some(b) = base
                && b.setup != r.setup
            {
                println!(
                    "{:<22} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2}",
                    label,
                    r.throughput_gbps / b.throughput_gbps,
                    r.rr_p50_us / b.rr_p50_us,
                    r.rr_p99_us / b.rr_p99_us,
                    r.rr_p999_us / b.rr_p999_us,
                    r.conn_per_s / b.conn_per_s,
                );
            }
        }
    }
}

const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const UPSTREAM_ECHO: u16 = 19191;
const UPSTREAM_IPERF: u16 = 19192;

/// Connect on both nodes: an etcd member and an agent on the server node (the echo
/// and iperf3 servers registered as services), an agent on the client node with
/// `--cgroup` (the client's service cgroup, for the transparent path) and upstream
/// listeners for the explicit path. Release binary from `cargo xtask build`.
struct ConnectPair {
    client_agent: Proc,
    server_agent: Proc,
    _etcd: Proc,
    app_cgroup: PathBuf,
    cgroup_root: PathBuf,
    work: PathBuf,
}

impl ConnectPair {
    fn start(bin: &Path, client: &Netns, server: &Netns, args: &BenchArgs) -> Result<Self> {
        let work = util::workspace_root().join("target/bench/connect");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        // etcd over TLS with client certificates, as agents off loopback require
        // (the lab's certificates, made for this run).
        crate::lab::tls::make(&work, &[("cbench".to_owned(), SERVER_IP.to_owned())])?;
        let ca = crate::lab::tls::ca(&work);
        let (member_cert, member_key) = crate::lab::tls::member(&work, "cbench");
        let (agent_cert, agent_key) = crate::lab::tls::agent(&work);
        let etcd = Proc::spawn(
            "etcd",
            server
                .command("etcd")
                .args(["--name", "cbench", "--data-dir"])
                .arg(work.join("etcd"))
                .arg("--cert-file")
                .arg(&member_cert)
                .arg("--key-file")
                .arg(&member_key)
                .arg("--trusted-ca-file")
                .arg(&ca)
                .arg("--client-cert-auth")
                .args([
                    "--listen-client-urls",
                    &format!("https://{SERVER_IP}:{ETCD_PORT}"),
                    "--advertise-client-urls",
                    &format!("https://{SERVER_IP}:{ETCD_PORT}"),
                    "--listen-peer-urls",
                    &format!("http://{SERVER_IP}:{ETCD_PEER_PORT}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://{SERVER_IP}:{ETCD_PEER_PORT}"),
                    "--initial-cluster",
                    &format!("cbench=http://{SERVER_IP}:{ETCD_PEER_PORT}"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        netns::wait_port(
            server,
            &format!("{SERVER_IP}:{ETCD_PORT}"),
            Duration::from_secs(20),
        )?;

        let cgroup_root = util::cgroup2_mount()?.join("connect-bench");
        let app_cgroup = cgroup_root.join("client");
        std::fs::create_dir_all(&app_cgroup)
            .with_context(|| format!("creating {}", app_cgroup.display()))?;

        let agent = |ns: &Netns, name: &str, ip: &str, services: &str, cgroup: Option<&Path>| {
            let dir = work.join(name);
            let config = dir.join("config");
            std::fs::create_dir_all(&config)?;
            std::fs::write(config.join("services.json"), services)?;
            std::fs::write(config.join("fillers.json"), fillers(name))?;
            let mut cmd = ns.command(bin);
            cmd.arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--config-dir")
                .arg(&config)
                // Both agents share the machine's /run: a socket each.
                .arg("--workload-api-socket")
                .arg(dir.join("workload.sock"))
                .args([
                    "--store",
                    &format!("etcd://{SERVER_IP}:{ETCD_PORT}"),
                    "--acl-default-policy",
                    "allow",
                    // Both may sign (no etcd auth here): the bench measures the data
                    // path, not leaf distribution.
                    "--server",
                    "--node-name",
                    name,
                    "--advertise-addr",
                    ip,
                    "--inbound-addr",
                    &format!("{ip}:20000"),
                    "--worker-threads",
                    &args.worker_threads.to_string(),
                ])
                .arg("--etcd-ca-file")
                .arg(&ca)
                .arg("--etcd-cert-file")
                .arg(&agent_cert)
                .arg("--etcd-key-file")
                .arg(&agent_key);
            if let Some(n) = args.proxy_pool_size {
                cmd.arg("--proxy-pool-size").arg(n.to_string());
            }
            if let Some(cg) = cgroup {
                cmd.arg("--cgroup").arg(cg).arg("--detach-on-exit");
            }
            cmd.stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("agent.log"))?);
            let p = Proc::spawn(&format!("agent {name}"), &mut cmd)?;
            netns::wait_port(ns, &format!("{ip}:20000"), Duration::from_secs(30))?;
            Ok::<_, anyhow::Error>(p)
        };
        let server_agent = agent(
            server,
            "server",
            SERVER_IP,
            &format!(
                r#"{{"services": [{{"name": "echo", "port": {ECHO_PORT}}}, {{"name": "iperf", "port": {IPERF_PORT}}}]}}"#
            ),
            None,
        )?;
        let client_agent = agent(
            client,
            "client",
            CLIENT_IP,
            &format!(
                r#"{{"service": {{"name": "bench-client", "port": 0, "cgroup": "client",
                    "connect": {{"proxy": {{"config": {{"upstreams": [
                        {{"destination_name": "echo", "local_bind_port": {UPSTREAM_ECHO}}},
                        {{"destination_name": "iperf", "local_bind_port": {UPSTREAM_IPERF}}}]}}}}}}}}}}"#
            ),
            Some(&cgroup_root),
        )?;
        // The client node learns the server's services through etcd and opens the
        // upstream listeners; the transparent path needs the eBPF maps filled too,
        // which the same catalog change drives.
        netns::wait_port(
            client,
            &format!("127.0.0.1:{UPSTREAM_IPERF}"),
            Duration::from_secs(30),
        )?;
        netns::wait_port(
            client,
            &format!("127.0.0.1:{UPSTREAM_ECHO}"),
            Duration::from_secs(30),
        )?;
        Ok(Self {
            client_agent,
            server_agent,
            _etcd: etcd,
            app_cgroup,
            cgroup_root,
            work,
        })
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.client_agent.pid(), self.server_agent.pid()]
    }
}

impl Drop for ConnectPair {
    fn drop(&mut self) {
        // SIGTERM so the client agent detaches its programs (it runs with
        // --detach-on-exit); Proc's drop kills what is left.
        for p in [self.client_agent.pid(), self.server_agent.pid()] {
            let _ = Command::new("kill")
                .args(["-TERM", &p.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_secs(1));
        let _ = std::fs::remove_dir(&self.app_cgroup);
        let _ = std::fs::remove_dir(&self.cgroup_root);
        let _ = std::fs::remove_dir_all(self.work.join("etcd"));
    }
}

/// Services registered on each bench agent besides the measured ones, so that the
/// agents carry the load with a catalog of a realistic size: with the measured
/// ones, the cluster holds more than [`REGISTERED_SERVICES`] services and every
/// agent indexes all of them.
const REGISTERED_SERVICES: usize = 100;

/// A config file registering [`REGISTERED_SERVICES`] idle services of node `node`.
fn fillers(node: &str) -> String {
    let services: Vec<serde_json::Value> = (0..REGISTERED_SERVICES)
        .map(|i| {
            serde_json::json!({
                "name": format!("{node}-filler-{i:03}"),
                "port": 30_000 + i,
            })
        })
        .collect();
    serde_json::json!({ "services": services }).to_string()
}

/// A stunnel4 pair doing mutual TLS 1.3 with ECDSA P-256 certificates from one CA, the
/// same kind Connect issues: client node 127.0.0.1:{echo,iperf} → server node → local.
struct Stunnel {
    client: Proc,
    server: Proc,
    echo_port: u16,
    iperf_port: u16,
}

impl Stunnel {
    fn start(work: &Path, client: &Netns, server: &Netns) -> Result<Self> {
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        make_certs(work)?;
        let (echo_port, iperf_port) = (17000, 15201);
        let (echo_tls, iperf_tls) = (17443, 15443);
        let common = |cert: &str| {
            format!(
                "foreground = yes\npid =\nlibwrap = no\nTIMEOUTclose = 0\nsslVersionMin = TLSv1.3\ncert = {d}/{cert}.crt\nkey = {d}/{cert}.key\nCAfile = {d}/ca.crt\nverifyChain = yes\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
                d = work.display()
            )
        };
        let server_conf = format!(
            "{}[echo]\naccept = {SERVER_IP}:{echo_tls}\nconnect = 127.0.0.1:{ECHO_PORT}\n[iperf]\naccept = {SERVER_IP}:{iperf_tls}\nconnect = 127.0.0.1:{IPERF_PORT}\n",
            common("server")
        );
        let client_conf = format!(
            "{}client = yes\n[echo]\naccept = 127.0.0.1:{echo_port}\nconnect = {SERVER_IP}:{echo_tls}\n[iperf]\naccept = 127.0.0.1:{iperf_port}\nconnect = {SERVER_IP}:{iperf_tls}\n",
            common("client")
        );
        let sp = work.join("server.conf");
        let cp = work.join("client.conf");
        std::fs::write(&sp, server_conf)?;
        std::fs::write(&cp, client_conf)?;
        let log = |who: &str| -> Result<std::fs::File> {
            let path = work.join(format!("{who}.log"));
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
        };
        let mut server_p = Proc::spawn(
            "stunnel server",
            server.command("stunnel4").arg(&sp).stderr(log("server")?),
        )?;
        let mut client_p = Proc::spawn(
            "stunnel client",
            client.command("stunnel4").arg(&cp).stderr(log("client")?),
        )?;
        let ready = netns::wait_port(
            server,
            &format!("{SERVER_IP}:{echo_tls}"),
            Duration::from_secs(15),
        )
        .and_then(|()| {
            netns::wait_port(
                client,
                &format!("127.0.0.1:{echo_port}"),
                Duration::from_secs(15),
            )
        })
        .and_then(|()| server_p.check_running())
        .and_then(|()| client_p.check_running());
        if let Err(e) = ready {
            bail!(
                "stunnel did not come up ({e:#}); its logs are {}/{{server,client}}.log",
                work.display()
            );
        }
        Ok(Self {
            client: client_p,
            server: server_p,
            echo_port,
            iperf_port,
        })
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.client.pid(), self.server.pid()]
    }
}

/// A CA and a client and a server certificate, ECDSA P-256, with openssl.
fn make_certs(dir: &Path) -> Result<()> {
    let ossl = |args: &[&str]| {
        util::run_status(
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    ossl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ca.key",
    ])?;
    ossl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-days",
        "2",
        "-subj",
        "/CN=bench-ca",
        "-out",
        "ca.crt",
    ])?;
    for who in ["server", "client"] {
        ossl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{who}.key"),
        ])?;
        ossl(&[
            "req",
            "-new",
            "-key",
            &format!("{who}.key"),
            "-subj",
            &format!("/CN={who}"),
            "-out",
            &format!("{who}.csr"),
        ])?;
        ossl(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{who}.crt"),
        ])?;
    }
    Ok(())
}
