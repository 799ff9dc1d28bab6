//! Giving a collection's memory back once it has emptied out.
//!
//! The maps the runtime keeps for the life of a service (topics and connections per shard, the
//! Redis subscriptions) grow to their peak and would keep that capacity after it: a server that
//! once held 100 000 connections would hold their tables until it restarts, and a single live
//! table keeps the allocator from returning the pages around it. So each is shrunk, after a
//! removal, once it uses less than a quarter of its capacity, and then only to twice its
//! length: a collection that hovers around one size never reallocates back and forth, and the
//! copying stays amortized O(1) per removal. An empty one gives back all of it, however small:
//! the small table it would keep was allocated during the load, and one such block keeps a whole
//! allocator page resident after the load (docs/performance-notes.md#what-a-load-leaves-behind).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};

/// Up to this capacity a collection that is not empty is left as it is.
const SMALL: usize = 8;

fn sparse(len: usize, capacity: usize) -> bool {
    (len == 0 && capacity > 0) || (capacity > SMALL && len.saturating_mul(4) < capacity)
}

pub(crate) trait ShrinkWhenSparse {
    /// Shrinks to twice the length when under a quarter of the capacity is used, and frees the
    /// storage of an empty collection.
    fn shrink_when_sparse(&mut self);
}

impl<K: Eq + Hash, V, S: BuildHasher> ShrinkWhenSparse for HashMap<K, V, S> {
    fn shrink_when_sparse(&mut self) {
        if sparse(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<K: Eq + Hash, S: BuildHasher> ShrinkWhenSparse for HashSet<K, S> {
    fn shrink_when_sparse(&mut self) {
        if sparse(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<T> ShrinkWhenSparse for Vec<T> {
    fn shrink_when_sparse(&mut self) {
        if sparse(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<A: smallvec::Array> ShrinkWhenSparse for smallvec::SmallVec<A> {
    fn shrink_when_sparse(&mut self) {
        if !self.spilled() || !sparse(self.len(), self.capacity()) {
            return;
        }
        if self.len() <= self.inline_size() {
            // Back into the inline slots: no heap storage at all.
            self.shrink_to_fit();
        } else {
            self.grow(self.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinks_only_when_sparse_and_keeps_room_to_grow() {
        let mut v: Vec<u32> = (0..1000).collect();
        v.truncate(300);
        v.shrink_when_sparse();
        assert!(v.capacity() >= 1000, "300 of 1000 is not sparse");
        v.truncate(200);
        v.shrink_when_sparse();
        assert!((400..1000).contains(&v.capacity()), "{}", v.capacity());
        v.clear();
        v.shrink_when_sparse();
        assert_eq!(v.capacity(), 0);

        let mut m: HashMap<u32, u32> = (0..1000).map(|i| (i, i)).collect();
        m.retain(|k, _| *k < 10);
        m.shrink_when_sparse();
        assert!(m.capacity() < 100, "{}", m.capacity());
        assert_eq!(m.len(), 10);
        m.clear();
        m.shrink_when_sparse();
        assert_eq!(m.capacity(), 0);

        let mut s: HashSet<u32> = (0..1000).collect();
        s.clear();
        s.shrink_when_sparse();
        assert_eq!(s.capacity(), 0);
    }

    #[test]
    fn a_small_collection_is_kept_until_it_empties() {
        let mut v: Vec<u32> = Vec::with_capacity(8);
        v.push(1);
        v.shrink_when_sparse();
        assert_eq!(v.capacity(), 8, "one of 8 is small enough to keep");
        v.clear();
        v.shrink_when_sparse();
        assert_eq!(v.capacity(), 0);

        let mut m: HashMap<u32, u32> = HashMap::new();
        m.insert(1, 1);
        let small = m.capacity();
        m.shrink_when_sparse();
        assert_eq!(m.capacity(), small);
        m.remove(&1);
        m.shrink_when_sparse();
        assert_eq!(m.capacity(), 0);
    }

    #[test]
    fn a_small_vector_goes_back_inline_once_it_fits() {
        let mut v: smallvec::SmallVec<[u32; 1]> = (0..1000).collect();
        assert!(v.spilled());
        v.truncate(200);
        v.shrink_when_sparse();
        assert!(v.spilled() && (400..1000).contains(&v.capacity()));
        v.truncate(1);
        v.shrink_when_sparse();
        assert!(!v.spilled(), "one fits the inline slot");
        assert_eq!(&v[..], &[0]);
        v.clear();
        v.shrink_when_sparse();
        assert!(!v.spilled());
    }
}
