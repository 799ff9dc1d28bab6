//! The writer task: drains one connection's queue into its socket in as few writes as it takes.
//!
//! # Batching
//! The writer wakes when the queue goes from empty to non-empty, waits `write_delay` first when
//! the connection is batching ([`Pace::waits_first`](super::gate::Pace::waits_first)), then
//! takes **everything** queued and sends it with as few system calls as the socket allows: small
//! frames copied into one buffer, larger ones in vectored writes ([`TcpWriter`]).
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

use super::{Conn, Stalled, WriteTally, from_micros, micros};
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
/// the socket failed, or the task aborted because the client stopped reading. Also reports how
/// far over its bound the connection went.
struct Detach(Arc<Conn>, Arc<Metrics>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.detach_socket();
        self.1.outbound_queue_peak(self.0.peak());
    }
}

/// The writer's durations, in microseconds (saturated): an idle connection's writer task holds
/// them, and three `Duration`s would take four times the room.
#[derive(Clone, Copy)]
struct Timing {
    delay_us: u32,
    timeout_us: u32,
    check_every_us: u32,
}

/// Drains `conn`'s queue into `io` until the close frame is written or the socket fails.
///
/// Not an `async fn`: its arguments would be kept in the task twice (as arguments and as the
/// locals they move into), in every idle connection's writer task.
fn run<W>(
    conn: Arc<Conn>,
    mut io: W,
    write_delay: Duration,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
) -> impl Future<Output = ()>
where
    W: AsyncWrite + Unpin,
{
    let timing = Timing {
        delay_us: micros(write_delay),
        timeout_us: micros(write_timeout),
        check_every_us: micros(conn.stall_check_every(write_timeout)),
    };
    let detach = Detach(conn, metrics);
    async move {
        loop {
            // `conn` and `metrics` are bound between the awaits, never across one: the task
            // holds no copies of them (see `run`'s docs).
            detach.0.writer_wake.notified().await;
            let conn = &*detach.0;
            let delay = !conn.is_ending() && conn.writer_waits_first(from_micros(timing.delay_us));
            // Boxed: the delay and the write (timers, `writev` state) are this task's largest
            // states, and a future is as large as its largest state. Boxing them costs one
            // allocation per batch written, and keeps an idle connection's writer task small.
            let written = Box::pin(async {
                let (conn, metrics) = (&*detach.0, &*detach.1);
                if delay {
                    tokio::time::sleep(from_micros(timing.delay_us)).await;
                }
                // The batch's vector is not kept across the wait for the next one (it would take
                // room in every idle connection's task): it comes from the thread's spare.
                let mut batch = spare_batch();
                let closing = conn.take(&mut batch);
                // A batch that ends with the close frame is written whole: cutting it would lose
                // the close.
                let mut stalled = || {
                    if closing {
                        return false;
                    }
                    match conn.writer_stalled() {
                        Stalled::Wait => false,
                        Stalled::Cut => true,
                        Stalled::CutLagged => {
                            metrics.add_slow_consumers(1);
                            true
                        }
                    }
                };
                // A write the socket took only part of: what is left is all the batch still holds.
                let mut progress = |unwritten| conn.batch_progress(unwritten);
                let timing = WriteTiming {
                    timeout: from_micros(timing.timeout_us),
                    check_every: from_micros(timing.check_every_us),
                };
                write_frames(&mut io, &batch, timing, &mut stalled, &mut progress)
                    .await
                    .map(|wrote| (closing, wrote, batch))
            })
            .await;
            // Settled in a plain function, so nothing of the batch is kept in the task
            // across the close's shutdown below.
            match settle(&detach.0, &detach.1, written) {
                Settled::More => {}
                Settled::Closing => {
                    detach.0.detach_socket();
                    let _ = io.shutdown().await;
                    return;
                }
                Settled::Failed => return,
            }
        }
    }
}

/// What a writer does after a batch.
enum Settled {
    /// Waits for the next batch.
    More,
    /// The batch ended with the close frame: shut the socket down and stop.
    Closing,
    /// The write failed: the connection has failed, stop.
    Failed,
}

/// Books a written batch (`written`: whether it ended with the close, how far it went, the
/// frames) into `conn` and `metrics`.
fn settle(
    conn: &Conn,
    metrics: &Metrics,
    written: io::Result<(bool, Wrote, Vec<Bytes>)>,
) -> Settled {
    let (closing, wrote, batch) = match written {
        Ok(done) => done,
        Err(e) => {
            tracing::debug!(conn_id = %conn.id, error = %e, "write failed");
            conn.fail();
            return Settled::Failed;
        }
    };
    let mut tally = WriteTally::default();
    match wrote {
        Wrote::All => {
            conn.written(batch.len());
            tally.add(batch.iter().map(Bytes::len).sum());
        }
        Wrote::Cut { frames, offset } => {
            // The rest of the batch is dropped; what is left of the frame in progress goes
            // first, before the close.
            let rest = (offset > 0).then(|| batch[frames].slice(offset..));
            conn.cut(frames, rest);
            tally.add(batch[..frames].iter().map(Bytes::len).sum::<usize>() + offset);
        }
    }
    tally.report(metrics);
    return_batch(batch);
    if closing {
        Settled::Closing
    } else {
        Settled::More
    }
}

thread_local! {
    /// One emptied batch vector per worker thread, reused by the writers that run on it, so a
    /// writer neither keeps a vector while idle nor allocates one for every batch.
    static SPARE_BATCH: std::cell::Cell<Vec<Bytes>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty vector for a batch: the thread's spare, or a new one.
fn spare_batch() -> Vec<Bytes> {
    SPARE_BATCH.with(std::cell::Cell::take)
}

/// Gives a written batch's vector back as the thread's spare, emptied; one that grew large in a
/// burst is dropped instead, to give its memory back.
fn return_batch(mut batch: Vec<Bytes>) {
    if batch.capacity() > 1024 {
        return;
    }
    batch.clear();
    SPARE_BATCH.with(|spare| {
        // Keeps the larger of the two.
        let held = spare.take();
        spare.set(if held.capacity() >= batch.capacity() {
            held
        } else {
            batch
        });
    });
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

    /// Small frames are copied into one buffer and written with one plain `write`: the kernel
    /// copies a contiguous buffer faster than it walks an iovec of small pieces, and one call
    /// takes up to [`COALESCE_MAX`] bytes instead of [`MAX_IOV`] pieces.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| match coalescible(bufs) {
            0 => s.try_write_vectored(bufs),
            n => COALESCED.with_borrow_mut(|out| {
                out.clear();
                for buf in &bufs[..n] {
                    out.extend_from_slice(buf);
                }
                s.try_write(out)
            }),
        })
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

/// Most bytes [`TcpWriter`] copies into one buffer for one `write`.
const COALESCE_MAX: usize = 64 * 1024;

/// Frames up to this size, on average, are copied rather than handed to `writev`.
const COALESCE_FRAME: usize = 256;

thread_local! {
    /// The worker thread's buffer for coalesced frames: filled and written within one poll.
    static COALESCED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many of `bufs`, from the first, to copy into one buffer: none when there is only one or
/// they are large on average (a vectored write costs less then).
fn coalescible(bufs: &[IoSlice<'_>]) -> usize {
    if bufs.len() < 2 {
        return 0;
    }
    let (mut n, mut total) = (0, 0);
    for buf in bufs {
        if total + buf.len() > COALESCE_MAX {
            break;
        }
        total += buf.len();
        n += 1;
    }
    if n < 2 || total > n * COALESCE_FRAME {
        0
    } else {
        n
    }
}

/// Most slices handed to one `writev`.
const MAX_IOV: usize = 512;

/// The slices of one `writev`, built inside `poll` so they do not enlarge the writer task. Only
/// the slots used are written; a batch of more than 64 frames spills to the heap, once per write.
type IoSlices<'a> = smallvec::SmallVec<[IoSlice<'a>; 64]>;

/// How [`write_frames`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wrote {
    /// Every frame was written.
    All,
    /// Stopped, as `stalled` asked, after `frames` whole frames and `offset` bytes of the next.
    Cut { frames: usize, offset: usize },
}

/// How long [`write_frames`] waits on a write that makes no progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteTiming {
    /// A write that makes no progress for this long fails with `TimedOut`.
    pub(crate) timeout: Duration,
    /// How often `stalled` is asked meanwhile.
    pub(crate) check_every: Duration,
}

/// Writes `frames` in order with as few syscalls as the socket allows. A write that makes no
/// progress for `timing.timeout` fails with `TimedOut`. While a write makes no progress,
/// `stalled` is asked every `timing.check_every`; once it says so, the batch stops where it is
/// ([`Wrote::Cut`]). The timer is the one a blocked write has anyway, not one per frame or per
/// write. After a write that leaves part of the batch unwritten (the socket is full),
/// `progress` is told how many bytes are left; a batch written in one go costs no call.
pub(crate) async fn write_frames<W>(
    io: &mut W,
    frames: &[Bytes],
    timing: WriteTiming,
    stalled: &mut impl FnMut() -> bool,
    progress: &mut impl FnMut(usize),
) -> io::Result<Wrote>
where
    W: AsyncWrite + Unpin,
{
    let WriteTiming {
        timeout,
        check_every,
    } = timing;
    let mut unwritten: usize = frames.iter().map(Bytes::len).sum();
    let (mut idx, mut offset) = (0usize, 0usize);
    while idx < frames.len() {
        if offset == frames[idx].len() {
            // An empty frame (a failed socket's close marker) has nothing to write.
            idx += 1;
            offset = 0;
            continue;
        }
        let write = poll_fn(|cx| {
            if idx + 1 == frames.len() {
                return Pin::new(&mut *io).poll_write(cx, &frames[idx][offset..]);
            }
            let slices: IoSlices<'_> = (frames[idx..].iter().take(MAX_IOV).enumerate())
                .map(|(k, f)| IoSlice::new(if k == 0 { &f[offset..] } else { &f[..] }))
                .collect();
            Pin::new(&mut *io).poll_write_vectored(cx, &slices)
        });
        tokio::pin!(write);
        let mut waited = Duration::ZERO;
        let written = loop {
            let slice = check_every.min(timeout - waited);
            match tokio::time::timeout(slice, &mut write).await {
                Ok(res) => break res?,
                Err(_) => {
                    waited += slice;
                    if stalled() {
                        return Ok(Wrote::Cut {
                            frames: idx,
                            offset,
                        });
                    }
                    if waited >= timeout {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
            }
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        unwritten -= written;
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
        if unwritten > 0 {
            progress(unwritten);
        }
    }
    Ok(Wrote::All)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices(lens: &[usize]) -> Vec<Vec<u8>> {
        lens.iter().map(|&n| vec![0; n]).collect()
    }

    fn coalesced(lens: &[usize]) -> usize {
        let bufs = slices(lens);
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        coalescible(&slices)
    }

    #[test]
    fn small_frames_are_copied_up_to_the_cap_and_large_ones_are_not() {
        assert_eq!(coalesced(&[100]), 0, "one frame goes as it is");
        assert_eq!(coalesced(&[100, 200, 300]), 3);
        // Up to the cap, from the first.
        let many = vec![COALESCE_FRAME; 1000];
        assert_eq!(coalesced(&many), COALESCE_MAX / COALESCE_FRAME);
        // Large on average: handed to `writev`.
        let large = 2 * COALESCE_FRAME;
        assert_eq!(coalesced(&[large, large, 10]), 0);
        // A first frame larger than the cap leaves nothing to copy.
        assert_eq!(coalesced(&[COALESCE_MAX + 1, 10, 10]), 0);
    }
}
