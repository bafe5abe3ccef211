//! An independent TLS client, `openssl s_client`, against the agent's inbound
//! mTLS listener: with the leaf of another service it is allowed or denied per
//! intentions; without a client certificate, or with one from a foreign CA that
//! even claims our trust domain, the handshake fails.
//!
//! Needs the catalog in the agent (service registration and
//! `/v1/health/connect/<service>`, which says where the inbound listener is),
//! `socat` and `openssl`.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use connect_tests::{
    agent::AgentProcess,
    mesh::{
        Spawned, TempDir, cli, connect_address, leaf_files, register, roots, run_bounded,
        socat_echo,
    },
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn s_client(
    inbound: SocketAddr,
    sni: &str,
    cert: Option<(&Path, &Path)>,
    roots: &Path,
) -> Result<Spawned> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-tls1_3", "-verify_return_error"])
        .arg("-connect")
        .arg(inbound.to_string())
        .arg("-servername")
        .arg(sni)
        .arg("-CAfile")
        .arg(roots);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    Spawned::start("openssl s_client", &mut cmd).context("openssl is needed")
}

/// Sends a line and expects the connection to close without an echo; returns
/// s_client's stderr.
fn expect_refused(mut c: Spawned, what: &str) -> Result<String> {
    let _ = c.write_stdin(b"hello s_client\n");
    let exited = c.wait_exit(WAIT)?;
    ensure!(exited.is_some(), "{what}: s_client is still connected");
    c.wait_output(WAIT)?;
    ensure!(
        !c.stdout().contains("hello s_client"),
        "{what}: the service answered"
    );
    Ok(c.stderr())
}

/// A CA of our own and a leaf from it that claims `web` of `trust_domain`.
fn foreign_leaf(
    dir: &Path,
    trust_domain: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| -> Result<()> {
        let out = run_bounded(Command::new("openssl").args(args), None, WAIT)?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let s = |p: &std::path::PathBuf| p.to_string_lossy().into_owned();
    let (ca_key, ca_pem, key, csr, pem, ext) = (
        p("foreign-ca.key"),
        p("foreign-ca.pem"),
        p("foreign.key"),
        p("foreign.csr"),
        p("foreign.pem"),
        p("foreign.ext"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca_pem),
        "-subj",
        "/CN=Foreign CA",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-addext",
        &format!("subjectAltName=URI:spiffe://{trust_domain}"),
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
        "-subj",
        "/CN=web",
    ])?;
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement\n\
             extendedKeyUsage=clientAuth,serverAuth\n\
             subjectAltName=URI:spiffe://{trust_domain}/ns/default/dc/dc1/svc/web\n"
        ),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca_pem),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-out",
        &s(&pem),
        "-days",
        "1",
        "-extfile",
        &s(&ext),
    ])?;
    Ok((pem, key))
}

#[test]
fn s_client_is_allowed_or_denied_by_intentions_and_needs_our_certificate() -> Result<()> {
    let agent = AgentProcess::start_dev("proxy-s-client", &[])?;
    let (_socat, socat_port) = socat_echo()?;
    register(
        &agent,
        &json!({"name": "socat", "port": socat_port, "connect": {"proxy": {}}}),
    )?;
    let dir = TempDir::new("s-client")?;
    let (td, roots) = roots(&agent, &dir.0)?;
    let inbound = connect_address(&agent, "socat")?;
    let sni = format!("socat.svc.{td}");
    let (cert, key) = leaf_files(&agent, "api", &dir.0)?;

    // Allowed (dev mode's default): the line comes back.
    let mut c = s_client(inbound, &sni, Some((&cert, &key)), &roots)?;
    c.write_stdin(b"hello s_client\n")?;
    c.wait_stdout("hello s_client", WAIT)
        .with_context(|| format!("--- agent log ---\n{}", agent.log()))?;
    drop(c);

    // Denied by an intention: closed with no answer.
    let out = cli(&agent, &["intention", "create", "-deny", "api", "socat"])?;
    ensure!(out.status.success(), "intention create failed");
    let c = s_client(inbound, &sni, Some((&cert, &key)), &roots)?;
    expect_refused(c, "denied by intention")?;
    let out = cli(&agent, &["intention", "delete", "api", "socat"])?;
    ensure!(out.status.success(), "intention delete failed");

    // No client certificate.
    let c = s_client(inbound, &sni, None, &roots)?;
    let stderr = expect_refused(c, "without a certificate")?;
    ensure!(
        stderr.contains("alert certificate required"),
        "without a certificate: {stderr}"
    );

    // A certificate from a foreign CA, claiming our trust domain.
    let (fcert, fkey) = foreign_leaf(&dir.0, &td)?;
    let c = s_client(inbound, &sni, Some((&fcert, &fkey)), &roots)?;
    let stderr = expect_refused(c, "with a foreign CA")?;
    ensure!(
        stderr.contains("alert unknown ca"),
        "with a foreign CA: {stderr}"
    );
    Ok(())
}
