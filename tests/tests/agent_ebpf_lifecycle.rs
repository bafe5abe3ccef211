//! The agent binary and the kernel: `--cgroup` attaches every program on start and
//! SIGTERM detaches them; after SIGKILL nothing stays attached (BPF links die with the
//! process), and a restart attaches exactly one copy, never a second stack.

use std::time::Duration;

use anyhow::Result;
use connect_tests::{
    agent::AgentProcess,
    lab::{TestCgroup, assert_eventually, attached_programs, require_privileges},
};
use nix::sys::signal::Signal;

const PROGRAMS: [&str; 4] = ["connect4", "getpeername4", "ingress", "sock_ops"];

fn sorted_attached(cg: &TestCgroup) -> Vec<String> {
    let mut a = attached_programs(&cg.path).unwrap_or_default();
    a.sort();
    a
}

#[test]
fn attach_on_start_detach_on_stop_and_no_stacking_after_sigkill() -> Result<()> {
    require_privileges()?;
    let cg = TestCgroup::create("lifecycle")?;
    let cgroup = cg.path.to_string_lossy().into_owned();
    let expected: Vec<String> = PROGRAMS.iter().map(|s| s.to_string()).collect();

    let mut agent = AgentProcess::start_dev("lifecycle-1", &["--cgroup", &cgroup])?;
    assert_eq!(
        sorted_attached(&cg),
        expected,
        "one of each program while running"
    );
    let status = agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15))?;
    assert!(
        status.success(),
        "SIGTERM is a clean stop: {status}\n{}",
        agent.log()
    );
    assert_eventually(Duration::from_secs(2), "detached after SIGTERM", || {
        sorted_attached(&cg).is_empty()
    })?;
    drop(agent);

    let mut agent = AgentProcess::start_dev("lifecycle-2", &["--cgroup", &cgroup])?;
    assert_eq!(sorted_attached(&cg), expected);
    agent.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5))?;
    assert_eventually(
        Duration::from_secs(2),
        "nothing attached after SIGKILL",
        || sorted_attached(&cg).is_empty(),
    )?;
    drop(agent);

    let agent = AgentProcess::start_dev("lifecycle-3", &["--cgroup", &cgroup])?;
    assert_eq!(
        sorted_attached(&cg),
        expected,
        "a restart attaches exactly one copy"
    );
    drop(agent);
    assert_eventually(
        Duration::from_secs(2),
        "detached when the test ends",
        || sorted_attached(&cg).is_empty(),
    )?;
    Ok(())
}
