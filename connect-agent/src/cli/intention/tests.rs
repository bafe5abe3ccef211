//! The intention commands against an in-process agent on 127.0.0.1:0.

use std::sync::Arc;

use clap::Parser;

use super::*;
use crate::{
    api, app,
    cli::{Cli, Command, normalize_args},
    config::Config,
    shutdown::Shutdown,
    store::memory::MemStore,
};

/// A running agent's HTTP API; stops when dropped.
struct Agent {
    addr: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn agent(default_allow: bool) -> Agent {
    let mut config = Config::for_tests();
    config.default_allow = default_allow;
    let agent = app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
        .await
        .expect("agent");
    let listener = api::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(listener, agent, async move {
        let _ = stopped.await;
    }));
    Agent { addr, _stop: stop }
}

/// Parses a command line as the binary does and runs it: (exit code, stdout, stderr).
async fn run(agent: &Agent, line: &[&str]) -> (u8, String, String) {
    let mut argv = vec!["connect-agent", "intention"];
    argv.extend_from_slice(line);
    argv.extend_from_slice(&["-http-addr", &agent.addr]);
    let cli = Cli::try_parse_from(normalize_args(argv.iter().map(Into::into)))
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let Some(Command::Intention(args)) = cli.command else {
        panic!("not an intention command");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = match execute(args.command, &mut out, &mut err).await {
        Ok(code) => code,
        Err(e) => {
            err.extend_from_slice(format!("Error: {e:#}\n").as_bytes());
            1
        }
    };
    let s = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
    (code, s(out), s(err))
}

#[tokio::test]
async fn create_check_match_list_get_delete() {
    let a = agent(false).await;
    assert_eq!(
        run(&a, &["create", "-deny", "web", "socat"]).await,
        (0, "Created: web => socat (deny)\n".into(), String::new())
    );
    assert_eq!(
        run(&a, &["create", "api", "socat"]).await.1,
        "Created: api => socat (allow)\n"
    );
    assert_eq!(run(&a, &["create", "-deny", "*", "*"]).await.0, 0);

    // Duplicate without -replace fails with the agent's reason; -replace updates.
    let (code, _, err) = run(&a, &["create", "-allow", "web", "socat"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("duplicate intention found"),
        "{err}"
    );
    assert_eq!(
        run(&a, &["create", "-allow", "-replace", "web", "socat"])
            .await
            .1,
        "Created: web => socat (allow)\n"
    );

    assert_eq!(
        run(&a, &["check", "web", "socat"]).await,
        (0, "Allowed\n".into(), String::new())
    );
    assert_eq!(
        run(&a, &["check", "other", "socat"]).await,
        (1, "Denied\n".into(), String::new())
    );
    assert_eq!(run(&a, &["check", "web"]).await.0, 2, "usage error");

    assert_eq!(
        run(&a, &["match", "socat"]).await.1,
        "api => socat (allow)\nweb => socat (allow)\n* => * (deny)\n"
    );
    assert_eq!(
        run(&a, &["match", "-source", "web"]).await.1,
        "web => socat (allow)\n* => * (deny)\n"
    );

    let (code, out, _) = run(&a, &["list"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines[0].starts_with("ID") && lines[0].ends_with("Source  Action  Destination  Precedence"),
        "{out}"
    );
    assert!(
        lines[1].ends_with("api     allow   socat        9"),
        "{out}"
    );
    assert!(
        lines[3].ends_with("*       deny    *            5"),
        "{out}"
    );

    let (code, out, _) = run(&a, &["get", "web", "socat"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with(
            "Source:       web\nDestination:  socat\nAction:       allow\nID:           "
        ),
        "{out}"
    );
    assert!(out.contains("\nCreated At:   "), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .map(str::trim)
        .expect("ID line")
        .to_owned();
    assert_eq!(run(&a, &["get", &id]).await.1, out, "by ID shows the same");

    assert_eq!(run(&a, &["delete", &id]).await.1, "Intention deleted.\n");
    assert_eq!(
        run(&a, &["delete", "api", "socat"]).await.1,
        "Intention deleted.\n"
    );
    assert_eq!(run(&a, &["delete", "*", "*"]).await.0, 0);
    assert_eq!(run(&a, &["get", &id]).await.0, 1);
    assert_eq!(
        run(&a, &["list"]).await,
        (2, String::new(), "There are no intentions.\n".into())
    );
}

#[tokio::test]
async fn usage_errors() {
    let a = agent(true).await;
    let (code, _, err) = run(&a, &["create", "-allow", "-deny", "a", "b"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("Only one of -allow or -deny may be specified."),
        "{err}"
    );
    let (code, _, err) = run(&a, &["create", "a"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("Must specify two arguments: source and destination"),
        "{err}"
    );
    let (code, _, err) = run(&a, &["create", "web*", "db"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("wildcard character '*' cannot be used with partial values"),
        "{err}"
    );
    // With --dev's default allow, no intention means allowed.
    assert_eq!(run(&a, &["check", "x", "y"]).await.0, 0);
}

#[tokio::test]
async fn create_from_files_with_meta() {
    let a = agent(false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("i.json");
    std::fs::write(
        &path,
        r#"{"SourceName": "web", "DestinationName": "db", "Action": "deny", "Description": "no", "Meta": {"team": "a"}}"#,
    )
    .expect("write");
    let path = path.to_str().expect("utf-8 path");
    assert_eq!(
        run(&a, &["create", "-file", path]).await.1,
        "Created: web => db (deny)\n"
    );
    let out = run(&a, &["get", "web", "db"]).await.1;
    assert!(
        out.contains("\nDescription:  no\nMeta[team]:   a\n"),
        "{out}"
    );
    assert_eq!(run(&a, &["create", "-file", "-deny", path]).await.0, 1);
    std::fs::write(dir.path().join("bad.json"), r#"{"SourceName": "web"}"#).expect("write");
    let (code, _, err) = run(
        &a,
        &[
            "create",
            "-file",
            dir.path().join("bad.json").to_str().expect("path"),
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("is not a valid intention"), "{err}");
}

#[test]
fn output_formats() {
    let i = ApiIntention {
        id: "id-1".into(),
        source_name: "web".into(),
        destination_name: "db".into(),
        action: "allow".into(),
        precedence: 9,
        created_at: "2018-05-21T16:33:28.123456789Z".into(),
        ..ApiIntention::default()
    };
    assert_eq!(
        format_get(&i),
        "Source:       web\nDestination:  db\nAction:       allow\nID:           id-1\nCreated At:   Monday, 21-May-18 16:33:28 UTC\n"
    );
    assert_eq!(
        format_list(&[i]),
        "ID    Source  Action  Destination  Precedence\nid-1  web     allow   db           9\n"
    );
    assert_eq!(rfc850("not a time"), "not a time");
}
