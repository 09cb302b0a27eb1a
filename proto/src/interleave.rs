//! Server side of the NTP interleaved client/server mode (RFC 9769).
//!
//! A reply's precise transmit time (T3', from the NIC or the kernel after the
//! datagram left) is known only after it was sent. A client in interleaved
//! mode asks for it in its next request: it puts the receive timestamp of
//! our last reply to it (T2) in the request's origin field, and its own
//! receive time of that reply in the receive field. The server then answers
//! with origin = the request's receive field, receive = this request's T2,
//! and transmit = T3' of the reply that carried the T2 named in the origin.
//!
//! [`TxTable`] is the map T2 → T3' a [`Responder`](crate::Responder) keeps:
//! fixed size, set-associative (buckets of [`WAYS`] entries, each bucket
//! replacing its oldest entry first), allocated once and never resized, so
//! the memory is bounded by configuration and nothing allocates per packet.
//! A reply's entry is written when the reply is built (with the transmit
//! time written into it, the best known so far) and improved when the
//! precise stamp arrives ([`TxTable::improve`]).

/// Entries per bucket.
pub const WAYS: usize = 4;

/// Bytes one entry takes (key and value).
pub const ENTRY_BYTES: usize = 16;

/// What happened to an insertion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// Into a free slot (or over the same key).
    Fresh,
    /// Over the oldest entry of a full bucket.
    Evicted,
}

/// Fixed-size map from receive timestamps sent (T2, 64 wire bits) to the
/// transmit timestamps of the replies that carried them (64 wire bits).
/// Key 0 means "empty": a zero T2 is never stored.
#[derive(Clone, Debug)]
pub struct TxTable {
    keys: Box<[u64]>,
    values: Box<[u64]>,
    /// Per bucket, the way the next insertion replaces when the bucket is full.
    next: Box<[u8]>,
    mask: usize,
    occupied: usize,
}

impl TxTable {
    /// A table of at least `capacity` entries (rounded up to a power of two
    /// of at least [`WAYS`]); `None` for 0 (interleaved mode off).
    pub fn new(capacity: usize) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        let entries = capacity.max(WAYS).checked_next_power_of_two()?;
        let buckets = entries / WAYS;
        Some(Self {
            keys: vec![0; entries].into_boxed_slice(),
            values: vec![0; entries].into_boxed_slice(),
            next: vec![0; buckets].into_boxed_slice(),
            mask: buckets - 1,
            occupied: 0,
        })
    }

    /// Entries available.
    pub fn capacity(&self) -> usize {
        self.keys.len()
    }

    /// Entries in use.
    pub fn occupied(&self) -> usize {
        self.occupied
    }

    /// Bytes of the table's storage.
    pub fn memory_bytes(&self) -> usize {
        self.keys.len() * ENTRY_BYTES + self.next.len()
    }

    fn bucket(&self, key: u64) -> usize {
        // Fibonacci hashing of both halves: the low (fraction) bits of a
        // timestamp vary most, the seconds change slowly.
        let h = (key ^ (key >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) as usize & self.mask) * WAYS
    }

    /// The transmit timestamp stored for `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        if key == 0 {
            return None;
        }
        let b = self.bucket(key);
        (b..b + WAYS).find(|&i| self.keys[i] == key).map(|i| self.values[i])
    }

    /// Whether `key` is stored.
    pub fn contains(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// Stores `key → value`, replacing the value of an existing `key`, else
    /// taking a free way, else the bucket's oldest. `None` for key 0.
    pub fn insert(&mut self, key: u64, value: u64) -> Option<Insert> {
        if key == 0 {
            return None;
        }
        let b = self.bucket(key);
        if let Some(i) = (b..b + WAYS).find(|&i| self.keys[i] == key) {
            self.values[i] = value;
            return Some(Insert::Fresh);
        }
        let cursor = &mut self.next[b / WAYS];
        let i = b + usize::from(*cursor);
        *cursor = ((usize::from(*cursor) + 1) % WAYS) as u8;
        let evicted = self.keys[i] != 0;
        if !evicted {
            self.occupied += 1;
        }
        self.keys[i] = key;
        self.values[i] = value;
        Some(if evicted { Insert::Evicted } else { Insert::Fresh })
    }

    /// Replaces the value of an existing `key` (a precise transmit stamp for
    /// a reply still remembered); false when `key` is not stored (evicted,
    /// or never sent).
    pub fn improve(&mut self, key: u64, value: u64) -> bool {
        if key == 0 {
            return false;
        }
        let b = self.bucket(key);
        match (b..b + WAYS).find(|&i| self.keys[i] == key) {
            Some(i) => {
                self.values[i] = value;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_capacity_is_off_and_sizes_round_up() {
        assert!(TxTable::new(0).is_none());
        assert_eq!(TxTable::new(1).unwrap().capacity(), 4);
        assert_eq!(TxTable::new(1000).unwrap().capacity(), 1024);
        assert_eq!(TxTable::new(1024).unwrap().memory_bytes(), 1024 * 16 + 256);
    }

    #[test]
    fn insert_get_improve() {
        let mut t = TxTable::new(64).unwrap();
        assert_eq!(t.insert(0, 5), None, "zero is never stored");
        assert_eq!(t.insert(7, 70), Some(Insert::Fresh));
        assert_eq!(t.get(7), Some(70));
        assert!(t.improve(7, 71));
        assert_eq!(t.get(7), Some(71));
        assert!(!t.improve(8, 1));
        assert_eq!(t.get(8), None);
        assert_eq!(t.occupied(), 1);
    }

    #[test]
    fn bounded_with_oldest_first_eviction() {
        let mut t = TxTable::new(256).unwrap();
        let mut evictions = 0;
        for k in 1..=10_000u64 {
            let key = k.wrapping_mul(0x1234_5678_9abc_def1) | 1;
            if t.insert(key, k) == Some(Insert::Evicted) {
                evictions += 1;
            }
        }
        assert_eq!(t.occupied(), 256);
        assert_eq!(evictions, 10_000 - 256);
        // The most recent entries of each bucket survive: the last 64 keys
        // inserted are very likely all there (at most 4 per bucket of 64).
        let recent = (9_990..=10_000u64).filter(|k| t.get(k.wrapping_mul(0x1234_5678_9abc_def1) | 1) == Some(*k));
        assert!(recent.count() >= 9);
    }
}
