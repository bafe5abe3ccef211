//! Access control lists: who may call which endpoint, by token.
//!
//! [`Acl`] owns the tokens and policies in the [`Store`] (prefix `acl/`) and an
//! in-memory [`Snapshot`] that follows the store through a watch, so that resolving
//! the token of a request ([`Acl::resolve`]) is a hash and a map lookup with no I/O.
//! Each token's [`Authorizer`] is compiled when the snapshot is built.
//!
//! Store layout:
//! - `acl/bootstrap` → the accessor of the first management token, written once
//!   (guarded by `Compare::Absent`, so two racing bootstraps cannot both win, on one
//!   agent or on several sharing an etcd store);
//! - `acl/token/<accessor>` → [`model::TokenRecord`] (secret as SHA-256 only);
//! - `acl/secret/<sha256 hex>` → accessor, so a secret is unique and found at once;
//! - `acl/policy/<id>` → [`model::PolicyRecord`];
//! - `acl/policy-name/<name>` → id, so a name is unique.
//!
//! Writes are guarded transactions and wait (bounded) until the snapshot shows them.
//!
//! With ACLs disabled (`--dev` without `--acl-default-policy`, as Consul's dev mode)
//! every request is allowed and the ACL endpoints answer 401 `ACL support disabled`.
//! Not here: the HTTP extractor that applies rights to requests (`api::authz`), the
//! endpoints (`api::acl`) and the CLI (`cli::acl`).

pub mod authorizer;
pub mod model;
pub mod rules;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use self::model::{
    ANONYMOUS_ACCESSOR, HIDDEN_SECRET, MANAGEMENT_POLICY_ID, MANAGEMENT_POLICY_NAME,
    MANAGEMENT_RULES, PolicyJson, PolicyLinkJson, PolicyRecord, TokenJson, TokenRecord,
    content_hash, secret_hash,
};
pub use self::{
    authorizer::{Authorizer, DefaultPolicy, Right},
    model::{InputError, PolicyLink, PolicyRequest, TokenRequest},
    rules::{Access, Rules, RulesError},
};
use crate::store::{
    self, Compare, Event, Index, KeyValue, Listing, Projection, Store, Txn, TxnOutcome, View,
};

/// Every key of this module starts with this.
pub const PREFIX: &str = "acl/";
const BOOTSTRAP_KEY: &str = "acl/bootstrap";
const TOKEN_PREFIX: &str = "acl/token/";
const SECRET_PREFIX: &str = "acl/secret/";
const POLICY_PREFIX: &str = "acl/policy/";
const POLICY_NAME_PREFIX: &str = "acl/policy-name/";

/// How often a write retries after losing a check-and-set race.
const MAX_ATTEMPTS: usize = 8;
/// How long a write waits for the snapshot to show it (it is durable either way).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// Most tokens and policies one agent keeps: bounds memory and snapshot rebuilds.
pub const MAX_TOKENS: usize = 100_000;
pub const MAX_POLICIES: usize = 10_000;

/// How ACLs are configured on this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclConfig {
    pub enabled: bool,
    pub default_policy: DefaultPolicy,
    /// Policies and identities limited to other datacenters do not apply here.
    pub datacenter: String,
}

/// Why an ACL operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// ACLs are off on this agent (Consul: 401).
    #[error("ACL support disabled")]
    Disabled,
    /// The one-time bootstrap already happened.
    #[error("Permission denied: ACL bootstrap no longer allowed (reset index: {index})")]
    BootstrapDone { index: Index },
    /// The request's content is invalid (the client's fault).
    #[error(transparent)]
    Input(#[from] InputError),
    /// No token with this accessor, or no such policy (Consul: 403 `ACL not found`).
    #[error("ACL not found")]
    NotFound,
    /// A policy link names a policy that does not exist.
    #[error("cannot find policy {link}")]
    UnknownPolicy { link: String },
    /// A token or policy with this ID, name or secret exists already.
    #[error("Invalid {what}: {detail} already exists")]
    Duplicate { what: &'static str, detail: String },
    /// The builtin management policy or the anonymous token cannot be changed so.
    #[error("{what} is not permitted")]
    Builtin { what: &'static str },
    /// A token's secret cannot change.
    #[error("Changing a token's SecretID is not permitted")]
    SecretChange,
    /// The agent holds as many tokens or policies as it may.
    #[error("this cluster already has {max} ACL {what}; delete some first")]
    TooMany { what: &'static str, max: usize },
    /// Concurrent writers kept changing the same record.
    #[error("ACL {what} kept changing concurrently ({MAX_ATTEMPTS} attempts); try again")]
    Contention { what: String },
    /// The store failed or holds something we cannot read (our side).
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// A token in the snapshot, with its compiled authorizer.
#[derive(Debug)]
pub struct Token {
    pub record: TokenRecord,
    pub authorizer: Authorizer,
    pub create_index: Index,
    pub modify_index: Index,
}

/// A policy in the snapshot.
#[derive(Debug)]
pub struct Policy {
    pub record: PolicyRecord,
    pub rules: Rules,
    pub create_index: Index,
    pub modify_index: Index,
}

/// Who a request speaks for.
#[derive(Debug, Clone)]
pub enum Identity {
    /// ACLs are disabled: everything is allowed.
    Disabled,
    /// No token: the default policy alone.
    Anonymous(Arc<Authorizer>),
    Token(Arc<Token>),
    /// A secret no token has (Consul: 403 `ACL not found` wherever a right is needed).
    Unknown,
}

impl Identity {
    /// Whether this identity holds `right`. An unknown token holds nothing.
    pub fn allows(&self, right: Right<'_>) -> bool {
        match self {
            Identity::Disabled => true,
            Identity::Anonymous(a) => a.allows(right),
            Identity::Token(t) => t.authorizer.allows(right),
            Identity::Unknown => false,
        }
    }

    /// The accessor, for logs (never the secret).
    pub fn accessor(&self) -> Option<Uuid> {
        match self {
            Identity::Token(t) => Some(t.record.accessor_id),
            Identity::Anonymous(_) => Some(ANONYMOUS_ACCESSOR),
            Identity::Disabled | Identity::Unknown => None,
        }
    }
}

/// Everything ACL-related as of one store index. Immutable; replaced whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub index: Index,
    /// The bootstrap marker's modify index, once bootstrapped.
    pub bootstrapped_at: Option<Index>,
    pub tokens: BTreeMap<Uuid, Arc<Token>>,
    pub policies: BTreeMap<Uuid, Arc<Policy>>,
    policy_names: HashMap<String, Uuid>,
    by_secret: HashMap<[u8; 32], Arc<Token>>,
}

impl Snapshot {
    pub fn policy_by_name(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policy_names
            .get(name)
            .and_then(|id| self.policies.get(id))
    }

    /// Consul's token JSON, secret hidden.
    pub fn token_json(&self, t: &Token, secret: Option<&str>) -> TokenJson {
        TokenJson {
            accessor_id: t.record.accessor_id.to_string(),
            secret_id: secret.unwrap_or(HIDDEN_SECRET).to_owned(),
            description: t.record.description.clone(),
            policies: t
                .record
                .policies
                .iter()
                .filter_map(|id| self.policies.get(id))
                .map(|p| PolicyLinkJson {
                    id: p.record.id.to_string(),
                    name: p.record.name.clone(),
                })
                .collect(),
            service_identities: t.record.service_identities.clone(),
            node_identities: t.record.node_identities.clone(),
            local: t.record.local,
            create_time: t.record.create_time.clone(),
            hash: content_hash(&t.record),
            create_index: t.create_index,
            modify_index: t.modify_index,
        }
    }
}

/// Consul's policy JSON; `with_rules: false` gives the list stub.
pub fn policy_json(p: &Policy, with_rules: bool) -> PolicyJson {
    PolicyJson {
        id: p.record.id.to_string(),
        name: p.record.name.clone(),
        description: p.record.description.clone(),
        rules: with_rules.then(|| p.record.rules.clone()),
        datacenters: p.record.datacenters.clone(),
        hash: content_hash(&p.record),
        create_index: p.create_index,
        modify_index: p.modify_index,
    }
}

/// The ACL system of the cluster, as this agent sees it. See the module doc.
pub struct Acl {
    config: AclConfig,
    anonymous: Arc<Authorizer>,
    /// Tokens and policies, kept equal to `acl/`; following stops when this is dropped.
    view: View<Shared>,
    store: Arc<dyn Store>,
}

/// The [`Projection`] of `acl/`: the raw records, and the snapshot built from them
/// that requests read.
struct Shared {
    config: AclConfig,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Only the follower touches this.
    raw: Mutex<BTreeMap<String, KeyValue>>,
}

impl fmt::Debug for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Acl")
            .field("config", &self.config)
            .field("tokens", &s.tokens.len())
            .field("policies", &s.policies.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn snapshot(&self) -> Arc<Snapshot> {
        // The lock only guards an Arc swap, which cannot panic half-way.
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn publish(&self, snap: Snapshot) {
        let old = std::mem::replace(
            &mut *self
                .snapshot
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            Arc::new(snap),
        );
        drop(old);
    }

    fn raw(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, KeyValue>> {
        // Map inserts and removes of ready values cannot panic half-way.
        self.raw.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Projection for Shared {
    async fn reset(&self, listing: Listing) -> bool {
        let mut raw = self.raw();
        *raw = store::view::records_of(listing.items);
        self.publish(build_snapshot(&raw, listing.index, &self.config));
        true
    }

    async fn apply(&self, events: Vec<Event>, index: Index) {
        let mut raw = self.raw();
        store::view::apply_to(&mut raw, events);
        // One rebuild per batch: a burst of token writes rebuilds once.
        self.publish(build_snapshot(&raw, index, &self.config));
    }
}

impl Acl {
    /// Loads tokens and policies from `store` and starts following it. Needs a
    /// Tokio runtime.
    pub async fn start(store: Arc<dyn Store>, config: AclConfig) -> Result<Arc<Self>, Error> {
        let shared = Shared {
            config: config.clone(),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            raw: Mutex::new(BTreeMap::new()),
        };
        let view = View::start(store.clone(), PREFIX, shared).await?;
        let snap = view.get().snapshot();
        tracing::info!(
            enabled = config.enabled,
            default_policy = %config.default_policy,
            tokens = snap.tokens.len(),
            policies = snap.policies.len(),
            "ACLs loaded"
        );
        Ok(Arc::new(Self {
            anonymous: Arc::new(Authorizer::anonymous(config.default_policy)),
            config,
            view,
            store,
        }))
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn default_policy(&self) -> DefaultPolicy {
        self.config.default_policy
    }

    /// Whether intentions allow a connection no intention speaks about: ACLs
    /// disabled ⇒ allow; otherwise the default policy (reference §3).
    pub fn default_intention_allow(&self) -> bool {
        !self.config.enabled || self.config.default_policy == DefaultPolicy::Allow
    }

    /// Who presents `secret` (`None` or empty: anonymous). No I/O.
    pub fn resolve(&self, secret: Option<&str>) -> Identity {
        if !self.config.enabled {
            return Identity::Disabled;
        }
        match secret.filter(|s| !s.is_empty()) {
            None => Identity::Anonymous(self.anonymous.clone()),
            Some(s) => match self.snapshot().by_secret.get(&secret_hash(s)) {
                Some(t) => Identity::Token(t.clone()),
                None => Identity::Unknown,
            },
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.view.get().snapshot()
    }

    /// Changes whenever tokens or policies change (the value is the new index).
    pub fn subscribe(&self) -> watch::Receiver<Index> {
        self.view.subscribe()
    }

    fn require_enabled(&self) -> Result<(), Error> {
        if self.config.enabled {
            Ok(())
        } else {
            Err(Error::Disabled)
        }
    }

    /// Creates the first management token, once per cluster. Returns it with its
    /// secret (the only time the secret is shown).
    pub async fn bootstrap(&self) -> Result<(TokenJson, String), Error> {
        self.require_enabled()?;
        let accessor = Uuid::new_v4();
        let secret = Uuid::new_v4().to_string();
        let hash = secret_hash(&secret);
        let record = TokenRecord {
            accessor_id: accessor,
            secret_sha256: hex::encode(hash),
            description: "Bootstrap Token (Global Management)".to_owned(),
            policies: vec![MANAGEMENT_POLICY_ID],
            service_identities: vec![],
            node_identities: vec![],
            local: false,
            create_time: now_rfc3339(),
        };
        let policy = PolicyRecord {
            id: MANAGEMENT_POLICY_ID,
            name: MANAGEMENT_POLICY_NAME.to_owned(),
            description: "Builtin Policy that grants unlimited access".to_owned(),
            rules: MANAGEMENT_RULES.to_owned(),
            datacenters: vec![],
        };
        let txn = Txn::new()
            .when(Compare::Absent(BOOTSTRAP_KEY.to_owned()))
            .when(Compare::Absent(token_key(&accessor)))
            .put(BOOTSTRAP_KEY, accessor.to_string())
            .put(policy_key(&MANAGEMENT_POLICY_ID), encode(&policy)?)
            .put(
                policy_name_key(MANAGEMENT_POLICY_NAME),
                MANAGEMENT_POLICY_ID.to_string(),
            )
            .put(token_key(&accessor), encode(&record)?)
            .put(secret_key(&hash), accessor.to_string());
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { index } => {
                tracing::info!(accessor = %accessor, "ACL system bootstrapped");
                self.caught_up(index).await;
                let snap = self.snapshot();
                let t = snap.tokens.get(&accessor).ok_or(Error::NotFound)?;
                Ok((snap.token_json(t, Some(&secret)), secret))
            }
            TxnOutcome::Failed { .. } => {
                let index = self
                    .store
                    .get(BOOTSTRAP_KEY)
                    .await?
                    .map_or(0, |kv| kv.mod_index);
                Err(Error::BootstrapDone { index })
            }
        }
    }

    /// Resolves policy links to IDs against the current snapshot.
    fn policy_ids(&self, snap: &Snapshot, links: &[PolicyLink]) -> Result<Vec<Uuid>, Error> {
        let mut ids = Vec::with_capacity(links.len());
        for link in links {
            let id = match link {
                PolicyLink::Id(id) => snap.policies.get(id).map(|p| p.record.id),
                PolicyLink::Name(n) => snap.policy_by_name(n).map(|p| p.record.id),
            }
            .ok_or_else(|| Error::UnknownPolicy {
                link: match link {
                    PolicyLink::Id(id) => id.to_string(),
                    PolicyLink::Name(n) => format!("with name {n:?}"),
                },
            })?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Creates a token. Returns it with its secret (shown this once).
    pub async fn create_token(&self, req: TokenRequest) -> Result<(TokenJson, String), Error> {
        self.require_enabled()?;
        let snap = self.snapshot();
        if snap.tokens.len() >= MAX_TOKENS {
            return Err(Error::TooMany {
                what: "tokens",
                max: MAX_TOKENS,
            });
        }
        let accessor = req.accessor_id.unwrap_or_else(Uuid::new_v4);
        if accessor == ANONYMOUS_ACCESSOR || snap.tokens.contains_key(&accessor) {
            return Err(Error::Duplicate {
                what: "Token",
                detail: format!("a token with AccessorID {accessor}"),
            });
        }
        let secret = req.secret_id.unwrap_or_else(Uuid::new_v4).to_string();
        let hash = secret_hash(&secret);
        let record = TokenRecord {
            accessor_id: accessor,
            secret_sha256: hex::encode(hash),
            description: req.description,
            policies: self.policy_ids(&snap, &req.policies)?,
            service_identities: req.service_identities,
            node_identities: req.node_identities,
            local: req.local,
            create_time: now_rfc3339(),
        };
        let txn = Txn::new()
            .when(Compare::Absent(token_key(&accessor)))
            .when(Compare::Absent(secret_key(&hash)))
            .put(token_key(&accessor), encode(&record)?)
            .put(secret_key(&hash), accessor.to_string());
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { index } => {
                tracing::info!(%accessor, "ACL token created");
                self.caught_up(index).await;
                let snap = self.snapshot();
                let t = snap.tokens.get(&accessor).ok_or(Error::NotFound)?;
                Ok((snap.token_json(t, Some(&secret)), secret))
            }
            TxnOutcome::Failed { .. } => Err(Error::Duplicate {
                what: "Token",
                detail: "a token with this AccessorID or SecretID".to_owned(),
            }),
        }
    }

    /// Replaces a token's description, policies and identities; its secret stays.
    pub async fn update_token(
        &self,
        accessor: Uuid,
        req: TokenRequest,
    ) -> Result<TokenJson, Error> {
        self.require_enabled()?;
        if req.accessor_id.is_some_and(|a| a != accessor) {
            return Err(InputError::AccessorMismatch.into());
        }
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&token_key(&accessor)).await? else {
                return Err(Error::NotFound);
            };
            let old: TokenRecord = decode(&kv)?;
            if let Some(s) = req.secret_id
                && hex::encode(secret_hash(&s.to_string())) != old.secret_sha256
            {
                return Err(Error::SecretChange);
            }
            let snap = self.snapshot();
            let record = TokenRecord {
                description: req.description.clone(),
                policies: self.policy_ids(&snap, &req.policies)?,
                service_identities: req.service_identities.clone(),
                node_identities: req.node_identities.clone(),
                local: req.local,
                ..old
            };
            let txn = Txn::new()
                .when(Compare::ModIndex(kv.key.clone(), kv.mod_index))
                .put(kv.key.clone(), encode(&record)?);
            if let TxnOutcome::Committed { index } = self.store.txn(txn).await? {
                tracing::info!(%accessor, "ACL token updated");
                self.caught_up(index).await;
                let snap = self.snapshot();
                let t = snap.tokens.get(&accessor).ok_or(Error::NotFound)?;
                return Ok(snap.token_json(t, None));
            }
        }
        Err(Error::Contention {
            what: format!("token {accessor}"),
        })
    }

    /// Deletes a token; a missing one is not an error (Consul answers `true`).
    pub async fn delete_token(&self, accessor: Uuid) -> Result<(), Error> {
        self.require_enabled()?;
        if accessor == ANONYMOUS_ACCESSOR {
            return Err(Error::Builtin {
                what: "Deleting the anonymous token",
            });
        }
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&token_key(&accessor)).await? else {
                return Ok(());
            };
            let old: TokenRecord = decode(&kv)?;
            let txn = Txn::new()
                .when(Compare::ModIndex(kv.key.clone(), kv.mod_index))
                .delete(kv.key.clone())
                .delete(format!("{SECRET_PREFIX}{}", old.secret_sha256));
            if let TxnOutcome::Committed { index } = self.store.txn(txn).await? {
                tracing::info!(%accessor, "ACL token deleted");
                self.caught_up(index).await;
                return Ok(());
            }
        }
        Err(Error::Contention {
            what: format!("token {accessor}"),
        })
    }

    /// Creates a policy with a unique name.
    pub async fn create_policy(&self, req: PolicyRequest) -> Result<PolicyJson, Error> {
        self.require_enabled()?;
        let snap = self.snapshot();
        if snap.policies.len() >= MAX_POLICIES {
            return Err(Error::TooMany {
                what: "policies",
                max: MAX_POLICIES,
            });
        }
        let id = Uuid::new_v4();
        let record = PolicyRecord {
            id,
            name: req.name,
            description: req.description,
            rules: req.rules,
            datacenters: req.datacenters,
        };
        let txn = Txn::new()
            .when(Compare::Absent(policy_key(&id)))
            .when(Compare::Absent(policy_name_key(&record.name)))
            .put(policy_key(&id), encode(&record)?)
            .put(policy_name_key(&record.name), id.to_string());
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { index } => {
                tracing::info!(%id, name = %record.name, "ACL policy created");
                self.caught_up(index).await;
                let snap = self.snapshot();
                let p = snap.policies.get(&id).ok_or(Error::NotFound)?;
                Ok(policy_json(p, true))
            }
            TxnOutcome::Failed { .. } => Err(Error::Duplicate {
                what: "Policy",
                detail: format!("A Policy with Name {:?}", record.name),
            }),
        }
    }

    /// Replaces a policy; a new name must be free. The management policy's rules
    /// cannot change.
    pub async fn update_policy(&self, id: Uuid, req: PolicyRequest) -> Result<PolicyJson, Error> {
        self.require_enabled()?;
        if req.id.is_some_and(|i| i != id) {
            return Err(InputError::PolicyIdMismatch.into());
        }
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&policy_key(&id)).await? else {
                return Err(Error::NotFound);
            };
            let old: PolicyRecord = decode(&kv)?;
            if id == MANAGEMENT_POLICY_ID && (req.rules != old.rules || !req.datacenters.is_empty())
            {
                return Err(Error::Builtin {
                    what: "Changing the Rules or Datacenters of the builtin global-management policy",
                });
            }
            let record = PolicyRecord {
                id,
                name: req.name.clone(),
                description: req.description.clone(),
                rules: req.rules.clone(),
                datacenters: req.datacenters.clone(),
            };
            let mut txn = Txn::new()
                .when(Compare::ModIndex(kv.key.clone(), kv.mod_index))
                .put(kv.key.clone(), encode(&record)?);
            let renamed = old.name != record.name;
            if renamed {
                txn = txn
                    .when(Compare::Absent(policy_name_key(&record.name)))
                    .delete(policy_name_key(&old.name))
                    .put(policy_name_key(&record.name), id.to_string());
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { index } => {
                    tracing::info!(%id, name = %record.name, "ACL policy updated");
                    self.caught_up(index).await;
                    let snap = self.snapshot();
                    let p = snap.policies.get(&id).ok_or(Error::NotFound)?;
                    return Ok(policy_json(p, true));
                }
                TxnOutcome::Failed { .. } if renamed => {
                    if self
                        .store
                        .get(&policy_name_key(&record.name))
                        .await?
                        .is_some()
                    {
                        return Err(Error::Duplicate {
                            what: "Policy",
                            detail: format!("A Policy with Name {:?}", record.name),
                        });
                    }
                }
                TxnOutcome::Failed { .. } => {}
            }
        }
        Err(Error::Contention {
            what: format!("policy {id}"),
        })
    }

    /// Deletes a policy (tokens that linked it lose it); a missing one is fine.
    pub async fn delete_policy(&self, id: Uuid) -> Result<(), Error> {
        self.require_enabled()?;
        if id == MANAGEMENT_POLICY_ID {
            return Err(Error::Builtin {
                what: "Deletion of the builtin global-management policy",
            });
        }
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&policy_key(&id)).await? else {
                return Ok(());
            };
            let old: PolicyRecord = decode(&kv)?;
            let txn = Txn::new()
                .when(Compare::ModIndex(kv.key.clone(), kv.mod_index))
                .delete(kv.key.clone())
                .delete(policy_name_key(&old.name));
            if let TxnOutcome::Committed { index } = self.store.txn(txn).await? {
                tracing::info!(%id, name = %old.name, "ACL policy deleted");
                self.caught_up(index).await;
                return Ok(());
            }
        }
        Err(Error::Contention {
            what: format!("policy {id}"),
        })
    }

    async fn caught_up(&self, index: Index) {
        let mut rx = self.subscribe();
        let waited = tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|i| *i >= index)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(index, "ACL view lags behind a write");
        }
    }
}

fn now_rfc3339() -> String {
    crate::intentions::model::now_rfc3339()
}

fn token_key(accessor: &Uuid) -> String {
    format!("{TOKEN_PREFIX}{accessor}")
}

fn secret_key(hash: &[u8; 32]) -> String {
    format!("{SECRET_PREFIX}{}", hex::encode(hash))
}

fn policy_key(id: &Uuid) -> String {
    format!("{POLICY_PREFIX}{id}")
}

fn policy_name_key(name: &str) -> String {
    format!("{POLICY_NAME_PREFIX}{name}")
}

fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| {
        store::Error::Corrupt {
            key: PREFIX.to_owned(),
            reason: format!("cannot encode an ACL record: {e}"),
        }
        .into()
    })
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Error> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        store::Error::Corrupt {
            key: kv.key.clone(),
            reason: e.to_string(),
        }
        .into()
    })
}

/// Builds the snapshot from the raw records. A record that cannot be read is left
/// out and logged: a token that cannot be read grants nothing, and one bad policy
/// must not lock everyone out.
fn build_snapshot(raw: &BTreeMap<String, KeyValue>, index: Index, config: &AclConfig) -> Snapshot {
    let mut snap = Snapshot {
        index,
        bootstrapped_at: raw.get(BOOTSTRAP_KEY).map(|kv| kv.mod_index),
        ..Snapshot::default()
    };
    for kv in raw.values().filter(|kv| kv.key.starts_with(POLICY_PREFIX)) {
        let parsed = decode::<PolicyRecord>(kv).and_then(|record| {
            let rules = Rules::parse(&record.rules).map_err(|e| {
                Error::Store(store::Error::Corrupt {
                    key: kv.key.clone(),
                    reason: e.to_string(),
                })
            })?;
            Ok(Policy {
                record,
                rules,
                create_index: kv.create_index,
                modify_index: kv.mod_index,
            })
        });
        match parsed {
            Ok(p) => {
                snap.policy_names.insert(p.record.name.clone(), p.record.id);
                snap.policies.insert(p.record.id, Arc::new(p));
            }
            Err(error) => {
                tracing::error!(key = %kv.key, %error, "ignoring an unreadable ACL policy")
            }
        }
    }
    let dc = config.datacenter.as_str();
    for kv in raw.values().filter(|kv| kv.key.starts_with(TOKEN_PREFIX)) {
        let record: TokenRecord = match decode(kv) {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(key = %kv.key, %error, "ignoring an unreadable ACL token");
                continue;
            }
        };
        let Ok(hash) = <[u8; 32]>::try_from(hex::decode(&record.secret_sha256).unwrap_or_default())
        else {
            tracing::error!(key = %kv.key, "ignoring an ACL token without a valid secret hash");
            continue;
        };
        let identity_rules: Vec<Rules> = record
            .service_identities
            .iter()
            .filter(|si| si.applies_in(dc))
            .map(|si| si.rules())
            .chain(
                record
                    .node_identities
                    .iter()
                    .filter(|ni| ni.datacenter == dc)
                    .map(|ni| ni.rules()),
            )
            .collect();
        let policy_rules = record
            .policies
            .iter()
            .filter_map(|id| snap.policies.get(id))
            .filter(|p| {
                p.record.datacenters.is_empty() || p.record.datacenters.iter().any(|d| d == dc)
            })
            .map(|p| &p.rules);
        let authorizer = Authorizer::new(
            policy_rules.chain(identity_rules.iter()),
            config.default_policy,
        );
        let token = Arc::new(Token {
            record,
            authorizer,
            create_index: kv.create_index,
            modify_index: kv.mod_index,
        });
        snap.by_secret.insert(hash, token.clone());
        snap.tokens.insert(token.record.accessor_id, token);
    }
    snap
}

#[cfg(test)]
mod tests;
