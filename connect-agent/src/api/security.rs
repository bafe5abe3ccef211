//! `GET /v1/agent/security`: the agent's own account of Consul's Connect security
//! checklist — ACLs, HTTPS and client verification, where plaintext HTTP listens,
//! the data directory's protection, and eBPF ingress protection — for
//! `connect-agent doctor`. Needs `agent:read` on this node. The report holds
//! settings and file modes, never a secret.

use std::path::PathBuf;

use axum::{Router, extract::State, response::IntoResponse, routing::get};
use serde::{Deserialize, Serialize};

use super::{
    ApiState, Error,
    authz::{Authz, Right},
};
use crate::{config::HttpsCert, datadir};

pub fn routes() -> Router<ApiState> {
    Router::new().route("/v1/agent/security", get(report))
}

/// The report; its JSON is shared with the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SecurityReport {
    #[serde(rename = "ACL")]
    pub acl: AclReport,
    #[serde(rename = "HTTP")]
    pub http: HttpReport,
    #[serde(rename = "HTTPS")]
    pub https: HttpsReport,
    pub data_dir: DataDirReport,
    pub ingress_protection: IngressReport,
    pub store: StoreReport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StoreReport {
    /// `embedded`, `etcd-tls`, `etcd-plaintext-loopback` or `etcd-plaintext-insecure`
    /// ([`crate::config::StoreTransport`]).
    pub transport: String,
    /// With TLS: whether the agent presents a client certificate to etcd.
    pub client_certificate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AclReport {
    pub enabled: bool,
    pub default_policy: String,
    pub bootstrapped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HttpReport {
    pub addr: String,
    pub loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HttpsReport {
    pub enabled: bool,
    pub addr: Option<String>,
    pub verify_incoming: bool,
    /// `builtin-ca` or `files`.
    pub certificate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DataDirReport {
    pub path: PathBuf,
    /// Octal permission bits (`"0700"`), empty if the directory cannot be read.
    pub mode: String,
    #[serde(rename = "OwnerUID")]
    pub owner_uid: Option<u32>,
    #[serde(rename = "AgentUID")]
    pub agent_uid: u32,
    /// Entries open to group or others, as `path (mode 0644)`.
    pub exposed: Vec<String>,
    /// Why the directory could not be inspected, if it could not.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IngressReport {
    /// eBPF programs are attached: app ports are unreachable except through the
    /// mesh (no non-Connect traffic to services).
    pub attached: bool,
    pub cgroup: Option<PathBuf>,
    /// Where the programs' links and maps are pinned (they outlive the agent).
    pub pin_dir: Option<PathBuf>,
    /// The programs whose links are pinned there, by name.
    pub pinned_programs: Vec<String>,
    /// Map entries (protected ports, destinations) the last sync could not write.
    pub unapplied_entries: usize,
}

async fn report(State(agent): State<ApiState>, authz: Authz) -> Result<impl IntoResponse, Error> {
    authz.require(Right::AgentRead(&agent.config.node_name))?;
    let c = &agent.config;
    let dir = c.data_dir.clone();
    let inspected = tokio::task::spawn_blocking(move || datadir::inspect(&dir))
        .await
        .map_err(|e| Error::ours("the data directory check failed", e))?;
    let data_dir = match inspected {
        Ok(r) => DataDirReport {
            path: c.data_dir.clone(),
            mode: format!("{:04o}", r.mode),
            owner_uid: Some(r.owner_uid),
            agent_uid: r.agent_uid,
            exposed: r
                .exposed
                .iter()
                .map(|e| format!("{} (mode {:04o})", e.path.display(), e.mode))
                .collect(),
            error: None,
        },
        Err(e) => DataDirReport {
            path: c.data_dir.clone(),
            mode: String::new(),
            owner_uid: None,
            agent_uid: nix::unistd::geteuid().as_raw(),
            exposed: vec![],
            error: Some(e.to_string()),
        },
    };
    let body = SecurityReport {
        acl: AclReport {
            enabled: agent.acl.enabled(),
            default_policy: agent.acl.default_policy().to_string(),
            bootstrapped: agent.acl.snapshot().bootstrapped_at.is_some(),
        },
        http: HttpReport {
            addr: c.http_addr.to_string(),
            loopback: c.http_addr.ip().is_loopback(),
        },
        https: HttpsReport {
            enabled: c.https.is_some(),
            addr: c.https.as_ref().map(|h| h.addr.to_string()),
            verify_incoming: c.https.as_ref().is_some_and(|h| h.verify_incoming),
            certificate: c.https.as_ref().map(|h| {
                match h.cert {
                    HttpsCert::BuiltinCa => "builtin-ca",
                    HttpsCert::Files { .. } => "files",
                }
                .to_owned()
            }),
        },
        data_dir,
        ingress_protection: IngressReport {
            attached: agent.redirect.is_some(),
            cgroup: agent.redirect.as_ref().and(c.cgroup.clone()),
            pin_dir: agent.redirect.as_ref().map(|r| r.pin_dir().to_owned()),
            pinned_programs: agent
                .redirect
                .as_ref()
                .map(|r| r.pinned_programs())
                .unwrap_or_default(),
            unapplied_entries: agent.redirect.as_ref().map_or(0, |r| r.failures().1),
        },
        store: StoreReport {
            transport: c.store_transport.as_str().to_owned(),
            client_certificate: c.etcd_tls.as_ref().is_some_and(|t| t.identity.is_some()),
        },
    };
    Ok(axum::Json(body))
}
