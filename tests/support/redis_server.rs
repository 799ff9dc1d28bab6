//! A private `redis-server` per test, on a free port, stopped by PID when dropped. Never 6379.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Listener and other settings beyond the defaults (TLS, a Unix socket, ACL users).
    extra: Vec<String>,
    /// Set for a server that listens only on this Unix socket.
    unix: Option<std::path::PathBuf>,
}

/// How a [`RedisServer`] listens, beyond a plain TCP port.
pub enum Listen {
    /// TLS only, on its port, with these PEM files; `verify_clients` asks clients for a
    /// certificate signed by `ca` (mutual TLS).
    Tls {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        ca: std::path::PathBuf,
        verify_clients: bool,
    },
    /// A Unix socket only, at this path.
    Unix(std::path::PathBuf),
    /// Plain TCP with these extra arguments, one word each, e.g. an ACL user:
    /// `["--user", "app", "on", ">pw", "~*", "&*", "+@all"]`.
    Tcp(Vec<String>),
}

/// Starts a private Redis, or returns `None` (after saying so loudly) when `redis-server` is not
/// installed. With `RTK_REQUIRE_REDIS=1` (set by `.ci/run`) a missing server fails the test.
pub fn start_redis(test: &str) -> Option<RedisServer> {
    start_redis_with(test, Listen::Tcp(Vec::new()))
}

/// Whether `program` (`redis-server`, `redis-sentinel`: the Debian package has its name) can be
/// run; says so loudly when it cannot (see [`start_redis`]).
pub fn installed(test: &str, program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var("RTK_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
            panic!("{test}: {program} not found and RTK_REQUIRE_REDIS=1");
        }
        // Straight to the stderr handle: the test harness captures `eprintln!` of passing tests,
        // and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED {test}: {program} is not installed. \
             Install it (Debian: apt-get install {program}) to run the Redis tests. ***\n"
        );
    }
    found
}

/// [`start_redis`] with another listener.
pub fn start_redis_with(test: &str, listen: Listen) -> Option<RedisServer> {
    if !installed(test, "redis-server") {
        return None;
    }
    let mut server = RedisServer {
        port: super::free_port(),
        child: None,
        extra: Vec::new(),
        unix: None,
    };
    let port = server.port.to_string();
    let path = |p: &std::path::Path| p.to_str().expect("UTF-8 path").to_owned();
    server.extra = match listen {
        Listen::Tls {
            cert,
            key,
            ca,
            verify_clients,
        } => vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port,
            "--tls-cert-file".into(),
            path(&cert),
            "--tls-key-file".into(),
            path(&key),
            "--tls-ca-cert-file".into(),
            path(&ca),
            "--tls-auth-clients".into(),
            if verify_clients { "yes" } else { "no" }.into(),
        ],
        Listen::Unix(socket) => {
            server.unix = Some(socket.clone());
            vec![
                "--port".into(),
                "0".into(),
                "--unixsocket".into(),
                path(&socket),
                "--unixsocketperm".into(),
                "700".into(),
            ]
        }
        Listen::Tcp(extra) => extra,
    };
    server.spawn(true);
    Some(server)
}

impl RedisServer {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server and waits until it listens. A first start that loses its port to
    /// another process (the server exits, or another process answers there) tries fresh ports;
    /// a restart keeps its port, which its clients reconnect to.
    fn spawn(&mut self, may_move: bool) {
        for _ in 0..5 {
            if self.try_spawn() {
                return;
            }
            if may_move && self.unix.is_none() {
                self.port = super::free_port();
                // A TLS server's port is its `--tls-port`.
                if let Some(i) = self.extra.iter().position(|a| a == "--tls-port") {
                    self.extra[i + 1] = self.port.to_string();
                }
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// One start: `true` once this process listens; `false` (and the process gone) when it
    /// exited, or when another process answered on its port.
    fn try_spawn(&mut self) -> bool {
        assert_ne!(self.port, 6379);
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let pid = child.id();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + super::WAIT;
        loop {
            let exited = self.child.as_mut().map(Child::try_wait);
            if !matches!(exited, Some(Ok(None))) {
                // It could not bind its port.
                self.child = None;
                return false;
            }
            let listening = match &self.unix {
                Some(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
                None => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if listening {
                // On a plain port, whoever answers must be this process.
                match self.answering_pid() {
                    Some(p) if p != pid => {
                        self.kill();
                        return false;
                    }
                    _ => return true,
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `process_id` of the server answering on the plain TCP port; `None` for other
    /// listeners, or when it does not answer `INFO` without credentials.
    fn answering_pid(&self) -> Option<u32> {
        if self.unix.is_some() || !self.extra.is_empty() {
            return None;
        }
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "INFO",
                "server",
            ])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
    }

    /// The server's process id, to pause it (`kill -STOP`) and resume it (`kill -CONT`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`) to this server's process, by PID.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{signal} {} failed", self.pid());
    }

    /// Kills the server (SIGKILL, by PID) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(false);
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private `redis-sentinel` watching one primary as service `service`, with a quorum of one
/// and a short down-after, so that killing the primary fails over within seconds. Its
/// configuration file (Sentinel rewrites it) lives in a directory removed on drop.
pub struct SentinelServer {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

pub fn start_sentinel(test: &str, primary_port: u16, service: &str) -> Option<SentinelServer> {
    if !installed(test, "redis-sentinel") {
        return None;
    }
    let port = super::free_port();
    assert_ne!(port, 26379);
    let dir = std::env::temp_dir().join(format!("rtk-sentinel-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {service} 127.0.0.1 {primary_port} 1\n\
             sentinel down-after-milliseconds {service} 1000\n\
             sentinel failover-timeout {service} 5000\n\
             sentinel parallel-syncs {service} 1\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-sentinel");
    let deadline = std::time::Instant::now() + super::WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-sentinel did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(SentinelServer { port, child, dir })
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
