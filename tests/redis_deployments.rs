//! The Redis deployments production uses, each against a real `redis-server` the test starts:
//! TLS with a private CA (and a CA or host name that does not match, refused), mutual TLS, a
//! Unix socket, an ACL user. Delivery is checked end to end: a publish goes out on the
//! instance's publisher connection and comes back through its subscriber connection to a
//! WebSocket client.

mod support;

use axum_realtime_kit::RedisTls;
use support::certs::TestPki;
use support::redis_server::{Listen, RedisServer, start_redis_with};
use support::*;

macro_rules! redis_or_skip {
    ($name:expr, $listen:expr) => {
        match start_redis_with($name, $listen) {
            Some(r) => r,
            None => return,
        }
    };
}

fn tls(pki: &TestPki, verify_clients: bool) -> Listen {
    Listen::Tls {
        cert: pki.path("server.crt"),
        key: pki.path("server.key"),
        ca: pki.path("ca.crt"),
        verify_clients,
    }
}

/// Serves the tests' chat through `url`, waits until it is ready, and checks that a publish
/// reaches a subscriber.
async fn delivers(url: String, tls: Option<RedisTls>) {
    let mut builder = chat::builder().redis_url(Some(url)).shards(1);
    if let Some(tls) = tls {
        builder = builder.redis_tls(tls);
    }
    let server = serve_chat(builder.build()).await;
    wait_ready(&server.service).await;
    let mut client = connect(server.addr, "general", ALICE).await;
    for n in 0..3 {
        server
            .service
            .publish_raw("general", format!("{{\"n\":{n}}}"))
            .await
            .unwrap();
    }
    for n in 0..3 {
        assert_eq!(client.recv_json().await["n"], n);
    }
    client.assert_nothing_pending().await;
}

/// Serves the tests' chat through `url` and checks that it never gets ready: it keeps failing
/// to connect (counted as reconnects) and publishes are refused.
async fn refused(url: String, tls: Option<RedisTls>) {
    let mut builder = chat::builder().redis_url(Some(url)).shards(1);
    if let Some(tls) = tls {
        builder = builder.redis_tls(tls);
    }
    let service = builder.build();
    assert_stays_unready(&service).await;
}

fn tls_url(redis: &RedisServer, host: &str) -> String {
    format!("rediss://{host}:{}/", redis.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_delivers() {
    let pki = TestPki::new("tls");
    let redis = redis_or_skip!("tls_with_a_private_ca_delivers", tls(&pki, false));
    let ca = RedisTls::new().ca_file(pki.path("ca.crt"));
    delivers(tls_url(&redis, "localhost"), Some(ca)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_certificate_of_another_ca_or_another_name() {
    let pki = TestPki::new("tls-refused");
    let redis = redis_or_skip!("tls_refuses_a_certificate", tls(&pki, false));
    // Signed by a CA the client was not given.
    let other = RedisTls::new().ca_file(pki.path("other-ca.crt"));
    refused(tls_url(&redis, "localhost"), Some(other)).await;
    // The right CA, but the certificate names `localhost`, not `127.0.0.1`.
    let ca = RedisTls::new().ca_file(pki.path("ca.crt"));
    refused(tls_url(&redis, "127.0.0.1"), Some(ca)).await;
    // No CA given: the platform's roots do not know the test CA.
    refused(tls_url(&redis, "localhost"), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = TestPki::new("mtls");
    let redis = redis_or_skip!("mutual_tls_needs_the_client_certificate", tls(&pki, true));
    let without = RedisTls::new().ca_file(pki.path("ca.crt"));
    refused(tls_url(&redis, "localhost"), Some(without.clone())).await;
    let with = without.client_cert(pki.path("client.crt"), pki.path("client.key"));
    delivers(tls_url(&redis, "localhost"), Some(with)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_url_delivers() {
    let dir = std::env::temp_dir().join(format!("rtk-unix-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("redis.sock");
    let redis = redis_or_skip!("a_unix_socket_url_delivers", Listen::Unix(socket.clone()));
    for scheme in ["redis+unix", "unix"] {
        delivers(format!("{scheme}://{}", socket.display()), None).await;
    }
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_with_its_password_delivers_and_a_wrong_one_is_refused() {
    let redis = redis_or_skip!(
        "an_acl_user_with_its_password_delivers",
        Listen::Tcp(
            ["--user", "app", "on", ">s3cret", "~*", "&*", "+@all"]
                .into_iter()
                .chain(["--user", "default", "off"])
                .map(String::from)
                .collect()
        )
    );
    let url = |auth: &str| format!("redis://{auth}@127.0.0.1:{}/2", redis.port);
    delivers(url("app:s3cret"), None).await;
    refused(url("app:wrong"), None).await;
}

#[tokio::test]
async fn a_tls_file_that_cannot_be_read_is_a_build_error() {
    let err = chat::builder()
        .redis_url(Some("rediss://localhost:6390/"))
        .redis_tls(RedisTls::new().ca_file("/nonexistent/ca.crt"))
        .try_build()
        .expect_err("a missing CA file fails the build");
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}
