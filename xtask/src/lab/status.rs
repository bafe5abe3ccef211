//! `cargo xtask lab status`: every node's processes, agent and etcd member, probed
//! from inside its namespace.

use super::*;

pub(super) fn status(name: &str) -> Result<()> {
    let Some(st) = load_state(name)? else {
        println!(
            "no lab {name} is up (`cargo xtask lab{} up` starts one)",
            name_flag(name)
        );
        return Ok(());
    };
    println!(
        "lab {name}: {} nodes on {SUBNET_PREFIX}.0/24, bridge {BRIDGE} in namespace {}\n",
        st.nodes.len(),
        st.bridge_ns.as_deref().unwrap_or("-")
    );
    println!(
        "{:<5} {:<13} {:<14} {:<26} ETCD",
        "NODE", "ADDRESS", "NAMESPACE", "AGENT"
    );
    let mut answering = None;
    for node in &st.nodes {
        let ns = Netns::existing(&node.ns);
        let res = http_in(
            &ns,
            &[
                format!("GET {HTTP} /v1/agent/self"),
                format!("GET 127.0.0.1:{ETCD_METRICS} /health"),
                format!("GET 127.0.0.1:{ETCD_METRICS} /metrics"),
            ],
            1000,
        );
        let pid_note = |role: Role| match st.proc(&node.name, role) {
            Some(r) if alive(r) => format!("pid {}", r.pid),
            Some(_) => "not running".to_owned(),
            None => "not started".to_owned(),
        };
        let agent_up = matches!(res.first(), Some(Ok((200, _))));
        if agent_up && answering.is_none() {
            answering = Some(node);
        }
        let agent = format!(
            "{} ({})",
            if agent_up { "up" } else { "DOWN" },
            pid_note(Role::Agent)
        );
        let etcd_healthy = matches!(res.get(1), Some(Ok((200, b))) if b.contains("true"));
        // etcd's own gauge, from the plain metrics listener (the client port
        // wants a client certificate).
        let leader = match res.get(2) {
            Some(Ok((200, body))) => body.lines().any(|l| l.trim() == "etcd_server_is_leader 1"),
            _ => false,
        };
        let etcd = format!(
            "{}{} ({})",
            if etcd_healthy {
                "up"
            } else if matches!(res.get(1), Some(Ok(_))) {
                "UNHEALTHY"
            } else {
                "DOWN"
            },
            if leader { ", leader" } else { "" },
            pid_note(Role::Etcd)
        );
        println!(
            "{:<5} {:<13} {:<14} {:<26} {}",
            node.name, node.ip, node.ns, agent, etcd
        );
    }
    let Some(via) = answering else {
        println!("\nno agent answers: services and intentions are unknown");
        return Ok(());
    };
    let ns = Netns::existing(&via.ns);
    let res = http_in(
        &ns,
        &[
            format!("GET {HTTP} /v1/catalog/services"),
            format!("GET {HTTP} /v1/connect/intentions"),
        ],
        2000,
    );
    println!("\nSERVICES (the catalog as {} sees it)", via.name);
    let names: Vec<String> = match res.first() {
        Some(Ok((200, body))) => serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default(),
        other => {
            println!("  cannot list: {other:?}");
            Vec::new()
        }
    };
    let reqs: Vec<String> = names
        .iter()
        .map(|s| format!("GET {HTTP} /v1/catalog/service/{s}"))
        .collect();
    let instances = http_in(&ns, &reqs, 2000);
    println!("  {:<12} {:<6} {:<22} CGROUP", "SERVICE", "NODE", "ADDRESS");
    if names.is_empty() {
        println!("  (none)");
    }
    for (svc, res) in names.iter().zip(instances) {
        let list = match res {
            Ok((200, body)) => serde_json::from_str::<Value>(&body).unwrap_or_default(),
            _ => Value::Null,
        };
        for inst in list.as_array().into_iter().flatten() {
            let addr = inst["ServiceAddress"]
                .as_str()
                .filter(|a| !a.is_empty())
                .or(inst["Address"].as_str())
                .unwrap_or("?");
            let node = inst["Node"].as_str().unwrap_or("?");
            let cgroup = st
                .nodes
                .iter()
                .find(|n| n.name == node)
                .map(|n| n.cgroup.join(svc))
                .filter(|p| p.is_dir())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            println!(
                "  {:<12} {:<6} {:<22} {}",
                svc,
                node,
                match inst["ServicePort"].as_u64() {
                    Some(0) | None => addr.to_owned(),
                    Some(port) => format!("{addr}:{port}"),
                },
                cgroup
            );
        }
    }
    println!("\nINTENTIONS");
    match res.get(1) {
        Some(Ok((200, body))) => {
            let v: Value = serde_json::from_str(body).unwrap_or_default();
            let list = v.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("  (none: every connection is allowed, --acl-default-policy allow)");
            }
            for i in list {
                println!(
                    "  {} => {} ({})",
                    i["SourceName"].as_str().unwrap_or("?"),
                    i["DestinationName"].as_str().unwrap_or("?"),
                    i["Action"].as_str().unwrap_or("?")
                );
            }
        }
        other => println!("  cannot list: {other:?}"),
    }
    Ok(())
}

// ------------------------------------------------------------------------ down
