//! The CA's durable records under the store prefix `ca/` and the in-memory
//! snapshot ([`CaState`]) built from them.
//!
//! Keys: `ca/cluster` (cluster id, trust domain), `ca/config` (the configuration
//! document), `ca/roots/<hex id>` (one record per root, public),
//! `secrets/ca/keys/<hex id>` (that root's private key, PKCS#8 PEM), and each
//! root's JWT signing key, `ca/jwt/<hex id>` and `secrets/ca/keys/jwt/<hex id>`
//! ([`super::jwt`]). The keys live
//! outside `ca/` on purpose: on etcd, [`SECRETS_PREFIX`] is the one range that the
//! `connect-client` role cannot read, so client agents list and watch `ca/` (the
//! trust bundle) without touching a key. Stores written before this layout kept the
//! keys under `ca/keys/`; [`CaState::load`] still finds them there. Every write is a guarded transaction
//! built here: first start with `Compare::Absent` (several agents may start at once
//! on one etcd), rotation and pruning with `Compare::ModIndex`. This module does not
//! watch the store or issue leaves; the manager does.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::{
    extensions::ParsedExtension,
    prelude::{FromDer, X509Certificate},
};

use super::{
    Error,
    config::{CaConfig, ConfigDocument},
    jwt::{self, JwtKey, JwtKeyRecord, JwtSigner},
    pki,
    provider::{CaProvider, GeneratedRoot, Signer},
    verify::TrustBundle,
};
use crate::{
    identity::TrustDomain,
    store::{Compare, Index, KeyValue, Listing, Txn},
};

/// Everything the CA stores lives under this prefix.
pub const PREFIX: &str = "ca/";
/// Cluster identity record.
pub const CLUSTER_KEY: &str = "ca/cluster";
/// The configuration document.
pub const CONFIG_KEY: &str = "ca/config";
const ROOTS_PREFIX: &str = "ca/roots/";
/// Everything only server agents may read (on etcd: guarded by etcd roles).
pub const SECRETS_PREFIX: &str = "secrets/";
/// The roots' private keys.
pub const KEYS_PREFIX: &str = "secrets/ca/keys/";
/// Where keys were kept before [`KEYS_PREFIX`] (read only, for older stores).
const LEGACY_KEYS_PREFIX: &str = "ca/keys/";
/// Consul's `Name` of every built-in root.
pub const ROOT_NAME: &str = "Consul CA Root Cert";

/// The store key of a root's public record.
pub fn root_key(id: &str) -> String {
    format!("{ROOTS_PREFIX}{}", pki::fingerprint_key(id))
}

/// The store key of a root's private key.
pub fn private_key_key(id: &str) -> String {
    format!("{KEYS_PREFIX}{}", pki::fingerprint_key(id))
}

/// Where a root's private key was stored before [`KEYS_PREFIX`].
pub fn legacy_private_key_key(id: &str) -> String {
    format!("{LEGACY_KEYS_PREFIX}{}", pki::fingerprint_key(id))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
struct ClusterRecord {
    #[serde(rename = "ClusterID")]
    cluster_id: uuid::Uuid,
    trust_domain: TrustDomain,
}

/// A root as stored (public parts only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RootRecord {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub serial_number: u64,
    pub root_cert: String,
    /// Certificates for this root's key signed by earlier roots (cross-signed).
    #[serde(default)]
    pub intermediate_certs: Vec<String>,
    pub active: bool,
    pub private_key_type: String,
    pub private_key_bits: u32,
    /// When this root stopped signing (unix seconds); pruned 2 × LeafCertTTL later.
    #[serde(default)]
    pub rotated_out_at: Option<i64>,
}

impl RootRecord {
    /// The record of a freshly generated root.
    pub fn new(root: &GeneratedRoot, intermediates: &[CertificateDer<'_>]) -> Self {
        Self {
            id: pki::fingerprint(&root.cert_der),
            name: ROOT_NAME.to_owned(),
            serial_number: root.serial,
            root_cert: pki::pem_encode("CERTIFICATE", &root.cert_der),
            intermediate_certs: intermediates
                .iter()
                .map(|c| pki::pem_encode("CERTIFICATE", c))
                .collect(),
            active: true,
            private_key_type: root.key_type.type_name().to_owned(),
            private_key_bits: root.key_type.bits(),
            rotated_out_at: None,
        }
    }
}

/// A cross-signed certificate of a root, with what deciding whether to send it needs.
#[derive(Debug, Clone)]
pub struct Intermediate {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub not_after: OffsetDateTime,
    /// AuthorityKeyId: which root signed it.
    pub issuer_key_id: Vec<u8>,
}

/// One root, parsed.
#[derive(Debug, Clone)]
pub struct Root {
    pub record: RootRecord,
    pub cert_der: CertificateDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SubjectKeyId of the root (the key that signs leaves).
    pub key_id: Vec<u8>,
    pub intermediates: Vec<Intermediate>,
    pub rotated_out_at: Option<OffsetDateTime>,
    pub create_index: Index,
    pub modify_index: Index,
}

impl Root {
    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn active(&self) -> bool {
        self.record.active
    }

    /// Consul's `SigningKeyID`: colon-hex of the key id that signs leaves.
    pub fn signing_key_id(&self) -> String {
        pki::colon_hex(&self.key_id)
    }
}

/// The CA as of one store index: identity, configuration, roots, the active
/// signer and the trust bundle. Immutable; replaced whole on every change.
pub struct CaState {
    pub cluster_id: uuid::Uuid,
    pub trust_domain: TrustDomain,
    pub config: CaConfig,
    pub config_create_index: Index,
    pub config_modify_index: Index,
    /// Every root, oldest first; exactly one is active.
    pub roots: Vec<Root>,
    /// The highest modify index among the roots (Consul's roots index).
    pub roots_index: Index,
    /// The store index this snapshot was read at.
    pub store_index: Index,
    pub bundle: Arc<TrustBundle>,
    active: usize,
    /// The active root's signer: only on agents that may read the keys (servers).
    signer: Option<Arc<dyn Signer>>,
    /// The JWT keys of the listed roots (the JWKS), oldest root first.
    pub jwt_keys: Vec<JwtKey>,
    /// The active root's JWT signer (servers only; `None` also while a store
    /// written before JWT keys has none for the active root yet).
    jwt_signer: Option<Arc<JwtSigner>>,
}

impl std::fmt::Debug for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaState")
            .field("trust_domain", &self.trust_domain)
            .field("active_root", &self.active_root().id())
            .field("roots", &self.roots.len())
            .field("store_index", &self.store_index)
            .finish_non_exhaustive()
    }
}

impl CaState {
    /// The root that signs new leaves.
    pub fn active_root(&self) -> &Root {
        &self.roots[self.active]
    }

    /// The active root's signer, or `None` on a client agent (which never reads
    /// the CA's keys and sends CSRs to a server agent instead).
    pub fn signer(&self) -> Option<&Arc<dyn Signer>> {
        self.signer.as_ref()
    }

    /// The active root's JWT signer (server agents only).
    pub fn jwt_signer(&self) -> Option<&Arc<JwtSigner>> {
        self.jwt_signer.as_ref()
    }

    /// Whether the active root has a JWT key (stores written before JWT-SVIDs
    /// have none until a server adds it, see [`jwt_key_txn`]).
    pub fn active_has_jwt_key(&self) -> bool {
        let id = self.active_root().id();
        self.jwt_keys.iter().any(|k| k.record.root_id == id)
    }

    /// The JWKS of this trust domain: every listed root's JWT key.
    pub fn jwks(&self) -> Vec<u8> {
        jwt::jwks(&self.jwt_keys)
    }

    /// The cross-signed certificates to send after a leaf of the active root: those
    /// whose signing root is still trusted and that have not expired.
    pub fn active_intermediates(&self, now: OffsetDateTime) -> Vec<&Intermediate> {
        self.active_root()
            .intermediates
            .iter()
            .filter(|i| i.not_after > now)
            .filter(|i| self.roots.iter().any(|r| r.key_id == i.issuer_key_id))
            .collect()
    }

    /// Reads the snapshot from a listing of [`PREFIX`] and, on a server agent, a
    /// listing of [`KEYS_PREFIX`] (without it the snapshot has no signer). `None`
    /// before first start.
    pub fn load(
        listing: &Listing,
        keys: Option<&Listing>,
        provider: &dyn CaProvider,
    ) -> Result<Option<Self>, Error> {
        let find = |key: &str| listing.items.iter().find(|kv| kv.key == key);
        let Some(cluster_kv) = find(CLUSTER_KEY) else {
            return Ok(None);
        };
        let cluster: ClusterRecord = decode(cluster_kv)?;
        let config_kv = find(CONFIG_KEY).ok_or_else(|| corrupt(CONFIG_KEY, "it is missing"))?;
        let doc: ConfigDocument = decode(config_kv)?;
        let config = CaConfig::from_document(&doc).map_err(|e| corrupt(CONFIG_KEY, e))?;
        let mut roots = listing
            .items
            .iter()
            .filter(|kv| kv.key.starts_with(ROOTS_PREFIX))
            .map(parse_root)
            .collect::<Result<Vec<_>, _>>()?;
        roots.sort_by_key(|r| r.create_index);
        let actives: Vec<usize> = roots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.active())
            .map(|(i, _)| i)
            .collect();
        let [active] = actives.as_slice() else {
            return Err(corrupt(
                ROOTS_PREFIX,
                format!("{} roots are active, expected exactly one", actives.len()),
            ));
        };
        let active = *active;
        let signer = match keys {
            None => None,
            Some(keys) => {
                let id = roots[active].id();
                let key_key = private_key_key(id);
                let legacy = legacy_private_key_key(id);
                let key_kv = keys
                    .items
                    .iter()
                    .find(|kv| kv.key == key_key)
                    .or_else(|| find(&legacy))
                    .ok_or_else(|| corrupt(&key_key, "it is missing"))?;
                Some(provider.signer(&roots[active].cert_der, &secret_pem(key_kv)?)?)
            }
        };
        let mut jwt_keys = Vec::new();
        for kv in listing
            .items
            .iter()
            .filter(|kv| kv.key.starts_with(jwt::JWT_PREFIX))
        {
            let record: JwtKeyRecord = decode(kv)?;
            // A key outlives its root only between two transactions' reads.
            if roots.iter().any(|r| r.id() == record.root_id) {
                jwt_keys.push(JwtKey::from_record(record).map_err(|e| corrupt(&kv.key, e))?);
            }
        }
        jwt_keys.sort_by_key(|k| {
            roots
                .iter()
                .position(|r| r.id() == k.record.root_id)
                .unwrap_or(usize::MAX)
        });
        let active_id = roots[active].id();
        let jwt_signer = match (
            keys,
            jwt_keys.iter().find(|k| k.record.root_id == active_id),
        ) {
            (Some(keys), Some(public)) => {
                let key_key = jwt::private_key_key(active_id);
                let kv = keys
                    .items
                    .iter()
                    .find(|kv| kv.key == key_key)
                    .ok_or_else(|| corrupt(&key_key, "it is missing"))?;
                Some(Arc::new(
                    JwtSigner::new(public, &secret_pem(kv)?).map_err(|e| corrupt(&key_key, e))?,
                ))
            }
            _ => None,
        };
        let roots_index = roots.iter().map(|r| r.modify_index).max().unwrap_or(0);
        let bundle = TrustBundle::new(
            cluster.trust_domain.clone(),
            roots[active].id().to_owned(),
            roots.iter().map(|r| r.cert_der.clone()).collect(),
            roots_index,
        )
        .map_err(|e| corrupt(ROOTS_PREFIX, e))?;
        Ok(Some(Self {
            cluster_id: cluster.cluster_id,
            trust_domain: cluster.trust_domain,
            config,
            config_create_index: config_kv.create_index,
            config_modify_index: config_kv.mod_index,
            roots,
            roots_index,
            store_index: listing.index,
            bundle: Arc::new(bundle),
            active,
            signer,
            jwt_keys,
            jwt_signer,
        }))
    }
}

/// Adds `txn`'s writes of a new JWT key for the root `root_id`.
fn with_jwt_key(txn: Txn, root_id: &str) -> Result<Txn, Error> {
    let key = jwt::generate(root_id)?;
    Ok(txn
        .put(jwt::public_key_key(root_id), encode(&key.record)?)
        .put(
            jwt::private_key_key(root_id),
            key.key_pem.0.clone().into_bytes(),
        ))
}

/// Gives the active root of a store written before JWT-SVIDs its JWT key, if no
/// other server did so first.
pub fn jwt_key_txn(current: &CaState) -> Result<Txn, Error> {
    let id = current.active_root().id();
    with_jwt_key(
        Txn::new().when(Compare::Absent(jwt::public_key_key(id))),
        id,
    )
}

/// The first-start transaction: cluster identity, default configuration and the
/// first root, written only if no other agent did so first.
pub fn bootstrap_txn(
    cluster_id: uuid::Uuid,
    config: &CaConfig,
    root: &GeneratedRoot,
) -> Result<Txn, Error> {
    let cluster = ClusterRecord {
        cluster_id,
        trust_domain: TrustDomain::for_cluster(&cluster_id),
    };
    let record = RootRecord::new(root, &[]);
    let txn = Txn::new()
        .when(Compare::Absent(CLUSTER_KEY.to_owned()))
        .put(CLUSTER_KEY, encode(&cluster)?)
        .put(CONFIG_KEY, encode(&config.to_document())?)
        .put(root_key(&record.id), encode(&record)?)
        .put(
            private_key_key(&record.id),
            root.key_pem.0.clone().into_bytes(),
        );
    with_jwt_key(txn, &record.id)
}

/// The rotation transaction: the configuration, the old root marked inactive, the
/// new root (with its cross-signed certificate) active, and its key; applied only
/// if neither the configuration nor the old root changed since `current` was read.
pub fn rotation_txn(
    current: &CaState,
    next: &CaConfig,
    new_root: &GeneratedRoot,
    cross_signed: &CertificateDer<'_>,
    now: OffsetDateTime,
) -> Result<Txn, Error> {
    let old = current.active_root();
    let mut old_record = old.record.clone();
    old_record.active = false;
    old_record.rotated_out_at = Some(now.unix_timestamp());
    let new_record = RootRecord::new(new_root, std::slice::from_ref(cross_signed));
    let txn = config_txn(current, next)?
        .when(Compare::ModIndex(root_key(old.id()), old.modify_index))
        .put(root_key(old.id()), encode(&old_record)?)
        .put(root_key(&new_record.id), encode(&new_record)?)
        .put(
            private_key_key(&new_record.id),
            new_root.key_pem.0.clone().into_bytes(),
        );
    with_jwt_key(txn, &new_record.id)
}

/// A configuration change that keeps the root.
pub fn config_txn(current: &CaState, next: &CaConfig) -> Result<Txn, Error> {
    Ok(Txn::new()
        .when(Compare::ModIndex(
            CONFIG_KEY.to_owned(),
            current.config_modify_index,
        ))
        .put(CONFIG_KEY, encode(&next.to_document())?))
}

/// Removes the given inactive roots and their keys, and rewrites the active root's
/// record unchanged so the roots index moves (blocking readers of the roots see the
/// removal).
pub fn prune_txn(current: &CaState, dead: &[&Root]) -> Result<Txn, Error> {
    let active = current.active_root();
    let mut txn = Txn::new()
        .when(Compare::ModIndex(
            root_key(active.id()),
            active.modify_index,
        ))
        .put(root_key(active.id()), encode(&active.record)?);
    for r in dead {
        txn = txn
            .when(Compare::ModIndex(root_key(r.id()), r.modify_index))
            .delete(root_key(r.id()))
            .delete(private_key_key(r.id()))
            .delete(legacy_private_key_key(r.id()))
            .delete(jwt::public_key_key(r.id()))
            .delete(jwt::private_key_key(r.id()));
    }
    Ok(txn)
}

fn parse_root(kv: &KeyValue) -> Result<Root, Error> {
    let record: RootRecord = decode(kv)?;
    let cert_der = pki::one_cert_from_pem("stored root", &record.root_cert)
        .map_err(|e| corrupt(&kv.key, e))?;
    if pki::fingerprint(&cert_der) != record.id {
        return Err(corrupt(&kv.key, "the root's ID is not its fingerprint"));
    }
    let facts = cert_facts(&cert_der).map_err(|e| corrupt(&kv.key, e))?;
    let key_id = facts
        .subject_key_id
        .ok_or_else(|| corrupt(&kv.key, "the root has no SubjectKeyIdentifier"))?;
    let mut intermediates = Vec::new();
    for pem in &record.intermediate_certs {
        let der =
            pki::one_cert_from_pem("stored intermediate", pem).map_err(|e| corrupt(&kv.key, e))?;
        let f = cert_facts(&der).map_err(|e| corrupt(&kv.key, e))?;
        intermediates.push(Intermediate {
            pem: pem.clone(),
            der,
            not_after: f.not_after,
            issuer_key_id: f.authority_key_id.unwrap_or_default(),
        });
    }
    let rotated_out_at = record
        .rotated_out_at
        .map(OffsetDateTime::from_unix_timestamp)
        .transpose()
        .map_err(|e| corrupt(&kv.key, e))?;
    Ok(Root {
        cert_der,
        not_before: facts.not_before,
        not_after: facts.not_after,
        key_id,
        intermediates,
        rotated_out_at,
        create_index: kv.create_index,
        modify_index: kv.mod_index,
        record,
    })
}

/// What the CA reads back from its own certificates.
#[derive(Debug)]
pub struct CertFacts {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub subject_key_id: Option<Vec<u8>>,
    pub authority_key_id: Option<Vec<u8>>,
}

pub fn cert_facts(der: &[u8]) -> Result<CertFacts, String> {
    let (_, x509) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut subject_key_id = None;
    let mut authority_key_id = None;
    for ext in x509.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => subject_key_id = Some(k.0.to_vec()),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                authority_key_id = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => {}
        }
    }
    Ok(CertFacts {
        not_before: x509.validity().not_before.to_datetime(),
        not_after: x509.validity().not_after.to_datetime(),
        subject_key_id,
        authority_key_id,
    })
}

/// A stored private key (PKCS#8 PEM).
fn secret_pem(kv: &KeyValue) -> Result<super::config::SecretPem, Error> {
    String::from_utf8(kv.value.clone())
        .map(super::config::SecretPem)
        .map_err(|_| corrupt(&kv.key, "not UTF-8"))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|source| Error::Encode { source })
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Error> {
    serde_json::from_slice(&kv.value).map_err(|e| corrupt(&kv.key, e))
}

fn corrupt(key: &str, reason: impl std::fmt::Display) -> Error {
    Error::CorruptRecord {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}
