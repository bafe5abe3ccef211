//! The in-memory state machine of a store: the key space, the index and the watch
//! fan-out. [`MemStore`] is a store with no durability (tests, doubles); durable
//! backends apply the same [`State::apply`] after their own commit, so both agree on
//! every semantic detail.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    Compare, Error, Event, Index, KeyValue, Listing, Op, Store, Txn, TxnOutcome, Watch,
    WatchMessage,
};

/// Messages a watch may buffer before its consumer is told to resync.
pub const WATCH_BUFFER: usize = 1024;

/// Key space, index and watchers. Not async: callers hold the lock only briefly.
#[derive(Debug, Default)]
pub struct State {
    data: BTreeMap<String, KeyValue>,
    index: Index,
    watchers: Vec<Watcher>,
}

#[derive(Debug)]
struct Watcher {
    prefix: String,
    tx: mpsc::Sender<WatchMessage>,
}

/// What a transaction would do, computed without changing anything, so a durable
/// backend can write it first and only then apply it in memory.
#[derive(Debug)]
pub struct Plan {
    pub outcome: TxnOutcome,
    /// The resulting events, each with its final indexes; empty if nothing changes.
    pub events: Vec<Event>,
}

impl State {
    /// A state loaded from a backend's durable copy.
    pub fn from_parts(data: BTreeMap<String, KeyValue>, index: Index) -> Self {
        Self {
            data,
            index,
            watchers: Vec::new(),
        }
    }

    pub fn index(&self) -> Index {
        self.index
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.data.get(key).cloned()
    }

    pub fn list(&self, prefix: &str) -> Listing {
        let items = self
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Listing {
            items,
            index: self.index,
        }
    }

    /// Works out what `txn` does at the current state.
    pub fn plan(&self, txn: &Txn) -> Plan {
        let holds = txn.compare.iter().all(|c| match c {
            Compare::Absent(k) => !self.data.contains_key(k),
            Compare::ModIndex(k, i) => self.data.get(k).is_some_and(|kv| kv.mod_index == *i),
        });
        if !holds {
            return Plan {
                outcome: TxnOutcome::Failed { index: self.index },
                events: Vec::new(),
            };
        }
        let next = self.index + 1;
        // Later operations see earlier ones of the same transaction.
        let mut view: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
        let lookup = |view: &BTreeMap<String, Option<KeyValue>>, k: &str| -> Option<KeyValue> {
            match view.get(k) {
                Some(v) => v.clone(),
                None => self.data.get(k).cloned(),
            }
        };
        for op in &txn.ops {
            match op {
                Op::Put { key, value } => {
                    let create_index = lookup(&view, key).map_or(next, |kv| kv.create_index);
                    view.insert(
                        key.clone(),
                        Some(KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_index,
                            mod_index: next,
                        }),
                    );
                }
                Op::Delete { key } => {
                    if lookup(&view, key).is_some() {
                        view.insert(key.clone(), None);
                    }
                }
                Op::DeletePrefix { prefix } => {
                    let existing: Vec<String> = self
                        .data
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                        .map(|(k, _)| k.clone())
                        .chain(
                            view.keys()
                                .filter(|k| k.starts_with(prefix.as_str()))
                                .cloned(),
                        )
                        .collect();
                    for k in existing {
                        if lookup(&view, &k).is_some() {
                            view.insert(k, None);
                        }
                    }
                }
            }
        }
        let events: Vec<Event> = view
            .into_iter()
            .filter_map(|(key, v)| match v {
                Some(kv) => Some(Event::Put(kv)),
                None if self.data.contains_key(&key) => Some(Event::Delete { key, index: next }),
                // Created and deleted within the transaction: no change.
                None => None,
            })
            .collect();
        let index = if events.is_empty() { self.index } else { next };
        Plan {
            outcome: TxnOutcome::Committed { index },
            events,
        }
    }

    /// Applies a plan made by [`State::plan`] on this same state and tells watchers.
    pub fn apply(&mut self, plan: &Plan) {
        if plan.events.is_empty() {
            return;
        }
        for ev in &plan.events {
            match ev {
                Event::Put(kv) => {
                    self.data.insert(kv.key.clone(), kv.clone());
                }
                Event::Delete { key, .. } => {
                    self.data.remove(key);
                }
            }
        }
        self.index = plan.outcome.index();
        self.watchers.retain(|w| {
            let mine: Vec<Event> = plan
                .events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            // One slot is kept for the Resync, so a consumer that falls behind is
            // always told so rather than finding its stream silently ended.
            if w.tx.capacity() <= 1 {
                let _ = w.tx.try_send(WatchMessage::Resync);
                return false;
            }
            w.tx.try_send(WatchMessage::Events(mine)).is_ok()
        });
    }

    /// A watch of `prefix` from `after`. No history is kept in memory, so a watch
    /// from before the current index starts with a resync: the consumer re-lists,
    /// which is always correct, and watches again from the listing's index.
    pub fn watch(&mut self, prefix: &str, after: Index) -> Watch {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER + 1);
        if after < self.index {
            let _ = tx.try_send(WatchMessage::Resync);
            return Watch { rx };
        }
        self.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Watch { rx }
    }
}

/// A [`Store`] that keeps everything in memory. Not durable: for tests and doubles.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves `State` consistent (apply only
        // mutates after planning), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        Ok(self.lock().get(key))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, Error> {
        Ok(self.lock().list(prefix))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, Error> {
        let mut st = self.lock();
        let plan = st.plan(&txn);
        st.apply(&plan);
        Ok(plan.outcome)
    }

    fn index(&self) -> Index {
        self.lock().index()
    }

    async fn watch(&self, prefix: &str, after: Index) -> Result<Watch, Error> {
        Ok(self.lock().watch(prefix, after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let s = MemStore::new();
        assert_eq!(s.put("a/1", b"x".to_vec()).await.ok(), Some(1));
        assert_eq!(s.put("a/2", b"y".to_vec()).await.ok(), Some(2));
        assert_eq!(s.put("b/1", b"z".to_vec()).await.ok(), Some(3));
        let l = s.list("a/").await.expect("list");
        assert_eq!(l.items.len(), 2);
        assert_eq!(l.index, 3);
        assert_eq!(s.put("a/1", b"x2".to_vec()).await.ok(), Some(4));
        let kv = s.get("a/1").await.expect("get").expect("present");
        assert_eq!((kv.create_index, kv.mod_index), (1, 4));
        assert_eq!(s.delete("a/1").await.ok(), Some(5));
        // Deleting a missing key changes nothing and keeps the index.
        assert_eq!(s.delete("a/1").await.ok(), Some(5));
        assert!(s.get("a/1").await.expect("get").is_none());
    }

    #[tokio::test]
    async fn compare_and_set() {
        let s = MemStore::new();
        let t = Txn::new()
            .when(Compare::Absent("k".into()))
            .put("k", b"1".to_vec());
        assert!(s.txn(t.clone()).await.expect("txn").is_committed());
        assert!(!s.txn(t).await.expect("txn").is_committed());
        let cas = |i| {
            Txn::new()
                .when(Compare::ModIndex("k".into(), i))
                .put("k", b"2".to_vec())
        };
        assert!(!s.txn(cas(7)).await.expect("txn").is_committed());
        assert!(s.txn(cas(1)).await.expect("txn").is_committed());
        assert_eq!(
            s.get("k").await.expect("get").map(|kv| kv.value),
            Some(b"2".to_vec())
        );
    }

    #[tokio::test]
    async fn transactions_are_atomic_and_see_their_own_writes() {
        let s = MemStore::new();
        s.put("p/a", b"1".to_vec()).await.expect("put");
        let out = s
            .txn(
                Txn::new()
                    .put("p/b", b"2".to_vec())
                    .delete_prefix("p/")
                    .put("p/c", b"3".to_vec()),
            )
            .await
            .expect("txn");
        assert_eq!(out, TxnOutcome::Committed { index: 2 });
        let keys: Vec<String> = s
            .list("p/")
            .await
            .expect("list")
            .items
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, vec!["p/c".to_owned()]);
    }

    #[tokio::test]
    async fn watch_sees_changes_under_its_prefix_only() {
        let s = MemStore::new();
        let mut w = s.watch("svc/", 0).await.expect("watch");
        s.put("other/x", b"1".to_vec()).await.expect("put");
        s.put("svc/web", b"1".to_vec()).await.expect("put");
        s.delete("svc/web").await.expect("delete");
        match w.next().await {
            Some(WatchMessage::Events(evs)) => {
                assert_eq!(evs.len(), 1);
                assert_eq!(evs[0].key(), "svc/web");
                assert_eq!(evs[0].index(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        match w.next().await {
            Some(WatchMessage::Events(evs)) => {
                assert_eq!(
                    evs,
                    vec![Event::Delete {
                        key: "svc/web".into(),
                        index: 3
                    }]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn watch_from_the_past_resyncs() {
        let s = MemStore::new();
        s.put("svc/web", b"1".to_vec()).await.expect("put");
        let mut w = s.watch("svc/", 0).await.expect("watch");
        assert_eq!(w.next().await, Some(WatchMessage::Resync));
        // From the current index nothing is missed, so no resync.
        let mut w = s.watch("svc/", s.index()).await.expect("watch");
        s.put("svc/db", b"1".to_vec()).await.expect("put");
        assert!(matches!(w.next().await, Some(WatchMessage::Events(_))));
    }

    #[tokio::test]
    async fn a_slow_watcher_is_told_to_resync() {
        let s = MemStore::new();
        let mut w = s.watch("k/", 0).await.expect("watch");
        for i in 0..(WATCH_BUFFER + 10) {
            s.put(&format!("k/{i}"), vec![]).await.expect("put");
        }
        let mut last = None;
        while let Ok(m) = w.rx.try_recv() {
            last = Some(m);
        }
        assert_eq!(last, Some(WatchMessage::Resync));
    }
}
