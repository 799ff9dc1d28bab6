//! RFC 6455 violations close the connection with the right code; other clients are unaffected.

mod support;

use support::*;

async fn expect_closed_with(frame: Vec<u8>, code: u16) {
    let server = chat_server(2).await;
    let mut bystander = connect(server.addr, "general", BOB).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    c.send_raw(&frame).await;
    assert_eq!(c.expect_close().await, code);
    c.finish_close().await;
    // Everyone else carries on.
    bystander.assert_nothing_pending().await;
    assert_eq!(server.service.metrics().protocol_errors, 1);
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    expect_closed_with(encode_client_frame(true, 0x1, b"\"Ping\"", false), 1002).await;
}

#[tokio::test]
async fn oversized_control_frames_are_1002() {
    for opcode in [0x8, 0x9, 0xA] {
        let mut payload = vec![b'x'; 126];
        payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        expect_closed_with(encode_client_frame(true, opcode, &payload, true), 1002).await;
    }
}

#[tokio::test]
async fn reserved_bits_opcodes_and_fragmented_control_are_1002() {
    expect_closed_with(encode_client_frame(true, 0x3, b"", true), 1002).await;
    expect_closed_with(encode_client_frame(true, 0x41, b"x", true), 1002).await;
    expect_closed_with(encode_client_frame(false, 0x9, b"", true), 1002).await;
    expect_closed_with(encode_client_frame(true, 0x0, b"orphan", true), 1002).await;
    expect_closed_with(encode_client_frame(true, 0x8, &[3], true), 1002).await;
}

#[tokio::test]
async fn invalid_utf8_is_1007() {
    expect_closed_with(encode_client_frame(true, 0x1, b"\"\xff\xfe\"", true), 1007).await;
}

#[tokio::test]
async fn oversized_message_is_1009() {
    // One frame over the 64 KiB default, refused from its header.
    expect_closed_with(
        encode_client_frame(true, 0x1, &vec![b' '; 65 * 1024], true),
        1009,
    )
    .await;
    // Fragments that add up to more than the cap.
    let mut bomb = Vec::new();
    bomb.extend(encode_client_frame(
        false,
        0x1,
        &vec![b' '; 40 * 1024],
        true,
    ));
    bomb.extend(encode_client_frame(
        false,
        0x0,
        &vec![b' '; 40 * 1024],
        true,
    ));
    expect_closed_with(bomb, 1009).await;
}

#[tokio::test]
async fn client_close_is_answered_and_the_connection_ends() {
    let server = chat_server(1).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    c.send_frame(true, 0x8, &[0x0F, 0xA0, b'b', b'y', b'e'], true)
        .await; // 4000 "bye"
    assert_eq!(c.expect_close().await, 4000);
    assert!(
        c.recv_frame().await.is_none(),
        "TCP stream should end after the close"
    );

    let mut c = connect(server.addr, "general", ALICE).await;
    c.send_frame(true, 0x8, b"", true).await;
    assert_eq!(c.expect_close().await, 1000);
    assert!(c.recv_frame().await.is_none());
}

#[tokio::test]
async fn pings_are_answered_with_the_same_payload() {
    let server = chat_server(1).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    c.send_frame(true, 0x9, b"are you there", true).await;
    let f = c.recv_frame().await.unwrap();
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (0xA, &b"are you there"[..])
    );
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_does_not_read_costs_nothing_lasting() {
    let server = chat_server(1).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    let mut bystander = connect(server.addr, "general", BOB).await;
    // 21 MB of pings, sent without reading a single pong: far more than socket buffers hold.
    let ping = encode_client_frame(true, 0x9, &[7u8; 100], true);
    for _ in 0..200 {
        c.send_raw(&ping.repeat(1000)).await;
    }
    c.send_text("\"Ping\"").await;
    // Pongs answer only the newest pending ping, so far fewer than 200 000 arrive.
    let mut pongs = 0;
    loop {
        let f = c.recv_frame().await.expect("connection stays open");
        match f.opcode {
            0xA => pongs += 1,
            0x1 => {
                assert_eq!(f.payload, b"\"Pong\"");
                break;
            }
            op => panic!("unexpected opcode {op:#x}"),
        }
    }
    assert!(pongs < 200_000, "{pongs} pongs");
    bystander.assert_nothing_pending().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_length_after_the_close_cannot_hang_the_server() {
    // An unmasked frame (close 1002), then, while the server skips the client's frames until
    // its close, a frame header whose 64-bit length overflowed the skip arithmetic (found by
    // fuzzing: the connection spun forever without awaiting, holding a worker thread).
    let server = chat_server(2).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    let mut bytes = vec![0x81, 0x01, b'x', 0x82, 0x7F];
    bytes.extend_from_slice(&(u64::MAX - 9).to_be_bytes());
    c.send_raw(&bytes).await;
    assert_eq!(c.expect_close().await, 1002);
    // The server gives up on the client's close after its close timeout and lets go.
    let service = server.service.clone();
    wait_until("the connection ends", move || {
        service.metrics().connections_active == 0
    })
    .await;
    // And it still serves.
    let mut bob = connect(server.addr, "general", BOB).await;
    bob.assert_nothing_pending().await;
}

#[tokio::test]
async fn frames_arriving_a_byte_at_a_time_are_read_and_answered() {
    // Every byte is its own short read: the reader must wait for the next one each time and
    // never miss that it came (the readiness a short read clears is only the one it saw).
    let server = chat_server(1).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    for _ in 0..3 {
        let frame = encode_client_frame(true, 0x1, b"\"Ping\"", true);
        for byte in frame {
            c.send_raw(&[byte]).await;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert_eq!(c.recv_json().await, serde_json::Value::from("Pong"));
    }
}
