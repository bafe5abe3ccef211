//! Tests of the store-backed intentions: writes, their guards, and the in-memory
//! view following the store (including resyncs and writes from other agents).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::*;
use crate::store::WatchMessage;
use crate::store::{Listing, Watch, memory::MemStore};
use crate::test_support::eventually;

fn sel(s: &str) -> Selector {
    Selector::parse("name", s).expect("selector")
}

fn svc(s: &str) -> ServiceName {
    s.parse().expect("service name")
}

fn spec(src: &str, dst: &str, action: Action) -> Spec {
    Spec {
        source: sel(src),
        destination: sel(dst),
        action,
        description: String::new(),
        meta: BTreeMap::new(),
    }
}

async fn started(store: Arc<dyn Store>, default_allow: bool) -> Arc<Intentions> {
    Intentions::start(store, default_allow)
        .await
        .expect("start")
}

#[tokio::test]
async fn create_get_list_and_duplicates() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let ixns = started(store.clone(), false).await;
    let id = ixns
        .create(spec("web", "db", Action::Allow))
        .await
        .expect("create");

    // Read-your-writes: the view has it as soon as create returns.
    let (got, index) = ixns.get(&id);
    let got = got.expect("present");
    assert_eq!(got.to_string(), "web => db (allow)");
    assert_eq!(got.precedence(), 9);
    assert_eq!(index, store.index());
    assert!(got.create_index > 0 && got.create_index == got.modify_index);
    assert!(ixns.authorize(&svc("web"), &svc("db")).is_allow());

    let err = ixns
        .create(spec("web", "db", Action::Deny))
        .await
        .expect_err("duplicate pair");
    assert!(
        matches!(&err, Error::Duplicate { existing } if existing.contains(&id.to_string())),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("duplicate intention found: ALLOW default/web => default/db")
    );

    ixns.create(spec("*", "db", Action::Deny))
        .await
        .expect("create");
    let (all, _) = ixns.list();
    let names: Vec<String> = all.iter().map(|i| i.to_string()).collect();
    assert_eq!(names, ["web => db (allow)", "* => db (deny)"]);
    assert_eq!(store.list(ID_PREFIX).await.expect("list").items.len(), 2);
    assert_eq!(store.list(PAIR_PREFIX).await.expect("list").items.len(), 2);
}

#[tokio::test]
async fn update_moves_pairs_atomically() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let ixns = started(store.clone(), true).await;
    let a = ixns
        .create(spec("web", "db", Action::Deny))
        .await
        .expect("a");
    let b = ixns
        .create(spec("api", "db", Action::Deny))
        .await
        .expect("b");

    // Moving a onto b's pair is refused and changes nothing.
    let err = ixns
        .update(a, spec("api", "db", Action::Allow))
        .await
        .expect_err("occupied pair");
    assert!(matches!(err, Error::Duplicate { .. }), "{err}");
    assert!(!ixns.authorize(&svc("web"), &svc("db")).is_allow());

    // Moving to a free pair frees the old one.
    let created_at = ixns.get(&a).0.expect("a").created_at.clone();
    ixns.update(a, spec("cache", "db", Action::Deny))
        .await
        .expect("move");
    assert!(ixns.authorize(&svc("web"), &svc("db")).is_allow());
    assert!(!ixns.authorize(&svc("cache"), &svc("db")).is_allow());
    let moved = ixns.get(&a).0.expect("a");
    assert_eq!(moved.created_at, created_at);
    assert!(moved.modify_index > moved.create_index);
    assert!(
        store
            .get("intentions/pair/db/web")
            .await
            .expect("get")
            .is_none()
    );
    // The freed pair can be taken again.
    ixns.create(spec("web", "db", Action::Allow))
        .await
        .expect("reuse pair");

    // Same pair, new action.
    ixns.update(b, spec("api", "db", Action::Allow))
        .await
        .expect("in place");
    assert!(ixns.authorize(&svc("api"), &svc("db")).is_allow());

    let missing = Uuid::new_v4();
    let err = ixns
        .update(missing, spec("x", "y", Action::Allow))
        .await
        .expect_err("missing");
    assert_eq!(
        err.to_string(),
        format!("Cannot modify non-existent intention: '{missing}'")
    );
}

#[tokio::test]
async fn upsert_and_its_meta_rules() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let ixns = started(store, false).await;
    let meta: BTreeMap<String, String> = [("k".to_owned(), "v".to_owned())].into();

    let err = ixns
        .upsert(
            sel("web"),
            sel("db"),
            Action::Allow,
            String::new(),
            meta.clone(),
        )
        .await
        .expect_err("meta on create");
    assert!(matches!(err, Error::Input(InputError::MetaNotAllowed)));

    let id = ixns
        .upsert(
            sel("web"),
            sel("db"),
            Action::Allow,
            "d".into(),
            BTreeMap::new(),
        )
        .await
        .expect("create");
    let again = ixns
        .upsert(
            sel("web"),
            sel("db"),
            Action::Deny,
            String::new(),
            BTreeMap::new(),
        )
        .await
        .expect("update");
    assert_eq!(id, again, "an upsert of an existing pair keeps its ID");
    let got = ixns.exact(&sel("web"), &sel("db")).0.expect("present");
    assert_eq!((got.action, got.description.as_str()), (Action::Deny, ""));

    // Meta set through the legacy API survives upserts; changing it is refused.
    ixns.update(
        id,
        Spec {
            meta: meta.clone(),
            ..spec("web", "db", Action::Deny)
        },
    )
    .await
    .expect("set meta");
    ixns.upsert(
        sel("web"),
        sel("db"),
        Action::Allow,
        String::new(),
        BTreeMap::new(),
    )
    .await
    .expect("keeps meta");
    assert_eq!(ixns.get(&id).0.expect("present").meta, meta);
    ixns.upsert(sel("web"), sel("db"), Action::Allow, String::new(), meta)
        .await
        .expect("same meta is fine");
    let err = ixns
        .upsert(
            sel("web"),
            sel("db"),
            Action::Allow,
            String::new(),
            [("k".to_owned(), "other".to_owned())].into(),
        )
        .await
        .expect_err("changed meta");
    assert!(matches!(err, Error::Input(InputError::MetaChanged)));
}

#[tokio::test]
async fn deletes() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let ixns = started(store.clone(), false).await;
    let a = ixns
        .create(spec("web", "db", Action::Allow))
        .await
        .expect("a");
    ixns.create(spec("api", "db", Action::Allow))
        .await
        .expect("b");

    ixns.delete(a).await.expect("delete");
    assert!(ixns.get(&a).0.is_none());
    assert!(!ixns.authorize(&svc("web"), &svc("db")).is_allow());
    assert!(matches!(
        ixns.delete(a).await,
        Err(Error::DeleteMissing { .. })
    ));

    ixns.delete_exact(&sel("api"), &sel("db"))
        .await
        .expect("delete exact");
    ixns.delete_exact(&sel("api"), &sel("db"))
        .await
        .expect("idempotent");
    assert!(ixns.list().0.is_empty());
    assert!(store.list(ID_PREFIX).await.expect("list").items.is_empty());
    assert!(
        store
            .list(PAIR_PREFIX)
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn another_agent_s_writes_arrive_through_the_watch() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let here = started(store.clone(), false).await;
    let there = started(store.clone(), false).await;
    let mut changes = here.subscribe();
    let before = *changes.borrow_and_update();

    there
        .create(spec("web", "db", Action::Allow))
        .await
        .expect("create");
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a change is announced")
        .expect("sender alive");
    assert!(*changes.borrow() > before);
    assert!(here.authorize(&svc("web"), &svc("db")).is_allow());

    // Intentions written before an agent starts are loaded at start.
    let late = started(store, false).await;
    assert!(late.authorize(&svc("web"), &svc("db")).is_allow());
}

#[tokio::test]
async fn unreadable_records_are_skipped_not_fatal() {
    let mem = MemStore::new();
    let id = Uuid::new_v4();
    mem.put(&format!("{ID_PREFIX}{id}"), b"{not json".to_vec())
        .await
        .expect("put");
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let ixns = started(store, false).await;
    assert!(ixns.list().0.is_empty());
    ixns.create(spec("web", "db", Action::Allow))
        .await
        .expect("create still works");

    // A good record that turns bad later is dropped, not kept stale.
    let good = ixns.list().0[0].id;
    mem.put(&format!("{ID_PREFIX}{good}"), b"[]".to_vec())
        .await
        .expect("put");
    eventually("the bad record to be dropped", || {
        ixns.get(&good).0.is_none()
    })
    .await;
}

#[tokio::test]
async fn trust_domain_check_is_optional() {
    let ixns = started(Arc::new(MemStore::new()), true).await;
    let ours: TrustDomain = "11111111-2222-3333-4444-555555555555.consul"
        .parse()
        .expect("td");
    let theirs: TrustDomain = "other.consul".parse().expect("td");
    let client = SpiffeId::service(theirs.clone(), Default::default(), svc("web"));
    let d = ixns.authorize_client(&svc("db"), &client, Some(&ours));
    assert_eq!(d.reason, Reason::ExternalTrustDomain(theirs));
    assert!(!d.is_allow());
    assert_eq!(
        d.to_string(),
        "Identity from an external trust domain: other.consul"
    );
    // Without a CA there is nothing to compare with: intentions alone decide.
    assert!(ixns.authorize_client(&svc("db"), &client, None).is_allow());
    let local = SpiffeId::service(ours.clone(), Default::default(), svc("web"));
    assert!(
        ixns.authorize_client(&svc("db"), &local, Some(&ours))
            .is_allow()
    );
}

/// A store whose first watch delivers nothing until the test sends
/// [`WatchMessage::Resync`] through it, as a backend does when its consumer fell
/// behind and events were lost.
#[derive(Debug)]
struct SilentFirstWatch {
    inner: MemStore,
    used: AtomicBool,
    first: std::sync::Mutex<Option<mpsc::Sender<WatchMessage>>>,
}

#[async_trait]
impl Store for SilentFirstWatch {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, store::Error> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Listing, store::Error> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, store::Error> {
        self.inner.txn(txn).await
    }
    fn index(&self) -> Index {
        self.inner.index()
    }
    async fn watch(&self, prefix: &str, after: Index) -> Result<Watch, store::Error> {
        if self.used.swap(true, Ordering::SeqCst) {
            return self.inner.watch(prefix, after).await;
        }
        let (tx, rx) = mpsc::channel(1);
        *self.first.lock().expect("lock") = Some(tx);
        Ok(Watch { rx })
    }
}

#[tokio::test]
async fn resync_re_lists_and_keeps_following() {
    let mem = MemStore::new();
    let store = Arc::new(SilentFirstWatch {
        inner: mem.clone(),
        used: AtomicBool::new(false),
        first: std::sync::Mutex::new(None),
    });
    let writer = started(Arc::new(mem.clone()), false).await;
    let ixns = started(store.clone(), false).await;
    eventually("the follower to watch", || {
        store.first.lock().expect("lock").is_some()
    })
    .await;
    // Written while the follower's watch is silent: it cannot know yet.
    writer
        .create(spec("web", "db", Action::Allow))
        .await
        .expect("create");
    assert!(!ixns.authorize(&svc("web"), &svc("db")).is_allow());

    let tx = store
        .first
        .lock()
        .expect("lock")
        .take()
        .expect("first watch");
    tx.send(WatchMessage::Resync)
        .await
        .expect("follower listens");
    eventually("the re-list to show the intention", || {
        ixns.authorize(&svc("web"), &svc("db")).is_allow()
    })
    .await;
    assert_eq!(ixns.index(), mem.index());
    // After the resync, the new (real) watch delivers events again.
    writer
        .create(spec("api", "db", Action::Allow))
        .await
        .expect("create");
    eventually("the next event", || {
        ixns.authorize(&svc("api"), &svc("db")).is_allow()
    })
    .await;
}

#[tokio::test]
async fn concurrent_creates_of_one_pair_admit_exactly_one() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let ixns = started(store.clone(), false).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let ixns = ixns.clone();
            tokio::spawn(async move { ixns.create(spec("web", "db", Action::Allow)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(_) => ok += 1,
            Err(Error::Duplicate { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(store.list(ID_PREFIX).await.expect("list").items.len(), 1);
}

#[tokio::test]
async fn format_marker() {
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let ixns = started(store.clone(), false).await;
    assert!(ixns.index() >= 1, "the view's index is never 0");
    drop(ixns);
    // Restarting on our own format is fine; a newer one is refused.
    started(store.clone(), false).await;
    mem.put(FORMAT_KEY, b"2".to_vec()).await.expect("put");
    let err = Intentions::start(store, false)
        .await
        .expect_err("newer format");
    assert!(matches!(err, Error::NewerFormat { found: 2 }), "{err}");
}
