//! Following the store: the `ca/` records become the published snapshot, and
//! rotated-out roots are pruned.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{CaRole, Inner, PRUNE_AFTER_LEAF_TTLS, PRUNE_INTERVAL};
use crate::{
    ca::{
        Error,
        state::{self, CaState, Root},
    },
    store::{self, Event, Index, KeyValue, Listing, Projection},
};

impl Inner {
    /// Re-reads the store and publishes the snapshot if it is newer than the one
    /// published (two reloads racing never publish an older one).
    pub(super) async fn reload(&self) -> Result<(), Error> {
        let listing = self.store.list(state::PREFIX).await?;
        self.load(&listing).await.map(|_| ())
    }

    /// Builds the snapshot of `listing` (the `ca/` records; a server also reads
    /// the keys) and publishes it if it is newer than the one published. Returns
    /// whether it was.
    pub(super) async fn load(&self, listing: &Listing) -> Result<bool, Error> {
        let keys = match self.role {
            CaRole::Server => Some(self.store.list(state::KEYS_PREFIX).await?),
            CaRole::Client(_) => None,
        };
        let Some(next) = CaState::load(listing, keys.as_ref(), &*self.provider)? else {
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
        Ok(published)
    }

    pub(super) async fn prune(&self, now: OffsetDateTime) -> Result<usize, Error> {
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
}

/// The `ca/` records, followed by the CA's [`View`]: every change (by this agent or
/// another) becomes a new snapshot.
pub(super) struct Records {
    pub(super) inner: Arc<Inner>,
    pub(super) records: Mutex<BTreeMap<String, KeyValue>>,
}

impl Records {
    /// Loads and publishes the snapshot of the records as of `index`. A record the
    /// CA cannot read is logged and the published snapshot kept: the next change
    /// loads again.
    async fn publish(&self, index: Index) -> bool {
        let listing = Listing {
            items: self.lock().values().cloned().collect(),
            index,
        };
        match self.inner.load(&listing).await {
            Ok(published) => published,
            Err(error) => {
                tracing::error!(%error, index, "cannot load the CA from the store");
                false
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, KeyValue>> {
        self.records
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

#[async_trait]
impl Projection for Records {
    async fn reset(&self, listing: Listing) -> bool {
        *self.lock() = store::view::records_of(listing.items);
        self.publish(listing.index).await
    }

    async fn apply(&self, events: Vec<Event>, index: Index) {
        store::view::apply_to(&mut self.lock(), events);
        self.publish(index).await;
    }
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

/// Prunes rotated-out roots every [`PRUNE_INTERVAL`] (a server's job; see
/// [`Inner::prune`]).
pub(super) async fn prune_periodically(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    loop {
        tick.tick().await;
        if let Err(error) = inner.prune(OffsetDateTime::now_utc()).await {
            tracing::warn!(%error, "cannot prune old CA roots");
        }
    }
}
