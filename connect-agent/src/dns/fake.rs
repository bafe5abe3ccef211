//! An in-memory [`DnsCatalog`] for tests (here and in `tests/`): nodes with an
//! address and an inbound mTLS address, and service instances that are healthy or
//! not. Behind the `testing` feature.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use super::{DnsCatalog, Instance};
use crate::identity::ServiceName;

/// A catalog that tests fill by hand. Clones share the data.
#[derive(Debug, Clone, Default)]
pub struct FakeCatalog {
    data: Arc<Mutex<Data>>,
}

#[derive(Debug, Default)]
struct Data {
    /// Keyed by lower-cased name; the value keeps the registered spelling.
    nodes: BTreeMap<String, Node>,
    services: BTreeMap<ServiceName, (ServiceName, Vec<FakeInstance>)>,
}

#[derive(Debug, Clone)]
struct Node {
    addr: IpAddr,
    inbound: SocketAddr,
}

#[derive(Debug, Clone)]
struct FakeInstance {
    node: String,
    addr: IpAddr,
    port: u16,
    healthy: bool,
}

impl FakeCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        // Test data: a panic elsewhere while holding the lock leaves it usable.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) node `name` at `addr`, its inbound listener at `inbound`.
    pub fn add_node(&self, name: &str, addr: IpAddr, inbound: SocketAddr) -> &Self {
        self.lock()
            .nodes
            .insert(name.to_ascii_lowercase(), Node { addr, inbound });
        self
    }

    /// Registers an instance of `service` on `node` (which must have been added).
    pub fn add_instance(
        &self,
        service: &ServiceName,
        node: &str,
        addr: IpAddr,
        port: u16,
        healthy: bool,
    ) -> &Self {
        let mut data = self.lock();
        let entry = data
            .services
            .entry(service.clone())
            .or_insert_with(|| (service.clone(), Vec::new()));
        entry.1.push(FakeInstance {
            node: node.to_owned(),
            addr,
            port,
            healthy,
        });
        self
    }

    /// Marks every instance of `service` healthy or not.
    pub fn set_healthy(&self, service: &ServiceName, healthy: bool) {
        if let Some((_, instances)) = self.lock().services.get_mut(service) {
            for i in instances {
                i.healthy = healthy;
            }
        }
    }

    fn healthy(&self, service: &ServiceName) -> Vec<FakeInstance> {
        self.lock()
            .services
            .get(service)
            .map(|(_, instances)| instances.iter().filter(|i| i.healthy).cloned().collect())
            .unwrap_or_default()
    }
}

impl DnsCatalog for FakeCatalog {
    fn service(&self, name: &ServiceName) -> Option<ServiceName> {
        self.lock()
            .services
            .get(name)
            .map(|(canonical, _)| canonical.clone())
    }

    fn instances(&self, service: &ServiceName) -> Vec<Instance> {
        self.healthy(service)
            .into_iter()
            .map(|i| Instance {
                node: i.node,
                addr: i.addr,
                port: i.port,
            })
            .collect()
    }

    fn connect_endpoints(&self, service: &ServiceName) -> Vec<Instance> {
        let instances = self.healthy(service);
        let data = self.lock();
        instances
            .into_iter()
            .filter_map(|i| {
                let node = data.nodes.get(&i.node.to_ascii_lowercase())?;
                Some(Instance {
                    node: i.node,
                    addr: node.inbound.ip(),
                    port: node.inbound.port(),
                })
            })
            .collect()
    }

    fn node_addr(&self, name: &str) -> Option<IpAddr> {
        self.lock()
            .nodes
            .get(&name.to_ascii_lowercase())
            .map(|n| n.addr)
    }
}
