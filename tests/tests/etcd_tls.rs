//! The agents' traffic to etcd over TLS, against a real three-member etcd that
//! serves https only (`--cert-file`, `--key-file`, `--trusted-ca-file`) and
//! requires client certificates (`--client-cert-auth`), with certificates made
//! here. Two server agents with `--etcd-ca-file`, `--etcd-cert-file` and
//! `--etcd-key-file` share one CA and one catalog through it; etcdctl without a
//! client certificate is refused (the cluster really checks), and so is an agent
//! without one, or without TLS at all, each with a message that says why.
//!
//! Needs Debian's `etcd-server` and `etcd-client` and the agent binary.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::{AgentProcess, NO_WORKLOAD_API, agent_binary, http, private_tempdir},
    etcd::EtcdCluster,
    mesh::run_bounded,
    wait::wait_for_ok,
};
use serde_json::{Value, json};

fn start_agent(dir: &tempfile::TempDir, cluster: &EtcdCluster, node: &str) -> Result<AgentProcess> {
    let store = format!("etcd://{}", cluster.endpoints().join(","));
    let tls = cluster.tls().context("a TLS cluster")?.agent_flags();
    let mut extra: Vec<&str> = vec!["--acl-default-policy", "allow", "--node-name", node];
    extra.extend(tls.iter().map(String::as_str));
    AgentProcess::start_in(dir.path(), &["--store", &store, "--server"], &extra)
        .with_context(|| format!("starting agent {node} with TLS to etcd"))
}

/// Runs an agent that must fail to start; its stderr.
fn failing_agent(cluster: &EtcdCluster, flags: &[&str]) -> Result<String> {
    let dir = private_tempdir("etcd-tls-refused")?;
    let store = format!("etcd://{}", cluster.endpoints().join(","));
    let free = connect_tests::agent::free_ports::<4>()?;
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let out = run_bounded(
        Command::new(agent_binary()?)
            .args(["--store", &store, "--server", "--node-name", "refused"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--http-addr", &addr(free[0]), "--dns-addr", &addr(free[1])])
            .args([
                "--outbound-addr",
                &addr(free[2]),
                "--inbound-addr",
                &addr(free[3]),
            ])
            .args(NO_WORKLOAD_API)
            .args(flags),
        None,
        Duration::from_secs(40),
    )?;
    ensure!(!out.status.success(), "the agent started: {out:?}");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reach_a_client_cert_etcd_over_tls_only() -> Result<()> {
    let cluster = EtcdCluster::start_tls(3).await?;
    let tls = cluster.tls().context("TLS files")?.clone();

    // The cluster refuses a client without a certificate (positive control
    // beside: the same command with one works).
    cluster.etcdctl(None, &["put", "tls-probe", "1"])?;
    let got = cluster.etcdctl(None, &["get", "tls-probe", "--print-value-only"])?;
    ensure!(
        got.trim() == "1",
        "etcdctl with a client certificate read {got:?}"
    );
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("https://{e}"))
        .collect();
    let bare = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoints.join(","), "--dial-timeout", "2s"])
        .args(["--command-timeout", "3s", "--cacert"])
        .arg(&tls.ca)
        .args(["get", "tls-probe"])
        .output()
        .context("etcdctl")?;
    ensure!(
        !bare.status.success(),
        "etcd served a client without a certificate"
    );

    let (dir_a, dir_b) = (
        private_tempdir("etcd-tls-a")?,
        private_tempdir("etcd-tls-b")?,
    );
    let a = tokio::task::block_in_place(|| start_agent(&dir_a, &cluster, "tls-a"))?;
    let b = tokio::task::block_in_place(|| start_agent(&dir_b, &cluster, "tls-b"))?;
    let roots = |agent: &AgentProcess| -> Result<Value> {
        let (status, body) = http(agent.http_addr, "GET", "/v1/agent/connect/ca/roots", None)?;
        ensure!(status == 200, "roots: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    };
    let (ra, rb) = (roots(&a)?, roots(&b)?);
    ensure!(
        ra["ActiveRootID"] == rb["ActiveRootID"],
        "one CA through etcd: {} vs {}",
        ra["ActiveRootID"],
        rb["ActiveRootID"]
    );
    let body = json!({"Name": "socat", "Port": 8181, "Connect": {"SidecarService": {}}});
    let (status, text) = http(
        a.http_addr,
        "PUT",
        "/v1/agent/service/register",
        Some(&body.to_string()),
    )?;
    ensure!(status == 200, "register: {status} {text}");
    tokio::task::block_in_place(|| {
        wait_for_ok(Duration::from_secs(5), "socat on B's catalog", || {
            let (status, text) = http(b.http_addr, "GET", "/v1/catalog/service/socat", None)?;
            Ok(status == 200 && text.contains("tls-a"))
        })
    })
    .with_context(|| format!("agent B's log:\n{}", b.log()))?;

    // doctor: the store check passes over TLS with a client certificate.
    let doctor = tokio::task::block_in_place(|| {
        run_bounded(
            Command::new(agent_binary()?)
                .args(["doctor", "-http-addr"])
                .arg(a.http_addr.to_string()),
            None,
            Duration::from_secs(20),
        )
    })?;
    let report = String::from_utf8_lossy(&doctor.stdout);
    ensure!(
        report.contains("etcd over TLS, its certificate verified, with a client certificate"),
        "doctor:\n{report}"
    );

    // Without a client certificate, and without TLS, an agent does not start.
    let ca = tls.ca.display().to_string();
    let no_cert =
        tokio::task::block_in_place(|| failing_agent(&cluster, &["--etcd-ca-file", &ca]))?;
    ensure!(
        // The cause is etcd's alert, or (TLS 1.3 sends it after the client's
        // last flight) the broken connection it leaves.
        no_cert.contains("cannot reach etcd") && no_cert.contains("--etcd-cert-file"),
        "an agent without a client certificate must say etcd refused it: {no_cert}"
    );
    let plain = tokio::task::block_in_place(|| failing_agent(&cluster, &[]))?;
    ensure!(
        plain.contains("cannot reach etcd") && plain.contains("needs --etcd-ca-file"),
        "an agent without TLS must fail on the https-only members: {plain}"
    );
    let last = |s: &str| s.lines().last().unwrap_or_default().to_owned();
    println!("refused without a client certificate: {}", last(&no_cert));
    println!("refused without TLS: {}", last(&plain));
    drop((a, b));
    Ok(())
}
