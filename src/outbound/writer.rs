//! The writer task: drains one connection's queue into its socket in vectored writes.
//!
//! # Batching
//! The writer wakes when the queue goes from empty to non-empty, waits `write_delay` first when
//! the connection is batching ([`Pace::waits_first`](super::gate::Pace::waits_first)), then
//! takes **everything** queued and sends it with as few system calls as the socket allows.
//! Under load the writer wakes less often than frames arrive, so batches form by themselves.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{Conn, WriteTally};
use crate::metrics::Metrics;

/// The write side of an upgraded connection, as the writer gets it.
pub(crate) enum WriteSide {
    /// A TCP stream, shared with the reader; the shard may write to it directly too.
    Tcp(Arc<TcpStream>),
    /// Any other stream (TLS, a custom listener, an in-memory pipe): the writer alone writes.
    Other(Box<dyn AsyncWrite + Send + Unpin>),
}

/// Starts `conn`'s writer task on `side`. For TCP it also attaches the socket to the `Conn`, so
/// the shard may write to it directly; the writer detaches it whenever it ends (see the holder
/// model in the [module docs](super)).
pub(crate) fn spawn(
    conn: Arc<Conn>,
    side: WriteSide,
    write_delay: Duration,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    match side {
        WriteSide::Tcp(stream) => {
            conn.attach_socket(stream.clone(), write_delay);
            let io = TcpWriter(stream);
            tokio::spawn(run(conn, io, write_delay, write_timeout, metrics))
        }
        WriteSide::Other(io) => tokio::spawn(run(conn, io, write_delay, write_timeout, metrics)),
    }
}

/// Detaches the socket from the `Conn` when the writer ends, however it ends: its close written,
/// the socket failed, or the task aborted because the client stopped reading.
struct Detach(Arc<Conn>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.detach_socket();
    }
}

/// Drains `conn`'s queue into `io` until the close frame is written or the socket fails.
async fn run<W>(
    conn: Arc<Conn>,
    mut io: W,
    write_delay: Duration,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
) where
    W: AsyncWrite + Unpin,
{
    let conn = Detach(conn);
    let conn = &*conn.0;
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        conn.writer_wake.notified().await;
        let delay = !conn.is_ending() && conn.writer_waits_first(write_delay);
        // Boxed: the delay and the write (timers, `writev` state) are this task's largest
        // states, and a future is as large as its largest state. Boxing them costs one
        // allocation per batch written, and keeps an idle connection's writer task small.
        let written = Box::pin(async {
            if delay {
                tokio::time::sleep(write_delay).await;
            }
            let closing = conn.take(&mut batch);
            write_frames(&mut io, &batch, write_timeout)
                .await
                .map(|()| closing)
        })
        .await;
        let closing = match written {
            Ok(closing) => closing,
            Err(e) => {
                tracing::debug!(conn_id = %conn.id, error = %e, "write failed");
                conn.fail();
                return;
            }
        };
        conn.written(batch.len());
        let mut tally = WriteTally::default();
        tally.add(batch.iter().map(Bytes::len).sum());
        tally.report(&metrics);
        batch.clear();
        if closing {
            conn.detach_socket();
            let _ = io.shutdown().await;
            return;
        }
        if batch.capacity() > 1024 {
            // A burst is over: give the memory back rather than keep it per idle connection.
            batch = Vec::new();
        }
    }
}

/// The writer's handle on a TCP stream the shard may also write to directly
/// ([`Conn::push_or_write`](super::Conn::push_or_write)): both hold the stream, and the
/// [`Conn`]'s lock keeps their writes apart.
#[derive(Debug)]
pub(super) struct TcpWriter(pub(super) Arc<TcpStream>);

impl TcpWriter {
    fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            // A `WouldBlock` clears the readiness, so the next `poll_write_ready` waits for room.
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return Poll::Ready(res),
            }
        }
    }
}

impl AsyncWrite for TcpWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-closes the stream, as dropping tokio's `OwnedWriteHalf` does.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// Most slices handed to one `writev`. The array lives on the stack only inside `poll`, so it
/// does not enlarge the writer task.
const MAX_IOV: usize = 128;

/// Writes `frames` in order with as few syscalls as the socket allows. A write that makes no
/// progress for `timeout` fails with `TimedOut`.
pub(crate) async fn write_frames<W>(
    io: &mut W,
    frames: &[Bytes],
    timeout: Duration,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let timed_out = || io::Error::from(io::ErrorKind::TimedOut);
    let (mut idx, mut offset) = (0usize, 0usize);
    while idx < frames.len() {
        if idx + 1 == frames.len() {
            let last = &frames[idx][offset..];
            return tokio::time::timeout(timeout, io.write_all(last))
                .await
                .map_err(|_| timed_out())?;
        }
        let write = poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (k, f) in frames[idx..].iter().take(MAX_IOV).enumerate() {
                slices[k] = IoSlice::new(if k == 0 { &f[offset..] } else { &f[..] });
                n += 1;
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
        });
        let written = tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| timed_out())??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let rest = frames[idx].len() - offset;
            if left >= rest {
                left -= rest;
                idx += 1;
                offset = 0;
            } else {
                offset += left;
                left = 0;
            }
        }
    }
    Ok(())
}
