//! Positioned topics over Redis: Redis assigns each publication's position.
//!
//! A publication on a topic with a [`TopicPolicy`] is one Lua script, run atomically by Redis:
//! it takes the next offset from the topic's meta key (a hash of `top` and `epoch`; a missing
//! key starts a new epoch, minted by the caller, at offset 1), appends the payload to the topic's
//! stream under the explicit ID `<offset>-0`, trims the stream to the policy's size, renews the
//! TTLs (the history TTL on the stream, the epoch TTL on the meta key) and PUBLISHes the payload
//! behind a position header on the topic's usual channel. Since Redis runs scripts one at a time
//! and delivers a channel's messages in the order they were published, offsets follow the
//! delivery order every instance sees. Both keys carry the hash tag `{<prefix><topic>}`, so the
//! script touches one slot; on Redis Cluster the keys start with the topic's partition tag
//! instead (`{<tag>}<prefix><topic>:meta`, see [`super::slots`]), the channel too, and the
//! script publishes with `SPUBLISH`.
//!
//! The header is `0xFF 'P' <offset> ' ' <epoch> '\n'` in front of the payload. `0xFF` never
//! occurs in UTF-8, so a text payload published by another program is never taken for one; it
//! reaches subscribers without a position.

use bytes::Bytes;

use crate::history::{Position, TopicPolicy};

/// The script. KEYS: meta, stream. ARGV: epoch for a new stream, payload, history size,
/// history TTL (ms), epoch TTL (ms), channel. Returns `{offset, epoch}`.
pub(crate) const SCRIPT: &str = r#"
local top = redis.call('HINCRBY', KEYS[1], 'top', 1)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
if top == 1 then
  redis.call('DEL', KEYS[2])
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], top .. '-0', 'p', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[6], '\255P' .. top .. ' ' .. epoch .. '\n' .. ARGV[2])
return {top, epoch}
"#;

/// Reads a range back: KEYS: meta, stream. ARGV: first and last ID. Returns `{epoch or "",
/// XRANGE reply}`.
pub(crate) const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
return {epoch, redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[2])}
"#;

/// Ends an epoch if it is still the current one: KEYS: meta, stream. ARGV: the epoch. Deletes
/// both keys, so the next publication starts a new epoch at offset 1; returns 1 if it did.
pub(crate) const END_EPOCH_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"#;

/// The epoch and `(offset, payload)` pairs of a [`READ_SCRIPT`] reply.
pub(crate) fn read_reply(v: super::resp::Value) -> Option<(String, Vec<(u64, Bytes)>)> {
    use super::resp::Value;
    let Value::Array(Some(mut items)) = v else {
        return None;
    };
    if items.len() != 2 {
        return None;
    }
    let entries = items.pop()?;
    let epoch = match items.pop()? {
        Value::Bulk(Some(e)) => String::from_utf8(e.to_vec()).ok()?,
        _ => return None,
    };
    let Value::Array(Some(entries)) = entries else {
        return None;
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(Some(mut parts)) = entry else {
            return None;
        };
        if parts.len() != 2 {
            return None;
        }
        let fields = parts.pop()?;
        let id = match parts.pop()? {
            Value::Bulk(Some(id)) => id,
            _ => return None,
        };
        let offset: u64 = std::str::from_utf8(&id)
            .ok()?
            .strip_suffix("-0")?
            .parse()
            .ok()?;
        let Value::Array(Some(fields)) = fields else {
            return None;
        };
        let payload = match &fields[..] {
            [Value::Bulk(Some(k)), Value::Bulk(Some(p))] if &k[..] == b"p" => p.clone(),
            _ => return None,
        };
        out.push((offset, payload));
    }
    Some((epoch, out))
}

/// The meta and stream keys of a topic whose keys start with `tag` (`{<prefix><topic>}`, or
/// on a cluster `{<partition tag>}<prefix><topic>`).
pub(crate) fn keys(tag: &str) -> (Bytes, Bytes) {
    (
        Bytes::from(format!("{tag}:meta")),
        Bytes::from(format!("{tag}:stream")),
    )
}

/// The arguments after the script (or its SHA) of one publication.
pub(crate) fn args(
    tag: &str,
    channel: Bytes,
    payload: Bytes,
    policy: &TopicPolicy,
    new_epoch: &str,
) -> Vec<Bytes> {
    let (meta, stream) = keys(tag);
    let ms = |d: std::time::Duration| Bytes::from(d.as_millis().max(1).to_string());
    vec![
        Bytes::from_static(b"2"),
        meta,
        stream,
        Bytes::copy_from_slice(new_epoch.as_bytes()),
        payload,
        Bytes::from(policy.history_size.to_string()),
        ms(policy.history_ttl),
        ms(policy.epoch_ttl),
        channel,
    ]
}

/// The position a script run answered, if its reply is one.
pub(crate) fn reply_position(v: &super::resp::Value) -> Option<Position> {
    use super::resp::Value;
    let Value::Array(Some(items)) = v else {
        return None;
    };
    match &items[..] {
        [Value::Int(offset), Value::Bulk(Some(epoch))] => Some(Position {
            offset: u64::try_from(*offset).ok()?,
            epoch: std::str::from_utf8(epoch).ok()?.to_string(),
        }),
        _ => None,
    }
}

/// Splits a received message into its position and payload; a message without a valid header
/// is all payload.
pub(crate) fn parse(message: Bytes) -> (Option<Position>, Bytes) {
    let parsed = (|| {
        let rest = message.strip_prefix(b"\xFFP")?;
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let head = std::str::from_utf8(&rest[..nl]).ok()?;
        let (offset, epoch) = head.split_once(' ')?;
        let offset: u64 = offset.parse().ok()?;
        if offset == 0 || epoch.is_empty() {
            return None;
        }
        Some((
            Position {
                offset,
                epoch: epoch.to_string(),
            },
            2 + nl + 1,
        ))
    })();
    match parsed {
        Some((position, start)) => (Some(position), message.slice(start..)),
        None => (None, message),
    }
}

/// The header and payload as the script publishes them (tests).
#[cfg(test)]
pub(crate) fn encode(position: &Position, payload: &[u8]) -> Bytes {
    let mut b = bytes::BytesMut::new();
    b.extend_from_slice(b"\xFFP");
    b.extend_from_slice(format!("{} {}\n", position.offset, position.epoch).as_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_anything_else_is_all_payload() {
        let p = Position {
            offset: 42,
            epoch: "abc".into(),
        };
        let (got, payload) = parse(encode(&p, b"{\"n\":1}"));
        assert_eq!(got, Some(p));
        assert_eq!(&payload[..], b"{\"n\":1}");
        for plain in [
            &b"hello"[..],
            b"\xFFP",
            b"\xFFPx y\nz",
            b"\xFFP0 e\nz",
            b"\xFFP1 \nz",
        ] {
            let (got, payload) = parse(Bytes::copy_from_slice(plain));
            assert_eq!(got, None, "{plain:?}");
            assert_eq!(&payload[..], plain);
        }
    }

    #[test]
    fn a_read_reply_gives_offsets_and_payloads_and_anything_else_is_refused() {
        use super::super::resp::Value;
        let bulk = |b: &'static [u8]| Value::Bulk(Some(Bytes::from_static(b)));
        let entry = |id: &'static [u8], p: &'static [u8]| {
            Value::Array(Some(vec![
                bulk(id),
                Value::Array(Some(vec![bulk(b"p"), bulk(p)])),
            ]))
        };
        let reply = |entries| Value::Array(Some(vec![bulk(b"ep"), Value::Array(Some(entries))]));
        let (epoch, got) =
            read_reply(reply(vec![entry(b"7-0", b"a"), entry(b"8-0", b"b")])).unwrap();
        assert_eq!(epoch, "ep");
        assert_eq!(
            got,
            vec![(7, Bytes::from_static(b"a")), (8, Bytes::from_static(b"b"))]
        );
        assert!(read_reply(reply(vec![entry(b"7-1", b"a")])).is_none());
        assert!(read_reply(reply(vec![entry(b"x-0", b"a")])).is_none());
        assert!(read_reply(Value::Int(1)).is_none());
    }
}
