//! The systems under test, a private Redis, and what /proc says about a server process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;

/// A server the harness can start. All speak the `basic_chat` example's protocol (its module docs;
/// summarized in docs/architecture.md, "The example's contract").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum System {
    /// This crate's `examples/basic_chat`.
    Ours,
    /// `examples/basic_chat` talking to Redis over TLS (`rediss://`, the Redis the harness
    /// starts listening on a TLS port too, with a CA made for the run).
    OursTls,
    /// Another build of `examples/basic_chat` (`compare --baseline PATH`), run exactly like
    /// `ours`: a before/after comparison of two builds in one interleaved run.
    Baseline,
    /// axum-realtime-kit 0.1.0 from crates.io (`loadtest/peers`, `peer_reference`).
    Reference,
    /// axum's built-in WebSocket + a tokio broadcast channel per topic + redis-rs.
    Axum,
    /// socketioxide (Socket.IO in Rust) with its Redis adapter (`loadtest/peers`,
    /// `peer_socketioxide`).
    Socketioxide,
    /// Socket.IO 4.8 on Node with `@socket.io/redis-adapter` (`loadtest/peers/socketio`).
    SocketIo,
    /// The limit server writing each frame at once (one write per delivery).
    LimitSingle,
    /// The limit server flushing each connection every 2 ms (many frames per write).
    LimitBatch,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::OursTls => "ours, Redis over TLS",
            Self::Baseline => "ours (baseline)",
            Self::Reference => "reference 0.1.0",
            Self::Axum => "axum + broadcast",
            Self::Socketioxide => "socketioxide + Redis adapter",
            Self::SocketIo => "Socket.IO (Node) + Redis adapter",
            Self::LimitSingle => "limit (single)",
            Self::LimitBatch => "limit (batch)",
        }
    }

    fn binary(self, target: &Path) -> PathBuf {
        match self {
            Self::Ours | Self::OursTls | Self::Baseline => target.join("examples/basic_chat"),
            Self::Reference => target.join("peer_reference"),
            Self::Axum => target.join("peer_axum"),
            Self::Socketioxide => target.join("peer_socketioxide"),
            // Started as `node <this>`.
            Self::SocketIo => socketio_dir().join("server.js"),
            Self::LimitSingle | Self::LimitBatch => target.join("peer_limit"),
        }
    }

    /// What the system speaks to clients.
    pub(crate) fn proto(self) -> crate::client::Proto {
        match self {
            Self::Socketioxide | Self::SocketIo => crate::client::Proto::SocketIo,
            _ => crate::client::Proto::Rtk,
        }
    }

    pub(crate) fn is_limit(self) -> bool {
        matches!(self, Self::LimitSingle | Self::LimitBatch)
    }
}

/// The Node peer's directory (`loadtest/peers/socketio`).
fn socketio_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/socketio")
}

/// Builds every system in release mode (prints cargo's output); installs the Node peer's
/// packages from its lockfile (`npm ci`) when `node_modules` is missing and it is among
/// `systems`.
pub(crate) fn build_all(workspace: &Path, systems: &[System]) -> std::io::Result<()> {
    build_ours(workspace)?;
    cargo_build(workspace, &["build", "--release", "-p", "rtk-peers"])?;
    if systems.contains(&System::SocketIo) {
        npm_ci()?;
    }
    Ok(())
}

/// `npm ci` in the Node peer's directory, unless its packages are installed.
pub(crate) fn npm_ci() -> std::io::Result<()> {
    let dir = socketio_dir();
    if dir.join("node_modules").is_dir() {
        return Ok(());
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .map_err(|e| std::io::Error::other(format!("npm: {e} (Node 20 and npm are needed)")))?;
    if !status.success() {
        return Err(std::io::Error::other("npm ci failed"));
    }
    Ok(())
}

/// Builds our server (`examples/basic_chat`) in release mode.
pub(crate) fn build_ours(workspace: &Path) -> std::io::Result<()> {
    // No `-p`: the root package is the only default member with that example.
    cargo_build(
        workspace,
        &["build", "--release", "--example", "basic_chat"],
    )
}

fn cargo_build(workspace: &Path, args: &[&str]) -> std::io::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace)
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("cargo {args:?} failed")));
    }
    Ok(())
}

/// Where the release binaries of `workspace` are (`CARGO_TARGET_DIR` respected).
pub(crate) fn release_dir(workspace: &Path) -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace.join("target"))
        .join("release")
}

/// `KEY=VALUE` arguments as environment pairs; an argument without `=` is ignored.
pub(crate) fn env_pairs(args: &[String]) -> Vec<(String, String)> {
    args.iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Starts a private `redis-server` on a free loopback port (never 6379).
pub(crate) fn start_redis() -> std::io::Result<Proc> {
    start_redis_with(&[])
}

/// A private `redis-server` that also listens with TLS, and the certificates it uses.
#[derive(Debug)]
pub(crate) struct TlsRedis {
    /// The plain TCP port stays open (the harness publishes there).
    pub(crate) redis: Proc,
    /// Where TLS clients connect (`rediss://`; the certificate names `127.0.0.1`).
    pub(crate) tls_addr: SocketAddr,
    /// The CA that signed the server's certificate (PEM).
    pub(crate) ca: PathBuf,
    dir: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.redis.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Like [`start_redis`], plus a TLS port whose certificate a CA made for this run signed.
pub(crate) fn start_redis_tls() -> std::io::Result<TlsRedis> {
    let dir = std::env::temp_dir().join(format!("loadtest-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pki = |e: rcgen::Error| std::io::Error::other(format!("certificates: {e}"));
    let ca_key = rcgen::KeyPair::generate().map_err(pki)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(pki)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "loadtest CA");
    std::fs::write(
        dir.join("ca.crt"),
        ca.self_signed(&ca_key).map_err(pki)?.pem(),
    )?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().map_err(pki)?;
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(pki)?;
    let cert = params.signed_by(&key, &issuer).map_err(pki)?;
    std::fs::write(dir.join("server.crt"), cert.pem())?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    let tls_port = free_port();
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let redis = start_redis_with(&[
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path("server.crt"),
        "--tls-key-file".into(),
        path("server.key"),
        "--tls-ca-cert-file".into(),
        path("ca.crt"),
        "--tls-auth-clients".into(),
        "no".into(),
    ])?;
    if !wait_port(tls_port, Duration::from_secs(10)) {
        return Err(std::io::Error::other(
            "redis-server's TLS port did not open",
        ));
    }
    Ok(TlsRedis {
        redis,
        tls_addr: SocketAddr::from(([127, 0, 0, 1], tls_port)),
        ca: dir.join("ca.crt"),
        dir,
    })
}

fn start_redis_with(extra: &[String]) -> std::io::Result<Proc> {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args([
            "--appendonly",
            "no",
            "--client-output-buffer-limit",
            "pubsub 256mb 128mb 60",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            std::io::Error::other(format!("redis-server: {e} (apt-get install redis-server)"))
        })?;
    let proc = Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    if !wait_port(port, Duration::from_secs(10)) {
        return Err(std::io::Error::other("redis-server did not start"));
    }
    Ok(proc)
}

/// Options for starting a system.
#[derive(Debug, Clone)]
pub(crate) struct StartOpts {
    pub(crate) redis_url: Option<String>,
    pub(crate) shards: Option<usize>,
    /// Run the server under `taskset -c <cpus>`.
    pub(crate) cpus: Option<String>,
    /// Extra environment, e.g. `WRITE_DELAY_MS`.
    pub(crate) env: Vec<(String, String)>,
    /// The server binary, instead of the system's own (`System::Baseline`).
    pub(crate) binary: Option<PathBuf>,
}

/// The server's standard error: discarded, unless `LOADTEST_SERVER_STDERR` names a file to
/// append it to (its warnings, or an allocator's statistics at exit).
fn server_stderr() -> Stdio {
    std::env::var_os("LOADTEST_SERVER_STDERR")
        .and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        })
        .map_or_else(Stdio::null, Stdio::from)
}

pub(crate) fn start_system(
    system: System,
    target: &Path,
    opts: &StartOpts,
) -> std::io::Result<Proc> {
    let port = free_port();
    let bin = opts.binary.clone().unwrap_or_else(|| system.binary(target));
    if !bin.exists() {
        return Err(std::io::Error::other(format!(
            "{} is not built (run without --no-build)",
            bin.display()
        )));
    }
    // The Node peer runs as `node server.js`.
    let (program, script) = if system == System::SocketIo {
        (PathBuf::from("node"), Some(bin))
    } else {
        (bin, None)
    };
    let mut cmd = match &opts.cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    cmd.args(script);
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .stderr(server_stderr());
    if let Some(url) = &opts.redis_url {
        cmd.env("REDIS_URL", url);
    }
    if let Some(n) = opts.shards {
        cmd.env("SHARDS", n.to_string());
    }
    match system {
        System::LimitSingle => {
            cmd.env("LIMIT_MODE", "single");
        }
        System::LimitBatch => {
            cmd.env("LIMIT_MODE", "batch");
        }
        _ => {}
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let child = cmd.spawn()?;
    let proc = Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    if !wait_port(port, Duration::from_secs(20)) {
        return Err(std::io::Error::other(format!(
            "{} did not start",
            system.name()
        )));
    }
    // Give a Redis-backed server a moment to connect its subscriber.
    std::thread::sleep(Duration::from_millis(300));
    Ok(proc)
}

/// Raises this process's soft limit of open files to its hard limit (servers started later
/// inherit it) and returns the limit in force.
pub(crate) fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the local `rlimit` given.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return u64::MAX;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// CPU seconds (user + system) a process has used, all its threads, those that ended included:
/// read from the process's CPU-time clock in nanoseconds, or (where the clock cannot be read) in
/// `/proc/<pid>/stat`'s 10 ms ticks, too coarse for a step of a few seconds at a few thousand
/// deliveries/s.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    process_clock_seconds(pid).or_else(|| cpu_ticks_seconds(pid))
}

/// The CPU-time clock of process `pid` (`clock_getcpuclockid`), in seconds.
fn process_clock_seconds(pid: u32) -> Option<f64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write through the pointers given, to locals that outlive them.
    #[allow(unsafe_code)]
    let ok = unsafe {
        libc::clock_getcpuclockid(pid, &mut clock) == 0 && libc::clock_gettime(clock, &mut now) == 0
    };
    ok.then(|| now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

/// `/proc/<pid>/stat`'s user + system time, in seconds.
fn cpu_ticks_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// (current RSS, peak RSS) in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let [rss, hwm] = status_kib(pid, ["VmRSS:", "VmHWM:"])?;
    Some((rss, hwm))
}

/// RSS and its two parts, from one read: (RSS, resident anonymous memory (heap, stacks),
/// resident file pages (mostly the binary's own code, paged in as code paths are first used)),
/// in KiB.
pub(crate) fn rss_parts_kib(pid: u32) -> Option<(u64, u64, u64)> {
    let [rss, anon, file] = status_kib(pid, ["VmRSS:", "RssAnon:", "RssFile:"])?;
    Some((rss, anon, file))
}

fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> Option<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = field(name)?;
    }
    Some(out)
}

/// Resident KiB of each mapping of `pid`, keyed by its start address, with a label (the file,
/// `[heap]`, `[stack]`, or `anon <size>` for an unnamed mapping).
pub(crate) fn mappings_rss_kib(pid: u32) -> std::collections::BTreeMap<u64, (String, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return out;
    };
    let mut current: Option<u64> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let path = words.nth(4).unwrap_or("");
            let label = if path.is_empty() {
                format!("anon {} KiB", (end - start) / 1024)
            } else {
                path.rsplit('/').next().unwrap_or(path).to_string()
            };
            out.insert(start, (label, 0));
            current = Some(start);
        } else if first == "Rss:"
            && let (Some(start), Some(kib)) = (current, words.next())
            && let Some(entry) = out.get_mut(&start)
        {
            entry.1 = kib.parse().unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nanosecond clock and the 10 ms ticks count the same time: after some work, the clock
    /// reads at least the ticks and less than a few ticks more.
    #[test]
    fn the_process_clock_counts_what_the_ticks_count_more_finely() {
        let pid = std::process::id();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let ticks = cpu_ticks_seconds(pid).expect("/proc/<pid>/stat readable");
        let clock = process_clock_seconds(pid).expect("the process clock readable");
        assert!(ticks > 0.0, "some CPU time counted");
        assert!(clock >= ticks - 0.001, "clock {clock} behind ticks {ticks}");
        assert!(
            clock - ticks < 0.05,
            "clock {clock} far ahead of ticks {ticks}"
        );
        assert_eq!(cpu_seconds(u32::MAX), None, "no such process");
    }
}
