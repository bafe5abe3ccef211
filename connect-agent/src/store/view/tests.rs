//! The follow policy, tested once for every projection: events, resyncs, watches
//! the store ends, and lists that fail.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use super::*;
use crate::store::{KeyValue, Txn, TxnOutcome, Watch, memory::MemStore};
use crate::test_support::eventually;

const PREFIX: &str = "t/";

/// Fast retries, so that the tests run in milliseconds.
const FAST: Policy = Policy {
    retry_min: Duration::from_millis(5),
    retry_max: Duration::from_millis(20),
    max_batch: 256,
};

/// A projection that mirrors keys to values and counts its calls.
#[derive(Debug, Default)]
struct Mirror {
    keys: Mutex<BTreeMap<String, Vec<u8>>>,
    resets: AtomicUsize,
}

impl Mirror {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.keys.lock().expect("lock").get(key).cloned()
    }
}

#[async_trait]
impl Projection for Mirror {
    async fn reset(&self, listing: Listing) -> bool {
        self.resets.fetch_add(1, Ordering::SeqCst);
        let fresh: BTreeMap<_, _> = listing
            .items
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        let mut keys = self.keys.lock().expect("lock");
        let changed = *keys != fresh;
        *keys = fresh;
        changed
    }

    async fn apply(&self, events: Vec<Event>, _index: Index) {
        let mut keys = self.keys.lock().expect("lock");
        for event in events {
            match event {
                Event::Put(kv) => {
                    keys.insert(kv.key, kv.value);
                }
                Event::Delete { key, .. } => {
                    keys.remove(&key);
                }
            }
        }
    }
}

/// What [`Flaky`] does to the watches it handed out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cut {
    /// Ends them, as a lost etcd stream does.
    End,
    /// Sends a resync and ends them, as a lagging etcd watch does.
    Resync,
}

/// A [`MemStore`] whose watches the test can end, and whose lists and watches the
/// test can make fail.
#[derive(Debug)]
pub(crate) struct Flaky {
    pub(crate) inner: MemStore,
    pub(crate) cut: broadcast::Sender<Cut>,
    failing_lists: AtomicUsize,
    failing_watches: AtomicUsize,
    lists: AtomicUsize,
}

impl Flaky {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemStore::new(),
            cut: broadcast::channel(4).0,
            failing_lists: AtomicUsize::new(0),
            failing_watches: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
        })
    }

    fn unavailable() -> Error {
        Error::Unavailable {
            reason: "test says so".into(),
        }
    }

    /// Takes one failure from `counter`, if any are left.
    fn fail(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait]
impl Store for Flaky {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, Error> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        if Self::fail(&self.failing_lists) {
            return Err(Self::unavailable());
        }
        self.inner.list(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, Error> {
        self.inner.txn(txn).await
    }

    fn index(&self) -> Index {
        self.inner.index()
    }

    async fn watch(&self, prefix: &str, after: Index) -> Result<Watch, Error> {
        if Self::fail(&self.failing_watches) {
            return Err(Self::unavailable());
        }
        let mut inner = self.inner.watch(prefix, after).await?;
        let mut cut = self.cut.subscribe();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = inner.next() => {
                        let Some(message) = message else { return };
                        if tx.send(message).await.is_err() {
                            return;
                        }
                    }
                    how = cut.recv() => {
                        if let Ok(Cut::Resync) = how {
                            let _ = tx.send(WatchMessage::Resync).await;
                        }
                        return;
                    }
                }
            }
        });
        Ok(Watch { rx })
    }
}

async fn put(store: &Flaky, key: &str, value: &str) -> Index {
    store
        .inner
        .put(key, value.as_bytes().to_vec())
        .await
        .expect("put")
}

/// Waits until the view reflects `index` and returns the projection's value of `key`.
async fn at(view: &View<Mirror>, index: Index, key: &str) -> Option<Vec<u8>> {
    let mut changes = view.subscribe();
    tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|i| *i >= index))
        .await
        .unwrap_or_else(|_| panic!("the view did not reach index {index}: at {}", view.index()))
        .expect("the view's follower stopped");
    view.get().get(key)
}

#[tokio::test]
async fn starts_from_a_listing_and_applies_events() {
    let store = Flaky::new();
    put(&store, "t/a", "1").await;
    put(&store, "other/x", "no").await;
    let view = View::start_with(store.clone(), PREFIX, Mirror::default(), FAST)
        .await
        .expect("start");
    assert_eq!(view.get().get("t/a").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        view.get().get("other/x"),
        None,
        "only the prefix is followed"
    );
    let index = put(&store, "t/b", "2").await;
    assert_eq!(at(&view, index, "t/b").await.as_deref(), Some(&b"2"[..]));
    let index = store.inner.delete("t/a").await.expect("delete");
    assert_eq!(at(&view, index, "t/a").await, None);
    assert_eq!(
        view.get().resets.load(Ordering::SeqCst),
        1,
        "no re-list without cause"
    );
}

#[tokio::test]
async fn a_first_list_that_fails_is_an_error() {
    let store = Flaky::new();
    store.failing_lists.store(1, Ordering::SeqCst);
    let err = View::start_with(store, PREFIX, Mirror::default(), FAST)
        .await
        .expect_err("cannot start without a listing");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
}

/// The bug this view replaced: a follower that gave up for good when the store ended
/// its watch, leaving the cache frozen while the store moved on.
#[tokio::test]
async fn a_watch_the_store_ends_is_re_listed_and_followed_again() {
    let store = Flaky::new();
    let view = View::start_with(store.clone(), PREFIX, Mirror::default(), FAST)
        .await
        .expect("start");
    for round in 0..3 {
        store.cut.send(Cut::End).expect("the follower watches");
        let key = format!("t/{round}");
        let index = put(&store, &key, "v").await;
        assert_eq!(
            at(&view, index, &key).await.as_deref(),
            Some(&b"v"[..]),
            "round {round}"
        );
        // Wait until the follower watches again before cutting the next watch.
        eventually("the follower watches again", || {
            store.cut.receiver_count() > 0
        })
        .await;
    }
    assert!(view.get().resets.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn a_resync_re_lists() {
    let store = Flaky::new();
    let view = View::start_with(store.clone(), PREFIX, Mirror::default(), FAST)
        .await
        .expect("start");
    let lists = store.lists.load(Ordering::SeqCst);
    store.cut.send(Cut::Resync).expect("the follower watches");
    let index = put(&store, "t/after", "v").await;
    assert_eq!(
        at(&view, index, "t/after").await.as_deref(),
        Some(&b"v"[..])
    );
    assert!(
        store.lists.load(Ordering::SeqCst) > lists,
        "a resync re-lists"
    );
}

#[tokio::test]
async fn failing_lists_and_watches_are_retried_until_the_store_answers() {
    let store = Flaky::new();
    let view = View::start_with(store.clone(), PREFIX, Mirror::default(), FAST)
        .await
        .expect("start");
    store.failing_lists.store(3, Ordering::SeqCst);
    store.failing_watches.store(3, Ordering::SeqCst);
    store.cut.send(Cut::End).expect("the follower watches");
    eventually("every failing list and watch was retried", || {
        store.failing_lists.load(Ordering::SeqCst) == 0
            && store.failing_watches.load(Ordering::SeqCst) == 0
    })
    .await;
    // Followed again: a write after the failures arrives through the new watch.
    let index = put(&store, "t/late", "v").await;
    assert_eq!(at(&view, index, "t/late").await.as_deref(), Some(&b"v"[..]));
}

#[tokio::test]
async fn a_re_list_that_changes_nothing_moves_the_index_without_waking_readers() {
    let store = Flaky::new();
    put(&store, "t/a", "1").await;
    let view = View::start_with(store.clone(), PREFIX, Mirror::default(), FAST)
        .await
        .expect("start");
    let mut changes = view.subscribe();
    changes.borrow_and_update();
    // A write outside the prefix raises the store's index only.
    let index = put(&store, "other/x", "1").await;
    store.cut.send(Cut::Resync).expect("the follower watches");
    eventually("the re-list's index is published", || view.index() >= index).await;
    assert!(
        !changes.has_changed().expect("open"),
        "nothing changed, nobody woken"
    );
}
