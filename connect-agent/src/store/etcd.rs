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
//! and keep serving from it until etcd is back. As soon as any request or watch of the
//! store gets through again after connection failures, every watch waiting out its
//! backoff retries at once (`Reachability`): a write acknowledged right after an
//! outage is not followed by seconds in which this node's own caches miss it. Only
//! compacted history ends a watch, with [`WatchMessage::Resync`].
//!
//! Transactions: etcd rejects a transaction that puts a key it also deletes (a put
//! inside a deleted range, or two puts of one key), while [`Txn`] runs its operations
//! in order with later ones seeing earlier ones. [`translate`] (in `txn`) turns a [`Txn`] into the
//! equivalent etcd request: one put per surviving key, and the deleted ranges with
//! those keys cut out. One difference remains, documented on [`translate`]: a key
//! deleted and put again in one transaction keeps its create index here.
//!
//! Authentication: with [`EtcdOptions::user`] the client logs in as that etcd user;
//! what it may read and write is the user's roles' business (server agents:
//! `connect-server`, everything under the root; client agents: `connect-client`,
//! nothing under `<root>secrets/` and read-only `ca/` and `acl/`; see the README).
//! A permission error is not transient: it fails the request at once.
//!
//! Not here: TLS to etcd (plaintext gRPC only), leases, and the
//! caches that consumers build from watches (`cache`).

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::{
    sync::{mpsc, watch as signal},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    Index, KeyValue, Listing, Store, Txn, TxnOutcome, Watch, backoff::Backoff, memory::WATCH_BUFFER,
};
use crate::store;

mod txn;
mod watch;

use txn::prefix_end;
pub use txn::{EtcdCmp, EtcdDelete, Translated, translate};
use watch::WatchTask;

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
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(3));

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
    /// etcd user and password when etcd's authentication is on. The client logs
    /// in at connect time and again whenever etcd says the token went stale.
    pub user: Option<(String, String)>,
    /// TLS to etcd; `None` dials plaintext.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd, in PEM: the CA bundle etcd's certificates must chain to, and a
/// client certificate and key for an etcd that checks them. Its `Debug` shows
/// neither key nor certificates.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, String)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// What to check when etcd does not answer at startup.
fn unreachable_hint(tls: bool) -> &'static str {
    if tls {
        "check that etcd runs and listens there, that its certificate chains to --etcd-ca-file, and, if it checks clients, that it accepts --etcd-cert-file"
    } else {
        "check that etcd runs and listens there (an etcd that serves https needs --etcd-ca-file)"
    }
}

/// `host:port` as the client dials it: `https://host:port` with TLS. An
/// endpoint with a scheme keeps it (a mismatch then fails loudly at connect).
fn dial_url(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.to_owned(),
            startup_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            user: None,
            tls: None,
        }
    }
}

/// Failures of the etcd backend. The store trait reports them as [`store::Error`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Startup could not read from etcd in time: etcd is down, elsewhere, or has no
    /// quorum. The operator must act.
    #[error(
        "cannot reach etcd at {endpoints} (tried for {waited:.1?}): {cause}; {hint}",
        cause = Cause(source)
    )]
    Unreachable {
        endpoints: String,
        waited: Duration,
        /// What to check, which depends on whether TLS is on.
        hint: &'static str,
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
    /// etcd refused to log this user in (wrong user or password, or auth is off).
    #[error(
        "etcd at {endpoints} refused the login of user {user:?} (check --etcd-user-file): {source}"
    )]
    Auth {
        endpoints: String,
        user: String,
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

/// The root cause of a failed request in a few words ("Connection refused"), for
/// the one line an operator reads; the full chain stays available as `source`.
struct Cause<'a>(&'a Error);

impl fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Error::Request { source, .. } = self.0 else {
            return self.0.fmt(f);
        };
        let etcd_client::Error::GRpcStatus(status) = source else {
            return source.fmt(f);
        };
        // The innermost error names the cause best (an io::Error from the connect).
        let mut deepest: Option<&(dyn std::error::Error + 'static)> = None;
        let mut next = std::error::Error::source(status);
        while let Some(e) = next {
            deepest = Some(e);
            next = e.source();
        }
        match deepest {
            Some(e) => write!(f, "{}: {e}", status.message()),
            None => f.write_str(status.message()),
        }
    }
}

impl Error {
    /// Whether the failure says etcd is (for now) out of reach, rather than that the
    /// request itself was wrong.
    fn is_unavailable(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } | Error::ListRace { .. } => true,
            Error::Request { source, .. } => is_transient(source),
            Error::Endpoints { .. } | Error::Root { .. } | Error::Auth { .. } => false,
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

/// Whether etcd answers this store, shared by its requests and watch tasks, so that
/// watches backing off after an outage retry as soon as etcd is seen to answer again
/// instead of waiting out a delay of up to [`WATCH_BACKOFF`]'s cap.
#[derive(Debug)]
pub(crate) struct Reachability {
    /// Set by a connection-level failure, cleared by the next answer.
    down: AtomicBool,
    /// Counts the answers that ended a failing stretch; watch tasks wait for a change.
    recovered: signal::Sender<u64>,
}

impl Reachability {
    fn new() -> Self {
        Self {
            down: AtomicBool::new(false),
            recovered: signal::Sender::new(0),
        }
    }

    /// A request or watch failed the way an unreachable etcd makes them fail.
    pub(crate) fn failed(&self) {
        self.down.store(true, Ordering::Release);
    }

    /// etcd answered. The first answer after failures wakes the waiting watches; the
    /// wake-ups are as many as the failing stretches, so they cannot spin.
    pub(crate) fn answered(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            self.recovered.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver whose `changed()` fires at the next recovery.
    pub(crate) fn subscribe(&self) -> signal::Receiver<u64> {
        self.recovered.subscribe()
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
    reach: Arc<Reachability>,
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
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(KEEPALIVE.0, KEEPALIVE.1)
            // Ping idle connections too: a member cut off without a reset is then
            // dropped from the balance within about 8 s (the fastest etcd allows),
            // instead of holding the writes routed to it for 15 s.
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader answers with an error instead of
            // serving stale reads or holding a watch that will never see a write.
            .with_require_leader(true);
        if let Some(tls) = &opts.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(t);
        }
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| dial_url(e, opts.tls.is_some()))
            .collect();
        let endpoints = endpoints.as_slice();
        if let Some((user, password)) = &opts.user {
            connect = connect
                .with_user(user.clone(), password.clone())
                // Tokens expire (etcd's simple tokens after 5 idle minutes): log
                // in again when etcd says so.
                .with_auto_token_refresh(true);
        }
        let started = Instant::now();
        let deadline = started + opts.startup_timeout;
        let mut backoff = Backoff::new(REQUEST_BACKOFF.0, REQUEST_BACKOFF.1);
        // Without credentials connections are made lazily, on the first request,
        // and this fails only on malformed endpoints; with them, the client logs in
        // here, which needs etcd to answer.
        let client = loop {
            match Client::connect(endpoints, Some(connect.clone())).await {
                Ok(c) => break c,
                Err(source) if opts.user.is_some() && is_transient(&source) => {
                    let delay = backoff.next_wait();
                    if Instant::now() + delay >= deadline {
                        return Err(Error::Unreachable {
                            endpoints: joined,
                            waited: started.elapsed(),
                            hint: unreachable_hint(opts.tls.is_some()),
                            source: Box::new(Error::Request {
                                op: "log in",
                                source,
                            }),
                        });
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(source) if opts.user.is_some() => {
                    return Err(Error::Auth {
                        endpoints: joined,
                        user: opts.user.map(|u| u.0).unwrap_or_default(),
                        source,
                    });
                }
                Err(source) => {
                    return Err(Error::Endpoints {
                        endpoints: joined,
                        source,
                    });
                }
            }
        };
        let store = Self {
            client,
            root: opts.root,
            endpoints: joined,
            request_timeout: opts.request_timeout,
            index: Arc::new(AtomicU64::new(0)),
            reach: Arc::new(Reachability::new()),
            stop: CancellationToken::new(),
        };
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
                    let delay = backoff.next_wait();
                    if Instant::now() + delay >= deadline {
                        return Err(Error::Unreachable {
                            endpoints: store.endpoints.clone(),
                            waited: started.elapsed(),
                            hint: unreachable_hint(opts.tls.is_some()),
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
        let mut backoff = Backoff::new(REQUEST_BACKOFF.0, REQUEST_BACKOFF.1);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Ok(result) = tokio::time::timeout(remaining, call()).await else {
                self.reach.failed();
                return Err(Error::Timeout {
                    op,
                    after: self.request_timeout,
                });
            };
            let source = match result {
                Ok(v) => {
                    self.reach.answered();
                    return Ok(v);
                }
                Err(source) => source,
            };
            if is_transient(&source) {
                self.reach.failed();
            } else {
                // etcd answered, if only to refuse this request.
                self.reach.answered();
            }
            let retry = if idempotent {
                is_transient(&source)
            } else {
                never_sent(&source)
            };
            let delay = backoff.next_wait();
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
                Err(Error::Request { source, .. })
                    if read_at.is_some() && is_compacted(&source) =>
                {
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
            items.extend(kvs.into_iter().filter_map(|kv| self.own_kv(kv)));
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
    fn own_kv(&self, kv: etcd_client::KeyValue) -> Option<KeyValue> {
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
            .and_then(|kv| self.own_kv(kv)))
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
            reach: self.reach.clone(),
            stop: self.stop.clone(),
            open_timeout: self.request_timeout,
            pending: Vec::new(),
            pending_bytes: 0,
        };
        tokio::spawn(task.run());
        Ok(Watch { rx })
    }
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
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                // What a request gets when its connection closes under it.
                | tonic::Code::Cancelled
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
    // request is processed; and tonic's status for a failed connect (the request
    // was never written to a connection).
    if matches!(
        status.message(),
        "etcdserver: no leader" | "tcp connect error" | "error trying to connect"
    ) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
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
    fn only_requests_that_never_reached_etcd_count_as_unsent() {
        use etcd_client::Error as E;
        use tonic::Status;
        let cases: Vec<(&str, E, bool, bool)> = vec![
            // (name, error, never_sent, transient)
            (
                "connect refused",
                E::GRpcStatus(Status::unavailable("tcp connect error")),
                true,
                true,
            ),
            (
                "no leader",
                E::GRpcStatus(Status::unavailable("etcdserver: no leader")),
                true,
                true,
            ),
            (
                "timed out in raft",
                E::GRpcStatus(Status::unavailable("etcdserver: request timed out")),
                false,
                true,
            ),
            (
                "leader changed",
                E::GRpcStatus(Status::unavailable("etcdserver: leader changed")),
                false,
                true,
            ),
            (
                "connection reset",
                E::GRpcStatus(Status::unknown("transport error")),
                false,
                true,
            ),
            (
                "connection closed",
                E::GRpcStatus(Status::cancelled("operation was canceled")),
                false,
                true,
            ),
            (
                "too many ops",
                E::GRpcStatus(Status::invalid_argument(
                    "etcdserver: too many operations in txn request",
                )),
                false,
                false,
            ),
            (
                "compacted",
                E::GRpcStatus(Status::out_of_range(
                    "etcdserver: mvcc: required revision has been compacted",
                )),
                false,
                false,
            ),
        ];
        for (name, e, sent, transient) in cases {
            assert_eq!(never_sent(&e), sent, "{name}: never_sent");
            assert_eq!(is_transient(&e), transient, "{name}: transient");
        }
        assert!(is_compacted(&E::GRpcStatus(Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted"
        ))));
    }

    #[test]
    fn only_the_first_answer_after_failures_wakes_the_watches() {
        let reach = Reachability::new();
        let mut rx = reach.subscribe();
        rx.borrow_and_update();
        reach.answered();
        assert!(!rx.has_changed().unwrap_or(true), "no failure, no wake-up");
        reach.failed();
        reach.failed();
        assert!(!rx.has_changed().unwrap_or(true), "failures wake nobody");
        reach.answered();
        assert!(rx.has_changed().unwrap_or(false), "etcd is back");
        rx.borrow_and_update();
        reach.answered();
        assert!(!rx.has_changed().unwrap_or(true), "one wake-up per outage");
    }
}
