//! [`Directory`] implementations that need no catalog: [`EmptyDirectory`] (an
//! agent that knows no services: every inbound connection is unroutable) and, for
//! tests, [`MemDirectory`] (services, instances, cgroups and upstreams set by
//! hand). The catalog's implementation lives with the catalog.

use crate::redirect::{CgroupId, OrigDst};

use tokio::sync::watch;

use super::{Directory, Endpoint, LocalService, Upstream};
use crate::identity::ServiceName;

/// Knows no services. The directory of an agent built without a catalog.
#[derive(Debug)]
pub struct EmptyDirectory {
    changes: watch::Sender<u64>,
}

impl Default for EmptyDirectory {
    fn default() -> Self {
        Self {
            changes: watch::channel(0).0,
        }
    }
}

impl Directory for EmptyDirectory {
    fn local_service(&self, _name: &ServiceName) -> Option<LocalService> {
        None
    }
    fn endpoints(&self, _name: &ServiceName) -> Vec<Endpoint> {
        Vec::new()
    }
    fn service_of_cgroup(&self, _cgroup_id: CgroupId) -> Option<ServiceName> {
        None
    }
    fn destination_of(&self, _orig_dst: OrigDst) -> Option<ServiceName> {
        None
    }
    fn upstream_listeners(&self) -> Vec<Upstream> {
        Vec::new()
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(any(test, feature = "testing"))]
pub use self::mem::MemDirectory;

#[cfg(any(test, feature = "testing"))]
mod mem {
    use std::{
        collections::HashMap,
        net::{SocketAddr, SocketAddrV4},
        sync::RwLock,
    };

    use tokio::sync::watch;

    use super::super::{Directory, Endpoint, LocalService, Upstream};
    use crate::{
        identity::ServiceName,
        redirect::{CgroupId, OrigDst},
    };

    /// A directory set by hand, for tests.
    #[derive(Debug)]
    pub struct MemDirectory {
        state: RwLock<State>,
        changes: watch::Sender<u64>,
    }

    #[derive(Debug, Default)]
    struct State {
        local: HashMap<ServiceName, LocalService>,
        endpoints: HashMap<ServiceName, Vec<Endpoint>>,
        cgroups: HashMap<u64, ServiceName>,
        destinations: HashMap<SocketAddrV4, ServiceName>,
        upstreams: Vec<Upstream>,
    }

    impl Default for MemDirectory {
        fn default() -> Self {
            Self {
                state: RwLock::new(State::default()),
                changes: watch::channel(0).0,
            }
        }
    }

    impl MemDirectory {
        pub fn new() -> Self {
            Self::default()
        }

        fn update(&self, f: impl FnOnce(&mut State)) {
            f(&mut self.state.write().unwrap_or_else(|p| p.into_inner()));
            self.changes.send_modify(|v| *v += 1);
        }

        fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
            f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
        }

        /// Makes `name` a local service listening in plaintext on `addr`.
        pub fn set_local(&self, name: &ServiceName, addr: SocketAddr) {
            self.set_local_instances(name, vec![addr]);
        }

        /// Makes `name` a local service with one instance listening on each of
        /// `addrs` (which must not be empty).
        pub fn set_local_instances(&self, name: &ServiceName, addrs: Vec<SocketAddr>) {
            let svc = LocalService {
                name: name.clone(),
                addrs,
            };
            self.update(|s| {
                s.local.insert(name.clone(), svc);
            });
        }

        pub fn remove_local(&self, name: &ServiceName) {
            self.update(|s| {
                s.local.remove(name);
            });
        }

        /// Replaces the healthy instances of `name`.
        pub fn set_endpoints(&self, name: &ServiceName, endpoints: Vec<Endpoint>) {
            self.update(|s| {
                s.endpoints.insert(name.clone(), endpoints);
            });
        }

        pub fn map_cgroup(&self, cgroup_id: u64, name: &ServiceName) {
            self.update(|s| {
                s.cgroups.insert(cgroup_id, name.clone());
            });
        }

        pub fn map_destination(&self, orig_dst: SocketAddrV4, name: &ServiceName) {
            self.update(|s| {
                s.destinations.insert(orig_dst, name.clone());
            });
        }

        pub fn add_upstream(&self, upstream: Upstream) {
            self.update(|s| {
                s.upstreams.retain(|u| u.bind != upstream.bind);
                s.upstreams.push(upstream);
            });
        }

        pub fn remove_upstream(&self, bind: SocketAddr) {
            self.update(|s| s.upstreams.retain(|u| u.bind != bind));
        }
    }

    impl Directory for MemDirectory {
        fn local_service(&self, name: &ServiceName) -> Option<LocalService> {
            self.read(|s| s.local.get(name).cloned())
        }
        fn endpoints(&self, name: &ServiceName) -> Vec<Endpoint> {
            self.read(|s| s.endpoints.get(name).cloned().unwrap_or_default())
        }
        fn service_of_cgroup(&self, cgroup_id: CgroupId) -> Option<ServiceName> {
            self.read(|s| s.cgroups.get(&cgroup_id.0).cloned())
        }
        fn destination_of(&self, orig_dst: OrigDst) -> Option<ServiceName> {
            self.read(|s| s.destinations.get(&orig_dst.0).cloned())
        }
        fn upstream_listeners(&self) -> Vec<Upstream> {
            self.read(|s| s.upstreams.clone())
        }
        fn changes(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }
    }
}
