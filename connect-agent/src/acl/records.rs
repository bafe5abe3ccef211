//! How tokens and policies are kept in the store: their keys, their encoding, and
//! the [`Snapshot`] built from all of them.

use super::*;

pub(super) fn now_rfc3339() -> String {
    crate::intentions::model::now_rfc3339()
}

pub(super) fn token_key(accessor: &Uuid) -> String {
    format!("{TOKEN_PREFIX}{accessor}")
}

pub(super) fn secret_key(hash: &[u8; 32]) -> String {
    format!("{SECRET_PREFIX}{}", hex::encode(hash))
}

pub(super) fn policy_key(id: &Uuid) -> String {
    format!("{POLICY_PREFIX}{id}")
}

pub(super) fn policy_name_key(name: &str) -> String {
    format!("{POLICY_NAME_PREFIX}{name}")
}

pub(super) fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(record).map_err(|e| {
        store::Error::Corrupt {
            key: PREFIX.to_owned(),
            reason: format!("cannot encode an ACL record: {e}"),
        }
        .into()
    })
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Error> {
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
pub(super) fn build_snapshot(
    raw: &BTreeMap<String, KeyValue>,
    index: Index,
    config: &AclConfig,
) -> Snapshot {
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
        let grants = Grants::new(
            policy_rules.chain(identity_rules.iter()),
            config.default_policy,
        );
        let token = Arc::new(Token {
            record,
            grants,
            create_index: kv.create_index,
            modify_index: kv.mod_index,
        });
        snap.by_secret.insert(hash, token.clone());
        snap.tokens.insert(token.record.accessor_id, token);
    }
    snap
}
