//! The outbound side: plaintext from local applications into the mesh.
//!
//! Three ways in — the transparent listener (eBPF-redirected connections: the
//! source service from the dialing process's cgroup, the destination from the
//! address it dialed), upstream listeners (fixed source and destination), and the
//! explicit proxy's upstream listeners (the same code in another process) — and one
//! way out: take the destination's endpoints round robin (recently failed ones
//! last, see [`super::balance`]), dial the node's inbound port with TLS 1.3, the
//! source service's leaf and SNI `<destination>.svc.<trust-domain>`, accept the
//! server only if its certificate carries the destination's SPIFFE ID
//! (`ca::tls::SpiffeServerVerifier`), retry the next endpoint if that fails, then
//! splice. Where the server takes streams ([`super::streams`]), the application's
//! connection becomes a stream on an idle pooled connection to that endpoint, or
//! on the new one, which goes back to the pool when the stream ends cleanly.
//!
//! Authorization is the destination's job; the connection is still registered
//! here so that a deny closes both ends at once and the limit covers it.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field};

use super::{
    ConnError, OriginLookup, Shared, Side, Upstream, accept_loop,
    connection::Connection,
    pool::{ClientTls, Conn},
    readahead::ReadAhead,
    splice, streams,
};
use crate::{ca::tls::server_name_for, identity::ServiceName, redirect::Redirect};

/// Distinct endpoints tried per connection before giving up: enough to step over
/// a node that just went away, few enough that a dead destination fails fast.
pub const MAX_DIAL_ATTEMPTS: usize = 3;

/// Waits between lookups of a redirect record. `sock_ops` files the record when
/// the client's side is established, which is before our `accept()` returns; the
/// retries only cover a record filed late on a loaded machine.
const ORIGIN_RETRIES: [Duration; 2] = [Duration::from_millis(1), Duration::from_millis(10)];

/// Why one dial attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("TCP connect failed: {source}")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("TCP connect did not finish within {after:?}")]
    ConnectTimeout { after: Duration },
    /// Includes a server whose certificate is not the destination's
    /// ("peer certificate mismatch").
    #[error("TLS handshake failed: {source}")]
    Handshake {
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake did not finish within {after:?}")]
    HandshakeTimeout { after: Duration },
}

/// Where an accepted connection goes.
#[derive(Clone)]
enum Route {
    Fixed { src: ServiceName, dst: ServiceName },
    Transparent(Arc<dyn OriginLookup>),
}

pub(super) async fn serve_upstream(
    shared: Arc<Shared>,
    listener: TcpListener,
    upstream: Upstream,
    stop: CancellationToken,
) {
    let route = Route::Fixed {
        src: upstream.source,
        dst: upstream.destination,
    };
    accept_loop(
        shared,
        listener,
        stop,
        "upstream",
        move |shared, tcp, peer| handle(shared, tcp, peer, route.clone()),
    )
    .await;
}

pub(super) async fn serve_transparent(
    shared: Arc<Shared>,
    listener: TcpListener,
    origin: Arc<dyn OriginLookup>,
) {
    let stop = shared.shutdown.stop.clone();
    let route = Route::Transparent(origin);
    accept_loop(
        shared,
        listener,
        stop,
        "transparent",
        move |shared, tcp, peer| handle(shared, tcp, peer, route.clone()),
    )
    .await;
}

async fn handle(shared: Arc<Shared>, mut app: TcpStream, peer: SocketAddr, route: Route) {
    let span = |id| {
        tracing::info_span!(
            "outbound",
            conn = id,
            peer = %peer,
            src = field::Empty,
            dst = field::Empty,
            orig_dst = field::Empty
        )
    };
    let Some(conn) = Connection::open(&shared, Side::Outbound, span) else {
        // Claim the origin record of a refused connection too: left behind, it would
        // be handed to a later socket that reuses the client port.
        if let (Route::Transparent(origin), SocketAddr::V4(peer)) = (&route, peer)
            && let Err(error) = origin.take_redirect(peer)
        {
            tracing::debug!(%peer, %error, "cannot remove the refused connection's redirect record");
        }
        refuse(&app);
        return;
    };
    let _ = app.set_nodelay(true);
    let id = conn.id;
    let run = async {
        let (src, dst) = resolve(&shared, &route, peer).await?;
        let span = tracing::Span::current();
        span.record("src", field::display(&src));
        span.record("dst", field::display(&dst));
        let guard = shared
            .registry
            .register(id, src.clone(), dst.clone(), &shared.shutdown.force);
        let dialed = dial(&shared, &src, &dst).await?;
        let limits = shared.limits.splice();
        let out = match dialed {
            Dialed::Dedicated(tls) => {
                tracing::debug!("connected to the destination");
                splice::splice(&mut app, tls, limits, guard.cancelled()).await
            }
            Dialed::Stream { mut conn, addr } => {
                tracing::debug!(endpoint = %addr, "stream opened to the destination");
                let out = streams::splice_stream(
                    &mut app,
                    &mut conn.framed,
                    true,
                    limits,
                    guard.cancelled(),
                )
                .await;
                // After shutdown began, the pool is being emptied, not filled.
                if out.end == splice::End::Closed && !shared.shutdown.stop.is_cancelled() {
                    shared.pool.put(&src, &dst, addr, conn);
                }
                out
            }
        };
        Ok::<_, ConnError>(out)
    }
    .instrument(conn.span.clone());
    let ran = tokio::select! {
        r = run => Some(r),
        () = shared.shutdown.force.cancelled() => None,
    };
    let clean = matches!(
        &ran,
        Some(Ok(out)) if matches!(out.end, splice::End::Closed | splice::End::Idle)
    );
    conn.finish(ran);
    if !clean {
        refuse(&app);
    }
}

/// Makes the application's connection end with a reset when it is dropped: it was
/// refused (denied, no route, no endpoint that answers, the connection limit) or
/// cut (the stream failed, an intention revoked it, shutdown forced it). A reset
/// reaches the application at once whatever it is doing — an interactive client
/// that waits for the server with its own input still open would sit on a clean
/// EOF (nc does) — and lets it tell "refused" from "the server answered nothing",
/// which a FIN would not. A connection that ended cleanly or idled out gets a FIN.
fn refuse(app: &TcpStream) {
    if let Err(error) = app.set_zero_linger() {
        tracing::debug!(%error, "cannot set SO_LINGER 0 on the application's connection");
    }
}

/// Source and destination service of an accepted connection.
async fn resolve(
    shared: &Shared,
    route: &Route,
    peer: SocketAddr,
) -> Result<(ServiceName, ServiceName), ConnError> {
    let origin = match route {
        Route::Fixed { src, dst } => return Ok((src.clone(), dst.clone())),
        Route::Transparent(origin) => origin,
    };
    let SocketAddr::V4(peer) = peer else {
        return Err(ConnError::NotV4 { peer });
    };
    let redirect = take_redirect(origin.as_ref(), peer).await?;
    tracing::Span::current().record("orig_dst", field::display(redirect.orig_dst));
    let src = shared
        .directory
        .service_of_cgroup(redirect.cgroup_id)
        .ok_or(ConnError::UnknownCgroup {
            cgroup_id: redirect.cgroup_id,
        })?;
    let dst = shared.directory.destination_of(redirect.orig_dst).ok_or(
        ConnError::UnknownDestination {
            orig_dst: redirect.orig_dst,
        },
    )?;
    Ok((src, dst))
}

async fn take_redirect(
    origin: &dyn OriginLookup,
    peer: SocketAddrV4,
) -> Result<Redirect, ConnError> {
    let lookup = || {
        origin
            .take_redirect(peer)
            .map_err(|source| ConnError::Origin { peer, source })
    };
    if let Some(r) = lookup()? {
        return Ok(r);
    }
    for pause in ORIGIN_RETRIES {
        tokio::time::sleep(pause).await;
        if let Some(r) = lookup()? {
            return Ok(r);
        }
    }
    Err(ConnError::NoOrigin { peer })
}

/// What [`dial`] got for an application connection.
enum Dialed {
    /// A TLS connection of its own: the server does not take streams, or reuse
    /// is off.
    Dedicated(ClientTls),
    /// A stream to open (`streams::splice_stream` sends its `OPEN`) on a pooled
    /// or a new connection to `addr`.
    Stream { conn: Conn, addr: SocketAddr },
}

/// Dials the endpoints of `dst` as `src` until one answers with `dst`'s identity.
///
/// Endpoints are taken round robin, those that failed lately last
/// ([`super::balance`]). For the endpoint chosen, an idle pooled connection is
/// used if there is one ([`super::pool`]); otherwise a new one is made. A failed
/// attempt (TCP connect or TLS handshake, so before a byte of the application's
/// reaches the destination) is retried on the next endpoint, up to
/// [`MAX_DIAL_ATTEMPTS`] distinct ones.
async fn dial(shared: &Shared, src: &ServiceName, dst: &ServiceName) -> Result<Dialed, ConnError> {
    let endpoints = shared.directory.endpoints(dst);
    if endpoints.is_empty() {
        return Err(ConnError::NoEndpoints {
            service: dst.clone(),
        });
    }
    let bundle = shared.tls.bundle();
    let name = server_name_for(dst, &bundle).map_err(|_| ConnError::ServerName {
        service: dst.clone(),
        trust_domain: bundle.trust_domain().to_string(),
    })?;
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
    let plan = shared.outbound_lb.plan(dst, &addrs);
    let mut attempts = 0;
    let mut last = None;
    for addr in plan.into_iter().take(MAX_DIAL_ATTEMPTS) {
        attempts += 1;
        let (config, leaf) =
            shared
                .tls
                .client_to(src, addr)
                .await
                .map_err(|source| ConnError::Leaf {
                    service: src.clone(),
                    source,
                })?;
        if let Some(conn) = shared.pool.take(src, dst, addr, &bundle, &leaf) {
            shared.metrics.count_stream(Side::Outbound, true);
            return Ok(Dialed::Stream { conn, addr });
        }
        let result = attempt(&TlsConnector::from(config), name.clone(), addr, shared)
            .await
            .map(|tls| {
                shared
                    .metrics
                    .count_handshake(Side::Outbound, tls.get_ref().1.handshake_kind());
                if tls.get_ref().1.alpn_protocol() == Some(streams::ALPN) {
                    shared.metrics.count_stream(Side::Outbound, false);
                    Dialed::Stream {
                        conn: Conn::new(tls, bundle.clone(), leaf),
                        addr,
                    }
                } else {
                    Dialed::Dedicated(tls)
                }
            });
        match result {
            Ok(dialed) => {
                shared.outbound_lb.succeeded(addr);
                if attempts > 1 {
                    tracing::debug!(endpoint = %addr, attempts, "connected after retrying");
                }
                return Ok(dialed);
            }
            Err(e) => {
                if matches!(
                    e,
                    DialError::Handshake { .. } | DialError::HandshakeTimeout { .. }
                ) {
                    shared.metrics.count_handshake_failure(Side::Outbound);
                }
                shared.outbound_lb.failed(addr);
                let dc = endpoints
                    .iter()
                    .find(|ep| ep.addr == addr)
                    .map(|ep| ep.datacenter.to_string())
                    .unwrap_or_default();
                tracing::debug!(endpoint = %addr, %dc, error = %e, "dial attempt failed");
                last = Some((addr, e));
            }
        }
    }
    match last {
        Some((addr, source)) => Err(ConnError::Dial {
            service: dst.clone(),
            addr,
            attempts,
            source,
        }),
        // The plan holds every endpoint, and there is at least one.
        None => Err(ConnError::NoEndpoints {
            service: dst.clone(),
        }),
    }
}

async fn attempt(
    connector: &TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    addr: SocketAddr,
    shared: &Shared,
) -> Result<ClientTls, DialError> {
    let after = shared.limits.connect_timeout;
    let tcp = timeout(after, TcpStream::connect(addr))
        .await
        .map_err(|_| DialError::ConnectTimeout { after })?
        .map_err(|source| DialError::Connect { source })?;
    let _ = tcp.set_nodelay(true);
    let after = shared.limits.handshake_timeout;
    timeout(after, connector.connect(name, ReadAhead::new(tcp)))
        .await
        .map_err(|_| DialError::HandshakeTimeout { after })?
        .map_err(|source| DialError::Handshake { source })
}
