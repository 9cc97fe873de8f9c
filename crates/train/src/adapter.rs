//! Adapter files in Hugging Face PEFT's format: `adapter_model.safetensors` with PEFT tensor names
//! (`base_model.model.<module>.lora_A.weight`, ...) and `adapter_config.json` (`r`, `lora_alpha`,
//! `target_modules`, ...). Files are written under a temporary name and renamed, so a crash never
//! leaves a half-written adapter.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::lora::{LoraConfig, Target};
use crate::model::{LoadedModel, Net};
use crate::{Result, TrainError};

/// Weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The subset of PEFT's `LoraConfig` we write and read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM` or `SEQ_CLS`.
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout.
    pub lora_dropout: f32,
    /// Module-name suffixes (`q_proj`, `query`, ...).
    pub target_modules: Vec<String>,
    /// Fully trained modules (the classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Base model name.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Always `none`.
    #[serde(default = "none")]
    pub bias: String,
    /// Always false (weights are `(out, in)`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Written true, as PEFT does for saved adapters.
    #[serde(default)]
    pub inference_mode: bool,
}

fn none() -> String {
    "none".into()
}

fn module_name(bert: bool, t: Target) -> &'static str {
    if bert {
        match t {
            Target::Q => "query",
            Target::K => "key",
            Target::V => "value",
            Target::O => "attention.output.dense",
            Target::Up => "intermediate.dense",
            Target::Down => "output.dense",
            Target::Gate => "gate",
        }
    } else {
        match t {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }
}

fn parse_module(s: &str) -> Result<Target> {
    match s {
        "attention.output.dense" => Ok(Target::O),
        "intermediate.dense" => Ok(Target::Up),
        "output.dense" => Ok(Target::Down),
        other => other.parse(),
    }
}

impl AdapterConfig {
    /// The config for a model and LoRA settings.
    pub fn new(model: &LoadedModel, lora: &LoraConfig) -> Self {
        let bert = model.is_classifier();
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: if bert { "SEQ_CLS" } else { "CAUSAL_LM" }.into(),
            r: lora.r,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: lora
                .targets
                .iter()
                .map(|t| module_name(bert, *t).to_string())
                .collect(),
            modules_to_save: bert.then(|| vec!["classifier".to_string()]),
            base_model_name_or_path: Some(model.name.clone()),
            bias: none(),
            fan_in_fan_out: false,
            inference_mode: true,
        }
    }

    /// Back to our LoRA settings.
    pub fn lora(&self) -> Result<LoraConfig> {
        if self.peft_type != "LORA" {
            return Err(TrainError::invalid(format!(
                "adapter peft_type `{}` is not LORA",
                self.peft_type
            )));
        }
        let mut targets = self
            .target_modules
            .iter()
            .map(|s| parse_module(s))
            .collect::<Result<Vec<_>>>()?;
        targets.sort();
        targets.dedup();
        let cfg = LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Every adapter tensor of a model by PEFT name, in [`LoadedModel::adapter_params`] order (frozen
/// factors included: they are part of the adapter a PEFT user loads).
pub fn adapter_tensors(model: &LoadedModel) -> Vec<(String, Tensor)> {
    model
        .adapter_params()
        .into_iter()
        .map(|(n, v, _)| (n, v.as_tensor().clone()))
        .collect()
}

/// Concatenates named tensors into one f32 vector (the order of `tensors`).
pub fn flatten(tensors: &[(String, Tensor)]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (_, t) in tensors {
        out.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Splits a flat vector back into tensors shaped like `template`.
pub fn unflatten(
    template: &[(String, Tensor)],
    flat: &[f32],
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let total: usize = template.iter().map(|(_, t)| t.elem_count()).sum();
    if total != flat.len() {
        return Err(TrainError::invalid(format!(
            "flat adapter has {} values, the layout needs {total}",
            flat.len()
        )));
    }
    let mut at = 0;
    let mut out = Vec::with_capacity(template.len());
    for (n, t) in template {
        let k = t.elem_count();
        out.push((
            n.clone(),
            Tensor::from_slice(&flat[at..at + k], t.dims(), device)?,
        ));
        at += k;
    }
    Ok(out)
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves it half-written.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let r = write(&tmp);
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return r;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        TrainError::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })
}

/// Saves the model's adapter into directory `dir` (created if needed).
pub fn save_adapter(model: &LoadedModel, lora: &LoraConfig, dir: &Path) -> Result<()> {
    let tensors = adapter_tensors(model);
    if tensors.is_empty() {
        return Err(TrainError::invalid("the model has no adapter to save"));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| TrainError::io(format!("creating {}", dir.display()), e))?;
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    write_atomic(&dir.join(WEIGHTS_FILE), |p| {
        candle_core::safetensors::save(&map, p)
            .map_err(|e| TrainError::BadModel(format!("writing {}: {e}", p.display())))
    })?;
    let cfg = AdapterConfig::new(model, lora);
    let json = serde_json::to_string_pretty(&cfg)
        .map_err(|e| TrainError::json("serializing adapter config", e))?;
    write_atomic(&dir.join(CONFIG_FILE), |p| {
        std::fs::write(p, json).map_err(|e| TrainError::io(format!("writing {}", p.display()), e))
    })
}

/// Reads an adapter directory: its config and tensors.
pub fn read_adapter(
    dir: &Path,
    device: &Device,
) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    let cp = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cp)
        .map_err(|e| TrainError::io(format!("reading {}", cp.display()), e))?;
    let cfg: AdapterConfig = serde_json::from_str(&text)
        .map_err(|e| TrainError::json(format!("parsing {}", cp.display()), e))?;
    let wp = dir.join(WEIGHTS_FILE);
    if !wp.exists() {
        return Err(TrainError::invalid(format!("{} is missing", wp.display())));
    }
    let map = candle_core::safetensors::load(&wp, device)
        .map_err(|e| TrainError::BadModel(format!("{}: {e}", wp.display())))?;
    Ok((cfg, map))
}

/// Attaches adapters shaped by the file's config and loads their values. Every tensor the model
/// expects must be present with the right shape, and every tensor in the file must be used.
pub fn load_adapter(model: &mut LoadedModel, dir: &Path) -> Result<LoraConfig> {
    let device = match &model.net {
        Net::Llama(m) => m.device().clone(),
        Net::Bert(m) => m.device().clone(),
    };
    let (cfg, mut map) = read_adapter(dir, &device)?;
    let lora = cfg.lora()?;
    if (cfg.task_type == "SEQ_CLS") != model.is_classifier() {
        return Err(TrainError::invalid(format!(
            "adapter task_type {} does not fit model {}",
            cfg.task_type, model.name
        )));
    }
    model.attach_lora(&lora, 0)?;
    for (name, var, _) in model.adapter_params() {
        let t = map
            .remove(&name)
            .ok_or_else(|| TrainError::invalid(format!("adapter lacks tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(TrainError::invalid(format!(
                "adapter tensor {name} has shape {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    if let Some(extra) = map.keys().next() {
        return Err(TrainError::invalid(format!(
            "adapter tensor {extra} does not belong to this model"
        )));
    }
    Ok(lora)
}
