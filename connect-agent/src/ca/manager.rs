//! The running CA of one agent ([`CaManager`]): bootstraps or loads the CA from the
//! store, follows the store so that a rotation made by any agent reaches this one,
//! publishes the snapshot and trust bundle on `watch` channels, issues and caches
//! one leaf per service, renews each in a background task, rotates roots and prunes
//! old ones.
//!
//! Readers (API handlers, proxies) take `Arc` snapshots from the watches: no lock is
//! held across an `.await`, and the handshake path does no I/O. Background tasks stop
//! when the manager is dropped.

mod follow;
mod jwts;
mod leaves;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use time::OffsetDateTime;
use tokio::{sync::watch, time::Instant};
use tokio_util::task::AbortOnDropHandle;

use self::{
    follow::{Records, prune_periodically},
    leaves::LeafEntry,
};
use super::{
    CaConfig, Error,
    leaf::{self, IssuedCert, Leaf, LeafRequestKind},
    pki,
    provider::{BACKDATE, BuiltinProvider, CaProvider, RootRequest},
    remote::RemoteSigner,
    state::{self, CaState},
    verify::TrustBundle,
};
use crate::{
    identity::{Datacenter, ServiceName, TrustDomain},
    store::{Index, Store, View},
};

/// Most leaves one agent holds (one per local service plus whatever the leaf
/// endpoint was asked for). Bounds memory and renewal tasks.
pub const MAX_LEAVES: usize = 4096;
/// A leaf nobody watches and nobody asked for in this long is dropped (Consul's
/// agent cache: about 3 days).
pub const LEAF_IDLE_EXPIRY: Duration = Duration::from_secs(72 * 3600);
/// How often inactive roots are checked for pruning.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Inactive roots are kept this many leaf lifetimes after rotation (Consul: 2), so
/// every leaf they signed has expired before its root leaves the bundle.
pub const PRUNE_AFTER_LEAF_TTLS: u32 = 2;
/// A cross-signed root is valid at least this long (Consul: 7 days) ...
pub const CROSS_SIGN_MIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// ... and at least this many leaf lifetimes, so it outlives the prune delay.
pub const CROSS_SIGN_LEAF_TTLS: u32 = 3;
/// Attempts of a configuration change that loses check-and-set races.
const SET_CONFIG_ATTEMPTS: u32 = 5;
/// How long a client agent waits at startup for a server agent to create the CA.
pub const CLIENT_WAIT_FOR_CA: Duration = Duration::from_secs(30);

/// Whether this agent may hold the CA's keys.
#[derive(Debug, Clone)]
pub enum CaRole {
    /// Reads the roots' keys from the store (`secrets/`), creates the CA on first
    /// start, signs leaves itself and for client agents, rotates and prunes roots.
    Server,
    /// Never reads a key: reads the public CA records (the trust bundle) and has
    /// its leaves signed by a server agent ([`RemoteSigner`]).
    Client(RemoteSigner),
}

/// The leaf of one service as a live value: the receiver always holds the current
/// leaf, and `changed()` fires on each renewal.
#[derive(Debug)]
pub struct LeafWatch {
    pub rx: watch::Receiver<Arc<Leaf>>,
    /// Whether the leaf came from this agent's cache (Consul's `X-Cache: HIT`).
    pub cache_hit: bool,
}

/// The CA as one agent runs it. Dropping it stops its background tasks: the store
/// follower, the pruner and every leaf's renewal.
#[derive(Debug)]
pub struct CaManager {
    inner: Arc<Inner>,
    /// Keeps the snapshot equal to the store's `ca/` records, whichever agent
    /// wrote them.
    _view: View<Records>,
    _pruner: AbortOnDropHandle<()>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    provider: Arc<dyn CaProvider>,
    datacenter: Datacenter,
    role: CaRole,
    state: watch::Sender<Arc<CaState>>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Moves whenever the snapshot does (roots or configuration may have changed).
    changes: watch::Sender<Index>,
    /// Moves whenever any leaf is issued.
    leaf_changes: watch::Sender<Index>,
    leaf_index: AtomicU64,
    leaves: Mutex<HashMap<ServiceName, LeafEntry>>,
    /// JWT-SVIDs kept for reuse ([`jwts`]).
    jwts: Mutex<HashMap<jwts::JwtKey, Arc<super::jwt::JwtSvid>>>,
}

impl Drop for CaManager {
    fn drop(&mut self) {
        // The renewal tasks hold the inner state; they end here, not when it does.
        for entry in self.inner.lock_leaves().values() {
            entry.stop_renewing();
        }
    }
}

impl CaManager {
    /// Starts the built-in CA of `datacenter` on `store` in `role`: loads it, or
    /// creates it on first start (race-safe across agents sharing the store). A
    /// client agent waits for a server to create it.
    pub async fn start(
        datacenter: Datacenter,
        role: CaRole,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, Error> {
        Self::start_with_role(Arc::new(BuiltinProvider), datacenter, store, role).await
    }

    /// [`CaManager::start`] of a server agent with a chosen provider.
    pub async fn start_with(
        provider: Arc<dyn CaProvider>,
        datacenter: Datacenter,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, Error> {
        Self::start_with_role(provider, datacenter, store, CaRole::Server).await
    }

    /// [`CaManager::start`] with a chosen provider and role.
    pub async fn start_with_role(
        provider: Arc<dyn CaProvider>,
        datacenter: Datacenter,
        store: Arc<dyn Store>,
        role: CaRole,
    ) -> Result<Arc<Self>, Error> {
        let server = matches!(role, CaRole::Server);
        let state = match load(&*store, &*provider, server).await? {
            Some(s) => s,
            None if !server => wait_for_ca(&*store, &*provider).await?,
            None => {
                let cluster_id = uuid::Uuid::new_v4();
                let config = CaConfig::default();
                let root = provider.generate_root(&RootRequest {
                    trust_domain: &TrustDomain::for_cluster(&cluster_id),
                    cluster_id: &cluster_id,
                    ttl: config.root_cert_ttl,
                    key_type: config.key_type,
                    private_key: None,
                    now: OffsetDateTime::now_utc(),
                })?;
                let outcome = store
                    .txn(state::bootstrap_txn(cluster_id, &config, &root)?)
                    .await?;
                if outcome.is_committed() {
                    tracing::info!(
                        trust_domain = %TrustDomain::for_cluster(&cluster_id),
                        root_id = %pki::fingerprint(&root.cert_der),
                        "CA bootstrapped"
                    );
                }
                // Committed, or another agent won the race: either way read back
                // what the store now holds.
                load(&*store, &*provider, true)
                    .await?
                    .ok_or_else(|| Error::CorruptRecord {
                        key: state::CLUSTER_KEY.to_owned(),
                        reason: "missing right after the first-start transaction".to_owned(),
                    })?
            }
        };
        tracing::info!(
            trust_domain = %state.trust_domain,
            active_root = %state.active_root().id(),
            roots = state.roots.len(),
            server,
            "CA loaded"
        );
        let store_index = state.store_index;
        let (bundle, _) = watch::channel(state.bundle.clone());
        let (state_tx, _) = watch::channel(Arc::new(state));
        let (changes, _) = watch::channel(store_index);
        let (leaf_changes, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            store,
            provider,
            datacenter,
            role,
            state: state_tx,
            bundle,
            changes,
            leaf_changes,
            leaf_index: AtomicU64::new(0),
            leaves: Mutex::new(HashMap::new()),
            jwts: Mutex::new(HashMap::new()),
        });
        if server && let Err(error) = inner.ensure_jwt_key().await {
            // Not fatal: X.509 identities work without it, and the first
            // JWT-SVID request tries again.
            tracing::warn!(%error, "cannot make the JWT signing key of the active CA root");
        }
        let records = Records {
            inner: inner.clone(),
            records: Mutex::new(BTreeMap::new()),
        };
        let view = View::start(inner.store.clone(), state::PREFIX, records).await?;
        let pruner = AbortOnDropHandle::new(tokio::spawn(prune_periodically(inner.clone())));
        Ok(Arc::new(Self {
            inner,
            _view: view,
            _pruner: pruner,
        }))
    }

    /// The current snapshot.
    pub fn state(&self) -> Arc<CaState> {
        self.inner.state.borrow().clone()
    }

    /// The snapshot as a live value.
    pub fn watch_state(&self) -> watch::Receiver<Arc<CaState>> {
        self.inner.state.subscribe()
    }

    /// The trust bundle as a live value, for the proxies and [`super::tls`].
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle.subscribe()
    }

    /// Wakes blocking readers of the roots and configuration; the value is the
    /// store index of the latest snapshot.
    pub fn changes(&self) -> watch::Receiver<Index> {
        self.inner.changes.subscribe()
    }

    /// Wakes blocking readers of leaves; the value is the index of the latest leaf.
    pub fn leaf_changes(&self) -> watch::Receiver<Index> {
        self.inner.leaf_changes.subscribe()
    }

    /// Re-reads the CA from the store now (the background follower does this on
    /// every change; callers that just wrote use it to read their own write).
    pub async fn refresh(&self) -> Result<(), Error> {
        self.inner.reload().await
    }

    /// The leaf of `service`, issued now if this agent holds none (or its leaf
    /// expired or was signed by a root that is no longer active), then kept and
    /// renewed in the background while anyone uses it.
    pub async fn leaf(&self, service: &ServiceName) -> Result<LeafWatch, Error> {
        self.inner.leaf(service).await
    }

    /// A JWT-SVID of `service` for `audience`: `sub` is the service's SPIFFE ID,
    /// signed by the active root's JWT key (by a server agent on a client), and
    /// reused while more than half its lifetime (`JWTSVIDTTL`) is left.
    pub async fn jwt_svid(
        &self,
        service: &ServiceName,
        audience: &[String],
    ) -> Result<Arc<super::jwt::JwtSvid>, Error> {
        self.inner.jwt_svid(service, audience).await
    }

    /// Whether this agent holds the CA's keys (a server agent).
    pub fn is_server(&self) -> bool {
        matches!(self.inner.role, CaRole::Server)
    }

    /// Issues a one-off leaf for `service` with a new agent-generated key, without
    /// caching or renewing it (the holder renews by calling again). Server agents
    /// only.
    pub fn issue_leaf(&self, service: &ServiceName) -> Result<Arc<Leaf>, Error> {
        self.inner.issue_local(service)
    }

    /// Signs an externally supplied CSR (PEM `CERTIFICATE REQUEST` or DER). Only
    /// the key and the SPIFFE ID are taken from it; see [`leaf::screen_csr`].
    pub fn sign_csr(&self, csr: &[u8]) -> Result<IssuedCert, Error> {
        self.sign_csr_checked(csr, None)
    }

    /// [`CaManager::sign_csr`] that also requires the CSR's SPIFFE ID to name
    /// `service` (a server signing for a client agent checked `service`).
    pub fn sign_csr_for(&self, csr: &[u8], service: &ServiceName) -> Result<IssuedCert, Error> {
        self.sign_csr_checked(csr, Some(service))
    }

    fn sign_csr_checked(
        &self,
        csr: &[u8],
        service: Option<&ServiceName>,
    ) -> Result<IssuedCert, Error> {
        let der = match std::str::from_utf8(csr) {
            Ok(text) if text.contains("-----BEGIN") => {
                let block = pem::parse(text).map_err(|e| Error::Pem {
                    what: "certificate signing request",
                    reason: e.to_string(),
                })?;
                block.into_contents()
            }
            _ => csr.to_vec(),
        };
        let state = self.state();
        let screened = leaf::screen_csr(&der, &state.trust_domain, &self.inner.datacenter)
            .map_err(|refusal| Error::CsrRefused { refusal })?;
        if let Some(service) = service
            && screened.id.service != *service
        {
            return Err(Error::CsrServiceMismatch {
                csr: screened.id.service.to_string(),
                requested: service.to_string(),
            });
        }
        self.inner.sign(
            &state,
            &screened.id,
            &screened.spki_der,
            LeafRequestKind::Csr,
        )
    }

    /// Applies a new CA configuration. A change of CA key or key type creates a new
    /// root, cross-signed by the current one; the old root stays in the bundle until
    /// the leaves it signed have expired, and new leaves come from the new root.
    pub async fn set_config(&self, next: CaConfig) -> Result<(), Error> {
        if !self.is_server() {
            return Err(Error::NotServer {
                op: "change the CA configuration",
            });
        }
        for _ in 0..SET_CONFIG_ATTEMPTS {
            let current = load(&*self.inner.store, &*self.inner.provider, true)
                .await?
                .ok_or_else(|| Error::CorruptRecord {
                    key: state::CLUSTER_KEY.to_owned(),
                    reason: "missing after the CA started".to_owned(),
                })?;
            let txn = if current.config.needs_new_root(&next) {
                self.rotation(&current, &next)?
            } else {
                state::config_txn(&current, &next)?
            };
            if self.inner.store.txn(txn).await?.is_committed() {
                self.inner.reload().await?;
                return Ok(());
            }
            tracing::debug!("CA configuration changed concurrently, retrying");
        }
        Err(Error::Contended {
            attempts: SET_CONFIG_ATTEMPTS,
        })
    }

    fn rotation(&self, current: &CaState, next: &CaConfig) -> Result<crate::store::Txn, Error> {
        let now = OffsetDateTime::now_utc();
        let new_root = self.inner.provider.generate_root(&RootRequest {
            trust_domain: &current.trust_domain,
            cluster_id: &current.cluster_id,
            ttl: next.root_cert_ttl,
            key_type: next.key_type,
            private_key: next.private_key.as_ref(),
            now,
        })?;
        let old = current.active_root();
        if same_public_key(&old.cert_der, &new_root.cert_der) {
            // The "new" key is the one in use: nothing to rotate.
            return state::config_txn(current, next);
        }
        let cross_ttl = CROSS_SIGN_MIN_TTL.max(next.leaf_cert_ttl * CROSS_SIGN_LEAF_TTLS);
        let not_after = (now + cross_ttl).min(old.not_after);
        let cross = current
            .signer()
            .ok_or(Error::NotServer {
                op: "cross-sign a new root",
            })?
            .cross_sign(&new_root.cert_der, now - BACKDATE, not_after)?;
        tracing::info!(
            old_root = %old.id(),
            new_root = %pki::fingerprint(&new_root.cert_der),
            "rotating the CA root"
        );
        state::rotation_txn(current, next, &new_root, &cross, now)
    }

    /// Removes inactive roots whose leaves have all expired. Runs periodically in
    /// the background; public for tests and operators.
    pub async fn prune(&self, now: OffsetDateTime) -> Result<usize, Error> {
        self.inner.prune(now).await
    }
}

/// Reads the CA from the store, or `None` before first start; with the roots'
/// keys only on a `server`.
async fn load(
    store: &dyn Store,
    provider: &dyn CaProvider,
    server: bool,
) -> Result<Option<CaState>, Error> {
    let listing = store.list(state::PREFIX).await?;
    let keys = match server {
        true => Some(store.list(state::KEYS_PREFIX).await?),
        false => None,
    };
    CaState::load(&listing, keys.as_ref(), provider)
}

/// A client agent's start: waits (bounded) for a server agent to create the CA.
async fn wait_for_ca(store: &dyn Store, provider: &dyn CaProvider) -> Result<CaState, Error> {
    let started = Instant::now();
    tracing::info!("no CA in the store yet: waiting for a server agent to create it");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(state) = load(store, provider, false).await? {
            return Ok(state);
        }
        if started.elapsed() >= CLIENT_WAIT_FOR_CA {
            return Err(Error::NoCa {
                waited: started.elapsed(),
            });
        }
    }
}

fn same_public_key(a: &[u8], b: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match (X509Certificate::from_der(a), X509Certificate::from_der(b)) {
        (Ok((_, a)), Ok((_, b))) => a.public_key().raw == b.public_key().raw,
        _ => false,
    }
}

impl Inner {
    fn current(&self) -> Arc<CaState> {
        self.state.borrow().clone()
    }
}
