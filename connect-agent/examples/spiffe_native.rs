//! A Connect-native client in Rust: its identity from the SPIFFE Workload API
//! (the `spiffe` crate), its own mutual TLS (rustls) straight to a service's node
//! proxy, with no proxy of its own in between.
//!
//! ```sh
//! # In web's cgroup, on a node whose agent runs with --workload-api-socket:
//! SPIFFE_ENDPOINT_SOCKET=unix:///run/connect/workload.sock \
//!     spiffe_native 198.18.0.13:20000 socat.svc.<trust-domain> 'hello'
//! ```
//!
//! It prints its SPIFFE ID (`id=spiffe://…/svc/web`). Given the node proxy's
//! address and the SNI `<service>.svc.<trust-domain>` (the trust domain is
//! `TrustDomain` in `/v1/agent/connect/ca/roots`), it sends one line (the third
//! argument, else a line of stdin) and prints the line that comes back
//! (`answer=…`). Intentions apply as to any other client: a denied connection is
//! reset after the handshake, and this program fails with "Connection reset by
//! peer".

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();

    // The agent knows the caller by its cgroup: no token, no configuration.
    let client = spiffe::WorkloadApiClient::connect_env().await?;
    let x509 = client.fetch_x509_context().await?;
    let svid = x509
        .default_svid()
        .context("the Workload API sent no SVID")?;
    println!("id={}", svid.spiffe_id());
    let [addr, sni, line @ ..] = args.as_slice() else {
        return Ok(());
    };

    // The trust bundle verifies the node proxy; the SVID is our client certificate.
    let bundle = x509
        .bundle_set()
        .get(svid.spiffe_id().trust_domain())
        .context("no bundle for our trust domain")?;
    let mut roots = rustls::RootCertStore::empty();
    for root in bundle.authorities() {
        roots.add(CertificateDer::from(root.as_bytes().to_vec()))?;
    }
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(key))?;

    // The SNI picks the destination service, and its leaf carries that name
    // (a DNS SAN beside the SPIFFE ID), so rustls' usual check pins the peer.
    let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
    let name = ServerName::try_from(sni.clone())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;

    let line = match line.first() {
        Some(l) => l.clone(),
        None => {
            let mut l = String::new();
            std::io::stdin().read_line(&mut l)?;
            l.trim_end().to_owned()
        }
    };
    let mut tls = BufReader::new(tls);
    tls.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    tls.read_line(&mut answer).await?;
    ensure!(
        !answer.is_empty(),
        "the connection closed without an answer"
    );
    println!("answer={}", answer.trim_end());
    Ok(())
}
