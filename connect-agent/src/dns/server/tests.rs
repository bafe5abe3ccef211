//! Tests of the server over real loopback sockets: both transports, truncation,
//! garbage, forwarding, limits, bind conflicts and shutdown.

use std::{
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use hickory_proto::{
    op::{Edns, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use tokio::{sync::oneshot, task::JoinHandle};

use super::*;
use crate::{dns::fake::FakeCatalog, identity::Datacenter, store::memory::MemStore, vip};

const WAIT: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("serve returns promptly after shutdown")
            .expect("serve task");
    }
}

fn catalog() -> FakeCatalog {
    let c = FakeCatalog::new();
    let node = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    c.add_node("n1", node, SocketAddr::new(node, 20000));
    c.add_instance(&"web".parse().expect("name"), "n1", node, 8080, true);
    // Enough instances that an A answer exceeds 512 bytes (16 bytes a record with
    // name compression, 100 records).
    for i in 0..100u8 {
        c.add_instance(
            &"big".parse().expect("name"),
            "n1",
            IpAddr::V4(Ipv4Addr::new(198, 19, 0, i)),
            80,
            true,
        );
    }
    c
}

async fn start(recursor: Option<SocketAddr>) -> Running {
    let listeners = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("bind");
    let addr = listeners.local_addr();
    let vips = vip::Allocator::start(Arc::new(MemStore::new()))
        .await
        .expect("allocator");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listeners,
        Arc::new(catalog()),
        vips,
        Settings {
            datacenter: Datacenter::default(),
            recursor,
        },
        async move {
            let _ = rx.await;
        },
    ));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

fn query(qname: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(qname).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        q.set_edns(e);
    }
    q
}

async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    socket.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp_ask(server: SocketAddr, q: &Message) -> (Message, usize) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    socket
        .send_to(&q.to_vec().expect("encode"), server)
        .await
        .expect("send");
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("an answer over UDP")
        .expect("recv");
    let m = Message::from_vec(&buf[..n]).expect("decode");
    assert_eq!(m.id, q.id);
    (m, n)
}

async fn tcp_send(stream: &mut TcpStream, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("fits");
    stream.write_all(&len.to_be_bytes()).await.expect("write");
    stream.write_all(bytes).await.expect("write");
}

async fn tcp_recv(stream: &mut TcpStream) -> Message {
    let mut prefix = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut prefix))
        .await
        .expect("an answer over TCP")
        .expect("read");
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut buf).await.expect("read");
    Message::from_vec(&buf).expect("decode")
}

async fn tcp_ask(server: SocketAddr, q: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.expect("connect");
    tcp_send(&mut stream, &q.to_vec().expect("encode")).await;
    let m = tcp_recv(&mut stream).await;
    assert_eq!(m.id, q.id);
    m
}

fn a_count(m: &Message) -> usize {
    m.answers
        .iter()
        .filter(|r| matches!(r.data, RData::A(_)))
        .count()
}

#[tokio::test]
async fn answers_over_udp_and_tcp_on_one_port() {
    let s = start(None).await;
    let q = query("web.service.consul.", RecordType::A, None);
    let (udp, _) = udp_ask(s.addr, &q).await;
    let tcp = tcp_ask(s.addr, &q).await;
    for m in [&udp, &tcp] {
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert_eq!(a_count(m), 1);
    }
    // Several queries on one TCP connection, answered in order.
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    for qname in ["web.service.consul.", "nope.service.consul."] {
        let q = query(qname, RecordType::A, None);
        tcp_send(&mut stream, &q.to_vec().expect("encode")).await;
        assert_eq!(tcp_recv(&mut stream).await.id, q.id);
    }
    s.stop().await;
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_fit_over_tcp() {
    let s = start(None).await;
    let plain = query("big.service.consul.", RecordType::A, None);
    let (m, n) = udp_ask(s.addr, &plain).await;
    assert!(m.truncation, "TC set when the answer exceeds 512 bytes");
    assert!(n <= 512);
    assert_eq!(a_count(&m), 0);
    assert_eq!(a_count(&tcp_ask(s.addr, &plain).await), 100);

    let edns = query("big.service.consul.", RecordType::A, Some(4096));
    let (m, n) = udp_ask(s.addr, &edns).await;
    assert!(
        !m.truncation,
        "an EDNS client with 4096 bytes gets it whole"
    );
    assert!(n > 512);
    assert_eq!(a_count(&m), 100);
    s.stop().await;
}

#[tokio::test]
async fn garbage_gets_formerr_or_silence_and_the_server_keeps_answering() {
    let s = start(None).await;
    assert_eq!(
        udp_raw(s.addr, &[0xde, 0xad]).await,
        None,
        "no header, no answer"
    );
    let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0x3f; 40]);
    let reply = udp_raw(s.addr, &junk).await.expect("FORMERR over UDP");
    let m = Message::from_vec(&reply).expect("decode");
    assert_eq!((m.id, m.response_code), (0xabcd, ResponseCode::FormErr));
    // A response is never answered (no loops between servers).
    let mut response = Message::response(5, OpCode::Query);
    response.metadata.message_type = MessageType::Response;
    assert_eq!(
        udp_raw(s.addr, &response.to_vec().expect("encode")).await,
        None
    );

    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    tcp_send(&mut stream, &junk).await;
    assert_eq!(
        tcp_recv(&mut stream).await.response_code,
        ResponseCode::FormErr
    );
    // A length prefix promising more than is sent, then hang-up.
    stream
        .write_all(&[0x01, 0x00, 1, 2, 3])
        .await
        .expect("write");
    drop(stream);

    let q = query("web.service.consul.", RecordType::A, None);
    assert_eq!(a_count(&udp_ask(s.addr, &q).await.0), 1);
    assert_eq!(a_count(&tcp_ask(s.addr, &q).await), 1);
    s.stop().await;
}

/// A stand-in recursor on loopback: answers every query with `A 127.0.0.9`, over
/// UDP and TCP on one port.
async fn fake_recursor() -> (SocketAddr, JoinHandle<()>) {
    let listeners = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("bind recursor");
    let addr = listeners.local_addr();
    let Listeners { udp, tcp, .. } = listeners;
    let answer = |bytes: &[u8]| -> Vec<u8> {
        let q = Message::from_vec(bytes).expect("query");
        let mut m = Message::response(q.id, OpCode::Query);
        m.metadata.recursion_available = true;
        m.queries = q.queries.clone();
        let qname = q.queries[0].name().clone();
        m.add_answer(Record::from_rdata(
            qname,
            60,
            RData::A(A(Ipv4Addr::new(127, 0, 0, 9))),
        ));
        m.to_vec().expect("encode")
    };
    let task = tokio::spawn(async move {
        let udp_side = async {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.expect("recv");
                udp.send_to(&answer(&buf[..n]), peer).await.expect("send");
            }
        };
        let tcp_side = async {
            loop {
                let (mut stream, _) = tcp.accept().await.expect("accept");
                let mut prefix = [0u8; 2];
                stream.read_exact(&mut prefix).await.expect("read");
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
                stream.read_exact(&mut buf).await.expect("read");
                let reply = answer(&buf);
                tcp_send(&mut stream, &reply).await;
            }
        };
        tokio::join!(udp_side, tcp_side);
    });
    (addr, task)
}

#[tokio::test]
async fn other_zones_are_forwarded_over_the_clients_transport() {
    let (recursor, recursor_task) = fake_recursor().await;
    let s = start(Some(recursor)).await;
    let q = query("example.com.", RecordType::A, None);
    let (udp, _) = udp_ask(s.addr, &q).await;
    let tcp = tcp_ask(s.addr, &q).await;
    for m in [&udp, &tcp] {
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert!(matches!(
            m.answers.as_slice(),
            [r] if r.data == RData::A(A(Ipv4Addr::new(127, 0, 0, 9)))
        ));
    }
    // Our zone is still ours.
    let (m, _) = udp_ask(s.addr, &query("web.service.consul.", RecordType::A, None)).await;
    assert!(m.authoritative && m.recursion_available);
    recursor_task.abort();
    s.stop().await;
}

#[tokio::test]
async fn a_dead_recursor_gives_servfail_and_none_gives_refused() {
    // A port nobody listens on: the relay fails fast (ICMP port unreachable).
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    };
    let s = start(Some(dead)).await;
    let q = query("example.com.", RecordType::A, None);
    let (m, _) = udp_ask(s.addr, &q).await;
    assert_eq!(m.response_code, ResponseCode::ServFail);
    assert_eq!(
        tcp_ask(s.addr, &q).await.response_code,
        ResponseCode::ServFail
    );
    s.stop().await;

    let s = start(None).await;
    let (m, _) = udp_ask(s.addr, &q).await;
    assert_eq!(m.response_code, ResponseCode::Refused);
    s.stop().await;
}

#[tokio::test]
async fn tcp_connections_are_limited() {
    let s = start(None).await;
    let mut held = Vec::new();
    for _ in 0..MAX_TCP_CONNECTIONS {
        held.push(TcpStream::connect(s.addr).await.expect("connect"));
    }
    // Make sure the server has accepted them all: each answers a query.
    let q = query("web.service.consul.", RecordType::A, None);
    for stream in &mut held {
        tcp_send(stream, &q.to_vec().expect("encode")).await;
        tcp_recv(stream).await;
    }
    let mut extra = TcpStream::connect(s.addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, extra.read(&mut byte))
        .await
        .expect("the extra connection is closed, not left hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "got {read:?}");
    // Closing one frees a slot.
    drop(held.pop());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        tcp_send(&mut stream, &q.to_vec().expect("encode")).await;
        let mut prefix = [0u8; 2];
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read_exact(&mut prefix)).await
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no slot was freed");
    }
    drop(held);
    s.stop().await;
}

#[tokio::test]
async fn a_taken_port_fails_loudly() {
    let first = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("bind");
    match bind(first.local_addr()).await {
        Err(Error::Bind { addr, .. }) => assert_eq!(addr, first.local_addr()),
        other => panic!("expected a bind error, got {other:?}"),
    }
    // Only TCP taken: still an error, naming TCP.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    match bind(tcp.local_addr().expect("addr")).await {
        Err(Error::Bind {
            transport: Transport::Tcp,
            ..
        })
        | Err(Error::Bind {
            transport: Transport::Udp,
            ..
        }) => {}
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[tokio::test]
async fn from_std_requires_one_address() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    if udp.local_addr().ok() != tcp.local_addr().ok() {
        assert!(matches!(
            Listeners::from_std(udp, tcp),
            Err(Error::AddressMismatch { .. })
        ));
    }
    let listeners = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("bind");
    assert_ne!(listeners.local_addr().port(), 0);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_promptly() {
    let s = start(None).await;
    let mut idle = TcpStream::connect(s.addr).await.expect("connect");
    let q = query("web.service.consul.", RecordType::A, None);
    tcp_send(&mut idle, &q.to_vec().expect("encode")).await;
    tcp_recv(&mut idle).await;
    let started = std::time::Instant::now();
    s.stop().await;
    assert!(
        started.elapsed() < TCP_IDLE_TIMEOUT,
        "an idle connection held shutdown for {:?}",
        started.elapsed()
    );
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, idle.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "got {read:?}");
}
