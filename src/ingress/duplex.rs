//! Copies bytes both ways between two byte streams, such as a TLS-over-TCP
//! tunnel and a TCP connection, with back-pressure and half-close. The end of
//! one direction (EOF, or close_notify on TLS) shuts down the writing side of
//! the other stream and leaves the opposite direction open.

use bytes::BytesMut;
use futures_util::FutureExt;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One of the two streams given to [`copy_duplex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    First,
    Second,
}

/// The end of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DuplexEnd {
    /// Both directions reached EOF and were passed on as shutdowns.
    Finished,
    /// A read or write on `side` failed, for example with a TCP reset or a
    /// TLS connection closed without close_notify; both directions stopped.
    Aborted { side: Side, error: String },
}

/// Bytes copied in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct DuplexStats {
    pub first_to_second: u64,
    pub second_to_first: u64,
}

enum Half {
    Done(u64),
    Failed(Side, io::Error, u64),
}

/// Size of the read that waits for data while a direction has no buffer.
/// The array lives in the tunnel's task for the tunnel's whole life, so it
/// is small: the rest of a burst follows in the gathering reads.
const FIRST_READ_BYTES: usize = 64;

async fn copy_half<R, W>(
    from: &mut R,
    from_side: Side,
    to: &mut W,
    to_side: Side,
    buffer: usize,
) -> Half
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    // The copy buffer of `buffer` bytes exists only while data flows. When
    // a read finds nothing the buffer is freed, and the wait for the next
    // bytes uses a small array in the task, so an idle tunnel has no
    // copy buffer.
    let mut first_chunk = [0u8; FIRST_READ_BYTES];
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    // An error or EOF found while gathering, reported after the gathered
    // bytes are written: a TCP reset is reported by one read only.
    let mut pending: Option<io::Result<usize>> = None;
    loop {
        let ready = match pending.take() {
            Some(result) => Some(result),
            None if buf.capacity() > 0 => from.read_buf(&mut buf).now_or_never(),
            None => None,
        };
        let first = match ready {
            Some(result) => result,
            None => {
                buf = BytesMut::new();
                let result = from.read(&mut first_chunk).await;
                if let Ok(n @ 1..) = result {
                    buf.reserve(buffer.max(FIRST_READ_BYTES));
                    buf.extend_from_slice(&first_chunk[..n]);
                }
                result
            }
        };
        match first {
            Ok(0) => {
                return match to.shutdown().await {
                    Ok(()) => Half::Done(total),
                    // The peer may already be gone; the other direction
                    // reports that if it matters.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Half::Done(total),
                    Err(e) => Half::Failed(to_side, e, total),
                };
            }
            Ok(_) => gather(from, &mut buf, &mut pending),
            Err(e) => return Half::Failed(from_side, e, total),
        }
        // Flush after every write: a TLS stream may keep records buffered
        // that would otherwise wait for the next write.
        let written = async {
            to.write_all(&buf).await?;
            to.flush().await
        };
        if let Err(e) = written.await {
            return Half::Failed(to_side, e, total);
        }
        total += buf.len() as u64;
        buf.clear();
    }
}

/// Appends to `buf` whatever `from` returns without waiting, up to the
/// buffer's capacity. A TLS stream returns one record (at most 16 KiB) per
/// read, so gathering the records already received lets one write carry
/// them all. An EOF or error ends the gathering and is kept in `pending`
/// for the next round.
fn gather<R>(from: &mut R, buf: &mut BytesMut, pending: &mut Option<io::Result<usize>>)
where
    R: AsyncRead + Unpin + ?Sized,
{
    while buf.len() < buf.capacity() {
        match from.read_buf(buf).now_or_never() {
            Some(Ok(0)) => {
                *pending = Some(Ok(0));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                *pending = Some(Err(e));
                break;
            }
            None => break,
        }
    }
}

/// Copies until both directions end or one fails. `buffer` is the read size
/// per direction, in bytes. On [`DuplexEnd::Aborted`] the caller should reset
/// the underlying TCP connections, so that neither peer mistakes the abort
/// for a clean end.
pub async fn copy_duplex<A, B>(
    first: &mut A,
    second: &mut B,
    buffer: usize,
) -> (DuplexEnd, DuplexStats)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = DuplexStats::default();
    let (mut first_read, mut first_write) = tokio::io::split(first);
    let (mut second_read, mut second_write) = tokio::io::split(second);
    let forward = copy_half(
        &mut first_read,
        Side::First,
        &mut second_write,
        Side::Second,
        buffer,
    );
    let backward = copy_half(
        &mut second_read,
        Side::Second,
        &mut first_write,
        Side::First,
        buffer,
    );
    tokio::pin!(forward, backward);
    let (mut forward_done, mut backward_done) = (false, false);
    let end = loop {
        tokio::select! {
            half = &mut forward, if !forward_done => match half {
                Half::Done(n) => { stats.first_to_second = n; forward_done = true; }
                Half::Failed(side, e, n) => {
                    stats.first_to_second = n;
                    break DuplexEnd::Aborted { side, error: e.to_string() };
                }
            },
            half = &mut backward, if !backward_done => match half {
                Half::Done(n) => { stats.second_to_first = n; backward_done = true; }
                Half::Failed(side, e, n) => {
                    stats.second_to_first = n;
                    break DuplexEnd::Aborted { side, error: e.to_string() };
                }
            },
        }
        if forward_done && backward_done {
            break DuplexEnd::Finished;
        }
    };
    (end, stats)
}

/// Makes a TCP socket send RST instead of FIN when it is closed.
pub fn reset_on_close(tcp: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0 on a tunnel socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn half_close_keeps_other_direction() {
        let (mut a, mut a_peer) = tokio::io::duplex(64);
        let (mut b, mut b_peer) = tokio::io::duplex(64);
        let copy = tokio::spawn(async move { copy_duplex(&mut a, &mut b, 16).await });
        a_peer.write_all(b"request").await.expect("write");
        a_peer.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.expect("read to EOF");
        assert_eq!(got, b"request");
        b_peer
            .write_all(b"late answer")
            .await
            .expect("write after EOF");
        b_peer.shutdown().await.expect("close");
        let mut back = Vec::new();
        a_peer.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"late answer");
        let (end, stats) = copy.await.expect("copy task");
        assert_eq!(end, DuplexEnd::Finished);
        assert_eq!(stats.first_to_second, 7);
        assert_eq!(stats.second_to_first, 11);
    }

    /// Data past the first small read goes through the full buffer intact.
    #[tokio::test]
    async fn large_transfer_survives_the_first_read() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut a_peer) = tokio::io::duplex(8192);
        let (mut b, mut b_peer) = tokio::io::duplex(8192);
        let copy = tokio::spawn(async move { copy_duplex(&mut a, &mut b, 16 * 1024).await });
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            a_peer.write_all(&sent).await.expect("write");
            a_peer.shutdown().await.expect("half-close");
            a_peer
        });
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.expect("read to EOF");
        assert_eq!(got.len(), payload.len());
        assert!(got == payload, "the copied bytes differ from the sent ones");
        b_peer.shutdown().await.expect("close");
        let _a_peer = writer.await.expect("writer task");
        let (end, stats) = copy.await.expect("copy task");
        assert_eq!(end, DuplexEnd::Finished);
        assert_eq!(stats.first_to_second, payload.len() as u64);
    }
}
