//! Topic names: what the runtime accepts as a topic, wherever one comes from (the upgrade's
//! path, [`WsSink::join`](crate::sink::WsSink::join)).

/// Prefix of the channel names the kit uses for itself (the Redis subscriber's liveness probe,
/// `__rtk_probe:<instance>`). No topic may start with it: a client that joined and left the
/// probe's channel would make the subscriber unsubscribe the probe, and the missed probes would
/// force reconnects that lose messages.
pub(crate) const RESERVED_PREFIX: &str = "__rtk";

/// Topic names: 1 to `max` bytes of printable ASCII, without space, `"`, `\` or the Redis
/// pattern characters `*`, `?`, `[`, `]` (a topic is used verbatim as a channel name), and not
/// starting with `__rtk` ([`RESERVED_PREFIX`]: the kit's own channels).
pub(crate) fn check(topic: &str, max: usize) -> Result<(), &'static str> {
    if topic.is_empty() || topic.len() > max {
        return Err("topic name is empty or too long");
    }
    if topic.starts_with(RESERVED_PREFIX) {
        return Err("topic names starting with __rtk are reserved");
    }
    let ok = topic
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'*' | b'?' | b'[' | b']'));
    if ok {
        Ok(())
    } else {
        Err("topic name has characters that are not allowed")
    }
}
