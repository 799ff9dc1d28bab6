//! Limits and heartbeats: each has a clear outcome and costs nobody else anything.

mod support;

use std::time::Duration;

use axum_realtime_kit::WebsocketServiceBuilder;
use support::chat::ChatHandler;
use support::*;

async fn serve(
    configure: impl FnOnce(WebsocketServiceBuilder<ChatHandler>) -> WebsocketServiceBuilder<ChatHandler>,
) -> Server {
    serve_chat(configure(chat::builder()).build()).await
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_and_one_that_does_stays() {
    let server =
        serve(|b| b.heartbeat(Duration::from_millis(100), Duration::from_millis(200))).await;
    let mut silent = connect(server.addr, "general", ALICE).await;
    let mut alive = connect(server.addr, "general", BOB).await;
    // The other one answers each ping and outlives several timeouts.
    let alive = tokio::spawn(async move {
        for _ in 0..8 {
            let f = alive.recv_frame().await.expect("alive client was dropped");
            assert_eq!(f.opcode, 0x9, "alive client got {f:?}");
            alive.send_frame(true, 0xA, &f.payload, true).await;
        }
        alive.assert_nothing_pending().await;
    });
    // The silent one sees pings, answers none, and is closed.
    let mut pings = 0;
    loop {
        let f = silent
            .recv_frame()
            .await
            .expect("closed without a close frame");
        match f.opcode {
            0x9 => pings += 1,
            0x8 => {
                assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1001);
                break;
            }
            op => panic!("unexpected opcode {op:#x}"),
        }
    }
    assert!(pings >= 1);
    alive.await.unwrap();
}

#[tokio::test]
async fn a_client_heard_within_every_interval_is_not_pinged_and_is_once_it_goes_quiet() {
    let server =
        serve(|b| b.heartbeat(Duration::from_millis(100), Duration::from_millis(200))).await;
    let mut talker = connect(server.addr, "general", ALICE).await;
    // Six intervals of traffic, a message every quarter interval: each is answered, and no
    // WebSocket ping comes in between.
    for _ in 0..24 {
        talker.send_text("\"Ping\"").await;
        let f = talker.recv_frame().await.expect("talker was dropped");
        assert_eq!(f.opcode, 0x1, "expected the Pong text, got {f:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Once it goes quiet the heartbeat is still armed: a ping, then the close.
    let f = talker.recv_frame().await.expect("talker was dropped");
    assert_eq!(f.opcode, 0x9, "expected a ping, got {f:?}");
    assert_eq!(talker.expect_close().await, 1001);
}

#[tokio::test]
async fn bad_topic_names_are_400_before_the_upgrade() {
    let server = serve(|b| b.max_topic_len(16)).await;
    for topic in [
        "a%20b",
        "star*",
        "q%3F",
        "%5Bx%5D",
        "quote%22",
        "0123456789abcdefX",
    ] {
        let (status, _) =
            try_connect(server.addr, &format!("/ws/{topic}?token={ALICE}"), &[]).await;
        assert_eq!(status, 400, "{topic}");
    }
    // Still 401 first without a token, and valid names still work.
    assert_eq!(try_connect(server.addr, "/ws/star*", &[]).await.0, 401);
    connect(server.addr, "general", ALICE).await;
}

#[tokio::test]
async fn connections_past_the_limit_get_503_and_the_slot_comes_back() {
    let server = serve(|b| b.max_connections(2)).await;
    let a = connect(server.addr, "general", ALICE).await;
    let mut b = connect(server.addr, "general", BOB).await;
    let (status, _) = try_connect(server.addr, &format!("/ws/general?token={ALICE}"), &[]).await;
    assert_eq!(status, 503);
    a.abort();
    wait_until("slot released", || {
        server.service.metrics().connections_active == 1
    })
    .await;
    connect(server.addr, "random", ALICE).await;
    b.assert_nothing_pending().await;
}

#[tokio::test]
async fn a_flooding_client_is_told_then_closed_with_1008_while_others_carry_on() {
    let server = serve(|b| b.rate_limit(Some((50, 20)))).await;
    let mut flooder = connect(server.addr, "general", ALICE).await;
    let mut bob = connect(server.addr, "general", BOB).await;
    // 20 messages fit the burst; the 21st is dropped with one error.
    let mut burst = Vec::new();
    for i in 0..30 {
        burst.extend(encode_client_frame(
            true,
            0x1,
            send_message("general", &i.to_string()).as_bytes(),
            true,
        ));
    }
    flooder.send_raw(&burst).await;
    let mut texts = 0;
    let mut errors = 0;
    while texts + errors < 21 {
        let m = flooder.recv_json().await;
        if m["type"] == "error" {
            assert!(m["message"].as_str().unwrap().contains("Rate limit"));
            errors += 1;
        } else {
            texts += 1;
        }
    }
    assert!(texts >= 20 && errors == 1, "texts {texts}, errors {errors}");
    // Keep flooding past the grace period: closed with 1008.
    let flood = tokio::spawn(async move {
        let frame = encode_client_frame(true, 0x1, b"\"Ping\"", true);
        for _ in 0..400 {
            flooder.send_raw(&frame.repeat(50)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flooder
    });
    let mut flooder = flood.await.unwrap();
    assert_eq!(flooder.expect_close().await, 1008);
    // Bob got the 20 broadcasts that passed, and nothing else.
    for _ in 0..20 {
        assert!(bob.recv_json().await["NewMessage"].is_object());
    }
    bob.assert_nothing_pending().await;
}
