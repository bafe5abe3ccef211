//! The embedded, durable [`Store`]: one redb file under `--data-dir`.
//!
//! The whole key space is loaded into a [`State`] at open and served from memory;
//! redb is the durable copy. A transaction is planned on the in-memory state, written
//! with its new index in one redb write transaction with `Durability::Immediate`
//! (fsync before commit returns), and only then applied in memory and announced to
//! watchers. So a write is acknowledged only once it is on disk, and a crash between
//! the disk commit and the in-memory apply loses nothing: the next open reads it.
//! Plan, commit and apply run as one blocking task that a caller's cancellation
//! cannot interrupt, so memory never falls behind the disk while the process lives.
//!
//! This module owns the file format (see [`encode`]); it knows nothing of what the
//! values mean. It does not keep watch history: like [`super::memory::MemStore`], a
//! watch from the past starts with a resync.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use ::redb::{Database, Durability, ReadableTable, TableDefinition};
use async_trait::async_trait;

use super::{
    Error, Event, Index, KeyValue, Listing, Store, Txn, TxnOutcome, Watch,
    memory::{Plan, State},
};

/// Key → `create_index (u64 LE) ‖ mod_index (u64 LE) ‖ value`.
const DATA: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Bookkeeping: the store index under [`INDEX_KEY`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const INDEX_KEY: &str = "index";
/// Bytes of the two indexes in front of each value.
const HEADER: usize = 16;

/// A [`Store`] kept in one redb file. Cheap to share behind an `Arc`.
pub struct RedbStore {
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What a write needs, owned by the blocking task that performs it, so that the
/// write outlives a caller that gives up waiting.
struct Shared {
    db: Database,
    /// The in-memory copy; held only briefly and never across `.await`.
    state: Mutex<State>,
    /// Serialises writers so that the state a transaction was planned on is still
    /// the state it is applied to after the disk write. Taken on the blocking pool.
    writer: Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // `State::apply` mutates only after planning, with operations that cannot
        // panic half-way, so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plans, commits and applies one transaction: one unit, run to its end on a
    /// blocking thread whether or not anyone still waits for the outcome. Before,
    /// the in-memory apply ran in the caller's future, so a caller dropped after
    /// the disk commit (a client that hung up, a timeout) left a write on disk
    /// that memory never saw, and the next write reused its index.
    fn txn(&self, txn: &Txn) -> Result<TxnOutcome, Error> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let plan = self.lock().plan(txn);
        if plan.events.is_empty() {
            // A failed compare or a no-op: nothing to make durable.
            return Ok(plan.outcome);
        }
        let plan = write(&self.db, plan)?;
        self.lock().apply(&plan);
        Ok(plan.outcome)
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("index", &self.index())
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) the store file at `path` and loads it. Blocking: call it
    /// from `spawn_blocking` or before the runtime is busy ([`RedbStore::open_async`]).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Open {
            path: path.to_owned(),
            source,
        };
        let db = Database::create(path).map_err(|e| open_err(Box::new(e)))?;
        // Create the tables on first open, so that reads never meet a missing table.
        let wtx = db.begin_write().map_err(|e| open_err(Box::new(e)))?;
        {
            wtx.open_table(DATA).map_err(|e| open_err(Box::new(e)))?;
            wtx.open_table(META).map_err(|e| open_err(Box::new(e)))?;
        }
        wtx.commit().map_err(|e| open_err(Box::new(e)))?;

        let rtx = db.begin_read().map_err(|e| open_err(Box::new(e)))?;
        let meta = rtx.open_table(META).map_err(|e| open_err(Box::new(e)))?;
        let index = meta
            .get(INDEX_KEY)
            .map_err(|e| open_err(Box::new(e)))?
            .map_or(0, |v| v.value());
        let table = rtx.open_table(DATA).map_err(|e| open_err(Box::new(e)))?;
        let mut data = BTreeMap::new();
        for entry in table.iter().map_err(|e| open_err(Box::new(e)))? {
            let (k, v) = entry.map_err(|e| open_err(Box::new(e)))?;
            let key = k.value().to_owned();
            let kv = decode(&key, v.value())?;
            if kv.mod_index > index {
                return Err(Error::Corrupt {
                    key,
                    reason: format!(
                        "modified at index {} after the store's index {index}",
                        kv.mod_index
                    ),
                });
            }
            data.insert(key, kv);
        }
        drop(table);
        drop(meta);
        drop(rtx);
        tracing::info!(path = %path.display(), keys = data.len(), index, "store opened");
        Ok(Self {
            path: path.to_owned(),
            shared: Arc::new(Shared {
                db,
                state: Mutex::new(State::from_parts(data, index)),
                writer: Mutex::new(()),
            }),
        })
    }

    /// [`RedbStore::open`] on the blocking pool.
    pub async fn open_async(path: PathBuf) -> Result<Self, Error> {
        tokio::task::spawn_blocking(move || Self::open(&path))
            .await
            .map_err(|e| Error::Backend {
                op: "open",
                source: Box::new(e),
            })?
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        Ok(self.lock().get(key))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, Error> {
        Ok(self.lock().list(prefix))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, Error> {
        // A blocking task is never cancelled: dropping this future drops only the
        // handle, and the transaction still commits and applies.
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.txn(&txn))
            .await
            .map_err(|e| Error::Backend {
                op: "commit",
                source: Box::new(e),
            })?
    }

    fn index(&self) -> Index {
        self.lock().index()
    }

    async fn watch(&self, prefix: &str, after: Index) -> Result<Watch, Error> {
        Ok(self.lock().watch(prefix, after))
    }
}

/// Writes a plan's events and its index in one durable redb transaction.
fn write(db: &Database, plan: Plan) -> Result<Plan, Error> {
    let backend = |op: &'static str| {
        move |e: ::redb::Error| Error::Backend {
            op,
            source: Box::new(e),
        }
    };
    let mut wtx = db.begin_write().map_err(|e| backend("begin")(e.into()))?;
    wtx.set_durability(Durability::Immediate);
    {
        let mut data = wtx
            .open_table(DATA)
            .map_err(|e| backend("open table")(e.into()))?;
        for ev in &plan.events {
            match ev {
                Event::Put(kv) => {
                    data.insert(kv.key.as_str(), encode(kv).as_slice())
                        .map_err(|e| backend("insert")(e.into()))?;
                }
                Event::Delete { key, .. } => {
                    data.remove(key.as_str())
                        .map_err(|e| backend("remove")(e.into()))?;
                }
            }
        }
        let mut meta = wtx
            .open_table(META)
            .map_err(|e| backend("open table")(e.into()))?;
        meta.insert(INDEX_KEY, plan.outcome.index())
            .map_err(|e| backend("insert")(e.into()))?;
    }
    wtx.commit().map_err(|e| backend("commit")(e.into()))?;
    Ok(plan)
}

/// The on-disk form of a value: both indexes, little-endian, then the bytes.
fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_index.to_le_bytes());
    out.extend_from_slice(&kv.mod_index.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, Error> {
    let corrupt = || Error::Corrupt {
        key: key.to_owned(),
        reason: format!("record of {} bytes is shorter than its header", raw.len()),
    };
    let create = raw.get(0..8).ok_or_else(corrupt)?;
    let modified = raw.get(8..HEADER).ok_or_else(corrupt)?;
    let mut c = [0u8; 8];
    let mut m = [0u8; 8];
    c.copy_from_slice(create);
    m.copy_from_slice(modified);
    Ok(KeyValue {
        key: key.to_owned(),
        value: raw[HEADER..].to_vec(),
        create_index: u64::from_le_bytes(c),
        mod_index: u64::from_le_bytes(m),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Compare, WatchMessage};
    use std::future::Future as _;

    fn temp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("connect.redb");
        (dir, path)
    }

    #[tokio::test]
    async fn same_semantics_as_memory() {
        let (_d, path) = temp();
        let s = RedbStore::open(&path).expect("open");
        assert_eq!(s.put("a/1", b"x".to_vec()).await.ok(), Some(1));
        assert_eq!(s.put("a/2", b"y".to_vec()).await.ok(), Some(2));
        assert_eq!(s.put("a/1", b"x2".to_vec()).await.ok(), Some(3));
        let kv = s.get("a/1").await.expect("get").expect("present");
        assert_eq!((kv.create_index, kv.mod_index), (1, 3));
        assert_eq!(s.delete("a/1").await.ok(), Some(4));
        assert_eq!(s.delete("a/1").await.ok(), Some(4), "no-op keeps the index");
        let t = Txn::new()
            .when(Compare::Absent("a/2".into()))
            .put("a/3", b"z".to_vec());
        assert_eq!(
            s.txn(t).await.expect("txn"),
            TxnOutcome::Failed { index: 4 }
        );
        let l = s.list("a/").await.expect("list");
        assert_eq!(l.items.len(), 1);
        assert_eq!(l.index, 4);
    }

    #[tokio::test]
    async fn everything_survives_reopen() {
        let (_d, path) = temp();
        {
            let s = RedbStore::open(&path).expect("open");
            s.put("k/a", b"1".to_vec()).await.expect("put");
            s.txn(
                Txn::new()
                    .put("k/b", b"2".to_vec())
                    .put("k/c", vec![])
                    .delete("k/a"),
            )
            .await
            .expect("txn");
            s.put("k/b", b"3".to_vec()).await.expect("put");
        }
        let s = RedbStore::open(&path).expect("reopen");
        assert_eq!(s.index(), 3);
        let l = s.list("k/").await.expect("list");
        let got: Vec<(String, Vec<u8>, Index, Index)> = l
            .items
            .into_iter()
            .map(|kv| (kv.key, kv.value, kv.create_index, kv.mod_index))
            .collect();
        assert_eq!(
            got,
            vec![
                ("k/b".into(), b"3".to_vec(), 2, 3),
                ("k/c".into(), vec![], 2, 2),
            ]
        );
        // The index keeps rising after a reopen.
        assert_eq!(s.put("k/d", vec![]).await.ok(), Some(4));
    }

    #[tokio::test]
    async fn watchers_see_commits() {
        let (_d, path) = temp();
        let s = RedbStore::open_async(path).await.expect("open");
        let mut w = s.watch("svc/", s.index()).await.expect("watch");
        s.put("other", vec![]).await.expect("put");
        s.put("svc/web", vec![]).await.expect("put");
        match w.next().await {
            Some(WatchMessage::Events(evs)) => {
                assert_eq!(evs.len(), 1);
                assert_eq!(evs[0].key(), "svc/web");
                assert_eq!(evs[0].index(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn concurrent_writers_get_distinct_indexes() {
        let (_d, path) = temp();
        let s = Arc::new(RedbStore::open(&path).expect("open"));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.put(&format!("c/{i}"), vec![]).await.expect("put")
            }));
        }
        let mut idx = Vec::new();
        for t in tasks {
            idx.push(t.await.expect("join"));
        }
        idx.sort_unstable();
        assert_eq!(idx, (1..=16).collect::<Vec<_>>());
        drop(s);
        let s = RedbStore::open(&path).expect("reopen");
        assert_eq!(s.list("c/").await.expect("list").items.len(), 16);
    }

    /// A caller that stops waiting mid-write (a client hanging up, a timeout) must
    /// not leave the write on disk but missing from memory, where the next write
    /// would reuse its index and a deny on disk would go unenforced until restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_write_still_lands_in_memory_and_indexes_keep_rising() {
        let (_d, path) = temp();
        let s = RedbStore::open_async(path.clone()).await.expect("open");
        assert_eq!(s.put("k/first", vec![]).await.ok(), Some(1));
        let mut cut = 0;
        for round in 0..20u64 {
            let key = format!("k/dropped-{round}");
            // Polled once (the commit starts on the blocking pool), then dropped.
            let mut write = Box::pin(s.txn(Txn::new().put(&key, b"deny".to_vec())));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if write.as_mut().poll(&mut cx).is_pending() {
                cut += 1;
            }
            drop(write);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            let kv = loop {
                if let Some(kv) = s.get(&key).await.expect("get") {
                    break kv;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "round {round}: the dropped write never reached memory"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            };
            let next = s.put("k/after", vec![]).await.expect("put");
            assert!(
                next > kv.mod_index,
                "round {round}: index {next} reused after the dropped write's {}",
                kv.mod_index
            );
            assert_eq!(s.index(), next);
        }
        assert!(cut >= 10, "only {cut} of 20 writes were cut short");
        let index = s.index();
        drop(s);
        let s = RedbStore::open(&path).expect("reopen");
        assert_eq!(s.index(), index, "disk and memory agree on the index");
        assert_eq!(s.list("k/dropped-").await.expect("list").items.len(), 20);
    }

    #[test]
    fn a_second_open_of_the_same_file_fails() {
        let (_d, path) = temp();
        let _first = RedbStore::open(&path).expect("open");
        assert!(matches!(RedbStore::open(&path), Err(Error::Open { .. })));
    }

    #[test]
    fn short_records_are_corrupt_not_a_panic() {
        for raw in [&b""[..], &[0u8; 15][..]] {
            assert!(matches!(decode("k", raw), Err(Error::Corrupt { .. })));
        }
        let kv = KeyValue {
            key: "k".into(),
            value: b"v".to_vec(),
            create_index: 7,
            mod_index: 9,
        };
        assert_eq!(decode("k", &encode(&kv)).expect("decode"), kv);
    }
}
