use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::store::memory::MemStore;

fn config(enabled: bool, default_policy: DefaultPolicy) -> AclConfig {
    AclConfig {
        enabled,
        default_policy,
        datacenter: "dc1".to_owned(),
    }
}

async fn acl(store: Arc<MemStore>) -> Arc<Acl> {
    Acl::start(store, config(true, DefaultPolicy::Deny))
        .await
        .expect("start")
}

fn policy(name: &str, rules: &str) -> PolicyRequest {
    PolicyRequest::from_json(&json!({"Name": name, "Rules": rules})).expect("policy")
}

fn token(policies: &[&str]) -> TokenRequest {
    TokenRequest {
        policies: policies
            .iter()
            .map(|n| PolicyLink::Name((*n).to_owned()))
            .collect(),
        ..TokenRequest::default()
    }
}

#[tokio::test]
async fn bootstrap_happens_once_even_when_raced() {
    let store = Arc::new(MemStore::new());
    let a = acl(store.clone()).await;
    let b = acl(store.clone()).await;
    let (ra, rb) = tokio::join!(a.bootstrap(), b.bootstrap());
    let (won, lost) = match (ra, rb) {
        (Ok(t), Err(e)) | (Err(e), Ok(t)) => (t, e),
        other => panic!("exactly one bootstrap must win: {other:?}"),
    };
    assert!(matches!(lost, Error::BootstrapDone { .. }), "{lost}");
    assert!(lost.to_string().starts_with("Permission denied"));
    let (json, secret) = won;
    assert_eq!(json.secret_id, secret);
    assert_eq!(json.policies[0].name, "global-management");
    // Both agents now resolve the secret to a management token.
    for agent in [&a, &b] {
        crate::test_support::eventually("the token to resolve", || {
            agent.resolve(Some(&secret)).allows(Right::AclWrite)
        })
        .await;
        let id = agent.resolve(Some(&secret));
        assert!(id.allows(Right::OperatorWrite));
        assert!(id.allows(Right::IntentionWrite("*")));
    }
    assert!(matches!(
        a.bootstrap().await,
        Err(Error::BootstrapDone { .. })
    ));
}

#[tokio::test]
async fn secrets_are_stored_hashed_only() {
    let store = Arc::new(MemStore::new());
    let a = acl(store.clone()).await;
    let (_, boot) = a.bootstrap().await.expect("bootstrap");
    a.create_policy(policy("p", r#"service "web" { policy = "write" }"#))
        .await
        .expect("policy");
    let (_, secret) = a.create_token(token(&["p"])).await.expect("token");
    let listing = store.list(PREFIX).await.expect("list");
    for kv in &listing.items {
        let text = String::from_utf8_lossy(&kv.value);
        for s in [&boot, &secret] {
            assert!(
                !text.contains(s.as_str()) && !kv.key.contains(s.as_str()),
                "{} holds a secret in plaintext",
                kv.key
            );
        }
    }
    assert!(
        listing
            .items
            .iter()
            .any(|kv| kv.key == format!("acl/secret/{}", hex::encode(secret_hash(&secret))))
    );
    // Reads never show the secret.
    let snap = a.snapshot();
    for t in snap.tokens.values() {
        assert_eq!(snap.token_json(t, None).secret_id, "<hidden>");
    }
}

#[tokio::test]
async fn tokens_follow_their_policies() {
    let store = Arc::new(MemStore::new());
    let a = acl(store).await;
    a.bootstrap().await.expect("bootstrap");
    let p = a
        .create_policy(policy("web", r#"service "web" { policy = "read" }"#))
        .await
        .expect("policy");
    let (tj, secret) = a.create_token(token(&["web"])).await.expect("token");
    assert_eq!(tj.policies[0].name, "web");
    let id = a.resolve(Some(&secret));
    assert!(id.allows(Right::ServiceRead("web")));
    assert!(!id.allows(Right::ServiceWrite("web")));
    assert!(!id.allows(Right::ServiceRead("db")), "default deny");

    // Widening the policy widens the token at once.
    let pid: Uuid = p.id.parse().expect("uuid");
    a.update_policy(pid, policy("web", r#"service "web" { policy = "write" }"#))
        .await
        .expect("update");
    assert!(a.resolve(Some(&secret)).allows(Right::ServiceWrite("web")));

    // Deleting the policy leaves the token with nothing.
    a.delete_policy(pid).await.expect("delete");
    let id = a.resolve(Some(&secret));
    assert!(matches!(id, Caller::Token(_)));
    assert!(!id.allows(Right::ServiceRead("web")));

    // Deleting the token makes the secret unknown.
    let accessor: Uuid = tj.accessor_id.parse().expect("uuid");
    a.delete_token(accessor).await.expect("delete token");
    assert!(matches!(a.resolve(Some(&secret)), Caller::Unknown));
    a.delete_token(accessor)
        .await
        .expect("deleting twice is fine");
    assert!(matches!(a.resolve(None), Caller::Anonymous(_)));
    assert!(matches!(a.resolve(Some("")), Caller::Anonymous(_)));
}

#[tokio::test]
async fn writes_are_checked() {
    let store = Arc::new(MemStore::new());
    let a = acl(store).await;
    a.bootstrap().await.expect("bootstrap");
    a.create_policy(policy("p", "")).await.expect("policy");
    let dup = a.create_policy(policy("p", "")).await.expect_err("dup");
    assert!(dup.to_string().contains("already exists"), "{dup}");
    let err = a.create_token(token(&["nope"])).await.expect_err("unknown");
    assert!(matches!(err, Error::UnknownPolicy { .. }), "{err}");
    assert!(matches!(
        a.delete_policy(MANAGEMENT_POLICY_ID).await,
        Err(Error::Builtin { .. })
    ));
    assert!(matches!(
        a.update_policy(
            MANAGEMENT_POLICY_ID,
            policy("global-management", "acl = \"read\"")
        )
        .await,
        Err(Error::Builtin { .. })
    ));
    // A chosen secret must be unique.
    let secret = Uuid::new_v4();
    let req = TokenRequest {
        secret_id: Some(secret),
        ..TokenRequest::default()
    };
    let (t, s) = a.create_token(req.clone()).await.expect("first");
    assert_eq!(s, secret.to_string());
    assert!(matches!(
        a.create_token(req).await,
        Err(Error::Duplicate { .. })
    ));
    // The secret cannot change on update.
    let accessor: Uuid = t.accessor_id.parse().expect("uuid");
    let change = TokenRequest {
        secret_id: Some(Uuid::new_v4()),
        ..TokenRequest::default()
    };
    assert!(matches!(
        a.update_token(accessor, change).await,
        Err(Error::SecretChange)
    ));
    let same = TokenRequest {
        secret_id: Some(secret),
        description: "renamed".into(),
        policies: vec![PolicyLink::Name("p".into())],
        ..TokenRequest::default()
    };
    let updated = a.update_token(accessor, same).await.expect("update");
    assert_eq!(updated.description, "renamed");
    assert_eq!(updated.secret_id, "<hidden>");
    assert!(matches!(
        a.update_token(Uuid::new_v4(), TokenRequest::default())
            .await,
        Err(Error::NotFound)
    ));
}

#[tokio::test]
async fn identities_and_datacenters() {
    let store = Arc::new(MemStore::new());
    let a = acl(store).await;
    a.bootstrap().await.expect("bootstrap");
    a.create_policy(
        PolicyRequest::from_json(&json!({
            "Name": "elsewhere", "Rules": "operator = \"write\"", "Datacenters": ["dc2"]
        }))
        .expect("policy"),
    )
    .await
    .expect("create");
    let req = TokenRequest::from_json(&json!({
        "Policies": [{"Name": "elsewhere"}],
        "ServiceIdentities": [{"ServiceName": "web"}, {"ServiceName": "db", "Datacenters": ["dc2"]}]
    }))
    .expect("req");
    let (_, secret) = a.create_token(req).await.expect("token");
    let id = a.resolve(Some(&secret));
    assert!(id.allows(Right::ServiceWrite("web")));
    assert!(id.allows(Right::ServiceWrite("web-sidecar-proxy")));
    assert!(id.allows(Right::ServiceRead("anything")));
    assert!(id.allows(Right::NodeRead("n1")));
    assert!(
        !id.allows(Right::ServiceWrite("db")),
        "db's identity is for dc2"
    );
    assert!(!id.allows(Right::OperatorRead), "the policy is for dc2");
}

#[tokio::test]
async fn disabled_acls_allow_everything_and_refuse_management() {
    let store = Arc::new(MemStore::new());
    let a = Acl::start(store, config(false, DefaultPolicy::Deny))
        .await
        .expect("start");
    assert!(a.resolve(Some("whatever")).allows(Right::AclWrite));
    assert!(a.default_intention_allow());
    assert!(matches!(a.bootstrap().await, Err(Error::Disabled)));
    assert!(matches!(
        a.create_token(TokenRequest::default()).await,
        Err(Error::Disabled)
    ));
}

#[tokio::test]
async fn unreadable_records_are_skipped() {
    let store = Arc::new(MemStore::new());
    store
        .put(
            "acl/policy/00000000-0000-0000-0000-0000000000ff",
            b"{not json".to_vec(),
        )
        .await
        .expect("put");
    store
        .put(
            "acl/token/00000000-0000-0000-0000-0000000000ee",
            b"[]".to_vec(),
        )
        .await
        .expect("put");
    let a = acl(store).await;
    let s = a.snapshot();
    assert!(s.policies.is_empty() && s.tokens.is_empty());
}
