//! A server agent and a client agent on one etcd cluster with etcd's authentication
//! on (the README's roles, set up with etcdctl): the client's etcd user cannot read
//! the CA's private keys (etcd answers "permission denied") but reads the public CA
//! records; the client serves a leaf for a service registered on its node, signed by
//! the server over a CSR and chaining to the shared root; a leaf for a service not
//! registered on its node is refused with a 403 that says why; the server's signing
//! endpoint refuses a CSR without a token, with a token for another node, and for a
//! service registered on another node. The same holds for JWT-SVIDs: py-spiffe in
//! web's cgroup on the client node gets one through the client's Workload API,
//! signed by the server (`/v1/connect/ca/jwt-sign`, same checks), and the
//! client validates it with the JWKS it reads from the store.
//!
//! Needs Debian's `etcd-server` and `etcd-client` (`etcd`, `etcdctl` on PATH),
//! `openssl`, and the agent binary (`cargo build -p connect-agent --bin
//! connect-agent`); fails saying so otherwise.

use std::{
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use connect_tests::{
    agent::{AgentProcess, http, http_with_token, private_tempdir},
    etcd::EtcdCluster,
    lab::{CgroupProc, TestCgroup, require_privileges},
};
use serde_json::{Value, json};

const ROOT_PASSWORD: &str = "root-secret";
const SERVER_USER: (&str, &str) = ("connect-server-1", "server-secret");
const CLIENT_USER: (&str, &str) = ("connect-client-1", "client-secret");

// ACLs with default policy deny: under `allow`, any token would hold node:write on
// every node (rules only add to the default), and the node check would be void.

/// Writes `text` to `dir/name` with mode 600.
fn secret_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(path)
}

fn json_call(
    agent: &AgentProcess,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Result<(u16, String)> {
    let body = body.map(Value::to_string);
    http_with_token(agent.http_addr, method, path, body.as_deref(), token)
        .with_context(|| format!("{method} {path} on {}", agent.http_addr))
}

fn ok(
    agent: &AgentProcess,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Result<Value> {
    let (status, text) = json_call(agent, method, path, body, token)?;
    ensure!(
        status == 200,
        "{method} {path} answered {status}: {text}\nagent log:\n{}",
        agent.log()
    );
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Bootstraps ACLs on `server` and makes a token with `node:write` on `node`
/// only (a client agent's token): (management secret, node token secret).
fn bootstrap_and_node_token(server: &AgentProcess, node: &str) -> Result<(String, String)> {
    let secret = |v: Value, what: &str| -> Result<String> {
        v["SecretID"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no SecretID for {what}: {v}"))
    };
    let root = secret(
        ok(server, "PUT", "/v1/acl/bootstrap", None, None)?,
        "the bootstrap",
    )?;
    let policy = format!("node-{node}");
    ok(
        server,
        "PUT",
        "/v1/acl/policy",
        Some(
            &json!({"Name": policy, "Rules": format!("node \"{node}\" {{ policy = \"write\" }}")}),
        ),
        Some(&root),
    )?;
    let token = ok(
        server,
        "PUT",
        "/v1/acl/token",
        Some(&json!({"Description": format!("agent {node}"), "Policies": [{"Name": policy}]})),
        Some(&root),
    )?;
    Ok((root, secret(token, "the node token")?))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A PEM CSR for `uri` over a fresh P-256 key, made with openssl.
fn csr(dir: &Path, name: &str, uri: &str) -> Result<String> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    run(Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(&key))?;
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", "/", "-key"])
        .arg(&key)
        .args(["-addext", &format!("subjectAltName=URI:{uri}"), "-out"])
        .arg(&csr))?;
    std::fs::read_to_string(&csr).context("reading the CSR")
}

/// py-spiffe in a cgroup: a JWT-SVID for `socat`, validated by the same agent.
const JWT: &str = r#"
import sys
from spiffe import WorkloadApiClient
with WorkloadApiClient(socket_path="unix://" + sys.argv[1]) as c:
    svid = c.fetch_jwt_svid(audience={"socat"})
    print("id=%s" % svid.spiffe_id)
    print("validated=%s" % c.validate_jwt_svid(svid.token, "socat").spiffe_id)
    print("token=%s" % svid.token)
"#;

#[test]
fn client_agent_gets_leaves_from_the_server_and_never_the_ca_key() -> Result<()> {
    require_privileges()?;
    let mut cg = TestCgroup::create("srvcli")?;
    let web_cgroup = cg.child("web")?.to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cluster = runtime.block_on(EtcdCluster::start(1))?;
    cluster.enable_connect_auth(
        "/connect/",
        ROOT_PASSWORD,
        &[
            (SERVER_USER.0, SERVER_USER.1, "connect-server"),
            (CLIENT_USER.0, CLIENT_USER.1, "connect-client"),
        ],
    )?;
    let store = format!("etcd://{}", cluster.endpoints().join(","));
    let secrets = private_tempdir("connect-secrets-")?;
    let server_user = secret_file(
        secrets.path(),
        "server-etcd",
        &format!("{}:{}", SERVER_USER.0, SERVER_USER.1),
    )?;
    let client_user = secret_file(
        secrets.path(),
        "client-etcd",
        &format!("{}:{}", CLIENT_USER.0, CLIENT_USER.1),
    )?;
    let client_etcd = format!("{}:{}", CLIENT_USER.0, CLIENT_USER.1);
    let server_etcd = format!("{}:{}", SERVER_USER.0, SERVER_USER.1);

    // Without credentials etcd now refuses everything.
    let anon = cluster.etcdctl_output(None, &["get", "--prefix", "/connect/"])?;
    ensure!(!anon.status.success(), "etcd answered without credentials");

    let server_dir = private_tempdir("connect-server-")?;
    let server = AgentProcess::start_in(
        server_dir.path(),
        &["--store", &store, "--server"],
        &[
            "--etcd-user-file",
            &server_user.display().to_string(),
            "--node-name",
            "server",
            "--acl-default-policy",
            "deny",
        ],
    )
    .context("starting the server agent")?;

    // The management token, then a token for the client node: node:write on it.
    let (root_token, client_token) = bootstrap_and_node_token(&server, "client")?;
    let token_file = secret_file(secrets.path(), "client-token", &client_token)?;

    let client_dir = private_tempdir("connect-client-")?;
    let workload_socket = client_dir.path().join("workload.sock");
    let client = AgentProcess::start_in(
        client_dir.path(),
        &["--store", &store],
        &[
            "--cgroup",
            &cg.path.display().to_string(),
            "--workload-api-socket",
            &workload_socket.display().to_string(),
            "--etcd-user-file",
            &client_user.display().to_string(),
            "--server-addr",
            &server.http_addr.to_string(),
            "--agent-token-file",
            &token_file.display().to_string(),
            "--node-name",
            "client",
            "--acl-default-policy",
            "deny",
        ],
    )
    .context("starting the client agent")?;

    // etcd itself guards the key: the client's user gets a permission error, the
    // server's user sees the key, and the client's user reads the public records.
    let denied = cluster.etcdctl_output(
        Some(&client_etcd),
        &["get", "--prefix", "/connect/secrets/"],
    )?;
    let denied_text = format!(
        "{}{}",
        String::from_utf8_lossy(&denied.stdout),
        String::from_utf8_lossy(&denied.stderr)
    );
    ensure!(
        !denied.status.success() && denied_text.contains("permission denied"),
        "the client's etcd user read the CA key prefix: {denied_text}"
    );
    let keys = cluster.etcdctl(
        Some(&server_etcd),
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/connect/secrets/ca/keys/",
        ],
    )?;
    ensure!(
        keys.lines()
            .any(|l| l.starts_with("/connect/secrets/ca/keys/")),
        "no CA key under /connect/secrets/ca/keys/: {keys}"
    );
    let roots_visible = cluster.etcdctl(
        Some(&client_etcd),
        &["get", "--prefix", "--keys-only", "/connect/ca/roots/"],
    )?;
    ensure!(
        roots_visible.contains("/connect/ca/roots/"),
        "the client cannot read the public roots: {roots_visible}"
    );
    // Nor may it write the public CA records (a root of its own would be trusted).
    let forged = cluster.etcdctl_output(
        Some(&client_etcd),
        &["put", "/connect/ca/roots/forged", "{}"],
    )?;
    ensure!(
        !forged.status.success(),
        "the client's etcd user wrote under /connect/ca/"
    );
    // Nor ACL records (it could mint itself a token), while the catalog is its to write.
    let forged = cluster.etcdctl_output(
        Some(&client_etcd),
        &["put", "/connect/acl/token/forged", "{}"],
    )?;
    ensure!(
        !forged.status.success(),
        "the client's etcd user wrote under /connect/acl/"
    );
    cluster.etcdctl(
        Some(&client_etcd),
        &["get", "--prefix", "--keys-only", "/connect/catalog/"],
    )?;

    // One trust domain and root for both agents.
    let server_roots = ok(&server, "GET", "/v1/agent/connect/ca/roots", None, None)?;
    let client_roots = ok(&client, "GET", "/v1/agent/connect/ca/roots", None, None)?;
    ensure!(
        server_roots["ActiveRootID"] == client_roots["ActiveRootID"]
            && server_roots["TrustDomain"] == client_roots["TrustDomain"],
        "the agents disagree on the CA: {server_roots} / {client_roots}"
    );
    let trust_domain = server_roots["TrustDomain"]
        .as_str()
        .context("no TrustDomain")?
        .to_owned();
    let root_pem = server_roots["Roots"][0]["RootCert"]
        .as_str()
        .context("no RootCert")?
        .to_owned();

    // A service on the client node gets its leaf, chaining to the shared root.
    ok(
        &client,
        "PUT",
        "/v1/agent/service/register",
        Some(&json!({"Name": "web", "Port": 8080, "cgroup": "web"})),
        Some(&root_token),
    )?;
    ok(
        &server,
        "PUT",
        "/v1/agent/service/register",
        Some(&json!({"Name": "db", "Port": 5432})),
        Some(&root_token),
    )?;
    let leaf = ok(
        &client,
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        None,
        Some(&root_token),
    )?;
    ensure!(
        leaf["ServiceURI"] == format!("spiffe://{trust_domain}/ns/default/dc/dc1/svc/web"),
        "unexpected leaf: {leaf}"
    );
    let work = private_tempdir("connect-pki-")?;
    let root_file = work.path().join("root.pem");
    let leaf_file = work.path().join("leaf.pem");
    std::fs::write(&root_file, &root_pem)?;
    std::fs::write(&leaf_file, leaf["CertPEM"].as_str().context("no CertPEM")?)?;
    let verified = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root_file)
        .arg(&leaf_file))?;
    ensure!(verified.contains(": OK"), "openssl verify: {verified}");
    ensure!(
        leaf["PrivateKeyPEM"]
            .as_str()
            .is_some_and(|k| k.contains("PRIVATE KEY")),
        "the client holds no key for its leaf"
    );
    ensure!(
        server.log().contains("signed a leaf for a client agent"),
        "the server did not sign the client's leaf:\n{}",
        server.log()
    );
    // Served from the client's cache the second time.
    let again = ok(
        &client,
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        None,
        Some(&root_token),
    )?;
    ensure!(
        again["SerialNumber"] == leaf["SerialNumber"],
        "leaf not cached"
    );

    // A service not registered on the client node: refused, saying why.
    let (status, text) = json_call(
        &client,
        "GET",
        "/v1/agent/connect/ca/leaf/db",
        None,
        Some(&root_token),
    )?;
    ensure!(
        status == 403 && text.contains("not registered on node \"client\""),
        "leaf for db on the client: {status} {text}"
    );
    // The client cannot change the CA either.
    let (status, text) = json_call(
        &client,
        "PUT",
        "/v1/connect/ca/configuration",
        Some(&json!({"Provider": "consul", "Config": {"LeafCertTTL": "48h"}})),
        Some(&root_token),
    )?;
    ensure!(
        status == 400 && text.contains("client agent"),
        "CA configuration through the client: {status} {text}"
    );

    // The signing endpoint itself.
    let web_uri = format!("spiffe://{trust_domain}/ns/default/dc/dc1/svc/web");
    let db_uri = format!("spiffe://{trust_domain}/ns/default/dc/dc1/svc/db");
    let web_csr = csr(work.path(), "web", &web_uri)?;
    let db_csr = csr(work.path(), "db", &db_uri)?;
    let post = |path: &str, body: Value, token: Option<&str>| -> Result<(u16, String)> {
        http_with_token(
            server.http_addr,
            "POST",
            path,
            Some(&body.to_string()),
            token,
        )
    };
    let sign = |body: Value, token: Option<&str>| post("/v1/connect/ca/sign", body, token);
    let (status, text) = sign(
        json!({"Node": "client", "Service": "web", "CSR": web_csr}),
        None,
    )?;
    ensure!(
        status == 403 && text.contains("ACL token"),
        "unauthenticated CSR: {status} {text}"
    );
    let (status, text) = sign(
        json!({"Node": "client", "Service": "web", "CSR": web_csr}),
        Some("00000000-0000-0000-0000-000000000001"),
    )?;
    ensure!(status == 403, "unknown token: {status} {text}");
    let (status, text) = sign(
        json!({"Node": "server", "Service": "db", "CSR": db_csr}),
        Some(&client_token),
    )?;
    ensure!(
        status == 403 && text == "Permission denied",
        "CSR as another node: {status} {text}"
    );
    let (status, text) = sign(
        json!({"Node": "client", "Service": "db", "CSR": db_csr}),
        Some(&client_token),
    )?;
    ensure!(
        status == 403 && text.contains("not registered on node"),
        "CSR for another node's service: {status} {text}"
    );
    // A CSR naming another service than the request: refused.
    let (status, text) = sign(
        json!({"Node": "client", "Service": "web", "CSR": db_csr}),
        Some(&client_token),
    )?;
    ensure!(status == 400, "CSR for db sent as web: {status} {text}");
    // And the legitimate request, directly.
    let (status, text) = sign(
        json!({"Node": "client", "Service": "web", "CSR": web_csr}),
        Some(&client_token),
    )?;
    ensure!(status == 200, "the client's own CSR: {status} {text}");
    let signed: Value = serde_json::from_str(&text)?;
    ensure!(
        signed["ServiceURI"] == web_uri.as_str(),
        "signed for another ID: {signed}"
    );

    // JWT-SVIDs: the endpoint's checks are the CSR's ...
    let jwt_sign = |body: Value, token: Option<&str>| post("/v1/connect/ca/jwt-sign", body, token);
    let (status, text) = jwt_sign(
        json!({"Node": "client", "Service": "web", "Audience": ["socat"]}),
        None,
    )?;
    ensure!(
        status == 403,
        "unauthenticated JWT request: {status} {text}"
    );
    let (status, text) = jwt_sign(
        json!({"Node": "server", "Service": "db", "Audience": ["socat"]}),
        Some(&client_token),
    )?;
    ensure!(status == 403, "JWT as another node: {status} {text}");
    let (status, text) = jwt_sign(
        json!({"Node": "client", "Service": "db", "Audience": ["socat"]}),
        Some(&client_token),
    )?;
    ensure!(
        status == 403 && text.contains("not registered on node"),
        "JWT for another node's service: {status} {text}"
    );
    let (status, text) = jwt_sign(
        json!({"Node": "client", "Service": "web", "Audience": []}),
        Some(&client_token),
    )?;
    ensure!(status == 400, "JWT without audience: {status} {text}");
    // ... and through the client's Workload API, py-spiffe in web's cgroup gets
    // one that the server signed and the client validates.
    let python = connect_tests::workload::venv_python()?;
    let (code, out, err) = CgroupProc::spawn(
        &web_cgroup,
        &python,
        &["-c", JWT, &workload_socket.to_string_lossy()],
    )?
    .output(Duration::from_secs(30))?;
    ensure!(
        code == 0 && out.contains(&format!("id={web_uri}")),
        "JWT-SVID through the client agent ({code}): {out}\n{err}\n{}",
        client.log()
    );
    ensure!(
        out.contains(&format!("validated={web_uri}")),
        "the client validates it: {out}"
    );
    ensure!(
        server
            .log()
            .contains("signed a JWT-SVID for a client agent"),
        "the server did not sign the client's JWT-SVID:\n{}",
        server.log()
    );

    // Neither credential nor token reached a log.
    for (who, log) in [("server", server.log()), ("client", client.log())] {
        let jwt = out
            .lines()
            .find_map(|l| l.strip_prefix("token="))
            .context("no token printed")?;
        for secret in [SERVER_USER.1, CLIENT_USER.1, client_token.as_str(), jwt] {
            if log.contains(secret) {
                bail!("the {who} agent logged a secret");
            }
        }
    }
    let (status, _) = http(client.http_addr, "GET", "/v1/agent/connect/ca/roots", None)?;
    ensure!(status == 200, "client stopped answering");
    drop(client);
    drop(server);
    drop(cluster);
    Ok(())
}

/// A client agent started without `--server-addr` finds the server agents in the
/// catalog (each publishes its HTTPS API in its node record), has its leaves
/// signed by one over HTTPS verified against the CA's roots, and, when the server
/// it tries first is killed, by the other. Before, `--server-addr` was required
/// and a dead server in it was the end of signing.
#[test]
fn a_client_agent_finds_servers_in_the_catalog_and_fails_over() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cluster = runtime.block_on(EtcdCluster::start(1))?;
    let store = format!("etcd://{}", cluster.endpoints().join(","));
    let secrets = private_tempdir("connect-discovery-secrets-")?;
    let start_server = |dir: &tempfile::TempDir, node: &str| -> Result<(AgentProcess, String)> {
        let port = connect_tests::agent::free_port()?;
        let https = format!("127.0.0.1:{port}");
        let agent = AgentProcess::start_in(
            dir.path(),
            &["--store", &store, "--server"],
            &[
                "--https-addr",
                &https,
                "--node-name",
                node,
                "--acl-default-policy",
                "deny",
            ],
        )
        .with_context(|| format!("starting server agent {node}"))?;
        Ok((agent, format!("https://{https}")))
    };
    let (dir1, dir2) = (
        private_tempdir("connect-s1-")?,
        private_tempdir("connect-s2-")?,
    );
    let (s1, api1) = start_server(&dir1, "s1")?;
    let (s2, api2) = start_server(&dir2, "s2")?;
    let (root, token) = bootstrap_and_node_token(&s1, "client")?;
    let token_file = secret_file(secrets.path(), "client-token", &token)?;

    let client_dir = private_tempdir("connect-discovering-client-")?;
    let client = AgentProcess::start_in(
        client_dir.path(),
        &["--store", &store],
        &[
            "--agent-token-file",
            &token_file.display().to_string(),
            "--node-name",
            "client",
            "--acl-default-policy",
            "deny",
        ],
    )
    .context("starting a client agent without --server-addr")?;

    let leaf = |service: &str, port: u16| -> Result<Value> {
        ok(
            &client,
            "PUT",
            "/v1/agent/service/register",
            Some(&json!({"Name": service, "Port": port})),
            Some(&root),
        )?;
        ok(
            &client,
            "GET",
            &format!("/v1/agent/connect/ca/leaf/{service}"),
            None,
            Some(&root),
        )
    };
    let web = leaf("web", 9001)?;
    ensure!(
        web["ServiceURI"]
            .as_str()
            .is_some_and(|u| u.ends_with("/svc/web")),
        "web's leaf: {web}"
    );
    let log = client.log();
    ensure!(
        log.contains("server agents found in the catalog")
            && log.contains(&api1)
            && log.contains(&api2),
        "the client lists both servers:\n{log}"
    );

    // Kill the server this client tries first; the next leaf comes from the other.
    let first = connect_agent::ca::remote::order_servers(
        vec![("s1".into(), api1.clone()), ("s2".into(), api2.clone())],
        "client",
    )
    .first()
    .cloned()
    .context("an order")?;
    let (mut dead, alive) = if first == api1 { (s1, s2) } else { (s2, s1) };
    dead.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10))?;
    let api = leaf("api", 9002).with_context(|| format!("client log:\n{}", client.log()))?;
    ensure!(
        api["ServiceURI"]
            .as_str()
            .is_some_and(|u| u.ends_with("/svc/api")),
        "api's leaf after {first} died: {api}"
    );
    let log = client.log();
    ensure!(
        log.contains("server agent could not sign, trying the next"),
        "the client failed over:\n{log}"
    );
    drop(alive);
    Ok(())
}
