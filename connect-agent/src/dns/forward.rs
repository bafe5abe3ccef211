//! Relaying queries outside `consul.` to `--dns-recursor`, byte for byte, over the
//! transport the client used: the recursor sees the client's own EDNS size and flags,
//! and a truncated UDP answer sends the client to TCP, where we relay over TCP.
//!
//! Each UDP relay uses a fresh socket connected to the recursor (the kernel picks a
//! random source port and drops datagrams from anyone else), and an answer must carry
//! the query's id. No caching: the recursor caches.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// How long the recursor has to answer over UDP; stub resolvers retry after ~5 s.
pub(super) const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP relay (connect, send, receive) may take.
pub(super) const TCP_TIMEOUT: Duration = Duration::from_secs(4);
/// Largest answer accepted from the recursor over UDP (the datagram maximum).
const MAX_UDP_ANSWER: usize = 65_535;
/// A DNS header is 12 bytes: id, flags, four counts.
const HEADER_LEN: usize = 12;

/// Why a relay failed. The recursor (or the path to it) is at fault; the client
/// gets SERVFAIL.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error("DNS recursor {recursor}: {op} failed: {source}")]
    Io {
        recursor: SocketAddr,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS recursor {recursor} did not answer within {timeout:?}")]
    Timeout {
        recursor: SocketAddr,
        timeout: Duration,
    },
    #[error("the query is too short to relay ({len} bytes)")]
    ShortQuery { len: usize },
    #[error("the query is too long to relay over TCP ({len} bytes)")]
    LongQuery { len: usize },
    #[error("DNS recursor {recursor} sent a message that is not an answer to the query")]
    NotAnAnswer { recursor: SocketAddr },
}

/// Relays `query` over UDP and returns the recursor's answer.
pub(super) async fn udp(recursor: SocketAddr, query: &[u8]) -> Result<Vec<u8>, Error> {
    let id = query_id(query)?;
    let io = |op| {
        move |source| Error::Io {
            recursor,
            op,
            source,
        }
    };
    let local = match recursor.ip() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).await.map_err(io("bind"))?;
    socket.connect(recursor).await.map_err(io("connect"))?;
    socket.send(query).await.map_err(io("send"))?;
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    let receive = async {
        loop {
            let len = socket.recv(&mut buf).await.map_err(io("receive"))?;
            // Anything else (a stale answer, noise) is skipped until the deadline.
            if is_answer_to(&buf[..len], id) {
                return Ok(buf[..len].to_vec());
            }
        }
    };
    tokio::time::timeout(UDP_TIMEOUT, receive)
        .await
        .map_err(|_| Error::Timeout {
            recursor,
            timeout: UDP_TIMEOUT,
        })?
}

/// Relays `query` over TCP (one connection per query) and returns the answer.
pub(super) async fn tcp(recursor: SocketAddr, query: &[u8]) -> Result<Vec<u8>, Error> {
    let id = query_id(query)?;
    let len = u16::try_from(query.len()).map_err(|_| Error::LongQuery { len: query.len() })?;
    let io = |op| {
        move |source| Error::Io {
            recursor,
            op,
            source,
        }
    };
    let exchange = async {
        let mut stream = TcpStream::connect(recursor).await.map_err(io("connect"))?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.map_err(io("send"))?;
        let mut prefix = [0u8; 2];
        stream
            .read_exact(&mut prefix)
            .await
            .map_err(io("receive"))?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(io("receive"))?;
        if !is_answer_to(&answer, id) {
            return Err(Error::NotAnAnswer { recursor });
        }
        Ok(answer)
    };
    tokio::time::timeout(TCP_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout {
            recursor,
            timeout: TCP_TIMEOUT,
        })?
}

fn query_id(query: &[u8]) -> Result<u16, Error> {
    if query.len() < HEADER_LEN {
        return Err(Error::ShortQuery { len: query.len() });
    }
    Ok(u16::from_be_bytes([query[0], query[1]]))
}

/// Whether `msg` has a header, the response bit and the query's id.
fn is_answer_to(msg: &[u8], id: u16) -> bool {
    const QR_BIT: u8 = 0x80;
    msg.len() >= HEADER_LEN && u16::from_be_bytes([msg[0], msg[1]]) == id && msg[2] & QR_BIT != 0
}
