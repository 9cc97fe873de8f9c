//! Fused softmax cross-entropy. With a 49k-token vocabulary the logits of a SmolLM2 batch are
//! ~100 MB, and candle's composed `log_softmax` + `nll` makes about ten such temporaries forward
//! and backward. This op computes the per-row losses in one pass and, in backward, writes
//! `(softmax(z) - onehot(y)) · g` directly, as PyTorch's fused kernel does.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::{Result, TrainError};

#[derive(Debug, Clone)]
struct CrossEntropy {
    targets: Vec<u32>,
}

fn rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (n, v) = layout.shape().dims2()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: logits must be contiguous");
    };
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("cross-entropy: logits must be f32");
    };
    Ok((&data[start..end], n, v))
}

/// `log Σ exp(z)` of one row, max-shifted.
fn logsumexp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|z| (z - m).exp()).sum::<f32>().ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, n, v) = rows(storage, layout)?;
        let mut out = Vec::with_capacity(n);
        for (i, row) in data.chunks_exact(v).enumerate() {
            let y = self.targets[i] as usize;
            out.push(logsumexp(row) - row[y]);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let arg = arg.contiguous()?;
        let g = grad_res.to_vec1::<f32>()?;
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("cross-entropy: logits are not on the CPU");
        };
        let (data, n, v) = rows(cpu, layout)?;
        let mut grad = vec![0f32; n * v];
        for (i, (row, out)) in data
            .chunks_exact(v)
            .zip(grad.chunks_exact_mut(v))
            .enumerate()
        {
            let lse = logsumexp(row);
            for (o, z) in out.iter_mut().zip(row) {
                *o = (z - lse).exp() * g[i];
            }
            out[self.targets[i] as usize] -= g[i];
        }
        Ok(Some(Tensor::from_vec(grad, (n, v), arg.device())?))
    }
}

/// Mean cross-entropy of `logits` `(n, vocab)` against `targets` `(n,)`; fused on CPU, candle's
/// composed version elsewhere.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let t = targets.to_vec1::<u32>()?;
    if t.len() != n {
        return Err(TrainError::invalid(format!(
            "{} targets for {n} rows of logits",
            t.len()
        )));
    }
    if let Some(bad) = t.iter().find(|&&y| y as usize >= v) {
        return Err(TrainError::invalid(format!(
            "target id {bad} outside the vocabulary of {v}"
        )));
    }
    if !logits.device().is_cpu() || logits.dtype() != candle_core::DType::F32 {
        return Ok(candle_nn::loss::cross_entropy(logits, targets)?);
    }
    let per_row = logits
        .contiguous()?
        .apply_op1(CrossEntropy { targets: t })?;
    Ok(per_row.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_loss_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(3);
        let z = Var::from_tensor(&rng.normal_tensor((5, 11), 2.0, &dev).expect("z")).expect("var");
        let y = Tensor::new(&[0u32, 3, 10, 7, 3], &dev).expect("y");
        let ours = cross_entropy(z.as_tensor(), &y).expect("ours");
        let theirs = candle_nn::loss::cross_entropy(z.as_tensor(), &y).expect("theirs");
        let (a, b) = (
            ours.to_scalar::<f32>().expect("a"),
            theirs.to_scalar::<f32>().expect("b"),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let g1 = ours
            .backward()
            .expect("g1")
            .get(z.as_tensor())
            .expect("g")
            .to_vec2::<f32>()
            .expect("v");
        let g2 = theirs
            .backward()
            .expect("g2")
            .get(z.as_tensor())
            .expect("g")
            .to_vec2::<f32>()
            .expect("v");
        for (r1, r2) in g1.iter().zip(&g2) {
            for (x1, x2) in r1.iter().zip(r2) {
                assert!((x1 - x2).abs() < 1e-5, "{x1} vs {x2}");
            }
        }
        assert!(cross_entropy(
            z.as_tensor(),
            &Tensor::new(&[11u32, 0, 0, 0, 0], &dev).expect("t")
        )
        .is_err());
    }
}
