//! The running agent's components, as the API handlers and the proxy share them.
//! `app` builds it; everything that serves requests reads it.

use std::sync::Arc;

use crate::{
    acl::Acl, ca, catalog, config::Config, intentions::Intentions, proxy, redirect::Redirector,
    shutdown::Shutdown, store::Store, vip,
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
    /// ACL tokens and policies; every API request is checked against them.
    pub acl: Arc<Acl>,
    /// Services and nodes, served from memory.
    pub catalog: Arc<catalog::Catalog>,
    /// Virtual IPs of services (allocated through the store, read from memory).
    pub vips: Arc<vip::Allocator>,
    /// Present when the agent runs with `--cgroup`.
    pub redirect: Option<Arc<Redirector>>,
    /// The mTLS proxy's counters (for `/v1/agent/metrics`).
    pub proxy_metrics: Arc<proxy::Metrics>,
    /// Blocking roots queries in progress without a valid token (the roots are
    /// public, so anyone can open them; this bounds how many at once).
    pub unauthenticated_watches: Arc<tokio::sync::Semaphore>,
    /// The Workload API's decisions (attested, denied, …), for metrics.
    pub workload_counters: Arc<crate::workload::server::Counters>,
    pub shutdown: Shutdown,
}

/// Blocking roots queries without a valid token at once; more get 429.
pub const MAX_UNAUTHENTICATED_WATCHES: usize = 512;
