//! Writes of tokens and policies: guarded transactions that wait (bounded) until
//! the snapshot shows them.

use super::{records::*, *};

impl Acl {
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
    pub(super) fn policy_ids(
        &self,
        snap: &Snapshot,
        links: &[PolicyLink],
    ) -> Result<Vec<Uuid>, Error> {
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

    pub(super) async fn caught_up(&self, index: Index) {
        let mut rx = self.subscribe();
        let waited = tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|i| *i >= index)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(index, "ACL view lags behind a write");
        }
    }
}
