//! A read-ahead buffer under TLS streams.
//!
//! rustls reads its socket 4 KiB at a time (its deframer grows by 4 KiB per
//! read), so a bulk transfer of 16 KiB records costs four or five `recv` calls per
//! record. Under a TLS stream, [`ReadAhead`] reads the socket in
//! [`READ_AHEAD`]-byte chunks and serves rustls' small reads from memory: one
//! syscall per chunk instead of per 4 KiB. Writes pass straight through.
//!
//! The buffer is allocated on the first read and never zeroed (its capacity is
//! filled by the socket read), so short connections pay little for it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at once: sixteen full TLS records (see
/// [`super::splice::BUF_SIZE`] for why large).
pub const READ_AHEAD: usize = 256 * 1024;

/// `inner` with reads buffered [`READ_AHEAD`] bytes at a time.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream, and whatever was read ahead of the caller and not yet served.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.inner, self.buf)
    }

    /// Frees the buffer if it holds nothing (a connection about to idle); the
    /// next read allocates it again.
    pub fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Bytes of buffer held now.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            // Nothing asked: answer at once, as the inner stream would.
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_empty() {
            // A read as large as ours gains nothing from a detour through it.
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(READ_AHEAD);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.buf
            ))?;
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the reads that reach the inner stream.
    struct Counting {
        inner: tokio::io::DuplexStream,
        reads: usize,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_eof_passes() {
        let (mut peer, ours) = tokio::io::duplex(1024 * 1024);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).await.expect("write");
        peer.shutdown().await.expect("eof");
        let mut s = ReadAhead::new(Counting {
            inner: ours,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data, "every byte, in order");
        // 600,000 bytes in 4 KiB reads would be 147 reads; through 256 KiB, 3.
        assert_eq!(s.get_ref().reads, 3);
    }

    #[tokio::test]
    async fn writes_pass_through_and_large_reads_go_direct() {
        let (mut peer, ours) = tokio::io::duplex(256 * 1024);
        let mut s = ReadAhead::new(ours);
        s.write_all(b"hello").await.expect("write");
        s.flush().await.expect("flush");
        let mut five = [0u8; 5];
        peer.read_exact(&mut five).await.expect("peer reads");
        assert_eq!(&five, b"hello");
        peer.write_all(&[7u8; 1000]).await.expect("write");
        assert_eq!(s.read(&mut []).await.expect("empty read"), 0);
        let mut big = vec![0u8; READ_AHEAD];
        let n = s.read(&mut big).await.expect("read");
        assert_eq!(n, 1000);
        let (_, left) = s.into_parts();
        assert!(left.is_empty(), "nothing was buffered on the way");
    }

    #[tokio::test]
    async fn an_empty_buffer_is_released_and_comes_back_on_the_next_read() {
        let (mut peer, ours) = tokio::io::duplex(256 * 1024);
        let mut s = ReadAhead::new(ours);
        peer.write_all(b"abcdef").await.expect("write");
        let mut two = [0u8; 2];
        s.read_exact(&mut two).await.expect("read");
        assert!(
            s.capacity() > READ_AHEAD / 2,
            "read ahead into a large buffer"
        );
        s.release();
        assert!(s.capacity() >= 4, "bytes not yet served are kept");
        let mut four = [0u8; 4];
        s.read_exact(&mut four).await.expect("read");
        assert_eq!(&four, b"cdef");
        s.release();
        assert_eq!(s.capacity(), 0);
        peer.write_all(b"again").await.expect("write");
        let mut five = [0u8; 5];
        s.read_exact(&mut five).await.expect("read after release");
        assert_eq!(&five, b"again");
    }
}
