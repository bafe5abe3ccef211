//! `connect-agent proxy`: Consul's `consul connect proxy` (reference §6.1, §7) — a
//! separate process that speaks for one service through the local agent's HTTP API.
//!
//! It takes its leaf (`/v1/agent/connect/ca/leaf/<service>`) and roots
//! (`/v1/agent/connect/ca/roots`) with blocking queries and hot-swaps them, finds
//! upstream instances with `/v1/health/connect/<name>?passing=1` (kept current the
//! same way), and, with `-listen`, authorizes inbound connections with
//! `POST /v1/agent/connect/authorize` and follows
//! `/v1/connect/intentions/match?by=destination` to close connections an intention
//! change denies. The TLS, dial and splice code is the agent's own
//! ([`crate::proxy`]); this file only feeds it from HTTP.
//!
//! Flags mode only (`-service`, `-upstream`, `-listen`, `-service-addr`); Consul's
//! `-sidecar-for`, `-proxy-id` and `-register` are not offered.

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ExitCode,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::http::{Client, HttpArgs, enc};
use crate::{
    api::ca::{IndexedCaRoots, IssuedCertJson},
    ca::TrustBundle,
    identity::{Datacenter, ServiceName, SpiffeId, TrustDomain},
    intentions::Action,
    proxy::{
        self, AuthorizeError, Authorizer, Directory, Endpoint, Limits, LocalService, Metrics,
        Parts, Proxy, StaticLeaf, Upstream, Verdict,
    },
    redirect::{CgroupId, OrigDst},
    shutdown::{DRAIN_DEADLINE, Shutdown, Signal, Signals},
};

/// How long each blocking query waits on the agent before returning unchanged.
const BLOCK_WAIT: &str = "5m";
/// Backoff while the agent cannot be reached.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A blocking query that answers faster than this with nothing new is not
/// blocking (an old agent, a proxy in between); pause so the loop cannot spin.
const MIN_ROUND: Duration = Duration::from_millis(200);
/// An authorize call on the connection path waits at most this.
const AUTHORIZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Run a Connect proxy for a service, through the local agent (like `consul connect proxy`).
#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub http: HttpArgs,

    /// Name of the service this proxy speaks for: its identity, and with -listen
    /// the service it fronts.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,

    /// An upstream: NAME:PORT or NAME:ADDR:PORT. Plaintext connections to the local
    /// port (127.0.0.1 unless ADDR is given) go to NAME over mTLS. Repeatable.
    #[arg(long, value_name = "NAME:PORT")]
    pub upstream: Vec<String>,

    /// Address of the public mTLS listener (HOST:PORT) in front of the service.
    /// Needs -service-addr.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// The service's plaintext address that -listen forwards to (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub service_addr: Option<String>,

    /// Not accepted: the proxy takes flags only.
    #[arg(hide = true)]
    pub rest: Vec<String>,
}

/// The validated flags.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    service: ServiceName,
    upstreams: Vec<UpstreamFlag>,
    /// Public listener and the local service behind it.
    listen: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamFlag {
    destination: ServiceName,
    bind: SocketAddr,
    /// As Consul prints it: `:9191`, or `addr:port` when an address was given.
    shown: String,
}

/// Runs the proxy until SIGINT or SIGTERM.
pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::install().context("cannot install signal handlers")?;
    let running = start(&args).await?;
    print_banner(&running.plan)?;
    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => {
                tracing::info!("SIGHUP ignored: the proxy takes its configuration from flags")
            }
        }
    }
    tracing::info!("stopping");
    running.shutdown.drain(DRAIN_DEADLINE).await;
    let m = running.proxy.metrics();
    tracing::info!(
        inbound = m.accepted(proxy::Side::Inbound),
        outbound = m.accepted(proxy::Side::Outbound),
        denied = m.denied(),
        "connections served"
    );
    println!("Connect proxy shutdown");
    Ok(ExitCode::SUCCESS)
}

/// A started proxy: listeners bound, feeds running.
#[derive(Debug)]
struct Running {
    plan: Plan,
    proxy: Proxy,
    shutdown: Shutdown,
}

/// Validates the flags, takes the first roots, leaf and instances from the agent,
/// and opens the listeners. Fails (and stops what it started) if any of that fails.
async fn start(args: &ProxyArgs) -> anyhow::Result<Running> {
    let plan = plan(args).await?;
    crate::admission::raise_and_log_nofile_limit();
    let client = Client::new(&args.http)?;
    let shutdown = Shutdown::new();
    let result = async {
        let feeds = Feeds::start(client, &plan, &shutdown).await?;
        let proxy = Proxy::start(Parts {
            directory: feeds.directory.clone(),
            authorizer: feeds.authorizer.clone(),
            leaves: Arc::new(StaticLeaf::new(plan.service.clone(), feeds.leaf.clone())),
            bundle: feeds.bundle.clone(),
            metrics: Arc::new(Metrics::new()),
            limits: Limits::default(),
            shutdown: shutdown.clone(),
        })?;
        if let Some(e) = proxy.sync_upstreams().await.into_iter().next() {
            return Err(anyhow::Error::from(e));
        }
        if let Some((listen, _)) = plan.listen {
            proxy.serve_inbound(proxy::bind("public", listen).await?);
        }
        Ok(proxy)
    }
    .await;
    match result {
        Ok(proxy) => Ok(Running {
            plan,
            proxy,
            shutdown,
        }),
        Err(e) => {
            shutdown.stop.cancel();
            Err(e)
        }
    }
}

async fn plan(args: &ProxyArgs) -> anyhow::Result<Plan> {
    if !args.rest.is_empty() {
        bail!("Should have no non-flag arguments.");
    }
    let Some(service) = args.service.as_deref().filter(|s| !s.is_empty()) else {
        bail!("-service must be specified so that proxy can configure itself.");
    };
    let service: ServiceName = service.parse().context("-service")?;
    let upstreams = args
        .upstream
        .iter()
        .map(|u| parse_upstream(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (i, u) in upstreams.iter().enumerate() {
        if upstreams[..i].iter().any(|o| o.bind == u.bind) {
            bail!("-upstream: two upstreams bind {}", u.bind);
        }
    }
    let listen = match (&args.listen, &args.service_addr) {
        (None, None) => None,
        (Some(_), None) => {
            bail!("-listen needs -service-addr: the address of the service it fronts")
        }
        (None, Some(_)) => bail!("-service-addr is only used with -listen"),
        (Some(l), Some(s)) => Some((
            resolve(l).await.context("-listen")?,
            resolve(s).await.context("-service-addr")?,
        )),
    };
    if upstreams.is_empty() && listen.is_none() {
        bail!("nothing to do: give at least one -upstream, or -listen with -service-addr");
    }
    Ok(Plan {
        service,
        upstreams,
        listen,
    })
}

/// `NAME:PORT` or `NAME:ADDR:PORT` (IPv4 or `[IPv6]`).
fn parse_upstream(s: &str) -> anyhow::Result<UpstreamFlag> {
    let bad = || format!("-upstream {s:?}: expected NAME:PORT or NAME:ADDR:PORT");
    let (name, rest) = s.split_once(':').with_context(bad)?;
    if name.ends_with(".query") {
        bail!("-upstream {s:?}: prepared queries are not supported");
    }
    let destination: ServiceName = name.parse().with_context(bad)?;
    let (addr, port) = match rest.rsplit_once(':') {
        None => (None, rest),
        Some((a, p)) => (Some(a), p),
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0).with_context(bad)?;
    let ip: IpAddr = match addr {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(a) => a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(bad)?,
    };
    Ok(UpstreamFlag {
        destination,
        bind: SocketAddr::new(ip, port),
        shown: match addr {
            None => format!(":{port}"),
            Some(a) => format!("{a}:{port}"),
        },
    })
}

async fn resolve(s: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(s)
        .await
        .with_context(|| format!("{s:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("{s:?} resolves to no address"))
}

/// Consul's startup output (reference §6.1), labels right-aligned.
fn banner(plan: &Plan) -> String {
    let line = |label: &str, value: &str| format!("{label:>22}: {value}\n");
    let mut out = String::from("==> Connect proxy starting...\n");
    out.push_str(&line("Configuration mode", "Flags"));
    out.push_str(&line("Service", plan.service.as_str()));
    for u in &plan.upstreams {
        out.push_str(&line(
            "Upstream",
            &format!("{} => {}", u.destination, u.shown),
        ));
    }
    let public = match plan.listen {
        None => "Disabled".to_owned(),
        Some((listen, service)) => format!("{listen} => {service}"),
    };
    out.push_str(&line("Public listener", &public));
    out.push_str("\n==> Log data will now stream in as it occurs:\n\n");
    out
}

fn print_banner(plan: &Plan) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(banner(plan).as_bytes())?;
    stdout.flush()?;
    Ok(())
}

// ───────────────────────────── what the agent feeds the proxy ─────────────────────────────

/// The live values the proxy reads, and the tasks that keep them current.
struct Feeds {
    bundle: watch::Receiver<Arc<TrustBundle>>,
    leaf: watch::Receiver<Arc<CertifiedKey>>,
    directory: Arc<FlagDirectory>,
    authorizer: Arc<HttpAuthorizer>,
}

impl Feeds {
    /// Fetches roots, the leaf and upstream instances once (failing loudly when
    /// the agent cannot give them), then follows each with blocking queries until
    /// `shutdown.stop`.
    async fn start(client: Client, plan: &Plan, shutdown: &Shutdown) -> anyhow::Result<Self> {
        let roots_path = "/v1/agent/connect/ca/roots".to_owned();
        let (roots, roots_index) = client
            .get_with_index::<IndexedCaRoots>(&roots_path)
            .await
            .context("cannot fetch the CA roots from the agent")?;
        let (bundle_tx, bundle) = watch::channel(Arc::new(bundle_of(&roots, roots_index)?));

        let leaf_path = format!("/v1/agent/connect/ca/leaf/{}", enc(plan.service.as_str()));
        let (leaf_json, leaf_index) = client
            .get_with_index::<IssuedCertJson>(&leaf_path)
            .await
            .with_context(|| format!("cannot fetch the leaf certificate of {}", plan.service))?;
        let leaf_id: SpiffeId = leaf_json
            .service_uri
            .parse()
            .context("the agent's leaf names no service SPIFFE ID")?;
        let (leaf_tx, leaf) = watch::channel(key_of(&leaf_json)?);

        let directory = Arc::new(FlagDirectory::new(plan));
        let (intentions_tx, intentions_rx) = watch::channel(0u64);
        let authorizer = Arc::new(HttpAuthorizer {
            client: client.clone(),
            bundle: bundle.clone(),
            datacenter: leaf_id.datacenter.clone(),
            changes: intentions_rx,
        });

        let stop = &shutdown.stop;
        let tasks = &shutdown.tasks;
        tasks.spawn(follow(
            client.clone(),
            roots_path,
            roots_index,
            stop.clone(),
            "CA roots",
            move |roots: IndexedCaRoots, index| {
                let bundle = bundle_of(&roots, index)?;
                tracing::info!(active_root = %bundle.active_root_id(), roots = bundle.roots().len(), "CA roots updated");
                bundle_tx.send_replace(Arc::new(bundle));
                Ok(())
            },
        ));
        tasks.spawn(follow(
            client.clone(),
            leaf_path,
            leaf_index,
            stop.clone(),
            "leaf certificate",
            move |leaf: IssuedCertJson, _| {
                let key = key_of(&leaf)?;
                tracing::info!(serial = %leaf.serial_number, valid_before = %leaf.valid_before, "leaf certificate updated");
                leaf_tx.send_replace(key);
                Ok(())
            },
        ));
        for u in &plan.upstreams {
            let path = format!(
                "/v1/health/connect/{}?passing=1",
                enc(u.destination.as_str())
            );
            let index = match client.get_with_index::<Vec<ServiceEntry>>(&path).await {
                Ok((entries, index)) => {
                    directory.set_endpoints(&u.destination, endpoints_of(&entries));
                    index
                }
                Err(e) => {
                    // Not fatal: the agent may learn of instances later.
                    tracing::warn!(upstream = %u.destination, error = format!("{e:#}"), "cannot list instances yet");
                    0
                }
            };
            let directory = directory.clone();
            let name = u.destination.clone();
            tasks.spawn(follow(
                client.clone(),
                path,
                index,
                stop.clone(),
                "upstream instances",
                move |entries: Vec<ServiceEntry>, _| {
                    let endpoints = endpoints_of(&entries);
                    tracing::info!(upstream = %name, instances = endpoints.len(), "upstream instances updated");
                    directory.set_endpoints(&name, endpoints);
                    Ok(())
                },
            ));
        }
        if plan.listen.is_some() {
            let path = format!(
                "/v1/connect/intentions/match?by=destination&name={}",
                enc(plan.service.as_str())
            );
            tasks.spawn(follow(
                client,
                path,
                0,
                stop.clone(),
                "intentions",
                move |_: serde_json::Value, index| {
                    intentions_tx.send_replace(index);
                    Ok(())
                },
            ));
        }
        Ok(Self {
            bundle,
            leaf,
            directory,
            authorizer,
        })
    }
}

/// Follows `path` with blocking queries from `index`, calling `apply` with each new
/// value, until `stop`. Failures are logged and retried with backoff; the last
/// good value stays in use meanwhile.
async fn follow<T, F>(
    client: Client,
    path: String,
    mut index: u64,
    stop: CancellationToken,
    what: &'static str,
    mut apply: F,
) where
    T: DeserializeOwned,
    F: FnMut(T, u64) -> anyhow::Result<()>,
{
    let mut backoff = RETRY_MIN;
    let sep = if path.contains('?') { '&' } else { '?' };
    loop {
        let url = format!("{path}{sep}index={index}&wait={BLOCK_WAIT}");
        let started = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = client.get_with_index::<T>(&url) => r,
        };
        let pause = match result {
            Ok((value, new_index)) => {
                backoff = RETRY_MIN;
                let changed = new_index != index;
                if changed && let Err(e) = apply(value, new_index) {
                    tracing::warn!(
                        what,
                        error = format!("{e:#}"),
                        "ignoring an unusable update from the agent"
                    );
                }
                // Consul: an index that goes backwards means the agent restarted
                // or its store was reset; start over from what it says now.
                index = new_index;
                (!changed && started.elapsed() < MIN_ROUND).then_some(MIN_ROUND)
            }
            Err(e) => {
                tracing::warn!(what, error = format!("{e:#}"), retry_in = ?backoff, "cannot refresh from the agent");
                let pause = backoff;
                backoff = (backoff * 2).min(RETRY_MAX);
                Some(pause)
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

fn bundle_of(roots: &IndexedCaRoots, index: u64) -> anyhow::Result<TrustBundle> {
    let trust_domain: TrustDomain = roots
        .trust_domain
        .parse()
        .context("the agent's CA has no valid trust domain yet")?;
    let mut ders = Vec::new();
    for r in &roots.roots {
        let mut certs = rustls_pemfile::certs(&mut r.root_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("root {} is not PEM", r.id))?;
        ders.append(&mut certs);
    }
    if ders.is_empty() {
        bail!("the agent returned no CA roots");
    }
    TrustBundle::new(trust_domain, roots.active_root_id.clone(), ders, index)
        .context("the agent's CA roots cannot be used")
}

fn key_of(leaf: &IssuedCertJson) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the leaf's CertPEM is not PEM")?;
    if chain.is_empty() {
        bail!("the leaf's CertPEM holds no certificate");
    }
    let key = rustls_pemfile::private_key(&mut leaf.private_key_pem.as_bytes())
        .context("the leaf's PrivateKeyPEM is not PEM")?
        .context("the leaf's PrivateKeyPEM holds no key")?;
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key)
        .context("the leaf's key is not an ECDSA key")?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// A `/v1/health/connect/<name>` entry, the fields the proxy reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    node: NodeJson,
    service: ServiceJson,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct NodeJson {
    address: String,
    datacenter: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ServiceJson {
    address: String,
    port: u16,
}

/// Where to dial each instance: `Service.Address` (else `Node.Address`) and
/// `Service.Port`, as Consul's proxy does. Entries without a usable address are
/// skipped.
fn endpoints_of(entries: &[ServiceEntry]) -> Vec<Endpoint> {
    entries
        .iter()
        .filter_map(|e| {
            let host = if e.service.address.is_empty() {
                &e.node.address
            } else {
                &e.service.address
            };
            let ip: IpAddr = match host.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    tracing::debug!(address = %host, "skipping an instance without an IP address");
                    return None;
                }
            };
            (e.service.port != 0).then(|| Endpoint {
                addr: SocketAddr::new(ip, e.service.port),
                datacenter: e.node.datacenter.parse().unwrap_or_default(),
            })
        })
        .collect()
}

/// The proxy's directory: the service from the flags, upstreams from the flags,
/// instances from the agent.
#[derive(Debug)]
struct FlagDirectory {
    local: Option<LocalService>,
    upstreams: Vec<Upstream>,
    endpoints: RwLock<HashMap<ServiceName, Vec<Endpoint>>>,
    changes: watch::Sender<u64>,
}

impl FlagDirectory {
    fn new(plan: &Plan) -> Self {
        Self {
            local: plan
                .listen
                .map(|(_, addr)| LocalService::single(plan.service.clone(), addr)),
            upstreams: plan
                .upstreams
                .iter()
                .map(|u| Upstream {
                    source: plan.service.clone(),
                    destination: u.destination.clone(),
                    bind: u.bind,
                })
                .collect(),
            endpoints: RwLock::new(HashMap::new()),
            changes: watch::channel(0).0,
        }
    }

    fn set_endpoints(&self, name: &ServiceName, endpoints: Vec<Endpoint>) {
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), endpoints);
        self.changes.send_modify(|v| *v += 1);
    }
}

impl Directory for FlagDirectory {
    fn local_service(&self, name: &ServiceName) -> Option<LocalService> {
        self.local.as_ref().filter(|l| l.name == *name).cloned()
    }
    fn endpoints(&self, name: &ServiceName) -> Vec<Endpoint> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
    fn service_of_cgroup(&self, _cgroup_id: CgroupId) -> Option<ServiceName> {
        None
    }
    fn destination_of(&self, _orig_dst: OrigDst) -> Option<ServiceName> {
        None
    }
    fn upstream_listeners(&self) -> Vec<Upstream> {
        self.upstreams.clone()
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Authorizes through the agent's `POST /v1/agent/connect/authorize`.
#[derive(Debug)]
struct HttpAuthorizer {
    client: Client,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    /// The client's datacenter is not known on re-checks; authorize ignores it
    /// (reference §4.1), so ours is used.
    datacenter: Datacenter,
    changes: watch::Receiver<u64>,
}

/// The agent did not answer an authorize call in time.
#[derive(Debug, thiserror::Error)]
#[error("the agent did not answer within {after:?}")]
struct AuthorizeTimeout {
    after: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AuthorizeJson {
    authorized: bool,
    #[serde(default)]
    reason: String,
}

#[async_trait::async_trait]
impl Authorizer for HttpAuthorizer {
    async fn authorize(
        &self,
        src: &ServiceName,
        dst: &ServiceName,
    ) -> Result<Verdict, AuthorizeError> {
        let trust_domain = self.bundle.borrow().trust_domain().clone();
        let uri = SpiffeId::service(trust_domain, self.datacenter.clone(), src.clone());
        let body = json!({
            "Target": dst.as_str(),
            "ClientCertURI": uri.to_string(),
            "ClientCertSerial": "",
        });
        let call = self.client.send_json::<_, AuthorizeJson>(
            reqwest::Method::POST,
            "/v1/agent/connect/authorize",
            &body,
        );
        let answer = match tokio::time::timeout(AUTHORIZE_TIMEOUT, call).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(AuthorizeError {
                    src: src.clone(),
                    dst: dst.clone(),
                    cause: e.into(),
                });
            }
            Err(_) => {
                return Err(AuthorizeError {
                    src: src.clone(),
                    dst: dst.clone(),
                    cause: Box::new(AuthorizeTimeout {
                        after: AUTHORIZE_TIMEOUT,
                    }),
                });
            }
        };
        Ok(Verdict {
            action: if answer.authorized {
                Action::Allow
            } else {
                Action::Deny
            },
            reason: answer.reason,
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests;
