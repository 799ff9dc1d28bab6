//! Connection set-up, shared by the subscriber and the publisher: where to connect (taken from
//! the URL the way redis-rs parses it), the TCP connection, and `AUTH`.

use std::time::Duration;

use bytes::BytesMut;
use redis::ConnectionAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::resp::{self, Value};

/// Longest a TCP connect, and then the `AUTH` reply, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to connect, taken from the URL.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

/// Never prints the password: a `Target` may end up in a log line or a panic message.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Target {
    /// Parses a `redis://` URL. Other schemes (TLS, Unix sockets) are refused with a message
    /// that says so.
    pub(crate) fn from_url(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let info = client.get_connection_info();
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            _ => return Err("only redis:// URLs over TCP are supported".into()),
        };
        let settings = info.redis_settings();
        Ok(Self {
            host,
            port,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
        })
    }
}

/// Connects to Redis (within [`CONNECT_TIMEOUT`]) and authenticates if the URL says so.
pub(crate) async fn connect(t: &Target) -> std::io::Result<TcpStream> {
    let connect = TcpStream::connect((t.host.as_str(), t.port));
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    if let Some(password) = &t.password {
        let mut cmd = Vec::new();
        match &t.username {
            Some(user) => resp::encode_command(
                &mut cmd,
                [&b"AUTH"[..], user.as_bytes(), password.as_bytes()].into_iter(),
            ),
            None => resp::encode_command(&mut cmd, [&b"AUTH"[..], password.as_bytes()].into_iter()),
        }
        stream.write_all(&cmd).await?;
        let mut buf = BytesMut::with_capacity(256);
        let reply = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                if let Some(v) = resp::parse(&mut buf).map_err(std::io::Error::other)? {
                    return Ok::<_, std::io::Error>(v);
                }
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        })
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if let Value::Error(e) = reply {
            return Err(std::io::Error::other(format!(
                "AUTH refused: {}",
                String::from_utf8_lossy(&e)
            )));
        }
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_never_prints_its_password() {
        let target = Target::from_url("redis://app:s3cret@127.0.0.1:6380/").unwrap();
        assert_eq!(target.password.as_deref(), Some("s3cret"));
        for shown in [format!("{target:?}"), format!("{target:#?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("127.0.0.1"), "{shown}");
        }
    }
}
