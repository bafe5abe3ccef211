//! The proxy inside the agent: its listeners (bound before eBPF attaches, so a
//! redirected connection always finds the transparent listener), intentions as the
//! [`Authorizer`], the CA as the [`super::LeafSource`] and trust bundle, and eBPF's
//! redirect records as the [`super::OriginLookup`].
//!
//! The catalog provides the [`Directory`]; `app` passes it in.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch};

use super::{
    AuthorizeError, Authorizer, Directory, Error, Limits, Parts, PoolLimits, Proxy, Verdict, bind,
};
use crate::{app::Agent, config::Config, identity::ServiceName, intentions::Intentions};

/// The agent's proxy listeners, bound at startup.
#[derive(Debug)]
pub struct Listeners {
    inbound: TcpListener,
    transparent: Option<TcpListener>,
}

impl Listeners {
    /// Binds the inbound listener on `config.inbound_addr` and, when the agent runs
    /// with `--cgroup`, the transparent listener on `config.outbound_addr`. A port
    /// conflict fails here, before the agent claims to be up.
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        let inbound = bind("inbound", config.inbound_addr).await?;
        let transparent = match config.cgroup {
            Some(_) => Some(bind("transparent", SocketAddr::V4(config.outbound_addr)).await?),
            None => None,
        };
        Ok(Self {
            inbound,
            transparent,
        })
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.local_addr().ok()
    }

    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Starts the agent's proxy on `listeners`: inbound always, the transparent
/// listener when eBPF redirection runs, upstream listeners as `directory` says.
pub fn start(
    agent: &Arc<Agent>,
    directory: Arc<dyn Directory>,
    listeners: Listeners,
) -> Result<Proxy, Error> {
    let proxy = Proxy::start(Parts {
        directory,
        authorizer: Arc::new(IntentionsAuthorizer::new(agent.intentions.clone())),
        leaves: agent.ca.clone(),
        bundle: agent.ca.bundle(),
        metrics: agent.proxy_metrics.clone(),
        limits: Limits {
            pool: PoolLimits {
                max_idle_per_endpoint: agent.config.proxy_pool_size,
                ..PoolLimits::default()
            },
            ..Limits::default()
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

/// Intentions, in memory, as the proxy's authorizer.
#[derive(Debug)]
pub struct IntentionsAuthorizer {
    intentions: Arc<Intentions>,
    changes: watch::Receiver<u64>,
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
impl Authorizer for IntentionsAuthorizer {
    async fn authorize(
        &self,
        src: &ServiceName,
        dst: &ServiceName,
    ) -> Result<Verdict, AuthorizeError> {
        let decision = self.intentions.authorize(src, dst);
        Ok(Verdict {
            action: decision.action,
            reason: decision.to_string(),
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_conflict_fails_at_bind_naming_the_listener() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut config = Config::for_tests();
        config.inbound_addr = taken.local_addr().expect("addr");
        let err = Listeners::bind(&config).await.expect_err("port taken");
        assert!(
            matches!(err, Error::Bind { listener: "inbound", addr, .. } if addr == config.inbound_addr),
            "{err}"
        );
        // Without --cgroup there is no transparent listener.
        config.inbound_addr = "127.0.0.1:0".parse().expect("addr");
        let l = Listeners::bind(&config).await.expect("binds");
        assert!(l.inbound_addr().is_some() && l.transparent_addr().is_none());
        config.cgroup = Some("/unused".into());
        let l = Listeners::bind(&config).await.expect("binds");
        assert!(l.transparent_addr().is_some());
    }
}
