//! HTTP routes of the `ca` area (reference §2.1, §2.2, §2.4, §2.5):
//! `GET /v1/agent/connect/ca/roots`, `GET /v1/agent/connect/ca/leaf/:service`,
//! `GET /v1/connect/ca/roots`, `GET|PUT /v1/connect/ca/configuration`, and
//! `POST /v1/connect/ca/sign` and `POST /v1/connect/ca/jwt-sign` (server agents
//! sign client agents' CSRs and JWT-SVIDs; see [`crate::ca::remote`]).
//!
//! Everything is read from the CA manager's in-memory snapshot and leaf cache;
//! blocking reads wake on the manager's change watches. The JSON types here are
//! Consul's and are shared with the CLI.
//!
//! ACLs (reference §3): roots need nothing; a leaf needs `service:write` on its
//! service, so nobody can obtain another service's identity; reading the CA
//! configuration needs `operator:read` (the CA key is never shown), changing it
//! `operator:write`. Signing for a client agent needs a real token (not the
//! anonymous one, and ACLs on) with `node:write` on the requesting node, and the
//! service must be registered on that node in the catalog.

use axum::{
    Router,
    extract::{Path, RawQuery, State},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    ApiState, Error, Json, QueryOptions,
    authz::{Authz, Right},
    block_on, cache_header, index_headers,
};
use crate::{
    acl::Caller,
    ca::{
        self, CaState, Leaf,
        remote::{
            JWT_SIGN_PATH, JwtSignRequest, JwtSignResponse, SIGN_PATH, SignRequest, SignResponse,
        },
    },
    identity::ServiceName,
};

/// How long the signing endpoint waits for its catalog view to show a service the
/// requesting node registered moments ago (through the shared store).
const CATALOG_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(3);

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/agent/connect/ca/roots", get(agent_roots))
        .route("/v1/agent/connect/ca/leaf/{service}", get(agent_leaf))
        .route("/v1/connect/ca/roots", get(roots))
        .route(
            "/v1/connect/ca/configuration",
            get(get_configuration).put(put_configuration),
        )
        .route(SIGN_PATH, post(sign))
        .route(JWT_SIGN_PATH, post(jwt_sign))
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

/// The roots, after a blocking wait if `opts` asks for one. The roots are public,
/// so a caller without a valid token may watch them too, but only while fewer
/// than [`crate::agent::MAX_UNAUTHENTICATED_WATCHES`] such watches are open:
/// past that, 429. A caller with a token is bounded by its connections
/// ([`crate::api::server`]).
async fn blocking_roots(
    agent: &ApiState,
    authz: &Authz,
    opts: QueryOptions,
) -> Result<(IndexedCaRoots, u64), Error> {
    let blocks = opts.index.is_some_and(|i| i > 0) && !opts.wait.is_zero();
    let _permit = if blocks && !matches!(authz.identity(), crate::acl::Caller::Token(_)) {
        match agent.unauthenticated_watches.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return Err(Error::TooManyRequests(format!(
                    "too many blocking roots queries without a token (at most {}); retry later or pass a token",
                    crate::agent::MAX_UNAUTHENTICATED_WATCHES
                )));
            }
        }
    } else {
        None
    };
    let ca = agent.ca.clone();
    Ok(block_on(opts, agent.ca.changes(), move || {
        let s = ca.state();
        (indexed_roots(&s), s.roots_index)
    })
    .await)
}

async fn agent_roots(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
) -> Result<Response, Error> {
    let (body, index) = blocking_roots(&agent, &authz, opts).await?;
    let mut headers = index_headers(index);
    // Served from the agent's in-memory CA state, always current with the store.
    cache_header(&mut headers, true);
    Ok((headers, axum::Json(body)).into_response())
}

async fn roots(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    let pem = match query_param(query.as_deref().unwrap_or(""), "pem") {
        None => false,
        Some(v) => parse_go_bool(&v)
            .ok_or_else(|| Error::BadRequest(format!("Invalid value for 'pem': {v:?}")))?,
    };
    let (body, index) = blocking_roots(&agent, &authz, opts).await?;
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
    authz: Authz,
    Path(service): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.require(Right::ServiceWrite(&service))?;
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

/// `POST /v1/connect/ca/sign`: a server agent signs a client agent's CSR for a
/// service registered on the client's node.
async fn sign(
    State(agent): State<ApiState>,
    authz: Authz,
    Json(body): Json<SignRequest>,
) -> Result<Response, Error> {
    let service = client_node_service(&agent, &authz, &body.node, &body.service, "leaves").await?;
    let issued = agent.ca.sign_csr_for(body.csr.as_bytes(), &service)?;
    tracing::info!(node = %body.node, %service, serial = %issued.serial_hex(), "signed a leaf for a client agent");
    Ok(axum::Json(SignResponse {
        serial_number: issued.serial_hex(),
        cert_pem: issued.cert_pem.clone(),
        service: issued.service.to_string(),
        service_uri: issued.spiffe_id.to_string(),
        root_id: issued.root_id.clone(),
    })
    .into_response())
}

/// `POST /v1/connect/ca/jwt-sign`: a server agent signs a JWT-SVID for a
/// service registered on the client's node (the same checks as a CSR's).
async fn jwt_sign(
    State(agent): State<ApiState>,
    authz: Authz,
    Json(body): Json<JwtSignRequest>,
) -> Result<Response, Error> {
    let service =
        client_node_service(&agent, &authz, &body.node, &body.service, "JWT-SVIDs").await?;
    let svid = agent.ca.jwt_svid(&service, &body.audience).await?;
    tracing::info!(node = %body.node, %service, audience = ?svid.audience, "signed a JWT-SVID for a client agent");
    Ok(axum::Json(JwtSignResponse {
        token: svid.token.clone(),
    })
    .into_response())
}

/// The checks of signing for a client agent: this is a server, the caller's
/// real token holds `node:write` on `node`, and `service` is registered on
/// `node`. Returns the service.
async fn client_node_service(
    agent: &ApiState,
    authz: &Authz,
    node: &str,
    service: &str,
    what: &str,
) -> Result<ServiceName, Error> {
    if !agent.ca.is_server() {
        return Err(Error::BadRequest(
            "this is a client agent, which never holds the CA key: send the request to a server agent"
                .to_owned(),
        ));
    }
    match authz.identity() {
        Caller::Token(_) => {}
        Caller::Unknown => return Err(Error::AclNotFound),
        Caller::Anonymous(_) => {
            return Err(Error::Forbidden(
                "signing needs the client agent's ACL token (X-Consul-Token) with node:write on its node"
                    .to_owned(),
            ));
        }
        Caller::Disabled => {
            return Err(Error::Forbidden(
                "signing for client agents needs ACLs enabled: without them no request can be authenticated"
                    .to_owned(),
            ));
        }
    }
    authz.require(Right::NodeWrite(node))?;
    let service: ServiceName = service
        .parse()
        .map_err(|e: crate::identity::Error| Error::BadRequest(e.to_string()))?;
    if !registered_on(agent, node, &service).await {
        tracing::info!(%node, %service, what, "refused to sign: service not registered on the node");
        return Err(Error::Forbidden(format!(
            "service {:?} is not registered on node {node:?}: a client agent gets {what} only for its own services",
            service.to_string(),
        )));
    }
    Ok(service)
}

/// Whether the catalog lists `service` on `node`, waiting (bounded) for this
/// agent's view to catch up with a registration made through another agent.
async fn registered_on(agent: &ApiState, node: &str, service: &ServiceName) -> bool {
    let mut rx = agent.catalog.subscribe();
    let deadline = tokio::time::Instant::now() + CATALOG_CATCH_UP;
    loop {
        let found = rx
            .borrow_and_update()
            .all()
            .any(|i| i.node.node == node && i.service.service == *service);
        if found {
            return true;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return false,
        }
    }
}

async fn get_configuration(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.require(Right::OperatorRead)?;
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
    Ok((index_headers(index), axum::Json(body)).into_response())
}

async fn put_configuration(
    State(agent): State<ApiState>,
    authz: Authz,
    Json(body): Json<Value>,
) -> Result<Response, Error> {
    authz.require(Right::OperatorWrite)?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::{
        body::Body,
        http::{Request, StatusCode},
    };
    use tower::ServiceExt;

    use super::*;
    use crate::{app, config::Config, shutdown::Shutdown, store::memory::MemStore};

    async fn agent() -> ApiState {
        app::build(
            Config::for_tests(),
            Arc::new(MemStore::new()),
            None,
            Shutdown::new(),
        )
        .await
        .expect("agent")
    }

    async fn call(
        agent: &ApiState,
        method: &str,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let req = Request::builder().method(method).uri(uri);
        let req = match body {
            Some(v) => req
                .header("content-type", "application/json")
                .body(Body::from(v.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = crate::api::router(agent.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body")
            .to_vec();
        (status, headers, body)
    }

    fn header(h: &axum::http::HeaderMap, name: &str) -> String {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    /// The roots are public, so anyone may watch them, but watches without a
    /// valid token are bounded in number: past the bound a blocking query gets
    /// 429 at once, while a plain read and a watch with a token still work.
    #[tokio::test]
    async fn unauthenticated_roots_watches_are_capped() {
        use crate::acl::{DefaultPolicy, testing};
        let agent = testing::agent_with_acls(DefaultPolicy::Deny).await;
        let token = testing::bootstrap(&agent).await;
        let index = agent.ca.state().roots_index;
        let watch = format!("/v1/agent/connect/ca/roots?index={index}&wait=50ms");
        // The bound is reached.
        let taken = agent
            .unauthenticated_watches
            .clone()
            .try_acquire_many_owned(crate::agent::MAX_UNAUTHENTICATED_WATCHES as u32)
            .expect("every permit");
        for path in [watch.clone(), watch.replace("/agent/connect", "/connect")] {
            let (st, _, body) = call(&agent, "GET", &path, None).await;
            assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{path}");
            assert!(String::from_utf8_lossy(&body).contains("retry later"));
            let (st, _, _) = call(&agent, "GET", &format!("{path}&token=bogus"), None).await;
            assert_eq!(
                st,
                StatusCode::TOO_MANY_REQUESTS,
                "an unknown token is no token"
            );
        }
        let (st, _, _) = call(&agent, "GET", "/v1/agent/connect/ca/roots", None).await;
        assert_eq!(st, StatusCode::OK, "a plain read is not a watch");
        let (st, _, _) = call(&agent, "GET", &format!("{watch}&token={token}"), None).await;
        assert_eq!(st, StatusCode::OK, "a watch with a valid token");
        drop(taken);
        let (st, _, _) = call(&agent, "GET", &watch, None).await;
        assert_eq!(st, StatusCode::OK, "room again");
    }

    #[tokio::test]
    async fn roots_leaf_and_configuration() {
        let agent = agent().await;

        let (st, h, body) = call(&agent, "GET", "/v1/agent/connect/ca/roots", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(header(&h, "x-cache"), "HIT");
        let raw: Value = serde_json::from_slice(&body).expect("json");
        assert!(raw["Roots"][0]["SerialNumber"].is_u64(), "{raw}");
        assert!(raw["Roots"][0]["IntermediateCerts"].is_null());
        let roots: IndexedCaRoots = serde_json::from_slice(&body).expect("roots");
        assert_eq!(roots.roots.len(), 1);
        assert_eq!(roots.active_root_id, roots.roots[0].id);
        assert!(roots.roots[0].active);
        assert_eq!(roots.roots[0].name, "Consul CA Root Cert");
        assert_eq!(roots.roots[0].signing_key_id.len(), 32 * 3 - 1);
        assert!(roots.trust_domain.ends_with(".consul"));
        assert_eq!(
            header(&h, "x-consul-index"),
            roots.roots[0].modify_index.to_string()
        );
        let (_, _, plain) = call(&agent, "GET", "/v1/connect/ca/roots", None).await;
        assert_eq!(plain, body);

        let (st, h, pem) = call(&agent, "GET", "/v1/connect/ca/roots?pem=true", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            header(&h, "content-type"),
            "application/pem-certificate-chain"
        );
        assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
        let (st, _, _) = call(&agent, "GET", "/v1/connect/ca/roots?pem=maybe", None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);

        let (st, h, body) = call(&agent, "GET", "/v1/agent/connect/ca/leaf/web", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(header(&h, "x-cache"), "MISS");
        let leaf: IssuedCertJson = serde_json::from_slice(&body).expect("leaf");
        assert_eq!(
            leaf.service_uri,
            format!("spiffe://{}/ns/default/dc/dc1/svc/web", roots.trust_domain)
        );
        assert_eq!(leaf.service, "web");
        assert!(
            leaf.private_key_pem
                .starts_with("-----BEGIN EC PRIVATE KEY-----")
        );
        assert!(leaf.serial_number.split(':').all(|b| b.len() == 2));
        assert!(leaf.valid_after.ends_with('Z') && leaf.valid_before.ends_with('Z'));
        assert_eq!(header(&h, "x-consul-index"), leaf.modify_index.to_string());
        let idx = leaf.modify_index;
        let (_, h, body) = call(
            &agent,
            "GET",
            &format!("/v1/agent/connect/ca/leaf/web?index={idx}&wait=50ms"),
            None,
        )
        .await;
        assert_eq!(header(&h, "x-cache"), "HIT");
        let same: IssuedCertJson = serde_json::from_slice(&body).expect("leaf");
        assert_eq!(
            same.serial_number, leaf.serial_number,
            "timed out unchanged"
        );
        let (st, _, _) = call(&agent, "GET", "/v1/agent/connect/ca/leaf/we%20b", None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);

        let (st, _, body) = call(&agent, "GET", "/v1/connect/ca/configuration", None).await;
        assert_eq!(st, StatusCode::OK);
        let cfg: CaConfigurationJson = serde_json::from_slice(&body).expect("config");
        assert_eq!(cfg.provider, "consul");
        assert_eq!(cfg.config["LeafCertTTL"], "72h");
        assert_eq!(cfg.config["RotationPeriod"], "2160h");
        assert_eq!(cfg.config["IntermediateCertTTL"], "8760h");

        let (st, _, body) = call(
            &agent,
            "PUT",
            "/v1/connect/ca/configuration",
            Some(serde_json::json!({"Provider": "consul", "Config": {"LeafCertTTL": "30m"}})),
        )
        .await;
        assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, b"leaf cert TTL must be greater or equal than 1h0m0s");
        let (st, _, _) = call(
            &agent,
            "PUT",
            "/v1/connect/ca/configuration",
            Some(serde_json::json!({"State": {"k": "v"}})),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);

        // Rotation through the API: a blocked leaf query returns the new leaf.
        let (st, _, body) = call(
            &agent,
            "PUT",
            "/v1/connect/ca/configuration",
            Some(serde_json::json!({"Provider": "consul", "Config": {"PrivateKeyBits": 384}})),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert!(body.is_empty());
        let (_, _, body) = call(&agent, "GET", "/v1/agent/connect/ca/roots", None).await;
        let rotated: IndexedCaRoots = serde_json::from_slice(&body).expect("roots");
        assert_eq!(rotated.roots.len(), 2);
        assert_ne!(rotated.active_root_id, roots.active_root_id);
        let active = rotated.roots.iter().find(|r| r.active).expect("one active");
        assert_eq!(active.intermediate_certs.as_ref().map(Vec::len), Some(1));
        assert_eq!(active.private_key_bits, 384);
        let (_, _, body) = call(
            &agent,
            "GET",
            &format!("/v1/agent/connect/ca/leaf/web?index={idx}&wait=10s"),
            None,
        )
        .await;
        let renewed: IssuedCertJson = serde_json::from_slice(&body).expect("leaf");
        assert_ne!(renewed.serial_number, leaf.serial_number);
        assert!(renewed.modify_index > idx);
        assert_eq!(renewed.cert_pem.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[tokio::test]
    async fn cli_commands_against_a_running_agent() {
        use crate::cli::{
            ca::{CaCommand, RootsArgs, SetConfigArgs, run},
            http::HttpArgs,
        };

        let agent = agent().await;
        let listener = crate::api::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let server = tokio::spawn(crate::api::serve(listener, agent.clone(), async move {
            s.cancelled().await
        }));
        let http = HttpArgs::to(addr.to_string());
        let ok = |r: anyhow::Result<std::process::ExitCode>| {
            assert_eq!(
                r.expect("command succeeds"),
                std::process::ExitCode::SUCCESS
            )
        };
        ok(run(CaCommand::Roots(RootsArgs {
            pem: false,
            http: http.clone(),
        }))
        .await);
        ok(run(CaCommand::GetConfig(http.clone())).await);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ca.json");
        std::fs::write(
            &file,
            r#"{"Provider": "consul", "Config": {"LeafCertTTL": "48h"}}"#,
        )
        .expect("write");
        ok(run(CaCommand::SetConfig(SetConfigArgs {
            config_file: Some(file.display().to_string()),
            force_without_cross_signing: false,
            http: http.clone(),
        }))
        .await);
        assert_eq!(
            agent.ca.state().config.leaf_cert_ttl,
            std::time::Duration::from_secs(48 * 3600)
        );
        std::fs::write(&file, r#"{"Config": {"LeafCertTTL": "1m"}}"#).expect("write");
        let err = run(CaCommand::SetConfig(SetConfigArgs {
            config_file: Some(file.display().to_string()),
            force_without_cross_signing: false,
            http,
        }))
        .await
        .expect_err("invalid config refused");
        assert!(format!("{err:#}").contains("leaf cert TTL"), "{err:#}");
        stop.cancel();
        server.await.expect("join").expect("serve");
    }
}
