//! `cargo xtask lab`, end to end, on a lab of the test's own (`--name lt<pid>`, so it
//! never touches a user's `clab`): three namespace nodes on a bridge, a three-member
//! etcd cluster, an agent per node, socat on n3 and `web` on n1.
//!
//! One test, the scenarios in order (they share the lab):
//! 1. `web` on n1 (python3 in n1's web cgroup) reaches socat on n3 through both proxies.
//! 2. A deny intention created through n2's API is enforced by n3 within one second.
//! 3. n2's etcd member and agent are stopped by PID: n1 and n3 keep serving traffic and
//!    accept writes; `lab start n2` brings n2 back, it catches up and serves the same
//!    catalog and intentions as the others.
//! 4. n3 is cut off (its veth's bridge end down) for ten seconds: a long-lived
//!    connection between two services on n3 (it crosses no link) keeps working from
//!    the agent's cache, a new one is authorized too; after the link returns, n3 sees
//!    the write made meanwhile.
//! 5. `lab down` leaves no namespace, cgroup, process or directory behind; a second
//!    `down` is fine.
//!
//! The lab is torn down by a guard (`cargo xtask lab down`) however the test ends.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use connect_tests::{
    agent::agent_binary, lab::require_privileges, mesh::ONE_SHOT_CLIENT, wait::wait_for,
};
use serde_json::Value;

const SOCAT_PORT: u16 = 8181;
const HTTP: &str = "127.0.0.1:8500";

/// Opens ONE connection and exchanges a line on it every INTERVAL seconds for
/// DURATION seconds: `<unix time> ok` per round trip, `<unix time> fail <why>` and
/// exit at the first failure, `done` at the end.
const LONG_LIVED: &str = r#"
import socket, sys, time
host, port, interval, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=3)
s.settimeout(3)
print("%.3f connected" % time.time(), flush=True)
end = time.time() + duration
i = 0
while time.time() < end:
    msg = ("ping-%d\n" % i).encode()
    try:
        s.sendall(msg)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(200)
            if not chunk:
                raise EOFError("closed by peer")
            data += chunk
        if data != msg:
            raise ValueError("echo %r" % data)
        print("%.3f ok" % time.time(), flush=True)
    except Exception as e:
        print("%.3f fail %r" % (time.time(), e), flush=True)
        sys.exit(1)
    i += 1
    time.sleep(interval)
print("done", flush=True)
"#;

/// A new connection every INTERVAL seconds, each one line echoed: `<start> <end> ok`
/// or `<start> <end> denied <why>` (closed or reset before the echo), until killed.
const PROBER: &str = r#"
import socket, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
i = 0
while True:
    t0 = time.time()
    msg = ("probe-%d\n" % i).encode()
    why = ""
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.settimeout(3)
        s.sendall(msg)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(200)
            if not chunk:
                break
            data += chunk
        s.close()
        ok = data == msg
        why = "echo %r" % data
    except Exception as e:
        ok = False
        why = repr(e)
    print("%.4f %.4f %s %s" % (t0, time.time(), "ok" if ok else "denied", why), flush=True)
    i += 1
    time.sleep(interval)
"#;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// Runs a command to completion within `timeout`, output in files (no pipe to fill).
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = tempfile::tempfile()?;
    let err = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |mut f: File| -> Result<Vec<u8>> {
        use std::io::{Read, Seek};
        f.rewind()?;
        let mut v = Vec::new();
        f.read_to_end(&mut v)?;
        Ok(v)
    };
    Ok(Output {
        status,
        stdout: read(out)?,
        stderr: read(err)?,
    })
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A lab of this test's own, brought down (`cargo xtask lab down`) on drop.
struct Lab {
    name: String,
    agent: PathBuf,
    state: Value,
    down: bool,
}

impl Lab {
    fn new() -> Result<Self> {
        Ok(Self {
            name: format!("lt{}", std::process::id()),
            agent: agent_binary()?,
            state: Value::Null,
            down: false,
        })
    }

    /// `cargo xtask lab --name <lab> ARGS`.
    fn xtask(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        run_bounded(
            Command::new(cargo)
                .current_dir(workspace_root())
                .args(["xtask", "lab", "--name", &self.name])
                .args(args),
            timeout,
        )
    }

    fn xtask_ok(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let out = self.xtask(args, timeout)?;
        ensure!(
            out.status.success(),
            "cargo xtask lab {args:?} failed with {}:\n{}",
            out.status,
            text(&out)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn up(&mut self) -> Result<String> {
        let agent = self.agent.to_string_lossy().into_owned();
        // The first run may build xtask itself.
        let out = self.xtask_ok(&["up", "--agent-bin", &agent], Duration::from_secs(600))?;
        self.reload()?;
        Ok(out)
    }

    fn reload(&mut self) -> Result<()> {
        let path = workspace_root()
            .join("target/lab")
            .join(&self.name)
            .join("state.json");
        self.state = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        Ok(())
    }

    fn node(&self, name: &str) -> Result<Node> {
        let n = self.state["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name)
            .with_context(|| format!("no node {name} in the lab's state"))?;
        let s = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
        Ok(Node {
            ns: s("ns"),
            ip: s("ip"),
            cgroup: PathBuf::from(s("cgroup")),
            bridge_port: s("bridge_port"),
            dir: PathBuf::from(s("dir")),
        })
    }

    /// (pid, start time) of a node's recorded process.
    fn proc(&self, node: &str, role: &str) -> Result<(u32, u64)> {
        let p = self.state["procs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["node"] == node && p["role"] == role)
            .with_context(|| format!("no {role} recorded on {node}"))?;
        Ok((
            p["pid"]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .context("pid")?,
            p["start_time"].as_u64().context("start_time")?,
        ))
    }

    fn all_procs(&self) -> Vec<(u32, u64)> {
        self.state["procs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    u32::try_from(p["pid"].as_u64()?).ok()?,
                    p["start_time"].as_u64()?,
                ))
            })
            .collect()
    }

    /// The agents' and etcd members' logs, for a failure.
    fn logs(&self) -> String {
        let mut s = String::new();
        for n in ["n1", "n2", "n3"] {
            let Ok(node) = self.node(n) else { continue };
            for f in ["agent.log", "etcd.log"] {
                let text = std::fs::read_to_string(node.dir.join(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                s.push_str(&format!("--- {n} {f} (tail) ---\n"));
                s.push_str(&lines[lines.len().saturating_sub(25)..].join("\n"));
                s.push('\n');
            }
        }
        s
    }

    fn down(&mut self) -> Result<String> {
        let out = self.xtask_ok(&["down"], Duration::from_secs(120))?;
        self.down = true;
        Ok(out)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down {
            match self.xtask(&["down"], Duration::from_secs(120)) {
                Ok(o) => eprintln!("lab guard: {}", text(&o).trim()),
                Err(e) => eprintln!("lab guard: cargo xtask lab down failed: {e:#}"),
            }
        }
    }
}

struct Node {
    ns: String,
    ip: String,
    cgroup: PathBuf,
    bridge_port: String,
    dir: PathBuf,
}

/// A process in a node's namespace (and a cgroup), killed by PID on drop.
struct Spawned {
    child: Child,
    out: PathBuf,
}

impl Spawned {
    fn start(
        ns: &str,
        cgroup: Option<&Path>,
        program: &str,
        args: &[&str],
        out: PathBuf,
    ) -> Result<Self> {
        let mut script = String::new();
        if let Some(cg) = cgroup {
            script.push_str(&format!("echo $$ > '{}/cgroup.procs' && ", cg.display()));
        }
        script.push_str(&format!(
            "exec nsenter --net=/var/run/netns/{ns} -- '{program}'"
        ));
        for a in args {
            script.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {program} in {ns}"))?;
        Ok(Self { child, out })
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("connect-lab-test-{}-{name}", std::process::id()))
}

/// The agent's CLI inside a node's namespace.
fn cli(lab: &Lab, node: &Node, args: &[&str]) -> Result<Output> {
    let mut all = args.to_vec();
    all.extend(["-http-addr", HTTP]);
    run_bounded(
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", node.ns))
            .arg("--")
            .arg(&lab.agent)
            .args(&all),
        Duration::from_secs(30),
    )
}

fn cli_ok(lab: &Lab, node: &Node, args: &[&str]) -> Result<String> {
    let out = cli(lab, node, args)?;
    ensure!(
        out.status.success(),
        "connect-agent {args:?}: {}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One connection from `cgroup` on `node` to `host:port`; the echoed text.
fn echo(node: &Node, cgroup: &Path, host: &str, port: u16, payload: &str) -> Result<String> {
    let out = run_bounded(
        Command::new("sh").arg("-c").arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/var/run/netns/{} -- python3 -c '{}' '{host}' '{port}' '{payload}'",
            cgroup.display(),
            node.ns,
            ONE_SHOT_CLIENT.replace('\'', "'\\''")
        )),
        Duration::from_secs(20),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("echo="))
        .map(str::to_owned)
        .with_context(|| format!("no echo: {}", text(&out)))
}

/// Runs `connect-agent args` on `node` until it succeeds; on timeout the error
/// carries the last failure's output.
fn wait_for_cli(
    lab: &Lab,
    node: &Node,
    args: &[&str],
    timeout: Duration,
    what: &str,
) -> Result<Duration> {
    let mut last = String::new();
    wait_for(timeout, what, || match cli(lab, node, args) {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            last = text(&o);
            false
        }
        Err(e) => {
            last = format!("{e:#}");
            false
        }
    })
    .with_context(|| format!("last: {last}"))
}

/// What a node's agent serves: the catalog's services with their instances, and the
/// intentions, through its HTTP API (python3 inside the namespace).
fn snapshot(node: &Node) -> Result<Value> {
    const SNAP: &str = r#"
import json, urllib.request
def get(p):
    with urllib.request.urlopen("http://127.0.0.1:8500" + p, timeout=5) as r:
        return json.load(r)
out = {"services": {}, "intentions": []}
for name in sorted(get("/v1/catalog/services")):
    out["services"][name] = sorted(
        [i["Node"], i["ServiceID"], i.get("ServiceAddress") or i["Address"], i["ServicePort"]]
        for i in get("/v1/catalog/service/" + name))
out["intentions"] = sorted(
    [i["ID"], i["SourceName"], i["DestinationName"], i["Action"]]
    for i in get("/v1/connect/intentions"))
print(json.dumps(out, sort_keys=True))
"#;
    let out = run_bounded(
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", node.ns))
            .args(["--", "python3", "-c", SNAP]),
        Duration::from_secs(20),
    )?;
    ensure!(out.status.success(), "snapshot: {}", text(&out));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Inbound connections a node's proxy refused, from its Prometheus metrics.
fn denials(node: &Node) -> Result<u64> {
    const GET: &str = r#"
import urllib.request
with urllib.request.urlopen("http://127.0.0.1:8500/v1/agent/metrics?format=prometheus", timeout=5) as r:
    print(r.read().decode())
"#;
    let out = run_bounded(
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", node.ns))
            .args(["--", "python3", "-c", GET]),
        Duration::from_secs(20),
    )?;
    ensure!(out.status.success(), "metrics: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("connect_proxy_authorizations_total{decision=\"deny\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no connect_proxy_authorizations_total{decision=\"deny\"} in the metrics")
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if f.first().is_some_and(|s| *s == "Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

fn alive((pid, start): (u32, u64)) -> bool {
    start_time(pid) == Some(start)
}

/// SIGTERM, then SIGKILL after `grace`; waits until gone.
fn stop_pid(p: (u32, u64), sig: nix::sys::signal::Signal, grace: Duration) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(p.0)?);
    ensure!(alive(p), "pid {} is not running", p.0);
    nix::sys::signal::kill(pid, sig)?;
    if wait_for(grace, "the process to exit", || !alive(p)).is_err() {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        wait_for(Duration::from_secs(5), "the process to die", || !alive(p))?;
    }
    Ok(())
}

#[test]
fn lab_up_serves_survives_and_goes_down_clean() -> Result<()> {
    require_privileges()?;
    let mut lab = Lab::new()?;
    let t = Instant::now();
    let up = lab.up().inspect_err(|_| eprintln!("{}", lab.logs()))?;
    println!("{up}");
    println!("lab up took {:.1} s", t.elapsed().as_secs_f64());
    let mut removed_pids = Vec::new();
    let result = scenarios(&mut lab, &mut removed_pids);
    if result.is_err() {
        eprintln!("{}", lab.logs());
    }
    // Whatever happened: down, and nothing may be left.
    let procs: Vec<(u32, u64)> = lab.all_procs().into_iter().chain(removed_pids).collect();
    let cg_root = lab.state["cgroup_root"].as_str().map(PathBuf::from);
    let dir = lab.state["dir"].as_str().map(PathBuf::from);
    let down = lab.down();
    result?;
    let down = down?;
    println!("{}", down.trim());
    let ns = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
        .into_owned();
    let prefix = format!("{}-", lab.name);
    ensure!(
        !ns.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left after down:\n{ns}"
    );
    let cg_root = cg_root.context("no cgroup root recorded")?;
    ensure!(
        !cg_root.exists(),
        "{} is left after down",
        cg_root.display()
    );
    let left: Vec<u32> = procs.iter().filter(|p| alive(**p)).map(|p| p.0).collect();
    ensure!(left.is_empty(), "processes left after down: {left:?}");
    ensure!(
        procs.len() >= 7,
        "expected at least 7 recorded processes (3 etcd, 3 agents, socat), saw {}",
        procs.len()
    );
    let dir = dir.context("no lab directory recorded")?;
    ensure!(!dir.exists(), "{} is left after down", dir.display());
    let again = lab.xtask_ok(&["down"], Duration::from_secs(120))?;
    println!("second down: {}", again.trim());
    println!(
        "down left nothing: no {prefix}* namespace, no {}, none of {} processes, no {}",
        cg_root.display(),
        procs.len(),
        dir.display()
    );
    Ok(())
}

fn scenarios(lab: &mut Lab, removed_pids: &mut Vec<(u32, u64)>) -> Result<()> {
    let (n1, n2, n3) = (lab.node("n1")?, lab.node("n2")?, lab.node("n3")?);
    let web1 = n1.cgroup.join("web");

    // The status page: three nodes, agent and etcd up on each, the demo services.
    let status = lab.xtask_ok(&["status"], Duration::from_secs(60))?;
    println!("{status}");
    for (name, node) in [("n1", &n1), ("n2", &n2), ("n3", &n3)] {
        let line = status
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&node.ip))
            .with_context(|| format!("status has no line for {name}:\n{status}"))?;
        ensure!(
            line.matches("up").count() >= 2 && !line.contains("DOWN"),
            "{name} is not all up: {line}"
        );
    }
    for needle in [
        "socat",
        "web",
        "web => socat (allow)",
        &format!("{}:{SOCAT_PORT}", n3.ip),
    ] {
        ensure!(
            status.contains(needle),
            "status lacks {needle:?}:\n{status}"
        );
    }

    // 1. web on n1 reaches socat on n3 through both proxies.
    let payload = format!("lab-{}", std::process::id());
    let mut last = String::new();
    let took = wait_for(
        Duration::from_secs(20),
        "web on n1 to reach socat on n3",
        || {
            last =
                echo(&n1, &web1, &n3.ip, SOCAT_PORT, &payload).unwrap_or_else(|e| format!("{e:#}"));
            last.contains(&payload)
        },
    )
    .with_context(|| format!("last: {last}"))?;
    println!(
        "1. web on n1 -> socat on {}:{SOCAT_PORT} (n3): echo {last} ({} ms)",
        n3.ip,
        took.as_millis()
    );

    // 2. A deny created through n2's API, enforced by n3. A prober in web on n1 opens a
    //    new connection every 20 ms; a long-lived connection shows the live-close too.
    let probe = Spawned::start(
        &n1.ns,
        Some(&web1),
        "python3",
        &["-c", PROBER, &n3.ip, &SOCAT_PORT.to_string(), "0.02"],
        scratch("prober"),
    )?;
    let live = Spawned::start(
        &n1.ns,
        Some(&web1),
        "python3",
        &[
            "-u",
            "-c",
            LONG_LIVED,
            &n3.ip,
            &SOCAT_PORT.to_string(),
            "0.05",
            "30",
        ],
        scratch("live-n1"),
    )?;
    wait_for(Duration::from_secs(20), "the prober's first echoes", || {
        probe.lines().iter().filter(|l| l.contains(" ok")).count() >= 3
    })?;
    wait_for(
        Duration::from_secs(20),
        "the live connection's first echo",
        || live.lines().iter().any(|l| l.ends_with(" ok")),
    )?;
    let before = probe.lines().len();
    let denied_by_n3 = denials(&n3)?;
    let t_start = now();
    let created = cli_ok(
        lab,
        &n2,
        &["intention", "create", "-deny", "-replace", "web", "socat"],
    )?;
    let t_created = now();
    ensure!(created.contains("web => socat (deny)"), "{created}");
    let mut first_denied = None;
    wait_for(Duration::from_secs(10), "a denied connection", || {
        first_denied = probe.lines().iter().skip(before).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"denied"))
                .then(|| f.get(1).and_then(|v| v.parse::<f64>().ok()))
                .flatten()
        });
        first_denied.is_some()
    })
    .with_context(|| format!("prober:\n{}", probe.lines().join("\n")))?;
    let denied_at = first_denied.unwrap_or_default();
    // Every attempt after the first denied one is denied too.
    let after: Vec<String> = probe
        .lines()
        .into_iter()
        .skip(before)
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                > Some(denied_at)
        })
        .collect();
    ensure!(
        after.iter().all(|l| l.contains(" denied")),
        "a connection got through after the deny:\n{}",
        after.join("\n")
    );
    // From the moment the CLI started on n2 (its process start, the API call and the
    // etcd write included) to the end of the first connection n3 refused.
    let enforce_ms = (denied_at - t_start) * 1000.0;
    println!(
        "2. deny web => socat created through n2's API (the CLI ran {:.0} ms); n3 refused web {enforce_ms:.0} ms after the CLI started",
        (t_created - t_start) * 1000.0,
    );
    ensure!(
        enforce_ms < 1000.0,
        "the deny took {enforce_ms:.0} ms to be enforced on n3 (limit 1000 ms)"
    );
    // It is n3's inbound proxy that refuses them.
    let denied_now = denials(&n3)?;
    ensure!(
        denied_now > denied_by_n3,
        "n3's proxy counted no denial ({denied_by_n3} before, {denied_now} after)"
    );
    println!(
        "   n3's inbound proxy counted {} denials",
        denied_now - denied_by_n3
    );
    let live_closed = wait_for(
        Duration::from_secs(10),
        "the live connection to close",
        || live.lines().iter().any(|l| l.contains(" fail ")),
    );
    match live_closed {
        Ok(_) => {
            let at = live
                .lines()
                .iter()
                .find(|l| l.contains(" fail "))
                .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or_default();
            println!(
                "   the live web -> socat connection was closed {:.0} ms after the CLI started",
                (at - t_start) * 1000.0
            );
        }
        Err(_) => bail!(
            "the live connection survived the deny:\n{}",
            live.lines().join("\n")
        ),
    }
    drop(live);
    let t_allow = now();
    cli_ok(
        lab,
        &n2,
        &["intention", "create", "-allow", "-replace", "web", "socat"],
    )?;
    let before = probe.lines().len();
    wait_for(
        Duration::from_secs(10),
        "connections to be allowed again",
        || probe.lines().iter().skip(before).any(|l| l.contains(" ok")),
    )?;
    println!(
        "   allow again through n2: connections pass {:.0} ms later",
        (now() - t_allow) * 1000.0
    );
    drop(probe);

    // 3. n2's etcd member and agent stop (by PID): the agent with SIGTERM (its eBPF
    //    programs stay pinned and keep n2's ports protected), etcd with SIGKILL (a
    //    crash).
    let agent2 = lab.proc("n2", "agent")?;
    let etcd2 = lab.proc("n2", "etcd")?;
    stop_pid(
        agent2,
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(5),
    )?;
    stop_pid(
        etcd2,
        nix::sys::signal::Signal::SIGKILL,
        Duration::from_secs(5),
    )?;
    removed_pids.extend([agent2, etcd2]);
    let status = lab.xtask_ok(&["status"], Duration::from_secs(60))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("n2"))
        .unwrap_or_default();
    ensure!(
        line.matches("DOWN").count() == 2,
        "status should show n2 down: {line}\n{status}"
    );
    println!(
        "3. n2 stopped (agent pid {}, etcd pid {}); status: {line}",
        agent2.0, etcd2.0
    );
    let payload = format!("while-n2-is-down-{}", std::process::id());
    let took = wait_for(
        Duration::from_secs(10),
        "web on n1 to reach socat on n3 with n2 down",
        || echo(&n1, &web1, &n3.ip, SOCAT_PORT, &payload).is_ok_and(|e| e.contains(&payload)),
    )?;
    println!(
        "   web n1 -> socat n3 with n2 down: echo ok ({} ms)",
        took.as_millis()
    );
    // Writes: an intention through n1 and a service registered on n3.
    let t_write = Instant::now();
    wait_for_cli(
        lab,
        &n1,
        &["intention", "create", "-deny", "api", "socat"],
        Duration::from_secs(15),
        "n1 to accept a write with n2 down",
    )?;
    let api_def = scratch("api.json");
    std::fs::write(&api_def, r#"{"service": {"name": "api", "port": 9090}}"#)?;
    let registered = cli_ok(
        lab,
        &n3,
        &["services", "register", &api_def.to_string_lossy()],
    );
    let _ = std::fs::remove_file(&api_def);
    registered?;
    println!(
        "   writes with n2 down: intention api => socat (deny) on n1, service api on n3 ({} ms)",
        t_write.elapsed().as_millis()
    );
    wait_for(
        Duration::from_secs(10),
        "n3 to see the intention made on n1",
        || cli(lab, &n3, &["intention", "get", "api", "socat"]).is_ok_and(|o| o.status.success()),
    )?;
    let t_restart = Instant::now();
    let out = lab.xtask_ok(&["start", "n2"], Duration::from_secs(120))?;
    lab.reload()?;
    println!("   {} ({} ms)", out.trim(), t_restart.elapsed().as_millis());
    let reference = snapshot(&n1)?;
    ensure!(
        reference["services"]["api"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "n1 does not list api: {reference}"
    );
    let mut seen = Value::Null;
    let took = wait_for(
        Duration::from_secs(20),
        "n2 to serve the same state as n1",
        || {
            seen = snapshot(&n2).unwrap_or_default();
            seen == reference
        },
    )
    .with_context(|| format!("n1: {reference}\nn2: {seen}"))?;
    let n3_state = snapshot(&n3)?;
    ensure!(
        n3_state == reference,
        "n3 differs:\nn1: {reference}\nn3: {n3_state}"
    );
    println!(
        "   n2 caught up {} ms after its agent answered: n1, n2, n3 serve the same {} services and {} intentions",
        took.as_millis(),
        reference["services"].as_object().map_or(0, |o| o.len()),
        reference["intentions"].as_array().map_or(0, |a| a.len())
    );
    let status = lab.xtask_ok(&["status"], Duration::from_secs(60))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("n2"))
        .unwrap_or_default();
    ensure!(!line.contains("DOWN"), "n2 should be up again: {line}");

    // 4. Cut n3 off for ten seconds. `web` gets an instance on n3 too; its long-lived
    //    connection to socat on n3 stays on n3 (loopback to n3's own inbound port), so
    //    the cut link is not on its path, and n3's agent authorizes from its cache.
    let web3 = n3.cgroup.join("web");
    std::fs::create_dir_all(&web3)?;
    let web3_def = scratch("web-n3.json");
    std::fs::write(
        &web3_def,
        r#"{"service": {"name": "web", "id": "web-n3", "port": 0, "cgroup": "web"}}"#,
    )?;
    let registered = cli_ok(
        lab,
        &n3,
        &["services", "register", &web3_def.to_string_lossy()],
    );
    let _ = std::fs::remove_file(&web3_def);
    registered?;
    wait_for(
        Duration::from_secs(20),
        "web on n3 to reach socat on n3",
        || echo(&n3, &web3, &n3.ip, SOCAT_PORT, "local").is_ok_and(|e| e.contains("local")),
    )?;
    let live = Spawned::start(
        &n3.ns,
        Some(&web3),
        "python3",
        &[
            "-u",
            "-c",
            LONG_LIVED,
            &n3.ip,
            &SOCAT_PORT.to_string(),
            "0.2",
            "120",
        ],
        scratch("live-n3"),
    )?;
    wait_for(
        Duration::from_secs(20),
        "the long-lived connection on n3",
        || live.lines().iter().any(|l| l.ends_with(" ok")),
    )
    .with_context(|| format!("{:?}", live.lines()))?;
    let bridge_ns = lab.state["bridge_ns"]
        .as_str()
        .context("bridge_ns")?
        .to_owned();
    let link = |state: &str| -> Result<()> {
        let out = run_bounded(
            Command::new("ip").args(["-n", &bridge_ns, "link", "set", &n3.bridge_port, state]),
            Duration::from_secs(10),
        )?;
        ensure!(out.status.success(), "ip link set {state}: {}", text(&out));
        Ok(())
    };
    let t_cut = now();
    let cut_at = Instant::now();
    link("down")?;
    let during_cut = (|| -> Result<()> {
        // The cut is real: n3 reaches nobody.
        let reach = run_bounded(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", n3.ns))
                .args(["--", "nc", "-z", "-w", "1", &n1.ip, "2379"]),
            Duration::from_secs(5),
        )?;
        ensure!(
            !reach.status.success(),
            "n3 still reaches n1's etcd during the cut"
        );
        // A write on n1 during the cut (n1 and n2 are a quorum). A request n1's etcd
        // client sends on its connection to n3's member hangs until the store's 5 s
        // timeout, until HTTP/2 keepalive (10 s + 5 s) drops that connection; so
        // retry for up to 25 s, and report the failed attempts.
        let mut failed = Vec::new();
        let took = wait_for(
            Duration::from_secs(25),
            "n1 to accept a write during the cut",
            || match cli(lab, &n1, &["intention", "create", "-deny", "db", "socat"]) {
                Ok(o) if o.status.success() => true,
                Ok(o) => {
                    failed.push(text(&o).trim().to_owned());
                    false
                }
                Err(e) => {
                    failed.push(format!("{e:#}"));
                    false
                }
            },
        )
        .with_context(|| format!("failed attempts: {failed:#?}"))?;
        println!(
            "4. n3 cut off (bridge port {} down); n1 accepted intention db => socat {} ms into the cut, after {} failed attempt(s){}",
            n3.bridge_port,
            took.as_millis(),
            failed.len(),
            failed
                .iter()
                .map(|f| format!("\n     failed: {f}"))
                .collect::<String>()
        );
        // A new connection on n3 is authorized from the cache, too.
        let echo3 = echo(&n3, &web3, &n3.ip, SOCAT_PORT, "new-during-cut")?;
        ensure!(
            echo3.contains("new-during-cut"),
            "new connection on n3 during the cut: {echo3}"
        );
        let seen = cli(lab, &n3, &["intention", "get", "db", "socat"])?;
        ensure!(
            !seen.status.success(),
            "n3 saw the write during the cut: {}",
            text(&seen)
        );
        Ok(())
    })();
    // Ten seconds down (longer only if the write above needed longer).
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed()));
    let t_heal = now();
    link("up")?;
    let healed_at = Instant::now();
    during_cut?;
    let lines = live.lines();
    let during = lines
        .iter()
        .filter(|l| {
            l.ends_with(" ok")
                && l.split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|t| t > t_cut && t < t_heal)
        })
        .count();
    ensure!(
        !lines.iter().any(|l| l.contains(" fail ")),
        "the long-lived connection on n3 failed:\n{}",
        lines.join("\n")
    );
    let cut_secs = t_heal - t_cut;
    ensure!(
        during as f64 >= cut_secs * 2.0,
        "only {during} echoes on the long-lived connection during the {cut_secs:.1} s cut"
    );
    println!(
        "   during the {cut_secs:.1} s cut: {during} echoes on the long-lived web -> socat connection on n3, none failed; a new connection was authorized; n3 did not see the write"
    );
    let took = wait_for_cli(
        lab,
        &n3,
        &["intention", "get", "db", "socat"],
        Duration::from_secs(60),
        "n3 to see the write made during the cut",
    )?;
    println!(
        "   link up: n3 saw intention db => socat {} ms later",
        took.as_millis()
    );
    let reference = snapshot(&n1)?;
    let mut seen = Value::Null;
    wait_for(
        Duration::from_secs(20),
        "n3 to serve the same state as n1",
        || {
            seen = snapshot(&n3).unwrap_or_default();
            seen == reference
        },
    )
    .with_context(|| format!("n1: {reference}\nn3: {seen}"))?;
    let converged = healed_at.elapsed();
    // The long-lived connection still works after the link returned.
    let before = live.lines().len();
    wait_for(
        Duration::from_secs(10),
        "another echo on the long-lived connection",
        || live.lines().iter().skip(before).any(|l| l.ends_with(" ok")),
    )?;
    let lines = live.lines();
    ensure!(
        !lines.iter().any(|l| l.contains(" fail ") || l == "done"),
        "the long-lived connection on n3 ended:\n{}",
        lines.join("\n")
    );
    println!(
        "   n3 serves the same catalog and intentions as n1 {} ms after the link returned; the long-lived connection made {} round trips without a failure",
        converged.as_millis(),
        lines.iter().filter(|l| l.ends_with(" ok")).count()
    );
    drop(live);
    // And etcd is whole again: every member healthy, as the status page shows.
    let mut status = String::new();
    let took = wait_for(
        Duration::from_secs(30),
        "every agent and etcd member up",
        || {
            status = lab
                .xtask_ok(&["status"], Duration::from_secs(60))
                .unwrap_or_default();
            let nodes: Vec<&str> = status.lines().filter(|l| l.starts_with('n')).collect();
            nodes.len() == 3
                && nodes
                    .iter()
                    .all(|l| !l.contains("DOWN") && !l.contains("UNHEALTHY"))
        },
    )
    .with_context(|| status.clone())?;
    println!(
        "   every agent and etcd member up {} ms after that:\n{status}",
        took.as_millis()
    );
    Ok(())
}
