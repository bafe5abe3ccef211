//! A dead workload's PID, given to another process, earns nothing (issue 19).
//!
//! Attestation names the caller by the PID `SO_PEERCRED` reports: the PID the
//! process that connected had at `connect()`. A connection outlives that process
//! when another process holds it, and the PID can then be given to a new process.
//! Here process A, in web's cgroup, connects to the Workload API, passes the
//! connection to the test process (C, outside every service cgroup) and exits;
//! once A is reaped, B is started with A's PID in socat's cgroup (through
//! `/proc/sys/kernel/ns_last_pid`). C's `FetchX509SVID` over A's connection gets
//! `PERMISSION_DENIED`: neither web's SVID (A is gone) nor socat's (B did not
//! connect); the agent's pidfd of A says A is gone although its PID names a live
//! process in a service's cgroup. Beside it, the control: the same client, over a
//! connection B made, gets socat's SVID.

use std::{os::unix::net::UnixListener, path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use connect_agent::workload::attest::cgroup_dir_of;
use connect_tests::{
    agent::{AgentProcess, free_port},
    lab::{CgroupProc, TestCgroup, require_privileges},
    mesh::{TempDir, register},
    workload::{HAND_OVER, Holder, fetch_x509_svid_over, receive_connection},
};
use serde_json::json;

/// Tries at making B with A's PID: another process of the machine may take the
/// PID between the write to `ns_last_pid` and the fork (the test's own threads
/// do not fork meanwhile). A few in a hundred are lost on a busy machine.
const PID_ATTEMPTS: usize = 200;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Starts a [`Holder`] in `cgroup` whose PID is `pid`: `pid - 1` is written to
/// `ns_last_pid` (of this, the initial, PID namespace) and the fork follows at
/// once. Holders that got another PID are killed before they connect. Returns
/// it and the attempts it took.
fn holder_with_pid(
    pid: u32,
    cgroup: &Path,
    socket: &Path,
    hand_over: &Path,
) -> Result<(Holder, usize)> {
    let last_pid = Path::new("/proc/sys/kernel/ns_last_pid");
    for attempt in 1..=PID_ATTEMPTS {
        std::fs::write(last_pid, (pid - 1).to_string()).with_context(|| {
            format!(
                "writing {} (needs root with CAP_SYS_ADMIN, or CAP_CHECKPOINT_RESTORE, in the initial PID namespace)",
                last_pid.display()
            )
        })?;
        let h = Holder::spawn(cgroup, socket, hand_over)?;
        if h.pid() == pid {
            return Ok((h, attempt));
        }
        drop(h);
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!(
        "could not give PID {pid} to a new process in {PID_ATTEMPTS} attempts: other processes on this machine took it first"
    )
}

#[test]
fn a_dead_workloads_pid_given_to_another_process_gets_no_svid() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("wlpid")?;
    let web_cg = cg.child("web")?.to_owned();
    let socat_cg = cg.child("socat")?.to_owned();
    let agent = AgentProcess::start_dev("wlpid", &["--cgroup", &cg.path.to_string_lossy()])?;
    register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
    register(
        &agent,
        &json!({"Name": "socat", "Port": free_port()?, "cgroup": "socat"}),
    )?;
    let socket = agent
        .workload_socket
        .clone()
        .context("the harness gives the agent a Workload API socket")?;
    let own = cgroup_dir_of("self")?;
    ensure!(
        !own.starts_with(&cg.path),
        "the test process (C) runs outside --cgroup: {}",
        own.display()
    );
    let dir = TempDir::new("wlpid")?;
    let hand_over = dir.0.join("hand-over.sock");
    let listener = UnixListener::bind(&hand_over)?;

    // A: connects from web's cgroup, passes the connection to C, exits, is reaped.
    let a = CgroupProc::spawn(
        &web_cg,
        "python3",
        &[
            "-c",
            HAND_OVER,
            &socket.to_string_lossy(),
            &hand_over.to_string_lossy(),
            "exit",
        ],
    )?;
    let from_a = receive_connection(&listener, TIMEOUT)?;
    let (code, out, err) = a.output(TIMEOUT)?;
    ensure!(code == 0, "A failed ({code}): {out}\n{err}");
    let a_pid: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("A printed no PID: {out}"))?;

    // B: A's PID, in socat's cgroup; it makes a connection of its own too.
    let (mut b, attempts) = holder_with_pid(a_pid, &socat_cg, &socket, &hand_over)?;
    b.go()?;
    let from_b = receive_connection(&listener, TIMEOUT)?;
    let b_cgroup = cgroup_dir_of(&a_pid.to_string())?;
    ensure!(
        b_cgroup == socat_cg,
        "PID {a_pid} names B in socat's cgroup now, not {}",
        b_cgroup.display()
    );

    // C over A's connection: nothing.
    match fetch_x509_svid_over(from_a, TIMEOUT)? {
        Ok(ids) => bail!(
            "dead A's connection, its PID {a_pid} now B's in socat's cgroup, got SVIDs {ids:?}\n{}",
            agent.log()
        ),
        Err(status) => ensure!(
            status.code() == tonic::Code::PermissionDenied,
            "dead A's connection: {status:?}"
        ),
    }
    let log = agent.log();
    ensure!(
        log.contains(&format!("the calling process {a_pid} is gone")),
        "the denial says A is gone:\n{log}"
    );

    // Control: the same client over B's own connection gets socat's SVID.
    let ids = fetch_x509_svid_over(from_b, TIMEOUT)?
        .map_err(|s| anyhow::anyhow!("B's own connection: {s:?}\n{}", agent.log()))?;
    ensure!(
        ids.len() == 1 && ids[0].ends_with("/ns/default/dc/dc1/svc/socat"),
        "B's own connection: {ids:?}"
    );
    drop(b);
    println!(
        "PID {a_pid} reused by B after {attempts} attempt(s); A's connection denied, B's served"
    );
    Ok(())
}
