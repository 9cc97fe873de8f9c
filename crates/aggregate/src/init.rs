//! Public, seeded initial values: the LoRA `A` factors (and a classifier head) that every party
//! derives from the federation's seed, so server and clients start from the same state without
//! sending it, and `frozen-a` (FFA-LoRA, arXiv 2403.12313) can freeze `A` at a value no one chose.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::tensor::Tensor;

/// A generator for one purpose: ChaCha20 keyed by SHA-256 of the domain label, the seed, the round
/// and the tensor name, so each tensor's draw is independent of every other's and of their order.
fn stream(seed: u64, round: u64, purpose: &str, name: &str) -> ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"fedlora/v0/adapter-init");
    h.update(seed.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update((purpose.len() as u64).to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(name.as_bytes());
    ChaCha20Rng::from_seed(h.finalize().into())
}

/// A uniform in (0, 1) from 53 random bits (never 0, so its logarithm is finite).
fn open_unit(rng: &mut ChaCha20Rng) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// `rows x cols` values from N(0, std²) (Box–Muller), for tensor `name` of `round`.
pub fn gaussian(
    seed: u64,
    round: u64,
    purpose: &str,
    name: &str,
    shape: &[usize],
    std: f64,
) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = stream(seed, round, purpose, name);
    let mut data = Vec::with_capacity(n);
    while data.len() < n {
        let (u1, u2) = (open_unit(&mut rng), open_unit(&mut rng));
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        data.push((r * t.cos() * std) as f32);
        if data.len() < n {
            data.push((r * t.sin() * std) as f32);
        }
    }
    Tensor {
        shape: shape.to_vec(),
        data,
    }
}

/// The `A` factor `(rank x inp)` of `module` for `round`: N(0, 1/rank), as fedlora-train's local
/// adapters (any zero-mean start works because `B = 0` makes the first update zero).
pub fn lora_a(seed: u64, round: u64, module: &str, rank: usize, inp: usize) -> Tensor {
    gaussian(
        seed,
        round,
        "lora_A",
        module,
        &[rank, inp],
        1.0 / (rank as f64).sqrt(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_independent_and_standard() {
        let a = lora_a(7, 0, "m.q", 8, 500);
        assert_eq!(a, lora_a(7, 0, "m.q", 8, 500));
        assert_ne!(a, lora_a(7, 1, "m.q", 8, 500));
        assert_ne!(a, lora_a(7, 0, "m.v", 8, 500));
        let n = a.len() as f64;
        let mean = a.data.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = a.norm_sq() / n - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var * 8.0 - 1.0).abs() < 0.1, "var {var}");
    }
}
