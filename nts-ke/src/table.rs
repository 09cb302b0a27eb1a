//! The open connections: a bounded table that makes room for a newcomer by
//! evicting, never by refusing.
//!
//! Tokens are handed out in increasing order, so the oldest connection is
//! the one with the smallest token. When the table is full, the oldest
//! connection goes; when a source (IPv4 address, IPv6 /64) holds its cap
//! already, its own oldest goes. A well-behaved client finishes in a few
//! round trips, so the connections old enough to be evicted are the ones
//! idling or dragging a handshake out: thousands of idle connections cannot
//! lock a new client out, they only shorten each other's lives.

use std::collections::{BTreeMap, HashMap, VecDeque};

use mio::Token;

/// Connections by token, with each source's tokens in age order.
#[derive(Debug)]
pub(crate) struct ConnTable<V> {
    entries: BTreeMap<Token, (u128, V)>,
    by_source: HashMap<u128, VecDeque<Token>>,
    /// Connections in `by_source`.
    count: usize,
    next: usize,
    max: usize,
    max_per_source: usize,
}

impl<V> ConnTable<V> {
    /// A table for at most `max` connections in all and `max_per_source`
    /// from one source (both at least 1), with tokens from `first_token`.
    pub(crate) fn new(first_token: usize, max: usize, max_per_source: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            by_source: HashMap::new(),
            count: 0,
            next: first_token,
            max: max.max(1),
            max_per_source: max_per_source.max(1),
        }
    }

    /// Open connections (including one lent out by [`Self::take`]).
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The connection to evict before one from `source` can be added:
    /// that source's oldest when it is at its cap, else the oldest of all
    /// when the table is full, else none.
    pub(crate) fn victim(&self, source: u128) -> Option<Token> {
        if let Some(own) = self.by_source.get(&source)
            && own.len() >= self.max_per_source
        {
            return own.front().copied();
        }
        if self.len() >= self.max { self.oldest() } else { None }
    }

    /// The oldest connection (not counting one lent out).
    pub(crate) fn oldest(&self) -> Option<Token> {
        self.entries.keys().next().copied()
    }

    /// The token the next [`Self::insert`] returns.
    pub(crate) fn next_token(&self) -> Token {
        Token(self.next)
    }

    /// Adds a connection from `source`; the caller evicted
    /// [`Self::victim`] first.
    pub(crate) fn insert(&mut self, source: u128, value: V) -> Token {
        let token = Token(self.next);
        self.next += 1;
        self.entries.insert(token, (source, value));
        self.by_source.entry(source).or_default().push_back(token);
        self.count += 1;
        token
    }

    /// Removes a connection for good (also one lent out by [`Self::take`]).
    pub(crate) fn remove(&mut self, token: Token) -> Option<V> {
        let (source, value) = self.entries.remove(&token)?;
        self.forget(source, token);
        Some(value)
    }

    fn forget(&mut self, source: u128, token: Token) {
        if let Some(q) = self.by_source.get_mut(&source) {
            if let Some(i) = q.iter().position(|t| *t == token) {
                q.remove(i);
                self.count -= 1;
            }
            if q.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }

    /// Lends a connection out (to work on it while the table is borrowed
    /// elsewhere); it stays counted. Give it back with [`Self::restore`].
    pub(crate) fn take(&mut self, token: Token) -> Option<(u128, V)> {
        self.entries.remove(&token)
    }

    /// Gives back what [`Self::take`] lent.
    pub(crate) fn restore(&mut self, token: Token, taken: (u128, V)) {
        self.entries.insert(token, taken);
    }

    /// The tokens whose value matches `pred`.
    pub(crate) fn select(&self, mut pred: impl FnMut(&V) -> bool) -> Vec<Token> {
        self.entries.iter().filter(|(_, (_, v))| pred(v)).map(|(t, _)| *t).collect()
    }

    /// Every token.
    pub(crate) fn tokens(&self) -> Vec<Token> {
        self.entries.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_table_evicts_the_oldest() {
        let mut t = ConnTable::new(2, 3, 10);
        assert_eq!(t.victim(1), None);
        let a = t.insert(1, "a");
        let b = t.insert(2, "b");
        let c = t.insert(3, "c");
        assert_eq!(a, Token(2));
        assert_eq!(t.len(), 3);
        assert_eq!(t.victim(4), Some(a), "full: the oldest of all goes");
        assert_eq!(t.remove(a), Some("a"));
        let d = t.insert(4, "d");
        assert_eq!(t.victim(5), Some(b));
        assert_eq!(t.remove(c), Some("c"));
        assert_eq!(t.victim(5), None, "room again");
        assert_eq!(t.remove(c), None);
        assert_eq!(t.tokens(), [b, d]);
    }

    #[test]
    fn a_source_at_its_cap_evicts_its_own_oldest() {
        let mut t = ConnTable::new(0, 100, 2);
        let a1 = t.insert(7, 1);
        let other = t.insert(8, 2);
        let a2 = t.insert(7, 3);
        assert_eq!(t.victim(7), Some(a1), "source 7 is at its cap");
        assert_eq!(t.victim(8), None, "source 8 is not");
        assert_eq!(t.oldest(), Some(a1));
        t.remove(a1);
        let a3 = t.insert(7, 4);
        assert_eq!(t.victim(7), Some(a2));
        assert_eq!(t.oldest(), Some(other));
        assert_eq!(t.select(|v| *v % 2 == 0), [other, a3]);
    }

    #[test]
    fn a_lent_connection_stays_counted() {
        let mut t = ConnTable::new(0, 2, 2);
        let a = t.insert(1, "a");
        let b = t.insert(1, "b");
        let lent = t.take(a).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.victim(1), Some(a), "still the source's oldest");
        t.restore(a, lent);
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.next_token(), Token(2));
        assert_eq!(t.remove(b), Some("b"));
        assert_eq!(t.len(), 0);
        assert_eq!(t.victim(1), None);
    }

    #[test]
    fn thousands_fit_and_the_newest_survive() {
        // 3000 idle connections from 250 sources through a table of 2048
        // with a cap of 16 a source: the table never overflows and the
        // survivors are the newest.
        let mut t = ConnTable::new(1, 2048, 16);
        let mut evicted = 0;
        for i in 0..3000u128 {
            let src = i % 250;
            if let Some(v) = t.victim(src) {
                t.remove(v).unwrap();
                evicted += 1;
            }
            t.insert(src, i);
            assert!(t.len() <= 2048);
        }
        assert_eq!(evicted, 3000 - 2048);
        assert_eq!(t.oldest(), Some(Token(1 + 3000 - 2048)));
    }
}
