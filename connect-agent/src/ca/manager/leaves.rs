//! The leaf cache: one leaf per service, issued on first use and renewed in a
//! background task while anyone uses it.

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering, time::Duration};

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use tokio::{sync::watch, task::AbortHandle, time::Instant};

use super::{CaRole, Inner, LEAF_IDLE_EXPIRY, LeafWatch, MAX_LEAVES};
use crate::{
    ca::{
        Error,
        leaf::{self, IssuedCert, Leaf, LeafRequestKind},
        pki,
        provider::{BACKDATE, LeafRequest},
        state::CaState,
    },
    identity::{ServiceName, SpiffeId},
    store::{Index, backoff::Backoff},
};

/// First wait before retrying a failed renewal ...
const RETRY_MIN: Duration = Duration::from_secs(1);
/// ... doubled per failure up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);

#[derive(Debug)]
pub(super) struct LeafEntry {
    tx: watch::Sender<Arc<Leaf>>,
    last_used: Instant,
    task: AbortHandle,
}

impl LeafEntry {
    /// Stops the leaf's renewal (the manager is going away).
    pub(super) fn stop_renewing(&self) {
        self.task.abort();
    }
}

impl Inner {
    pub(super) fn next_leaf_index(&self) -> Index {
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
    pub(super) fn sign(
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
    pub(super) async fn issue(&self, service: &ServiceName) -> Result<Arc<Leaf>, Error> {
        let CaRole::Client(remote) = &self.role else {
            return self.issue_local(service);
        };
        let state = self.current();
        let key = new_leaf_key()?;
        let id = self.leaf_id(&state, service);
        let mut cert = remote.sign(&state, &id, &key).await?;
        cert.index = self.next_leaf_index();
        tracing::debug!(service = %id.service, serial = %cert.serial_hex(), "leaf signed by a server agent");
        Ok(Arc::new(Leaf::new(cert, key.serialize_der())?))
    }

    /// The SPIFFE ID of `service`'s leaf in this datacenter and `state`'s trust domain.
    pub(super) fn leaf_id(&self, state: &CaState, service: &ServiceName) -> SpiffeId {
        SpiffeId::service(
            state.trust_domain.clone(),
            self.datacenter.clone(),
            service.clone(),
        )
    }

    /// [`Inner::issue`] with this agent's own signer (server agents).
    pub(super) fn issue_local(&self, service: &ServiceName) -> Result<Arc<Leaf>, Error> {
        let state = self.current();
        let key = new_leaf_key()?;
        let id = self.leaf_id(&state, service);
        let cert = self.sign(
            &state,
            &id,
            &key.subject_public_key_info(),
            LeafRequestKind::AgentKey,
        )?;
        Ok(Arc::new(Leaf::new(cert, key.serialize_der())?))
    }

    pub(super) fn lock_leaves(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceName, LeafEntry>> {
        // The map holds plain values updated in single statements; a panic while
        // holding the lock cannot leave it half-changed.
        self.leaves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `leaf` may still be handed out as is.
    pub(super) fn is_fresh(&self, leaf: &Leaf, state: &CaState, now: OffsetDateTime) -> bool {
        leaf.cert.valid_before > now && leaf.cert.root_id == state.active_root().id()
    }

    pub(super) async fn leaf(self: &Arc<Self>, service: &ServiceName) -> Result<LeafWatch, Error> {
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
    pub(super) fn drop_if_idle(
        &self,
        service: &ServiceName,
        tx: &watch::Sender<Arc<Leaf>>,
    ) -> bool {
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
    let mut retry = Backoff::new(RETRY_MIN, MAX_BACKOFF);
    // Drawn once per failure, so that waking up for an unrelated CA change does not
    // escalate the backoff.
    let mut retry_wait: Option<Duration> = None;
    // The renewal point is drawn once per leaf (keyed by serial): waking up for an
    // unrelated CA change must not draw again, which would skew renewals early.
    let mut planned: (Vec<u8>, f64) = (Vec::new(), leaf::renewal_fraction());
    loop {
        let leaf = tx.borrow().clone();
        if planned.0 != leaf.cert.serial {
            planned = (leaf.cert.serial.clone(), leaf::renewal_fraction());
        }
        let wait = retry_wait.unwrap_or_else(|| {
            leaf::renewal_delay(
                leaf.cert.valid_after,
                leaf.cert.valid_before,
                OffsetDateTime::now_utc(),
                planned.1,
            )
        });
        let wake = tokio::select! {
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
            tokio::time::sleep(jitter).await;
        }
        if inner.drop_if_idle(&service, &tx) {
            return;
        }
        let current = tx.borrow().clone();
        if current.cert.serial != leaf.cert.serial {
            // Someone (a read of an expired or stale leaf) already replaced it.
            failures = 0;
            retry_wait = None;
            retry.reset();
            continue;
        }
        if wake == Wake::RootChanged && inner.current().active_root().id() == current.cert.root_id {
            continue;
        }
        match inner.issue(&service).await {
            Ok(fresh) => {
                failures = 0;
                retry_wait = None;
                retry.reset();
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
                let wait = retry.next_wait();
                retry_wait = Some(wait);
                tracing::warn!(service = %service, error = %e, failures, retry_in = ?wait, "leaf renewal failed");
            }
        }
    }
}
