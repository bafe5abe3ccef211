//! A write the agent acknowledged survives `kill -9` at any moment: register
//! services over HTTP as fast as possible, record each 200, SIGKILL the agent
//! mid-stream, restart it on the same data directory and find every acknowledged
//! registration listed. Three rounds on one directory, so each restart also reopens
//! a file that was killed mid-write.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use connect_tests::agent::{AgentProcess, http};
use nix::sys::signal::Signal;

const ROUNDS: usize = 3;
/// How long each round writes before the kill.
const WRITE_FOR: Duration = Duration::from_secs(2);
/// Bound on registrations per round, whatever the machine's speed.
const MAX_WRITES: usize = 5000;

#[test]
fn acknowledged_writes_survive_kill_9() -> Result<()> {
    let dir = tempfile::tempdir().context("creating the data directory")?;
    // The agent refuses a data directory others can enter.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for round in 0..ROUNDS {
        let mut agent =
            AgentProcess::start_in(dir.path(), &[], &["--acl-default-policy", "allow"])?;
        check_all_listed(&agent, &acknowledged, round)?;

        // Writers on threads so that the kill lands while requests are in flight.
        let addr = agent.http_addr;
        let stop_at = Instant::now() + WRITE_FOR;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..MAX_WRITES {
                        if Instant::now() > stop_at + Duration::from_millis(500) {
                            break;
                        }
                        let id = format!("r{round}-w{w}-{i}");
                        let body = format!(
                            r#"{{"Name": "svc{w}", "ID": "{id}", "Port": {}}}"#,
                            1000 + i % 1000
                        );
                        match http(addr, "PUT", "/v1/agent/service/register", Some(&body)) {
                            Ok((200, _)) => acked.push(id),
                            // The agent died under us: this one was not acknowledged.
                            Ok(_) | Err(_) => break,
                        }
                    }
                    acked
                })
            })
            .collect();
        while Instant::now() < stop_at {
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10))?;
        let mut round_acks = 0;
        for w in writers {
            let acked = w.join().map_err(|_| anyhow::anyhow!("a writer panicked"))?;
            round_acks += acked.len();
            acknowledged.extend(acked);
        }
        if round_acks == 0 {
            bail!(
                "round {round}: no registration was acknowledged:\n{}",
                agent.log()
            );
        }
        println!("round {round}: {round_acks} acknowledged writes before kill -9");
    }
    let agent = AgentProcess::start_in(dir.path(), &[], &["--acl-default-policy", "allow"])?;
    check_all_listed(&agent, &acknowledged, ROUNDS)
}

fn check_all_listed(agent: &AgentProcess, acked: &BTreeSet<String>, round: usize) -> Result<()> {
    let (status, body) = http(agent.http_addr, "GET", "/v1/agent/services", None)?;
    if status != 200 {
        bail!("GET /v1/agent/services answered {status}: {body}");
    }
    let listed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&body).context("decoding /v1/agent/services")?;
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !listed.contains_key(*id))
        .collect();
    if !missing.is_empty() {
        bail!(
            "after restart {round}: {} of {} acknowledged registrations are missing, e.g. {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
    }
    Ok(())
}
