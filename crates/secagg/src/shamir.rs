//! Shamir secret sharing of 32-byte secrets over GF(2^61 − 1) (protocol-spec §3.5).
//!
//! A secret is cut into five chunks (four of 7 bytes and one of 4), each below the prime, and each
//! chunk is shared with its own random polynomial of degree `t − 1`. A share is the five evaluations at
//! the holder's point `x = holder_id + 1`, as little-endian `u64`s: [`SHARE_BYTES`] = 40 bytes.

use fedlora_wire::{ClientId, SHARE_BYTES};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Seed;

/// The Mersenne prime 2^61 − 1.
pub const PRIME: u64 = (1 << 61) - 1;

/// Chunks per 32-byte secret.
pub const CHUNKS: usize = 5;

const CHUNK_LEN: [usize; CHUNKS] = [7, 7, 7, 7, 4];

/// Why shares could not be combined.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShamirError {
    /// Fewer shares than the threshold.
    #[error("need {threshold} shares, got {got}")]
    TooFewShares {
        /// Shares given.
        got: usize,
        /// Shares needed.
        threshold: usize,
    },
    /// Two shares at the same evaluation point.
    #[error("duplicate share from holder {0}")]
    DuplicateHolder(ClientId),
    /// A share's field element is not below the prime.
    #[error("share from holder {0} is not a field element")]
    NotAFieldElement(ClientId),
    /// The reconstructed chunk does not fit its byte length: the shares are inconsistent.
    #[error("shares are inconsistent (reconstructed chunk out of range)")]
    Inconsistent,
    /// The threshold is zero.
    #[error("threshold must be at least 1")]
    ZeroThreshold,
}

/// One share: the holder's id (evaluation point `holder + 1`) and five field elements.
#[derive(Clone, PartialEq, Eq, Zeroize)]
#[zeroize(drop)]
pub struct Share {
    /// Holder's client id.
    pub holder: ClientId,
    /// Polynomial values at `holder + 1`.
    pub values: [u64; CHUNKS],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("holder", &self.holder)
            .field("values", &"<redacted>")
            .finish()
    }
}

impl Share {
    /// Implements the share encoding (protocol-spec §3.5): five little-endian `u64`.
    pub fn to_bytes(&self) -> Zeroizing<[u8; SHARE_BYTES]> {
        let mut out = Zeroizing::new([0u8; SHARE_BYTES]);
        for (i, v) in self.values.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses a share, checking every element is below the prime.
    pub fn from_bytes(holder: ClientId, bytes: &[u8; SHARE_BYTES]) -> Result<Self, ShamirError> {
        let mut values = [0u64; CHUNKS];
        for (i, v) in values.iter_mut().enumerate() {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            *v = u64::from_le_bytes(le);
            if *v >= PRIME {
                return Err(ShamirError::NotAFieldElement(holder));
            }
        }
        Ok(Share { holder, values })
    }
}

fn reduce(x: u128) -> u64 {
    // x < 2^122 here; fold twice using 2^61 ≡ 1.
    let lo = (x as u64) & PRIME;
    let hi = (x >> 61) as u64;
    let mut r = lo + (hi & PRIME) + (hi >> 61);
    while r >= PRIME {
        r -= PRIME;
    }
    r
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn add(a: u64, b: u64) -> u64 {
    let r = a + b;
    if r >= PRIME {
        r - PRIME
    } else {
        r
    }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + PRIME - b
    }
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

fn inverse(a: u64) -> u64 {
    pow(a, PRIME - 2)
}

fn chunk_values(secret: &[u8; 32]) -> Zeroizing<[u64; CHUNKS]> {
    let mut out = Zeroizing::new([0u64; CHUNKS]);
    let mut offset = 0;
    for (i, &len) in CHUNK_LEN.iter().enumerate() {
        let mut le = [0u8; 8];
        le[..len].copy_from_slice(&secret[offset..offset + len]);
        out[i] = u64::from_le_bytes(le);
        le.zeroize();
        offset += len;
    }
    out
}

/// Implements share generation (protocol-spec §3.5): one share per holder, threshold `t`.
///
/// Holders must be distinct; their evaluation points are `holder + 1`, never zero.
pub fn split<R: rand_core::CryptoRng + ?Sized>(
    secret: &Seed,
    threshold: usize,
    holders: &[ClientId],
    rng: &mut R,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::ZeroThreshold);
    }
    let constants = chunk_values(secret.expose());
    // coefficients[c][d]: chunk c, degree d (d = 0 is the secret chunk).
    let mut coefficients = Zeroizing::new(vec![[0u64; CHUNKS]; threshold]);
    coefficients[0] = *constants;
    for row in coefficients.iter_mut().skip(1) {
        for v in row.iter_mut() {
            // Rejection sampling for a uniform element below the prime.
            *v = loop {
                let r = rng.next_u64() >> 3;
                if r < PRIME {
                    break r;
                }
            };
        }
    }
    let shares = holders
        .iter()
        .map(|&holder| {
            let x = u64::from(holder) + 1;
            let mut values = [0u64; CHUNKS];
            for (c, v) in values.iter_mut().enumerate() {
                // Horner's rule from the highest degree.
                let mut acc = 0;
                for row in coefficients.iter().rev() {
                    acc = add(mul(acc, x), row[c]);
                }
                *v = acc;
            }
            Share { holder, values }
        })
        .collect();
    Ok(shares)
}

/// Implements reconstruction (protocol-spec §3.5): Lagrange interpolation at zero from the first
/// `threshold` shares (sorted by holder so every reconstruction uses the same subset).
pub fn combine(shares: &[Share], threshold: usize) -> Result<Seed, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::ZeroThreshold);
    }
    if shares.len() < threshold {
        return Err(ShamirError::TooFewShares {
            got: shares.len(),
            threshold,
        });
    }
    let mut used: Vec<&Share> = shares.iter().collect();
    used.sort_by_key(|s| s.holder);
    for w in used.windows(2) {
        if w[0].holder == w[1].holder {
            return Err(ShamirError::DuplicateHolder(w[0].holder));
        }
    }
    used.truncate(threshold);
    let xs: Vec<u64> = used.iter().map(|s| u64::from(s.holder) + 1).collect();
    // Lagrange basis at zero: l_i = prod_{j != i} x_j / (x_j - x_i).
    let basis: Vec<u64> = xs
        .iter()
        .enumerate()
        .map(|(i, &xi)| {
            let (mut num, mut den) = (1u64, 1u64);
            for (j, &xj) in xs.iter().enumerate() {
                if i != j {
                    num = mul(num, xj);
                    den = mul(den, sub(xj, xi));
                }
            }
            mul(num, inverse(den))
        })
        .collect();
    let mut secret = Zeroizing::new([0u8; 32]);
    let mut offset = 0;
    for (c, &len) in CHUNK_LEN.iter().enumerate() {
        let mut value = 0u64;
        for (s, &l) in used.iter().zip(&basis) {
            value = add(value, mul(s.values[c], l));
        }
        if len < 8 && value >> (8 * len) != 0 {
            return Err(ShamirError::Inconsistent);
        }
        secret[offset..offset + len].copy_from_slice(&value.to_le_bytes()[..len]);
        offset += len;
    }
    Ok(Seed::from_bytes(*secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn field_reduction_is_correct_at_the_edges() {
        assert_eq!(mul(PRIME - 1, PRIME - 1), 1);
        assert_eq!(add(PRIME - 1, 1), 0);
        assert_eq!(sub(0, 1), PRIME - 1);
        assert_eq!(mul(inverse(12345), 12345), 1);
    }

    #[test]
    fn too_few_shares_is_an_error() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let shares = split(&Seed::from_bytes([3; 32]), 3, &[0, 1, 2], &mut rng).unwrap();
        assert_eq!(
            combine(&shares[..2], 3).unwrap_err(),
            ShamirError::TooFewShares {
                got: 2,
                threshold: 3
            }
        );
        let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert_eq!(
            combine(&dup, 3).unwrap_err(),
            ShamirError::DuplicateHolder(0)
        );
        let mut bad = [0xffu8; SHARE_BYTES];
        bad[0] = 0;
        assert_eq!(
            Share::from_bytes(4, &bad).unwrap_err(),
            ShamirError::NotAFieldElement(4)
        );
    }

    proptest! {
        #[test]
        fn any_t_of_n_shares_reconstruct(secret in any::<[u8; 32]>(), n in 1usize..12, t_frac in 0.0f64..1.0, seed in any::<u64>(), pick in any::<u64>()) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let holders: Vec<u32> = (0..n as u32).map(|i| i * 3 + 1).collect();
            let shares = split(&Seed::from_bytes(secret), t, &holders, &mut rng).unwrap();
            // A pseudo-random subset of exactly t shares.
            let mut idx: Vec<usize> = (0..n).collect();
            let mut p = pick;
            for i in (1..n).rev() { idx.swap(i, (p % (i as u64 + 1)) as usize); p = p.rotate_left(7) ^ 0x9e37; }
            let subset: Vec<Share> = idx[..t].iter().map(|&i| shares[i].clone()).collect();
            let back = combine(&subset, t).unwrap();
            prop_assert_eq!(back.expose(), &secret);
            // Round trip through bytes.
            let s0 = Share::from_bytes(shares[0].holder, &shares[0].to_bytes()).unwrap();
            prop_assert_eq!(s0, shares[0].clone());
        }
    }

    /// Fewer than t shares reveal nothing: for t = 3, the first chunk of share values from two
    /// holders is uniform whatever the secret. We check that the distribution of a share value's
    /// low byte is the same (chi-square) for two very different secrets.
    #[test]
    fn fewer_than_t_shares_look_uniform() {
        let trials = 20_000;
        let mut counts = [[0u32; 16]; 2];
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        for (k, secret) in [[0u8; 32], [0xffu8; 32]].iter().enumerate() {
            for _ in 0..trials {
                let shares = split(&Seed::from_bytes(*secret), 3, &[0, 1], &mut rng).unwrap();
                counts[k][(shares[1].values[0] & 0xf) as usize] += 1;
            }
        }
        // Chi-square of each against uniform over 16 bins: 15 degrees of freedom, p = 0.001 at 37.7.
        for c in &counts {
            let expected = f64::from(trials) / 16.0;
            let chi: f64 = c
                .iter()
                .map(|&o| (f64::from(o) - expected).powi(2) / expected)
                .sum();
            assert!(chi < 37.7, "chi-square {chi} for {c:?}");
        }
    }
}
