//! A differentiable BERT encoder with Hugging Face's sequence-classification head, for
//! all-MiniLM-L6-v2 and other BERT checkpoints. LayerNorm, GELU and softmax are plain tensor ops so
//! gradients reach every LoRA matrix.
//!
//! The head is exactly `BertForSequenceClassification`'s: the `[CLS]` position's hidden state goes
//! through the checkpoint's frozen pooler (`tanh(W_p·h + b_p)`), then the trained linear
//! classifier. An adapter trained here therefore scores the same when a PEFT user loads it with
//! `AutoModelForSequenceClassification` + `PeftModel.from_pretrained` (a mean-pooling head, as
//! sentence-transformers use, would silently become a different model there).

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

use crate::lora::{attach_to_layers, merge_layers, LoraConfig, LoraLinear, Target};
use crate::ops::{gelu, layer_norm, softmax_last};
use crate::rng::SeededRng;
use crate::weights::Weights;
use crate::{Result, TrainError};

/// Hyper-parameters, as in a Hugging Face BERT `config.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Learned positions.
    pub max_position_embeddings: usize,
    /// Segment types.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

/// Hugging Face module name (under `encoder.layer.N.`) of an adaptable projection; BERT has no gate.
pub fn hf_module(t: Target) -> Option<&'static str> {
    Some(match t {
        Target::Q => "attention.self.query",
        Target::K => "attention.self.key",
        Target::V => "attention.self.value",
        Target::O => "attention.output.dense",
        Target::Up => "intermediate.dense",
        Target::Down => "output.dense",
        Target::Gate => return None,
    })
}

/// The projections of one layer in order q, k, v, o, up, down.
pub const LAYER_TARGETS: [Target; 6] = [
    Target::Q,
    Target::K,
    Target::V,
    Target::O,
    Target::Up,
    Target::Down,
];

/// One encoder layer.
#[derive(Debug, Clone)]
pub struct BertLayer {
    /// q, k, v, o, up (intermediate), down (output).
    pub proj: [LoraLinear; 6],
    /// LayerNorm after attention (weight, bias).
    pub ln1: (Tensor, Tensor),
    /// LayerNorm after the MLP (weight, bias).
    pub ln2: (Tensor, Tensor),
}

/// Encoder plus classification head.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    /// Hyper-parameters.
    pub cfg: BertConfig,
    word: Tensor,
    pos: Tensor,
    typ: Tensor,
    emb_ln: (Tensor, Tensor),
    /// Encoder layers.
    pub layers: Vec<BertLayer>,
    /// Pooler `(hidden, hidden)` weight and bias, frozen (as PEFT leaves it).
    pub pooler: (Tensor, Tensor),
    /// Classifier weight `(labels, hidden)`, trained fully (PEFT's `modules_to_save`).
    pub head_w: Var,
    /// Classifier bias `(labels,)`.
    pub head_b: Var,
}

impl BertClassifier {
    /// From Hugging Face-named tensors (with or without a `bert.` prefix) and a fresh head.
    pub fn from_weights(
        cfg: BertConfig,
        mut w: Weights,
        num_labels: usize,
        seed: u64,
    ) -> Result<Self> {
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(TrainError::BadModel(
                "hidden_size must be a multiple of num_attention_heads".into(),
            ));
        }
        if num_labels < 2 {
            return Err(TrainError::invalid("a classifier needs at least 2 labels"));
        }
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let mut take = |n: &str| w.take(&format!("{prefix}{n}"));
        let word = take("embeddings.word_embeddings.weight")?;
        Weights::expect_shape("word_embeddings", &word, &[cfg.vocab_size, cfg.hidden_size])?;
        let pos = take("embeddings.position_embeddings.weight")?;
        let typ = take("embeddings.token_type_embeddings.weight")?;
        let emb_ln = (
            take("embeddings.LayerNorm.weight")?,
            take("embeddings.LayerNorm.bias")?,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut proj = Vec::with_capacity(6);
            for t in LAYER_TARGETS {
                let m = hf_module(t).unwrap_or_default();
                let wt = take(&format!("encoder.layer.{l}.{m}.weight"))?;
                let b = take(&format!("encoder.layer.{l}.{m}.bias"))?;
                proj.push(LoraLinear::frozen(wt, Some(b)));
            }
            let proj: [LoraLinear; 6] = proj
                .try_into()
                .map_err(|_| TrainError::BadModel("internal: projection count".into()))?;
            layers.push(BertLayer {
                proj,
                ln1: (
                    take(&format!(
                        "encoder.layer.{l}.attention.output.LayerNorm.weight"
                    ))?,
                    take(&format!(
                        "encoder.layer.{l}.attention.output.LayerNorm.bias"
                    ))?,
                ),
                ln2: (
                    take(&format!("encoder.layer.{l}.output.LayerNorm.weight"))?,
                    take(&format!("encoder.layer.{l}.output.LayerNorm.bias"))?,
                ),
            });
        }
        let pooler = (take("pooler.dense.weight")?, take("pooler.dense.bias")?);
        Weights::expect_shape(
            "pooler.dense.weight",
            &pooler.0,
            &[cfg.hidden_size, cfg.hidden_size],
        )?;
        let dev = word.device().clone();
        let mut rng = SeededRng::fork(seed, "classifier-head");
        let head_w =
            Var::from_tensor(&rng.normal_tensor((num_labels, cfg.hidden_size), 0.02, &dev)?)?;
        let head_b = Var::from_tensor(&Tensor::zeros(num_labels, DType::F32, &dev)?)?;
        Ok(BertClassifier {
            cfg,
            word,
            pos,
            typ,
            emb_ln,
            layers,
            pooler,
            head_w,
            head_b,
        })
    }

    /// A Hugging Face model directory (`config.json`, `*.safetensors`).
    pub fn from_hf_dir(dir: &Path, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| TrainError::io(format!("reading {}", cfg_path.display()), e))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| TrainError::json(format!("parsing {}", cfg_path.display()), e))?;
        let w = Weights::from_safetensors_dir(dir, device)?;
        BertClassifier::from_weights(cfg, w, num_labels, seed)
    }

    /// A randomly initialised model (tests).
    pub fn random(cfg: BertConfig, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = SeededRng::fork(seed, "bert-init");
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let mut w = Weights::default();
        let ones = Tensor::ones(h, DType::F32, device)?;
        let zeros = Tensor::zeros(h, DType::F32, device)?;
        w.insert(
            "embeddings.word_embeddings.weight",
            rng.normal_tensor((cfg.vocab_size, h), 0.5, device)?,
        );
        w.insert(
            "embeddings.position_embeddings.weight",
            rng.normal_tensor((cfg.max_position_embeddings, h), 0.1, device)?,
        );
        w.insert(
            "embeddings.token_type_embeddings.weight",
            rng.normal_tensor((cfg.type_vocab_size, h), 0.1, device)?,
        );
        w.insert("embeddings.LayerNorm.weight", ones.clone());
        w.insert("embeddings.LayerNorm.bias", zeros.clone());
        for l in 0..cfg.num_hidden_layers {
            for (t, (o, inp)) in
                LAYER_TARGETS
                    .iter()
                    .zip([(h, h), (h, h), (h, h), (h, h), (i, h), (h, i)])
            {
                let m = hf_module(*t).unwrap_or_default();
                w.insert(
                    format!("encoder.layer.{l}.{m}.weight"),
                    rng.normal_tensor((o, inp), 1.0 / (inp as f32).sqrt(), device)?,
                );
                w.insert(
                    format!("encoder.layer.{l}.{m}.bias"),
                    rng.normal_tensor((1, o), 0.02, device)?.squeeze(0)?,
                );
            }
            for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
                w.insert(format!("encoder.layer.{l}.{ln}.weight"), ones.clone());
                w.insert(format!("encoder.layer.{l}.{ln}.bias"), zeros.clone());
            }
        }
        w.insert(
            "pooler.dense.weight",
            rng.normal_tensor((h, h), 1.0 / (h as f32).sqrt(), device)?,
        );
        w.insert("pooler.dense.bias", zeros.clone());
        BertClassifier::from_weights(cfg, w, num_labels, seed)
    }

    /// Attaches fresh adapters (a `gate` target is ignored: BERT has none).
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let layers = self.layers.iter_mut().map(|l| &mut l.proj[..]);
        attach_to_layers(layers, &LAYER_TARGETS, cfg, seed)
    }

    /// Folds every adapter into its base weight.
    pub fn merge_lora(&mut self) -> Result<()> {
        merge_layers(self.layers.iter_mut().map(|l| &mut l.proj[..]))
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.word.device()
    }

    /// Final hidden states `(batch, seq, hidden)`; `mask` is 1 for real tokens, 0 for padding.
    pub fn encode(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(TrainError::invalid(format!(
                "sequence of {t} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let h = self.cfg.hidden_size;
        let nh = self.cfg.num_attention_heads;
        let hd = h / nh;
        let eps = self.cfg.layer_norm_eps;
        let words = self
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let pos = self.pos.narrow(0, 0, t)?;
        let typ = self.typ.narrow(0, 0, 1)?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&typ)?;
        let mut x = layer_norm(&x, &self.emb_ln.0, &self.emb_ln.1, eps)?;
        // Additive key mask (b, 1, 1, t): 0 for real tokens, -1e9 for padding; skipped when nothing
        // is padded (fixed-length batches), saving a broadcast over every attention score.
        let mask = mask.to_dtype(DType::F32)?;
        let padded = mask.sum_all()?.to_scalar::<f32>()? < (b * t) as f32;
        let key_mask = if padded {
            Some(((mask - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers {
            let heads = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(layer.proj[0].forward(&x, rng.as_deref_mut())?)?;
            let k = heads(layer.proj[1].forward(&x, rng.as_deref_mut())?)?;
            let v = heads(layer.proj[2].forward(&x, rng.as_deref_mut())?)?;
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &key_mask {
                scores = scores.broadcast_add(m)?;
            }
            let ctx = softmax_last(&scores)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, h))?;
            let a = layer.proj[3].forward(&ctx, rng.as_deref_mut())?;
            x = layer_norm(&(a + &x)?, &layer.ln1.0, &layer.ln1.1, eps)?;
            let m = gelu(&layer.proj[4].forward(&x, rng.as_deref_mut())?)?;
            let m = layer.proj[5].forward(&m, rng.as_deref_mut())?;
            x = layer_norm(&(m + &x)?, &layer.ln2.0, &layer.ln2.1, eps)?;
        }
        Ok(x)
    }

    /// Class logits `(batch, labels)`: `classifier(tanh(pooler([CLS])))`, as Hugging Face's
    /// `BertForSequenceClassification` computes them (its dropout is off in evaluation).
    pub fn logits(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        rng: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let hs = self.encode(ids, mask, rng)?;
        let cls = hs.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled =
            crate::ops::frozen_linear(&cls, &self.pooler.0, Some(&self.pooler.1))?.tanh()?;
        Ok(pooled
            .matmul(&self.head_w.as_tensor().t()?)?
            .broadcast_add(self.head_b.as_tensor())?)
    }

    /// Mean cross-entropy of the labels.
    pub fn loss(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        labels: &Tensor,
        rng: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        crate::xent::cross_entropy(&self.logits(ids, mask, rng)?, labels)
    }
}

/// A small random config for tests.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 32,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_does_not_change_logits() {
        let dev = Device::Cpu;
        let m = BertClassifier::random(tiny_config(), 2, 1, &dev).expect("model");
        let a = Tensor::new(&[[2u32, 7, 9, 3]], &dev).expect("a");
        let ma = Tensor::new(&[[1f32, 1., 1., 1.]], &dev).expect("ma");
        let p = Tensor::new(&[[2u32, 7, 9, 3, 0, 0]], &dev).expect("p");
        let mp = Tensor::new(&[[1f32, 1., 1., 1., 0., 0.]], &dev).expect("mp");
        let la = m.logits(&a, &ma, None).expect("la");
        let lp = m.logits(&p, &mp, None).expect("lp");
        let d = (la - lp)
            .and_then(|d| d.abs()?.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("d");
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn too_long_input_is_an_error() {
        let dev = Device::Cpu;
        let m = BertClassifier::random(tiny_config(), 2, 1, &dev).expect("model");
        let ids = Tensor::zeros((1, 40), DType::U32, &dev).expect("ids");
        let mask = Tensor::ones((1, 40), DType::F32, &dev).expect("mask");
        assert!(m.logits(&ids, &mask, None).is_err());
    }
}
