//! The agent's DNS server (127.0.0.1:8600 by default, UDP and TCP), answering
//! Consul's names under `consul.` from memory:
//!
//! | name | answer |
//! |---|---|
//! | `<svc>.service[.<dc>].consul` | A/AAAA of the healthy instances; SRV with their ports, target `<node>.node.<dc>.consul.` and an additional A/AAAA |
//! | `<svc>.connect[.<dc>].consul` | the same for the instances' inbound mTLS addresses (their nodes' port 20000) |
//! | `<svc>.virtual.consul` | A: the service's one stable virtual IP from 240.0.0.0/4 ([`crate::vip`]) |
//! | `<node>.node[.<dc>].consul` | A/AAAA of the node |
//! | `<hex>.addr[.<dc>].consul` | the address spelled in hex (Consul's SRV target for nodes whose name is not a DNS label) |
//!
//! Names are matched ignoring ASCII case, as DNS requires. Every other name under
//! `consul.`, a service with no healthy instance and another datacenter get
//! NXDOMAIN with the zone's SOA (minimum TTL 0, so nothing caches the miss). Names
//! outside `consul.` are forwarded to `--dns-recursor` when one is set (over the
//! transport the client used) and REFUSED otherwise. Answers carry TTL 0, like
//! Consul's default, so clients always see current health.
//!
//! This module owns the wire handling ([`bind`], [`serve`]: bounded UDP and TCP
//! loops, size limits, truncation), the zone's names and forwarding. It does not own
//! the data: [`DnsCatalog`] is the narrow view of the catalog it reads (the catalog
//! implements it: `catalog::dns::CatalogDns`), and virtual IPs come from
//! [`crate::vip::Allocator`]. The agent binds the sockets at startup (a port
//! conflict fails it) and serves until its shutdown (`app::run`).
//!
//! # Applications in a lab namespace
//!
//! The system resolver (glibc's `resolv.conf`) only talks to port 53, so port 8600
//! serves `dig -p 8600` and Consul-style tooling, not applications. A lab node is a
//! network namespace with a loopback of its own, where port 53 is free: run that
//! node's agent with `--dns-addr 127.0.0.1:53`, then `connect-agent dns-setup --netns
//! NAME` ([`setup`]) checks that the agent answers there and writes
//! `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME ...` mounts over
//! `/etc/resolv.conf` for the processes it starts. (`nsenter --net` does not: start
//! applications with `ip netns exec` after placing the launching process in the
//! service's cgroup, since cgroup membership survives the exec.)

mod forward;
mod server;
pub mod setup;
mod zone;

#[cfg(any(test, feature = "testing"))]
pub mod fake;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

pub use server::{Listeners, bind, serve};

use crate::identity::{Datacenter, ServiceName};

/// TTL of every answer: 0, Consul's default for services, so health changes show at
/// once. Lookups are local and cheap.
pub const TTL: u32 = 0;

/// One endpoint of a service as DNS shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    /// The node the instance runs on; SRV targets name it.
    pub node: String,
    pub addr: IpAddr,
    pub port: u16,
}

/// What the DNS server needs from the catalog. Implementations answer from memory
/// (these are called on every query) and compare names ignoring ASCII case, since DNS
/// names are case-insensitive.
pub trait DnsCatalog: Send + Sync + 'static {
    /// The registered service called `name` (ignoring case) in the catalog's own
    /// spelling, healthy or not; `None` if there is none. Virtual IPs are allocated
    /// under the returned name, so every spelling of a query maps to one address.
    fn service(&self, name: &ServiceName) -> Option<ServiceName>;

    /// The service called `name` (ignoring case) that has a virtual IP, in the
    /// catalog's spelling: a mesh destination, not e.g. a sidecar proxy's own
    /// registration. By default every service.
    fn virtual_service(&self, name: &ServiceName) -> Option<ServiceName> {
        self.service(name)
    }

    /// The healthy instances of `service` (as returned by [`DnsCatalog::service`]):
    /// their address and port and the node they run on.
    fn instances(&self, service: &ServiceName) -> Vec<Instance>;

    /// Where Connect clients reach the healthy instances of `service`: for each, its
    /// node's inbound mTLS address and port (and the node's name). Duplicates (two
    /// instances on one node) are fine: the server removes them.
    fn connect_endpoints(&self, service: &ServiceName) -> Vec<Instance>;

    /// The address of node `name` (ignoring case), if the catalog knows the node.
    fn node_addr(&self, name: &str) -> Option<IpAddr>;
}

/// How the server answers, apart from the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// This agent's datacenter: `<svc>.service.<dc>.consul` answers only for it, and
    /// SRV targets name it.
    pub datacenter: Datacenter,
    /// Where queries outside `consul.` go; `None` refuses them.
    pub recursor: Option<SocketAddr>,
}

/// Why the DNS server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot bind the DNS server to {addr} ({transport}): {source} (is another agent or Consul running? --dns-addr changes the address)"
    )]
    Bind {
        addr: SocketAddr,
        transport: Transport,
        #[source]
        source: std::io::Error,
    },
    #[error("the DNS {transport} socket at {addr} failed: {source}")]
    Socket {
        addr: SocketAddr,
        transport: Transport,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the local address of the DNS {transport} socket: {source}")]
    LocalAddr {
        transport: Transport,
        #[source]
        source: std::io::Error,
    },
    #[error("the DNS listeners must share one address, got UDP {udp} and TCP {tcp}")]
    AddressMismatch { udp: SocketAddr, tcp: SocketAddr },
}

/// The transport a query came over; forwarding keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        })
    }
}

/// Parses `--dns-recursor`: `ip:port`, or a bare IP meaning port 53 (as Consul's
/// `recursors` takes).
pub fn parse_recursor(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an address: expected IP or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recursor_addresses() {
        for (input, want) in [
            ("127.0.0.1:5353", Some("127.0.0.1:5353")),
            ("127.0.0.1", Some("127.0.0.1:53")),
            ("::1", Some("[::1]:53")),
            ("[::1]:54", Some("[::1]:54")),
            ("localhost", None),
            ("127.0.0.1:", None),
            ("", None),
        ] {
            let want = want.map(|w| w.parse::<SocketAddr>().expect("want"));
            assert_eq!(parse_recursor(input).ok(), want, "{input:?}");
        }
    }
}
