//! Copies bytes both ways between two streams until both sides are done, the
//! connection idles too long, or it is cancelled (an intention changed to deny, or
//! shutdown forced it).
//!
//! Half-close is honoured: when one side finishes sending, the other side's write half
//! is shut down and the opposite direction keeps flowing. Buffers are fixed per
//! direction, so memory per connection is bounded.

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::BufMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// Per-direction buffer. Large, so that bulk transfers move in few syscalls and
/// few wake-ups: with reads gathered (see `pump`), going from 64 to 256 KiB took
/// the benchmark's one-stream throughput from about 6.1 to 6.7–7.0 Gbit/s and the
/// proxies' CPU per Gbit from about 0.22 to 0.20–0.21 s. Allocated once per
/// connection and never zeroed: a connection that carries small messages has only
/// the pages it touched resident. Two per connection bound memory.
pub const BUF_SIZE: usize = 256 * 1024;

/// Limits of a splice.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Close the connection after this long without a byte in either direction.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60 * 60),
        }
    }
}

/// Why a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished normally.
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
    /// Cancelled from outside (intention revoked, forced shutdown).
    Cancelled,
    /// A read or write failed (reset, broken pipe).
    Error,
}

/// What a splice moved and how it ended. Directions are named from this node's
/// side, the same on every path: `local` is the plaintext connection on this node
/// (the application's, outbound; the local service's, inbound), the other side is
/// the peer (a node-to-node TLS connection or one stream of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from the local connection and sent to the peer.
    pub from_local: u64,
    /// Bytes received from the peer and written to the local connection.
    pub to_local: u64,
    pub end: End,
}

/// Splices `local` (the plaintext connection on this node) and `peer` until done,
/// idle, cancelled or failed.
pub async fn splice<L, P>(local: L, peer: P, limits: Limits, cancel: &CancellationToken) -> Spliced
where
    L: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut pr, mut pw) = tokio::io::split(peer);
    let from_local = AtomicU64::new(0);
    let to_local = AtomicU64::new(0);
    let activity = Activity::new();
    let forward = pump(&mut lr, &mut pw, &from_local, &activity);
    let backward = pump(&mut pr, &mut lw, &to_local, &activity);
    // A failed direction ends both: after a reset or a truncated TLS stream the
    // other direction has no one to deliver to, and waiting for it would hold the
    // connection until the idle timeout.
    let both = async {
        match tokio::try_join!(forward, backward) {
            Ok(_) => End::Closed,
            Err(_) => End::Error,
        }
    };
    let end = drive(both, &activity, limits, cancel).await;
    Spliced {
        from_local: from_local.load(Ordering::Relaxed),
        to_local: to_local.load(Ordering::Relaxed),
        end,
    }
}

/// When a splice last moved a byte (either direction), for its idle timeout.
#[derive(Debug)]
pub(super) struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last byte moved.
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Bytes moved just now.
    pub(super) fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once no byte moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let since = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let idle_for = self.started.elapsed().saturating_sub(since);
            if idle_for >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle_for).await;
        }
    }
}

/// Runs `both` (a splice's two directions) until it ends, nothing moved for the
/// idle timeout, or `cancel` fires.
pub(super) async fn drive(
    both: impl Future<Output = End>,
    activity: &Activity,
    limits: Limits,
    cancel: &CancellationToken,
) -> End {
    tokio::select! {
        end = both => end,
        () = activity.idle(limits.idle_timeout) => End::Idle,
        () = cancel.cancelled() => End::Cancelled,
    }
}

/// Reads into `buf` only if `r` has bytes (or EOF) ready now: `None` when it
/// would wait. `read_buf` reads nothing if it is not ready, so giving up on it
/// loses nothing.
pub(super) async fn read_ready<R, B>(r: &mut R, buf: &mut B) -> io::Result<Option<usize>>
where
    R: AsyncRead + Unpin,
    B: BufMut,
{
    tokio::select! {
        biased;
        n = r.read_buf(buf) => n.map(Some),
        () = std::future::ready(()) => Ok(None),
    }
}

/// After a read, reads whatever else `r` has ready now while `room(buf)` holds:
/// a TLS stream hands out one record (at most 16 KiB) per read and the
/// read-ahead under it usually holds several; gathered, they leave in one write
/// instead of one per record. On a TCP socket the extra attempt costs no syscall
/// (tokio knows the socket is drained).
pub(super) async fn gather<R, B>(
    r: &mut R,
    buf: &mut B,
    room: impl Fn(&B) -> bool,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    B: BufMut,
{
    while room(buf) {
        if !matches!(read_ready(r, buf).await?, Some(n) if n > 0) {
            break;
        }
    }
    Ok(())
}

/// One direction: read into a fixed buffer, write it all, count; on EOF shut down the
/// writer so the peer sees the half-close.
async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64, activity: &Activity) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Capacity only: reads fill the spare capacity without it being zeroed first
    // (zeroing the buffers of both directions and side showed as 3% of the
    // proxies' CPU in the connection-rate benchmark, where messages are 64 bytes).
    let mut buf = Vec::with_capacity(BUF_SIZE);
    loop {
        buf.clear();
        if r.read_buf(&mut buf).await? > 0 {
            gather(r, &mut buf, |b| b.capacity() > b.len()).await?;
        }
        let n = buf.len();
        if n == 0 {
            // The peer may already be gone; a failed shutdown is not an error of ours.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf).await?;
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.moved();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testio::{Records, Sink};

    #[tokio::test]
    async fn copies_both_ways_and_honours_half_close() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let task =
            tokio::spawn(async move { splice(proxy_a, proxy_b, Limits::default(), &cancel).await });

        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"hello").await.expect("write");
        cw.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(got, b"hello");
        // The other direction still works after the client's half-close.
        sw.write_all(b"world!").await.expect("write back");
        sw.shutdown().await.expect("close");
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"world!");
        let out = task.await.expect("join");
        assert_eq!(
            out,
            Spliced {
                from_local: 5,
                to_local: 6,
                end: End::Closed
            }
        );
    }

    #[tokio::test]
    async fn a_failed_direction_ends_both() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, _server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(async move {
            splice(Failing(proxy_a), proxy_b, Limits::default(), &cancel).await
        });
        drop(client);
        let out = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends although the server side stays open")
            .expect("join");
        assert_eq!(out.end, End::Error);
    }

    /// A stream whose EOF is an error, as a TLS stream truncated without
    /// close_notify reads.
    struct Failing(tokio::io::DuplexStream);

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    std::task::Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()))
                }
                other => other,
            }
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn records_ready_together_leave_in_one_write() {
        let mut r = Records(vec![1u8; 100_000]);
        let mut w = Sink::default();
        let count = AtomicU64::new(0);
        pump(&mut r, &mut w, &count, &Activity::new())
            .await
            .expect("pump");
        // Seven reads of at most 16 KiB, one write.
        assert_eq!(w.0, vec![100_000]);
        assert_eq!(count.load(Ordering::Relaxed), 100_000);
    }

    #[tokio::test]
    async fn cancel_ends_a_live_splice() {
        let (_client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, _server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let task =
            tokio::spawn(async move { splice(proxy_a, proxy_b, Limits::default(), &c2).await });
        cancel.cancel();
        let out = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends promptly")
            .expect("join");
        assert_eq!(out.end, End::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed() {
        let (_client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, _server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let limits = Limits {
            idle_timeout: Duration::from_secs(30),
        };
        let out = splice(proxy_a, proxy_b, limits, &cancel).await;
        assert_eq!(out.end, End::Idle);
    }
}
