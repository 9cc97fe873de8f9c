//! The bridge between a loaded candle model and the aggregation rules' named tensors
//! (`fedlora-aggregate`): the adapter layout of a model, loading a rule's start point (factors of
//! any rank, frozen or trained, the merged updates of the `exact` rule, the head) into the model,
//! and reading the trained adapter back out.

use candle_core::{DType, Device, Tensor, Var};
use fedlora_aggregate as agg;

use crate::lora::{LoraConfig, LoraPair};
use crate::model::{LoadedModel, Net};
use crate::trainer::TrainConfig;
use crate::{Result, TrainError};

/// PEFT names of the classifier head.
pub const HEAD_WEIGHT: &str = "base_model.model.classifier.weight";
/// PEFT name of the classifier bias.
pub const HEAD_BIAS: &str = "base_model.model.classifier.bias";

fn agg_err(e: agg::AggregateError) -> TrainError {
    TrainError::invalid(e.to_string())
}

/// A candle tensor as an aggregation tensor (f32, row-major).
pub fn to_agg(t: &Tensor) -> Result<agg::Tensor> {
    let data = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    agg::Tensor::new(t.dims(), data).map_err(agg_err)
}

/// An aggregation tensor on `device`.
pub fn to_candle(t: &agg::Tensor, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(&t.data, t.shape.as_slice(), device)?)
}

/// The adapter layout of `model` with LoRA settings `lora`: every projection `lora.targets` names,
/// at the largest of `ranks` (the federation's public ranks; `[lora.r]` for one rank), and the
/// classifier head of a BERT model.
pub fn adapter_layout(
    model: &LoadedModel,
    lora: &LoraConfig,
    ranks: &[usize],
) -> Result<agg::AdapterLayout> {
    lora.validate()?;
    let mut partitions: Vec<usize> = if ranks.is_empty() {
        vec![lora.r]
    } else {
        ranks.to_vec()
    };
    partitions.sort_unstable();
    partitions.dedup();
    let rank = *partitions.last().unwrap_or(&lora.r);
    let mut layers = Vec::new();
    for (module, target, p) in model.projections() {
        if lora.targets.contains(&target) {
            let (out, inp) = p.weight.dims2()?;
            crate::lora::check_rank(rank, out, inp, &module)?;
            layers.push(agg::LayerSpec { module, out, inp });
        }
    }
    if layers.is_empty() {
        return Err(TrainError::invalid(format!(
            "model {} has none of the LoRA targets {:?}",
            model.name, lora.targets
        )));
    }
    let mut head = Vec::new();
    if let Net::Bert(m) = &model.net {
        head.push(agg::HeadSpec {
            name: HEAD_WEIGHT.into(),
            shape: m.head_w.dims().to_vec(),
            init: agg::HeadInit::Normal,
        });
        head.push(agg::HeadSpec {
            name: HEAD_BIAS.into(),
            shape: m.head_b.dims().to_vec(),
            init: agg::HeadInit::Zeros,
        });
    }
    let layout = agg::AdapterLayout {
        model: model.name.clone(),
        rank,
        alpha: lora.alpha,
        partitions,
        layers,
        head,
    };
    layout.validate().map_err(agg_err)?;
    Ok(layout)
}

/// A model that federated clients train from the rules' start points. It keeps the frozen base
/// weights as loaded, so each start point (e.g. the `exact` rule's merged updates) is applied to the
/// original weights and never accumulates.
#[derive(Debug, Clone)]
pub struct FederatedModel {
    /// The model (its adapters are replaced by [`FederatedModel::load`]).
    pub model: LoadedModel,
    layout: agg::AdapterLayout,
    base: Vec<Tensor>,
    dropout: f32,
}

impl FederatedModel {
    /// Wraps `model` (loaded without adapters) for `layout`, which must describe it.
    pub fn new(model: LoadedModel, layout: agg::AdapterLayout, dropout: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(TrainError::invalid("LoRA dropout must be in [0, 1)"));
        }
        let mut base = Vec::with_capacity(layout.layers.len());
        {
            let projections = model.projections();
            for l in &layout.layers {
                let (_, _, p) = projections
                    .iter()
                    .find(|(m, _, _)| *m == l.module)
                    .ok_or_else(|| {
                        TrainError::invalid(format!(
                            "adapter layer {} is not a projection of model {}",
                            l.module, model.name
                        ))
                    })?;
                if p.weight.dims2()? != (l.out, l.inp) {
                    return Err(TrainError::invalid(format!(
                        "adapter layer {} is {}x{}, the model's weight is {:?}",
                        l.module,
                        l.out,
                        l.inp,
                        p.weight.dims()
                    )));
                }
                base.push(p.weight.clone());
            }
        }
        if let Net::Bert(m) = &model.net {
            for (name, var) in [(HEAD_WEIGHT, &m.head_w), (HEAD_BIAS, &m.head_b)] {
                let spec = layout.head.iter().find(|h| h.name == name);
                if spec.map(|h| h.shape.as_slice()) != Some(var.dims()) {
                    return Err(TrainError::invalid(format!(
                        "the layout's head does not fit {name} {:?} of model {}",
                        var.dims(),
                        model.name
                    )));
                }
            }
        }
        Ok(FederatedModel {
            model,
            layout,
            base,
            dropout,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &agg::AdapterLayout {
        &self.layout
    }

    /// Loads a start point: every adapted projection gets `W0 (+ merged update)` and the given
    /// factors, trained or frozen as the rule says; the head takes the given values.
    pub fn load(&mut self, start: &agg::ClientStart) -> Result<()> {
        let device = self.device();
        let layout = self.layout.clone();
        let mut projections = self.model.projections_mut();
        for (l, w0) in layout.layers.iter().zip(&self.base) {
            let (_, _, p) = projections
                .iter_mut()
                .find(|(m, _, _)| *m == l.module)
                .ok_or_else(|| TrainError::invalid(format!("no projection {}", l.module)))?;
            p.weight = match start.base_delta.get(&l.delta_name()) {
                Some(d) => (w0 + to_candle(d, &device)?)?,
                None => w0.clone(),
            };
            let a = start.adapter.require(&l.a_name()).map_err(agg_err)?;
            let b = start.adapter.require(&l.b_name()).map_err(agg_err)?;
            p.lora = Some(LoraPair::from_factors(
                &to_candle(a, &device)?,
                &to_candle(b, &device)?,
                start.scale,
                self.dropout,
                start.train.a,
                start.train.b,
            )?);
        }
        if let Net::Bert(m) = &mut self.model.net {
            m.head_w = Var::from_tensor(&to_candle(
                start.adapter.require(HEAD_WEIGHT).map_err(agg_err)?,
                &device,
            )?)?;
            m.head_b = Var::from_tensor(&to_candle(
                start.adapter.require(HEAD_BIAS).map_err(agg_err)?,
                &device,
            )?)?;
        }
        Ok(())
    }

    /// The current adapter (every factor and the head) by name.
    pub fn adapter(&self) -> Result<agg::NamedTensors> {
        self.model
            .adapter_params()
            .into_iter()
            .map(|(n, v, _)| Ok((n, to_agg(v.as_tensor())?)))
            .collect()
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        match &self.model.net {
            Net::Llama(m) => m.device().clone(),
            Net::Bert(m) => m.device().clone(),
        }
    }
}

/// The training settings for `epochs` passes over `examples` examples: the step count that makes
/// them (at least one), with warmup capped at a tenth of the steps, so a client with a small shard
/// trains at the intended learning rate rather than inside a warmup it never leaves.
pub fn epochs_config(base: &TrainConfig, examples: usize, epochs: f64) -> Result<TrainConfig> {
    if !(epochs.is_finite() && epochs > 0.0) {
        return Err(TrainError::invalid(format!(
            "local epochs must be a positive number, got {epochs}"
        )));
    }
    if examples == 0 {
        return Err(TrainError::invalid("a client has no training examples"));
    }
    let batch = base.batch_size.min(examples).max(1);
    let steps = ((examples as f64 * epochs) / batch as f64).ceil().max(1.0) as usize;
    Ok(TrainConfig {
        steps,
        batch_size: batch,
        warmup_steps: base.warmup_steps.min(steps / 10),
        ..base.clone()
    })
}

/// The IID split of the merge-count study: `examples` indices shuffled with `seed` and dealt into
/// `clients` disjoint shares whose sizes differ by at most one (so no example is dropped and the
/// total training data is the same for every `clients`).
pub fn iid_shards(examples: usize, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    if clients == 0 {
        return Err(TrainError::invalid("at least one client is needed"));
    }
    if clients > examples {
        return Err(TrainError::invalid(format!(
            "{clients} clients but only {examples} training examples: every client needs at least one (lower --clients or raise --train-examples)"
        )));
    }
    let mut order: Vec<usize> = (0..examples).collect();
    crate::rng::SeededRng::fork(seed, "iid-shards").shuffle(&mut order);
    let mut shards = vec![Vec::with_capacity(examples / clients + 1); clients];
    for (k, i) in order.into_iter().enumerate() {
        shards[k % clients].push(i);
    }
    Ok(shards)
}

/// What a PEFT export of a global state wrote.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct ExportReport {
    /// The PEFT adapter directory.
    pub dir: std::path::PathBuf,
    /// `exact` rule: the merged update of each frozen weight (safetensors, PEFT module names
    /// with `.weight`), next to the adapter.
    pub merged_delta: Option<std::path::PathBuf>,
    /// `exact` rule: relative Frobenius error of the rank-r truncation over all layers,
    /// `‖ΔW − s·B·A‖ / ‖ΔW‖`.
    pub truncation_error: Option<f64>,
}

pub use agg::peft::MERGED_DELTA_FILE;

/// Writes `state` as a PEFT adapter into `dir` ([`fedlora_aggregate::peft::export`]: the same
/// files the server writes), each file atomically. For `exact`, the merged update is written whole
/// (`merged_delta.safetensors`) and the adapter is its best rank-r truncation, with the error.
pub fn export_peft(
    state: &agg::GlobalState,
    lora: &LoraConfig,
    dir: &std::path::Path,
) -> Result<ExportReport> {
    let files = agg::peft::export(state, lora.dropout).map_err(agg_err)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| TrainError::io(format!("creating {}", dir.display()), e))?;
    let write = |name: &str, bytes: &[u8]| {
        crate::adapter::write_atomic(&dir.join(name), |p| {
            std::fs::write(p, bytes)
                .map_err(|e| TrainError::io(format!("writing {}", p.display()), e))
        })
    };
    write(agg::peft::WEIGHTS_FILE, &files.weights)?;
    write(agg::peft::CONFIG_FILE, files.config.as_bytes())?;
    let merged_delta = match &files.merged_delta {
        Some(bytes) => {
            write(MERGED_DELTA_FILE, bytes)?;
            Some(dir.join(MERGED_DELTA_FILE))
        }
        None => None,
    };
    Ok(ExportReport {
        dir: dir.to_path_buf(),
        merged_delta,
        truncation_error: files.truncation_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::Target;

    fn tiny() -> (LoadedModel, LoraConfig) {
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::V],
        };
        (LoadedModel::tiny_bert(2, 1).expect("model"), lora)
    }

    #[test]
    fn a_loaded_start_is_read_back_unchanged_and_frozen_factors_are_not_trained() {
        let (model, lora) = tiny();
        let layout = adapter_layout(&model, &lora, &[]).expect("layout");
        assert_eq!(layout.layers.len(), 4); // 2 layers x (q, v)
        let g = agg::GlobalState::initial(layout.clone(), agg::RuleKind::FrozenA, 3).expect("g");
        let rule = agg::RuleKind::FrozenA.rule();
        let profile = agg::ClientProfile { rank: 4, weight: 1 };
        let start = rule.start(&g, &profile, None).expect("start");
        let mut fm = FederatedModel::new(model, layout, 0.0).expect("fm");
        fm.load(&start).expect("load");
        assert_eq!(fm.adapter().expect("adapter"), start.adapter);
        // Frozen A: the optimizer sees only B and the head.
        let names: Vec<String> = fm.model.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.iter().all(|n| !n.ends_with("lora_A.weight")),
            "{names:?}"
        );
        assert_eq!(names.len(), 4 + 2);
    }

    #[test]
    fn the_exact_rules_merged_update_is_applied_to_the_original_weights_only() {
        let (model, lora) = tiny();
        let layout = adapter_layout(&model, &lora, &[]).expect("layout");
        let mut g = agg::GlobalState::initial(layout.clone(), agg::RuleKind::Exact, 3).expect("g");
        let d = layout.layers[0].delta_name();
        g.tensors.get_mut(&d).expect("delta").data[0] = 1.5;
        let start = agg::RuleKind::Exact
            .rule()
            .start(&g, &agg::ClientProfile { rank: 4, weight: 1 }, None)
            .expect("start");
        let w0 = model.projections()[0].2.weight.clone();
        let mut fm = FederatedModel::new(model, layout, 0.0).expect("fm");
        fm.load(&start).expect("load");
        fm.load(&start).expect("load twice");
        let w = &fm.model.projections()[0].2.weight;
        let diff = (w - &w0)
            .expect("d")
            .flatten_all()
            .expect("f")
            .to_vec1::<f32>()
            .expect("v");
        assert!((diff[0] - 1.5).abs() < 1e-6 && diff[1..].iter().all(|x| x.abs() < 1e-6));
    }

    #[test]
    fn iid_shards_are_disjoint_near_equal_and_cover_everything() {
        let s = iid_shards(10, 3, 4).expect("shards");
        let mut all: Vec<usize> = s.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 3, 3]);
        assert_eq!(s, iid_shards(10, 3, 4).expect("again"));
        let e = iid_shards(3, 4, 0).expect_err("too many clients");
        assert!(e.to_string().contains("only 3 training examples"), "{e}");
    }

    #[test]
    fn an_exact_export_truncates_the_merged_update_and_reports_the_error() {
        let (model, lora) = tiny();
        let layout = adapter_layout(&model, &lora, &[]).expect("layout");
        let mut g = agg::GlobalState::initial(layout.clone(), agg::RuleKind::Exact, 3).expect("g");
        // A rank-1 merged update: the rank-4 truncation is exact.
        for l in &layout.layers {
            let d = g.tensors.get_mut(&l.delta_name()).expect("delta");
            for i in 0..l.out {
                for j in 0..l.inp {
                    d.data[i * l.inp + j] = (i as f32 + 1.0) * 0.01 * (j as f32 - 2.0);
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("fedlora-export-{}", std::process::id()));
        let rep = export_peft(&g, &lora, &dir).expect("export");
        assert!(rep.truncation_error.expect("error") < 1e-4);
        assert!(dir.join(MERGED_DELTA_FILE).exists());
        // fedlora's own PEFT reader loads what the pure exporter wrote, every tensor used.
        let mut fresh = LoadedModel::tiny_bert(2, 1).expect("model");
        let back = crate::adapter::load_adapter(&mut fresh, &dir).expect("load");
        assert_eq!((back.r, back.targets.clone()), (4, lora.targets.clone()));
        drop(model);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn epochs_become_steps_with_a_short_warmup() {
        let base = TrainConfig {
            batch_size: 16,
            warmup_steps: 10,
            ..TrainConfig::default()
        };
        let c = epochs_config(&base, 100, 2.0).expect("cfg");
        assert_eq!((c.steps, c.batch_size, c.warmup_steps), (13, 16, 1));
        let c = epochs_config(&base, 4, 1.0).expect("cfg");
        assert_eq!((c.steps, c.batch_size, c.warmup_steps), (1, 4, 0));
        assert!(epochs_config(&base, 4, 0.0).is_err());
        assert!(epochs_config(&base, 0, 1.0).is_err());
    }
}
