//! Just enough RESP2 to run a subscriber connection: values are measured first and only then
//! split off the read buffer, so a bulk payload becomes a `Bytes` slice of it, not a copy.

use bytes::{Bytes, BytesMut};

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Simple(Bytes),
    Error(Bytes),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Value>>),
}

/// The stream is not RESP2 we understand: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RespError(pub(crate) &'static str);

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RESP protocol error: {}", self.0)
    }
}

impl std::error::Error for RespError {}

/// Deepest array nesting accepted (pub/sub replies nest one level).
const MAX_DEPTH: usize = 4;

/// Takes one complete value off the front of `buf`; `Ok(None)` if more bytes are needed.
pub(crate) fn parse(buf: &mut BytesMut) -> Result<Option<Value>, RespError> {
    let Some(end) = measure(buf, 0, 0)? else {
        return Ok(None);
    };
    let frame = buf.split_to(end).freeze();
    let (value, _) = build(&frame, 0);
    Ok(Some(value))
}

fn line_end(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_int(b: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError("bad integer"))
}

/// End offset of the value starting at `pos`, if it is complete.
fn measure(b: &[u8], pos: usize, depth: usize) -> Result<Option<usize>, RespError> {
    let Some(&tag) = b.get(pos) else {
        return Ok(None);
    };
    let Some(eol) = line_end(b, pos + 1) else {
        return Ok(None);
    };
    match tag {
        b'+' | b'-' | b':' => Ok(Some(eol + 2)),
        b'$' => {
            let n = parse_int(&b[pos + 1..eol])?;
            if n < 0 {
                return Ok(Some(eol + 2));
            }
            let end = eol + 2 + n as usize + 2;
            Ok((b.len() >= end).then_some(end))
        }
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(RespError("arrays nested too deep"));
            }
            let n = parse_int(&b[pos + 1..eol])?;
            let mut at = eol + 2;
            for _ in 0..n.max(0) {
                match measure(b, at, depth + 1)? {
                    Some(end) => at = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(RespError("unknown type byte")),
    }
}

/// Builds the value at `pos` of a frame already known to be complete.
fn build(frame: &Bytes, pos: usize) -> (Value, usize) {
    let eol = line_end(frame, pos + 1).expect("measured");
    let line = || frame.slice(pos + 1..eol);
    match frame[pos] {
        b'+' => (Value::Simple(line()), eol + 2),
        b'-' => (Value::Error(line()), eol + 2),
        b':' => (Value::Int(parse_int(&line()).unwrap_or(0)), eol + 2),
        b'$' => {
            let n = parse_int(&line()).unwrap_or(-1);
            if n < 0 {
                return (Value::Bulk(None), eol + 2);
            }
            let start = eol + 2;
            let end = start + n as usize;
            (Value::Bulk(Some(frame.slice(start..end))), end + 2)
        }
        _ => {
            let n = parse_int(&line()).unwrap_or(-1);
            if n < 0 {
                return (Value::Array(None), eol + 2);
            }
            let mut at = eol + 2;
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let (v, next) = build(frame, at);
                items.push(v);
                at = next;
            }
            (Value::Array(Some(items)), at)
        }
    }
}

/// Appends one command as a RESP array of bulk strings.
pub(crate) fn encode_command<'a>(
    out: &mut Vec<u8>,
    parts: impl ExactSizeIterator<Item = &'a [u8]>,
) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail; `write!` formats the lengths without allocating.
    let _ = write!(out, "*{}\r\n", parts.len());
    for p in parts {
        let _ = write!(out, "${}\r\n", p.len());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pubsub_replies_incrementally() {
        let wire: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$7\r\ngeneral\r\n:1\r\n\
            *3\r\n$7\r\nmessage\r\n$7\r\ngeneral\r\n$5\r\nhe\r\no\r\n+OK\r\n-ERR no\r\n$-1\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            while parse(&mut buf).unwrap().is_some() {}
        }
        let mut buf = BytesMut::from(wire);
        let v = parse(&mut buf).unwrap().unwrap();
        assert_eq!(
            v,
            Value::Array(Some(vec![
                Value::Bulk(Some(Bytes::from_static(b"subscribe"))),
                Value::Bulk(Some(Bytes::from_static(b"general"))),
                Value::Int(1),
            ]))
        );
        let Value::Array(Some(items)) = parse(&mut buf).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(items[2], Value::Bulk(Some(Bytes::from_static(b"he\r\no"))));
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Value::Simple(Bytes::from_static(b"OK")))
        );
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Value::Error(Bytes::from_static(b"ERR no")))
        );
        assert_eq!(parse(&mut buf).unwrap(), Some(Value::Bulk(None)));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(&mut BytesMut::from(&b"?what\r\n"[..])).is_err());
        assert!(parse(&mut BytesMut::from(&b"$x\r\n"[..])).is_err());
        let deep = "*1\r\n".repeat(10) + ":1\r\n";
        assert!(parse(&mut BytesMut::from(deep.as_bytes())).is_err());
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode_command(&mut out, [&b"SUBSCRIBE"[..], b"a", b"bc"].into_iter());
        assert_eq!(out, b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$2\r\nbc\r\n");
    }
}
