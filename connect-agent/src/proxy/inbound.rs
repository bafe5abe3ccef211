//! The inbound side: mTLS from peer proxies to this node's services.
//!
//! Per connection: read the ClientHello (within the handshake timeout), take the
//! destination service from the SNI `<service>.svc.<trust-domain>`, refuse names
//! that are not local services, finish the handshake with that service's leaf and a
//! required, verified client certificate, read the client's SPIFFE ID, register the
//! connection, authorize it, and only with a [`Permit`] connect to the plaintext
//! port of one of the service's local instances (round robin, skipping one that
//! just refused) and splice. A denied connection is reset ([`reset`]) without
//! reading a byte of application data.
//!
//! A client that offers streams' ALPN ([`super::streams`]) gets a connection that
//! carries one application connection after another; each goes through the same
//! checks (the client's certificate against the bundle of now, registration,
//! authorization) when it opens.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rustls::{
    pki_types::UnixTime,
    server::{Acceptor, ServerConnection},
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    time::{Instant, timeout, timeout_at},
};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, field};

use super::{
    ConnError, LocalService, Outcome, Permit, Shared, Side, accept_loop,
    connection::{Connection, denied},
    readahead::ReadAhead,
    splice,
    streams::{self, Framed, Idles},
};
use crate::{
    ca::{PeerRole, TrustBundle},
    identity::{ServiceName, SpiffeId, TrustDomain},
};

/// Distinct instances of a local service tried per connection.
pub const MAX_LOCAL_ATTEMPTS: usize = 3;

/// Idle inbound connections (waiting for their next stream) a proxy keeps at
/// most; they hold no slot of the connection limit, so this bounds them instead.
pub const MAX_IDLE_INBOUND: usize = 1024;

/// How long the inbound side waits for the next stream on an idle connection.
/// Longer than any client's [`PoolLimits::idle_timeout`](super::PoolLimits) so
/// that a client never takes a connection the server is closing.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The inbound side closes a connection older than this after its stream: twice
/// the client's [`pool::MAX_AGE`], for the same reason.
pub const SERVER_MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// Ends a node-to-node connection that refused its application connection with a
/// TCP reset (SO_LINGER 0, then the caller drops it), not close_notify: to the
/// client, close_notify is a server that finished sending, and a client proxy on
/// a dedicated connection would half-close its application and wait for it; a
/// reset is a failure on any TLS client (ours resets its application in turn, see
/// `outbound::refuse`), and a denied connection leaves no FIN_WAIT or TIME_WAIT
/// state behind on this node, however many an attacker opens.
fn reset(tcp: &TcpStream) {
    if let Err(error) = tcp.set_zero_linger() {
        tracing::debug!(%error, "cannot set SO_LINGER 0 on a refused connection");
    }
}

/// How long, and how many bytes, a failed handshake's socket is drained before it
/// closes (see [`linger_close`]).
const LINGER: (Duration, usize) = (Duration::from_millis(500), 64 * 1024);

/// Closes a socket whose handshake failed so that the peer reads our alert: rustls
/// has written it, but a TLS 1.3 client may already have sent application data, and
/// closing with unread data makes the kernel send a reset that can destroy the alert
/// in the peer's receive queue. So: send FIN, read and discard what the peer sent
/// (bounded in time and bytes), then close.
async fn linger_close(mut tcp: TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = LINGER.1;
    let _ = timeout(LINGER.0, async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let stop = shared.shutdown.stop.clone();
    accept_loop(
        shared,
        listener,
        stop,
        "inbound",
        |shared, tcp, peer| async move { handle(shared, tcp, peer).await },
    )
    .await;
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let span = |id| {
        tracing::info_span!(
            "inbound",
            conn = id,
            peer = %peer,
            src = field::Empty,
            dst = field::Empty
        )
    };
    let Some(conn) = Connection::open_handshake(&shared, Side::Inbound, peer.ip(), span) else {
        // Refused before a byte is read: a reset, so no TIME_WAIT stays behind.
        reset(&tcp);
        return;
    };
    let _ = tcp.set_nodelay(true);
    let shaken = tokio::select! {
        r = handshake(&shared, tcp).instrument(conn.span.clone()) => r,
        () = shared.shutdown.force.cancelled() => return conn.finish(None),
    };
    match shaken {
        Ok(shaken) => {
            if let Some(conn) = conn.handshaken() {
                carry(&shared, shaken, conn).await;
            }
        }
        Err(e) => conn.finish(Some(Err(e))),
    }
}

/// A connection whose handshake finished: the local service it is for, and how
/// it carries application connections.
struct Handshaken {
    carrier: Carrier,
    local: LocalService,
    /// The client, verified by the handshake (for its first application connection).
    client: SpiffeId,
}

type ServerTls = tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>;

/// How a TLS connection carries application connections: one for the life of the
/// connection, or one after another ([`streams`], negotiated by ALPN).
enum Carrier {
    Dedicated(ServerTls),
    Streams(Framed<ServerTls>),
}

/// Why a connection carries no further application connection.
enum Ended {
    /// The connection went (the client closed it, it idled, shutdown); the
    /// handshake's record, if unused, closes with this.
    Closed(Outcome),
    /// Nothing to record: a dedicated connection after its one, or too many idle
    /// connections.
    Done,
}

impl Carrier {
    /// Waits for the next application connection: at once for a dedicated
    /// connection's one, the next `OPEN` on a streams connection. Between streams
    /// the connection counts against [`MAX_IDLE_INBOUND`] and holds its TLS
    /// state only; it closes after [`SERVER_IDLE_TIMEOUT`] without a stream,
    /// and when shutdown begins.
    async fn next(
        &mut self,
        shared: &Shared,
        first: bool,
        span: &tracing::Span,
    ) -> Result<(), Ended> {
        let framed = match self {
            Carrier::Dedicated(_) if first => return Ok(()),
            Carrier::Dedicated(_) => return Err(Ended::Done),
            Carrier::Streams(framed) => framed,
        };
        let idle = if first {
            None
        } else {
            let Some(idle) = IdleInbound::enter(&shared.idle_inbound) else {
                tracing::debug!(parent: span, "too many idle node-to-node connections; closing this one");
                return Err(Ended::Done);
            };
            framed.release_buffers();
            Some(idle)
        };
        let opened = tokio::select! {
            biased;
            () = shared.shutdown.stop.cancelled() => None,
            r = timeout(SERVER_IDLE_TIMEOUT, framed.read_open()) => Some(r),
        };
        drop(idle);
        let (why, outcome) = match opened {
            Some(Ok(Ok(true))) => return Ok(()),
            Some(Ok(Ok(false))) => ("closed by the client", Outcome::Closed),
            Some(Ok(Err(error))) => {
                tracing::debug!(parent: span, %error, "node-to-node connection failed between streams");
                ("failed", Outcome::Reset)
            }
            Some(Err(_)) => ("idle", Outcome::Closed),
            None => ("shutdown", Outcome::Closed),
        };
        tracing::debug!(parent: span, why, "node-to-node connection closed between streams");
        Err(Ended::Closed(outcome))
    }

    /// Carries one application connection between `local` (the local service's
    /// connection) and the peer until it ends.
    async fn splice(
        &mut self,
        local: TcpStream,
        limits: splice::Limits,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> splice::Spliced {
        match self {
            Carrier::Dedicated(tls) => splice::splice(local, tls, limits, cancel).await,
            Carrier::Streams(framed) => {
                streams::splice_stream(local, framed, false, limits, cancel).await
            }
        }
    }

    fn tls(&self) -> &ServerTls {
        match self {
            Carrier::Dedicated(tls) => tls,
            Carrier::Streams(framed) => framed.get_ref(),
        }
    }

    /// Whether another application connection may follow one that ended with
    /// `end`: on a streams connection after a clean end, while the connection is
    /// younger than [`SERVER_MAX_AGE`].
    fn again(&self, end: splice::End, born: Instant) -> bool {
        matches!(self, Carrier::Streams(_))
            && end == splice::End::Closed
            && born.elapsed() < SERVER_MAX_AGE
    }
}

/// The application connections of one TLS connection, one after another: the
/// client's certificate is checked against the bundle of now (the first
/// connection's was, by the handshake), the connection is registered and
/// authorized, and the local service connected and spliced, the
/// same way for the one connection of a dedicated TLS connection and for each
/// stream of a reused one. Each takes a slot of the connection limit for as long
/// as it lives (the first, the handshake's); between streams the TLS connection
/// holds none, so that idle connections do not crowd out live ones. A stream
/// that does not end cleanly, or is denied, closes the TLS connection.
async fn carry(shared: &Shared, shaken: Handshaken, first: Connection<'_>) {
    let Handshaken {
        mut carrier,
        local,
        client,
    } = shaken;
    let tls_span = first.span.clone();
    let born = Instant::now();
    let limits = shared.limits.splice();
    let mut first = Some(first);
    loop {
        if let Err(ended) = carrier.next(shared, first.is_some(), &tls_span).await {
            if let (Some(unused), Ended::Closed(outcome)) = (first.take(), ended) {
                unused.finish_unused(outcome);
            }
            return;
        }
        let reused = first.is_none();
        if matches!(carrier, Carrier::Streams(_)) {
            shared.metrics.count_stream(Side::Inbound, reused);
        }
        // The first application connection is the handshake's, whose verification
        // of the client still holds; later ones check it against the bundle of now.
        let (conn, verified) = match first.take() {
            Some(conn) => (conn, Some(client.clone())),
            None => {
                let span = |id| {
                    tracing::info_span!(
                        parent: &tls_span,
                        "stream",
                        conn = id,
                        src = field::Empty,
                        dst = %local.name
                    )
                };
                match Connection::open(shared, Side::Inbound, span) {
                    Some(conn) => (conn, None),
                    None => return,
                }
            }
        };
        let id = conn.id;
        let run = async {
            let client = match verified {
                Some(client) => client,
                // Expired, or its root removed, since the handshake?
                None => {
                    let client = peer_identity(carrier.tls().get_ref().1, &shared.tls.bundle())?;
                    tracing::Span::current().record("src", field::display(&client.service));
                    client
                }
            };
            let (backend, guard) = admit(shared, id, &client, &local).await?;
            Ok(carrier.splice(backend, limits, guard.cancelled()).await)
        }
        .instrument(conn.span.clone());
        let ran = tokio::select! {
            r = run => Some(r),
            () = shared.shutdown.force.cancelled() => None,
        };
        if denied(&ran) {
            reset(carrier.tls().get_ref().0.get_ref());
        }
        let again = matches!(&ran, Some(Ok(out)) if carrier.again(out.end, born));
        conn.finish(ran);
        if !again {
            return;
        }
    }
}

/// An inbound node-to-node connection waiting for its next stream, counted in
/// `Shared::idle_inbound` while it lives.
struct IdleInbound<'a>(&'a AtomicUsize);

impl<'a> IdleInbound<'a> {
    fn enter(count: &'a AtomicUsize) -> Option<Self> {
        count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_IDLE_INBOUND).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count))
    }
}

impl Drop for IdleInbound<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Checks the TLS handshake of a new connection: the SNI must name a local
/// service, the client must present a certificate of our trust bundle.
async fn handshake(shared: &Shared, tcp: TcpStream) -> Result<Handshaken, ConnError> {
    let after = shared.limits.handshake_timeout;
    let deadline = Instant::now() + after;
    let start = timeout_at(
        deadline,
        LazyConfigAcceptor::new(Acceptor::default(), ReadAhead::new(tcp)),
    )
    .await
    .map_err(|_| ConnError::HandshakeTimeout { after })?
    .map_err(|source| ConnError::Handshake { source })?;
    let bundle = shared.tls.bundle();
    let hello = start.client_hello();
    let wanted = service_of_sni(hello.server_name(), bundle.trust_domain())?;
    let offers_streams = hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == streams::ALPN));
    let local = shared
        .directory
        .local_service(&wanted)
        .ok_or(ConnError::NotLocal { service: wanted })?;
    tracing::Span::current().record("dst", field::display(&local.name));
    let config = shared
        .tls
        .server(&local.name, offers_streams)
        .await
        .map_err(|source| ConnError::Leaf {
            service: local.name.clone(),
            source,
        })?;
    let tls = match timeout_at(deadline, start.into_stream(config).into_fallible()).await {
        Err(_) => return Err(ConnError::HandshakeTimeout { after }),
        Ok(Ok(tls)) => tls,
        Ok(Err((source, tcp))) => {
            linger_close(tcp.into_parts().0).await;
            return Err(ConnError::Handshake { source });
        }
    };
    let conn = tls.get_ref().1;
    shared
        .metrics
        .count_handshake(Side::Inbound, conn.handshake_kind());
    // A client the bundle does not accept fails here, before it can idle.
    let client = peer_identity(conn, &bundle)?;
    tracing::Span::current().record("src", field::display(&client.service));
    let carrier = if conn.alpn_protocol() == Some(streams::ALPN) {
        Carrier::Streams(Framed::new(tls))
    } else {
        Carrier::Dedicated(tls)
    };
    Ok(Handshaken {
        carrier,
        local,
        client,
    })
}

/// Registers and authorizes one application connection from `client` to `local`
/// and, if allowed, connects the local service. Nothing has been read past the
/// handshake (or the stream's `OPEN`); the caller resets a denied connection
/// ([`reset`]) without reading any.
async fn admit(
    shared: &Shared,
    id: super::conns::ConnId,
    client: &SpiffeId,
    local: &LocalService,
) -> Result<(TcpStream, super::conns::Guard), ConnError> {
    // Registered before the decision, so that an intention change between the
    // decision and the splice is re-checked against this connection too.
    let guard = shared.registry.register(
        id,
        client.service.clone(),
        local.name.clone(),
        &shared.shutdown.force,
    );
    let verdict = shared
        .authorizer
        .authorize(&client.service, &local.name)
        .await?;
    let permit = Permit::from_verdict(&client.service, &local.name, &verdict);
    shared.metrics.count_decision(permit.is_some());
    let Some(permit) = permit else {
        tracing::info!(src = %client, dst = %local.name, reason = %verdict.reason, "connection denied");
        return Err(ConnError::Denied {
            src: client.service.clone(),
            dst: local.name.clone(),
            reason: verdict.reason,
        });
    };
    tracing::debug!(src = %client, dst = %local.name, reason = %verdict.reason, "connection allowed");
    let backend = connect_local(shared, &permit, &local.addrs).await?;
    Ok((backend, guard))
}

/// The SPIFFE ID of the client. A full handshake verified the chain already (and
/// the bundle remembers it, so this is a lookup); a resumed session carries the
/// certificate of the session it resumes, which is verified again against the
/// bundle of now (it may have expired, or its root may have left the bundle,
/// since).
fn peer_identity(conn: &ServerConnection, bundle: &TrustBundle) -> Result<SpiffeId, ConnError> {
    let certs =
        conn.peer_certificates()
            .filter(|c| !c.is_empty())
            .ok_or(ConnError::PeerIdentity {
                source: crate::ca::VerifyError::EmptyChain,
            })?;
    bundle
        .verify(certs, UnixTime::now(), PeerRole::Client)
        .map_err(|source| ConnError::PeerIdentity { source })
}

/// Opens a plaintext port of the local service. Takes a [`Permit`]: only authorized
/// connections get here.
///
/// The service's instances are taken round robin, recently failed ones last
/// ([`super::balance`]); one that refuses or does not accept in time is skipped and
/// the next tried, up to [`MAX_LOCAL_ATTEMPTS`] distinct ones. Nothing has been
/// read from the peer yet, so a retry loses nothing.
async fn connect_local(
    shared: &Shared,
    permit: &Permit,
    addrs: &[SocketAddr],
) -> Result<TcpStream, ConnError> {
    let service = permit.destination();
    let after = shared.limits.local_connect_timeout;
    let plan = shared.inbound_lb.plan(service, addrs);
    let mut attempts = 0;
    let mut last = None;
    for addr in plan.into_iter().take(MAX_LOCAL_ATTEMPTS) {
        attempts += 1;
        let error = match timeout(after, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                shared.inbound_lb.succeeded(addr);
                let _ = tcp.set_nodelay(true);
                if attempts > 1 {
                    tracing::debug!(backend = %addr, attempts, "connected to the local service after retrying");
                }
                return Ok(tcp);
            }
            Ok(Err(source)) => ConnError::LocalConnect {
                service: service.clone(),
                addr,
                attempts,
                source,
            },
            Err(_) => ConnError::LocalConnectTimeout {
                service: service.clone(),
                addr,
                attempts,
                after,
            },
        };
        shared.inbound_lb.failed(addr);
        tracing::debug!(backend = %addr, error = %error, "local service instance unreachable");
        last = Some(error);
    }
    Err(last.unwrap_or_else(|| ConnError::NotLocal {
        service: service.clone(),
    }))
}

/// The destination service an SNI names: `<service>.svc.<trust-domain>`, any case.
fn service_of_sni(sni: Option<&str>, trust_domain: &TrustDomain) -> Result<ServiceName, ConnError> {
    let name = sni.ok_or(ConnError::NoSni)?;
    let bad = || ConnError::BadSni {
        name: name.chars().take(256).collect(),
    };
    crate::identity::service_of_dns_name(name, trust_domain).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_a_service_of_our_trust_domain() {
        let td: TrustDomain = "11111111-2222-3333-4444-555555555555.consul"
            .parse()
            .expect("td");
        let ok = |sni: &str, want: &str| {
            let got = service_of_sni(Some(sni), &td).expect(sni);
            let want: ServiceName = want.parse().expect("name");
            assert_eq!(got, want, "{sni}");
        };
        ok(
            "socat.svc.11111111-2222-3333-4444-555555555555.consul",
            "socat",
        );
        ok(
            "Web-2.SVC.11111111-2222-3333-4444-555555555555.CONSUL",
            "web-2",
        );
        for bad in [
            "socat",
            "socat.svc.other.consul",
            ".svc.11111111-2222-3333-4444-555555555555.consul",
            "a.b.svc.11111111-2222-3333-4444-555555555555.consul",
            "socat.svc11111111-2222-3333-4444-555555555555.consul",
            "socat.svc.x11111111-2222-3333-4444-555555555555.consul",
        ] {
            assert!(
                matches!(
                    service_of_sni(Some(bad), &td),
                    Err(ConnError::BadSni { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(service_of_sni(None, &td), Err(ConnError::NoSni)));
    }
}
