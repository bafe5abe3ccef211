//! The cluster backend of [`Store`]: etcd v3 (`--store etcd://h1:2379,h2:2379,...`).
//!
//! Every agent of a cluster reads, writes and watches the same etcd, so a change made
//! through one node reaches all of them. The store model is etcd's (see the parent
//! module), and the mapping is direct:
//!
//! | store                       | etcd                                          |
//! |-----------------------------|-----------------------------------------------|
//! | [`Index`]                   | revision (cluster-wide, also raised by others) |
//! | `create_index`/`mod_index`  | `create_revision`/`mod_revision`              |
//! | [`Compare::Absent`]         | `create_revision == 0`                        |
//! | [`Compare::ModIndex`]       | `mod_revision == n`                           |
//! | [`TxnOutcome`] index        | the transaction's response header revision    |
//! | [`Store::watch`] after `n`  | a watch from `start_revision = n + 1`         |
//!
//! Every key lives under a root (default [`DEFAULT_ROOT`]) so one etcd can hold other
//! data too; callers never see the root.
//!
//! Availability: reads and writes fail with [`store::Error::Unavailable`] after
//! [`EtcdOptions::request_timeout`] while etcd is unreachable; they never hang. Watches
//! do not fail: they reconnect with bounded exponential backoff and resume after the
//! last revision they delivered, so consumers (the agent's caches) keep what they had
//! and keep serving from it until etcd is back. Only compacted history ends a watch,
//! with [`WatchMessage::Resync`].
//!
//! Transactions: etcd rejects a transaction that puts a key it also deletes (a put
//! inside a deleted range, or two puts of one key), while [`Txn`] runs its operations
//! in order with later ones seeing earlier ones. [`translate`] turns a [`Txn`] into the
//! equivalent etcd request: one put per surviving key, and the deleted ranges with
//! those keys cut out. One difference remains, documented on [`translate`]: a key
//! deleted and put again in one transaction keeps its create index here.
//!
//! Not here: TLS and authentication to etcd (plaintext gRPC only), leases, and the
//! caches that consumers build from watches (`cache`).

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    Txn as EtcdTxn, TxnOp, WatchOptions, WatchResponse,
};
use rand::Rng;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Compare, Event, Index, KeyValue, Listing, Op, Store, Txn, TxnOutcome, Watch, WatchMessage,
    memory::WATCH_BUFFER,
};
use crate::store;

/// Where Connect's keys live in etcd unless configured otherwise.
pub const DEFAULT_ROOT: &str = "/connect/";

/// Keys per page of a listing: bounds the size of one etcd response (and so the
/// memory of one read) while listing prefixes of any size.
const LIST_PAGE: i64 = 256;

/// The largest etcd response accepted. etcd's own default request limit is 1.5 MiB
/// per value; a page of [`LIST_PAGE`] typical records (JSON, a few KiB) is far below
/// this, and the limit stops a misbehaving server from making us buffer without end.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Attempts at a consistent paged listing when etcd compacts away the revision being
/// read between two pages.
const LIST_ATTEMPTS: usize = 5;

/// Reconnect backoff of watches: first delay and cap. The cap keeps a node that lost
/// etcd for a while from waiting long after it is back.
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Retry backoff of single requests within their timeout.
const REQUEST_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_millis(1000));

/// HTTP/2 keepalive on the etcd connections: detects a peer that vanished without
/// closing (partition, power loss) within interval + timeout, so a watch reconnects
/// instead of waiting forever. etcd's server rejects pings more often than every 5 s
/// (`--grpc-keepalive-min-time`).
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// How to reach etcd and where our keys live.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Prefix of every key, ending in `/`. Agents of one cluster must agree on it.
    pub root: String,
    /// How long [`EtcdStore::connect`] keeps trying before the agent gives up.
    pub startup_timeout: Duration,
    /// Bound of each read or write, retries included.
    pub request_timeout: Duration,
    /// Bound of one TCP connect to a member.
    pub connect_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.to_owned(),
            startup_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Failures of the etcd backend. The store trait reports them as [`store::Error`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Startup could not read from etcd in time: etcd is down, elsewhere, or has no
    /// quorum. The operator must act.
    #[error(
        "cannot reach etcd at {endpoints} (tried for {waited:?}): {source}; check that etcd runs and listens there"
    )]
    Unreachable {
        endpoints: String,
        waited: Duration,
        #[source]
        source: Box<Error>,
    },
    /// The user gave an endpoint the client cannot use.
    #[error("etcd endpoint list {endpoints:?} is invalid: {source}")]
    Endpoints {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// The configured key root is unusable (our caller's mistake).
    #[error("etcd key root {root:?} is invalid: {reason}")]
    Root { root: String, reason: &'static str },
    /// etcd answered with an error, or the connection failed.
    #[error("etcd {op} failed: {source}")]
    Request {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// No answer in time.
    #[error("etcd {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// A paged listing kept losing its read revision to compaction.
    #[error("listing {prefix:?} from etcd raced compaction {attempts} times")]
    ListRace { prefix: String, attempts: usize },
}

impl Error {
    /// Whether the failure says etcd is (for now) out of reach, rather than that the
    /// request itself was wrong.
    fn is_unavailable(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } | Error::ListRace { .. } => true,
            Error::Request { source, .. } => is_transient(source),
            Error::Endpoints { .. } | Error::Root { .. } => false,
        }
    }
}

impl From<Error> for store::Error {
    fn from(e: Error) -> Self {
        if e.is_unavailable() {
            return store::Error::Unavailable {
                reason: e.to_string(),
            };
        }
        match e {
            Error::Request { op, source } => store::Error::Backend {
                op,
                source: Box::new(source),
            },
            other => store::Error::Backend {
                op: "etcd",
                source: Box::new(other),
            },
        }
    }
}

/// A [`Store`] on an etcd cluster. Dropping it ends its watches.
pub struct EtcdStore {
    client: Client,
    root: String,
    endpoints: String,
    request_timeout: Duration,
    /// The highest revision seen in any response or watch event.
    index: Arc<AtomicU64>,
    /// Cancelled on drop: stops every watch task.
    stop: CancellationToken,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("root", &self.root)
            .field("index", &self.index.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`host:port` or `http://host:port`) and
    /// reads once to learn the current revision, retrying until
    /// [`EtcdOptions::startup_timeout`]. Fails with [`Error::Unreachable`] if etcd did
    /// not answer by then: an agent must not start on a store it cannot read.
    pub async fn connect(endpoints: &[String], opts: EtcdOptions) -> Result<Self, Error> {
        validate_root(&opts.root)?;
        let joined = endpoints.join(",");
        let connect = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
            // A member cut off from the leader answers with an error instead of
            // serving stale reads or holding a watch that will never see a write.
            .with_require_leader(true);
        // Connections are made lazily, on the first request: this fails only on
        // malformed endpoints.
        let client = Client::connect(endpoints, Some(connect))
            .await
            .map_err(|source| Error::Endpoints {
                endpoints: joined.clone(),
                source,
            })?;
        let store = Self {
            client,
            root: opts.root,
            endpoints: joined,
            request_timeout: opts.request_timeout,
            index: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        };
        let started = Instant::now();
        let deadline = started + opts.startup_timeout;
        let mut backoff = Backoff::new(REQUEST_BACKOFF);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = store.probe(remaining.min(opts.request_timeout)).await;
            match attempt {
                Ok(revision) => {
                    tracing::info!(
                        endpoints = %store.endpoints,
                        root = %store.root,
                        revision,
                        "connected to etcd"
                    );
                    return Ok(store);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(Error::Unreachable {
                            endpoints: store.endpoints.clone(),
                            waited: started.elapsed(),
                            source: Box::new(e),
                        });
                    }
                    tracing::debug!(error = %e, "etcd not reachable yet, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The root every key of this store lives under.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// One cheap read that proves etcd answers and gives its revision.
    async fn probe(&self, within: Duration) -> Result<Index, Error> {
        let mut kv = self.kv();
        let key = self.root.clone().into_bytes();
        let resp = tokio::time::timeout(
            within,
            kv.get(key, Some(GetOptions::new().with_count_only())),
        )
        .await
        .map_err(|_| Error::Timeout {
            op: "connect",
            after: within,
        })?
        .map_err(|source| Error::Request {
            op: "connect",
            source,
        })?;
        Ok(self.saw(resp.header().map(|h| h.revision())))
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// Records a revision from a response header and returns it.
    fn saw(&self, revision: Option<i64>) -> Index {
        note_revision(&self.index, revision)
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.root.len() + key.len());
        k.extend_from_slice(self.root.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// Runs `call` until it succeeds, fails for good, or the request timeout passes.
    /// `idempotent` calls are retried on any transient failure; others only when the
    /// request provably never reached etcd (the connection could not be made), so a
    /// transaction is never applied twice.
    async fn request<T, F, Fut>(
        &self,
        op: &'static str,
        idempotent: bool,
        mut call: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut backoff = Backoff::new(REQUEST_BACKOFF);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = tokio::time::timeout(remaining, call())
                .await
                .map_err(|_| Error::Timeout {
                    op,
                    after: self.request_timeout,
                })?;
            let source = match result {
                Ok(v) => return Ok(v),
                Err(source) => source,
            };
            let retry = if idempotent {
                is_transient(&source)
            } else {
                never_sent(&source)
            };
            let delay = backoff.next_delay();
            if !retry || Instant::now() + delay >= deadline {
                return Err(Error::Request { op, source });
            }
            tracing::debug!(op, error = %source, "etcd request failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn list_once(&self, prefix: &str) -> Result<Option<Listing>, Error> {
        let start = self.full_key(prefix);
        let end = prefix_end(&start);
        let mut items = Vec::new();
        let mut from = start;
        let mut read_at: Option<i64> = None;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if let Some(rev) = read_at {
                opts = opts.with_revision(rev);
            }
            let result = self
                .request("list", true, || {
                    let (mut kv, key, opts) = (self.kv(), from.clone(), opts.clone());
                    async move { kv.get(key, Some(opts)).await }
                })
                .await;
            let mut resp = match result {
                Ok(r) => r,
                // The revision of the first page was compacted before a later page
                // was read: start over at a new revision.
                Err(Error::Request { source, .. }) if read_at.is_some() && is_compacted(&source) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let header_rev = resp.header().map(|h| h.revision());
            self.saw(header_rev);
            let rev = *read_at.get_or_insert(header_rev.unwrap_or(0));
            let more = resp.more();
            let kvs = resp.take_kvs();
            let last_key = kvs.last().map(|kv| kv.key().to_vec());
            items.extend(kvs.into_iter().filter_map(|kv| self.from_etcd(kv)));
            match last_key {
                Some(mut last) if more => {
                    // The next page starts right after the last key read.
                    last.push(0);
                    from = last;
                }
                _ => {
                    return Ok(Some(Listing {
                        items,
                        index: rev_to_index(rev),
                    }));
                }
            }
        }
    }

    /// A store key-value from an etcd one, or `None` (logged) for a key that is not
    /// ours: outside the root, or not UTF-8. Such keys were written by something else
    /// and are skipped rather than failing every read of their prefix.
    fn from_etcd(&self, kv: etcd_client::KeyValue) -> Option<KeyValue> {
        let create_index = rev_to_index(kv.create_revision());
        let mod_index = rev_to_index(kv.mod_revision());
        let (key, value) = kv.into_key_value();
        let key = strip_root(&self.root, key)?;
        Some(KeyValue {
            key,
            value,
            create_index,
            mod_index,
        })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, store::Error> {
        let full = self.full_key(key);
        let mut resp = self
            .request("get", true, || {
                let (mut kv, key) = (self.kv(), full.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        self.saw(resp.header().map(|h| h.revision()));
        Ok(resp
            .take_kvs()
            .into_iter()
            .next()
            .and_then(|kv| self.from_etcd(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, store::Error> {
        for _ in 0..LIST_ATTEMPTS {
            if let Some(listing) = self.list_once(prefix).await? {
                return Ok(listing);
            }
        }
        Err(Error::ListRace {
            prefix: prefix.to_owned(),
            attempts: LIST_ATTEMPTS,
        }
        .into())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, store::Error> {
        let request = translate(&self.root, &txn);
        let resp = self
            .request("txn", false, || {
                let (mut kv, txn) = (self.kv(), request.to_etcd());
                async move { kv.txn(txn).await }
            })
            .await?;
        let index = self.saw(resp.header().map(|h| h.revision()));
        if resp.succeeded() {
            Ok(TxnOutcome::Committed { index })
        } else {
            Ok(TxnOutcome::Failed { index })
        }
    }

    fn index(&self) -> Index {
        self.index.load(Ordering::Acquire)
    }

    async fn watch(&self, prefix: &str, after: Index) -> Result<Watch, store::Error> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER + 1);
        let start = self.full_key(prefix);
        let task = WatchTask {
            client: self.client.clone(),
            root: self.root.clone(),
            end: prefix_end(&start),
            start,
            next: after.saturating_add(1),
            tx,
            index: self.index.clone(),
            stop: self.stop.clone(),
            open_timeout: self.request_timeout,
        };
        tokio::spawn(task.run());
        Ok(Watch { rx })
    }
}

/// Follows one watch: opens it, forwards events grouped by revision, and reopens
/// after failures from the revision after the last one delivered.
struct WatchTask {
    client: Client,
    root: String,
    start: Vec<u8>,
    end: Vec<u8>,
    /// The first revision not yet delivered.
    next: Index,
    tx: mpsc::Sender<WatchMessage>,
    index: Arc<AtomicU64>,
    stop: CancellationToken,
    open_timeout: Duration,
}

/// Why a watch stream ended.
enum StreamEnd {
    /// The consumer is gone, the store was dropped, or the watch is over: stop.
    Done,
    /// The stream broke: reconnect.
    Broken,
}

impl WatchTask {
    async fn run(mut self) {
        let mut backoff = Backoff::new(WATCH_BACKOFF);
        loop {
            match self.follow(&mut backoff).await {
                StreamEnd::Done => return,
                StreamEnd::Broken => {}
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Opens the watch and forwards its responses until it ends.
    async fn follow(&mut self, backoff: &mut Backoff) -> StreamEnd {
        let Ok(start_revision) = i64::try_from(self.next) else {
            // A revision past i64::MAX never comes: nothing will ever be delivered.
            return self.wait_until_dropped().await;
        };
        let opts = WatchOptions::new()
            .with_range(self.end.clone())
            .with_start_revision(start_revision);
        let mut client = self.client.watch_client();
        let open = client.watch(self.start.clone(), Some(opts));
        let opened = tokio::select! {
            _ = self.stop.cancelled() => return StreamEnd::Done,
            _ = self.tx.closed() => return StreamEnd::Done,
            r = tokio::time::timeout(self.open_timeout, open) => r,
        };
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(error)) => {
                tracing::warn!(%error, from = self.next, "cannot open etcd watch, retrying");
                return StreamEnd::Broken;
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.open_timeout, from = self.next, "opening etcd watch timed out, retrying");
                return StreamEnd::Broken;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => return StreamEnd::Done,
                _ = self.tx.closed() => return StreamEnd::Done,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    tracing::warn!(from = self.next, "etcd closed the watch stream, reconnecting");
                    return StreamEnd::Broken;
                }
                Err(error) => {
                    tracing::warn!(%error, from = self.next, "etcd watch failed, reconnecting");
                    return StreamEnd::Broken;
                }
            };
            if resp.created() {
                // The watch is established: the next failure starts from a short delay.
                backoff.reset();
            }
            match self.deliver(resp) {
                Delivery::Continue => {}
                Delivery::Reopen => return StreamEnd::Broken,
                Delivery::Done => return StreamEnd::Done,
            }
        }
    }

    /// Forwards one watch response to the consumer.
    fn deliver(&mut self, mut resp: WatchResponse) -> Delivery {
        note_revision(&self.index, resp.header().map(|h| h.revision()));
        if resp.compact_revision() != 0 {
            // The history after `next - 1` is gone: only a fresh listing is correct.
            tracing::info!(
                from = self.next,
                compacted = resp.compact_revision(),
                "etcd history compacted, consumer must resync"
            );
            let _ = self.tx.try_send(WatchMessage::Resync);
            return Delivery::Done;
        }
        if resp.canceled() {
            tracing::warn!(reason = %resp.cancel_reason(), from = self.next, "etcd cancelled the watch, reopening");
            return Delivery::Reopen;
        }
        let events = std::mem::take(&mut resp.0.events);
        for (revision, group) in group_by_revision(&self.root, events) {
            if !group.is_empty() {
                // One slot is kept for the Resync (as in memory.rs), so a consumer
                // that falls behind is told so rather than finding its stream ended.
                if self.tx.capacity() <= 1 {
                    tracing::info!(from = self.next, "watch consumer fell behind, must resync");
                    let _ = self.tx.try_send(WatchMessage::Resync);
                    return Delivery::Done;
                }
                if self.tx.try_send(WatchMessage::Events(group)).is_err() {
                    return Delivery::Done;
                }
            }
            self.next = self.next.max(revision.saturating_add(1));
        }
        Delivery::Continue
    }

    async fn wait_until_dropped(&self) -> StreamEnd {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.tx.closed() => {}
        }
        StreamEnd::Done
    }
}

enum Delivery {
    Continue,
    Reopen,
    Done,
}

/// Turns one watch response's events into store events, one group per revision (one
/// etcd transaction), each group sorted by key as [`super::memory`] orders them.
/// Events of keys that are not ours, or of unknown types, are logged and dropped; their
/// revision still appears (possibly with no events) so the watch moves past it.
fn group_by_revision(
    root: &str,
    events: Vec<etcd_client::proto::PbEvent>,
) -> Vec<(Index, Vec<Event>)> {
    let mut groups: Vec<(Index, Vec<Event>)> = Vec::new();
    for ev in events {
        let Some(kv) = ev.kv else {
            tracing::warn!("etcd sent a watch event without a key, ignored");
            continue;
        };
        let revision = rev_to_index(kv.mod_revision);
        let create_index = rev_to_index(kv.create_revision);
        if groups.last().is_none_or(|(rev, _)| *rev != revision) {
            groups.push((revision, Vec::new()));
        }
        let Some(key) = strip_root(root, kv.key) else {
            continue;
        };
        let event = match ev.r#type {
            // mvccpb.Event.EventType: PUT = 0, DELETE = 1.
            0 => Event::Put(KeyValue {
                key,
                value: kv.value,
                create_index,
                mod_index: revision,
            }),
            1 => Event::Delete {
                key,
                index: revision,
            },
            other => {
                tracing::warn!(r#type = other, %key, "etcd sent a watch event of unknown type, ignored");
                continue;
            }
        };
        if let Some((_, group)) = groups.last_mut() {
            group.push(event);
        }
    }
    for (_, group) in &mut groups {
        group.sort_by(|a, b| a.key().cmp(b.key()));
    }
    groups
}

/// An etcd transaction equivalent to a [`Txn`]: plain data, so the translation is
/// tested without etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub compares: Vec<EtcdCmp>,
    pub deletes: Vec<EtcdDelete>,
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One etcd compare clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdCmp {
    /// `create_revision(key) == 0`: the key does not exist.
    Absent(Vec<u8>),
    /// `mod_revision(key) == n`.
    ModRevision(Vec<u8>, i64),
    /// A guard that cannot hold: `create_revision == 0 && create_revision > 0`.
    /// Stands for [`Compare::ModIndex`] with an index no existing key can have
    /// (`0`, which etcd would read as "absent", or one past `i64::MAX`).
    Never(Vec<u8>),
}

/// One etcd delete: a single key, or the range `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdDelete {
    Key(Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
}

/// Translates `txn` (keys relative to `root`) into one etcd transaction with the same
/// effect.
///
/// [`Txn`] runs its operations in order; etcd applies a transaction's operations as
/// one change and rejects a put of a key that another operation also puts or
/// deletes. So the net effect is computed first: a key's last put survives unless a
/// later delete covers it; every delete stays, minus the keys that survive as puts
/// (a deleted prefix becomes the ranges between those keys). The result has no
/// overlap between puts and deletes, so the order etcd applies them in is irrelevant.
///
/// The one observable difference from [`super::memory`]: a key that existed, was
/// deleted and was put again within one transaction keeps its old create index on
/// etcd (in memory it gets a new one), because etcd cannot delete and put one key
/// in one revision.
pub fn translate(root: &str, txn: &Txn) -> Translated {
    let full = |k: &str| -> Vec<u8> { [root.as_bytes(), k.as_bytes()].concat() };
    let compares = txn
        .compare
        .iter()
        .map(|c| match c {
            Compare::Absent(k) => EtcdCmp::Absent(full(k)),
            Compare::ModIndex(k, n) => match i64::try_from(*n) {
                Ok(n) if n > 0 => EtcdCmp::ModRevision(full(k), n),
                _ => EtcdCmp::Never(full(k)),
            },
        })
        .collect();

    // Net effect, in operation order.
    enum Del {
        Key(Vec<u8>),
        Prefix(Vec<u8>),
    }
    let mut puts: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
    let mut dels: Vec<Del> = Vec::new();
    for op in &txn.ops {
        match op {
            Op::Put { key, value } => {
                puts.insert(full(key), value.clone());
            }
            Op::Delete { key } => {
                let k = full(key);
                puts.remove(&k);
                dels.push(Del::Key(k));
            }
            Op::DeletePrefix { prefix } => {
                let p = full(prefix);
                puts.retain(|k, _| !k.starts_with(&p));
                dels.push(Del::Prefix(p));
            }
        }
    }

    let mut deletes = Vec::new();
    for d in dels {
        match d {
            Del::Key(k) => {
                if !puts.contains_key(&k) {
                    deletes.push(EtcdDelete::Key(k));
                }
            }
            Del::Prefix(p) => {
                let end = prefix_end(&p);
                let mut from = p.clone();
                for kept in puts.keys().filter(|k| k.starts_with(&p)) {
                    if from < *kept {
                        deletes.push(EtcdDelete::Range(from, kept.clone()));
                    }
                    // The smallest key after `kept`.
                    from = [kept.as_slice(), &[0]].concat();
                }
                if from < end {
                    deletes.push(EtcdDelete::Range(from, end));
                }
            }
        }
    }
    Translated {
        compares,
        deletes,
        puts: puts.into_iter().collect(),
    }
}

impl Translated {
    fn to_etcd(&self) -> EtcdTxn {
        let mut compares = Vec::with_capacity(self.compares.len());
        for c in &self.compares {
            match c {
                EtcdCmp::Absent(k) => {
                    compares.push(EtcdCompare::create_revision(k.clone(), CompareOp::Equal, 0));
                }
                EtcdCmp::ModRevision(k, n) => {
                    compares.push(EtcdCompare::mod_revision(k.clone(), CompareOp::Equal, *n));
                }
                EtcdCmp::Never(k) => {
                    compares.push(EtcdCompare::create_revision(k.clone(), CompareOp::Equal, 0));
                    compares.push(EtcdCompare::create_revision(
                        k.clone(),
                        CompareOp::Greater,
                        0,
                    ));
                }
            }
        }
        let mut ops = Vec::with_capacity(self.deletes.len() + self.puts.len());
        for d in &self.deletes {
            ops.push(match d {
                EtcdDelete::Key(k) => TxnOp::delete(k.clone(), None),
                EtcdDelete::Range(start, end) => TxnOp::delete(
                    start.clone(),
                    Some(DeleteOptions::new().with_range(end.clone())),
                ),
            });
        }
        for (k, v) in &self.puts {
            ops.push(TxnOp::put(k.clone(), v.clone(), None));
        }
        EtcdTxn::new().when(compares).and_then(ops)
    }
}

/// The end of the range of keys that start with `prefix` (etcd's `range_end`): the
/// prefix with its last byte that is not 0xff incremented and the rest cut.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: etcd spells "to the end of the key space" as "\0".
    vec![0]
}

/// The key relative to `root`, or `None` (logged) for a key that is not ours.
fn strip_root(root: &str, key: Vec<u8>) -> Option<String> {
    let Some(rel) = key.strip_prefix(root.as_bytes()) else {
        tracing::warn!(key = %String::from_utf8_lossy(&key), root, "etcd returned a key outside the store root, ignored");
        return None;
    };
    match String::from_utf8(rel.to_vec()) {
        Ok(k) => Some(k),
        Err(_) => {
            tracing::warn!(key = %String::from_utf8_lossy(&key), "etcd holds a key that is not UTF-8 under the store root, ignored");
            None
        }
    }
}

fn validate_root(root: &str) -> Result<(), Error> {
    let reason = if root.is_empty() {
        "it is empty: the store would own every key of the etcd cluster"
    } else if !root.ends_with('/') {
        "it must end with `/`, so that another root cannot share its prefix"
    } else {
        return Ok(());
    };
    Err(Error::Root {
        root: root.to_owned(),
        reason,
    })
}

/// etcd revisions are positive `i64`s; a negative one (a broken server) reads as 0.
fn rev_to_index(rev: i64) -> Index {
    Index::try_from(rev).unwrap_or(0)
}

/// Raises `index` to `revision` if that is newer; returns the revision seen.
fn note_revision(index: &AtomicU64, revision: Option<i64>) -> Index {
    let rev = revision.map_or(0, rev_to_index);
    index.fetch_max(rev, Ordering::AcqRel);
    rev
}

/// Whether a failure is likely to pass: the member is unreachable, restarting, or
/// between leaders.
fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// Whether the request certainly did not reach etcd: the connection could not be
/// made, or the member refused it for lack of a leader before applying anything.
fn never_sent(e: &etcd_client::Error) -> bool {
    let status = match e {
        etcd_client::Error::TransportError(_) => return true,
        etcd_client::Error::GRpcStatus(s) => s,
        _ => return false,
    };
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    // etcd's ErrGRPCNoLeader, returned by the require-leader check before the
    // request is processed.
    if status.message() == "etcdserver: no leader" {
        return true;
    }
    // A connect failure surfaces as a status whose source chain holds the
    // connector's error; tonic and hyper name it this way.
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::HostUnreachable
            )
        {
            return true;
        }
        let text = s.to_string();
        if text.contains("error trying to connect") || text.contains("tcp connect error") {
            return true;
        }
        source = s.source();
    }
    false
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    // etcd's ErrGRPCCompacted.
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange && s.message().contains("compacted"))
}

/// Exponential backoff with jitter, so that the agents of a cluster that lost etcd
/// together do not all come back in the same instant.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new((min, max): (Duration, Duration)) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// A delay in `[current/2, current]`; the next one doubles, up to `max`.
    fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = base / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn range(start: &str, end: &str) -> EtcdDelete {
        EtcdDelete::Range(b(start), b(end))
    }

    #[test]
    fn translation_matches_in_order_semantics() {
        // (name, txn, expected deletes, expected puts)
        let cases: Vec<(&str, Txn, Vec<EtcdDelete>, Vec<(&str, &str)>)> = vec![
            (
                "plain put",
                Txn::new().put("a", "1"),
                vec![],
                vec![("/r/a", "1")],
            ),
            (
                "last put of a key wins",
                Txn::new().put("a", "1").put("a", "2"),
                vec![],
                vec![("/r/a", "2")],
            ),
            (
                "put then delete: deleted",
                Txn::new().put("a", "1").delete("a"),
                vec![EtcdDelete::Key(b("/r/a"))],
                vec![],
            ),
            (
                "delete then put: put only",
                Txn::new().delete("a").put("a", "1"),
                vec![],
                vec![("/r/a", "1")],
            ),
            (
                "delete prefix alone",
                Txn::new().delete_prefix("p/"),
                vec![range("/r/p/", "/r/p0")],
                vec![],
            ),
            (
                "put, delete prefix, put: the later put is cut out of the range",
                Txn::new().put("p/b", "2").delete_prefix("p/").put("p/c", "3"),
                vec![range("/r/p/", "/r/p/c"), range("/r/p/c\0", "/r/p0")],
                vec![("/r/p/c", "3")],
            ),
            (
                "several kept keys split the range",
                Txn::new()
                    .delete_prefix("p/")
                    .put("p/x", "1")
                    .put("p/a", "2")
                    .put("q", "3"),
                vec![
                    range("/r/p/", "/r/p/a"),
                    range("/r/p/a\0", "/r/p/x"),
                    range("/r/p/x\0", "/r/p0"),
                ],
                vec![("/r/p/a", "2"), ("/r/p/x", "1"), ("/r/q", "3")],
            ),
            (
                "a kept key equal to the prefix leaves no empty range",
                Txn::new().delete_prefix("p").put("p", "1"),
                vec![range("/r/p\0", "/r/q")],
                vec![("/r/p", "1")],
            ),
            (
                "the empty prefix covers the whole root",
                Txn::new().put("a", "1").delete_prefix(""),
                vec![range("/r/", "/r0")],
                vec![],
            ),
        ];
        for (name, txn, deletes, puts) in cases {
            let t = translate("/r/", &txn);
            assert_eq!(t.deletes, deletes, "{name}");
            let puts: Vec<(Vec<u8>, Vec<u8>)> =
                puts.into_iter().map(|(k, v)| (b(k), b(v))).collect();
            assert_eq!(t.puts, puts, "{name}");
        }
    }

    #[test]
    fn compares_translate_and_impossible_indexes_never_hold() {
        let txn = Txn::new()
            .when(Compare::Absent("a".into()))
            .when(Compare::ModIndex("b".into(), 7))
            .when(Compare::ModIndex("c".into(), 0))
            .when(Compare::ModIndex("d".into(), u64::MAX));
        assert_eq!(
            translate("/r/", &txn).compares,
            vec![
                EtcdCmp::Absent(b("/r/a")),
                EtcdCmp::ModRevision(b("/r/b"), 7),
                EtcdCmp::Never(b("/r/c")),
                EtcdCmp::Never(b("/r/d")),
            ]
        );
    }

    #[test]
    fn prefix_ends() {
        for (prefix, end) in [
            (&b"/connect/"[..], &b"/connect0"[..]),
            (b"a", b"b"),
            (b"a\xff", b"b"),
            (b"\xff\xff", b"\0"),
        ] {
            assert_eq!(prefix_end(prefix), end.to_vec(), "{prefix:?}");
        }
    }

    #[test]
    fn roots_must_be_nonempty_and_end_in_a_slash() {
        assert!(validate_root("/connect/").is_ok());
        assert!(validate_root("x/").is_ok());
        for bad in ["", "/connect"] {
            assert!(validate_root(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_outside_the_root_or_not_utf8_are_dropped() {
        assert_eq!(strip_root("/r/", b("/r/a/b")), Some("a/b".to_owned()));
        assert_eq!(strip_root("/r/", b("/other/a")), None);
        assert_eq!(strip_root("/r/", b"/r/\xff".to_vec()), None);
    }

    #[test]
    fn watch_events_group_by_revision_sorted_by_key() {
        use etcd_client::proto::{PbEvent, PbKeyValue};
        let ev = |t: i32, key: &str, rev: i64| PbEvent {
            r#type: t,
            kv: Some(PbKeyValue {
                key: b(key),
                create_revision: 1,
                mod_revision: rev,
                value: b("v"),
                ..Default::default()
            }),
            prev_kv: None,
        };
        let groups = group_by_revision(
            "/r/",
            vec![
                ev(0, "/r/b", 5),
                ev(1, "/r/a", 5),
                ev(7, "/r/c", 6),
                ev(0, "/elsewhere", 6),
                ev(0, "/r/d", 7),
            ],
        );
        let summary: Vec<(Index, Vec<String>)> = groups
            .iter()
            .map(|(r, g)| (*r, g.iter().map(|e| e.key().to_owned()).collect()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (5, vec!["a".to_owned(), "b".to_owned()]),
                (6, vec![]),
                (7, vec!["d".to_owned()]),
            ]
        );
        assert_eq!(
            groups[0].1[0],
            Event::Delete {
                key: "a".into(),
                index: 5
            }
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new((Duration::from_millis(100), Duration::from_secs(5)));
        let mut prev_cap = Duration::from_millis(100);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= prev_cap / 2 && d <= prev_cap, "{d:?} outside [{:?}, {prev_cap:?}]", prev_cap / 2);
            prev_cap = (prev_cap * 2).min(Duration::from_secs(5));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
