//! Authentication and topic authorization happen before the upgrade, with plain HTTP statuses: the
//! `basic_chat` example's rules, checked on the example run as a process.

mod support;

use support::*;

#[tokio::test]
async fn token_in_query_or_bearer_header_is_accepted() {
    let server = basic_chat(2, None);
    let (status, _) = try_connect(server.addr, &format!("/ws/general?token={ALICE}"), &[]).await;
    assert_eq!(status, 101);
    let bearer = format!("Bearer {BOB}");
    let (status, _) = try_connect(
        server.addr,
        "/ws/general",
        &[("Authorization", bearer.as_str())],
    )
    .await;
    assert_eq!(status, 101);
}

#[tokio::test]
async fn missing_or_invalid_token_is_401() {
    let server = basic_chat(1, None);
    for path in [
        "/ws/general".to_string(),
        "/ws/general?token=".to_string(),
        "/ws/general?token=not-a-uuid:alice".to_string(),
        "/ws/general?token=a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8".to_string(),
    ] {
        let (status, _) = try_connect(server.addr, &path, &[]).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = try_connect(
        server.addr,
        "/ws/general",
        &[("Authorization", "Basic abc")],
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = try_connect(
        server.addr,
        "/ws/general",
        &[("Authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn topics_are_authorized() {
    let server = basic_chat(1, None);
    let own = format!("/ws/private-user-{ALICE_ID}?token={ALICE}");
    assert_eq!(try_connect(server.addr, &own, &[]).await.0, 101);
    let foreign = format!("/ws/private-user-{ALICE_ID}?token={BOB}");
    assert_eq!(try_connect(server.addr, &foreign, &[]).await.0, 403);
    for topic in ["random", "general"] {
        let path = format!("/ws/{topic}?token={BOB}");
        assert_eq!(try_connect(server.addr, &path, &[]).await.0, 101);
    }
    for topic in ["private-user-", "private-user-someone-else"] {
        let path = format!("/ws/{topic}?token={BOB}");
        assert_eq!(try_connect(server.addr, &path, &[]).await.0, 403, "{topic}");
    }
    for topic in ["nope", "General", "private-alice"] {
        let path = format!("/ws/{topic}?token={BOB}");
        assert_eq!(try_connect(server.addr, &path, &[]).await.0, 404, "{topic}");
    }
}

#[tokio::test]
async fn plain_http_requests_get_statuses_not_upgrades() {
    let server = basic_chat(1, None);
    let get = |path: String| async move {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let health = get("/health".into()).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("OK"), "{health}");
    assert!(get("/ws/general".into()).await.starts_with("HTTP/1.1 401"));
    let not_ws = get(format!("/ws/general?token={ALICE}")).await;
    assert!(not_ws.starts_with("HTTP/1.1 400"), "{not_ws}");
    assert!(
        get(format!("/ws/nope?token={ALICE}"))
            .await
            .starts_with("HTTP/1.1 404")
    );
}
