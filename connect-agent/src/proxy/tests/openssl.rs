//! `openssl s_client` — a TLS stack we did not write — against the inbound
//! listener: with another service's leaf it is allowed or denied per intentions;
//! with no client certificate, or one from a foreign CA that even claims our trust
//! domain, the handshake fails with the alert a TLS 1.3 client expects.

use std::path::{Path, PathBuf};

use tokio::process::{Child, Command};

use super::*;

struct Files {
    _dir: tempfile::TempDir,
    roots: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    foreign_cert: PathBuf,
    foreign_key: PathBuf,
}

async fn files(n: &Node, service: &str) -> Files {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = |name: &str| dir.path().join(name);
    let state = n.agent.ca.state();
    let roots: String = state
        .roots
        .iter()
        .map(|r| r.record.root_cert.clone())
        .collect();
    std::fs::write(p("roots.pem"), roots).expect("roots");
    let leaf = n
        .agent
        .ca
        .leaf(&svc(service))
        .await
        .expect("leaf")
        .rx
        .borrow()
        .clone();
    std::fs::write(p("leaf.pem"), &leaf.cert.cert_pem).expect("cert");
    std::fs::write(p("leaf.key"), leaf.private_key_pem()).expect("key");

    // A CA of its own whose leaf claims `web` of our trust domain.
    let td = state.trust_domain.clone();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.subject_alt_names = vec![rcgen::SanType::URI(
        td.spiffe_uri().try_into().expect("URI"),
    )];
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::default();
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let id = SpiffeId::service(td, Datacenter::default(), svc("web"));
    leaf.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().expect("URI"))];
    let cert = leaf.signed_by(&key, &issuer).expect("foreign leaf");
    std::fs::write(p("foreign.pem"), cert.pem()).expect("cert");
    std::fs::write(p("foreign.key"), key.serialize_pem()).expect("key");
    Files {
        roots: p("roots.pem"),
        cert: p("leaf.pem"),
        key: p("leaf.key"),
        foreign_cert: p("foreign.pem"),
        foreign_key: p("foreign.key"),
        _dir: dir,
    }
}

fn s_client(n: &Node, roots: &Path, cert: Option<(&Path, &Path)>) -> Child {
    let sni = server_name_for(&svc("socat"), &n.agent.ca.bundle().borrow()).expect("sni");
    let rustls::pki_types::ServerName::DnsName(sni) = sni else {
        panic!("a DNS name is expected");
    };
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-tls1_3", "-verify_return_error"])
        .arg("-connect")
        .arg(n.inbound.to_string())
        .arg("-servername")
        .arg(sni.as_ref())
        .arg("-CAfile")
        .arg(roots)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    cmd.spawn().expect("openssl runs (Debian package openssl)")
}

/// Writes a line (keeping stdin open, as s_client -quiet ignores EOF) and
/// expects it back.
async fn expect_echo_line(child: &mut Child) {
    let stdin = child.stdin.as_mut().expect("stdin");
    stdin.write_all(b"hello s_client\n").await.expect("write");
    let stdout = child.stdout.as_mut().expect("stdout");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let until = Instant::now() + DEADLINE;
    while !String::from_utf8_lossy(&got).contains("hello s_client") {
        match timeout_at(until, stdout.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("s_client ended without the echo: {got:?}"),
            Ok(Ok(k)) => got.extend_from_slice(&buf[..k]),
            Err(_) => panic!("no echo within {DEADLINE:?}: {got:?}"),
        }
    }
}

/// Writes a line and expects s_client to end with nothing echoed; returns stderr.
async fn expect_refused(mut child: Child, what: &str) -> String {
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = stdin.write_all(b"hello s_client\n").await;
    }
    let out = timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: s_client stayed connected"))
        .expect("s_client output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("hello s_client"),
        "{what}: the service answered"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn s_client_is_allowed_or_denied_and_needs_a_certificate_of_ours() {
    let n = node().await;
    let backend = echo_backend().await;
    n.serve("socat", &backend);
    let f = files(&n, "api").await;

    let mut allowed = s_client(&n, &f.roots, Some((&f.cert, &f.key)));
    expect_echo_line(&mut allowed).await;
    drop(allowed);

    n.intention("api", "socat", Action::Deny).await;
    let denied = s_client(&n, &f.roots, Some((&f.cert, &f.key)));
    expect_refused(denied, "denied by intention").await;
    n.delete_intention("api", "socat").await;

    let none = s_client(&n, &f.roots, None);
    let stderr = expect_refused(none, "without a certificate").await;
    assert!(
        stderr.contains("alert certificate required"),
        "without a certificate: {stderr}"
    );

    let foreign = s_client(&n, &f.roots, Some((&f.foreign_cert, &f.foreign_key)));
    let stderr = expect_refused(foreign, "with a foreign CA").await;
    assert!(
        stderr.contains("alert unknown ca"),
        "with a foreign CA: {stderr}"
    );

    assert_eq!(
        backend.accepted(),
        1,
        "only the allowed client reached socat"
    );
    let m = n.metrics();
    eventually("the refusals to be recorded", || {
        m.denied() == 1 && m.closed(Side::Inbound, Outcome::HandshakeFailed) == 2
    })
    .await;
}
