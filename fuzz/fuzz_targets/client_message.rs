//! Text message bytes → the handler's default `decode` (`decode_json`) → `ClientMessage`.
//!
//! A handler must get the same answer for a message whatever its size. `decode_json` once
//! switched from serde_json to simd-json at 2 KiB, and simd-json accepted invalid JSON that
//! serde_json refuses (this target found it; see the README); it now uses serde_json at every
//! size. So every input is decoded twice: as it is, and padded with trailing spaces (which JSON
//! ignores) to 2 KiB — or, from 2 KiB on, by serde_json directly, what small messages always
//! got. For UTF-8 input — the only kind the runtime passes to `decode` — both must accept with
//! equal messages, or both refuse. Other input is decoded too, only to look for crashes.

#![no_main]

use axum_realtime_kit::prelude::MessageHandler;
use axum_realtime_kit_fuzz::{ClientMessage, FuzzHandler};
use libfuzzer_sys::fuzz_target;

/// Where `decode_json` used to switch parsers, in bytes.
const SWITCH: usize = 2 * 1024;

fn decode(bytes: &[u8]) -> Result<ClientMessage, String> {
    let mut buf = bytes.to_vec();
    FuzzHandler.decode(&mut buf)
}

fuzz_target!(|data: &[u8]| {
    let as_is = decode(data);
    if std::str::from_utf8(data).is_err() {
        return;
    }
    let other = if data.len() < SWITCH {
        let mut padded = data.to_vec();
        padded.resize(SWITCH, b' ');
        decode(&padded)
    } else {
        // Too long to be made shorter: compare with serde_json itself, what small messages get.
        serde_json::from_slice(data).map_err(|e| e.to_string())
    };
    match (&as_is, &other) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "size changed the message"),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "size changed the outcome for {:?}: {as_is:?} as is, {other:?} on the other side",
            String::from_utf8_lossy(data)
        ),
    }
});
