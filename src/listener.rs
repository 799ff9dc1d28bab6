//! Serving helpers: a TCP listener sized for bursts of WebSocket handshakes, and the signal a
//! server shuts down on.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// The accept-queue length [`bind`] asks for. Linux caps it at `net.core.somaxconn` (4096 by
/// default since 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for [`axum::serve`](fn@axum::serve) with a long accept queue.
///
/// `tokio::net::TcpListener::bind` asks the kernel for a queue of 128 connections. When
/// thousands of clients connect at once (a deploy, a reconnect storm after a network blip) and
/// the server accepts more slowly than they arrive, the 129th waiting connection is dropped and
/// its client retries only after a 1 s SYN timeout. In this project's connect test (10 000
/// clients, 512 handshakes in flight, server on one core) that doubled the time to connect
/// everyone. This listener asks for [`LISTEN_BACKLOG`] instead and sets `SO_REUSEADDR` on Unix,
/// as `TcpListener::bind` does, so a restarted server can bind while old connections linger in
/// `TIME_WAIT`.
///
/// Call it inside a Tokio runtime.
///
/// ```no_run
/// # async fn run(app: axum::Router) -> std::io::Result<()> {
/// let listener = axum_realtime_kit::bind(([127, 0, 0, 1], 3000).into())?;
/// axum::serve(listener, app).await
/// # }
/// ```
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves when the process is asked to stop: SIGTERM (what an orchestrator sends) or Ctrl-C.
///
/// Made for [`axum::serve`](fn@axum::serve)'s graceful shutdown, followed by
/// [`WebsocketService::shutdown`](crate::ws::service::WebsocketService::shutdown) so that every
/// client gets a close frame (1001) before the process exits:
///
/// ```no_run
/// # async fn run(app: axum::Router, listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// axum::serve(listener, app)
///     .with_graceful_shutdown(axum_realtime_kit::shutdown_signal())
///     .await
/// # }
/// ```
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // No signal handling here (a restricted sandbox): Ctrl-C still works.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_an_ephemeral_port_and_accepts() {
        let listener = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        assert_eq!(client.unwrap().local_addr().unwrap(), accepted.unwrap().1);
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error() {
        let first = bind(([127, 0, 0, 1], 0).into()).unwrap();
        let err = bind(first.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
