use std::{sync::Arc, time::Duration};

use serde_json::json;

use super::*;
use crate::{config::Config, store::memory::MemStore};

async fn catalog_with(dir: Option<PathBuf>) -> (Arc<Catalog>, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut config = Config::for_tests();
    config.config_dir = dir;
    let c = Catalog::start(&config.catalog(), &NodeId::for_tests(), store.clone())
        .await
        .expect("start");
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
    let e = Catalog::start(
        &config.catalog(),
        &NodeId::for_tests(),
        Arc::new(MemStore::new()),
    )
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
        id: "9b0c5a5e-4f43-4c5e-9d4f-2f6a8b1c3d7e".into(),
        node: "n2".into(),
        address: "198.18.0.2".parse().expect("ip"),
        datacenter: "dc1".into(),
        inbound_addr: "198.18.0.2:20000".parse().expect("addr"),
        server_api: None,
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

fn node_id(n: u128) -> NodeId {
    NodeId {
        id: uuid::Uuid::from_u128(n),
        file: PathBuf::from(format!("/data-{n}/node-id")),
    }
}

#[tokio::test]
async fn a_node_name_held_by_another_node_id_is_refused() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let config = Config::for_tests();
    let (a, b) = (node_id(0xa), node_id(0xb));
    let first = Catalog::start(&config.catalog(), &a, store.clone())
        .await
        .expect("first");
    first
        .register(&json!({"name": "web", "port": 8080}))
        .await
        .expect("register");

    let e = Catalog::start(&config.catalog(), &b, store.clone())
        .await
        .expect_err("a second agent of the same name started");
    let text = e.to_string();
    assert!(matches!(e, Error::NodeNameTaken { .. }), "{text}");
    for part in [
        &a.id.to_string(),
        &b.id.to_string(),
        "--node-name",
        "/data-11/node-id",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    assert!(!text.contains('\n'), "one line: {text}");
    // The first node's record and services are untouched.
    let kv = store
        .get(&format!("catalog/nodes/{}", config.node_name))
        .await
        .expect("get")
        .expect("record");
    let held: Node = serde_json::from_slice(&kv.value).expect("json");
    assert_eq!(held.id, a.id.to_string());
    assert_eq!(ids(&first), ["web"]);

    // The same ID again (a restart on its own data directory) is welcome, and the
    // record carries the ID for the API.
    drop(first);
    let again = Catalog::start(&config.catalog(), &a, store.clone())
        .await
        .expect("restart with the same ID");
    assert_eq!(ids(&again), ["web"]);
    let (node, ..) = again
        .snapshot()
        .nodes()
        .next()
        .map(|(n, c, m)| (n.clone(), *c, *m))
        .expect("node");
    assert_eq!(node.json(0, 0)["ID"], json!(a.id.to_string()));
}

#[tokio::test]
async fn a_record_without_an_id_is_taken_over() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let config = Config::for_tests();
    let legacy = json!({"Node": config.node_name, "Address": "127.0.0.1", "Datacenter": "dc1",
        "InboundAddr": "127.0.0.1:20000"});
    store
        .put(
            &format!("catalog/nodes/{}", config.node_name),
            serde_json::to_vec(&legacy).expect("json"),
        )
        .await
        .expect("put");
    let c = Catalog::start(&config.catalog(), &node_id(7), store.clone())
        .await
        .expect("legacy record");
    assert_eq!(c.node().id, node_id(7).id.to_string());
    Catalog::start(&config.catalog(), &node_id(8), store)
        .await
        .expect_err("now the name is held");
}

#[tokio::test]
async fn of_two_agents_claiming_one_name_at_once_exactly_one_wins() {
    for round in 0..20u128 {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let node = |n: u128| Node {
            id: uuid::Uuid::from_u128(n).to_string(),
            node: "n1".into(),
            address: "198.18.0.1".parse().expect("ip"),
            datacenter: "dc1".into(),
            inbound_addr: "198.18.0.1:20000".parse().expect("addr"),
            server_api: None,
        };
        let (a, b) = (node(2 * round + 1), node(2 * round + 2));
        let file = Path::new("/x/node-id");
        let (ra, rb) = tokio::join!(
            claim(store.as_ref(), &a, file),
            claim(store.as_ref(), &b, file)
        );
        assert!(
            ra.is_ok() != rb.is_ok(),
            "round {round}: exactly one claim wins: {ra:?} {rb:?}"
        );
        let winner = if ra.is_ok() { &a } else { &b };
        let kv = store
            .get("catalog/nodes/n1")
            .await
            .expect("get")
            .expect("kv");
        let held: Node = serde_json::from_slice(&kv.value).expect("json");
        assert_eq!(&held, winner);
    }
}

/// With eBPF every distinct plaintext port needs a map entry: a registration that
/// would pass the map's capacity is refused (409, naming the service and the port),
/// and nothing of it is written; ports already held, a re-registration and a sidecar
/// (not a plaintext port) still go through.
#[tokio::test]
async fn a_registration_beyond_the_protected_port_capacity_is_refused() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let mut cc = Config::for_tests().catalog();
    cc.protected_port_limit = Some(2);
    let c = Catalog::start(&cc, &NodeId::for_tests(), store)
        .await
        .expect("start");
    for (id, name, port) in [("a", "a", 7001), ("b", "b", 7002), ("b2", "b", 7002)] {
        c.register(&json!({"name": name, "id": id, "port": port}))
            .await
            .expect("within capacity");
    }
    c.register(&json!({"name": "a", "id": "a", "port": 7001, "tags": ["again"]}))
        .await
        .expect("a re-registration adds no port");
    let err = c
        .register(&json!({"name": "c", "id": "c", "port": 7003}))
        .await
        .expect_err("a third port is refused");
    assert!(
        matches!(err, Error::ProtectedPortsFull { ref id, port: 7003, limit: 2 } if id == "c"),
        "{err:?}"
    );
    assert_eq!(
        crate::fault::Blame::fault(&err),
        crate::fault::Fault::Conflict
    );
    assert!(
        err.to_string().contains("protects 2 plaintext ports"),
        "{err}"
    );
    assert!(
        !ids(&c).contains(&"c".to_owned()),
        "nothing of it is written"
    );
    // A deregistration frees its slot for another.
    c.deregister("a").await.expect("deregister");
    c.register(&json!({"name": "c", "id": "c", "port": 7003}))
        .await
        .expect("the freed slot is usable");
}

/// A port or a cgroup belongs to one service on a node: `evil` on `db`'s port or in
/// `web`'s cgroup is refused (409, naming the holder) and nothing is written, while
/// instances of one service may share both, and a freed port can be taken.
#[tokio::test]
async fn a_port_or_a_cgroup_belongs_to_one_service_per_node() {
    let (c, _) = catalog_with(None).await;
    c.register(&json!({"ID": "db-1", "Name": "db", "Port": 5432, "cgroup": "db"}))
        .await
        .expect("db");
    c.register(&json!({"ID": "web-1", "Name": "web", "Port": 8080, "cgroup": "web"}))
        .await
        .expect("web");
    for (body, what, holder) in [
        (
            json!({"ID": "evil", "Name": "evil", "Port": 5432}),
            "port 5432",
            "db-1",
        ),
        (
            json!({"ID": "evil", "Name": "evil", "Port": 9999, "cgroup": "web"}),
            "cgroup \"web\"",
            "web-1",
        ),
    ] {
        let err = c.register(&body).await.expect_err("claimed");
        assert!(
            matches!(&err, Error::Claimed { what: w, holder_id, .. } if w == what && holder_id == holder),
            "{err:?}"
        );
        assert_eq!(
            crate::fault::Blame::fault(&err),
            crate::fault::Fault::Conflict
        );
        assert!(!ids(&c).contains(&"evil".to_owned()), "nothing written");
    }
    c.register(&json!({"ID": "web-2", "Name": "web", "Port": 8080, "cgroup": "web"}))
        .await
        .expect("a second instance of web shares its port and cgroup");
    c.deregister("db-1").await.expect("deregister");
    c.register(&json!({"ID": "evil", "Name": "evil", "Port": 5432}))
        .await
        .expect("a freed port can be taken");
}

/// A service is registered at one of this node's addresses: the advertise
/// address (also by leaving it empty), or an interface address; never loopback,
/// unspecified or another host's, which would capture or relabel traffic that
/// every node's transparent path routes by address. Host names only ever reach
/// DNS and stay allowed.
#[tokio::test]
async fn a_service_address_must_be_this_nodes() {
    let (c, _) = catalog_with(None).await;
    // Config::for_tests: advertise 127.0.0.1, interface addresses 198.18.0.1-9.
    for ok in ["", "127.0.0.1", "198.18.0.3", "db.example", "db.example."] {
        c.register(&json!({"Name": "ok", "Port": 8000, "Address": ok}))
            .await
            .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    for (bad, says) in [
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("198.18.5.5", "not an address of this node"),
        ("2001:db8::5", "not an address of this node"),
        ("not a host!", "neither an IP address"),
        ("-bad.example", "neither an IP address"),
    ] {
        let e = c
            .register(&json!({"Name": "evil", "Port": 5432, "Address": bad}))
            .await
            .expect_err(bad);
        assert!(e.to_string().contains(says), "{bad}: {e}");
        assert_eq!(
            crate::fault::Blame::fault(&e),
            crate::fault::Fault::Caller,
            "{bad}"
        );
        let e = c
            .register(&json!({"Name": "evil", "Port": 5433,
                "Connect": {"SidecarService": {"Address": bad}}}))
            .await
            .expect_err(bad);
        assert!(e.to_string().contains(says), "sidecar {bad}: {e}");
    }
    assert!(!ids(&c).iter().any(|id| id.starts_with("evil")));
}
