//! The load-test harness of axum-realtime-kit.
//!
//! It drives `examples/basic_chat` and the peers in `loadtest/peers` (the 0.1.0 crate, a
//! hand-written axum + broadcast server, and a *limit* server that only writes pre-encoded frames)
//! with one lean client, over loopback only, bounded in count and time.
//!
//! ```sh
//! cargo run --release -p loadtest -- compare --scenario fanout --reps 3 --pin
//! cargo run --release -p loadtest -- fanout --addr 127.0.0.1:3000 --redis 127.0.0.1:6379 --server-pid 1234
//! ```

mod charts;
mod client;
mod cluster;
mod failover;
mod positions;
mod presence;
mod publish;
mod recovery;
mod redis_clients;
mod scenario;
mod soak;
mod system;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use serde::Serialize;

use scenario::{ChatArgs, ConnectArgs, FanoutArgs, NotificationsArgs, SlowArgs, Target};
use system::{StartOpts, System};

#[derive(Debug, Parser)]
#[command(about = "Load tests for axum-realtime-kit and its peers (loopback only, bounded).")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Write the result as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write the result as a Markdown table to this file (it is printed to stdout too).
    #[arg(long, global = true)]
    markdown: Option<PathBuf>,
    /// Client worker threads.
    #[arg(long, global = true, default_value_t = 1)]
    client_threads: usize,
}

/// An existing server to drive.
#[derive(Debug, Clone, clap::Args)]
struct External {
    /// The server's address (loopback).
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// The Redis it uses, for publishing straight to Redis.
    #[arg(long)]
    redis: Option<SocketAddr>,
    /// The server's PID, to report its CPU time and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// What the server speaks: the `basic_chat` contract, or Socket.IO.
    #[arg(long, value_enum, default_value_t = client::Proto::Rtk)]
    proto: client::Proto,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// S subscribers over T topics; publish at stepped rates; find the maximum sustainable rate.
    Fanout {
        #[command(flatten)]
        ext: External,
        #[command(flatten)]
        args: FanoutArgs,
    },
    /// C clients each sending SendMessage at a rate; the full path through the server.
    Chat {
        #[command(flatten)]
        ext: External,
        #[command(flatten)]
        args: ChatArgs,
    },
    /// Open K connections as fast as possible, hold them idle, report server RSS per connection.
    Connect {
        #[command(flatten)]
        ext: External,
        #[command(flatten)]
        args: ConnectArgs,
    },
    /// One client that stops reading among fast ones.
    Slow {
        #[command(flatten)]
        ext: External,
        #[command(flatten)]
        args: SlowArgs,
    },
    /// Run one scenario against several systems in the same invocation, interleaved.
    Compare(CompareArgs),
    /// Draws SVG charts from `compare --json` outputs (fan-out: deliveries/s and p99 against the
    /// offered rate per system; connect: memory per idle connection per system).
    Charts(charts::ChartsArgs),
    /// Bounded soak of our server: churn and steady publishes through Redis; checks RSS, leaks
    /// and loss (starts its own Redis and basic_chat).
    Soak(soak::SoakArgs),
    /// The runtime's own Redis connections against fred and redis-rs: publishes/s and
    /// messages received/s, CPU per operation (starts its own Redis; each measurement in a
    /// process of its own).
    RedisClients(redis_clients::RedisClientsArgs),
    /// Sentinel failover under traffic: time from killing the primary to resumed delivery, and
    /// whether clients reconnected (starts its own primary, replica, sentinels and instances).
    Failover(failover::FailoverArgs),
    /// One measurement of `redis-clients`, in a process of its own (run by `redis-clients`).
    #[command(hide = true)]
    RedisClientsWorker(redis_clients::WorkerArgs),
    /// Every client of a positioned room dropped at once, then all reconnecting with their
    /// positions while publishes continue: time until each has every message again, loss,
    /// duplicates, history reads (starts its own Redis and basic_chat).
    Recovery(recovery::RecoveryArgs),
    /// What positions cost: a room with history against one without, same load, same run
    /// (fan-out CPU per delivery, and the publish path's saturation; starts its own Redis and
    /// basic_chat).
    Positions(positions::PositionsArgs),
    /// What presence costs: joins with and without it (interleaved), stats and listing calls,
    /// Redis commands and CPU per join and leave (starts its own Redis and basic_chat).
    Presence(presence::PresenceArgs),
    /// Redis Cluster: Redis CPU per published message on each node, sharded Pub/Sub
    /// (`redis+cluster://`) against classic Pub/Sub on one node, same cluster, interleaved
    /// (starts its own three-primary cluster and basic_chat instances).
    Cluster(cluster::ClusterArgs),
}

/// The scenario a comparison runs, with its own arguments.
#[derive(Debug, Clone, Subcommand)]
enum CompareScenario {
    /// The fan-out sweep (see `fanout --help`).
    Fanout(FanoutArgs),
    /// The chat path (see `chat --help`).
    Chat(ChatArgs),
    /// Connection set-up and idle memory (see `connect --help`).
    Connect(ConnectArgs),
    /// Per-user channels: N topics with one subscriber each, publishes spread over them
    /// straight through Redis (the server's Redis subscriber carries every message).
    Notifications(NotificationsArgs),
    /// Two instances of each system sharing one Redis: subscribers on one, the publisher
    /// (`SendMessage`, or a Socket.IO `send` event) on the other, so that every delivery crosses
    /// instances. Takes the fan-out arguments; `--via` is always `ws`.
    MultiInstance(FanoutArgs),
    /// One instance, then two sharing one Redis with the same subscribers each (fan-out
    /// arguments, `basic_chat`'s protocol): each instance's CPU per delivery and Redis's CPU per
    /// publish, two instances against one, in the same run.
    SharedRedis(FanoutArgs),
}

impl CompareScenario {
    /// The fan-out sweep a scenario runs, if it is one.
    fn fanout(&self) -> Option<FanoutArgs> {
        match self {
            Self::Fanout(f) | Self::SharedRedis(f) => Some(f.clone()),
            Self::Notifications(n) => Some(n.fanout()),
            Self::MultiInstance(f) => Some(FanoutArgs {
                via: scenario::Via::Ws,
                ..f.clone()
            }),
            Self::Chat(_) | Self::Connect(_) => None,
        }
    }

    /// The numbers of instances carrying the subscribers, one arrangement each, run in this
    /// order within every rep: one, then two sharing one Redis for `shared-redis`.
    fn arrangements(&self) -> &'static [usize] {
        match self {
            Self::SharedRedis(_) => &[1, 2],
            _ => &[1],
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Fanout(_) => "Fan-out",
            Self::Notifications(_) => "Notifications (one subscriber per topic, via Redis)",
            Self::MultiInstance(_) => {
                "Multi-instance (subscribers on one instance, publisher on another, one Redis)"
            }
            Self::SharedRedis(_) => {
                "Shared Redis (one instance, then two with the same subscribers each, one Redis)"
            }
            Self::Chat(_) => "Chat",
            Self::Connect(_) => "Connect",
        }
    }
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// The scenario to run on every system, and its arguments.
    #[command(subcommand)]
    scenario: CompareScenario,
    /// Systems, in the order they are interleaved (A B C A B C …).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![System::Ours, System::Reference, System::Axum, System::LimitBatch])]
    systems: Vec<System>,
    /// Repetitions of each system.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Pin each server to CPU 0 and this harness to CPU 1.
    #[arg(long)]
    pin: bool,
    /// SHARDS for our server.
    #[arg(long)]
    shards: Option<usize>,
    /// Use the binaries already built in target/release.
    #[arg(long)]
    no_build: bool,
    /// Extra KEY=VALUE environment for our server.
    #[arg(long = "ours-env", value_delimiter = ',')]
    ours_env: Vec<String>,
    /// Another build of basic_chat, run as the system `baseline` with the same settings as
    /// `ours` (e.g. `--systems ours,baseline --baseline /tmp/before/basic_chat`).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    // A signal ends the run by dropping it: every server and Redis it started is stopped on the
    // way out, as at the end of a run, instead of outliving the harness.
    let outcome = rt.block_on(async {
        tokio::select! {
            res = run(&cli) => res,
            sig = stop_signal() => Err(format!("stopped by {sig}")),
        }
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok((json, markdown)) => {
            println!("{markdown}");
            if let Some(p) = &cli.json {
                if let Err(e) = std::fs::write(p, json) {
                    eprintln!("cannot write {}: {e}", p.display());
                }
            }
            if let Some(p) = &cli.markdown {
                if let Err(e) = std::fs::write(p, &markdown) {
                    eprintln!("cannot write {}: {e}", p.display());
                }
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(1);
        }
    }
}

/// The first SIGINT or SIGTERM, by name; pending forever where neither can be watched.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn target(ext: &External) -> Result<Target, String> {
    if !ext.addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", ext.addr));
    }
    if let Some(r) = ext.redis {
        if !r.ip().is_loopback() {
            return Err(format!("{r} is not a loopback address"));
        }
    }
    Ok(Target {
        addr: ext.addr,
        pid: ext.server_pid,
        redis: ext.redis,
        redis_pid: None,
        proto: ext.proto,
        publish_addr: None,
        mirror: None,
    })
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

async fn run(cli: &Cli) -> Result<(String, String), String> {
    let io = |e: std::io::Error| e.to_string();
    match &cli.command {
        Command::Fanout { ext, args } => {
            let r = scenario::fanout(&target(ext)?, args).await.map_err(io)?;
            let md = report::fanout_steps("fanout", &r);
            Ok((to_json(&r), md))
        }
        Command::Chat { ext, args } => {
            let r = scenario::chat(&target(ext)?, args).await.map_err(io)?;
            Ok((to_json(&r), report::chat_steps(&r)))
        }
        Command::Connect { ext, args } => {
            let r = scenario::connect(&target(ext)?, args).await.map_err(io)?;
            Ok((to_json(&r), report::connect_one(&r)))
        }
        Command::Slow { ext, args } => {
            let r = scenario::slow(&target(ext)?, args).await.map_err(io)?;
            Ok((to_json(&r), report::slow(&r)))
        }
        Command::Compare(args) => compare(args).await,
        Command::Charts(args) => {
            let files = charts::charts(args)?;
            let list: Vec<String> = files.iter().map(|p| format!("- {}", p.display())).collect();
            Ok((
                String::from("[]"),
                format!("Charts written:\n{}\n", list.join("\n")),
            ))
        }
        Command::Failover(args) => failover::failover(&workspace_root(), args).await,
        Command::RedisClients(args) => redis_clients::run(args, cli.client_threads),
        Command::RedisClientsWorker(args) => redis_clients::worker(args).await,
        Command::Soak(args) => {
            let r = soak::soak(&workspace_root(), args).await?;
            let md = soak::report(&r);
            if !r.ok {
                println!("{md}");
                return Err("soak: a check failed (table above)".into());
            }
            Ok((to_json(&r), md))
        }
        Command::Recovery(args) => {
            let r = recovery::recovery(&workspace_root(), args).await?;
            Ok((to_json(&r), recovery::report(&r)))
        }
        Command::Positions(args) => {
            let r = positions::positions(&workspace_root(), args).await?;
            Ok((to_json(&r), positions::report(&r)))
        }
        Command::Presence(args) => {
            let r = presence::presence(&workspace_root(), args).await?;
            Ok((to_json(&r), presence::report(&r)))
        }
        Command::Cluster(args) => {
            let r = cluster::cluster(&workspace_root(), args).await?;
            Ok((to_json(&r), cluster::report(&r)))
        }
    }
}

/// One run of one system in a comparison.
#[derive(Debug, Serialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
enum RunResult {
    Fanout(scenario::FanoutResult),
    Chat(scenario::ChatResult),
    Connect(scenario::ConnectResult),
}

#[derive(Debug, Serialize)]
struct CompareRun {
    system: System,
    rep: usize,
    /// Instances carrying the subscribers: 2 for the second arrangement of `shared-redis`.
    instances: usize,
    result: Result<RunResult, String>,
}

/// Refuses a run that would need more open files than this process may hold, before anything
/// starts: the client holds every subscriber and every publishing connection, and a server
/// (which inherits the limit) as many. A run that found out halfway would report the systems
/// it reached and fail the others on refused connections.
fn check_open_files(args: &CompareArgs) -> Result<(), String> {
    let Some(fanout) = args.scenario.fanout() else {
        return Ok(());
    };
    let limit = system::raise_open_files_limit();
    let instances = args
        .scenario
        .arrangements()
        .iter()
        .copied()
        .max()
        .unwrap_or(1);
    let too_many: Vec<String> = args
        .systems
        .iter()
        .filter_map(|&sys| {
            let needed = open_files_needed(&fanout, sys, instances);
            (needed > limit).then(|| format!("{} needs about {needed}", sys.name()))
        })
        .collect();
    if too_many.is_empty() {
        return Ok(());
    }
    Err(format!(
        "not enough open files: {} with {} subscribers and {} topics, and this process may \
         hold {limit} (the hard limit of `ulimit -n`). Lower --subscribers or --topics, raise \
         the limit, or leave those systems out.",
        too_many.join(", "),
        fanout.subscribers,
        fanout.topics.max(1),
    ))
}

/// Descriptors the client holds in a fan-out run of `sys`: its subscribers (on every instance),
/// one publishing connection per topic where messages enter through a server (the Socket.IO
/// servers, whose adapters carry their own encoding, or `--via ws`), and some to spare for
/// Redis and the runtime.
fn open_files_needed(fanout: &FanoutArgs, sys: System, instances: usize) -> u64 {
    let through_server =
        sys.proto() == client::Proto::SocketIo || matches!(fanout.via, scenario::Via::Ws);
    let publishers = if through_server {
        fanout.topics.max(1)
    } else {
        1
    };
    (fanout.subscribers * instances + publishers + 64) as u64
}

async fn compare(args: &CompareArgs) -> Result<(String, String), String> {
    check_open_files(args)?;
    let root = workspace_root();
    if !args.no_build {
        system::build_all(&root, &args.systems).map_err(|e| e.to_string())?;
    }
    let target_dir = system::release_dir(&root);
    if args.pin {
        let me = std::process::id().to_string();
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-cp", "1", &me])
            .stdout(std::process::Stdio::null())
            .status();
    }
    // With `ours-tls` among the systems, the one Redis of the run listens with TLS as well.
    let tls = if args.systems.contains(&System::OursTls) {
        Some(system::start_redis_tls().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let plain = match tls {
        Some(_) => None,
        None => Some(system::start_redis().map_err(|e| e.to_string())?),
    };
    let redis = match (&tls, &plain) {
        (Some(t), _) => &t.redis,
        (None, Some(p)) => p,
        (None, None) => unreachable!(),
    };
    let redis_url = format!("redis://{}/", redis.addr);
    let mut runs = Vec::new();
    let arrangements = args.scenario.arrangements();
    for rep in 0..args.reps.max(1) {
        for (&sys, &instances) in args
            .systems
            .iter()
            .flat_map(|s| arrangements.iter().map(move |i| (s, i)))
        {
            eprintln!(
                "== {}{} (rep {}/{})",
                sys.name(),
                if instances > 1 { " × 2 instances" } else { "" },
                rep + 1,
                args.reps.max(1)
            );
            let like_ours = matches!(sys, System::Ours | System::OursTls | System::Baseline);
            let mut env = if like_ours {
                system::env_pairs(&args.ours_env)
            } else {
                Vec::new()
            };
            let mut url = redis_url.clone();
            if let (System::OursTls, Some(t)) = (sys, &tls) {
                url = format!("rediss://{}/", t.tls_addr);
                env.push(("REDIS_CA_FILE".into(), t.ca.to_string_lossy().into_owned()));
            }
            let opts = StartOpts {
                redis_url: Some(url),
                shards: if like_ours { args.shards } else { None },
                cpus: args.pin.then(|| "0".to_string()),
                env,
                binary: if sys == System::Baseline {
                    Some(
                        args.baseline
                            .clone()
                            .ok_or("--systems baseline needs --baseline PATH")?,
                    )
                } else {
                    None
                },
            };
            let result = async {
                let mut server =
                    system::start_system(sys, &target_dir, &opts).map_err(|e| e.to_string())?;
                // The second instance: the publisher's in a multi-instance run, the mirror in
                // the second arrangement of shared-redis (unpinned: with --pin the measured
                // instance has CPU 0 to itself).
                let second = match &args.scenario {
                    CompareScenario::MultiInstance(_) => true,
                    CompareScenario::SharedRedis(_) => instances > 1,
                    _ => false,
                };
                let mut other = if second {
                    let o = StartOpts {
                        cpus: None,
                        ..opts.clone()
                    };
                    Some(system::start_system(sys, &target_dir, &o).map_err(|e| e.to_string())?)
                } else {
                    None
                };
                let t = Target {
                    addr: server.addr,
                    pid: Some(server.pid()),
                    redis: Some(redis.addr),
                    redis_pid: Some(redis.pid()),
                    proto: sys.proto(),
                    publish_addr: match &args.scenario {
                        CompareScenario::MultiInstance(_) => other.as_ref().map(|o| o.addr),
                        _ => None,
                    },
                    mirror: match &args.scenario {
                        CompareScenario::SharedRedis(_) => {
                            other.as_ref().map(|o| scenario::Mirror {
                                addr: o.addr,
                                pid: Some(o.pid()),
                            })
                        }
                        _ => None,
                    },
                };
                let r = match &args.scenario {
                    CompareScenario::Fanout(_)
                    | CompareScenario::Notifications(_)
                    | CompareScenario::MultiInstance(_)
                    | CompareScenario::SharedRedis(_) => {
                        let a = args.scenario.fanout().unwrap_or_else(|| unreachable!());
                        scenario::fanout(&t, &a).await.map(RunResult::Fanout)
                    }
                    CompareScenario::Chat(a) => scenario::chat(&t, a).await.map(RunResult::Chat),
                    CompareScenario::Connect(a) => {
                        scenario::connect(&t, a).await.map(RunResult::Connect)
                    }
                };
                server.stop();
                if let Some(o) = other.as_mut() {
                    o.stop();
                }
                r.map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = &result {
                eprintln!("  {} failed: {e}", sys.name());
            }
            runs.push(CompareRun {
                system: sys,
                rep,
                instances,
                result,
            });
            // Let sockets in TIME_WAIT and the server's exit settle between systems.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
    let md = report::compare(args, &runs);
    Ok((to_json(&runs), md))
}

mod report {
    //! Markdown tables.

    use std::fmt::Write;

    use super::{CompareArgs, CompareRun, CompareScenario, RunResult};
    use crate::scenario::{ChatResult, ConnectResult, FanoutResult, SlowResult};
    use crate::system::System;

    fn opt(v: Option<f64>, digits: usize) -> String {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "–".into())
    }

    pub(super) fn fanout_steps(title: &str, r: &FanoutResult) -> String {
        let mut s = format!(
            "### {title}: {} subscribers, {} topic(s), {} B payloads\n\n\
             | pub/s | deliveries/s | delivered | subs with loss | reorders | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | server CPU µs/delivery | wire B/delivery | peak RSS MiB | pass |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|\n",
            r.args.subscribers, r.args.topics, r.args.payload
        );
        for st in &r.steps {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.4} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
                st.publishes_per_s,
                st.deliveries_per_s,
                st.delivered_fraction,
                st.subscribers_with_loss,
                st.reorders,
                st.latency.p50_ms,
                st.latency.p90_ms,
                st.latency.p99_ms,
                st.latency.p999_ms,
                st.latency.max_ms,
                opt(st.server_cpu_us_per_delivery, 2),
                opt(st.wire_bytes_per_delivery, 0),
                opt(st.server_peak_rss_mib, 1),
                if st.pass { "yes" } else { "no" }
            );
        }
        let _ = writeln!(
            s,
            "\nMaximum sustainable: {} deliveries/s (≥ {} delivered, p99 ≤ {} ms); {} connect failures.",
            opt(r.max_sustainable_per_s, 0),
            r.args.min_delivered,
            r.args.p99_bound_ms,
            r.connect_failures
        );
        s
    }

    pub(super) fn chat_steps(r: &ChatResult) -> String {
        let mut s = format!(
            "### chat: {} clients in {} rooms\n\n\
             | sent/s | handled/s | deliveries/s | delivered | p50 ms | p99 ms | send blocked | server CPU s |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|\n",
            r.args.clients, r.args.topics
        );
        for st in &r.steps {
            let _ = writeln!(
                s,
                "| {:.0} | {:.0} | {:.0} | {:.4} | {:.2} | {:.2} | {} | {} |",
                st.sent_per_s,
                st.handled_per_s,
                st.deliveries_per_s,
                st.delivered_fraction,
                st.latency.p50_ms,
                st.latency.p99_ms,
                st.send_blocked,
                opt(st.server_cpu_s, 2)
            );
        }
        s
    }

    pub(super) fn connect_one(r: &ConnectResult) -> String {
        format!(
            "| connections | failures | seconds | handshakes/s | server KiB/connection |\n|---:|---:|---:|---:|---:|\n| {} | {} | {:.3} | {:.0} | {} |\n",
            r.opened,
            r.failures,
            r.seconds,
            r.handshakes_per_s,
            opt(r.server_kib_per_connection, 2)
        )
    }

    pub(super) fn slow(r: &SlowResult) -> String {
        let row = |name: &str, st: &crate::scenario::FanoutStep| {
            format!(
                "| {name} | {:.4} | {:.2} | {:.2} | {} |\n",
                st.delivered_fraction,
                st.latency.p50_ms,
                st.latency.p99_ms,
                opt(st.server_peak_rss_mib, 1)
            )
        };
        format!(
            "### slow consumer: {} fast subscribers, {} pub/s of {} B\n\n\
             | phase | fast delivered | p50 ms | p99 ms | peak RSS MiB |\n|---|---:|---:|---:|---:|\n{}{}\n\
             Server RSS (MiB) each second with the stalled client: {:?}\n",
            r.args.fast,
            r.args.rate,
            r.args.payload,
            row("without stalled client", &r.without_stalled),
            row("with stalled client", &r.with_stalled),
            r.rss_timeline_mib
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        )
    }

    /// The median of `v`; `None` when it is empty.
    pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    /// `v / base` with two decimals, or "–" without both or with a base of 0.
    fn ratio(v: Option<f64>, base: Option<f64>) -> String {
        match (v, base) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
            _ => "–".into(),
        }
    }

    /// Over the fan-out runs `which` keeps, the median of `g` at their step offered `rate`
    /// pub/s, and how many runs had a value there.
    fn step_median(
        runs: &[CompareRun],
        which: impl Fn(&CompareRun) -> bool,
        rate: f64,
        g: &dyn Fn(&crate::scenario::FanoutStep) -> Option<f64>,
    ) -> (Option<f64>, usize) {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| which(r))
            .filter_map(|r| match r.result.as_ref().ok()? {
                RunResult::Fanout(fr) => fr.steps.iter().find(|st| st.publishes_per_s == rate),
                _ => None,
            })
            .filter_map(g)
            .collect();
        let n = v.len();
        (median(v), n)
    }

    /// Per offered rate, per system: medians over reps of deliveries/s, delivered fraction, p99,
    /// server CPU per delivery (× ours) and Redis cores.
    fn fanout_steps_by_rate(
        f: &crate::scenario::FanoutArgs,
        systems: &[System],
        runs: &[CompareRun],
    ) -> String {
        let mut s = String::from(
            "\nEach step, medians over reps (steps a run did not reach are left out):\n\n\
             | pub/s | offered deliveries/s | system | deliveries/s | delivered | p99 ms | server CPU µs/delivery | CPU × ours | Redis cores | reps |\n\
             |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut systems = systems.to_vec();
        systems.dedup();
        let step_metric =
            |sys: System, rate: f64, g: &dyn Fn(&crate::scenario::FanoutStep) -> Option<f64>| {
                step_median(runs, |r| r.system == sys, rate, g)
            };
        for &rate in &f.rates {
            let (ours_cpu, _) =
                step_metric(System::Ours, rate, &|st| st.server_cpu_us_per_delivery);
            for &sys in &systems {
                let (got, n) = step_metric(sys, rate, &|st| Some(st.deliveries_per_s));
                if n == 0 {
                    continue;
                }
                let (frac, _) = step_metric(sys, rate, &|st| Some(st.delivered_fraction));
                let (p99, _) = step_metric(sys, rate, &|st| Some(st.latency.p99_ms));
                let (cpu, _) = step_metric(sys, rate, &|st| st.server_cpu_us_per_delivery);
                let (redis, _) = step_metric(sys, rate, &|st| st.redis_cores);
                let _ = writeln!(
                    s,
                    "| {rate} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {n} |",
                    f.offered_deliveries_per_s(rate),
                    sys.name(),
                    opt(got, 0),
                    opt(frac, 4),
                    opt(p99, 2),
                    opt(cpu, 2),
                    ratio(cpu, ours_cpu),
                    opt(redis, 2),
                );
            }
        }
        s
    }

    /// `shared-redis`: per rate and system, one instance against two sharing one Redis, medians
    /// over reps: each instance's CPU per delivery and Redis's CPU per publish, with ratios.
    fn shared_redis(
        f: &crate::scenario::FanoutArgs,
        systems: &[System],
        runs: &[CompareRun],
    ) -> String {
        let mut s = String::from(
            "| pub/s | frames/s per connection | system | instances | deliveries/s per instance | delivered | p99 ms | server CPU µs/delivery (first) | (second) | × one instance | Redis CPU µs/publish | × one instance | reps |\n\
             |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let metric =
            |sys: System,
             instances: usize,
             rate: f64,
             g: &dyn Fn(&crate::scenario::FanoutStep) -> Option<f64>| {
                step_median(
                    runs,
                    |r| r.system == sys && r.instances == instances,
                    rate,
                    g,
                )
            };
        // Per rep, the mean of the instances' CPU per delivery.
        let cpu_mean = |st: &crate::scenario::FanoutStep| match st.mirror_cpu_us_per_delivery {
            Some(m) => st.server_cpu_us_per_delivery.map(|c| (c + m) / 2.0),
            None => st.server_cpu_us_per_delivery,
        };
        for &rate in &f.rates {
            for &sys in systems {
                let (one_cpu, _) = metric(sys, 1, rate, &cpu_mean);
                let (one_redis, _) = metric(sys, 1, rate, &|st| st.redis_cpu_us_per_publish);
                for instances in [1, 2] {
                    let (got, n) = metric(sys, instances, rate, &|st| Some(st.deliveries_per_s));
                    if n == 0 {
                        continue;
                    }
                    let (frac, _) = metric(sys, instances, rate, &|st| Some(st.delivered_fraction));
                    let (p99, _) = metric(sys, instances, rate, &|st| Some(st.latency.p99_ms));
                    let (first, _) =
                        metric(sys, instances, rate, &|st| st.server_cpu_us_per_delivery);
                    let (second, _) =
                        metric(sys, instances, rate, &|st| st.mirror_cpu_us_per_delivery);
                    let (mean, _) = metric(sys, instances, rate, &cpu_mean);
                    let (redis, _) =
                        metric(sys, instances, rate, &|st| st.redis_cpu_us_per_publish);
                    let _ = writeln!(
                        s,
                        "| {rate} | {:.1} | {} | {instances} | {} | {} | {} | {} | {} | {} | {} | {} | {n} |",
                        rate / f.topics.max(1) as f64,
                        sys.name(),
                        opt(got.map(|g| g / instances as f64), 0),
                        opt(frac, 4),
                        opt(p99, 2),
                        opt(first, 2),
                        opt(second, 2),
                        ratio(mean, one_cpu),
                        opt(redis, 2),
                        ratio(redis, one_redis),
                    );
                }
            }
        }
        s.push_str(
            "\n× one instance: the instances' mean CPU per delivery, and Redis's CPU per publish, \
             over the same with one instance. Redis's CPU includes its idle work.\n",
        );
        s
    }

    /// Per offered rate, per system: medians over reps of handled/s, delivered fraction, p99
    /// and server CPU per handled message (× ours).
    fn chat_steps_by_rate(
        c: &crate::scenario::ChatArgs,
        systems: &[System],
        runs: &[CompareRun],
    ) -> String {
        let mut s = String::from(
            "\nEach step, medians over reps (steps a run did not reach are left out):\n\n\
             | msg/s per client | system | handled/s | delivered | p99 ms | server CPU µs/handled | CPU × ours | reps |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut systems = systems.to_vec();
        systems.dedup();
        let step_metric =
            |sys: System, i: usize, g: &dyn Fn(&crate::scenario::ChatStep) -> Option<f64>| {
                let v: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.system == sys)
                    .filter_map(|r| match r.result.as_ref().ok()? {
                        RunResult::Chat(cr) => cr.steps.get(i),
                        _ => None,
                    })
                    .filter_map(g)
                    .collect();
                let n = v.len();
                (median(v), n)
            };
        for (i, &rate) in c.rates.iter().enumerate() {
            let cpu_of = |st: &crate::scenario::ChatStep| st.cpu_us_per_handled(c.step_secs);
            let (ours_cpu, _) = step_metric(System::Ours, i, &cpu_of);
            for &sys in &systems {
                let (handled, n) = step_metric(sys, i, &|st| Some(st.handled_per_s));
                if n == 0 {
                    continue;
                }
                let (frac, _) = step_metric(sys, i, &|st| Some(st.delivered_fraction));
                let (p99, _) = step_metric(sys, i, &|st| Some(st.latency.p99_ms));
                let (cpu, _) = step_metric(sys, i, &cpu_of);
                let _ = writeln!(
                    s,
                    "| {rate} | {} | {} | {} | {} | {} | {} | {n} |",
                    sys.name(),
                    opt(handled, 0),
                    opt(frac, 4),
                    opt(p99, 1),
                    opt(cpu, 1),
                    ratio(cpu, ours_cpu),
                );
            }
        }
        s
    }

    /// The paragraph that opens the report of a fan-out sweep: the scenario, its subscribers
    /// (`subscribers` names them: "subscribers", "subscribers per instance"), the sweep, and
    /// `note` after it.
    fn sweep_header(
        s: &mut String,
        args: &CompareArgs,
        f: &crate::scenario::FanoutArgs,
        subscribers: &str,
        note: &str,
    ) {
        let _ = writeln!(
            s,
            "{}: {} {subscribers}, {} topic(s), {} B payloads via {:?}, steps of {} s at {:?} pub/s; median of {} rep(s).{note}\n",
            args.scenario.title(),
            f.subscribers,
            f.topics,
            f.payload,
            f.via,
            f.step_secs,
            f.rates,
            args.reps
        );
    }

    /// Side-by-side medians per system, with ratios to ours.
    pub(super) fn compare(args: &CompareArgs, runs: &[CompareRun]) -> String {
        let mut s = String::new();
        let cmdline: Vec<String> = std::env::args().skip(1).collect();
        let _ = writeln!(
            s,
            "Command: `cargo run --release -p loadtest -- {}`\n",
            cmdline.join(" ")
        );
        let metric = |sys: System, f: &dyn Fn(&RunResult) -> Option<f64>| -> Option<f64> {
            median(
                runs.iter()
                    .filter(|r| r.system == sys)
                    .filter_map(|r| r.result.as_ref().ok())
                    .filter_map(f)
                    .collect(),
            )
        };
        let mut systems = args.systems.clone();
        systems.dedup();
        match &args.scenario {
            CompareScenario::SharedRedis(f) => {
                sweep_header(&mut s, args, f, "subscribers per instance", "");
                s.push_str(&shared_redis(f, &systems, runs));
            }
            CompareScenario::Fanout(_)
            | CompareScenario::Notifications(_)
            | CompareScenario::MultiInstance(_) => {
                let f = &args.scenario.fanout().unwrap_or_else(|| unreachable!());
                sweep_header(
                    &mut s,
                    args,
                    f,
                    "subscribers",
                    " Socket.IO systems always publish through the server (a `send` event): \
                     their adapters' Redis channels carry their own encoding.",
                );
                // A rep that passed no step sustained nothing: it counts as 0, so a system
                // that passes in a minority of reps has a median of 0, shown as "–".
                let max = |r: &RunResult| match r {
                    RunResult::Fanout(f) => Some(f.max_sustainable_per_s.unwrap_or(0.0)),
                    _ => None,
                };
                let best_step = |r: &RunResult| -> Option<crate::scenario::FanoutStep> {
                    match r {
                        RunResult::Fanout(f) => f
                            .steps
                            .iter()
                            .filter(|s| s.pass)
                            .max_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s))
                            .cloned(),
                        _ => None,
                    }
                };
                let ours = metric(System::Ours, &max);
                // The client's ceiling is what it received from the batching limit server, the
                // fastest thing it can be pointed at.
                let ceiling = systems
                    .iter()
                    .filter(|s| **s == System::LimitBatch)
                    .filter_map(|s| metric(*s, &max))
                    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
                let _ = writeln!(
                    s,
                    "| system | max sustainable deliveries/s | × ours | p50 ms | p99 ms | server CPU µs/delivery | peak RSS MiB | reorders | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---|"
                );
                // Deliveries/s of the highest step offered: a maximum there passed every step.
                let highest =
                    f.offered_deliveries_per_s(f.rates.iter().cloned().fold(0.0, f64::max));
                for sys in systems {
                    let m = metric(sys, &max).filter(|&m| m > 0.0);
                    // Latency, CPU and memory at each passing rep's best step; none when the
                    // median rep passed nothing.
                    let at_best = |g: &dyn Fn(&crate::scenario::FanoutStep) -> Option<f64>| {
                        m.and_then(|_| metric(sys, &|r| best_step(r).and_then(|s| g(&s))))
                    };
                    let p50 = at_best(&|s| Some(s.latency.p50_ms));
                    let p99 = at_best(&|s| Some(s.latency.p99_ms));
                    let cpu = at_best(&|s| s.server_cpu_us_per_delivery);
                    let rss = at_best(&|s| s.server_peak_rss_mib);
                    let (none_passed, reps) = runs
                        .iter()
                        .filter(|r| r.system == sys)
                        .filter_map(|r| match r.result.as_ref().ok()? {
                            RunResult::Fanout(f) => Some(f.max_sustainable_per_s.is_none()),
                            _ => None,
                        })
                        .fold((0, 0), |(n, all), none| (n + usize::from(none), all + 1));
                    let reorders = metric(sys, &|r| match r {
                        RunResult::Fanout(f) => {
                            Some(f.steps.iter().map(|s| s.reorders).sum::<u64>() as f64)
                        }
                        _ => None,
                    });
                    let mut notes = Vec::new();
                    if m.is_some_and(|m| m >= 0.999 * highest) {
                        notes.push("passed every step: the true maximum is higher".to_owned());
                    }
                    if let (Some(m), Some(c)) = (m, ceiling) {
                        if !sys.is_limit() && m >= 0.8 * c {
                            notes.push(
                                "client-bound: ≥ 80% of the limit server (the client's ceiling)"
                                    .to_owned(),
                            );
                        }
                    }
                    if none_passed == reps {
                        notes.push("no step passed".to_owned());
                    } else if none_passed > 0 {
                        notes.push(format!(
                            "no step passed in {none_passed} of {reps} reps, each counted as 0"
                        ));
                    }
                    let note = notes.join("; ");
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        sys.name(),
                        opt(m, 0),
                        ratio(m, ours),
                        opt(p50, 2),
                        opt(p99, 2),
                        opt(cpu, 2),
                        opt(rss, 1),
                        opt(reorders, 0),
                        note
                    );
                }
                s.push_str(&fanout_steps_by_rate(f, &args.systems, runs));
            }
            CompareScenario::Chat(c) => {
                let _ = writeln!(
                    s,
                    "Chat: {} clients in {} rooms, {:?} messages/s per client, steps of {} s; median of {} rep(s).\n",
                    c.clients, c.topics, c.rates, c.step_secs, args.reps
                );
                let max = |r: &RunResult| match r {
                    RunResult::Chat(c) => Some(c.max_handled_per_s),
                    _ => None,
                };
                let p99 = |r: &RunResult| match r {
                    RunResult::Chat(c) => c.p99_ms_at_max,
                    _ => None,
                };
                let any_latency = |r: &RunResult| match r {
                    RunResult::Chat(c) => Some(c.max_delivered_per_s),
                    _ => None,
                };
                let cpu = |r: &RunResult| match r {
                    RunResult::Chat(c) => c.cpu_us_per_handled_at_max,
                    _ => None,
                };
                let ours = metric(System::Ours, &max);
                let ours_any = metric(System::Ours, &any_latency);
                let _ = writeln!(
                    s,
                    "| system | handled SendMessage/s (≥ 99.9% delivered, p99 ≤ {} ms) | × ours | p99 ms there | server CPU µs/handled there | handled/s, ≥ 99.9% delivered at any latency | × ours |\n|---|---:|---:|---:|---:|---:|---:|",
                    c.p99_bound_ms
                );
                for sys in systems {
                    let m = metric(sys, &max);
                    let a = metric(sys, &any_latency);
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} | {} | {} |",
                        sys.name(),
                        opt(m, 0),
                        ratio(m, ours),
                        opt(metric(sys, &p99), 1),
                        opt(metric(sys, &cpu), 1),
                        opt(a, 0),
                        ratio(a, ours_any)
                    );
                }
                s.push_str(&chat_steps_by_rate(c, &args.systems, runs));
            }
            CompareScenario::Connect(c) => {
                let _ = writeln!(
                    s,
                    "Connect: {} connections, {} handshakes in flight, held {} s; median of {} rep(s).\n",
                    c.connections, c.parallel, c.hold_secs, args.reps
                );
                let _ = writeln!(
                    s,
                    "| system | seconds to open all | handshakes/s | failures | server KiB/connection |\n|---|---:|---:|---:|---:|"
                );
                for sys in systems {
                    let secs = metric(sys, &|r| match r {
                        RunResult::Connect(c) => Some(c.seconds),
                        _ => None,
                    });
                    let rate = metric(sys, &|r| match r {
                        RunResult::Connect(c) => Some(c.handshakes_per_s),
                        _ => None,
                    });
                    let fails = metric(sys, &|r| match r {
                        RunResult::Connect(c) => Some(c.failures as f64),
                        _ => None,
                    });
                    let kib = metric(sys, &|r| match r {
                        RunResult::Connect(c) => c.server_kib_per_connection,
                        _ => None,
                    });
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} |",
                        sys.name(),
                        opt(secs, 3),
                        opt(rate, 0),
                        opt(fails, 0),
                        opt(kib, 2)
                    );
                }
            }
        }
        let failed: Vec<String> = runs
            .iter()
            .filter_map(|r| {
                r.result
                    .as_ref()
                    .err()
                    .map(|e| format!("{} rep {}: {e}", r.system.name(), r.rep + 1))
            })
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(s, "\nFailed runs: {}", failed.join("; "));
        }
        s
    }

    #[cfg(test)]
    mod tests {
        use clap::Parser;

        use super::compare;
        use crate::scenario::{FanoutResult, FanoutStep, Latency};
        use crate::system::System;
        use crate::{Cli, Command, CompareArgs, CompareRun, RunResult};

        /// `compare --systems ours <words>…` as the command line gives it.
        fn compare_args(words: &[&str]) -> CompareArgs {
            let line = ["loadtest", "compare", "--systems", "ours"];
            let cli = Cli::try_parse_from(line.iter().chain(words)).expect("a valid command line");
            match cli.command {
                Command::Compare(args) => args,
                _ => unreachable!(),
            }
        }

        /// A run of ours that delivered every publication of each step in `args`' sweep at
        /// once; the steps from `fail_from` on missed the latency bound.
        fn run(args: &CompareArgs, fail_from: usize) -> CompareRun {
            let f = args.scenario.fanout().expect("a fan-out sweep");
            let steps: Vec<FanoutStep> = f
                .rates
                .iter()
                .enumerate()
                .map(|(i, &rate)| {
                    let per_s = f.offered_deliveries_per_s(rate);
                    let delivered = (per_s * f.step_secs) as u64;
                    FanoutStep {
                        publishes_per_s: rate,
                        expected: delivered,
                        delivered,
                        delivered_fraction: 1.0,
                        deliveries_per_s: per_s,
                        subscribers_with_loss: 0,
                        worst_subscriber_fraction: 1.0,
                        reorders: 0,
                        latency: Latency::default(),
                        server_cpu_s: None,
                        server_cpu_us_per_delivery: None,
                        server_peak_rss_mib: None,
                        wire_bytes_per_delivery: None,
                        redis_cores: None,
                        redis_cpu_us_per_publish: None,
                        mirror_cpu_us_per_delivery: None,
                        pass: i < fail_from,
                    }
                })
                .collect();
            let max_sustainable_per_s = steps
                .iter()
                .filter(|s| s.pass)
                .map(|s| s.deliveries_per_s)
                .reduce(f64::max);
            CompareRun {
                system: System::Ours,
                rep: 0,
                instances: 1,
                result: Ok(RunResult::Fanout(FanoutResult {
                    args: f,
                    connect_failures: 0,
                    steps,
                    max_sustainable_per_s,
                })),
            }
        }

        /// The row of `system` in the summary table.
        fn row<'a>(report: &'a str, system: &str) -> &'a str {
            let start = format!("| {system} |");
            report
                .lines()
                .find(|l| l.starts_with(&start))
                .unwrap_or_else(|| panic!("no row of {system} in {report}"))
        }

        #[test]
        fn a_notifications_step_delivers_each_publish_once() {
            let args =
                compare_args(&["notifications", "--topics", "10000", "--rates", "1000,2000"]);
            let f = args.scenario.fanout().unwrap();
            for rate in [1000.0, 2000.0] {
                assert_eq!(f.offered_deliveries_per_s(rate), rate);
            }
            let report = compare(&args, &[run(&args, 2)]);
            assert!(
                report.contains(
                    "Notifications (one subscriber per topic, via Redis): 10000 subscribers, 10000 \
                     topic(s), 128 B payloads via Redis, steps of 3 s at [1000.0, 2000.0] pub/s; \
                     median of 1 rep(s). Socket.IO systems always publish through the server (a \
                     `send` event): their adapters' Redis channels carry their own encoding.\n\n"
                ),
                "{report}"
            );
            let ours = row(&report, "ours");
            assert!(ours.starts_with("| ours | 2000 | 1.00 |"), "{ours}");
            assert!(ours.contains("passed every step"), "{ours}");
            assert!(report.contains("| 2000 | 2000 | ours | 2000 |"), "{report}");
        }

        #[test]
        fn a_run_counts_the_publishing_connections_a_socketio_server_needs() {
            let args = compare_args(&["notifications", "--topics", "10000"]);
            let f = args.scenario.fanout().unwrap();
            // Ours is published to through Redis; Socket.IO through one connection per topic.
            assert_eq!(crate::open_files_needed(&f, System::Ours, 1), 10_065);
            assert_eq!(crate::open_files_needed(&f, System::SocketIo, 1), 20_064);
            let args = compare_args(&["shared-redis", "--subscribers", "1000"]);
            let f = args.scenario.fanout().unwrap();
            assert_eq!(crate::open_files_needed(&f, System::Ours, 2), 2_065);
        }

        #[test]
        fn a_fanout_step_delivers_each_publish_to_its_topics_subscribers() {
            let args = compare_args(&["fanout", "--subscribers", "100", "--rates", "10,20"]);
            let f = args.scenario.fanout().unwrap();
            assert_eq!(f.offered_deliveries_per_s(20.0), 2000.0);
            let report = compare(&args, &[run(&args, 2)]);
            let ours = row(&report, "ours");
            assert!(ours.starts_with("| ours | 2000 | 1.00 |"), "{ours}");
            assert!(ours.contains("passed every step"), "{ours}");

            let args = compare_args(&["fanout", "--subscribers", "100", "--topics", "4"]);
            let f = args.scenario.fanout().unwrap();
            assert_eq!(f.offered_deliveries_per_s(20.0), 500.0);
        }

        #[test]
        fn a_maximum_below_the_highest_step_is_not_said_to_pass_every_step() {
            let args =
                compare_args(&["notifications", "--topics", "10000", "--rates", "1000,2000"]);
            let ours = row(&compare(&args, &[run(&args, 1)]), "ours").to_owned();
            assert!(ours.starts_with("| ours | 1000 | 1.00 |"), "{ours}");
            assert!(!ours.contains("passed every step"), "{ours}");
        }

        #[test]
        fn a_rep_that_passed_no_step_counts_as_zero() {
            let args = compare_args(&["fanout", "--subscribers", "100", "--rates", "10,20"]);
            let report = compare(&args, &[run(&args, 2), run(&args, 0), run(&args, 2)]);
            let ours = row(&report, "ours");
            assert!(ours.starts_with("| ours | 2000 | 1.00 |"), "{ours}");
            assert!(
                ours.contains("no step passed in 1 of 3 reps, each counted as 0"),
                "{ours}"
            );

            let report = compare(&args, &[run(&args, 2), run(&args, 0), run(&args, 0)]);
            let ours = row(&report, "ours");
            assert!(ours.starts_with("| ours | – | – | – | – |"), "{ours}");
            assert!(
                ours.contains("no step passed in 2 of 3 reps, each counted as 0"),
                "{ours}"
            );

            let report = compare(&args, &[run(&args, 0)]);
            assert!(
                row(&report, "ours").ends_with("| no step passed |"),
                "{report}"
            );
        }

        #[test]
        fn shared_redis_names_the_subscribers_per_instance() {
            let args = compare_args(&["shared-redis", "--subscribers", "100", "--rates", "10"]);
            let report = compare(&args, &[]);
            assert!(
                report.contains(
                    "Shared Redis (one instance, then two with the same subscribers each, one \
                     Redis): 100 subscribers per instance, 1 topic(s), 128 B payloads via Redis, \
                     steps of 3 s at [10.0] pub/s; median of 1 rep(s).\n\n"
                ),
                "{report}"
            );
        }
    }
}
