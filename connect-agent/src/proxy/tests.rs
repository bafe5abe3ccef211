//! In-process tests of the proxy: a real agent core (CA and intentions on a memory
//! store), a [`MemDirectory`], real sockets on 127.0.0.1, and rustls clients and
//! servers standing in for peers.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rustls::{
    ClientConfig, ServerConfig,
    client::ResolvesClientCert,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    time::{Instant, timeout, timeout_at},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use super::*;
use crate::app::IntentionsAuthorizer;
use crate::test_support::eventually;
use crate::{
    agent::Agent,
    app,
    ca::{
        CaManager,
        tls::{SpiffeServerVerifier, server_name_for},
    },
    config::Config,
    identity::SpiffeId,
    intentions::Selector,
    store::memory::MemStore,
};

/// Upper bound of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

fn svc(s: &str) -> ServiceName {
    s.parse().expect("valid service name")
}

fn any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

// ───────────────────────────── backends ─────────────────────────────

/// A plaintext service on 127.0.0.1 that counts the connections it accepted.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener (the service went away): connecting is refused.
    async fn stop(self) -> usize {
        self.task.abort();
        let _ = self.task.await;
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Echoes until EOF, then closes (like `socat ... exec:/bin/cat`).
async fn echo_backend() -> Backend {
    backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Reads to EOF, then answers `<n> bytes` and closes: only a forwarded half-close
/// gets an answer.
async fn count_backend() -> Backend {
    backend(|mut s| async move {
        let mut buf = Vec::new();
        if s.read_to_end(&mut buf).await.is_ok() {
            let _ = s.write_all(format!("{} bytes", buf.len()).as_bytes()).await;
        }
        let _ = s.shutdown().await;
    })
    .await
}

async fn backend<F, Fut>(serve: F) -> Backend
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(any_port()).await.expect("bind backend");
    let addr = l.local_addr().expect("backend addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    Backend {
        addr,
        accepted,
        task,
    }
}

// ───────────────────────────── nodes ─────────────────────────────

struct Node {
    agent: Arc<Agent>,
    dir: Arc<MemDirectory>,
    proxy: Proxy,
    inbound: SocketAddr,
}

async fn agent() -> Arc<Agent> {
    app::build(
        Config::for_tests(),
        Arc::new(MemStore::new()),
        None,
        Shutdown::new(),
    )
    .await
    .expect("agent builds")
}

async fn node() -> Node {
    node_with(agent().await, Limits::default(), None).await
}

/// A proxy on `agent` with a fresh directory and an inbound listener; `leaves`
/// replaces the CA as leaf source.
async fn node_with(agent: Arc<Agent>, limits: Limits, leaves: Option<Arc<dyn LeafSource>>) -> Node {
    let dir = Arc::new(MemDirectory::new());
    let proxy = Proxy::start(Parts {
        directory: dir.clone(),
        authorizer: Arc::new(IntentionsAuthorizer::new(agent.intentions.clone())),
        leaves: leaves.unwrap_or_else(|| agent.ca.clone()),
        bundle: agent.ca.bundle(),
        metrics: agent.proxy_metrics.clone(),
        limits,
        shutdown: agent.shutdown.clone(),
    })
    .expect("proxy starts");
    let l = bind("inbound", any_port()).await.expect("bind inbound");
    let inbound = l.local_addr().expect("inbound addr");
    proxy.serve_inbound(l);
    Node {
        agent,
        dir,
        proxy,
        inbound,
    }
}

impl Node {
    /// Makes `name` a local service on `backend`, reached through this node.
    fn serve(&self, name: &str, backend: &Backend) {
        self.dir.set_local(&svc(name), backend.addr);
        self.dir.set_endpoints(
            &svc(name),
            vec![Endpoint {
                addr: self.inbound,
                datacenter: Datacenter::default(),
            }],
        );
    }

    /// Opens an upstream listener `src` → `dst` on a free port; returns its address.
    async fn upstream(&self, src: &str, dst: &str) -> SocketAddr {
        let probe = std::net::TcpListener::bind(any_port()).expect("probe port");
        let bind = probe.local_addr().expect("probe addr");
        drop(probe);
        self.dir.add_upstream(Upstream {
            source: svc(src),
            destination: svc(dst),
            bind,
        });
        let errors = self.proxy.sync_upstreams().await;
        assert!(errors.is_empty(), "{errors:?}");
        bind
    }

    async fn intention(&self, src: &str, dst: &str, action: Action) {
        self.agent
            .intentions
            .upsert(
                Selector::Service(svc(src)),
                Selector::Service(svc(dst)),
                action,
                String::new(),
                BTreeMap::new(),
            )
            .await
            .expect("intention written");
    }

    async fn delete_intention(&self, src: &str, dst: &str) {
        self.agent
            .intentions
            .delete_exact(&Selector::Service(svc(src)), &Selector::Service(svc(dst)))
            .await
            .expect("intention deleted");
    }

    async fn leaf(&self, service: &str) -> Arc<CertifiedKey> {
        self.agent
            .ca
            .leaf(&svc(service))
            .await
            .expect("leaf")
            .rx
            .borrow()
            .certified_key
            .clone()
    }

    fn metrics(&self) -> &Metrics {
        self.proxy.metrics()
    }

    async fn settle(&self) {
        let proxy = self.proxy.clone();
        eventually("connections to close", move || {
            proxy.live_connections() == 0
        })
        .await;
    }
}

// ───────────────────────────── clients ─────────────────────────────

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS 1.3 client that verifies the server like the proxy does and presents
/// `cert` (or nothing).
fn client_config(
    bundle: watch::Receiver<Arc<TrustBundle>>,
    cert: Option<Arc<CertifiedKey>>,
) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle));
    Arc::new(match cert {
        Some(c) => b.with_client_cert_resolver(Arc::new(FixedClientCert(c))),
        None => b.with_no_client_auth(),
    })
}

async fn tls_connect(
    node: &Node,
    dst: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(node.inbound).await?;
    let name = server_name_for(&svc(dst), &node.agent.ca.bundle().borrow()).expect("sni");
    timeout(DEADLINE, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake finishes or fails in time")
}

async fn expect_echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    s.flush().await.expect("flush");
    let mut got = vec![0u8; msg.len()];
    timeout(DEADLINE, s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(got, msg);
}

/// The stream ends (EOF or error) without yielding a byte.
async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S, within: Duration) {
    let mut buf = [0u8; 64];
    match timeout(within, s.read(&mut buf)).await {
        Err(_) => panic!("the connection stayed open for {within:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("received {:?} on a connection that must close", &buf[..n]),
    }
}

/// A node serving socat on an echo backend, with an upstream listener web →
/// socat: the node, the backend and the listener's address.
async fn socat_behind_upstream() -> (Node, Backend, SocketAddr) {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let up = n.upstream("web", "socat").await;
    (n, backend, up)
}

// ───────────────────────────── tests ─────────────────────────────

#[tokio::test]
async fn echo_through_an_upstream_listener_and_the_inbound_side() {
    let (n, _backend, up) = socat_behind_upstream().await;

    let mut c = TcpStream::connect(up).await.expect("connect upstream");
    expect_echo(&mut c, b"hello mesh\n").await;
    expect_echo(&mut c, &vec![7u8; 300_000]).await;
    drop(c);
    n.settle().await;

    let m = n.metrics();
    assert_eq!(m.accepted(Side::Outbound), 1);
    assert_eq!(m.accepted(Side::Inbound), 1);
    assert_eq!(m.allowed(), 1);
    assert_eq!(m.denied(), 0);
    eventually("both sides to record", || {
        m.active(Side::Inbound) == 0 && m.active(Side::Outbound) == 0
    })
    .await;
    let total = 11 + 300_000;
    assert_eq!(
        m.bytes_in(),
        2 * total,
        "both sides count bytes toward apps"
    );
    assert_eq!(m.bytes_out(), 2 * total);
    let mut text = String::new();
    m.render_prometheus(&mut text);
    assert!(text.contains("connect_proxy_authorizations_total{decision=\"allow\"} 1"));
}

#[tokio::test]
async fn half_close_travels_through_both_proxies() {
    let n = node().await;
    let backend = count_backend().await;
    n.serve("socat", &backend);
    let up = n.upstream("web", "socat").await;

    let mut c = TcpStream::connect(up).await.expect("connect");
    c.write_all(b"ping").await.expect("write");
    // The backend answers only once it sees EOF, so the answer proves the FIN
    // crossed both proxies (as close_notify in between) while the way back stayed
    // open.
    c.shutdown().await.expect("half-close");
    let mut answer = String::new();
    timeout(DEADLINE, c.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(answer, "4 bytes");
    n.settle().await;
    let m = n.metrics();
    eventually("clean closes", || {
        m.closed(Side::Inbound, Outcome::Closed) == 1
            && m.closed(Side::Outbound, Outcome::Closed) == 1
    })
    .await;
}

#[tokio::test]
async fn a_denied_connection_closes_before_any_byte_passes() {
    let (n, backend, up) = socat_behind_upstream().await;
    n.intention("web", "socat", Action::Deny).await;

    expect_reset(up, true, "denied").await;
    assert_eq!(
        backend.accepted(),
        0,
        "the service saw the denied connection"
    );
    let m = n.metrics();
    eventually("the denial to be recorded", || {
        m.closed(Side::Inbound, Outcome::Denied) == 1
    })
    .await;
    assert_eq!((m.allowed(), m.denied()), (0, 1));

    // Deleting the intention restores the default (allow in dev mode).
    n.delete_intention("web", "socat").await;
    let mut c = TcpStream::connect(up).await.expect("connect");
    expect_echo(&mut c, b"again").await;
}

#[tokio::test]
async fn a_live_connection_closes_within_a_second_of_a_deny() {
    let (n, backend, up) = socat_behind_upstream().await;
    let mut live = TcpStream::connect(up).await.expect("connect");
    expect_echo(&mut live, b"before").await;
    // Another pair's connection must survive the re-check.
    n.serve("other", &backend);
    let up_other = n.upstream("web", "other").await;
    let mut unrelated = TcpStream::connect(up_other).await.expect("connect");
    expect_echo(&mut unrelated, b"other").await;

    let t0 = Instant::now();
    n.intention("web", "socat", Action::Deny).await;
    let mut buf = [0u8; 16];
    match timeout_at(t0 + Duration::from_secs(1), live.read(&mut buf)).await {
        Err(_) => panic!("the denied connection was still open a second later"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(k)) => panic!("unexpected bytes {:?}", &buf[..k]),
    }
    expect_echo(&mut unrelated, b"still here").await;
    let m = n.metrics();
    eventually("the revocation to be recorded", || {
        m.closed(Side::Inbound, Outcome::Revoked) == 1
    })
    .await;
}

#[tokio::test]
async fn another_service_with_its_own_leaf_is_allowed_or_denied_per_intentions() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("api").await));

    let mut tls = tls_connect(&n, "socat", config.clone())
        .await
        .expect("handshake");
    expect_echo(&mut tls, b"from api").await;

    n.intention("api", "socat", Action::Deny).await;
    // The live one is revoked; a new one is refused.
    expect_closed(&mut tls, DEADLINE).await;
    let mut tls = tls_connect(&n, "socat", config).await.expect("handshake");
    let _ = tls.write_all(b"let me in").await;
    expect_closed(&mut tls, DEADLINE).await;
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn no_client_certificate_or_a_foreign_ca_fails_the_handshake() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let foreign = CaManager::start(
        Default::default(),
        crate::ca::CaRole::Server,
        Arc::new(MemStore::new()),
    )
    .await
    .expect("foreign CA");
    let foreign_leaf = foreign
        .leaf(&svc("web"))
        .await
        .expect("foreign leaf")
        .rx
        .borrow()
        .certified_key
        .clone();
    let cases = [
        ("no certificate", None),
        ("a foreign CA", Some(foreign_leaf)),
    ];
    for (i, (what, cert)) in cases.into_iter().enumerate() {
        let config = client_config(n.agent.ca.bundle(), cert);
        // TLS 1.3 clients finish before the server judges their certificate:
        // the refusal shows as an alert or a close on the first read.
        match tls_connect(&n, "socat", config).await {
            Err(_) => {}
            Ok(mut tls) => {
                let _ = tls.write_all(b"hello").await;
                expect_closed(&mut tls, DEADLINE).await;
            }
        }
        let m = n.metrics();
        eventually(what, || {
            m.handshake_failures(Side::Inbound) == i as u64 + 1
                && m.closed(Side::Inbound, Outcome::HandshakeFailed) == i as u64 + 1
        })
        .await;
    }
    let m = n.metrics();
    assert_eq!(backend.accepted(), 0);
    assert_eq!(
        m.allowed() + m.denied(),
        0,
        "no identity reached authorization"
    );
}

#[tokio::test]
async fn sni_must_name_a_local_service() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));
    // `db` is a valid service of our trust domain but not on this node.
    assert!(
        tls_connect(&n, "db", config).await.is_err(),
        "a handshake for a service this node does not run succeeded"
    );
    let m = n.metrics();
    eventually("the refusal", || {
        m.closed(Side::Inbound, Outcome::Unroutable) == 1
    })
    .await;
}

#[tokio::test]
async fn garbage_stalls_and_resets_are_survived() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let n = node_with(agent().await, limits, None).await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);

    // Garbage instead of a ClientHello.
    let mut raw = TcpStream::connect(n.inbound).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01\xff\xff")
        .await
        .expect("write");
    let mut sink = Vec::new();
    timeout(DEADLINE, raw.read_to_end(&mut sink))
        .await
        .expect("closed in time")
        .ok();
    // Silence after connecting, and half a record header.
    let mut silent = TcpStream::connect(n.inbound).await.expect("connect");
    let mut partial = TcpStream::connect(n.inbound).await.expect("connect");
    partial.write_all(b"\x16\x03").await.expect("write");
    expect_closed(&mut silent, DEADLINE).await;
    expect_closed(&mut partial, DEADLINE).await;
    // A reset in the middle of a handshake.
    let reset = TcpStream::connect(n.inbound).await.expect("connect");
    // SO_LINGER 0 makes the close a reset; blocking on drop is harmless here.
    #[allow(deprecated)]
    reset.set_linger(Some(Duration::ZERO)).expect("linger");
    drop(reset);

    let m = n.metrics();
    eventually("four failed handshakes", || {
        m.closed(Side::Inbound, Outcome::HandshakeFailed) == 4
    })
    .await;
    // The listener still serves.
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));
    let mut tls = tls_connect(&n, "socat", config).await.expect("handshake");
    expect_echo(&mut tls, b"still serving").await;
}

#[tokio::test]
async fn the_connection_limit_refuses_and_recovers() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let n = node_with(agent().await, limits, None).await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));

    let mut first = tls_connect(&n, "socat", config.clone())
        .await
        .expect("first handshake");
    expect_echo(&mut first, b"one").await;
    match tls_connect(&n, "socat", config.clone()).await {
        Err(_) => {}
        Ok(mut second) => expect_closed(&mut second, DEADLINE).await,
    }
    let m = n.metrics();
    eventually("the refusal", || {
        m.closed(Side::Inbound, Outcome::LimitReached) == 1
    })
    .await;
    expect_echo(&mut first, b"unaffected").await;
    drop(first);
    n.settle().await;
    let mut third = tls_connect(&n, "socat", config).await.expect("third");
    expect_echo(&mut third, b"slot came back").await;
}

/// Silent peers (connected, no ClientHello) hold a permit of the handshake
/// budget, not a slot of the connection limit, and one peer IP gets only its
/// share of the budget: a flood of silent sockets from one host leaves room for
/// real connections from another. Before, every accepted socket took a slot.
#[tokio::test]
async fn silent_peers_hold_no_connection_slot_and_one_peer_only_its_share() {
    let limits = Limits {
        max_connections: 8,
        ..Limits::default()
    };
    let per_peer = limits.max_handshakes_per_peer;
    let n = node_with(agent().await, limits, None).await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));

    // From 127.0.0.1: more silent sockets than the connection limit, and more
    // than one peer's share of the handshake budget.
    let mut silent = Vec::new();
    for i in 0..per_peer + 20 {
        match TcpStream::connect(n.inbound).await {
            Ok(tcp) => silent.push(tcp),
            // Refused sockets are reset; the kernel may report that to a later
            // connect on the same port pair.
            Err(e) => assert!(i >= per_peer, "silent socket {i} refused: {e}"),
        }
    }
    let m = n.metrics();
    eventually("the sockets over the peer's share are refused", || {
        m.closed(Side::Inbound, Outcome::LimitReached) >= 1
    })
    .await;
    assert_eq!(n.proxy.shared.handshakes.in_use(), per_peer);
    // From 127.0.0.2, another host as far as the budget knows: served at once.
    let started = std::time::Instant::now();
    for i in 0..4u8 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        let tcp = sock.connect(n.inbound).await.expect("connect");
        let name = server_name_for(&svc("socat"), &n.agent.ca.bundle().borrow()).expect("sni");
        let mut tls = timeout(
            DEADLINE,
            TlsConnector::from(config.clone()).connect(name, tcp),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        expect_echo(&mut tls, &[b'a' + i]).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "real connections took {:?} beside {} silent ones",
        started.elapsed(),
        silent.len()
    );
    drop(silent);
}

#[tokio::test]
async fn the_outbound_side_accepts_only_the_destinations_identity() {
    let n = node().await;
    // A server that presents api's (valid) leaf where socat was expected.
    let impostor = n.leaf("api").await;
    let server =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedServerCert(impostor)));
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind(any_port()).await.expect("bind");
    let impostor_addr = l.local_addr().expect("addr");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            if let Ok(mut tls) = acceptor.accept(s).await {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = tls.write_all(b"impostor").await;
            }
        }
    });
    n.dir.set_endpoints(
        &svc("socat"),
        vec![Endpoint {
            addr: impostor_addr,
            datacenter: Datacenter::default(),
        }],
    );
    let up = n.upstream("web", "socat").await;
    let mut c = TcpStream::connect(up).await.expect("connect");
    c.write_all(b"hi").await.expect("write");
    expect_closed(&mut c, DEADLINE).await;
    let m = n.metrics();
    eventually("the dial failure", || {
        m.closed(Side::Outbound, Outcome::DialFailed) == 1
    })
    .await;
    assert!(m.handshake_failures(Side::Outbound) >= 1);
    assert_eq!(
        served.load(Ordering::SeqCst),
        0,
        "a byte reached the impostor"
    );
}

#[tokio::test]
async fn a_renewed_leaf_serves_new_handshakes_and_old_connections_stay() {
    let agent = agent().await;
    let first = mint(&agent.ca, "socat");
    let (tx, rx) = watch::channel(first.clone());
    let leaves: Arc<dyn LeafSource> = Arc::new(StaticLeaf::new(svc("socat"), rx));
    let n = node_with(agent, Limits::default(), Some(leaves)).await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));

    let mut old = tls_connect(&n, "socat", config.clone()).await.expect("old");
    expect_echo(&mut old, b"old").await;
    assert_eq!(served_cert(&old), first.cert[0].as_ref());

    let second = mint(&n.agent.ca, "socat");
    tx.send_replace(second.clone());
    // A fresh client config: a resumed session would skip the certificate.
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));
    let mut new = tls_connect(&n, "socat", config).await.expect("new");
    expect_echo(&mut new, b"new").await;
    assert_eq!(served_cert(&new), second.cert[0].as_ref());
    expect_echo(&mut old, b"old still works").await;
}

#[tokio::test]
async fn a_root_rotation_reaches_new_handshakes_and_old_connections_stay() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let old_root = n.agent.ca.state().active_root().id().to_owned();
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));
    let mut old = tls_connect(&n, "socat", config).await.expect("old");
    expect_echo(&mut old, b"old root").await;

    let rotate = crate::ca::CaConfig::from_request(&serde_json::json!({
        "Provider": "consul",
        "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384},
    }))
    .expect("config");
    n.agent.ca.set_config(rotate).await.expect("rotation");
    assert_ne!(n.agent.ca.state().active_root().id(), old_root);
    // A client whose leaf comes from the new root reaches a server whose leaf
    // still comes from the old one: both roots are in the live bundle.
    let api = n
        .agent
        .ca
        .leaf(&svc("api"))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    assert_ne!(
        api.cert.root_id, old_root,
        "the new leaf is from the new root"
    );
    let config = client_config(n.agent.ca.bundle(), Some(api.certified_key.clone()));
    let mut new = tls_connect(&n, "socat", config).await.expect("new");
    expect_echo(&mut new, b"new root").await;
    expect_echo(&mut old, b"old connection kept").await;
}

#[tokio::test]
async fn resumed_sessions_are_verified_again_and_authorized() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));

    let mut full = tls_connect(&n, "socat", config.clone())
        .await
        .expect("full");
    // The round trip makes the client read the server's tickets.
    expect_echo(&mut full, b"full").await;
    assert_eq!(
        full.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    let mut resumed = tls_connect(&n, "socat", config.clone())
        .await
        .expect("resumed");
    expect_echo(&mut resumed, b"resumed").await;
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    n.intention("web", "socat", Action::Deny).await;
    let mut denied = tls_connect(&n, "socat", config).await.expect("handshake");
    let _ = denied.write_all(b"x").await;
    expect_closed(&mut denied, DEADLINE).await;
    assert_eq!(n.metrics().denied(), 1);
}

/// Limits with reuse of node-to-node connections off: one TLS connection per
/// application connection.
fn no_reuse() -> Limits {
    Limits {
        pool: PoolLimits {
            max_idle_per_endpoint: 0,
            ..PoolLimits::default()
        },
        ..Limits::default()
    }
}

/// With reuse off, sequential connections through an upstream resume after the
/// first, and the proxy counts each kind.
#[tokio::test]
async fn connections_after_the_first_resume_and_are_counted() {
    let n = node_with(agent().await, no_reuse(), None).await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let up = n.upstream("web", "socat").await;
    for i in 0..10 {
        echo_once(up, format!("hello {i}").as_bytes()).await;
    }
    let m = n.metrics();
    let count = |side| (m.handshakes(side, false), m.handshakes(side, true));
    assert_eq!(count(metrics::Side::Outbound), (1, 9));
    assert_eq!(count(metrics::Side::Inbound), (1, 9));
}

/// The ticket store keeps more tickets per destination than rustls' own cache (8),
/// so that a burst of concurrent connections finds one each, and no more than its
/// bound.
#[tokio::test]
async fn the_ticket_store_fills_up_to_its_bound() {
    use rustls::client::Resumption;
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let store = Arc::new(tickets::TicketStore::new());
    let mut config = (*client_config(n.agent.ca.bundle(), Some(n.leaf("web").await))).clone();
    config.resumption = Resumption::store(store.clone());
    let config = Arc::new(config);
    let name = server_name_for(&svc("socat"), &n.agent.ca.bundle().borrow()).expect("sni");
    // The first connection is full and brings two tickets; each later one spends
    // one and brings two.
    for i in 0..30 {
        let mut c = tls_connect(&n, "socat", config.clone())
            .await
            .expect("connect");
        expect_echo(&mut c, b"x").await;
        let kind = c.get_ref().1.handshake_kind();
        let want = if i == 0 {
            rustls::HandshakeKind::Full
        } else {
            rustls::HandshakeKind::Resumed
        };
        assert_eq!(kind, Some(want), "connection {i}");
        assert_eq!(store.tickets(&name), i + 2, "after connection {i}");
    }
    for _ in 0..tickets::TICKETS_PER_SERVER {
        let mut c = tls_connect(&n, "socat", config.clone())
            .await
            .expect("connect");
        expect_echo(&mut c, b"x").await;
    }
    assert_eq!(store.tickets(&name), tickets::TICKETS_PER_SERVER);
    // A burst of 20 at once all resume.
    let mut burst = Vec::new();
    for _ in 0..20 {
        burst.push(tls_connect(&n, "socat", config.clone()));
    }
    for c in futures::future::join_all(burst).await {
        let c = c.expect("connect");
        assert_eq!(
            c.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
    }
}

#[tokio::test]
async fn the_transparent_listener_routes_by_cgroup_and_original_destination() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let (origin, transparent, orig) = transparent_listener(&n).await;

    // What eBPF records at connect(): known before the proxy accepts.
    let socket = recorded_socket(&origin, orig, 42);
    let mut c = socket.connect(transparent).await.expect("connect");
    expect_echo(&mut c, b"transparent").await;

    // A connection eBPF did not record goes nowhere.
    let mut stray = TcpStream::connect(transparent).await.expect("connect");
    expect_closed(&mut stray, DEADLINE).await;
    // Nor does one from a cgroup no service owns.
    let socket = recorded_socket(&origin, orig, 7);
    let mut unknown = socket.connect(transparent).await.expect("connect");
    expect_closed(&mut unknown, DEADLINE).await;
    let m = n.metrics();
    eventually("two unroutable connections", || {
        m.closed(Side::Outbound, Outcome::Unroutable) == 2
    })
    .await;
}

/// A transparent connection the limit refuses still has its origin claimed: left
/// behind, the record would be handed to a later socket that reuses the client port.
#[tokio::test]
async fn a_refused_transparent_connection_leaves_no_record_behind() {
    // Two slots: the first connection's outbound side and, on this same node, its
    // inbound side.
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let n = node_with(agent().await, limits, None).await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let (origin, transparent, orig) = transparent_listener(&n).await;
    let mut first = recorded_socket(&origin, orig, 42)
        .connect(transparent)
        .await
        .expect("connect");
    expect_echo(&mut first, b"holds the one slot").await;

    let mut refused = recorded_socket(&origin, orig, 42)
        .connect(transparent)
        .await
        .expect("connect");
    expect_closed(&mut refused, DEADLINE).await;
    let m = n.metrics();
    eventually("the refusal", || {
        m.closed(Side::Outbound, Outcome::LimitReached) == 1
    })
    .await;
    assert!(
        origin.0.lock().expect("lock").is_empty(),
        "the refused connection's record is gone"
    );
    expect_echo(&mut first, b"unaffected").await;
}

#[tokio::test]
async fn upstream_listeners_follow_the_directory() {
    let (n, _backend, up) = socat_behind_upstream().await;
    let mut live = TcpStream::connect(up).await.expect("connect");
    expect_echo(&mut live, b"up").await;
    assert_eq!(n.proxy.upstream_addrs().len(), 1);

    n.dir.remove_upstream(up);
    let proxy = n.proxy.clone();
    eventually("the listener to close", move || {
        proxy.upstream_addrs().is_empty()
    })
    .await;
    let until = Instant::now() + DEADLINE;
    while TcpStream::connect(up).await.is_ok() {
        assert!(Instant::now() < until, "the removed listener still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Connections it accepted carry on.
    expect_echo(&mut live, b"still up").await;
}

#[tokio::test]
async fn shutdown_stops_listening_and_forces_connections_after_the_deadline() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let config = client_config(n.agent.ca.bundle(), Some(n.leaf("web").await));
    let mut live = tls_connect(&n, "socat", config).await.expect("handshake");
    expect_echo(&mut live, b"working").await;

    n.agent.shutdown.drain(Duration::from_millis(200)).await;
    expect_closed(&mut live, DEADLINE).await;
    assert!(
        TcpStream::connect(n.inbound).await.is_err(),
        "the inbound listener still accepts after shutdown"
    );
    let m = n.metrics();
    eventually("the forced close", || {
        m.closed(Side::Inbound, Outcome::Shutdown) == 1
    })
    .await;
}

// ───────────────────────────── helpers ─────────────────────────────

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug, Default)]
struct MemOrigin(Mutex<HashMap<SocketAddrV4, Redirect>>);

impl MemOrigin {
    fn insert(&self, peer: SocketAddrV4, r: Redirect) {
        self.0.lock().expect("lock").insert(peer, r);
    }
}

impl OriginLookup for MemOrigin {
    fn take_redirect(&self, peer: SocketAddrV4) -> Result<Option<Redirect>, redirect::Error> {
        Ok(self.0.lock().expect("lock").remove(&peer))
    }
}

/// A new leaf for `service` from `ca`, with a key of its own (what a renewal
/// produces).
fn mint(ca: &CaManager, service: &str) -> Arc<CertifiedKey> {
    let key = rcgen::KeyPair::generate().expect("key");
    let id = SpiffeId::service(
        ca.state().trust_domain.clone(),
        Datacenter::default(),
        svc(service),
    );
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().expect("URI"))];
    let csr = params.serialize_request(&key).expect("CSR");
    let issued = ca.sign_csr(csr.der().as_ref()).expect("signed");
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der).expect("signing key");
    Arc::new(CertifiedKey::new(issued.chain.clone(), signing))
}

fn served_cert(tls: &TlsStream<TcpStream>) -> &[u8] {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .as_ref()
}

mod openssl;

// ───────────────────────────── balancing ─────────────────────────────

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        datacenter: Datacenter::default(),
    }
}

/// One echo through `up`, on a new connection.
async fn echo_once(up: SocketAddr, msg: &[u8]) {
    let mut c = TcpStream::connect(up).await.expect("connect upstream");
    expect_echo(&mut c, msg).await;
}

/// socat on two nodes of one cluster, each with its own echo backend, and an
/// upstream web → socat on the first node whose endpoints are both nodes.
async fn socat_on_two_nodes() -> (Node, Node, Backend, Backend, SocketAddr) {
    socat_on_two_nodes_with(Limits::default()).await
}

async fn socat_on_two_nodes_with(limits: Limits) -> (Node, Node, Backend, Backend, SocketAddr) {
    let agent = agent().await;
    let n1 = node_with(agent.clone(), limits, None).await;
    let n2 = node_with(agent, limits, None).await;
    let (b1, b2) = (echo_backend().await, echo_backend().await);
    n1.dir.set_local(&svc("socat"), b1.addr);
    n2.dir.set_local(&svc("socat"), b2.addr);
    n1.dir.set_endpoints(
        &svc("socat"),
        vec![endpoint(n1.inbound), endpoint(n2.inbound)],
    );
    let up = n1.upstream("web", "socat").await;
    (n1, n2, b1, b2, up)
}

#[tokio::test]
async fn new_connections_go_round_robin_over_the_endpoints() {
    let (_n1, _n2, b1, b2, up) = socat_on_two_nodes().await;
    for i in 0..6 {
        echo_once(up, format!("hello {i}").as_bytes()).await;
    }
    assert_eq!(
        (b1.accepted(), b2.accepted()),
        (3, 3),
        "strict alternation over two endpoints"
    );
}

/// Tickets are kept per endpoint: each node's proxy encrypts its tickets with its
/// own key, so a ticket from one instance is useless at another, and round robin
/// over two nodes would otherwise offer the wrong one every time (reuse off: with
/// it, there is one handshake per node to begin with).
#[tokio::test]
async fn round_robin_over_two_nodes_still_resumes() {
    let (n1, _n2, b1, b2, up) = socat_on_two_nodes_with(no_reuse()).await;
    for i in 0..10 {
        echo_once(up, format!("hello {i}").as_bytes()).await;
    }
    assert_eq!((b1.accepted(), b2.accepted()), (5, 5));
    let m = n1.metrics();
    assert_eq!(
        (
            m.handshakes(metrics::Side::Outbound, false),
            m.handshakes(metrics::Side::Outbound, true)
        ),
        (2, 8),
        "one full handshake per node, then resumed"
    );
}

#[tokio::test]
async fn a_failed_dial_is_retried_on_the_next_endpoint_and_then_skipped() {
    let n = node().await;
    let backend = echo_backend().await;
    n.dir.set_local(&svc("socat"), backend.addr);
    // Refuses: a port nothing listens on any more.
    let closed = {
        let l = std::net::TcpListener::bind(any_port()).expect("bind");
        l.local_addr().expect("addr")
    };
    // Accepts TCP, then hangs up before the TLS handshake completes.
    let dropper = backend_with_drop().await;
    n.dir.set_endpoints(
        &svc("socat"),
        vec![
            endpoint(closed),
            endpoint(dropper.addr),
            endpoint(n.inbound),
        ],
    );
    let up = n.upstream("web", "socat").await;
    for i in 0..6 {
        echo_once(up, format!("try {i}").as_bytes()).await;
    }
    assert_eq!(backend.accepted(), 6, "every connection got through");
    assert_eq!(
        dropper.accepted(),
        1,
        "after failing once, the broken endpoint is held back"
    );
    let m = n.metrics();
    assert_eq!(m.closed(Side::Outbound, Outcome::DialFailed), 0);
    assert!(m.handshake_failures(Side::Outbound) >= 1);

    // Every endpoint dead: the connection fails after the bounded attempts.
    n.dir.set_endpoints(&svc("socat"), vec![endpoint(closed)]);
    let mut c = TcpStream::connect(up).await.expect("connect upstream");
    c.write_all(b"x").await.expect("write");
    expect_closed(&mut c, DEADLINE).await;
    eventually("the dial failure", || {
        m.closed(Side::Outbound, Outcome::DialFailed) == 1
    })
    .await;
}

/// A listener that accepts and closes at once, counting connections.
async fn backend_with_drop() -> Backend {
    backend(|s| async move { drop(s) }).await
}

#[tokio::test]
async fn inbound_spreads_over_local_instances_and_steps_over_a_dead_one() {
    let n = node().await;
    let (b1, b2) = (echo_backend().await, echo_backend().await);
    n.dir
        .set_local_instances(&svc("socat"), vec![b1.addr, b2.addr]);
    n.dir
        .set_endpoints(&svc("socat"), vec![endpoint(n.inbound)]);
    let up = n.upstream("web", "socat").await;
    for i in 0..4 {
        echo_once(up, format!("spread {i}").as_bytes()).await;
    }
    assert_eq!((b1.accepted(), b2.accepted()), (2, 2));

    let gone = b2.stop().await;
    assert_eq!(gone, 2);
    for i in 0..5 {
        echo_once(up, format!("survive {i}").as_bytes()).await;
    }
    assert_eq!(
        b1.accepted(),
        7,
        "every new connection reached the live one"
    );
    let m = n.metrics();
    assert_eq!(m.closed(Side::Inbound, Outcome::LocalUnreachable), 0);
}

// ───────────────────────────── streams ─────────────────────────────

/// Waits until `n` holds `count` idle pooled connections.
async fn pooled(n: &Node, count: usize) {
    let proxy = n.proxy.clone();
    eventually(&format!("{count} pooled connection(s)"), move || {
        proxy.pooled_connections() == count
    })
    .await;
}

/// Sequential application connections ride one node-to-node connection: one
/// handshake, then one stream each, every one authorized and counted.
#[tokio::test]
async fn sequential_connections_reuse_one_node_to_node_connection() {
    let (n, backend, up) = socat_behind_upstream().await;
    for i in 0..10 {
        echo_once(up, format!("hello {i}").as_bytes()).await;
        pooled(&n, 1).await;
    }
    let m = n.metrics();
    use metrics::Side::{Inbound, Outbound};
    assert_eq!(
        (m.handshakes(Outbound, false), m.handshakes(Outbound, true)),
        (1, 0)
    );
    assert_eq!(
        (m.streams(Outbound, false), m.streams(Outbound, true)),
        (1, 9)
    );
    assert_eq!(
        (m.streams(Inbound, false), m.streams(Inbound, true)),
        (1, 9)
    );
    assert_eq!(backend.accepted(), 10);
    assert_eq!(m.allowed(), 10, "every stream was authorized");
    eventually("ten clean closes each side", || {
        m.closed(Inbound, Outcome::Closed) == 10 && m.closed(Outbound, Outcome::Closed) == 10
    })
    .await;
    // The inbound side keeps the idle connection, but no stream is live.
    n.settle().await;
}

/// A stream on a pooled connection is authorized when it opens: after a deny, it
/// is refused before a byte reaches the service, the connection is dropped, and
/// once allowed again a new one is made.
#[tokio::test]
async fn each_stream_is_authorized_when_it_opens() {
    let (n, backend, up) = socat_behind_upstream().await;
    echo_once(up, b"allowed").await;
    pooled(&n, 1).await;

    n.intention("web", "socat", Action::Deny).await;
    expect_reset(up, true, "denied on the pooled connection").await;
    let m = n.metrics();
    eventually("the denial", || m.denied() == 1).await;
    assert_eq!(
        m.streams(metrics::Side::Outbound, true),
        1,
        "the denied stream rode the pooled connection"
    );
    assert_eq!(backend.accepted(), 1, "nothing reached the service");
    pooled(&n, 0).await;

    n.delete_intention("web", "socat").await;
    echo_once(up, b"allowed again").await;
    assert_eq!(
        m.handshakes(metrics::Side::Outbound, false) + m.handshakes(metrics::Side::Outbound, true),
        2
    );
    assert_eq!(backend.accepted(), 2);
}

/// The server's side speaks first: the stream opens without the client's first
/// byte, on a new connection and on a reused one.
#[tokio::test]
async fn server_first_protocols_work_on_new_and_reused_connections() {
    let banner = backend(|mut s| async move {
        let _ = s.write_all(b"220 ready\r\n").await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let _ = s.shutdown().await;
    })
    .await;
    let n = node().await;
    n.serve("smtp", &banner);
    let up = n.upstream("web", "smtp").await;
    for _ in 0..3 {
        let mut c = TcpStream::connect(up).await.expect("connect");
        let mut got = [0u8; 11];
        timeout(DEADLINE, c.read_exact(&mut got))
            .await
            .expect("banner in time")
            .expect("banner");
        assert_eq!(&got, b"220 ready\r\n");
        drop(c);
        pooled(&n, 1).await;
    }
    assert_eq!(n.metrics().streams(metrics::Side::Outbound, true), 2);
}

/// Round robin still holds with reuse: one connection per node, used in turn.
#[tokio::test]
async fn round_robin_over_two_nodes_reuses_one_connection_per_node() {
    let (n1, _n2, b1, b2, up) = socat_on_two_nodes().await;
    for i in 0..10 {
        echo_once(up, format!("hello {i}").as_bytes()).await;
        pooled(&n1, (i + 1).min(2)).await;
    }
    assert_eq!((b1.accepted(), b2.accepted()), (5, 5));
    let m = n1.metrics();
    use metrics::Side::Outbound;
    assert_eq!(
        (m.handshakes(Outbound, false), m.handshakes(Outbound, true)),
        (2, 0)
    );
    assert_eq!(m.streams(Outbound, true), 8);
}

/// A root rotation retires pooled connections: the next stream goes on a new
/// connection made under the new bundle.
#[tokio::test]
async fn a_root_rotation_retires_pooled_connections() {
    let (n, _backend, up) = socat_behind_upstream().await;
    echo_once(up, b"before").await;
    pooled(&n, 1).await;
    let bundle = n.agent.ca.bundle();
    let before = bundle.borrow().clone();
    let rotate = crate::ca::CaConfig::from_request(&serde_json::json!({
        "Provider": "consul",
        "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384},
    }))
    .expect("config");
    n.agent.ca.set_config(rotate).await.expect("rotation");
    eventually("the new bundle", || !Arc::ptr_eq(&bundle.borrow(), &before)).await;
    echo_once(up, b"after").await;
    let m = n.metrics();
    use metrics::Side::Outbound;
    assert_eq!(
        m.streams(Outbound, true),
        0,
        "the old connection was not reused"
    );
    assert_eq!(m.streams(Outbound, false), 2);
}

/// A server that closed an idle connection (here after every stream) is not
/// sent the next stream: the client sees the close and makes a new connection.
#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_not_reused() {
    let n = node().await;
    let mut server =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FixedServerCert(n.leaf("socat").await)));
    server.alpn_protocols = vec![streams::ALPN.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind(any_port()).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let closed = Arc::new(AtomicUsize::new(0));
    let count = closed.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let Ok(tls) = acceptor.accept(s).await else {
                continue;
            };
            let mut framed = streams::Framed::new(tls);
            if let Ok(true) = framed.read_open().await {
                let (service, proxy_end) = tokio::io::duplex(4096);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(service);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                let cancel = tokio_util::sync::CancellationToken::new();
                let _ = streams::splice_stream(
                    proxy_end,
                    &mut framed,
                    false,
                    splice::Limits::default(),
                    &cancel,
                )
                .await;
            }
            let _ = framed.get_mut().shutdown().await;
            drop(framed);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    n.dir.set_endpoints(&svc("socat"), vec![endpoint(addr)]);
    let up = n.upstream("web", "socat").await;
    for i in 0..3 {
        echo_once(up, format!("hello {i}").as_bytes()).await;
        eventually("the server to close", || {
            closed.load(Ordering::SeqCst) == i + 1
        })
        .await;
        // Its close_notify and FIN reach the client's socket.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = n.metrics();
    use metrics::Side::Outbound;
    assert_eq!(
        (m.streams(Outbound, false), m.streams(Outbound, true)),
        (3, 0)
    );
    assert_eq!(m.closed(Outbound, Outcome::Closed), 3);
}

/// Idle node-to-node connections, pooled on the outbound side and waiting for a
/// stream on the inbound side, end at once when shutdown begins: a drain waits for
/// live connections only.
#[tokio::test]
async fn idle_pooled_connections_do_not_hold_up_a_graceful_shutdown() {
    let (n, _backend, up) = socat_behind_upstream().await;
    echo_once(up, b"once").await;
    pooled(&n, 1).await;
    let started = Instant::now();
    n.agent.shutdown.drain(Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "the drain took {took:?}");
    assert_eq!(n.proxy.pooled_connections(), 0);
    let m = n.metrics();
    assert_eq!(
        m.closed(Side::Inbound, Outcome::Shutdown),
        0,
        "nothing was forced"
    );
    assert_eq!(
        m.closed(Side::Outbound, Outcome::Shutdown),
        0,
        "nothing was forced"
    );
}

/// Idle inbound node-to-node connections hold no slot of the connection limit: a
/// server whose limit idle connections would fill still takes new connections.
#[tokio::test]
async fn idle_inbound_connections_leave_the_connection_limit_to_live_ones() {
    let agent = agent().await;
    let client = node_with(agent.clone(), Limits::default(), None).await;
    let server = node_with(
        agent,
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
        None,
    )
    .await;
    let backend = echo_backend().await;
    server.dir.set_local(&svc("socat"), backend.addr);
    client
        .dir
        .set_endpoints(&svc("socat"), vec![endpoint(server.inbound)]);
    let up = client.upstream("web", "socat").await;
    // Two at once: two node-to-node connections, both at the server's limit.
    let mut a = TcpStream::connect(up).await.expect("connect");
    expect_echo(&mut a, b"a").await;
    let mut b = TcpStream::connect(up).await.expect("connect");
    expect_echo(&mut b, b"b").await;
    drop((a, b));
    pooled(&client, 2).await;
    server.settle().await;

    // Both idle on the server; a new dedicated connection and a stream on a
    // pooled one still get in.
    let config = client_config(server.agent.ca.bundle(), Some(server.leaf("web").await));
    let mut fresh = tls_connect(&server, "socat", config)
        .await
        .expect("handshake");
    expect_echo(&mut fresh, b"fresh").await;
    echo_once(up, b"pooled").await;
    assert_eq!(
        server
            .metrics()
            .closed(Side::Inbound, Outcome::LimitReached),
        0
    );
}

/// A transparent listener on `n` whose redirect records come from the returned
/// origin, with cgroup 42 as `web` and the returned original destination
/// (198.18.0.10:8181, only a map key, never dialed) as `socat`.
async fn transparent_listener(n: &Node) -> (Arc<MemOrigin>, SocketAddr, SocketAddrV4) {
    let orig = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 8181);
    n.dir.map_cgroup(42, &svc("web"));
    n.dir.map_destination(orig, &svc("socat"));
    let origin = Arc::new(MemOrigin::default());
    let l = bind("transparent", any_port()).await.expect("bind");
    let transparent = l.local_addr().expect("addr");
    n.proxy.serve_transparent(l, origin.clone());
    (origin, transparent, orig)
}

/// A client socket whose connection `origin` records as eBPF would at
/// connect(): from `cgroup_id`, to `orig`.
fn recorded_socket(origin: &MemOrigin, orig: SocketAddrV4, cgroup_id: u64) -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(any_port()).expect("bind client");
    let SocketAddr::V4(local) = socket.local_addr().expect("local") else {
        panic!("IPv4 expected");
    };
    origin.insert(
        local,
        Redirect {
            orig_dst: redirect::OrigDst(orig),
            cgroup_id: redirect::CgroupId(cgroup_id),
        },
    );
    socket
}

// ───────────────────────── refusals, seen by the application ─────────────────────────

/// How soon an application must see its refused connection closed. The proxy
/// learns of a deny from the server within milliseconds; the bound leaves room for
/// a loaded test machine, and is far below an application's own timeouts (nc's
/// `-w 5`, the symptom).
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// The application's side of a refused connection: its socket must report a reset
/// (not a clean EOF: a client can then tell "refused" from "the server answered
/// nothing") within [`REFUSED_WITHIN`] of its connect, without a byte coming back.
/// `write` first, or stay silent as an interactive client that waits for the
/// server does. Returns how long it took.
async fn expect_reset(addr: SocketAddr, write: bool, what: &str) -> Duration {
    let started = Instant::now();
    match TcpStream::connect(addr).await {
        Ok(mut c) => expect_reset_on(&mut c, started, write, what).await,
        // Refused so fast that connect() itself reports the reset.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => started.elapsed(),
        Err(e) => panic!("{what}: connect: {e}"),
    }
}

async fn expect_reset_on(c: &mut TcpStream, started: Instant, write: bool, what: &str) -> Duration {
    if write {
        // May fail already if the reset was quick.
        let _ = c.write_all(b"hello\n").await;
    }
    let mut buf = [0u8; 64];
    let read = timeout(Duration::from_secs(5), c.read(&mut buf)).await;
    let took = started.elapsed();
    match read {
        Err(_) => panic!("{what}: the application's connection stayed open for 5 s"),
        Ok(Ok(0)) => panic!("{what}: closed with a clean EOF after {took:?}, not a reset"),
        Ok(Ok(n)) => panic!("{what}: received {:?}", &buf[..n]),
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}"),
    }
    assert!(
        took < REFUSED_WITHIN,
        "{what}: the reset came {took:?} after connect"
    );
    took
}

/// A denied connection is reset toward the application at once: on a new
/// node-to-node connection and on a reused one, with the application silent or
/// speaking first, and on a dedicated connection (a server without streams).
#[tokio::test]
async fn a_denied_connection_is_reset_toward_the_application_at_once() {
    let (n, backend, up) = socat_behind_upstream().await;
    // Warm the pool: the next stream rides this connection.
    echo_once(up, b"allowed").await;
    pooled(&n, 1).await;
    n.intention("web", "socat", Action::Deny).await;
    let m = n.metrics();
    let reused = expect_reset(up, false, "reused connection, silent app").await;
    assert_eq!(m.streams(metrics::Side::Outbound, true), 1, "rode the pool");
    pooled(&n, 0).await;
    let new_silent = expect_reset(up, false, "new connection, silent app").await;
    let new_speaking = expect_reset(up, true, "new connection, app speaks first").await;
    eventually("three denials", || m.denied() == 3).await;
    assert_eq!(backend.accepted(), 1, "nothing denied reached the service");

    let d = node_with(agent().await, no_reuse(), None).await;
    let backend = echo_backend().await;
    d.serve("socat", &backend);
    let up = d.upstream("web", "socat").await;
    d.intention("web", "socat", Action::Deny).await;
    let dedicated = expect_reset(up, false, "dedicated connection").await;
    assert_eq!(backend.accepted(), 0);
    eprintln!(
        "reset after: reused {reused:?}, new {new_silent:?} / {new_speaking:?}, dedicated {dedicated:?}"
    );
}

/// A connection that cannot reach its destination at all (no endpoint, a dead
/// one) is reset as a denied one is.
#[tokio::test]
async fn a_connection_that_cannot_be_dialed_is_reset_at_once() {
    let n = node().await;
    let up = n.upstream("web", "nowhere").await;
    expect_reset(up, false, "no endpoints").await;
    let dead = {
        let l = std::net::TcpListener::bind(any_port()).expect("bind");
        l.local_addr().expect("addr")
    };
    n.dir.set_endpoints(
        &svc("nowhere"),
        vec![Endpoint {
            addr: dead,
            datacenter: Datacenter::default(),
        }],
    );
    expect_reset(up, true, "a dead endpoint").await;
}

/// The transparent path: a redirected connection that its destination denies is
/// reset toward the application at once.
#[tokio::test]
async fn a_denied_transparent_connection_is_reset_at_once() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let (origin, transparent, orig) = transparent_listener(&n).await;
    n.intention("web", "socat", Action::Deny).await;
    for write in [false, true] {
        let socket = recorded_socket(&origin, orig, 42);
        let started = Instant::now();
        match socket.connect(transparent).await {
            Ok(mut c) => {
                expect_reset_on(&mut c, started, write, "transparent").await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("transparent: connect: {e}"),
        }
    }
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn a_port_conflict_fails_at_bind_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = Listeners::bind(addr, None).await.expect_err("port taken");
    assert!(
        matches!(err, Error::Bind { listener: "inbound", addr: a, .. } if a == addr),
        "{err}"
    );
    // Without --cgroup there is no transparent listener.
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let l = Listeners::bind(any, None).await.expect("binds");
    assert!(l.inbound_addr().is_some() && l.transparent_addr().is_none());
    let l = Listeners::bind(any, Some("127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("binds");
    assert!(l.transparent_addr().is_some());
}
