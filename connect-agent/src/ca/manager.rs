//! The running CA of one agent ([`CaManager`]): bootstraps or loads the CA from the
//! store, follows the store so that a rotation made by any agent reaches this one,
//! publishes the snapshot and trust bundle on `watch` channels, issues and caches
//! one leaf per service, renews each in a background task, rotates roots and prunes
//! old ones.
//!
//! Readers (API handlers, proxies) take `Arc` snapshots from the watches: no lock is
//! held across an `.await`, and the handshake path does no I/O. Background tasks stop
//! when the manager is dropped or [`CaManager::shutdown`] is called.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    CaConfig, Error,
    leaf::{self, IssuedCert, Leaf, LeafRequestKind},
    pki,
    provider::{BACKDATE, BuiltinProvider, CaProvider, LeafRequest, RootRequest},
    remote::RemoteSigner,
    state::{self, CaState, Root},
    verify::TrustBundle,
};
use crate::{
    config::Config,
    identity::{Datacenter, ServiceName, SpiffeId, TrustDomain},
    store::{Index, Store, WatchMessage},
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
/// Longest wait between retries of a failing renewal or store watch.
const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);
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

/// The CA as one agent runs it. Dropping it stops its background tasks.
#[derive(Debug)]
pub struct CaManager {
    inner: Arc<Inner>,
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
    stop: CancellationToken,
}

#[derive(Debug)]
struct LeafEntry {
    tx: watch::Sender<Arc<Leaf>>,
    last_used: Instant,
    task: AbortHandle,
}

impl Drop for CaManager {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl CaManager {
    /// Starts the built-in CA for `config`'s datacenter on `store`: loads it, or
    /// creates it on first start (race-safe across agents sharing the store).
    /// A client agent (`config.server` false) waits for a server to create it.
    pub async fn start(config: &Config, store: Arc<dyn Store>) -> Result<Arc<Self>, Error> {
        let role = if config.server {
            CaRole::Server
        } else {
            CaRole::Client(RemoteSigner::new(
                &config.server_addrs,
                config.node_name.clone(),
                config.agent_token.as_ref().map(|t| t.0.clone()),
            ))
        };
        Self::start_with_role(
            Arc::new(BuiltinProvider),
            config.datacenter.clone(),
            store,
            role,
        )
        .await
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
            stop: CancellationToken::new(),
        });
        tokio::spawn(follow(inner.clone()));
        Ok(Arc::new(Self { inner }))
    }

    /// Stops the background tasks (also done on drop). Leaves already handed out
    /// stay valid until they expire.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
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
        self.inner.reload().await.map(|_| ())
    }

    /// The leaf of `service`, issued now if this agent holds none (or its leaf
    /// expired or was signed by a root that is no longer active), then kept and
    /// renewed in the background while anyone uses it.
    pub async fn leaf(&self, service: &ServiceName) -> Result<LeafWatch, Error> {
        self.inner.leaf(service).await
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

    /// Re-reads the store and publishes the snapshot if it is newer than the one
    /// published (two reloads racing never publish an older one).
    async fn reload(&self) -> Result<Index, Error> {
        let listing = self.store.list(state::PREFIX).await?;
        let index = listing.index;
        let keys = match self.role {
            CaRole::Server => Some(self.store.list(state::KEYS_PREFIX).await?),
            CaRole::Client(_) => None,
        };
        let Some(next) = CaState::load(&listing, keys.as_ref(), &*self.provider)? else {
            return Err(Error::CorruptRecord {
                key: state::CLUSTER_KEY.to_owned(),
                reason: "it disappeared from the store".to_owned(),
            });
        };
        let next = Arc::new(next);
        let published = self.state.send_if_modified(|cur| {
            if next.store_index > cur.store_index {
                *cur = next.clone();
                true
            } else {
                false
            }
        });
        if published {
            self.bundle.send_if_modified(|b| {
                if next.bundle.index() > b.index() {
                    *b = next.bundle.clone();
                    true
                } else {
                    false
                }
            });
            self.changes.send_replace(next.store_index);
        }
        Ok(index)
    }

    async fn prune(&self, now: OffsetDateTime) -> Result<usize, Error> {
        if !matches!(self.role, CaRole::Server) {
            // Pruning deletes keys: the servers' job.
            return Ok(0);
        }
        let current = self.current();
        let keep_for = current.config.leaf_cert_ttl * PRUNE_AFTER_LEAF_TTLS;
        let dead: Vec<&Root> = current
            .roots
            .iter()
            .filter(|r| !r.active() && r.rotated_out_at.is_some_and(|t| t + keep_for < now))
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let count = dead.len();
        let outcome = self.store.txn(state::prune_txn(&current, &dead)?).await?;
        if outcome.is_committed() {
            for r in &dead {
                tracing::info!(root_id = %r.id(), "pruned a rotated-out CA root");
            }
            self.reload().await?;
            Ok(count)
        } else {
            // Another agent pruned or rotated first; the follower will catch up.
            Ok(0)
        }
    }

    fn next_leaf_index(&self) -> Index {
        let floor = self.store.index();
        let mut cur = self.leaf_index.load(Ordering::SeqCst);
        loop {
            let next = (cur + 1).max(floor);
            match self
                .leaf_index
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Signs a leaf for `id` over `spki_der` with the active root of `state`.
    fn sign(
        &self,
        state: &CaState,
        id: &SpiffeId,
        spki_der: &[u8],
        kind: LeafRequestKind,
    ) -> Result<IssuedCert, Error> {
        let now = OffsetDateTime::now_utc();
        let serial = pki::random_serial();
        let not_before = now - BACKDATE;
        let not_after = not_before + state.config.leaf_cert_ttl;
        let signer = state
            .signer()
            .ok_or(Error::NotServer { op: "sign a leaf" })?;
        let der = signer.sign_leaf(&LeafRequest {
            id,
            spki_der,
            serial: &serial,
            not_before,
            not_after,
        })?;
        let mut chain = vec![der];
        chain.extend(
            state
                .active_intermediates(now)
                .into_iter()
                .map(|i| i.der.clone()),
        );
        let cert_pem = chain
            .iter()
            .map(|c| pki::pem_encode("CERTIFICATE", c))
            .collect::<String>();
        let issued = IssuedCert {
            service: id.service.clone(),
            spiffe_id: id.clone(),
            serial: serial.to_vec(),
            chain,
            cert_pem,
            valid_after: not_before,
            valid_before: not_after,
            root_id: state.active_root().id().to_owned(),
            index: self.next_leaf_index(),
        };
        tracing::debug!(
            service = %id.service,
            serial = %issued.serial_hex(),
            kind = ?kind,
            "leaf issued"
        );
        Ok(issued)
    }

    /// A new leaf with a fresh agent-generated P-256 key: signed here on a server
    /// agent, by a server agent on a client agent (the key never leaves this one).
    async fn issue(&self, service: &ServiceName) -> Result<Arc<Leaf>, Error> {
        let CaRole::Client(remote) = &self.role else {
            return self.issue_local(service);
        };
        let state = self.current();
        let key = new_leaf_key()?;
        let id = SpiffeId::service(
            state.trust_domain.clone(),
            self.datacenter.clone(),
            service.clone(),
        );
        let mut cert = remote.sign(&state, &id, &key).await?;
        cert.index = self.next_leaf_index();
        tracing::debug!(service = %id.service, serial = %cert.serial_hex(), "leaf signed by a server agent");
        Ok(Arc::new(Leaf::new(cert, key.serialize_der())?))
    }

    /// [`Inner::issue`] with this agent's own signer (server agents).
    fn issue_local(&self, service: &ServiceName) -> Result<Arc<Leaf>, Error> {
        let state = self.current();
        let key = new_leaf_key()?;
        let id = SpiffeId::service(
            state.trust_domain.clone(),
            self.datacenter.clone(),
            service.clone(),
        );
        let cert = self.sign(
            &state,
            &id,
            &key.subject_public_key_info(),
            LeafRequestKind::AgentKey,
        )?;
        Ok(Arc::new(Leaf::new(cert, key.serialize_der())?))
    }

    fn lock_leaves(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceName, LeafEntry>> {
        // The map holds plain values updated in single statements; a panic while
        // holding the lock cannot leave it half-changed.
        self.leaves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `leaf` may still be handed out as is.
    fn is_fresh(&self, leaf: &Leaf, state: &CaState, now: OffsetDateTime) -> bool {
        leaf.cert.valid_before > now && leaf.cert.root_id == state.active_root().id()
    }

    async fn leaf(self: &Arc<Self>, service: &ServiceName) -> Result<LeafWatch, Error> {
        let now = OffsetDateTime::now_utc();
        let state = self.current();
        // Fast path: a cached, still valid leaf.
        let cached = {
            let mut leaves = self.lock_leaves();
            leaves.get_mut(service).map(|e| {
                e.last_used = Instant::now();
                (e.tx.subscribe(), e.tx.clone())
            })
        };
        if let Some((rx, tx)) = cached {
            let current = rx.borrow().clone();
            if self.is_fresh(&current, &state, now) {
                return Ok(LeafWatch {
                    rx,
                    cache_hit: true,
                });
            }
            // Expired or signed by a root that is no longer active: replace it now
            // rather than hand it out (Consul re-validates on non-blocking reads).
            let fresh = self.issue(service).await?;
            let index = fresh.cert.index;
            tx.send_replace(fresh);
            self.leaf_changes.send_replace(index);
            return Ok(LeafWatch {
                rx,
                cache_hit: false,
            });
        }

        let fresh = self.issue(service).await?;
        let index = fresh.cert.index;
        let mut leaves = self.lock_leaves();
        if let Some(e) = leaves.get_mut(service) {
            // Another request issued one meanwhile: keep theirs, drop ours.
            e.last_used = Instant::now();
            return Ok(LeafWatch {
                rx: e.tx.subscribe(),
                cache_hit: true,
            });
        }
        if leaves.len() >= MAX_LEAVES {
            evict_one(&mut leaves)?;
        }
        let (tx, rx) = watch::channel(fresh);
        let task = tokio::spawn(renew(self.clone(), service.clone(), tx.clone()));
        leaves.insert(
            service.clone(),
            LeafEntry {
                tx,
                last_used: Instant::now(),
                task: task.abort_handle(),
            },
        );
        drop(leaves);
        self.leaf_changes.send_replace(index);
        Ok(LeafWatch {
            rx,
            cache_hit: false,
        })
    }

    /// Drops `service`'s entry if nobody watches it and nobody asked for it lately.
    /// Returns whether it was dropped.
    fn drop_if_idle(&self, service: &ServiceName, tx: &watch::Sender<Arc<Leaf>>) -> bool {
        let mut leaves = self.lock_leaves();
        let idle = leaves.get(service).is_some_and(|e| {
            e.tx.same_channel(tx)
                && e.tx.receiver_count() == 0
                && e.last_used.elapsed() >= LEAF_IDLE_EXPIRY
        });
        if idle {
            leaves.remove(service);
            tracing::debug!(service = %service, "idle leaf dropped");
        }
        idle
    }
}

/// A fresh P-256 key for a leaf.
fn new_leaf_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Crypto {
        op: "generate a leaf key",
        source,
    })
}

/// Makes room for one leaf: drops the least recently used one that nobody watches.
fn evict_one(leaves: &mut HashMap<ServiceName, LeafEntry>) -> Result<(), Error> {
    let victim = leaves
        .iter()
        .filter(|(_, e)| e.tx.receiver_count() == 0)
        .min_by_key(|(_, e)| e.last_used)
        .map(|(k, _)| k.clone());
    match victim {
        Some(k) => {
            if let Some(e) = leaves.remove(&k) {
                e.task.abort();
                tracing::debug!(service = %k, "leaf evicted to make room");
            }
            Ok(())
        }
        None => Err(Error::TooManyLeaves { max: MAX_LEAVES }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The renewal point of the leaf's lifetime was reached.
    Due,
    /// The active root changed away from the leaf's signer.
    RootChanged,
}

/// Keeps one service's leaf fresh: renews at a random 60–90 % of its lifetime, and
/// within a random 30 s after the active root changes. Ends when the manager stops
/// or the leaf has been idle for [`LEAF_IDLE_EXPIRY`].
async fn renew(inner: Arc<Inner>, service: ServiceName, tx: watch::Sender<Arc<Leaf>>) {
    let mut state_rx = inner.state.subscribe();
    let mut failures: u32 = 0;
    // The renewal point is drawn once per leaf (keyed by serial): waking up for an
    // unrelated CA change must not draw again, which would skew renewals early.
    let mut planned: (Vec<u8>, f64) = (Vec::new(), leaf::renewal_fraction());
    loop {
        let leaf = tx.borrow().clone();
        if planned.0 != leaf.cert.serial {
            planned = (leaf.cert.serial.clone(), leaf::renewal_fraction());
        }
        let wait = if failures > 0 {
            backoff(failures)
        } else {
            leaf::renewal_delay(
                leaf.cert.valid_after,
                leaf.cert.valid_before,
                OffsetDateTime::now_utc(),
                planned.1,
            )
        };
        let wake = tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => Wake::Due,
            changed = state_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                if state_rx.borrow_and_update().active_root().id() == leaf.cert.root_id {
                    continue;
                }
                Wake::RootChanged
            }
        };
        if wake == Wake::RootChanged {
            let jitter = leaf::ROOT_CHANGE_WINDOW.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = tokio::time::sleep(jitter) => {}
            }
        }
        if inner.drop_if_idle(&service, &tx) {
            return;
        }
        let current = tx.borrow().clone();
        if current.cert.serial != leaf.cert.serial {
            // Someone (a read of an expired or stale leaf) already replaced it.
            failures = 0;
            continue;
        }
        if wake == Wake::RootChanged && inner.current().active_root().id() == current.cert.root_id {
            continue;
        }
        match inner.issue(&service).await {
            Ok(fresh) => {
                failures = 0;
                let index = fresh.cert.index;
                tracing::info!(
                    service = %service,
                    serial = %fresh.cert.serial_hex(),
                    reason = ?wake,
                    "leaf renewed"
                );
                tx.send_replace(fresh);
                inner.leaf_changes.send_replace(index);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(service = %service, error = %e, failures, "leaf renewal failed");
            }
        }
    }
}

/// Follows the store under `ca/`: every change (by this agent or another) becomes a
/// new snapshot; a lagging watch re-lists. Also prunes old roots periodically.
async fn follow(inner: Arc<Inner>) {
    let mut failures: u32 = 0;
    let mut prune_tick = tokio::time::interval(PRUNE_INTERVAL);
    let mut after = inner.current().store_index;
    'watch: loop {
        let watch = tokio::select! {
            _ = inner.stop.cancelled() => return,
            w = inner.store.watch(state::PREFIX, after) => w,
        };
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "cannot watch the CA records, retrying");
                tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff(failures)) => continue 'watch,
                }
            }
        };
        loop {
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = prune_tick.tick() => {
                    if let Err(e) = inner.prune(OffsetDateTime::now_utc()).await {
                        tracing::warn!(error = %e, "cannot prune old CA roots");
                    }
                }
                msg = watch.next() => {
                    let resync = !matches!(msg, Some(WatchMessage::Events(_)));
                    match inner.reload().await {
                        Ok(index) => {
                            failures = 0;
                            after = after.max(index);
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            tracing::error!(error = %e, "cannot reload the CA from the store");
                        }
                    }
                    if msg.is_none() {
                        // The store shut down: back off before watching again.
                        failures = failures.saturating_add(1);
                        tokio::select! {
                            _ = inner.stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff(failures)) => {}
                        }
                    }
                    if resync {
                        continue 'watch;
                    }
                }
            }
        }
    }
}

/// Exponential backoff from 1 s, capped at [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(9).saturating_sub(1)).min(MAX_BACKOFF)
}
