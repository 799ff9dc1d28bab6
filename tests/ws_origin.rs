//! The Origin allow-list (cross-site WebSocket hijacking): a browser on another site may open a
//! WebSocket to this server with the user's cookies; only the listed origins get the upgrade.

mod support;

use support::*;

async fn status(addr: std::net::SocketAddr, origin: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
    let (status, _client) =
        try_connect(addr, &format!("/ws/general?token={ALICE}"), &headers).await;
    status
}

#[tokio::test]
async fn only_listed_origins_are_upgraded_and_requests_without_one_are() {
    let service = chat::builder()
        .allowed_origins(["https://chat.example.com", "http://localhost:3000/"])
        .build();
    let server = serve_chat(service).await;
    let addr = server.addr;

    for allowed in [
        "https://chat.example.com",
        "https://CHAT.Example.com",
        "https://chat.example.com:443",
        "http://localhost:3000",
    ] {
        assert_eq!(status(addr, Some(allowed)).await, 101, "Origin: {allowed}");
    }
    for refused in [
        "https://evil.example.com",
        "http://chat.example.com",
        "https://chat.example.com:8443",
        "https://chat.example.com.evil.com",
        "http://localhost:3001",
        "null",
        "",
    ] {
        assert_eq!(status(addr, Some(refused)).await, 403, "Origin: {refused}");
    }
    // Non-browser clients send no Origin.
    assert_eq!(status(addr, None).await, 101);
}

#[tokio::test]
async fn without_an_allow_list_any_origin_is_upgraded() {
    let server = chat_server(1).await;
    assert_eq!(
        status(server.addr, Some("https://evil.example.com")).await,
        101
    );
    assert_eq!(status(server.addr, None).await, 101);
}
