//! Test helpers: an in-process agent with ACLs on, served on a loopback port, and
//! tokens made from rules in one call.

use std::{net::SocketAddr, sync::Arc};

use tokio_util::sync::CancellationToken;

use super::{DefaultPolicy, PolicyRequest, TokenRequest, model::PolicyLink};
use crate::{agent::Agent, app, config::Config, shutdown::Shutdown, store::memory::MemStore};

/// An agent on an in-memory store with ACLs enabled and `default` as policy.
pub async fn agent_with_acls(default: DefaultPolicy) -> Arc<Agent> {
    let mut config = Config::for_tests();
    config.acl_enabled = true;
    config.acl_default_policy = default;
    config.default_allow = default == DefaultPolicy::Allow;
    app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
        .await
        .expect("test agent")
}

/// Bootstraps the agent's ACLs and returns the management secret.
pub async fn bootstrap(agent: &Agent) -> String {
    agent.acl.bootstrap().await.expect("bootstrap").1
}

/// Creates a policy with `rules` and a token linked to it; returns the secret.
pub async fn token_with_rules(agent: &Agent, rules: &str) -> String {
    let name = format!("p-{}", uuid::Uuid::new_v4().simple());
    let policy = PolicyRequest::from_json(&serde_json::json!({"Name": name, "Rules": rules}))
        .expect("policy request");
    agent.acl.create_policy(policy).await.expect("policy");
    let req = TokenRequest {
        policies: vec![PolicyLink::Name(name)],
        ..TokenRequest::default()
    };
    agent.acl.create_token(req).await.expect("token").1
}

/// The plaintext API of an agent on a free loopback port; stops when dropped.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl TestServer {
    pub async fn start(agent: Arc<Agent>) -> Self {
        let listener = crate::api::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(crate::api::serve(listener, agent, async move {
            s.cancelled().await
        }));
        Self { addr, stop }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
