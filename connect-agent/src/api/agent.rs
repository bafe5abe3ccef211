//! HTTP routes of the `agent` area (reference §2.8): `self`, `reload`, metrics and
//! `status/leader`.
//!
//! Metrics are Prometheus text built on request from in-memory state by the
//! functions in [`METRICS`]; a component exports its figures by adding one there.
//! There is no Raft leader: `status/leader` names this agent's inbound address, so
//! clients that wait for "a leader" proceed (documented deviation).

use std::fmt::Write as _;

use axum::{
    Router,
    extract::{Query, State},
    http::header,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use serde::Deserialize;
use serde_json::json;

use super::{ApiState, Authz, Error, Right};
use crate::agent::Agent;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/reload", put(reload).post(reload))
        .route("/v1/agent/metrics", get(metrics))
        .route("/v1/status/leader", get(leader))
}

/// One source of metrics: appends Prometheus text lines (with `# HELP`/`# TYPE`).
pub type MetricsFn = fn(&Agent, &mut String);

/// Every metrics source. Add a line here to export more.
pub const METRICS: &[MetricsFn] = &[
    catalog_metrics,
    vip_metrics,
    proxy_metrics,
    redirect_metrics,
    workload_metrics,
];

/// The Workload API's decisions, by outcome, and its JWT validations.
fn workload_metrics(agent: &Agent, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &agent.workload_counters;
    labelled_counter(
        out,
        "connect_workload_api_decisions_total",
        "Workload API calls by decision.",
        "decision",
        &[
            ("attested", c.attested.load(Relaxed)),
            ("denied", c.denied.load(Relaxed)),
            ("invalid_argument", c.invalid.load(Relaxed)),
            ("limited", c.limited.load(Relaxed)),
        ],
    );
    labelled_counter(
        out,
        "connect_workload_api_jwt_validations_total",
        "ValidateJWTSVID answers by result.",
        "result",
        &[
            ("valid", c.jwt_valid.load(Relaxed)),
            ("invalid", c.jwt_invalid.load(Relaxed)),
        ],
    );
}

/// One counter family with one label.
fn labelled_counter(out: &mut String, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (v, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {n}");
    }
}

fn vip_metrics(agent: &Agent, out: &mut String) {
    gauge(
        out,
        "connect_virtual_ips",
        "Services with a virtual IP (all agents sharing the store).",
        agent.vips.snapshot().len(),
    );
}

fn proxy_metrics(agent: &Agent, out: &mut String) {
    agent.proxy_metrics.render_prometheus(out);
}

/// The eBPF programs' counters (summed over CPUs): connections redirected, records
/// lost to a full map, packets to protected ports dropped. Absent without `--cgroup`.
fn redirect_metrics(agent: &Agent, out: &mut String) {
    let Some(redirect) = &agent.redirect else {
        return;
    };
    let name = "connect_ebpf_events_total";
    let _ = writeln!(
        out,
        "# HELP {name} Events counted by the eBPF programs.\n# TYPE {name} counter"
    );
    for (event, value) in redirect.counters() {
        let _ = writeln!(out, "{name}{{event=\"{event}\"}} {value}");
    }
    let (instances, vips, ports) = redirect.applied_counts();
    let name = "connect_ebpf_mesh_destinations";
    let _ = writeln!(
        out,
        "# HELP {name} Mesh destinations in the eBPF map, by kind.\n# TYPE {name} gauge\n{name}{{kind=\"instance\"}} {instances}\n{name}{{kind=\"virtual_ip\"}} {vips}"
    );
    gauge(
        out,
        "connect_ebpf_protected_ports",
        "Plaintext service ports protected by the eBPF ingress program.",
        ports,
    );
    let (failures, unapplied) = redirect.failures();
    let name = "connect_ebpf_map_write_failures_total";
    let _ = writeln!(
        out,
        "# HELP {name} eBPF map writes that failed (retried every 5 s).\n# TYPE {name} counter\n{name} {failures}"
    );
    gauge(
        out,
        "connect_ebpf_unapplied_entries",
        "Map entries the last sync could not write: ports or destinations not enforced yet.",
        unapplied,
    );
}

fn catalog_metrics(agent: &Agent, out: &mut String) {
    let snap = agent.catalog.snapshot();
    let (nodes, services) = snap.counts();
    let local = snap.local().count();
    gauge(out, "connect_catalog_nodes", "Nodes in the catalog.", nodes);
    gauge(
        out,
        "connect_catalog_services",
        "Service instances in the catalog, all nodes.",
        services,
    );
    gauge(
        out,
        "connect_catalog_local_services",
        "Service instances registered on this node.",
        local,
    );
    gauge(
        out,
        "connect_catalog_index",
        "Store index of the catalog view.",
        snap.index,
    );
}

/// Appends one gauge with its help and type lines.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

async fn agent_self(State(agent): State<ApiState>, authz: Authz) -> Result<Response, Error> {
    authz.require(Right::AgentRead(&agent.config.node_name))?;
    let c = &agent.config;
    let node = agent.catalog.node();
    Ok(axum::Json(json!({
        "Config": {
            "Datacenter": c.datacenter.to_string(),
            "NodeName": c.node_name,
            "NodeID": node.id,
            "Revision": "",
            "Server": false,
            "Version": env!("CARGO_PKG_VERSION"),
            "PrimaryDatacenter": c.datacenter.to_string(),
        },
        "DebugConfig": {},
        "Coord": null,
        "Member": {
            "Name": c.node_name,
            "Addr": node.address.to_string(),
            "Port": node.inbound_addr.port(),
            "Tags": {"dc": c.datacenter.to_string(), "role": "node"},
            "Status": 1,
        },
        "Stats": {},
        "Meta": {},
    }))
    .into_response())
}

/// `PUT /v1/agent/reload`: the same reload as SIGHUP. A bad file answers 400 naming
/// its path and field; the services in force stay.
async fn reload(State(agent): State<ApiState>, authz: Authz) -> Result<Response, Error> {
    authz.require(Right::AgentWrite(&agent.config.node_name))?;
    match agent.catalog.reload().await {
        Ok(s) => {
            tracing::info!(files = s.files, services = s.services, "reloaded");
            Ok(().into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, "reload failed; the previous services stay in force");
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
struct MetricsQuery {
    format: Option<String>,
}

async fn metrics(
    State(agent): State<ApiState>,
    authz: Authz,
    Query(q): Query<MetricsQuery>,
) -> Result<Response, Error> {
    authz.require(Right::AgentRead(&agent.config.node_name))?;
    let mut out = String::new();
    for f in METRICS {
        f(&agent, &mut out);
    }
    match q.format.as_deref() {
        Some("prometheus") => Ok((
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            out,
        )
            .into_response()),
        None | Some("") => {
            // Consul's JSON form: gauges as {Name, Value}.
            let gauges: Vec<_> = out
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once(' '))
                .map(|(n, v)| json!({"Name": n, "Value": v.parse::<f64>().unwrap_or(0.0)}))
                .collect();
            Ok(axum::Json(json!({
                "Timestamp": "",
                "Gauges": gauges,
                "Points": [],
                "Counters": [],
                "Samples": [],
            }))
            .into_response())
        }
        Some(other) => Err(Error::BadRequest(format!(
            "unknown metrics format {other:?} (expected \"prometheus\")"
        ))),
    }
}

async fn leader(State(agent): State<ApiState>) -> Response {
    axum::Json(json!(agent.config.inbound_addr.to_string())).into_response()
}
