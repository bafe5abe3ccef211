//! HTTP routes of the `catalog` area (reference §2.7–§2.9): agent service
//! registration, the local service list, and the catalog/health reads, including
//! the Connect endpoints.
//!
//! Reads come from the catalog's in-memory snapshot and are blocking queries
//! (`?index=&wait=`, `X-Consul-Index`). Deviations from Consul, on purpose:
//! deregistering an unknown ID answers 404 (Consul: 200 with ACLs off); the Connect
//! endpoint of an instance is its node's inbound proxy (see [`crate::catalog`]).

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderName, HeaderValue},
    response::{IntoResponse, Response},
    routing::{get, put},
};
use serde_json::{Map, Value, json};

use super::{ApiState, Authz, Error, QueryOptions, Right, block_on, index_headers};
use crate::{
    catalog::{self, CatalogSnapshot, Instance},
    identity::ServiceName,
};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/catalog/service/{service}", get(catalog_service))
        .route("/v1/catalog/connect/{service}", get(catalog_connect))
        .route("/v1/health/service/{service}", get(health_service))
        .route("/v1/health/connect/{service}", get(health_connect))
}

fn json_response(headers: HeaderMap, body: Value) -> Response {
    (headers, axum::Json(body)).into_response()
}

fn service_name(s: &str) -> Result<ServiceName, Error> {
    s.parse::<ServiceName>()
        .map_err(|e| Error::BadRequest(e.to_string()))
}

/// Runs a blocking read on the catalog snapshot.
async fn read<T>(
    agent: &ApiState,
    opts: QueryOptions,
    f: impl Fn(&CatalogSnapshot) -> T,
) -> (T, HeaderMap) {
    let catalog = agent.catalog.clone();
    let (v, index) = block_on(opts, catalog.changes(), || {
        let snap = catalog.snapshot();
        (f(&snap), snap.index)
    })
    .await;
    (v, index_headers(index))
}

// ───────────────────────────── agent ─────────────────────────────

async fn register(
    State(agent): State<ApiState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, Error> {
    let value: Value = serde_json::from_slice(&body).map_err(|e| Error::Decode(e.to_string()))?;
    // The rights are judged on the definition as parsed, the one that is registered,
    // never on a field read another way. A body the parser refuses still needs a
    // valid token, so that anonymous callers learn nothing from the validation.
    let def = match catalog::definition::parse(&value, "") {
        Ok(def) => def,
        Err(e) => {
            authz.known()?;
            return Err(catalog::Error::from(e).into());
        }
    };
    for name in registration_rights(&agent.catalog.snapshot(), &def) {
        authz.require(Right::ServiceWrite(&name))?;
    }
    agent.catalog.register_definition(def).await?;
    Ok(().into_response())
}

/// The services a registration needs `service:write` on: the one it names; for a
/// `connect-proxy`, the service it fronts (its upstreams dial as that service, as
/// Consul rules); and, for each ID it writes (its own and its sidecar's) that a
/// local service holds now, that service, so that a token for `web` cannot replace
/// `db`'s registration by naming `db`'s ID.
fn registration_rights(
    snap: &CatalogSnapshot,
    def: &catalog::definition::Definition,
) -> Vec<String> {
    let mut names = vec![def.name.to_string()];
    if let Some(p) = &def.proxy {
        names.push(p.destination_service_name.to_string());
    }
    let mut ids = vec![def.id.clone()];
    if def.sidecar.is_some() {
        ids.push(format!("{}-sidecar-proxy", def.id));
    }
    for id in ids {
        if let Some(holder) = snap.local_service(&id) {
            names.push(holder.service.service.to_string());
        }
    }
    names.sort();
    names.dedup();
    names
}

async fn deregister(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    // service:write on the service the ID belongs to; an unknown ID still needs a
    // valid token, so anonymous callers cannot probe which IDs exist.
    let existing = agent
        .catalog
        .snapshot()
        .local_service(&id)
        .map(|i| i.service.service.to_string());
    match &existing {
        Some(name) => authz.require(Right::ServiceWrite(name))?,
        None => authz.require(Right::ServiceWrite(&id))?,
    }
    agent.catalog.deregister(&id).await?;
    Ok(().into_response())
}

async fn agent_services(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let (body, headers) = read(&agent, opts, |snap| {
        let m: Map<String, Value> = snap
            .local()
            .filter(|i| authz.allows(Right::ServiceRead(i.service.service.as_str())))
            .map(|i| (i.service.id.clone(), agent_service_json(i)))
            .collect();
        Value::Object(m)
    })
    .await;
    Ok(json_response(headers, body))
}

fn agent_service_json(i: &Instance) -> Value {
    let mut v = i.service.agent_json();
    if let Value::Object(m) = &mut v {
        m.insert("Datacenter".into(), json!(i.node.datacenter));
    }
    v
}

/// `GET /v1/agent/service/:id`, with Consul's hash blocking (`?hash=&wait=`).
async fn agent_service(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    opts: QueryOptions,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response, Error> {
    let name = agent
        .catalog
        .snapshot()
        .local_service(&id)
        .map(|i| i.service.service.to_string());
    authz.require(Right::ServiceRead(name.as_deref().unwrap_or(&id)))?;
    let want_hash = q.as_deref().and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "hash")
            .map(|(_, v)| v.to_owned())
    });
    let lookup = |snap: &CatalogSnapshot| {
        snap.local_service(&id).map(|i| {
            let v = agent_service_json(i);
            let hash = content_hash(&v);
            (v, hash)
        })
    };
    let catalog = agent.catalog.clone();
    let deadline = tokio::time::Instant::now() + opts.wait;
    let mut changes = catalog.changes();
    let found = loop {
        changes.borrow_and_update();
        let found = lookup(&catalog.snapshot());
        let same = match (&want_hash, &found) {
            (Some(h), Some((_, cur))) => h == cur,
            _ => false,
        };
        if !same {
            break found;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            _ => break lookup(&catalog.snapshot()),
        }
    };
    let Some((mut v, hash)) = found else {
        return Err(Error::NotFound(format!("unknown service ID: {id}")));
    };
    if let Value::Object(m) = &mut v {
        m.insert("ContentHash".into(), json!(hash));
    }
    let mut headers = index_headers(catalog.snapshot().index);
    if let Ok(h) = HeaderValue::from_str(&hash) {
        headers.insert(HeaderName::from_static("x-consul-contenthash"), h);
    }
    Ok(json_response(headers, v))
}

/// A short hash of a service's JSON, for hash-based blocking.
fn content_hash(v: &Value) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(v.to_string().as_bytes());
    hex::encode(&digest[..8])
}

// ───────────────────────────── catalog and health ─────────────────────────────

async fn catalog_services(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let (body, headers) = read(&agent, opts, |snap| {
        let mut m: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for i in snap
            .all()
            .filter(|i| authz.allows(Right::ServiceRead(i.service.service.as_str())))
        {
            let tags = m.entry(i.service.service.to_string()).or_default();
            for t in &i.service.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        json!(m)
    })
    .await;
    Ok(json_response(headers, body))
}

async fn catalog_nodes(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let (body, headers) = read(&agent, opts, |snap| {
        Value::Array(
            snap.nodes()
                .filter(|(n, _, _)| authz.allows(Right::NodeRead(&n.node)))
                .map(|(n, c, m)| n.json(*c, *m))
                .collect(),
        )
    })
    .await;
    Ok(json_response(headers, body))
}

async fn catalog_service(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(service): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let name = service_name(&service)?;
    // Without service:read the list is empty, as Consul filters it.
    let visible = authz.allows(Right::ServiceRead(name.as_str()));
    let (body, headers) = read(&agent, opts, |snap| {
        Value::Array(
            snap.instances(&name)
                .iter()
                .filter(|_| visible)
                .map(|i| catalog_entry(i, false))
                .collect(),
        )
    })
    .await;
    Ok(json_response(headers, body))
}

async fn catalog_connect(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(service): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let name = service_name(&service)?;
    // Without service:read the list is empty, as Consul filters it.
    let visible = authz.allows(Right::ServiceRead(name.as_str()));
    let (body, headers) = read(&agent, opts, |snap| {
        Value::Array(
            snap.connect_endpoints(&name)
                .iter()
                .filter(|_| visible)
                .map(|i| catalog_entry(i, true))
                .collect(),
        )
    })
    .await;
    Ok(json_response(headers, body))
}

async fn health_service(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(service): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let name = service_name(&service)?;
    // Without service:read the list is empty, as Consul filters it.
    let visible = authz.allows(Right::ServiceRead(name.as_str()));
    let (body, headers) = read(&agent, opts, |snap| {
        Value::Array(
            snap.instances(&name)
                .iter()
                .filter(|_| visible)
                .map(|i| health_entry(i, false))
                .collect(),
        )
    })
    .await;
    Ok(json_response(headers, body))
}

async fn health_connect(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(service): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    authz.known()?;
    let name = service_name(&service)?;
    // Without service:read the list is empty, as Consul filters it.
    let visible = authz.allows(Right::ServiceRead(name.as_str()));
    let (body, headers) = read(&agent, opts, |snap| {
        Value::Array(
            snap.connect_endpoints(&name)
                .iter()
                .filter(|_| visible)
                .map(|i| health_entry(i, true))
                .collect(),
        )
    })
    .await;
    Ok(json_response(headers, body))
}

/// The service JSON of an entry; for a Connect endpoint, the address to dial is the
/// node's inbound proxy.
fn entry_service(i: &Instance, connect: bool) -> Value {
    let mut v = agent_service_json(i);
    if let Value::Object(m) = &mut v {
        if connect {
            let ep = catalog::connect_endpoint(i);
            m.insert("Address".into(), json!(ep.ip().to_string()));
            m.insert("Port".into(), json!(ep.port()));
        }
        m.insert("CreateIndex".into(), json!(i.create_index));
        m.insert("ModifyIndex".into(), json!(i.modify_index));
    }
    v
}

/// Consul's `ServiceEntry` (`/v1/health/*`).
fn health_entry(i: &Instance, connect: bool) -> Value {
    let svc = entry_service(i, connect);
    json!({
        "Node": i.node.json(i.create_index, i.modify_index),
        "Service": svc,
        "Checks": [],
    })
}

/// Consul's `CatalogService` (`/v1/catalog/service|connect`).
fn catalog_entry(i: &Instance, connect: bool) -> Value {
    let s = entry_service(i, connect);
    let get = |k: &str| s.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "ID": "",
        "Node": i.node.node,
        "Address": i.node.address.to_string(),
        "Datacenter": i.node.datacenter,
        "TaggedAddresses": {"lan": i.node.address.to_string(), "wan": i.node.address.to_string()},
        "NodeMeta": {},
        "ServiceKind": s.get("Kind").cloned().unwrap_or(json!("")),
        "ServiceID": get("ID"),
        "ServiceName": get("Service"),
        "ServiceTags": get("Tags"),
        "ServiceAddress": get("Address"),
        "ServiceWeights": get("Weights"),
        "ServiceMeta": get("Meta"),
        "ServicePort": get("Port"),
        "ServiceEnableTagOverride": false,
        "ServiceProxy": s.get("Proxy").cloned().unwrap_or(json!({})),
        "ServiceConnect": s.get("Connect").cloned().unwrap_or(json!({})),
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

#[cfg(test)]
mod tests;
