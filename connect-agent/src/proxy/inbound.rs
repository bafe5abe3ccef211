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
    sync::OwnedSemaphorePermit,
    time::{Instant, timeout, timeout_at},
};
use tokio_rustls::LazyConfigAcceptor;
use tracing::{Instrument, field};

use super::{
    ConnError, LocalService, Outcome, Permit, Shared, Side, accept_loop,
    metrics::ConnRecord,
    pool,
    readahead::ReadAhead,
    splice, splice_outcome,
    streams::{self, Framed},
};
use crate::{
    ca::{PeerRole, TrustBundle},
    identity::{ServiceName, SpiffeId, TrustDomain},
};

/// Distinct instances of a local service tried per connection.
pub const MAX_LOCAL_ATTEMPTS: usize = 3;

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

/// Whether `result` is a refusal that [`reset`] must end.
fn denied(result: &Option<Result<splice::Outcome, ConnError>>) -> bool {
    matches!(result, Some(Err(ConnError::Denied { .. })))
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
    let id = shared.registry.next_id();
    let span = tracing::info_span!(
        "inbound",
        conn = id,
        peer = %peer,
        src = field::Empty,
        dst = field::Empty
    );
    let mut rec = ConnRecord::open(&shared.metrics, Side::Inbound, span.clone());
    let slot = match shared.registry.reserve() {
        Ok(slot) => slot,
        Err(full) => {
            shared.limit_log.refused(full.max);
            rec.finish(Outcome::LimitReached);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let shaken = tokio::select! {
        r = handshake(&shared, tcp).instrument(span.clone()) => r,
        () = shared.shutdown.force.cancelled() => {
            rec.finish(Outcome::Shutdown);
            return;
        }
    };
    let shaken = match shaken {
        Ok(shaken) => shaken,
        Err(e) => {
            record(&shared, &mut rec, Some(Err(e)));
            return;
        }
    };
    let first = Stream { id, rec, span };
    if shaken.streams {
        serve_streams(&shared, shaken, slot, first).await;
    } else {
        dedicated(&shared, shaken, slot, first).await;
    }
}

/// A connection whose handshake finished: the local service it is for and the
/// client's identity.
struct Handshaken {
    tls: ServerTls,
    local: LocalService,
    client: SpiffeId,
    /// Negotiated to carry streams ([`streams`]).
    streams: bool,
}

type ServerTls = tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>;

/// One application connection: its id, close record and span.
struct Stream<'m> {
    id: super::conns::ConnId,
    rec: ConnRecord<'m>,
    span: tracing::Span,
}

/// Closes `rec` with what the connection's run returned (`None`: forced
/// shutdown).
fn record(
    shared: &Shared,
    rec: &mut ConnRecord<'_>,
    result: Option<Result<splice::Outcome, ConnError>>,
) {
    match result {
        Some(Ok(out)) => {
            // a = the peer, b = the local service.
            rec.bytes(out.a_to_b, out.b_to_a);
            rec.finish(splice_outcome(out.end, &shared.shutdown));
        }
        Some(Err(e)) => {
            if e.outcome() == Outcome::HandshakeFailed {
                shared.metrics.count_handshake_failure(Side::Inbound);
            }
            rec.fail(e.outcome(), &e);
        }
        None => rec.finish(Outcome::Shutdown),
    }
}

/// One application connection on its own TLS connection.
async fn dedicated(
    shared: &Shared,
    shaken: Handshaken,
    slot: OwnedSemaphorePermit,
    first: Stream<'_>,
) {
    let Handshaken {
        mut tls,
        local,
        client,
        ..
    } = shaken;
    let Stream { id, mut rec, span } = first;
    let run = async {
        let (backend, guard) = admit(shared, id, slot, &client, &local).await?;
        let limits = splice::Limits {
            idle_timeout: shared.limits.idle_timeout,
        };
        Ok(splice::splice(&mut tls, backend, limits, guard.cancelled()).await)
    }
    .instrument(span);
    let result = tokio::select! {
        r = run => Some(r),
        () = shared.shutdown.force.cancelled() => None,
    };
    if denied(&result) {
        reset(tls.get_ref().0.get_ref());
    }
    record(shared, &mut rec, result);
}

/// Application connections one after another on one TLS connection
/// ([`streams`]): each is checked, authorized and connected to the local service
/// as a dedicated connection would be, when its `OPEN` arrives, and takes a slot
/// of the connection limit for as long as it lives (refused if there is none).
/// Between streams the TLS connection holds no slot — idle connections must not
/// crowd out live ones — but counts against [`pool::MAX_IDLE_INBOUND`]; past it,
/// it closes after its stream instead of idling. It also closes when the client
/// closes it, after [`pool::SERVER_IDLE_TIMEOUT`] without a stream, when a
/// stream does not end cleanly or is denied, once older than
/// [`pool::SERVER_MAX_AGE`], and at shutdown.
async fn serve_streams<'m>(
    shared: &'m Shared,
    shaken: Handshaken,
    slot: OwnedSemaphorePermit,
    first: Stream<'m>,
) {
    let Handshaken {
        tls, local, client, ..
    } = shaken;
    // The handshake verified the client for the first stream; later ones check
    // it again against the bundle of their time.
    let mut verified = Some(client);
    let born = Instant::now();
    let conn_span = first.span.clone();
    let mut framed = Framed::new(tls);
    let mut slot = Some(slot);
    let mut first = Some(first);
    let limits = splice::Limits {
        idle_timeout: shared.limits.idle_timeout,
    };
    loop {
        let idle = if first.is_none() {
            let Some(idle) = IdleInbound::enter(&shared.idle_inbound) else {
                tracing::debug!(parent: &conn_span, "too many idle node-to-node connections; closing this one");
                return;
            };
            // Idle, it keeps its TLS state but not its read buffers.
            framed.release();
            framed.get_mut().get_mut().0.release();
            Some(idle)
        } else {
            None
        };
        let opened = tokio::select! {
            biased;
            () = shared.shutdown.stop.cancelled() => None,
            r = timeout(pool::SERVER_IDLE_TIMEOUT, framed.read_open()) => Some(r),
        };
        drop(idle);
        let closed = match opened {
            Some(Ok(Ok(true))) => None,
            Some(Ok(Ok(false))) => Some(("closed by the client", Outcome::Closed)),
            Some(Ok(Err(error))) => {
                tracing::debug!(parent: &conn_span, %error, "node-to-node connection failed between streams");
                Some(("failed", Outcome::Reset))
            }
            Some(Err(_)) => Some(("idle", Outcome::Closed)),
            None => Some(("shutdown", Outcome::Closed)),
        };
        if let Some((why, outcome)) = closed {
            tracing::debug!(parent: &conn_span, why, "node-to-node connection closed between streams");
            if let Some(mut unused) = first.take() {
                // The handshake's record, for a connection that never carried a
                // stream.
                unused.rec.finish(outcome);
            }
            return;
        }
        let reused = first.is_none();
        shared.metrics.count_stream(Side::Inbound, reused);
        let Stream { id, mut rec, span } = first.take().unwrap_or_else(|| {
            let id = shared.registry.next_id();
            let span = tracing::info_span!(
                parent: &conn_span,
                "stream",
                conn = id,
                src = field::Empty,
                dst = %local.name
            );
            let rec = ConnRecord::open(&shared.metrics, Side::Inbound, span.clone());
            Stream { id, rec, span }
        });
        let this_slot = match slot.take().map_or_else(|| shared.registry.reserve(), Ok) {
            Ok(slot) => slot,
            Err(full) => {
                shared.limit_log.refused(full.max);
                rec.finish(Outcome::LimitReached);
                return;
            }
        };
        let run = async {
            // The certificate was verified at the handshake; the bundle of now
            // decides whether it is still good (expired, or its root removed).
            let client = match verified.take() {
                Some(client) => client,
                None => {
                    let client = peer_identity(framed.get_ref().get_ref().1, &shared.tls.bundle())?;
                    tracing::Span::current().record("src", field::display(&client.service));
                    client
                }
            };
            let (backend, guard) = admit(shared, id, this_slot, &client, &local).await?;
            let out =
                streams::splice_stream(backend, &mut framed, false, limits, guard.cancelled())
                    .await;
            drop(guard);
            Ok::<_, ConnError>(out)
        }
        .instrument(span);
        let result = tokio::select! {
            r = run => Some(r),
            () = shared.shutdown.force.cancelled() => None,
        };
        if denied(&result) {
            reset(framed.get_ref().get_ref().0.get_ref());
        }
        let out = match result {
            Some(Ok(out)) => out,
            Some(Err(e)) => return record(shared, &mut rec, Some(Err(e))),
            None => return record(shared, &mut rec, None),
        };
        // a = the local service, b = the peer.
        let end = out.end;
        record(
            shared,
            &mut rec,
            Some(Ok(splice::Outcome {
                a_to_b: out.b_to_a,
                b_to_a: out.a_to_b,
                end,
            })),
        );
        if end != splice::End::Closed || born.elapsed() >= pool::SERVER_MAX_AGE {
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
                (n < pool::MAX_IDLE_INBOUND).then_some(n + 1)
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
    let client = peer_identity(conn, &bundle)?;
    tracing::Span::current().record("src", field::display(&client.service));
    let streams = conn.alpn_protocol() == Some(streams::ALPN);
    Ok(Handshaken {
        tls,
        local,
        client,
        streams,
    })
}

/// Registers and authorizes one application connection from `client` to `local`
/// and, if allowed, connects the local service. Nothing has been read past the
/// handshake (or the stream's `OPEN`); the caller resets a denied connection
/// ([`reset`]) without reading any.
async fn admit(
    shared: &Shared,
    id: super::conns::ConnId,
    slot: OwnedSemaphorePermit,
    client: &SpiffeId,
    local: &LocalService,
) -> Result<(TcpStream, super::conns::Guard), ConnError> {
    // Registered before the decision, so that an intention change between the
    // decision and the splice is re-checked against this connection too.
    let guard = shared.registry.register(
        id,
        slot,
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
    let plan = shared
        .inbound_lb
        .plan(&service.as_str().to_ascii_lowercase(), addrs);
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
    let lower = name.to_ascii_lowercase();
    let service = lower
        .strip_suffix(trust_domain.as_str())
        .and_then(|s| s.strip_suffix(".svc."))
        .ok_or_else(bad)?;
    service.parse().map_err(|_| bad())
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
            assert_eq!(got.as_str(), want, "{sni}");
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
