//! The `consul.` zone: which name a query asks for ([`classify`]) and the response
//! that answers it ([`Zone::handle`]). No sockets here; `server` moves the bytes.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, AAAA, SOA, SRV},
    },
};
use rand::seq::SliceRandom;

use super::{DnsCatalog, Instance, Settings, TTL};
use crate::{
    identity::{Datacenter, ServiceName},
    vip::Allocator,
};

/// Largest UDP response we send, and advertise in our EDNS OPT record: 4096 is the
/// common EDNS buffer size (RFC 6891 §6.2.5), and anything bigger rides TCP.
pub(super) const MAX_UDP_PAYLOAD: u16 = 4096;
/// How long a `.virtual` answer may wait for a first allocation through the store,
/// well under a stub resolver's 5 s timeout so the client gets SERVFAIL, not silence.
const ALLOCATE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a query asks for, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Lookup {
    /// `consul.` itself.
    Apex,
    Service(ServiceName),
    Connect(ServiceName),
    Virtual(ServiceName),
    Node(String),
    Addr(IpAddr),
    /// In the zone, but no name of ours: a typo, another datacenter, a bad label.
    NoSuchName,
}

/// Classifies `name`; `None` means it is outside `consul.`.
pub(super) fn classify(name: &Name, datacenter: &Datacenter) -> Option<Lookup> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let (last, rest) = labels.split_last()?;
    if !last.eq_ignore_ascii_case(b"consul") {
        return None;
    }
    let ours = |dc: &[u8]| dc.eq_ignore_ascii_case(datacenter.as_str().as_bytes());
    let (label, kind) = match rest {
        [] => return Some(Lookup::Apex),
        [label, kind] => (*label, *kind),
        [label, kind, dc] if ours(dc) && !kind.eq_ignore_ascii_case(b"virtual") => (*label, *kind),
        _ => return Some(Lookup::NoSuchName),
    };
    let text = std::str::from_utf8(label).ok();
    let service = || text.and_then(|t| t.parse::<ServiceName>().ok());
    let kind = kind.to_ascii_lowercase();
    let lookup = match kind.as_slice() {
        b"service" => service().map(Lookup::Service),
        b"connect" => service().map(Lookup::Connect),
        b"virtual" => service().map(Lookup::Virtual),
        b"node" => text
            .filter(|t| !t.is_empty())
            .map(|t| Lookup::Node(t.to_owned())),
        b"addr" => text.and_then(parse_hex_addr).map(Lookup::Addr),
        _ => None,
    };
    Some(lookup.unwrap_or(Lookup::NoSuchName))
}

/// Consul's `.addr` label: 8 hex digits for IPv4, 32 for IPv6.
fn parse_hex_addr(s: &str) -> Option<IpAddr> {
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match s.len() {
        8 => u32::from_str_radix(s, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from_bits(v))),
        32 => u128::from_str_radix(s, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from_bits(v))),
        _ => None,
    }
}

fn hex_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", v4.to_bits()),
        IpAddr::V6(v6) => format!("{:032x}", v6.to_bits()),
    }
}

/// Whether `s` can be one DNS label of an SRV target (so a node name becomes
/// `<node>.node.<dc>.consul.`).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What the server does with one datagram or TCP message.
#[derive(Debug)]
pub(super) enum Reply {
    /// Send `message`; over UDP at most `udp_limit` bytes (the client's EDNS size).
    Respond { message: Message, udp_limit: u16 },
    /// The name is outside `consul.` and a recursor is set: relay the query there,
    /// and send `failure` (SERVFAIL) if the recursor does not answer.
    Forward { failure: Message, udp_limit: u16 },
    /// Not a query (a response, or too short to have a header): say nothing, so
    /// that two servers can never answer each other forever.
    Drop,
}

/// Answers queries from the catalog and the virtual IP table.
pub(super) struct Zone {
    catalog: Arc<dyn DnsCatalog>,
    vips: Arc<Allocator>,
    settings: Settings,
    apex: Name,
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Zone {
    pub(super) fn new(
        catalog: Arc<dyn DnsCatalog>,
        vips: Arc<Allocator>,
        settings: Settings,
    ) -> Self {
        Self {
            catalog,
            vips,
            settings,
            apex: Name::root()
                .prepend_label("consul")
                .unwrap_or_else(|_| Name::root()),
        }
    }

    pub(super) fn recursor(&self) -> Option<std::net::SocketAddr> {
        self.settings.recursor
    }

    /// The reply to one request message. Never panics, whatever the bytes.
    pub(super) async fn handle(&self, bytes: &[u8]) -> Reply {
        let request = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(error) => {
                tracing::debug!(%error, len = bytes.len(), "malformed DNS message");
                return malformed(bytes);
            }
        };
        if request.message_type != MessageType::Query {
            return Reply::Drop;
        }
        let mut response = Message::response(request.id, request.op_code);
        response.metadata.recursion_desired = request.recursion_desired;
        response.metadata.recursion_available = self.settings.recursor.is_some();
        response.metadata.checking_disabled = request.checking_disabled;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP_PAYLOAD);
            response.set_edns(edns);
        }
        let udp_limit = request.max_payload().min(MAX_UDP_PAYLOAD);
        let respond = |message| Reply::Respond { message, udp_limit };

        if request.version() > 0 {
            response.metadata.response_code = ResponseCode::BADVERS;
            return respond(response);
        }
        if request.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return respond(response);
        }
        let [query] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return respond(response);
        };
        let Some(lookup) = classify(query.name(), &self.settings.datacenter) else {
            if self.settings.recursor.is_some() {
                response.metadata.response_code = ResponseCode::ServFail;
                return Reply::Forward {
                    failure: response,
                    udp_limit,
                };
            }
            response.metadata.response_code = ResponseCode::Refused;
            return respond(response);
        };
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            response.metadata.response_code = ResponseCode::Refused;
            return respond(response);
        }
        response.metadata.authoritative = true;
        self.answer(lookup, query, &mut response).await;
        respond(response)
    }

    async fn answer(&self, lookup: Lookup, query: &Query, response: &mut Message) {
        let qname = query.name();
        let qtype = query.query_type();
        match lookup {
            Lookup::Apex => {
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    response.add_answer(self.soa());
                } else {
                    self.no_data(response);
                }
            }
            Lookup::Service(name) => {
                let instances = self
                    .catalog
                    .service(&name)
                    .map(|s| self.catalog.instances(&s))
                    .unwrap_or_default();
                self.endpoints(qname, qtype, instances, response);
            }
            Lookup::Connect(name) => {
                let endpoints = self
                    .catalog
                    .service(&name)
                    .map(|s| self.catalog.connect_endpoints(&s))
                    .unwrap_or_default();
                self.endpoints(qname, qtype, endpoints, response);
            }
            Lookup::Virtual(name) => {
                let Some(service) = self.catalog.virtual_service(&name) else {
                    return self.no_such_name(response);
                };
                let allocated =
                    tokio::time::timeout(ALLOCATE_TIMEOUT, self.vips.get_or_allocate(&service))
                        .await;
                match allocated {
                    Ok(Ok(ip)) => self.addresses(qname, qtype, [IpAddr::V4(ip)], response),
                    Ok(Err(error)) => {
                        tracing::warn!(%service, %error, "cannot allocate a virtual IP");
                        response.metadata.response_code = ResponseCode::ServFail;
                    }
                    Err(_) => {
                        tracing::warn!(%service, "virtual IP allocation timed out");
                        response.metadata.response_code = ResponseCode::ServFail;
                    }
                }
            }
            Lookup::Node(node) => match self.catalog.node_addr(&node) {
                Some(ip) => self.addresses(qname, qtype, [ip], response),
                None => self.no_such_name(response),
            },
            Lookup::Addr(ip) => self.addresses(qname, qtype, [ip], response),
            Lookup::NoSuchName => self.no_such_name(response),
        }
    }

    /// Answers for a set of endpoints: addresses for A/AAAA, SRV with targets and
    /// their addresses in the additional section. No endpoint at all is NXDOMAIN, as
    /// Consul answers for a service without a healthy instance.
    fn endpoints(
        &self,
        qname: &Name,
        qtype: RecordType,
        mut endpoints: Vec<Instance>,
        response: &mut Message,
    ) {
        let mut seen = HashSet::new();
        endpoints.retain(|e| seen.insert((e.addr, e.port)));
        if endpoints.is_empty() {
            return self.no_such_name(response);
        }
        // Spread clients over the instances, as Consul does.
        endpoints.shuffle(&mut rand::thread_rng());
        match qtype {
            RecordType::SRV => {
                let mut additional = HashSet::new();
                for e in &endpoints {
                    let target = self.srv_target(e);
                    response.add_answer(Record::from_rdata(
                        qname.clone(),
                        TTL,
                        RData::SRV(SRV::new(1, 1, e.port, target.clone())),
                    ));
                    if additional.insert((target.clone(), e.addr)) {
                        response.add_additional(address_record(target, e.addr));
                    }
                }
            }
            _ => self.addresses(qname, qtype, endpoints.iter().map(|e| e.addr), response),
        }
    }

    /// A/AAAA answers of the addresses that match `qtype`; NODATA if none does.
    fn addresses(
        &self,
        qname: &Name,
        qtype: RecordType,
        addrs: impl IntoIterator<Item = IpAddr>,
        response: &mut Message,
    ) {
        let mut seen = HashSet::new();
        for ip in addrs {
            let wanted = match ip {
                IpAddr::V4(_) => matches!(qtype, RecordType::A | RecordType::ANY),
                IpAddr::V6(_) => matches!(qtype, RecordType::AAAA | RecordType::ANY),
            };
            if wanted && seen.insert(ip) {
                response.add_answer(address_record(qname.clone(), ip));
            }
        }
        if response.answers.is_empty() {
            self.no_data(response);
        }
    }

    /// `<node>.node.<dc>.consul.` when the endpoint is at its node's address and the
    /// node's name is a label; otherwise `<hex>.addr.<dc>.consul.` (Consul's form for
    /// services with an address of their own), so the target resolves to this
    /// endpoint's address either way.
    fn srv_target(&self, e: &Instance) -> Name {
        let dc = &self.settings.datacenter;
        if is_label(&e.node)
            && self.catalog.node_addr(&e.node) == Some(e.addr)
            && let Ok(name) = Name::from_ascii(format!("{}.node.{dc}.consul.", e.node))
        {
            return name;
        }
        Name::from_ascii(format!("{}.addr.{dc}.consul.", hex_addr(e.addr)))
            .unwrap_or_else(|_| self.apex.clone())
    }

    fn soa(&self) -> Record {
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let name = |label: &str| {
            self.apex
                .prepend_label(label)
                .unwrap_or_else(|_| self.apex.clone())
        };
        // Refresh, retry and expire only matter to secondaries, which this zone has
        // none of; the minimum (negative-caching TTL, RFC 2308) is 0 so a miss is
        // not remembered once the service registers.
        let soa = SOA::new(name("ns"), name("hostmaster"), serial, 3600, 600, 86400, 0);
        Record::from_rdata(self.apex.clone(), TTL, RData::SOA(soa))
    }

    fn no_such_name(&self, response: &mut Message) {
        response.metadata.response_code = ResponseCode::NXDomain;
        response.answers.clear();
        response.add_authority(self.soa());
    }

    fn no_data(&self, response: &mut Message) {
        response.add_authority(self.soa());
    }
}

fn address_record(name: Name, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, TTL, rdata)
}

/// The reply to bytes that do not decode: FORMERR with the request's id when there
/// is a query header to answer, nothing otherwise.
fn malformed(bytes: &[u8]) -> Reply {
    const HEADER_LEN: usize = 12;
    const QR_BIT: u8 = 0x80;
    if bytes.len() < HEADER_LEN || bytes[2] & QR_BIT != 0 {
        return Reply::Drop;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let op_code = OpCode::from_u8((bytes[2] >> 3) & 0x0f);
    Reply::Respond {
        message: Message::error_msg(id, op_code, ResponseCode::FormErr),
        udp_limit: 512,
    }
}

#[cfg(test)]
mod tests;
