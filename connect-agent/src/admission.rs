//! Budgets for work done for peers that have not proven who they are yet: TLS
//! handshakes on the proxy's inbound listener and on the HTTPS API, and the API's
//! connections.
//!
//! An unauthenticated peer costs a descriptor, a task and a timer for as long as
//! it stays silent (up to the handshake timeout). If that came out of the same
//! budget as carried connections, 4,096 silent sockets from one host would stop
//! the node's mesh traffic. So these budgets are their own, smaller ones, and
//! each source IP gets only a share of them: a flood from one host fills its own
//! share and leaves the rest to the node's real peers. (A flood from many hosts
//! can still fill the total; then new handshakes are refused at once, carried
//! connections are untouched, and the refusals are counted.)

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// A budget: at most `total` permits at once, and at most `per_peer` for one IP.
#[derive(Debug)]
pub struct Budget {
    what: &'static str,
    total: usize,
    per_peer: usize,
    held: Mutex<Held>,
    log: LimitLog,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// Why a peer got no permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{what}: {max} in progress from this peer already")]
    Peer { what: &'static str, max: usize },
    #[error("{what}: {max} in progress already")]
    Total { what: &'static str, max: usize },
}

impl Refused {
    /// The bound that was reached.
    pub fn max(&self) -> usize {
        match self {
            Refused::Peer { max, .. } | Refused::Total { max, .. } => *max,
        }
    }

    /// Which limit refused, for logs.
    pub fn what_limit(&self) -> String {
        match self {
            Refused::Peer { what, .. } => format!("{what} per peer"),
            Refused::Total { what, .. } => (*what).to_owned(),
        }
    }
}

/// One unit of a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    peer: IpAddr,
}

impl Budget {
    /// A budget named `what` (for logs) of `total` permits, `per_peer` per IP.
    pub fn new(what: &'static str, total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            total,
            per_peer: per_peer.min(total),
            held: Mutex::new(Held::default()),
            log: LimitLog::default(),
        })
    }

    /// A permit for `peer`, or why not (logged, rate-limited). Never waits: a
    /// peer over its share is turned away at once rather than queued behind
    /// itself.
    pub fn try_enter(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refused> {
        let entered = self.enter(canonical(peer));
        if let Err(why) = &entered {
            self.log.refused(why.what_limit(), why.max());
        }
        entered
    }

    fn enter(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refused> {
        let mut held = self.lock();
        if held.total >= self.total {
            return Err(Refused::Total {
                what: self.what,
                max: self.total,
            });
        }
        let mine = held.by_peer.entry(peer).or_insert(0);
        if *mine >= self.per_peer {
            return Err(Refused::Peer {
                what: self.what,
                max: self.per_peer,
            });
        }
        *mine += 1;
        held.total += 1;
        Ok(Permit {
            budget: self.clone(),
            peer,
        })
    }

    /// Permits held now.
    pub fn in_use(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // Two counters updated together under the lock; nothing in between panics.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut held = self.budget.lock();
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Rate-limits a "limit reached" warning: the first refusal logs at once, then
/// at most one line per [`LimitLog::EVERY`] with the count so far. Shared by the
/// budgets here and the proxy's connection limit.
#[derive(Debug, Default)]
pub struct LimitLog {
    refused: AtomicU64,
    /// Milliseconds since `epoch` of the last line; 0 = never.
    last_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl LimitLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn refused(&self, limit: impl std::fmt::Display, max: usize) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let epoch = *self.epoch.get_or_init(Instant::now);
        // +1 so that "never logged" (0) differs from "logged at the epoch".
        let now = ms(epoch.elapsed()) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= ms(Self::EVERY);
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %limit,
                max,
                refused_total = refused,
                "{limit} reached: refusing new connections until some close"
            );
        }
    }
}

/// One key per host: an IPv4 peer counts the same whether it arrives on an IPv4
/// or a dual-stack (v4-mapped) socket.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit, and
/// says what it is now. Every proxied connection holds two or three descriptors
/// and the default soft limit is 1,024, so without this a few hundred
/// connections (or silent sockets) exhaust the agent's descriptors and its
/// accepts fail for everyone.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok((soft, hard))
}

/// [`raise_nofile_limit`], logged: the limit is part of what an operator
/// checks when connections are refused.
pub fn raise_and_log_nofile_limit() {
    match raise_nofile_limit() {
        Ok((was, now)) if was < now => {
            tracing::info!(was, now, "raised the open-file limit to its hard limit");
        }
        Ok((_, now)) => tracing::info!(limit = now, "open-file limit is already at its hard limit"),
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-file limit; connections beyond it will be refused")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn one_peer_gets_only_its_share_and_others_still_enter() {
        let b = Budget::new("handshakes", 4, 2);
        let a1 = b.try_enter(ip("198.18.0.1")).expect("first");
        let _a2 = b
            .try_enter(ip("::ffff:198.18.0.1"))
            .expect("second, v4-mapped");
        assert_eq!(
            b.try_enter(ip("198.18.0.1")).err(),
            Some(Refused::Peer {
                what: "handshakes",
                max: 2
            })
        );
        let _b1 = b.try_enter(ip("198.18.0.2")).expect("another peer");
        let _b2 = b.try_enter(ip("198.18.0.2")).expect("another peer");
        assert_eq!(
            b.try_enter(ip("198.18.0.3")).err(),
            Some(Refused::Total {
                what: "handshakes",
                max: 4
            })
        );
        drop(a1);
        assert_eq!(b.in_use(), 3);
        let _c = b.try_enter(ip("198.18.0.3")).expect("a permit came back");
        assert_eq!(b.in_use(), 4);
    }

    #[test]
    fn permits_come_back_and_peers_are_forgotten() {
        let b = Budget::new("x", 2, 2);
        for _ in 0..100 {
            let p = b.try_enter(ip("2001:db8::1")).expect("enter");
            drop(p);
        }
        assert_eq!(b.in_use(), 0);
        assert!(b.lock().by_peer.is_empty());
    }
}
