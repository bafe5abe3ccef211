//! Tests of the explicit proxy: flag parsing and output, and the whole process
//! in-process against a real agent API (CA, intentions, authorize). The catalog is
//! not part of this crate's tests yet, so `/v1/health/connect/<name>` is served by a
//! small double that answers in Consul's shape.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{Instant, timeout, timeout_at},
};

use super::*;
use crate::test_support::eventually;
use crate::{
    agent::Agent,
    app,
    app::IntentionsAuthorizer,
    config::Config,
    intentions::Selector,
    proxy::{MemDirectory, Outcome, Side},
    store::memory::MemStore,
};

const DEADLINE: Duration = Duration::from_secs(10);

fn svc(s: &str) -> ServiceName {
    s.parse().expect("service name")
}

fn args(http: SocketAddr, service: &str, upstreams: &[String]) -> ProxyArgs {
    ProxyArgs {
        http: HttpArgs {
            http_addr: http.to_string(),
            token: None,
            token_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        },
        service: Some(service.to_owned()),
        upstream: upstreams.to_vec(),
        listen: None,
        service_addr: None,
        rest: Vec::new(),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("probe");
    l.local_addr().expect("addr").port()
}

#[test]
fn upstream_flags() {
    let ok = [
        ("socat:9191", "socat", "127.0.0.1:9191", ":9191"),
        (
            "db:198.18.0.1:5432",
            "db",
            "198.18.0.1:5432",
            "198.18.0.1:5432",
        ),
        ("db:[::1]:5432", "db", "[::1]:5432", "[::1]:5432"),
    ];
    for (flag, name, bind, shown) in ok {
        let u = parse_upstream(flag).expect(flag);
        assert_eq!(u.destination.as_str(), name, "{flag}");
        assert_eq!(u.bind.to_string(), bind, "{flag}");
        assert_eq!(u.shown, shown, "{flag}");
    }
    for bad in [
        "socat",
        "socat:",
        "socat:0",
        "socat:99999",
        ":9191",
        "so cat:9191",
        "socat:host:9191",
        "q.query:9191",
    ] {
        assert!(parse_upstream(bad).is_err(), "{bad:?} accepted");
    }
}

#[tokio::test]
async fn flag_combinations() {
    let http: SocketAddr = "127.0.0.1:8500".parse().expect("addr");
    let base = || args(http, "web", &["socat:9191".to_owned()]);
    assert!(plan(&base()).await.is_ok());
    let cases: Vec<(ProxyArgs, &str)> = vec![
        (
            ProxyArgs {
                service: None,
                ..base()
            },
            "-service must be specified",
        ),
        (
            ProxyArgs {
                rest: vec!["extra".into()],
                ..base()
            },
            "Should have no non-flag arguments.",
        ),
        (
            ProxyArgs {
                listen: Some("127.0.0.1:21000".into()),
                ..base()
            },
            "-listen needs -service-addr",
        ),
        (
            ProxyArgs {
                service_addr: Some("127.0.0.1:8080".into()),
                ..base()
            },
            "-service-addr is only used with -listen",
        ),
        (
            ProxyArgs {
                upstream: vec!["a:9191".into(), "b:9191".into()],
                ..base()
            },
            "two upstreams bind",
        ),
        (
            ProxyArgs {
                upstream: Vec::new(),
                ..base()
            },
            "nothing to do",
        ),
    ];
    for (a, want) in cases {
        let err = plan(&a).await.expect_err(want);
        assert!(format!("{err:#}").contains(want), "{err:#} lacks {want:?}");
    }
}

#[test]
fn startup_output_is_consuls() {
    let plan = Plan {
        service: svc("web"),
        upstreams: vec![parse_upstream("socat:9191").expect("upstream")],
        listen: None,
    };
    assert_eq!(
        banner(&plan),
        "==> Connect proxy starting...\n\
         \x20   Configuration mode: Flags\n\
         \x20              Service: web\n\
         \x20             Upstream: socat => :9191\n\
         \x20      Public listener: Disabled\n\
         \n\
         ==> Log data will now stream in as it occurs:\n\n"
    );
    let plan = Plan {
        listen: Some((
            "127.0.0.1:21000".parse().expect("addr"),
            "127.0.0.1:8181".parse().expect("addr"),
        )),
        upstreams: Vec::new(),
        ..plan
    };
    assert!(banner(&plan).contains("       Public listener: 127.0.0.1:21000 => 127.0.0.1:8181\n"));
}

#[test]
fn health_entries_become_endpoints() {
    let entries: Vec<ServiceEntry> = serde_json::from_value(serde_json::json!([
        {"Node": {"Address": "198.18.0.1", "Datacenter": "dc1"},
         "Service": {"Address": "", "Port": 20000}, "Checks": []},
        {"Node": {"Address": "198.18.0.2", "Datacenter": "dc2"},
         "Service": {"Address": "198.18.0.3", "Port": 21000}},
        {"Node": {"Address": "node-a"}, "Service": {"Port": 20000}},
        {"Node": {"Address": "198.18.0.4"}, "Service": {"Port": 0}},
    ]))
    .expect("entries");
    let got = endpoints_of(&entries);
    assert_eq!(
        got,
        vec![
            Endpoint {
                addr: "198.18.0.1:20000".parse().expect("addr"),
                datacenter: "dc1".parse().expect("dc"),
            },
            Endpoint {
                addr: "198.18.0.3:21000".parse().expect("addr"),
                datacenter: "dc2".parse().expect("dc"),
            },
        ]
    );
}

// ───────────────────────────── in-process end to end ─────────────────────────────

/// An agent with its real HTTP API and catalog, and an in-agent proxy (inbound
/// listener, the node's Connect endpoint) in front of local services.
struct World {
    agent: Arc<Agent>,
    api: SocketAddr,
    dir: Arc<MemDirectory>,
    node: Proxy,
}

async fn world() -> World {
    // The inbound listener first: the catalog names it as this node's endpoint.
    let inbound_listener = proxy::bind("inbound", (Ipv4Addr::LOCALHOST, 0).into())
        .await
        .expect("inbound");
    let inbound = inbound_listener.local_addr().expect("inbound addr");
    let mut config = Config::for_tests();
    config.inbound_addr = inbound;
    let agent = app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
        .await
        .expect("agent");
    let app = crate::api::router(agent.clone());
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind api");
    let api = l.local_addr().expect("api addr");
    tokio::spawn(async move { axum::serve(l, app).await });

    let dir = Arc::new(MemDirectory::new());
    let node = Proxy::start(Parts {
        directory: dir.clone(),
        authorizer: Arc::new(IntentionsAuthorizer::new(agent.intentions.clone())),
        leaves: agent.ca.clone(),
        bundle: agent.ca.bundle(),
        metrics: agent.proxy_metrics.clone(),
        limits: Limits::default(),
        shutdown: agent.shutdown.clone(),
    })
    .expect("node proxy");
    node.serve_inbound(inbound_listener);
    World {
        agent,
        api,
        dir,
        node,
    }
}

async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn expect_echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    timeout(DEADLINE, s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(got, msg);
}

async fn expect_closed_by(s: &mut TcpStream, deadline: Instant) {
    let mut buf = [0u8; 64];
    match timeout_at(deadline, s.read(&mut buf)).await {
        Err(_) => panic!("the connection stayed open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("received {:?} on a connection that must close", &buf[..n]),
    }
}

/// An mTLS client speaking as `web` straight to `addr` (SNI socat).
async fn direct_client(w: &World, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let leaf = w
        .agent
        .ca
        .leaf(&svc("web"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .dangerous()
    .with_custom_certificate_verifier(crate::ca::tls::SpiffeServerVerifier::new(
        w.agent.ca.bundle(),
    ))
    .with_client_auth_cert(leaf.cert.chain.clone(), leaf.private_key_der())
    .expect("client cert");
    let name =
        crate::ca::tls::server_name_for(&svc("socat"), &w.agent.ca.bundle().borrow()).expect("sni");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake")
}

async fn intention(agent: &Agent, src: &str, dst: &str, action: Option<Action>) {
    let (s, d) = (Selector::Service(svc(src)), Selector::Service(svc(dst)));
    match action {
        Some(a) => {
            agent
                .intentions
                .upsert(s, d, a, String::new(), BTreeMap::new())
                .await
                .expect("upsert");
        }
        None => agent.intentions.delete_exact(&s, &d).await.expect("delete"),
    }
}

#[tokio::test]
async fn upstreams_reach_the_destination_through_the_agent_api() {
    let w = world().await;
    let backend = echo_backend().await;
    w.dir.set_local(&svc("socat"), backend);
    w.agent
        .catalog
        .register(&serde_json::json!({"Name": "socat", "Port": backend.port()}))
        .await
        .expect("register socat");
    let port = free_port();
    let running = start(&args(w.api, "web", &[format!("socat:{port}")]))
        .await
        .expect("proxy starts");

    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("connect");
    expect_echo(&mut c, b"hello\n").await;

    intention(&w.agent, "web", "socat", Some(Action::Deny)).await;
    // The live connection is closed by the destination's re-check ...
    expect_closed_by(&mut c, Instant::now() + Duration::from_secs(1)).await;
    // ... and a new one gets nothing.
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("connect");
    let _ = c.write_all(b"hello\n").await;
    expect_closed_by(&mut c, Instant::now() + DEADLINE).await;
    intention(&w.agent, "web", "socat", None).await;
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("connect");
    expect_echo(&mut c, b"hello again\n").await;

    let m = running.proxy.metrics();
    assert_eq!(m.accepted(Side::Outbound), 3);
    running.shutdown.drain(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_public_listener_authorizes_through_the_agent_and_follows_intentions() {
    let w = world().await;
    let backend = echo_backend().await;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let mut a = args(w.api, "socat", &[]);
    a.listen = Some(listen.to_string());
    a.service_addr = Some(backend.to_string());
    let running = start(&a).await.expect("proxy starts");

    // The in-agent proxy dials the explicit proxy's public listener for socat.
    w.dir.set_endpoints(
        &svc("socat"),
        vec![Endpoint {
            addr: listen,
            datacenter: Datacenter::default(),
        }],
    );
    let up = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    w.dir.add_upstream(Upstream {
        source: svc("web"),
        destination: svc("socat"),
        bind: up,
    });
    assert!(w.node.sync_upstreams().await.is_empty());

    let mut live = TcpStream::connect(up).await.expect("connect");
    expect_echo(&mut live, b"through the public listener").await;
    let m = running.proxy.metrics();
    assert_eq!((m.allowed(), m.denied()), (1, 0));

    // A direct mTLS client, so that only the explicit proxy can close it (the
    // in-agent proxy re-checks its own outbound connections too).
    let mut direct = direct_client(&w, listen).await;
    direct.write_all(b"direct").await.expect("write");
    let mut got = [0u8; 6];
    timeout(DEADLINE, direct.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&got, b"direct");

    let t0 = Instant::now();
    intention(&w.agent, "web", "socat", Some(Action::Deny)).await;
    expect_closed_by(&mut live, t0 + Duration::from_secs(1)).await;
    let mut buf = [0u8; 8];
    match timeout_at(t0 + Duration::from_secs(1), direct.read(&mut buf)).await {
        Err(_) => panic!("the explicit proxy kept a denied connection open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {:?}", &buf[..n]),
    }
    eventually("the explicit proxy to revoke", || {
        m.closed(Side::Inbound, Outcome::Revoked) == 1
    })
    .await;
    let mut denied = TcpStream::connect(up).await.expect("connect");
    let _ = denied.write_all(b"x").await;
    expect_closed_by(&mut denied, Instant::now() + DEADLINE).await;
    eventually("the denial", || m.denied() == 1).await;
    running.shutdown.drain(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn startup_fails_loudly_without_an_agent() {
    let port = free_port();
    let err = start(&args(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        "web",
        &["socat:9191".to_owned()],
    ))
    .await
    .expect_err("no agent listens there");
    assert!(
        format!("{err:#}").contains("cannot fetch the CA roots from the agent"),
        "{err:#}"
    );
}
