//! HTTP routes of the `acl` area: Consul's token and policy API.
//!
//! `PUT /v1/acl/bootstrap`; `PUT /v1/acl/token`, `GET /v1/acl/token/self`,
//! `GET|PUT|DELETE /v1/acl/token/<accessor>`, `PUT /v1/acl/token/<accessor>/clone`,
//! `GET /v1/acl/tokens[?policy=][&servicename=]`; `PUT /v1/acl/policy`,
//! `GET|PUT|DELETE /v1/acl/policy/<id>`, `GET /v1/acl/policy/name/<name>`,
//! `GET /v1/acl/policies`. Reads need `acl:read`, writes `acl:write`; bootstrap
//! needs nothing and works once. With ACLs disabled every route answers 401
//! `ACL support disabled`, as Consul does.
//!
//! Token reads show `SecretID` as `<hidden>`: the agent keeps only a hash of each
//! secret (see `acl::model`). The secret appears once, when the token is made, and
//! `token/self` echoes the one the caller presented.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use serde_json::Value;
use uuid::Uuid;

use super::{
    ApiState, Error, QueryOptions,
    authz::{Authz, Right, token_of},
    block_on, index_headers,
};
use crate::acl::{
    self, Caller, PolicyRequest, TokenRequest,
    model::{ANONYMOUS_ACCESSOR, TokenJson},
};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/acl/bootstrap", put(bootstrap))
        .route("/v1/acl/token", put(create_token))
        .route("/v1/acl/token/self", get(token_self))
        .route(
            "/v1/acl/token/{id}",
            get(read_token).put(update_token).delete(delete_token),
        )
        .route("/v1/acl/token/{id}/clone", put(clone_token))
        .route("/v1/acl/tokens", get(list_tokens))
        .route("/v1/acl/policy", put(create_policy))
        .route(
            "/v1/acl/policy/{id}",
            get(read_policy).put(update_policy).delete(delete_policy),
        )
        .route("/v1/acl/policy/name/{name}", get(read_policy_by_name))
        .route("/v1/acl/policies", get(list_policies))
}

/// Refuses every ACL route while ACLs are disabled, before any other check.
fn enabled(agent: &ApiState) -> Result<(), Error> {
    if agent.acl.enabled() {
        Ok(())
    } else {
        Err(Error::AclDisabled)
    }
}

fn decode(body: &[u8]) -> Result<Value, Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(body).map_err(|e| Error::Decode(e.to_string()))
}

fn parse_id(id: &str) -> Result<Uuid, Error> {
    // Consul answers an ID that is not a UUID as it answers an unknown one.
    Uuid::parse_str(id).map_err(|_| Error::AclNotFound)
}

fn json(headers: HeaderMap, value: &impl serde::Serialize) -> Response {
    (headers, axum::Json(value)).into_response()
}

/// `PUT /v1/acl/bootstrap`: the first management token, with its secret.
async fn bootstrap(State(agent): State<ApiState>) -> Result<Response, Error> {
    enabled(&agent)?;
    let (token, _) = agent.acl.bootstrap().await?;
    Ok(json(HeaderMap::new(), &token))
}

async fn create_token(
    State(agent): State<ApiState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    let req = TokenRequest::from_json(&decode(&body)?).map_err(acl::Error::from)?;
    let (token, _) = agent.acl.create_token(req).await?;
    Ok(json(HeaderMap::new(), &token))
}

/// `GET /v1/acl/token/self`: the caller's own token; needs no right.
async fn token_self(
    State(agent): State<ApiState>,
    authz: Authz,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Error> {
    enabled(&agent)?;
    match authz.identity() {
        Caller::Token(t) => {
            let secret = token_of(query.as_deref().unwrap_or(""), &headers);
            let snap = agent.acl.snapshot();
            Ok(json(
                HeaderMap::new(),
                &snap.token_json(t, secret.as_deref()),
            ))
        }
        Caller::Anonymous(_) => Ok(json(
            HeaderMap::new(),
            &TokenJson {
                accessor_id: ANONYMOUS_ACCESSOR.to_string(),
                secret_id: "anonymous".to_owned(),
                description: "Anonymous Token".to_owned(),
                policies: vec![],
                service_identities: vec![],
                node_identities: vec![],
                local: false,
                create_time: String::new(),
                hash: String::new(),
                create_index: 0,
                modify_index: 0,
            },
        )),
        Caller::Unknown | Caller::Disabled => Err(Error::AclNotFound),
    }
}

async fn read_token(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclRead)?;
    let id = parse_id(&id)?;
    let acl = agent.acl.clone();
    let (found, index) = block_on(opts, agent.acl.subscribe(), move || {
        let snap = acl.snapshot();
        let t = snap.tokens.get(&id).map(|t| snap.token_json(t, None));
        (t, snap.index)
    })
    .await;
    let token = found.ok_or(Error::AclNotFound)?;
    Ok(json(index_headers(index), &token))
}

async fn update_token(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    let id = parse_id(&id)?;
    let req = TokenRequest::from_json(&decode(&body)?).map_err(acl::Error::from)?;
    let token = agent.acl.update_token(id, req).await?;
    Ok(json(HeaderMap::new(), &token))
}

async fn delete_token(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    agent.acl.delete_token(parse_id(&id)?).await?;
    Ok(json(HeaderMap::new(), &true))
}

/// `PUT /v1/acl/token/<id>/clone`: a new token with the same policies and
/// identities and a new secret.
async fn clone_token(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    let id = parse_id(&id)?;
    let body = decode(&body)?;
    let snap = agent.acl.snapshot();
    let original = snap.tokens.get(&id).ok_or(Error::AclNotFound)?;
    let description = body
        .as_object()
        .and_then(|o| o.get("Description").or_else(|| o.get("description")))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| original.record.description.clone());
    let req = TokenRequest {
        description,
        policies: original
            .record
            .policies
            .iter()
            .map(|p| acl::PolicyLink::Id(*p))
            .collect(),
        service_identities: original.record.service_identities.clone(),
        node_identities: original.record.node_identities.clone(),
        local: original.record.local,
        ..TokenRequest::default()
    };
    let (token, _) = agent.acl.create_token(req).await?;
    Ok(json(HeaderMap::new(), &token))
}

/// `GET /v1/acl/tokens[?policy=<id>][&servicename=<name>]`.
async fn list_tokens(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclRead)?;
    let query = query.unwrap_or_default();
    let param = |name: &str| {
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name && !v.is_empty()).then(|| v.to_owned())
        })
    };
    let policy = match param("policy") {
        Some(p) => Some(Uuid::parse_str(&p).map_err(|_| {
            Error::BadRequest("the policy parameter must be a policy ID".to_owned())
        })?),
        None => None,
    };
    let service = param("servicename");
    let acl = agent.acl.clone();
    let (tokens, index) = block_on(opts, agent.acl.subscribe(), move || {
        let snap = acl.snapshot();
        let list: Vec<TokenJson> = snap
            .tokens
            .values()
            .filter(|t| policy.is_none_or(|p| t.record.policies.contains(&p)))
            .filter(|t| {
                service.as_deref().is_none_or(|s| {
                    t.record
                        .service_identities
                        .iter()
                        .any(|si| si.service_name.as_str() == s)
                })
            })
            .map(|t| snap.token_json(t, None))
            .collect();
        (list, snap.index)
    })
    .await;
    Ok(json(index_headers(index), &tokens))
}

async fn create_policy(
    State(agent): State<ApiState>,
    authz: Authz,
    body: Bytes,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    let req = PolicyRequest::from_json(&decode(&body)?).map_err(acl::Error::from)?;
    let policy = agent.acl.create_policy(req).await?;
    Ok(json(HeaderMap::new(), &policy))
}

async fn read_policy(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    opts: QueryOptions,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclRead)?;
    let id = parse_id(&id)?;
    let acl = agent.acl.clone();
    let (found, index) = block_on(opts, agent.acl.subscribe(), move || {
        let snap = acl.snapshot();
        let p = snap.policies.get(&id).map(|p| acl::policy_json(p, true));
        (p, snap.index)
    })
    .await;
    let policy = found.ok_or(Error::AclNotFound)?;
    Ok(json(index_headers(index), &policy))
}

async fn read_policy_by_name(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(name): Path<String>,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclRead)?;
    let snap = agent.acl.snapshot();
    let policy = snap.policy_by_name(&name).ok_or(Error::AclNotFound)?;
    Ok(json(
        index_headers(snap.index),
        &acl::policy_json(policy, true),
    ))
}

async fn update_policy(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    let id = parse_id(&id)?;
    let req = PolicyRequest::from_json(&decode(&body)?).map_err(acl::Error::from)?;
    let policy = agent.acl.update_policy(id, req).await?;
    Ok(json(HeaderMap::new(), &policy))
}

async fn delete_policy(
    State(agent): State<ApiState>,
    authz: Authz,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclWrite)?;
    agent.acl.delete_policy(parse_id(&id)?).await?;
    Ok(json(HeaderMap::new(), &true))
}

async fn list_policies(
    State(agent): State<ApiState>,
    authz: Authz,
    opts: QueryOptions,
) -> Result<Response, Error> {
    enabled(&agent)?;
    authz.require(Right::AclRead)?;
    let acl = agent.acl.clone();
    let (list, index) = block_on(opts, agent.acl.subscribe(), move || {
        let snap = acl.snapshot();
        let list: Vec<_> = snap
            .policies
            .values()
            .map(|p| acl::policy_json(p, false))
            .collect();
        (list, snap.index)
    })
    .await;
    Ok(json(index_headers(index), &list))
}

#[cfg(test)]
mod tests;
