//! The permission matrix: every endpoint of this tree, called with no token, an
//! unknown token, a token without the right and a token with it. Status and body
//! must be right in each cell, and a refused request must leave nothing behind.

use std::sync::Arc;

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{
    acl::{
        DefaultPolicy,
        testing::{agent_with_acls, bootstrap, token_with_rules},
    },
    agent::Agent,
};

/// How the endpoint answers callers without the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 403 `Permission denied` (unknown token: 403 `ACL not found`).
    Guarded,
    /// Lists filtered to what the caller may read: 200 without the fixture.
    Filtered,
    /// No right needed: 200 for everyone, an unknown token included.
    Open,
}

struct Case {
    method: &'static str,
    /// `{ixn}`, `{token}`, `{policy}` are replaced by the fixtures' IDs.
    path: &'static str,
    body: Option<Value>,
    /// Rules that grant the right; `lacking` come close but do not.
    grant: &'static str,
    lacking: &'static str,
    kind: Kind,
    /// What the granted call answers, checked on status and body.
    ok: fn(&Fixture, StatusCode, &str) -> bool,
}

/// Objects each case works on, made fresh for every case.
struct Fixture {
    ixn: String,
    token: String,
    policy: String,
}

async fn fixture(agent: &Agent) -> Fixture {
    let spec = crate::intentions::Body::from_json(&json!({
        "SourceName": "web", "DestinationName": "db", "Action": "allow"
    }))
    .expect("body")
    .into_spec()
    .expect("spec");
    let ixn = agent.intentions.create(spec).await.expect("intention");
    let policy = agent
        .acl
        .create_policy(
            crate::acl::PolicyRequest::from_json(&json!({"Name": "fixture", "Rules": ""}))
                .expect("policy"),
        )
        .await
        .expect("policy");
    let (token, _) = agent
        .acl
        .create_token(crate::acl::TokenRequest {
            description: "fixture".into(),
            ..Default::default()
        })
        .await
        .expect("token");
    agent
        .catalog
        .register(&json!({"ID": "db-fixture-1", "Name": "db", "Port": 5432}))
        .await
        .expect("service");
    Fixture {
        ixn: ixn.to_string(),
        token: token.accessor_id,
        policy: policy.id,
    }
}

const ACL_READ: &str = r#"acl = "read""#;
const ACL_WRITE: &str = r#"acl = "write""#;
const NOTHING: &str = r#"service "unrelated" { policy = "write" }"#;

fn ok200(_: &Fixture, s: StatusCode, _: &str) -> bool {
    s == StatusCode::OK
}
fn is_true(_: &Fixture, s: StatusCode, b: &str) -> bool {
    s == StatusCode::OK && b == "true"
}
fn has_ixn(f: &Fixture, s: StatusCode, b: &str) -> bool {
    s == StatusCode::OK && b.contains(&f.ixn)
}
fn has_token(f: &Fixture, s: StatusCode, b: &str) -> bool {
    s == StatusCode::OK && b.contains(&f.token)
}
fn has_policy(f: &Fixture, s: StatusCode, b: &str) -> bool {
    s == StatusCode::OK && b.contains(&f.policy)
}
fn has_service(_: &Fixture, s: StatusCode, b: &str) -> bool {
    s == StatusCode::OK && b.contains("db-fixture-1")
}
fn new_secret(_: &Fixture, s: StatusCode, b: &str) -> bool {
    s == StatusCode::OK
        && serde_json::from_str::<Value>(b).is_ok_and(|v| {
            v["SecretID"]
                .as_str()
                .is_some_and(|x| uuid::Uuid::parse_str(x).is_ok())
        })
}

fn cases() -> Vec<Case> {
    let ixn_body = json!({"SourceName": "api", "DestinationName": "db", "Action": "deny"});
    vec![
        // CA.
        Case {
            method: "GET",
            path: "/v1/agent/connect/ca/roots",
            body: None,
            grant: "",
            lacking: "",
            kind: Kind::Open,
            ok: ok200,
        },
        Case {
            method: "GET",
            path: "/v1/connect/ca/roots",
            body: None,
            grant: "",
            lacking: "",
            kind: Kind::Open,
            ok: ok200,
        },
        Case {
            method: "GET",
            path: "/v1/agent/connect/ca/leaf/web",
            body: None,
            grant: r#"service "web" { policy = "write" }"#,
            // Read on the service is not enough to get its identity.
            lacking: r#"service_prefix "" { policy = "write" } service "web" { policy = "read" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("/svc/web\""),
        },
        Case {
            method: "GET",
            path: "/v1/connect/ca/configuration",
            body: None,
            grant: r#"operator = "read""#,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: |_, s, b| {
                s == StatusCode::OK && b.contains("LeafCertTTL") && !b.contains("PrivateKey\"")
            },
        },
        Case {
            method: "PUT",
            path: "/v1/connect/ca/configuration",
            body: Some(json!({"Provider": "consul", "Config": {"LeafCertTTL": "48h"}})),
            grant: r#"operator = "write""#,
            lacking: r#"operator = "read""#,
            kind: Kind::Guarded,
            ok: ok200,
        },
        // Intentions.
        Case {
            method: "GET",
            path: "/v1/connect/intentions",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "db" { policy = "deny" }"#,
            kind: Kind::Filtered,
            ok: has_ixn,
        },
        Case {
            method: "POST",
            path: "/v1/connect/intentions",
            body: Some(ixn_body.clone()),
            grant: r#"service "db" { policy = "read" intentions = "write" }"#,
            lacking: r#"service "db" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("\"ID\""),
        },
        Case {
            method: "GET",
            path: "/v1/connect/intentions/{ixn}",
            body: None,
            grant: r#"service_prefix "d" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: has_ixn,
        },
        Case {
            method: "PUT",
            path: "/v1/connect/intentions/{ixn}",
            body: Some(json!({"SourceName": "web", "DestinationName": "db", "Action": "deny"})),
            grant: r#"service "db" { policy = "read" intentions = "write" }"#,
            lacking: r#"service "db" { policy = "read" intentions = "read" }"#,
            kind: Kind::Guarded,
            ok: has_ixn,
        },
        Case {
            method: "DELETE",
            path: "/v1/connect/intentions/{ixn}",
            body: None,
            grant: r#"service "db" { policy = "deny" intentions = "write" }"#,
            lacking: r#"service "web" { policy = "read" intentions = "write" }"#,
            kind: Kind::Guarded,
            ok: is_true,
        },
        Case {
            method: "GET",
            path: "/v1/connect/intentions/exact?source=web&destination=db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_ixn,
        },
        Case {
            method: "PUT",
            path: "/v1/connect/intentions/exact?source=web&destination=db",
            body: Some(json!({"Action": "deny"})),
            grant: r#"service "db" { policy = "read" intentions = "write" }"#,
            lacking: r#"service "db" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: is_true,
        },
        Case {
            method: "DELETE",
            path: "/v1/connect/intentions/exact?source=web&destination=db",
            body: None,
            grant: r#"service "db" { policy = "read" intentions = "write" }"#,
            lacking: r#"service "db" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: is_true,
        },
        Case {
            method: "GET",
            path: "/v1/connect/intentions/match?by=destination&name=db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_ixn,
        },
        Case {
            method: "GET",
            path: "/v1/connect/intentions/check?source=web&destination=db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b == r#"{"Allowed":true}"#,
        },
        Case {
            method: "POST",
            path: "/v1/agent/connect/authorize",
            body: Some(
                json!({"Target": "db", "ClientCertURI": "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"}),
            ),
            grant: r#"service "db" { policy = "write" }"#,
            lacking: r#"service "db" { policy = "read" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("\"Authorized\""),
        },
        // ACL tokens.
        Case {
            method: "PUT",
            path: "/v1/acl/token",
            body: Some(json!({"Description": "new"})),
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: new_secret,
        },
        Case {
            method: "GET",
            path: "/v1/acl/tokens",
            body: None,
            grant: ACL_READ,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_token,
        },
        Case {
            method: "GET",
            path: "/v1/acl/token/{token}",
            body: None,
            grant: ACL_READ,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_token,
        },
        Case {
            method: "PUT",
            path: "/v1/acl/token/{token}",
            body: Some(json!({"Description": "changed"})),
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: |f, s, b| has_token(f, s, b) && b.contains("changed"),
        },
        Case {
            method: "DELETE",
            path: "/v1/acl/token/{token}",
            body: None,
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: is_true,
        },
        Case {
            method: "PUT",
            path: "/v1/acl/token/{token}/clone",
            body: Some(json!({})),
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: new_secret,
        },
        // ACL policies.
        Case {
            method: "PUT",
            path: "/v1/acl/policy",
            body: Some(json!({"Name": "made", "Rules": "operator = \"read\""})),
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("\"Name\":\"made\""),
        },
        Case {
            method: "GET",
            path: "/v1/acl/policies",
            body: None,
            grant: ACL_READ,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_policy,
        },
        Case {
            method: "GET",
            path: "/v1/acl/policy/{policy}",
            body: None,
            grant: ACL_READ,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_policy,
        },
        Case {
            method: "GET",
            path: "/v1/acl/policy/name/fixture",
            body: None,
            grant: ACL_READ,
            lacking: NOTHING,
            kind: Kind::Guarded,
            ok: has_policy,
        },
        Case {
            method: "PUT",
            path: "/v1/acl/policy/{policy}",
            body: Some(json!({"Name": "fixture", "Rules": "acl = \"read\""})),
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: has_policy,
        },
        Case {
            method: "DELETE",
            path: "/v1/acl/policy/{policy}",
            body: None,
            grant: ACL_WRITE,
            lacking: ACL_READ,
            kind: Kind::Guarded,
            ok: is_true,
        },
        // Services and the catalog.
        Case {
            method: "PUT",
            path: "/v1/agent/service/register",
            body: Some(json!({"ID": "web-1", "Name": "web", "Port": 8080})),
            grant: r#"service "web" { policy = "write" }"#,
            lacking: r#"service "web" { policy = "read" } service "db" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: ok200,
        },
        Case {
            method: "PUT",
            path: "/v1/agent/service/deregister/db-fixture-1",
            body: None,
            grant: r#"service "db" { policy = "write" }"#,
            lacking: r#"service "db" { policy = "read" } service "web" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: ok200,
        },
        Case {
            method: "GET",
            path: "/v1/agent/services",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: has_service,
        },
        Case {
            method: "GET",
            path: "/v1/agent/service/db-fixture-1",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: has_service,
        },
        Case {
            method: "GET",
            path: "/v1/catalog/services",
            body: None,
            grant: r#"service_prefix "d" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: |_, s, b| s == StatusCode::OK && b.contains("\"db\""),
        },
        Case {
            method: "GET",
            path: "/v1/catalog/nodes",
            body: None,
            grant: r#"node "test-node" { policy = "read" }"#,
            lacking: r#"node "other-node" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: |_, s, b| s == StatusCode::OK && b.contains("test-node"),
        },
        Case {
            method: "GET",
            path: "/v1/catalog/service/db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: has_service,
        },
        Case {
            method: "GET",
            path: "/v1/catalog/connect/db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: has_service,
        },
        Case {
            method: "GET",
            path: "/v1/health/service/db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: has_service,
        },
        Case {
            method: "GET",
            path: "/v1/health/connect/db",
            body: None,
            grant: r#"service "db" { policy = "read" }"#,
            lacking: r#"service "web" { policy = "write" }"#,
            kind: Kind::Filtered,
            ok: has_service,
        },
        // The agent itself.
        Case {
            method: "GET",
            path: "/v1/agent/self",
            body: None,
            grant: r#"agent "test-node" { policy = "read" }"#,
            lacking: r#"agent "other-node" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("test-node"),
        },
        Case {
            method: "PUT",
            path: "/v1/agent/reload",
            body: None,
            grant: r#"agent "test-node" { policy = "write" }"#,
            lacking: r#"agent "test-node" { policy = "read" }"#,
            kind: Kind::Guarded,
            ok: ok200,
        },
        Case {
            method: "GET",
            path: "/v1/agent/metrics?format=prometheus",
            body: None,
            grant: r#"agent "test-node" { policy = "read" }"#,
            lacking: r#"agent "other-node" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("connect_catalog_nodes"),
        },
        Case {
            method: "GET",
            path: "/v1/status/leader",
            body: None,
            grant: "",
            lacking: "",
            kind: Kind::Open,
            ok: ok200,
        },
        // The agent's security report.
        Case {
            method: "GET",
            path: "/v1/agent/security",
            body: None,
            grant: r#"agent "test-node" { policy = "read" }"#,
            lacking: r#"agent "other-node" { policy = "write" }"#,
            kind: Kind::Guarded,
            ok: |_, s, b| s == StatusCode::OK && b.contains("\"DefaultPolicy\":\"deny\""),
        },
    ]
}

/// How a cell presents its token; the granted cell rotates through Consul's three
/// ways so every one is exercised on real endpoints.
#[derive(Debug, Clone, Copy)]
enum Via {
    Header,
    Query,
    Bearer,
}

async fn call(
    agent: &Arc<Agent>,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<(&str, Via)>,
) -> (StatusCode, String) {
    let uri = match token {
        Some((t, Via::Query)) => {
            let sep = if path.contains('?') { '&' } else { '?' };
            format!("{path}{sep}token={t}")
        }
        _ => path.to_owned(),
    };
    let mut req = Request::builder().method(method).uri(uri);
    match token {
        Some((t, Via::Header)) => req = req.header("X-Consul-Token", t),
        Some((t, Via::Bearer)) => req = req.header("Authorization", format!("Bearer {t}")),
        _ => {}
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    let resp = crate::api::router(agent.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Everything that must not change when a request is refused.
fn state_of(agent: &Agent) -> (u64, usize, usize, std::time::Duration, Vec<String>) {
    let s = agent.acl.snapshot();
    let services = agent
        .catalog
        .snapshot()
        .local()
        .map(|i| i.service.id.clone())
        .collect();
    (
        agent.intentions.index(),
        s.tokens.len() + s.policies.len(),
        agent.intentions.list().0.len(),
        agent.ca.state().config.leaf_cert_ttl,
        services,
    )
}

#[tokio::test]
async fn every_endpoint_in_every_cell() {
    let mut failures = Vec::new();
    for (n, case) in cases().into_iter().enumerate() {
        let agent = agent_with_acls(DefaultPolicy::Deny).await;
        bootstrap(&agent).await;
        let f = fixture(&agent).await;
        let granted = token_with_rules(&agent, case.grant).await;
        let lacking = token_with_rules(&agent, case.lacking).await;
        let path = case
            .path
            .replace("{ixn}", &f.ixn)
            .replace("{token}", &f.token)
            .replace("{policy}", &f.policy);
        let wrong = uuid::Uuid::new_v4().to_string();
        let label = format!("{} {}", case.method, case.path);

        let before = state_of(&agent);
        let cells: [(&str, Option<(&str, Via)>); 3] = [
            ("no token", None),
            ("unknown token", Some((&wrong, Via::Header))),
            ("token without the right", Some((&lacking, Via::Header))),
        ];
        for (cell, token) in cells {
            let (status, body) = call(&agent, case.method, &path, case.body.as_ref(), token).await;
            let expected = match (case.kind, cell) {
                (Kind::Open, _) => status == StatusCode::OK,
                (_, "unknown token") => status == StatusCode::FORBIDDEN && body == "ACL not found",
                (Kind::Guarded, _) => {
                    status == StatusCode::FORBIDDEN && body == "Permission denied"
                }
                // Nothing of the fixtures shows: the intention, the `db` service,
                // this node.
                (Kind::Filtered, _) => {
                    status == StatusCode::OK
                        && !body.contains(&f.ixn)
                        && !body.contains("\"db")
                        && !body.contains("test-node")
                }
            };
            if !expected {
                failures.push(format!("{label} with {cell}: {status} {body:?}"));
            }
        }
        if case.kind != Kind::Open && state_of(&agent) != before {
            failures.push(format!("{label}: a refused request changed state"));
        }
        let via = [Via::Header, Via::Query, Via::Bearer][n % 3];
        let (status, body) = call(
            &agent,
            case.method,
            &path,
            case.body.as_ref(),
            Some((&granted, via)),
        )
        .await;
        if !(case.ok)(&f, status, &body) {
            failures.push(format!(
                "{label} with the right ({via:?}): {status} {body:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn bootstrap_and_token_self() {
    let agent = agent_with_acls(DefaultPolicy::Deny).await;
    let (status, body) = call(&agent, "PUT", "/v1/acl/bootstrap", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let boot: Value = serde_json::from_str(&body).expect("json");
    let secret = boot["SecretID"].as_str().expect("secret").to_owned();
    let (status, body) = call(
        &agent,
        "PUT",
        "/v1/acl/bootstrap",
        None,
        Some((&secret, Via::Header)),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.starts_with("Permission denied: ACL bootstrap no longer allowed"),
        "{body}"
    );

    // Self: any valid token reads itself (with its secret), anonymous gets the
    // anonymous token, an unknown secret nothing.
    let (status, body) = call(
        &agent,
        "GET",
        "/v1/acl/token/self",
        None,
        Some((&secret, Via::Bearer)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains(&secret) && body.contains("global-management"),
        "{body}"
    );
    let (status, body) = call(&agent, "GET", "/v1/acl/token/self", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("00000000-0000-0000-0000-000000000002"),
        "{body}"
    );
    let (status, body) = call(
        &agent,
        "GET",
        "/v1/acl/token/self",
        None,
        Some(("nope", Via::Query)),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "ACL not found")
    );
}

#[tokio::test]
async fn acls_disabled() {
    let agent = crate::app::build(
        crate::config::Config::for_tests(),
        Arc::new(crate::store::memory::MemStore::new()),
        None,
        crate::shutdown::Shutdown::new(),
    )
    .await
    .expect("agent");
    for (method, path) in [
        ("PUT", "/v1/acl/bootstrap"),
        ("GET", "/v1/acl/tokens"),
        ("GET", "/v1/acl/token/self"),
        ("GET", "/v1/acl/policies"),
    ] {
        let (status, body) = call(&agent, method, path, None, None).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::UNAUTHORIZED, "ACL support disabled"),
            "{method} {path}"
        );
    }
    // Everything else is open, with or without a token.
    let (status, _) = call(
        &agent,
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        None,
        Some(("x", Via::Header)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn intention_changes_need_intentions_write_and_take_effect() {
    let agent = agent_with_acls(DefaultPolicy::Deny).await;
    bootstrap(&agent).await;
    let web: crate::identity::ServiceName = "web".parse().expect("name");
    let db: crate::identity::ServiceName = "db".parse().expect("name");
    // Default deny: without an intention, authorize says no.
    assert!(!agent.intentions.authorize(&web, &db).is_allow());
    let reader = token_with_rules(&agent, r#"service "db" { policy = "write" }"#).await;
    let writer = token_with_rules(
        &agent,
        r#"service "db" { policy = "read" intentions = "write" }"#,
    )
    .await;
    let path = "/v1/connect/intentions/exact?source=web&destination=db";
    let allow = json!({"Action": "allow"});
    let (status, body) = call(
        &agent,
        "PUT",
        path,
        Some(&allow),
        Some((&reader, Via::Header)),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "Permission denied")
    );
    assert!(
        !agent.intentions.authorize(&web, &db).is_allow(),
        "refused change had effect"
    );
    let (status, _) = call(
        &agent,
        "PUT",
        path,
        Some(&allow),
        Some((&writer, Via::Header)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        agent.intentions.authorize(&web, &db).is_allow(),
        "allowed change had no effect"
    );
    // And through authorize, which needs service:write on the target.
    let td = agent.ca.state().trust_domain.clone();
    let req = json!({"Target": "db", "ClientCertURI": format!("spiffe://{td}/ns/default/dc/dc1/svc/web")});
    let (status, body) = call(
        &agent,
        "POST",
        "/v1/agent/connect/authorize",
        Some(&req),
        Some((&reader, Via::Header)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"Authorized\":true"), "{body}");
}

/// A token for one service cannot register as another: not by spelling `Name`
/// twice, not by naming another service's ID, not as a `connect-proxy` of a service
/// it may not write; each is refused and leaves the catalog as it was, beside the
/// same registration that the token's own service may make.
#[tokio::test]
async fn a_registration_is_judged_on_what_it_registers() {
    let agent = agent_with_acls(DefaultPolicy::Deny).await;
    bootstrap(&agent).await;
    agent
        .catalog
        .register(&json!({"ID": "db-1", "Name": "db", "Port": 5432}))
        .await
        .expect("db");
    let web = token_with_rules(&agent, r#"service "web" { policy = "write" }"#).await;
    let register = |body: Value| {
        let agent = agent.clone();
        let web = web.clone();
        async move {
            call(
                &agent,
                "PUT",
                "/v1/agent/service/register",
                Some(&body),
                Some((&web, Via::Header)),
            )
            .await
        }
    };
    let db_of = |agent: &Agent| {
        agent
            .catalog
            .snapshot()
            .local_service("db-1")
            .map(|i| (i.service.service.to_string(), i.service.port))
    };

    // Two spellings of one field: 400 naming it, whatever the token.
    let (status, body) = register(json!({"Name": "web", "NAME": "db", "Port": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("NAME") && body.contains("given twice"),
        "{body}"
    );
    let (status, body) = register(json!({"Name": "web", "cgroup": "web", "Cgroup": "db"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Another service's ID: refused, db's registration untouched.
    let (status, body) = register(json!({"ID": "db-1", "Name": "web", "Port": 8080})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(db_of(&agent), Some(("db".into(), 5432)));
    // A sidecar whose ID would replace db's sidecar: refused too.
    agent
        .catalog
        .register(
            &json!({"ID": "db-1", "Name": "db", "Port": 5432, "Connect": {"SidecarService": {}}}),
        )
        .await
        .expect("db with a sidecar");
    let (status, body) = register(
        json!({"ID": "db-1", "Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A connect-proxy for db, by a token that may write the proxy's own name: its
    // upstreams would dial as db.
    let proxy_token = token_with_rules(
        &agent,
        r#"service "web" { policy = "write" } service "web-proxy" { policy = "write" }"#,
    )
    .await;
    let proxy_of = |destination: &str| {
        json!({
            "Name": "web-proxy", "Kind": "connect-proxy", "Port": 21100,
            "Proxy": {"DestinationServiceName": destination}
        })
    };
    let (status, body) = call(
        &agent,
        "PUT",
        "/v1/agent/service/register",
        Some(&proxy_of("db")),
        Some((&proxy_token, Via::Header)),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // Positive controls: web's own registrations, plain and as a proxy of web.
    let (status, body) = register(json!({"ID": "web-1", "Name": "web", "Port": 8080})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = register(json!({"ID": "web-1", "Name": "web", "Port": 8081})).await;
    assert_eq!(status, StatusCode::OK, "re-registering its own ID: {body}");
    let (status, body) = call(
        &agent,
        "PUT",
        "/v1/agent/service/register",
        Some(&proxy_of("web")),
        Some((&proxy_token, Via::Header)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(db_of(&agent), Some(("db".into(), 5432)), "db never changed");
}
