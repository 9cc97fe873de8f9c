//! Rank-r truncation of a merged update, for PEFT users of the `exact` rule: the best rank-r
//! approximation `ΔW ≈ U_r Σ_r V_rᵀ` (Eckart–Young) written as LoRA factors with the adapter's
//! scale, `s·B·A` with `B = U_r Σ_r^{1/2} / √s` and `A = Σ_r^{1/2} V_rᵀ / √s`.
//!
//! The top singular triplets come from a randomized range finder with power iterations (Halko,
//! Martinsson, Tropp 2011, Algorithms 4.3/5.1), then an exact eigen-decomposition (cyclic Jacobi)
//! of the small projected Gram matrix, all in f64. The truncation error is measured directly
//! against the update, not assumed.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::tensor::Tensor;
use crate::AggregateError;

/// Extra sampled directions beyond the rank (Halko et al.'s oversampling `p`).
const OVERSAMPLE: usize = 10;
/// Power iterations (`q`): enough for the slowly decaying spectra of trained updates.
const POWER_ITERATIONS: usize = 6;

/// A rank-r LoRA factorisation of a matrix and how far it is from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Truncation {
    /// `A`, `(rank x in)`.
    pub a: Tensor,
    /// `B`, `(out x rank)`.
    pub b: Tensor,
    /// `‖ΔW − s·B·A‖_F / ‖ΔW‖_F` (0 for a zero update).
    pub relative_error: f64,
    /// The singular values kept, largest first.
    pub singular_values: Vec<f64>,
}

/// Row-major f64 matrix.
#[derive(Clone)]
struct Mat {
    r: usize,
    c: usize,
    d: Vec<f64>,
}

impl Mat {
    fn zeros(r: usize, c: usize) -> Self {
        Mat {
            r,
            c,
            d: vec![0.0; r * c],
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.d[i * self.c + j]
    }

    /// `self · other`.
    fn mul(&self, o: &Mat) -> Mat {
        let mut out = Mat::zeros(self.r, o.c);
        for i in 0..self.r {
            let row = &mut out.d[i * o.c..(i + 1) * o.c];
            for k in 0..self.c {
                let x = self.at(i, k);
                if x != 0.0 {
                    for (y, &z) in row.iter_mut().zip(&o.d[k * o.c..(k + 1) * o.c]) {
                        *y += x * z;
                    }
                }
            }
        }
        out
    }

    /// `selfᵀ · other`.
    fn tmul(&self, o: &Mat) -> Mat {
        let mut out = Mat::zeros(self.c, o.c);
        for k in 0..self.r {
            for i in 0..self.c {
                let x = self.at(k, i);
                if x != 0.0 {
                    let row = &mut out.d[i * o.c..(i + 1) * o.c];
                    for (y, &z) in row.iter_mut().zip(&o.d[k * o.c..(k + 1) * o.c]) {
                        *y += x * z;
                    }
                }
            }
        }
        out
    }

    /// Orthonormalises the columns in place (modified Gram–Schmidt, twice for stability). A
    /// column that lies in the span of the earlier ones (its residual is at rounding level) is set
    /// to zero: normalising a residual of pure rounding error would give a vector that is not
    /// orthogonal to the others at all.
    fn orthonormalize_columns(&mut self) {
        let col_norm = |m: &Mat, j: usize| (0..m.r).map(|i| m.at(i, j).powi(2)).sum::<f64>().sqrt();
        for _pass in 0..2 {
            for j in 0..self.c {
                let before = col_norm(self, j);
                for p in 0..j {
                    let dot: f64 = (0..self.r).map(|i| self.at(i, j) * self.at(i, p)).sum();
                    for i in 0..self.r {
                        self.d[i * self.c + j] -= dot * self.d[i * self.c + p];
                    }
                }
                let norm = col_norm(self, j);
                let inv = if before > 0.0 && norm > 1e-10 * before {
                    1.0 / norm
                } else {
                    0.0
                };
                for i in 0..self.r {
                    self.d[i * self.c + j] *= inv;
                }
            }
        }
    }
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations: eigenvalues (descending)
/// and the matching eigenvectors as columns.
fn symmetric_eigen(m: &Mat) -> (Vec<f64>, Mat) {
    let n = m.r;
    let mut a = m.clone();
    let mut v = Mat::zeros(n, n);
    for i in 0..n {
        v.d[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a.at(i, j).powi(2))
            .sum();
        let diag: f64 = (0..n).map(|i| a.at(i, i).powi(2)).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a.at(p, q);
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a.at(q, q) - a.at(p, p)) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a.at(k, p), a.at(k, q));
                    a.d[k * n + p] = c * akp - s * akq;
                    a.d[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a.at(p, k), a.at(q, k));
                    a.d[p * n + k] = c * apk - s * aqk;
                    a.d[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.d[k * n + p] = c * vkp - s * vkq;
                    v.d[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a.at(j, j).total_cmp(&a.at(i, i)));
    let values = order.iter().map(|&i| a.at(i, i)).collect();
    let mut vecs = Mat::zeros(n, n);
    for (new, &old) in order.iter().enumerate() {
        for k in 0..n {
            vecs.d[k * n + new] = v.at(k, old);
        }
    }
    (values, vecs)
}

/// The best rank-`rank` factorisation of `delta (out x in)` with LoRA scale `scale`.
/// `seed` fixes the random test matrix, so the result is reproducible.
pub fn truncate(
    delta: &Tensor,
    rank: usize,
    scale: f64,
    seed: u64,
) -> Result<Truncation, AggregateError> {
    let (m, n) = delta.dims2()?;
    if rank == 0 || rank > m.min(n) {
        return Err(AggregateError::Shape(format!(
            "cannot truncate a {m}x{n} update to rank {rank}"
        )));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(AggregateError::Shape(format!(
            "LoRA scale {scale} is not positive"
        )));
    }
    let w = Mat {
        r: m,
        c: n,
        d: delta.data.iter().map(|&x| f64::from(x)).collect(),
    };
    let k = (rank + OVERSAMPLE).min(m.min(n));
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut omega = Mat::zeros(n, k);
    for x in &mut omega.d {
        *x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
    }
    // Range finder: Q spans the leading left singular subspace of W.
    let mut q = w.mul(&omega);
    q.orthonormalize_columns();
    for _ in 0..POWER_ITERATIONS {
        let mut z = w.tmul(&q);
        z.orthonormalize_columns();
        q = w.mul(&z);
        q.orthonormalize_columns();
    }
    // Small problem: C = Qᵀ W (k x n); C Cᵀ = U_c Λ U_cᵀ gives W ≈ (Q U_c) Σ Vᵀ.
    let c = q.tmul(&w);
    let mut gram = Mat::zeros(k, k);
    for i in 0..k {
        for j in 0..k {
            gram.d[i * k + j] = (0..n).map(|t| c.at(i, t) * c.at(j, t)).sum();
        }
    }
    let (eig, uc) = symmetric_eigen(&gram);
    let u = q.mul(&uc);

    let root_s = scale.sqrt();
    let mut a = vec![0f32; rank * n];
    let mut b = vec![0f32; m * rank];
    let mut kept = Vec::with_capacity(rank);
    for j in 0..rank {
        let sigma = eig[j].max(0.0).sqrt();
        kept.push(sigma);
        let half = sigma.sqrt();
        // v_j = Cᵀ u_c,j / σ_j; A row j = √σ v_jᵀ / √s, B column j = √σ u_j / √s.
        if sigma > 1e-300 {
            for t in 0..n {
                let vj: f64 = (0..k).map(|i| c.at(i, t) * uc.at(i, j)).sum::<f64>() / sigma;
                a[j * n + t] = (half * vj / root_s) as f32;
            }
            for i in 0..m {
                b[i * rank + j] = (half * u.at(i, j) / root_s) as f32;
            }
        }
    }
    let a = Tensor::new(&[rank, n], a)?;
    let b = Tensor::new(&[m, rank], b)?;
    let approx = b.matmul_scaled(&a, scale)?;

    let total = delta.norm_sq();
    let relative_error = if total > 0.0 {
        (delta.sub(&approx)?.norm_sq() / total).sqrt()
    } else {
        0.0
    };
    Ok(Truncation {
        a,
        b,
        relative_error,
        singular_values: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::gaussian;

    #[test]
    fn a_rank_r_update_is_recovered_exactly() {
        let b = gaussian(1, 0, "t", "b", &[40, 3], 1.0);
        let a = gaussian(1, 0, "t", "a", &[3, 30], 1.0);
        let delta = b.matmul_scaled(&a, 2.0).expect("product");
        let t = truncate(&delta, 3, 2.0, 9).expect("svd");
        assert!(t.relative_error < 1e-5, "error {}", t.relative_error);
        // Rank 2 of a rank-3 matrix loses exactly the smallest singular value's share.
        let t2 = truncate(&delta, 2, 2.0, 9).expect("svd");
        let s = &t.singular_values;
        let want = (s[2] * s[2] / s.iter().map(|x| x * x).sum::<f64>()).sqrt();
        assert!(
            (t2.relative_error - want).abs() < 1e-4,
            "{} vs {want}",
            t2.relative_error
        );
    }

    #[test]
    fn a_rank_one_square_update_with_many_sampled_directions_is_exact() {
        // More sampled directions than the rank: most become rounding noise and must vanish.
        let n = 16;
        let mut d = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                d[i * n + j] = (i as f32 + 1.0) * 0.01 * (j as f32 - 2.0);
            }
        }
        let delta = Tensor::new(&[n, n], d).expect("t");
        let t = truncate(&delta, 4, 2.0, 3).expect("svd");
        assert!(t.relative_error < 1e-5, "error {}", t.relative_error);
    }

    #[test]
    fn a_full_rank_update_matches_eckart_young() {
        // Diagonal matrix: singular values are known.
        let n = 12;
        let mut d = vec![0f32; n * n];
        for i in 0..n {
            d[i * n + i] = (n - i) as f32;
        }
        let delta = Tensor::new(&[n, n], d).expect("t");
        let t = truncate(&delta, 4, 0.5, 1).expect("svd");
        for (i, s) in t.singular_values.iter().enumerate() {
            assert!((s - (n - i) as f64).abs() < 1e-6, "{s}");
        }
        let tail: f64 = (1..=8).map(|x| (x * x) as f64).sum();
        let all: f64 = (1..=12).map(|x| (x * x) as f64).sum();
        assert!((t.relative_error - (tail / all).sqrt()).abs() < 1e-6);
        assert!(truncate(&delta, 13, 1.0, 1).is_err());
        assert_eq!(
            truncate(&Tensor::zeros(&[4, 4]), 2, 1.0, 1)
                .expect("z")
                .relative_error,
            0.0
        );
    }
}
