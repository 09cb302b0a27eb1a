//! Where the NTS path gets its nonces.
//!
//! Every AEAD seal on the request path (each fresh cookie, and the reply's
//! authenticator) needs a nonce. Both AEADs chime uses are misuse-resistant
//! (SIV constructions), so a repeated nonce would only reveal that two
//! identical plaintexts were sealed; still, nonces are drawn from a
//! cryptographically strong generator so that nothing an attacker sees lets
//! it predict the next one. The core stays sans-IO: it never reads the OS's
//! randomness itself; the server implements [`NonceSource`] (or seeds
//! [`AesCtrNonces`] from `getrandom`) and hands it to the
//! [`Responder`](crate::Responder).
//!
//! The [`Responder`](crate::Responder)'s own SplitMix64 is *not* used here:
//! it is a statistical coin for KoD decisions, and its output is predictable
//! from a few samples.

use core::fmt;

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

/// A source of unpredictable bytes for AEAD nonces.
pub trait NonceSource: fmt::Debug + Send {
    /// Fills `out` with fresh random bytes.
    fn fill(&mut self, out: &mut [u8]);
}

/// Blocks generated per refill of [`AesCtrNonces`] (AES-NI pipelines 8).
const BATCH_BLOCKS: usize = 8;
const BATCH_BYTES: usize = BATCH_BLOCKS * 16;

/// AES-128 in counter mode over a 128-bit counter, keyed by a 32-byte seed
/// from the OS (the first 16 bytes are the key, the last 16 the initial
/// counter). The output is indistinguishable from random for anyone who
/// does not know the seed, for far more than 2^64 blocks; the server should
/// still reseed each worker from time to time (say, at every key rotation),
/// so that a worker's memory, if it leaks, exposes no future nonces for long.
///
/// It is deterministic for a given seed, which is what tests and benchmarks
/// use.
pub struct AesCtrNonces {
    cipher: Aes128,
    counter: u128,
    buf: [u8; BATCH_BYTES],
    pos: usize,
}

impl AesCtrNonces {
    /// A generator from a 32-byte seed, which must be secret and random in
    /// production.
    pub fn new(seed: &[u8; 32]) -> Self {
        let cipher = Aes128::new(GenericArray::from_slice(&seed[..16]));
        let mut counter_bytes = [0u8; 16];
        counter_bytes.copy_from_slice(&seed[16..]);
        Self { cipher, counter: u128::from_be_bytes(counter_bytes), buf: [0; BATCH_BYTES], pos: BATCH_BYTES }
    }

    fn refill(&mut self) {
        let mut blocks = [GenericArray::from([0u8; 16]); BATCH_BLOCKS];
        for block in &mut blocks {
            block.copy_from_slice(&self.counter.to_be_bytes());
            self.counter = self.counter.wrapping_add(1);
        }
        self.cipher.encrypt_blocks(&mut blocks);
        for (chunk, block) in self.buf.chunks_exact_mut(16).zip(&blocks) {
            chunk.copy_from_slice(block);
        }
        self.pos = 0;
    }
}

impl NonceSource for AesCtrNonces {
    fn fill(&mut self, mut out: &mut [u8]) {
        while !out.is_empty() {
            if self.pos == BATCH_BYTES {
                self.refill();
            }
            let n = out.len().min(BATCH_BYTES - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            // Used bytes are wiped so the buffer never holds past output.
            self.buf[self.pos..self.pos + n].fill(0);
            self.pos += n;
            out = &mut out[n..];
        }
    }
}

impl fmt::Debug for AesCtrNonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AesCtrNonces").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_never_repeating() {
        let mut a = AesCtrNonces::new(&[7; 32]);
        let mut b = AesCtrNonces::new(&[7; 32]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (mut x, mut y) = ([0u8; 16], [0u8; 16]);
            a.fill(&mut x);
            b.fill(&mut y);
            assert_eq!(x, y);
            assert!(seen.insert(x));
        }
        let mut c = AesCtrNonces::new(&[8; 32]);
        let mut z = [0u8; 16];
        c.fill(&mut z);
        assert!(!seen.contains(&z));
    }

    #[test]
    fn odd_lengths_span_refills() {
        let mut a = AesCtrNonces::new(&[1; 32]);
        let mut long = [0u8; 300];
        a.fill(&mut long);
        let mut b = AesCtrNonces::new(&[1; 32]);
        let mut pieces = [0u8; 300];
        for chunk in pieces.chunks_mut(12) {
            b.fill(chunk);
        }
        assert_eq!(long, pieces);
    }
}
