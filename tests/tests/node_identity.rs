//! Node IDs on a shared etcd: two agents given one node name (agents in network
//! namespaces share the host name, so without `--node-name` they collide) must not
//! break each other. The second to start is refused with one line naming both node
//! IDs and the fix, in either order, and the first keeps its catalog entries; an
//! agent restarted on its own data directory keeps its ID and its name.
//!
//! Needs Debian's `etcd-server` (the `etcd` binary on PATH) and the agent binary
//! (`cargo build -p connect-agent --bin connect-agent`); fails saying so otherwise.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::{AgentProcess, http, private_tempdir},
    etcd::EtcdCluster,
};
use serde_json::{Value, json};
fn start_agent(dir: &Path, store: &str, node: &str) -> Result<AgentProcess> {
    AgentProcess::start_in(
        dir,
        &["--store", store, "--server"],
        &["--acl-default-policy", "allow", "--node-name", node],
    )
}

/// The node ID the agent keeps in its data directory.
fn node_id_of(dir: &Path) -> Result<String> {
    let path = dir.join("node-id");
    let id =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        uuid_shaped(id.trim()),
        "{} holds {id:?}, not a UUID",
        path.display()
    );
    Ok(id.trim().to_owned())
}

fn uuid_shaped(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn get(agent: &AgentProcess, path: &str) -> Result<Value> {
    let (status, body) = http(agent.http_addr, "GET", path, None)?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

/// The `ID` the catalog records for node `name`.
fn catalog_id(agent: &AgentProcess, name: &str) -> Result<String> {
    let nodes = get(agent, "/v1/catalog/nodes")?;
    let node = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["Node"] == name))
        .with_context(|| format!("node {name} not in /v1/catalog/nodes: {nodes}"))?;
    node["ID"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("node {name} has no ID: {node}"))
}

/// The nodes `service` is registered on, per the catalog.
fn nodes_of(agent: &AgentProcess, service: &str) -> Result<Vec<String>> {
    let entries = get(agent, &format!("/v1/catalog/service/{service}"))?;
    Ok(entries
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["Node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_of_one_node_name_is_refused_in_either_order() -> Result<()> {
    // Dropped in reverse order: agents first, then their directories, then etcd.
    let etcd = EtcdCluster::start(1).await?;
    let store = format!("etcd://{}", etcd.endpoints().join(","));
    let (a, b) = (
        private_tempdir("connect-node-id-")?,
        private_tempdir("connect-node-id-")?,
    );
    // A starts first on name "n1", B first on name "n2": both orders.
    for (first_dir, second_dir, name) in [(a.path(), b.path(), "n1"), (b.path(), a.path(), "n2")] {
        let first = start_agent(first_dir, &store, name)
            .with_context(|| format!("starting the first agent named {name}"))?;
        let first_id = node_id_of(first_dir)?;
        ensure!(
            catalog_id(&first, name)? == first_id,
            "the catalog records {name} with another ID than {first_id}"
        );
        let service = format!("web-{name}");
        let (status, body) = http(
            first.http_addr,
            "PUT",
            "/v1/agent/service/register",
            Some(&json!({"Name": service, "Port": 8080}).to_string()),
        )?;
        ensure!(status == 200, "register: {status} {body}");

        let refused = match start_agent(second_dir, &store, name) {
            Ok(second) => anyhow::bail!(
                "a second agent named {name} started beside the first:\n{}",
                second.log()
            ),
            Err(e) => format!("{e:#}"),
        };
        let second_id = node_id_of(second_dir)?;
        ensure!(second_id != first_id, "two data directories, one node ID");
        let line = refused
            .lines()
            .find(|l| l.starts_with("Error: "))
            .with_context(|| format!("no error line from the refused agent:\n{refused}"))?;
        for part in [
            format!("node name \"{name}\""),
            first_id.clone(),
            second_id.clone(),
            "--node-name".into(),
            second_dir.join("node-id").display().to_string(),
        ] {
            ensure!(line.contains(&part), "{part:?} missing from: {line}");
        }

        // The first agent's node and services are untouched.
        ensure!(catalog_id(&first, name)? == first_id, "the ID changed");
        ensure!(
            nodes_of(&first, &service)? == [name],
            "{service} is no longer on {name}"
        );

        // Restarted on its own data directory, the first agent is itself again.
        drop(first);
        let again = start_agent(first_dir, &store, name)
            .with_context(|| format!("restarting the agent named {name}"))?;
        ensure!(
            node_id_of(first_dir)? == first_id,
            "a restart changed the ID"
        );
        ensure!(
            catalog_id(&again, name)? == first_id,
            "the catalog's ID changed"
        );
        ensure!(
            nodes_of(&again, &service)? == [name],
            "{service} is gone after the restart"
        );
    }
    Ok(())
}
