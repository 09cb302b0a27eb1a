//! `--kind fuzz`: random and mutated packets, reproducible from a seed.
//!
//! Each packet is of one [`Fuzz`] class, drawn at random; its bytes come
//! from a SplitMix64 stream seeded with `--seed` (per thread: the seed
//! mixed with the thread number), so a run with the same seed, threads and
//! packet count sends the same packets (only the IDs differ, see below).
//!
//! Every packet of 48 bytes or more carries its ID (the match-table
//! transmit timestamp) in the transmit field, written after the mutations:
//! a server that answers copies it into the reply's origin, and the
//! generator finds the request, and its length, again. The transmit field
//! is the one field a server only copies, so leaving it unfuzzed hides
//! nothing from the server's parser.

use chime_proto::packet::HEADER_LEN;
use chime_proto::rng::SplitMix64;

use crate::request::{VERSION, write_client_header};

/// Extension-field types a server may look at (RFC 8915 NTS fields, the
/// RFC 7822 padding-free "no-op" range and a legacy MAC-looking length).
const EXT_TYPES: [u16; 6] = [0x0104, 0x0204, 0x0304, 0x0404, 0x0000, 0xFFFF];

/// The classes of fuzz packets, each counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fuzz {
    /// Random bytes of a random length from 0 to the largest payload.
    Random = 0,
    /// A valid client request cut to 0 to 47 bytes.
    Truncated = 1,
    /// A valid client request with 1 to 8 random bytes overwritten.
    Mutated = 2,
    /// A client request with version 0, or 5 to 7.
    BadVersion = 3,
    /// A request of mode 0, 1, 2, 4 or 5, with a random body.
    BadMode = 4,
    /// Mode 6 (ntpq) or 7 (ntpdc) with random opcodes and body.
    Control = 5,
    /// A client request followed by extension fields with bad lengths.
    BadExtension = 6,
    /// An NTS-shaped request (Unique Identifier, cookie, authenticator)
    /// of random contents, sometimes mutated further.
    Nts = 7,
    /// A client request followed by random bytes up to a random length.
    Padded = 8,
}

impl Fuzz {
    /// Every class, in counter order.
    pub const ALL: [Self; 9] = [
        Self::Random,
        Self::Truncated,
        Self::Mutated,
        Self::BadVersion,
        Self::BadMode,
        Self::Control,
        Self::BadExtension,
        Self::Nts,
        Self::Padded,
    ];

    /// Stable name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Truncated => "truncated",
            Self::Mutated => "mutated",
            Self::BadVersion => "bad_version",
            Self::BadMode => "bad_mode",
            Self::Control => "mode6_mode7",
            Self::BadExtension => "bad_extension",
            Self::Nts => "nts",
            Self::Padded => "padded",
        }
    }

    /// A class drawn at random.
    pub fn pick(rng: &mut SplitMix64) -> Self {
        Self::ALL[(rng.next_u64() % Self::ALL.len() as u64) as usize]
    }
}

/// A number below `n` (`n` > 0).
fn below(rng: &mut SplitMix64, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn fill(rng: &mut SplitMix64, out: &mut [u8]) {
    for c in out.chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]);
    }
}

/// Overwrites 1 to `most` random bytes of `out` with random values.
fn mutate(rng: &mut SplitMix64, out: &mut [u8], most: usize) {
    if out.is_empty() {
        return;
    }
    for _ in 0..=below(rng, most) {
        let at = below(rng, out.len());
        out[at] = rng.next_u64() as u8;
    }
}

/// Appends an extension field of type `kind` with `body` bytes of random
/// contents at `at`, its length field `declared`; returns the new end
/// (within `out`).
fn push_field(rng: &mut SplitMix64, out: &mut [u8], at: usize, kind: u16, declared: u16, body: usize) -> usize {
    let end = (at + 4 + body).min(out.len());
    if at + 4 > end {
        return at;
    }
    out[at..at + 2].copy_from_slice(&kind.to_be_bytes());
    out[at + 2..at + 4].copy_from_slice(&declared.to_be_bytes());
    fill(rng, &mut out[at + 4..end]);
    end
}

/// Writes a fuzz packet of class `class` carrying `xmt` (where it is 48
/// bytes or longer) into `out`, at most `max_len` bytes (and at most
/// `out.len()`); returns its length.
pub fn write_fuzz(out: &mut [u8], class: Fuzz, xmt: u64, max_len: usize, rng: &mut SplitMix64) -> usize {
    let max = max_len.min(out.len());
    if max < HEADER_LEN {
        // No room for a header: random bytes only.
        let len = below(rng, max + 1);
        fill(rng, &mut out[..len]);
        return len;
    }
    let len = match class {
        Fuzz::Random => {
            let len = below(rng, max + 1);
            fill(rng, &mut out[..len]);
            len
        }
        Fuzz::Truncated => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            below(rng, HEADER_LEN)
        }
        Fuzz::Mutated => {
            write_client_header(out, VERSION, 3, rng.next_u64(), rng.next_u64(), xmt);
            mutate(rng, &mut out[..HEADER_LEN], 8);
            HEADER_LEN
        }
        Fuzz::BadVersion => {
            let version = [0u8, 5, 6, 7][below(rng, 4)];
            write_client_header(out, version, 3, 0, 0, xmt);
            HEADER_LEN
        }
        Fuzz::BadMode => {
            let mode = [0u8, 1, 2, 4, 5][below(rng, 5)];
            fill(rng, &mut out[..HEADER_LEN]);
            out[0] = (out[0] & 0xC0) | (VERSION << 3) | mode;
            HEADER_LEN
        }
        Fuzz::Control => {
            let len = below(rng, max + 1);
            fill(rng, &mut out[..len]);
            if len > 0 {
                out[0] = (out[0] & 0xF8) | [6u8, 7][below(rng, 2)];
            }
            len
        }
        Fuzz::BadExtension => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            let mut at = HEADER_LEN;
            for _ in 0..=below(rng, 3) {
                let body = below(rng, 96);
                let declared = match below(rng, 6) {
                    0 => 0,
                    1 => 1 + below(rng, 15) as u16,
                    2 => (body + 4 + 1 + below(rng, 64)) as u16,
                    3 => 0xFFFF,
                    4 => (body + 4) as u16 | 1,
                    _ => rng.next_u64() as u16,
                };
                let kind = EXT_TYPES[below(rng, EXT_TYPES.len())];
                at = push_field(rng, &mut out[..max], at, kind, declared, body);
            }
            at
        }
        Fuzz::Nts => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            let cookie = 4 * (16 + below(rng, 16));
            let mut at = push_field(rng, &mut out[..max], HEADER_LEN, 0x0104, 36, 32);
            at = push_field(rng, &mut out[..max], at, 0x0204, (4 + cookie) as u16, cookie);
            if below(rng, 4) == 0 {
                // A cookie placeholder too.
                at = push_field(rng, &mut out[..max], at, 0x0304, (4 + cookie) as u16, cookie);
            }
            let auth = at;
            at = push_field(rng, &mut out[..max], at, 0x0404, 40, 36);
            if at == auth + 40 {
                out[auth + 4..auth + 8].copy_from_slice(&[0, 16, 0, 16]);
            }
            if below(rng, 2) == 0 {
                mutate(rng, &mut out[..at], 4);
            }
            at
        }
        Fuzz::Padded => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            let len = HEADER_LEN + below(rng, max - HEADER_LEN + 1);
            fill(rng, &mut out[HEADER_LEN..len]);
            len
        }
    };
    if len >= HEADER_LEN {
        out[40..48].copy_from_slice(&xmt.to_be_bytes());
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_stay_in_bounds_carry_their_id_and_repeat_with_the_seed() {
        let run = |seed: u64| {
            let mut rng = SplitMix64::new(seed);
            let mut out = Vec::new();
            let mut seen = [0u32; Fuzz::ALL.len()];
            for k in 0..5000u64 {
                let mut b = [0u8; 1600];
                let class = Fuzz::pick(&mut rng);
                seen[class as usize] += 1;
                let max = [1472, 1452, 60, 40][(k % 4) as usize];
                let n = write_fuzz(&mut b, class, 0xABCD_0000 + k, max, &mut rng);
                assert!(n <= max, "{class:?} {n} > {max}");
                if n >= 48 {
                    assert_eq!(u64::from_be_bytes(b[40..48].try_into().unwrap()), 0xABCD_0000 + k);
                }
                match class {
                    Fuzz::Truncated => assert!(n < 48),
                    Fuzz::BadVersion if max >= 48 => assert!(!(1..=4).contains(&(b[0] >> 3 & 7))),
                    Fuzz::BadMode if max >= 48 => assert!(![3, 6, 7].contains(&(b[0] & 7))),
                    Fuzz::Control if n > 0 && max >= 48 => assert!([6, 7].contains(&(b[0] & 7))),
                    _ => {}
                }
                out.push(b[..n].to_vec());
            }
            assert!(seen.iter().all(|&s| s > 300), "{seen:?}");
            out
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same packets");
        assert_ne!(a, run(8));
        let lens: std::collections::BTreeSet<usize> = a.iter().map(Vec::len).collect();
        assert!(lens.contains(&0) && lens.iter().any(|&l| l > 1000), "lengths from 0 up");
    }
}
