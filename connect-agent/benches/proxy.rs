//! Proxy speed on loopback, in one process (two tokio workers):
//!
//! 1. `handshake/full` and `handshake/resumed`: a new mTLS connection to the
//!    inbound listener plus 1 KiB echoed through it to the local service, with
//!    session resumption off and on (what node-to-node connection rates depend on).
//! 2. `connection/upstream`: a new plaintext connection to an upstream listener,
//!    through the outbound side, mTLS to the inbound side, the local service, and
//!    back — 1 KiB echoed. The proxy's own client resumes sessions (its ticket
//!    store keeps them), so after the first iteration this is the resumed
//!    handshake through a whole inbound/outbound pair, the normal case.
//! 3. `throughput/1MiB`: 1 MiB echoed over an established upstream connection.
//!
//! Loopback on a shared machine, and every step a wake-up of another task: the
//! figures are wall time and compare configurations; they are no substitute for
//! the two-node benchmark (`cargo xtask bench`).
//!
//! Run: `cargo bench -p connect-agent --bench proxy`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Parser;
use connect_agent::{
    app::{self, IntentionsAuthorizer},
    ca::tls::{SpiffeServerVerifier, server_name_for},
    config::AgentArgs,
    identity::{Datacenter, ServiceName},
    proxy::{self, Directory, Endpoint, Limits, LocalService, Parts, Proxy, Upstream},
    redirect::{CgroupId, OrigDst},
    shutdown::Shutdown,
    store::memory::MemStore,
};
use criterion::{Criterion, Throughput};
use rustls::{ClientConfig, client::Resumption};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    agent: AgentArgs,
}

/// socat on `backend`, reached through `inbound`; one upstream web → socat.
#[derive(Debug)]
struct Fixed {
    backend: SocketAddr,
    inbound: SocketAddr,
    upstream: SocketAddr,
    changes: watch::Sender<u64>,
}

impl Directory for Fixed {
    fn local_service(&self, name: &ServiceName) -> Option<LocalService> {
        (name.as_str() == "socat").then(|| LocalService::single(name.clone(), self.backend))
    }
    fn endpoints(&self, name: &ServiceName) -> Vec<Endpoint> {
        if name.as_str() == "socat" {
            vec![Endpoint {
                addr: self.inbound,
                datacenter: Datacenter::default(),
            }]
        } else {
            Vec::new()
        }
    }
    fn service_of_cgroup(&self, _: CgroupId) -> Option<ServiceName> {
        None
    }
    fn destination_of(&self, _: OrigDst) -> Option<ServiceName> {
        None
    }
    fn upstream_listeners(&self) -> Vec<Upstream> {
        vec![Upstream {
            source: svc("web"),
            destination: svc("socat"),
            bind: self.upstream,
        }]
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn svc(s: &str) -> ServiceName {
    s.parse().expect("name")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let data = tempfile::tempdir().expect("tempdir");
    let config = Flags::parse_from([
        "bench",
        "--dev",
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().expect("utf-8 path"),
    ])
    .agent
    .into_config()
    .expect("config");
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);

    let (agent, fixed, full, resumed) = rt.block_on(async {
        let agent = app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
            .await
            .expect("agent");
        let backend = echo().await;
        let inbound = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let upstream = probe.local_addr().expect("addr");
        drop(probe);
        let fixed = Arc::new(Fixed {
            backend,
            inbound: inbound.local_addr().expect("addr"),
            upstream,
            changes: watch::channel(0).0,
        });
        let p = Proxy::start(Parts {
            directory: fixed.clone(),
            authorizer: Arc::new(IntentionsAuthorizer::new(agent.intentions.clone())),
            leaves: agent.ca.clone(),
            bundle: agent.ca.bundle(),
            metrics: Arc::new(proxy::Metrics::new()),
            limits: Limits {
                max_connections: 100_000,
                ..Limits::default()
            },
            shutdown: agent.shutdown.clone(),
        })
        .expect("proxy");
        p.serve_inbound(inbound);
        assert!(p.sync_upstreams().await.is_empty());
        let leaf = agent
            .ca
            .leaf(&svc("api"))
            .await
            .expect("leaf")
            .rx
            .borrow()
            .clone();
        let client = |resume: bool| {
            let mut cfg = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(SpiffeServerVerifier::new(agent.ca.bundle()))
            .with_client_auth_cert(leaf.cert.chain.clone(), leaf.private_key_der())
            .expect("client cert");
            if !resume {
                cfg.resumption = Resumption::disabled();
            }
            Arc::new(cfg)
        };
        (agent.clone(), fixed, client(false), client(true))
    });
    let sni = server_name_for(&svc("socat"), &agent.ca.bundle().borrow()).expect("sni");

    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    for (name, config) in [("full", full), ("resumed", resumed)] {
        let connector = TlsConnector::from(config);
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let tcp = TcpStream::connect(fixed.inbound).await.expect("connect");
                    let mut tls = connector.connect(sni.clone(), tcp).await.expect("tls");
                    echo_once(&mut tls).await;
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("connection");
    g.throughput(Throughput::Elements(1));
    g.bench_function("upstream", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = TcpStream::connect(fixed.upstream).await.expect("connect");
                echo_once(&mut s).await;
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("throughput");
    const MIB: usize = 1 << 20;
    g.throughput(Throughput::Bytes(MIB as u64));
    let mut s = rt
        .block_on(TcpStream::connect(fixed.upstream))
        .expect("connect");
    // Like the echo server: without it, Nagle holds each burst's last segment
    // for a delayed ACK (40 ms) on loopback, and that is all this would measure.
    s.set_nodelay(true).expect("nodelay");
    let payload = vec![0x5a_u8; MIB];
    let mut back = vec![0u8; MIB];
    g.bench_function("1MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut r, mut w) = s.split();
                let write = async {
                    w.write_all(&payload).await.expect("write");
                };
                let read = async {
                    r.read_exact(&mut back).await.expect("read");
                };
                tokio::join!(write, read);
            })
        })
    });
    g.finish();
    c.final_summary();
}

/// Bytes echoed once per new connection.
const ECHO: usize = 1024;

async fn echo_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    let msg = [0x5a_u8; ECHO];
    s.write_all(&msg).await.expect("write");
    let mut b = [0u8; ECHO];
    s.read_exact(&mut b).await.expect("read");
    assert_eq!(b, msg, "echoed");
}

async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
