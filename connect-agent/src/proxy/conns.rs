//! The registry of live proxied connections.
//!
//! Every connection that passed authorization is registered with its source and
//! destination service and a cancellation token. When intentions change, the proxy
//! calls [`Registry::recheck`]: each connection the new rules deny is cancelled, and
//! its splice ends within moments. This is what closes Consul's gap of leaving
//! revoked connections open. The registry also enforces the connection limit.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::identity::ServiceName;

/// A connection's id, unique within the process; appears in logs.
pub type ConnId = u64;

#[derive(Debug)]
struct Entry {
    source: ServiceName,
    destination: ServiceName,
    cancel: CancellationToken,
}

/// Live connections, bounded by a maximum.
#[derive(Debug)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<ConnId, Entry>>,
    slots: Arc<Semaphore>,
    max: usize,
}

/// The connection limit was reached; the new connection must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the proxy carries its maximum of {max} connections")]
pub struct Full {
    pub max: usize,
}

/// A registered connection. Dropping it unregisters the connection (its slot is
/// the connection's own, freed when the connection ends).
#[derive(Debug)]
pub struct Guard {
    id: ConnId,
    cancel: CancellationToken,
    registry: Arc<Registry>,
}

impl Guard {
    pub fn id(&self) -> ConnId {
        self.id
    }
    /// Cancelled when the connection must close (revoked, or shutdown forced).
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            next: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max)),
            max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Entry>> {
        // Entries are plain data; a panic elsewhere cannot leave them half-updated.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id for a connection not (yet) registered, for logs before authorization.
    pub fn next_id(&self) -> ConnId {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a slot for a new connection, or refuses when the limit is reached.
    pub fn reserve(&self) -> Result<OwnedSemaphorePermit, Full> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full { max: self.max })
    }

    /// Registers an authorized connection. `parent` is cancelled on forced shutdown.
    pub fn register(
        self: &Arc<Self>,
        id: ConnId,
        source: ServiceName,
        destination: ServiceName,
        parent: &CancellationToken,
    ) -> Guard {
        let cancel = parent.child_token();
        self.lock().insert(
            id,
            Entry {
                source,
                destination,
                cancel: cancel.clone(),
            },
        );
        Guard {
            id,
            cancel,
            registry: self.clone(),
        }
    }

    /// Cancels every live connection that `allowed(source, destination)` now refuses,
    /// and returns how many were cancelled.
    pub fn recheck(&self, mut allowed: impl FnMut(&ServiceName, &ServiceName) -> bool) -> usize {
        let live = self.lock();
        let mut closed = 0;
        for (id, e) in live.iter() {
            if !e.cancel.is_cancelled() && !allowed(&e.source, &e.destination) {
                tracing::info!(conn = id, src = %e.source, dst = %e.destination, "closing connection denied by a changed intention");
                e.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// The distinct (source, destination) pairs of the live connections, so that a
    /// caller whose decisions need I/O can take them before [`Registry::recheck`].
    pub fn pairs(&self) -> Vec<(ServiceName, ServiceName)> {
        let live = self.lock();
        let mut pairs: Vec<_> = live
            .values()
            .filter(|e| !e.cancel.is_cancelled())
            .map(|e| (e.source.clone(), e.destination.clone()))
            .collect();
        drop(live);
        pairs.sort();
        pairs.dedup();
        pairs
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        s.parse().expect("valid name")
    }

    #[test]
    fn recheck_cancels_only_denied_connections() {
        let r = Registry::new(10);
        let root = CancellationToken::new();
        let a = r.register(r.next_id(), svc("web"), svc("socat"), &root);
        let b = r.register(r.next_id(), svc("api"), svc("socat"), &root);
        assert_eq!(r.len(), 2);
        let closed = r.recheck(|s, _| s.as_str() != "web");
        assert_eq!(closed, 1);
        assert!(a.cancelled().is_cancelled());
        assert!(!b.cancelled().is_cancelled());
        drop(a);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn pairs_are_distinct_and_skip_cancelled_connections() {
        let r = Registry::new(10);
        let root = CancellationToken::new();
        let reg = |s: &str, d: &str| r.register(r.next_id(), svc(s), svc(d), &root);
        let _a = reg("web", "socat");
        let _b = reg("web", "socat");
        let c = reg("api", "db");
        assert_eq!(
            r.pairs(),
            vec![(svc("api"), svc("db")), (svc("web"), svc("socat"))]
        );
        c.cancelled().cancel();
        assert_eq!(r.pairs(), vec![(svc("web"), svc("socat"))]);
    }

    #[test]
    fn the_limit_is_enforced_and_slots_come_back() {
        let r = Registry::new(1);
        let root = CancellationToken::new();
        let slot = r.reserve().expect("first slot");
        assert_eq!(r.reserve().err(), Some(Full { max: 1 }));
        let g = r.register(r.next_id(), svc("web"), svc("db"), &root);
        drop(g);
        assert!(
            r.reserve().is_err(),
            "the slot is the connection's, not the registration's"
        );
        drop(slot);
        assert!(r.reserve().is_ok());
    }

    #[test]
    fn forced_shutdown_cancels_children() {
        let r = Registry::new(4);
        let root = CancellationToken::new();
        let g = r.register(r.next_id(), svc("web"), svc("db"), &root);
        root.cancel();
        assert!(g.cancelled().is_cancelled());
    }
}
