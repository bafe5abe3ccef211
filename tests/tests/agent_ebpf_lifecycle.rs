//! Enforcement outlives the agent process: the programs are attached through links
//! pinned on bpffs, so `kill -9`, a crash or an upgrade leave every protection in
//! force, a restarted agent adopts them without a second stack, and only
//! `connect-agent detach` (or `--detach-on-exit`) removes them.
//!
//! From off the node (a peer namespace over a veth) a prober dials the protected
//! port the whole time, beside an unprotected port of the same server as its
//! positive control; inside the node, `web` is refused rather than sent direct
//! while no agent runs.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use connect_agent::redirect::pins::PinDir;
use connect_tests::{
    agent::{AgentProcess, agent_binary, private_dir},
    lab::{
        CgroupProc, TestCgroup, TestNetns, assert_eventually, attached_programs,
        require_privileges, veth,
    },
    mesh::register,
};
use nix::sys::signal::Signal;
use serde_json::json;

const PROTECTED: u16 = 18201;
const OPEN: u16 = 18202;

/// A TCP server on every port given, saying `direct`.
const SERVE: &str = r#"
import socket, sys, threading, time
def serve(port):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port)); l.listen(64)
    while True:
        c, _ = l.accept(); c.sendall(b"direct"); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
time.sleep(120)
"#;

/// Dials host:port every 100 ms for `seconds`, and prints how many connects of
/// each port succeeded: `protected <ok>/<tries> open <ok>/<tries>`.
const PROBER: &str = r#"
import socket, sys, time
host, protected, open_, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
counts = {protected: [0, 0], open_: [0, 0]}
end = time.monotonic() + seconds
while time.monotonic() < end:
    for port in (protected, open_):
        counts[port][1] += 1
        try:
            s = socket.create_connection((host, port), timeout=0.3)
            if s.recv(10) == b"direct":
                counts[port][0] += 1
            s.close()
        except OSError:
            pass
    time.sleep(0.1)
print("protected %d/%d open %d/%d" % (counts[protected][0], counts[protected][1], counts[open_][0], counts[open_][1]), flush=True)
"#;

const DIAL: &str = "import socket,sys\ntry:\n    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2); print('got',s.recv(10).decode())\nexcept OSError as e:\n    print('failed',e.errno)\n";

fn one_copy_each(cg: &TestCgroup) -> Result<()> {
    let mut attached = attached_programs(&cg.path)?;
    attached.sort();
    let mut expected: Vec<String> = connect_common::program::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    expected.sort();
    ensure!(
        attached == expected,
        "exactly one copy of each program: {attached:?}"
    );
    Ok(())
}

#[test]
fn enforcement_survives_kill_9_and_restart_until_detach() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("lifecycle")?;
    let db = cg.child("db")?.to_owned();
    let web = cg.child("web")?.to_owned();
    let cgroup = cg.path.to_string_lossy().into_owned();
    let node = TestNetns::create("lcn")?;
    let peer = TestNetns::create("lcp")?;
    veth(&node, "198.18.2.9/30", &peer, "198.18.2.10/30")?;
    let dir = private_dir("lifecycle")?;
    let pins = PinDir::for_cgroup(&cg.path);

    let mut first = AgentProcess::start_in(
        &dir,
        &[],
        &["--cgroup", &cgroup, "--acl-default-policy", "allow"],
    )?;
    one_copy_each(&cg)?;
    register(
        &first,
        &json!({"Name": "db", "Port": PROTECTED, "cgroup": "db"}),
    )?;
    register(&first, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
    let _server = node.spawn(
        Some(&db),
        "python3",
        &["-c", SERVE, &PROTECTED.to_string(), &OPEN.to_string()],
    )?;
    let dial_peer = |port: u16| -> Result<String> {
        let (_, out, _) = peer
            .spawn(
                None,
                "python3",
                &["-c", DIAL, "198.18.2.9", &port.to_string()],
            )?
            .output(Duration::from_secs(10))?;
        Ok(out.trim().to_owned())
    };
    assert_eventually(Duration::from_secs(5), "server up, port protected", || {
        dial_peer(OPEN).is_ok_and(|o| o == "got direct")
            && dial_peer(PROTECTED).is_ok_and(|o| o.starts_with("failed"))
    })?;

    // The prober runs across the kill, the gap and the restart.
    let prober = peer.spawn(
        None,
        "python3",
        &[
            "-c",
            PROBER,
            "198.18.2.9",
            &PROTECTED.to_string(),
            &OPEN.to_string(),
            "9",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    first.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5))?;
    drop(first);

    // No agent: the programs are still there, once each, and web is refused
    // instead of reaching the plaintext port; outside the cgroup the port answers
    // (the server is up: the refusal is the programs').
    one_copy_each(&cg)?;
    ensure!(
        pins.links().is_dir(),
        "the links are pinned in {}",
        pins.path.display()
    );
    let (_, out, _) = node
        .spawn(
            Some(&web),
            "python3",
            &["-c", DIAL, "127.0.0.1", &PROTECTED.to_string()],
        )?
        .output(Duration::from_secs(10))?;
    ensure!(out.trim() == "failed 111", "web while no agent runs: {out}");
    let (_, out, _) = node
        .spawn(
            None,
            "python3",
            &["-c", DIAL, "127.0.0.1", &PROTECTED.to_string()],
        )?
        .output(Duration::from_secs(10))?;
    ensure!(
        out.trim() == "got direct",
        "control outside the cgroup: {out}"
    );
    std::thread::sleep(Duration::from_secs(2));

    // A restart adopts the pinned maps and replaces the links: still one copy.
    let second = AgentProcess::start_in(
        &dir,
        &[],
        &["--cgroup", &cgroup, "--acl-default-policy", "allow"],
    )?;
    one_copy_each(&cg)?;
    ensure!(
        second
            .log()
            .contains("adopted the eBPF maps a previous agent left"),
        "the restarted agent adopts the maps:\n{}",
        second.log()
    );
    let (code, out, err) = prober.output(Duration::from_secs(30))?;
    ensure!(code == 0, "prober: {out}{err}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    let ratio = |s: &str| -> Result<(u32, u32)> {
        let (ok, tries) = s.split_once('/').context("ratio")?;
        Ok((ok.parse()?, tries.parse()?))
    };
    let (p_ok, p_tries) = ratio(fields.get(1).context("prober output")?)?;
    let (o_ok, o_tries) = ratio(fields.get(3).context("prober output")?)?;
    ensure!(
        o_tries >= 20 && o_ok == o_tries,
        "the open port answered every probe: {out}"
    );
    ensure!(
        p_tries >= 20 && p_ok == 0,
        "no probe reached the protected port: {out}"
    );

    // A clean stop without --detach-on-exit keeps the programs too.
    let mut second = second;
    second.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15))?;
    ensure!(
        second.log().contains("eBPF programs stay attached"),
        "{}",
        second.log()
    );
    drop(second);
    one_copy_each(&cg)?;

    // Detach is the deliberate act: nothing attached, nothing left in bpffs, and
    // the port is open off the node again (so it was the programs that closed it).
    let out = std::process::Command::new(agent_binary()?)
        .args(["detach", "--cgroup", &cgroup])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.starts_with("Detached"),
        "detach: {text}"
    );
    assert_eventually(
        Duration::from_secs(2),
        "nothing attached after detach",
        || attached_programs(&cg.path).is_ok_and(|a| a.is_empty()),
    )?;
    ensure!(!pins.path.exists(), "{} is gone", pins.path.display());
    ensure!(dial_peer(PROTECTED)? == "got direct", "open after detach");

    // A first start on a bare cgroup (nothing pinned) fills the maps from the store
    // before the programs attach, so they never run without the stored protection.
    // --detach-on-exit: a clean stop removes everything.
    let mut third = AgentProcess::start_in(&dir, &[], &["--cgroup", &cgroup, "--detach-on-exit"])?;
    one_copy_each(&cg)?;
    let log = third.log();
    let programmed = log
        .lines()
        .position(|l| l.contains("eBPF maps programmed from the store") && !l.contains("added=0"))
        .with_context(|| format!("the maps were not filled from the store:\n{log}"))?;
    let attached = log
        .lines()
        .position(|l| l.contains("eBPF programs attached"))
        .with_context(|| format!("no attach line:\n{log}"))?;
    ensure!(
        programmed < attached,
        "maps filled before the programs attach:\n{log}"
    );
    ensure!(
        dial_peer(PROTECTED)?.starts_with("failed"),
        "protected again at once"
    );
    third.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15))?;
    drop(third);
    assert_eventually(Duration::from_secs(2), "detached on exit", || {
        attached_programs(&cg.path).is_ok_and(|a| a.is_empty())
    })?;
    ensure!(
        !pins.path.exists(),
        "{} is gone after --detach-on-exit",
        pins.path.display()
    );
    Ok(())
}

#[test]
fn an_agent_inside_its_own_cgroup_refuses_to_start() -> Result<()> {
    require_privileges()?;
    let cg = TestCgroup::create("inside")?;
    let cgroup = cg.path.to_string_lossy().into_owned();
    let dir = private_dir("inside")?;
    let agent = CgroupProc::spawn(
        &cg.path,
        &agent_binary()?.to_string_lossy(),
        &[
            "--dev",
            "--data-dir",
            &dir.to_string_lossy(),
            "--cgroup",
            &cgroup,
            "--http-addr",
            "127.0.0.1:0",
            "--workload-api-socket",
            "none",
        ],
    )?;
    let (code, _, err) = agent.output(Duration::from_secs(20))?;
    ensure!(code != 0, "the agent must not start: {err}");
    ensure!(
        err.contains("runs inside --cgroup")
            && err.lines().filter(|l| !l.trim().is_empty()).count() <= 2,
        "a one-line reason: {err}"
    );
    ensure!(attached_programs(&cg.path)?.is_empty(), "nothing attached");
    Ok(())
}
