//! Shared fixtures: a raw WebSocket client that can also break the protocol on purpose; the tests'
//! own chat (see `chat`) served in-process on a free loopback port; and the examples run as
//! processes.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod browser;
pub mod certs;
pub mod chat;
pub mod presence;
pub mod proxy;
pub mod redis_cluster;
pub mod redis_server;
pub mod rtk1;

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum_realtime_kit::ws::handler::MessageHandler;
use axum_realtime_kit::ws::service::WebsocketService;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on any single wait in a test, so a broken server fails the test instead of
/// hanging it. Never used to assert speed.
pub const WAIT: Duration = Duration::from_secs(10);

pub const ALICE: &str = "a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8:alice";
pub const BOB: &str = "b1b2b3b4-a1a2-b1b2-c1c2-c3c4c5c6c7c8:bob";
pub const ALICE_ID: &str = "a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8";

/// `target/<profile>/examples/<name>`, built for this test's profile first. `cargo test` builds
/// the examples, but `cargo test --test <one>` does not, and a stale binary (an older example, or
/// an older library under it) would be tested. `cargo build` is a no-op when everything is fresh.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // What cargo set for this test's own crate: inherited, these differ from a plain build's
        // environment, so a dependency whose build script watches them (ring) would be built
        // again, with everything above it, by this build and again by the next `cargo test`.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || key == "CARGO_PRIMARY_PACKAGE"
                || key == "CARGO_TARGET_TMPDIR"
            {
                build.env_remove(&*key);
            }
        }
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "cargo build --example {name} failed"
        );
        built.push(name.to_string());
    }
    dir.join("examples").join(name)
}

/// A process killed (SIGKILL, by PID) and reaped when dropped.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts example `name` on `127.0.0.1:<port>` with `SHARDS=2`, no inherited `REDIS_URL`, then
/// `env`; returns once the port accepts connections.
pub fn spawn_example(name: &str, port: u16, env: &[(&str, &str)]) -> Process {
    let mut cmd = Command::new(example_binary(name));
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("SHARDS", "2")
        .env_remove("REDIS_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn example {name}: {e}"));
    let process = Process { child };
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "example {name} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    process
}

/// The `basic_chat` example running as a process.
pub struct ExampleServer {
    pub addr: SocketAddr,
    pub process: Process,
}

/// Runs the `basic_chat` example on a free port with `shards` shards, and the in-process broker
/// or `redis_url`.
pub fn basic_chat(shards: usize, redis_url: Option<&str>) -> ExampleServer {
    let port = free_port();
    let shards = test_shards(shards).to_string();
    let mut env = vec![("SHARDS", shards.as_str())];
    env.extend(redis_url.map(|url| ("REDIS_URL", url)));
    let process = spawn_example("basic_chat", port, &env);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    ExampleServer { addr, process }
}

/// `shards`, unless `RTK_TEST_SHARDS` overrides the shard count of every test server, to run the
/// whole suite with one layout: `RTK_TEST_SHARDS=1 cargo test`, `RTK_TEST_SHARDS=4 cargo test`.
fn test_shards(shards: usize) -> usize {
    std::env::var("RTK_TEST_SHARDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(shards)
}

/// A running chat server.
pub struct Server {
    pub addr: SocketAddr,
    pub service: Arc<WebsocketService<chat::ChatHandler>>,
}

/// Serves the tests' chat with `shards` shards and the in-process broker.
pub async fn chat_server(shards: usize) -> Server {
    chat_server_with(None, shards).await
}

/// Serves the tests' chat; with `redis_url`, waits until the instance is ready.
pub async fn chat_server_with(redis_url: Option<String>, shards: usize) -> Server {
    let service = chat::builder()
        .redis_url(redis_url)
        .shards(test_shards(shards))
        .build();
    let server = serve_chat(service).await;
    wait_ready(&server.service).await;
    server
}

/// Serves `router` on a free loopback port; returns the address.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Serves the tests' chat for an already built `service`.
pub async fn serve_chat(service: Arc<WebsocketService<chat::ChatHandler>>) -> Server {
    let addr = serve(chat::router(service.clone())).await;
    Server { addr, service }
}

/// Checks that a service whose broker cannot connect never gets ready: it keeps failing to
/// connect (counted as reconnects) and publishes are refused.
pub async fn assert_stays_unready(service: &Arc<WebsocketService<chat::ChatHandler>>) {
    let svc = service.clone();
    wait_until("three failed connection attempts", move || {
        svc.metrics().broker_reconnects >= 3
    })
    .await;
    assert!(!service.is_ready());
    assert!(service.publish_raw("general", "{}").await.is_err());
}

/// Polls `cond` every 10 ms until it holds; fails the test after [`WAIT`].
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, WAIT, cond).await;
}

/// [`wait_until`], failing the test after `within` instead: for steps bounded by something
/// slower than one server (a Redis Cluster healing). A bound on a wait, never a speed assertion.
pub async fn wait_until_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let ok = tokio::time::timeout(within, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting for: {what}");
}

/// Waits until `service` is ready (its broker connected and subscribed); fails the test after
/// [`WAIT`].
pub async fn wait_ready<H: MessageHandler>(service: &WebsocketService<H>) {
    wait_ready_within(service, WAIT).await;
}

/// [`wait_ready`], failing the test after `within` instead (an instance on a Redis Cluster
/// reaches every primary first).
pub async fn wait_ready_within<H: MessageHandler>(service: &WebsocketService<H>, within: Duration) {
    wait_until_within("instance ready", within, || service.is_ready()).await;
}

/// A loopback port that was free a moment ago and that no other test of this binary was given:
/// tests run in parallel, and two servers started on one port would fail each other.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if reserve_port(port) {
            return port;
        }
    }
}

/// Marks `port` as taken by a test of this binary; `false` when another test already has it.
pub fn reserve_port(port: u16) -> bool {
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    TAKEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port)
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// The HTTP status of an upgrade attempt, and the client when it was 101.
pub async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<Client>) {
    let (status, _, client) = try_connect_head(addr, path, headers).await;
    (status, client)
}

/// [`try_connect`], with the response's head (status line and headers).
pub async fn try_connect_head(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Option<Client>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("upgrade response timed out")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if status != 101 {
        return (status, head, None);
    }
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "wrong Sec-WebSocket-Accept in {head}"
    );
    buf.drain(..head_end);
    (status, head, Some(Client { stream, buf }))
}

/// Connects to `/ws/{topic}?token=…` and expects 101.
pub async fn connect(addr: SocketAddr, topic: &str, token: &str) -> Client {
    let (status, client) = try_connect(addr, &format!("/ws/{topic}?token={token}"), &[]).await;
    assert_eq!(status, 101, "upgrade to {topic} refused");
    client.unwrap()
}

pub fn send_message(room: &str, text: &str) -> String {
    serde_json::json!({"SendMessage": {"room": room, "text": text}}).to_string()
}

impl Client {
    /// Sends one frame; `mask: false` breaks RFC 6455 on purpose.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], mask: bool) {
        let bytes = encode_client_frame(fin, opcode, payload, mask);
        self.stream.write_all(&bytes).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, 0x1, text.as_bytes(), true).await;
    }

    /// Next frame, or `None` at end of stream.
    pub async fn recv_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("timed out waiting for a frame")
            {
                Ok(n) => n,
                Err(_) => return None,
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Next text frame as JSON (pings and pongs are skipped).
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let f = self.recv_frame().await.expect("stream ended");
            match f.opcode {
                0x1 => return serde_json::from_slice(&f.payload).expect("server sent JSON"),
                0x9 | 0xA => continue,
                op => panic!("expected text, got opcode {op:#x}: {:?}", f.payload),
            }
        }
    }

    /// Expects a close frame (data before it is skipped) and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.recv_frame().await {
                Some(f) if f.opcode == 0x8 => {
                    assert!(f.payload.len() >= 2, "close without a code");
                    return u16::from_be_bytes([f.payload[0], f.payload[1]]);
                }
                Some(_) => continue,
                None => panic!("stream ended without a close frame"),
            }
        }
    }

    /// Answers the server's close and waits for the TCP stream to end.
    pub async fn finish_close(&mut self) {
        self.send_frame(true, 0x8, &1000u16.to_be_bytes(), true)
            .await;
        while self.recv_frame().await.is_some() {}
    }

    /// Proves nothing is queued ahead: sends `"Ping"` and expects `"Pong"` as the very next text.
    pub async fn assert_nothing_pending(&mut self) {
        self.send_text("\"Ping\"").await;
        assert_eq!(self.recv_json().await, Value::from("Pong"));
    }

    /// Drops the TCP connection without a close frame.
    pub fn abort(self) {
        let std = self.stream.into_std().unwrap();
        // SO_LINGER 0 would reset; a plain drop sends FIN, which is the common "tab closed" case.
        drop(std);
    }
}

/// A client frame as [`Client::send_frame`] sends it: `mask: false` breaks RFC 6455 on purpose.
pub fn encode_client_frame(fin: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let key = mask.then_some([0x12, 0x34, 0x56, 0x78]);
    axum_realtime_kit::bench_api::client_frame(fin, opcode, payload, key).into()
}

fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, mut pos) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            )
        }
        n => (n as usize, 2),
    };
    if buf.len() < pos + len {
        return None;
    }
    let payload = buf[pos..pos + len].to_vec();
    pos += len;
    Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            rsv1: buf[0] & 0x40 != 0,
            opcode: buf[0] & 0x0F,
            payload,
        },
        pos,
    ))
}

/// Sends one HTTP/1.1 POST of a JSON body, with extra `headers`, and returns the status and body of the response.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("response timed out")
        .unwrap();
    let out = String::from_utf8_lossy(&out).to_string();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}
