//! Redis Cluster's key space, and how topics are laid out on it.
//!
//! Redis Cluster puts every key and every sharded channel in one of [`SLOTS`] slots:
//! `CRC16(name) % 16384`, where `name` is only what stands between the first `{` and the next
//! `}` when that is not empty (the *hash tag*). A Lua script may only touch keys of one slot, and
//! an `SSUBSCRIBE` only channels of one slot.
//!
//! Topics are grouped into a fixed number of *partitions* (default [`DEFAULT_PARTITIONS`]):
//! a topic's partition is the 64-bit FNV-1a hash of its name, modulo the partition count. Each
//! partition has a hash tag whose slot lies in the middle of the partition's equal share of the
//! slots, so partitions spread evenly over however the slots are split between nodes. A topic's
//! channel and keys all start with its partition's tag, so they live on one node and the
//! position and presence scripts run there.
//!
//! Both mappings are part of the wire contract between instances: every instance must compute
//! the same partition and the same tag for a topic, today and in every later version, or they
//! would publish and subscribe on different channels. Nothing here may change.

use std::sync::LazyLock;

/// Slots in a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// Partitions when the URL does not say.
pub(crate) const DEFAULT_PARTITIONS: u16 = 128;

/// CRC16 as Redis Cluster computes it (XMODEM: polynomial 0x1021, initial value 0).
pub(crate) fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key or sharded channel, hash tag rule included.
#[cfg(test)]
pub(crate) fn slot(name: &[u8]) -> u16 {
    let hashed = name
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &name[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(name);
    crc16(hashed) % SLOTS
}

/// 64-bit FNV-1a.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// For every slot, the first string in the order `0`…`9`, `a`…`z`, `00`, `01`, … whose CRC16
/// lands in it: the shortest tag of each slot, the same on every machine.
static TAGS: LazyLock<Vec<Box<str>>> = LazyLock::new(|| {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut tags: Vec<Option<Box<str>>> = vec![None; usize::from(SLOTS)];
    let mut missing = usize::from(SLOTS);
    let mut word = vec![0usize];
    while missing > 0 {
        let s: String = word.iter().map(|&i| char::from(ALPHABET[i])).collect();
        let slot = usize::from(crc16(s.as_bytes()) % SLOTS);
        if tags[slot].is_none() {
            tags[slot] = Some(s.into());
            missing -= 1;
        }
        // Next string: count in base 36, one digit longer after the last of a length.
        let mut i = word.len();
        loop {
            if i == 0 {
                word.insert(0, 0);
                break;
            }
            i -= 1;
            word[i] += 1;
            if word[i] < ALPHABET.len() {
                break;
            }
            word[i] = 0;
        }
    }
    tags.into_iter().map(|t| t.expect("filled")).collect()
});

/// The shortest hash tag whose slot is `slot` (a tag of a node's own slot carries its probe).
pub(crate) fn tag_of_slot(slot: u16) -> &'static str {
    &TAGS[usize::from(slot % SLOTS)]
}

/// How topics map to partitions and partitions to slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Partitions {
    /// Partition `i`'s slot, in the middle of the `i`-th of `count` equal shares.
    slots: Box<[u16]>,
}

impl Partitions {
    /// `count` partitions (1 ..= 16384).
    pub(crate) fn new(count: u16) -> Result<Self, String> {
        if count == 0 || count > SLOTS {
            return Err(format!(
                "the partition count must be between 1 and {SLOTS}, not {count}"
            ));
        }
        let n = u32::from(count);
        let slots = (0..n)
            .map(|i| ((2 * i + 1) * u32::from(SLOTS) / (2 * n)) as u16)
            .collect();
        Ok(Self { slots })
    }

    pub(crate) fn count(&self) -> u16 {
        self.slots.len() as u16
    }

    /// The partition of `topic`: FNV-1a of its name, modulo the count.
    pub(crate) fn of(&self, topic: &str) -> u16 {
        (fnv1a(topic.as_bytes()) % self.slots.len() as u64) as u16
    }

    /// The slot of partition `p`'s channels and keys.
    pub(crate) fn slot(&self, p: u16) -> u16 {
        self.slots[usize::from(p)]
    }

    /// The hash tag of partition `p`, without its braces.
    pub(crate) fn tag(&self, p: u16) -> &'static str {
        tag_of_slot(self.slot(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_redis_clusters() {
        // The check value of CRC-16/XMODEM, and slots Redis's documentation gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
    }

    #[test]
    fn only_the_first_non_empty_braces_are_the_hash_tag() {
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{user1000}.followers"), slot(b"user1000"));
        // Empty braces: the whole name is hashed.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        // Only the first `{` opens a tag, up to the next `}`.
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        // No closing brace: the whole name.
        assert_eq!(slot(b"foo{bar"), crc16(b"foo{bar") % SLOTS);
    }

    #[test]
    fn every_slot_has_a_short_tag_that_lands_in_it() {
        for s in 0..SLOTS {
            let tag = tag_of_slot(s);
            assert!(tag.len() <= 4, "{s}: {tag}");
            assert_eq!(slot(format!("{{{tag}}}anything").as_bytes()), s);
        }
    }

    #[test]
    fn partitions_spread_evenly_over_the_slots() {
        for count in [1u16, 3, 128, 1000, SLOTS] {
            let p = Partitions::new(count).unwrap();
            let share = f64::from(SLOTS) / f64::from(count);
            for i in 0..count {
                let slot = p.slot(i);
                // In the i-th share of the slots, and its tag lands there.
                assert!(f64::from(slot) >= f64::from(i) * share, "{count} {i}");
                assert!(f64::from(slot) < f64::from(i + 1) * share, "{count} {i}");
                assert_eq!(crate::broker::slots::slot(p.tag(i).as_bytes()), slot);
            }
        }
        // Three nodes with Redis's even split each get a third of 128 partitions.
        let p = Partitions::new(128).unwrap();
        let on = |lo: u16, hi: u16| (0..128).filter(|&i| (lo..=hi).contains(&p.slot(i))).count();
        assert_eq!(
            [on(0, 5460), on(5461, 10922), on(10923, 16383)],
            [43, 42, 43]
        );
    }

    #[test]
    fn partitions_and_tags_never_change() {
        // Instances of every version must agree on these: they name the channels and keys.
        // (Checked against an independent implementation of the same definitions.)
        let p = Partitions::new(128).unwrap();
        assert_eq!((p.slot(0), p.tag(0)), (64, "5n3"));
        assert_eq!((p.slot(127), p.tag(127)), (16320, "45c"));
        assert_eq!(p.of("chat"), 11);
        assert_eq!(p.of(""), 37);
        let topics = ["general", "room:1", "room:2", "dashboard"];
        assert_eq!(topics.map(|t| p.of(t)), [11, 99, 22, 27]);
    }

    #[test]
    fn topics_spread_over_the_partitions() {
        let p = Partitions::new(128).unwrap();
        let mut seen = [0u32; 128];
        for i in 0..12_800 {
            seen[usize::from(p.of(&format!("room:{i}")))] += 1;
        }
        let (min, max) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*min > 50 && *max < 150, "{min}..{max}");
    }

    #[test]
    fn a_partition_count_out_of_range_is_refused() {
        assert!(Partitions::new(0).is_err());
        assert!(Partitions::new(SLOTS).is_ok());
        let e = Partitions::new(SLOTS + 1).unwrap_err();
        assert!(e.contains("between 1 and 16384"), "{e}");
    }
}
