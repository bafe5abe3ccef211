//! Two real agents on one three-member etcd cluster: every component works on the
//! etcd store, not only the store itself. One CA for both (the second agent loads
//! the one the first created); a service registered on one agent and an intention
//! created through it reach the other within 2 s; both give a service one virtual
//! IP; with every etcd member killed the other agent keeps answering authorize,
//! serving its leaf and resolving names from memory, writes
//! fail in bounded time, and once etcd is back writes work and changes flow between
//! the agents again (the store reconnects its requests and its watches).
//!
//! Needs Debian's `etcd-server` (the `etcd` binary on PATH), `dig` (dnsutils) and
//! the agent binary
//! (`cargo build -p connect-agent --bin connect-agent`); fails saying so otherwise.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::{AgentProcess, http, private_tempdir},
    dig,
    etcd::EtcdCluster,
    wait::wait_for_ok,
};
use serde_json::{Value, json};

/// How fast a change made through one agent must reach the other.
const PROPAGATION: Duration = Duration::from_secs(2);
/// How long writes may take to work again once etcd serves again: the first write
/// reconnects to a member.
const RECOVERY: Duration = Duration::from_secs(20);
/// The first write after the outage, which also waits for the writer's own view to
/// include it (at most 5 s, `CATCH_UP_TIMEOUT` in intentions).
const FIRST_WRITE: Duration = Duration::from_secs(3);
/// How long a watch may take to reconnect after etcd is back: its backoff is capped
/// at 5 s (`store::etcd`), plus jitter and the time to reopen.
const WATCH_RECOVERY: Duration = Duration::from_secs(10);
/// A request while etcd is down fails within the store's 5 s request timeout; the
/// API adds little, and the machine may be slow.
const FAIL_WITHIN: Duration = Duration::from_secs(15);

/// An agent on the etcd store with ACLs on and default allow (no tokens needed).
fn start_agent(dir: &tempfile::TempDir, store: &str, node: &str) -> Result<AgentProcess> {
    AgentProcess::start_in(
        dir.path(),
        // Both are server agents (no etcd auth here): either may create the CA.
        &["--store", store, "--server"],
        &["--acl-default-policy", "allow", "--node-name", node],
    )
    .with_context(|| format!("starting agent {node}"))
}

/// `method path` with a JSON body; the status and the parsed answer (`Null` when
/// the body is not JSON, e.g. an error text).
fn call(
    agent: &AgentProcess,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let body = body.map(Value::to_string);
    let (status, text) = http(agent.http_addr, method, path, body.as_deref())
        .with_context(|| format!("{method} {path} on {}", agent.http_addr))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// `call` that must answer 200.
fn ok(agent: &AgentProcess, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let (status, value) = call(agent, method, path, body)?;
    ensure!(
        status == 200,
        "{method} {path} answered {status}: {value}\nagent log:\n{}",
        agent.log()
    );
    Ok(value)
}

/// [`wait_for_ok`] with the agent's log on timeout.
fn wait_for(
    what: &str,
    within: Duration,
    agent: &AgentProcess,
    check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    wait_for_ok(within, what, check).with_context(|| format!("agent log:\n{}", agent.log()))
}

/// Whether B's catalog lists a Connect endpoint of `service` on `node`.
fn lists_connect(agent: &AgentProcess, service: &str, node: &str) -> Result<bool> {
    let entries = ok(
        agent,
        "GET",
        &format!("/v1/catalog/connect/{service}"),
        None,
    )?;
    Ok(entries
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["Node"] == node)))
}

/// B's authorize answer for `source` → `target`.
fn authorized(agent: &AgentProcess, td: &str, source: &str, target: &str) -> Result<bool> {
    let body = json!({
        "Target": target,
        "ClientCertURI": format!("spiffe://{td}/ns/default/dc/dc1/svc/{source}"),
    });
    let answer = ok(agent, "POST", "/v1/agent/connect/authorize", Some(&body))?;
    answer["Authorized"]
        .as_bool()
        .with_context(|| format!("authorize answered {answer}"))
}

/// The virtual IP `agent`'s DNS server answers for `<service>.virtual.consul`.
fn vip_of(agent: &AgentProcess, service: &str) -> Result<String> {
    let name = format!("{service}.virtual.consul");
    let answer = dig::run(&dig::argv(&[], Some(agent.dns_addr), &[&name, "A"]))?;
    ensure!(answer.status == "NOERROR", "{name}: {answer:?}");
    let [ip] = <[String; 1]>::try_from(answer.data("A"))
        .map_err(|v| anyhow::anyhow!("{name}: one A record expected, got {v:?}"))?;
    Ok(ip)
}

fn deny(source: &str, destination: &str) -> Value {
    json!({"SourceName": source, "DestinationName": destination, "Action": "deny"})
}

/// A registration of `name` on a port of its own (a port belongs to one service
/// per node).
fn register_body(name: &str) -> Value {
    let port = 8000 + name.bytes().map(u16::from).sum::<u16>() % 1000;
    json!({
        "Name": name,
        "ID": format!("{name}-1"),
        "Port": port,
        "Connect": {"SidecarService": {}},
    })
}

/// Retries a write until it answers 200 (etcd just came back); how long it took.
fn write_until_ok(
    agent: &AgentProcess,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let (status, value) = call(agent, method, path, Some(body))?;
        if status == 200 {
            return Ok(started.elapsed());
        }
        println!(
            "{method} {path}: {status} {value} after {:?}",
            started.elapsed()
        );
        ensure!(
            started.elapsed() < RECOVERY,
            "{method} {path} still answers {status} ({value}) {RECOVERY:?} after etcd came back\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_one_etcd_cluster_and_ride_out_its_outage() -> Result<()> {
    // Dropped in reverse order: agents first, then their directories, then etcd.
    let mut etcd = EtcdCluster::start(3).await?;
    let store = format!("etcd://{}", etcd.endpoints().join(","));
    let (dir_a, dir_b) = (
        private_tempdir("connect-etcd-agent-")?,
        private_tempdir("connect-etcd-agent-")?,
    );
    let a = start_agent(&dir_a, &store, "node-a")?;
    let b = start_agent(&dir_b, &store, "node-b")?;

    // ── One CA: B loaded what A created. ──
    let roots_a = ok(&a, "GET", "/v1/agent/connect/ca/roots", None)?;
    let roots_b = ok(&b, "GET", "/v1/agent/connect/ca/roots", None)?;
    let td = roots_a["TrustDomain"]
        .as_str()
        .context("roots without a TrustDomain")?
        .to_owned();
    assert_eq!(roots_b["TrustDomain"], roots_a["TrustDomain"]);
    assert_eq!(roots_b["ActiveRootID"], roots_a["ActiveRootID"]);
    assert_eq!(roots_a["Roots"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        roots_b["Roots"], roots_a["Roots"],
        "both agents trust one root"
    );
    assert!(a.log().contains("CA bootstrapped"), "A created the CA");
    assert!(
        !b.log().contains("CA bootstrapped"),
        "B must load A's CA, not create one:\n{}",
        b.log()
    );
    // B's leaves carry the shared trust domain.
    let leaf = ok(&b, "GET", "/v1/agent/connect/ca/leaf/web", None)?;
    let uri = leaf["ServiceURI"].as_str().unwrap_or_default();
    assert!(uri.starts_with(&format!("spiffe://{td}/")), "{uri}");

    // ── The catalog: registered on A, listed by B. ──
    ok(
        &a,
        "PUT",
        "/v1/agent/service/register",
        Some(&register_body("web")),
    )?;
    let seen = wait_for("B lists A's web", PROPAGATION, &b, || {
        lists_connect(&b, "web", "node-a")
    })?;
    println!("B listed the service registered on A after {seen:?}");
    let entries = ok(&b, "GET", "/v1/catalog/connect/web", None)?;
    assert_eq!(entries[0]["ServiceID"], "web-1-sidecar-proxy", "{entries}");

    // ── Virtual IPs: allocated once in etcd, the same on both agents. ──
    let vip = vip_of(&b, "web")?;
    assert_eq!(vip_of(&a, "web")?, vip, "one virtual IP per service");
    println!("both agents resolve web.virtual.consul to {vip}");

    // ── Intentions: created through A, enforced by B. ──
    assert!(authorized(&b, &td, "web", "db")?, "default allow");
    ok(
        &a,
        "POST",
        "/v1/connect/intentions",
        Some(&deny("web", "db")),
    )?;
    let seen = wait_for("B denies web → db", PROPAGATION, &b, || {
        Ok(!authorized(&b, &td, "web", "db")?)
    })?;
    println!("B denied after the intention created on A after {seen:?}");

    // A leaf B holds before etcd goes away.
    let leaf_db = ok(&b, "GET", "/v1/agent/connect/ca/leaf/db", None)?;
    let serial = leaf_db["SerialNumber"].clone();
    assert!(serial.is_string(), "{leaf_db}");

    // ── etcd down: every member killed by its PID. ──
    let pids = etcd.pids();
    assert_eq!(pids.len(), 3);
    etcd.stop_all()?;
    println!("killed etcd members {pids:?}");
    let down = Instant::now();
    // A while for the agents to notice (their streams break, watches retry).
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        assert!(!authorized(&b, &td, "web", "db")?, "B forgot the deny");
        assert!(authorized(&b, &td, "api", "db")?, "default allow still");
        let again = ok(&b, "GET", "/v1/agent/connect/ca/leaf/db", None)?;
        assert_eq!(again["SerialNumber"], serial, "B serves the leaf it held");
        assert_eq!(again["CertPEM"], leaf_db["CertPEM"]);
        assert!(
            lists_connect(&b, "web", "node-a")?,
            "B's catalog from memory"
        );
        assert_eq!(vip_of(&b, "web")?, vip, "B resolves from memory");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Writes fail, in bounded time, on both agents.
    for (agent, name) in [(&a, "A"), (&b, "B")] {
        let started = Instant::now();
        let (status, _) = call(
            agent,
            "POST",
            "/v1/connect/intentions",
            Some(&deny("api", "db")),
        )?;
        let took = started.elapsed();
        assert_eq!(status, 500, "a write through {name} with etcd down");
        assert!(took < FAIL_WITHIN, "{name} took {took:?} to fail a write");
        println!("a write through {name} with etcd down failed after {took:?}");
    }
    println!("etcd was down for {:?}", down.elapsed());

    // ── etcd back: writes work again, changes flow both ways. ──
    etcd.start_all().await?;
    let back = Instant::now();
    println!("etcd serves again (members {:?})", etcd.pids());
    let took = write_until_ok(&b, "POST", "/v1/connect/intentions", &deny("api", "db"))?;
    println!("the first write through B after etcd came back took {took:?}");
    // The write reconnected B's store, which woke B's watches from their backoff: B's
    // own view caught up with the write at once, rather than after the 5 s a write
    // waits for it at most.
    assert!(
        took < FIRST_WRITE,
        "the first write after the outage took {took:?}"
    );
    let seen = wait_for("A denies api → db", WATCH_RECOVERY, &a, || {
        Ok(!authorized(&a, &td, "api", "db")?)
    })?;
    println!(
        "A saw B's intention {seen:?} after it was written ({:?} after etcd came back)",
        back.elapsed()
    );
    let took = write_until_ok(
        &a,
        "PUT",
        "/v1/agent/service/register",
        &register_body("api"),
    )?;
    println!("the first write through A after etcd came back took {took:?}");
    let seen = wait_for("B lists A's api", WATCH_RECOVERY, &b, || {
        lists_connect(&b, "api", "node-a")
    })?;
    println!(
        "B listed A's new service {seen:?} after it was registered ({:?} after etcd came back)",
        back.elapsed()
    );

    ok(
        &b,
        "PUT",
        "/v1/agent/service/register",
        Some(&register_body("db")),
    )?;
    let seen = wait_for("A lists B's db", WATCH_RECOVERY, &a, || {
        lists_connect(&a, "db", "node-b")
    })?;
    println!("A listed B's db after {seen:?}");
    ok(
        &a,
        "POST",
        "/v1/connect/intentions",
        Some(&deny("db", "web")),
    )?;
    let seen = wait_for("B denies db → web", WATCH_RECOVERY, &b, || {
        Ok(!authorized(&b, &td, "db", "web")?)
    })?;
    println!("B denied db → web after {seen:?}");

    // Every watch is back: changes reach the other agent within 2 s again.
    ok(
        &a,
        "PUT",
        "/v1/agent/service/register",
        Some(&register_body("cache")),
    )?;
    let seen = wait_for("B lists A's cache", PROPAGATION, &b, || {
        lists_connect(&b, "cache", "node-a")
    })?;
    println!("after recovery, B listed A's cache after {seen:?}");
    ok(
        &b,
        "POST",
        "/v1/connect/intentions",
        Some(&deny("cache", "db")),
    )?;
    let seen = wait_for("A denies cache → db", PROPAGATION, &a, || {
        Ok(!authorized(&a, &td, "cache", "db")?)
    })?;
    println!("after recovery, A denied cache → db after {seen:?}");
    // Still one CA.
    assert_eq!(
        ok(&b, "GET", "/v1/agent/connect/ca/roots", None)?["Roots"],
        roots_a["Roots"]
    );
    Ok(())
}
