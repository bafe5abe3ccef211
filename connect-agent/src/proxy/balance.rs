//! Spreading new connections over a service's endpoints: round robin over the ones
//! that have not failed lately, then the ones that have.
//!
//! The outbound side uses one [`Balancer`] for the inbound endpoints of a
//! destination (one per instance: a node with two instances appears twice, so it
//! gets twice the share), the inbound side another for the plaintext listeners of a
//! local service's instances. For each new connection [`Balancer::plan`] gives the
//! order to try addresses in; the caller reports each attempt with
//! [`Balancer::failed`] or [`Balancer::succeeded`]. An address that failed is
//! tried after every other one for [`FAILURE_HOLD`], so connections do not keep
//! paying a refused or timed-out dial for an instance that just went away; after
//! that it gets a chance again (one attempt, which the caller retries elsewhere if
//! it fails). When every address failed lately they are all tried anyway: an old
//! failure is no reason to refuse a connection outright.
//!
//! State is two small maps behind one lock, touched twice per connection; both are
//! bounded ([`MAX_TRACKED`]) so a churning catalog cannot grow them without limit.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::identity::ServiceName;

/// How long an address that failed is tried only after every other one.
pub const FAILURE_HOLD: Duration = Duration::from_secs(10);

/// Most services (round-robin cursors) and failed addresses remembered. Beyond it
/// the cursors start over and expired failures are forgotten; a full map of live
/// failures is cleared, which at worst costs one more failed attempt each.
pub const MAX_TRACKED: usize = 4096;

/// Round robin with recently failed addresses last. See the module doc.
#[derive(Debug)]
pub struct Balancer {
    hold: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Service → how many plans were made for it.
    cursors: HashMap<ServiceName, usize>,
    /// Address → when it last failed.
    failed: HashMap<SocketAddr, Instant>,
}

impl Balancer {
    /// A balancer that keeps failed addresses at the back for `hold`.
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            state: Mutex::new(State::default()),
        }
    }

    /// The order in which to try `addrs` for one new connection to the service
    /// `key`: each address once, the ones without a recent failure first, starting
    /// one further along the list than the previous plan for `key` did.
    pub fn plan(&self, key: &ServiceName, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        self.plan_at(key, addrs, Instant::now())
    }

    fn plan_at(&self, key: &ServiceName, addrs: &[SocketAddr], now: Instant) -> Vec<SocketAddr> {
        if addrs.is_empty() {
            return Vec::new();
        }
        let mut state = self.lock();
        let hold = self.hold;
        let is_failed = |a: &SocketAddr| {
            state
                .failed
                .get(a)
                .is_some_and(|t| now.duration_since(*t) < hold)
        };
        let (healthy, failed): (Vec<SocketAddr>, Vec<SocketAddr>) =
            addrs.iter().copied().partition(|a| !is_failed(a));
        if state.cursors.len() >= MAX_TRACKED && !state.cursors.contains_key(key) {
            state.cursors.clear();
        }
        let cursor = state.cursors.entry(key.clone()).or_insert(0);
        let turn = *cursor;
        *cursor = cursor.wrapping_add(1);
        drop(state);

        let mut out = Vec::with_capacity(addrs.len());
        let mut seen = HashSet::with_capacity(addrs.len());
        // Rotating the whole list (duplicates included) before dropping duplicates
        // keeps each address's share proportional to how often it is listed.
        for group in [healthy, failed] {
            if group.is_empty() {
                continue;
            }
            let start = turn % group.len();
            for a in group[start..].iter().chain(&group[..start]) {
                if seen.insert(*a) {
                    out.push(*a);
                }
            }
        }
        out
    }

    /// Records that connecting to `addr` failed just now.
    pub fn failed(&self, addr: SocketAddr) {
        self.failed_at(addr, Instant::now());
    }

    fn failed_at(&self, addr: SocketAddr, now: Instant) {
        let hold = self.hold;
        let mut state = self.lock();
        if state.failed.len() >= MAX_TRACKED && !state.failed.contains_key(&addr) {
            state.failed.retain(|_, t| now.duration_since(*t) < hold);
            if state.failed.len() >= MAX_TRACKED {
                state.failed.clear();
            }
        }
        state.failed.insert(addr, now);
    }

    /// Records that connecting to `addr` worked: it is no longer held back.
    pub fn succeeded(&self, addr: SocketAddr) {
        let mut state = self.lock();
        if !state.failed.is_empty() {
            state.failed.remove(&addr);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single insert or remove: a poisoned lock still guards
        // consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn svc(name: &str) -> ServiceName {
        name.parse().expect("service name")
    }

    fn firsts(b: &Balancer, key: &str, addrs: &[SocketAddr], n: usize) -> Vec<u16> {
        let key = svc(key);
        (0..n).map(|_| b.plan(&key, addrs)[0].port()).collect()
    }

    #[test]
    fn round_robin_visits_every_address_in_turn() {
        let b = Balancer::new(FAILURE_HOLD);
        let addrs = [addr(1), addr(2), addr(3)];
        assert_eq!(firsts(&b, "socat", &addrs, 6), [1, 2, 3, 1, 2, 3]);
        // Each plan lists every address once, starting at its turn.
        assert_eq!(b.plan(&svc("socat"), &addrs), [addr(1), addr(2), addr(3)]);
        assert_eq!(b.plan(&svc("socat"), &addrs), [addr(2), addr(3), addr(1)]);
        // Services have their own turns.
        assert_eq!(firsts(&b, "web", &addrs, 2), [1, 2]);
        assert!(b.plan(&svc("socat"), &[]).is_empty());
    }

    #[test]
    fn a_listed_twice_address_gets_twice_the_share_but_is_tried_once() {
        let b = Balancer::new(FAILURE_HOLD);
        // Two instances behind node A's inbound port, one behind B's.
        let addrs = [addr(1), addr(1), addr(2)];
        let plans: Vec<Vec<SocketAddr>> = (0..3).map(|_| b.plan(&svc("echo"), &addrs)).collect();
        assert_eq!(
            plans,
            [
                vec![addr(1), addr(2)],
                vec![addr(1), addr(2)],
                vec![addr(2), addr(1)]
            ]
        );
    }

    #[test]
    fn a_failed_address_goes_last_until_the_hold_passes_or_it_succeeds() {
        let hold = Duration::from_secs(10);
        let b = Balancer::new(hold);
        let addrs = [addr(1), addr(2), addr(3)];
        let t0 = Instant::now();
        b.failed_at(addr(2), t0);
        let during = t0 + Duration::from_secs(1);
        for _ in 0..6 {
            let plan = b.plan_at(&svc("svc"), &addrs, during);
            assert_eq!(plan.len(), 3, "{plan:?}");
            assert_eq!(plan[2], addr(2), "the failed one is tried last: {plan:?}");
        }
        // The healthy ones still alternate.
        let heads: Vec<u16> = (0..4)
            .map(|_| b.plan_at(&svc("svc"), &addrs, during)[0].port())
            .collect();
        assert_eq!(heads, [1, 3, 1, 3]);
        // After the hold it is back in the rotation.
        let after = t0 + hold + Duration::from_millis(1);
        let heads: Vec<u16> = (0..3)
            .map(|_| b.plan_at(&svc("svc"), &addrs, after)[0].port())
            .collect();
        let mut sorted = heads.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [1, 2, 3], "{heads:?}");
        // A success clears a failure at once.
        b.failed_at(addr(3), after);
        b.succeeded(addr(3));
        let heads: Vec<u16> = (0..3)
            .map(|_| b.plan_at(&svc("svc"), &addrs, after)[0].port())
            .collect();
        assert!(heads.contains(&3), "{heads:?}");
    }

    #[test]
    fn when_everything_failed_everything_is_still_tried() {
        let b = Balancer::new(FAILURE_HOLD);
        let addrs = [addr(1), addr(2)];
        let now = Instant::now();
        b.failed_at(addr(1), now);
        b.failed_at(addr(2), now);
        let plan = b.plan_at(&svc("svc"), &addrs, now);
        assert_eq!(plan.len(), 2);
        let next = b.plan_at(&svc("svc"), &addrs, now);
        assert_ne!(plan[0], next[0], "still round robin among the failed");
    }

    #[test]
    fn the_maps_stay_bounded() {
        let b = Balancer::new(FAILURE_HOLD);
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let a = SocketAddr::from((std::net::Ipv4Addr::from_bits(0x7f00_0000 + i), 1));
            b.failed_at(a, now);
            b.plan_at(&svc(&format!("svc-{i}")), &[a], now);
        }
        let state = b.lock();
        assert!(state.failed.len() <= MAX_TRACKED);
        assert!(state.cursors.len() <= MAX_TRACKED);
    }
}
