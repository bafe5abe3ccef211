//! The `SpiffeWorkloadAPI` gRPC service on a Unix socket.
//!
//! Every call is attested first, from the socket's peer ([`super::attest`]): a
//! request without the `workload.spiffe.io: true` header is `InvalidArgument`
//! (the specification's rule), a caller the kernel does not place in a
//! registered service's cgroup is `PermissionDenied`, and so is every caller of
//! an agent without `--cgroup`. The X.509 calls stream: the full state is sent at
//! once and again whenever the caller's leaf is renewed or the trust bundle
//! changes, driven by the agent's own renewal (no polling per client). Streams
//! are bounded per calling process, per service and in all, and end when the
//! agent stops.
//!
//! JWT-SVIDs: `FetchJWTSVID` signs (or reuses, see [`crate::ca::jwt`]) a token
//! whose `sub` is the caller's SPIFFE ID for the audiences it asks;
//! `FetchJWTBundles` streams the JWKS of the trust domain; `ValidateJWTSVID`
//! checks a token's signature, expiry and audience for an attested caller.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::server::Connected};

use super::{
    attest::{self, Attested, Peer},
    proto::{
        self, JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse,
        ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
        X509svidRequest, X509svidResponse,
        spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
    },
};
use crate::{
    agent::Agent,
    ca::{Leaf, TrustBundle, jwt},
    identity::ServiceName,
};

/// The header every Workload API request carries (the specification's guard
/// against requests forwarded from elsewhere, e.g. by an SSRF).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// Streams open at once, in all.
pub const MAX_STREAMS: usize = 1024;
/// Streams open at once for one service's callers.
pub const MAX_STREAMS_PER_SERVICE: usize = 64;
/// Streams open at once for one calling process, so that one process cannot
/// take its whole service's share.
pub const MAX_STREAMS_PER_PROCESS: usize = 16;

/// Why the Workload API cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve the Workload API on {path} (--workload-api-socket): {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Counts of the service's decisions, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub attested: AtomicU64,
    pub denied: AtomicU64,
    pub invalid: AtomicU64,
    pub limited: AtomicU64,
    /// `ValidateJWTSVID` answers.
    pub jwt_valid: AtomicU64,
    pub jwt_invalid: AtomicU64,
}

/// The service (see the module doc).
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    agent: Arc<Agent>,
    /// `--cgroup`; `None`: every caller is denied.
    root: Option<PathBuf>,
    streams: Arc<Mutex<Streams>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
}

#[derive(Debug, Default)]
struct Streams {
    total: usize,
    by_service: HashMap<ServiceName, usize>,
    by_pid: HashMap<i32, usize>,
}

/// A stream's place in the bounds, given back when the stream ends.
struct StreamSlot {
    streams: Arc<Mutex<Streams>>,
    service: ServiceName,
    pid: i32,
}

/// Takes one from a count, forgetting keys that reach zero.
fn release<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut s = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        s.total = s.total.saturating_sub(1);
        release(&mut s.by_service, &self.service);
        release(&mut s.by_pid, &self.pid);
    }
}

/// The accepted socket, with its peer pinned at accept ([`Peer::of`]).
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    peer: PeerSocket,
}

/// What a request knows of its connection: the peer that made it, as pinned at
/// accept, or why it could not be.
#[derive(Debug, Clone)]
pub struct PeerSocket(Arc<Result<Peer, attest::Error>>);

impl Connected for PeerStream {
    type ConnectInfo = PeerSocket;
    fn connect_info(&self) -> PeerSocket {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Binds `path` (replacing a stale socket, refusing a live one), mode 0666:
/// attestation decides who gets what, not file permissions. A directory it has to
/// create (`/run/connect`) is made 0755, whatever the agent's umask (077, see
/// [`crate::datadir`]), so that every workload can reach the socket.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |source| Error::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(fail)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    }
    // A socket someone answers on belongs to a running agent: never take it over.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process serves it (is another agent running?)",
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(fail)?;
    Ok(listener)
}

impl WorkloadApi {
    pub fn new(agent: Arc<Agent>, stop: CancellationToken) -> Self {
        let root = agent.config.cgroup.clone();
        let counters = agent.workload_counters.clone();
        Self {
            agent,
            root,
            streams: Arc::new(Mutex::new(Streams::default())),
            counters,
            stop,
        }
    }

    /// Serves on `listener` until the agent's stop.
    pub async fn serve(self, listener: UnixListener) -> Result<(), tonic::transport::Error> {
        let stop = self.stop.clone();
        let incoming = async_stream_of(listener, stop.clone());
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                SpiffeWorkloadApiServer::new(self),
                incoming,
                stop.cancelled_owned(),
            )
            .await
    }

    /// The header check and attestation every call starts with.
    fn admit<T>(&self, req: &Request<T>, call: &'static str) -> Result<Attested, Status> {
        let header_ok = req
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true");
        if !header_ok {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            tracing::info!(call, "Workload API request without the security header");
            return Err(Status::invalid_argument(format!(
                "security header missing from request (\"{SECURITY_HEADER}: true\")"
            )));
        }
        let Some(root) = &self.root else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                call,
                "Workload API call denied: this agent runs without --cgroup"
            );
            return Err(Status::permission_denied(
                "no identity: this agent runs without --cgroup, so it cannot tell workloads apart",
            ));
        };
        let Some(PeerSocket(peer)) = req.extensions().get::<PeerSocket>() else {
            return Err(Status::internal("no peer socket on the request"));
        };
        let peer = match peer.as_ref() {
            Ok(peer) => peer,
            Err(e) => return Err(self.deny(call, e)),
        };
        let snapshot = self.agent.catalog.snapshot();
        let services: Vec<(PathBuf, ServiceName)> = snapshot
            .local()
            .filter(|i| i.service.kind.is_typical())
            .filter_map(|i| {
                let cg = i.service.cgroup.as_ref()?;
                Some((
                    cg.strip_prefix("/").unwrap_or(cg).to_owned(),
                    i.service.service.clone(),
                ))
            })
            .collect();
        let lookup = |p: &Path| {
            services
                .iter()
                .find(|(cg, _)| cg.as_path() == p)
                .map(|(_, s)| s.clone())
        };
        match attest::attest_peer(peer, root, lookup) {
            Ok(a) => {
                self.counters.attested.fetch_add(1, Ordering::Relaxed);
                tracing::info!(call, pid = a.pid, uid = a.uid, service = %a.service, cgroup = %a.cgroup.display(), "Workload API caller attested");
                Ok(a)
            }
            Err(e) => Err(self.deny(call, &e)),
        }
    }

    /// Counts and logs a caller without an identity, and says why.
    fn deny(&self, call: &'static str, e: &attest::Error) -> Status {
        self.counters.denied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(call, error = %e, "Workload API call denied");
        Status::permission_denied(format!("no identity: {e}"))
    }

    fn open_stream(&self, caller: &Attested) -> Result<StreamSlot, Status> {
        let mut s = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let service = s.by_service.get(&caller.service).copied().unwrap_or(0);
        let process = s.by_pid.get(&caller.pid).copied().unwrap_or(0);
        if s.total >= MAX_STREAMS
            || service >= MAX_STREAMS_PER_SERVICE
            || process >= MAX_STREAMS_PER_PROCESS
        {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            tracing::info!(pid = caller.pid, service = %caller.service, "Workload API stream refused: limit reached");
            return Err(Status::resource_exhausted(format!(
                "too many Workload API streams (at most {MAX_STREAMS}, {MAX_STREAMS_PER_SERVICE} per service, {MAX_STREAMS_PER_PROCESS} per process)"
            )));
        }
        s.total += 1;
        *s.by_service.entry(caller.service.clone()).or_insert(0) += 1;
        *s.by_pid.entry(caller.pid).or_insert(0) += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            service: caller.service.clone(),
            pid: caller.pid,
        })
    }
}

/// The accepted connections of `listener`, as tonic takes them, until `stop`.
fn async_stream_of(
    listener: UnixListener,
    stop: CancellationToken,
) -> ReceiverStream<std::io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            // Pinned now, once: a call much later on this connection must name
            // the process that connected, not whoever holds its PID by then.
            let item = accepted.map(|(inner, _)| {
                let peer = PeerSocket(Arc::new(Peer::of(&inner)));
                PeerStream { inner, peer }
            });
            if let Err(e) = &item {
                tracing::warn!(error = %e, "Workload API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The trust bundle as the Workload API carries it: every listed root's DER,
/// concatenated.
fn bundle_der(bundle: &TrustBundle) -> Vec<u8> {
    bundle
        .roots()
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// A trust domain's SPIFFE ID, the key of the bundle maps.
fn trust_domain_id(td: &crate::identity::TrustDomain) -> String {
    format!("spiffe://{td}")
}

type StreamOf<T> = ReceiverStream<Result<T, Status>>;

/// A stream of the full state: `build` of the leaf (when given) and `source`
/// at once, and again whenever either changes into something new, until the
/// client goes, the agent stops or a source ends. Holds `slot` while it lives.
fn follow<S, T>(
    slot: StreamSlot,
    stop: CancellationToken,
    mut leaf: Option<watch::Receiver<Arc<Leaf>>>,
    mut source: watch::Receiver<S>,
    build: impl Fn(Option<&Leaf>, &S) -> T + Send + 'static,
) -> StreamOf<T>
where
    S: Clone + Send + Sync + 'static,
    T: Clone + PartialEq + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let _slot = slot;
        let mut last: Option<T> = None;
        loop {
            let msg = {
                let l = leaf.as_mut().map(|l| l.borrow_and_update().clone());
                let b = source.borrow_and_update().clone();
                build(l.as_deref(), &b)
            };
            // The source may move for what this stream does not carry (e.g. the
            // CA's configuration): send only what is new.
            if last.as_ref() != Some(&msg) {
                if tx.send(Ok(msg.clone())).await.is_err() {
                    return;
                }
                last = Some(msg);
            }
            let leaf_changed = async {
                match leaf.as_mut() {
                    Some(l) => l.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = leaf_changed => if r.is_err() { return },
                r = source.changed() => if r.is_err() { return },
                () = stop.cancelled() => return,
                () = tx.closed() => return,
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The status of a failed JWT-SVID signing.
fn jwt_status(e: crate::ca::Error) -> Status {
    match e {
        crate::ca::Error::JwtRequest(r) => Status::invalid_argument(r.to_string()),
        other => Status::unavailable(format!("cannot sign a JWT-SVID: {other}")),
    }
}

/// A JSON object as a protobuf `Struct` (the claims of `ValidateJWTSVID`).
fn to_struct(m: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = StreamOf<X509svidResponse>;
    type FetchX509BundlesStream = StreamOf<X509BundlesResponse>;
    type FetchJWTBundlesStream = StreamOf<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.admit(&req, "FetchX509SVID")?;
        let slot = self.open_stream(&caller)?;
        let leaf = self
            .agent
            .ca
            .leaf(&caller.service)
            .await
            .map_err(|e| Status::unavailable(format!("no leaf for {}: {e}", caller.service)))?
            .rx;
        let stream = follow(
            slot,
            self.stop.clone(),
            Some(leaf),
            self.agent.ca.bundle(),
            |leaf, bundle| X509svidResponse {
                // `follow` is given the leaf, so there is always one.
                svids: leaf
                    .into_iter()
                    .map(|l| proto::X509svid {
                        spiffe_id: l.cert.spiffe_id.to_string(),
                        x509_svid: l
                            .cert
                            .chain
                            .iter()
                            .flat_map(|c| c.as_ref().iter().copied())
                            .collect(),
                        x509_svid_key: l.private_key_der().secret_der().to_vec(),
                        bundle: bundle_der(bundle),
                        hint: String::new(),
                    })
                    .collect(),
                crl: Vec::new(),
                federated_bundles: HashMap::new(),
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.admit(&req, "FetchX509Bundles")?;
        let slot = self.open_stream(&caller)?;
        let stream = follow(
            slot,
            self.stop.clone(),
            None,
            self.agent.ca.bundle(),
            |_, bundle| X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([(
                    trust_domain_id(bundle.trust_domain()),
                    bundle_der(bundle),
                )]),
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let caller = self.admit(&req, "FetchJWTSVID")?;
        let body = req.into_inner();
        let svid = self
            .agent
            .ca
            .jwt_svid(&caller.service, &body.audience)
            .await
            .map_err(jwt_status)?;
        let id = svid.spiffe_id.to_string();
        // A caller may name the identity it wants; it has exactly one.
        if !body.spiffe_id.is_empty() && body.spiffe_id != id {
            tracing::info!(pid = caller.pid, service = %caller.service, asked = %body.spiffe_id, "JWT-SVID for another identity refused");
            return Err(Status::permission_denied(format!(
                "no identity {:?} for this caller (it is {id})",
                body.spiffe_id
            )));
        }
        tracing::info!(pid = caller.pid, service = %caller.service, audience = ?svid.audience, "JWT-SVID issued");
        Ok(Response::new(JwtsvidResponse {
            svids: vec![proto::Jwtsvid {
                spiffe_id: id,
                svid: svid.token.clone(),
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self.admit(&req, "FetchJWTBundles")?;
        let slot = self.open_stream(&caller)?;
        let stream = follow(
            slot,
            self.stop.clone(),
            None,
            self.agent.ca.watch_state(),
            |_, state| JwtBundlesResponse {
                bundles: HashMap::from([(trust_domain_id(&state.trust_domain), state.jwks())]),
            },
        );
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let caller = self.admit(&req, "ValidateJWTSVID")?;
        let body = req.into_inner();
        if body.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if body.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let state = self.agent.ca.state();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match jwt::validate(
            &body.svid,
            &body.audience,
            &state.jwt_keys,
            &state.trust_domain,
            now,
        ) {
            Ok(v) => {
                self.counters.jwt_valid.fetch_add(1, Ordering::Relaxed);
                tracing::info!(pid = caller.pid, service = %caller.service, subject = %v.spiffe_id, audience = %body.audience, "JWT-SVID validated");
                Ok(Response::new(ValidateJwtsvidResponse {
                    spiffe_id: v.spiffe_id.to_string(),
                    claims: Some(to_struct(v.claims)),
                }))
            }
            Err(e) => {
                self.counters.jwt_invalid.fetch_add(1, Ordering::Relaxed);
                tracing::info!(pid = caller.pid, service = %caller.service, audience = %body.audience, reason = %e, "JWT-SVID rejected");
                Err(Status::invalid_argument(format!("invalid JWT-SVID: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/workload.sock");
        let first = bind(&path).expect("first bind");
        let mode = |p: &Path| {
            let m = std::fs::metadata(p).expect("meta").permissions();
            std::os::unix::fs::PermissionsExt::mode(&m) & 0o777
        };
        assert_eq!(mode(&path), 0o666);
        assert_eq!(
            mode(&dir.path().join("run")),
            0o755,
            "its directory is made reachable"
        );
        let e = bind(&path).expect_err("the socket is live");
        assert!(e.to_string().contains("another process serves it"), "{e}");
        drop(first);
        // The file stays behind, nobody answers: stale, replaced.
        assert!(path.exists());
        let _second = bind(&path).expect("a stale socket is replaced");
    }
}
