//! Topic names: what the runtime accepts as a topic, wherever one comes from (the upgrade's
//! path, [`WsSink::join`](crate::sink::WsSink::join)).

/// Topic names: 1 to `max` bytes of printable ASCII, without space, `"`, `\` or the Redis
/// pattern characters `*`, `?`, `[`, `]` (a topic is used verbatim as a channel name).
pub(crate) fn check(topic: &str, max: usize) -> Result<(), &'static str> {
    if topic.is_empty() || topic.len() > max {
        return Err("topic name is empty or too long");
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
