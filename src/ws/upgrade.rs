//! The axum side of a connection: the upgrade extractor and [`upgrade_handler`].
//!
//! # Migrating from 0.1.0
//! The upgrade extractor is now this crate's [`WebSocketUpgrade`] (built on fastwebsockets'
//! handshake) instead of axum's. One import changes; the handler body stays the same:
//!
//! ```diff
//! -use axum::extract::WebSocketUpgrade;
//! +use axum_realtime_kit::ws::upgrade::WebSocketUpgrade;
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::header::SEC_WEBSOCKET_EXTENSIONS;
use axum::http::{HeaderValue, StatusCode, request::Parts};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use fastwebsockets::upgrade::{IncomingUpgrade, UpgradeFut};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::connection::{self, Inbound, Opening, Refused, Upgraded};
use crate::handler::MessageHandler;
use crate::outbound::WriteSide;
use crate::service::WebsocketService;
use crate::wire::Format;

/// Extracts a WebSocket upgrade request.
///
/// Extraction never fails, so authentication and topic checks that come after it still decide
/// the status (401, 403, 404…). A request that is not a valid WebSocket upgrade is refused by
/// [`upgrade_handler`] with `400 Bad Request` once those checks have passed.
pub struct WebSocketUpgrade {
    inner: Result<IncomingUpgrade, StatusCode>,
    origin: Origin,
    /// What the client asked to speak (`rtk1` or not), or why its request is invalid.
    opening: Result<Opening, &'static str>,
    /// The client asked for `rtk1` in `Sec-WebSocket-Protocol`: the answer echoes it.
    rtk1_header: bool,
    /// The `Sec-WebSocket-Extensions` header values, for permessage-deflate.
    extensions: Vec<HeaderValue>,
}

/// Reads the `rtk1` opt-in: `proto=rtk1` in the query (with `since=<offset>&epoch=<epoch>` to
/// recover) or `rtk1` among the `Sec-WebSocket-Protocol` header's values.
fn opening_of(parts: &Parts, rtk1_header: bool) -> Result<Opening, &'static str> {
    let (mut proto, mut since, mut epoch) = (None, None, None);
    for pair in parts.uri.query().unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "proto" => proto = Some(value),
            "since" => since = Some(value),
            "epoch" => epoch = Some(value),
            _ => {}
        }
    }
    let rtk1 = match proto {
        Some("rtk1") => true,
        Some(_) => return Err("unknown proto: only proto=rtk1 is supported"),
        None => rtk1_header,
    };
    if !rtk1 {
        return Ok(Opening::default());
    }
    let since = match (since, epoch) {
        (None, None) => None,
        (Some(o), Some(e)) if !e.is_empty() && e.len() <= 64 => {
            let o = o
                .parse::<u64>()
                .map_err(|_| "since must be an offset (an unsigned integer)")?;
            Some((e.to_string(), o))
        }
        _ => return Err("since and epoch go together: since=<offset>&epoch=<epoch>"),
    };
    Ok(Opening {
        format: Format::Rtk1,
        since,
    })
}

/// The request's `Origin` header, for the allow-list.
#[derive(Debug)]
enum Origin {
    /// No `Origin` header: not a browser.
    Absent,
    /// One `Origin`, normalized.
    One(String),
    /// More than one, or not text: never allowed.
    Invalid,
}

impl Origin {
    fn of(parts: &Parts) -> Self {
        let mut values = parts.headers.get_all(axum::http::header::ORIGIN).iter();
        match (values.next(), values.next()) {
            (None, _) => Self::Absent,
            (Some(v), None) => v
                .to_str()
                .map_or(Self::Invalid, |v| Self::One(normalize_origin(v))),
            (Some(_), Some(_)) => Self::Invalid,
        }
    }

    /// Whether `allowed` (normalized origins; `None`: no check) lets this request through.
    fn allowed_by(&self, allowed: Option<&[String]>) -> bool {
        match (allowed, self) {
            (None, _) | (Some(_), Self::Absent) => true,
            (Some(list), Self::One(origin)) => list.iter().any(|a| a == origin),
            (Some(_), Self::Invalid) => false,
        }
    }
}

/// An origin in the form the allow-list compares: `scheme://host[:port]` lowercased (scheme and
/// host are case-insensitive), without a trailing `/` or the scheme's default port.
pub(crate) fn normalize_origin(origin: &str) -> String {
    let mut o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    for (scheme, port) in [
        ("http://", ":80"),
        ("https://", ":443"),
        ("ws://", ":80"),
        ("wss://", ":443"),
    ] {
        if o.starts_with(scheme) && o.ends_with(port) {
            o.truncate(o.len() - port.len());
            break;
        }
    }
    o
}

impl std::fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("valid", &self.inner.is_ok())
            .finish()
    }
}

impl WebSocketUpgrade {
    /// Whether the request is a valid WebSocket upgrade.
    pub fn is_valid(&self) -> bool {
        self.inner.is_ok()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        let is_upgrade =
            header_has(parts, "upgrade", "websocket") && header_has(parts, "connection", "upgrade");
        let inner = if is_upgrade {
            IncomingUpgrade::from_request_parts(parts, state).await
        } else {
            Err(StatusCode::BAD_REQUEST)
        };
        let rtk1_header = header_has(parts, "sec-websocket-protocol", "rtk1");
        let extensions = parts
            .headers
            .get_all(SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .cloned()
            .collect();
        Ok(Self {
            inner,
            origin: Origin::of(parts),
            opening: opening_of(parts, rtk1_header),
            rtk1_header,
            extensions,
        })
    }
}

fn header_has(parts: &Parts, name: &str, token: &str) -> bool {
    parts.headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Authorizes and upgrades one connection, then hands it to `service`.
///
/// In order: refuses with 503 while the service shuts down; with
/// [`allowed_origins`](crate::ws::service::WebsocketServiceBuilder::allowed_origins) set, refuses
/// with 403 a request whose `Origin` is not listed; refuses with 400 a topic name that is not
/// allowed; runs `validator` (your topic check, e.g. 403 for someone else's private topic, 404
/// for an unknown one); refuses with 400 an invalid `rtk1` request (`proto` other than `rtk1`,
/// `since` without `epoch` or not a number); refuses a request that is not a WebSocket upgrade
/// with 400; then answers `101 Switching Protocols` (accepting the client's permessage-deflate
/// offer when
/// [`permessage_deflate`](crate::ws::service::WebsocketServiceBuilder::permessage_deflate) is
/// on) and runs the connection in a task of its own.
pub async fn upgrade_handler<H, V, F>(
    ws: WebSocketUpgrade,
    State(service): State<Arc<WebsocketService<H>>>,
    user_id: H::UserId,
    topic: String,
    validator: V,
) -> Response
where
    H: MessageHandler,
    V: FnOnce(Arc<H::AppState>, H::UserId, String) -> F,
    F: Future<Output = Result<(), StatusCode>>,
{
    if service.runtime.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !ws
        .origin
        .allowed_by(service.runtime.config.allowed_origins.as_deref())
    {
        tracing::debug!(origin = ?ws.origin, %topic, "upgrade refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    if let Err(why) = crate::topic::check(&topic, service.runtime.config.max_topic_len) {
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    if let Err(status) = validator(service.app_state.clone(), user_id.clone(), topic.clone()).await
    {
        tracing::debug!(%status, %topic, "upgrade refused by validator");
        return status.into_response();
    }
    let opening = match ws.opening {
        Ok(opening) => opening,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    let upgrade = match ws.inner {
        Ok(upgrade) => upgrade,
        Err(status) => return (status, "expected a WebSocket upgrade request").into_response(),
    };
    let admitted = match connection::admit(&service) {
        Ok(admitted) => admitted,
        Err(Refused::ShuttingDown) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
        }
        Err(Refused::Full) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
        }
    };
    let (mut response, fut) = match upgrade.upgrade() {
        Ok(pair) => pair,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let config = &service.runtime.config;
    let deflate = if config.permessage_deflate {
        let offers = ws.extensions.iter().filter_map(|v| v.to_str().ok());
        crate::deflate::negotiate(offers, config.permessage_deflate_min_size)
    } else {
        None
    };
    let deflate = deflate.and_then(|(agreed, answer)| {
        let answer = HeaderValue::from_str(&answer).ok()?;
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_EXTENSIONS, answer);
        Some(agreed)
    });
    // Subscribed before the 101 goes out; the connection runs once the upgrade completes.
    admitted
        .join_and_spawn_as(opening, topic, user_id, deflate, upgraded_socket(fut))
        .await;
    let mut response = response.map(Body::new);
    if ws.rtk1_header {
        response.headers_mut().insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            axum::http::HeaderValue::from_static("rtk1"),
        );
    }
    response
}

/// Waits for the HTTP upgrade to complete and recovers its socket; `None` if it never
/// completes.
async fn upgraded_socket(fut: UpgradeFut) -> Option<Upgraded> {
    let upgraded = match fut.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return None;
        }
    };
    // axum::serve hands hyper a `TokioIo<TcpStream>`; recovering it lets the reader and the
    // writer share the stream with no lock between them, and write pre-encoded frames directly.
    match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded) {
        Ok(parts) => {
            // Copy what the client sent early and let hyper's read buffer go: a `Bytes` slice of
            // it, even an empty one, would keep its whole allocation alive for the connection.
            let pre_read = BytesMut::from(&parts.read_buf[..]);
            drop(parts.read_buf);
            Some(Upgraded::tcp(parts.io.into_inner(), pre_read))
        }
        Err(upgraded) => {
            // Another IO (TLS, a custom listener): a generic split, the writer alone writing.
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            Some(Upgraded {
                read: Inbound::Other(Box::new(read)),
                pre_read: BytesMut::new(),
                write: WriteSide::Other(Box::new(write)),
            })
        }
    }
}
