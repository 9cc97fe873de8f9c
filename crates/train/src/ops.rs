//! Differentiable building blocks. candle-transformers' stock models call fused kernels
//! (`softmax_last_dim`, `rms_norm`, `layer_norm`, rotary embeddings) that have no backward pass, so
//! gradients through them are silently dropped. Everything here is written with plain tensor ops
//! that candle can differentiate, plus one custom op, [`frozen_matmul`], that differentiates
//! only with respect to its input, which is what a frozen base weight needs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

use crate::Result;

/// `x · Wᵀ` for a frozen `W` of shape `(out, in)`. candle's own matmul backward also computes the
/// gradient of `W` (as large as the forward) even when `W` is not a variable; this op returns
/// only `∂L/∂x = g · W`, the way PyTorch skips gradients of weights with `requires_grad=False`.
#[derive(Debug, Clone)]
struct FrozenMatmul {
    w: Tensor,
    /// Optional frozen bias, added inside the op: a separate broadcast add would cost a
    /// full-size zero-fill and add in candle's backward for the bias, which has no gradient.
    b: Option<Vec<f32>>,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: input has {k} features, weight expects {k2}");
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_storage else {
            candle_core::bail!("frozen-matmul: weight is not on the CPU");
        };
        // Wᵀ as a strided view: no copy.
        let wt_layout = w_layout.transpose(0, 1)?;
        let out = storage.matmul(w_cpu, (1, m, n, k), layout, &wt_layout)?;
        let out = match (&self.b, out) {
            (Some(b), CpuStorage::F32(mut y)) => {
                for row in y.chunks_exact_mut(n) {
                    for (v, bias) in row.iter_mut().zip(b) {
                        *v += bias;
                    }
                }
                CpuStorage::F32(y)
            }
            (_, out) => out,
        };
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// `x · Wᵀ (+ b)` with `x` of any rank ≥ 2 (the last dim is the feature dim) and a frozen `W`.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?;
    let y = if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        let b = match b {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        x2.contiguous()?
            .apply_op1(FrozenMatmul { w: w.clone(), b })?
    } else {
        let y = x2.matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// 2-D `x · Wᵀ`, through the custom op on CPU and plain matmul elsewhere (correct, just without
/// the saving).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        let x = x.contiguous()?;
        Ok(x.apply_op1(FrozenMatmul {
            w: w.clone(),
            b: None,
        })?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

/// Softmax over the last dim as one pass over the data, with the backward candle's fused
/// `softmax_last_dim` lacks: `dx = y·(dy − Σ dy·y)`. Attention scores are the largest activations
/// of both models; the composed version makes five full-size temporaries forward and more
/// backward.
#[derive(Debug, Clone, Copy)]
struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-last: input must be contiguous");
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("softmax-last: input must be f32");
        };
        let mut out = data[start..end].to_vec();
        for row in out.chunks_exact_mut(dim) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let s = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&s)?)?))
    }
}

/// Softmax over the last dim: the fused op on CPU, the composed one elsewhere.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(SoftmaxLast)?);
    }
    softmax_composed(x)
}

/// Softmax from plain ops. The max is detached: softmax is shift-invariant, so its gradient
/// through the max is zero and computing it would be wasted work.
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Contiguous f32 data of a CPU tensor, copied out (`None` elsewhere).
fn cpu_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Fused normalisation over the last dim with frozen affine parameters: `rms` (llama's RMSNorm,
/// no mean, no bias) or LayerNorm. One pass forward; backward in one pass too, from the input:
/// with `x̂ = (x − μ)·r`, `g = dy·w`: LayerNorm `dx = r·(g − mean(g) − x̂·mean(g·x̂))`, RMSNorm
/// `dx = r·(g − x̂·mean(g·x̂))`. Composed from tensor ops these are ~8 ops forward and, with
/// candle's zero-fill-and-add gradient accumulation, several times that backward.
#[derive(Debug, Clone)]
struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    eps: f32,
    rms: bool,
}

impl Norm {
    /// `(mean, 1/sqrt(var + eps))` of one row.
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = if self.rms {
            0.0
        } else {
            row.iter().sum::<f32>() / n
        };
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        if self.rms {
            "rms-norm"
        } else {
            "layer-norm"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = self.w.len();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("norm: input must be contiguous");
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("norm: input must be f32");
        };
        if layout.shape().dims().last().copied() != Some(dim) {
            candle_core::bail!("norm: last dim is not {dim}");
        }
        let mut out = data[start..end].to_vec();
        for row in out.chunks_exact_mut(dim) {
            let (mean, r) = self.stats(row);
            for (i, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) * r * self.w[i] + self.b.as_ref().map_or(0.0, |b| b[i]);
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dim = self.w.len();
        let x = cpu_f32(arg)?;
        let dy = cpu_f32(grad_res)?;
        let mut dx = vec![0f32; x.len()];
        let mut g = vec![0f32; dim];
        for ((xr, dyr), dxr) in x
            .chunks_exact(dim)
            .zip(dy.chunks_exact(dim))
            .zip(dx.chunks_exact_mut(dim))
        {
            let (mean, r) = self.stats(xr);
            let (mut mg, mut mgx) = (0f32, 0f32);
            for i in 0..dim {
                g[i] = dyr[i] * self.w[i];
                mg += g[i];
                mgx += g[i] * (xr[i] - mean) * r;
            }
            let n = dim as f32;
            let (mg, mgx) = (if self.rms { 0.0 } else { mg / n }, mgx / n);
            for i in 0..dim {
                dxr[i] = r * (g[i] - mg - (xr[i] - mean) * r * mgx);
            }
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

fn fused_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64, rms: bool) -> Result<Tensor> {
    let op = Norm {
        w: w.to_vec1::<f32>()?,
        b: match b {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        },
        eps: eps as f32,
        rms,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

fn fusable(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && w.rank() == 1
}

/// RMSNorm (llama): `x / sqrt(mean(x²) + eps) · w` (fused on CPU).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x, w) {
        return fused_norm(x, w, None, eps, true);
    }
    rms_norm_composed(x, w, eps)
}

/// RMSNorm from plain tensor ops.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// LayerNorm (BERT): `(x - mean) / sqrt(var + eps) · w + b` (fused on CPU).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x, w) {
        return fused_norm(x, w, Some(b), eps, false);
    }
    layer_norm_composed(x, w, b, eps)
}

/// LayerNorm from plain tensor ops.
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(xc.broadcast_mul(&inv)?.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Rotary position tables `(cos, sin)` of shape `(positions, head_dim)` in the Hugging Face
/// "rotate half" layout (the two halves of a head share a frequency).
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    start: usize,
    len: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for p in start..start + len {
        for rep in 0..2 {
            let _ = rep;
            for i in 0..half {
                let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let a = p as f64 * inv_freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, head_dim), device)?,
        Tensor::from_vec(sin, (len, head_dim), device)?,
    ))
}

/// Applies rotary embeddings to `x` of shape `(batch, heads, seq, head_dim)`:
/// `x·cos + rotate_half(x)·sin` with `rotate_half([a, b]) = [-b, a]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let a = x.narrow(D::Minus1, 0, half)?;
    let b = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// `erf` by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, below f32 resolution of the
/// GELU output): one `exp` per element instead of libm's branchy `erff`, which was ~7% of a
/// MiniLM training step.
fn erf(x: f32) -> f32 {
    let (p, a1, a2, a3, a4, a5) = (
        0.327_591_1f32,
        0.254_829_6f32,
        -0.284_496_74f32,
        1.421_413_7f32,
        -1.453_152f32,
        1.061_405_4f32,
    );
    let ax = x.abs();
    let t = 1.0 / (1.0 + p * ax);
    let y = 1.0 - ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t * (-ax * ax).exp();
    y.copysign(x)
}

/// Exact (erf) GELU, `x·Φ(x)`, with backward `Φ(x) + x·φ(x)` computed in one pass.
#[derive(Debug, Clone, Copy)]
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu: input must be contiguous");
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu: input must be f32");
        };
        let out = data[start..end]
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = cpu_f32(arg)?;
        let dy = cpu_f32(grad_res)?;
        let inv_sqrt_2pi = 0.398_942_3_f32;
        let dx: Vec<f32> = x
            .iter()
            .zip(&dy)
            .map(|(&x, &g)| {
                let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                g * (cdf + x * inv_sqrt_2pi * (-0.5 * x * x).exp())
            })
            .collect();
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The exact (erf) GELU that BERT uses (fused on CPU).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(GeluErf)?);
    }
    Ok(x.gelu_erf()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(d < tol, "max abs diff {d}");
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_only_differentiates_x() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12., &dev)
                .and_then(|t| t.reshape((3, 4)))
                .expect("x"),
        )
        .expect("var");
        let w = Tensor::arange(0f32, 20., &dev)
            .and_then(|t| (t * 0.1)?.reshape((5, 4)))
            .expect("w");
        let y = frozen_matmul(x.as_tensor(), &w).expect("fwd");
        close(
            &y,
            &x.as_tensor().matmul(&w.t().expect("t")).expect("mm"),
            1e-4,
        );
        let grads = y.sum_all().and_then(|s| s.backward()).expect("bwd");
        let gx = grads.get(x.as_tensor()).expect("gx");
        // d(sum(x Wᵀ))/dx = 1 · W, the column sums of W broadcast over rows.
        let expect = Tensor::ones((3, 5), DType::F32, &dev)
            .and_then(|o| o.matmul(&w))
            .expect("e");
        close(gx, &expect, 1e-4);
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn norms_and_softmax_match_candle_nn() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8), &dev).expect("x");
        let w = Tensor::randn(0f32, 1., 8, &dev).expect("w");
        let b = Tensor::randn(0f32, 1., 8, &dev).expect("b");
        close(
            &rms_norm(&x, &w, 1e-5).expect("rms"),
            &candle_nn::ops::rms_norm(&x, &w, 1e-5).expect("r"),
            1e-4,
        );
        close(
            &layer_norm(&x, &w, &b, 1e-5).expect("ln"),
            &candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).expect("l"),
            1e-4,
        );
        close(
            &softmax_last(&x).expect("sm"),
            &candle_nn::ops::softmax_last_dim(&x).expect("s"),
            1e-5,
        );
    }

    #[test]
    fn fused_norms_and_bias_match_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::randn(0.5f32, 2., (2, 3, 8), &dev).expect("x")).expect("v");
        let w = Tensor::randn(1f32, 0.5, 8, &dev).expect("w");
        let b = Tensor::randn(0f32, 0.5, 8, &dev).expect("b");
        let probe = Tensor::randn(0f32, 1., (2, 3, 8), &dev).expect("probe");
        let grad_of = |y: Tensor| {
            let g = (y * &probe)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            g.get(x.as_tensor()).expect("grad").clone()
        };
        let xt = x.as_tensor();
        let pairs = [
            (
                layer_norm(xt, &w, &b, 1e-5).expect("a"),
                layer_norm_composed(xt, &w, &b, 1e-5).expect("b"),
            ),
            (
                rms_norm(xt, &w, 1e-5).expect("a"),
                rms_norm_composed(xt, &w, 1e-5).expect("b"),
            ),
        ];
        for (fused, composed) in pairs {
            close(&fused, &composed, 1e-5);
            close(&grad_of(fused), &grad_of(composed), 1e-4);
        }
        let wl = Tensor::randn(0f32, 1., (5, 8), &dev).expect("wl");
        let bl = Tensor::randn(0f32, 1., 5, &dev).expect("bl");
        let fused = frozen_linear(xt, &wl, Some(&bl)).expect("fl");
        let plain = xt
            .broadcast_matmul(&wl.t().expect("t"))
            .and_then(|y| y.broadcast_add(&bl))
            .expect("pl");
        close(&fused, &plain, 1e-5);
    }

    #[test]
    fn fused_gelu_matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., 4096, &dev).expect("x")).expect("v");
        let ours = gelu(x.as_tensor()).expect("ours");
        let theirs = x.as_tensor().gelu_erf().expect("theirs");
        close(&ours, &theirs, 2e-6 * 10.0);
        let g1 = ours.sum_all().and_then(|t| t.backward()).expect("g1");
        let g2 = theirs.sum_all().and_then(|t| t.backward()).expect("g2");
        close(
            g1.get(x.as_tensor()).expect("a"),
            g2.get(x.as_tensor()).expect("b"),
            1e-5,
        );
    }

    #[test]
    fn fused_softmax_matches_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3., (2, 3, 7), &dev).expect("x")).expect("v");
        let w = Tensor::randn(0f32, 1., (2, 3, 7), &dev).expect("w");
        let fused = softmax_last(x.as_tensor()).expect("fused");
        let composed = softmax_composed(x.as_tensor()).expect("composed");
        close(&fused, &composed, 1e-6);
        let g1 = (fused * &w)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("b1");
        let g2 = (composed * &w)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("b2");
        close(
            g1.get(x.as_tensor()).expect("g1"),
            g2.get(x.as_tensor()).expect("g2"),
            1e-5,
        );
    }

    #[test]
    fn rope_matches_candle_rope() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (1, 2, 5, 8);
        let x = Tensor::randn(0f32, 1., (b, h, t, d), &dev).expect("x");
        let (cos, sin) = rope_tables(d, 10_000.0, 0, t, &dev).expect("tables");
        let ours = apply_rope(&x, &cos, &sin).expect("ours");
        let c = cos
            .narrow(1, 0, d / 2)
            .and_then(|t| t.contiguous())
            .expect("c");
        let s = sin
            .narrow(1, 0, d / 2)
            .and_then(|t| t.contiguous())
            .expect("s");
        let theirs = candle_nn::rotary_emb::rope(&x, &c, &s).expect("theirs");
        close(&ours, &theirs, 1e-5);
    }
}
