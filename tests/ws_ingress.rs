//! What a client's bytes cost the reader however they are cut: text is validated as it arrives
//! (invalid UTF-8 is refused before its frame completes, in time linear in the bytes received),
//! and a fragmented message is refused from the header of the fragment that would pass the
//! size limit, before its payload is buffered.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// The header of a masked client frame announcing `len` payload bytes, and the payload's
/// first `sent` bytes: a frame still arriving.
fn frame_start(fin: bool, opcode: u8, payload: &[u8], sent: usize) -> Vec<u8> {
    let whole = encode_client_frame(fin, opcode, payload, true);
    let header = whole.len() - payload.len();
    whole[..header + sent].to_vec()
}

/// Sends `bytes` one per write, pausing in between so that most arrive in a segment (and a
/// read) of their own.
async fn trickle(c: &mut Client, bytes: &[u8]) {
    for &byte in bytes {
        c.send_raw(&[byte]).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn invalid_utf8_mid_frame_is_closed_1007_before_the_frame_completes() {
    let server = chat_server(1).await;
    let mut bystander = connect(server.addr, "general", BOB).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    // 1 000 bytes announced; the first 20 sent hold a surrogate (never valid), byte by byte.
    let mut payload = b"{\"SendMessage\":\xED\xA0\x80".to_vec();
    payload.resize(1000, b' ');
    let start = frame_start(true, 0x1, &payload, 20);
    trickle(&mut c, &start).await;
    assert_eq!(c.expect_close().await, 1007);
    // The rest of the frame, then the client's close: the server skips the one and ends.
    let whole = encode_client_frame(true, 0x1, &payload, true);
    c.send_raw(&whole[start.len()..]).await;
    c.finish_close().await;
    bystander.assert_nothing_pending().await;
    assert_eq!(server.service.metrics().protocol_errors, 1);
}

#[tokio::test]
async fn a_character_cut_by_a_fragment_boundary_is_checked_across_it() {
    let server = chat_server(1).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    // The first fragment ends inside "€" (E2 82 AC); the continuation goes on with "x".
    c.send_frame(false, 0x1, b"\"caf\xE2\x82", true).await;
    let mut rest = b"x\"".to_vec();
    rest.resize(100, b' ');
    trickle(&mut c, &frame_start(true, 0x0, &rest, 1)).await;
    assert_eq!(c.expect_close().await, 1007);
}

#[tokio::test]
async fn text_trickled_a_byte_at_a_time_across_fragments_is_read_whole() {
    let server = chat_server(1).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    let text = "héllo ✓ 🚀 wörld";
    let message = send_message("general", text);
    let bytes = message.as_bytes();
    // Three fragments, cut inside "é" and inside "🚀".
    let first = message.find('é').unwrap() + 1;
    let second = message.find('🚀').unwrap() + 2;
    let mut wire = encode_client_frame(false, 0x1, &bytes[..first], true);
    wire.extend(encode_client_frame(false, 0x0, &bytes[first..second], true));
    wire.extend(encode_client_frame(true, 0x0, &bytes[second..], true));
    trickle(&mut c, &wire).await;
    assert_eq!(
        c.recv_json().await,
        json!({"NewMessage": {"room": "general", "username": "alice", "text": text}})
    );
}

#[tokio::test]
async fn a_fragment_that_would_pass_the_size_limit_is_closed_1009_from_its_header() {
    let limit = 64 * 1024; // the default `max_message_size`
    let server = chat_server(1).await;
    let mut bystander = connect(server.addr, "general", BOB).await;
    let mut c = connect(server.addr, "general", ALICE).await;
    // Fragments adding up to the limit exactly are fine (the text is not JSON: an error reply).
    c.send_frame(false, 0x1, &vec![b' '; limit - 10], true)
        .await;
    c.send_frame(true, 0x0, &[b' '; 10], true).await;
    assert_eq!(c.recv_json().await["type"], "error");
    // The first fragment again, then only the header of one announcing 100 bytes more: refused
    // from that header, before any of its payload is buffered.
    c.send_frame(false, 0x1, &vec![b' '; limit - 10], true)
        .await;
    let header = frame_start(true, 0x0, &[b' '; 100], 0);
    c.send_raw(&header).await;
    assert_eq!(c.expect_close().await, 1009);
    // Its payload, then the client's close: the server skips the one and ends.
    c.send_raw(&encode_client_frame(true, 0x0, &[b' '; 100], true)[header.len()..])
        .await;
    c.finish_close().await;
    bystander.assert_nothing_pending().await;
    assert_eq!(server.service.metrics().protocol_errors, 1);
}
