//! Seeded randomness. candle's `Device::Cpu.set_seed` is an error on CPU, so every random tensor
//! (LoRA init, dropout masks, data shuffles) comes from our own ChaCha stream and is therefore
//! reproducible from one `u64` seed.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// A reproducible random stream.
#[derive(Debug, Clone)]
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Self {
        SeededRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// An independent stream derived from this one's seed and a label, so that adding a consumer
    /// of randomness does not shift the numbers every other consumer sees.
    pub fn fork(seed: u64, label: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        SeededRng::new(seed ^ h)
    }

    /// A uniform float in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0.random::<f32>()
    }

    /// A uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n.max(1))
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (1.0 - self.0.random::<f64>()).max(f64::MIN_POSITIVE);
        let u2 = self.0.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.0.random_range(0..=i);
            v.swap(i, j);
        }
    }

    /// A tensor of i.i.d. normal samples times `std`.
    pub fn normal_tensor(
        &mut self,
        shape: (usize, usize),
        std: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| self.normal() * std)
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// A tensor of i.i.d. uniform samples in [-bound, bound).
    pub fn uniform_tensor(
        &mut self,
        shape: (usize, usize),
        bound: f32,
        device: &Device,
    ) -> Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (self.uniform() * 2.0 - 1.0) * bound)
            .collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// An inverted-dropout mask: each entry is 0 with probability `p`, else `1/(1-p)`.
    pub fn dropout_mask(&mut self, dims: &[usize], p: f32, device: &Device) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let keep = 1.0 / (1.0 - p);
        let data: Vec<f32> = (0..n)
            .map(|_| if self.uniform() < p { 0.0 } else { keep })
            .collect();
        Ok(Tensor::from_vec(data, dims, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_normal_moments() {
        let mut a = SeededRng::new(7);
        let mut b = SeededRng::new(7);
        let xs: Vec<f32> = (0..20_000).map(|_| a.normal()).collect();
        let ys: Vec<f32> = (0..20_000).map(|_| b.normal()).collect();
        assert_eq!(xs, ys);
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        assert_ne!(
            SeededRng::fork(7, "a").normal(),
            SeededRng::fork(7, "b").normal()
        );
    }
}
