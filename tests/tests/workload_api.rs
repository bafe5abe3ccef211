//! The SPIFFE Workload API with a client we did not write: py-spiffe (PyPI
//! `spiffe`, pinned in the test venv) run inside service cgroups.
//!
//! - From web's cgroup it gets web's X.509-SVID: exactly the leaf the agent's
//!   HTTP API issues for web (one URI SAN, leaf first), its key matches the
//!   certificate, and it chains to the roots `/v1/agent/connect/ca/roots` lists
//!   (checked with openssl); the bundle is exactly those roots.
//! - From socat's cgroup it gets socat's ID.
//! - From a cgroup under `--cgroup` that no service names, and from outside
//!   `--cgroup`, it gets PERMISSION_DENIED and no SVID; from an agent without
//!   `--cgroup` every call is PERMISSION_DENIED.
//! - A raw gRPC call without the `workload.spiffe.io` header gets
//!   INVALID_ARGUMENT.
//! - One process gets at most 16 streams at once (RESOURCE_EXHAUSTED beyond),
//!   and closed streams give their place back.
//! - JWT-SVIDs: fetched for an audience, validated by the agent and by PyJWT
//!   with the published JWKS, rejected for another audience and when a claim or
//!   the signature is changed; denied outside every service's cgroup; the JWKS
//!   stream gets the new root's key at once after a rotation.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::{AgentProcess, free_port},
    lab::{CgroupProc, TestCgroup, require_privileges},
    mesh::{TempDir, get_json, register},
    workload::{agent_with_cgroups, venv_python},
};
use serde_json::json;

/// py-spiffe: fetch the X.509-SVID and the bundles, print what the test checks.
const FETCH: &str = r#"
import sys
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe.errors import PySpiffeError
try:
    with WorkloadApiClient(socket_path="unix://" + sys.argv[1]) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
except PySpiffeError as e:
    print("error=%s" % e)
    sys.exit(0)
pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
print("id=%s" % svid.spiffe_id)
print("key_matches=%s" % (pub(svid.leaf.public_key()) == pub(svid.private_key.public_key())))
print("chain=%d" % len(svid.cert_chain))
for b in (bundles.bundles.values() if isinstance(bundles.bundles, dict) else bundles.bundles):
    for c in b.x509_authorities:
        print("root=%s" % c.public_bytes(serialization.Encoding.DER).hex())
sys.stdout.write(svid.leaf.public_bytes(serialization.Encoding.PEM).decode())
"#;

/// A raw call with grpcio (py-spiffe's transport) and no security header.
const RAW: &str = r#"
import sys, grpc
channel = grpc.insecure_channel("unix://" + sys.argv[1])
call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID",
                            request_serializer=lambda _: b"", response_deserializer=lambda b: b)
try:
    for _ in call(None, timeout=5):
        pass
    print("code=OK")
except grpc.RpcError as e:
    print("code=%s" % e.code().name)
"#;

/// py-spiffe's watch: appends one line per update to argv[3] (time, roots in the
/// bundle, the leaf's serial) until it saw two different leaves or argv[2]
/// seconds passed.
const WATCH: &str = r#"
import sys, time, threading
from spiffe import WorkloadApiClient
done = threading.Event()
serials = set()
out = open(sys.argv[3], "a", buffering=1)
def ok(ctx):
    bundles = ctx.x509_bundle_set.bundles
    bundles = bundles.values() if isinstance(bundles, dict) else bundles
    roots = sum(len(b.x509_authorities) for b in bundles)
    serial = ctx.default_svid.leaf.serial_number
    serials.add(serial)
    out.write("update t=%.3f roots=%d serial=%x\n" % (time.time(), roots, serial))
    if len(serials) >= 2:
        done.set()
def err(e):
    out.write("error=%r\n" % e)
    done.set()
client = WorkloadApiClient(socket_path="unix://" + sys.argv[1])
handle = client.stream_x509_contexts(ok, err, retry_connect=False)
done.wait(float(sys.argv[2]))
handle.cancel()
client.close()
"#;

/// py-spiffe's JWT bundle watch: one line per update (time, keys in the JWKS)
/// to argv[3] until it saw two keys or argv[2] seconds passed.
const JWT_WATCH: &str = r#"
import sys, time, threading
from spiffe import WorkloadApiClient
done = threading.Event()
out = open(sys.argv[3], "a", buffering=1)
def ok(bundle_set):
    keys = sum(len(b.jwt_authorities) for b in bundle_set.bundles)
    out.write("jwks t=%.3f keys=%d\n" % (time.time(), keys))
    if keys >= 2:
        done.set()
def err(e):
    out.write("error=%r\n" % e)
    done.set()
client = WorkloadApiClient(socket_path="unix://" + sys.argv[1])
handle = client.stream_jwt_bundles(ok, err, retry_connect=False)
done.wait(float(sys.argv[2]))
handle.cancel()
client.close()
"#;

/// One process opening 20 bundle streams at once (grpcio, with the header):
/// prints how many got their first message and how many were refused, then,
/// with all closed, whether a new one is served again.
const MANY: &str = r#"
import sys, time, grpc
channel = grpc.insecure_channel("unix://" + sys.argv[1])
call = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509Bundles",
                            request_serializer=lambda _: b"", response_deserializer=lambda b: b)
meta = [("workload.spiffe.io", "true")]
open_, refused, calls = 0, 0, []
for _ in range(20):
    c = call(None, metadata=meta, timeout=30)
    try:
        next(c)
        open_ += 1
        calls.append(c)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            refused += 1
        else:
            raise
print("open=%d refused=%d" % (open_, refused))
for c in calls:
    c.cancel()
time.sleep(1)
c = call(None, metadata=meta, timeout=30)
next(c)
print("again=ok")
"#;

/// An agent with `--cgroup` and the Workload API, `web` registered with its
/// cgroup, and the other cgroups `extra` made (unregistered).
struct Setup {
    cg: TestCgroup,
    dir: TempDir,
    socket: std::path::PathBuf,
    agent: AgentProcess,
}

impl Setup {
    fn start(name: &str, extra: &[&str]) -> Result<Self> {
        let children: Vec<&str> = std::iter::once("web")
            .chain(extra.iter().copied())
            .collect();
        let (cg, agent, socket) = agent_with_cgroups(name, &children)?;
        let dir = TempDir::new(name)?;
        register(&agent, &json!({"Name": "web", "Port": 0, "cgroup": "web"}))?;
        Ok(Self {
            cg,
            dir,
            socket,
            agent,
        })
    }
}

fn run_in(cgroup: Option<&Path>, python: &str, script: &str, socket: &Path) -> Result<String> {
    let socket = socket.to_string_lossy();
    let (code, out, err) = match cgroup {
        Some(cg) => CgroupProc::spawn(cg, python, &["-c", script, &socket])?
            .output(Duration::from_secs(30))?,
        None => {
            let o = Command::new(python)
                .args(["-c", script, &socket])
                .output()
                .context("python")?;
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        }
    };
    ensure!(code == 0, "python failed ({code}): {out}\n{err}");
    Ok(out)
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key))
}

#[test]
fn py_spiffe_gets_each_cgroups_svid_and_nothing_elsewhere() -> Result<()> {
    require_privileges()?;
    let python = venv_python()?;
    let Setup {
        cg,
        dir,
        socket,
        agent,
    } = Setup::start("wlapi", &["socat", "nobody"])?;
    register(
        &agent,
        &json!({"Name": "socat", "Port": free_port()?, "cgroup": "socat"}),
    )?;
    let mode = std::fs::metadata(&socket)?.permissions();
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o666,
        "the socket is mode 0666: {mode:?}"
    );

    // web.
    let out =
        run_in(Some(&cg.path.join("web")), &python, FETCH, &socket).with_context(|| agent.log())?;
    let id =
        field(&out, "id=").with_context(|| format!("no SVID for web: {out}\n{}", agent.log()))?;
    ensure!(id.ends_with("/ns/default/dc/dc1/svc/web"), "web got {id}");
    ensure!(field(&out, "key_matches=") == Some("True"), "{out}");
    ensure!(
        field(&out, "chain=") == Some("1"),
        "leaf only, no intermediates: {out}"
    );
    let leaf_pem = &out[out
        .find("-----BEGIN CERTIFICATE-----")
        .context("no leaf PEM")?..];
    // The same leaf the HTTP API issues for web.
    let http_leaf = get_json(&agent, "/v1/agent/connect/ca/leaf/web")?;
    let strip = |p: &str| p.split_whitespace().collect::<String>();
    let http_pem = http_leaf["CertPEM"].as_str().context("CertPEM")?;
    ensure!(
        strip(http_pem).starts_with(&strip(leaf_pem)),
        "the Workload API's leaf is not the agent's leaf for web"
    );
    let roots = get_json(&agent, "/v1/agent/connect/ca/roots")?;
    let listed: Vec<String> = roots["Roots"]
        .as_array()
        .context("Roots")?
        .iter()
        .filter_map(|r| r["RootCert"].as_str().map(str::to_owned))
        .collect();
    std::fs::write(dir.0.join("roots.pem"), listed.join("\n"))?;
    std::fs::write(dir.0.join("leaf.pem"), leaf_pem)?;
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.0.join("roots.pem"))
        .arg(dir.0.join("leaf.pem"))
        .output()
        .context("openssl")?;
    ensure!(
        verify.status.success(),
        "web's SVID does not chain to the listed roots: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let bundle: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("root="))
        .collect();
    ensure!(
        bundle.len() == listed.len(),
        "the bundle holds exactly the listed roots: {} vs {}",
        bundle.len(),
        listed.len()
    );

    // socat.
    let out = run_in(Some(&cg.path.join("socat")), &python, FETCH, &socket)?;
    ensure!(
        field(&out, "id=").is_some_and(|id| id.ends_with("/svc/socat")),
        "socat's cgroup: {out}"
    );

    // No service's cgroup, and outside --cgroup: an error, no SVID.
    for (where_, cgroup) in [
        ("a cgroup no service names", Some(cg.path.join("nobody"))),
        ("outside --cgroup", None),
    ] {
        let out = run_in(cgroup.as_deref(), &python, FETCH, &socket)?;
        ensure!(field(&out, "id=").is_none(), "{where_} got an SVID: {out}");
        ensure!(
            field(&out, "error=").is_some(),
            "{where_}: no error printed: {out}"
        );
    }
    let log = agent.log();
    ensure!(
        log.contains("Workload API call denied") && log.contains("Workload API caller attested"),
        "decisions are logged:\n{log}"
    );

    // No header: INVALID_ARGUMENT, even from web's own cgroup.
    let out = run_in(Some(&cg.path.join("web")), &python, RAW, &socket)?;
    ensure!(
        field(&out, "code=") == Some("INVALID_ARGUMENT"),
        "without the header: {out}"
    );

    // One process gets at most 16 streams at once; closed ones come back.
    let out = run_in(Some(&cg.path.join("web")), &python, MANY, &socket)?;
    ensure!(
        field(&out, "open=") == Some("16 refused=4") && field(&out, "again=") == Some("ok"),
        "streams of one process: {out}"
    );

    // Each decision is counted.
    let (status, text) = connect_tests::agent::http(
        agent.http_addr,
        "GET",
        "/v1/agent/metrics?format=prometheus",
        None,
    )?;
    ensure!(status == 200, "metrics: {status}");
    let count = |decision: &str| -> u64 {
        let prefix = format!("connect_workload_api_decisions_total{{decision=\"{decision}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    ensure!(
        count("attested") >= 2
            && count("denied") >= 2
            && count("invalid_argument") == 1
            && count("limited") == 4,
        "decisions counted: attested {}, denied {}, invalid {}, limited {}",
        count("attested"),
        count("denied"),
        count("invalid_argument"),
        count("limited")
    );
    Ok(())
}

/// A watch gets the new bundle first after a root rotation, then, within 60 s
/// (the agent re-signs within a random 30 s of the change), web's leaf signed by
/// the new root; every update carries the full state. Driven by the agent's own
/// renewal: the client only listens. A JWT bundle watch gets the new root's
/// JWT key at once.
#[test]
fn a_watch_gets_the_new_bundle_then_a_leaf_of_the_new_root_after_a_rotation() -> Result<()> {
    require_privileges()?;
    let python = venv_python()?;
    let Setup {
        cg,
        dir,
        socket,
        agent,
    } = Setup::start("wlrot", &[])?;
    let log = dir.0.join("watch.log");
    let watcher = CgroupProc::spawn(
        &cg.path.join("web"),
        &python,
        &[
            "-c",
            WATCH,
            &socket.to_string_lossy(),
            "75",
            &log.to_string_lossy(),
        ],
    )?;
    let jwt_log = dir.0.join("jwt-watch.log");
    let jwt_watcher = CgroupProc::spawn(
        &cg.path.join("web"),
        &python,
        &[
            "-c",
            JWT_WATCH,
            &socket.to_string_lossy(),
            "30",
            &jwt_log.to_string_lossy(),
        ],
    )?;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let read_jwt = || std::fs::read_to_string(&jwt_log).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !read().contains("update ") || !read_jwt().contains("jwks ") {
        ensure!(
            std::time::Instant::now() < deadline,
            "no first update: {}\n{}",
            read(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rotated_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let (status, body) = connect_tests::agent::http(
        agent.http_addr,
        "PUT",
        "/v1/connect/ca/configuration",
        Some(r#"{"Provider": "consul", "Config": {"PrivateKeyBits": 384}}"#),
    )?;
    ensure!(status == 200, "rotation: {status} {body}");
    // The JWKS follows the roots: one key before, the new root's key added.
    let (code, out, err) = jwt_watcher.output(Duration::from_secs(40))?;
    ensure!(code == 0, "JWT bundle watcher: {out}\n{err}");
    let jwks: Vec<(f64, usize)> = read_jwt()
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("jwks ")?.split(' ');
            let t = f.next()?.strip_prefix("t=")?.parse().ok()?;
            let keys = f.next()?.strip_prefix("keys=")?.parse().ok()?;
            Some((t, keys))
        })
        .collect();
    ensure!(
        jwks.first().map(|j| j.1) == Some(1),
        "one JWT key before the rotation: {}",
        read_jwt()
    );
    let two = jwks
        .iter()
        .find(|j| j.1 == 2)
        .with_context(|| format!("no JWKS with both keys: {}", read_jwt()))?;
    let jwks_took = two.0 - rotated_at;
    ensure!(jwks_took < 5.0, "the new JWKS came {jwks_took:.1} s after");
    let (code, out, err) = watcher.output(Duration::from_secs(90))?;
    ensure!(code == 0, "watcher: {out}\n{err}");
    let updates: Vec<(f64, usize, String)> = read()
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("update ")?.split(' ');
            let t = f.next()?.strip_prefix("t=")?.parse().ok()?;
            let roots = f.next()?.strip_prefix("roots=")?.parse().ok()?;
            let serial = f.next()?.strip_prefix("serial=")?.to_owned();
            Some((t, roots, serial))
        })
        .collect();
    ensure!(!read().contains("error="), "the watch failed: {}", read());
    let first = updates.first().context("no update")?.clone();
    ensure!(first.1 == 1, "one root before the rotation: {updates:?}");
    let bundle = updates
        .iter()
        .position(|u| u.1 == 2)
        .with_context(|| format!("no update with both roots: {updates:?}"))?;
    let new_leaf = updates
        .iter()
        .position(|u| u.2 != first.2)
        .with_context(|| format!("no new leaf: {updates:?}"))?;
    ensure!(
        bundle <= new_leaf && updates[new_leaf].1 == 2,
        "the bundle comes first, the old root stays listed: {updates:?}"
    );
    let took = updates[new_leaf].0 - rotated_at;
    ensure!(
        took < 60.0,
        "the new leaf came {took:.1} s after the rotation"
    );
    println!(
        "rotation: bundle after {:.2} s, JWKS after {jwks_took:.2} s, leaf of the new root after {took:.2} s ({} updates)",
        updates[bundle].0 - rotated_at,
        updates.len()
    );
    Ok(())
}

/// py-spiffe's JWT calls: fetch a JWT-SVID for `socat`, have the agent validate
/// it, validate it locally against the JWKS the agent publishes (PyJWT checks
/// our signature), and try the rejected cases; prints one line per result.
const JWT: &str = r#"
import sys, time, json, base64
from spiffe import WorkloadApiClient, JwtSvid
from spiffe.errors import PySpiffeError
def b64d(s): return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
def b64e(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
with WorkloadApiClient(socket_path="unix://" + sys.argv[1]) as c:
    try:
        svid = c.fetch_jwt_svid(audience={"socat"})
    except PySpiffeError as e:
        print("fetch_error=%s" % e)
        try:
            c.fetch_jwt_bundles()
            print("bundles=served")
        except PySpiffeError as e:
            print("bundles_error=%s" % e)
        try:
            c.validate_jwt_svid("e30.e30.e30", "socat")
            print("validate=answered")
        except PySpiffeError as e:
            print("validate_error=%s" % e)
        sys.exit(0)
    print("id=%s" % svid.spiffe_id)
    print("aud=%s" % ",".join(sorted(svid.audience)))
    print("ttl=%d" % (svid.expiry - time.time()))
    print("validated=%s" % c.validate_jwt_svid(svid.token, "socat").spiffe_id)
    bundle = c.fetch_jwt_bundles().get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    print("local=%s" % JwtSvid.parse_and_validate(svid.token, bundle, {"socat"}).spiffe_id)
    h, p, s = svid.token.split(".")
    claims = json.loads(b64d(p))
    claims["sub"] = claims["sub"].replace("/svc/web", "/svc/socat")
    sig = bytearray(b64d(s)); sig[5] ^= 1
    for name, aud, tok in [("other", "other", svid.token),
                           ("tampered", "socat", ".".join([h, b64e(json.dumps(claims).encode()), s])),
                           ("flipped", "socat", ".".join([h, p, b64e(bytes(sig))]))]:
        try:
            c.validate_jwt_svid(tok, aud)
            print("%s=accepted" % name)
        except PySpiffeError as e:
            print("%s=rejected" % name)
            print("%s_reason=%s" % (name, e))
"#;

/// JWT-SVIDs through py-spiffe: web gets a token whose `sub` is its SPIFFE ID and
/// `aud` is `socat`, living the default 5 minutes, that the agent validates and
/// that PyJWT validates with the published JWKS; the agent rejects it for
/// audience `other`, with a changed claim and with a changed signature. Outside
/// every service's cgroup every JWT call is PERMISSION_DENIED.
#[test]
fn py_spiffe_fetches_and_validates_jwt_svids_and_forgeries_are_rejected() -> Result<()> {
    require_privileges()?;
    let python = venv_python()?;
    // `dir` holds the socket: bound, not dropped.
    let Setup {
        cg,
        dir: _dir,
        socket,
        agent,
    } = Setup::start("wljwt", &["nobody"])?;
    let out =
        run_in(Some(&cg.path.join("web")), &python, JWT, &socket).with_context(|| agent.log())?;
    let id = field(&out, "id=").with_context(|| format!("no JWT-SVID: {out}\n{}", agent.log()))?;
    ensure!(id.ends_with("/ns/default/dc/dc1/svc/web"), "sub: {out}");
    ensure!(field(&out, "aud=") == Some("socat"), "aud: {out}");
    let ttl: i64 = field(&out, "ttl=").context("ttl")?.parse()?;
    ensure!((280..=300).contains(&ttl), "5 minutes by default: {out}");
    ensure!(
        field(&out, "validated=") == Some(id),
        "agent validation: {out}"
    );
    ensure!(field(&out, "local=") == Some(id), "PyJWT + JWKS: {out}");
    for case in ["other", "tampered", "flipped"] {
        ensure!(
            field(&out, &format!("{case}=")) == Some("rejected"),
            "{case}: {out}"
        );
    }
    ensure!(
        field(&out, "other_reason=").is_some_and(|r| r.contains("audience")),
        "the reason names the audience: {out}"
    );
    for (where_, cgroup) in [
        ("a cgroup no service names", Some(cg.path.join("nobody"))),
        ("outside --cgroup", None),
    ] {
        let out = run_in(cgroup.as_deref(), &python, JWT, &socket)?;
        ensure!(
            field(&out, "id=").is_none(),
            "{where_} got a JWT-SVID: {out}"
        );
        ensure!(
            field(&out, "fetch_error=")
                .is_some_and(|e| e.contains("PERMISSION_DENIED") || e.contains("no identity")),
            "{where_}: {out}"
        );
        ensure!(
            field(&out, "bundles_error=").is_some(),
            "{where_} got the JWT bundles: {out}"
        );
        ensure!(
            field(&out, "validate_error=")
                .is_some_and(|e| e.contains("PERMISSION_DENIED") || e.contains("no identity")),
            "{where_}: ValidateJWTSVID is an attested call too: {out}"
        );
    }
    // The configured lifetime applies to tokens signed next.
    let (status, text) = connect_tests::agent::http(
        agent.http_addr,
        "PUT",
        "/v1/connect/ca/configuration",
        Some(&json!({"Provider": "consul", "Config": {"JWTSVIDTTL": "90s"}}).to_string()),
    )?;
    ensure!(status == 200, "CA configuration: {status} {text}");
    let script = JWT.replace("audience={\"socat\"}", "audience={\"socat\", \"db\"}");
    let out = run_in(Some(&cg.path.join("web")), &python, &script, &socket)?;
    let ttl: i64 = field(&out, "ttl=").context("ttl")?.parse()?;
    ensure!((70..=90).contains(&ttl), "JWTSVIDTTL 90s: {out}");
    ensure!(field(&out, "aud=") == Some("db,socat"), "aud: {out}");
    let (_, metrics) = connect_tests::agent::http(
        agent.http_addr,
        "GET",
        "/v1/agent/metrics?format=prometheus",
        None,
    )?;
    ensure!(
        metrics.contains("connect_workload_api_jwt_validations_total{result=\"valid\"} 2")
            && metrics.contains("connect_workload_api_jwt_validations_total{result=\"invalid\"} 6"),
        "validations counted:\n{metrics}"
    );
    Ok(())
}

/// An agent without `--cgroup` cannot tell workloads apart: every call, X.509
/// and JWT, is PERMISSION_DENIED, saying why.
#[test]
fn without_cgroup_every_call_is_denied() -> Result<()> {
    require_privileges()?;
    let python = venv_python()?;
    let agent = AgentProcess::start_dev("wlnocg", &[])?;
    let socket = agent
        .workload_socket
        .clone()
        .context("the harness gives every agent a Workload API socket")?;
    register(&agent, &json!({"Name": "web", "Port": 0}))?;
    let out = run_in(None, &python, FETCH, &socket)?;
    ensure!(
        field(&out, "id=").is_none(),
        "an SVID without --cgroup: {out}"
    );
    ensure!(
        field(&out, "error=").is_some_and(|e| e.contains("without --cgroup")),
        "X.509: {out}"
    );
    let out = run_in(None, &python, JWT, &socket)?;
    ensure!(
        field(&out, "id=").is_none(),
        "a JWT-SVID without --cgroup: {out}"
    );
    for key in ["fetch_error=", "bundles_error=", "validate_error="] {
        ensure!(
            field(&out, key)
                .is_some_and(|e| e.contains("PERMISSION_DENIED") || e.contains("without --cgroup")),
            "{key} {out}"
        );
    }
    ensure!(
        agent.log().contains("this agent runs without --cgroup"),
        "the denial is logged:\n{}",
        agent.log()
    );
    Ok(())
}
