//! The HTTP server under both API listeners, bounded where axum's is not.
//!
//! `axum::serve` takes every connection it is given and keeps an idle keep-alive
//! connection, or one that never sends a request, forever. Here:
//! - connections are bounded in all ([`MAX_CONNECTIONS`]) and per client IP
//!   ([`MAX_CONNECTIONS_PER_CLIENT`], Consul's `http_max_conns_per_client`); a
//!   connection over either is closed at once. Each blocking query holds its
//!   connection, so this also bounds a client's blocking queries;
//! - a connection must send a request's headers within [`IDLE_TIMEOUT`] of
//!   opening and of its previous response (hyper's header-read timeout), so a
//!   silent or idle connection goes away; a request being answered, a blocking
//!   query's wait included, is not cut by it;
//! - on shutdown every connection finishes its request in flight and closes,
//!   for at most [`SHUTDOWN_GRACE`].

use std::{net::SocketAddr, time::Duration};

use axum::{Router, body::Body, extract::Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::admission::Budget;

/// API connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// API connections open at once from one client IP (Consul's default for
/// `limits.http_max_conns_per_client`).
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 200;
/// How long a connection may wait before sending (the rest of) a request's headers.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The bounds [`serve`] applies.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    connections: usize,
    per_client: usize,
    idle: Duration,
}

const BOUNDS: Bounds = Bounds {
    connections: MAX_CONNECTIONS,
    per_client: MAX_CONNECTIONS_PER_CLIENT,
    idle: IDLE_TIMEOUT,
};

/// Serves `router` on the connections `listener` yields until `shutdown`
/// resolves, within the bounds of the module doc.
pub async fn serve<L>(
    listener: L,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    serve_within(listener, router, shutdown, BOUNDS).await
}

async fn serve_within<L>(
    mut listener: L,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bounds: Bounds,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let budget = Budget::new("API connections", bounds.connections, bounds.per_client);
    let stop = CancellationToken::new();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connections so the set stays as large as what is open.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        // Over the budget: closed at once (the budget logs it).
        let Ok(permit) = budget.try_enter(peer.ip()) else {
            drop(io);
            continue;
        };
        let router = router.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move { router.oneshot(req.map(Body::new)).await }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.idle);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let served = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "API connection ended with an error");
            }
        });
    }
    stop.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = conns.len(),
            "API connections still busy after the shutdown grace; closing them"
        );
        conns.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpSocket, TcpStream},
    };

    use super::*;

    async fn from(source: [u8; 4], to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::from((source, 0))).expect("bind");
        s.connect(to).await.expect("connect")
    }

    /// Sends a request and returns the status line, or `None` if the server
    /// closed the connection without answering.
    async fn get_status(c: &mut TcpStream) -> Option<String> {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("an answer or a close in time")
            .ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.lines()
            .next()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
    }

    async fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(within, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_client_gets_its_share_of_connections_and_idle_ones_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/", get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let bounds = Bounds {
            connections: 8,
            per_client: 3,
            idle: Duration::from_millis(500),
        };
        let server = tokio::spawn(serve_within(
            listener,
            router,
            stop.clone().cancelled_owned(),
            bounds,
        ));

        // 127.0.0.1 holds its three; the fourth is closed unanswered.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = from([127, 0, 0, 1], addr).await;
            assert_eq!(get_status(&mut c).await.as_deref(), Some("HTTP/1.1 200 OK"));
            held.push(c);
        }
        let mut fourth = from([127, 0, 0, 1], addr).await;
        assert_eq!(
            get_status(&mut fourth).await,
            None,
            "over the client's share"
        );
        // Another client is served beside them.
        let mut other = from([127, 0, 0, 2], addr).await;
        assert_eq!(
            get_status(&mut other).await.as_deref(),
            Some("HTTP/1.1 200 OK")
        );

        // Idle keep-alive connections, and one that never sends a request, go
        // after the idle bound, which gives the client its share back.
        let started = Instant::now();
        let mut silent = from([127, 0, 0, 3], addr).await;
        for c in held.iter_mut().chain([&mut silent]) {
            assert!(
                closed_within(c, Duration::from_secs(3)).await,
                "an idle connection stayed open"
            );
        }
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "closed before the idle bound"
        );
        let mut again = from([127, 0, 0, 1], addr).await;
        assert_eq!(
            get_status(&mut again).await.as_deref(),
            Some("HTTP/1.1 200 OK")
        );

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
    }
}
