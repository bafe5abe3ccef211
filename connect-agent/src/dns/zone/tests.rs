//! Tests of the zone: name classification (table-driven) and the response to each
//! kind of query, from bytes to bytes, without sockets.

use std::{net::SocketAddr, str::FromStr};

use hickory_proto::{op::Edns, rr::RData};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::{
    dns::fake::FakeCatalog,
    store::{Store, memory::MemStore},
    vip,
};

fn svc(s: &str) -> ServiceName {
    s.parse().expect("service name")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn name(s: &str) -> Name {
    Name::from_str(s).expect("name")
}

#[test]
fn names_are_classified() {
    let dc = Datacenter::default();
    let cases: &[(&str, Option<Lookup>)] = &[
        ("consul.", Some(Lookup::Apex)),
        ("CONSUL.", Some(Lookup::Apex)),
        ("web.service.consul.", Some(Lookup::Service(svc("web")))),
        ("web.Service.CONSUL.", Some(Lookup::Service(svc("web")))),
        ("web.service.dc1.consul.", Some(Lookup::Service(svc("web")))),
        ("web.service.DC1.consul.", Some(Lookup::Service(svc("web")))),
        ("web.service.dc2.consul.", Some(Lookup::NoSuchName)),
        ("web.connect.consul.", Some(Lookup::Connect(svc("web")))),
        ("web.connect.dc1.consul.", Some(Lookup::Connect(svc("web")))),
        ("web.virtual.consul.", Some(Lookup::Virtual(svc("web")))),
        ("web.virtual.dc1.consul.", Some(Lookup::NoSuchName)),
        ("n1.node.consul.", Some(Lookup::Node("n1".into()))),
        ("n1.node.dc1.consul.", Some(Lookup::Node("n1".into()))),
        ("7f000001.addr.consul.", Some(Lookup::Addr(ip("127.0.0.1")))),
        (
            "7f000001.addr.dc1.consul.",
            Some(Lookup::Addr(ip("127.0.0.1"))),
        ),
        (
            "00000000000000000000000000000001.addr.consul.",
            Some(Lookup::Addr(ip("::1"))),
        ),
        ("7f00001.addr.consul.", Some(Lookup::NoSuchName)),
        ("zz000001.addr.consul.", Some(Lookup::NoSuchName)),
        ("x.consul.", Some(Lookup::NoSuchName)),
        ("service.consul.", Some(Lookup::NoSuchName)),
        ("tag.web.service.consul.", Some(Lookup::NoSuchName)),
        ("a.b.c.d.consul.", Some(Lookup::NoSuchName)),
        ("web-.service.consul.", Some(Lookup::NoSuchName)),
        ("web.other.consul.", Some(Lookup::NoSuchName)),
        ("example.com.", None),
        ("consul.example.com.", None),
        ("web.service.consul.local.", None),
        (".", None),
    ];
    for (input, want) in cases {
        assert_eq!(&classify(&name(input), &dc), want, "{input}");
    }
}

/// A catalog with two nodes: `web` has two healthy instances and a failing one,
/// `socat` one instance with an address of its own, `down` only failing ones.
fn catalog() -> FakeCatalog {
    let c = FakeCatalog::new();
    c.add_node(
        "n1",
        ip("198.18.0.1"),
        "198.18.0.1:20000".parse().expect("addr"),
    )
    .add_node(
        "n2",
        ip("198.18.0.2"),
        "198.18.0.2:20000".parse().expect("addr"),
    )
    .add_node(
        "bad.name",
        ip("198.18.0.3"),
        "198.18.0.3:20000".parse().expect("addr"),
    )
    .add_instance(&svc("web"), "n1", ip("198.18.0.1"), 8080, true)
    .add_instance(&svc("web"), "n2", ip("198.18.0.2"), 8080, true)
    .add_instance(&svc("web"), "n2", ip("198.18.0.2"), 8081, false)
    .add_instance(&svc("socat"), "n1", ip("198.18.1.7"), 8181, true)
    .add_instance(&svc("legacy"), "bad.name", ip("198.18.0.3"), 9000, true)
    .add_instance(&svc("v6"), "n1", ip("::1"), 9090, true)
    .add_instance(&svc("pair"), "n2", ip("198.18.0.2"), 5001, true)
    .add_instance(&svc("pair"), "n2", ip("198.18.0.2"), 5002, true)
    .add_instance(&svc("down"), "n1", ip("198.18.0.1"), 7070, false);
    c
}

async fn zone_on(store: Arc<MemStore>, recursor: Option<SocketAddr>) -> Zone {
    let vips = vip::Allocator::start(store).await.expect("allocator");
    Zone::new(
        Arc::new(catalog()),
        vips,
        Settings {
            datacenter: Datacenter::default(),
            recursor,
        },
    )
}

async fn zone() -> Zone {
    zone_on(Arc::new(MemStore::new()), None).await
}

fn query_bytes(qname: &str, qtype: RecordType) -> Vec<u8> {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name(qname), qtype));
    q.to_vec().expect("encode")
}

/// Sends one query through `zone` and decodes the response as a client would.
async fn ask(zone: &Zone, qname: &str, qtype: RecordType) -> Message {
    let request = query_bytes(qname, qtype);
    match zone.handle(&request).await {
        Reply::Respond { message, .. } => {
            let bytes = message.to_vec().expect("encode response");
            let answer = Message::from_vec(&bytes).expect("decode response");
            assert_eq!(answer.id, u16::from_be_bytes([request[0], request[1]]));
            assert_eq!(answer.message_type, MessageType::Response);
            assert_eq!(answer.queries.len(), 1, "the question is echoed");
            answer
        }
        other => panic!("{qname} {qtype}: expected a response, got {other:?}"),
    }
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn srvs(m: &Message) -> Vec<(u16, String)> {
    let mut v: Vec<(u16, String)> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn has_soa_authority(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| matches!(r.data, RData::SOA(_)) && r.name.to_ascii() == "consul.")
}

#[tokio::test]
async fn service_a_records_are_the_healthy_instances() {
    let z = zone().await;
    for qname in ["web.service.consul.", "WEB.service.dc1.CONSUL."] {
        let m = ask(&z, qname, RecordType::A).await;
        assert_eq!(m.response_code, ResponseCode::NoError, "{qname}");
        assert!(m.authoritative);
        assert!(!m.recursion_available, "no recursor set");
        assert_eq!(addrs(&m), [ip("198.18.0.1"), ip("198.18.0.2")], "{qname}");
        assert!(
            m.answers
                .iter()
                .all(|r| r.ttl == TTL && r.name == name(qname))
        );
    }
}

#[tokio::test]
async fn service_srv_records_carry_ports_and_resolvable_targets() {
    let z = zone().await;
    let m = ask(&z, "web.service.consul.", RecordType::SRV).await;
    assert_eq!(
        srvs(&m),
        [
            (8080, "n1.node.dc1.consul.".into()),
            (8080, "n2.node.dc1.consul.".into())
        ]
    );
    let mut extra: Vec<(String, IpAddr)> = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), IpAddr::V4(a.0))),
            _ => None,
        })
        .collect();
    extra.sort();
    assert_eq!(
        extra,
        [
            ("n1.node.dc1.consul.".into(), ip("198.18.0.1")),
            ("n2.node.dc1.consul.".into(), ip("198.18.0.2"))
        ]
    );
    // The targets resolve on their own too.
    let n1 = ask(&z, "n1.node.dc1.consul.", RecordType::A).await;
    assert_eq!(addrs(&n1), [ip("198.18.0.1")]);

    // An instance away from its node's address, and a node whose name is not a
    // label, get Consul's `.addr` target, which resolves to the instance.
    for (qname, port, target, addr) in [
        (
            "socat.service.consul.",
            8181,
            "c6120107.addr.dc1.consul.",
            "198.18.1.7",
        ),
        (
            "legacy.service.consul.",
            9000,
            "c6120003.addr.dc1.consul.",
            "198.18.0.3",
        ),
    ] {
        let m = ask(&z, qname, RecordType::SRV).await;
        assert_eq!(srvs(&m), [(port, target.to_owned())], "{qname}");
        let t = ask(&z, target, RecordType::A).await;
        assert_eq!(addrs(&t), [ip(addr)], "{target}");
    }
}

#[tokio::test]
async fn misses_are_nxdomain_and_wrong_types_are_nodata() {
    let z = zone().await;
    for qname in [
        "nope.service.consul.",
        "down.service.consul.",
        "web.service.dc2.consul.",
        "nope.connect.consul.",
        "nope.virtual.consul.",
        "nope.node.consul.",
        "whatever.consul.",
    ] {
        let m = ask(&z, qname, RecordType::A).await;
        assert_eq!(m.response_code, ResponseCode::NXDomain, "{qname}");
        assert!(m.answers.is_empty(), "{qname}");
        assert!(has_soa_authority(&m), "{qname}: SOA for negative caching");
    }
    // A service whose instances are all IPv4 has no AAAA: NOERROR, empty, SOA.
    let m = ask(&z, "web.service.consul.", RecordType::AAAA).await;
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(has_soa_authority(&m));
    let m = ask(&z, "v6.service.consul.", RecordType::AAAA).await;
    assert_eq!(addrs(&m), [ip("::1")]);
    let m = ask(&z, "web.service.consul.", RecordType::TXT).await;
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    let m = ask(&z, "consul.", RecordType::SOA).await;
    assert!(matches!(m.answers.as_slice(), [r] if matches!(r.data, RData::SOA(_))));
}

#[tokio::test]
async fn connect_answers_are_the_inbound_listeners() {
    let z = zone().await;
    let m = ask(&z, "web.connect.consul.", RecordType::A).await;
    assert_eq!(addrs(&m), [ip("198.18.0.1"), ip("198.18.0.2")]);
    let m = ask(&z, "web.connect.consul.", RecordType::SRV).await;
    assert_eq!(
        srvs(&m),
        [
            (20000, "n1.node.dc1.consul.".into()),
            (20000, "n2.node.dc1.consul.".into())
        ]
    );
    // Two instances on one node share its inbound listener: one answer, not two.
    let m = ask(&z, "pair.service.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m).len(), 2);
    let m = ask(&z, "pair.connect.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), [(20000, "n2.node.dc1.consul.".into())]);
    let m = ask(&z, "pair.service.consul.", RecordType::A).await;
    assert_eq!(addrs(&m), [ip("198.18.0.2")], "one A record per address");
}

#[tokio::test]
async fn virtual_ips_are_stable_and_shared_through_the_store() {
    let store = Arc::new(MemStore::new());
    let one = zone_on(store.clone(), None).await;
    let two = zone_on(store.clone(), None).await;
    let web = addrs(&ask(&one, "web.virtual.consul.", RecordType::A).await);
    let [IpAddr::V4(web_ip)] = web.as_slice() else {
        panic!("one A record expected, got {web:?}");
    };
    assert!(vip::is_virtual(*web_ip));
    for (z, qname) in [
        (&one, "web.virtual.consul."),
        (&two, "web.virtual.consul."),
        (&two, "WEB.VIRTUAL.consul."),
    ] {
        assert_eq!(addrs(&ask(z, qname, RecordType::A).await), web, "{qname}");
    }
    let socat = addrs(&ask(&two, "socat.virtual.consul.", RecordType::A).await);
    assert_ne!(socat, web);
    assert_eq!(
        addrs(&ask(&one, "socat.virtual.consul.", RecordType::A).await),
        socat
    );
    // Unknown services get no address, and nothing is written for them.
    let index = store.index();
    ask(&one, "nope.virtual.consul.", RecordType::A).await;
    assert_eq!(store.index(), index);
    // The virtual name has no IPv6 address.
    let m = ask(&one, "web.virtual.consul.", RecordType::AAAA).await;
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
}

#[tokio::test]
async fn other_zones_are_refused_or_forwarded() {
    let z = zone().await;
    let m = ask(&z, "example.com.", RecordType::A).await;
    assert_eq!(m.response_code, ResponseCode::Refused);
    assert!(!m.authoritative);

    let forwarding = zone_on(
        Arc::new(MemStore::new()),
        Some("127.0.0.1:5353".parse().expect("addr")),
    )
    .await;
    match forwarding
        .handle(&query_bytes("example.com.", RecordType::A))
        .await
    {
        Reply::Forward { failure, .. } => {
            assert_eq!(failure.response_code, ResponseCode::ServFail);
            assert!(failure.recursion_available);
        }
        other => panic!("expected a forward, got {other:?}"),
    }
    // Our own zone is never forwarded.
    assert!(matches!(
        forwarding
            .handle(&query_bytes("web.service.consul.", RecordType::A))
            .await,
        Reply::Respond { .. }
    ));
}

#[tokio::test]
async fn protocol_errors_get_the_right_codes() {
    let z = zone().await;
    let code = |reply: Reply| match reply {
        Reply::Respond { message, .. } => Some(message.response_code),
        _ => None,
    };

    let mut two = Message::query();
    two.add_query(Query::query(name("web.service.consul."), RecordType::A));
    two.add_query(Query::query(name("socat.service.consul."), RecordType::A));
    assert_eq!(
        code(z.handle(&two.to_vec().expect("encode")).await),
        Some(ResponseCode::FormErr)
    );

    let mut notify = Message::new(7, MessageType::Query, OpCode::Notify);
    notify.add_query(Query::query(name("consul."), RecordType::SOA));
    assert_eq!(
        code(z.handle(&notify.to_vec().expect("encode")).await),
        Some(ResponseCode::NotImp)
    );

    let mut v1 = Message::query();
    v1.add_query(Query::query(name("web.service.consul."), RecordType::A));
    let mut edns = Edns::new();
    edns.set_version(1);
    v1.set_edns(edns);
    let reply = z.handle(&v1.to_vec().expect("encode")).await;
    let Reply::Respond { message, .. } = reply else {
        panic!("expected BADVERS");
    };
    let bytes = message.to_vec().expect("encode");
    // BADVERS and BADSIG share code 16; a decoder cannot tell them apart.
    assert_eq!(
        u16::from(Message::from_vec(&bytes).expect("decode").response_code),
        u16::from(ResponseCode::BADVERS)
    );

    let mut response = Message::response(9, OpCode::Query);
    response.add_query(Query::query(name("web.service.consul."), RecordType::A));
    assert!(matches!(
        z.handle(&response.to_vec().expect("encode")).await,
        Reply::Drop
    ));

    let mut chaos = Message::query();
    let mut q = Query::query(name("web.service.consul."), RecordType::A);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    assert_eq!(
        code(z.handle(&chaos.to_vec().expect("encode")).await),
        Some(ResponseCode::Refused)
    );

    // A header followed by junk: FORMERR with the id; less than a header: silence.
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 20]);
    match z.handle(&junk).await {
        Reply::Respond { message, .. } => {
            assert_eq!(message.id, 0x1234);
            assert_eq!(message.response_code, ResponseCode::FormErr);
        }
        other => panic!("expected FORMERR, got {other:?}"),
    }
    assert!(matches!(z.handle(&[1, 2, 3]).await, Reply::Drop));
    assert!(matches!(z.handle(&[]).await, Reply::Drop));
}

async fn udp_limit(z: &Zone, q: &Message) -> (u16, bool) {
    match z.handle(&q.to_vec().expect("encode")).await {
        Reply::Respond { udp_limit, message } => (udp_limit, message.edns.is_some()),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn edns_sets_the_udp_limit() {
    let z = zone().await;
    let mut q = Message::query();
    q.add_query(Query::query(name("web.service.consul."), RecordType::A));
    assert_eq!(udp_limit(&z, &q).await, (512, false));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    q.set_edns(edns.clone());
    assert_eq!(udp_limit(&z, &q).await, (1232, true));
    edns.set_max_payload(65000);
    q.set_edns(edns);
    assert_eq!(udp_limit(&z, &q).await, (MAX_UDP_PAYLOAD, true));
}

#[tokio::test]
async fn malformed_and_mutated_messages_never_panic() {
    let z = zone().await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let valid = query_bytes("web.service.consul.", RecordType::SRV);
    // Every prefix of a valid query.
    for len in 0..valid.len() {
        let _ = z.handle(&valid[..len]).await;
    }
    for _ in 0..5000 {
        // Random bytes of random length.
        let len = rng.gen_range(0..600);
        let bytes: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        let _ = z.handle(&bytes).await;
        // A valid query with a few bytes flipped (counts, label lengths, pointers).
        let mut mutated = valid.clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..mutated.len());
            mutated[i] = rng.r#gen();
        }
        let reply = z.handle(&mutated).await;
        if let Reply::Respond { message, udp_limit } = reply {
            assert!(crate::dns::server::encode(&message, usize::from(udp_limit)).is_some());
        }
    }
    // A compression pointer to itself.
    let mut looped = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert!(matches!(z.handle(&looped).await, Reply::Respond { .. }));
}
