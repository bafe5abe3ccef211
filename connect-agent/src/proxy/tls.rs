//! rustls configurations for the proxy, built once per local service and kept for
//! as long as the service is: certificates and roots change underneath them
//! without a rebuild.
//!
//! - Each configuration holds a [`LeafRx`] — a `watch` of the service's current
//!   leaf — and hands rustls whatever it holds at handshake time, so a renewed leaf
//!   is used by the next handshake while established connections keep theirs.
//! - The verifiers (`ca::tls`) read the live trust bundle the same way, so a root
//!   rotation reaches the next handshake.
//! - TLS 1.3 only, ring's cipher suites with AES-128-GCM-SHA256 first (see
//!   [`provider`]).
//! - Session resumption: servers issue stateless tickets (one ticket key shared by
//!   every server configuration, rotated by rustls every 6 h); clients keep a
//!   bounded ticket store ([`TicketStore`]) **per source service and destination
//!   endpoint** ([`TlsConfigs::client_to`]), never shared between identities,
//!   because a resumed session carries the client certificate of the session it
//!   resumes. The inbound side re-verifies that certificate against the current
//!   bundle when a session is resumed (see `inbound`).
//!
//! Not here: deciding which service a connection is for (`inbound`, `outbound`), or
//! verifying chains (`ca::verify`).

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use rustls::{
    ClientConfig, ServerConfig,
    client::{ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    server::{ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use super::{BoxError, tickets::TicketStore};
use crate::{
    ca::{
        CaManager, Leaf, TrustBundle,
        tls::{SpiffeClientVerifier, SpiffeServerVerifier},
    },
    identity::ServiceName,
};

/// A service's current leaf as a live value.
#[derive(Debug, Clone)]
pub enum LeafRx {
    /// From the agent's CA: renewed in the background.
    Ca(watch::Receiver<Arc<Leaf>>),
    /// A ready key (the explicit proxy, fed from the agent's HTTP API).
    Key(watch::Receiver<Arc<CertifiedKey>>),
}

impl LeafRx {
    /// The leaf to present now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self {
            LeafRx::Ca(rx) => rx.borrow().certified_key.clone(),
            LeafRx::Key(rx) => rx.borrow().clone(),
        }
    }
}

/// Where the proxy gets the leaf of a service it speaks for.
#[async_trait::async_trait]
pub trait LeafSource: Send + Sync + fmt::Debug + 'static {
    async fn leaf(&self, service: &ServiceName) -> Result<LeafRx, BoxError>;
}

#[async_trait::async_trait]
impl LeafSource for CaManager {
    async fn leaf(&self, service: &ServiceName) -> Result<LeafRx, BoxError> {
        let watch = CaManager::leaf(self, service).await?;
        Ok(LeafRx::Ca(watch.rx))
    }
}

/// The leaf of the one service an explicit proxy speaks for.
#[derive(Debug)]
pub struct StaticLeaf {
    service: ServiceName,
    rx: watch::Receiver<Arc<CertifiedKey>>,
}

/// The explicit proxy was asked for the leaf of a service it does not represent.
#[derive(Debug, thiserror::Error)]
#[error("this proxy holds the leaf of {held} only, not of {asked}")]
pub struct NotOurService {
    pub held: ServiceName,
    pub asked: ServiceName,
}

impl StaticLeaf {
    pub fn new(service: ServiceName, rx: watch::Receiver<Arc<CertifiedKey>>) -> Self {
        Self { service, rx }
    }
}

#[async_trait::async_trait]
impl LeafSource for StaticLeaf {
    async fn leaf(&self, service: &ServiceName) -> Result<LeafRx, BoxError> {
        if *service == self.service {
            Ok(LeafRx::Key(self.rx.clone()))
        } else {
            Err(Box::new(NotOurService {
                held: self.service.clone(),
                asked: service.clone(),
            }))
        }
    }
}

/// Presents a service's current leaf, as server or as client.
#[derive(Debug)]
struct LeafResolver(LeafRx);

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

impl ResolvesClientCert for LeafResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS configurations of every service the proxy speaks for, built on first
/// use.
pub(crate) struct TlsConfigs {
    leaves: Arc<dyn LeafSource>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    provider: Arc<CryptoProvider>,
    client_verifier: Arc<SpiffeClientVerifier>,
    server_verifier: Arc<SpiffeServerVerifier>,
    ticketer: Arc<dyn ProducesTickets>,
    /// Whether clients offer streams (ALPN `streams::ALPN`).
    streams: bool,
    /// Per service: without ALPN, and with streams' ALPN.
    server: Mutex<HashMap<ServiceName, [Arc<ServerConfig>; 2]>>,
    client: Mutex<HashMap<ServiceName, SourceConfigs>>,
}

/// A source service's client configuration, and one copy of it per destination
/// endpoint with a ticket store of its own (see [`TlsConfigs::client_to`]).
struct SourceConfigs {
    leaf: LeafRx,
    base: Arc<ClientConfig>,
    endpoints: HashMap<SocketAddr, Arc<ClientConfig>>,
}

/// Endpoints whose tickets a source keeps; past it, one is forgotten per new one
/// (its next connection does a full handshake). Each keeps at most 256 KiB of
/// tickets ([`super::tickets`]), so 64 MiB per source in the worst case; a busy
/// endpoint holds a few dozen KiB.
pub const MAX_ENDPOINTS_PER_SOURCE: usize = 256;

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("leaves", &self.leaves)
            .field("server", &lock(&self.server).len())
            .field("client", &lock(&self.client).len())
            .finish_non_exhaustive()
    }
}

impl TlsConfigs {
    /// `streams`: whether client connections offer to carry streams
    /// ([`super::streams`]); servers accept them from clients that offer.
    pub(crate) fn new(
        leaves: Arc<dyn LeafSource>,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        streams: bool,
    ) -> Result<Self, rustls::Error> {
        Ok(Self {
            client_verifier: SpiffeClientVerifier::new(bundle.clone()),
            server_verifier: SpiffeServerVerifier::new(bundle.clone()),
            leaves,
            bundle,
            provider: Arc::new(provider()),
            ticketer: rustls::crypto::ring::Ticketer::new()?,
            streams,
            server: Mutex::new(HashMap::new()),
            client: Mutex::new(HashMap::new()),
        })
    }

    /// The trust bundle now.
    pub(crate) fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// The server configuration presenting `service`'s leaf, selecting streams'
    /// ALPN if `streams` (only for clients that offered it: a server with ALPN
    /// protocols refuses a client that offers others); fetches the leaf the first
    /// time.
    pub(crate) async fn server(
        &self,
        service: &ServiceName,
        streams: bool,
    ) -> Result<Arc<ServerConfig>, BoxError> {
        if let Some(c) = lock(&self.server).get(service) {
            return Ok(c[usize::from(streams)].clone());
        }
        let leaf = self.leaves.leaf(service).await?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier.clone())
            .with_cert_resolver(Arc::new(LeafResolver(leaf)));
        config.ticketer = self.ticketer.clone();
        // Tickets are stateless; no per-session server memory.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        let mut with_streams = config.clone();
        with_streams.alpn_protocols = vec![super::streams::ALPN.to_vec()];
        let both = [Arc::new(config), Arc::new(with_streams)];
        let config = both[usize::from(streams)].clone();
        lock(&self.server).insert(service.clone(), both);
        Ok(config)
    }

    /// The client configuration for dialing `endpoint` as `service`: `service`'s
    /// leaf as client certificate (fetched the first time), and a ticket store for
    /// that endpoint alone. Every node's proxy encrypts tickets with its own key
    /// and rustls keeps tickets by server name, which is the destination
    /// service's, the same on every instance; one store per source would offer
    /// node B the ticket node A issued, and round robin over two instances would
    /// never resume.
    ///
    /// Also returns the leaf `service` presents now (see `pool`: a connection made
    /// with an older one is not reused).
    pub(crate) async fn client_to(
        &self,
        service: &ServiceName,
        endpoint: SocketAddr,
    ) -> Result<(Arc<ClientConfig>, Arc<CertifiedKey>), BoxError> {
        if let Some(source) = lock(&self.client).get_mut(service) {
            return Ok((source.for_endpoint(endpoint), source.leaf.current()));
        }
        let leaf = self.leaves.leaf(service).await?;
        let resolver = Arc::new(LeafResolver(leaf.clone()));
        let mut base = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(self.server_verifier.clone())
            .with_client_cert_resolver(resolver);
        // Only the per-endpoint copies dial.
        base.resumption = Resumption::disabled();
        if self.streams {
            base.alpn_protocols = vec![super::streams::ALPN.to_vec()];
        }
        let mut client = lock(&self.client);
        // A concurrent first dial may have filed the source meanwhile: keep that
        // one, so both connections' tickets land in the same store.
        let source = client
            .entry(service.clone())
            .or_insert_with(|| SourceConfigs {
                leaf,
                base: Arc::new(base),
                endpoints: HashMap::new(),
            });
        Ok((source.for_endpoint(endpoint), source.leaf.current()))
    }

    /// Drops the configurations (and leaf watches) of services `keep` refuses.
    pub(crate) fn retain(&self, keep: impl Fn(&ServiceName) -> bool) {
        lock(&self.server).retain(|s, _| keep(s));
        lock(&self.client).retain(|s, _| keep(s));
    }
}

impl SourceConfigs {
    /// The copy of the base configuration for `endpoint`, made the first time.
    fn for_endpoint(&mut self, endpoint: SocketAddr) -> Arc<ClientConfig> {
        if let Some(c) = self.endpoints.get(&endpoint) {
            return c.clone();
        }
        if self.endpoints.len() >= MAX_ENDPOINTS_PER_SOURCE
            && let Some(old) = self.endpoints.keys().next().copied()
        {
            self.endpoints.remove(&old);
        }
        let mut config = (*self.base).clone();
        config.resumption = Resumption::store(Arc::new(TicketStore::new()));
        let config = Arc::new(config);
        self.endpoints.insert(endpoint, config.clone());
        config
    }
}

/// ring's provider with the TLS 1.3 suites in the order node proxies should pick
/// them: AES-128-GCM with SHA-256 first. Both ends are ours and every suite here is
/// sound; AES-128 takes 10 rounds to AES-256's 14 on bulk data, and the handshake's
/// key schedule runs on SHA-256 (SHA-NI on current x86) instead of SHA-384, which
/// showed as the largest single symbol (7% of proxy CPU) in a profile of the
/// connection-rate benchmark.
pub(crate) fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite;
    CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single inserts and removes of ready values: a poisoned map is consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
