//! JWT-SVIDs of local services: signed by this agent (servers) or by a server
//! agent (clients), and kept while more than half their lifetime is left, so a
//! workload asking again and again costs one signature per half lifetime.

use std::sync::Arc;

use super::{CaRole, Inner};
use crate::{
    ca::{
        Error,
        jwt::{self, JwtSvid},
        state,
    },
    identity::ServiceName,
};

/// Most JWT-SVIDs one agent keeps (distinct service and audience sets); beyond
/// it, expired ones are dropped first, then tokens are signed but not kept.
pub const MAX_JWTS: usize = 4096;

/// The cache key: a service and its sorted, deduplicated audiences.
pub(super) type JwtKey = (ServiceName, Vec<String>);

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Inner {
    /// A JWT-SVID of `service` for `audience` (checked: see
    /// [`jwt::check_audience`]).
    pub(super) async fn jwt_svid(
        &self,
        service: &ServiceName,
        audience: &[String],
    ) -> Result<Arc<JwtSvid>, Error> {
        jwt::check_audience(audience)?;
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key: JwtKey = (service.clone(), aud);
        let state = self.current();
        let ttl = i64::try_from(state.config.jwt_svid_ttl.as_secs()).unwrap_or(i64::MAX);
        let now = now_unix();
        if let Some(t) = self.lock_jwts().get(&key)
            && t.expires_at - now > ttl / 2
        {
            return Ok(t.clone());
        }
        let id = self.leaf_id(&state, service);
        let svid = match &self.role {
            CaRole::Server => {
                let signer = match state.jwt_signer() {
                    Some(s) => s.clone(),
                    None => {
                        self.ensure_jwt_key().await?;
                        self.current()
                            .jwt_signer()
                            .cloned()
                            .ok_or(Error::NoJwtKey)?
                    }
                };
                signer.sign(&id, &key.1, now, ttl)?
            }
            CaRole::Client(remote) => remote.sign_jwt(&state, &id, &key.1).await?,
        };
        let svid = Arc::new(svid);
        let mut jwts = self.lock_jwts();
        if jwts.len() >= MAX_JWTS {
            jwts.retain(|_, t| t.expires_at > now);
        }
        if jwts.len() < MAX_JWTS {
            jwts.insert(key, svid.clone());
        }
        Ok(svid)
    }

    /// Gives the active root a JWT key if it has none (a store written before
    /// JWT-SVIDs, or a root made by an agent that did not make one), then
    /// reloads. Servers only; a lost race with another server is fine.
    pub(super) async fn ensure_jwt_key(&self) -> Result<(), Error> {
        let current = self.current();
        if current.active_has_jwt_key() {
            return Ok(());
        }
        if self
            .store
            .txn(state::jwt_key_txn(&current)?)
            .await?
            .is_committed()
        {
            tracing::info!(root_id = %current.active_root().id(), "made the JWT signing key of the active CA root");
        }
        self.reload().await
    }

    fn lock_jwts(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<JwtKey, Arc<JwtSvid>>> {
        self.jwts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
