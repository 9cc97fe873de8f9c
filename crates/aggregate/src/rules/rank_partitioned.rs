//! `rank-partitioned`: raFLoRA's fix for rank collapse. The rank dimension is split into the
//! partitions of the federation's public ranks (ranks 4, 8, 16 give rows/columns 0–4, 4–8, 8–16);
//! each partition of `A` and `B` is averaged only over the clients that hold it. The weight of a
//! partition travels in the same secure sum: each client appends one indicator per partition
//! (1 if its rank covers it, else 0) that secure aggregation multiplies by the client's weight, so
//! the revealed mean of indicator `p` is `Σ_{i holds p} n_i / Σ_i n_i`. Dividing the partition's
//! mean update by it gives `Σ_{i holds p} n_i Δ_i / Σ_{i holds p} n_i`. The indicators are public
//! (ranks are public): they take no clipping or noise.

use crate::rule::{
    check_trained, factor_manifest, AggregationRule, ClientProfile, ClientStart, Packer, RuleKind,
    Trainable, Unpacker, Upload, UploadSpec, PARTITION_WEIGHTS,
};
use crate::rules::zero_pad::{padded, partial_start};
use crate::tensor::Tensor;
use crate::{AggregateError, GlobalState, NamedTensors};

/// The rule.
#[derive(Debug, Clone, Copy)]
pub struct RankPartitioned;

/// Below this share of the weight a partition is left unchanged: no surviving client holds it.
const EMPTY_PARTITION: f64 = 1e-9;

/// Zeroes the rows (`A`) or columns (`B`) at and beyond `rank`.
fn keep_leading(t: &mut Tensor, rank: usize, rows: bool) -> Result<(), AggregateError> {
    let (r, c) = t.dims2()?;
    for i in 0..r {
        for j in 0..c {
            if (rows && i >= rank) || (!rows && j >= rank) {
                t.data[i * c + j] = 0.0;
            }
        }
    }
    Ok(())
}

impl AggregationRule for RankPartitioned {
    fn kind(&self) -> RuleKind {
        RuleKind::RankPartitioned
    }

    fn trainable(&self, _global: &GlobalState) -> Trainable {
        Trainable::ALL
    }

    fn manifest(&self, global: &GlobalState) -> Vec<UploadSpec> {
        let mut m = factor_manifest(&global.layout, true, true, true);
        m.push(UploadSpec {
            name: PARTITION_WEIGHTS.into(),
            shape: vec![global.layout.partitions.len()],
        });
        m
    }

    fn start(
        &self,
        global: &GlobalState,
        client: &ClientProfile,
        _local: Option<&NamedTensors>,
    ) -> Result<ClientStart, AggregateError> {
        partial_start(global, client)
    }

    /// Implements the partitioned upload: the update of the partitions the client holds (zero in
    /// the others), the head's update, and one indicator per partition.
    fn encode(
        &self,
        global: &GlobalState,
        start: &ClientStart,
        trained: &NamedTensors,
        client: &ClientProfile,
    ) -> Result<Upload, AggregateError> {
        check_trained(start, trained)?;
        let manifest = self.manifest(global);
        let mut p = Packer::new(&manifest);
        for (i, l) in global.layout.layers.iter().enumerate() {
            let (a, b) = padded(global, l, trained)?;
            let mut da = a.sub(global.a(i)?)?;
            let mut db = b.sub(global.b(i)?)?;
            keep_leading(&mut da, client.rank, true)?;
            keep_leading(&mut db, client.rank, false)?;
            p.push(&da)?;
            p.push(&db)?;
        }
        p.push_head_deltas(&global.layout, start, trained)?;
        let held: Vec<f32> = global
            .layout
            .partitions
            .iter()
            .map(|&hi| if hi <= client.rank { 1.0 } else { 0.0 })
            .collect();
        let parts = held.len();
        p.push(&Tensor::new(&[parts], held)?)?;
        p.finish(client.weight, parts)
    }

    /// Implements, per partition `p` with weight share `w_p > 0`: rows/columns of `p` increase by
    /// their mean update divided by `w_p`; the head by its plain mean update.
    fn decode(&self, global: &GlobalState, mean: &[f32]) -> Result<GlobalState, AggregateError> {
        let manifest = self.manifest(global);
        let mut u = Unpacker::new(&manifest, mean)?;
        let layout = &global.layout;
        let ranges = layout.partition_ranges();
        let parts = ranges.len();
        let weights = &mean[mean.len() - parts..];
        let factor = |row_or_col: usize| -> f64 {
            let p = ranges
                .iter()
                .position(|r| r.contains(&row_or_col))
                .unwrap_or(parts - 1);
            let w = f64::from(weights[p]);
            if w > EMPTY_PARTITION {
                1.0 / w
            } else {
                0.0
            }
        };
        let mut next = global.clone();
        next.round += 1;
        for l in &layout.layers {
            let da = u.next_tensor()?;
            let db = u.next_tensor()?;
            let a = next
                .tensors
                .get_mut(&l.a_name())
                .ok_or_else(|| AggregateError::MissingTensor(l.a_name()))?;
            for (i, row) in a.data.chunks_exact_mut(l.inp).enumerate() {
                let f = factor(i);
                for (x, d) in row.iter_mut().zip(&da.data[i * l.inp..(i + 1) * l.inp]) {
                    *x += (f64::from(*d) * f) as f32;
                }
            }
            let b = next
                .tensors
                .get_mut(&l.b_name())
                .ok_or_else(|| AggregateError::MissingTensor(l.b_name()))?;
            for (k, (x, d)) in b.data.iter_mut().zip(&db.data).enumerate() {
                *x += (f64::from(*d) * factor(k % layout.rank)) as f32;
            }
        }
        u.add_head_means(layout, &mut next)?;
        Ok(next)
    }
}
