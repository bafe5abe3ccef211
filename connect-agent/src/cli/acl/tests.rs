use std::process::ExitCode;

use clap::Parser;

use super::*;
use crate::{
    acl::{
        DefaultPolicy,
        testing::{TestServer, agent_with_acls},
    },
    cli::{Cli, Command, normalize_args},
};

/// Parses `connect-agent acl ...` as the binary would and runs it.
async fn acl(server: &TestServer, token: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    let mut argv = vec!["connect-agent".to_owned(), "acl".to_owned()];
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    argv.extend(["-http-addr".to_owned(), server.addr.to_string()]);
    if let Some(t) = token {
        argv.extend(["-token".to_owned(), t.to_owned()]);
    }
    let cli = Cli::try_parse_from(normalize_args(argv.into_iter().map(Into::into)))?;
    let Some(Command::Acl(a)) = cli.command else {
        anyhow::bail!("not an acl command");
    };
    let mut out = Vec::new();
    let code = run_to(a, &mut out).await?;
    assert_eq!(code, ExitCode::SUCCESS);
    Ok(String::from_utf8(out)?)
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test]
async fn bootstrap_then_manage_tokens_and_policies() {
    let agent = agent_with_acls(DefaultPolicy::Deny).await;
    let server = TestServer::start(agent.clone()).await;

    let out = acl(&server, None, &["bootstrap"]).await.expect("bootstrap");
    assert!(
        out.contains("Description:      Bootstrap Token (Global Management)"),
        "{out}"
    );
    assert!(
        out.contains("00000000-0000-0000-0000-000000000001 - global-management"),
        "{out}"
    );
    let root = field(&out, "SecretID:").to_owned();
    let again = acl(&server, None, &["bootstrap"]).await.expect_err("once");
    assert!(format!("{again:#}").contains("403"), "{again:#}");

    // Without a token nothing is listed.
    let denied = acl(&server, None, &["token", "list"])
        .await
        .expect_err("anonymous");
    assert!(
        format!("{denied:#}").contains("403 (Permission denied)"),
        "{denied:#}"
    );

    let dir = tempfile::tempdir().expect("tmp");
    let rules = dir.path().join("web.hcl");
    std::fs::write(&rules, "service \"web\" { policy = \"write\" }\n").expect("write");
    let out = acl(
        &server,
        Some(&root),
        &[
            "policy",
            "create",
            "-name",
            "web-write",
            "-rules",
            &format!("@{}", rules.display()),
        ],
    )
    .await
    .expect("policy create");
    assert!(out.contains("Name:         web-write"), "{out}");
    assert!(out.contains("service \"web\""), "{out}");
    let policy_id = field(&out, "ID:").to_owned();

    let out = acl(
        &server,
        Some(&root),
        &[
            "token",
            "create",
            "-description",
            "web",
            "-policy-name",
            "web-write",
            "-service-identity",
            "db:dc1",
        ],
    )
    .await
    .expect("token create");
    let web_secret = field(&out, "SecretID:").to_owned();
    let web_accessor = field(&out, "AccessorID:").to_owned();
    assert!(out.contains(&format!("{policy_id} - web-write")), "{out}");
    assert!(out.contains("db (Datacenters: dc1)"), "{out}");
    assert!(
        agent
            .acl
            .resolve(Some(&web_secret))
            .allows(crate::acl::Right::ServiceWrite("web"))
    );

    // Reads never show a secret again; -self shows the caller's own.
    let out = acl(
        &server,
        Some(&root),
        &["token", "read", "-id", &web_accessor],
    )
    .await
    .expect("read");
    assert_eq!(field(&out, "SecretID:"), "<hidden>");
    let out = acl(&server, Some(&web_secret), &["token", "read", "-self"])
        .await
        .expect("read self");
    assert_eq!(field(&out, "AccessorID:"), web_accessor);
    let out = acl(&server, Some(&root), &["token", "list"])
        .await
        .expect("list");
    assert_eq!(out.matches("AccessorID:").count(), 2, "{out}");
    assert!(!out.contains(&web_secret) && !out.contains(&root), "{out}");
    let json = acl(&server, Some(&root), &["token", "list", "-format", "json"])
        .await
        .expect("json");
    let parsed: Vec<TokenJson> = serde_json::from_str(&json).expect("json list");
    assert_eq!(parsed.len(), 2);

    let out = acl(&server, Some(&root), &["policy", "list"])
        .await
        .expect("policies");
    assert!(
        out.contains("global-management:") && out.contains("web-write:"),
        "{out}"
    );
    let out = acl(
        &server,
        Some(&root),
        &["policy", "read", "-name", "web-write"],
    )
    .await
    .expect("read by name");
    assert_eq!(field(&out, "ID:"), policy_id);

    // The web token may not manage ACLs.
    let e = acl(&server, Some(&web_secret), &["policy", "list"])
        .await
        .expect_err("no acl:read");
    assert!(
        format!("{e:#}").contains("403 (Permission denied)"),
        "{e:#}"
    );

    let out = acl(
        &server,
        Some(&root),
        &["token", "delete", "-id", &web_accessor],
    )
    .await
    .expect("delete");
    assert!(out.contains("deleted successfully"), "{out}");
    let e = acl(&server, Some(&web_secret), &["token", "read", "-self"])
        .await
        .expect_err("deleted token");
    assert!(format!("{e:#}").contains("403 (ACL not found)"), "{e:#}");
    let out = acl(
        &server,
        Some(&root),
        &["policy", "delete", "-name", "web-write"],
    )
    .await
    .expect("delete policy");
    assert!(out.contains(&policy_id), "{out}");
}

#[tokio::test]
async fn acl_commands_against_an_agent_without_acls() {
    let agent = crate::app::build(
        crate::config::Config::for_tests(),
        std::sync::Arc::new(crate::store::memory::MemStore::new()),
        None,
        crate::shutdown::Shutdown::new(),
    )
    .await
    .expect("agent");
    let server = TestServer::start(agent).await;
    let e = acl(&server, None, &["bootstrap"])
        .await
        .expect_err("disabled");
    assert!(
        format!("{e:#}").contains("401 (ACL support disabled)"),
        "{e:#}"
    );
}
