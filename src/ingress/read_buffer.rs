//! A read buffer that exists only while data is flowing.
//!
//! rustls reads at most 4 KiB from its transport per call, so the TLS ingress
//! puts a buffer between rustls and the TCP socket to take one large read
//! per system call. A tunnel that sits idle should not keep that buffer:
//! at thousands of idle tunnels it would be most of the gateway's memory.
//! [`ReleasingReader`] allocates the buffer when a read finds data and frees
//! it as soon as the buffer is drained and the socket has nothing more.

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads `inner` through a buffer of up to `capacity` bytes that is freed
/// whenever it is empty and `inner` would block. Writes pass straight through.
#[derive(Debug)]
pub struct ReleasingReader<T> {
    inner: T,
    buffer: BytesMut,
    capacity: usize,
}

impl<T> ReleasingReader<T> {
    pub fn new(inner: T, capacity: usize) -> Self {
        Self {
            inner,
            buffer: BytesMut::new(),
            capacity,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Returns the buffer's capacity left in bytes: zero while the reader is
    /// idle.
    pub fn held_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    fn release(&mut self) {
        self.buffer = BytesMut::new();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReleasingReader<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffer.is_empty() {
            if out.remaining() >= this.capacity {
                // The caller's buffer is as large as ours: read into it.
                this.release();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Takes back the drained allocation when there is one, or
            // allocates uninitialised memory: its pages are touched only by
            // the bytes the kernel writes.
            this.buffer.clear();
            this.buffer.reserve(this.capacity);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buffer) {
                Poll::Pending => {
                    this.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(0)) => {
                    this.release();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = this.buffer.len().min(out.remaining());
        out.put_slice(&this.buffer[..n]);
        this.buffer.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReleasingReader<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads come out of one large read, in order, and the buffer is
    /// gone once the data is consumed and the peer is quiet.
    #[tokio::test]
    async fn buffer_lives_only_while_data_waits() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut reader = ReleasingReader::new(near, 8192);
        let payload: Vec<u8> = (0..6000u32).map(|i| (i % 253) as u8).collect();
        far.write_all(&payload).await.expect("write");
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        while got.len() < payload.len() {
            let n = reader.read(&mut chunk).await.expect("read");
            assert!(n > 0, "early EOF");
            got.extend_from_slice(&chunk[..n]);
            if got.len() < payload.len() {
                assert!(reader.held_bytes() > 0, "buffer freed while it has data");
            }
        }
        assert_eq!(got, payload);
        // The next read finds nothing: the buffer is freed before waiting.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read(&mut chunk),
        )
        .await;
        assert!(pending.is_err(), "a read with no data returned");
        assert_eq!(reader.held_bytes(), 0, "idle reader still holds its buffer");
        far.write_all(b"again").await.expect("write");
        let n = reader.read(&mut chunk).await.expect("read");
        assert_eq!(&chunk[..n], b"again");
        drop(far);
        assert_eq!(reader.read(&mut chunk).await.expect("EOF"), 0);
        assert_eq!(reader.held_bytes(), 0);
    }

    /// A caller's buffer at least as large as ours is read into directly.
    #[tokio::test]
    async fn large_reads_bypass_the_buffer() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut reader = ReleasingReader::new(near, 4096);
        far.write_all(&[7u8; 5000]).await.expect("write");
        let mut big = vec![0u8; 8192];
        let n = reader.read(&mut big).await.expect("read");
        assert_eq!(n, 5000);
        assert_eq!(reader.held_bytes(), 0);
    }
}
