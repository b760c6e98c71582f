//! The copy loop between one QUIC stream and one TCP connection.
//!
//! Endings map both ways: a FIN becomes shutdown(Write) and back; a stream
//! reset (or STOP_SENDING) becomes a TCP RST (SO_LINGER 0) and a TCP RST
//! becomes a stream reset in both directions.

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Codes used when the TCP side ends abruptly.
#[derive(Debug, Clone, Copy)]
pub struct ResetCodes {
    /// Sent as RESET_STREAM and STOP_SENDING when the TCP peer resets.
    pub tcp_reset: VarInt,
}

/// How one pumped tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PumpEnd {
    /// Both directions finished with FIN.
    Finished,
    /// The QUIC peer reset its sending side or stopped ours; the TCP side was reset.
    StreamReset(u64),
    /// The TCP peer reset; the stream was reset with the configured code.
    TcpReset,
    /// The connection ended underneath the stream.
    ConnectionLost(String),
    /// Another I/O error; both sides were reset.
    Error(String),
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct PumpStats {
    /// From the QUIC stream to the TCP connection.
    pub to_tcp: u64,
    /// From the TCP connection to the QUIC stream.
    pub to_stream: u64,
}

enum Half {
    Done(u64),
    Abort(PumpEnd, u64),
}

async fn stream_to_tcp(recv: &mut RecvStream, tcp: &mut WriteHalf<'_>) -> Half {
    // quinn hands over one chunk per received frame (about one packet), so
    // chunks are gathered in batches and written with one writev each.
    const BATCH: usize = 32;
    let mut total = 0u64;
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    loop {
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(count)) => match write_all_vectored(tcp, &mut chunks[..count]).await {
                Ok(written) => total += written,
                Err(e) => return Half::Abort(tcp_error_end(&e), total),
            },
            Ok(None) => {
                // FIN from the stream: half-close the TCP connection.
                let _ = tcp.shutdown().await;
                return Half::Done(total);
            }
            Err(ReadError::Reset(code)) => {
                return Half::Abort(PumpEnd::StreamReset(code.into_inner()), total)
            }
            Err(ReadError::ConnectionLost(e)) => {
                return Half::Abort(PumpEnd::ConnectionLost(e.to_string()), total)
            }
            Err(e) => return Half::Abort(PumpEnd::Error(e.to_string()), total),
        }
    }
}

/// Writes every chunk, using writev and resuming after partial writes.
/// Leaves the chunks empty and returns the number of bytes written.
async fn write_all_vectored(tcp: &mut WriteHalf<'_>, chunks: &mut [Bytes]) -> io::Result<u64> {
    let mut total = 0u64;
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let mut slices = [io::IoSlice::new(&[]); 32];
        let mut used = 0;
        for chunk in chunks[first..]
            .iter()
            .filter(|c| !c.is_empty())
            .take(slices.len())
        {
            slices[used] = io::IoSlice::new(chunk);
            used += 1;
        }
        let mut written = tcp.write_vectored(&slices[..used]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        total += written as u64;
        while written > 0 && first < chunks.len() {
            let len = chunks[first].len();
            if written >= len {
                chunks[first] = Bytes::new();
                written -= len;
                first += 1;
            } else {
                let _ = chunks[first].split_to(written);
                written = 0;
            }
        }
    }
    Ok(total)
}

/// Size of the read that waits for upstream data while a stream has no
/// buffer.
const FIRST_READ_BYTES: usize = 256;

async fn tcp_to_stream(tcp: &mut ReadHalf<'_>, send: &mut SendStream, buffer: usize) -> Half {
    let mut total = 0u64;
    // The read buffer exists only while data flows. When a read finds
    // nothing the buffer is freed, and the wait for the next bytes reads
    // into a small array in the task, so an idle stream has no buffer.
    // The wait is a read, not a readiness check, because a read spends the
    // task's cooperative budget and yields when the budget runs out.
    let mut first_chunk = [0u8; FIRST_READ_BYTES];
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() > 0 && buf.capacity() < buffer / 4 {
            buf.reserve(buffer);
        }
        let ready = match buf.capacity() {
            0 => None,
            _ => tcp.read_buf(&mut buf).now_or_never(),
        };
        let read = match ready {
            Some(read) => read,
            None => {
                buf = BytesMut::new();
                let read = tcp.read(&mut first_chunk).await;
                if let Ok(n @ 1..) = read {
                    buf.reserve(buffer.max(FIRST_READ_BYTES));
                    buf.extend_from_slice(&first_chunk[..n]);
                }
                read
            }
        };
        match read {
            Ok(0) => {
                let _ = send.finish();
                return Half::Done(total);
            }
            Ok(n) => {
                let chunk = buf.split().freeze();
                match send.write_chunk(chunk).await {
                    Ok(()) => total += n as u64,
                    Err(WriteError::Stopped(code)) => {
                        return Half::Abort(PumpEnd::StreamReset(code.into_inner()), total)
                    }
                    Err(WriteError::ConnectionLost(e)) => {
                        return Half::Abort(PumpEnd::ConnectionLost(e.to_string()), total)
                    }
                    Err(e) => return Half::Abort(PumpEnd::Error(e.to_string()), total),
                }
            }
            Err(e) => return Half::Abort(tcp_error_end(&e), total),
        }
    }
}

fn tcp_error_end(e: &io::Error) -> PumpEnd {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => PumpEnd::TcpReset,
        _ => PumpEnd::Error(e.to_string()),
    }
}

/// Copies both ways until both directions end or one side aborts.
/// `buffer` is the read size for the TCP side, in bytes.
pub async fn pump(
    mut send: SendStream,
    mut recv: RecvStream,
    mut tcp: TcpStream,
    codes: ResetCodes,
    buffer: usize,
) -> (PumpEnd, PumpStats) {
    let mut stats = PumpStats::default();
    let outcome = {
        // Borrowed halves: unlike owned halves, dropping them sends no FIN,
        // so an abort below can still end the connection with RST alone.
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let up = stream_to_tcp(&mut recv, &mut tcp_write);
        let down = tcp_to_stream(&mut tcp_read, &mut send, buffer);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                half = &mut up, if !up_done => match half {
                    Half::Done(n) => { stats.to_tcp = n; up_done = true; }
                    Half::Abort(end, n) => { stats.to_tcp = n; break end; }
                },
                half = &mut down, if !down_done => match half {
                    Half::Done(n) => { stats.to_stream = n; down_done = true; }
                    Half::Abort(end, n) => { stats.to_stream = n; break end; }
                },
            }
            if up_done && down_done {
                break PumpEnd::Finished;
            }
        }
    };
    match &outcome {
        PumpEnd::Finished => {}
        PumpEnd::TcpReset => {
            let _ = send.reset(codes.tcp_reset);
            let _ = recv.stop(codes.tcp_reset);
        }
        PumpEnd::StreamReset(code) => {
            // The QUIC peer gave up on the stream: reset the TCP side and
            // abandon the other direction with the same code.
            reset_tcp(&tcp);
            let code = VarInt::from_u64(*code).unwrap_or(VarInt::from_u32(0));
            let _ = send.reset(code);
            let _ = recv.stop(code);
        }
        PumpEnd::ConnectionLost(_) | PumpEnd::Error(_) => {
            reset_tcp(&tcp);
            let _ = send.reset(codes.tcp_reset);
            let _ = recv.stop(codes.tcp_reset);
        }
    }
    (outcome, stats)
}

/// Makes the socket send RST instead of FIN when it closes.
fn reset_tcp(tcp: &TcpStream) {
    let socket = socket2::SockRef::from(tcp);
    if let Err(e) = socket.set_linger(Some(std::time::Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0 on a tunnel socket");
    }
}
