//! HTTP routes of the `intentions` area (reference §2.3, §2.6): the legacy ID-based
//! intention API, the 1.9+ exact API, `match` and `check`, and
//! `POST /v1/agent/connect/authorize`.
//!
//! Handlers parse input into typed values and call [`crate::intentions::Intentions`];
//! reads come from its in-memory table (blocking queries via [`super::block_on`]).
//! Bodies are decoded whatever their `Content-Type` (py-consul sends none) with
//! case-insensitive keys, as Consul does.
//!
//! Deviations from Consul, on purpose: invalid input answers 400 (Consul often 500),
//! a duplicate pair 409, an unknown ID 404; only the documented 500 for a missing
//! `match`/`check`/`exact` query parameter is kept. Authorize also accepts `PUT`
//! (py-consul uses it; Consul answers 405). Intentions made through the exact API get
//! an ID too, so the ID-based calls and CLI work on every intention.
//!
//! ACLs (reference §3) are destination-oriented: reading an intention needs
//! `intentions:read` on its destination (lists are filtered, `match` refuses if any
//! name is denied), writing needs `intentions:write` on the destination (an update
//! on the old and the new one), `check` needs `service:read` on the destination,
//! and authorize needs `service:write` on `Target` (only the service's own proxy
//! asks on its behalf).

use std::collections::BTreeMap;

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequestParts, Path, Query, State},
    http::{HeaderMap, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    ApiState, Error, QueryOptions,
    authz::{Authz, Right},
    block_on, cache_header, index_headers,
};
use crate::{
    identity::{ServiceName, SpiffeId, TrustDomain},
    intentions::{
        self, ApiIntention, Body, InputError, MatchBy, Selector,
        filter::Filter,
        model::{self, string_field},
    },
};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/connect/intentions", get(list).post(create))
        .route("/v1/connect/intentions/match", get(match_))
        .route("/v1/connect/intentions/check", get(check))
        .route(
            "/v1/connect/intentions/exact",
            get(read_exact).put(upsert_exact).delete(delete_exact),
        )
        .route(
            "/v1/connect/intentions/{id}",
            get(read).put(update).delete(delete),
        )
        .route(
            "/v1/agent/connect/authorize",
            post(authorize).put(authorize),
        )
}

/// The trust domain client certificates must belong to, once known.
///
/// The cluster's trust domain, from the CA's current state (in memory): a client
/// certificate URI from another trust domain is denied.
fn expected_trust_domain(agent: &ApiState) -> Option<TrustDomain> {
    Some(agent.ca.state().trust_domain.clone())
}

// ───────────────────────────── handlers ─────────────────────────────

/// `GET /v1/connect/intentions[?filter=]`, blocking.
async fn list(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
    params: Params,
) -> Result<Response, Error> {
    authz.known()?;
    let filter = match params.get("filter").filter(|f| !f.trim().is_empty()) {
        Some(f) => Some(Filter::parse(f).map_err(|e| Error::BadRequest(e.to_string()))?),
        None => None,
    };
    let ixns = &agent.intentions;
    let (all, index) = block_on(opts, ixns.subscribe(), || ixns.list()).await;
    let visible = authz.filter(all.iter(), |i| Right::IntentionRead(i.destination.as_str()))?;
    let out: Vec<ApiIntention> = visible
        .into_iter()
        .map(|i| i.to_api())
        .filter(|i| filter.as_ref().is_none_or(|f| f.matches(i)))
        .collect();
    reply(index_headers(index), &out, params.pretty())
}

/// `POST /v1/connect/intentions`: `{"ID": "<uuid>"}`.
async fn create(
    State(agent): State<ApiState>,
    authz: Authz,
    params: Params,
    body: Bytes,
) -> Result<Response, Error> {
    authz.known()?;
    let body = Body::from_json(&decode(&body)?)?;
    if body.id.is_some() {
        return Err(InputError::IdNotEmpty.into());
    }
    let spec = body.into_spec()?;
    authz.require(Right::IntentionWrite(spec.destination.as_str()))?;
    let id = agent.intentions.create(spec).await?;
    reply(HeaderMap::new(), &json!({ "ID": id }), params.pretty())
}

/// `GET /v1/connect/intentions/:id`, blocking.
async fn read(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    opts: QueryOptions,
    params: Params,
) -> Result<Response, Error> {
    authz.known()?;
    let id = model::parse_id(&id)?;
    let ixns = &agent.intentions;
    let (found, index) = block_on(opts, ixns.subscribe(), || ixns.get(&id)).await;
    let found = found.ok_or(intentions::Error::NotFound { id })?;
    authz.require(Right::IntentionRead(found.destination.as_str()))?;
    reply(index_headers(index), &found.to_api(), params.pretty())
}

/// `PUT /v1/connect/intentions/:id`: replaces the intention (the path's ID wins over
/// any in the body, as in Consul).
async fn update(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    params: Params,
    body: Bytes,
) -> Result<Response, Error> {
    authz.known()?;
    let id = model::parse_id(&id)?;
    let spec = Body::from_json(&decode(&body)?)?.into_spec()?;
    authz.require(Right::IntentionWrite(spec.destination.as_str()))?;
    if let (Some(old), _) = agent.intentions.get(&id) {
        authz.require(Right::IntentionWrite(old.destination.as_str()))?;
    }
    agent.intentions.update(id, spec).await?;
    reply(HeaderMap::new(), &json!({ "ID": id }), params.pretty())
}

/// `DELETE /v1/connect/intentions/:id`: `true`.
async fn delete(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    authz.known()?;
    let id = model::parse_id(&id)?;
    if let (Some(old), _) = agent.intentions.get(&id) {
        authz.require(Right::IntentionWrite(old.destination.as_str()))?;
    }
    agent.intentions.delete(id).await?;
    reply(HeaderMap::new(), &true, false)
}

/// `GET /v1/connect/intentions/exact?source=&destination=`, blocking.
async fn read_exact(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
    params: Params,
) -> Result<Response, Error> {
    authz.known()?;
    let (source, destination) = params.pair()?;
    authz.require(Right::IntentionRead(destination.as_str()))?;
    let ixns = &agent.intentions;
    let (found, index) =
        block_on(opts, ixns.subscribe(), || ixns.exact(&source, &destination)).await;
    let found = found.ok_or_else(|| Error::NotFound("Intention not found".into()))?;
    reply(index_headers(index), &found.to_api(), params.pretty())
}

/// `PUT /v1/connect/intentions/exact?source=&destination=`: upsert, `true`. The
/// names come from the query; the body gives `Action`, `Description` (and `Meta`,
/// which Consul refuses unless unchanged).
async fn upsert_exact(
    State(agent): State<ApiState>,
    authz: Authz,
    params: Params,
    body: Bytes,
) -> Result<Response, Error> {
    authz.known()?;
    let (source, destination) = params.pair()?;
    authz.require(Right::IntentionWrite(destination.as_str()))?;
    let body = Body::from_json(&decode(&body)?)?;
    let action = body.action.ok_or(InputError::Action)?;
    agent
        .intentions
        .upsert(source, destination, action, body.description, body.meta)
        .await?;
    reply(HeaderMap::new(), &true, false)
}

/// `DELETE /v1/connect/intentions/exact?source=&destination=`: `true`, also when
/// there was nothing to delete.
async fn delete_exact(
    State(agent): State<ApiState>,
    authz: Authz,
    params: Params,
) -> Result<Response, Error> {
    authz.known()?;
    let (source, destination) = params.pair()?;
    authz.require(Right::IntentionWrite(destination.as_str()))?;
    agent.intentions.delete_exact(&source, &destination).await?;
    reply(HeaderMap::new(), &true, false)
}

/// `GET /v1/connect/intentions/match?by=source|destination&name=X[&name=Y]`,
/// blocking: `{"X": [...], "Y": [...]}`, each list in evaluation order.
async fn match_(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
    params: Params,
) -> Result<Response, Error> {
    authz.known()?;
    let by = match params.get("by") {
        None | Some("") => return Err(Error::MissingParam("by")),
        Some("source") => MatchBy::Source,
        Some("destination") => MatchBy::Destination,
        Some(_) => {
            return Err(Error::BadRequest(
                "'by' parameter must be one of 'source' or 'destination'".into(),
            ));
        }
    };
    let raw: Vec<&str> = params.all("name").filter(|n| !n.is_empty()).collect();
    if raw.is_empty() {
        return Err(Error::MissingParam("name"));
    }
    let names = raw
        .iter()
        .map(|n| Selector::parse_qualified("name", n))
        .collect::<Result<Vec<_>, _>>()?;
    for n in &names {
        authz.require(Right::IntentionRead(n.as_str()))?;
    }
    let ixns = &agent.intentions;
    let (lists, index) = block_on(opts, ixns.subscribe(), || ixns.matching(by, &names)).await;
    let out: BTreeMap<&str, Vec<ApiIntention>> = raw
        .iter()
        .zip(lists)
        .map(|(name, list)| (*name, list.iter().map(|i| i.to_api()).collect()))
        .collect();
    reply(index_headers(index), &out, params.pretty())
}

/// `GET /v1/connect/intentions/check?source=&destination=[&source-type=consul]`:
/// `{"Allowed": bool}`.
async fn check(
    State(agent): State<ApiState>,
    authz: Authz,
    params: Params,
) -> Result<Response, Error> {
    authz.known()?;
    let (source, destination) = params.pair()?;
    authz.require(Right::ServiceRead(destination.as_str()))?;
    if let Some(t) = params.get("source-type")
        && !t.is_empty()
        && t != model::SOURCE_TYPE_CONSUL
    {
        return Err(InputError::SourceType.into());
    }
    let decision = agent.intentions.check(&source, &destination);
    reply(
        HeaderMap::new(),
        &json!({ "Allowed": decision.is_allow() }),
        params.pretty(),
    )
}

/// `POST /v1/agent/connect/authorize` `{"Target", "ClientCertURI",
/// "ClientCertSerial"}` → `{"Authorized", "Reason"}`. The serial is accepted and not
/// checked (no revocation, as in Consul).
async fn authorize(
    State(agent): State<ApiState>,
    authz: Authz,
    params: Params,
    body: Bytes,
) -> Result<Response, Error> {
    authz.known()?;
    let value = decode(&body)?;
    let obj = value.as_object().ok_or(InputError::NotAnObject)?;
    let target = string_field(obj, "Target")?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::BadRequest("Target service must be specified".into()))?;
    let target: ServiceName = target
        .parse()
        .map_err(|e| Error::BadRequest(format!("Target service is invalid: {e}")))?;
    authz.require(Right::ServiceWrite(target.as_str()))?;
    let uri = string_field(obj, "ClientCertURI")?.unwrap_or_default();
    let client: SpiffeId = uri.parse().map_err(|e| {
        // Consul tells a non-SPIFFE URI apart from a SPIFFE ID that names no service.
        let what = if uri.starts_with("spiffe://") {
            "Service"
        } else {
            "Connect"
        };
        Error::BadRequest(format!("ClientCertURI not a valid {what} identifier: {e}"))
    })?;
    let serial = string_field(obj, "ClientCertSerial")?.unwrap_or_default();
    let td = expected_trust_domain(&agent);
    let decision = agent
        .intentions
        .authorize_client(&target, &client, td.as_ref());
    if decision.is_allow() {
        tracing::debug!(source = %client.service, destination = %target, serial, reason = %decision, "authorized");
    } else {
        tracing::info!(source = %client.service, destination = %target, serial, reason = %decision, "not authorized");
    }
    let mut headers = HeaderMap::new();
    // Served from the in-memory intentions, which is Consul's cache hit.
    cache_header(&mut headers, true);
    reply(
        headers,
        &json!({ "Authorized": decision.is_allow(), "Reason": decision.to_string() }),
        params.pretty(),
    )
}

// ───────────────────────────── helpers ─────────────────────────────

/// The query string as name/value pairs, repeats kept (`name=a&name=b`).
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| Error::BadRequest(e.body_text()))?;
        Ok(Params(pairs))
    }
}

impl Params {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn pretty(&self) -> bool {
        self.0.iter().any(|(k, _)| k == "pretty")
    }

    /// `source` and `destination`, both required (Consul's 500 when missing).
    fn pair(&self) -> Result<(Selector, Selector), Error> {
        let source = self
            .get("source")
            .filter(|s| !s.is_empty())
            .ok_or(Error::MissingParam("source"))?;
        let destination = self
            .get("destination")
            .filter(|s| !s.is_empty())
            .ok_or(Error::MissingParam("destination"))?;
        Ok((
            Selector::parse_qualified("source", source)?,
            Selector::parse_qualified("destination", destination)?,
        ))
    }
}

/// Parses a JSON body whatever its `Content-Type`.
fn decode(body: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Decode(e.to_string()))
}

/// A JSON response; `?pretty` indents with four spaces, as Go's encoder does.
fn reply<T: Serialize + ?Sized>(
    mut headers: HeaderMap,
    value: &T,
    pretty: bool,
) -> Result<Response, Error> {
    let body = if pretty {
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        value
            .serialize(&mut ser)
            .map_err(|e| Error::ours("cannot encode the answer", e))?;
        buf
    } else {
        serde_json::to_vec(value).map_err(|e| Error::ours("cannot encode the answer", e))?
    };
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok((headers, body).into_response())
}

#[cfg(test)]
mod tests;
