//! The `basic_chat` example as a process: it serves, and SIGTERM closes every client with 1001 and
//! exits 0.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use support::*;

/// The example binary `cargo test` built next to this test (built on demand otherwise).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("examples").join("basic_chat");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", "basic_chat"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_example(port: u16) -> Running {
    let child = Command::new(example_binary())
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("SHARDS", "2")
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("example did not start listening");
    running
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let port = free_port();
    let mut server = start_example(port).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut alice = connect(addr, "general", ALICE).await;
    let mut bob = connect(addr, "random", BOB).await;
    alice.send_text(&send_message("general", "hi")).await;
    assert_eq!(alice.recv_json().await["NewMessage"]["username"], "alice");
    bob.assert_nothing_pending().await;

    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.expect_close().await, 1001);
        c.finish_close().await;
    }
    let status = tokio::task::spawn_blocking(move || server.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
