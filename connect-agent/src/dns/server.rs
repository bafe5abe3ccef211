//! The DNS server's sockets: one UDP socket and one TCP listener on the same
//! address, each served by a bounded loop.
//!
//! Bounds, and why: at most [`MAX_UDP_IN_FLIGHT`] datagrams are being answered at
//! once (more are dropped, which UDP clients retry, rather than queued without
//! limit); at most [`MAX_TCP_CONNECTIONS`] TCP connections (more are closed at
//! accept); a TCP connection is closed after [`TCP_IDLE_TIMEOUT`] without a query or
//! if a message or its response stalls for [`TCP_IO_TIMEOUT`]; messages are at most
//! 64 KiB by the protocol's length prefix, and UDP requests are read into a
//! [`MAX_UDP_REQUEST`] buffer (queries are a few hundred bytes).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::op::{Message, ResponseCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    DnsCatalog, Error, Settings, Transport, forward,
    zone::{Reply, Zone},
};
use crate::vip::Allocator;

/// Datagrams answered concurrently; the rest are dropped.
pub const MAX_UDP_IN_FLIGHT: usize = 512;
/// Open TCP connections; further ones are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 128;
/// Largest UDP request read; longer datagrams are cut and answered FORMERR.
pub const MAX_UDP_REQUEST: usize = 4096;
/// How long a TCP connection may sit without a query (RFC 7766 §6.2.3 asks for
/// seconds, not minutes).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading one TCP message, or writing its response, may take.
pub const TCP_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest TCP response: the two-byte length prefix's limit.
const MAX_TCP_RESPONSE: usize = u16::MAX as usize;
/// How long in-flight queries may finish after shutdown before they are cancelled.
const DRAIN_DEADLINE: Duration = Duration::from_secs(3);
/// Pause after a failed `recv`/`accept` (EMFILE, ENOBUFS) so the loop does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Attempts at finding a port free for both UDP and TCP when binding port 0.
const PORT_ZERO_ATTEMPTS: usize = 16;

/// The server's bound sockets. Binding is separate from serving so that a port
/// conflict fails the agent at startup, before it claims to be up.
#[derive(Debug)]
pub struct Listeners {
    udp: UdpSocket,
    tcp: TcpListener,
    addr: SocketAddr,
}

impl Listeners {
    /// The address both sockets are bound to (with the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wraps sockets bound elsewhere, e.g. inside another network namespace from a
    /// thread that entered it (a socket stays in the namespace it was made in).
    /// Must be called within a Tokio runtime.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener) -> Result<Self, Error> {
        let udp_addr = udp.local_addr().map_err(|source| Error::LocalAddr {
            transport: Transport::Udp,
            source,
        })?;
        let tcp_addr = tcp.local_addr().map_err(|source| Error::LocalAddr {
            transport: Transport::Tcp,
            source,
        })?;
        if udp_addr != tcp_addr {
            return Err(Error::AddressMismatch {
                udp: udp_addr,
                tcp: tcp_addr,
            });
        }
        let socket_error = |transport| {
            move |source| Error::Socket {
                addr: udp_addr,
                transport,
                source,
            }
        };
        udp.set_nonblocking(true)
            .map_err(socket_error(Transport::Udp))?;
        tcp.set_nonblocking(true)
            .map_err(socket_error(Transport::Tcp))?;
        Ok(Self {
            udp: UdpSocket::from_std(udp).map_err(socket_error(Transport::Udp))?,
            tcp: TcpListener::from_std(tcp).map_err(socket_error(Transport::Tcp))?,
            addr: udp_addr,
        })
    }
}

/// Binds UDP and TCP on `addr`. With port 0, both get the same free port.
pub async fn bind(addr: SocketAddr) -> Result<Listeners, Error> {
    let attempts = if addr.port() == 0 {
        PORT_ZERO_ATTEMPTS
    } else {
        1
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr).await.map_err(|source| Error::Bind {
            addr,
            transport: Transport::Udp,
            source,
        })?;
        let bound = udp.local_addr().map_err(|source| Error::LocalAddr {
            transport: Transport::Udp,
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => {
                return Ok(Listeners {
                    udp,
                    tcp,
                    addr: bound,
                });
            }
            // Port 0 gave a UDP port whose TCP twin is taken: try another.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < attempts => continue,
            Err(source) => {
                return Err(Error::Bind {
                    addr: bound,
                    transport: Transport::Tcp,
                    source,
                });
            }
        }
    }
}

/// Serves DNS on `listeners` until `shutdown` resolves, then lets in-flight queries
/// finish (up to a few seconds) and returns. Socket errors (EMFILE, ENOBUFS) are
/// logged and retried, never fatal: DNS keeps answering once they pass.
pub async fn serve(
    listeners: Listeners,
    catalog: Arc<dyn DnsCatalog>,
    vips: Arc<Allocator>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) {
    let Listeners { udp, tcp, addr } = listeners;
    let zone = Arc::new(Zone::new(catalog, vips, settings));
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    tracing::info!(%addr, recursor = ?zone.recursor(), "DNS server listening");
    tokio::select! {
        () = udp_loop(Arc::new(udp), addr, zone.clone(), &tasks, &force) => {}
        () = tcp_loop(tcp, addr, zone.clone(), &tasks, &stop, &force) => {}
        () = shutdown => {}
    }
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::debug!(
            remaining = tasks.len(),
            "cancelling DNS queries still in flight"
        );
        force.cancel();
        tasks.wait().await;
    }
    tracing::info!(%addr, "DNS server stopped");
}

async fn udp_loop(
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    zone: Arc<Zone>,
    tasks: &TaskTracker,
    force: &CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_UDP_REQUEST];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(%addr, %error, "DNS UDP receive failed");
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "DNS UDP queue full, dropping a query");
            continue;
        };
        let request = buf[..len].to_vec();
        let (socket, zone, force) = (socket.clone(), zone.clone(), force.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = answer_udp(&socket, peer, &request, &zone, permit) => {}
                () = force.cancelled() => {}
            }
        });
    }
}

async fn answer_udp(
    socket: &UdpSocket,
    peer: SocketAddr,
    request: &[u8],
    zone: &Zone,
    _permit: OwnedSemaphorePermit,
) {
    let bytes = match zone.handle(request).await {
        Reply::Drop => return,
        Reply::Respond { message, udp_limit } => encode(&message, usize::from(udp_limit)),
        Reply::Forward { failure, udp_limit } => {
            match forward_query(zone, request, Transport::Udp).await {
                Some(bytes) => Some(bytes),
                None => encode(&failure, usize::from(udp_limit)),
            }
        }
    };
    if let Some(bytes) = bytes
        && let Err(error) = socket.send_to(&bytes, peer).await
    {
        tracing::debug!(%peer, %error, "cannot send a DNS response");
    }
}

async fn tcp_loop(
    listener: TcpListener,
    addr: SocketAddr,
    zone: Arc<Zone>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
    force: &CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(%addr, %error, "DNS TCP accept failed");
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many DNS TCP connections, closing one");
            continue;
        };
        let (zone, stop, force) = (zone.clone(), stop.clone(), force.clone());
        tasks.spawn(async move {
            tokio::select! {
                () = connection(stream, peer, &zone, &stop, permit) => {}
                () = force.cancelled() => {}
            }
        });
    }
}

/// Answers queries on one TCP connection in order until the peer closes, goes idle,
/// stalls, or the server stops.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    zone: &Zone,
    stop: &CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    loop {
        let mut prefix = [0u8; 2];
        let read = tokio::select! {
            r = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut prefix)) => r,
            () = stop.cancelled() => return,
        };
        if !matches!(read, Ok(Ok(_))) {
            return;
        }
        let len = usize::from(u16::from_be_bytes(prefix));
        let mut request = vec![0u8; len];
        match tokio::time::timeout(TCP_IO_TIMEOUT, stream.read_exact(&mut request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(%peer, "DNS TCP client stalled or closed mid-message");
                return;
            }
        }
        let bytes = match zone.handle(&request).await {
            // A response or a headerless fragment: nothing sensible follows.
            Reply::Drop => return,
            Reply::Respond { message, .. } => encode(&message, MAX_TCP_RESPONSE),
            Reply::Forward { failure, .. } => {
                match forward_query(zone, &request, Transport::Tcp).await {
                    Some(bytes) => Some(bytes),
                    None => encode(&failure, MAX_TCP_RESPONSE),
                }
            }
        };
        let Some(bytes) = bytes else { return };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        match tokio::time::timeout(TCP_IO_TIMEOUT, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(%peer, "DNS TCP client stopped reading");
                return;
            }
        }
    }
}

/// Relays a query outside `consul.` to the recursor; `None` if it did not answer.
async fn forward_query(zone: &Zone, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let recursor = zone.recursor()?;
    let result = match transport {
        Transport::Udp => forward::udp(recursor, request).await,
        Transport::Tcp => forward::tcp(recursor, request).await,
    };
    match result {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            tracing::debug!(%error, "DNS recursor failed, answering SERVFAIL");
            None
        }
    }
}

/// Encodes `message` into at most `limit` bytes: whole, or else truncated (header,
/// question, TC bit) so the client retries over TCP; SERVFAIL if it cannot encode.
pub(super) fn encode(message: &Message, limit: usize) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) if bytes.len() <= limit => return Some(bytes),
        Ok(_) => {
            if let Ok(bytes) = message.truncate().to_vec()
                && bytes.len() <= limit
            {
                return Some(bytes);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot encode a DNS response"),
    }
    Message::error_msg(message.id, message.op_code, ResponseCode::ServFail)
        .to_vec()
        .ok()
}

#[cfg(test)]
mod tests;
