//! Connection set-up, shared by the subscriber and the publisher: where to connect (taken from
//! the URL the way redis-rs parses it), the TCP, Unix-socket or TLS connection, `AUTH` and
//! `SELECT`.
//!
//! URLs: `redis://[user:password@]host[:port][/db]`, `rediss://…` (TLS),
//! `redis+unix:///path/to/redis.sock[?db=N&user=U&pass=P]` and `unix:///…` alike, and
//! `redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]` (`rediss+sentinel://`
//! for TLS; see [`super::sentinel`]).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use redis::ConnectionAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

use super::resp::{self, Value};
use super::sentinel::Sentinels;
use super::stream::Stream;

/// Longest a connect, a TLS handshake, and then the replies to the set-up commands may each
/// take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Addr {
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    /// Whichever node the sentinels name as the primary, asked on every connect.
    Sentinel(Arc<Sentinels>),
}

/// Where and how to connect, taken from the URL (and, for TLS, the service's [`RedisTls`]).
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: Addr,
    /// Set for `rediss://`: the handshake's settings, built once.
    pub(crate) tls: Option<tls::Client>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// Database index for keys (Pub/Sub ignores it). `SELECT`ed when not 0.
    pub(crate) db: i64,
}

/// Never prints the password: a `Target` may end up in a log line or a panic message.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

/// Where it connects, for log lines and errors: `127.0.0.1:6379`, `tls 10.0.0.5:6380`,
/// `unix /run/redis.sock`. No credentials.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.addr, self.tls.is_some()) {
            (Addr::Tcp { host, port }, false) => write!(f, "{host}:{port}"),
            (Addr::Tcp { host, port }, true) => write!(f, "tls {host}:{port}"),
            (Addr::Unix(path), _) => write!(f, "unix {}", path.display()),
            (Addr::Sentinel(s), tls) => {
                let tls = if tls { "tls " } else { "" };
                write!(f, "{tls}primary of {:?} by sentinels ", s.service)?;
                for (i, (host, port)) in s.nodes.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{host}:{port}")?;
                }
                Ok(())
            }
        }
    }
}

/// TLS settings for `rediss://` connections beyond the URL: which certificate authorities to
/// trust, and a client certificate for servers that ask for one (mutual TLS).
///
/// By default the platform's root certificates are trusted, the server's certificate must be
/// valid for the URL's host name, and the host name is sent (SNI). There is no setting that
/// turns verification off: give the CA that signed the server's certificate instead.
///
/// ```no_run
/// # use axum_realtime_kit::ws::service::WebsocketService;
/// # use axum_realtime_kit::RedisTls;
/// # fn demo<H: axum_realtime_kit::ws::handler::MessageHandler>(h: H, s: std::sync::Arc<H::AppState>) {
/// let service = WebsocketService::builder(h, s)
///     .redis_url(Some("rediss://app:secret@redis.internal:6380/"))
///     .redis_tls(
///         RedisTls::new()
///             .ca_file("/etc/redis/ca.crt")
///             .client_cert("/etc/redis/client.crt", "/etc/redis/client.key"),
///     )
///     .build();
/// # }
/// ```
#[cfg(feature = "redis-tls")]
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
}

#[cfg(feature = "redis-tls")]
impl RedisTls {
    /// The platform's root certificates, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the certificate authorities in this PEM file instead of the platform's roots
    /// (a private CA, as self-hosted and some managed Redis services use).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this client certificate (a PEM chain) with its private key (PEM: PKCS#8,
    /// PKCS#1 or SEC1) to a server that asks for one.
    pub fn client_cert(mut self, cert_chain: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert_chain.into(), key.into()));
        self
    }
}

/// Stands in for [`RedisTls`] when the `redis-tls` feature is off: nothing to configure.
#[cfg(not(feature = "redis-tls"))]
#[derive(Debug, Clone, Default)]
pub(crate) struct RedisTls;

impl Target {
    /// Parses a Redis URL; `tls` completes a `rediss://` one. A URL that asks to skip
    /// certificate checks (`#insecure`) is refused.
    pub(crate) fn from_url(url: &str, tls: Option<&RedisTls>) -> Result<Self, String> {
        if let Some(parsed) = Sentinels::from_url(url) {
            let (node_url, secure, sentinels) = parsed?;
            let mut target = Self::from_url(&node_url, None)?;
            if secure {
                target.tls = Some(tls::Client::new(None, tls)?);
            }
            target.addr = Addr::Sentinel(Arc::new(sentinels));
            return Ok(target);
        }
        // redis-rs parses `rediss://` only when built with a TLS backend of its own, which this
        // crate does not use: the URL is parsed as `redis://` and TLS remembered.
        let (url, secure) = match url.strip_prefix("rediss://") {
            Some(rest) => (format!("redis://{rest}"), true),
            None => (url.to_owned(), false),
        };
        if secure && url.contains('#') {
            return Err(
                "rediss:// URLs take no fragment: certificate verification cannot be turned off \
                 (give the CA that signed the server's certificate with RedisTls::ca_file)"
                    .into(),
            );
        }
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let info = client.get_connection_info();
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Addr::Tcp {
                host: host.clone(),
                port: *port,
            },
            ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => return Err("unsupported Redis address".into()),
        };
        let tls = match (&addr, secure) {
            (Addr::Tcp { host, .. }, true) => Some(tls::Client::new(Some(host), tls)?),
            _ => None,
        };
        let settings = info.redis_settings();
        Ok(Self {
            addr,
            tls,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
        })
    }
}

/// The `host[:port]` list of a Sentinel or Cluster URL (`port` when one leaves it out); `what`
/// names an entry in errors.
pub(super) fn host_list(hosts: &str, port: u16, what: &str) -> Result<Vec<(String, u16)>, String> {
    let mut nodes = Vec::new();
    for node in hosts.split(',').filter(|n| !n.is_empty()) {
        let (host, port) = match node.rsplit_once(':') {
            Some((host, p)) => {
                let p = p
                    .parse()
                    .map_err(|_| format!("{what} {node:?}: the port is not a number"))?;
                (host, p)
            }
            None => (node, port),
        };
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(format!(
                "{what} {node:?}: give a host name or an IPv4 address"
            ));
        }
        nodes.push((host.to_owned(), port));
    }
    Ok(nodes)
}

/// Turns an elapsed timeout into `TimedOut`, naming the step.
pub(super) async fn within<T>(
    step: &str,
    fut: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{step}: no answer within {CONNECT_TIMEOUT:?}"),
            )
        })?
}

/// Connects to Redis, completes the TLS handshake if the URL says so, authenticates and selects
/// the database; each step within [`CONNECT_TIMEOUT`]. Through sentinels, the node they name is
/// asked to confirm that it is the primary (`ROLE`).
pub(crate) async fn connect(t: &Target) -> std::io::Result<Stream> {
    let (mut stream, check_role) = match &t.addr {
        Addr::Tcp { host, port } => (open_tcp(host, *port, t.tls.as_ref()).await?, false),
        Addr::Unix(path) => (
            Stream::Unix(within("connect", UnixStream::connect(path)).await?),
            false,
        ),
        Addr::Sentinel(sentinels) => {
            let (host, port) = sentinels.primary(t.tls.as_ref()).await?;
            (open_tcp(&host, port, t.tls.as_ref()).await?, true)
        }
    };
    let db = t.db.to_string();
    let mut commands: Vec<Vec<&[u8]>> = Vec::new();
    if let Some(password) = &t.password {
        match &t.username {
            Some(user) => commands.push(vec![b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => commands.push(vec![b"AUTH", password.as_bytes()]),
        }
    }
    if t.db != 0 {
        commands.push(vec![b"SELECT", db.as_bytes()]);
    }
    if check_role {
        commands.push(vec![b"ROLE"]);
    }
    let replies = request(&mut stream, &commands).await?;
    if check_role {
        let role = match replies.last() {
            Some(Value::Array(Some(items))) => match items.first() {
                Some(Value::Bulk(Some(role))) => String::from_utf8_lossy(role).into_owned(),
                _ => String::new(),
            },
            _ => String::new(),
        };
        if role != "master" {
            return Err(std::io::Error::other(format!(
                "the node the sentinels named as primary is a {role:?}, not the primary \
                 (a failover is in progress?)"
            )));
        }
    }
    Ok(stream)
}

/// Opens a TCP connection to `host:port`, with TLS on it when `tls` is given.
pub(super) async fn open_tcp(
    host: &str,
    port: u16,
    tls: Option<&tls::Client>,
) -> std::io::Result<Stream> {
    let tcp = within("connect", TcpStream::connect((host, port))).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(client) => within("TLS handshake", client.handshake(tcp, host)).await,
        None => Ok(Stream::Tcp(tcp)),
    }
}

/// Sends `commands` in one write and reads one reply each, within [`CONNECT_TIMEOUT`]. An
/// error reply is an error naming its command.
pub(super) async fn request(
    stream: &mut Stream,
    commands: &[Vec<&[u8]>],
) -> std::io::Result<Vec<Value>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for command in commands {
        resp::encode_command(&mut out, command.iter().copied());
    }
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut buf = BytesMut::new();
    let mut replies = Vec::with_capacity(commands.len());
    for command in commands {
        let name = String::from_utf8_lossy(command[0]).into_owned();
        let reply = within(&name, async {
            loop {
                if let Some(v) = resp::parse(&mut buf).map_err(std::io::Error::other)? {
                    return Ok(v);
                }
                if stream.read_some(&mut buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        })
        .await?;
        if let Value::Error(e) = &reply {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{name} refused: {}", String::from_utf8_lossy(e)),
            ));
        }
        replies.push(reply);
    }
    Ok(replies)
}

/// The TLS client: rustls with the `ring` provider.
#[cfg(feature = "redis-tls")]
pub(crate) mod tls {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

    use super::RedisTls;
    use crate::broker::stream::Stream;

    /// A handshake's settings, built once from [`RedisTls`].
    #[derive(Clone)]
    pub(crate) struct Client {
        connector: TlsConnector,
    }

    impl Client {
        /// `host`, when known in advance, is checked to be a name a certificate can be for.
        pub(crate) fn new(host: Option<&str>, settings: Option<&RedisTls>) -> Result<Self, String> {
            if let Some(host) = host {
                ServerName::try_from(host.to_owned())
                    .map_err(|e| format!("TLS server name {host:?}: {e}"))?;
            }
            let default = RedisTls::default();
            let settings = settings.unwrap_or(&default);
            let mut roots = RootCertStore::empty();
            match &settings.ca_file {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(path)
                        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| format!("TLS CA file {}: {e}", path.display()))?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(format!(
                            "TLS CA file {}: no certificate in it",
                            path.display()
                        ));
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    roots.add_parsable_certificates(found.certs);
                    if roots.is_empty() {
                        return Err("TLS: no root certificates found on this system; give a CA \
                                    file with RedisTls::ca_file"
                            .into());
                    }
                }
            }
            let provider = Arc::new(crypto::ring::default_provider());
            let builder = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots);
            let config = match &settings.client_cert {
                Some((chain, key)) => {
                    let chain = CertificateDer::pem_file_iter(chain)
                        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| format!("TLS client certificate {}: {e}", chain.display()))?;
                    let key = PrivateKeyDer::from_pem_file(key)
                        .map_err(|e| format!("TLS client key {}: {e}", key.display()))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| format!("TLS client certificate: {e}"))?
                }
                None => builder.with_no_client_auth(),
            };
            Ok(Self {
                connector: TlsConnector::from(Arc::new(config)),
            })
        }

        /// The handshake with `host`, whose name the server's certificate must carry.
        pub(crate) async fn handshake(
            &self,
            tcp: TcpStream,
            host: &str,
        ) -> std::io::Result<Stream> {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = self.connector.connect(name, tcp).await?;
            Ok(Stream::Tls(Box::new(tls)))
        }
    }
}

/// Without the `redis-tls` feature a `rediss://` URL is refused with a message that says how to
/// turn it on.
#[cfg(not(feature = "redis-tls"))]
pub(crate) mod tls {
    use tokio::net::TcpStream;

    use super::RedisTls;
    use crate::broker::stream::Stream;

    #[derive(Clone)]
    pub(crate) enum Client {}

    impl Client {
        pub(crate) fn new(_: Option<&str>, _: Option<&RedisTls>) -> Result<Self, String> {
            Err("rediss:// needs the `redis-tls` feature of axum-realtime-kit".into())
        }

        pub(crate) async fn handshake(&self, _: TcpStream, _: &str) -> std::io::Result<Stream> {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_never_prints_its_password() {
        let target = Target::from_url("redis://app:s3cret@127.0.0.1:6380/", None).unwrap();
        assert_eq!(target.password.as_deref(), Some("s3cret"));
        for shown in [
            format!("{target:?}"),
            format!("{target:#?}"),
            target.to_string(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("127.0.0.1"), "{shown}");
        }
    }

    #[test]
    fn urls_are_read_as_redis_rs_reads_them() {
        let t = Target::from_url("redis://u:p@localhost:6390/3", None).unwrap();
        assert_eq!(
            t.addr,
            Addr::Tcp {
                host: "localhost".into(),
                port: 6390
            }
        );
        assert_eq!(
            (t.username.as_deref(), t.password.as_deref(), t.db),
            (Some("u"), Some("p"), 3)
        );
        for url in [
            "redis+unix:///run/redis.sock?db=2&pass=pw",
            "unix:///run/redis.sock?db=2&pass=pw",
        ] {
            let t = Target::from_url(url, None).unwrap();
            assert_eq!(t.addr, Addr::Unix("/run/redis.sock".into()), "{url}");
            assert_eq!((t.password.as_deref(), t.db), (Some("pw"), 2), "{url}");
            assert!(t.tls.is_none());
        }
    }

    #[test]
    fn a_rediss_url_cannot_turn_verification_off() {
        let e = Target::from_url("rediss://localhost:6390/#insecure", None).unwrap_err();
        assert!(e.contains("cannot be turned off"), "{e}");
    }

    #[cfg(feature = "redis-tls")]
    #[test]
    fn a_missing_ca_file_is_a_readable_error() {
        let tls = RedisTls::new().ca_file("/nonexistent/ca.pem");
        let e = Target::from_url("rediss://localhost:6390/", Some(&tls)).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
