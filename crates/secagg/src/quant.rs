//! Fixed-point quantization into the ring `Z_{2^b}` and back (protocol-spec §5.3).
//!
//! A client with weight `w` (1 ≤ w ≤ W) clips each value `x` into `[-c, c]`, pre-multiplies it by
//! `w / W`, scales by `2^(q-1) / c` and rounds stochastically (up with probability equal to the
//! fractional part), so the quantized value is an unbiased integer in `[-2^(q-1), 2^(q-1)]`. It is
//! stored in two's complement modulo `2^b`. The weight itself is appended as one more word. The
//! server's sum of `n ≤ 2^⌈log2 n⌉` such words is at most `2^(b-2)` in magnitude by the choice of
//! `b` and `q` (§5.3), so reading it back as a signed `b`-bit integer is exact.

use fedlora_wire::RoundParams;
use zeroize::Zeroizing;

/// Why a client's input could not be quantized.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    /// A value is NaN or infinite.
    #[error("input value {index} is not finite ({value})")]
    NonFinite {
        /// Position in the flattened input.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The weight is zero or above the round's bound.
    #[error("weight {weight} is outside 1..={bound}")]
    BadWeight {
        /// The weight given.
        weight: u32,
        /// The round's weight bound.
        bound: u32,
    },
    /// The aggregate's weight sum is zero (no survivors) or the vector is empty.
    #[error("aggregate has no weight")]
    EmptyAggregate,
}

/// How many values clipping changed, for the client's own report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClipStats {
    /// Values outside `[-clip, clip]`.
    pub clipped: usize,
}

/// Quantization for one round's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Quantizer {
    ring_bits: u8,
    scale: f64,
    weight_bound: u32,
    clip: f32,
}

impl Quantizer {
    /// Builds the quantizer; parameters are assumed validated ([`crate::params::validate`]).
    pub fn new(params: &RoundParams) -> Self {
        Quantizer {
            ring_bits: params.ring_bits,
            scale: f64::from(1u32 << (params.quant_bits - 1)) / f64::from(params.clip),
            weight_bound: params.weight_bound,
            clip: params.clip,
        }
    }

    /// `2^b − 1`, the mask of ring words.
    pub fn ring_mask(&self) -> u32 {
        ring_mask(self.ring_bits)
    }

    /// Implements client-side quantization (protocol-spec §5.3). Returns `values.len() + 1` words.
    pub fn quantize<R: rand_core::RngCore + ?Sized>(
        &self,
        values: &[f32],
        weight: u32,
        rng: &mut R,
    ) -> Result<(Zeroizing<Vec<u32>>, ClipStats), QuantError> {
        if weight == 0 || weight > self.weight_bound {
            return Err(QuantError::BadWeight {
                weight,
                bound: self.weight_bound,
            });
        }
        let factor = self.scale * f64::from(weight) / f64::from(self.weight_bound);
        let mask = self.ring_mask();
        let mut stats = ClipStats::default();
        let mut words = Zeroizing::new(Vec::with_capacity(values.len() + 1));
        for (index, &x) in values.iter().enumerate() {
            if !x.is_finite() {
                return Err(QuantError::NonFinite { index, value: x });
            }
            if x.abs() > self.clip {
                stats.clipped += 1;
            }
            let v = f64::from(x.clamp(-self.clip, self.clip)) * factor;
            let floor = v.floor();
            // 53 random bits give an exact uniform in [0, 1).
            let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let rounded = if u < v - floor { floor + 1.0 } else { floor };
            words.push((rounded as i64) as u32 & mask);
        }
        words.push(weight);
        Ok((words, stats))
    }

    /// Implements dequantization of the aggregate (protocol-spec §5.3): the weighted mean of the
    /// survivors' clipped values, from the ring sum whose last word is the weight sum.
    pub fn weighted_mean(&self, sum: &[u32]) -> Result<(Vec<f32>, u64), QuantError> {
        let (&weight_sum, values) = sum.split_last().ok_or(QuantError::EmptyAggregate)?;
        if weight_sum == 0 {
            return Err(QuantError::EmptyAggregate);
        }
        let to_mean = f64::from(self.weight_bound) / (self.scale * f64::from(weight_sum));
        let mean = values
            .iter()
            .map(|&w| (signed(w, self.ring_bits) as f64 * to_mean) as f32)
            .collect();
        Ok((mean, u64::from(weight_sum)))
    }

    /// Worst-case absolute error of [`Self::weighted_mean`] against the exact weighted mean of the
    /// clipped inputs: each survivor's stochastic rounding moves its word by less than one unit.
    pub fn error_bound(&self, survivors: usize, weight_sum: u64) -> f64 {
        if weight_sum == 0 {
            return f64::INFINITY;
        }
        survivors as f64 * f64::from(self.weight_bound) / (self.scale * weight_sum as f64)
    }
}

/// `2^b − 1`.
pub fn ring_mask(ring_bits: u8) -> u32 {
    if ring_bits >= 32 {
        u32::MAX
    } else {
        (1u32 << ring_bits) - 1
    }
}

/// A ring word read as a signed `b`-bit two's-complement integer.
pub fn signed(word: u32, ring_bits: u8) -> i64 {
    let w = i64::from(word & ring_mask(ring_bits));
    if w >= 1i64 << (ring_bits - 1) {
        w - (1i64 << ring_bits)
    } else {
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn params(ring_bits: u8, quant_bits: u8, weight_bound: u32) -> RoundParams {
        RoundParams {
            degree: 4,
            threshold: 3,
            ring_bits,
            quant_bits,
            clip: 2.0,
            weight_bound,
        }
    }

    #[test]
    fn clipping_is_explicit_and_counted() {
        let q = Quantizer::new(&params(16, 10, 1));
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let (words, stats) = q.quantize(&[5.0, -5.0, 0.0], 1, &mut rng).unwrap();
        assert_eq!(stats.clipped, 2);
        assert_eq!(signed(words[0], 16), 512);
        assert_eq!(signed(words[1], 16), -512);
        assert_eq!(words[3], 1);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let q = Quantizer::new(&params(16, 10, 5));
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        assert!(matches!(
            q.quantize(&[1.0, f32::NAN], 1, &mut rng),
            Err(QuantError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            q.quantize(&[f32::INFINITY], 1, &mut rng),
            Err(QuantError::NonFinite { index: 0, .. })
        ));
        assert_eq!(
            q.quantize(&[1.0], 0, &mut rng).unwrap_err(),
            QuantError::BadWeight {
                weight: 0,
                bound: 5
            }
        );
        assert_eq!(
            q.quantize(&[1.0], 6, &mut rng).unwrap_err(),
            QuantError::BadWeight {
                weight: 6,
                bound: 5
            }
        );
        assert_eq!(
            q.weighted_mean(&[]).unwrap_err(),
            QuantError::EmptyAggregate
        );
        assert_eq!(
            q.weighted_mean(&[3, 0]).unwrap_err(),
            QuantError::EmptyAggregate
        );
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let q = Quantizer::new(&params(24, 8, 1));
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        // 0.3 * 2^7 / 2 = 19.2 units: the mean of many roundings must approach it.
        let x = vec![0.3f32; 20_000];
        let (words, _) = q.quantize(&x, 1, &mut rng).unwrap();
        let mean: f64 = words[..x.len()]
            .iter()
            .map(|&w| signed(w, 24) as f64)
            .sum::<f64>()
            / x.len() as f64;
        assert!((mean - 19.2).abs() < 0.02, "mean {mean}");
    }

    proptest! {
        /// Summing quantized words in the ring and dequantizing recovers the weighted mean of the
        /// clipped values within the stated bound.
        #[test]
        fn ring_sum_dequantizes_within_bound(
            n in 1usize..20,
            seed in any::<u64>(),
            vals in proptest::collection::vec(-3.0f32..3.0, 1..20),
        ) {
            let p = params(24, 24 - crate::params::ceil_log2(n as u64) as u8 - 1, 9);
            let q = Quantizer::new(&p);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut sum = vec![0u32; vals.len() + 1];
            let mut exact = vec![0f64; vals.len()];
            let mut wsum = 0u64;
            for i in 0..n {
                let w = (i as u32 % 9) + 1;
                let xs: Vec<f32> = vals.iter().map(|v| v * (i as f32 + 1.0) / n as f32).collect();
                let (words, _) = q.quantize(&xs, w, &mut rng).unwrap();
                for (s, w) in sum.iter_mut().zip(words.iter()) { *s = s.wrapping_add(*w) & q.ring_mask(); }
                for (e, x) in exact.iter_mut().zip(&xs) { *e += f64::from(w) * f64::from(x.clamp(-2.0, 2.0)); }
                wsum += u64::from(w);
            }
            let (mean, got_wsum) = q.weighted_mean(&sum).unwrap();
            prop_assert_eq!(got_wsum, wsum);
            let bound = q.error_bound(n, wsum);
            for (m, e) in mean.iter().zip(&exact) {
                let err = (f64::from(*m) - e / wsum as f64).abs();
                prop_assert!(err <= bound + 1e-6, "err {} > bound {}", err, bound);
            }
        }
    }
}
