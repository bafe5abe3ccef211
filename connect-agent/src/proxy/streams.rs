//! Reuse of node-to-node TLS connections: one connection carries one application
//! connection (a *stream*) after another.
//!
//! Why: with a TLS connection per application connection, every new connection
//! costs a TCP connect between the nodes and a TLS handshake on each side (a
//! resumed TLS 1.3 handshake still does an X25519 exchange on both ends). In the
//! connection-rate benchmark that was most of the proxies' CPU. A stream on an idle
//! pooled connection costs one small frame instead.
//!
//! Why sequential streams and not multiplexing (HTTP/2 CONNECT, as ztunnel's
//! HBONE): a connection carries one stream at a time, so TCP's own flow control is
//! the stream's and bulk transfers move exactly as on a dedicated connection (no
//! windows of ours, no head-of-line blocking between streams); concurrency comes
//! from the client's pool holding several idle connections per destination
//! endpoint (`pool`).
//!
//! Negotiated per connection with ALPN [`ALPN`]: a client that does not offer it
//! (an older agent, a Connect-native application, `openssl s_client`) gets one
//! application connection per TLS connection, as before.
//!
//! On the wire, after the handshake, frames `[kind: u8][length: u24, big endian]
//! [payload]`:
//! - `OPEN` (client to server, empty): a stream starts. The server checks the
//!   client's certificate against the trust bundle of now, authorizes the stream
//!   against the intentions of now, and connects the local service. Sent before any
//!   application byte, so server-first protocols work.
//! - `DATA`: 1 to [`MAX_PAYLOAD`] bytes of the stream.
//! - `FIN` (empty): the sender's application finished sending (half-close).
//!
//! A stream ends cleanly when `FIN` went both ways; then the connection may carry
//! the next one. Anything else — EOF or a reset mid-stream, a frame out of place, a
//! stream cancelled by a revoked intention or idle too long — ends the TLS
//! connection, and with it the applications' connections on both sides, as a
//! failed dedicated connection would. A denied stream resets the TCP connection
//! under it before reading any of its data (`inbound::reset`).

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{
    readahead::ReadAhead,
    splice::{self, Activity, BUF_SIZE, End, Limits, Spliced, gather, read_ready},
};

/// The ALPN protocol name of connections that carry streams.
pub const ALPN: &[u8] = b"connect-streams/1";

const OPEN: u8 = 1;
const DATA: u8 = 2;
const FIN: u8 = 3;
const HEADER: usize = 4;

/// Largest `DATA` payload sent or accepted: one splice buffer.
pub const MAX_PAYLOAD: usize = BUF_SIZE;

/// Least room offered to a read from the TLS connection: one full TLS record.
const MIN_READ: usize = 16 * 1024;

/// Why a connection carrying streams cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading or writing the connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("unexpected frame (kind {kind}, {len} bytes) {context}")]
    Unexpected {
        kind: u8,
        len: usize,
        context: &'static str,
    },
}

/// A TLS connection negotiated with [`ALPN`], and the bytes read from it past the
/// last frame consumed (they belong to the next stream).
#[derive(Debug)]
pub struct Framed<S> {
    io: S,
    read: BytesMut,
}

impl<S> Framed<S> {
    pub fn new(io: S) -> Self {
        Self {
            io,
            read: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Frees the read buffer if it holds nothing, for a connection about to
    /// idle: an idle connection then holds its TLS state only.
    pub fn release(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
    }

    /// Bytes of read buffer held now.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.read.capacity()
    }
}

/// A node-to-node TLS connection that may idle between streams: both ends release
/// their read buffers (frames and the TLS read-ahead) while idle.
pub trait Idles {
    /// Frees the buffers that hold nothing; the TLS state stays.
    fn release_buffers(&mut self);
}

impl<IO> Idles for Framed<tokio_rustls::server::TlsStream<ReadAhead<IO>>> {
    fn release_buffers(&mut self) {
        self.release();
        self.io.get_mut().0.release();
    }
}

impl<IO> Idles for Framed<tokio_rustls::client::TlsStream<ReadAhead<IO>>> {
    fn release_buffers(&mut self) {
        self.release();
        self.io.get_mut().0.release();
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Waits for the next stream (server side): `Ok(true)` when it opens,
    /// `Ok(false)` when the client closed the connection between streams.
    pub async fn read_open(&mut self) -> Result<bool, FrameError> {
        match fill(&mut self.io, &mut self.read, HEADER).await? {
            Fill::Ready => {}
            Fill::Eof if self.read.is_empty() => return Ok(false),
            Fill::Eof => return Err(FrameError::Truncated),
        }
        let (kind, len) = header(&self.read);
        if kind != OPEN || len != 0 {
            return Err(FrameError::Unexpected {
                kind,
                len,
                context: "where a stream must open",
            });
        }
        self.read.advance(HEADER);
        Ok(true)
    }

    /// Whether an idle connection can carry a stream: nothing has arrived since
    /// its last stream ended. A server that closed it (idle timeout, shutdown, a
    /// renewed leaf) has sent close_notify or FIN by now, which reads as
    /// "something arrived". Never waits.
    pub fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }
}

/// Carries one stream between `plain` (the application's or the local service's
/// connection) and `framed` until both sides finished, the stream idles, it is
/// cancelled or something fails. `plain` is the local side of the outcome
/// ([`Spliced::from_local`] is `plain` → `framed`). The
/// connection may carry another stream only if the outcome is [`End::Closed`].
///
/// `open`: the client side starts the stream with `OPEN` (see [`send`]); the
/// server side has read it already ([`Framed::read_open`]).
pub async fn splice_stream<P, S>(
    plain: P,
    framed: &mut Framed<S>,
    open: bool,
    limits: Limits,
    cancel: &CancellationToken,
) -> Spliced
where
    P: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Framed { io, read } = framed;
    let (mut pr, mut pw) = tokio::io::split(plain);
    let (mut fr, mut fw) = tokio::io::split(io);
    let to_framed = AtomicU64::new(0);
    let to_plain = AtomicU64::new(0);
    let activity = Activity::new();
    let up = async {
        send(&mut pr, &mut fw, open, &to_framed, &activity)
            .await
            .map_err(FrameError::Io)
    };
    let down = receive(&mut fr, read, &mut pw, &to_plain, &activity);
    let both = async {
        match tokio::try_join!(up, down) {
            Ok(_) => End::Closed,
            Err(e) => {
                tracing::debug!(error = %e, "stream failed");
                End::Error
            }
        }
    };
    let end = splice::drive(both, &activity, limits, cancel).await;
    splice::Spliced {
        from_local: to_framed.load(Ordering::Relaxed),
        to_local: to_plain.load(Ordering::Relaxed),
        end,
    }
}

/// `plain` → `framed`: each read becomes one `DATA` frame (one write, so one TLS
/// record for small messages); EOF becomes `FIN`. The TLS connection itself is
/// never shut down here: it outlives the stream.
///
/// With `open`, the stream starts with `OPEN`: in the same write as the first
/// `DATA` if the application's first bytes are already there (a client that
/// speaks first, the usual case: one TLS record and one send instead of two),
/// else at once on its own (a server that speaks first must not wait for the
/// client).
async fn send<R, W>(
    r: &mut R,
    w: &mut W,
    mut open: bool,
    count: &AtomicU64,
    activity: &Activity,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Capacity only, never zeroed (see `splice::pump`); the headers go in front
    // of the payload so that all leave in one write.
    let mut buf = Vec::with_capacity(2 * HEADER + MAX_PAYLOAD);
    loop {
        buf.clear();
        if open {
            buf.extend_from_slice(&[OPEN, 0, 0, 0]);
        }
        let data = buf.len();
        buf.extend_from_slice(&[DATA, 0, 0, 0]);
        // At most MAX_PAYLOAD (< 2^24) whatever capacity the allocator gave.
        let mut limited = (&mut *r).take(MAX_PAYLOAD as u64);
        let n = if open {
            match read_ready(&mut limited, &mut buf).await? {
                Some(n) => n,
                None => {
                    w.write_all(&[OPEN, 0, 0, 0]).await?;
                    w.flush().await?;
                    open = false;
                    continue;
                }
            }
        } else {
            limited.read_buf(&mut buf).await?
        };
        if n == 0 {
            buf.truncate(data);
            buf.extend_from_slice(&[FIN, 0, 0, 0]);
            w.write_all(&buf).await?;
            return w.flush().await;
        }
        open = false;
        let len = u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
        buf[data + 1..data + HEADER].copy_from_slice(&len[1..]);
        w.write_all(&buf).await?;
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.moved();
    }
}

/// `framed` → `plain`: `DATA` payloads are written to `plain`, `FIN` shuts its
/// write side down and ends the direction. Bytes read past the `FIN` stay in
/// `read` for the next stream.
async fn receive<R, W>(
    r: &mut R,
    read: &mut BytesMut,
    w: &mut W,
    count: &AtomicU64,
    activity: &Activity,
) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if fill(r, read, HEADER).await? == Fill::Eof {
            return Err(FrameError::Truncated);
        }
        let (kind, len) = header(read);
        match kind {
            DATA if (1..=MAX_PAYLOAD).contains(&len) => {
                read.advance(HEADER);
                let mut left = len;
                while left > 0 {
                    if fill(r, read, 1).await? == Fill::Eof {
                        return Err(FrameError::Truncated);
                    }
                    gather(r, read, |b| b.len() < left && b.capacity() > b.len()).await?;
                    let take = left.min(read.len());
                    w.write_all(&read[..take]).await?;
                    read.advance(take);
                    left -= take;
                    count.fetch_add(take as u64, Ordering::Relaxed);
                }
                w.flush().await?;
                activity.moved();
            }
            FIN if len == 0 => {
                read.advance(HEADER);
                // The application may be gone already; not an error of the stream.
                let _ = w.shutdown().await;
                return Ok(());
            }
            _ => {
                return Err(FrameError::Unexpected {
                    kind,
                    len,
                    context: "inside a stream",
                });
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Fill {
    Ready,
    Eof,
}

/// Reads until `read` holds at least `want` bytes, or EOF.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    read: &mut BytesMut,
    want: usize,
) -> io::Result<Fill> {
    while read.len() < want {
        // Frames are consumed from the front, so the room left behind them
        // shrinks; below a TLS record's worth, `reserve` moves the few bytes
        // left (fewer than `want`) to the front of the same allocation, which
        // then fits BUF_SIZE again: reads stay large, nothing is allocated.
        if read.capacity() - read.len() < want.max(MIN_READ) {
            read.reserve(BUF_SIZE.saturating_sub(read.len()));
        }
        if r.read_buf(read).await? == 0 {
            return Ok(Fill::Eof);
        }
    }
    Ok(Fill::Ready)
}

fn header(read: &[u8]) -> (u8, usize) {
    let len = u32::from_be_bytes([0, read[1], read[2], read[3]]);
    (read[0], len as usize)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{DuplexStream, duplex};

    use super::*;
    use crate::proxy::testio::{Records, Sink};

    /// Runs a stream on both ends of a duplex "TLS connection": the client's
    /// application on `app`, the server's local service on `service`.
    struct Pair {
        client: Framed<DuplexStream>,
        server: Framed<DuplexStream>,
    }

    fn pair() -> Pair {
        let (c, s) = duplex(256 * 1024);
        Pair {
            client: Framed::new(c),
            server: Framed::new(s),
        }
    }

    /// One stream: the client's app sends `up` and closes; the service answers
    /// `down` after reading everything, then closes. Returns what each end read
    /// and both outcomes.
    async fn one_stream(p: &mut Pair, up: &[u8], down: &[u8]) -> (Vec<u8>, Vec<u8>, End, End) {
        let (app, app_proxy) = duplex(4096);
        let (service, service_proxy) = duplex(4096);
        let cancel = CancellationToken::new();
        let Pair { client, server } = p;
        let client_side = async {
            splice_stream(app_proxy, client, true, Limits::default(), &cancel)
                .await
                .end
        };
        let server_side = async {
            assert!(server.read_open().await.expect("open read"));
            splice_stream(service_proxy, server, false, Limits::default(), &cancel)
                .await
                .end
        };
        let app_io = async {
            let (mut r, mut w) = tokio::io::split(app);
            w.write_all(up).await.expect("app writes");
            w.shutdown().await.expect("app half-closes");
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("app reads");
            got
        };
        let service_io = async {
            let (mut r, mut w) = tokio::io::split(service);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("service reads");
            w.write_all(down).await.expect("service answers");
            w.shutdown().await.expect("service closes");
            got
        };
        let (c, s, at_app, at_service) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(client_side, server_side, app_io, service_io)
        })
        .await
        .expect("stream finishes");
        (at_app, at_service, c, s)
    }

    #[tokio::test]
    async fn streams_follow_each_other_on_one_connection() {
        let mut p = pair();
        for i in 0..5u8 {
            let up = vec![i; 100_000 + usize::from(i)];
            let down = vec![i ^ 0xff; 70_000];
            let (at_app, at_service, c, s) = one_stream(&mut p, &up, &down).await;
            assert_eq!(
                at_service, up,
                "stream {i}: the service got the app's bytes"
            );
            assert_eq!(at_app, down, "stream {i}: the app got the answer");
            assert_eq!((c, s), (End::Closed, End::Closed), "stream {i}");
            assert!(
                p.client.is_reusable(),
                "stream {i}: idle connection reusable"
            );
        }
    }

    #[tokio::test]
    async fn empty_streams_and_server_first_protocols_work() {
        let mut p = pair();
        let (at_app, at_service, ..) = one_stream(&mut p, b"", b"").await;
        assert!(at_app.is_empty() && at_service.is_empty());
        // The service speaks without waiting for the client: the OPEN frame, not
        // the app's first byte, started the stream.
        let (at_app, at_service, ..) = one_stream(&mut p, b"", b"220 hello\r\n").await;
        assert_eq!(at_app, b"220 hello\r\n");
        assert!(at_service.is_empty());
    }

    #[tokio::test]
    async fn bytes_of_the_next_stream_read_early_are_kept() {
        // The client's FIN of stream 1, OPEN and data of stream 2 arrive in one
        // read on the server: stream 2 must still get its bytes.
        let (mut c, s) = duplex(4096);
        let mut server = Framed::new(s);
        c.write_all(&[OPEN, 0, 0, 0, DATA, 0, 0, 2, b'h', b'i', FIN, 0, 0, 0])
            .await
            .expect("write");
        c.write_all(&[OPEN, 0, 0, 0, DATA, 0, 0, 3, b'y', b'o', b'u', FIN, 0, 0, 0])
            .await
            .expect("write");
        for want in [&b"hi"[..], b"you"] {
            assert!(server.read_open().await.expect("open"));
            let (mut service, service_proxy) = duplex(4096);
            let cancel = CancellationToken::new();
            let stream = async {
                splice_stream(
                    service_proxy,
                    &mut server,
                    false,
                    Limits::default(),
                    &cancel,
                )
                .await
            };
            let service_io = async {
                let mut got = Vec::new();
                service.read_to_end(&mut got).await.expect("read");
                service.shutdown().await.expect("close");
                got
            };
            // The server's FIN goes back to `c`, which nobody reads here; the
            // duplex holds it.
            let (out, got) = tokio::join!(stream, service_io);
            assert_eq!(got, want);
            assert_eq!(out.end, End::Closed);
        }
        drop(c);
        assert!(
            !server
                .read_open()
                .await
                .expect("clean close between streams")
        );
    }

    #[tokio::test]
    async fn truncation_and_stray_frames_end_the_connection() {
        for bytes in [
            &[OPEN, 0, 0, 0, DATA, 0, 0, 5, b'a'][..],
            &[OPEN, 0, 0, 0, OPEN, 0, 0, 0][..],
            &[OPEN, 0, 0, 0, DATA, 0, 0, 0][..],
            &[OPEN, 0, 0, 0, 9, 0, 0, 0][..],
            &[OPEN, 0, 0, 0, DATA, 0x7f, 0xff, 0xff][..],
        ] {
            let (mut c, s) = duplex(4096);
            let mut server = Framed::new(s);
            c.write_all(bytes).await.expect("write");
            c.shutdown().await.expect("eof");
            assert!(server.read_open().await.expect("open"));
            let (_service, service_proxy) = duplex(4096);
            let cancel = CancellationToken::new();
            let out = tokio::time::timeout(
                Duration::from_secs(5),
                splice_stream(
                    service_proxy,
                    &mut server,
                    false,
                    Limits::default(),
                    &cancel,
                ),
            )
            .await
            .expect("ends");
            assert_eq!(out.end, End::Error, "{bytes:?}");
        }
        // Not an OPEN where a stream must start; a header cut short.
        for bytes in [&[DATA, 0, 0, 1, b'x'][..], &[OPEN, 0][..]] {
            let (mut c, s) = duplex(4096);
            let mut server = Framed::new(s);
            c.write_all(bytes).await.expect("write");
            c.shutdown().await.expect("eof");
            assert!(server.read_open().await.is_err(), "{bytes:?}");
        }
    }

    /// Counts the writes that reach the inner stream.
    struct Writes(DuplexStream, Vec<Vec<u8>>);

    impl AsyncRead for Writes {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            let r = Pin::new(&mut this.0).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = r {
                this.1.push(buf[..n].to_vec());
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn open_leaves_with_the_first_data_if_it_is_there_and_alone_if_not() {
        // The application wrote before the stream started: one write.
        let (tls, _peer) = duplex(4096);
        let mut client = Framed::new(Writes(tls, Vec::new()));
        let (mut app, app_proxy) = duplex(4096);
        app.write_all(b"hi").await.expect("write");
        app.shutdown().await.expect("eof");
        let cancel = CancellationToken::new();
        let stream = splice_stream(app_proxy, &mut client, true, Limits::default(), &cancel);
        // The peer never answers; the first write is all this looks at.
        let _ = tokio::time::timeout(Duration::from_millis(200), stream).await;
        let writes = &client.get_ref().1;
        assert_eq!(
            writes.first().map(Vec::as_slice),
            Some(&[OPEN, 0, 0, 0, DATA, 0, 0, 2, b'h', b'i', FIN, 0, 0, 0][..4 + 4 + 2]),
            "{writes:?}"
        );

        // Nothing from the application yet: OPEN goes alone, at once.
        let (tls, _peer) = duplex(4096);
        let mut client = Framed::new(Writes(tls, Vec::new()));
        let (_app, app_proxy) = duplex(4096);
        let stream = splice_stream(app_proxy, &mut client, true, Limits::default(), &cancel);
        let _ = tokio::time::timeout(Duration::from_millis(200), stream).await;
        assert_eq!(client.get_ref().1, vec![vec![OPEN, 0, 0, 0]]);
    }

    #[tokio::test]
    async fn a_frame_arriving_as_many_records_leaves_in_one_write() {
        let mut wire = vec![DATA, 0x01, 0x86, 0xa0]; // 100,000 bytes
        wire.extend(std::iter::repeat_n(5u8, 100_000));
        wire.extend([FIN, 0, 0, 0]);
        let mut w = Sink::default();
        let mut read = BytesMut::new();
        let count = AtomicU64::new(0);
        receive(
            &mut Records(wire),
            &mut read,
            &mut w,
            &count,
            &Activity::new(),
        )
        .await
        .expect("frame and FIN");
        // Seven reads of at most 16 KiB, one write.
        assert_eq!(w.0, vec![100_000]);
        assert_eq!(count.load(Ordering::Relaxed), 100_000);
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_reusable() {
        let mut p = pair();
        assert!(p.client.is_reusable());
        drop(p.server);
        assert!(!p.client.is_reusable());
    }

    #[tokio::test]
    async fn a_cancelled_stream_ends_and_is_not_reusable() {
        let mut p = pair();
        let (_app, app_proxy) = duplex(4096);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let out = splice_stream(app_proxy, &mut p.client, true, Limits::default(), &cancel).await;
        assert_eq!(out.end, End::Cancelled);
    }
}
