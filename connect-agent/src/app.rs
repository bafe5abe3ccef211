//! Builds the running agent from one [`Config`] and runs it until a stop signal.
//!
//! Order matters and is chosen so that failures are loud and early: check eBPF
//! prerequisites, open the store, bind every listener (a port conflict fails here),
//! attach eBPF last, then serve. On stop: stop accepting, drain, detach.

use std::sync::Arc;

use crate::{
    api, ca,
    config::{Config, StoreUrl},
    intentions::{self, Intentions},
    proxy,
    redirect::{self, RedirectConfig, Redirector},
    shutdown::{DRAIN_DEADLINE, Shutdown, Signal, Signals},
    store::{self, Store},
};

/// Everything the API handlers and proxies share.
#[derive(Debug)]
pub struct Agent {
    pub config: Config,
    pub store: Arc<dyn Store>,
    /// The CA: trust bundle, leaves, configuration.
    pub ca: Arc<ca::CaManager>,
    /// Intentions and the authorize decision, served from memory.
    pub intentions: Arc<Intentions>,
    /// Present when the agent runs with `--cgroup`.
    pub redirect: Option<Arc<Redirector>>,
    /// The mTLS proxy's counters (for `/v1/agent/metrics`).
    pub proxy_metrics: Arc<proxy::Metrics>,
    pub shutdown: Shutdown,
}

/// Why the agent could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error("cannot start the CA: {0}")]
    Ca(#[from] ca::Error),
    #[error("cannot load intentions: {0}")]
    Intentions(#[from] intentions::Error),
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
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
    #[error("the etcd store is not available in this build yet")]
    EtcdUnsupported,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), Error> {
    tracing::info!(config = ?config, "starting connect-agent");
    if let Some(cgroup) = &config.cgroup {
        redirect::preflight(cgroup)?;
    }
    let mut signals = Signals::install().map_err(Error::Signals)?;
    let store = open_store(&config).await?;
    let http = api::bind(config.http_addr).await?;
    // Before eBPF attaches: a redirected connection must find its listener.
    let proxy_listeners = proxy::node::Listeners::bind(&config).await?;

    let redirect = match &config.cgroup {
        Some(cgroup) => {
            let r = Redirector::attach(
                cgroup,
                RedirectConfig {
                    proxy: config.outbound_addr,
                    debug: false,
                },
            )?;
            tracing::info!(cgroup = %cgroup.display(), "eBPF programs attached");
            Some(Arc::new(r))
        }
        None => None,
    };

    let shutdown = Shutdown::new();
    let agent = build(config, store, redirect, shutdown.clone()).await?;

    let stop = shutdown.stop.clone();
    let server = tokio::spawn(api::serve(http, agent.clone(), async move {
        stop.cancelled().await
    }));
    tracing::info!(addr = %agent.config.http_addr, "HTTP API listening");
    // The catalog provides the directory once it is wired in; until then the
    // agent knows no services and its proxy routes nothing.
    let directory: Arc<dyn proxy::Directory> = Arc::new(proxy::EmptyDirectory::default());
    let _proxy = proxy::node::start(&agent, directory, proxy_listeners)?;

    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => tracing::info!("reload requested"),
        }
    }
    tracing::info!("stopping");
    shutdown.drain(DRAIN_DEADLINE).await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Serve(e)),
        Err(e) => tracing::error!(error = %e, "HTTP API task failed"),
    }
    drop(agent);
    tracing::info!("stopped");
    Ok(())
}

/// Builds every component on top of an opened store. Tests call this with a
/// [`crate::store::memory::MemStore`] and [`Config::for_tests`].
pub async fn build(
    config: Config,
    store: Arc<dyn Store>,
    redirect: Option<Arc<Redirector>>,
    shutdown: Shutdown,
) -> Result<Arc<Agent>, Error> {
    let ca = ca::CaManager::start(&config, store.clone()).await?;
    let intentions = Intentions::start(store.clone(), config.default_allow).await?;
    Ok(Arc::new(Agent {
        config,
        store,
        ca,
        intentions,
        redirect,
        proxy_metrics: Arc::new(proxy::Metrics::new()),
        shutdown,
    }))
}

async fn open_store(config: &Config) -> Result<Arc<dyn Store>, Error> {
    match &config.store {
        StoreUrl::Embedded => {
            std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
            Ok(Arc::new(store::memory::MemStore::new()))
        }
        StoreUrl::Etcd { .. } => Err(Error::EtcdUnsupported),
    }
}
