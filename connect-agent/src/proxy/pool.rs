//! The outbound side's idle node-to-node connections, kept for the next stream
//! (see [`super::streams`]).
//!
//! Keyed by source service, destination service and destination endpoint: a
//! connection is authenticated as exactly one source (its client certificate) to
//! exactly one destination (the server certificate it verified), and the endpoint
//! keeps round robin over a destination's instances working — the balancer picks
//! the endpoint, the pool only saves the handshake to it.
//!
//! Not reused: a connection idle longer than [`PoolLimits::idle_timeout`] (the
//! server keeps idle ones longer, [`SERVER_IDLE_TIMEOUT`](super::inbound::SERVER_IDLE_TIMEOUT), so it does not close one
//! just as it is taken), older than [`MAX_AGE`] (so renewed server leaves take
//! over), made under another trust bundle or another leaf of ours than the current
//! ones (a root rotation or a renewal takes effect for the next stream), or one on
//! which anything arrived while it idled (the server closed it).
//!
//! Bounded: [`PoolLimits::max_idle_per_endpoint`] per key, [`MAX_IDLE`] in all;
//! expired ones are dropped by [`Pool::sweep`], which the proxy runs every
//! [`SWEEP_EVERY`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::sign::CertifiedKey;
use tokio::{net::TcpStream, time::Instant};

use super::{
    readahead::ReadAhead,
    streams::{Framed, Idles},
};
use crate::{ca::TrustBundle, identity::ServiceName};

/// A client-side node-to-node TLS connection.
pub(crate) type ClientTls = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// Idle connections in the whole pool, at most. An idle one keeps its TLS state
/// and socket, not its read buffers (released when it is parked).
pub const MAX_IDLE: usize = 1024;

/// Connections older than this are not reused.
pub const MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// How often expired idle connections are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Bounds of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Idle connections kept per source, destination and endpoint; 0 turns reuse
    /// off (the proxy then does not offer streams at all).
    pub max_idle_per_endpoint: usize,
    /// An idle connection is dropped after this long (at most
    /// [`SERVER_IDLE_TIMEOUT`](super::inbound::SERVER_IDLE_TIMEOUT) minus a margin).
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: 32,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection carrying streams, with what decides whether it may carry another.
#[derive(Debug)]
pub(crate) struct Conn {
    pub framed: Framed<ClientTls>,
    born: Instant,
    bundle: Arc<TrustBundle>,
    leaf: Arc<CertifiedKey>,
}

impl Conn {
    /// A fresh connection, made under `bundle` presenting `leaf`.
    pub fn new(tls: ClientTls, bundle: Arc<TrustBundle>, leaf: Arc<CertifiedKey>) -> Self {
        Self {
            framed: Framed::new(tls),
            born: Instant::now(),
            bundle,
            leaf,
        }
    }
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

type ByEndpoint = HashMap<SocketAddr, Vec<Idle>>;

/// Idle connections by source, destination and endpoint.
#[derive(Debug)]
pub(crate) struct Pool {
    limits: PoolLimits,
    idle: Mutex<Parked>,
}

#[derive(Debug, Default)]
struct Parked {
    by_source: HashMap<ServiceName, HashMap<ServiceName, ByEndpoint>>,
    count: usize,
}

impl Pool {
    pub fn new(mut limits: PoolLimits) -> Self {
        limits.idle_timeout = limits
            .idle_timeout
            .min(super::inbound::SERVER_IDLE_TIMEOUT.saturating_sub(Duration::from_secs(30)));
        Self {
            limits,
            idle: Mutex::new(Parked::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limits.max_idle_per_endpoint > 0
    }

    /// Idle connections now.
    pub fn len(&self) -> usize {
        self.lock().count
    }

    /// The most recently parked connection `src` → `dst` at `addr` that may carry
    /// a stream now (`bundle` and `leaf` being the current ones); unusable ones
    /// met on the way are dropped.
    pub fn take(
        &self,
        src: &ServiceName,
        dst: &ServiceName,
        addr: SocketAddr,
        bundle: &Arc<TrustBundle>,
        leaf: &Arc<CertifiedKey>,
    ) -> Option<Conn> {
        let now = Instant::now();
        let mut unusable = Vec::new();
        let found = {
            let mut idle = self.lock();
            let Parked { by_source, count } = &mut *idle;
            let list = by_source.get_mut(src)?.get_mut(dst)?.get_mut(&addr)?;
            let mut found = None;
            while let Some(mut i) = list.pop() {
                *count -= 1;
                if self.fresh(&i, now)
                    && Arc::ptr_eq(&i.conn.bundle, bundle)
                    && Arc::ptr_eq(&i.conn.leaf, leaf)
                    && i.conn.framed.is_reusable()
                {
                    found = Some(i.conn);
                    break;
                }
                unusable.push(i);
            }
            found
        };
        // Closed outside the lock.
        drop(unusable);
        found
    }

    /// Parks `conn` after a stream that ended cleanly; drops it if the pool is
    /// off, full, or the connection too old.
    pub fn put(&self, src: &ServiceName, dst: &ServiceName, addr: SocketAddr, mut conn: Conn) {
        let now = Instant::now();
        if !self.enabled() || now.duration_since(conn.born) >= MAX_AGE {
            return;
        }
        // Idle, it keeps its TLS state but not its read buffers.
        conn.framed.release_buffers();
        let mut idle = self.lock();
        if idle.count >= MAX_IDLE {
            return;
        }
        let list = idle
            .by_source
            .entry(src.clone())
            .or_default()
            .entry(dst.clone())
            .or_default()
            .entry(addr)
            .or_default();
        if list.len() >= self.limits.max_idle_per_endpoint {
            // Full for this endpoint: more connections than this were only needed
            // at a peak; this one goes.
            return;
        }
        list.push(Idle { conn, since: now });
        idle.count += 1;
    }

    /// Drops idle connections past their idle timeout or age, and empty entries.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut idle = self.lock();
            let Parked { by_source, count } = &mut *idle;
            by_source.retain(|_, by_dst| {
                by_dst.retain(|_, by_ep| {
                    by_ep.retain(|_, list| {
                        let before = list.len();
                        let (keep, gone): (Vec<_>, Vec<_>) =
                            list.drain(..).partition(|i| self.fresh(i, now));
                        *list = keep;
                        *count -= before - list.len();
                        expired.extend(gone);
                        !list.is_empty()
                    });
                    !by_ep.is_empty()
                });
                !by_dst.is_empty()
            });
        }
        drop(expired);
    }

    /// Drops every idle connection (shutdown).
    pub fn clear(&self) {
        let all = {
            let mut idle = self.lock();
            idle.count = 0;
            std::mem::take(&mut idle.by_source)
        };
        drop(all);
    }

    fn fresh(&self, i: &Idle, now: Instant) -> bool {
        now.duration_since(i.since) < self.limits.idle_timeout
            && now.duration_since(i.conn.born) < MAX_AGE
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        // Plain inserts and removes: a poisoned pool is still consistent.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}
