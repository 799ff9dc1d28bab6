//! One connection's life: admitted, subscribed, `on_connect`, read and handle messages, close,
//! clean up, `on_disconnect`.
//!
//! Every connection starts the same way, whether [`upgrade_handler`] accepted it or a bench
//! drives one over a pipe: [`admit`] takes a connection slot, [`Admitted::join_and_spawn_as`]
//! spawns a new [`Conn`]'s task, which subscribes it to its topic (the caller waits for that),
//! then waits for the upgraded socket and runs [`run`].
//!
//! Two tasks serve a connection. The connection task reads ([`read`]): it parses frames, answers
//! pings, runs the handler, and owns the lifecycle. The writer task
//! ([`outbound::spawn_writer`]) drains the outbound queue. They share only the [`Conn`].
//!
//! Whatever ends the connection — the client's close, a dropped TCP connection, a protocol
//! violation, the slow-consumer policy, shutdown, a panicking handler — the same tail runs once:
//! stop the writer, leave the shard, call `on_disconnect` (invariant 6, docs/architecture.md).
//!
//! [`upgrade_handler`]: crate::ws::upgrade::upgrade_handler

mod pacing;
mod read;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::deflate::Agreed;
use crate::frame::close_code;
use crate::handler::{ConnectionContext, MessageHandler};
use crate::outbound::{self, Conn, WriteSide};
use crate::presence::Identity;
use crate::runtime::{Admission, JoinOutcome, Rtk1Conn};
use crate::service::WebsocketService;
use crate::sink::WsSink;
use crate::wire::Format;

pub(crate) use read::Inbound;

/// An upgraded connection's socket: its read side, what the client sent along with the upgrade
/// request, and its write side.
pub(crate) struct Upgraded {
    pub(crate) read: Inbound,
    /// Bytes that arrived with the upgrade request, read before any from `read`.
    pub(crate) pre_read: BytesMut,
    pub(crate) write: WriteSide,
}

impl Upgraded {
    /// A TCP stream: the reader and the writer share it, with no lock between them (see the
    /// holder model in `outbound`).
    pub(crate) fn tcp(stream: TcpStream, pre_read: BytesMut) -> Self {
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        Self {
            read: Inbound::Tcp(stream.clone()),
            pre_read,
            write: WriteSide::Tcp(stream),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The service is shutting down.
    ShuttingDown,
    /// `max_connections` are open.
    Full,
}

/// A connection slot, taken by [`admit`] and held until the connection has ended.
pub(crate) struct Admitted<H: MessageHandler> {
    service: Arc<WebsocketService<H>>,
    admission: Admission,
}

/// Takes a connection slot, unless the service is shutting down or full.
pub(crate) fn admit<H: MessageHandler>(
    service: &Arc<WebsocketService<H>>,
) -> Result<Admitted<H>, Refused> {
    if service.runtime.is_shutting_down() {
        return Err(Refused::ShuttingDown);
    }
    let admission = service.runtime.try_admit().ok_or(Refused::Full)?;
    Ok(Admitted {
        service: service.clone(),
        admission,
    })
}

/// How a client asked to open its connection: the format it speaks and, for `rtk1`, the
/// position it recovers its first topic from (an epoch and the last offset it has).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Opening {
    pub(crate) format: Format,
    pub(crate) since: Option<(String, u64)>,
}

/// A spawned connection: its task, and a weak handle on its shared state (read by the benches).
#[cfg_attr(not(any(test, feature = "__bench_api")), allow(dead_code))]
pub(crate) struct Spawned {
    pub(crate) task: JoinHandle<()>,
    pub(crate) conn: Weak<Conn>,
}

impl<H: MessageHandler> Admitted<H> {
    /// [`join_and_spawn_as`](Self::join_and_spawn_as) for a plain connection without
    /// permessage-deflate (the benches' entry).
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) async fn join_and_spawn<F>(
        self,
        topic: String,
        user_id: H::UserId,
        socket: F,
    ) -> Spawned
    where
        F: Future<Output = Option<Upgraded>> + Send + 'static,
    {
        self.join_and_spawn_as(Opening::default(), topic, user_id, None, socket)
            .await
    }

    /// Spawns a new connection's task, opened as `opening` says and with what was agreed about
    /// permessage-deflate, which subscribes it to `topic`, then waits for `socket` (the upgrade
    /// completing) and runs the connection; resolves once the subscription is in
    /// place. A `socket` that resolves to `None` (the upgrade never completed) undoes the
    /// subscription. The slot is released when the task ends.
    ///
    /// Subscribing comes first so that a client that saw the upgrade succeed receives everything
    /// published from then on (with Redis: once Redis confirmed the subscription). What arrives
    /// before the writer starts waits in the connection's bounded queue.
    ///
    /// The join runs in the spawned task, not in the caller's future: hyper drops the request's
    /// future when the client hangs up before the 101, and a join dropped halfway would leave
    /// the `Conn` in its shard and its Redis subscription behind, with no task left to remove
    /// them and its slot released. The task finishes the join whatever becomes of the caller,
    /// and then finds the upgrade failed and removes the connection.
    pub(crate) async fn join_and_spawn_as<F>(
        self,
        opening: Opening,
        topic: String,
        user_id: H::UserId,
        deflate: Option<Agreed>,
        socket: F,
    ) -> Spawned
    where
        F: Future<Output = Option<Upgraded>> + Send + 'static,
    {
        let Self { service, admission } = self;
        let conn = service.runtime.new_conn_as(opening.format, deflate);
        let who = service.identity(&user_id);
        let weak = Arc::downgrade(&conn);
        let (joined_tx, joined) = oneshot::channel();
        // Two phases, so that the connection's long-lived future does not also carry the
        // short-lived state of its start: the join and the wait for the upgrade run boxed, and
        // hand over the future of the connection's life (`run`), which the task then polls in
        // place.
        let start = Box::pin(async move {
            // Counted before the join, so publications from then on are framed for `rtk1`.
            let rtk1 = (opening.format == Format::Rtk1)
                .then(|| Rtk1Conn::new(&service.runtime.hub.rtk1_conns));
            // A new connection is in no topic yet: the topic limit cannot refuse it.
            let subscribed = service
                .runtime
                .hub
                .join_from(&conn, &topic, opening.since, who.as_deref())
                .await;
            let _ = joined_tx.send(());
            match socket.await {
                Some(socket) => {
                    let joined = Joined {
                        service,
                        conn,
                        subscribed,
                        topic,
                        user_id,
                        who,
                        _rtk1: rtk1,
                        _admission: admission,
                    };
                    Some(run(joined, socket))
                }
                None => {
                    conn.fail();
                    service.runtime.hub.remove(&conn, true).await;
                    None
                }
            }
        });
        let task = tokio::spawn(start.then(OptionFuture::from).map(drop));
        // Err only if the task panicked before the join finished; the task is over then.
        let _ = joined.await;
        Spawned { task, conn: weak }
    }
}

/// A connection subscribed to its first topic, ready to run.
struct Joined<H: MessageHandler> {
    service: Arc<WebsocketService<H>>,
    conn: Arc<Conn>,
    /// How the subscription to `topic` went.
    subscribed: JoinOutcome,
    topic: String,
    user_id: H::UserId,
    /// Who the connection is for presence (when a topic may track it).
    who: Option<Arc<Identity>>,
    /// Counts the connection among the `rtk1` ones while it lives.
    _rtk1: Option<Rtk1Conn>,
    /// Its connection slot, released when it has ended.
    _admission: Admission,
}

/// Why the read loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent a close frame; ours is queued in reply.
    ClientClosed,
    /// The TCP stream ended or failed.
    Eof,
    /// We queued a close (violation, slow consumer, shutdown, sink close): wait for the reply.
    ServerClosed,
}

/// Runs the connection to its end.
///
/// Not an `async fn`: the future it returns holds the connection's state once, as the captures
/// of one async block, and lives as long as the connection.
fn run<H: MessageHandler>(joined: Joined<H>, socket: Upgraded) -> impl Future<Output = ()> {
    let Joined {
        service,
        conn,
        subscribed,
        topic,
        user_id,
        who,
        _rtk1,
        _admission,
    } = joined;
    let Upgraded {
        read: mut inbound,
        pre_read,
        write,
    } = socket;
    let rt = &service.runtime;
    // One span per connection: every event of this connection (handler errors, protocol
    // violations, close reasons) carries its id, topic and user. The writer's one event names
    // the connection itself; a span there would cost every idle connection 128 bytes.
    let span = tracing::debug_span!("ws", conn_id = %conn.id, topic = %topic, user = ?user_id);
    rt.connection_opened();
    let writer = outbound::spawn_writer(
        conn.clone(),
        write,
        rt.config.write_delay,
        rt.config.write_timeout,
        rt.metrics.clone(),
    );

    let ctx = ConnectionContext {
        conn_id: conn.id,
        user_id,
        topic,
        app_state: service.app_state.clone(),
        sink: WsSink::new(conn.clone(), rt.hub.clone()).with_identity(who),
    };
    let mut buf = pre_read;
    span.in_scope(|| match subscribed {
        JoinOutcome::Refused(why) => {
            tracing::warn!(reason = %why, "the broker refused the connection's topic");
            conn.close(
                close_code::POLICY_VIOLATION,
                "topic refused by the broker",
                true,
            );
        }
        outcome if outcome != JoinOutcome::Subscribed || rt.is_shutting_down() => {
            conn.close(close_code::GOING_AWAY, "server shutting down", true);
        }
        _ => {}
    });

    async move {
        let rt = &service.runtime;
        // Invariant 6: on_connect runs after the subscription is in place.
        if AssertUnwindSafe(service.handler.on_connect(&ctx))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("on_connect panicked");
            conn.close(close_code::INTERNAL_ERROR, "internal error", false);
        }

        let end = read::read_loop(&service, &conn, &ctx, &mut inbound, &mut buf).await;
        tracing::debug!(?end, "connection ending");

        match end {
            End::ServerClosed => {
                // Read until the client's close or EOF so unread input does not turn our close
                // into a reset, but no longer than the close timeout.
                let _ = tokio::time::timeout(
                    rt.config.close_timeout,
                    read::drain_until_close(&mut inbound, &mut buf),
                )
                .await;
            }
            End::Eof => conn.fail(),
            End::ClientClosed => {}
        }
        drop(inbound);
        let mut writer = writer;
        if tokio::time::timeout(rt.config.close_timeout, &mut writer)
            .await
            .is_err()
        {
            // The client stopped reading: its close cannot be delivered. Drop the socket (the
            // aborted writer detaches it from the `Conn`).
            writer.abort();
            let _ = writer.await;
        }
        // A connection that dropped without a close stays present for the grace: a client
        // that reconnects at once does not leave and join again.
        // Boxed: inline, the removal would size this future, held for the connection's life.
        Box::pin(rt.hub.remove(&conn, end != End::Eof)).await;
        // Invariant 6: on_disconnect runs exactly once, here, whatever ended the connection.
        if AssertUnwindSafe(service.handler.on_disconnect(&ctx))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("on_disconnect panicked");
        }
        rt.connection_closed();
        drop((_rtk1, _admission));
    }
    .instrument(span)
}
