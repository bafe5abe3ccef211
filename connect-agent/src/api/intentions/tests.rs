//! The intention endpoints through the real router, against an in-memory store.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode},
};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{api, app, config::Config, shutdown::Shutdown, store::memory::MemStore};

async fn router(default_allow: bool) -> Router {
    router_and_trust_domain(default_allow).await.0
}

/// The router and the trust domain its CA made at first start.
async fn router_and_trust_domain(default_allow: bool) -> (Router, String) {
    let mut config = Config::for_tests();
    config.default_allow = default_allow;
    let agent = app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
        .await
        .expect("agent");
    let td = agent.ca.state().trust_domain.to_string();
    (api::router(agent), td)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
    fn index(&self) -> u64 {
        self.headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("X-Consul-Index")
    }
}

async fn call(r: &Router, method: Method, uri: &str, body: Option<Value>) -> Answer {
    // No Content-Type on purpose: py-consul sends none and must be understood.
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    let resp = r.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).expect("utf-8"),
    }
}

fn authorize_body(td: &str, target: &str, source: &str) -> Value {
    json!({
        "Target": target,
        "ClientCertURI": format!("spiffe://{td}/ns/default/dc/dc1/svc/{source}"),
        "ClientCertSerial": "04:00:01",
    })
}

#[tokio::test]
async fn legacy_crud() {
    let r = router(false).await;
    let a = call(
        &r,
        Method::POST,
        "/v1/connect/intentions",
        Some(json!({"SourceName": "web", "DestinationName": "db", "Action": "deny", "Meta": {"k": "v"}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let id = a.json()["ID"].as_str().expect("ID").to_owned();

    let got = call(
        &r,
        Method::GET,
        &format!("/v1/connect/intentions/{id}"),
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let v = got.json();
    assert_eq!(v["SourceName"], "web");
    assert_eq!(v["Action"], "deny");
    assert_eq!(v["Precedence"], 9);
    assert_eq!(v["Meta"], json!({"k": "v"}));
    assert_eq!(got.index(), v["ModifyIndex"].as_u64().expect("index"));
    assert_eq!(
        got.headers.get("content-type").map(|h| h.as_bytes()),
        Some(&b"application/json"[..])
    );

    // Duplicate pair.
    let dup = call(
        &r,
        Method::POST,
        "/v1/connect/intentions",
        Some(json!({"SourceName": "web", "DestinationName": "db", "Action": "allow"})),
    )
    .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert!(
        dup.text
            .starts_with("duplicate intention found: DENY default/web => default/db"),
        "{}",
        dup.text
    );

    // Update what was read back (read-only fields are ignored).
    let mut body = v.clone();
    body["Action"] = json!("allow");
    let up = call(
        &r,
        Method::PUT,
        &format!("/v1/connect/intentions/{id}"),
        Some(body),
    )
    .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.text);
    let list = call(&r, Method::GET, "/v1/connect/intentions", None).await;
    assert_eq!(list.json()[0]["Action"], "allow");
    assert_eq!(list.json().as_array().map(Vec::len), Some(1));

    let del = call(
        &r,
        Method::DELETE,
        &format!("/v1/connect/intentions/{id}"),
        None,
    )
    .await;
    assert_eq!((del.status, del.text.as_str()), (StatusCode::OK, "true"));
    let gone = call(
        &r,
        Method::GET,
        &format!("/v1/connect/intentions/{id}"),
        None,
    )
    .await;
    assert_eq!(
        (gone.status, gone.text.as_str()),
        (StatusCode::NOT_FOUND, "Intention not found")
    );
    let list = call(&r, Method::GET, "/v1/connect/intentions", None).await;
    assert_eq!(list.text, "[]");
}

#[tokio::test]
async fn exact_api_like_py_consul() {
    let r = router(false).await;
    let uri = "/v1/connect/intentions/exact?source=web&destination=db";
    let up = call(
        &r,
        Method::PUT,
        uri,
        Some(json!({"SourceType": "consul", "Action": "allow"})),
    )
    .await;
    assert_eq!((up.status, up.text.as_str()), (StatusCode::OK, "true"));
    let got = call(&r, Method::GET, uri, None).await;
    assert_eq!(got.json()["Action"], "allow");
    let up = call(
        &r,
        Method::PUT,
        "/v1/connect/intentions/exact?source=default/web&destination=db",
        Some(json!({"action": "deny", "description": "no"})),
    )
    .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.text);
    let got = call(&r, Method::GET, uri, None).await.json();
    assert_eq!(
        (got["Action"].clone(), got["Description"].clone()),
        (json!("deny"), json!("no"))
    );

    let meta = call(
        &r,
        Method::PUT,
        "/v1/connect/intentions/exact?source=a&destination=b",
        Some(json!({"Action": "deny", "Meta": {"k": "v"}})),
    )
    .await;
    assert_eq!(
        (meta.status, meta.text.as_str()),
        (StatusCode::BAD_REQUEST, "Meta must not be specified")
    );

    let del = call(&r, Method::DELETE, uri, None).await;
    assert_eq!((del.status, del.text.as_str()), (StatusCode::OK, "true"));
    let gone = call(&r, Method::GET, uri, None).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // Deleting again is still fine.
    assert_eq!(
        call(&r, Method::DELETE, uri, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn match_and_check() {
    let r = router(false).await;
    for (s, d, a) in [
        ("web", "db", "allow"),
        ("*", "db", "deny"),
        ("web", "*", "deny"),
        ("api", "cache", "allow"),
    ] {
        let up = call(
            &r,
            Method::PUT,
            &format!(
                "/v1/connect/intentions/exact?source={}&destination={}",
                s.replace('*', "%2A"),
                d.replace('*', "%2A")
            ),
            Some(json!({"Action": a})),
        )
        .await;
        assert_eq!(up.status, StatusCode::OK, "{}", up.text);
    }
    let m = call(
        &r,
        Method::GET,
        "/v1/connect/intentions/match?by=destination&name=db&name=cache",
        None,
    )
    .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text);
    let v = m.json();
    let pairs = |name: &str| -> Vec<String> {
        v[name]
            .as_array()
            .expect("list")
            .iter()
            .map(|i| {
                format!(
                    "{}=>{}",
                    i["SourceName"].as_str().unwrap_or("?"),
                    i["DestinationName"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    assert_eq!(pairs("db"), ["web=>db", "*=>db", "web=>*"]);
    assert_eq!(pairs("cache"), ["api=>cache", "web=>*"]);
    let m = call(
        &r,
        Method::GET,
        "/v1/connect/intentions/match?by=source&name=api",
        None,
    )
    .await
    .json();
    assert_eq!(
        m["api"].as_array().map(Vec::len),
        Some(2),
        "api=>cache and *=>db"
    );
    // Wildcard sources apply to every source, even an unknown one.
    let other = call(
        &r,
        Method::GET,
        "/v1/connect/intentions/match?by=source&name=nobody",
        None,
    )
    .await
    .json();
    assert_eq!(other["nobody"].as_array().map(Vec::len), Some(1));
    assert_eq!(other["nobody"][0]["SourceName"], "*");

    let check = |s: &'static str, d: &'static str| {
        let r = r.clone();
        async move {
            call(
                &r,
                Method::GET,
                &format!("/v1/connect/intentions/check?source={s}&destination={d}"),
                None,
            )
            .await
            .json()["Allowed"]
                .clone()
        }
    };
    assert_eq!(check("web", "db").await, json!(true));
    assert_eq!(check("api", "db").await, json!(false));
    assert_eq!(check("web", "cache").await, json!(false));
    assert_eq!(check("api", "cache").await, json!(true));
    assert_eq!(check("x", "y").await, json!(false), "default deny");
}

#[tokio::test]
async fn default_allow_in_dev() {
    let (r, td) = router_and_trust_domain(true).await;
    let c = call(
        &r,
        Method::GET,
        "/v1/connect/intentions/check?source=x&destination=y",
        None,
    )
    .await;
    assert_eq!(c.json(), json!({"Allowed": true}));
    let a = call(
        &r,
        Method::POST,
        "/v1/agent/connect/authorize",
        Some(authorize_body(&td, "db", "web")),
    )
    .await;
    assert_eq!(
        a.json(),
        json!({"Authorized": true, "Reason": "ACLs disabled, access is allowed by default"})
    );
}

#[tokio::test]
async fn authorize() {
    let (r, td) = router_and_trust_domain(false).await;
    let a = call(
        &r,
        Method::POST,
        "/v1/agent/connect/authorize",
        Some(authorize_body(&td, "db", "web")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json(),
        json!({"Authorized": false, "Reason": "Default behavior configured by ACLs"})
    );
    assert_eq!(
        a.headers.get("x-cache").map(|h| h.as_bytes()),
        Some(&b"HIT"[..])
    );

    let c = call(
        &r,
        Method::POST,
        "/v1/connect/intentions",
        Some(json!({"SourceName": "web", "DestinationName": "db", "Action": "allow"})),
    )
    .await;
    let id = c.json()["ID"].as_str().expect("ID").to_owned();
    // PUT as py-consul sends it; lower-case keys as some clients send them.
    let body = authorize_body(&td, "db", "web");
    let lower = json!({"target": body["Target"], "clientcerturi": body["ClientCertURI"]});
    let a = call(&r, Method::PUT, "/v1/agent/connect/authorize", Some(lower)).await;
    assert_eq!(
        a.json(),
        json!({"Authorized": true, "Reason": format!("Matched intention: ALLOW default/web => default/db (ID: {id}, Precedence: 9)")})
    );
}

#[tokio::test]
async fn bad_input_is_4xx_never_5xx() {
    let r = router(false).await;
    let cases: Vec<(Method, &str, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "Target service must be specified",
        ),
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            Some(json!({"Target": "db"})),
            StatusCode::BAD_REQUEST,
            "ClientCertURI not a valid Connect identifier",
        ),
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            Some(json!({"Target": "db", "ClientCertURI": "spiffe://td.consul/agent/x"})),
            StatusCode::BAD_REQUEST,
            "ClientCertURI not a valid Service identifier",
        ),
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            Some(json!({"Target": "d b", "ClientCertURI": "x"})),
            StatusCode::BAD_REQUEST,
            "Target service is invalid",
        ),
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            Some(json!({"Target": 7})),
            StatusCode::BAD_REQUEST,
            "Request decode failed",
        ),
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            Some(json!("x")),
            StatusCode::BAD_REQUEST,
            "Request decode failed",
        ),
        (
            Method::POST,
            "/v1/agent/connect/authorize",
            None,
            StatusCode::BAD_REQUEST,
            "Request decode failed",
        ),
        (
            Method::POST,
            "/v1/connect/intentions",
            Some(json!({"SourceName": "web", "DestinationName": "db"})),
            StatusCode::BAD_REQUEST,
            "Action must be set to 'allow' or 'deny'",
        ),
        (
            Method::POST,
            "/v1/connect/intentions",
            Some(json!({"SourceName": "web*", "DestinationName": "db", "Action": "allow"})),
            StatusCode::BAD_REQUEST,
            "SourceName: wildcard character '*' cannot be used with partial values",
        ),
        (
            Method::POST,
            "/v1/connect/intentions",
            Some(
                json!({"ID": "x", "SourceName": "web", "DestinationName": "db", "Action": "allow"}),
            ),
            StatusCode::BAD_REQUEST,
            "ID must be empty",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/not-a-uuid",
            None,
            StatusCode::BAD_REQUEST,
            "invalid intention ID",
        ),
        (
            Method::PUT,
            "/v1/connect/intentions/00000000-0000-0000-0000-000000000001",
            Some(json!({"SourceName": "a", "DestinationName": "b", "Action": "allow"})),
            StatusCode::NOT_FOUND,
            "Cannot modify non-existent intention",
        ),
        (
            Method::DELETE,
            "/v1/connect/intentions/00000000-0000-0000-0000-000000000001",
            None,
            StatusCode::NOT_FOUND,
            "Cannot delete non-existent intention",
        ),
        (
            Method::GET,
            "/v1/connect/intentions?filter=Bogus%20%3D%3D%20x",
            None,
            StatusCode::BAD_REQUEST,
            "Failed to create boolean expression evaluator",
        ),
        (
            Method::GET,
            "/v1/connect/intentions?index=x",
            None,
            StatusCode::BAD_REQUEST,
            "Invalid index",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/match?by=sideways&name=x",
            None,
            StatusCode::BAD_REQUEST,
            "'by' parameter must be one of",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/match?by=source&name=a/b/c",
            None,
            StatusCode::BAD_REQUEST,
            "at most one '/'",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/check?source=web&destination=db&source-type=aws",
            None,
            StatusCode::BAD_REQUEST,
            "SourceType must be set to 'consul'",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/check?source=ns/web&destination=db",
            None,
            StatusCode::BAD_REQUEST,
            "namespace",
        ),
        (
            Method::PUT,
            "/v1/connect/intentions/exact?source=web&destination=db",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "Action must be set",
        ),
        (
            Method::PUT,
            "/v1/connect/intentions/exact?source=web&destination=db",
            Some(json!({"Action": "allow", "Permissions": [{}]})),
            StatusCode::BAD_REQUEST,
            "Permissions",
        ),
        // Consul's documented quirk: missing match/check/exact parameters are 500s.
        (
            Method::GET,
            "/v1/connect/intentions/match?name=x",
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            "required query parameter 'by' not set",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/match?by=source",
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            "required query parameter 'name' not set",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/check?destination=db",
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            "required query parameter 'source' not set",
        ),
        (
            Method::GET,
            "/v1/connect/intentions/exact?source=web",
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            "required query parameter 'destination' not set",
        ),
    ];
    for (method, uri, body, status, text) in cases {
        let a = call(&r, method.clone(), uri, body).await;
        assert_eq!(a.status, status, "{method} {uri}: {}", a.text);
        assert!(
            a.text.contains(text),
            "{method} {uri}: {:?} lacks {text:?}",
            a.text
        );
    }
    let a = call(&r, Method::GET, "/v1/agent/connect/authorize", None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn blocking_list_wakes_on_change() {
    let r = router(false).await;
    let first = call(&r, Method::GET, "/v1/connect/intentions", None).await;
    let index = first.index();
    let blocked = {
        let r = r.clone();
        tokio::spawn(async move {
            call(
                &r,
                Method::GET,
                &format!("/v1/connect/intentions?index={index}&wait=30s"),
                None,
            )
            .await
        })
    };
    // It must still be waiting: nothing changed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!blocked.is_finished(), "returned without a change");
    let c = call(
        &r,
        Method::POST,
        "/v1/connect/intentions",
        Some(json!({"SourceName": "web", "DestinationName": "db", "Action": "allow"})),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);
    let woke = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("woke within 5 s")
        .expect("join");
    assert!(woke.index() > index);
    assert_eq!(woke.json().as_array().map(Vec::len), Some(1));

    // A short wait with no change returns the same index.
    let idle = call(
        &r,
        Method::GET,
        &format!("/v1/connect/intentions?index={}&wait=50ms", woke.index()),
        None,
    )
    .await;
    assert_eq!(idle.index(), woke.index());
}

#[tokio::test]
async fn filter_and_pretty() {
    let r = router(false).await;
    for (s, a) in [("web", "allow"), ("api", "deny")] {
        call(
            &r,
            Method::PUT,
            &format!("/v1/connect/intentions/exact?source={s}&destination=db"),
            Some(json!({"Action": a})),
        )
        .await;
    }
    let f = call(
        &r,
        Method::GET,
        "/v1/connect/intentions?filter=Action%20%3D%3D%20%22deny%22",
        None,
    )
    .await;
    let v = f.json();
    assert_eq!(v.as_array().map(Vec::len), Some(1));
    assert_eq!(v[0]["SourceName"], "api");
    let p = call(
        &r,
        Method::GET,
        "/v1/connect/intentions/check?source=web&destination=db&pretty",
        None,
    )
    .await;
    assert_eq!(p.text, "{\n    \"Allowed\": true\n}");
}

#[tokio::test]
async fn authorize_denies_a_foreign_trust_domain() {
    let (r, td) = router_and_trust_domain(true).await;
    let ok = call(
        &r,
        Method::POST,
        "/v1/agent/connect/authorize",
        Some(authorize_body(&td, "db", "web")),
    )
    .await;
    assert_eq!(
        ok.json()["Authorized"],
        json!(true),
        "own trust domain, dev default allow"
    );
    let foreign = authorize_body("99999999-2222-3333-4444-555555555555.consul", "db", "web");
    let a = call(
        &r,
        Method::POST,
        "/v1/agent/connect/authorize",
        Some(foreign),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["Authorized"], json!(false), "{}", a.text);
}
