//! The HTTPS API (`--https-addr`): the same routes as the plaintext API, over TLS
//! 1.2/1.3 with rustls' default suites (ECDHE with AES-GCM or ChaCha20-Poly1305
//! only: no CBC, no RSA key exchange, no compression, no renegotiation).
//!
//! The certificate comes from `--cert-file`/`--key-file`, or from the built-in CA
//! ([`crate::ca::api_cert`]), in which case a background task re-issues it when the
//! active root changes and at two thirds of its lifetime; new handshakes get the new
//! certificate at once. `--verify-incoming` requires a client certificate chaining
//! to `--ca-file`, or, without it, a service leaf of the built-in CA (checked
//! against the live trust bundle, so a rotation needs no restart).
//!
//! Handshakes run in their own tasks, bounded in number and time, so a slow or
//! silent client cannot hold up others; finished TLS streams go to axum through a
//! bounded channel ([`HttpsListener`]).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    agent::Agent,
    ca::{self, api_cert},
    config::{HttpsCert, HttpsConfig},
};

/// Handshakes in flight at once; more connections are closed at once.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in flight at once from one client IP, so that one silent host
/// cannot hold every handshake slot ([`crate::admission`]).
const MAX_HANDSHAKES_PER_CLIENT: usize = 32;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Established connections waiting for the HTTP server to take them.
const READY_QUEUE: usize = 64;
/// Lifetime of a certificate the built-in CA issues for the API.
const BUILTIN_CERT_TTL: Duration = Duration::from_secs(72 * 3600);
/// Retry delay after a failed re-issue (the current certificate stays in use).
const REISSUE_RETRY: Duration = Duration::from_secs(30);

/// Why the HTTPS API cannot start. The operator's files or flags are at fault,
/// except for `Ca` and `Tls`, which are ours.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what} in PEM form")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{path} is not a usable {what}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot issue the HTTPS API certificate from the built-in CA: {0}")]
    Ca(#[from] ca::Error),
    #[error("cannot configure TLS for the HTTPS API: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS side of the HTTPS API, ready to accept.
#[derive(Debug)]
pub struct HttpsServer {
    config: Arc<ServerConfig>,
    /// Re-issues the built-in certificate; stops with the server.
    _renewal: Option<AbortOnDropHandle<()>>,
}

impl HttpsServer {
    /// Loads or issues the certificate and builds the TLS configuration. Fails
    /// before the agent claims to be up if a file is missing or unusable.
    pub async fn new(https: &HttpsConfig, agent: &Arc<Agent>) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = if !https.verify_incoming {
            builder.with_no_client_auth()
        } else if let Some(ca_file) = &https.client_ca {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca_file, "CA certificate")? {
                roots.add(cert).map_err(|e| Error::Invalid {
                    what: "CA certificate",
                    path: ca_file.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Invalid {
                    what: "CA bundle",
                    path: ca_file.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_client_cert_verifier(ca::tls::SpiffeClientVerifier::new(agent.ca.bundle()))
        };
        let (mut config, renewal) = match &https.cert {
            HttpsCert::Files { cert, key } => {
                let chain = read_certs(cert, "certificate")?;
                let key = read_key(key)?;
                (builder.with_single_cert(chain, key)?, None)
            }
            HttpsCert::BuiltinCa => {
                let ips = api_ips(https.addr, agent.config.advertise_addr);
                let first = issue(agent, &ips).await?;
                let resolver = Arc::new(CaResolver {
                    current: RwLock::new(Arc::new(first.1)),
                });
                let task = tokio::spawn(renew(agent.clone(), resolver.clone(), ips, first.0));
                (
                    builder.with_cert_resolver(resolver),
                    Some(AbortOnDropHandle::new(task)),
                )
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            _renewal: renewal,
        })
    }

    /// Starts accepting on `listener`: handshakes run concurrently, finished ones
    /// come out of the returned [`HttpsListener`].
    pub fn listen(self, listener: TcpListener) -> std::io::Result<HttpsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let acceptor = TlsAcceptor::from(self.config.clone());
        let task = tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(HttpsListener {
            rx,
            local,
            _server: self,
            _accept: AbortOnDropHandle::new(task),
        })
    }
}

/// Connections whose TLS handshake finished, for `axum::serve`.
#[derive(Debug)]
pub struct HttpsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    _server: HttpsServer,
    _accept: AbortOnDropHandle<()>,
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped; never
            // hand out a connection again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves the API over TLS until `shutdown` resolves.
pub async fn serve(
    listener: HttpsListener,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    super::server::serve(listener, super::router(agent), shutdown).await
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let budget = crate::admission::Budget::new(
        "HTTPS handshakes",
        MAX_HANDSHAKES,
        MAX_HANDSHAKES_PER_CLIENT,
    );
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                // EMFILE and friends: wait instead of spinning.
                tracing::warn!(%error, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the budget: closed at once (the budget logs it).
        let Ok(permit) = budget.try_enter(peer.ip()) else {
            continue;
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    if ready.send((tls, peer)).await.is_err() {
                        tracing::debug!(%peer, "HTTPS server gone; dropping a connection");
                    }
                }
                Ok(Err(error)) => tracing::info!(%peer, %error, "HTTPS handshake refused"),
                Err(_) => tracing::info!(%peer, "HTTPS handshake timed out"),
            }
        });
    }
}

/// The IPs the built-in certificate names besides loopback: the HTTPS address,
/// or the advertise address when it listens on all of them.
fn api_ips(addr: SocketAddr, advertise: IpAddr) -> Vec<IpAddr> {
    if addr.ip().is_unspecified() {
        vec![advertise]
    } else {
        vec![addr.ip()]
    }
}

/// Serves the current built-in certificate.
#[derive(Debug)]
struct CaResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CaResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Replacing an Arc cannot panic half-way; a poisoned lock is still sound.
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// When a certificate should be replaced, and by which root it was signed.
#[derive(Debug, Clone)]
struct Issued {
    renew_at: tokio::time::Instant,
    root_id: String,
}

async fn issue(agent: &Agent, ips: &[IpAddr]) -> Result<(Issued, CertifiedKey), Error> {
    let state = agent.ca.state();
    let ttl = BUILTIN_CERT_TTL.min(state.config.leaf_cert_ttl);
    let cert = api_cert::issue_api_cert(agent.store.as_ref(), &state, ips, ttl).await?;
    let lifetime: Duration = (cert.not_after - cert.not_before).try_into().unwrap_or(ttl);
    let key = rustls::crypto::ring::sign::any_supported_type(&cert.key)?;
    tracing::info!(root = %cert.root_id, not_after = %cert.not_after, "HTTPS API certificate issued");
    Ok((
        Issued {
            renew_at: tokio::time::Instant::now() + lifetime * 2 / 3,
            root_id: cert.root_id.clone(),
        },
        CertifiedKey::new(cert.chain, key),
    ))
}

/// Re-issues the built-in certificate on rotation and before expiry.
async fn renew(agent: Arc<Agent>, resolver: Arc<CaResolver>, ips: Vec<IpAddr>, mut issued: Issued) {
    let mut changes = agent.ca.changes();
    loop {
        let rotated = agent.ca.state().active_root().id() != issued.root_id;
        if !rotated {
            tokio::select! {
                _ = tokio::time::sleep_until(issued.renew_at) => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        match issue(&agent, &ips).await {
            Ok((next, key)) => {
                *resolver
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                issued = next;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?REISSUE_RETRY, "cannot re-issue the HTTPS API certificate");
                issued.renew_at = tokio::time::Instant::now() + REISSUE_RETRY;
                tokio::time::sleep(REISSUE_RETRY).await;
            }
        }
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read_file(path, what)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let what = "private key";
    let bytes = read_file(path, what)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| Error::Invalid {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| Error::Empty {
            what,
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use std::process::ExitCode;

    use super::*;
    use crate::{
        app,
        cli::http::{Client, HttpArgs},
        config::Config,
        shutdown::Shutdown,
        store::memory::MemStore,
    };

    struct Running {
        agent: Arc<Agent>,
        addr: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
        dir: tempfile::TempDir,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn start(cert: HttpsCert, verify_incoming: bool, client_ca: Option<PathBuf>) -> Running {
        let mut config = Config::for_tests();
        let listener = crate::api::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let https = HttpsConfig {
            addr,
            cert,
            verify_incoming,
            client_ca,
        };
        config.https = Some(https.clone());
        let agent = app::build(config, Arc::new(MemStore::new()), None, Shutdown::new())
            .await
            .expect("agent");
        let tls = HttpsServer::new(&https, &agent).await.expect("tls config");
        let listener = tls.listen(listener).expect("listen");
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(serve(listener, agent.clone(), async move {
            s.cancelled().await
        }));
        let dir = tempfile::tempdir().expect("tmp");
        Running {
            agent,
            addr,
            stop,
            dir,
        }
    }

    impl Running {
        /// The built-in CA's roots as a PEM file, as `ca roots -pem` prints them.
        fn ca_file(&self) -> PathBuf {
            let path = self.dir.path().join("ca.pem");
            let state = self.agent.ca.state();
            let pem: String = state
                .roots
                .iter()
                .map(|r| r.record.root_cert.clone())
                .collect();
            std::fs::write(&path, pem).expect("write");
            path
        }

        /// A service leaf of the built-in CA as cert and key files.
        fn leaf_files(&self, service: &str) -> (PathBuf, PathBuf) {
            let leaf = self
                .agent
                .ca
                .issue_leaf(&service.parse().expect("name"))
                .expect("leaf");
            let cert = self.dir.path().join(format!("{service}.pem"));
            let key = self.dir.path().join(format!("{service}-key.pem"));
            std::fs::write(&cert, &leaf.cert.cert_pem).expect("write");
            std::fs::write(&key, leaf.private_key_pem()).expect("write");
            (cert, key)
        }

        fn args(&self, host: &str) -> HttpArgs {
            HttpArgs {
                http_addr: format!("https://{host}:{}", self.addr.port()),
                ca_file: Some(self.ca_file()),
                ..HttpArgs::default()
            }
        }
    }

    async fn roots(args: &HttpArgs) -> anyhow::Result<Value> {
        Client::new(args)?.get("/v1/agent/connect/ca/roots").await
    }

    use serde_json::Value;

    #[tokio::test]
    async fn builtin_certificate_verified_by_name_and_ip() {
        let r = start(HttpsCert::BuiltinCa, false, None).await;
        for host in ["localhost", "127.0.0.1"] {
            let v = roots(&r.args(host)).await.expect(host);
            assert!(v["ActiveRootID"].is_string(), "{v}");
        }
        // Without the CA the agent is not trusted; plain HTTP is refused too.
        let no_ca = HttpArgs {
            ca_file: None,
            ..r.args("localhost")
        };
        let e = roots(&no_ca).await.expect_err("untrusted");
        assert!(format!("{e:#}").contains("cannot reach the agent"), "{e:#}");
        let plain = HttpArgs::to(format!("http://127.0.0.1:{}", r.addr.port()));
        assert!(roots(&plain).await.is_err(), "plaintext on the TLS port");
    }

    #[tokio::test]
    async fn verify_incoming_refuses_clients_without_a_certificate() {
        let r = start(HttpsCert::BuiltinCa, true, None).await;
        let e = roots(&r.args("localhost"))
            .await
            .expect_err("no client cert");
        assert!(format!("{e:#}").contains("cannot reach the agent"), "{e:#}");
        let (cert, key) = r.leaf_files("web");
        let with_cert = HttpArgs {
            client_cert: Some(cert),
            client_key: Some(key),
            ..r.args("localhost")
        };
        roots(&with_cert)
            .await
            .expect("client certificate accepted");
        // A CLI command over HTTPS with the client certificate.
        let code = crate::cli::ca::run(crate::cli::ca::CaCommand::GetConfig(with_cert.clone()))
            .await
            .expect("ca get-config over https");
        assert_eq!(code, ExitCode::SUCCESS);

        // A certificate from another CA is refused.
        let other = crate::ca::testing::TestCa::new();
        let foreign = other.sign(&other.leaf_params("web"));
        let fcert = r.dir.path().join("foreign.pem");
        let fkey = r.dir.path().join("foreign-key.pem");
        std::fs::write(
            &fcert,
            crate::ca::pki::pem_encode("CERTIFICATE", &foreign.cert),
        )
        .expect("write");
        std::fs::write(&fkey, foreign.key.serialize_pem()).expect("write");
        let foreign_args = HttpArgs {
            client_cert: Some(fcert),
            client_key: Some(fkey),
            ..r.args("localhost")
        };
        assert!(roots(&foreign_args).await.is_err(), "foreign client cert");
    }

    #[tokio::test]
    async fn certificate_and_client_ca_from_files() {
        // An operator PKI: a CA, a server cert for localhost, a client cert.
        let dir = tempfile::tempdir().expect("tmp");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "operator CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mk = |names: Vec<String>, eku| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut p = rcgen::CertificateParams::new(names).expect("params");
            p.extended_key_usages = vec![eku];
            (p.signed_by(&key, &issuer).expect("sign"), key)
        };
        let (server, server_key) = mk(
            vec!["localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = mk(vec![], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let ca_file = write("ca.pem", ca_cert.pem());
        let cert_file = write("server.pem", server.pem());
        let key_file = write("server-key.pem", server_key.serialize_pem());
        let client_cert = write("client.pem", client.pem());
        let client_key_file = write("client-key.pem", client_key.serialize_pem());

        let r = start(
            HttpsCert::Files {
                cert: cert_file,
                key: key_file,
            },
            true,
            Some(ca_file.clone()),
        )
        .await;
        let base = HttpArgs {
            http_addr: format!("https://localhost:{}", r.addr.port()),
            ca_file: Some(ca_file),
            ..HttpArgs::default()
        };
        assert!(roots(&base).await.is_err(), "no client certificate");
        let with = HttpArgs {
            client_cert: Some(client_cert),
            client_key: Some(client_key_file),
            ..base.clone()
        };
        roots(&with).await.expect("operator client certificate");
        // A built-in service leaf does not chain to the operator CA.
        let (leaf, leaf_key) = r.leaf_files("web");
        let builtin = HttpArgs {
            client_cert: Some(leaf),
            client_key: Some(leaf_key),
            ..base
        };
        assert!(roots(&builtin).await.is_err(), "leaf of another CA");
    }

    #[tokio::test]
    async fn unusable_files_fail_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let agent = app::build(
            Config::for_tests(),
            Arc::new(MemStore::new()),
            None,
            Shutdown::new(),
        )
        .await
        .expect("agent");
        let cases = [
            (
                HttpsCert::Files {
                    cert: dir.path().join("missing.pem"),
                    key: empty.clone(),
                },
                None,
                "cannot read certificate",
            ),
            (
                HttpsCert::Files {
                    cert: empty.clone(),
                    key: empty.clone(),
                },
                None,
                "holds no certificate",
            ),
            (
                HttpsCert::BuiltinCa,
                Some(empty.clone()),
                "holds no CA certificate",
            ),
        ];
        for (cert, client_ca, want) in cases {
            let https = HttpsConfig {
                addr: "127.0.0.1:0".parse().expect("addr"),
                cert,
                verify_incoming: true,
                client_ca,
            };
            let e = HttpsServer::new(&https, &agent).await.expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[tokio::test]
    async fn rotation_reissues_the_certificate() {
        let r = start(HttpsCert::BuiltinCa, false, None).await;
        let old_root = r.agent.ca.state().active_root().id().to_owned();
        let body = serde_json::json!({"Provider": "consul", "Config": {"PrivateKeyBits": 384}});
        r.agent
            .ca
            .set_config(crate::ca::CaConfig::from_request(&body).expect("config"))
            .await
            .expect("rotate");
        assert_ne!(r.agent.ca.state().active_root().id(), old_root);
        // A client that trusts only the new root gets through once re-issued.
        let new_only = r.dir.path().join("new.pem");
        let state = r.agent.ca.state();
        std::fs::write(&new_only, &state.active_root().record.root_cert).expect("write");
        let args = HttpArgs {
            ca_file: Some(new_only),
            ..r.args("localhost")
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if roots(&args).await.is_ok() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never re-issued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
