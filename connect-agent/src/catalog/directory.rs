//! The catalog as the proxy's [`Directory`] and as the source of the eBPF maps'
//! desired contents.
//!
//! The proxy asks on every connection (which local service is `web`, where are the
//! instances of `socat`, which service does cgroup 1234 belong to), so the answers
//! come from an index built once per catalog view, off the connection path: a
//! follower task rebuilds it when the catalog changes and only then moves
//! [`Directory::changes`], so whoever reacts to a change sees the new index.
//! Service names are compared case-insensitively (SNI arrives lower-cased).
//!
//! Cgroup ids are the inodes of the service cgroups under `--cgroup`; a service may
//! be registered before its cgroup exists, so unresolved cgroups are retried on a
//! short tick until they appear.
//!
//! Virtual IPs ([`crate::vip`]) come from the allocator's table, which the index
//! follows too: a service in the catalog whose VIP is in the table is a mesh
//! destination on every port of that address (`destination_of(vip:any)`), and the
//! eBPF maps get `(vip:0, VirtualIp)` for it. The port the application dialed on a
//! VIP does not pick anything: the inbound side connects to the service's
//! registered port(s), as with Consul's transparent proxy, where applications dial
//! the service's port on its virtual IP.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::{Catalog, CatalogSnapshot, Instance, connect_endpoint};
use crate::{
    identity::{Datacenter, ServiceName},
    proxy::{Directory, Endpoint, LocalService, Upstream},
    redirect::{self, Desired, DestinationKind, PortGuard},
    redirect::{CgroupId, OrigDst},
    vip::{self, VipTable},
};

/// How often cgroups named by services but not yet present are looked up again.
const CGROUP_RETRY: Duration = Duration::from_secs(1);

/// The proxy's view of the catalog. See the module doc.
#[derive(Debug)]
pub struct CatalogDirectory {
    index: Arc<RwLock<Arc<DirIndex>>>,
    changes: watch::Sender<u64>,
    _follower: AbortOnDropHandle<()>,
}

/// Everything the directory answers, for one catalog view.
#[derive(Debug, Default)]
pub struct DirIndex {
    /// Lower-cased name → local service.
    local: HashMap<ServiceName, LocalService>,
    /// Lower-cased name → healthy Connect endpoints, anywhere.
    endpoints: HashMap<ServiceName, Vec<Endpoint>>,
    cgroups: HashMap<CgroupId, ServiceName>,
    /// Instance addresses of other nodes → service.
    by_addr: HashMap<SocketAddrV4, ServiceName>,
    /// This node's addresses (its own and its instances'): a destination there is
    /// a local service (by port, [`DirIndex::local_ports`]: a port belongs to one
    /// service per node) or nothing, whatever another node's entry says.
    local_ips: BTreeSet<Ipv4Addr>,
    /// Local plaintext ports → service, for loopback destinations.
    local_ports: HashMap<u16, ServiceName>,
    /// Virtual IPs of the services in this view → service.
    by_vip: HashMap<Ipv4Addr, ServiceName>,
    upstreams: Vec<Upstream>,
    /// What the eBPF maps should hold.
    desired: Arc<Desired>,
    /// Whether some service names a cgroup that does not exist (yet).
    unresolved_cgroups: bool,
}

impl DirIndex {
    /// Builds the index of one view. `cgroup_root` is `--cgroup` (no cgroup ids
    /// without it); `vips` the virtual IPs allocated so far.
    pub fn build(snap: &CatalogSnapshot, cgroup_root: Option<&Path>, vips: &VipTable) -> Self {
        let mut ix = DirIndex::default();
        let mut desired = Desired::default();
        let mut seen = BTreeSet::new();
        // Local services' cgroups by name, for their upstream listeners' owners.
        let mut cgroup_of: HashMap<ServiceName, Option<CgroupId>> = HashMap::new();
        if let Some((node, _, _)) = snap.node(snap.local_node())
            && let IpAddr::V4(ip) = node.address
        {
            ix.local_ips.insert(ip);
        }
        for inst in snap.all() {
            let local = inst.node.node == snap.local_node();
            if !inst.service.kind.is_typical() {
                continue;
            }
            let name = &inst.service.service;
            if let Some(SocketAddr::V4(a)) = inst.addr()
                && inst.service.port != 0
            {
                if !local {
                    ix.by_addr.insert(a, name.clone());
                }
                desired.destinations.insert((a, DestinationKind::Instance));
            }
            if local && let Some(SocketAddr::V4(a)) = inst.addr() {
                ix.local_ips.insert(*a.ip());
            }
            if seen.insert(name.clone()) {
                let eps = snap
                    .connect_endpoints(name)
                    .iter()
                    .map(|i| Endpoint {
                        addr: connect_endpoint(i),
                        datacenter: datacenter(i),
                    })
                    .collect();
                ix.endpoints.insert(name.clone(), eps);
                if let Some(ip) = vips.vip_of(name)
                    && vip::is_virtual(ip)
                {
                    ix.by_vip.insert(ip, name.clone());
                    desired
                        .destinations
                        .insert((SocketAddrV4::new(ip, 0), DestinationKind::VirtualIp));
                }
            }
        }
        for inst in snap.local() {
            let svc = &inst.service;
            if svc.kind.is_typical() {
                let cgroup = match (cgroup_root, &svc.cgroup) {
                    (Some(root), Some(rel)) => match redirect::cgroup_id(&root.join(rel)) {
                        Ok(id) => {
                            ix.cgroups.insert(id, svc.service.clone());
                            Some(id)
                        }
                        Err(_) => {
                            ix.unresolved_cgroups = true;
                            None
                        }
                    },
                    _ => None,
                };
                cgroup_of
                    .entry(svc.service.clone())
                    .and_modify(|c| {
                        if *c != cgroup {
                            *c = None;
                        }
                    })
                    .or_insert(cgroup);
                if svc.port != 0 {
                    // The inbound side reaches a local service on loopback: its port
                    // is protected from everyone off the node, loopback is not.
                    // Instances of one service share the name; each adds a port.
                    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), svc.port);
                    let local =
                        ix.local
                            .entry(svc.service.clone())
                            .or_insert_with(|| LocalService {
                                name: svc.service.clone(),
                                addrs: Vec::new(),
                            });
                    if !local.addrs.contains(&addr) {
                        local.addrs.push(addr);
                    }
                    ix.local_ports.insert(svc.port, svc.service.clone());
                    // The owner's cgroup may send datagrams to its own port; two
                    // claims that disagree leave the port with no owner (closed).
                    desired
                        .protected_ports
                        .entry(svc.port)
                        .and_modify(|guard| {
                            if *guard != PortGuard::Service(cgroup) {
                                *guard = PortGuard::Service(None);
                            }
                        })
                        .or_insert(PortGuard::Service(cgroup));
                }
                for u in &svc.upstreams {
                    ix.upstreams.push(upstream(&svc.service, u));
                }
            } else if let Some(p) = &svc.proxy {
                // A sidecar's upstreams dial as the service it fronts.
                for u in &p.upstreams {
                    ix.upstreams.push(upstream(&p.destination_service_name, u));
                }
            }
        }
        ix.upstreams.sort_by_key(|u| u.bind);
        ix.upstreams.dedup_by_key(|u| u.bind);
        if cgroup_root.is_some() {
            // An upstream listener speaks as its source service to whoever
            // connects: with `--cgroup`, only that service's cgroup may connect.
            // A port that is also a service's plaintext port keeps that guard
            // (the listener could not bind it anyway).
            for u in &ix.upstreams {
                let owner = cgroup_of.get(&u.source).copied().flatten();
                desired
                    .protected_ports
                    .entry(u.bind.port())
                    .or_insert(PortGuard::Upstream(owner));
            }
        }
        ix.desired = Arc::new(desired);
        ix
    }

    /// What the eBPF maps should hold for this view.
    pub fn desired(&self) -> &Arc<Desired> {
        &self.desired
    }
}

fn upstream(source: &ServiceName, u: &super::model::UpstreamDefinition) -> Upstream {
    Upstream {
        source: source.clone(),
        destination: u.destination_name.clone(),
        bind: SocketAddr::new(u.local_bind_address, u.local_bind_port),
    }
}

fn datacenter(i: &Instance) -> Datacenter {
    i.node.datacenter.parse().unwrap_or_default()
}

impl CatalogDirectory {
    /// Follows `catalog` and, when given, the virtual IP table of `vips`;
    /// `cgroup_root` is the agent's `--cgroup`.
    pub fn start(
        catalog: &Arc<Catalog>,
        cgroup_root: Option<PathBuf>,
        vips: Option<&vip::Allocator>,
    ) -> Arc<Self> {
        let mut views = catalog.subscribe();
        let mut vip_changes = vips.map(vip::Allocator::subscribe);
        let table = |rx: &mut Option<watch::Receiver<Arc<VipTable>>>| {
            rx.as_mut()
                .map(|rx| rx.borrow_and_update().clone())
                .unwrap_or_default()
        };
        let first = DirIndex::build(
            &views.borrow_and_update(),
            cgroup_root.as_deref(),
            &table(&mut vip_changes),
        );
        let index = Arc::new(RwLock::new(Arc::new(first)));
        let (changes, _) = watch::channel(0u64);
        let follower = {
            let index = index.clone();
            let changes = changes.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(CGROUP_RETRY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        r = views.changed() => if r.is_err() { return },
                        r = vip_changed(&mut vip_changes) => if r.is_err() {
                            // The allocator is gone: keep the last table, stop watching.
                            vip_changes = None;
                        },
                        _ = tick.tick() => {
                            let unresolved = read(&index).unresolved_cgroups;
                            if !unresolved {
                                continue;
                            }
                        }
                    }
                    let snap = views.borrow_and_update().clone();
                    let vips = table(&mut vip_changes);
                    let next = DirIndex::build(&snap, cgroup_root.as_deref(), &vips);
                    let old = std::mem::replace(
                        &mut *index.write().unwrap_or_else(|p| p.into_inner()),
                        Arc::new(next),
                    );
                    // Freed outside the lock.
                    drop(old);
                    changes.send_modify(|v| *v += 1);
                }
            })
        };
        Arc::new(Self {
            index,
            changes,
            _follower: AbortOnDropHandle::new(follower),
        })
    }

    /// The current index (cheap: an `Arc` clone under a read lock).
    pub fn index(&self) -> Arc<DirIndex> {
        read(&self.index)
    }
}

/// Resolves when the VIP table changed; never without a table to follow.
async fn vip_changed(
    rx: &mut Option<watch::Receiver<Arc<VipTable>>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

fn read(index: &RwLock<Arc<DirIndex>>) -> Arc<DirIndex> {
    index.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Directory for CatalogDirectory {
    fn local_service(&self, name: &ServiceName) -> Option<LocalService> {
        self.index().local.get(name).cloned()
    }
    fn endpoints(&self, name: &ServiceName) -> Vec<Endpoint> {
        self.index()
            .endpoints
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
    fn service_of_cgroup(&self, cgroup_id: CgroupId) -> Option<ServiceName> {
        self.index().cgroups.get(&cgroup_id).cloned()
    }
    /// Local first: a destination on this node (loopback, its address, an
    /// address of one of its instances) is one of its own services or nothing,
    /// never what another node's entry claims for that address; then virtual
    /// IPs; then the instances of other nodes.
    fn destination_of(&self, OrigDst(orig_dst): OrigDst) -> Option<ServiceName> {
        let ix = self.index();
        // eBPF redirects loopback connections to protected ports: a local service.
        if orig_dst.ip().is_loopback() || ix.local_ips.contains(orig_dst.ip()) {
            return ix.local_ports.get(&orig_dst.port()).cloned();
        }
        // A virtual IP names its service on every port.
        if let Some(n) = ix.by_vip.get(orig_dst.ip()) {
            return Some(n.clone());
        }
        ix.by_addr.get(&orig_dst).cloned()
    }
    fn upstream_listeners(&self) -> Vec<Upstream> {
        self.index().upstreams.clone()
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    async fn catalog() -> (Arc<Catalog>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::memory::MemStore::new());
        let mut config = Config::for_tests();
        config.advertise_addr = "198.18.0.2".parse().expect("ip");
        config.inbound_addr = "198.18.0.2:20000".parse().expect("addr");
        let c = Catalog::start(
            &config.catalog(),
            &crate::catalog::NodeId::for_tests(),
            store,
        )
        .await
        .expect("catalog");
        (c, dir)
    }

    fn svc(s: &str) -> ServiceName {
        s.parse().expect("name")
    }

    /// Another node's entries cannot claim this node's destinations: an address
    /// of this node (or loopback) is resolved from its own services only, and
    /// before anything else. Before, every node's instances shared one address
    /// map, last write winning, consulted ahead of the local ports.
    #[tokio::test]
    async fn local_destinations_come_first_and_never_from_another_nodes_entry() {
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::memory::MemStore::new());
        let mut config = Config::for_tests();
        config.advertise_addr = "198.18.0.2".parse().expect("ip");
        config.inbound_addr = "198.18.0.2:20000".parse().expect("addr");
        let catalog = Catalog::start(
            &config.catalog(),
            &crate::catalog::NodeId::for_tests(),
            store.clone(),
        )
        .await
        .expect("catalog");
        catalog
            .register(&serde_json::json!({"Name": "socat", "Port": 8181}))
            .await
            .expect("register");
        // Node n2 (as a compromised node or an old agent could write it) claims
        // this node's address and loopback, besides a service of its own. Its
        // entries are written last, so "last write wins" would pick them.
        let n2 = serde_json::json!({"ID": "9b0c5a5e-4f43-4c5e-9d4f-2f6a8b1c3d7e", "Node": "n2",
            "Address": "198.18.0.3", "Datacenter": "dc1", "InboundAddr": "198.18.0.3:20000"});
        store
            .put("catalog/nodes/n2", serde_json::to_vec(&n2).expect("json"))
            .await
            .expect("put");
        let mut last = 0;
        for (id, address, port) in [
            ("evil-1", "198.18.0.2", 8181),
            ("evil-2", "198.18.0.2", 5432),
            ("evil-3", "127.0.0.1", 5432),
            ("db", "198.18.0.3", 5432),
        ] {
            let name = if id == "db" { "db" } else { "evil" };
            let body = serde_json::json!({"ID": id, "Service": name, "Address": address,
                "Port": port, "Source": {"Type": "Api"}});
            last = store
                .put(
                    &format!("catalog/services/n2/{id}"),
                    serde_json::to_vec(&body).expect("json"),
                )
                .await
                .expect("put");
        }
        let dir = CatalogDirectory::start(&catalog, None, None);
        let mut changes = catalog.changes();
        tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|i| *i >= last))
            .await
            .expect("in time")
            .expect("open");
        let mut dir_changes = dir.changes();
        tokio::time::timeout(Duration::from_secs(5), async {
            while dir.endpoints(&svc("db")).is_empty() {
                dir_changes.changed().await.expect("open");
            }
        })
        .await
        .expect("the directory follows");

        let at = |a: &str| dir.destination_of(OrigDst(a.parse().expect("addr")));
        assert_eq!(
            at("198.18.0.2:8181"),
            Some(svc("socat")),
            "the local service wins"
        );
        assert_eq!(
            at("198.18.0.2:5432"),
            None,
            "this node's address, no local service"
        );
        assert_eq!(at("127.0.0.1:5432"), None, "loopback is every node's own");
        assert_eq!(at("127.0.0.1:8181"), Some(svc("socat")));
        assert_eq!(
            at("198.18.0.3:5432"),
            Some(svc("db")),
            "n2's own address is n2's"
        );
    }

    #[tokio::test]
    async fn answers_follow_registrations_case_insensitively() {
        let (catalog, cgroups) = catalog().await;
        std::fs::create_dir(cgroups.path().join("web")).expect("mkdir");
        let dir = CatalogDirectory::start(&catalog, Some(cgroups.path().to_owned()), None);
        let mut changes = dir.changes();
        assert!(dir.local_service(&svc("socat")).is_none());

        catalog
            .register(&serde_json::json!({"Name": "Socat", "Port": 8181}))
            .await
            .expect("register");
        catalog
            .register(&serde_json::json!({
                "Name": "web", "Port": 8080, "cgroup": "web",
                "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
                    {"DestinationName": "socat", "LocalBindPort": 9191}]}}}
            }))
            .await
            .expect("register");
        tokio::time::timeout(Duration::from_secs(2), async {
            while dir.local_service(&svc("web")).is_none() {
                changes.changed().await.expect("open");
            }
        })
        .await
        .expect("the directory follows the catalog");

        let local = dir.local_service(&svc("socat")).expect("local, any case");
        assert_eq!(local.name.as_str(), "Socat");
        assert_eq!(local.addrs, ["127.0.0.1:8181".parse().expect("addr")]);
        let eps = dir.endpoints(&svc("SOCAT"));
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr, "198.18.0.2:20000".parse().expect("addr"));

        let node_socat: SocketAddrV4 = "198.18.0.2:8181".parse().expect("addr");
        assert_eq!(dir.destination_of(OrigDst(node_socat)), Some(svc("Socat")));
        let loopback: SocketAddrV4 = "127.0.0.1:8181".parse().expect("addr");
        assert_eq!(dir.destination_of(OrigDst(loopback)), Some(svc("Socat")));
        assert_eq!(
            dir.destination_of(OrigDst("198.18.0.9:8181".parse().expect("addr"))),
            None
        );

        let id = redirect::cgroup_id(&cgroups.path().join("web")).expect("inode");
        assert_eq!(dir.service_of_cgroup(id), Some(svc("web")));
        assert_eq!(dir.service_of_cgroup(CgroupId(id.0 + 1)), None);

        let ups = dir.upstream_listeners();
        assert_eq!(ups.len(), 1, "{ups:?}");
        assert_eq!(ups[0].source, svc("web"));
        assert_eq!(ups[0].destination, svc("socat"));
        assert_eq!(ups[0].bind.port(), 9191);

        let ix = dir.index();
        let d = ix.desired();
        assert!(d.protected_ports.contains_key(&8181) && d.protected_ports.contains_key(&8080));
        assert!(
            d.destinations
                .contains(&(node_socat, DestinationKind::Instance))
        );

        catalog
            .deregister(&dir_id(&catalog, "Socat"))
            .await
            .expect("deregister");
        tokio::time::timeout(Duration::from_secs(2), async {
            while dir.local_service(&svc("socat")).is_some() {
                changes.changed().await.expect("open");
            }
        })
        .await
        .expect("deregistration is seen");
        assert_eq!(dir.destination_of(OrigDst(node_socat)), None);
        assert!(!dir.index().desired().protected_ports.contains_key(&8181));
    }

    #[tokio::test]
    async fn a_cgroup_made_after_registration_is_picked_up() {
        let (catalog, cgroups) = catalog().await;
        let dir = CatalogDirectory::start(&catalog, Some(cgroups.path().to_owned()), None);
        catalog
            .register(&serde_json::json!({"Name": "web", "Port": 8080, "cgroup": "late"}))
            .await
            .expect("register");
        let path = cgroups.path().join("late");
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::create_dir(&path).expect("mkdir");
        let id = redirect::cgroup_id(&path).expect("inode");
        tokio::time::timeout(Duration::from_secs(4), async {
            while dir.service_of_cgroup(id).is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the late cgroup is resolved on the retry tick");
    }

    #[tokio::test]
    async fn virtual_ips_are_destinations_on_every_port_and_local_instances_add_up() {
        let (catalog, _cgroups) = catalog().await;
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::memory::MemStore::new());
        let vips = vip::Allocator::start(store).await.expect("vips");
        let dir = CatalogDirectory::start(&catalog, None, Some(&vips));
        let mut changes = dir.changes();
        for body in [
            serde_json::json!({"ID": "echo-1", "Name": "echo", "Port": 7001}),
            serde_json::json!({"ID": "echo-2", "Name": "echo", "Port": 7002}),
        ] {
            catalog.register(&body).await.expect("register");
        }
        // Allocated after registration (as the agent's follower does): the index
        // follows the table as well as the catalog.
        let ip = vips.get_or_allocate(&svc("echo")).await.expect("vip");
        tokio::time::timeout(Duration::from_secs(2), async {
            while dir
                .destination_of(OrigDst(SocketAddrV4::new(ip, 1)))
                .is_none()
            {
                changes.changed().await.expect("open");
            }
        })
        .await
        .expect("the VIP reaches the directory");
        for port in [0, 80, 7001, 65535] {
            assert_eq!(
                dir.destination_of(OrigDst(SocketAddrV4::new(ip, port))),
                Some(svc("echo")),
                "{ip}:{port}"
            );
        }
        let other = Ipv4Addr::from_bits(ip.to_bits() ^ 1);
        assert_eq!(
            dir.destination_of(OrigDst(SocketAddrV4::new(other, 7001))),
            None
        );
        let ix = dir.index();
        assert!(
            ix.desired()
                .destinations
                .contains(&(SocketAddrV4::new(ip, 0), DestinationKind::VirtualIp))
        );
        let local = dir.local_service(&svc("echo")).expect("local");
        assert_eq!(
            local.addrs,
            [
                "127.0.0.1:7001".parse::<SocketAddr>().expect("addr"),
                "127.0.0.1:7002".parse().expect("addr")
            ]
        );
        assert_eq!(dir.endpoints(&svc("echo")).len(), 2, "one per instance");

        // A service that left the catalog keeps its address in the table but is
        // no longer a destination.
        catalog.deregister("echo-1").await.expect("deregister");
        catalog.deregister("echo-2").await.expect("deregister");
        tokio::time::timeout(Duration::from_secs(2), async {
            while dir
                .destination_of(OrigDst(SocketAddrV4::new(ip, 1)))
                .is_some()
            {
                changes.changed().await.expect("open");
            }
        })
        .await
        .expect("deregistration removes the VIP destination");
        assert!(
            !dir.index()
                .desired()
                .destinations
                .iter()
                .any(|(_, k)| *k == DestinationKind::VirtualIp)
        );
        assert_eq!(vips.vip_of(&svc("echo")), Some(ip));
    }

    fn dir_id(catalog: &Catalog, name: &str) -> String {
        catalog
            .snapshot()
            .local()
            .find(|i| i.service.service.as_str() == name)
            .map(|i| i.service.id.clone())
            .expect("registered")
    }
}
