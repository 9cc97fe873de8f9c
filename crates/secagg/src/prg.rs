//! Mask expansion: AES-128-CTR keystream read as little-endian `u32` words (protocol-spec §3.4).
//!
//! Masks are never materialised: the keystream is produced in small L1-sized blocks and added to
//! (or subtracted from) the accumulator right away, and the accumulator is split into chunks that
//! the threads of a rayon pool process independently, each seeking its own counter position. That
//! is what keeps the server's unmasking within a small factor of the raw AES throughput.

use aes::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use rayon::prelude::*;

use crate::kdf::{prg_key, SessionId};
use crate::secret::Seed;

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;

/// Words expanded per keystream block: 4 KiB, comfortably inside L1.
const BLOCK_WORDS: usize = 1024;

/// Words per parallel chunk: 256 KiB of accumulator, inside L2, so one chunk stays hot while every
/// mask of the batch is applied to it.
pub const CHUNK_WORDS: usize = 64 * 1024;

/// Whether a mask is added or subtracted (protocol-spec §3.4, pairwise sign rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// Add the mask.
    Plus,
    /// Subtract the mask.
    Minus,
}

impl Sign {
    /// The opposite sign.
    pub fn flip(self) -> Self {
        match self {
            Sign::Plus => Sign::Minus,
            Sign::Minus => Sign::Plus,
        }
    }

    /// Implements the pairwise sign rule (protocol-spec §3.4): client `me` adds the mask it shares
    /// with `other` when `me < other` and subtracts it otherwise, so the pair's masks cancel.
    pub fn pairwise(me: u32, other: u32) -> Self {
        if me < other {
            Sign::Plus
        } else {
            Sign::Minus
        }
    }
}

/// An expanded-on-demand mask: the AES key derived from a seed, and the sign to apply it with.
#[derive(Clone)]
pub struct MaskKey {
    key: zeroize::Zeroizing<[u8; 16]>,
    sign: Sign,
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskKey")
            .field("key", &"<redacted>")
            .field("sign", &self.sign)
            .finish()
    }
}

impl MaskKey {
    /// Implements the PRG keying (protocol-spec §3.4): the AES key is derived from the full seed.
    pub fn new(seed: &Seed, session: &SessionId, sign: Sign) -> Self {
        MaskKey {
            key: prg_key(seed, session),
            sign,
        }
    }

    /// The same key with the other sign.
    pub fn negated(&self) -> Self {
        MaskKey {
            key: self.key.clone(),
            sign: self.sign.flip(),
        }
    }

    /// Adds (or subtracts) mask words `start .. start + acc.len()` to `acc`, modulo 2^32.
    pub fn apply(&self, acc: &mut [u32], start: u64) {
        let iv = [0u8; 16];
        let mut cipher = Aes128Ctr::new(self.key.as_ref().into(), (&iv).into());
        cipher.seek(start * 4);
        let mut buf = [0u8; BLOCK_WORDS * 4];
        for block in acc.chunks_mut(BLOCK_WORDS) {
            let bytes = &mut buf[..block.len() * 4];
            bytes.fill(0);
            cipher.apply_keystream(bytes);
            let words = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            match self.sign {
                Sign::Plus => block
                    .iter_mut()
                    .zip(words)
                    .for_each(|(a, m)| *a = a.wrapping_add(m)),
                Sign::Minus => block
                    .iter_mut()
                    .zip(words)
                    .for_each(|(a, m)| *a = a.wrapping_sub(m)),
            }
        }
        buf.fill(0);
    }
}

/// Applies every mask to the whole accumulator, in parallel over chunks of [`CHUNK_WORDS`].
pub fn apply_masks(acc: &mut [u32], masks: &[MaskKey]) {
    if masks.is_empty() {
        return;
    }
    acc.par_chunks_mut(CHUNK_WORDS)
        .enumerate()
        .for_each(|(i, chunk)| {
            let start = (i * CHUNK_WORDS) as u64;
            for m in masks {
                m.apply(chunk, start);
            }
        });
}

/// Writes raw AES-128-CTR keystream for `key` into `out` (no accumulation): the primitive whose
/// throughput bounds mask expansion, used by `fedlora limits`.
pub fn keystream_into(key: &[u8; 16], start_byte: u64, out: &mut [u8]) {
    let iv = [0u8; 16];
    let mut cipher = Aes128Ctr::new(key.into(), (&iv).into());
    cipher.seek(start_byte);
    out.fill(0);
    cipher.apply_keystream(out);
}

/// Expands `len` words of one mask into a fresh vector (for tests and test vectors only; the
/// protocol never materialises a mask).
pub fn expand(mask: &MaskKey, len: usize) -> Vec<u32> {
    let mut out = vec![0u32; len];
    MaskKey {
        key: mask.key.clone(),
        sign: Sign::Plus,
    }
    .apply(&mut out, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8, sign: Sign) -> MaskKey {
        MaskKey::new(&Seed::from_bytes([byte; 32]), &SessionId([7; 32]), sign)
    }

    #[test]
    fn seeking_matches_sequential_expansion() {
        let k = key(1, Sign::Plus);
        let whole = expand(&k, 5000);
        for start in [0usize, 1, 3, 4, 1023, 1024, 4095] {
            let mut part = vec![0u32; 700];
            k.apply(&mut part, start as u64);
            assert_eq!(part, whole[start..start + 700]);
        }
    }

    #[test]
    fn parallel_chunks_equal_one_pass() {
        let masks = [key(1, Sign::Plus), key(2, Sign::Minus), key(3, Sign::Plus)];
        let len = CHUNK_WORDS * 2 + 123;
        let mut par = vec![5u32; len];
        apply_masks(&mut par, &masks);
        let mut seq = vec![5u32; len];
        for m in &masks {
            m.apply(&mut seq, 0);
        }
        assert_eq!(par, seq);
    }

    #[test]
    fn opposite_signs_cancel() {
        let k = key(9, Sign::Plus);
        let mut acc: Vec<u32> = (0..3000).collect();
        apply_masks(&mut acc, &[k.clone(), k.negated()]);
        assert_eq!(acc, (0..3000).collect::<Vec<u32>>());
    }

    #[test]
    fn different_sessions_give_different_masks() {
        let seed = Seed::from_bytes([4; 32]);
        let a = expand(&MaskKey::new(&seed, &SessionId([1; 32]), Sign::Plus), 8);
        let b = expand(&MaskKey::new(&seed, &SessionId([2; 32]), Sign::Plus), 8);
        assert_ne!(a, b);
    }
}
