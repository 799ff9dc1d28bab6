//! Headless Chromium for end-to-end tests, driven through chromedriver's W3C WebDriver HTTP API
//! with a tiny blocking HTTP/1.1 client; and the examples run as processes.
//!
//! Everything started here is stopped by PID when its guard is dropped: example processes,
//! chromedriver, and the Chromium processes of each session (found by their private profile
//! directory, in case chromedriver could not close them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub use super::Process;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Upper bound on one wait for the browser (pages, scripts, sessions), which is slower to start
/// than the servers. Never used to assert speed.
pub const BROWSER_WAIT: Duration = Duration::from_secs(30);

/// The WebDriver key code of Enter.
pub const ENTER: &str = "\u{E007}";

/// Whether Chromium and chromedriver are installed. When they are not, says so loudly and
/// returns `false` — or fails the test when `RTK_REQUIRE_BROWSER=1` (set by `.ci/run`).
pub fn browser_available(test: &str) -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("RTK_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!("{test}: {missing:?} not found and RTK_REQUIRE_BROWSER=1");
    }
    // Straight to the stderr handle: the harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: {} not installed. Install them (Debian: apt-get install \
         chromium chromium-driver) to run the browser tests. ***\n",
        missing.join(" and ")
    );
    false
}

/// Starts example `name` on `127.0.0.1:<port>` with `env` (see
/// [`spawn_example`](super::spawn_example)), and waits until `GET /ready` answers 200.
pub fn start_example(name: &str, port: u16, env: &[(&str, &str)]) -> Process {
    let process = super::spawn_example(name, port, env);
    poll(
        &format!("example {name} ready on {port}"),
        super::WAIT,
        || {
            http(port, "GET", "/ready", &[], None)
                .ok()
                .filter(|(status, _)| *status == 200)
        },
    );
    process
}

/// Polls `f` every 50 ms until it returns `Some`; fails the test after `limit`.
pub fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request to `127.0.0.1:<port>` (`Connection: close`); the status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(BROWSER_WAIT * 2))?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    // Read until the response is complete (by Content-Length or the last chunk), or EOF: the
    // server need not close the connection first.
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk)?;
        out.extend_from_slice(&chunk[..n]);
        let Some(head_end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
            if n == 0 {
                return Err(bad("connection closed before the end of the head"));
            }
            continue;
        };
        let head = String::from_utf8_lossy(&out[..head_end]).to_ascii_lowercase();
        let body = &out[head_end + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let chunked = head.contains("transfer-encoding: chunked");
        let body = match (length, chunked) {
            (_, true) => dechunk(body),
            (Some(len), false) => body.get(..len).map(<[u8]>::to_vec),
            (None, false) => (n == 0).then(|| body.to_vec()),
        };
        if let Some(body) = body {
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("no status"))?;
            return Ok((status, body));
        }
        if n == 0 {
            return Err(bad("connection closed before the end of the body"));
        }
    }
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// A chromedriver process on a free loopback port.
pub struct ChromeDriver {
    pub port: u16,
    _process: Process,
}

impl ChromeDriver {
    pub fn start() -> Self {
        let port = super::free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let driver = Self {
            port,
            _process: Process { child },
        };
        poll("chromedriver ready", BROWSER_WAIT, || {
            let (_, body) = http(port, "GET", "/status", &[], None).ok()?;
            let v: Value = serde_json::from_slice(&body).ok()?;
            (v["value"]["ready"] == true).then_some(())
        });
        driver
    }

    /// A new browser: a Chromium process of its own, with a fresh profile directory.
    pub fn new_session(&self) -> Session {
        let profile = ProfileDir::new();
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-quic",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--window-size=1100,900",
                            format!("--user-data-dir={}", profile.path.display()),
                        ]
                    }
                }
            }
        });
        let value = command(self.port, "POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("could not start a browser session: {e}"));
        let id = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Session {
            port: self.port,
            id,
            _profile: profile,
        }
    }
}

/// Sends one WebDriver command and returns its `value`, or the WebDriver error as text.
fn command(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let body = body.map(|b| b.to_string());
    let headers = [("Content-Type", "application/json; charset=utf-8")];
    let (status, bytes) = http(
        port,
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
    )
    .map_err(|e| format!("{method} {path}: {e}"))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{method} {path}: {status}, not JSON ({e})"))?;
    if status != 200 {
        return Err(format!(
            "{method} {path}: {status} {}: {}",
            v["value"]["error"], v["value"]["message"]
        ));
    }
    Ok(v["value"].clone())
}

/// A Chromium profile directory under the temp dir, removed on drop — after killing, by PID,
/// any process still running with it (the browser chromedriver started for a session).
struct ProfileDir {
    path: PathBuf,
}

impl ProfileDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "rtk-e2e-chromium-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }

    /// PIDs of the processes whose command line names this profile.
    fn users(&self) -> Vec<u32> {
        let needle = format!("--user-data-dir={}", self.path.display());
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
            })
            .collect()
    }
}

impl Drop for ProfileDir {
    fn drop(&mut self) {
        // chromedriver normally closes the browser when the session is deleted; give it a
        // moment, then kill what is left.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.users().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.users() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One browser session (one Chromium), deleted on drop.
pub struct Session {
    port: u16,
    id: String,
    _profile: ProfileDir,
}

/// A WebDriver element reference.
#[derive(Debug, Clone)]
pub struct Element(String);

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        command(self.port, method, &path, body.as_ref()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// The element matching a CSS selector.
    pub fn find(&self, css: &str) -> Element {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        Element(
            v[ELEMENT_KEY]
                .as_str()
                .unwrap_or_else(|| panic!("no element reference for {css}: {v}"))
                .to_owned(),
        )
    }

    /// Types `text` into the element (WebDriver key codes such as [`ENTER`] included).
    pub fn type_into(&self, el: &Element, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(json!({ "text": text })),
        );
    }

    pub fn clear(&self, el: &Element) {
        self.cmd("POST", &format!("/element/{}/clear", el.0), Some(json!({})));
    }

    pub fn click(&self, el: &Element) {
        self.cmd("POST", &format!("/element/{}/click", el.0), Some(json!({})));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` until it returns something other than `null`/`false`; returns that.
    pub fn wait_for(&self, what: &str, script: &str) -> Value {
        poll(what, BROWSER_WAIT, || {
            let v = self.execute(script, json!([]));
            (!v.is_null() && v != false).then_some(v)
        })
    }

    /// Saves a PNG screenshot of the viewport.
    pub fn screenshot(&self, path: &Path) {
        let v = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().expect("base64 PNG")).expect("valid base64");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = command(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// Standard base64 (with padding), as WebDriver sends screenshots.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\r' | b'\n' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Where to save screenshots: `RTK_E2E_SCREENSHOTS=<dir>`; none by default.
pub fn screenshot_dir() -> Option<PathBuf> {
    std::env::var_os("RTK_E2E_SCREENSHOTS").map(PathBuf::from)
}

/// Serializes browser tests within one test binary: two Chromiums at once on a small machine
/// only make each slower.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
