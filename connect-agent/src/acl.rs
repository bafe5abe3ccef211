//! Access control lists: who may call which endpoint, by token.
//!
//! [`Acl`] owns the tokens and policies in the [`Store`] (prefix `acl/`) and an
//! in-memory [`Snapshot`] that follows the store through a watch, so that resolving
//! the token of a request ([`Acl::resolve`]) is a hash and a map lookup with no I/O.
//! Each token's [`Grants`] is compiled when the snapshot is built.
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

pub mod grants;
pub mod model;
mod records;
pub mod rules;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod writes;

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
use self::records::build_snapshot;
pub use self::{
    grants::{DefaultPolicy, Grants, Right},
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

impl crate::fault::Blame for Error {
    fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            Error::Disabled => Fault::Disabled,
            // Consul answers an unknown token, and a second bootstrap, with 403.
            Error::NotFound | Error::BootstrapDone { .. } => Fault::Forbidden,
            Error::Input(_)
            | Error::UnknownPolicy { .. }
            | Error::Duplicate { .. }
            | Error::Builtin { .. }
            | Error::SecretChange => Fault::Caller,
            Error::TooMany { .. } | Error::Contention { .. } => Fault::Conflict,
            Error::Store(_) => Fault::Ours,
        }
    }
}

/// A token in the snapshot, with its compiled grants.
#[derive(Debug)]
pub struct Token {
    pub record: TokenRecord,
    pub grants: Grants,
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
pub enum Caller {
    /// ACLs are disabled: everything is allowed.
    Disabled,
    /// No token: the default policy alone.
    Anonymous(Arc<Grants>),
    Token(Arc<Token>),
    /// A secret no token has (Consul: 403 `ACL not found` wherever a right is needed).
    Unknown,
}

impl Caller {
    /// Whether this identity holds `right`. An unknown token holds nothing.
    pub fn allows(&self, right: Right<'_>) -> bool {
        match self {
            Caller::Disabled => true,
            Caller::Anonymous(a) => a.allows(right),
            Caller::Token(t) => t.grants.allows(right),
            Caller::Unknown => false,
        }
    }

    /// The accessor, for logs (never the secret).
    pub fn accessor(&self) -> Option<Uuid> {
        match self {
            Caller::Token(t) => Some(t.record.accessor_id),
            Caller::Anonymous(_) => Some(ANONYMOUS_ACCESSOR),
            Caller::Disabled | Caller::Unknown => None,
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
    anonymous: Arc<Grants>,
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
            anonymous: Arc::new(Grants::anonymous(config.default_policy)),
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
    pub fn resolve(&self, secret: Option<&str>) -> Caller {
        if !self.config.enabled {
            return Caller::Disabled;
        }
        match secret.filter(|s| !s.is_empty()) {
            None => Caller::Anonymous(self.anonymous.clone()),
            Some(s) => match self.snapshot().by_secret.get(&secret_hash(s)) {
                Some(t) => Caller::Token(t.clone()),
                None => Caller::Unknown,
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
}

#[cfg(test)]
mod tests;
