//! Open-loop pacing and the table that matches replies to requests.
//!
//! [`Pacer`] is a token schedule: request k of a thread is due at
//! `start + k / rate`, whatever the server does (open loop). A thread
//! behind its schedule sends what is due at once, so the offered rate holds
//! as long as the generator can keep up; the report says when it could not.
//!
//! [`MatchTable`] is a fixed ring of slots, one per request in flight. A
//! request's transmit timestamp is its ID: the current NTP time with the
//! low bits replaced by the slot index, so a reply's origin timestamp finds
//! its slot in O(1) with no allocation. The true send time is kept in the
//! slot (the ID's low bits are not time), and slots are retired in send
//! order, which makes the per-request timeout a sweep of the ring's tail.

/// Request k is due at `start + k / rate`; at most `total` requests.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    start_ns: u64,
    ns_per_req: f64,
    issued: u64,
    total: u64,
}

impl Pacer {
    /// A schedule of `total` requests at `rate` per second from `start_ns`.
    pub fn new(start_ns: u64, rate: f64, total: u64) -> Self {
        Self { start_ns, ns_per_req: 1e9 / rate.max(1e-9), issued: 0, total }
    }

    /// Requests due at `now_ns` and not yet taken.
    pub fn due(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns {
            return 0;
        }
        let elapsed = (now_ns - self.start_ns) as f64;
        let scheduled = ((elapsed / self.ns_per_req) as u64).saturating_add(1).min(self.total);
        scheduled.saturating_sub(self.issued)
    }

    /// Marks `n` requests as sent.
    pub fn take(&mut self, n: u64) {
        self.issued = (self.issued + n).min(self.total);
    }

    /// When the next request is due (`None` once all are taken).
    pub fn next_at(&self) -> Option<u64> {
        (self.issued < self.total).then(|| self.start_ns + (self.issued as f64 * self.ns_per_req) as u64)
    }

    /// Whether every request has been taken.
    pub fn done(&self) -> bool {
        self.issued >= self.total
    }

    /// Requests taken so far.
    pub fn issued(&self) -> u64 {
        self.issued
    }
}

/// The state of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Never used.
    Free,
    /// Sent, waiting for its reply.
    Outstanding,
    /// Answered.
    Answered,
    /// Timed out with no reply (a reply now is late).
    Expired,
}

/// One request in flight.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// The transmit timestamp sent (its ID).
    pub xmt: u64,
    /// A second ID an interleaved reply echoes (the request's receive
    /// field), 0 if none.
    pub alt: u64,
    /// The request's origin field when it asked for interleaved mode: the
    /// T2 of the earlier reply whose transmit time an interleaved reply
    /// carries; 0 if none.
    pub origin: u64,
    /// Send time, ns since the Unix epoch.
    pub sent_ns: u64,
    /// Index of the simulated client (socket) within its thread.
    pub client: u32,
    /// Request kind (see `crate::request::Kind`).
    pub kind: u8,
    /// Whether a reply is expected (counted as loss if none comes).
    pub expects_reply: bool,
    /// The request's UDP payload length (no reply may be longer).
    pub len: u16,
    /// Where it stands.
    pub state: SlotState,
}

const EMPTY: Slot = Slot {
    xmt: 0,
    alt: 0,
    origin: 0,
    sent_ns: 0,
    client: 0,
    kind: 0,
    expects_reply: false,
    len: 0,
    state: SlotState::Free,
};

/// What a reply's origin timestamp matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// An outstanding request (now marked answered); `interleaved` when the
    /// origin was the slot's second ID.
    Match {
        /// The slot index.
        index: usize,
        /// Matched the receive-field ID (RFC 9769 interleaved reply).
        interleaved: bool,
    },
    /// A request already answered.
    Duplicate,
    /// A request that timed out.
    Late,
    /// No request has this ID.
    Unknown,
}

/// A timed-out request, reported by [`MatchTable::sweep`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// Its kind.
    pub kind: u8,
    /// Whether it expected a reply.
    pub expects_reply: bool,
}

/// The fixed-size ring of requests in flight (see the module docs).
#[derive(Debug)]
pub struct MatchTable {
    slots: Box<[Slot]>,
    mask: u64,
    head: u64,
    tail: u64,
    outstanding: u64,
    timeout_ns: u64,
}

impl MatchTable {
    /// A table of at least `min_slots` slots (rounded up to a power of two,
    /// 2^8 to 2^22) with a per-request timeout.
    pub fn new(min_slots: usize, timeout_ns: u64) -> Self {
        let size = min_slots.clamp(1 << 8, 1 << 22).next_power_of_two();
        Self {
            slots: vec![EMPTY; size].into_boxed_slice(),
            mask: size as u64 - 1,
            head: 0,
            tail: 0,
            outstanding: 0,
            timeout_ns,
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no slots (never: at least 256).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Requests still waiting for a reply.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// The bit just above the index bits: clear in transmit IDs, set in
    /// receive-field IDs, so the two never collide.
    fn alt_bit(&self) -> u64 {
        self.mask + 1
    }

    /// Takes the next slot for a request sent at `sent_ns` whose NTP time is
    /// `ntp_now`; returns the slot index, its transmit ID, and a request
    /// pushed out unanswered when the ring was full (counted as timed out).
    /// `alt_time` is the time to encode in the receive-field ID, if any.
    pub fn insert(
        &mut self,
        sent_ns: u64,
        ntp_now: u64,
        alt_time: Option<u64>,
        client: u32,
        kind: u8,
        expects_reply: bool,
    ) -> (usize, u64, u64, Option<Expired>) {
        let mut pushed = None;
        if self.head - self.tail == self.slots.len() as u64 {
            pushed = self.retire_tail();
        }
        let index = (self.head & self.mask) as usize;
        self.head += 1;
        let xmt = (ntp_now & !(self.mask | self.alt_bit())) | index as u64;
        let alt = alt_time.map_or(0, |t| (t & !self.mask) | self.alt_bit() | index as u64);
        self.slots[index] =
            Slot { xmt, alt, origin: 0, sent_ns, client, kind, expects_reply, len: 0, state: SlotState::Outstanding };
        self.outstanding += 1;
        (index, xmt, alt, pushed)
    }

    fn retire_tail(&mut self) -> Option<Expired> {
        let slot = &mut self.slots[(self.tail & self.mask) as usize];
        self.tail += 1;
        if slot.state == SlotState::Outstanding {
            slot.state = SlotState::Expired;
            self.outstanding -= 1;
            Some(Expired { kind: slot.kind, expects_reply: slot.expects_reply })
        } else {
            None
        }
    }

    /// Retires requests older than the timeout at `now_ns`, calling `on`
    /// for each that had no reply; at most `limit` per call.
    pub fn sweep(&mut self, now_ns: u64, limit: usize, mut on: impl FnMut(Expired)) {
        for _ in 0..limit {
            if self.tail == self.head {
                return;
            }
            let slot = &self.slots[(self.tail & self.mask) as usize];
            if slot.state == SlotState::Outstanding && slot.sent_ns.saturating_add(self.timeout_ns) > now_ns {
                return;
            }
            if let Some(e) = self.retire_tail() {
                on(e);
            }
        }
    }

    /// Finds the request a reply's origin timestamp names, and marks it
    /// answered.
    pub fn lookup(&mut self, origin: u64) -> Lookup {
        let index = (origin & self.mask) as usize;
        let slot = &mut self.slots[index];
        let interleaved = slot.alt != 0 && slot.alt == origin;
        if slot.xmt != origin && !interleaved {
            return Lookup::Unknown;
        }
        match slot.state {
            SlotState::Outstanding => {
                slot.state = SlotState::Answered;
                self.outstanding -= 1;
                Lookup::Match { index, interleaved }
            }
            SlotState::Answered => Lookup::Duplicate,
            SlotState::Expired => Lookup::Late,
            SlotState::Free => Lookup::Unknown,
        }
    }

    /// The payload length of the request a reply's origin timestamp names,
    /// answered, outstanding or timed out (still in the ring); `None` when
    /// no request has that ID.
    pub fn request_len(&self, origin: u64) -> Option<usize> {
        let slot = &self.slots[(origin & self.mask) as usize];
        let named = slot.xmt == origin || (slot.alt != 0 && slot.alt == origin);
        (named && slot.state != SlotState::Free).then_some(usize::from(slot.len))
    }

    /// Records the payload length of the request in slot `index`.
    pub fn set_len(&mut self, index: usize, len: usize) {
        self.slots[index].len = u16::try_from(len).unwrap_or(u16::MAX);
    }

    /// Records the origin field of the interleaved request in slot `index`
    /// (see [`Slot::origin`]).
    pub fn set_origin(&mut self, index: usize, origin: u64) {
        self.slots[index].origin = origin;
    }

    /// Takes back a request that was never sent (the kernel refused it).
    pub fn cancel(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if slot.state == SlotState::Outstanding {
            slot.state = SlotState::Free;
            self.outstanding -= 1;
        }
    }

    /// The slot at `index`.
    pub fn slot(&self, index: usize) -> &Slot {
        &self.slots[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_schedule_is_open_loop() {
        let mut p = Pacer::new(1_000, 1000.0, 10); // one per ms
        assert_eq!(p.due(999), 0);
        assert_eq!(p.due(1_000), 1);
        assert_eq!(p.due(1_000 + 2_500_000), 3);
        p.take(3);
        assert_eq!(p.due(1_000 + 2_500_000), 0);
        assert_eq!(p.next_at(), Some(1_000 + 3_000_000));
        // Far behind: everything due at once, capped at the total.
        assert_eq!(p.due(1_000_000_000), 7);
        p.take(7);
        assert!(p.done());
        assert_eq!(p.next_at(), None);
        assert_eq!(p.issued(), 10);
    }

    #[test]
    fn pacer_rate_over_a_second() {
        let p = Pacer::new(0, 123_456.0, u64::MAX);
        let due = p.due(1_000_000_000);
        assert!((123_455..=123_457).contains(&due), "{due}");
    }

    #[test]
    fn match_by_origin() {
        let mut t = MatchTable::new(300, 1_000);
        assert_eq!(t.len(), 512);
        let (i, xmt, alt, pushed) = t.insert(10, 0xAAAA_BBBB_CCCC_DDDD, None, 3, 1, true);
        assert_eq!((pushed, alt), (None, 0));
        assert_eq!(xmt & 511, i as u64);
        assert_eq!(xmt >> 32, 0xAAAA_BBBB);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.lookup(xmt ^ (1 << 40)), Lookup::Unknown);
        t.set_len(i, 68);
        assert_eq!(t.request_len(xmt), Some(68));
        assert_eq!(t.request_len(xmt ^ (1 << 40)), None);
        assert_eq!(t.lookup(xmt), Lookup::Match { index: i, interleaved: false });
        assert_eq!(t.slot(i).client, 3);
        assert_eq!(t.lookup(xmt), Lookup::Duplicate);
        assert_eq!(t.request_len(xmt), Some(68), "known after the answer");
        assert_eq!(t.outstanding(), 0);
        // Interleaved: the receive-field ID differs from the transmit ID
        // even for the same time.
        let (j, x2, a2, _) = t.insert(11, 0x1234_0000_0000_0000, Some(0x1234_0000_0000_0000), 0, 2, true);
        assert_ne!(x2, a2);
        assert_eq!(t.lookup(a2), Lookup::Match { index: j, interleaved: true });
    }

    #[test]
    fn timeouts_and_late_replies() {
        let mut t = MatchTable::new(256, 1_000);
        let (_, a, _, _) = t.insert(0, 1 << 32, None, 0, 0, true);
        let (_, b, _, _) = t.insert(500, 2 << 32, None, 0, 0, false);
        let mut expired = Vec::new();
        t.sweep(999, 100, |e| expired.push(e));
        assert!(expired.is_empty());
        t.sweep(1_000, 100, |e| expired.push(e));
        assert_eq!(expired, [Expired { kind: 0, expects_reply: true }]);
        assert_eq!(t.lookup(a), Lookup::Late);
        assert_eq!(t.lookup(b), Lookup::Match { index: 1, interleaved: false });
        t.sweep(10_000, 100, |e| expired.push(e));
        assert_eq!(expired.len(), 1, "answered requests retire silently");
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn full_ring_pushes_out_the_oldest() {
        let mut t = MatchTable::new(256, u64::MAX / 2);
        let mut pushed = 0;
        for k in 0..1000u64 {
            let (_, _, _, p) = t.insert(k, k << 32, None, 0, 0, true);
            pushed += u64::from(p.is_some());
        }
        assert_eq!(pushed, 1000 - 256);
        assert_eq!(t.outstanding(), 256);
    }
}
