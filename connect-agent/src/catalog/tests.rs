use std::{sync::Arc, time::Duration};

use serde_json::json;

use super::*;
use crate::store::memory::MemStore;

async fn catalog_with(dir: Option<PathBuf>) -> (Arc<Catalog>, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut config = Config::for_tests();
    config.config_dir = dir;
    let c = Catalog::start(&config, store.clone()).await.expect("start");
    (c, store)
}

fn ids(c: &Catalog) -> Vec<String> {
    c.snapshot().local().map(|i| i.service.id.clone()).collect()
}

#[tokio::test]
async fn register_with_sidecar_and_deregister_both() {
    let (c, _) = catalog_with(None).await;
    c.register(
        &json!({"name": "socat", "id": "socat", "port": 8181, "connect": {"sidecar_service": {}}}),
    )
    .await
    .expect("register");
    assert_eq!(ids(&c), ["socat", "socat-sidecar-proxy"]);
    let snap = c.snapshot();
    let side = snap.local_service("socat-sidecar-proxy").expect("sidecar");
    assert_eq!(side.service.port, 21000);
    assert_eq!(side.service.kind, ServiceKind::ConnectProxy);
    let name: ServiceName = "socat".parse().expect("name");
    let eps = snap.connect_endpoints(&name);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].service.id, "socat-sidecar-proxy");
    let addr: SocketAddr = "127.0.0.1:8181".parse().expect("addr");
    assert_eq!(
        snap.by_addr(&addr).map(|i| i.service.id.as_str()),
        Some("socat")
    );
    // Re-registering keeps the sidecar's port; another service takes the next one.
    c.register(&json!({"name": "web", "connect": {"sidecar_service": {}}}))
        .await
        .expect("register");
    assert_eq!(
        c.snapshot()
            .local_service("web-sidecar-proxy")
            .map(|i| i.service.port),
        Some(21001)
    );
    c.deregister("socat").await.expect("deregister");
    assert_eq!(ids(&c), ["web", "web-sidecar-proxy"]);
    assert!(matches!(
        c.deregister("socat").await,
        Err(Error::UnknownService { .. })
    ));
}

#[tokio::test]
async fn reload_is_all_or_nothing_and_leaves_api_services_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, body: &str| std::fs::write(dir.path().join(name), body).expect("write");
    write(
        "web.json",
        r#"{"service": {"name": "web", "port": 8080, "cgroup": "web"}}"#,
    );
    write("notes.txt", "not a definition");
    let (c, _) = catalog_with(Some(dir.path().to_owned())).await;
    assert_eq!(ids(&c), ["web"]);
    c.register(&json!({"Name": "api-svc", "Port": 1}))
        .await
        .expect("register");

    // A bad file: the error names it and the field; nothing changes.
    write("db.json", r#"{"service": {"name": "db", "port": "5432"}}"#);
    write("web.json", r#"{"service": {"name": "web2", "port": 8080}}"#);
    let e = c.reload().await.expect_err("bad file accepted");
    let msg = e.to_string();
    assert!(
        msg.contains("db.json") && msg.contains("service.port"),
        "{msg}"
    );
    assert_eq!(ids(&c), ["api-svc", "web"]);

    write("db.json", r#"{"service": {"name": "db", "port": 5432}}"#);
    let s = c.reload().await.expect("reload");
    assert_eq!(
        s,
        ReloadSummary {
            files: 2,
            services: 2
        }
    );
    assert_eq!(ids(&c), ["api-svc", "db", "web2"]);

    // Duplicate IDs across files are refused.
    write("dup.json", r#"{"service": {"name": "db"}}"#);
    assert!(matches!(c.reload().await, Err(Error::DuplicateId { .. })));
    assert_eq!(ids(&c), ["api-svc", "db", "web2"]);
}

#[tokio::test]
async fn a_bad_file_at_startup_fails_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("x.json"), "{").expect("write");
    let mut config = Config::for_tests();
    config.config_dir = Some(dir.path().to_owned());
    let e = Catalog::start(&config, Arc::new(MemStore::new()))
        .await
        .expect_err("accepted");
    assert!(e.to_string().contains("x.json"), "{e}");
}

#[tokio::test]
async fn changes_move_only_on_catalog_writes() {
    let (c, store) = catalog_with(None).await;
    let mut rx = c.changes();
    rx.borrow_and_update();
    store.put("intentions/x", vec![]).await.expect("put");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), rx.changed())
            .await
            .is_err(),
        "unrelated write woke catalog readers"
    );
    c.register(&json!({"name": "web"})).await.expect("register");
    assert!(rx.has_changed().expect("open"));
}

#[tokio::test]
async fn follows_writes_made_by_another_node() {
    let (c, store) = catalog_with(None).await;
    let other = Node {
        node: "n2".into(),
        address: "198.18.0.2".parse().expect("ip"),
        datacenter: "dc1".into(),
        inbound_addr: "198.18.0.2:20000".parse().expect("addr"),
    };
    store
        .put(
            "catalog/nodes/n2",
            serde_json::to_vec(&other).expect("json"),
        )
        .await
        .expect("put");
    let svc = json!({"ID": "db", "Service": "db", "Address": "198.18.0.2", "Port": 5432,
        "Source": {"Type": "Api"}});
    let idx = store
        .put(
            "catalog/services/n2/db",
            serde_json::to_vec(&svc).expect("json"),
        )
        .await
        .expect("put");
    let mut rx = c.changes();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|i| *i >= idx))
        .await
        .expect("in time")
        .expect("open");
    let snap = c.snapshot();
    let db: ServiceName = "db".parse().expect("name");
    let inst = snap.instances(&db);
    assert_eq!(inst.len(), 1);
    assert_eq!(connect_endpoint(&inst[0]), other.inbound_addr);
    assert_eq!(snap.local().count(), 0);
}
