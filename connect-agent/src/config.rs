//! The agent's flags, turned into one validated [`Config`] before anything binds.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use clap::Args;

use crate::{acl::DefaultPolicy, identity::Datacenter};

/// Default HTTP API address (Consul's).
pub const DEFAULT_HTTP_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8500);
/// Default DNS address (Consul's).
pub const DEFAULT_DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8600);
/// Default transparent outbound listener; eBPF redirects here.
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15001);
/// Default inbound mTLS port on the node's address.
pub const DEFAULT_INBOUND_PORT: u16 = 20000;
/// Where the SPIFFE Workload API is served unless `--workload-api-socket` says
/// otherwise (the choice; SPIRE's agent uses `/tmp/spire-agent/public/api.sock`).
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "/run/connect/workload.sock";
/// The `--workload-api-socket` value that turns the Workload API off.
pub const WORKLOAD_API_OFF: &str = "none";

/// Flags of `connect-agent` when it runs the agent.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// cgroup (v2) directory whose processes are the applications: eBPF programs attach
    /// here and cover every cgroup below it. Without it, no transparent redirection.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// On SIGTERM or SIGINT, remove the eBPF programs from `--cgroup` (as
    /// `connect-agent detach` does). Without it they stay attached, pinned on bpffs,
    /// and keep every protection in force until the next agent adopts them.
    #[arg(long, requires = "cgroup")]
    pub detach_on_exit: bool,

    /// Directory of service definition files (`*.json`, Consul's shape).
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Where durable state lives: the node ID, and the embedded store unless
    /// `--store` names etcd.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/connect")]
    pub data_dir: PathBuf,

    /// Development mode: state in a temporary directory, intentions default to allow.
    #[arg(long)]
    pub dev: bool,

    /// Address of the HTTP API. Plaintext HTTP binds loopback only.
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_HTTP_ADDR)]
    pub http_addr: SocketAddr,

    /// Address of the DNS server (UDP and TCP).
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_DNS_ADDR)]
    pub dns_addr: SocketAddr,

    /// Where DNS queries outside `consul.` go (IP or IP:PORT, port 53 by default).
    /// Without it they are refused.
    #[arg(long, value_name = "ADDR", value_parser = crate::dns::parse_recursor)]
    pub dns_recursor: Option<SocketAddr>,

    /// The transparent outbound listener that eBPF sends redirected connections to.
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_OUTBOUND_ADDR)]
    pub outbound_addr: SocketAddr,

    /// The inbound mTLS listener other nodes dial (default: the advertise address, port 20000).
    #[arg(long, value_name = "ADDR")]
    pub inbound_addr: Option<SocketAddr>,

    /// The node's address, used for services registered without one.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub advertise_addr: IpAddr,

    /// This node's name in the catalog (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// Datacenter name, part of every SPIFFE ID.
    #[arg(long, value_name = "DC", default_value = "dc1")]
    pub datacenter: Datacenter,

    /// Where cluster state lives: `embedded` (a file under --data-dir) or
    /// `etcd://host:port,host:port`.
    #[arg(long, value_name = "URL", default_value = "embedded")]
    pub store: String,

    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,

    /// Threads running the agent's proxy and API; 0 means one per CPU.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub worker_threads: usize,

    /// Idle node-to-node mTLS connections the proxy keeps per source service,
    /// destination service and destination node, so that a new application
    /// connection rides one instead of costing a TCP connect and a TLS handshake;
    /// 0 turns reuse off (one TLS connection per application connection).
    #[arg(long, value_name = "N", default_value_t = crate::proxy::PoolLimits::default().max_idle_per_endpoint)]
    pub proxy_pool_size: usize,

    /// ACL default policy: what a request without a matching rule may do, and the
    /// intention decision when no intention matches. ACLs are on with `deny` unless
    /// --dev, where they are off (everything allowed) unless this flag is given.
    #[arg(long, value_name = "POLICY")]
    pub acl_default_policy: Option<DefaultPolicy>,

    /// Address of the HTTPS API (any address; clients need the CA to verify it).
    #[arg(long, value_name = "ADDR")]
    pub https_addr: Option<SocketAddr>,

    /// PEM certificate (chain) of the HTTPS API. Without it the built-in CA issues
    /// one for `localhost` and the --https-addr IP.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// PEM private key of --cert-file; must not be readable by group or others.
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to under
    /// --verify-incoming (default: the built-in CA's roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Require and verify a client certificate on every HTTPS API connection.
    #[arg(long)]
    pub verify_incoming: bool,

    /// Run as a server agent: read the CA's private key, create the CA on first
    /// start, sign leaves (also for client agents). With the embedded store an
    /// agent is always its own server; with etcd, agents without it are clients.
    #[arg(long)]
    pub server: bool,

    /// A server agent's API that signs this client agent's leaves:
    /// `https://host:port`, or plain HTTP (`host:port`, `http://host:port`) to a
    /// loopback address only, since the node's token goes with every request; repeat
    /// or separate with commas for several, tried in order.
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    pub server_addr: Vec<String>,

    /// File holding the ACL token (secret ID) this agent presents to server agents
    /// when it asks for a leaf; it needs `node:write` on this node. Mode 600.
    #[arg(long, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// File holding `user:password` for etcd's authentication (one line, mode
    /// 600). Server agents use a user of the `connect-server` role, client agents
    /// one of `connect-client`. Never pass credentials on the command line.
    #[arg(long, value_name = "FILE")]
    pub etcd_user_file: Option<PathBuf>,

    /// CA bundle (PEM) that etcd's server certificates must chain to. Turns on
    /// TLS to etcd: endpoints are dialed as `https://`.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) presented to etcd (with `--etcd-key-file`), for
    /// an etcd that runs with `--client-cert-auth`.
    #[arg(long, value_name = "FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Private key (PEM, mode 600) of `--etcd-cert-file`.
    #[arg(long, value_name = "FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// Serve the SPIFFE Workload API on this Unix socket (mode 0666; the kernel
    /// attests each caller by its cgroup, which needs `--cgroup`). Clients use
    /// `SPIFFE_ENDPOINT_SOCKET=unix://PATH`. Default: /run/connect/workload.sock;
    /// `none` turns the API off. A socket given here that cannot be served stops
    /// the agent; the default one only logs a warning (e.g. a second agent on the
    /// host, or an agent without permission to create /run/connect).
    #[arg(long, value_name = "PATH|none")]
    pub workload_api_socket: Option<PathBuf>,

    /// Talk to a non-loopback etcd without TLS. The `connect-server` password and
    /// the CA's private keys then cross the network in the clear; `doctor`
    /// reports it. Without this flag such an endpoint is refused.
    #[arg(long)]
    pub etcd_insecure_plaintext: bool,
}

/// A secret read from a file: shown as `<redacted>` in logs and debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// TLS to etcd, as the store takes it; read from the files at startup.
pub use crate::store::etcd::EtcdTls;

/// How this agent reaches its store (for `doctor` and the security report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTransport {
    /// The embedded store: nothing crosses a network.
    Embedded,
    /// etcd over TLS.
    Tls,
    /// etcd without TLS, every endpoint on loopback.
    PlaintextLoopback,
    /// etcd without TLS to another host, accepted with `--etcd-insecure-plaintext`.
    PlaintextInsecure,
}

impl StoreTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreTransport::Embedded => "embedded",
            StoreTransport::Tls => "etcd-tls",
            StoreTransport::PlaintextLoopback => "etcd-plaintext-loopback",
            StoreTransport::PlaintextInsecure => "etcd-plaintext-insecure",
        }
    }
}

/// etcd credentials from `--etcd-user-file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUser {
    pub name: String,
    pub password: Secret,
}

/// Validated configuration of a running agent.
#[derive(Debug, Clone)]
pub struct Config {
    pub cgroup: Option<PathBuf>,
    /// Remove the eBPF programs on a clean stop (`--detach-on-exit`).
    pub detach_on_exit: bool,
    pub config_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub dev: bool,
    pub http_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub dns_recursor: Option<SocketAddr>,
    pub outbound_addr: std::net::SocketAddrV4,
    pub inbound_addr: SocketAddr,
    pub advertise_addr: IpAddr,
    /// The addresses a service registered on this node may have besides the
    /// advertise address. `None`: the addresses of the node's interfaces, read at
    /// each registration ([`crate::catalog::CatalogConfig::own_addresses`]).
    pub own_addresses: Option<Vec<IpAddr>>,
    pub node_name: String,
    pub datacenter: Datacenter,
    pub store: StoreUrl,
    /// The decision when no intention matches: ACLs off or default policy `allow`
    /// allow; ACLs on with `deny` deny (reference §3).
    pub default_allow: bool,
    /// Whether requests are checked against ACL tokens.
    pub acl_enabled: bool,
    pub acl_default_policy: DefaultPolicy,
    /// The HTTPS API, when configured.
    pub https: Option<HttpsConfig>,
    /// Whether this agent holds the CA's keys (always with the embedded store).
    pub server: bool,
    /// Server agents' APIs that sign this (client) agent's leaves.
    pub server_addrs: Vec<String>,
    /// The ACL token presented to server agents (`--agent-token-file`).
    pub agent_token: Option<Secret>,
    /// etcd credentials (`--etcd-user-file`).
    pub etcd_user: Option<EtcdUser>,
    /// TLS to etcd (`--etcd-ca-file`, `--etcd-cert-file`, `--etcd-key-file`).
    pub etcd_tls: Option<EtcdTls>,
    /// How the store is reached (`--etcd-insecure-plaintext` shows here).
    pub store_transport: StoreTransport,
    /// Idle node-to-node connections kept per source, destination and endpoint.
    pub proxy_pool_size: usize,
    /// Where the SPIFFE Workload API is served (`--workload-api-socket`); `None`
    /// with `--workload-api-socket none`.
    pub workload_api_socket: Option<WorkloadApiSocket>,
}

/// Where the Workload API is served, and whether the operator chose the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadApiSocket {
    pub path: PathBuf,
    /// Given with `--workload-api-socket`: a socket that cannot be served stops
    /// the agent. The default path ([`DEFAULT_WORKLOAD_API_SOCKET`]) only warns
    /// (see `app::bind_workload_api`).
    pub explicit: bool,
}

impl WorkloadApiSocket {
    /// From `--workload-api-socket`: the default when absent, nothing for `none`.
    pub fn from_flag(flag: Option<PathBuf>) -> Option<Self> {
        match flag {
            None => Some(Self {
                path: PathBuf::from(DEFAULT_WORKLOAD_API_SOCKET),
                explicit: false,
            }),
            Some(p) if p.as_os_str() == WORKLOAD_API_OFF => None,
            Some(path) => Some(Self {
                path,
                explicit: true,
            }),
        }
    }
}

/// The HTTPS API's listener and certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsConfig {
    pub addr: SocketAddr,
    pub cert: HttpsCert,
    /// Client certificates required; they must chain to `client_ca` or, without
    /// it, to the built-in CA.
    pub verify_incoming: bool,
    pub client_ca: Option<PathBuf>,
}

/// Where the HTTPS API's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsCert {
    /// Issued (and renewed) by the built-in CA.
    BuiltinCa,
    /// Operator-supplied PEM files.
    Files { cert: PathBuf, key: PathBuf },
}

/// Where cluster state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Embedded,
    Etcd { endpoints: Vec<String> },
}

/// A flag value the agent cannot run with. The user is at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--http-addr {0} is not a loopback address: plaintext HTTP binds loopback only (use --https-addr for remote access)"
    )]
    HttpNotLoopback(SocketAddr),
    #[error("--store {0:?} is invalid: expected `embedded` or `etcd://host:port[,host:port...]`")]
    Store(String),
    #[error("--outbound-addr {0} must be an IPv4 address: eBPF redirects IPv4 connections")]
    OutboundNotV4(SocketAddr),
    #[error("--dns-recursor {0} is the agent's own DNS address: queries would loop")]
    DnsRecursorLoop(SocketAddr),
    #[error(
        "--server-addr {0} is plain HTTP to another host: this node's ACL token would cross the network in the clear; use https://{0} (verified against the CA roots)"
    )]
    PlainServerAddr(String),
    #[error("--node-name {0:?} is invalid: {1}")]
    NodeName(String, &'static str),
    #[error("--{0} needs --https-addr: it configures the HTTPS API")]
    NeedsHttps(&'static str),
    #[error(
        "a client agent (--store etcd://... without --server) needs --{0}: its leaves are signed by a server agent"
    )]
    ClientNeeds(&'static str),
    #[error(
        "a client agent never holds the CA key, so it cannot issue its own HTTPS API certificate: give --cert-file and --key-file, or run it with --server"
    )]
    ClientHttpsCert,
    #[error("--etcd-user-file needs --store etcd://...")]
    EtcdUserWithoutEtcd,
    #[error("--{0} needs --store etcd://...")]
    EtcdFlagWithoutEtcd(&'static str),
    #[error(
        "--etcd-cert-file and --etcd-key-file need --etcd-ca-file: TLS to etcd verifies etcd's certificate against it"
    )]
    EtcdIdentityWithoutCa,
    #[error("--etcd-insecure-plaintext contradicts --etcd-ca-file: choose TLS or plaintext")]
    EtcdInsecureWithTls,
    #[error(
        "etcd endpoint {0} is not on loopback, and without TLS this agent's etcd password and the CA's private keys would cross the network in the clear: give --etcd-ca-file (and --etcd-cert-file/--etcd-key-file if etcd checks client certificates), or pass --etcd-insecure-plaintext to accept plaintext"
    )]
    EtcdPlaintext(String),
    #[error("--{flag} {path}: {reason}")]
    PemFile {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--{flag} {path}: {reason}")]
    SecretFile {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Reads a one-line secret from `path`, refusing a file group or others may read.
fn read_secret_file(flag: &'static str, path: &std::path::Path) -> Result<String, Error> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |reason: String| Error::SecretFile {
        flag,
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "mode {mode:o} lets group or others read it; chmod 600 it"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let line = text.trim();
    if line.is_empty() {
        return Err(fail("it is empty".to_owned()));
    }
    Ok(line.to_owned())
}

impl AgentArgs {
    /// Checks the flags and fills in defaults that depend on each other.
    pub fn into_config(self) -> Result<Config, Error> {
        if !self.http_addr.ip().is_loopback() {
            return Err(Error::HttpNotLoopback(self.http_addr));
        }
        let outbound_addr = match self.outbound_addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err(Error::OutboundNotV4(self.outbound_addr)),
        };
        if self.dns_recursor == Some(self.dns_addr) {
            return Err(Error::DnsRecursorLoop(self.dns_addr));
        }
        let store = parse_store(&self.store)?;
        // With the embedded store the agent is the only one: its own server.
        let server = self.server || store == StoreUrl::Embedded;
        let agent_token = self
            .agent_token_file
            .as_deref()
            .map(|p| read_secret_file("agent-token-file", p).map(Secret))
            .transpose()?;
        let etcd_user = match (&self.etcd_user_file, &store) {
            (None, _) => None,
            (Some(_), StoreUrl::Embedded) => return Err(Error::EtcdUserWithoutEtcd),
            (Some(path), StoreUrl::Etcd { .. }) => {
                let line = read_secret_file("etcd-user-file", path)?;
                let (name, password) = line.split_once(':').ok_or_else(|| Error::SecretFile {
                    flag: "etcd-user-file",
                    path: path.clone(),
                    reason: "expected one line `user:password`".to_owned(),
                })?;
                Some(EtcdUser {
                    name: name.to_owned(),
                    password: Secret(password.to_owned()),
                })
            }
        };
        let (etcd_tls, store_transport) = self.etcd_transport(&store)?;
        if !server {
            // Without --server-addr, servers are found in the catalog.
            if let Some(plain) = self.server_addr.iter().find(|a| !server_addr_is_private(a)) {
                return Err(Error::PlainServerAddr(plain.clone()));
            }
            if agent_token.is_none() {
                return Err(Error::ClientNeeds("agent-token-file"));
            }
            if self.https_addr.is_some() && self.cert_file.is_none() {
                return Err(Error::ClientHttpsCert);
            }
        }
        let node_name = match self.node_name {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "node".to_owned()),
        };
        check_node_name(&node_name)?;
        let inbound_addr = self
            .inbound_addr
            .unwrap_or(SocketAddr::new(self.advertise_addr, DEFAULT_INBOUND_PORT));
        // Consul's dev mode runs without ACLs; anywhere else they are on, deny first.
        let acl_enabled = !self.dev || self.acl_default_policy.is_some();
        let acl_default_policy = self.acl_default_policy.unwrap_or(DefaultPolicy::Deny);
        let https = match self.https_addr {
            Some(addr) => Some(HttpsConfig {
                addr,
                cert: match (self.cert_file, self.key_file) {
                    (Some(cert), Some(key)) => HttpsCert::Files { cert, key },
                    _ => HttpsCert::BuiltinCa,
                },
                verify_incoming: self.verify_incoming,
                client_ca: self.ca_file,
            }),
            None => {
                for (set, flag) in [
                    (self.verify_incoming, "verify-incoming"),
                    (self.cert_file.is_some(), "cert-file"),
                    (self.ca_file.is_some(), "ca-file"),
                ] {
                    if set {
                        return Err(Error::NeedsHttps(flag));
                    }
                }
                None
            }
        };
        Ok(Config {
            cgroup: self.cgroup,
            detach_on_exit: self.detach_on_exit,
            config_dir: self.config_dir,
            data_dir: self.data_dir,
            dev: self.dev,
            http_addr: self.http_addr,
            dns_addr: self.dns_addr,
            dns_recursor: self.dns_recursor,
            outbound_addr,
            inbound_addr,
            advertise_addr: self.advertise_addr,
            own_addresses: None,
            node_name,
            datacenter: self.datacenter,
            store,
            default_allow: !acl_enabled || acl_default_policy == DefaultPolicy::Allow,
            acl_enabled,
            acl_default_policy,
            https,
            server,
            server_addrs: self.server_addr,
            agent_token,
            etcd_user,
            etcd_tls,
            store_transport,
            workload_api_socket: WorkloadApiSocket::from_flag(self.workload_api_socket),
            proxy_pool_size: self.proxy_pool_size,
        })
    }
}

impl Config {
    /// What the catalog needs of this configuration.
    pub fn catalog(&self) -> crate::catalog::CatalogConfig {
        crate::catalog::CatalogConfig {
            node_name: self.node_name.clone(),
            datacenter: self.datacenter.clone(),
            advertise_addr: self.advertise_addr,
            own_addresses: self.own_addresses.clone(),
            inbound_addr: self.inbound_addr,
            server_api: self.server_api(),
            config_dir: self.config_dir.clone(),
            protected_port_limit: self
                .cgroup
                .as_ref()
                .map(|_| connect_common::MAX_PROTECTED_PORTS as usize),
        }
    }

    /// What a server agent publishes for client agents to find it: its HTTPS
    /// API, at the advertise address when it listens on every address.
    fn server_api(&self) -> Option<String> {
        let https = self.https.as_ref().filter(|_| self.server)?;
        let addr = if https.addr.ip().is_unspecified() {
            SocketAddr::new(self.advertise_addr, https.addr.port())
        } else {
            https.addr
        };
        Some(format!("https://{addr}"))
    }

    /// Whether this agent holds the CA's keys (`--server`) or has its leaves signed
    /// by a server agent.
    pub fn ca_role(&self) -> crate::ca::CaRole {
        if self.server {
            crate::ca::CaRole::Server
        } else {
            crate::ca::CaRole::Client(crate::ca::remote::RemoteSigner::new(
                &self.server_addrs,
                self.node_name.clone(),
                self.agent_token.as_ref().map(|t| t.0.clone()),
            ))
        }
    }

    /// How the DNS server answers.
    pub fn dns_settings(&self) -> crate::dns::Settings {
        crate::dns::Settings {
            datacenter: self.datacenter.clone(),
            recursor: self.dns_recursor,
        }
    }

    /// A development config on loopback with port 0 everywhere, for in-process tests.
    #[cfg(any(test, feature = "testing"))]
    pub fn for_tests() -> Self {
        let any = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        Config {
            cgroup: None,
            detach_on_exit: false,
            config_dir: None,
            data_dir: std::env::temp_dir().join("connect-test-unused"),
            dev: true,
            http_addr: any(0),
            dns_addr: any(0),
            dns_recursor: None,
            outbound_addr: std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            inbound_addr: any(0),
            advertise_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            // Unit tests register instances at documentation-range addresses of
            // their own; they pose as this node's.
            own_addresses: Some(
                (1..=9)
                    .map(|i| IpAddr::V4(Ipv4Addr::new(198, 18, 0, i)))
                    .collect(),
            ),
            node_name: "test-node".to_owned(),
            datacenter: Datacenter::default(),
            store: StoreUrl::Embedded,
            default_allow: true,
            acl_enabled: false,
            acl_default_policy: DefaultPolicy::Deny,
            https: None,
            server: true,
            server_addrs: Vec::new(),
            agent_token: None,
            etcd_user: None,
            etcd_tls: None,
            store_transport: StoreTransport::Embedded,
            workload_api_socket: None,
            proxy_pool_size: crate::proxy::PoolLimits::default().max_idle_per_endpoint,
        }
    }
}

impl AgentArgs {
    /// TLS to etcd from its flags, and how the store is reached. Refuses a
    /// non-loopback etcd endpoint without TLS unless `--etcd-insecure-plaintext`.
    fn etcd_transport(&self, store: &StoreUrl) -> Result<(Option<EtcdTls>, StoreTransport), Error> {
        let StoreUrl::Etcd { endpoints } = store else {
            for (set, flag) in [
                (self.etcd_ca_file.is_some(), "etcd-ca-file"),
                (self.etcd_cert_file.is_some(), "etcd-cert-file"),
                (self.etcd_key_file.is_some(), "etcd-key-file"),
                (self.etcd_insecure_plaintext, "etcd-insecure-plaintext"),
            ] {
                if set {
                    return Err(Error::EtcdFlagWithoutEtcd(flag));
                }
            }
            return Ok((None, StoreTransport::Embedded));
        };
        let Some(ca) = &self.etcd_ca_file else {
            if self.etcd_cert_file.is_some() || self.etcd_key_file.is_some() {
                return Err(Error::EtcdIdentityWithoutCa);
            }
            if let Some(remote) = endpoints.iter().find(|e| !is_loopback_endpoint(e)) {
                if !self.etcd_insecure_plaintext {
                    return Err(Error::EtcdPlaintext(remote.clone()));
                }
                return Ok((None, StoreTransport::PlaintextInsecure));
            }
            return Ok((None, StoreTransport::PlaintextLoopback));
        };
        if self.etcd_insecure_plaintext {
            return Err(Error::EtcdInsecureWithTls);
        }
        let ca_pem = read_pem("etcd-ca-file", ca, "CERTIFICATE")?;
        let identity = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(cert), Some(key)) => {
                let cert_pem = read_pem("etcd-cert-file", cert, "CERTIFICATE")?;
                crate::datadir::check_key_file(key).map_err(|e| Error::PemFile {
                    flag: "etcd-key-file",
                    path: key.clone(),
                    reason: e.to_string(),
                })?;
                let key_pem = read_pem("etcd-key-file", key, "PRIVATE KEY")?;
                let key_pem = String::from_utf8(key_pem).map_err(|_| Error::PemFile {
                    flag: "etcd-key-file",
                    path: key.clone(),
                    reason: "not PEM text".to_owned(),
                })?;
                Some((cert_pem, key_pem))
            }
            // clap's `requires` makes these pairs.
            _ => None,
        };
        Ok((Some(EtcdTls { ca_pem, identity }), StoreTransport::Tls))
    }
}

/// Whether an endpoint (`host:port`, maybe with a scheme and a path) is on
/// loopback: `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback_endpoint(endpoint: &str) -> bool {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let rest = rest.split('/').next().unwrap_or("");
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reads a PEM file and checks that it holds a block whose label contains `label`.
fn read_pem(flag: &'static str, path: &std::path::Path, label: &str) -> Result<Vec<u8>, Error> {
    let fail = |reason: String| Error::PemFile {
        flag,
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let blocks = pem::parse_many(&bytes).map_err(|e| fail(format!("not PEM: {e}")))?;
    if !blocks.iter().any(|b| b.tag().contains(label)) {
        return Err(fail(format!("holds no {label} block")));
    }
    Ok(bytes)
}

fn parse_store(s: &str) -> Result<StoreUrl, Error> {
    if s == "embedded" {
        return Ok(StoreUrl::Embedded);
    }
    let rest = s
        .strip_prefix("etcd://")
        .ok_or_else(|| Error::Store(s.to_owned()))?;
    let endpoints: Vec<String> = rest.split(',').map(str::trim).map(str::to_owned).collect();
    if endpoints.iter().any(|e| e.is_empty() || !e.contains(':')) {
        return Err(Error::Store(s.to_owned()));
    }
    Ok(StoreUrl::Etcd { endpoints })
}

/// Whether a `--server-addr` keeps the node's token off the network in the clear:
/// `https://` anywhere, plain HTTP (`http://` or no scheme) only to loopback.
fn server_addr_is_private(addr: &str) -> bool {
    if addr.starts_with("https://") {
        return true;
    }
    is_loopback_endpoint(addr.strip_prefix("http://").unwrap_or(addr))
}

/// Node names as Consul's DNS interface wants them: letters, digits, `-`, `_` and
/// `.` (host names are the default), starting with a letter or a digit, at most 128
/// bytes. Above all no `/`, which the catalog's store keys split on.
fn check_node_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() || name.len() > 128 {
        "it must be 1-128 characters"
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        "it must start with a letter or a digit"
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        "it may hold only letters, digits, '-', '_' and '.' (like a DNS name)"
    } else {
        return Ok(());
    };
    Err(Error::NodeName(name.to_owned(), reason))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn config(args: &[&str]) -> Result<Config, Error> {
        let mut argv = vec!["connect-agent"];
        argv.extend(args);
        Flags::try_parse_from(argv)
            .expect("flags")
            .agent
            .into_config()
    }

    #[test]
    fn a_client_sends_its_token_to_other_hosts_over_https_only() {
        for ok in [
            "https://198.18.0.10:8501",
            "127.0.0.1:8500",
            "http://127.0.0.1:8500",
            "http://[::1]:8500",
            "localhost:8500",
        ] {
            assert!(server_addr_is_private(ok), "{ok}");
        }
        for plain in [
            "198.18.0.10:8500",
            "http://198.18.0.10:8500",
            "http://[fe80::1]:8500",
            "server.example:8500",
            "http://127.0.0.1.example:8500",
        ] {
            assert!(!server_addr_is_private(plain), "{plain}");
        }
        let token = std::env::temp_dir().join(format!("connect-cfg-token-{}", std::process::id()));
        std::fs::write(&token, "t").expect("token file");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let e = config(&[
            "--store",
            "etcd://127.0.0.1:2379",
            "--server-addr",
            "198.18.0.10:8500",
            "--agent-token-file",
            &token.to_string_lossy(),
        ]);
        let _ = std::fs::remove_file(&token);
        match e {
            Err(e @ Error::PlainServerAddr(_)) => {
                assert!(e.to_string().contains("https://198.18.0.10:8500"), "{e}")
            }
            other => panic!("plain HTTP to another host must be refused: {other:?}"),
        }
    }

    /// etcd off loopback goes over TLS, or plaintext only when the operator says
    /// so in as many words (and `doctor` then fails the store check).
    #[test]
    fn etcd_off_loopback_needs_tls_or_an_explicit_insecure_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = rcgen::generate_simple_self_signed(vec!["etcd".into()]).expect("cert");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).expect("write");
        let key_file = dir.path().join("client.key");
        std::fs::write(&key_file, ca.signing_key.serialize_pem()).expect("write");
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let open_key = dir.path().join("open.key");
        std::fs::write(&open_key, ca.signing_key.serialize_pem()).expect("write");
        std::fs::set_permissions(
            &open_key,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let (ca, key, open, bad) = (
            ca_file.to_string_lossy().into_owned(),
            key_file.to_string_lossy().into_owned(),
            open_key.to_string_lossy().into_owned(),
            not_pem.to_string_lossy().into_owned(),
        );
        let remote = [
            "--server",
            "--store",
            "etcd://127.0.0.1:2379,198.18.0.2:2379",
        ];
        let with = |extra: &[&str]| {
            let mut a = remote.to_vec();
            a.extend_from_slice(extra);
            config(&a)
        };

        match with(&[]) {
            Err(e @ Error::EtcdPlaintext(_)) => {
                let m = e.to_string();
                assert!(
                    m.contains("198.18.0.2:2379") && m.contains("--etcd-ca-file"),
                    "{m}"
                );
            }
            other => panic!("plaintext etcd off loopback must be refused: {other:?}"),
        }
        let c = with(&["--etcd-insecure-plaintext"]).expect("insecure accepted when asked");
        assert_eq!(c.store_transport, StoreTransport::PlaintextInsecure);
        assert!(c.etcd_tls.is_none());
        let c = config(&[
            "--server",
            "--store",
            "etcd://127.0.0.1:2379,[::1]:2379,localhost:2379",
        ])
        .expect("loopback");
        assert_eq!(c.store_transport, StoreTransport::PlaintextLoopback);

        let c = with(&["--etcd-ca-file", &ca]).expect("server verification only");
        assert_eq!(c.store_transport, StoreTransport::Tls);
        assert!(c.etcd_tls.as_ref().is_some_and(|t| t.identity.is_none()));
        let c = with(&[
            "--etcd-ca-file",
            &ca,
            "--etcd-cert-file",
            &ca,
            "--etcd-key-file",
            &key,
        ])
        .expect("client certificate");
        assert!(c.etcd_tls.as_ref().is_some_and(|t| t.identity.is_some()));
        assert!(
            !format!("{c:?}").contains("PRIVATE KEY"),
            "the key stays out of logs"
        );

        assert!(matches!(
            with(&["--etcd-cert-file", &ca, "--etcd-key-file", &key]),
            Err(Error::EtcdIdentityWithoutCa)
        ));
        assert!(matches!(
            with(&["--etcd-ca-file", &ca, "--etcd-insecure-plaintext"]),
            Err(Error::EtcdInsecureWithTls)
        ));
        assert!(matches!(
            with(&["--etcd-ca-file", &bad]),
            Err(Error::PemFile {
                flag: "etcd-ca-file",
                ..
            })
        ));
        assert!(matches!(
            with(&[
                "--etcd-ca-file",
                &ca,
                "--etcd-cert-file",
                &ca,
                "--etcd-key-file",
                &open
            ]),
            Err(Error::PemFile {
                flag: "etcd-key-file",
                ..
            })
        ));
        assert!(matches!(
            config(&["--etcd-ca-file", &ca]),
            Err(Error::EtcdFlagWithoutEtcd("etcd-ca-file"))
        ));
        assert!(matches!(
            config(&["--etcd-insecure-plaintext"]),
            Err(Error::EtcdFlagWithoutEtcd("etcd-insecure-plaintext"))
        ));
    }

    /// `/` would split the catalog's store keys (`catalog/nodes/<name>/…`): node
    /// names are refused unless they are DNS-like, with the reason in the error.
    #[test]
    fn node_names_are_dns_like() {
        for good in ["n1", "web-01", "host.example.com", "a_b", "N3"] {
            let c = config(&["--node-name", good]).expect(good);
            assert_eq!(c.node_name, good);
        }
        for (bad, why) in [
            ("a/b", "only letters"),
            ("../n2", "start with"),
            ("n 1", "only letters"),
            ("-n1", "start with"),
            ("", "1-128"),
            ("n\u{7}", "only letters"),
        ] {
            match config(&[&format!("--node-name={bad}")]) {
                Err(e @ Error::NodeName(..)) => {
                    assert!(e.to_string().contains(why), "{bad:?}: {e}")
                }
                other => panic!("{bad:?} must be refused: {other:?}"),
            }
        }
        assert!(config(&["--node-name", &"n".repeat(129)]).is_err());
    }

    #[test]
    fn acl_defaults() {
        // (flags, ACLs on, default policy, intentions default allow)
        let cases: &[(&[&str], bool, DefaultPolicy, bool)] = &[
            (&[], true, DefaultPolicy::Deny, false),
            (
                &["--acl-default-policy", "allow"],
                true,
                DefaultPolicy::Allow,
                true,
            ),
            (&["--dev"], false, DefaultPolicy::Deny, true),
            (
                &["--dev", "--acl-default-policy", "deny"],
                true,
                DefaultPolicy::Deny,
                false,
            ),
            (
                &["--dev", "--acl-default-policy", "allow"],
                true,
                DefaultPolicy::Allow,
                true,
            ),
        ];
        for (flags, enabled, policy, allow) in cases {
            let c = config(flags).expect("valid");
            assert_eq!(
                (c.acl_enabled, c.acl_default_policy, c.default_allow),
                (*enabled, *policy, *allow),
                "{flags:?}"
            );
        }
    }

    #[test]
    fn https_flags() {
        let c = config(&["--https-addr", "198.18.0.1:8501", "--verify-incoming"]).expect("https");
        let h = c.https.expect("https config");
        assert_eq!(h.cert, HttpsCert::BuiltinCa);
        assert!(h.verify_incoming);
        let c = config(&[
            "--https-addr",
            "127.0.0.1:8501",
            "--cert-file",
            "c.pem",
            "--key-file",
            "k.pem",
            "--ca-file",
            "ca.pem",
        ])
        .expect("files");
        let h = c.https.expect("https config");
        assert_eq!(
            h.cert,
            HttpsCert::Files {
                cert: "c.pem".into(),
                key: "k.pem".into()
            }
        );
        assert_eq!(h.client_ca, Some(PathBuf::from("ca.pem")));
        for flags in [
            &["--verify-incoming"][..],
            &["--ca-file", "ca.pem"],
            &["--cert-file", "c", "--key-file", "k"],
        ] {
            assert!(
                matches!(config(flags), Err(Error::NeedsHttps(_))),
                "{flags:?}"
            );
        }
        assert!(
            Flags::try_parse_from(["x", "--https-addr", "127.0.0.1:1", "--cert-file", "c"])
                .is_err(),
            "cert without key"
        );
        assert!(matches!(
            config(&["--http-addr", "198.18.0.1:8500"]),
            Err(Error::HttpNotLoopback(_))
        ));
    }

    #[test]
    fn a_dns_recursor_may_not_be_the_agent_itself() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let parse = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("connect-agent").chain(args.iter().copied()))
                .expect("flags parse")
                .agent
                .into_config()
        };
        let config = parse(&["--dns-recursor", "127.0.0.1"]).expect("valid");
        assert_eq!(
            config.dns_recursor,
            Some("127.0.0.1:53".parse().expect("addr"))
        );
        assert!(matches!(
            parse(&[
                "--dns-addr",
                "127.0.0.1:5300",
                "--dns-recursor",
                "127.0.0.1:5300"
            ]),
            Err(Error::DnsRecursorLoop(_))
        ));
    }

    #[test]
    fn the_workload_api_is_served_by_default_and_none_turns_it_off() {
        let socket = |flags: &[&str]| config(flags).expect("config").workload_api_socket;
        let default = WorkloadApiSocket {
            path: DEFAULT_WORKLOAD_API_SOCKET.into(),
            explicit: false,
        };
        for (flags, want) in [
            (&[][..], Some(default)),
            (&["--workload-api-socket", "none"][..], None),
            (
                &["--workload-api-socket", "/tmp/w.sock"][..],
                Some(WorkloadApiSocket {
                    path: "/tmp/w.sock".into(),
                    explicit: true,
                }),
            ),
            // The default path named explicitly is explicit: it must be served.
            (
                &["--workload-api-socket", DEFAULT_WORKLOAD_API_SOCKET][..],
                Some(WorkloadApiSocket {
                    path: DEFAULT_WORKLOAD_API_SOCKET.into(),
                    explicit: true,
                }),
            ),
        ] {
            assert_eq!(socket(flags), want, "{flags:?}");
        }
    }

    #[test]
    fn store_urls() {
        assert_eq!(parse_store("embedded").ok(), Some(StoreUrl::Embedded));
        assert_eq!(
            parse_store("etcd://198.18.0.1:2379,198.18.0.2:2379").ok(),
            Some(StoreUrl::Etcd {
                endpoints: vec!["198.18.0.1:2379".into(), "198.18.0.2:2379".into()]
            })
        );
        for bad in [
            "",
            "etcd://",
            "etcd://host",
            "redis://x:1",
            "etcd://a:1,,b:2",
        ] {
            assert!(parse_store(bad).is_err(), "{bad:?} accepted");
        }
    }
}
