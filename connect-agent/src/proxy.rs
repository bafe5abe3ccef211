//! The node's mTLS data plane: inbound (mTLS from other nodes, and from this node's
//! own outbound side, to local services) and outbound (transparent, upstream
//! listeners, the explicit `connect-agent proxy`) connections.
//!
//! Owns: the listeners' accept loops, the per-connection state machine (TLS
//! handshake, identity, authorization, dial, splice), the live-connection registry
//! and its re-check on intention changes, the reconciliation of upstream listeners,
//! connection limits and timeouts, and the proxy's metrics.
//!
//! Does not own: where services are (the catalog implements [`Directory`]), what is
//! allowed (an [`Authorizer`]: intentions in-process, or the agent's authorize
//! endpoint for the explicit proxy), certificates ([`tls::LeafSource`] and the
//! trust bundle come from the CA or the agent's HTTP API), or where a redirected
//! connection was going ([`OriginLookup`]: eBPF maps). Each is a narrow trait so the
//! in-agent proxy and the explicit proxy share every line of TLS, dial and splice
//! code, and so tests run without a catalog or eBPF.
//!
//! A connection, inbound: TLS 1.3 handshake (SNI picks the local service and its
//! leaf; the client certificate is required and verified against the live trust
//! bundle) → the peer's SPIFFE ID → register in [`conns::Registry`] → authorize →
//! with a [`Permit`], connect to the service's plaintext port → splice. Outbound:
//! accept plaintext → source and destination service → register → dial a healthy
//! instance's node with the source's leaf and SNI `<dst>.svc.<trust-domain>`,
//! accepting only the destination's SPIFFE ID → splice. Between node proxies
//! that negotiate it, a TLS connection carries one such connection after another
//! ([`streams`]): registration, authorization and the local connect happen per
//! stream, and the outbound side takes an idle pooled connection ([`pool`])
//! before it dials a new one.
//!
//! Layout: this file (the seams and the [`Proxy`] that drives them), [`tls`]
//! (rustls configurations over live leaves), `inbound`, `outbound`, [`splice`],
//! [`streams`] (node-to-node connections reused for one application connection
//! after another) and [`pool`] (the outbound side's idle ones), [`conns`], [`metrics`] (counters and the per-connection close record),
//! [`directory`] (directories that need no catalog). The agent wires it up in
//! `app` (intentions as the [`Authorizer`], the CA as the leaf source).

pub mod balance;
mod connection;
pub mod conns;
pub mod directory;
mod inbound;
pub mod metrics;
mod outbound;
pub mod pool;
pub mod readahead;
pub mod splice;
pub mod streams;
pub mod tickets;
pub mod tls;

#[cfg(test)]
mod testio;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

#[cfg(any(test, feature = "testing"))]
pub use self::directory::MemDirectory;
use self::{balance::Balancer, conns::Registry, pool::Pool, tls::TlsConfigs};
pub use self::{
    directory::EmptyDirectory,
    metrics::{Metrics, Outcome, Side},
    pool::PoolLimits,
    tls::{LeafRx, LeafSource, StaticLeaf},
};
use crate::admission::LimitLog;
use crate::{
    ca::TrustBundle,
    identity::{Datacenter, ServiceName},
    intentions::Action,
    redirect::{self, CgroupId, OrigDst, Redirect},
    shutdown::Shutdown,
};

// ───────────────────────────── seams ─────────────────────────────

/// A service of this node, as the inbound side needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    /// The name as registered (SNI arrives lower-cased; this is the canonical case).
    pub name: ServiceName,
    /// The plaintext listeners of its instances on this node (`127.0.0.1:<port>`
    /// for services of the agent), in registration order. Inbound connections are
    /// spread over them round robin; one that refuses is skipped for a while.
    /// Never empty.
    pub addrs: Vec<SocketAddr>,
}

impl LocalService {
    /// A service with one instance listening at `addr`.
    pub fn single(name: ServiceName, addr: SocketAddr) -> Self {
        Self {
            name,
            addrs: vec![addr],
        }
    }
}

/// Where one healthy instance of a service is reached through the mesh: the
/// inbound mTLS address of the node (or explicit proxy) in front of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub datacenter: Datacenter,
}

/// An upstream listener: plaintext connections to `bind` go, as `source`, to
/// `destination` (`"upstreams": [{"destination_name", "local_bind_port"}]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub source: ServiceName,
    pub destination: ServiceName,
    pub bind: SocketAddr,
}

/// What the proxy needs to know about services. The catalog implements it for the
/// agent; the explicit proxy implements it from the agent's HTTP API.
///
/// Every method reads memory and returns at once: they are called on the
/// connection path. Names passed in may differ in case from the registered ones
/// (SNI is lower-cased); implementations compare service names case-insensitively.
pub trait Directory: Send + Sync + fmt::Debug + 'static {
    /// The local service `name`, if this node runs it.
    fn local_service(&self, name: &ServiceName) -> Option<LocalService>;
    /// The healthy instances of `name`, anywhere.
    fn endpoints(&self, name: &ServiceName) -> Vec<Endpoint>;
    /// The service whose processes live in cgroup `cgroup_id` (transparent path).
    fn service_of_cgroup(&self, cgroup_id: CgroupId) -> Option<ServiceName>;
    /// The service an application meant by dialing `orig_dst` (an instance address
    /// or a virtual IP; transparent path).
    fn destination_of(&self, orig_dst: OrigDst) -> Option<ServiceName>;
    /// The upstream listeners the node's service definitions ask for.
    fn upstream_listeners(&self) -> Vec<Upstream>;
    /// Moves whenever any of the above may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Finds where a connection the transparent listener accepted was going, from the
/// record eBPF made at `connect()`. Implemented by [`crate::redirect::Redirector`].
pub trait OriginLookup: Send + Sync + 'static {
    /// Claims the record of the connection from `peer` (each is claimed once).
    fn take_redirect(&self, peer: SocketAddrV4) -> Result<Option<Redirect>, redirect::Error>;
}

impl OriginLookup for redirect::Redirector {
    fn take_redirect(&self, peer: SocketAddrV4) -> Result<Option<Redirect>, redirect::Error> {
        redirect::Redirector::take_redirect(self, peer)
    }
}

/// An authorization decision and Consul's reason text for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub reason: String,
}

/// Decides whether a source service may connect to a destination service.
///
/// The trust domain is not its concern: the TLS verifiers only let identities of
/// our trust domain through. The in-agent implementation reads intentions in
/// memory; the explicit proxy asks the agent's authorize endpoint.
#[async_trait::async_trait]
pub trait Authorizer: Send + Sync + fmt::Debug + 'static {
    async fn authorize(
        &self,
        src: &ServiceName,
        dst: &ServiceName,
    ) -> Result<Verdict, AuthorizeError>;
    /// Moves whenever decisions may have changed; live connections are re-checked.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// No decision could be had (the agent is unreachable): the connection is refused,
/// a live connection is kept.
#[derive(Debug, thiserror::Error)]
#[error("cannot get an authorization decision for {src} => {dst}: {cause}")]
pub struct AuthorizeError {
    pub src: ServiceName,
    pub dst: ServiceName,
    #[source]
    pub cause: BoxError,
}

/// A boxed error from one of the seams' implementations.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Proof that intentions allow `src` to reach `dst`. Only this module makes one,
/// from an allowing [`Verdict`]; opening a local service's plaintext port takes one,
/// so no path reaches a service unauthorized.
#[derive(Debug)]
pub struct Permit {
    src: ServiceName,
    dst: ServiceName,
}

impl Permit {
    fn from_verdict(src: &ServiceName, dst: &ServiceName, verdict: &Verdict) -> Option<Self> {
        (verdict.action == Action::Allow).then(|| Self {
            src: src.clone(),
            dst: dst.clone(),
        })
    }

    pub fn source(&self) -> &ServiceName {
        &self.src
    }

    pub fn destination(&self) -> &ServiceName {
        &self.dst
    }
}

// ───────────────────────────── limits and errors ─────────────────────────────

/// Timeouts and bounds of the proxy. The defaults are Consul's built-in proxy's
/// where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A TLS handshake (inbound or outbound) must finish within this (Consul:
    /// `handshake_timeout_ms`, 10 s).
    pub handshake_timeout: Duration,
    /// Connecting to a local service's plaintext port (Consul:
    /// `local_connect_timeout_ms`, 1 s).
    pub local_connect_timeout: Duration,
    /// Connecting (TCP) to a remote instance's node, per attempt.
    pub connect_timeout: Duration,
    /// A connection with no byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections carried at once, handshakes included; more are refused.
    /// Each costs two 256 KiB splice buffers (three under TLS, with the
    /// read-ahead), resident only as far as transfers touch them, plus TLS
    /// state. Idle
    /// inbound node-to-node connections between streams are bounded apart
    /// (`inbound::MAX_IDLE_INBOUND`).
    pub max_connections: usize,
    /// Inbound TLS handshakes in progress at once, apart from `max_connections`:
    /// a peer holds a permit of this budget until it is authenticated, and a
    /// slot of the connection limit only after ([`crate::admission`]).
    pub max_handshakes: usize,
    /// Inbound handshakes in progress from one source IP.
    pub max_handshakes_per_peer: usize,
    /// Reuse of node-to-node connections (see [`streams`]).
    pub pool: PoolLimits,
}

impl Limits {
    /// What every splice of this proxy is bounded by.
    fn splice(&self) -> splice::Limits {
        splice::Limits {
            idle_timeout: self.idle_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            local_connect_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: splice::Limits::default().idle_timeout,
            max_connections: 4096,
            max_handshakes: 1024,
            max_handshakes_per_peer: 128,
            pool: PoolLimits::default(),
        }
    }
}

/// Why the proxy could not start or a listener could not open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot bind the {listener} listener to {addr}: {source} (is another agent or proxy using the port?)"
    )]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// rustls refused a configuration we built (our bug).
    #[error("cannot build the TLS configuration: {source}")]
    TlsConfig {
        #[source]
        source: rustls::Error,
    },
}

// ───────────────────────────── the proxy ─────────────────────────────

/// What a [`Proxy`] is made of.
#[derive(Debug)]
pub struct Parts {
    pub directory: Arc<dyn Directory>,
    pub authorizer: Arc<dyn Authorizer>,
    pub leaves: Arc<dyn LeafSource>,
    /// The live trust bundle (the CA's watch, or one fed from the agent's API).
    pub bundle: watch::Receiver<Arc<TrustBundle>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Listeners stop on `stop`; connections are cancelled on `force`; every task
    /// is tracked by `tasks`.
    pub shutdown: Shutdown,
}

/// A running proxy: its listeners, connections and background tasks. Cheap to
/// clone. Stops with its [`Shutdown`].
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    directory: Arc<dyn Directory>,
    authorizer: Arc<dyn Authorizer>,
    tls: TlsConfigs,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: Shutdown,
    limit_log: LimitLog,
    /// Inbound handshakes in progress (see [`Limits::max_handshakes`]).
    handshakes: Arc<crate::admission::Budget>,
    /// Spreads outbound dials over a destination's endpoints.
    outbound_lb: Balancer,
    /// Spreads inbound connections over a local service's instances.
    inbound_lb: Balancer,
    /// Idle outbound node-to-node connections.
    pool: Pool,
    /// Inbound node-to-node connections waiting for their next stream.
    idle_inbound: std::sync::atomic::AtomicUsize,
    upstreams: Mutex<HashMap<SocketAddr, RunningUpstream>>,
    /// Serializes [`Proxy::sync_upstreams`]: two concurrent runs would both bind a
    /// wanted listener (port 0 binds twice) and leak one.
    upstreams_sync: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct RunningUpstream {
    upstream: Upstream,
    local_addr: SocketAddr,
    stop: CancellationToken,
}

impl Proxy {
    /// Builds the proxy and starts its background tasks: re-checking live
    /// connections when authorization changes, and keeping upstream listeners and
    /// cached TLS configurations in step with the directory. Listeners are served
    /// with the `serve_*` methods.
    pub fn start(parts: Parts) -> Result<Self, Error> {
        let pool = Pool::new(parts.limits.pool);
        let tls = TlsConfigs::new(parts.leaves, parts.bundle, pool.enabled())
            .map_err(|source| Error::TlsConfig { source })?;
        let shared = Arc::new(Shared {
            directory: parts.directory,
            authorizer: parts.authorizer,
            tls,
            registry: Registry::new(parts.limits.max_connections),
            metrics: parts.metrics,
            limits: parts.limits,
            shutdown: parts.shutdown,
            limit_log: LimitLog::default(),
            handshakes: crate::admission::Budget::new(
                "inbound handshakes",
                parts.limits.max_handshakes,
                parts.limits.max_handshakes_per_peer,
            ),
            outbound_lb: Balancer::new(balance::FAILURE_HOLD),
            inbound_lb: Balancer::new(balance::FAILURE_HOLD),
            pool,
            idle_inbound: std::sync::atomic::AtomicUsize::new(0),
            upstreams: Mutex::new(HashMap::new()),
            upstreams_sync: tokio::sync::Mutex::new(()),
        });
        let proxy = Self { shared };
        let tasks = &proxy.shared.shutdown.tasks;
        tasks.spawn(recheck_loop(proxy.shared.clone()));
        tasks.spawn(directory_loop(proxy.clone()));
        tasks.spawn(sweep_loop(proxy.shared.clone()));
        Ok(proxy)
    }

    /// Serves the inbound mTLS listener until shutdown.
    pub fn serve_inbound(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        self.shared
            .shutdown
            .tasks
            .spawn(inbound::serve(shared, listener));
    }

    /// Serves the transparent outbound listener (eBPF-redirected connections)
    /// until shutdown.
    pub fn serve_transparent(&self, listener: TcpListener, origin: Arc<dyn OriginLookup>) {
        let shared = self.shared.clone();
        self.shared
            .shutdown
            .tasks
            .spawn(outbound::serve_transparent(shared, listener, origin));
    }

    /// Opens and serves the upstream listeners the directory asks for and closes
    /// the ones it no longer does (live connections on them carry on). Returns the
    /// listeners that could not be bound; the others run regardless.
    pub async fn sync_upstreams(&self) -> Vec<Error> {
        let _one_at_a_time = self.shared.upstreams_sync.lock().await;
        let wanted = self.shared.directory.upstream_listeners();
        let mut errors = Vec::new();
        // Stop what is no longer wanted, or wanted differently.
        {
            let mut running = lock(&self.shared.upstreams);
            running.retain(|bind, r| {
                let keep = wanted.iter().any(|u| u.bind == *bind && *u == r.upstream);
                if !keep {
                    tracing::info!(bind = %bind, src = %r.upstream.source, dst = %r.upstream.destination, "upstream listener closed");
                    r.stop.cancel();
                }
                keep
            });
        }
        for upstream in wanted {
            if lock(&self.shared.upstreams).contains_key(&upstream.bind) {
                continue;
            }
            let listener = match TcpListener::bind(upstream.bind).await {
                Ok(l) => l,
                Err(source) => {
                    errors.push(Error::Bind {
                        listener: "upstream",
                        addr: upstream.bind,
                        source,
                    });
                    continue;
                }
            };
            let local_addr = listener.local_addr().unwrap_or(upstream.bind);
            let stop = self.shared.shutdown.stop.child_token();
            tracing::info!(bind = %local_addr, src = %upstream.source, dst = %upstream.destination, "upstream listener open");
            self.shared.shutdown.tasks.spawn(outbound::serve_upstream(
                self.shared.clone(),
                listener,
                upstream.clone(),
                stop.clone(),
            ));
            lock(&self.shared.upstreams).insert(
                upstream.bind,
                RunningUpstream {
                    upstream,
                    local_addr,
                    stop,
                },
            );
        }
        errors
    }

    /// The upstream listeners now open, with the address each is bound to.
    pub fn upstream_addrs(&self) -> Vec<(Upstream, SocketAddr)> {
        lock(&self.shared.upstreams)
            .values()
            .map(|r| (r.upstream.clone(), r.local_addr))
            .collect()
    }

    /// The proxy's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Live connections (authorized or being set up and registered).
    pub fn live_connections(&self) -> usize {
        self.shared.registry.len()
    }

    /// Idle outbound node-to-node connections kept for reuse.
    pub fn pooled_connections(&self) -> usize {
        self.shared.pool.len()
    }

    /// Re-checks every live connection against the authorizer now and closes the
    /// ones it no longer allows; returns how many were closed. The background task
    /// does this on every change; this is for callers that cannot wait for it.
    pub async fn recheck(&self) -> usize {
        recheck(&self.shared).await
    }
}

/// The agent's proxy listeners, bound at startup (before eBPF attaches, so that a
/// redirected connection always finds the transparent listener).
#[derive(Debug)]
pub struct Listeners {
    pub inbound: TcpListener,
    pub transparent: Option<TcpListener>,
}

impl Listeners {
    /// Binds the inbound listener on `inbound` and, when the agent redirects
    /// (`--cgroup`), the transparent listener on `transparent`. A port conflict
    /// fails here, naming the listener, before the agent claims to be up.
    pub async fn bind(
        inbound: SocketAddr,
        transparent: Option<SocketAddrV4>,
    ) -> Result<Self, Error> {
        let inbound = bind("inbound", inbound).await?;
        let transparent = match transparent {
            Some(addr) => Some(bind("transparent", SocketAddr::V4(addr)).await?),
            None => None,
        };
        Ok(Self {
            inbound,
            transparent,
        })
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.local_addr().ok()
    }

    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Binds a listener for the proxy, naming it in the error.
pub async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        listener,
        addr,
        source,
    })
}

/// Follows the authorizer and closes live connections it no longer allows.
async fn recheck_loop(shared: Arc<Shared>) {
    let mut changes = shared.authorizer.changes();
    changes.borrow_and_update();
    loop {
        tokio::select! {
            () = shared.shutdown.stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        let closed = recheck(&shared).await;
        if closed > 0 {
            tracing::info!(closed, "closed connections that intentions no longer allow");
        }
    }
}

async fn recheck(shared: &Shared) -> usize {
    let pairs = shared.registry.pairs();
    let mut denied = Vec::new();
    for (src, dst) in pairs {
        match shared.authorizer.authorize(&src, &dst).await {
            Ok(v) if v.action == Action::Allow => {}
            Ok(v) => {
                tracing::info!(src = %src, dst = %dst, reason = %v.reason, "intention now denies live connections");
                denied.push((src, dst));
            }
            // Fail open for connections already authorized, as Consul's agents do
            // on cached data: an unreachable agent must not cut the mesh.
            Err(e) => tracing::warn!(error = %e, "cannot re-check live connections; keeping them"),
        }
    }
    if denied.is_empty() {
        return 0;
    }
    shared
        .registry
        .recheck(|s, d| !denied.iter().any(|(ds, dd)| ds == s && dd == d))
}

/// Drops expired idle connections from the pool, and all of them at shutdown
/// (their servers then see the connection end between streams).
async fn sweep_loop(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = shared.shutdown.stop.cancelled() => break,
            () = tokio::time::sleep(pool::SWEEP_EVERY) => shared.pool.sweep(),
        }
    }
    shared.pool.clear();
}

/// Follows the directory: upstream listeners and cached TLS configurations.
async fn directory_loop(proxy: Proxy) {
    let shared = proxy.shared.clone();
    let mut changes = shared.directory.changes();
    loop {
        changes.borrow_and_update();
        for e in proxy.sync_upstreams().await {
            tracing::error!(error = %e, "cannot open an upstream listener");
        }
        let directory = shared.directory.clone();
        let upstreams = directory.upstream_listeners();
        shared.tls.retain(|svc| {
            directory.local_service(svc).is_some() || upstreams.iter().any(|u| &u.source == svc)
        });
        tokio::select! {
            () = shared.shutdown.stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps behind these locks are updated by single inserts/removes that
    // cannot panic half-way: a poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ───────────────────────────── per-connection plumbing ─────────────────────────────

/// Why one connection failed before or instead of its splice. Logged in the
/// connection's close record; each maps to an [`Outcome`].
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("the TLS handshake failed: {source}")]
    Handshake {
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS handshake did not finish within {after:?}")]
    HandshakeTimeout { after: Duration },
    #[error("the client sent no server name (SNI); it must send <service>.svc.<trust-domain>")]
    NoSni,
    #[error("server name {name:?} is not <service>.svc.<trust-domain> of our trust domain")]
    BadSni { name: String },
    #[error("{service} is not a service of this node")]
    NotLocal { service: ServiceName },
    #[error("the peer certificate is unusable: {source}")]
    PeerIdentity {
        #[source]
        source: crate::ca::VerifyError,
    },
    #[error("intentions deny {src} => {dst}: {reason}")]
    Denied {
        src: ServiceName,
        dst: ServiceName,
        reason: String,
    },
    #[error(transparent)]
    Authorize(#[from] AuthorizeError),
    #[error("cannot get the leaf certificate of {service}: {source}")]
    Leaf {
        service: ServiceName,
        #[source]
        source: BoxError,
    },
    #[error(
        "cannot connect to local service {service}: {attempts} instance(s) tried, the last at {addr}: {source}"
    )]
    LocalConnect {
        service: ServiceName,
        addr: SocketAddr,
        attempts: usize,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "local service {service}: {attempts} instance(s) tried, the last at {addr} did not accept within {after:?}"
    )]
    LocalConnectTimeout {
        service: ServiceName,
        addr: SocketAddr,
        attempts: usize,
        after: Duration,
    },
    #[error("the transparent listener accepted an IPv6 peer {peer}; eBPF redirects IPv4 only")]
    NotV4 { peer: SocketAddr },
    #[error("no redirect record for {peer}: the connection did not come through eBPF")]
    NoOrigin { peer: SocketAddrV4 },
    #[error("cannot read the redirect record of {peer}: {source}")]
    Origin {
        peer: SocketAddrV4,
        #[source]
        source: redirect::Error,
    },
    #[error("cgroup {cgroup_id} belongs to no registered service")]
    UnknownCgroup { cgroup_id: CgroupId },
    #[error("{orig_dst} is not a mesh destination")]
    UnknownDestination { orig_dst: OrigDst },
    #[error("no healthy instance of {service}")]
    NoEndpoints { service: ServiceName },
    #[error("cannot reach {service}: {attempts} endpoint(s) tried, the last at {addr}: {source}")]
    Dial {
        service: ServiceName,
        addr: SocketAddr,
        attempts: usize,
        #[source]
        source: outbound::DialError,
    },
    #[error("{service} cannot be named in SNI under trust domain {trust_domain}")]
    ServerName {
        service: ServiceName,
        trust_domain: String,
    },
}

impl ConnError {
    fn outcome(&self) -> Outcome {
        match self {
            ConnError::Handshake { .. }
            | ConnError::HandshakeTimeout { .. }
            | ConnError::PeerIdentity { .. } => Outcome::HandshakeFailed,
            ConnError::NoSni
            | ConnError::BadSni { .. }
            | ConnError::NotLocal { .. }
            | ConnError::NotV4 { .. }
            | ConnError::NoOrigin { .. }
            | ConnError::UnknownCgroup { .. }
            | ConnError::UnknownDestination { .. }
            | ConnError::NoEndpoints { .. } => Outcome::Unroutable,
            ConnError::Denied { .. } => Outcome::Denied,
            ConnError::LocalConnect { .. } | ConnError::LocalConnectTimeout { .. } => {
                Outcome::LocalUnreachable
            }
            ConnError::Dial { .. } => Outcome::DialFailed,
            ConnError::Authorize(_)
            | ConnError::Leaf { .. }
            | ConnError::Origin { .. }
            | ConnError::ServerName { .. } => Outcome::Internal,
        }
    }
}

/// How a splice's end reads as a connection outcome.
fn splice_outcome(end: splice::End, shutdown: &Shutdown) -> Outcome {
    match end {
        splice::End::Closed => Outcome::Closed,
        splice::End::Idle => Outcome::Idle,
        splice::End::Cancelled if shutdown.force.is_cancelled() => Outcome::Shutdown,
        splice::End::Cancelled => Outcome::Revoked,
        splice::End::Error => Outcome::Reset,
    }
}

/// Accepts connections until `stop`, handing each to `handle` in a tracked task.
async fn accept_loop<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
    what: &'static str,
    handle: F,
) where
    F: Fn(Arc<Shared>, tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    tracing::info!(listener = what, %addr, "proxy listener serving");
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let task = handle(shared.clone(), tcp, peer);
                shared.shutdown.tasks.spawn(task);
            }
            Err(error) => {
                // Out of descriptors or memory: retrying at once would spin. A
                // short pause lets connections close; the backlog holds new ones.
                tracing::warn!(listener = what, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    tracing::info!(listener = what, %addr, "proxy listener closed");
}

/// Pause after a failed `accept()` (EMFILE, ENOBUFS...).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
