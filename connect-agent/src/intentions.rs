//! Intentions: which service may connect to which, and the authorization decision
//! built on them.
//!
//! [`Intentions`] owns the intentions' durable form in the [`Store`] and an in-memory
//! [`Table`] that follows the store through a watch, so that [`Intentions::authorize`]
//! — called by the HTTP authorize endpoint and by the proxy for every inbound
//! connection — does no I/O and takes only a short read lock (no `.await`, one `Arc`
//! clone). [`Intentions::subscribe`] tells blocking queries, and the proxy's live
//! connection registry, when intentions changed.
//!
//! Store layout (prefix `intentions/`):
//! - `intentions/format` → the record format version ([`FORMAT`]), written at first
//!   start; an agent refuses to run on a newer format than it knows;
//! - `intentions/id/<uuid>` → the intention ([`model::Record`], JSON);
//! - `intentions/pair/<destination>/<source>` → the UUID of the intention for that
//!   pair. Every write guards both keys with [`Compare`] clauses in one transaction,
//!   so a duplicate pair is refused atomically and ID and pair never disagree, on one
//!   node or across nodes sharing an etcd store.
//!
//! Writes wait (bounded) until the table has caught up with their commit, so a client
//! reads its own writes from this agent.
//!
//! Not here: HTTP shapes (`api::intentions`), the CLI (`cli::intention`), ACLs (the
//! default decision is `config.default_allow`, which `config` derives from the ACL
//! default policy; rights on intentions are checked in `api`), and the trust
//! domain, which the caller passes to [`Intentions::authorize_client`] once a CA
//! exists.

pub mod filter;
pub mod model;
pub mod table;

use std::{
    fmt,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use self::model::Record;
pub use self::{
    model::{Action, ApiIntention, Body, InputError, Intention, Selector, Spec},
    table::{Decision, MatchBy, Reason, Table},
};
use crate::{
    identity::{ServiceName, SpiffeId, TrustDomain},
    store::{
        self, Compare, Event, Index, KeyValue, Listing, Projection, Store, Txn, TxnOutcome, View,
    },
};

/// Every key of this module starts with this.
pub const PREFIX: &str = "intentions/";
const ID_PREFIX: &str = "intentions/id/";
const FORMAT_KEY: &str = "intentions/format";
/// Version of the records under `intentions/id/`.
pub const FORMAT: u32 = 1;
const PAIR_PREFIX: &str = "intentions/pair/";

/// How often a write retries after losing a check-and-set race before giving up.
const MAX_ATTEMPTS: usize = 8;
/// How long a write waits for the in-memory table to show it. The write is durable
/// either way; this only bounds how stale a read right after it can be.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an intention operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's content is invalid (the client's fault).
    #[error(transparent)]
    Input(#[from] InputError),
    /// Another intention already holds this source/destination pair.
    #[error("duplicate intention found: {existing}")]
    Duplicate { existing: String },
    /// No intention has this ID (get, delete).
    #[error("Intention not found")]
    NotFound { id: Uuid },
    /// An update named an ID that does not exist.
    #[error("Cannot modify non-existent intention: '{id}'")]
    ModifyMissing { id: Uuid },
    /// A delete named an ID that does not exist.
    #[error("Cannot delete non-existent intention: '{id}'")]
    DeleteMissing { id: Uuid },
    /// Concurrent writers kept changing the same intention.
    #[error("intention {what} kept changing concurrently ({attempts} attempts); try again")]
    Contention { what: String, attempts: usize },
    /// The store holds intentions in a format this agent does not know (an agent of
    /// a newer version wrote them): upgrade this agent.
    #[error(
        "the stored intentions use format {found}, this agent knows up to {FORMAT}: upgrade the agent"
    )]
    NewerFormat { found: u32 },
    /// The store failed or holds something we cannot read (our side).
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl crate::fault::Blame for Error {
    fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            Error::Input(_) => Fault::Caller,
            Error::Duplicate { .. } | Error::Contention { .. } => Fault::Conflict,
            Error::NotFound { .. } | Error::ModifyMissing { .. } | Error::DeleteMissing { .. } => {
                Fault::NotFound
            }
            Error::NewerFormat { .. } | Error::Store(_) => Fault::Ours,
        }
    }
}

/// The intentions of the cluster, as this agent sees them. See the module doc.
pub struct Intentions {
    /// The table, kept equal to the store; following stops when this is dropped.
    view: View<Shared>,
    default_allow: bool,
    store: Arc<dyn Store>,
}

/// The in-memory table: the [`Projection`] of `intentions/id/`.
#[derive(Debug, Default)]
struct Shared {
    table: RwLock<Table>,
}

impl fmt::Debug for Intentions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intentions")
            .field("table", &*self.view.get().read())
            .field("default_allow", &self.default_allow)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // Writers replace or patch the table with operations that cannot panic
        // half-way (map inserts/removes of ready values), so a poisoned lock still
        // guards a consistent table.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Intentions {
    /// Loads every intention from `store` and starts following it. `default_allow`
    /// decides when no intention matches (allow in `--dev`, deny otherwise, until
    /// ACLs provide a default policy). Needs a Tokio runtime.
    pub async fn start(store: Arc<dyn Store>, default_allow: bool) -> Result<Arc<Self>, Error> {
        check_format(store.as_ref()).await?;
        let view = View::start(store.clone(), ID_PREFIX, Shared::default()).await?;
        tracing::info!(
            intentions = view.get().read().len(),
            index = view.index(),
            "intentions loaded"
        );
        Ok(Arc::new(Self {
            view,
            default_allow,
            store,
        }))
    }

    // ─────────────────────── decisions (no I/O) ───────────────────────

    /// Whether `source` may connect to `destination`: the first intention in
    /// Consul's evaluation order that matches, else the default policy.
    pub fn authorize(&self, source: &ServiceName, destination: &ServiceName) -> Decision {
        self.view
            .get()
            .read()
            .decide(source.as_str(), destination.as_str(), self.default_allow)
    }

    /// [`Intentions::authorize`] for a client certificate's SPIFFE ID. When
    /// `expected_trust_domain` is given (the CA's, once a CA exists), an ID from any
    /// other trust domain is denied; `None` skips that check, as later Consul
    /// versions do. The ID's datacenter is ignored (reference §4.1).
    pub fn authorize_client(
        &self,
        destination: &ServiceName,
        client: &SpiffeId,
        expected_trust_domain: Option<&TrustDomain>,
    ) -> Decision {
        if let Some(expected) = expected_trust_domain
            && *expected != client.trust_domain
        {
            return Decision {
                action: Action::Deny,
                reason: Reason::ExternalTrustDomain(client.trust_domain.clone()),
            };
        }
        self.authorize(&client.service, destination)
    }

    /// The decision for a pair of names that may be `*` (`intentions/check`).
    pub fn check(&self, source: &Selector, destination: &Selector) -> Decision {
        self.view
            .get()
            .read()
            .decide(source.as_str(), destination.as_str(), self.default_allow)
    }

    /// The decision when no intention matches.
    pub fn default_allow(&self) -> bool {
        self.default_allow
    }

    /// The store index the in-memory intentions reflect.
    pub fn index(&self) -> Index {
        self.view.get().read().index()
    }

    /// Changes whenever the intentions change (the value is the new index). For
    /// blocking queries and for re-checking live connections.
    pub fn subscribe(&self) -> watch::Receiver<Index> {
        self.view.subscribe()
    }

    // ─────────────────────── reads (no I/O) ───────────────────────

    /// Every intention in evaluation order, and the index of the view.
    pub fn list(&self) -> (Vec<Arc<Intention>>, Index) {
        let t = self.view.get().read();
        (t.all(), t.index())
    }

    pub fn get(&self, id: &Uuid) -> (Option<Arc<Intention>>, Index) {
        let t = self.view.get().read();
        (t.get(id).cloned(), t.index())
    }

    pub fn exact(
        &self,
        source: &Selector,
        destination: &Selector,
    ) -> (Option<Arc<Intention>>, Index) {
        let t = self.view.get().read();
        (t.exact(source, destination).cloned(), t.index())
    }

    /// For each name, the intentions that apply to it by source or destination, in
    /// evaluation order.
    pub fn matching(&self, by: MatchBy, names: &[Selector]) -> (Vec<Vec<Arc<Intention>>>, Index) {
        let t = self.view.get().read();
        let lists = names.iter().map(|n| t.matching(by, n.as_str())).collect();
        (lists, t.index())
    }

    // ─────────────────────── writes ───────────────────────

    /// Creates an intention; refuses a pair that already has one. Returns its ID.
    pub async fn create(&self, spec: Spec) -> Result<Uuid, Error> {
        let pair = pair_key(&spec.source, &spec.destination);
        for _ in 0..MAX_ATTEMPTS {
            let id = Uuid::new_v4();
            let now = model::now_rfc3339();
            let record = Record::new(id, &spec, now.clone(), now);
            let txn = Txn::new()
                .when(Compare::Absent(pair.clone()))
                .when(Compare::Absent(id_key(&id)))
                .put(id_key(&id), encode(&record)?)
                .put(pair.clone(), id.to_string());
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { index } => {
                    tracing::info!(%id, source = %spec.source, destination = %spec.destination,
                        action = %spec.action, "intention created");
                    self.caught_up(index).await;
                    return Ok(id);
                }
                TxnOutcome::Failed { .. } => {
                    if let Some(existing) = self.holder(&pair).await? {
                        return Err(Error::Duplicate {
                            existing: existing.server_string(),
                        });
                    }
                    // The pair was freed meanwhile, or (never in practice) the UUID
                    // collided: try again.
                }
            }
        }
        Err(contention(&spec.source, &spec.destination))
    }

    /// Replaces the intention `id` with `spec` (the legacy `PUT /intentions/:id`),
    /// possibly moving it to another pair, which must be free.
    pub async fn update(&self, id: Uuid, spec: Spec) -> Result<(), Error> {
        let key = id_key(&id);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(Error::ModifyMissing { id });
            };
            let old = decode(&kv)?;
            let old_spec = old.spec().map_err(|e| corrupt(&kv.key, &e))?;
            let record = Record::new(id, &spec, old.created_at, model::now_rfc3339());
            let mut txn = Txn::new()
                .when(Compare::ModIndex(key.clone(), kv.mod_index))
                .put(key.clone(), encode(&record)?);
            let new_pair = pair_key(&spec.source, &spec.destination);
            let moved = old_spec.source != spec.source || old_spec.destination != spec.destination;
            if moved {
                txn = txn
                    .when(Compare::Absent(new_pair.clone()))
                    .delete(pair_key(&old_spec.source, &old_spec.destination))
                    .put(new_pair.clone(), id.to_string());
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { index } => {
                    tracing::info!(%id, source = %spec.source, destination = %spec.destination,
                        action = %spec.action, "intention updated");
                    self.caught_up(index).await;
                    return Ok(());
                }
                TxnOutcome::Failed { .. } if moved => {
                    if let Some(existing) = self.holder(&new_pair).await?
                        && existing.id != id
                    {
                        return Err(Error::Duplicate {
                            existing: existing.server_string(),
                        });
                    }
                }
                TxnOutcome::Failed { .. } => {}
            }
        }
        Err(contention(&spec.source, &spec.destination))
    }

    /// Creates or updates the intention of a pair (the 1.9+ exact API). `Meta` may
    /// not be set on create, nor changed on update (Consul's rule); an empty `Meta`
    /// keeps the existing one. Returns the intention's ID.
    pub async fn upsert(
        &self,
        source: Selector,
        destination: Selector,
        action: Action,
        description: String,
        meta: std::collections::BTreeMap<String, String>,
    ) -> Result<Uuid, Error> {
        let pair = pair_key(&source, &destination);
        for _ in 0..MAX_ATTEMPTS {
            let (txn, id) = match self.store.get(&pair).await? {
                None => {
                    if !meta.is_empty() {
                        return Err(InputError::MetaNotAllowed.into());
                    }
                    let id = Uuid::new_v4();
                    let now = model::now_rfc3339();
                    let spec = Spec {
                        source: source.clone(),
                        destination: destination.clone(),
                        action,
                        description: description.clone(),
                        meta: meta.clone(),
                    };
                    let txn = Txn::new()
                        .when(Compare::Absent(pair.clone()))
                        .when(Compare::Absent(id_key(&id)))
                        .put(
                            id_key(&id),
                            encode(&Record::new(id, &spec, now.clone(), now))?,
                        )
                        .put(pair.clone(), id.to_string());
                    (txn, id)
                }
                Some(pkv) => {
                    let id = pair_target(&pkv)?;
                    let Some(kv) = self.store.get(&id_key(&id)).await? else {
                        // Deleted between the two reads (a delete removes both keys
                        // in one transaction): start over.
                        continue;
                    };
                    let old = decode(&kv)?;
                    if !meta.is_empty() && meta != old.meta {
                        return Err(InputError::MetaChanged.into());
                    }
                    let spec = Spec {
                        source: source.clone(),
                        destination: destination.clone(),
                        action,
                        description: description.clone(),
                        meta: old.meta,
                    };
                    let record = Record::new(id, &spec, old.created_at, model::now_rfc3339());
                    let txn = Txn::new()
                        .when(Compare::ModIndex(pair.clone(), pkv.mod_index))
                        .when(Compare::ModIndex(kv.key.clone(), kv.mod_index))
                        .put(kv.key, encode(&record)?);
                    (txn, id)
                }
            };
            if let TxnOutcome::Committed { index } = self.store.txn(txn).await? {
                tracing::info!(%id, %source, %destination, %action, "intention upserted");
                self.caught_up(index).await;
                return Ok(id);
            }
        }
        Err(contention(&source, &destination))
    }

    /// Deletes the intention `id`.
    pub async fn delete(&self, id: Uuid) -> Result<(), Error> {
        let key = id_key(&id);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(Error::DeleteMissing { id });
            };
            let spec = decode(&kv)?.spec().map_err(|e| corrupt(&kv.key, &e))?;
            let txn = Txn::new()
                .when(Compare::ModIndex(key.clone(), kv.mod_index))
                .delete(key.clone())
                .delete(pair_key(&spec.source, &spec.destination));
            if let TxnOutcome::Committed { index } = self.store.txn(txn).await? {
                tracing::info!(%id, source = %spec.source, destination = %spec.destination,
                    "intention deleted");
                self.caught_up(index).await;
                return Ok(());
            }
        }
        Err(Error::Contention {
            what: id.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Deletes the intention of a pair; none is fine (Consul answers `true`).
    pub async fn delete_exact(
        &self,
        source: &Selector,
        destination: &Selector,
    ) -> Result<(), Error> {
        let pair = pair_key(source, destination);
        for _ in 0..MAX_ATTEMPTS {
            let Some(pkv) = self.store.get(&pair).await? else {
                return Ok(());
            };
            let id = pair_target(&pkv)?;
            let txn = Txn::new()
                .when(Compare::ModIndex(pair.clone(), pkv.mod_index))
                .delete(id_key(&id))
                .delete(pair.clone());
            if let TxnOutcome::Committed { index } = self.store.txn(txn).await? {
                tracing::info!(%id, %source, %destination, "intention deleted");
                self.caught_up(index).await;
                return Ok(());
            }
        }
        Err(contention(source, destination))
    }

    /// The intention holding `pair` in the store, if any.
    async fn holder(&self, pair: &str) -> Result<Option<Intention>, Error> {
        let Some(pkv) = self.store.get(pair).await? else {
            return Ok(None);
        };
        let id = pair_target(&pkv)?;
        match self.store.get(&id_key(&id)).await? {
            Some(kv) => Ok(Some(to_intention(&kv)?)),
            None => Ok(None),
        }
    }

    /// Waits, bounded, until the table reflects store index `index`.
    async fn caught_up(&self, index: Index) {
        let mut rx = self.subscribe();
        let waited = tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|i| *i >= index)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(
                index,
                seen = self.index(),
                "intentions view lags behind a write"
            );
        }
    }
}

/// Writes the format marker on first start, and refuses a newer format. Besides
/// versioning the records, the marker guarantees that the view's index is at least 1
/// before any intention exists: `X-Consul-Index` is never 0 (0 reads as 1), so
/// without it a client blocking on index 1 of an empty store would miss the first
/// intention, which the store commits at index 1.
async fn check_format(store: &dyn Store) -> Result<(), Error> {
    let txn = Txn::new()
        .when(Compare::Absent(FORMAT_KEY.to_owned()))
        .put(FORMAT_KEY, FORMAT.to_string());
    if store.txn(txn).await?.is_committed() {
        return Ok(());
    }
    let Some(kv) = store.get(FORMAT_KEY).await? else {
        // Deleted right after our guard saw it: nothing to check against.
        return Ok(());
    };
    let found: u32 = std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| store::Error::Corrupt {
            key: kv.key.clone(),
            reason: "the format version is not a number".into(),
        })?;
    if found > FORMAT {
        return Err(Error::NewerFormat { found });
    }
    Ok(())
}

fn contention(source: &Selector, destination: &Selector) -> Error {
    Error::Contention {
        what: format!("{source} => {destination}"),
        attempts: MAX_ATTEMPTS,
    }
}

// ─────────────────────── keys and records ───────────────────────

fn id_key(id: &Uuid) -> String {
    format!("{ID_PREFIX}{id}")
}

/// Destination first, so that one destination's intentions share a key prefix.
/// Names cannot contain `/` (see `identity::ServiceName`), so the key is unambiguous.
fn pair_key(source: &Selector, destination: &Selector) -> String {
    format!("{PAIR_PREFIX}{destination}/{source}")
}

fn pair_target(kv: &KeyValue) -> Result<Uuid, Error> {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            store::Error::Corrupt {
                key: kv.key.clone(),
                reason: "the value is not an intention ID".into(),
            }
            .into()
        })
}

fn encode(record: &Record) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| {
        store::Error::Corrupt {
            key: id_key(&record.id),
            reason: format!("cannot encode the intention: {e}"),
        }
        .into()
    })
}

fn decode(kv: &KeyValue) -> Result<Record, Error> {
    let record: Record = serde_json::from_slice(&kv.value).map_err(|e| store::Error::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })?;
    if kv.key.strip_prefix(ID_PREFIX) != Some(record.id.to_string().as_str()) {
        return Err(store::Error::Corrupt {
            key: kv.key.clone(),
            reason: format!("the record's ID {} does not match its key", record.id),
        }
        .into());
    }
    Ok(record)
}

fn corrupt(key: &str, e: &InputError) -> Error {
    store::Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    }
    .into()
}

fn to_intention(kv: &KeyValue) -> Result<Intention, Error> {
    let record = decode(kv)?;
    let spec = record.spec().map_err(|e| corrupt(&kv.key, &e))?;
    Ok(Intention::new(
        record.id,
        spec,
        record.created_at,
        record.updated_at,
        kv.create_index,
        kv.mod_index,
    ))
}

/// A table of the listed records. A record that cannot be read is left out and
/// logged: one bad record must not take every intention down with it.
fn build_table(items: &[KeyValue], index: Index) -> Table {
    Table::from_intentions(
        index,
        items.iter().filter_map(|kv| match to_intention(kv) {
            Ok(i) => Some(i),
            Err(error) => {
                tracing::error!(key = %kv.key, %error, "ignoring an unreadable intention");
                None
            }
        }),
    )
}

// ─────────────────────── following the store ───────────────────────

/// One change to the table, decoded before the lock is taken.
enum Change {
    Put(Arc<Intention>),
    Remove(Uuid),
}

fn changes_of(events: Vec<Event>, out: &mut Vec<Change>) {
    for ev in events {
        let Some(id) = ev
            .key()
            .strip_prefix(ID_PREFIX)
            .and_then(|s| Uuid::parse_str(s).ok())
        else {
            continue;
        };
        match ev {
            Event::Put(kv) => match to_intention(&kv) {
                Ok(i) => out.push(Change::Put(Arc::new(i))),
                Err(error) => {
                    // Drop what we had: a stale copy would keep deciding as if the
                    // intention had not changed.
                    tracing::error!(key = %kv.key, %error, "ignoring an unreadable intention");
                    out.push(Change::Remove(id));
                }
            },
            Event::Delete { .. } => out.push(Change::Remove(id)),
        }
    }
}

#[async_trait]
impl Projection for Shared {
    async fn reset(&self, listing: Listing) -> bool {
        let table = build_table(&listing.items, listing.index);
        // Swap under the lock, free the old table after it: dropping 100 000
        // intentions takes milliseconds that authorize must not wait for.
        let old = std::mem::replace(&mut *self.write(), table);
        drop(old);
        true
    }

    async fn apply(&self, events: Vec<Event>, index: Index) {
        // Decode before taking the lock, so that readers wait only for the inserts.
        let mut changes = Vec::with_capacity(events.len());
        changes_of(events, &mut changes);
        let mut t = self.write();
        for c in changes {
            match c {
                Change::Put(i) => t.insert(i),
                Change::Remove(id) => {
                    t.remove(&id);
                }
            }
        }
        let newest = index.max(t.index());
        t.set_index(newest);
    }
}

#[cfg(test)]
mod tests;
