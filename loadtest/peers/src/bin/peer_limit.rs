//! Load-test peer: the *limit* server, the ceiling of this machine rather than a competitor.
//!
//! One thread (a current-thread tokio runtime), a hand-parsed HTTP upgrade, a hand-written
//! RESP2 subscriber and publisher, and fan-out that encodes each Redis payload once into a
//! complete unmasked text frame and writes that buffer to every subscriber of the topic. It
//! serves the `basic_chat` example's protocol (its module docs).
//!
//! Environment:
//! - `BIND_ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (required, `redis://` over TCP).
//! - `LIMIT_MODE`: `single` (default) writes each frame to each socket at once, one `try_write`
//!   per delivery, keeping what the socket did not take in a per-connection buffer flushed when
//!   the socket is writable; `batch` appends to per-connection buffers and flushes them all every
//!   `LIMIT_BATCH_MS` milliseconds (default 2), one write per connection per flush.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::rc::Rc;
use std::time::Duration;

use base64::Engine as _;
use redis::IntoConnectionInfo;
use rtk_peers::{ClientMessage, User};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::spawn_local;

/// A connection whose unsent output grows past this is dropped (a client that stopped reading).
const MAX_PENDING: usize = 16 << 20;
/// Largest client message accepted.
const MAX_CLIENT_MESSAGE: usize = 1 << 20;
/// Largest HTTP request head accepted.
const MAX_REQUEST_HEAD: usize = 16 << 10;
/// How long a new connection waits for Redis to confirm its topic's subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    Batch,
}

/// One upgraded client.
struct Conn {
    stream: TcpStream,
    /// Bytes not yet taken by the socket.
    out: RefCell<Vec<u8>>,
    /// Wakes the connection's task: output pending (single mode) or the connection was killed.
    wake: Notify,
    /// Batch mode: already in `Hub::dirty`.
    dirty: Cell<bool>,
    /// Broken or too slow; its task removes it.
    dead: Cell<bool>,
    /// In its topic's list, at index `slot`.
    registered: Cell<bool>,
    slot: Cell<usize>,
}

impl Conn {
    fn kill(&self) {
        self.dead.set(true);
        self.wake.notify_one();
    }

    /// One `try_write` of the pending output.
    fn flush_once(&self) {
        let mut out = self.out.borrow_mut();
        if out.is_empty() {
            return;
        }
        match self.stream.try_write(&out) {
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => {
                drop(out);
                self.kill();
            }
        }
    }
}

#[derive(Default)]
struct Topic {
    conns: Vec<Rc<Conn>>,
    /// Redis has confirmed the subscription (on the current subscriber connection).
    subscribed: bool,
    /// New connections waiting for that confirmation.
    waiters: Vec<oneshot::Sender<()>>,
}

struct Hub {
    mode: Mode,
    /// Every topic ever opened; subscriptions are kept for the life of the process.
    topics: RefCell<HashMap<String, Topic>>,
    /// Batch mode: connections with pending output.
    dirty: RefCell<Vec<Rc<Conn>>>,
    /// Topics to SUBSCRIBE on the subscriber connection.
    subscribe_tx: mpsc::UnboundedSender<String>,
    /// Encoded PUBLISH commands for the publisher connection.
    publish_tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl Hub {
    /// Queues `frame` (a complete frame) for `conn`.
    fn deliver(&self, conn: &Rc<Conn>, frame: &[u8]) {
        if conn.dead.get() {
            return;
        }
        let mut out = conn.out.borrow_mut();
        match self.mode {
            Mode::Single => {
                if out.is_empty() {
                    match conn.stream.try_write(frame) {
                        Ok(n) if n == frame.len() => return,
                        Ok(n) => out.extend_from_slice(&frame[n..]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => out.extend_from_slice(frame),
                        Err(_) => {
                            drop(out);
                            conn.kill();
                            return;
                        }
                    }
                    conn.wake.notify_one();
                } else {
                    out.extend_from_slice(frame);
                }
            }
            Mode::Batch => {
                out.extend_from_slice(frame);
                if !conn.dirty.replace(true) {
                    self.dirty.borrow_mut().push(Rc::clone(conn));
                }
            }
        }
        if out.len() > MAX_PENDING {
            drop(out);
            conn.kill();
        }
    }

    /// A payload from Redis channel `channel`: encoded once, written to every subscriber.
    fn fan_out(&self, channel: &[u8], payload: &[u8]) {
        let (Ok(channel), Ok(_)) = (std::str::from_utf8(channel), std::str::from_utf8(payload))
        else {
            return;
        };
        let topics = self.topics.borrow();
        let Some(topic) = topics.get(channel) else {
            return;
        };
        if topic.conns.is_empty() {
            return;
        }
        let frame = encode_frame(0x1, payload);
        for conn in &topic.conns {
            self.deliver(conn, &frame);
        }
    }

    /// Redis confirmed a subscription.
    fn subscribed(&self, channel: &[u8]) {
        let Ok(channel) = std::str::from_utf8(channel) else {
            return;
        };
        if let Some(topic) = self.topics.borrow_mut().get_mut(channel) {
            topic.subscribed = true;
            for waiter in topic.waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// Resolves once Redis delivers `topic` to this process; false on timeout.
    async fn ensure_subscribed(&self, topic: &str) -> bool {
        let rx = {
            let mut topics = self.topics.borrow_mut();
            let entry = match topics.get_mut(topic) {
                Some(entry) => entry,
                None => {
                    let _ = self.subscribe_tx.send(topic.to_owned());
                    topics.entry(topic.to_owned()).or_default()
                }
            };
            if entry.subscribed {
                return true;
            }
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            rx
        };
        matches!(
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await,
            Ok(Ok(()))
        )
    }

    fn register(&self, topic: &str, conn: &Rc<Conn>) {
        let mut topics = self.topics.borrow_mut();
        let entry = topics.entry(topic.to_owned()).or_default();
        conn.slot.set(entry.conns.len());
        conn.registered.set(true);
        entry.conns.push(Rc::clone(conn));
    }

    fn unregister(&self, topic: &str, conn: &Rc<Conn>) {
        if !conn.registered.replace(false) {
            return;
        }
        let mut topics = self.topics.borrow_mut();
        if let Some(entry) = topics.get_mut(topic) {
            let i = conn.slot.get();
            entry.conns.swap_remove(i);
            if let Some(moved) = entry.conns.get(i) {
                moved.slot.set(i);
            }
        }
    }

    /// Batch mode: one write per dirty connection.
    fn flush_dirty(&self) {
        let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        let mut keep = Vec::new();
        for conn in dirty {
            if conn.dead.get() {
                conn.dirty.set(false);
                continue;
            }
            conn.flush_once();
            if !conn.dead.get() && !conn.out.borrow().is_empty() {
                keep.push(conn);
            } else {
                conn.dirty.set(false);
            }
        }
        self.dirty.borrow_mut().extend(keep);
    }
}

/// A complete unmasked server frame with FIN set.
fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(0x80 | opcode);
    if len < 126 {
        frame.push(len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        frame.push(126);
        frame.extend_from_slice(&len16.to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame
}

fn text_frame(text: &str) -> Vec<u8> {
    encode_frame(0x1, text.as_bytes())
}

/// A RESP2 command.
fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut cmd = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    cmd.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        cmd.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        cmd.extend_from_slice(arg);
        cmd.extend_from_slice(b"\r\n");
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// Redis

#[derive(Debug, Clone)]
struct RedisTarget {
    addr: String,
    /// `AUTH` arguments, when the URL has credentials.
    auth: Option<Vec<String>>,
}

fn redis_target(url: &str) -> RedisTarget {
    let info = url.into_connection_info().unwrap_or_else(|e| {
        eprintln!("peer_limit: bad REDIS_URL {url:?}: {e}");
        std::process::exit(2);
    });
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => {
            eprintln!("peer_limit: REDIS_URL must be plain TCP (redis://), got {other}");
            std::process::exit(2);
        }
    };
    let settings = info.redis_settings();
    let auth = settings.password().map(|password| {
        let mut args = vec!["AUTH".to_owned()];
        if let Some(user) = settings.username() {
            args.push(user.to_owned());
        }
        args.push(password.to_owned());
        args
    });
    RedisTarget { addr, auth }
}

async fn redis_connect(target: &RedisTarget) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(&target.addr).await?;
    stream.set_nodelay(true)?;
    if let Some(auth) = &target.auth {
        let args: Vec<&[u8]> = auth.iter().map(|a| a.as_bytes()).collect();
        stream.write_all(&resp_command(&args)).await?;
        let mut reply = [0u8; 256];
        let n = stream.read(&mut reply).await?;
        if !reply[..n].starts_with(b"+OK") {
            return Err(io::Error::other(format!(
                "AUTH refused: {}",
                String::from_utf8_lossy(&reply[..n]).trim_end()
            )));
        }
    }
    Ok(stream)
}

/// One RESP2 reply element, as a range of the read buffer.
#[derive(Debug, Clone, Copy)]
enum Item {
    Bulk(usize, usize),
    Other,
}

/// Finds `\r\n` at or after `from`; returns the index of `\r`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

fn parse_int(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Parses one RESP2 reply at `pos`: `Ok(None)` if incomplete, else its end and up to four
/// array elements (pub/sub pushes have three or four).
#[allow(clippy::type_complexity)]
fn parse_reply(buf: &[u8], pos: usize) -> Result<Option<(usize, [Item; 4], usize)>, String> {
    let mut items = [Item::Other; 4];
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(eol) = find_crlf(buf, pos + 1) else {
        return Ok(None);
    };
    match kind {
        b'*' => {
            let n = parse_int(&buf[pos + 1..eol]).ok_or("bad array length")?;
            let mut at = eol + 2;
            for i in 0..usize::try_from(n.max(0)).unwrap_or(0) {
                let Some(&t) = buf.get(at) else {
                    return Ok(None);
                };
                let Some(eol) = find_crlf(buf, at + 1) else {
                    return Ok(None);
                };
                let item = match t {
                    b'$' => {
                        let len = parse_int(&buf[at + 1..eol]).ok_or("bad bulk length")?;
                        if len < 0 {
                            at = eol + 2;
                            Item::Other
                        } else {
                            let start = eol + 2;
                            let end = start + len as usize;
                            if buf.len() < end + 2 {
                                return Ok(None);
                            }
                            at = end + 2;
                            Item::Bulk(start, end)
                        }
                    }
                    b':' | b'+' | b'-' => {
                        at = eol + 2;
                        Item::Other
                    }
                    _ => return Err(format!("unexpected RESP type {:?}", t as char)),
                };
                if i < items.len() {
                    items[i] = item;
                }
            }
            Ok(Some((at, items, n.max(0) as usize)))
        }
        b'+' | b':' => Ok(Some((eol + 2, items, 0))),
        b'-' => Err(String::from_utf8_lossy(&buf[pos + 1..eol]).into_owned()),
        _ => Err(format!("unexpected RESP type {:?}", kind as char)),
    }
}

/// The subscriber connection: SUBSCRIBE requests out, pushes in. Reconnects and re-subscribes
/// every known topic when the connection drops.
async fn run_subscriber(
    hub: Rc<Hub>,
    target: RedisTarget,
    mut requests: mpsc::UnboundedReceiver<String>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    loop {
        let mut stream = match redis_connect(&target).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("peer_limit: Redis subscriber: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        buf.clear();
        // Everything known so far, in one command (requests already queued are covered too).
        while requests.try_recv().is_ok() {}
        let known: Vec<String> = {
            let mut topics = hub.topics.borrow_mut();
            for topic in topics.values_mut() {
                topic.subscribed = false;
            }
            topics.keys().cloned().collect()
        };
        if !known.is_empty() {
            let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
            args.extend(known.iter().map(|t| t.as_bytes()));
            if let Err(e) = stream.write_all(&resp_command(&args)).await {
                eprintln!("peer_limit: Redis subscriber: {e}; reconnecting");
                continue;
            }
        }
        let err = loop {
            tokio::select! {
                topic = requests.recv() => {
                    let Some(topic) = topic else { return };
                    let cmd = resp_command(&[b"SUBSCRIBE", topic.as_bytes()]);
                    if let Err(e) = stream.write_all(&cmd).await {
                        break e.to_string();
                    }
                }
                read = stream.read_buf(&mut buf) => {
                    match read {
                        Ok(0) => break "connection closed".to_owned(),
                        Ok(_) => {}
                        Err(e) => break e.to_string(),
                    }
                    match handle_pushes(&hub, &buf) {
                        Ok(consumed) => {
                            buf.drain(..consumed);
                        }
                        Err(e) => break e,
                    }
                }
            }
        };
        eprintln!("peer_limit: Redis subscriber: {err}; reconnecting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Handles every complete push in `buf`; returns how many bytes were consumed.
fn handle_pushes(hub: &Hub, buf: &[u8]) -> Result<usize, String> {
    let mut pos = 0;
    while let Some((end, items, n)) = parse_reply(buf, pos)? {
        if let (3, Item::Bulk(ks, ke), Item::Bulk(cs, ce)) = (n, items[0], items[1]) {
            match &buf[ks..ke] {
                b"message" => {
                    if let Item::Bulk(ps, pe) = items[2] {
                        hub.fan_out(&buf[cs..ce], &buf[ps..pe]);
                    }
                }
                b"subscribe" => hub.subscribed(&buf[cs..ce]),
                _ => {}
            }
        }
        pos = end;
    }
    Ok(pos)
}

/// The publisher connection: queued PUBLISH commands are written in batches; replies are read
/// and discarded. Commands queued while Redis is unreachable are dropped.
async fn run_publisher(target: RedisTarget, mut commands: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut out: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut scratch = vec![0u8; 64 << 10];
    loop {
        let stream = match redis_connect(&target).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("peer_limit: Redis publisher: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                while commands.try_recv().is_ok() {}
                continue;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let err = loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    out.clear();
                    out.extend_from_slice(&cmd);
                    while out.len() < (64 << 10) {
                        match commands.try_recv() {
                            Ok(more) => out.extend_from_slice(&more),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = wr.write_all(&out).await {
                        break e.to_string();
                    }
                }
                read = rd.read(&mut scratch) => match read {
                    Ok(0) => break "connection closed".to_owned(),
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
            }
        };
        eprintln!("peer_limit: Redis publisher: {err}; reconnecting");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name).is_some_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    }
}

fn parse_request(head: &[u8]) -> Option<Request> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
    })
}

/// Percent-decoding; `+` is a space when `plus_is_space` (query strings).
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k, true)? == name)
            .then(|| percent_decode(v, true))
            .flatten()
    })
}

fn simple_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// What a request asks for, once checked.
enum Route {
    Respond(Vec<u8>),
    Upgrade {
        topic: String,
        user: User,
        key: String,
    },
}

fn route(req: &Request) -> Route {
    if req.path == "/health" {
        return if req.method == "GET" || req.method == "HEAD" {
            Route::Respond(simple_response(200, "OK", "OK"))
        } else {
            Route::Respond(simple_response(405, "Method Not Allowed", ""))
        };
    }
    let Some(topic) = req.path.strip_prefix("/ws/") else {
        return Route::Respond(simple_response(404, "Not Found", ""));
    };
    let Some(topic) = percent_decode(topic, false).filter(|t| !t.is_empty() && !t.contains('/'))
    else {
        return Route::Respond(simple_response(404, "Not Found", ""));
    };
    if req.method != "GET" {
        return Route::Respond(simple_response(405, "Method Not Allowed", ""));
    }
    let token = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query_param(&req.query, "token"));
    let Some(user) = token.and_then(|t| rtk_peers::parse_token(&t).ok()) else {
        return Route::Respond(simple_response(401, "Unauthorized", ""));
    };
    if let Err(denied) = rtk_peers::check_topic(&user, &topic) {
        return Route::Respond(match denied {
            rtk_peers::TopicDenied::Forbidden => simple_response(403, "Forbidden", ""),
            rtk_peers::TopicDenied::NotFound => simple_response(404, "Not Found", ""),
        });
    }
    let key = req.header("sec-websocket-key").map(str::to_owned);
    match key {
        Some(key)
            if req.has_token("upgrade", "websocket")
                && req.has_token("connection", "upgrade")
                && req.header("sec-websocket-version") == Some("13") =>
        {
            Route::Upgrade { topic, user, key }
        }
        _ => Route::Respond(simple_response(
            400,
            "Bad Request",
            "expected a WebSocket upgrade",
        )),
    }
}

/// Reads the request head; returns it and any bytes after it.
async fn read_head(stream: &mut TcpStream) -> Option<(Request, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let req = parse_request(&buf[..end])?;
            return Some((req, buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return None;
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn serve(hub: Rc<Hub>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Some((req, leftover)) = read_head(&mut stream).await else {
        return;
    };
    let (topic, user, key) = match route(&req) {
        Route::Respond(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            return;
        }
        Route::Upgrade { topic, user, key } => (topic, user, key),
    };
    if !hub.ensure_subscribed(&topic).await {
        let _ = stream
            .write_all(&simple_response(
                503,
                "Service Unavailable",
                "broker unavailable",
            ))
            .await;
        return;
    }
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        accept_key(&key)
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let conn = Rc::new(Conn {
        stream,
        out: RefCell::new(Vec::new()),
        wake: Notify::new(),
        dirty: Cell::new(false),
        dead: Cell::new(false),
        registered: Cell::new(false),
        slot: Cell::new(0),
    });
    hub.register(&topic, &conn);
    let close = run_conn(&hub, &conn, &topic, &user, leftover).await;
    hub.unregister(&topic, &conn);
    conn.dead.set(true);
    if let Some(code) = close {
        finish_with_close(&conn, &code).await;
    }
}

/// Writes whatever is pending plus a Close frame, for at most a second.
async fn finish_with_close(conn: &Conn, code: &[u8]) {
    conn.out
        .borrow_mut()
        .extend_from_slice(&encode_frame(0x8, code));
    let flush = async {
        loop {
            if conn.out.borrow().is_empty() {
                return;
            }
            if conn.stream.writable().await.is_err() {
                return;
            }
            let mut out = conn.out.borrow_mut();
            match conn.stream.try_write(&out) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
}

/// Reads client frames until the client leaves; returns the close payload to echo when the
/// client sent a Close.
async fn run_conn(
    hub: &Hub,
    conn: &Rc<Conn>,
    topic: &str,
    user: &User,
    mut rbuf: Vec<u8>,
) -> Option<Vec<u8>> {
    let mut fragments: Option<Vec<u8>> = None;
    rbuf.reserve(4096);
    loop {
        if !rbuf.is_empty() {
            match process_frames(hub, conn, topic, user, &mut rbuf, &mut fragments) {
                Input::More => {}
                Input::Close(code) => return Some(code),
                Input::Fail => return None,
            }
        }
        if conn.dead.get() {
            return None;
        }
        let want_write = hub.mode == Mode::Single && !conn.out.borrow().is_empty();
        tokio::select! {
            ready = conn.stream.readable() => {
                if ready.is_err() {
                    return None;
                }
                match conn.stream.try_read_buf(&mut rbuf) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            }
            ready = conn.stream.writable(), if want_write => {
                if ready.is_err() {
                    return None;
                }
                conn.flush_once();
            }
            () = conn.wake.notified() => {}
        }
    }
}

enum Input {
    More,
    Close(Vec<u8>),
    Fail,
}

/// Parses the complete frames in `rbuf` and consumes them.
fn process_frames(
    hub: &Hub,
    conn: &Rc<Conn>,
    topic: &str,
    user: &User,
    rbuf: &mut Vec<u8>,
    fragments: &mut Option<Vec<u8>>,
) -> Input {
    let mut pos = 0;
    let result = loop {
        let buf = &mut rbuf[pos..];
        if buf.len() < 2 {
            break Input::More;
        }
        let fin = buf[0] & 0x80 != 0;
        let opcode = buf[0] & 0x0f;
        if buf[1] & 0x80 == 0 {
            // Client frames must be masked.
            break Input::Close(1002u16.to_be_bytes().to_vec());
        }
        let (len, mut header) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => break Input::More,
            n => (n as usize, 2),
        };
        if len > MAX_CLIENT_MESSAGE {
            break Input::Close(1009u16.to_be_bytes().to_vec());
        }
        if buf.len() < header + 4 + len {
            break Input::More;
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&buf[header..header + 4]);
        header += 4;
        let payload = &mut buf[header..header + len];
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        pos += header + len;
        match opcode {
            0x1 if fin => on_text(hub, conn, topic, user, payload),
            0x1 => *fragments = Some(payload.to_vec()),
            0x0 => {
                if let Some(mut message) = fragments.take() {
                    message.extend_from_slice(payload);
                    if message.len() > MAX_CLIENT_MESSAGE {
                        break Input::Close(1009u16.to_be_bytes().to_vec());
                    }
                    if fin {
                        on_text(hub, conn, topic, user, &message);
                    } else {
                        *fragments = Some(message);
                    }
                }
            }
            0x8 => break Input::Close(payload.get(..2).unwrap_or(&[]).to_vec()),
            0x9 => hub.deliver(conn, &encode_frame(0xA, payload)),
            _ => {}
        }
    };
    rbuf.drain(..pos);
    if conn.dead.get() {
        return Input::Fail;
    }
    result
}

fn on_text(hub: &Hub, conn: &Rc<Conn>, topic: &str, user: &User, payload: &[u8]) {
    let reply = match serde_json::from_slice::<ClientMessage>(payload) {
        Ok(ClientMessage::Ping) => text_frame(rtk_peers::PONG_JSON),
        Ok(ClientMessage::SendMessage { room, .. }) if room != topic => text_frame(
            &rtk_peers::error_json(&rtk_peers::wrong_room_message(&room, topic)),
        ),
        Ok(ClientMessage::SendMessage { room, text }) => {
            let json = rtk_peers::new_message_json(&room, &user.name, &text);
            let _ = hub.publish_tx.send(resp_command(&[
                b"PUBLISH",
                room.as_bytes(),
                json.as_bytes(),
            ]));
            return;
        }
        Err(e) => text_frame(&rtk_peers::error_json(&format!(
            "Invalid message format: {e}"
        ))),
    };
    hub.deliver(conn, &reply);
}

// ---------------------------------------------------------------------------------------------

fn mode_from_env() -> (Mode, Duration) {
    let mode = match std::env::var("LIMIT_MODE").as_deref() {
        Err(_) | Ok("") | Ok("single") => Mode::Single,
        Ok("batch") => Mode::Batch,
        Ok(other) => {
            eprintln!("peer_limit: LIMIT_MODE={other:?} must be `single` or `batch`");
            std::process::exit(2);
        }
    };
    let batch_ms = match std::env::var("LIMIT_BATCH_MS") {
        Err(_) => 2,
        Ok(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("peer_limit: LIMIT_BATCH_MS={s:?} must be a positive integer");
                std::process::exit(2);
            }
        },
    };
    (mode, Duration::from_millis(batch_ms))
}

async fn run(addr: std::net::SocketAddr, target: RedisTarget, mode: Mode, batch: Duration) {
    let listener = rtk_peers::listen("peer_limit", addr);
    let (subscribe_tx, subscribe_rx) = mpsc::unbounded_channel();
    let (publish_tx, publish_rx) = mpsc::unbounded_channel();
    let hub = Rc::new(Hub {
        mode,
        topics: RefCell::new(HashMap::new()),
        dirty: RefCell::new(Vec::new()),
        subscribe_tx,
        publish_tx,
    });
    spawn_local(run_subscriber(
        Rc::clone(&hub),
        target.clone(),
        subscribe_rx,
    ));
    spawn_local(run_publisher(target, publish_rx));
    if mode == Mode::Batch {
        let hub = Rc::clone(&hub);
        spawn_local(async move {
            let mut tick = tokio::time::interval(batch);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                hub.flush_dirty();
            }
        });
    }
    eprintln!(
        "peer_limit listening on {addr} (mode {mode:?}{})",
        if mode == Mode::Batch {
            format!(", every {batch:?}")
        } else {
            String::new()
        }
    );
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                spawn_local(serve(Rc::clone(&hub), stream));
            }
            Err(e) => {
                // Out of descriptors and the like: back off a little.
                eprintln!("peer_limit: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = rtk_peers::bind_addr();
    let url = rtk_peers::redis_url("peer_limit");
    let target = redis_target(&url);
    let (mode, batch) = mode_from_env();
    tokio::task::LocalSet::new()
        .run_until(async move {
            tokio::select! {
                () = run(addr, target, mode, batch) => {}
                () = axum_realtime_kit::shutdown_signal() => {}
            }
        })
        .await;
    std::process::exit(0);
}
