//! A live dashboard: every 500 ms the server publishes its own metrics to the topic `dashboard`,
//! and a page draws them as line charts, live.
//!
//! ```sh
//! cargo run --release --example live_dashboard   # then open http://127.0.0.1:3001/
//! ```
//!
//! Environment: `BIND_ADDR` (default `127.0.0.1:3001`), `REDIS_URL` (unset: in-process broker;
//! set: every instance publishes to the same topic and each page plots every instance), `SHARDS`
//! (default: available parallelism), `RUST_LOG`.
//!
//! Routes:
//! - `GET /` → the dashboard page (`examples/static/dashboard.html`, plain JavaScript and a
//!   `<canvas>`).
//! - `GET /ws/dashboard` → WebSocket, no token needed (read-only data). Each text frame is one
//!   sample: `{"instance":…,"t_ms":…,"uptime_s":…,"rss_bytes":…,"cpu_percent":…,"threads":…,
//!   "connections_active":…,"deliveries":…,…}` — the service's `metrics()` counters plus the
//!   process's resident memory and CPU use, read from `/proc/self` (null where there is none).
//!   Any other topic is 404; what clients send is answered with an error.
//! - `GET /health` → `OK`; `GET /ready` → 200 while the broker is live, else 503.
//! - SIGTERM or Ctrl-C: every client gets close 1001, then the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum_realtime_kit::PublishError;
use axum_realtime_kit::prelude::*;
use serde::Serialize;

/// The topic samples are published to.
const TOPIC: &str = "dashboard";

/// How often a sample is published.
const PERIOD: Duration = Duration::from_millis(500);

/// The page, compiled into the binary.
const DASHBOARD_PAGE: &str = include_str!("static/dashboard.html");

/// One measurement of this process, as published.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Which instance measured it (its bind address).
    pub instance: String,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// Seconds since the process started.
    pub uptime_s: f64,
    /// Resident set size, bytes (`VmRSS` of `/proc/self/status`).
    pub rss_bytes: Option<u64>,
    /// CPU use since the previous sample, percent of one core (user + system).
    pub cpu_percent: Option<f64>,
    /// Threads of the process.
    pub threads: Option<u64>,
    /// Connections open now.
    pub connections_active: u64,
    /// Connections accepted since start.
    pub connections_opened: u64,
    /// Frames queued to subscribers since start.
    pub deliveries: u64,
    /// Bytes of those frames.
    pub bytes_queued: u64,
    /// Data messages received from clients since start.
    pub messages_in: u64,
    /// Messages published through the broker since start.
    pub publishes: u64,
    /// Publishes that failed.
    pub publish_errors: u64,
    /// Times the broker connection was rebuilt.
    pub broker_reconnects: u64,
    /// Connections closed as slow consumers.
    pub slow_consumer_closes: u64,
    /// Connections closed for protocol violations.
    pub protocol_errors: u64,
}

/// The dashboard's handler: the topic is read-only, so every client message is refused.
#[derive(Debug)]
pub struct DashboardHandler;

#[async_trait]
impl MessageHandler for DashboardHandler {
    type ClientMessage = serde_json::Value;
    type ServerEvent = Sample;
    type AppState = ();
    type UserId = ();

    async fn handle_broadcast_message(
        &self,
        _msg: serde_json::Value,
        _ctx: &ConnectionContext<(), ()>,
    ) -> Result<Option<Sample>, HandlerError> {
        Err(HandlerError::Custom(
            StatusCode::BAD_REQUEST,
            Some("the dashboard is read-only".into()),
        ))
    }
}

type Service = Arc<WebsocketService<DashboardHandler>>;

/// The dashboard routes.
pub fn dashboard_router(service: Service) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD_PAGE) }))
        .route("/ws/{topic}", get(ws_route))
        .route("/health", get(|| async { "OK" }))
        .route("/ready", get(ready))
        .with_state(service)
}

/// No token: anyone may watch. Only the `dashboard` topic exists.
async fn ws_route(
    ws: WebSocketUpgrade,
    State(service): State<Service>,
    Path(topic): Path<String>,
) -> Response {
    upgrade_handler(ws, State(service), (), topic, |_, (), topic| async move {
        if topic == TOPIC {
            Ok(())
        } else {
            Err(StatusCode::NOT_FOUND)
        }
    })
    .await
}

async fn ready(State(service): State<Service>) -> impl IntoResponse {
    if service.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
    }
}

/// Reads this process's counters from `/proc/self`.
#[derive(Debug)]
struct ProcessStats {
    started: Instant,
    last_cpu: Option<(Instant, u64)>,
}

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    fn new() -> Self {
        let mut stats = Self {
            started: Instant::now(),
            last_cpu: None,
        };
        stats.last_cpu = cpu_ticks().map(|t| (Instant::now(), t.0));
        stats
    }

    /// RSS, CPU % since the previous call, threads.
    fn sample(&mut self) -> (Option<u64>, Option<f64>, Option<u64>) {
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            });
        let now = Instant::now();
        let (mut cpu, mut threads) = (None, None);
        if let Some((ticks, n_threads)) = cpu_ticks() {
            threads = Some(n_threads);
            if let Some((then, before)) = self.last_cpu {
                let wall = now.duration_since(then).as_secs_f64();
                if wall > 0.0 {
                    let busy = ticks.saturating_sub(before) as f64 / USER_HZ;
                    cpu = Some((busy / wall * 100.0 * 10.0).round() / 10.0);
                }
            }
            self.last_cpu = Some((now, ticks));
        }
        (rss, cpu, threads)
    }
}

/// User + system CPU time of the whole process, in ticks, and its thread count.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15, threads field 20.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let threads: u64 = fields.get(17)?.parse().ok()?;
    Some((utime + stime, threads))
}

/// Publishes one sample every [`PERIOD`] until the service shuts down.
async fn publish_samples(service: Service, instance: String) {
    let mut stats = ProcessStats::new();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let m = service.metrics();
        let (rss_bytes, cpu_percent, threads) = stats.sample();
        let sample = Sample {
            instance: instance.clone(),
            t_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            uptime_s: stats.started.elapsed().as_secs_f64(),
            rss_bytes,
            cpu_percent,
            threads,
            connections_active: m.connections_active,
            connections_opened: m.connections_opened,
            deliveries: m.deliveries,
            bytes_queued: m.bytes_queued,
            messages_in: m.messages_in,
            publishes: m.publishes,
            publish_errors: m.publish_errors,
            broker_reconnects: m.broker_reconnects,
            slow_consumer_closes: m.slow_consumer_closes,
            protocol_errors: m.protocol_errors,
        };
        match service.publish(TOPIC, &sample).await {
            Ok(_) => {}
            Err(PublishError::Closed) => return,
            // A broker outage: skip this sample, the next one may get through.
            Err(e) => tracing::warn!(error = %e, "could not publish a sample"),
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "live_dashboard=info,axum_realtime_kit=info".into()),
        )
        .init();

    let addr: SocketAddr = match std::env::var("BIND_ADDR") {
        Ok(a) => a.parse().unwrap_or_else(|e| {
            eprintln!("BIND_ADDR={a:?} is not an address: {e}");
            std::process::exit(2);
        }),
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3001)),
    };
    let shards = match std::env::var("SHARDS") {
        Ok(s) => match s.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                eprintln!("SHARDS={s:?} must be a positive integer");
                std::process::exit(2);
            }
        },
        Err(_) => None,
    };
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    if redis_url.is_none() {
        tracing::info!("REDIS_URL not set: using the in-process broker (single instance)");
    }

    let mut builder =
        WebsocketService::builder(DashboardHandler, Arc::new(())).redis_url(redis_url);
    if let Some(n) = shards {
        builder = builder.shards(n);
    }
    let service = match builder.try_build() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let listener = match axum_realtime_kit::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!(%addr, shards = service.shard_count(), "live_dashboard listening on http://{addr}/");

    tokio::spawn(publish_samples(service.clone(), addr.to_string()));
    let for_shutdown = service.clone();
    let served = axum::serve(listener, dashboard_router(service))
        .with_graceful_shutdown(async move {
            axum_realtime_kit::shutdown_signal().await;
            tracing::info!("shutting down: closing every connection with 1001");
            for_shutdown.shutdown().await;
        })
        .await;
    if let Err(e) = served {
        eprintln!("server error: {e}");
        std::process::exit(1);
    }
}
