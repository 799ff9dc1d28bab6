//! What the `basic_chat` example tells clients and operators when something is wrong: errors
//! clients see carry no internal detail. The example runs as a process.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_does_not_tell_clients_the_brokers_address() {
    // Nothing listens on this port: every publish fails.
    let port = free_port();
    let dead = format!("redis://127.0.0.1:{port}/");
    let server = basic_chat(1, Some(&dead));
    let leaks = |text: &str| text.contains("127.0.0.1") || text.contains(&port.to_string());

    let mut alice = connect(server.addr, "general", ALICE).await;
    alice.send_text(&send_message("general", "hello")).await;
    let error = alice.recv_json().await;
    assert_eq!(error["type"], "error", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with("Failed to broadcast event"),
        "{message}"
    );
    assert!(!leaks(message), "the client was told: {message}");

    let (status, text) = post(
        server.addr,
        &format!("/broadcast/general?token={ALICE}"),
        &[],
        b"{}",
    )
    .await;
    assert_eq!(status, 503);
    assert!(text.contains("could not publish"), "{text}");
    assert!(!leaks(&text), "the client was told: {text}");
    alice.assert_nothing_pending().await;
}

/// Runs `basic_chat` with `REDIS_URL=url` and waits (bounded) for it to exit; returns its exit
/// code and stderr.
fn run_with_redis_url(url: &str) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(example_binary("basic_chat"))
        .env("BIND_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("REDIS_URL", url)
        .env_remove("RUST_BACKTRACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("basic_chat with REDIS_URL={url} did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn an_unsupported_redis_url_is_one_line_on_stderr_and_a_non_zero_exit() {
    for url in [
        "not a url",
        "redis://localhost/not-a-db",
        "rediss://localhost#insecure",
        "redis+sentinel://localhost:26380/",
    ] {
        let (code, stderr) = run_with_redis_url(url);
        assert!(
            code.is_some_and(|c| c != 0 && c != 101),
            "REDIS_URL={url}: exit code {code:?}, stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "REDIS_URL={url}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "REDIS_URL={url}: {stderr}"
        );
        assert!(stderr.contains("REDIS_URL"), "REDIS_URL={url}: {stderr}");
        assert!(
            stderr.to_lowercase().contains("redis url"),
            "REDIS_URL={url}: {stderr}"
        );
    }
}
