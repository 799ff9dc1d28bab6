//! One connection to Redis, whatever carries it: TCP, a Unix socket, or TLS over TCP.
//!
//! The subscriber reads and writes one [`Stream`]; the publisher splits it into a read half and a
//! write half ([`Stream::into_split`]). Plain sockets split without a lock (tokio's owned
//! halves); a TLS stream is one state machine, so its halves share it behind tokio's `split`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

/// Room made for a read, and kept while data keeps coming.
const READ_ROOM: usize = 64 * 1024;

/// A connected (and, for TLS, handshaken) connection to Redis.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    #[cfg(feature = "redis-tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Forwards a method call to whichever stream `self` holds.
macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Stream::Tcp($s) => $body,
            Stream::Unix($s) => $body,
            #[cfg(feature = "redis-tls")]
            Stream::Tls($s) => $body,
        }
    };
}

impl Stream {
    /// Waits until data arrives and appends it to `buf`; `Ok(0)` means the server closed the
    /// connection. A plain socket gets room in `buf` only once data is there, so an idle
    /// connection holds no read buffer; TLS may hold decrypted data the socket no longer
    /// signals, so room is made before reading. Cancel-safe: dropped before it returns, it has
    /// read nothing.
    pub(crate) async fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        fn room(buf: &mut BytesMut) {
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_ROOM);
            }
        }
        match self {
            // Read through `AsyncRead`: a read that leaves room in `buf` emptied the socket, and
            // tokio then waits for the next readiness instead of first trying a read that would
            // block (`try_read_buf` makes that extra system call after every batch).
            Stream::Tcp(s) => {
                s.readable().await?;
                room(buf);
                tokio::io::AsyncReadExt::read_buf(s, buf).await
            }
            Stream::Unix(s) => {
                s.readable().await?;
                room(buf);
                tokio::io::AsyncReadExt::read_buf(s, buf).await
            }
            #[cfg(feature = "redis-tls")]
            Stream::Tls(s) => {
                room(buf);
                tokio::io::AsyncReadExt::read_buf(s, buf).await
            }
        }
    }

    /// Splits the connection into a half that reads and a half that writes, usable from two
    /// tasks at once.
    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            #[cfg(feature = "redis-tls")]
            tls @ Stream::Tls(_) => {
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Shared(r), WriteHalf::Shared(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The reading half of a [`Stream`].
pub(crate) enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    #[cfg(feature = "redis-tls")]
    Shared(tokio::io::ReadHalf<Stream>),
}

/// The writing half of a [`Stream`].
pub(crate) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    #[cfg(feature = "redis-tls")]
    Shared(tokio::io::WriteHalf<Stream>),
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(h) => Pin::new(h).poll_read(cx, buf),
            ReadHalf::Unix(h) => Pin::new(h).poll_read(cx, buf),
            #[cfg(feature = "redis-tls")]
            ReadHalf::Shared(h) => Pin::new(h).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(h) => Pin::new(h).poll_write(cx, buf),
            WriteHalf::Unix(h) => Pin::new(h).poll_write(cx, buf),
            #[cfg(feature = "redis-tls")]
            WriteHalf::Shared(h) => Pin::new(h).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(h) => Pin::new(h).poll_flush(cx),
            WriteHalf::Unix(h) => Pin::new(h).poll_flush(cx),
            #[cfg(feature = "redis-tls")]
            WriteHalf::Shared(h) => Pin::new(h).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(h) => Pin::new(h).poll_shutdown(cx),
            WriteHalf::Unix(h) => Pin::new(h).poll_shutdown(cx),
            #[cfg(feature = "redis-tls")]
            WriteHalf::Shared(h) => Pin::new(h).poll_shutdown(cx),
        }
    }
}
