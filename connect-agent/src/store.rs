//! Durable state behind one [`Store`] trait: catalog, intentions, CA roots and keys,
//! ACL tokens, CA config.
//!
//! The model is etcd's, so that the etcd backend maps onto it directly: a flat,
//! ordered key space of `/`-separated string keys with byte values; one monotonically
//! increasing [`Index`] (etcd's revision, Consul's `X-Consul-Index`) that every
//! committed write raises by one; per-key create and modify indexes; transactions
//! that apply all of their operations or none, guarded by compare clauses; and
//! watches that replay every change after an index.
//!
//! Values are opaque here: each owner (catalog, intentions, ca) encodes its own
//! records (JSON) under its own prefix. This module owns durability and ordering, not
//! meaning. Reads for request paths are served from the owners' in-memory caches
//! ([`view::View`]), which follow the store through [`Store::watch`].

pub mod backoff;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod etcd;
pub mod memory;
pub mod redb;
pub mod view;

pub use view::{Policy, Projection, View};

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A store revision. `0` means "before anything was written".
pub type Index = u64;

/// One key with its value and the indexes of its creation and last change.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_index: Index,
    pub mod_index: Index,
}

impl fmt::Debug for KeyValue {
    // Values may hold private keys or token secrets: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value_len", &self.value.len())
            .field("create_index", &self.create_index)
            .field("mod_index", &self.mod_index)
            .finish()
    }
}

/// The keys under a prefix, read at one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub items: Vec<KeyValue>,
    /// The store's index at the time of the read: a watch from here misses nothing.
    pub index: Index,
}

/// A guard of a transaction. All must hold for the operations to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last modified at exactly this index (check-and-set).
    ModIndex(String, Index),
}

/// One operation of a transaction.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleting a missing key is not an error.
    Delete {
        key: String,
    },
    /// Deletes every key that starts with `prefix`.
    DeletePrefix {
        prefix: String,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Put { key, value } => write!(f, "Put({key:?}, {} bytes)", value.len()),
            Op::Delete { key } => write!(f, "Delete({key:?})"),
            Op::DeletePrefix { prefix } => write!(f, "DeletePrefix({prefix:?})"),
        }
    }
}

/// Operations applied atomically if every compare holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compare.push(c);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
    pub fn delete_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.ops.push(Op::DeletePrefix {
            prefix: prefix.into(),
        });
        self
    }
}

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied and durable; the store's index is now `index`. A transaction whose
    /// operations changed nothing (deleting missing keys) still commits but does not
    /// raise the index.
    Committed { index: Index },
    /// A compare did not hold; nothing was written.
    Failed { index: Index },
}

impl TxnOutcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, TxnOutcome::Committed { .. })
    }
    pub fn index(&self) -> Index {
        match *self {
            TxnOutcome::Committed { index } | TxnOutcome::Failed { index } => index,
        }
    }
}

/// A change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Created or changed; `kv.mod_index` is the index of the change.
    Put(KeyValue),
    /// Removed at `index`.
    Delete { key: String, index: Index },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn index(&self) -> Index {
        match self {
            Event::Put(kv) => kv.mod_index,
            Event::Delete { index, .. } => *index,
        }
    }
}

/// What a watch delivers, in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes of one committed transaction under the watched prefix.
    Events(Vec<Event>),
    /// The watch could not keep up (or the history it asked for is gone): the
    /// consumer must re-read the prefix with [`Store::list`] and watch again from the
    /// listing's index. Nothing else follows on this watch.
    Resync,
}

/// A stream of changes under a prefix. Bounded: a consumer that falls behind gets
/// [`WatchMessage::Resync`] instead of unbounded buffering.
#[derive(Debug)]
pub struct Watch {
    pub rx: mpsc::Receiver<WatchMessage>,
}

impl Watch {
    /// The next message, or `None` when the store shut down.
    pub async fn next(&mut self) -> Option<WatchMessage> {
        self.rx.recv().await
    }
}

/// Errors of a store backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store {op} failed: {source}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the store is unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("the store holds a corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// The file name of the embedded store under `--data-dir`.
pub const EMBEDDED_FILE: &str = "connect.redb";

/// Opens the embedded store in `data_dir` (which must exist), on the blocking pool.
pub async fn open(data_dir: &std::path::Path) -> Result<redb::RedbStore, Error> {
    redb::RedbStore::open_async(data_dir.join(EMBEDDED_FILE)).await
}

/// Durable, ordered key-value state with one index. See the module doc for the model.
///
/// Every method that returns `Ok` after a write has made that write durable: a crash
/// (kill -9, power loss with a sane disk) right after the call returns loses nothing.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error>;

    /// Every key under `prefix`, in key order, and the index of the read.
    async fn list(&self, prefix: &str) -> Result<Listing, Error>;

    /// Applies `txn` atomically if its compares hold.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, Error>;

    /// The latest committed index this store knows of.
    fn index(&self) -> Index;

    /// Changes under `prefix` committed after `after`, in order. A backend that cannot
    /// replay from `after` starts with [`WatchMessage::Resync`].
    async fn watch(&self, prefix: &str, after: Index) -> Result<Watch, Error>;

    /// Writes one key unconditionally and returns the commit index.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Index, Error> {
        Ok(self.txn(Txn::new().put(key, value)).await?.index())
    }

    /// Deletes one key (missing is fine) and returns the index after.
    async fn delete(&self, key: &str) -> Result<Index, Error> {
        Ok(self.txn(Txn::new().delete(key)).await?.index())
    }
}
