//! Presence in Redis: every instance's connections in a topic, counted per user atomically,
//! with entries that disappear when their instance dies.
//!
//! Keys of topic `T` (all with the hash tag `{<prefix>T}` of the history keys, so one script
//! touches one slot; on Redis Cluster they start with the topic's partition tag instead,
//! `{<tag>}<prefix>T`, and the script publishes with `SPUBLISH`):
//!
//! | key | type | content |
//! |---|---|---|
//! | `{…}:p:inst` | ZSET | instance id → when its entries expire (ms) |
//! | `{…}:p:c:<instance>` | HASH | that instance's connections: connection id → user |
//! | `{…}:p:users` | HASH | user → connections over every instance |
//! | `{…}:p:info` | HASH | user → the application's info (JSON) |
//! | `{…}:p:n` | STRING | connections over every instance |
//!
//! Every change is one run of [`SCRIPT`]. It first removes the instances whose expiry passed
//! (lazily, on whatever touches the topic next: a live instance's renewal every
//! `presence_refresh` at the latest), decrementing their users. A user whose count goes from 0
//! to 1 is announced with `PUBLISH <channel> "\xFFJ<len> <user><info>"`, one whose count reaches
//! 0 with `\xFFL…`, on the topic's own channel: every instance subscribed to the topic hears each
//! transition exactly once, in order with the topic's publications. `0xFF` never starts UTF-8, so
//! these are never taken for a payload; the subscriber hands them to presence, not to the
//! subscribers, so clients that do not speak `rtk1` never see them.
//!
//! Every key expires a TTL after the last renewal (this instance's connections two TTLs, so
//! that the cleanup still finds them). A renewal runs on each `refresh`, which comes every half
//! TTL at most, and on an `add` only when the add created a key or this instance's expiry is
//! less than half a TTL away: a join into a topic that already has entries costs no `PEXPIRE`.
//!
//! The script reads the time with `TIME` (Redis replicates scripts by their effects since 5.0,
//! the only mode since 7.0). The keys of a dead instance are derived inside the script; they
//! share the hash tag, so they live in the same slot.

use bytes::Bytes;

use super::resp::Value;
use crate::presence::{PresenceEntry, PresencePage, PresenceStats};

/// KEYS: instances, this instance's connections, users, info, count. ARGV: operation, channel,
/// instance id, TTL (ms), then the operation's own: `add` conn user info; `rem` conn;
/// `refresh` count; `drop`; `list` cursor count; `stats`.
pub(crate) const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[3])
local ttl = tonumber(ARGV[4])
local function drop(user)
  local n = redis.call('HINCRBY', KEYS[3], user, -1)
  if redis.call('DECR', KEYS[5]) <= 0 then redis.call('DEL', KEYS[5]) end
  if n <= 0 then
    local info = redis.call('HGET', KEYS[4], user) or 'null'
    redis.call('HDEL', KEYS[3], user)
    redis.call('HDEL', KEYS[4], user)
    redis.call('PUBLISH', ARGV[2], '\255L' .. #user .. ' ' .. user .. info)
  end
end
local function drop_instance(inst)
  local key = base .. inst
  local conns = redis.call('HGETALL', key)
  for i = 2, #conns, 2 do drop(conns[i]) end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], inst)
end
for _, inst in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  drop_instance(inst)
end
local function keep()
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
  redis.call('PEXPIRE', KEYS[5], ttl)
  -- Outlives its expiry in the ZSET, so that the cleanup still finds its users.
  redis.call('PEXPIRE', KEYS[2], 2 * ttl)
end
local op = ARGV[1]
if op == 'add' then
  if redis.call('HSETNX', KEYS[2], ARGV[5], ARGV[6]) == 1 then
    -- Keys this add created get their TTL now. A count going to 1 means the shared keys were
    -- just created (they empty together); a hash of one entry means this instance's own hash
    -- was just created.
    -- Otherwise the TTLs set by this instance's last renewal run for half a TTL or more,
    -- unless its expiry is nearer than that.
    local created = redis.call('INCR', KEYS[5]) == 1
    local n = redis.call('HINCRBY', KEYS[3], ARGV[6], 1)
    redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
    if n == 1 then
      redis.call('PUBLISH', ARGV[2], '\255J' .. #ARGV[6] .. ' ' .. ARGV[6] .. ARGV[7])
    end
    local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[3]) or '0')
    if created or redis.call('HLEN', KEYS[2]) == 1 or expiry < now + ttl / 2 then
      keep()
    end
  end
  return 1
elseif op == 'rem' then
  local user = redis.call('HGET', KEYS[2], ARGV[5])
  if user then
    redis.call('HDEL', KEYS[2], ARGV[5])
    drop(user)
  end
  return 1
elseif op == 'refresh' then
  -- Whether Redis still has every entry of this instance (ARGV[5]: how many it has).
  local present = redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[5])
  keep()
  if present then return 1 end
  return 0
elseif op == 'drop' then
  drop_instance(ARGV[3])
  return 1
elseif op == 'list' then
  local r = redis.call('HSCAN', KEYS[3], ARGV[5], 'COUNT', ARGV[6])
  local out = {}
  for i = 1, #r[2], 2 do
    local u = r[2][i]
    out[#out + 1] = u
    out[#out + 1] = r[2][i + 1]
    out[#out + 1] = redis.call('HGET', KEYS[4], u) or 'null'
  end
  return {r[1], out}
elseif op == 'stats' then
  return {redis.call('HLEN', KEYS[3]), tonumber(redis.call('GET', KEYS[5]) or '0')}
end
return redis.error_reply('unknown presence operation')
"#;

/// The script's keys for the topic whose keys start with `tag` (see
/// [`positioned::keys`](super::positioned::keys)) and for `instance`, after the key count.
pub(crate) fn keys(tag: &str, instance: &str) -> [Bytes; 5] {
    [
        Bytes::from(format!("{tag}:p:inst")),
        Bytes::from(format!("{tag}:p:c:{instance}")),
        Bytes::from(format!("{tag}:p:users")),
        Bytes::from(format!("{tag}:p:info")),
        Bytes::from(format!("{tag}:p:n")),
    ]
}

/// A presence event received on a topic's channel: `join` or `leave`, the user and the info.
pub(crate) fn parse_event(message: &[u8]) -> Option<(&'static str, &str, &[u8])> {
    let kind = match message.get(..2)? {
        b"\xFFJ" => "join",
        b"\xFFL" => "leave",
        _ => return None,
    };
    let rest = &message[2..];
    let sp = rest.iter().position(|&b| b == b' ')?;
    let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let body = &rest[sp + 1..];
    let user = std::str::from_utf8(body.get(..len)?).ok()?;
    Some((kind, user, &body[len..]))
}

/// Whether a received message is a presence event (not a publication).
pub(crate) fn is_event(message: &[u8]) -> bool {
    matches!(message.get(..2), Some(b"\xFFJ" | b"\xFFL"))
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// The page of a `list` reply.
pub(crate) fn list_reply(v: Value) -> Option<PresencePage> {
    let Value::Array(Some(items)) = v else {
        return None;
    };
    let [Value::Bulk(Some(cursor)), Value::Array(Some(flat))] = &items[..] else {
        return None;
    };
    let mut users = Vec::with_capacity(flat.len() / 3);
    for chunk in flat.chunks(3) {
        let [Value::Bulk(Some(user)), count, Value::Bulk(Some(info))] = chunk else {
            return None;
        };
        users.push(PresenceEntry {
            user: String::from_utf8_lossy(user).into_owned(),
            connections: int(count)?,
            info: serde_json::from_slice(info).unwrap_or(serde_json::Value::Null),
        });
    }
    let cursor = String::from_utf8_lossy(cursor).into_owned();
    let next = (cursor != "0").then_some(cursor);
    Some(PresencePage { users, next })
}

/// The counts of a `stats` reply.
pub(crate) fn stats_reply(v: &Value) -> Option<PresenceStats> {
    let Value::Array(Some(items)) = v else {
        return None;
    };
    match &items[..] {
        [users, conns] => Some(PresenceStats {
            users: int(users)?,
            connections: int(conns)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_publications_are_not_events() {
        assert_eq!(
            parse_event(b"\xFFJ5 alice{\"n\":1}"),
            Some(("join", "alice", &b"{\"n\":1}"[..]))
        );
        assert_eq!(
            parse_event(b"\xFFL3 bobnull"),
            Some(("leave", "bob", &b"null"[..]))
        );
        for bad in [
            &b"\xFFJ"[..],
            b"\xFFJx alice",
            b"\xFFJ9 alice",
            b"\xFFP1 e\n{}",
        ] {
            assert_eq!(parse_event(bad), None, "{bad:?}");
        }
        assert!(!is_event(b"\xFFP1 e\n{}"));
        assert!(!is_event(b"{}"));
    }

    #[test]
    fn list_and_stats_replies_parse_and_anything_else_is_refused() {
        let bulk = |b: &'static [u8]| Value::Bulk(Some(Bytes::from_static(b)));
        let reply = |cursor, flat| Value::Array(Some(vec![bulk(cursor), Value::Array(Some(flat))]));
        let page = list_reply(reply(
            b"17",
            vec![bulk(b"alice"), bulk(b"2"), bulk(b"{\"n\":1}")],
        ))
        .unwrap();
        assert_eq!(page.next.as_deref(), Some("17"));
        assert_eq!(page.users.len(), 1);
        assert_eq!(page.users[0].user, "alice");
        assert_eq!(page.users[0].connections, 2);
        assert_eq!(page.users[0].info, serde_json::json!({ "n": 1 }));
        let last = list_reply(reply(b"0", vec![])).unwrap();
        assert_eq!((last.users.len(), last.next), (0, None));
        assert!(list_reply(reply(b"0", vec![bulk(b"alice"), bulk(b"x"), bulk(b"null")])).is_none());
        assert!(list_reply(Value::Int(1)).is_none());

        let stats = stats_reply(&Value::Array(Some(vec![Value::Int(3), Value::Int(5)]))).unwrap();
        assert_eq!((stats.users, stats.connections), (3, 5));
        assert!(stats_reply(&Value::Array(Some(vec![Value::Int(-1), Value::Int(5)]))).is_none());
    }
}
