//! The catalog as the DNS server's [`DnsCatalog`].
//!
//! DNS asks on every query and compares names ignoring case, so answers come from a
//! small index keyed by lower-cased names, built from a catalog snapshot the first
//! time a query sees that snapshot and reused until the catalog changes. Building
//! it is a walk over the snapshot; queries between changes are hash lookups.
//!
//! What each name answers (see [`crate::dns`] for the wire side):
//!
//! - `<svc>.service.consul`: every instance of the service (any kind), at its own
//!   address and port. The catalog has no health checks, so every registered
//!   instance counts as healthy.
//! - `<svc>.connect.consul`: where Connect clients reach each instance: its node's
//!   inbound mTLS address ([`super::connect_endpoint`]).
//! - `<svc>.virtual.consul`: only typical services (mesh destinations) have virtual
//!   IPs; a sidecar registration is not something to dial.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::{Catalog, CatalogSnapshot, Instance, connect_endpoint};
use crate::{
    dns::{self, DnsCatalog},
    identity::ServiceName,
};

/// [`DnsCatalog`] over the live catalog. See the module doc.
#[derive(Debug)]
pub struct CatalogDns {
    catalog: Arc<Catalog>,
    cache: Mutex<Option<(Arc<CatalogSnapshot>, Arc<DnsIndex>)>>,
}

/// The DNS answers of one catalog snapshot.
#[derive(Debug, Default)]
pub struct DnsIndex {
    /// Name (any case, as [`ServiceName`] compares) → the service.
    services: HashMap<ServiceName, DnsService>,
    /// Lower-cased node name → address.
    nodes: HashMap<String, IpAddr>,
}

#[derive(Debug)]
struct DnsService {
    /// The catalog's spelling (of the first instance seen, in node/ID order).
    name: ServiceName,
    /// Whether some instance is a typical service: a mesh destination.
    mesh: bool,
    instances: Vec<dns::Instance>,
    connect: Vec<dns::Instance>,
}

/// Node names are DNS labels too: found in any case.
fn node_key(name: &str) -> String {
    name.to_ascii_lowercase()
}

impl DnsIndex {
    /// Builds the answers of `snap`.
    pub fn build(snap: &CatalogSnapshot) -> Self {
        let mut ix = DnsIndex::default();
        for (node, _, _) in snap.nodes() {
            ix.nodes.insert(node_key(&node.node), node.address);
        }
        for inst in snap.all() {
            let name = &inst.service.service;
            let entry = ix
                .services
                .entry(name.clone())
                .or_insert_with(|| DnsService {
                    name: name.clone(),
                    mesh: false,
                    instances: Vec::new(),
                    connect: Vec::new(),
                });
            if let Some(addr) = address(inst) {
                entry.instances.push(dns::Instance {
                    node: inst.node.node.clone(),
                    addr,
                    port: inst.service.port,
                });
            }
            entry.mesh |= inst.service.kind.is_typical();
        }
        // The snapshot's index folds case as `ServiceName` does: one lookup per
        // mesh service covers every spelling.
        for entry in ix.services.values_mut().filter(|e| e.mesh) {
            let endpoints = snap.connect_endpoints(&entry.name);
            entry.connect.extend(endpoints.iter().map(connect_instance));
        }
        ix
    }
}

/// An instance's address as DNS shows it: its own when it is an IP, its node's
/// when it has none; an instance registered under a host name has no A record.
fn address(inst: &Instance) -> Option<IpAddr> {
    if inst.service.address.is_empty() {
        return Some(inst.node.address);
    }
    inst.service.ip()
}

fn connect_instance(inst: &Instance) -> dns::Instance {
    let addr = connect_endpoint(inst);
    dns::Instance {
        node: inst.node.node.clone(),
        addr: addr.ip(),
        port: addr.port(),
    }
}

impl CatalogDns {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            catalog,
            cache: Mutex::new(None),
        }
    }

    /// The index of the catalog's current snapshot, built if this is the first
    /// query to see that snapshot.
    pub fn index(&self) -> Arc<DnsIndex> {
        let snap = self.catalog.snapshot();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, ix)) = cache.as_ref()
            && Arc::ptr_eq(seen, &snap)
        {
            return ix.clone();
        }
        let ix = Arc::new(DnsIndex::build(&snap));
        *cache = Some((snap, ix.clone()));
        ix
    }
}

impl DnsCatalog for CatalogDns {
    fn service(&self, name: &ServiceName) -> Option<ServiceName> {
        self.index().services.get(name).map(|s| s.name.clone())
    }

    fn virtual_service(&self, name: &ServiceName) -> Option<ServiceName> {
        self.index()
            .services
            .get(name)
            .filter(|s| s.mesh)
            .map(|s| s.name.clone())
    }

    fn instances(&self, service: &ServiceName) -> Vec<dns::Instance> {
        self.index()
            .services
            .get(service)
            .map(|s| s.instances.clone())
            .unwrap_or_default()
    }

    fn connect_endpoints(&self, service: &ServiceName) -> Vec<dns::Instance> {
        self.index()
            .services
            .get(service)
            .map(|s| s.connect.clone())
            .unwrap_or_default()
    }

    fn node_addr(&self, name: &str) -> Option<IpAddr> {
        self.index().nodes.get(&node_key(name)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn svc(s: &str) -> ServiceName {
        s.parse().expect("name")
    }

    #[tokio::test]
    async fn answers_follow_the_catalog_ignoring_case() {
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::memory::MemStore::new());
        let mut config = Config::for_tests();
        config.node_name = "Node-1".into();
        config.advertise_addr = "198.18.0.2".parse().expect("ip");
        config.inbound_addr = "198.18.0.2:20000".parse().expect("addr");
        let catalog = Catalog::start(
            &config.catalog(),
            &crate::catalog::NodeId::for_tests(),
            store,
        )
        .await
        .expect("catalog");
        let dns = CatalogDns::new(catalog.clone());
        assert_eq!(dns.service(&svc("socat")), None);

        for body in [
            serde_json::json!({"ID": "socat-1", "Name": "Socat", "Port": 8181}),
            serde_json::json!({"ID": "socat-2", "Name": "Socat", "Port": 8182, "Address": "198.18.0.7"}),
            serde_json::json!({"Name": "web", "Port": 8080,
                "Connect": {"SidecarService": {}}}),
            serde_json::json!({"Name": "named", "Port": 9000, "Address": "db.example"}),
        ] {
            catalog.register(&body).await.expect("register");
        }
        assert_eq!(dns.service(&svc("SOCAT")), Some(svc("Socat")));
        let mut instances: Vec<(IpAddr, u16)> = dns
            .instances(&svc("Socat"))
            .into_iter()
            .map(|i| (i.addr, i.port))
            .collect();
        instances.sort();
        assert_eq!(
            instances,
            [
                ("198.18.0.2".parse().expect("ip"), 8181),
                ("198.18.0.7".parse().expect("ip"), 8182)
            ]
        );
        let connect = dns.connect_endpoints(&svc("socat"));
        assert_eq!(connect.len(), 2, "one per instance: {connect:?}");
        assert!(connect.iter().all(|i| i.node == "Node-1"
            && i.addr == "198.18.0.2".parse::<IpAddr>().expect("ip")
            && i.port == 20000));
        assert_eq!(
            dns.node_addr("node-1"),
            Some("198.18.0.2".parse().expect("ip"))
        );
        assert_eq!(dns.node_addr("node-2"), None);

        // The sidecar resolves as a service but has no virtual IP; web does.
        let sidecar = svc("web-sidecar-proxy");
        assert_eq!(dns.service(&sidecar), Some(sidecar.clone()));
        assert_eq!(dns.virtual_service(&sidecar), None);
        assert_eq!(dns.virtual_service(&svc("WEB")), Some(svc("web")));
        // A host-name address has no A record.
        assert!(dns.instances(&svc("named")).is_empty());

        // The cached index follows changes.
        catalog.deregister("socat-1").await.expect("deregister");
        assert_eq!(dns.instances(&svc("socat")).len(), 1);
        catalog.deregister("socat-2").await.expect("deregister");
        assert_eq!(dns.service(&svc("socat")), None);
    }
}
