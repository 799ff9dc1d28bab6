//! The publishing side of the Redis broker: one connection, pipelined, written by our own RESP
//! encoder.
//!
//! Callers hand a request (channel, payload, reply slot) to the connection's task over a bounded
//! channel. The task takes every request waiting, encodes them into one buffer and writes it
//! with one system call; it reads Redis's replies in bulk and answers the callers in order. So
//! under load one `write` and one `read` serve many publishes, and a publish costs no
//! allocation beyond its reply slot. (redis-rs's multiplexed connection, used before, spent
//! about 17% of the server's core at 30 000 publishes/s in the chat test:
//! docs/performance-notes.md#chat-path-profile.)
//!
//! # Failures
//! - The connection is made on the first publish after none exists, and dropped when it fails.
//! - A request whose connection was lost before it was written is tried once more, on a new
//!   connection. One that was written and then lost without an answer may have been carried
//!   out: a plain PUBLISH and a read ([`Publisher::call`]) are tried once more too (a PUBLISH can
//!   then be delivered twice), but a command sent with [`Publisher::call_with`] without
//!   `resend` (the position script, which would give the publication a second offset) fails
//!   with an error that says its outcome is unknown.
//! - Every publish is bounded by [`PUBLISH_TIMEOUT`]: past it the caller gets
//!   [`PublishError::Timeout`]. The connection is replaced only if Redis answered nothing on it
//!   during that caller's whole wait (a frozen server, which would otherwise time out forever);
//!   a connection that kept answering is only slow, and the other publishes in flight on it
//!   are still answered (the late reply to the timed-out one is read and discarded in order).
//! - Redis's error reply fails that publish alone; the connection stays.
//! - [`Publisher::link_down`] tells the broker whether the last failure left no connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::PublishError;
use super::connect::{Target, connect};
use super::resp::{self, Value};

/// Requests waiting for the connection's task; a caller past this waits for room (within its
/// timeout).
/// Longest a publish may take before the caller gets [`PublishError::Timeout`].
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

const QUEUE: usize = 4096;
/// Most requests encoded into one write.
const WRITE_BATCH: usize = 256;

/// Why a request got no success.
#[derive(Debug)]
enum Failure {
    /// The connection was lost (or never made) before the request was written: Redis never saw
    /// it, so one more try is always safe.
    Lost(String),
    /// The request was written, then the connection was lost before Redis answered: Redis may
    /// or may not have carried it out.
    Unanswered(String),
    /// Redis answered with an error.
    Refused(String),
}

/// What one request asks Redis.
#[derive(Clone)]
pub(crate) enum Command {
    /// `PUBLISH channel payload`: the plain path, answered by `Ok(None)`.
    Publish { channel: Bytes, payload: Bytes },
    /// Any other command, given whole; answered by Redis's reply.
    Call(Vec<Bytes>),
    /// `ASKING`, then the command, in the same write: a cluster node takes the command for a
    /// slot being migrated to it only right after an `ASKING` on the same connection.
    Asking(Vec<Bytes>),
}

struct Request {
    command: Command,
    reply: oneshot::Sender<Result<Option<Value>, Failure>>,
}

/// The current connection: its generation and the sender of its task's queue. Dropping it
/// (with every clone of `queue`) ends the task; `_stop` ends it at once.
struct Link {
    generation: u64,
    queue: mpsc::Sender<Request>,
    /// Replies read on this connection so far.
    answers: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

pub(crate) struct Publisher {
    target: Arc<Target>,
    /// `PUBLISH`, or `SPUBLISH` on a cluster (sharded Pub/Sub).
    verb: &'static [u8],
    /// A std mutex held only to clone or swap, never across an await.
    link: Mutex<(u64, Option<Link>)>,
}

impl Publisher {
    pub(crate) fn new(target: Target) -> Self {
        Self {
            target: Arc::new(target),
            verb: b"PUBLISH",
            link: Mutex::new((0, None)),
        }
    }

    /// Publishes with `SPUBLISH` (a cluster's sharded Pub/Sub) instead of `PUBLISH`.
    pub(crate) fn sharded(mut self) -> Self {
        self.verb = b"SPUBLISH";
        self
    }

    /// The publish command's name.
    pub(crate) fn verb(&self) -> &'static [u8] {
        self.verb
    }

    /// The current connection's generation, queue and reply count, starting one if there is
    /// none.
    fn current(&self) -> (u64, mpsc::Sender<Request>, Arc<AtomicU64>) {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        let (last, slot) = &mut *link;
        if let Some(l) = slot {
            return (l.generation, l.queue.clone(), l.answers.clone());
        }
        *last += 1;
        let (queue, rx) = mpsc::channel(QUEUE);
        let (stop, stopped) = oneshot::channel();
        let answers = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(
            self.target.clone(),
            self.verb,
            rx,
            stopped,
            answers.clone(),
        ));
        *slot = Some(Link {
            generation: *last,
            queue: queue.clone(),
            answers: answers.clone(),
            _stop: stop,
        });
        (*last, queue, answers)
    }

    /// Whether there is no connection now: the last one was lost or given up as silent (and
    /// none was started since).
    pub(crate) fn link_down(&self) -> bool {
        self.link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .is_none()
    }

    /// Drops the current connection, whatever its state: the next publish makes a new one (to
    /// the new primary, after a Sentinel failover). Publishes waiting on the old one are tried
    /// once more on the new one.
    pub(crate) fn reconnect(&self) {
        let old = self.link.lock().unwrap_or_else(|e| e.into_inner()).1.take();
        drop(old);
    }

    /// Drops connection `generation`, if it is still the current one.
    fn drop_link(&self, generation: u64) {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if link.1.as_ref().is_some_and(|l| l.generation == generation) {
            link.1 = None;
        }
    }

    /// Publishes `payload` on `channel`, within [`PUBLISH_TIMEOUT`].
    pub(crate) async fn publish(&self, channel: Bytes, payload: Bytes) -> Result<(), PublishError> {
        self.send(Command::Publish { channel, payload }, true)
            .await
            .map(|_| ())
    }

    /// Sends `args` as one command on the pipelined connection, within [`PUBLISH_TIMEOUT`] and
    /// with the same retry as a publish; Redis's reply, `Err` for an error reply.
    pub(crate) async fn call(&self, args: Vec<Bytes>) -> Result<Value, PublishError> {
        self.send(Command::Call(args), true)
            .await
            .map(|v| v.unwrap_or(Value::Bulk(None)))
    }

    /// [`call`](Self::call), preceded by `ASKING` when `asking` (a cluster's `ASK`
    /// redirection). With `resend` false, for a command that must not run twice: it is tried
    /// once more only if it was never written; lost after it was written, it fails with
    /// [`PublishError::Unavailable`] saying that Redis may have carried it out.
    pub(crate) async fn call_with(
        &self,
        args: Vec<Bytes>,
        resend: bool,
        asking: bool,
    ) -> Result<Value, PublishError> {
        let command = if asking {
            Command::Asking(args)
        } else {
            Command::Call(args)
        };
        self.send(command, resend)
            .await
            .map(|v| v.unwrap_or(Value::Bulk(None)))
    }

    /// Sends `command`, once more after a lost connection if it never reached Redis, or if
    /// `resend` allows it to run twice.
    async fn send(&self, command: Command, resend: bool) -> Result<Option<Value>, PublishError> {
        // The connection the request went to last, and its reply count before it was sent.
        let used: Mutex<Option<(u64, Arc<AtomicU64>, u64)>> = Mutex::new(None);
        let attempt = async {
            let mut retried = false;
            loop {
                let (generation, queue, answers) = self.current();
                let before = answers.load(Ordering::Acquire);
                *used.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((generation, answers, before));
                let (reply, answer) = oneshot::channel();
                let request = Request {
                    command: command.clone(),
                    reply,
                };
                let res = match queue.send(request).await {
                    // A reply slot dropped unanswered: the task ended, whether or not the
                    // request was written.
                    Ok(()) => answer
                        .await
                        .unwrap_or_else(|_| Err(Failure::Unanswered("connection ended".into()))),
                    Err(_) => Err(Failure::Lost("connection ended".into())),
                };
                match res {
                    Err(Failure::Lost(_)) if !retried => {
                        self.drop_link(generation);
                        retried = true;
                    }
                    Err(Failure::Unanswered(_)) if resend && !retried => {
                        self.drop_link(generation);
                        retried = true;
                    }
                    Err(Failure::Lost(e)) => {
                        self.drop_link(generation);
                        return Err(PublishError::Unavailable(e));
                    }
                    Err(Failure::Unanswered(e)) => {
                        self.drop_link(generation);
                        return Err(PublishError::Unavailable(format!(
                            "{e}: the connection to Redis was lost after the command was sent, \
                             so Redis may have carried it out"
                        )));
                    }
                    Err(Failure::Refused(e)) => return Err(PublishError::Unavailable(e)),
                    Ok(v) => return Ok(v),
                }
            }
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, attempt).await {
            Ok(res) => res,
            Err(_) => {
                let used = used.into_inner().unwrap_or_else(|e| e.into_inner());
                if let Some((generation, answers, before)) = used {
                    // Silent for this caller's whole wait: dead, or a frozen server. A
                    // connection that answered meanwhile is kept for the publishes behind.
                    if answers.load(Ordering::Acquire) == before {
                        self.drop_link(generation);
                    }
                }
                Err(PublishError::Timeout)
            }
        }
    }
}

/// Replies owed, in the order their requests were written. Shared by the two halves of
/// [`serve`], which run in one task: the lock is never contended, and never held across an
/// await.
#[derive(Default)]
struct Owed(Mutex<VecDeque<(bool, Reply)>>);

/// Where a request's answer goes.
type Reply = oneshot::Sender<Result<Option<Value>, Failure>>;

impl Owed {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(bool, Reply)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs one connection: connects, then writes requests and answers them from Redis's replies
/// until the connection fails, `stop` fires or every sender of `queue` is gone. Whatever was
/// not answered then fails: with [`Failure::Unanswered`] if it was written, [`Failure::Lost`]
/// if not.
async fn run(
    target: Arc<Target>,
    verb: &'static [u8],
    mut queue: mpsc::Receiver<Request>,
    stop: oneshot::Receiver<()>,
    answers: Arc<AtomicU64>,
) {
    let owed = Owed::default();
    let why = tokio::select! {
        _ = stop => "connection replaced".to_string(),
        why = serve(&target, verb, &mut queue, &owed, &answers) => why,
    };
    tracing::debug!(error = %why, "redis publisher connection ended");
    for (_, reply) in owed.lock().drain(..) {
        let _ = reply.send(Err(Failure::Unanswered(why.clone())));
    }
    queue.close();
    while let Ok(request) = queue.try_recv() {
        let _ = request.reply.send(Err(Failure::Lost(why.clone())));
    }
}

/// The connection's work; returns why it ended.
async fn serve(
    target: &Target,
    verb: &'static [u8],
    queue: &mut mpsc::Receiver<Request>,
    owed: &Owed,
    answers: &AtomicU64,
) -> String {
    let stream = match connect(target).await {
        Ok(stream) => stream,
        Err(e) => return format!("connect to {target}: {e}"),
    };
    let (mut read, mut write) = stream.into_split();
    let writing = async {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut out = Vec::new();
        loop {
            if queue.recv_many(&mut batch, WRITE_BATCH).await == 0 {
                return "publisher dropped".to_string();
            }
            if batch.len() < WRITE_BATCH {
                // Let the tasks that are ready to run (readers handling messages, say) queue
                // their publishes first: one write then carries them all. Under load that
                // turned about two publishes per write into many; when nothing else is ready,
                // it costs one extra poll.
                tokio::task::yield_now().await;
                while batch.len() < WRITE_BATCH {
                    match queue.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
            }
            {
                let mut owed = owed.lock();
                for r in batch.drain(..) {
                    let keep = match &r.command {
                        Command::Publish { channel, payload } => {
                            resp::encode_command(
                                &mut out,
                                [verb, &channel[..], &payload[..]].into_iter(),
                            );
                            false
                        }
                        Command::Call(args) => {
                            resp::encode_command(&mut out, args.iter().map(|a| &a[..]));
                            true
                        }
                        Command::Asking(args) => {
                            // ASKING's own `+OK` goes to a slot nobody waits on.
                            resp::encode_command(&mut out, [&b"ASKING"[..]].into_iter());
                            owed.push_back((false, oneshot::channel().0));
                            resp::encode_command(&mut out, args.iter().map(|a| &a[..]));
                            true
                        }
                    };
                    owed.push_back((keep, r.reply));
                }
            }
            // `flush`: a TLS stream may hold the end of what it was given.
            if let Err(e) = async {
                write.write_all(&out).await?;
                write.flush().await
            }
            .await
            {
                return format!("write: {e}");
            }
            out.clear();
            if out.capacity() > 1 << 20 {
                // A burst of large payloads is over: do not keep its buffer.
                out = Vec::new();
            }
        }
    };
    let reading = async {
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            loop {
                let value = match resp::parse(&mut buf) {
                    Ok(Some(value)) => value,
                    Ok(None) => break,
                    Err(e) => return format!("protocol: {}", e.0),
                };
                let Some((keep, reply)) = owed.lock().pop_front() else {
                    return "a reply that answers no request".to_string();
                };
                answers.fetch_add(1, Ordering::Release);
                let _ = reply.send(match value {
                    Value::Error(e) => Err(Failure::Refused(String::from_utf8_lossy(&e).into())),
                    value if keep => Ok(Some(value)),
                    _ => Ok(None),
                });
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(4096);
            }
            match read.read_buf(&mut buf).await {
                Ok(0) => return "closed by Redis".to_string(),
                Ok(_) => {}
                Err(e) => return format!("read: {e}"),
            }
        }
    };
    tokio::select! {
        why = writing => why,
        why = reading => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A stand-in for Redis on loopback: `serve` answers each accepted connection.
    async fn fake_redis<F, Fut>(serve: F) -> Publisher
    where
        F: Fn(usize, TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(n, stream));
            }
        });
        Publisher::new(loopback(port))
    }

    fn loopback(port: u16) -> Target {
        Target::from_url(&format!("redis://127.0.0.1:{port}/"), None).unwrap()
    }

    /// A stand-in whose first connection gets `first`, and every later one answers `:1`.
    async fn first_misbehaves<Fut>(first: fn(TcpStream) -> Fut) -> Publisher
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        fake_redis(move |n, stream| async move {
            if n == 0 {
                first(stream).await;
            } else {
                answer_commands(stream, |_| b":1\r\n".to_vec()).await;
            }
        })
        .await
    }

    async fn publish(publisher: &Publisher, payload: &'static [u8]) -> Result<(), PublishError> {
        publisher
            .publish(Bytes::from_static(b"room"), Bytes::from_static(payload))
            .await
    }

    /// Reads commands off `stream` and answers each with what `answer` returns for it.
    async fn answer_commands(mut stream: TcpStream, answer: impl Fn(&[Value]) -> Vec<u8>) {
        let mut buf = BytesMut::new();
        loop {
            while let Some(Value::Array(Some(parts))) = resp::parse(&mut buf).unwrap() {
                let reply = answer(&parts);
                if stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    }

    fn payload_of(parts: &[Value]) -> Vec<u8> {
        match &parts[2] {
            Value::Bulk(Some(b)) => b.to_vec(),
            other => panic!("not a PUBLISH payload: {other:?}"),
        }
    }

    #[tokio::test]
    async fn concurrent_publishes_are_answered_in_order_errors_included() {
        let publisher = Arc::new(
            fake_redis(|_, stream| {
                answer_commands(stream, |parts| {
                    assert!(matches!(&parts[0], Value::Bulk(Some(v)) if &v[..] == b"PUBLISH"));
                    if payload_of(parts) == b"refuse me" {
                        b"-ERR refused for the test\r\n".to_vec()
                    } else {
                        b":1\r\n".to_vec()
                    }
                })
            })
            .await,
        );
        let mut tasks = Vec::new();
        for i in 0..500 {
            let p = publisher.clone();
            tasks.push(tokio::spawn(async move {
                let payload = if i == 250 {
                    Bytes::from_static(b"refuse me")
                } else {
                    Bytes::from(format!("message {i}"))
                };
                p.publish(Bytes::from_static(b"room"), payload).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            match (i, t.await.unwrap()) {
                (250, Err(PublishError::Unavailable(e))) => {
                    assert!(e.contains("refused for the test"), "{e}")
                }
                (250, other) => panic!("the refused publish got {other:?}"),
                (_, res) => assert!(res.is_ok(), "publish {i}: {res:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_publish_whose_connection_is_lost_is_tried_once_more_on_a_new_one() {
        // The first connection reads the command, then hangs up without answering.
        let publisher = first_misbehaves(|mut stream| async move {
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
        })
        .await;
        let res = publish(&publisher, b"hi").await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn a_command_lost_after_it_was_sent_is_not_sent_again_without_resend() {
        // Every connection reads commands and counts them; the first hangs up after its first
        // command, unanswered (the script ran, its reply never came back), later ones answer.
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        let publisher = fake_redis(move |n, mut stream| {
            let seen = counted.clone();
            async move {
                let mut buf = BytesMut::new();
                loop {
                    while let Some(Value::Array(Some(_))) = resp::parse(&mut buf).unwrap() {
                        seen.fetch_add(1, Ordering::SeqCst);
                        if n == 0 {
                            return;
                        }
                        if stream.write_all(b":7\r\n").await.is_err() {
                            return;
                        }
                    }
                    if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
            }
        })
        .await;
        let script = || vec![Bytes::from_static(b"EVALSHA"), Bytes::from_static(b"x")];
        match publisher.call_with(script(), false, false).await {
            Err(PublishError::Unavailable(e)) => assert!(e.contains("may have"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.load(Ordering::SeqCst), 1, "sent once, never again");
        // The next command goes to a new connection and is answered.
        assert!(matches!(
            publisher.call_with(script(), false, false).await,
            Ok(Value::Int(7))
        ));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_and_the_connection_is_replaced() {
        // The first connection reads and never answers, keeping the socket open.
        let publisher = first_misbehaves(|mut stream| async move {
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
        })
        .await;
        let first = publish(&publisher, b"1").await;
        assert!(matches!(first, Err(PublishError::Timeout)), "{first:?}");
        let second = publish(&publisher, b"2").await;
        assert!(second.is_ok(), "{second:?}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        match publish(&Publisher::new(loopback(port)), b"hi").await {
            Err(PublishError::Unavailable(e)) => assert!(e.contains("connect to"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_timeout_of_one_publish_does_not_fail_the_others_the_connection_answers() {
        // The first connection answers in order, each command no sooner than its delay after it
        // arrived: "slow" takes longer than PUBLISH_TIMEOUT, "early" a little. Every later
        // connection never answers.
        let publisher = Arc::new(
            fake_redis(|n, stream| async move {
                let (mut read, mut write) = stream.into_split();
                if n > 0 {
                    let mut buf = Vec::new();
                    let _ = read.read_to_end(&mut buf).await;
                    return;
                }
                let (due_tx, mut due_rx) = mpsc::unbounded_channel::<tokio::time::Instant>();
                tokio::spawn(async move {
                    while let Some(due) = due_rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        if write.write_all(b":1\r\n").await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = BytesMut::new();
                let mut last = tokio::time::Instant::now();
                loop {
                    while let Some(Value::Array(Some(parts))) = resp::parse(&mut buf).unwrap() {
                        let delay = match &payload_of(&parts)[..] {
                            b"slow" => PUBLISH_TIMEOUT + Duration::from_millis(300),
                            b"early" => Duration::from_millis(400),
                            _ => Duration::ZERO,
                        };
                        last = last.max(tokio::time::Instant::now() + delay);
                        let _ = due_tx.send(last);
                    }
                    if read.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
            })
            .await,
        );
        let (p1, p2) = (publisher.clone(), publisher.clone());
        let early = tokio::spawn(async move { publish(&p1, b"early").await });
        let slow = tokio::spawn(async move { publish(&p2, b"slow").await });
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Written behind "slow" on a connection that answers: "slow" times out, and this one
        // is still answered on the same connection.
        let later = publish(&publisher, b"later").await;
        assert!(early.await.unwrap().is_ok());
        let slow = slow.await.unwrap();
        assert!(matches!(slow, Err(PublishError::Timeout)), "{slow:?}");
        assert!(later.is_ok(), "{later:?}");
    }
}
