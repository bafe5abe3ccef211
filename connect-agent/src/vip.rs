//! Virtual IPs: one stable IPv4 address per service from 240.0.0.0/4, the address
//! applications dial (`<svc>.virtual.consul`) and eBPF redirects to the proxy.
//!
//! This module owns allocation and the in-memory table of allocations. It does not
//! decide which services get one (the caller asks for services that exist), it does
//! not program eBPF maps (the redirect sync subscribes to [`Allocator::subscribe`]),
//! and it never frees an address: a service keeps its IP for the life of the store,
//! so answers stay stable across restarts and re-registrations.
//!
//! # Allocation
//!
//! Each allocation is two keys written in one transaction, guarded by
//! [`Compare::Absent`] on both:
//!
//! - `vip/by-service/<name>` — the service's address (stable: a service never gets a
//!   second one, because this key exists once it has one);
//! - `vip/by-ip/<a.b.c.d>` — the address's owner (unique: two services never share
//!   one, even when agents on different nodes allocate at the same instant).
//!
//! Both hold the same record. The `by-service` keys are the mapping that lookups
//! follow; the `by-ip` keys exist to lock addresses.
//!
//! The first candidate is a hash of the service name and the next ones follow it
//! (linear probing), so independent stores usually agree too, and most allocations
//! commit at the first try. A conflicting transaction means another agent won the
//! race: the loser re-reads the service's key (it may have allocated this very
//! service) and otherwise moves on to the next candidate.
//!
//! # Lookups
//!
//! [`Allocator::vip_of`] and [`Allocator::service_of`] read a table kept in memory
//! and fed by a watch of `vip/`, so the proxy's and DNS's hot paths never wait on
//! the store.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use async_trait::async_trait;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{
    identity::ServiceName,
    store::{self, Compare, Event, Index, Projection, Store, Txn, View},
};

/// Every key this module writes starts with this.
pub const PREFIX: &str = "vip/";
const BY_SERVICE: &str = "vip/by-service/";
const BY_IP: &str = "vip/by-ip/";

/// The first address handed out: 240.0.0.0/4 without its network address.
pub const FIRST: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 1);
/// The last address handed out: 240.0.0.0/4 without 255.255.255.255, the limited
/// broadcast address, which no socket can `connect()` to as a unicast peer.
pub const LAST: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 254);

/// Candidates an allocation may look at before giving up. Addresses the in-memory
/// table knows to be taken cost no I/O, so this can be generous; with 2^28 addresses
/// and hashed starting points, needing more than a handful means the store is broken.
const MAX_PROBES: u32 = 4096;
/// Failed transactions an allocation tolerates. Each failure means another agent
/// committed in between, so a long run of them means heavy contention or a store
/// that rejects every guard.
const MAX_CONFLICTS: u32 = 32;

/// Whether `ip` lies in the range virtual IPs come from.
pub fn is_virtual(ip: Ipv4Addr) -> bool {
    (FIRST..=LAST).contains(&ip)
}

/// Why an allocation failed or a stored record was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A record under `vip/` does not decode. Someone wrote there by hand, or a bug.
    #[error("the virtual IP record at {key} does not decode: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A record decodes but contradicts its key or the address range.
    #[error("the virtual IP record at {key} is inconsistent: {reason}")]
    Inconsistent { key: String, reason: &'static str },
    #[error(
        "no free virtual IP for {service} after probing {probed} addresses: 240.0.0.0/4 is nearly full or the store is inconsistent"
    )]
    Exhausted { service: ServiceName, probed: u32 },
    #[error(
        "gave up allocating a virtual IP for {service} after {conflicts} conflicting transactions (heavy contention on the store?)"
    )]
    Contended {
        service: ServiceName,
        conflicts: u32,
    },
}

/// The value stored under both keys of an allocation, so that either key alone
/// rebuilds the whole mapping.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Record {
    #[serde(rename = "Service")]
    service: ServiceName,
    #[serde(rename = "IP")]
    ip: Ipv4Addr,
}

/// Every allocation known to this agent, both ways. Published as a snapshot
/// ([`Allocator::subscribe`]) for whoever mirrors it elsewhere (the eBPF maps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipTable {
    by_service: HashMap<ServiceName, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, ServiceName>,
}

impl VipTable {
    /// The virtual IP of `service`, if it has one.
    pub fn vip_of(&self, service: &ServiceName) -> Option<Ipv4Addr> {
        self.by_service.get(service).copied()
    }

    /// The service that owns virtual IP `ip`.
    pub fn service_of(&self, ip: Ipv4Addr) -> Option<&ServiceName> {
        self.by_ip.get(&ip)
    }

    /// Every (service, IP) pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceName, Ipv4Addr)> {
        self.by_service.iter().map(|(s, ip)| (s, *ip))
    }

    pub fn len(&self) -> usize {
        self.by_service.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }

    /// Records `service` ↔ `ip`, dropping any other pairing either side had, so the
    /// two maps stay inverse to each other whatever order records arrive in.
    fn insert(&mut self, service: ServiceName, ip: Ipv4Addr) {
        if let Some(old_ip) = self.by_service.get(&service).copied()
            && old_ip != ip
        {
            self.by_ip.remove(&old_ip);
        }
        if let Some(old_service) = self.by_ip.get(&ip)
            && *old_service != service
        {
            let old_service = old_service.clone();
            tracing::warn!(%ip, old = %old_service, new = %service, "virtual IP changed owner");
            self.by_service.remove(&old_service);
        }
        self.by_ip.insert(ip, service.clone());
        self.by_service.insert(service, ip);
    }

    fn remove_service(&mut self, service: &ServiceName) {
        if let Some(ip) = self.by_service.remove(service) {
            self.by_ip.remove(&ip);
        }
    }
}

/// The address range an allocator draws from: [`FIRST`]..=[`LAST`] in production,
/// a handful of addresses in tests that need collisions and exhaustion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pool {
    first: u32,
    size: u32,
}

impl Pool {
    const FULL: Pool = Pool {
        first: FIRST.to_bits(),
        size: LAST.to_bits() - FIRST.to_bits() + 1,
    };

    /// The `probe`-th candidate for `service`: its hash, then the addresses after it.
    fn candidate(&self, service: &ServiceName, probe: u32) -> Ipv4Addr {
        // Lower case: spellings of one name are one service (see `ServiceName`).
        let digest = Sha256::digest(service.to_lowercase().as_bytes());
        let start = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % self.size;
        let offset = (u64::from(start) + u64::from(probe)) % u64::from(self.size);
        // `offset < size`, and `first + size - 1` is an address, so this cannot
        // overflow; the u64 sum above keeps `start + probe` from wrapping first.
        Ipv4Addr::from_bits(self.first + offset as u32)
    }
}

/// Allocates virtual IPs through the store and answers lookups from memory.
#[derive(Debug)]
pub struct Allocator {
    store: Arc<dyn Store>,
    pool: Pool,
    /// The table, kept equal to `vip/`; following stops when this is dropped.
    view: View<Published>,
}

/// The table as readers see it: the [`Projection`] of `vip/`. Every change replaces
/// the snapshot, so a reader holds one consistent table for as long as it likes.
#[derive(Debug)]
struct Published(watch::Sender<Arc<VipTable>>);

#[async_trait]
impl Projection for Published {
    async fn reset(&self, listing: store::Listing) -> bool {
        let fresh = load(&listing.items);
        self.0.send_if_modified(|t| {
            if **t == fresh {
                return false;
            }
            *t = Arc::new(fresh);
            true
        })
    }

    async fn apply(&self, events: Vec<Event>, _index: Index) {
        self.0.send_modify(|t| apply(Arc::make_mut(t), &events));
    }
}

impl Allocator {
    /// Loads every allocation from the store and starts following changes. The table
    /// is complete when this returns, so lookups right after start see every address
    /// allocated so far, by any agent.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, Error> {
        Self::start_with_pool(store, Pool::FULL).await
    }

    async fn start_with_pool(store: Arc<dyn Store>, pool: Pool) -> Result<Arc<Self>, Error> {
        let (table, _) = watch::channel(Arc::new(VipTable::default()));
        let view = View::start(store.clone(), PREFIX, Published(table)).await?;
        Ok(Arc::new(Self { store, pool, view }))
    }

    fn table(&self) -> &watch::Sender<Arc<VipTable>> {
        &self.view.get().0
    }

    /// The virtual IP of `service`, from memory.
    pub fn vip_of(&self, service: &ServiceName) -> Option<Ipv4Addr> {
        self.table().borrow().vip_of(service)
    }

    /// The service owning virtual IP `ip`, from memory: how the proxy names the
    /// destination of a connection eBPF redirected from a virtual IP.
    pub fn service_of(&self, ip: Ipv4Addr) -> Option<ServiceName> {
        self.table().borrow().service_of(ip).cloned()
    }

    /// The current table.
    pub fn snapshot(&self) -> Arc<VipTable> {
        self.table().borrow().clone()
    }

    /// A receiver that sees a new snapshot after every change (allocations here or by
    /// other agents), for mirroring the table into eBPF maps.
    pub fn subscribe(&self) -> watch::Receiver<Arc<VipTable>> {
        self.table().subscribe()
    }

    /// The virtual IP of `service`, allocating one if it has none yet. Stable: the
    /// same service always gets the same address, from every agent sharing the store.
    pub async fn get_or_allocate(&self, service: &ServiceName) -> Result<Ipv4Addr, Error> {
        if let Some(ip) = self.vip_of(service) {
            return Ok(ip);
        }
        // The table may lag an allocation another agent just made.
        if let Some(ip) = self.read_allocated(service).await? {
            return Ok(ip);
        }
        let service_key = service_key(service);
        let mut conflicts = 0;
        for probe in 0..MAX_PROBES.min(self.pool.size) {
            let ip = self.pool.candidate(service, probe);
            if self.table().borrow().service_of(ip).is_some() {
                continue;
            }
            let value = encode(service, ip);
            let ip_key = format!("{BY_IP}{ip}");
            let txn = Txn::new()
                .when(Compare::Absent(service_key.clone()))
                .when(Compare::Absent(ip_key.clone()))
                .put(service_key.clone(), value.clone())
                .put(ip_key, value);
            if self.store.txn(txn).await?.is_committed() {
                tracing::info!(%service, %ip, "virtual IP allocated");
                self.remember(service, ip);
                return Ok(ip);
            }
            conflicts += 1;
            if let Some(ip) = self.read_allocated(service).await? {
                return Ok(ip);
            }
            if conflicts >= MAX_CONFLICTS {
                return Err(Error::Contended {
                    service: service.clone(),
                    conflicts,
                });
            }
            tracing::debug!(%service, %ip, "virtual IP taken, probing the next");
        }
        Err(Error::Exhausted {
            service: service.clone(),
            probed: MAX_PROBES.min(self.pool.size),
        })
    }

    /// The address the store holds for `service`, remembered in the table.
    async fn read_allocated(&self, service: &ServiceName) -> Result<Option<Ipv4Addr>, Error> {
        let Some(kv) = self.store.get(&service_key(service)).await? else {
            return Ok(None);
        };
        let record = decode(&kv.key, &kv.value)?;
        if record.service != *service {
            return Err(Error::Inconsistent {
                key: kv.key,
                reason: "it names another service",
            });
        }
        self.remember(&record.service, record.ip);
        Ok(Some(record.ip))
    }

    /// Puts a committed allocation in the table now rather than when the watch
    /// delivers it, so a lookup right after allocating sees it.
    fn remember(&self, service: &ServiceName, ip: Ipv4Addr) {
        self.table().send_if_modified(|t| {
            if t.vip_of(service) == Some(ip) {
                return false;
            }
            Arc::make_mut(t).insert(service.clone(), ip);
            true
        });
    }
}

/// The JSON of [`Record`], written by hand so encoding cannot fail: a service name
/// holds only ASCII letters, digits, `-` and `_`, and an address only digits and
/// dots, so neither needs escaping. A test decodes it with serde.
fn encode(service: &ServiceName, ip: Ipv4Addr) -> Vec<u8> {
    format!(r#"{{"Service":"{service}","IP":"{ip}"}}"#).into_bytes()
}

/// Decodes the record under `key` and checks it against the key and the range.
/// `vip/by-service/<name in lower case>`: one record per service, however it is
/// spelled.
fn service_key(service: &ServiceName) -> String {
    format!("{BY_SERVICE}{}", service.to_lowercase())
}

fn decode(key: &str, value: &[u8]) -> Result<Record, Error> {
    let record: Record = serde_json::from_slice(value).map_err(|source| Error::Decode {
        key: key.to_owned(),
        source,
    })?;
    let inconsistent = |reason| Error::Inconsistent {
        key: key.to_owned(),
        reason,
    };
    if !is_virtual(record.ip) {
        return Err(inconsistent("its address is outside 240.0.0.0/4"));
    }
    let matches = if let Some(name) = key.strip_prefix(BY_SERVICE) {
        // Records written before names were folded keep their spelling.
        name.eq_ignore_ascii_case(record.service.as_str())
    } else if let Some(ip) = key.strip_prefix(BY_IP) {
        ip.parse::<Ipv4Addr>().ok() == Some(record.ip)
    } else {
        return Err(inconsistent(
            "the key is not under vip/by-service/ or vip/by-ip/",
        ));
    };
    if !matches {
        return Err(inconsistent("the record does not match its key"));
    }
    Ok(record)
}

/// Builds a table from a listing of `vip/`, skipping (and reporting) bad records.
/// The `by-service` keys are the mapping; `by-ip` keys only lock addresses.
fn load(items: &[store::KeyValue]) -> VipTable {
    let mut table = VipTable::default();
    for kv in items.iter().filter(|kv| kv.key.starts_with(BY_SERVICE)) {
        match decode(&kv.key, &kv.value) {
            Ok(r) => table.insert(r.service, r.ip),
            Err(error) => tracing::warn!(%error, "ignoring a virtual IP record"),
        }
    }
    table
}

/// Applies one transaction's changes to the table.
fn apply(table: &mut VipTable, events: &[Event]) {
    for event in events.iter().filter(|e| e.key().starts_with(BY_SERVICE)) {
        match event {
            Event::Put(kv) => match decode(&kv.key, &kv.value) {
                Ok(r) => table.insert(r.service, r.ip),
                Err(error) => tracing::warn!(%error, "ignoring a virtual IP record"),
            },
            Event::Delete { key, .. } => {
                if let Ok(service) = key[BY_SERVICE.len()..].parse() {
                    table.remove_service(&service);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use super::*;
    use crate::store::memory::MemStore;
    use crate::test_support::eventually;

    fn svc(s: &str) -> ServiceName {
        s.parse().expect("valid service name")
    }

    #[test]
    fn candidates_stay_in_the_pool_and_wrap() {
        for name in ["web", "socat", "a", "db-primary", "x_y"] {
            for probe in [0, 1, 1000, MAX_PROBES] {
                let ip = Pool::FULL.candidate(&svc(name), probe);
                assert!(is_virtual(ip), "{name}/{probe}: {ip}");
            }
        }
        assert_eq!(
            Pool::FULL.size,
            (1 << 28) - 2,
            "240.0.0.1..=255.255.255.254"
        );
        let small = Pool {
            first: FIRST.to_bits(),
            size: 3,
        };
        let seen: HashSet<Ipv4Addr> = (0..3).map(|p| small.candidate(&svc("web"), p)).collect();
        assert_eq!(seen.len(), 3, "probing visits every address of the pool");
        assert_eq!(
            small.candidate(&svc("web"), 0),
            small.candidate(&svc("web"), 3),
            "probing wraps around"
        );
        assert_eq!(
            Pool::FULL.candidate(&svc("web"), 0),
            Pool::FULL.candidate(&svc("web"), 0),
            "the first candidate is a pure function of the name"
        );
    }

    #[test]
    fn range_edges() {
        for (ip, want) in [
            ("240.0.0.0", false),
            ("240.0.0.1", true),
            ("250.1.2.3", true),
            ("255.255.255.254", true),
            ("255.255.255.255", false),
            ("239.255.255.255", false),
            ("198.18.0.1", false),
        ] {
            assert_eq!(is_virtual(ip.parse().expect("ip")), want, "{ip}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let value = encode(&svc("web"), Ipv4Addr::new(240, 1, 2, 3));
        let want = Record {
            service: svc("web"),
            ip: Ipv4Addr::new(240, 1, 2, 3),
        };
        assert_eq!(
            decode("vip/by-service/web", &value).expect("by service"),
            want
        );
        assert_eq!(decode("vip/by-ip/240.1.2.3", &value).expect("by ip"), want);
        let bad: &[(&str, &[u8])] = &[
            ("vip/by-service/db", &value),
            ("vip/by-ip/240.1.2.4", &value),
            ("vip/other/web", &value),
            ("vip/by-service/web", b"not json"),
            (
                "vip/by-service/web",
                br#"{"Service":"web","IP":"10.0.0.1"}"#,
            ),
            (
                "vip/by-service/web",
                br#"{"Service":"we b","IP":"240.0.0.9"}"#,
            ),
        ];
        for (key, value) in bad {
            assert!(decode(key, value).is_err(), "{key} {value:?} accepted");
        }
    }

    #[tokio::test]
    async fn allocation_is_stable_across_calls_and_restarts() {
        let store = Arc::new(MemStore::new());
        let a = Allocator::start(store.clone()).await.expect("start");
        let web = a.get_or_allocate(&svc("web")).await.expect("allocate");
        assert!(is_virtual(web));
        assert_eq!(a.vip_of(&svc("web")), Some(web));
        assert_eq!(a.service_of(web), Some(svc("web")));
        let index = store.index();
        assert_eq!(a.get_or_allocate(&svc("web")).await.expect("again"), web);
        assert_eq!(store.index(), index, "a second call writes nothing");
        drop(a);

        let restarted = Allocator::start(store.clone()).await.expect("restart");
        assert_eq!(restarted.vip_of(&svc("web")), Some(web), "loaded at start");
        assert_eq!(
            restarted
                .get_or_allocate(&svc("web"))
                .await
                .expect("after restart"),
            web
        );
        let db = restarted.get_or_allocate(&svc("db")).await.expect("db");
        assert_ne!(db, web);
        assert_eq!(restarted.snapshot().len(), 2);
    }

    #[tokio::test]
    async fn independent_stores_agree_on_the_first_candidate() {
        let one = Allocator::start(Arc::new(MemStore::new()))
            .await
            .expect("one");
        let two = Allocator::start(Arc::new(MemStore::new()))
            .await
            .expect("two");
        for name in ["web", "socat", "db"] {
            assert_eq!(
                one.get_or_allocate(&svc(name)).await.expect("one"),
                two.get_or_allocate(&svc(name)).await.expect("two"),
                "{name}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_agents_never_share_an_address() {
        // A pool barely larger than the services forces collisions and conflicts.
        let pool = Pool {
            first: FIRST.to_bits(),
            size: 48,
        };
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let a = Allocator::start_with_pool(store.clone(), pool)
            .await
            .expect("a");
        let b = Allocator::start_with_pool(store.clone(), pool)
            .await
            .expect("b");
        let names: Vec<ServiceName> = (0..40).map(|i| svc(&format!("svc-{i}"))).collect();
        let mut tasks = Vec::new();
        for name in &names {
            for alloc in [a.clone(), b.clone()] {
                let name = name.clone();
                tasks.push(tokio::spawn(async move {
                    let ip = alloc.get_or_allocate(&name).await.expect("allocate");
                    (name, ip)
                }));
            }
        }
        let mut by_name: HashMap<ServiceName, Ipv4Addr> = HashMap::new();
        for t in tasks {
            let (name, ip) = t.await.expect("task");
            if let Some(prev) = by_name.insert(name.clone(), ip) {
                assert_eq!(prev, ip, "{name} got two addresses");
            }
        }
        let unique: HashSet<Ipv4Addr> = by_name.values().copied().collect();
        assert_eq!(unique.len(), names.len(), "an address was handed out twice");
        for (name, ip) in &by_name {
            let first = pool.first;
            assert!((first..first + pool.size).contains(&ip.to_bits()));
            let _ = name;
        }
        eventually("both tables to hold every allocation", || {
            a.snapshot().len() == names.len() && b.snapshot().len() == names.len()
        })
        .await;
        for (name, ip) in &by_name {
            assert_eq!(a.vip_of(name), Some(*ip));
            assert_eq!(b.vip_of(name), Some(*ip));
            assert_eq!(b.service_of(*ip).as_ref(), Some(name));
        }
    }

    #[tokio::test]
    async fn a_full_pool_is_reported() {
        let pool = Pool {
            first: FIRST.to_bits(),
            size: 3,
        };
        let a = Allocator::start_with_pool(Arc::new(MemStore::new()), pool)
            .await
            .expect("start");
        for name in ["a", "b", "c"] {
            a.get_or_allocate(&svc(name)).await.expect("fits");
        }
        match a.get_or_allocate(&svc("d")).await {
            Err(Error::Exhausted { service, probed: 3 }) => assert_eq!(service, svc("d")),
            other => panic!("expected exhaustion, got {other:?}"),
        }
        // Existing allocations still answer.
        assert!(a.get_or_allocate(&svc("b")).await.is_ok());
    }

    #[tokio::test]
    async fn other_agents_allocations_arrive_through_the_watch() {
        let store = Arc::new(MemStore::new());
        let a = Allocator::start(store.clone()).await.expect("a");
        let b = Allocator::start(store.clone()).await.expect("b");
        let mut changes = a.subscribe();
        let ip = b.get_or_allocate(&svc("web")).await.expect("allocate");
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("a change is published")
            .expect("sender alive");
        assert_eq!(changes.borrow().vip_of(&svc("web")), Some(ip));
        assert_eq!(a.service_of(ip), Some(svc("web")));
    }

    /// The follower used to stop for good when the store ended its watch (a lost etcd
    /// stream), so another agent's allocation never reached this one's table.
    #[tokio::test]
    async fn allocations_arrive_after_the_store_ended_the_watch() {
        use crate::store::view::tests::{Cut, Flaky};
        let store = Flaky::new();
        let a = Allocator::start(store.clone()).await.expect("a");
        let b = Allocator::start(Arc::new(store.inner.clone()))
            .await
            .expect("b");
        eventually("a to watch", || store.cut.receiver_count() > 0).await;
        store.cut.send(Cut::End).expect("a watches");
        let ip = b.get_or_allocate(&svc("web")).await.expect("allocate");
        eventually("a to see b's allocation", || a.service_of(ip).is_some()).await;
        assert_eq!(a.vip_of(&svc("web")), Some(ip));
    }

    #[tokio::test]
    async fn a_watch_overflow_resyncs_the_table() {
        let store = Arc::new(MemStore::new());
        let a = Allocator::start(store.clone()).await.expect("start");
        // On this single-threaded runtime the follower cannot run while the loop
        // writes (MemStore never yields), so its watch overflows and must resync.
        let n = crate::store::memory::WATCH_BUFFER + 50;
        for i in 0..n {
            let name = svc(&format!("s{i}"));
            let ip = Ipv4Addr::from_bits(FIRST.to_bits() + i as u32);
            let value = encode(&name, ip);
            let txn = Txn::new()
                .put(format!("{BY_SERVICE}{name}"), value.clone())
                .put(format!("{BY_IP}{ip}"), value);
            assert!(store.txn(txn).await.expect("txn").is_committed());
        }
        eventually("the resync to load every record", || {
            a.snapshot().len() == n
        })
        .await;
        assert_eq!(a.service_of(FIRST), Some(svc("s0")));
    }

    #[tokio::test]
    async fn deletes_and_bad_records_keep_the_table_consistent() {
        let store = Arc::new(MemStore::new());
        store
            .put("vip/by-service/bad", b"{".to_vec())
            .await
            .expect("put");
        let a = Allocator::start(store.clone())
            .await
            .expect("start despite a bad record");
        assert!(a.snapshot().is_empty());
        assert!(matches!(
            a.get_or_allocate(&svc("bad")).await,
            Err(Error::Decode { .. })
        ));
        let ip = a.get_or_allocate(&svc("web")).await.expect("allocate");
        // Releasing an address (an operator's repair; the agent never does) removes
        // both keys at once.
        let release = Txn::new()
            .delete(format!("{BY_SERVICE}web"))
            .delete(format!("{BY_IP}{ip}"));
        assert!(store.txn(release).await.expect("txn").is_committed());
        eventually("the delete to reach the table", || {
            a.vip_of(&svc("web")).is_none()
        })
        .await;
        assert_eq!(a.service_of(ip), None);
    }

    #[test]
    fn table_stays_inverse() {
        let mut t = VipTable::default();
        let (ip1, ip2) = (Ipv4Addr::new(240, 0, 0, 1), Ipv4Addr::new(240, 0, 0, 2));
        t.insert(svc("a"), ip1);
        t.insert(svc("a"), ip2);
        assert_eq!(t.service_of(ip1), None);
        t.insert(svc("b"), ip2);
        assert_eq!(t.vip_of(&svc("a")), None);
        assert_eq!(t.service_of(ip2), Some(&svc("b")));
        assert_eq!(t.len(), 1);
        t.remove_service(&svc("b"));
        assert!(t.is_empty());
        assert_eq!(t.service_of(ip2), None);
    }
}
