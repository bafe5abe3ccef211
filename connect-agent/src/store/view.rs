//! One follower of the store for every in-memory cache of it.
//!
//! The request paths read intentions, ACLs, the catalog and virtual IPs from memory;
//! each of those keeps a [`Projection`] of one key prefix, and a [`View`] keeps the
//! projection equal to the store: it lists the prefix, watches from the listing's
//! index, hands batches of events to [`Projection::apply`], re-lists on
//! [`WatchMessage::Resync`] or when the store ends the watch (a lost etcd stream, a
//! leader change), and retries failed lists and watches with one backoff policy. The
//! projection owns only what its records mean; how to follow is written once, here.
//!
//! The view publishes the index its projection reflects: [`View::subscribe`] wakes
//! after each batch is applied (blocking queries and live-connection re-checks use
//! it), and a re-list that changed nothing moves the index without waking anyone.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::{Error, Event, Index, KeyValue, Listing, Store, Watch, WatchMessage, backoff::Backoff};

/// What a [`View`] keeps equal to one prefix of the store. The methods take `&self`:
/// the projection guards its own state (a lock readers take briefly, a `watch` of
/// snapshots), so that the hot path reads it without going through the view.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Replaces everything the projection holds with a full listing of the prefix:
    /// at start, after a resync, and after the store ended a watch. Returns whether
    /// anything a reader can see changed (only then are subscribers woken).
    async fn reset(&self, listing: Listing) -> bool;

    /// Applies the events of one or more transactions, in index order. `index` is
    /// the last event's index.
    async fn apply(&self, events: Vec<Event>, index: Index);
}

/// The records of a listing by key, for projections that rebuild a snapshot from
/// the raw records (ACL, catalog).
pub fn records_of(items: Vec<KeyValue>) -> BTreeMap<String, KeyValue> {
    items.into_iter().map(|kv| (kv.key.clone(), kv)).collect()
}

/// Applies `events` to records kept by key, as [`records_of`] built them.
pub fn apply_to(records: &mut BTreeMap<String, KeyValue>, events: Vec<Event>) {
    for event in events {
        match event {
            Event::Put(kv) => {
                records.insert(kv.key.clone(), kv);
            }
            Event::Delete { key, .. } => {
                records.remove(&key);
            }
        }
    }
}

/// How a [`View`] follows. One policy for every view; tests shorten it.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The first wait after a failed list or watch, or a watch the store ended.
    pub retry_min: Duration,
    /// The longest wait: doubled per consecutive failure up to this.
    pub retry_max: Duration,
    /// Watch messages handed to one [`Projection::apply`], so that a burst of changes
    /// publishes once; bounded so that the projection's lock is never held long.
    pub max_batch: usize,
}

impl Policy {
    /// 100 ms doubling to 10 s: quick after a blip, gentle on a store that is down
    /// (every agent of a cluster re-lists when etcd comes back; the jitter of
    /// [`Backoff`](super::backoff::Backoff) spreads them).
    pub const DEFAULT: Policy = Policy {
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(10),
        max_batch: 256,
    };
}

impl Default for Policy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A projection that follows the store. Dropping the view stops the follower; the
/// projection stays readable (and frozen) through other `Arc`s to it.
pub struct View<P> {
    projection: Arc<P>,
    index: watch::Receiver<Index>,
    _follower: AbortOnDropHandle<()>,
}

impl<P: Projection> View<P> {
    /// Lists `prefix`, resets `projection` with the listing and follows the store
    /// from its index with [`Policy::DEFAULT`]. Fails if that first listing (or the
    /// first watch) fails: an agent must not serve from a cache it could never fill.
    pub async fn start(store: Arc<dyn Store>, prefix: &str, projection: P) -> Result<Self, Error> {
        Self::start_with(store, prefix, projection, Policy::DEFAULT).await
    }

    /// [`View::start`] with another policy.
    pub async fn start_with(
        store: Arc<dyn Store>,
        prefix: &str,
        projection: P,
        policy: Policy,
    ) -> Result<Self, Error> {
        let listing = store.list(prefix).await?;
        let index = listing.index;
        let projection = Arc::new(projection);
        projection.reset(listing).await;
        // Watch before returning, so that no write after the listing is missed and a
        // store without history (the in-memory one) does not force a needless resync.
        let first = store.watch(prefix, index).await?;
        let (tx, rx) = watch::channel(index);
        let follower = Follower {
            store,
            prefix: prefix.to_owned(),
            projection: projection.clone(),
            index: tx,
            policy,
            backoff: Backoff::new(policy.retry_min, policy.retry_max),
        };
        Ok(Self {
            projection,
            index: rx,
            _follower: AbortOnDropHandle::new(tokio::spawn(follower.run(first, index))),
        })
    }

    /// The projection.
    pub fn get(&self) -> &Arc<P> {
        &self.projection
    }

    /// The store index the projection reflects.
    pub fn index(&self) -> Index {
        *self.index.borrow()
    }

    /// Changes after every applied batch (the value is the new index).
    pub fn subscribe(&self) -> watch::Receiver<Index> {
        self.index.clone()
    }
}

impl<P> std::fmt::Debug for View<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("index", &*self.index.borrow())
            .finish_non_exhaustive()
    }
}

/// Why a watch stopped delivering.
enum Lost {
    /// The store asked for a re-list.
    Resync,
    /// The store ended the watch.
    Ended,
}

struct Follower<P> {
    store: Arc<dyn Store>,
    prefix: String,
    projection: Arc<P>,
    index: watch::Sender<Index>,
    policy: Policy,
    backoff: Backoff,
}

impl<P: Projection> Follower<P> {
    /// Watch, apply, re-list; forever (until the view is dropped). A store that is
    /// down is retried, never given up on: it may be an etcd cluster between leaders.
    async fn run(mut self, first: Watch, mut after: Index) {
        let mut first = Some(first);
        loop {
            let next = match first.take() {
                Some(w) => Ok(w),
                None => self.store.watch(&self.prefix, after).await,
            };
            let watch = match next {
                Ok(w) => w,
                Err(error) => {
                    let wait = self.backoff.next_wait();
                    tracing::warn!(prefix = %self.prefix, %error, retry_in = ?wait, "cannot watch the store");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            match self.follow(watch, &mut after).await {
                Lost::Resync => {
                    tracing::info!(prefix = %self.prefix, "watch fell behind; re-reading");
                }
                Lost::Ended => {
                    // Back off, so that a store which keeps ending watches is not
                    // hammered with re-lists.
                    let wait = self.backoff.next_wait();
                    tracing::warn!(prefix = %self.prefix, retry_in = ?wait, "the store ended the watch; re-reading");
                    tokio::time::sleep(wait).await;
                }
            }
            after = self.relist().await;
        }
    }

    /// Applies the watch's events in batches until it ends or asks for a resync.
    async fn follow(&mut self, mut watch: Watch, after: &mut Index) -> Lost {
        loop {
            let Some(first) = watch.next().await else {
                return Lost::Ended;
            };
            let mut events = Vec::new();
            let mut resync = false;
            let mut taken = 0;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    WatchMessage::Events(batch) => events.extend(batch),
                    WatchMessage::Resync => {
                        resync = true;
                        break;
                    }
                }
                taken += 1;
                if taken < self.policy.max_batch {
                    next = watch.rx.try_recv().ok();
                }
            }
            // Events before a resync are real changes: apply them, then re-list.
            if let Some(index) = events.iter().map(Event::index).max() {
                self.projection.apply(events, index).await;
                *after = (*after).max(index);
                self.index.send_replace(*after);
                self.backoff.reset();
            }
            if resync {
                return Lost::Resync;
            }
        }
    }

    /// Lists the prefix until that works, resets the projection, and returns the
    /// listing's index.
    async fn relist(&mut self) -> Index {
        loop {
            match self.store.list(&self.prefix).await {
                Ok(listing) => {
                    let index = listing.index;
                    let changed = self.projection.reset(listing).await;
                    self.index.send_if_modified(|i| {
                        *i = index;
                        changed
                    });
                    return index;
                }
                Err(error) => {
                    let wait = self.backoff.next_wait();
                    tracing::warn!(prefix = %self.prefix, %error, retry_in = ?wait, "cannot re-read the store");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
