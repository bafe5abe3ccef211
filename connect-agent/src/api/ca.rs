//! HTTP routes of the `ca` area (reference §2.1, §2.2, §2.4, §2.5):
//! `GET /v1/agent/connect/ca/roots`, `GET /v1/agent/connect/ca/leaf/:service`,
//! `GET /v1/connect/ca/roots`, `GET|PUT /v1/connect/ca/configuration`.
//!
//! Everything is read from the CA manager's in-memory snapshot and leaf cache;
//! blocking reads wake on the manager's change watches. The JSON types here are
//! Consul's and are shared with the CLI. No ACLs yet (a later issue adds them).

use axum::{
    Router,
    extract::{Path, RawQuery, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{ApiState, Error, Json, QueryOptions, block_on, cache_header, index_headers};
use crate::{
    ca::{self, CaState, Leaf},
    identity::ServiceName,
};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/agent/connect/ca/roots", get(agent_roots))
        .route("/v1/agent/connect/ca/leaf/{service}", get(agent_leaf))
        .route("/v1/connect/ca/roots", get(roots))
        .route(
            "/v1/connect/ca/configuration",
            get(get_configuration).put(put_configuration),
        )
}

/// `IndexedCARoots`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct IndexedCaRoots {
    #[serde(rename = "ActiveRootID")]
    pub active_root_id: String,
    pub trust_domain: String,
    pub roots: Vec<CaRoot>,
}

/// `CARoot`, without the signing material Consul never returns either.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoot {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub serial_number: u64,
    #[serde(rename = "SigningKeyID")]
    pub signing_key_id: String,
    pub external_trust_domain: String,
    pub not_before: String,
    pub not_after: String,
    pub root_cert: String,
    pub intermediate_certs: Option<Vec<String>>,
    pub active: bool,
    pub private_key_type: String,
    pub private_key_bits: u32,
    pub create_index: u64,
    pub modify_index: u64,
}

/// `IssuedCert` of the agent leaf endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct IssuedCertJson {
    pub serial_number: String,
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    pub private_key_pem: String,
    pub service: String,
    #[serde(rename = "ServiceURI")]
    pub service_uri: String,
    pub valid_after: String,
    pub valid_before: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// `CAConfiguration` as `GET /v1/connect/ca/configuration` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct CaConfigurationJson {
    pub provider: String,
    pub config: Map<String, Value>,
    pub force_without_cross_signing: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

impl From<ca::Error> for Error {
    fn from(e: ca::Error) -> Self {
        match e {
            ca::Error::Store(s) => Error::Store(s),
            ca::Error::StateNotSettable | ca::Error::CsrRefused { .. } => {
                Error::BadRequest(e.to_string())
            }
            ca::Error::Contended { .. } => Error::Conflict(e.to_string()),
            // Consul answers validation failures of the CA configuration with 500
            // and the message (reference §2.5); everything else is ours anyway.
            other => Error::Internal(other.to_string()),
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The roots body from a snapshot.
pub fn indexed_roots(state: &CaState) -> IndexedCaRoots {
    IndexedCaRoots {
        active_root_id: state.active_root().id().to_owned(),
        trust_domain: state.trust_domain.to_string(),
        roots: state
            .roots
            .iter()
            .map(|r| CaRoot {
                id: r.id().to_owned(),
                name: r.record.name.clone(),
                serial_number: r.record.serial_number,
                signing_key_id: r.signing_key_id(),
                external_trust_domain: state.cluster_id.hyphenated().to_string(),
                not_before: rfc3339(r.not_before),
                not_after: rfc3339(r.not_after),
                root_cert: r.record.root_cert.clone(),
                intermediate_certs: if r.intermediates.is_empty() {
                    None
                } else {
                    Some(r.intermediates.iter().map(|i| i.pem.clone()).collect())
                },
                active: r.active(),
                private_key_type: r.record.private_key_type.clone(),
                private_key_bits: r.record.private_key_bits,
                create_index: r.create_index,
                modify_index: r.modify_index,
            })
            .collect(),
    }
}

fn leaf_json(leaf: &Leaf) -> IssuedCertJson {
    let c = &leaf.cert;
    IssuedCertJson {
        serial_number: c.serial_hex(),
        cert_pem: c.cert_pem.clone(),
        private_key_pem: leaf.private_key_pem().to_owned(),
        service: c.service.to_string(),
        service_uri: c.spiffe_id.to_string(),
        valid_after: rfc3339(c.valid_after),
        valid_before: rfc3339(c.valid_before),
        create_index: c.index,
        modify_index: c.index,
    }
}

async fn blocking_roots(agent: &ApiState, opts: QueryOptions) -> (IndexedCaRoots, u64) {
    let ca = agent.ca.clone();
    block_on(opts, agent.ca.changes(), move || {
        let s = ca.state();
        (indexed_roots(&s), s.roots_index)
    })
    .await
}

async fn agent_roots(State(agent): State<ApiState>, opts: QueryOptions) -> Response {
    let (body, index) = blocking_roots(&agent, opts).await;
    let mut headers = index_headers(index);
    // Served from the agent's in-memory CA state, always current with the store.
    cache_header(&mut headers, true);
    (headers, axum::Json(body)).into_response()
}

async fn roots(
    State(agent): State<ApiState>,
    opts: QueryOptions,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    let pem = match query_param(query.as_deref().unwrap_or(""), "pem") {
        None => false,
        Some(v) => parse_go_bool(&v)
            .ok_or_else(|| Error::BadRequest(format!("Invalid value for 'pem': {v:?}")))?,
    };
    let (body, index) = blocking_roots(&agent, opts).await;
    let headers = index_headers(index);
    if pem {
        let mut text = String::new();
        for r in &body.roots {
            text.push_str(&r.root_cert);
            for i in r.intermediate_certs.iter().flatten() {
                text.push_str(i);
            }
        }
        let mut resp = (headers, text).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/pem-certificate-chain"),
        );
        return Ok(resp);
    }
    Ok((headers, axum::Json(body)).into_response())
}

async fn agent_leaf(
    State(agent): State<ApiState>,
    Path(service): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    let service: ServiceName = service
        .parse()
        .map_err(|e: crate::identity::Error| Error::BadRequest(e.to_string()))?;
    let watch = agent.ca.leaf(&service).await?;
    let rx = watch.rx;
    let (leaf, index) = block_on(opts, agent.ca.leaf_changes(), move || {
        let l = rx.borrow().clone();
        let i = l.cert.index;
        (l, i)
    })
    .await;
    let mut headers = index_headers(index);
    cache_header(&mut headers, watch.cache_hit);
    Ok((headers, axum::Json(leaf_json(&leaf))).into_response())
}

async fn get_configuration(State(agent): State<ApiState>, opts: QueryOptions) -> Response {
    let ca = agent.ca.clone();
    let (body, index) = block_on(opts, agent.ca.changes(), move || {
        let s = ca.state();
        (
            CaConfigurationJson {
                provider: s.config.provider.clone(),
                config: s.config.public_map(),
                force_without_cross_signing: s.config.force_without_cross_signing,
                create_index: s.config_create_index,
                modify_index: s.config_modify_index,
            },
            s.config_modify_index,
        )
    })
    .await;
    (index_headers(index), axum::Json(body)).into_response()
}

async fn put_configuration(
    State(agent): State<ApiState>,
    Json(body): Json<Value>,
) -> Result<Response, Error> {
    let config = ca::CaConfig::from_request(&body)?;
    agent.ca.set_config(config).await?;
    Ok(().into_response())
}

/// One query parameter's raw value (no percent-decoding: the values read here are
/// plain words).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// Go's `strconv.ParseBool`; a bare `?pem` means true, as Consul treats flags.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}
