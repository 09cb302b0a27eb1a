//! `AEAD_AES_SIV_CMAC_256` (RFC 5297) on the `aes` crate's block cipher,
//! built for the NTS request path.
//!
//! Against RustCrypto's `aes-siv`, which it replaces on the hot path (and is
//! checked against in the tests), it differs only in cost:
//!
//! - the key schedules are computed once and used by reference: the CTR
//!   cipher is not re-expanded per message, and `CMAC(0^128)`, the first
//!   step of every S2V, is computed with the subkeys;
//! - S2V (every CMAC of every component) runs in one call into the cipher's
//!   backend, so with AES-NI the whole serial chain is inlined code with
//!   the round keys in registers, not a dispatch per block;
//! - CTR runs eight blocks at a time (AES-NI pipelines them);
//! - a one-shot form ([`seal_once`], [`open_once`]) for keys used for a
//!   single message (the session keys out of a cookie) expands the CTR key
//!   only when there is something to encrypt: an NTS request's
//!   authenticator usually has an empty plaintext.
//!
//! Only the forward cipher is ever used, so only encryption schedules
//! exist (`Aes128Enc`). The `aes` crate picks AES-NI at run time
//! (`cpufeatures`) and falls back to its constant-time bitsliced software.

use aes::Aes128Enc;
use aes::cipher::consts::U16;
use aes::cipher::{BlockBackend, BlockClosure, BlockEncrypt, BlockSizeUser, KeyInit};

/// One AES block.
pub(crate) type Block = [u8; 16];

/// Length of an `AEAD_AES_SIV_CMAC_256` key: MAC key, then CTR key.
pub(crate) const KEY_LEN: usize = 32;

/// Keystream blocks generated per call into the cipher (AES-NI's
/// pipeline depth in the `aes` crate).
const CTR_BATCH: usize = 8;

/// `dbl` of RFC 5297: multiplication by x in GF(2^128), big-endian,
/// without a data-dependent branch.
#[inline(always)]
fn dbl(b: Block) -> Block {
    let x = u128::from_be_bytes(b);
    ((x << 1) ^ (0x87 & 0u128.wrapping_sub(x >> 127))).to_be_bytes()
}

#[inline(always)]
fn xor(a: Block, b: Block) -> Block {
    (u128::from_ne_bytes(a) ^ u128::from_ne_bytes(b)).to_ne_bytes()
}

/// Constant-time equality of two tags.
#[inline]
pub(crate) fn tags_equal(a: &Block, b: &Block) -> bool {
    core::hint::black_box(u128::from_ne_bytes(*a) ^ u128::from_ne_bytes(*b)) == 0
}

#[inline(always)]
fn encrypt<B: BlockBackend<BlockSize = U16>>(backend: &mut B, block: Block) -> Block {
    let mut b = aes::Block::from(block);
    backend.proc_block((&mut b).into());
    b.into()
}

/// CMAC (RFC 4493) of `msg`, whose last 16 bytes are first XORed with
/// `xor_end` (S2V's `xorend`; all zero for a plain CMAC).
#[inline(always)]
fn cmac<B: BlockBackend<BlockSize = U16>>(backend: &mut B, k1: Block, k2: Block, msg: &[u8], xor_end: &Block) -> Block {
    let n = msg.len();
    // Where `xor_end` applies (only meaningful when n >= 16).
    let xe_at = n.saturating_sub(16);
    let mut x = [0u8; 16];
    let mut at = 0;
    // Every block but the last (which may be partial or complete).
    while n - at > 16 {
        let mut m: Block = msg[at..at + 16].try_into().unwrap_or_default();
        if at + 16 > xe_at {
            for (i, b) in m.iter_mut().enumerate().skip(xe_at.saturating_sub(at)) {
                *b ^= xor_end[at + i - xe_at];
            }
        }
        x = encrypt(backend, xor(x, m));
        at += 16;
    }
    let tail = &msg[at..];
    let mut m = [0u8; 16];
    m[..tail.len()].copy_from_slice(tail);
    if n >= 16 {
        for (i, b) in m.iter_mut().enumerate().take(tail.len()).skip(xe_at.saturating_sub(at)) {
            *b ^= xor_end[at + i - xe_at];
        }
    }
    let last = if tail.len() == 16 {
        xor(m, k1)
    } else {
        m[tail.len()] = 0x80;
        xor(m, k2)
    };
    encrypt(backend, xor(x, last))
}

/// The MAC half of a key: the cipher, the CMAC subkeys, and `CMAC(0^128)`.
#[derive(Clone)]
pub(crate) struct S2vKey {
    cipher: Aes128Enc,
    k1: Block,
    k2: Block,
    d0: Block,
}

/// Derives the subkeys and `CMAC(0^128)` inside the backend.
struct Subkeys<'a>(&'a mut [Block; 3]);

impl BlockSizeUser for Subkeys<'_> {
    type BlockSize = U16;
}

impl BlockClosure for Subkeys<'_> {
    #[inline(always)]
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let l = encrypt(backend, [0; 16]);
        let k1 = dbl(l);
        let k2 = dbl(k1);
        // CMAC of one complete zero block: E(0 ^ K1).
        let d0 = encrypt(backend, k1);
        *self.0 = [k1, k2, d0];
    }
}

/// S2V over `headers` and `msg`, inside the backend.
struct S2v<'a> {
    key: &'a S2vKey,
    headers: &'a [&'a [u8]],
    msg: &'a [u8],
    out: &'a mut Block,
}

impl BlockSizeUser for S2v<'_> {
    type BlockSize = U16;
}

impl BlockClosure for S2v<'_> {
    #[inline(always)]
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let (k1, k2) = (self.key.k1, self.key.k2);
        let mut d = self.key.d0;
        for h in self.headers {
            d = xor(dbl(d), cmac(backend, k1, k2, h, &[0; 16]));
        }
        *self.out = if self.msg.len() >= 16 {
            cmac(backend, k1, k2, self.msg, &d)
        } else {
            let mut t = [0u8; 16];
            t[..self.msg.len()].copy_from_slice(self.msg);
            t[self.msg.len()] = 0x80;
            cmac(backend, k1, k2, &xor(dbl(d), t), &[0; 16])
        };
    }
}

impl S2vKey {
    // Inlined so that the schedule is built in the caller's frame rather
    // than built and then copied out (it is ~700 bytes: the `aes` crate's
    // runtime-dispatched type holds room for the software fallback).
    #[inline(always)]
    pub(crate) fn new(key: &[u8; 16]) -> Self {
        let cipher = Aes128Enc::new(key.into());
        let mut sub = [[0u8; 16]; 3];
        cipher.encrypt_with_backend(Subkeys(&mut sub));
        let [k1, k2, d0] = sub;
        Self { cipher, k1, k2, d0 }
    }

    /// S2V (RFC 5297 section 2.4) of the headers and the message.
    pub(crate) fn s2v(&self, headers: &[&[u8]], msg: &[u8]) -> Block {
        let mut out = [0u8; 16];
        self.cipher.encrypt_with_backend(S2v { key: self, headers, msg, out: &mut out });
        out
    }
}

/// XORs `chunk` (at most `ks.len()` blocks) with the keystream blocks.
#[inline(always)]
pub(crate) fn xor_keystream(chunk: &mut [u8], ks: &[aes::Block]) {
    let mut blocks = chunk.chunks_exact_mut(16);
    let mut k = ks.iter();
    for (c, k) in (&mut blocks).zip(&mut k) {
        let x = u128::from_ne_bytes((&*c).try_into().unwrap_or_default()) ^ u128::from_ne_bytes((*k).into());
        c.copy_from_slice(&x.to_ne_bytes());
    }
    let tail = blocks.into_remainder();
    if let Some(k) = k.next() {
        for (x, y) in tail.iter_mut().zip(k) {
            *x ^= y;
        }
    }
}

/// XORs `buf` with the SIV CTR keystream for the synthetic IV `v`.
fn apply_ctr(cipher: &Aes128Enc, v: &Block, buf: &mut [u8]) {
    let mut iv = *v;
    iv[8] &= 0x7f;
    iv[12] &= 0x7f;
    let mut counter = u128::from_be_bytes(iv);
    let mut ks = [aes::Block::default(); CTR_BATCH];
    for chunk in buf.chunks_mut(16 * CTR_BATCH) {
        let blocks = chunk.len().div_ceil(16);
        for b in &mut ks[..blocks] {
            b.copy_from_slice(&counter.to_be_bytes());
            counter = counter.wrapping_add(1);
        }
        cipher.encrypt_blocks(&mut ks[..blocks]);
        xor_keystream(chunk, &ks);
    }
}

/// An `AEAD_AES_SIV_CMAC_256` key with both schedules computed.
#[derive(Clone)]
pub(crate) struct SivKey {
    mac: S2vKey,
    ctr: Aes128Enc,
}

impl SivKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        let (mac, ctr) = split_key(key);
        Self { mac: S2vKey::new(mac), ctr: Aes128Enc::new(ctr.into()) }
    }

    /// Encrypts `buf` in place; returns the synthetic IV (the tag).
    pub(crate) fn seal(&self, headers: &[&[u8]], buf: &mut [u8]) -> Block {
        let v = self.mac.s2v(headers, buf);
        apply_ctr(&self.ctr, &v, buf);
        v
    }

    /// Decrypts `buf` in place and checks the tag; on failure `buf` is left
    /// encrypted.
    pub(crate) fn open(&self, headers: &[&[u8]], buf: &mut [u8], tag: &Block) -> bool {
        apply_ctr(&self.ctr, tag, buf);
        let ok = tags_equal(&self.mac.s2v(headers, buf), tag);
        if !ok {
            apply_ctr(&self.ctr, tag, buf);
        }
        ok
    }
}

fn split_key(key: &[u8; KEY_LEN]) -> (&[u8; 16], &[u8; 16]) {
    let (mac, ctr) = key.split_at(16);
    (mac.try_into().unwrap_or(&[0; 16]), ctr.try_into().unwrap_or(&[0; 16]))
}

/// [`SivKey::seal`] for a key used once: the CTR schedule is expanded only
/// if `buf` is not empty.
pub(crate) fn seal_once(key: &[u8; KEY_LEN], headers: &[&[u8]], buf: &mut [u8]) -> Block {
    let (mac, ctr) = split_key(key);
    let v = S2vKey::new(mac).s2v(headers, buf);
    if !buf.is_empty() {
        apply_ctr(&Aes128Enc::new(ctr.into()), &v, buf);
    }
    v
}

/// [`SivKey::open`] for a key used once.
pub(crate) fn open_once(key: &[u8; KEY_LEN], headers: &[&[u8]], buf: &mut [u8], tag: &Block) -> bool {
    let (mac, ctr) = split_key(key);
    if buf.is_empty() {
        return tags_equal(&S2vKey::new(mac).s2v(headers, buf), tag);
    }
    let ctr = Aes128Enc::new(ctr.into());
    apply_ctr(&ctr, tag, buf);
    let ok = tags_equal(&S2vKey::new(mac).s2v(headers, buf), tag);
    if !ok {
        apply_ctr(&ctr, tag, buf);
    }
    ok
}
