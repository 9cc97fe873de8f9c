//! A differentiable llama-family causal LM (SmolLM2, Llama 3.x) that we own: RMSNorm, rotary
//! embeddings and softmax are built from plain tensor ops so gradients reach every LoRA matrix,
//! which candle-transformers' fused kernels would silently cut.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::lora::{attach_to_layers, merge_layers, LoraConfig, LoraLinear, Target};
use crate::ops::{apply_rope, frozen_linear, rms_norm, softmax_last};
use crate::rng::SeededRng;
use crate::weights::Weights;
use crate::{Result, TrainError};

/// Llama 3's long-context frequency rescaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    /// Scaling factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Pretraining context length.
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters, as in a Hugging Face `config.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Llama 3 RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}

impl LlamaConfig {
    /// `(out, in)` of each layer projection, in [`Target::ALL`] order (q, k, v, o, gate, up, down).
    pub fn projection_shapes(&self) -> [(usize, usize); 7] {
        let h = self.hidden_size;
        let q_out = self.num_attention_heads * self.head_dim();
        let kv_out = self.kv_heads() * self.head_dim();
        let i = self.intermediate_size;
        [
            (q_out, h),
            (kv_out, h),
            (kv_out, h),
            (h, q_out),
            (i, h),
            (i, h),
            (h, i),
        ]
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rejects inconsistent shapes up front, so a bad config is an error rather than a panic.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::BadModel(format!("llama config: {m}")));
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("zero-sized dimension");
        }
        if self.kv_heads() == 0 || self.num_attention_heads % self.kv_heads() != 0 {
            return bad("num_attention_heads must be a multiple of num_key_value_heads");
        }
        if self.head_dim() % 2 != 0 {
            return bad("head_dim must be even for rotary embeddings");
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, with Llama 3 scaling applied when configured.
    pub fn inv_freqs(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LlamaLayer {
    /// Projections, in [`Target`] order: q, k, v, o, gate, up, down.
    pub proj: [LoraLinear; 7],
    /// Pre-attention RMSNorm weight.
    pub attn_norm: Tensor,
    /// Pre-MLP RMSNorm weight.
    pub mlp_norm: Tensor,
}

/// Keys and values of past positions, for incremental (greedy) decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already cached.
    pub len: usize,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Llama {
    /// Hyper-parameters.
    pub cfg: LlamaConfig,
    /// Token embeddings `(vocab, hidden)`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<LlamaLayer>,
    /// Final RMSNorm weight.
    pub norm: Tensor,
    /// LM head `(vocab, hidden)`; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    inv_freq: Vec<f64>,
}

/// Hugging Face module name of a projection, for PEFT tensor names.
pub fn hf_module(t: Target) -> &'static str {
    match t {
        Target::Q => "self_attn.q_proj",
        Target::K => "self_attn.k_proj",
        Target::V => "self_attn.v_proj",
        Target::O => "self_attn.o_proj",
        Target::Gate => "mlp.gate_proj",
        Target::Up => "mlp.up_proj",
        Target::Down => "mlp.down_proj",
    }
}

impl Llama {
    /// Builds the model from Hugging Face-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn from_weights(cfg: LlamaConfig, mut w: Weights) -> Result<Self> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let embed = w.take("model.embed_tokens.weight")?;
        Weights::expect_shape("model.embed_tokens.weight", &embed, &[cfg.vocab_size, h])?;
        let shapes = cfg.projection_shapes();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut proj = Vec::with_capacity(7);
            for (t, (o, inp)) in Target::ALL.iter().zip(shapes) {
                let name = format!("model.layers.{l}.{}.weight", hf_module(*t));
                let wt = w.take(&name)?;
                Weights::expect_shape(&name, &wt, &[o, inp])?;
                let bias = w.take_opt(&format!("model.layers.{l}.{}.bias", hf_module(*t)));
                proj.push(LoraLinear::frozen(wt, bias));
            }
            let proj: [LoraLinear; 7] = proj
                .try_into()
                .map_err(|_| TrainError::BadModel("internal: projection count".into()))?;
            layers.push(LlamaLayer {
                proj,
                attn_norm: w.take(&format!("model.layers.{l}.input_layernorm.weight"))?,
                mlp_norm: w.take(&format!("model.layers.{l}.post_attention_layernorm.weight"))?,
            });
        }
        let norm = w.take("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            w.take_opt("lm_head.weight")
        };
        let inv_freq = cfg.inv_freqs();
        Ok(Llama {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// A Hugging Face model directory: `config.json` plus `*.safetensors`.
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| TrainError::io(format!("reading {}", cfg_path.display()), e))?;
        let cfg: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| TrainError::json(format!("parsing {}", cfg_path.display()), e))?;
        let w = Weights::from_safetensors_dir(dir, device)?;
        Llama::from_weights(cfg, w)
    }

    /// A randomly initialised model (for tests and benchmarks without assets).
    pub fn random(cfg: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = SeededRng::fork(seed, "llama-init");
        let mut w = Weights::default();
        let h = cfg.hidden_size;
        w.insert(
            "model.embed_tokens.weight",
            rng.normal_tensor((cfg.vocab_size, h), 0.5, device)?,
        );
        let shapes = cfg.projection_shapes();
        for l in 0..cfg.num_hidden_layers {
            for (t, (o, inp)) in Target::ALL.iter().zip(shapes) {
                let std = 1.0 / (inp as f32).sqrt();
                w.insert(
                    format!("model.layers.{l}.{}.weight", hf_module(*t)),
                    rng.normal_tensor((o, inp), std, device)?,
                );
            }
            w.insert(
                format!("model.layers.{l}.input_layernorm.weight"),
                Tensor::ones(h, DType::F32, device)?,
            );
            w.insert(
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                Tensor::ones(h, DType::F32, device)?,
            );
        }
        w.insert("model.norm.weight", Tensor::ones(h, DType::F32, device)?);
        Llama::from_weights(cfg, w)
    }

    /// Attaches fresh LoRA adapters to the configured projections of every layer.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let layers = self.layers.iter_mut().map(|l| &mut l.proj[..]);
        attach_to_layers(layers, &Target::ALL, cfg, seed)
    }

    /// Folds every adapter into its base weight.
    pub fn merge_lora(&mut self) -> Result<()> {
        merge_layers(self.layers.iter_mut().map(|l| &mut l.proj[..]))
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Final hidden states `(batch, seq, hidden)` (after the last RMSNorm).
    ///
    /// `mask` `(batch, seq_total)` is 1 for real tokens and 0 for padding (right padding);
    /// `cache` enables incremental decoding; `rng` turns LoRA dropout on (training).
    pub fn hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        mut rng: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dev = self.device().clone();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let total = start + t;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
        );
        let rep = nh / nkv;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let (cos, sin) = self.rope(start, t, &dev)?;
        let attn_mask = causal_mask(b, t, start, mask, &dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        if let Some(c) = cache.as_deref_mut() {
            if c.kv.len() != self.layers.len() {
                c.kv = vec![None; self.layers.len()];
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = rms_norm(&x, &layer.attn_norm, self.cfg.rms_norm_eps)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(layer.proj[0].forward(&hn, rng.as_deref_mut())?, nh)?;
            let k = heads(layer.proj[1].forward(&hn, rng.as_deref_mut())?, nkv)?;
            let v = heads(layer.proj[2].forward(&hn, rng.as_deref_mut())?, nkv)?;
            let q = apply_rope(&q, &cos, &sin)?;
            let mut k = apply_rope(&k, &cos, &sin)?;
            let mut v = v;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &c.kv[li] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                c.kv[li] = Some((k.clone(), v.clone()));
            }
            // Grouped-query attention without copying K/V per query head: query head h uses
            // kv head h / rep, so folding the `rep` heads of a group into the time axis lets one
            // batched matmul serve the whole group.
            let qg = q.reshape((b, nkv, rep * t, hd))?;
            let scores = (qg.matmul(&k.t()?)? * scale)?.reshape((b, nh, t, total))?;
            let probs = softmax_last(&scores.broadcast_add(&attn_mask)?)?;
            let ctx = probs.reshape((b, nkv, rep * t, total))?.matmul(&v)?;
            let ctx = ctx
                .reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))?;
            x = (x + layer.proj[3].forward(&ctx, rng.as_deref_mut())?)?;
            let hn = rms_norm(&x, &layer.mlp_norm, self.cfg.rms_norm_eps)?;
            let g = layer.proj[4].forward(&hn, rng.as_deref_mut())?.silu()?;
            let u = layer.proj[5].forward(&hn, rng.as_deref_mut())?;
            x = (x + layer.proj[6].forward(&(g * u)?, rng.as_deref_mut())?)?;
        }
        if let Some(c) = cache {
            c.len = total;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// LM-head logits for hidden states of any leading shape.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        frozen_linear(hidden, self.lm_head.as_ref().unwrap_or(&self.embed), None)
    }

    /// Mean next-token cross-entropy over the positions `positions` (flat indices into
    /// `batch·seq`) whose targets are `targets`. Only those rows go through the LM head, which at
    /// a 49k vocabulary is the single largest matmul.
    pub fn lm_loss(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        positions: &Tensor,
        targets: &Tensor,
        rng: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let h = self.hidden(ids, Some(mask), None, rng)?;
        let (b, t, d) = h.dims3()?;
        let rows = h.reshape((b * t, d))?.index_select(positions, 0)?;
        let logits = self.logits(&rows)?;
        crate::xent::cross_entropy(&logits, targets)
    }

    fn rope(&self, start: usize, len: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let mut cos = Vec::with_capacity(len * hd);
        let mut sin = Vec::with_capacity(len * hd);
        for p in start..start + len {
            for _half in 0..2 {
                for f in &self.inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, hd), dev)?,
            Tensor::from_vec(sin, (len, hd), dev)?,
        ))
    }

    /// Logits of the last position, `(batch, vocab)`.
    pub fn last_logits(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden(ids, None, cache, None)?;
        let t = h.dim(1)?;
        self.logits(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}

/// Additive attention mask `(batch, 1, t, start + t)`: 0 where a query may attend, a large
/// negative number for future positions and padded keys.
fn causal_mask(
    b: usize,
    t: usize,
    start: usize,
    mask: Option<&Tensor>,
    dev: &Device,
) -> Result<Tensor> {
    let total = start + t;
    let keep: Option<Vec<Vec<f32>>> = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.to_vec2()?),
        None => None,
    };
    let mut data = vec![0f32; b * t * total];
    for bi in 0..b {
        for qi in 0..t {
            for ki in 0..total {
                let future = ki > start + qi;
                let padded = keep
                    .as_ref()
                    .is_some_and(|k| k[bi].get(ki).copied().unwrap_or(1.0) == 0.0);
                if future || padded {
                    data[(bi * t + qi) * total + ki] = -1e9;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, t, total), dev)?)
}

/// A small random config for tests.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 61,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_decoding_matches_full_forward() {
        let dev = Device::Cpu;
        let mut m = Llama::random(tiny_config(), 3, &dev).expect("model");
        m.attach_lora(&LoraConfig::default(), 1).expect("lora");
        let ids = Tensor::new(&[[3u32, 7, 11, 2, 5]], &dev).expect("ids");
        let full = m
            .logits(&m.hidden(&ids, None, None, None).expect("h"))
            .expect("logits");
        let mut cache = KvCache::default();
        let first = m
            .last_logits(&ids.narrow(1, 0, 3).expect("n"), Some(&mut cache))
            .expect("p");
        let d0 = (first.squeeze(0).expect("sq") - full.get(0).and_then(|x| x.get(2)).expect("g"))
            .and_then(|d| d.abs()?.max_all())
            .expect("d");
        assert!(d0.to_scalar::<f32>().expect("s") < 1e-4);
        let _ = m
            .last_logits(&ids.narrow(1, 3, 1).expect("n"), Some(&mut cache))
            .expect("step");
        let last = m
            .last_logits(&ids.narrow(1, 4, 1).expect("n"), Some(&mut cache))
            .expect("step");
        let d = (last.squeeze(0).expect("sq") - full.get(0).and_then(|x| x.get(4)).expect("g"))
            .and_then(|d| d.abs()?.max_all())
            .expect("d");
        assert!(d.to_scalar::<f32>().expect("s") < 1e-4);
        assert_eq!(cache.len, 5);
    }

    #[test]
    fn padding_does_not_change_real_positions() {
        let dev = Device::Cpu;
        let m = Llama::random(tiny_config(), 4, &dev).expect("model");
        let a = Tensor::new(&[[3u32, 7, 11]], &dev).expect("a");
        let padded = Tensor::new(&[[3u32, 7, 11, 0, 0]], &dev).expect("p");
        let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.]], &dev).expect("m");
        let ha = m.hidden(&a, None, None, None).expect("ha");
        let hp = m
            .hidden(&padded, Some(&mask), None, None)
            .expect("hp")
            .narrow(1, 0, 3)
            .expect("n");
        let d = (ha - hp)
            .and_then(|d| d.abs()?.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("d");
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn bad_config_is_an_error() {
        let mut c = tiny_config();
        c.num_key_value_heads = Some(3);
        assert!(Llama::random(c, 1, &Device::Cpu).is_err());
    }
}
