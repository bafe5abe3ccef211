//! One behavioural test suite that every [`Store`] backend must pass, so that the
//! in-memory, embedded and etcd stores agree on every detail the rest of the agent
//! relies on: indexes, compare-and-set, atomic in-order transactions, watches.
//!
//! [`run`] panics (it is test code) at the first difference. Each case works under its
//! own key prefix and checks indexes relative to [`Store::index`] at its start, so
//! the suite runs against any store as long as nothing else writes to it meanwhile.
//! Backend-specific behaviour (durability across restarts, etcd compaction and
//! reconnection) is tested next to each backend, not here.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    Compare, Event, Index, KeyValue, Store, Txn, TxnOutcome, Watch, WatchMessage,
    memory::WATCH_BUFFER,
};

/// How long a watch may take to deliver. Generous: etcd on a loaded 2-core machine.
const WATCH_WAIT: Duration = Duration::from_secs(20);

/// Runs every case against `store`.
pub async fn run(store: Arc<dyn Store>) {
    let s = store.as_ref();
    put_get_list_delete(s, "conformance/basic/").await;
    listing_is_ordered_and_bounded_by_its_prefix(s, "conformance/order/").await;
    large_listings_are_complete_and_consistent(s, "conformance/large/").await;
    compare_and_set(s, "conformance/cas/").await;
    failed_transactions_write_nothing(s, "conformance/failed/").await;
    transactions_are_atomic_and_see_their_own_writes(s, "conformance/atomic/").await;
    watch_sees_changes_under_its_prefix_only(s, "conformance/watch/").await;
    watch_groups_one_transaction(s, "conformance/watchtxn/").await;
    watch_from_the_past_replays_or_resyncs(s, "conformance/past/").await;
    a_slow_watcher_is_told_to_resync(s, "conformance/slow/").await;
}

async fn put_get_list_delete(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    let base = s.index();
    assert_eq!(put(s, &k("a/1"), b"x").await, base + 1);
    assert_eq!(put(s, &k("a/2"), b"y").await, base + 2);
    assert_eq!(put(s, &k("b/1"), b"z").await, base + 3);
    let l = s.list(&k("a/")).await.expect("list");
    assert_eq!(keys(&l.items), [k("a/1"), k("a/2")]);
    assert_eq!(l.index, base + 3);
    assert_eq!(put(s, &k("a/1"), b"x2").await, base + 4);
    let kv = s.get(&k("a/1")).await.expect("get").expect("present");
    assert_eq!(
        kv,
        KeyValue {
            key: k("a/1"),
            value: b"x2".to_vec(),
            create_index: base + 1,
            mod_index: base + 4
        }
    );
    assert_eq!(s.delete(&k("a/1")).await.expect("delete"), base + 5);
    // Deleting a missing key changes nothing and keeps the index.
    assert_eq!(s.delete(&k("a/1")).await.expect("delete"), base + 5);
    assert!(s.get(&k("a/1")).await.expect("get").is_none());
    assert!(s.get(&k("never")).await.expect("get").is_none());
    assert_eq!(s.index(), base + 5);
}

async fn listing_is_ordered_and_bounded_by_its_prefix(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    // Values are opaque bytes, including ones that are not UTF-8, and empty ones.
    let binary: &[u8] = &[0, 0xff, 0xfe, b'\n', 0];
    for (name, value) in [
        ("ab", &b"1"[..]),
        ("a/x", binary),
        ("a0", b""),
        ("a", b"4"),
        ("a/b", b"5"),
    ] {
        put(s, &k(name), value).await;
    }
    let l = s.list(&k("a/")).await.expect("list");
    assert_eq!(keys(&l.items), [k("a/b"), k("a/x")]);
    assert_eq!(l.items[1].value, binary);
    let l = s.list(&k("a")).await.expect("list");
    assert_eq!(
        keys(&l.items),
        [k("a"), k("a/b"), k("a/x"), k("a0"), k("ab")]
    );
    assert_eq!(l.items[3].value, b"");
    assert!(s.list(&k("none/")).await.expect("list").items.is_empty());
}

/// More keys than one etcd response page holds (256), written in transactions of
/// fewer operations than etcd allows in one (128).
async fn large_listings_are_complete_and_consistent(s: &dyn Store, ns: &str) {
    const KEYS: usize = 600;
    const PER_TXN: usize = 100;
    let base = s.index();
    for chunk in 0..KEYS / PER_TXN {
        let mut txn = Txn::new();
        for i in chunk * PER_TXN..(chunk + 1) * PER_TXN {
            txn = txn.put(format!("{ns}{i:04}"), i.to_string().into_bytes());
        }
        assert!(s.txn(txn).await.expect("txn").is_committed());
    }
    let l = s.list(ns).await.expect("list");
    assert_eq!(l.index, base + (KEYS / PER_TXN) as Index);
    let expected: Vec<String> = (0..KEYS).map(|i| format!("{ns}{i:04}")).collect();
    assert_eq!(keys(&l.items), expected);
    assert!(
        l.items
            .iter()
            .enumerate()
            .all(|(i, kv)| kv.value == i.to_string().into_bytes())
    );
}

async fn compare_and_set(s: &dyn Store, ns: &str) {
    let key = format!("{ns}k");
    let create = Txn::new()
        .when(Compare::Absent(key.clone()))
        .put(key.clone(), b"1".to_vec());
    let base = s.index();
    assert_eq!(
        s.txn(create.clone()).await.expect("txn"),
        TxnOutcome::Committed { index: base + 1 }
    );
    assert_eq!(
        s.txn(create).await.expect("txn"),
        TxnOutcome::Failed { index: base + 1 }
    );
    let cas = |i: Index| {
        Txn::new()
            .when(Compare::ModIndex(key.clone(), i))
            .put(key.clone(), b"2".to_vec())
    };
    // Index 0 is no key's modify index, present or absent.
    for wrong in [base + 7, 0, Index::MAX] {
        assert!(
            !s.txn(cas(wrong)).await.expect("txn").is_committed(),
            "cas at {wrong}"
        );
    }
    assert!(
        !s.txn(
            Txn::new()
                .when(Compare::ModIndex(format!("{ns}missing"), 0))
                .put(format!("{ns}missing"), b"x".to_vec())
        )
        .await
        .expect("txn")
        .is_committed(),
        "ModIndex(0) on a missing key must not hold"
    );
    assert_eq!(
        s.txn(cas(base + 1)).await.expect("txn"),
        TxnOutcome::Committed { index: base + 2 }
    );
    assert_eq!(
        s.get(&key).await.expect("get").map(|kv| kv.value),
        Some(b"2".to_vec())
    );
    assert!(s.get(&format!("{ns}missing")).await.expect("get").is_none());
}

async fn failed_transactions_write_nothing(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    put(s, &k("guard"), b"g").await;
    put(s, &k("keep"), b"old").await;
    let base = s.index();
    let out = s
        .txn(
            Txn::new()
                .when(Compare::Absent(k("other")))
                .when(Compare::Absent(k("guard")))
                .put(k("keep"), b"new".to_vec())
                .put(k("new"), b"1".to_vec())
                .delete_prefix(ns),
        )
        .await
        .expect("txn");
    assert_eq!(out, TxnOutcome::Failed { index: base });
    let l = s.list(ns).await.expect("list");
    assert_eq!(keys(&l.items), [k("guard"), k("keep")]);
    assert_eq!(l.items[1].value, b"old");
    assert_eq!(s.index(), base);
}

async fn transactions_are_atomic_and_see_their_own_writes(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    put(s, &k("p/a"), b"1").await;
    put(s, &k("q/a"), b"1").await;
    put(s, &k("p"), b"1").await;
    let base = s.index();
    let out = s
        .txn(
            Txn::new()
                .put(k("p/b"), b"2".to_vec())
                .delete_prefix(k("p/"))
                .put(k("p/c"), b"3".to_vec())
                .put(k("p/c"), b"4".to_vec()),
        )
        .await
        .expect("txn");
    assert_eq!(out, TxnOutcome::Committed { index: base + 1 });
    let l = s.list(ns).await.expect("list");
    assert_eq!(keys(&l.items), [k("p"), k("p/c"), k("q/a")]);
    assert_eq!(l.items[1].value, b"4");
    assert_eq!(l.items[1].mod_index, base + 1);

    // A transaction that changes nothing commits without raising the index: deleting
    // missing keys, or creating and deleting a key in one go.
    let noop = Txn::new()
        .delete(k("missing"))
        .delete_prefix(k("nothing/"))
        .put(k("tmp"), b"x".to_vec())
        .delete(k("tmp"));
    assert_eq!(
        s.txn(noop).await.expect("txn"),
        TxnOutcome::Committed { index: base + 1 }
    );
    assert!(s.get(&k("tmp")).await.expect("get").is_none());

    // Delete everything under the namespace except what is put afterwards.
    let out = s
        .txn(
            Txn::new()
                .delete_prefix(ns)
                .put(k("p/c"), b"5".to_vec())
                .put(k("z"), b"6".to_vec()),
        )
        .await
        .expect("txn");
    assert_eq!(out, TxnOutcome::Committed { index: base + 2 });
    let l = s.list(ns).await.expect("list");
    assert_eq!(keys(&l.items), [k("p/c"), k("z")]);
    assert_eq!(l.items[0].value, b"5");
}

async fn watch_sees_changes_under_its_prefix_only(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    let base = s.index();
    let mut w = s.watch(&k("svc/"), base).await.expect("watch");
    put(s, &k("other/x"), b"1").await;
    put(s, &k("svc"), b"1").await;
    put(s, &k("svc/web"), b"w").await;
    s.delete(&k("svc/web")).await.expect("delete");
    assert_eq!(
        next_events(&mut w).await,
        [Event::Put(KeyValue {
            key: k("svc/web"),
            value: b"w".to_vec(),
            create_index: base + 3,
            mod_index: base + 3,
        })]
    );
    assert_eq!(
        next_events(&mut w).await,
        [Event::Delete {
            key: k("svc/web"),
            index: base + 4
        }]
    );
    assert!(w.rx.try_recv().is_err(), "nothing else under the prefix");
}

async fn watch_groups_one_transaction(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    put(s, &k("w/old"), b"o").await;
    let base = s.index();
    let mut w = s.watch(&k("w/"), base).await.expect("watch");
    s.txn(
        Txn::new()
            .put(k("w/z"), b"1".to_vec())
            .put(k("w/a"), b"2".to_vec())
            .delete(k("w/old"))
            .put(k("elsewhere"), b"3".to_vec()),
    )
    .await
    .expect("txn");
    let evs = next_events(&mut w).await;
    // One message per transaction, in key order, all at the transaction's index.
    let summary: Vec<(String, Index, bool)> = evs
        .iter()
        .map(|e| (e.key().to_owned(), e.index(), matches!(e, Event::Put(_))))
        .collect();
    assert_eq!(
        summary,
        [
            (k("w/a"), base + 1, true),
            (k("w/old"), base + 1, false),
            (k("w/z"), base + 1, true),
        ]
    );
}

async fn watch_from_the_past_replays_or_resyncs(s: &dyn Store, ns: &str) {
    let k = |name: &str| format!("{ns}{name}");
    let base = s.index();
    put(s, &k("svc/web"), b"1").await;
    put(s, &k("svc/db"), b"2").await;
    // A backend without history resyncs; one with history replays exactly what
    // followed `base`.
    let mut w = s.watch(&k("svc/"), base).await.expect("watch");
    match next_message(&mut w).await {
        WatchMessage::Resync => {}
        WatchMessage::Events(first) => {
            assert_eq!(keys_of(&first), [k("svc/web")]);
            assert_eq!(first[0].index(), base + 1);
            let second = next_events(&mut w).await;
            assert_eq!(keys_of(&second), [k("svc/db")]);
            assert_eq!(second[0].index(), base + 2);
        }
    }
    // From the current index nothing is missed, so no resync.
    let mut w = s.watch(&k("svc/"), s.index()).await.expect("watch");
    let at = put(s, &k("svc/api"), b"3").await;
    let evs = next_events(&mut w).await;
    assert_eq!(keys_of(&evs), [k("svc/api")]);
    assert_eq!(evs[0].index(), at);
}

async fn a_slow_watcher_is_told_to_resync(s: &dyn Store, ns: &str) {
    let mut w = s.watch(ns, s.index()).await.expect("watch");
    for i in 0..(WATCH_BUFFER + 10) {
        put(s, &format!("{ns}{i}"), b"").await;
    }
    // The backend may deliver asynchronously: wait until the buffer holds everything
    // it can (the events plus the resync in the slot kept for it).
    let deadline = Instant::now() + WATCH_WAIT;
    while w.rx.len() < WATCH_BUFFER + 1 {
        assert!(
            Instant::now() < deadline,
            "the watch buffered only {} messages",
            w.rx.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last = None;
    let mut count = 0;
    while let Ok(m) = w.rx.try_recv() {
        last = Some(m);
        count += 1;
    }
    assert_eq!(count, WATCH_BUFFER + 1);
    assert_eq!(last, Some(WatchMessage::Resync));
    // Nothing follows a resync: the stream ends.
    let end = tokio::time::timeout(WATCH_WAIT, w.next()).await;
    assert_eq!(end.ok(), Some(None), "the watch must end after a resync");
}

async fn put(s: &dyn Store, key: &str, value: &[u8]) -> Index {
    s.put(key, value.to_vec()).await.expect("put")
}

fn keys(items: &[KeyValue]) -> Vec<String> {
    items.iter().map(|kv| kv.key.clone()).collect()
}

fn keys_of(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.key().to_owned()).collect()
}

async fn next_message(w: &mut Watch) -> WatchMessage {
    match tokio::time::timeout(WATCH_WAIT, w.next()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch message within {WATCH_WAIT:?}"),
    }
}

async fn next_events(w: &mut Watch) -> Vec<Event> {
    match next_message(w).await {
        WatchMessage::Events(evs) => evs,
        WatchMessage::Resync => panic!("unexpected resync"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;

    #[tokio::test]
    async fn mem_store_conforms() {
        run(Arc::new(MemStore::new())).await;
    }
}
