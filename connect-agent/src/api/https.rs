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
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::task::AbortOnDropHandle;

use crate::{
    app::Agent,
    ca::{self, api_cert},
    config::{HttpsCert, HttpsConfig},
};

/// Handshakes in flight at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
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
    axum::serve(listener, super::router(agent))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                // EMFILE and friends: wait instead of spinning.
                tracing::warn!(%error, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
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
