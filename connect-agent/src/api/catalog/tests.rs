//! The catalog and agent endpoints through the real router, on an in-memory store.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode},
};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{api, app, config::Config, shutdown::Shutdown, store::memory::MemStore};

async fn router() -> Router {
    let agent = app::build(
        Config::for_tests(),
        Arc::new(MemStore::new()),
        None,
        Shutdown::new(),
    )
    .await
    .expect("agent");
    api::router(agent)
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

async fn call_raw(r: &Router, method: Method, uri: &str, body: Body) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(body)
        .expect("request");
    let resp = r.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn call(r: &Router, method: Method, uri: &str, body: Option<Value>) -> Answer {
    call_raw(
        r,
        method,
        uri,
        body.map_or_else(Body::empty, |b| Body::from(b.to_string())),
    )
    .await
}

#[tokio::test]
async fn register_list_connect_deregister() {
    let r = router().await;
    let a = call(
        &r,
        Method::PUT,
        "/v1/agent/service/register",
        Some(json!({"name": "socat", "id": "socat", "port": 8181, "connect": {"sidecar_service": {}}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.text, "");

    let a = call(&r, Method::GET, "/v1/agent/services", None).await;
    let v = a.json();
    assert_eq!(v["socat"]["Port"], 8181);
    assert_eq!(v["socat"]["Tags"], json!([]));
    assert_eq!(v["socat-sidecar-proxy"]["Kind"], "connect-proxy");
    assert_eq!(
        v["socat-sidecar-proxy"]["Proxy"]["DestinationServiceName"],
        "socat"
    );

    for path in ["/v1/health/connect/socat", "/v1/catalog/connect/socat"] {
        let a = call(&r, Method::GET, path, None).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(a.index() >= 1);
        let v = a.json();
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{path}: {v}");
    }
    let v = call(&r, Method::GET, "/v1/health/connect/socat", None)
        .await
        .json();
    assert_eq!(v[0]["Node"]["Node"], "test-node");
    assert_eq!(v[0]["Service"]["ID"], "socat-sidecar-proxy");
    let a = call(&r, Method::GET, "/v1/health/connect/nothing", None).await;
    assert_eq!((a.status, a.json()), (StatusCode::OK, json!([])));

    let a = call(&r, Method::GET, "/v1/agent/service/socat", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.headers.contains_key("x-consul-contenthash"));

    let a = call(&r, Method::PUT, "/v1/agent/service/deregister/socat", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let v = call(&r, Method::GET, "/v1/agent/services", None)
        .await
        .json();
    assert_eq!(v, json!({}));
    let a = call(&r, Method::GET, "/v1/agent/service/socat", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_is_a_4xx_with_a_message() {
    let r = router().await;
    let cases: Vec<(Method, &str, Body, StatusCode)> = vec![
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from("{"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from("[]"),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from(r#"{"port": 1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from(r#"{"name": "we b"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from(r#"{"name": "web", "port": "x"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from(r#"{"name": "web", "connect": 3}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v1/agent/service/register",
            Body::from(format!(
                r#"{{"name": "web", "meta": {{"a": "{}"}}}}"#,
                "x".repeat(api::MAX_BODY_BYTES)
            )),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::PUT,
            "/v1/agent/service/deregister/nope",
            Body::empty(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/v1/health/connect/b%20ad",
            Body::empty(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/catalog/connect/b.ad",
            Body::empty(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/health/connect/web?index=x",
            Body::empty(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/agent/metrics?format=xml",
            Body::empty(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, uri, body, want) in cases {
        let a = call_raw(&r, method, uri, body).await;
        assert_eq!(a.status, want, "{uri}: {}", a.text);
        assert!(
            !a.text.is_empty() || want == StatusCode::PAYLOAD_TOO_LARGE,
            "{uri}: no message"
        );
    }
}

#[tokio::test]
async fn a_blocking_query_returns_on_a_matching_change_and_not_before() {
    let r = router().await;
    let a = call(&r, Method::GET, "/v1/health/connect/web", None).await;
    let index = a.index();
    let r2 = r.clone();
    let blocked = tokio::spawn(async move {
        call(
            &r2,
            Method::GET,
            &format!("/v1/health/connect/web?index={index}&wait=30s"),
            None,
        )
        .await
    });
    // An unrelated write (an intention) must not release it.
    let a = call(
        &r,
        Method::PUT,
        "/v1/connect/intentions/exact?source=a&destination=b",
        Some(json!({"Action": "allow"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "returned before any catalog change");

    let a = call(
        &r,
        Method::PUT,
        "/v1/agent/service/register",
        Some(json!({"Name": "web", "Port": 80})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("returned promptly")
        .expect("join");
    assert!(got.index() > index);
    assert_eq!(got.json()[0]["Service"]["Service"], "web");
}

#[tokio::test]
async fn a_blocking_query_times_out_with_the_same_index() {
    let r = router().await;
    let index = call(&r, Method::GET, "/v1/catalog/services", None)
        .await
        .index();
    let start = std::time::Instant::now();
    let a = call(
        &r,
        Method::GET,
        &format!("/v1/catalog/services?index={index}&wait=300ms"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.index(), index);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn agent_self_metrics_leader_reload() {
    let r = router().await;
    let v = call(&r, Method::GET, "/v1/agent/self", None).await.json();
    assert_eq!(v["Config"]["Datacenter"], "dc1");
    assert_eq!(v["Config"]["NodeName"], "test-node");
    let id = crate::catalog::NodeId::for_tests().id.to_string();
    assert_eq!(v["Config"]["NodeID"], json!(id));
    let nodes = call(&r, Method::GET, "/v1/catalog/nodes", None)
        .await
        .json();
    assert_eq!(nodes[0]["ID"], json!(id), "{nodes}");
    assert_eq!(nodes[0]["Node"], "test-node");
    call(
        &r,
        Method::PUT,
        "/v1/agent/service/register",
        Some(json!({"Name": "web"})),
    )
    .await;
    let a = call(&r, Method::GET, "/v1/agent/metrics?format=prometheus", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.text.contains("\nconnect_catalog_local_services 1\n"),
        "{}",
        a.text
    );
    let a = call(&r, Method::GET, "/v1/status/leader", None).await;
    assert!(a.json().is_string());
    let a = call(&r, Method::PUT, "/v1/agent/reload", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}
