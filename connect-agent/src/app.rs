//! Builds the running agent from one [`Config`] and runs it until a stop signal.
//!
//! Order matters and is chosen so that failures are loud and early: check eBPF
//! prerequisites, open the store, bind every listener (HTTP, HTTPS, DNS UDP and
//! TCP, proxy: a port conflict fails here), attach eBPF last, then serve and say
//! "agent ready". On stop: stop accepting, drain, detach.
//!
//! The catalog drives everything that routes: the virtual IP allocator gives each
//! mesh service an address, the directory index (catalog + VIPs) feeds the proxy
//! and the eBPF maps, and DNS answers from the catalog and the VIP table.

use std::sync::Arc;

use crate::{
    acl::{self, Acl, AclConfig},
    agent::Agent,
    api, ca, catalog,
    config::{Config, HttpsCert, StoreUrl},
    datadir, dns,
    intentions::{self, Intentions},
    proxy,
    redirect::{self, RedirectConfig, Redirector},
    shutdown::{DRAIN_DEADLINE, Shutdown, Signal, Signals},
    store::{self, Store},
    vip,
};

/// Why the agent could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Api(#[from] api::BindError),
    #[error("cannot start the CA: {0}")]
    Ca(#[from] ca::Error),
    #[error("cannot load intentions: {0}")]
    Intentions(#[from] intentions::Error),
    #[error("cannot load ACLs: {0}")]
    Acl(#[from] acl::Error),
    #[error(transparent)]
    DataDirUnsafe(#[from] datadir::Error),
    #[error("cannot start the HTTPS API: {0}")]
    Https(#[from] api::https::Error),
    #[error("cannot load the catalog: {0}")]
    Catalog(#[from] catalog::Error),
    /// Another agent holds this node name (already a whole sentence with its fix).
    #[error(transparent)]
    NodeName(catalog::Error),
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
    #[error(transparent)]
    Dns(#[from] dns::Error),
    #[error("cannot load virtual IPs: {0}")]
    Vip(#[from] vip::Error),
    #[error(transparent)]
    Workload(#[from] crate::workload::server::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the HTTP API failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Etcd(#[from] store::etcd::Error),
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), Error> {
    // Prerequisites first, so a missing privilege is one line, not a startup log.
    if let Some(cgroup) = &config.cgroup {
        redirect::preflight(cgroup)?;
    }
    if let Some(https) = &config.https
        && let HttpsCert::Files { key, .. } = &https.cert
    {
        datadir::check_key_file(key)?;
    }
    tracing::info!(config = ?config, "starting connect-agent");
    crate::admission::raise_and_log_nofile_limit();
    let mut signals = Signals::install().map_err(Error::Signals)?;
    let opened = open_store(&config).await?;
    let store = opened.store.clone();
    let http = api::bind(config.http_addr).await?;
    let https = match &config.https {
        Some(h) => Some(api::bind(h.addr).await?),
        None => None,
    };
    let dns_listeners = dns::bind(config.dns_addr).await?;
    // Before eBPF attaches: a redirected connection must find its listener.
    let transparent = config.cgroup.as_ref().map(|_| config.outbound_addr);
    let proxy_listeners = proxy::Listeners::bind(config.inbound_addr, transparent).await?;
    let workload_listener = match &config.workload_api_socket {
        Some(socket) => bind_workload_api(socket)?,
        None => None,
    };

    // Loaded now, attached once the maps hold what the store says (below).
    let redirect = match &config.cgroup {
        Some(cgroup) => Some(Arc::new(Redirector::load(
            cgroup,
            RedirectConfig {
                proxy: config.outbound_addr,
                debug: false,
            },
        )?)),
        None => None,
    };

    let shutdown = Shutdown::new();
    let agent = build_node(config, &opened.node_id, store, redirect, shutdown.clone()).await?;

    let stop = shutdown.stop.clone();
    let server = tokio::spawn(api::serve(http, agent.clone(), async move {
        stop.cancelled().await
    }));
    tracing::info!(addr = %agent.config.http_addr, "HTTP API listening");
    let https_server = match (https, &agent.config.https) {
        (Some(listener), Some(cfg)) => {
            let tls = api::https::HttpsServer::new(cfg, &agent).await?;
            let listener = tls.listen(listener).map_err(Error::Serve)?;
            let stop = shutdown.stop.clone();
            tracing::info!(addr = %cfg.addr, verify_incoming = cfg.verify_incoming, "HTTPS API listening");
            Some(tokio::spawn(api::https::serve(
                listener,
                agent.clone(),
                async move { stop.cancelled().await },
            )))
        }
        _ => None,
    };
    let workload_server = workload_listener.map(|(listener, path)| {
        tracing::info!(socket = %path.display(), cgroup = ?agent.config.cgroup, "SPIFFE Workload API listening");
        let api = crate::workload::server::WorkloadApi::new(agent.clone(), shutdown.stop.clone());
        (tokio::spawn(api.serve(listener)), path)
    });
    // The catalog drives the virtual IPs, the proxy's routing, the eBPF maps and DNS.
    let _vip_allocation = catalog::virtual_ips::start(&agent.catalog, agent.vips.clone());
    let directory = catalog::directory::CatalogDirectory::start(
        &agent.catalog,
        agent.config.cgroup.clone(),
        Some(&agent.vips),
    );
    if let Some(r) = &agent.redirect {
        // Programs new to the cgroup (a first start, or another map layout) start
        // with the store's protection in place; adopted maps get the same diff.
        let stats = r.sync(directory.index().desired());
        tracing::info!(
            added = stats.added,
            removed = stats.removed,
            failed = stats.failed,
            adopted = r.adopted(),
            "eBPF maps programmed from the store"
        );
        r.attach_programs()?;
    }
    let _redirect_sync = agent.redirect.clone().map(|r| {
        let dir = directory.clone();
        let changes = proxy::Directory::changes(directory.as_ref());
        redirect::sync_maps(r, changes, move || dir.index().desired().clone())
    });
    let _redirect_sweep = agent.redirect.clone().map(redirect::sweep_records);
    let _proxy = start_proxy(&agent, directory, proxy_listeners)?;
    let dns_addr = dns_listeners.local_addr();
    let stop = shutdown.stop.clone();
    shutdown.tasks.spawn(dns::serve(
        dns_listeners,
        Arc::new(catalog::dns::CatalogDns::new(agent.catalog.clone())),
        agent.vips.clone(),
        agent.config.dns_settings(),
        async move { stop.cancelled().await },
    ));
    tracing::info!(
        http = %agent.config.http_addr,
        dns = %dns_addr,
        inbound = %agent.config.inbound_addr,
        "agent ready"
    );

    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => {
                tracing::info!("reload requested");
                match agent.catalog.reload().await {
                    Ok(s) => tracing::info!(files = s.files, services = s.services, "reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "reload failed; the previous services stay in force")
                    }
                }
            }
        }
    }
    tracing::info!("stopping");
    shutdown.drain(DRAIN_DEADLINE).await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Serve(e)),
        Err(e) => tracing::error!(error = %e, "HTTP API task failed"),
    }
    if let Some((task, path)) = workload_server {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "Workload API server failed"),
            Err(e) => tracing::error!(error = %e, "Workload API task failed"),
        }
        // Only the socket this agent bound: never another agent's.
        let _ = std::fs::remove_file(&path);
    }
    if let Some(task) = https_server {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Serve(e)),
            Err(e) => tracing::error!(error = %e, "HTTPS API task failed"),
        }
    }
    let (detach, kept) = match agent.config.cgroup.clone() {
        Some(c) if agent.config.detach_on_exit => (Some(c), None),
        other => (None, other),
    };
    drop(agent);
    drop(opened);
    if let Some(cgroup) = detach {
        match Redirector::detach(&cgroup) {
            Ok(_) => {
                tracing::info!(cgroup = %cgroup.display(), "eBPF programs detached (--detach-on-exit)")
            }
            Err(error) => tracing::error!(%error, "cannot detach the eBPF programs"),
        }
    } else if let Some(cgroup) = &kept {
        tracing::info!(
            cgroup = %cgroup.display(),
            "eBPF programs stay attached; `connect-agent detach --cgroup` removes them"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// [`build_node`] with a fixed node ID ([`catalog::NodeId::for_tests`]): tests
/// (ours and `acl::testing`'s users) call this with a
/// [`crate::store::memory::MemStore`] and [`Config::for_tests`].
pub async fn build(
    config: Config,
    store: Arc<dyn Store>,
    redirect: Option<Arc<Redirector>>,
    shutdown: Shutdown,
) -> Result<Arc<Agent>, Error> {
    build_node(
        config,
        &catalog::NodeId::for_tests(),
        store,
        redirect,
        shutdown,
    )
    .await
}

/// Builds every component on top of an opened store, as node `node_id`.
pub async fn build_node(
    config: Config,
    node_id: &catalog::NodeId,
    store: Arc<dyn Store>,
    redirect: Option<Arc<Redirector>>,
    shutdown: Shutdown,
) -> Result<Arc<Agent>, Error> {
    let role = config.ca_role();
    let signer = match &role {
        ca::CaRole::Client(s) => Some(s.clone()),
        ca::CaRole::Server => None,
    };
    let ca = ca::CaManager::start(config.datacenter.clone(), role, store.clone()).await?;
    let acl = Acl::start(
        store.clone(),
        AclConfig {
            enabled: config.acl_enabled,
            default_policy: config.acl_default_policy,
            datacenter: config.datacenter.to_string(),
        },
    )
    .await?;
    // The catalog writes (its node record, --config-dir) before intentions start, so
    // those writes cannot race the intentions follower's first watch.
    let catalog = catalog::Catalog::start(&config.catalog(), node_id, store.clone())
        .await
        .map_err(|e| match e {
            e @ catalog::Error::NodeNameTaken { .. } => Error::NodeName(e),
            e => Error::Catalog(e),
        })?;
    if let Some(signer) = signer {
        follow_servers(&catalog, signer, &shutdown);
    }
    // No matching intention: ACLs off or default allow ⇒ allow (reference §3);
    // `Config` derives `default_allow` from the ACL settings.
    let intentions = Intentions::start(store.clone(), config.default_allow).await?;
    let vips = vip::Allocator::start(store.clone()).await?;
    Ok(Arc::new(Agent {
        config,
        store,
        ca,
        intentions,
        acl,
        catalog,
        vips,
        redirect,
        proxy_metrics: Arc::new(proxy::Metrics::new()),
        unauthenticated_watches: Arc::new(tokio::sync::Semaphore::new(
            crate::agent::MAX_UNAUTHENTICATED_WATCHES,
        )),
        workload_counters: Arc::default(),
        shutdown,
    }))
}

/// Binds the Workload API's socket, or says why not.
///
/// A socket the operator named (`--workload-api-socket PATH`) that cannot be
/// bound stops the agent with the flag in the error: workloads that were told to
/// use that path would otherwise fail later, one by one, far from the cause.
///
/// The default socket ([`crate::config::DEFAULT_WORKLOAD_API_SOCKET`]) only warns
/// and the agent runs without the API. Nobody asked for it, and its failures are
/// ones a working deployment has: a second agent on the host (the lab's nodes
/// share one filesystem, their network namespaces apart) finds the path served by
/// the first — `bind` never takes over a live socket — and an agent run without
/// root cannot create `/run/connect`. Failing there would turn an agent that ran
/// yesterday into one that does not start after an upgrade, for an API it does not
/// use. A workload of this agent that dials the default path then reaches the
/// agent that serves it, which attests it against its own services only: no
/// identity this agent would not have given. An operator who relies on the API
/// names the path, and gets the loud failure.
fn bind_workload_api(
    socket: &crate::config::WorkloadApiSocket,
) -> Result<Option<(tokio::net::UnixListener, std::path::PathBuf)>, Error> {
    match crate::workload::server::bind(&socket.path) {
        Ok(listener) => Ok(Some((listener, socket.path.clone()))),
        Err(e) if socket.explicit => Err(e.into()),
        Err(error) => {
            tracing::warn!(
                %error,
                "the SPIFFE Workload API is off: its default socket cannot be served; give this agent its own --workload-api-socket PATH, or --workload-api-socket none"
            );
            Ok(None)
        }
    }
}

/// Keeps a client agent's list of server agents equal to the node records that
/// publish an HTTPS API ([`catalog::Node::server_api`]).
fn follow_servers(
    catalog: &Arc<catalog::Catalog>,
    signer: ca::remote::RemoteSigner,
    shutdown: &Shutdown,
) {
    let mut views = catalog.subscribe();
    let me = catalog.node().node.clone();
    let stop = shutdown.stop.clone();
    shutdown.tasks.spawn(async move {
        loop {
            let servers: Vec<(String, String)> = views
                .borrow_and_update()
                .nodes()
                .filter_map(|(n, _, _)| Some((n.node.clone(), n.server_api.clone()?)))
                .collect();
            signer.set_discovered(ca::remote::order_servers(servers, &me));
            tokio::select! {
                changed = views.changed() => if changed.is_err() { break },
                () = stop.cancelled() => break,
            }
        }
    });
}

/// Starts the agent's proxy on `listeners`: inbound always, the transparent
/// listener when eBPF redirection runs, upstream listeners as `directory` says;
/// intentions decide, the CA gives leaves and the trust bundle.
fn start_proxy(
    agent: &Arc<Agent>,
    directory: Arc<dyn proxy::Directory>,
    listeners: proxy::Listeners,
) -> Result<proxy::Proxy, proxy::Error> {
    let proxy = proxy::Proxy::start(proxy::Parts {
        directory,
        authorizer: Arc::new(IntentionsAuthorizer::new(agent.intentions.clone())),
        leaves: agent.ca.clone(),
        bundle: agent.ca.bundle(),
        metrics: agent.proxy_metrics.clone(),
        limits: proxy::Limits {
            pool: proxy::PoolLimits {
                max_idle_per_endpoint: agent.config.proxy_pool_size,
                ..proxy::PoolLimits::default()
            },
            ..proxy::Limits::default()
        },
        shutdown: agent.shutdown.clone(),
    })?;
    proxy.serve_inbound(listeners.inbound);
    match (listeners.transparent, &agent.redirect) {
        (Some(listener), Some(redirect)) => proxy.serve_transparent(listener, redirect.clone()),
        (Some(listener), None) => {
            // Bound for --cgroup, but redirection is not running: nothing can be
            // redirected here, so do not pretend to serve it.
            tracing::warn!(addr = ?listener.local_addr().ok(), "transparent listener unused: eBPF redirection is not running");
        }
        (None, _) => {}
    }
    Ok(proxy)
}

/// Intentions, in memory, as the proxy's [`proxy::Authorizer`].
#[derive(Debug)]
pub struct IntentionsAuthorizer {
    intentions: Arc<Intentions>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl IntentionsAuthorizer {
    pub fn new(intentions: Arc<Intentions>) -> Self {
        let changes = intentions.subscribe();
        Self {
            intentions,
            changes,
        }
    }
}

#[async_trait::async_trait]
impl proxy::Authorizer for IntentionsAuthorizer {
    async fn authorize(
        &self,
        src: &crate::identity::ServiceName,
        dst: &crate::identity::ServiceName,
    ) -> Result<proxy::Verdict, proxy::AuthorizeError> {
        let decision = self.intentions.authorize(src, dst);
        Ok(proxy::Verdict {
            action: decision.action,
            reason: decision.to_string(),
        })
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// The opened store, this node's ID, and the temporary directory holding both in
/// `--dev` (removed when this value is dropped, so it must live as long as the
/// agent).
#[derive(Debug)]
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub node_id: catalog::NodeId,
    pub dev_dir: Option<tempfile::TempDir>,
}

/// Reads (or on first start creates) the node ID kept in `dir`.
fn node_id_in(dir: &std::path::Path) -> Result<catalog::NodeId, Error> {
    let id = datadir::node_id(dir)?;
    tracing::info!(node_id = %id, "node ID");
    Ok(catalog::NodeId {
        id,
        file: dir.join(datadir::NODE_ID_FILE),
    })
}

/// Opens the configured store: `<data-dir>/connect.redb` (the directory created with
/// mode 0700, as it holds CA keys), or a throw-away directory in `--dev`. The node
/// ID lives beside it; with etcd the data directory holds the node ID only, and is
/// used even in `--dev`: the ID must live as long as the store that records it.
pub async fn open_store(config: &Config) -> Result<OpenedStore, Error> {
    use std::os::unix::fs::PermissionsExt;
    match &config.store {
        StoreUrl::Embedded => {
            let (dir, dev_dir) = if config.dev {
                let tmp = tempfile::Builder::new()
                    .prefix("connect-dev-")
                    .tempdir()
                    .map_err(|source| Error::DataDir {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                // Private like a real data directory (the doctor checks it too).
                std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))
                    .map_err(|source| Error::DataDir {
                        path: tmp.path().to_owned(),
                        source,
                    })?;
                datadir::prepare(tmp.path())?;
                (tmp.path().to_owned(), Some(tmp))
            } else {
                datadir::prepare(&config.data_dir)?;
                (config.data_dir.clone(), None)
            };
            let node_id = node_id_in(&dir)?;
            let store = store::open(&dir).await?;
            Ok(OpenedStore {
                store: Arc::new(store),
                node_id,
                dev_dir,
            })
        }
        StoreUrl::Etcd { endpoints } => {
            let opts = store::etcd::EtcdOptions {
                user: config
                    .etcd_user
                    .as_ref()
                    .map(|u| (u.name.clone(), u.password.0.clone())),
                tls: config.etcd_tls.clone(),
                ..store::etcd::EtcdOptions::default()
            };
            if config.store_transport == crate::config::StoreTransport::PlaintextInsecure {
                tracing::warn!(
                    "etcd is reached without TLS on a non-loopback address (--etcd-insecure-plaintext): its password and the CA's private keys cross the network in the clear"
                );
            }
            datadir::prepare(&config.data_dir)?;
            let node_id = node_id_in(&config.data_dir)?;
            let store = store::etcd::EtcdStore::connect(endpoints, opts).await?;
            Ok(OpenedStore {
                store: Arc::new(store),
                node_id,
                dev_dir: None,
            })
        }
    }
}
