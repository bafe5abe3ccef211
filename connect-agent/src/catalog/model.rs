//! The catalog's records as stored (JSON under `catalog/`) and as Consul clients see
//! them (`AgentService`, `CatalogService`, `ServiceEntry`; reference §2.8.1, §2.9).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::identity::ServiceName;

/// Where a registration came from: reload replaces the file-sourced ones only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "Type")]
pub enum Source {
    /// `PUT /v1/agent/service/register` (or the CLI).
    Api,
    /// A definition file in `--config-dir`.
    File {
        #[serde(rename = "Path")]
        path: PathBuf,
    },
}

/// Consul's service kinds that this agent accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceKind {
    /// An ordinary service (`Kind: ""`).
    #[default]
    #[serde(rename = "")]
    Typical,
    /// A Connect proxy fronting `Proxy.DestinationServiceName`.
    #[serde(rename = "connect-proxy")]
    ConnectProxy,
}

impl ServiceKind {
    pub fn is_typical(&self) -> bool {
        matches!(self, ServiceKind::Typical)
    }
}

/// An upstream: a local listener that reaches `destination_name` through the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpstreamDefinition {
    pub destination_name: ServiceName,
    #[serde(default)]
    pub datacenter: String,
    /// Defaults to 127.0.0.1, as Consul's built-in proxy does.
    pub local_bind_address: IpAddr,
    pub local_bind_port: u16,
}

/// The `Proxy` block of a `connect-proxy` registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProxyDefinition {
    pub destination_service_name: ServiceName,
    #[serde(rename = "DestinationServiceID", default)]
    pub destination_service_id: String,
    #[serde(default)]
    pub local_service_address: String,
    #[serde(default)]
    pub local_service_port: u16,
    #[serde(default)]
    pub upstreams: Vec<UpstreamDefinition>,
    /// Opaque to the agent, kept as given (Consul does not rewrite it either).
    #[serde(default)]
    pub config: Map<String, Value>,
}

/// One service registered on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: ServiceName,
    #[serde(default, skip_serializing_if = "ServiceKind::is_typical")]
    pub kind: ServiceKind,
    /// The address clients reach the instance at (defaults to the node's).
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// The service's cgroup, relative to the agent's `--cgroup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Connect-native: the application speaks mTLS itself.
    #[serde(default)]
    pub native: bool,
    /// Present for `connect-proxy` services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyDefinition>,
    /// Upstream listeners the agent opens for this service
    /// (`connect.proxy.config.upstreams`).
    #[serde(default)]
    pub upstreams: Vec<UpstreamDefinition>,
    /// For a sidecar registered through `connect.sidecar_service`: its parent's ID,
    /// so deregistering the parent removes it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_of: Option<String>,
    pub source: Source,
}

impl Service {
    /// The address as an IP, when it is one (not a host name).
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.parse().ok()
    }

    /// Consul's `AgentService` JSON.
    pub fn agent_json(&self) -> Value {
        let mut m = Map::new();
        if let ServiceKind::ConnectProxy = self.kind {
            m.insert("Kind".into(), json!("connect-proxy"));
        }
        m.insert("ID".into(), json!(self.id));
        m.insert("Service".into(), json!(self.service));
        m.insert("Tags".into(), json!(self.tags));
        m.insert("Meta".into(), json!(self.meta));
        m.insert("Port".into(), json!(self.port));
        m.insert("Address".into(), json!(self.address));
        m.insert("Weights".into(), json!({"Passing": 1, "Warning": 1}));
        m.insert("EnableTagOverride".into(), json!(false));
        if let Some(p) = &self.proxy {
            m.insert("Proxy".into(), proxy_json(p));
        }
        if self.native {
            m.insert("Connect".into(), json!({"Native": true}));
        }
        if let Some(cg) = &self.cgroup {
            m.insert("Cgroup".into(), json!(cg.to_string_lossy()));
        }
        if !self.upstreams.is_empty() {
            m.insert(
                "Upstreams".into(),
                Value::Array(self.upstreams.iter().map(upstream_json).collect()),
            );
        }
        Value::Object(m)
    }
}

fn upstream_json(u: &UpstreamDefinition) -> Value {
    json!({
        "DestinationType": "service",
        "DestinationName": u.destination_name,
        "Datacenter": u.datacenter,
        "LocalBindAddress": u.local_bind_address.to_string(),
        "LocalBindPort": u.local_bind_port,
        "Config": {},
        "MeshGateway": {},
    })
}

fn proxy_json(p: &ProxyDefinition) -> Value {
    json!({
        "DestinationServiceName": p.destination_service_name,
        "DestinationServiceID": p.destination_service_id,
        "LocalServiceAddress": p.local_service_address,
        "LocalServicePort": p.local_service_port,
        "Config": p.config,
        "Upstreams": p.upstreams.iter().map(upstream_json).collect::<Vec<_>>(),
        "Mode": "",
        "MeshGateway": {},
        "Expose": {},
    })
}

/// A node running an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// The node's ID (a UUID, from the data directory: `datadir::node_id`). Records
    /// written before node IDs existed have none (`""`).
    #[serde(rename = "ID", default)]
    pub id: String,
    pub node: String,
    pub address: IpAddr,
    pub datacenter: String,
    /// Where the node's inbound mTLS proxy listens: the Connect endpoint of every
    /// service on this node.
    pub inbound_addr: SocketAddr,
    /// A server agent's HTTPS API (`https://ip:port`), where client agents send
    /// their CSRs when no `--server-addr` names one. Absent on client agents and
    /// on servers without `--https-addr`.
    #[serde(rename = "ServerAPI", default, skip_serializing_if = "Option::is_none")]
    pub server_api: Option<String>,
}

impl Node {
    /// The `Node` object of a health entry.
    pub fn json(&self, create_index: u64, modify_index: u64) -> Value {
        json!({
            "ID": self.id,
            "Node": self.node,
            "Address": self.address.to_string(),
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.address.to_string(), "wan": self.address.to_string()},
            "Meta": {},
            "CreateIndex": create_index,
            "ModifyIndex": modify_index,
        })
    }
}
