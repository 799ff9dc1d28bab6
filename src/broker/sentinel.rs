//! Redis Sentinel: which node is the primary, and when that changes.
//!
//! `redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]` names the sentinels
//! (port 26379 when left out) and the service they watch; `rediss+sentinel://` speaks TLS to
//! the sentinels and the nodes alike. The user name and password are the nodes'; sentinels that
//! need their own take `?sentinel_username=…&sentinel_password=…`.
//!
//! Every connection asks the sentinels, in the order given, for the service's primary
//! (`SENTINEL GET-MASTER-ADDR-BY-NAME`) and has that node confirm its role, so a connection made
//! after a failover goes to the new primary. A failover that leaves the old primary running
//! (now a replica) would leave both of an instance's connections on it, where publishes no
//! longer reach the other instances: [`watch`] listens to the sentinels' `+switch-master` and
//! has both connections made again at once.

use std::time::Duration;

use bytes::BytesMut;

use super::connect::{Target, host_list, open_tcp, request, tls};
use super::resp::{self, Value};
use super::stream::Stream;

/// The sentinels' default port.
const SENTINEL_PORT: u16 = 26379;

/// Pause between rounds of asking every sentinel, when none answered.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// The sentinels to ask, and about which service.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sentinels {
    pub(crate) nodes: Vec<(String, u16)>,
    pub(crate) service: String,
    username: Option<String>,
    password: Option<String>,
}

impl Sentinels {
    /// For a `redis+sentinel://` or `rediss+sentinel://` URL: a `redis://` URL of the first
    /// sentinel carrying the nodes' credentials and database (for the caller to read as any
    /// other), whether it is TLS, and the sentinels. `None` for any other URL.
    pub(crate) fn from_url(url: &str) -> Option<Result<(String, bool, Self), String>> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (rest, false)
        } else {
            (url.strip_prefix("rediss+sentinel://")?, true)
        };
        Some(Self::parse(rest).map(|(node_url, s)| (node_url, tls, s)))
    }

    fn parse(rest: &str) -> Result<(String, Self), String> {
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (Some(user), hosts),
            None => (None, authority),
        };
        let nodes = host_list(hosts, SENTINEL_PORT, "sentinel")?;
        if nodes.is_empty() {
            return Err("a Sentinel URL names at least one sentinel".into());
        }
        let mut segments = path.split('/').filter(|p| !p.is_empty());
        let service = segments
            .next()
            .ok_or("a Sentinel URL names the service: redis+sentinel://host:port/service")?
            .to_owned();
        let db = segments.next().unwrap_or("0");
        let (mut username, mut password) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sentinel_username", v)) => username = Some(v.to_owned()),
                Some(("sentinel_password", v)) => password = Some(v.to_owned()),
                _ => return Err(format!("unknown Sentinel URL option {pair:?}")),
            }
        }
        let (host, port) = &nodes[0];
        let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let node_url = format!("redis://{user}{host}:{port}/{db}");
        Ok((
            node_url,
            Self {
                nodes,
                service,
                username,
                password,
            },
        ))
    }

    /// Connects to one sentinel and authenticates if the URL gave sentinel credentials.
    async fn open(
        &self,
        (host, port): &(String, u16),
        tls: Option<&tls::Client>,
    ) -> std::io::Result<Stream> {
        let mut stream = open_tcp(host, *port, tls).await?;
        if let Some(password) = &self.password {
            let auth: Vec<&[u8]> = match &self.username {
                Some(user) => vec![b"AUTH", user.as_bytes(), password.as_bytes()],
                None => vec![b"AUTH", password.as_bytes()],
            };
            request(&mut stream, &[auth]).await?;
        }
        Ok(stream)
    }

    /// Asks the sentinels in turn for the service's primary; the first that knows answers.
    pub(crate) async fn primary(
        &self,
        tls: Option<&tls::Client>,
    ) -> std::io::Result<(String, u16)> {
        let mut why = Vec::new();
        for node in &self.nodes {
            let answer = async {
                let mut stream = self.open(node, tls).await?;
                let ask: Vec<&[u8]> = vec![
                    b"SENTINEL",
                    b"GET-MASTER-ADDR-BY-NAME",
                    self.service.as_bytes(),
                ];
                let reply = request(&mut stream, &[ask]).await?;
                match reply.into_iter().next() {
                    Some(Value::Array(Some(addr))) => match &addr[..] {
                        [Value::Bulk(Some(host)), Value::Bulk(Some(port))] => {
                            let host = String::from_utf8_lossy(host).into_owned();
                            let port = std::str::from_utf8(port)
                                .ok()
                                .and_then(|p| p.parse().ok())
                                .ok_or_else(|| std::io::Error::other("a port that is no number"))?;
                            Ok((host, port))
                        }
                        _ => Err(std::io::Error::other("an address that is no host and port")),
                    },
                    _ => Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("unknown Sentinel service {:?}", self.service),
                    )),
                }
            };
            match answer.await {
                Ok(addr) => return Ok(addr),
                Err(e) => why.push(format!("{}:{}: {e}", node.0, node.1)),
            }
        }
        Err(std::io::Error::other(format!(
            "no sentinel named a primary: {}",
            why.join("; ")
        )))
    }
}

/// Listens to the sentinels' `+switch-master` announcements for the target's service and calls
/// `switched` on each, for as long as the task runs (the broker aborts it when it stops). One
/// sentinel is listened to at a time; when it is lost, the next one is.
pub(super) async fn watch(target: Target, switched: impl Fn()) {
    let super::connect::Addr::Sentinel(sentinels) = &target.addr else {
        return;
    };
    let mut next = 0;
    loop {
        let node = &sentinels.nodes[next % sentinels.nodes.len()];
        next += 1;
        let listened = async {
            let mut stream = sentinels.open(node, target.tls.as_ref()).await?;
            let subscribe: Vec<&[u8]> = vec![b"SUBSCRIBE", b"+switch-master"];
            request(&mut stream, &[subscribe]).await?;
            let mut buf = BytesMut::new();
            loop {
                while let Some(v) = resp::parse(&mut buf).map_err(std::io::Error::other)? {
                    if is_switch_of(&v, &sentinels.service) {
                        tracing::warn!(service = %sentinels.service, "sentinel announced a new primary; reconnecting");
                        switched();
                    }
                }
                if stream.read_some(&mut buf).await? == 0 {
                    return Err::<(), std::io::Error>(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        };
        if let Err(e) = listened.await {
            tracing::debug!(sentinel = %format!("{}:{}", node.0, node.1), error = %e, "sentinel connection lost");
        }
        if next % sentinels.nodes.len() == 0 {
            tokio::time::sleep(WATCH_RETRY).await;
        }
    }
}

/// Whether `v` is a `+switch-master` message about `service`
/// (`<service> <old ip> <old port> <new ip> <new port>`).
fn is_switch_of(v: &Value, service: &str) -> bool {
    let Value::Array(Some(items)) = v else {
        return false;
    };
    match &items[..] {
        [Value::Bulk(Some(kind)), _, Value::Bulk(Some(payload))] if &kind[..] == b"message" => {
            payload.split(|b| *b == b' ').next() == Some(service.as_bytes())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_the_sentinels_the_service_and_the_nodes_credentials() {
        let (node_url, tls, s) =
            Sentinels::from_url("redis+sentinel://app:pw@s1:26380,s2,10.0.0.3:5000/cache/2")
                .unwrap()
                .unwrap();
        assert!(!tls);
        assert_eq!(node_url, "redis://app:pw@s1:26380/2");
        assert_eq!(
            s.nodes,
            [
                ("s1".into(), 26380),
                ("s2".into(), SENTINEL_PORT),
                ("10.0.0.3".into(), 5000)
            ]
        );
        assert_eq!(s.service, "cache");
        let (_, tls, s) = Sentinels::from_url(
            "rediss+sentinel://s1/cache?sentinel_username=u&sentinel_password=p",
        )
        .unwrap()
        .unwrap();
        assert!(tls);
        assert_eq!(
            (s.username.as_deref(), s.password.as_deref()),
            (Some("u"), Some("p"))
        );
        assert!(Sentinels::from_url("redis://s1/").is_none());
    }

    #[test]
    fn a_sentinel_url_without_a_service_or_a_sentinel_is_refused() {
        for url in [
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///cache",
            "redis+sentinel://s1:port/cache",
            "redis+sentinel://s1/cache?what=1",
        ] {
            assert!(Sentinels::from_url(url).unwrap().is_err(), "{url}");
        }
    }

    #[test]
    fn only_the_services_switch_counts() {
        let msg = |payload: &'static [u8]| {
            Value::Array(Some(vec![
                Value::Bulk(Some(bytes::Bytes::from_static(b"message"))),
                Value::Bulk(Some(bytes::Bytes::from_static(b"+switch-master"))),
                Value::Bulk(Some(bytes::Bytes::from_static(payload))),
            ]))
        };
        assert!(is_switch_of(
            &msg(b"cache 10.0.0.1 6379 10.0.0.2 6379"),
            "cache"
        ));
        assert!(!is_switch_of(
            &msg(b"cache2 10.0.0.1 6379 10.0.0.2 6379"),
            "cache"
        ));
    }
}
