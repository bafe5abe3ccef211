//! The etcd store against real etcd processes: the shared store conformance suite,
//! plus what only a networked store has: revisions shared with other writers,
//! compaction, restarts, member failures, and an etcd that is down.
//!
//! Needs Debian's `etcd-server` (the `etcd` binary on PATH); fails saying so if it is
//! missing.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use connect_agent::store::{
    Compare, Event, Store, Txn, TxnOutcome, WatchMessage, conformance,
    etcd::{EtcdOptions, EtcdStore},
};
use connect_tests::etcd::{EtcdCluster, unused_port};
use tokio::{sync::mpsc::error::TryRecvError, time::Instant};

const WAIT: Duration = Duration::from_secs(20);

fn opts() -> EtcdOptions {
    EtcdOptions {
        request_timeout: Duration::from_secs(2),
        ..EtcdOptions::default()
    }
}

async fn connect(endpoints: &[String]) -> anyhow::Result<EtcdStore> {
    EtcdStore::connect(endpoints, opts())
        .await
        .context("connect the etcd store")
}

async fn next(w: &mut connect_agent::store::Watch) -> WatchMessage {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch message within {WAIT:?}"),
    }
}

async fn next_events(w: &mut connect_agent::store::Watch) -> Vec<Event> {
    match next(w).await {
        WatchMessage::Events(evs) => evs,
        WatchMessage::Resync => panic!("unexpected resync"),
    }
}

fn summary(events: &[Event]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|e| (e.key().to_owned(), e.index()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let store = connect(&etcd.endpoints()).await?;
    conformance::run(Arc::new(store)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_is_the_etcd_revision_and_keys_stay_under_the_root() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let store = connect(&etcd.endpoints()).await?;
    assert_eq!(store.index(), etcd.revision().await? as u64);

    let at = store.put("svc/web", b"1".to_vec()).await?;
    assert_eq!(at, etcd.revision().await? as u64);
    assert_eq!(store.index(), at);

    // Others share the etcd: their writes raise the revision too, and the store's
    // index follows as soon as it talks to etcd again.
    let mut raw = etcd.client().await?;
    raw.put("/elsewhere/x", "1", None).await?;
    raw.put("/connect-other/x", "1", None).await?;
    let listing = store.list("").await?;
    let keys: Vec<&str> = listing.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["svc/web"], "only keys under the root are ours");
    assert_eq!(listing.index, etcd.revision().await? as u64);
    assert_eq!(store.index(), listing.index);

    // The key is stored under the default root.
    let raw_kv = raw.get("/connect/svc/web", None).await?;
    assert_eq!(raw_kv.kvs().len(), 1);
    assert_eq!(raw_kv.kvs()[0].mod_revision() as u64, at);

    // Another root is another key space on the same etcd.
    let other = EtcdStore::connect(
        &etcd.endpoints(),
        EtcdOptions {
            root: "/tenant-b/".into(),
            ..opts()
        },
    )
    .await?;
    assert!(other.get("svc/web").await?.is_none());
    other.put("svc/web", b"b".to_vec()).await?;
    assert_eq!(
        store.get("svc/web").await?.map(|kv| kv.value),
        Some(b"1".to_vec())
    );

    // A watch raises the index when it sees others' writes.
    let mut w = store.watch("svc/", store.index()).await?;
    let at = other_writer(&etcd)
        .await?
        .put("svc/db", b"2".to_vec())
        .await?;
    assert_eq!(summary(&next_events(&mut w).await), [("svc/db".into(), at)]);
    assert!(store.index() >= at);

    // Dropping the store ends its watches: consumers see the stream close.
    drop(store);
    assert_eq!(tokio::time::timeout(WAIT, w.next()).await?, None);
    Ok(())
}

async fn other_writer(etcd: &EtcdCluster) -> anyhow::Result<EtcdStore> {
    connect(&etcd.endpoints()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_compacted_history_resyncs() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let store = connect(&etcd.endpoints()).await?;
    let base = store.index();
    let mut live = store.watch("k/", base).await?;
    for i in 0..3 {
        store.put(&format!("k/{i}"), vec![]).await?;
    }
    // The live watch has delivered everything up to the compaction point.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(summary(&next_events(&mut live).await));
    }
    let current = store.index();
    etcd.compact(current as i64).await?;

    // The history after `base` is gone: the consumer must re-list.
    let mut w = store.watch("k/", base).await?;
    assert_eq!(next(&mut w).await, WatchMessage::Resync);
    let end = tokio::time::timeout(WAIT, w.next()).await?;
    assert_eq!(end, None, "nothing follows a resync");

    // From the compaction point on, nothing is missing: a plain watch.
    let mut w = store.watch("k/", current).await?;
    let at = store.put("k/after", vec![]).await?;
    assert_eq!(
        summary(&next_events(&mut w).await),
        [("k/after".into(), at)]
    );

    // A watch that was already past the compacted revisions is not disturbed.
    while seen.len() < 4 {
        seen.extend(summary(&next_events(&mut live).await));
    }
    assert_eq!(
        seen,
        [
            ("k/0".into(), base + 1),
            ("k/1".into(), base + 2),
            ("k/2".into(), base + 3),
            ("k/after".into(), at),
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_replays_history_larger_than_one_message() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let store = connect(&etcd.endpoints()).await?;
    let base = store.index();
    // Six 1 MiB values: each write is below etcd's 1.5 MiB request limit, the
    // replay is more than one gRPC message may carry (4 MiB by default), so etcd
    // sends it in fragments that the store must join.
    let mut expected = Vec::new();
    for i in 0..6u8 {
        let value = vec![i; 1024 * 1024];
        let at = store.put(&format!("big/{i}"), value).await?;
        expected.push((format!("big/{i}"), at));
    }
    let mut w = store.watch("big/", base).await?;
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        for e in next_events(&mut w).await {
            let Event::Put(kv) = &e else {
                panic!("unexpected {e:?}")
            };
            let i = seen.len() as u8;
            assert!(kv.value.len() == 1024 * 1024 && kv.value.iter().all(|b| *b == i));
            seen.push((e.key().to_owned(), e.index()));
        }
    }
    assert_eq!(seen, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_survives_an_etcd_restart_without_losing_events() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    let store = connect(&etcd.endpoints()).await?;
    let mut w = store.watch("svc/", store.index()).await?;
    let a = store.put("svc/a", b"1".to_vec()).await?;
    assert_eq!(summary(&next_events(&mut w).await), [("svc/a".into(), a)]);

    etcd.stop_member(0)?;
    // While etcd is down, requests fail in bounded time, saying the store is
    // unavailable; nothing hangs.
    let started = Instant::now();
    let err = store
        .get("svc/a")
        .await
        .expect_err("a read with etcd down must fail");
    assert!(
        matches!(err, connect_agent::store::Error::Unavailable { .. }),
        "unexpected error {err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = store
        .put("svc/b", vec![])
        .await
        .expect_err("a write with etcd down must fail");
    assert!(
        matches!(err, connect_agent::store::Error::Unavailable { .. }),
        "unexpected error {err:?}"
    );
    // The watch stays open and quiet, so its consumer keeps what it has and keeps
    // serving from it; the index stays where it was.
    assert_eq!(w.rx.try_recv(), Err(TryRecvError::Empty));
    assert_eq!(store.index(), a);

    etcd.start_member(0).await?;
    // Another agent writes as soon as etcd is back, likely before this watch has
    // reconnected: it must still see the write, from where it stopped.
    let writer = other_writer(&etcd).await?;
    let b = writer.put("svc/b", b"2".to_vec()).await?;
    writer.put("other/x", b"x".to_vec()).await?;
    let c = writer.delete("svc/a").await?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(summary(&next_events(&mut w).await));
    }
    assert_eq!(seen, [("svc/b".into(), b), ("svc/a".into(), c)]);
    // And the store itself works again.
    let d = store.put("svc/d", vec![]).await?;
    assert_eq!(summary(&next_events(&mut w).await), [("svc/d".into(), d)]);
    assert_eq!(store.index(), d);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_keep_serving_when_one_stops() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let store = connect(&etcd.endpoints()).await?;
    let mut w = store.watch("k/", store.index()).await?;
    let mut unknown = 0;
    let deadline = Instant::now() + WAIT;
    let mut expected = vec![(
        "k/f0".to_owned(),
        create(&store, "k/f0", &mut unknown, deadline).await?,
    )];

    // A follower stops: the leader stays, so writes go on. Only a write that races
    // the crash on the dead member's connection may end unknown (etcd cannot say
    // whether it applied); the client then finds out by its create-if-absent.
    let leader = etcd.leader().await?;
    let follower = (leader + 1) % 3;
    etcd.stop_member(follower)?;
    for i in 1..6 {
        let key = format!("k/f{i}");
        expected.push((
            key.clone(),
            create(&store, &key, &mut unknown, deadline).await?,
        ));
    }
    assert!(unknown <= 2, "{unknown} writes failed with a follower down");
    etcd.start_member(follower).await?;

    // The leader stops: writes fail during the election, and once a new leader is
    // elected they succeed again.
    etcd.stop_member(leader)?;
    let new_leader = etcd.leader().await?;
    assert_ne!(new_leader, leader);
    let deadline = Instant::now() + WAIT;
    expected.push((
        "k/l0".to_owned(),
        create(&store, "k/l0", &mut unknown, deadline).await?,
    ));
    unknown = 0;
    for i in 1..6 {
        let key = format!("k/l{i}");
        expected.push((
            key.clone(),
            create(&store, &key, &mut unknown, deadline).await?,
        ));
    }
    assert!(unknown <= 2, "{unknown} writes failed after the election");
    let listing = store.list("k/").await?;
    assert_eq!(listing.items.len(), 12);
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        seen.extend(summary(&next_events(&mut w).await));
    }
    assert_eq!(seen, expected);

    // A node that talks to one surviving member only sees the same state.
    let survivor = (0..3).find(|i| *i != leader).unwrap_or_default();
    let other = connect(&[etcd.endpoint(survivor)]).await?;
    assert_eq!(other.list("k/").await?.items, listing.items);

    // Without a quorum, writes fail in bounded time instead of hanging...
    let second = (0..3)
        .find(|i| *i != leader && *i != survivor)
        .unwrap_or_default();
    etcd.stop_member(second)?;
    let started = Instant::now();
    let err = store
        .txn(Txn::new().put("k/lost", vec![]))
        .await
        .expect_err("a write without quorum must fail");
    assert!(
        matches!(err, connect_agent::store::Error::Unavailable { .. }),
        "unexpected error {err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // ...and succeed again once it is back. (Whether "k/lost" was applied after all
    // is etcd's business: a proposal that timed out may still commit.)
    etcd.start_member(second).await?;
    let deadline = Instant::now() + WAIT;
    let at = loop {
        match store.put("k/back", vec![]).await {
            Ok(at) => break at,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no write succeeded after quorum returned: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut seen = Vec::new();
    while !seen.iter().any(|(k, _)| k == "k/back") {
        seen.extend(summary(&next_events(&mut w).await));
    }
    assert_eq!(seen.last(), Some(&("k/back".to_owned(), at)));
    assert!(seen.iter().all(|(k, _)| k == "k/back" || k == "k/lost"));
    Ok(())
}

/// Creates `key` exactly once, as a careful client does when a failure leaves it
/// unknown whether its write applied: create-if-absent, and on a failed compare read
/// back the index the earlier attempt wrote at. Counts the failed attempts in
/// `unknown`; every failure must say the store is unavailable.
async fn create(
    store: &EtcdStore,
    key: &str,
    unknown: &mut u32,
    deadline: Instant,
) -> anyhow::Result<u64> {
    loop {
        let txn = Txn::new()
            .when(Compare::Absent(key.into()))
            .put(key, vec![]);
        match store.txn(txn).await {
            Ok(TxnOutcome::Committed { index }) => return Ok(index),
            Ok(TxnOutcome::Failed { .. }) => {
                let kv = store
                    .get(key)
                    .await?
                    .context("a failed create left no key")?;
                return Ok(kv.mod_index);
            }
            Err(e) => {
                assert!(
                    matches!(e, connect_agent::store::Error::Unavailable { .. }),
                    "unexpected error {e:?}"
                );
                *unknown += 1;
                anyhow::ensure!(Instant::now() < deadline, "cannot create {key}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn connecting_to_an_etcd_that_is_down_fails_clearly() -> anyhow::Result<()> {
    let endpoint = format!("127.0.0.1:{}", unused_port()?);
    let started = Instant::now();
    let err = EtcdStore::connect(
        std::slice::from_ref(&endpoint),
        EtcdOptions {
            startup_timeout: Duration::from_secs(1),
            ..opts()
        },
    )
    .await
    .expect_err("nothing listens there");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot reach etcd at {endpoint}")),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}
