//! The Workload API's default socket (issue 19): with no `--workload-api-socket`
//! the agent serves `/run/connect/workload.sock`, mode 0666 in a directory it
//! makes 0755, and a workload in web's cgroup gets web's SVID there. A second
//! agent on the same host, also without the flag, finds it served: it warns,
//! starts without the API and leaves the first one's socket alone. A socket named
//! with the flag that is taken stops an agent, with the flag in the error.
//!
//! The agents run in a mount namespace of their own with an empty tmpfs on
//! `/run` ([`AgentProcess::start_dev_own_run`]): the machine's `/run`, and an
//! agent that may serve the machine's default socket, are never touched, and the
//! namespace and its tmpfs end with the agents.

use std::{os::unix::fs::PermissionsExt, os::unix::net::UnixListener, path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use connect_agent::config::DEFAULT_WORKLOAD_API_SOCKET;
use connect_tests::{
    agent::AgentProcess,
    lab::{TestCgroup, assert_eventually, require_privileges},
    mesh::{TempDir, register},
    workload::{Holder, fetch_x509_svid_over, receive_connection},
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(20);

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .permissions()
        .mode()
        & 0o777)
}

#[test]
fn with_no_flag_the_agent_serves_the_default_socket_and_a_second_agent_only_warns() -> Result<()> {
    require_privileges()?;
    let machine_socket = Path::new(DEFAULT_WORKLOAD_API_SOCKET);
    let machine_had_it = machine_socket.symlink_metadata().is_ok();
    let mut cg = TestCgroup::create("wldef")?;
    let web_cg = cg.child("web")?.to_owned();
    let agent =
        AgentProcess::start_dev_own_run("wldef", &["--cgroup", &cg.path.to_string_lossy()])?;
    register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
    let socket = agent
        .workload_socket
        .clone()
        .context("the agent's default socket")?;
    assert_eventually(TIMEOUT, "the default socket is bound", || socket.exists())?;
    ensure!(mode(&socket)? == 0o666, "the socket is mode 0666");
    let dir = socket.parent().context("its directory")?;
    ensure!(
        mode(dir)? == 0o755,
        "/run/connect, which the agent made, is 0755 (its umask is 077): {:o}",
        mode(dir)?
    );
    ensure!(
        agent.log().contains("SPIFFE Workload API listening")
            && agent.log().contains(DEFAULT_WORKLOAD_API_SOCKET),
        "{}",
        agent.log()
    );

    // A workload in web's cgroup, dialing the default path in the agent's /run,
    // gets web's SVID.
    let tmp = TempDir::new("wldef")?;
    let hand_over = tmp.0.join("hand-over.sock");
    let listener = UnixListener::bind(&hand_over)?;
    let mut web = Holder::spawn(&web_cg, &socket, &hand_over)?;
    web.go()?;
    let conn = receive_connection(&listener, TIMEOUT)?;
    let ids = fetch_x509_svid_over(conn, TIMEOUT)?
        .map_err(|s| anyhow::anyhow!("web over the default socket: {s:?}\n{}", agent.log()))?;
    ensure!(
        ids.len() == 1 && ids[0].ends_with("/ns/default/dc/dc1/svc/web"),
        "web over the default socket: {ids:?}"
    );
    drop(web);

    // A second agent with the same /run and no flag: a warning naming the flag,
    // and it serves everything else; the first agent's socket stays served.
    let second = AgentProcess::start_dev_in_run_of("wldef2", &agent, &[])?;
    let warned = || {
        let log = second.log();
        log.contains("the SPIFFE Workload API is off")
            && log.contains("--workload-api-socket PATH")
            && log.contains("another process serves it")
    };
    assert_eventually(TIMEOUT, "the second agent warns", warned).with_context(|| second.log())?;
    drop(second);
    ensure!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "the second agent left the first one's socket alone"
    );

    // The same socket named with the flag: the agent does not start.
    let path = DEFAULT_WORKLOAD_API_SOCKET.to_owned();
    match AgentProcess::start_dev_in_run_of("wldef3", &agent, &["--workload-api-socket", &path]) {
        Ok(_) => bail!("an agent started with a taken --workload-api-socket"),
        Err(e) => {
            let e = format!("{e:#}");
            ensure!(
                e.contains("exited early")
                    && e.contains(&format!("on {path} (--workload-api-socket)"))
                    && e.contains("another process serves it"),
                "the error names the flag: {e}"
            );
        }
    }

    drop(agent);
    ensure!(
        machine_had_it || machine_socket.symlink_metadata().is_err(),
        "the machine's {DEFAULT_WORKLOAD_API_SOCKET} was never made"
    );
    Ok(())
}
