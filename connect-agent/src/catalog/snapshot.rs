//! An immutable, indexed view of the catalog at one store index. Readers (API,
//! proxies, redirect map sync, DNS) hold an `Arc` of it and never wait on I/O.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use super::model::{Node, Service, ServiceKind};
use crate::{identity::ServiceName, store::Index};

/// One service instance with the node it runs on.
#[derive(Debug, Clone)]
pub struct Instance {
    pub node: Arc<Node>,
    pub service: Arc<Service>,
    pub create_index: Index,
    pub modify_index: Index,
}

impl Instance {
    /// The instance's plaintext address, when its address is an IP.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.service
            .ip()
            .map(|ip| SocketAddr::new(ip, self.service.port))
    }
}

/// The catalog at [`CatalogSnapshot::index`].
#[derive(Debug, Clone, Default)]
pub struct CatalogSnapshot {
    /// The store index this view reflects (`X-Consul-Index` of catalog reads).
    pub index: Index,
    local_node: String,
    nodes: BTreeMap<String, (Arc<Node>, Index, Index)>,
    /// (node, service ID) → instance.
    instances: BTreeMap<(String, String), Instance>,
    by_name: HashMap<ServiceName, Vec<Instance>>,
    by_addr: HashMap<SocketAddr, Instance>,
}

impl CatalogSnapshot {
    /// Builds the derived indexes.
    pub fn new(
        index: Index,
        local_node: String,
        nodes: BTreeMap<String, (Arc<Node>, Index, Index)>,
        services: Vec<(String, Arc<Service>, Index, Index)>,
    ) -> Self {
        let mut instances = BTreeMap::new();
        let mut by_name: HashMap<ServiceName, Vec<Instance>> = HashMap::new();
        let mut by_addr = HashMap::new();
        for (node, service, create_index, modify_index) in services {
            // A service whose node record is missing cannot be reached: leave it out.
            let Some((n, _, _)) = nodes.get(&node) else {
                continue;
            };
            let inst = Instance {
                node: n.clone(),
                service,
                create_index,
                modify_index,
            };
            by_name
                .entry(inst.service.service.clone())
                .or_default()
                .push(inst.clone());
            if inst.service.kind == ServiceKind::Typical
                && let Some(a) = inst.addr()
                && inst.service.port != 0
            {
                by_addr.insert(a, inst.clone());
            }
            instances.insert((node, inst.service.id.clone()), inst);
        }
        Self {
            index,
            local_node,
            nodes,
            instances,
            by_name,
            by_addr,
        }
    }

    /// This agent's node name.
    pub fn local_node(&self) -> &str {
        &self.local_node
    }

    /// Every instance of `name` on every node, in (node, ID) order.
    pub fn instances(&self, name: &ServiceName) -> &[Instance] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// Every instance on every node.
    pub fn all(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values()
    }

    /// The services registered on this node (with their cgroups and upstreams).
    pub fn local(&self) -> impl Iterator<Item = &Instance> {
        let node = self.local_node.clone();
        self.instances
            .range((node.clone(), String::new())..)
            .take_while(move |((n, _), _)| *n == node)
            .map(|(_, i)| i)
    }

    /// A local service by ID.
    pub fn local_service(&self, id: &str) -> Option<&Instance> {
        self.instances
            .get(&(self.local_node.clone(), id.to_owned()))
    }

    /// The typical service instance listening at `addr` (a mesh destination).
    pub fn by_addr(&self, addr: &SocketAddr) -> Option<&Instance> {
        self.by_addr.get(addr)
    }

    /// A node with its create and modify indexes.
    pub fn node(&self, name: &str) -> Option<&(Arc<Node>, Index, Index)> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &(Arc<Node>, Index, Index)> {
        self.nodes.values()
    }

    /// The Connect endpoints of `name`: one per instance of the service, as the
    /// sidecar registration when the instance has one, else the instance itself
    /// (see [`super::Catalog`] on why the node's inbound address is the endpoint).
    pub fn connect_endpoints(&self, name: &ServiceName) -> Vec<Instance> {
        let mut out = Vec::new();
        for inst in self.instances(name) {
            if inst.service.kind != ServiceKind::Typical {
                continue;
            }
            let sidecar = self
                .instances
                .range((inst.node.node.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == inst.node.node)
                .map(|(_, i)| i)
                .find(|i| {
                    i.service.sidecar_of.as_deref() == Some(inst.service.id.as_str())
                        || i.service.proxy.as_ref().is_some_and(|p| {
                            p.destination_service_name == *name
                                && (p.destination_service_id.is_empty()
                                    || p.destination_service_id == inst.service.id)
                        })
                });
            out.push(sidecar.unwrap_or(inst).clone());
        }
        out
    }

    /// Number of nodes and of service instances (metrics).
    pub fn counts(&self) -> (usize, usize) {
        (self.nodes.len(), self.instances.len())
    }
}
