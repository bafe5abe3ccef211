//! The service catalog: which services run on which node, at which address, in which
//! cgroup, with which upstreams.
//!
//! Records live in the store (`catalog/nodes/<node>`, `catalog/services/<node>/<id>`,
//! JSON); [`Catalog`] follows them with a watch into an immutable
//! [`CatalogSnapshot`] that readers take without I/O. Writes come from the HTTP API
//! (register/deregister) and from the `--config-dir` files ([`Catalog::reload`]: all
//! files parsed first, then applied in one transaction or not at all).
//!
//! Connect endpoints in this design: every node runs one inbound mTLS proxy for all
//! of its services, so the Connect endpoint of an instance is its node's inbound
//! address. `/v1/health/connect/<svc>` and `/v1/catalog/connect/<svc>` answer one
//! entry per instance of `<svc>` — its sidecar registration when it has one (so
//! clients see `Kind: connect-proxy` as with Consul), else the instance itself — with
//! `Service.Address`/`Port` set to the node's inbound address. A sidecar's own port is
//! recorded (Consul clients expect one) but nothing listens on it.
//!
//! This module does not own what the catalog drives (eBPF maps, upstream listeners,
//! leaves): those follow [`Catalog::subscribe`].

pub mod definition;
pub mod directory;
pub mod dns;
pub mod model;
pub mod snapshot;
pub mod virtual_ips;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::watch;

pub use self::{
    definition::{Definition, InputError},
    model::{Node, ProxyDefinition, Service, ServiceKind, Source, UpstreamDefinition},
    snapshot::{CatalogSnapshot, Instance},
};
use crate::{
    identity::{Datacenter, ServiceName},
    store::{self, Compare, Event, Index, KeyValue, Projection, Store, Txn, View},
};

/// Prefix of every catalog key.
pub const PREFIX: &str = "catalog/";
const NODES: &str = "catalog/nodes/";
const SERVICES: &str = "catalog/services/";
/// Consul's sidecar port range (`ports.sidecar_min_port..=sidecar_max_port`).
const SIDECAR_PORTS: std::ops::RangeInclusive<u16> = 21000..=21255;
/// Largest definition file read from `--config-dir` (same bound as an API body).
const MAX_FILE_BYTES: u64 = 512 * 1024;
/// How long a write waits for the view to include it before answering anyway.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A registration body is wrong (the client's fault).
    #[error("{0}")]
    Input(#[from] InputError),
    /// A definition file is wrong (the operator's fault); nothing was applied.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: InputError,
    },
    #[error("{path}: invalid JSON: {source}")]
    FileJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_FILE_BYTES} bytes")]
    FileTooLarge { path: PathBuf },
    #[error("{second}: service ID {id:?} is also defined in {first}")]
    DuplicateId {
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no sidecar port left in the range [21000, 21255] for {id:?}")]
    NoSidecarPort { id: String },
    /// A port or a cgroup names one service on a node: the eBPF maps, the proxy's
    /// local routing and the Workload API's attestation all go from it to one owner.
    #[error(
        "service {id:?} claims {what}, which service {holder:?} (ID {holder_id:?}) holds on this node"
    )]
    Claimed {
        id: String,
        what: String,
        holder: String,
        holder_id: String,
    },
    /// Every protected port needs an eBPF map entry; a port that cannot have one
    /// would be open to everyone, so its registration is refused instead.
    #[error(
        "service {id:?} would add port {port}, but this node protects {limit} plaintext ports already (the capacity of the eBPF map); deregister a service or move it to another node"
    )]
    ProtectedPortsFull { id: String, port: u16, limit: usize },
    #[error("Unknown service ID {id:?}")]
    UnknownService { id: String },
    #[error(transparent)]
    Store(#[from] store::Error),
    /// Another agent holds this node name: two agents of one name would overwrite
    /// each other's services (`--config-dir` replaces the node's file-sourced
    /// services), so the second is refused.
    #[error(
        "refusing to start: the node name {node:?} is held by node ID {held_by}, and this agent's node ID is {ours}; give this agent a name of its own with --node-name, or, if node {held_by} is gone for good and this agent replaces it, write {held_by} into {id_file}"
    )]
    NodeNameTaken {
        node: String,
        held_by: String,
        ours: String,
        id_file: PathBuf,
    },
    /// The node record kept changing under the claim (agents starting at once).
    #[error(
        "could not claim the node name {node:?}: its record changed {attempts} times while this agent tried"
    )]
    ClaimContended { node: String, attempts: usize },
    #[error("the store holds a corrupt catalog record at {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl crate::fault::Blame for Error {
    fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            Error::UnknownService { .. } => Fault::NotFound,
            Error::ProtectedPortsFull { .. } | Error::Claimed { .. } => Fault::Conflict,
            e if e.is_user_error() => Fault::Caller,
            _ => Fault::Ours,
        }
    }
}

impl Error {
    /// Whether the caller (client, operator) is at fault rather than the agent.
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            Error::Store(_) | Error::Corrupt { .. } | Error::ClaimContended { .. }
        )
    }
}

/// Refuses a write after which two local services of different names would hold
/// one port or one cgroup: `evil` registered on `db`'s port or in `web`'s cgroup
/// would capture or relabel their traffic. Instances of one service may share them
/// (two processes of `web` in one cgroup, one port on two addresses). Names the holder.
fn check_claims(after: &[&Service], new: &BTreeMap<String, Service>) -> Result<(), Error> {
    for s in new.values() {
        for other in after.iter().filter(|o| o.id != s.id) {
            let what = if s.port != 0 && s.port == other.port && s.service != other.service {
                format!("port {}", s.port)
            } else if s.cgroup.is_some() && s.cgroup == other.cgroup && s.service != other.service {
                format!(
                    "cgroup {:?}",
                    s.cgroup
                        .as_deref()
                        .map(|c| c.display().to_string())
                        .unwrap_or_default()
                )
            } else {
                continue;
            };
            return Err(Error::Claimed {
                id: s.id.clone(),
                what,
                holder: other.service.to_string(),
                holder_id: other.id.clone(),
            });
        }
    }
    Ok(())
}

/// Refuses a write that would leave the node with more distinct protected ports
/// (plaintext ports of typical services) than `limit`, naming a service that adds one.
fn check_port_capacity(
    existing: &BTreeMap<String, Service>,
    after: &[&Service],
    new: &BTreeMap<String, Service>,
    limit: usize,
) -> Result<(), Error> {
    let protected = |s: &&Service| s.kind.is_typical() && s.port != 0;
    let before: BTreeSet<u16> = existing
        .values()
        .filter(protected)
        .map(|s| s.port)
        .collect();
    let after: BTreeSet<u16> = after
        .iter()
        .copied()
        .filter(protected)
        .map(|s| s.port)
        .collect();
    if after.len() <= limit || after.len() <= before.len() {
        return Ok(());
    }
    let adder = new
        .values()
        .filter(protected)
        .find(|s| !before.contains(&s.port));
    Err(Error::ProtectedPortsFull {
        id: adder.map_or_else(String::new, |s| s.id.clone()),
        port: adder.map_or(0, |s| s.port),
        limit,
    })
}

/// The IP addresses of this node's interfaces (none if they cannot be read).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    pub files: usize,
    pub services: usize,
}

/// The catalog as this agent sees it. See the module doc.
#[derive(Debug)]
pub struct Catalog {
    store: Arc<dyn Store>,
    node: Node,
    config_dir: Option<PathBuf>,
    protected_port_limit: Option<usize>,
    advertise: IpAddr,
    own_addresses: Option<Vec<IpAddr>>,
    /// The catalog, kept equal to `catalog/`; following stops when this is dropped.
    view: View<Published>,
    /// Serialises writers, so that sidecar ports and reload's replace-all are planned
    /// on what the previous write left.
    writes: tokio::sync::Mutex<()>,
}

/// The [`Projection`] of `catalog/`: the raw records, and the snapshot built from
/// them that readers hold.
#[derive(Debug)]
struct Published {
    snapshot: watch::Sender<Arc<CatalogSnapshot>>,
    /// Only the follower touches this.
    records: std::sync::Mutex<BTreeMap<String, KeyValue>>,
    /// This node's name, which the snapshot marks as local.
    local: String,
}

impl Published {
    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, KeyValue>> {
        // Map inserts and removes of ready values cannot panic half-way.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Projection for Published {
    async fn reset(&self, listing: store::Listing) -> bool {
        let fresh = store::view::records_of(listing.items);
        let mut records = self.records();
        // Wake readers only if the catalog really changed (the first listing always
        // replaces the empty placeholder, whose index is 0).
        if fresh == *records && self.snapshot.borrow().index != 0 {
            return false;
        }
        *records = fresh;
        self.snapshot
            .send_replace(Arc::new(build(&records, listing.index, &self.local)));
        true
    }

    async fn apply(&self, events: Vec<Event>, index: Index) {
        let mut records = self.records();
        store::view::apply_to(&mut records, events);
        self.snapshot
            .send_replace(Arc::new(build(&records, index, &self.local)));
    }
}

/// What the catalog needs to know of this agent.
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    pub node_name: String,
    pub datacenter: Datacenter,
    /// The node's address in the catalog, and the default address of its services.
    pub advertise_addr: IpAddr,
    /// The addresses this node's services may be registered at besides the
    /// advertise address: `None` reads the node's interfaces at each registration
    /// (tests fix a list).
    pub own_addresses: Option<Vec<IpAddr>>,
    /// Where this node's proxy takes mTLS connections (its Connect endpoints).
    pub inbound_addr: SocketAddr,
    /// A server agent's HTTPS API, published in its node record for client
    /// agents to find ([`Node::server_api`]).
    pub server_api: Option<String>,
    /// `--config-dir`: service definitions applied at start and on reload.
    pub config_dir: Option<PathBuf>,
    /// How many distinct plaintext ports this node's services may have: with eBPF
    /// each needs an entry in the protected-port map, whose capacity this is.
    pub protected_port_limit: Option<usize>,
}

impl Catalog {
    /// Claims this node's name for `node_id` ([`claim`]), loads the catalog, starts
    /// following the store and applies `--config-dir` (a bad file fails startup,
    /// naming path and field).
    pub async fn start(
        config: &CatalogConfig,
        node_id: &NodeId,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, Error> {
        let node = Node {
            id: node_id.id.hyphenated().to_string(),
            node: config.node_name.clone(),
            address: config.advertise_addr,
            datacenter: config.datacenter.to_string(),
            inbound_addr: config.inbound_addr,
            server_api: config.server_api.clone(),
        };
        claim(store.as_ref(), &node, &node_id.file).await?;
        let published = Published {
            snapshot: watch::channel(Arc::new(build(&BTreeMap::new(), 0, &node.node))).0,
            records: std::sync::Mutex::new(BTreeMap::new()),
            local: node.node.clone(),
        };
        let view = View::start(store.clone(), PREFIX, published).await?;
        tracing::info!(
            services = view.get().snapshot.borrow().counts().1,
            index = view.index(),
            "catalog loaded"
        );
        let catalog = Arc::new(Self {
            store,
            node,
            config_dir: config.config_dir.clone(),
            protected_port_limit: config.protected_port_limit,
            advertise: config.advertise_addr,
            own_addresses: config.own_addresses.clone(),
            view,
            writes: tokio::sync::Mutex::new(()),
        });
        if catalog.config_dir.is_some() {
            let s = catalog.reload().await?;
            tracing::info!(
                files = s.files,
                services = s.services,
                "service definitions loaded"
            );
        }
        Ok(catalog)
    }

    /// The current view.
    pub fn snapshot(&self) -> Arc<CatalogSnapshot> {
        self.view.get().snapshot.borrow().clone()
    }

    /// Every new view, for components that follow the catalog.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CatalogSnapshot>> {
        self.view.get().snapshot.subscribe()
    }

    /// The index of every new view, for blocking queries ([`crate::api::block_on`]).
    pub fn changes(&self) -> watch::Receiver<Index> {
        self.view.subscribe()
    }

    /// This node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Registers one service from an API body (Consul's shape, any key case), with its
    /// sidecar when `connect.sidecar_service` is given. Returns the service ID.
    pub async fn register(&self, body: &serde_json::Value) -> Result<String, Error> {
        self.register_definition(definition::parse(body, "")?).await
    }

    /// [`Catalog::register`] of a definition parsed already (the API parses first,
    /// to judge the caller's rights on exactly what is registered).
    pub async fn register_definition(&self, def: Definition) -> Result<String, Error> {
        let id = def.id.clone();
        self.apply(vec![def], Source::Api, false).await?;
        tracing::info!(id = %id, "service registered");
        Ok(id)
    }

    /// Removes a local service and its sidecar.
    pub async fn deregister(&self, id: &str) -> Result<(), Error> {
        definition::check_id(id)?;
        let _w = self.writes.lock().await;
        let existing = self.local_services().await?;
        if !existing.contains_key(id) {
            return Err(Error::UnknownService { id: id.to_owned() });
        }
        let mut txn = Txn::new().delete(self.service_key(id));
        for s in existing.values() {
            if s.sidecar_of.as_deref() == Some(id) {
                txn = txn.delete(self.service_key(&s.id));
            }
        }
        let out = self.store.txn(txn).await?;
        self.caught_up(out.index()).await;
        tracing::info!(id = %id, "service deregistered");
        Ok(())
    }

    /// Re-reads `--config-dir`: every `*.json` file parsed first; on any error nothing
    /// changes and the error names the file and field. On success the file-sourced
    /// services are replaced in one transaction; API registrations are untouched.
    pub async fn reload(&self) -> Result<ReloadSummary, Error> {
        let Some(dir) = self.config_dir.clone() else {
            return Ok(ReloadSummary {
                files: 0,
                services: 0,
            });
        };
        let files = tokio::task::spawn_blocking(move || read_dir(&dir))
            .await
            .map_err(|e| Error::Read {
                path: PathBuf::from("<config-dir>"),
                source: std::io::Error::other(e),
            })??;
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut defs = Vec::new();
        for (path, doc) in &files {
            for def in definition::parse_document(doc).map_err(|source| Error::File {
                path: path.clone(),
                source,
            })? {
                if let Some(first) = seen.insert(def.id.clone(), path.clone()) {
                    return Err(Error::DuplicateId {
                        id: def.id,
                        first,
                        second: path.clone(),
                    });
                }
                defs.push((path.clone(), def));
            }
        }
        let services = defs.len();
        let mut by_source: Vec<(Definition, Source)> = Vec::new();
        for (path, def) in defs {
            by_source.push((def, Source::File { path }));
        }
        self.apply_sourced(by_source, true).await?;
        tracing::info!(
            files = files.len(),
            services,
            "service definitions reloaded"
        );
        Ok(ReloadSummary {
            files: files.len(),
            services,
        })
    }

    // ─────────────────────── internals ───────────────────────

    async fn apply(
        &self,
        defs: Vec<Definition>,
        source: Source,
        replace_files: bool,
    ) -> Result<(), Error> {
        let sourced = defs.into_iter().map(|d| (d, source.clone())).collect();
        self.apply_sourced(sourced, replace_files).await
    }

    /// Writes definitions (with sidecars) in one transaction; with `replace_files`,
    /// first removes every file-sourced service of this node.
    async fn apply_sourced(
        &self,
        defs: Vec<(Definition, Source)>,
        replace_files: bool,
    ) -> Result<(), Error> {
        let _w = self.writes.lock().await;
        let mut existing = self.local_services().await?;
        let mut txn = Txn::new();
        if replace_files {
            let files: Vec<String> = existing
                .values()
                .filter(|s| matches!(s.source, Source::File { .. }))
                .map(|s| s.id.clone())
                .collect();
            for id in files {
                txn = txn.delete(self.service_key(&id));
                existing.remove(&id);
            }
        }
        let mut new: BTreeMap<String, Service> = BTreeMap::new();
        for (def, source) in defs {
            // A re-registration without a sidecar drops the old one.
            let old_sidecars: Vec<String> = existing
                .values()
                .filter(|s| s.sidecar_of.as_deref() == Some(def.id.as_str()))
                .map(|s| s.id.clone())
                .collect();
            let (svc, sidecar) = self.materialize(def, source, &existing, &new)?;
            for old in old_sidecars {
                if sidecar.as_ref().is_none_or(|s| s.id != old) {
                    txn = txn.delete(self.service_key(&old));
                    existing.remove(&old);
                }
            }
            if let Some(s) = sidecar {
                new.insert(s.id.clone(), s);
            }
            new.insert(svc.id.clone(), svc);
        }
        // The node's services as they will be once the write lands.
        let after: Vec<&Service> = existing
            .values()
            .filter(|s| !new.contains_key(&s.id))
            .chain(new.values())
            .collect();
        check_claims(&after, &new)?;
        if let Some(limit) = self.protected_port_limit {
            check_port_capacity(&existing, &after, &new, limit)?;
        }
        for s in new.values() {
            txn = txn.put(self.service_key(&s.id), encode(s)?);
        }
        let out = self.store.txn(txn).await?;
        self.caught_up(out.index()).await;
        Ok(())
    }

    /// A service's address must be this node's: the catalog maps instance
    /// addresses to services for every node's transparent routing, so a service
    /// registered at another node's address, or at loopback (every node's own),
    /// would capture or relabel other services' traffic. So an IP address must be
    /// the advertise address or one of the node's interface addresses, and not
    /// loopback or unspecified (leave it empty for the advertise address). A host
    /// name is accepted: it is only ever answered in DNS, for this service's own
    /// name, and never routed by.
    fn check_address(&self, address: &str, field: &str) -> Result<(), Error> {
        let refuse = |reason: String| {
            Error::Input(InputError {
                field: field.to_owned(),
                reason,
            })
        };
        let Ok(ip) = address.parse::<IpAddr>() else {
            if definition::is_host_name(address) {
                return Ok(());
            }
            return Err(refuse(format!(
                "{address:?} is neither an IP address of this node nor a host name"
            )));
        };
        if ip == self.advertise {
            return Ok(());
        }
        if ip.is_loopback() || ip.is_unspecified() {
            return Err(refuse(format!(
                "{ip} is a {} address, which every node has; leave the address empty to use this node's ({})",
                if ip.is_loopback() {
                    "loopback"
                } else {
                    "unspecified"
                },
                self.advertise
            )));
        }
        let own = match &self.own_addresses {
            Some(fixed) => fixed.clone(),
            None => interface_addresses(),
        };
        if own.contains(&ip) {
            return Ok(());
        }
        Err(refuse(format!(
            "{ip} is not an address of this node (it has {}); a service is registered on the node it runs on",
            std::iter::once(self.advertise)
                .chain(
                    own.into_iter()
                        .filter(|a| !a.is_loopback() && *a != self.advertise)
                )
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Fills in defaults that depend on the node and the catalog.
    fn materialize(
        &self,
        def: Definition,
        source: Source,
        existing: &BTreeMap<String, Service>,
        new: &BTreeMap<String, Service>,
    ) -> Result<(Service, Option<Service>), Error> {
        if let Some(a) = &def.address {
            self.check_address(a, "Address")?;
        }
        if let Some(a) = def.sidecar.as_ref().and_then(|s| s.address.as_ref()) {
            self.check_address(a, "Connect.SidecarService.Address")?;
        }
        let address = def
            .address
            .clone()
            .unwrap_or_else(|| self.advertise.to_string());
        let svc = Service {
            id: def.id.clone(),
            service: def.name.clone(),
            kind: def.kind,
            address: address.clone(),
            port: def.port,
            tags: def.tags.clone(),
            meta: def.meta.clone(),
            cgroup: def.cgroup.clone(),
            native: def.native,
            proxy: def.proxy.clone(),
            upstreams: def.upstreams.clone(),
            sidecar_of: None,
            source: source.clone(),
        };
        let Some(spec) = def.sidecar else {
            return Ok((svc, None));
        };
        let id = format!("{}-sidecar-proxy", def.id);
        let name_str = format!("{}-sidecar-proxy", def.name);
        let name: ServiceName = name_str.parse().map_err(|e| InputError {
            field: "Connect.SidecarService".into(),
            reason: format!("{e}"),
        })?;
        let port = match spec.port {
            Some(p) => p,
            None => match existing.get(&id) {
                // Re-registration keeps the sidecar's port.
                Some(old) if old.port != 0 => old.port,
                _ => {
                    let used: HashSet<u16> = existing
                        .values()
                        .chain(new.values())
                        .map(|s| s.port)
                        .collect();
                    SIDECAR_PORTS
                        .clone()
                        .find(|p| !used.contains(p))
                        .ok_or(Error::NoSidecarPort { id: id.clone() })?
                }
            },
        };
        let sidecar = Service {
            id: id.clone(),
            service: name,
            kind: ServiceKind::ConnectProxy,
            address: spec.address.unwrap_or(address),
            port,
            tags: spec.tags.unwrap_or_else(|| def.tags.clone()),
            meta: spec.meta.unwrap_or_else(|| def.meta.clone()),
            cgroup: None,
            native: false,
            proxy: Some(ProxyDefinition {
                destination_service_name: def.name.clone(),
                destination_service_id: def.id.clone(),
                local_service_address: "127.0.0.1".into(),
                local_service_port: def.port,
                upstreams: spec.upstreams,
                config: spec.config,
            }),
            upstreams: Vec::new(),
            sidecar_of: Some(def.id),
            source,
        };
        Ok((svc, Some(sidecar)))
    }

    fn service_key(&self, id: &str) -> String {
        format!("{SERVICES}{}/{id}", self.node.node)
    }

    /// This node's services as the store has them now (not the possibly lagging view).
    async fn local_services(&self) -> Result<BTreeMap<String, Service>, Error> {
        let prefix = format!("{SERVICES}{}/", self.node.node);
        let listing = self.store.list(&prefix).await?;
        listing
            .items
            .iter()
            .map(|kv| decode::<Service>(kv).map(|s| (s.id.clone(), s)))
            .collect()
    }

    /// Waits (bounded) until the view includes `index`, so that a client reading right
    /// after a write sees it.
    async fn caught_up(&self, index: Index) {
        let mut rx = self.changes();
        let waited = tokio::time::timeout(CATCH_UP_TIMEOUT, rx.wait_for(|i| *i >= index)).await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(index, "catalog view lags behind a write");
        }
    }
}

/// Reads every `*.json` file of `dir` (sorted, so errors and IDs are deterministic).
fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, serde_json::Value)>, Error> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Read { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file())
        .collect();
    paths.sort();
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let len = std::fs::metadata(&path).map_err(read_err(&path))?.len();
        if len > MAX_FILE_BYTES {
            return Err(Error::FileTooLarge { path });
        }
        let bytes = std::fs::read(&path).map_err(read_err(&path))?;
        let doc = serde_json::from_slice(&bytes).map_err(|source| Error::FileJson {
            path: path.clone(),
            source,
        })?;
        out.push((path, doc));
    }
    Ok(out)
}

/// This node's ID and the file it came from (named in errors, as the fix may be
/// to edit it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub id: uuid::Uuid,
    pub file: PathBuf,
}

impl NodeId {
    /// A fixed ID for in-process tests (also `app::build`'s, which
    /// `acl::testing` serves to other crates' tests).
    pub fn for_tests() -> Self {
        Self {
            id: uuid::Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888),
            file: PathBuf::from("/nonexistent/node-id"),
        }
    }
}

/// Times [`claim`] re-reads a node record that changed under it.
const CLAIM_ATTEMPTS: usize = 5;

/// Writes this node's record, `catalog/nodes/<name>`, unless another node ID holds
/// the name ([`Error::NodeNameTaken`]). Check and write are one transaction
/// (absent, or unchanged since read), so of two agents starting at once on one
/// store with one name, exactly one gets it. A record without an ID (written before
/// node IDs existed) is taken over.
async fn claim(store: &dyn Store, node: &Node, id_file: &Path) -> Result<(), Error> {
    let key = format!("{NODES}{}", node.node);
    let encoded = encode(node)?;
    for _ in 0..CLAIM_ATTEMPTS {
        let txn = match store.get(&key).await? {
            None => Txn::new()
                .when(Compare::Absent(key.clone()))
                .put(key.clone(), encoded.clone()),
            Some(kv) => {
                let held: Node = decode(&kv)?;
                if !held.id.is_empty() && held.id != node.id {
                    return Err(Error::NodeNameTaken {
                        node: node.node.clone(),
                        held_by: held.id,
                        ours: node.id.clone(),
                        id_file: id_file.to_owned(),
                    });
                }
                if kv.value == encoded {
                    return Ok(());
                }
                if held.id.is_empty() {
                    tracing::info!(node = %node.node, node_id = %node.id, "node record without an ID taken over");
                }
                Txn::new()
                    .when(Compare::ModIndex(key.clone(), kv.mod_index))
                    .put(key.clone(), encoded.clone())
            }
        };
        if store.txn(txn).await?.is_committed() {
            return Ok(());
        }
    }
    Err(Error::ClaimContended {
        node: node.node.clone(),
        attempts: CLAIM_ATTEMPTS,
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|source| Error::Corrupt {
        key: "<new record>".into(),
        source,
    })
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Error> {
    serde_json::from_slice(&kv.value).map_err(|source| Error::Corrupt {
        key: kv.key.clone(),
        source,
    })
}

/// Builds a snapshot from the raw records; a corrupt record is logged and skipped
/// so that one bad key cannot hide the rest of the catalog.
fn build(records: &BTreeMap<String, KeyValue>, index: Index, local: &str) -> CatalogSnapshot {
    let mut nodes = BTreeMap::new();
    let mut services = Vec::new();
    for (key, kv) in records {
        if let Some(name) = key.strip_prefix(NODES) {
            match decode::<Node>(kv) {
                Ok(n) => {
                    nodes.insert(
                        name.to_owned(),
                        (Arc::new(n), kv.create_index, kv.mod_index),
                    );
                }
                Err(error) => tracing::error!(%error, "skipping a catalog node record"),
            }
        } else if let Some(rest) = key.strip_prefix(SERVICES) {
            let Some((node, _)) = rest.split_once('/') else {
                continue;
            };
            match decode::<Service>(kv) {
                Ok(s) => {
                    services.push((node.to_owned(), Arc::new(s), kv.create_index, kv.mod_index))
                }
                Err(error) => tracing::error!(%error, "skipping a catalog service record"),
            }
        }
    }
    CatalogSnapshot::new(index, local.to_owned(), nodes, services)
}

/// The Connect endpoint of an instance: its node's inbound proxy.
pub fn connect_endpoint(inst: &Instance) -> SocketAddr {
    inst.node.inbound_addr
}

#[cfg(test)]
mod tests;
