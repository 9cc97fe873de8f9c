//! A global state as the files a Hugging Face PEFT user loads: `adapter_model.safetensors` (PEFT
//! tensor names) and `adapter_config.json`. Pure: it returns bytes, the caller writes them, so the
//! server (which has no candle) and the command line write the same files.
//!
//! `exact` has no adapter of its own (its update is merged into the frozen weights): its files are
//! the merged update itself (`merged_delta.safetensors`, Hugging Face module names + `.weight`) and
//! its best rank-r truncation as a PEFT adapter, with the truncation error ([`crate::svd`]).
//! `share-a` has no global model: its adapter is the shared `A` with `B = 0`, which each client's
//! own `B` and head complete.

use std::collections::HashMap;

use serde::Serialize;

use crate::state::GlobalState;
use crate::tensor::Tensor;
use crate::{AggregateError, RuleKind};

/// Weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The `exact` rule's merged update.
pub const MERGED_DELTA_FILE: &str = "merged_delta.safetensors";

/// The files of one export.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftFiles {
    /// `adapter_model.safetensors`.
    pub weights: Vec<u8>,
    /// `adapter_config.json`.
    pub config: String,
    /// `merged_delta.safetensors` (`exact` only).
    pub merged_delta: Option<Vec<u8>>,
    /// `‖ΔW − s·B·A‖_F / ‖ΔW‖_F` over all layers (`exact` only).
    pub truncation_error: Option<f64>,
}

#[derive(Serialize)]
struct AdapterConfig<'a> {
    peft_type: &'a str,
    task_type: &'a str,
    r: usize,
    lora_alpha: f64,
    lora_dropout: f32,
    target_modules: Vec<String>,
    modules_to_save: Option<Vec<&'a str>>,
    base_model_name_or_path: &'a str,
    bias: &'a str,
    fan_in_fan_out: bool,
    inference_mode: bool,
}

struct F32View<'a>(&'a Tensor);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.0
            .data
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    }
    fn data_len(&self) -> usize {
        4 * self.0.data.len()
    }
}

fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, AggregateError> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), F32View(t))), None)
        .map_err(|e| AggregateError::Encoding(format!("safetensors: {e}")))
}

/// PEFT's `target_modules` entry for a module path: the part after the layer index, without the
/// attention/MLP container (`attention.self.query` → `query`, `self_attn.q_proj` → `q_proj`), the
/// full suffix where the last name alone is ambiguous (`attention.output.dense`).
pub fn target_module(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    let after = parts
        .iter()
        .rposition(|p| p.parse::<usize>().is_ok())
        .map_or(&parts[..], |i| &parts[i + 1..]);
    let mut s = after.join(".");
    for prefix in ["attention.self.", "self_attn.", "mlp."] {
        if let Some(rest) = s.strip_prefix(prefix) {
            s = rest.to_string();
        }
    }
    s
}

/// Builds the PEFT files of `state`; `lora_dropout` only fills the config.
pub fn export(state: &GlobalState, lora_dropout: f32) -> Result<PeftFiles, AggregateError> {
    let layout = &state.layout;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut merged: Vec<(String, Tensor)> = Vec::new();
    let (mut err_sq, mut total_sq) = (0f64, 0f64);
    for (i, l) in layout.layers.iter().enumerate() {
        if state.rule == RuleKind::Exact {
            let delta = state.tensors.require(&l.delta_name())?;
            let t =
                crate::svd::truncate(delta, layout.rank, layout.scale(), state.seed ^ i as u64)?;
            let norm = delta.norm_sq();
            err_sq += t.relative_error * t.relative_error * norm;
            total_sq += norm;
            tensors.push((l.a_name(), t.a));
            tensors.push((l.b_name(), t.b));
            let hf = l.module.trim_start_matches("base_model.model.");
            merged.push((format!("{hf}.weight"), delta.clone()));
        } else {
            tensors.push((l.a_name(), state.tensors.require(&l.a_name())?.clone()));
            tensors.push((l.b_name(), state.tensors.require(&l.b_name())?.clone()));
        }
    }
    for h in &layout.head {
        tensors.push((h.name.clone(), state.tensors.require(&h.name)?.clone()));
    }
    let mut targets: Vec<String> = layout
        .layers
        .iter()
        .map(|l| target_module(&l.module))
        .collect();
    targets.sort();
    targets.dedup();
    let classifier = !layout.head.is_empty();
    let cfg = AdapterConfig {
        peft_type: "LORA",
        task_type: if classifier { "SEQ_CLS" } else { "CAUSAL_LM" },
        r: layout.rank,
        lora_alpha: layout.alpha,
        lora_dropout,
        target_modules: targets,
        modules_to_save: classifier.then(|| vec!["classifier"]),
        base_model_name_or_path: &layout.model,
        bias: "none",
        fan_in_fan_out: false,
        inference_mode: true,
    };
    let config = serde_json::to_string_pretty(&cfg)
        .map_err(|e| AggregateError::Encoding(format!("adapter config: {e}")))?;
    let is_exact = state.rule == RuleKind::Exact;
    Ok(PeftFiles {
        weights: safetensors_bytes(&tensors)?,
        config,
        merged_delta: if is_exact {
            Some(safetensors_bytes(&merged)?)
        } else {
            None
        },
        truncation_error: is_exact.then(|| {
            if total_sq > 0.0 {
                (err_sq / total_sq).sqrt()
            } else {
                0.0
            }
        }),
    })
}

/// The names each file holds, for checks.
pub fn tensor_names(bytes: &[u8]) -> Result<HashMap<String, Vec<usize>>, AggregateError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| AggregateError::Encoding(format!("safetensors: {e}")))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::layout;

    #[test]
    fn target_modules_follow_peft_naming() {
        assert_eq!(
            target_module("base_model.model.bert.encoder.layer.3.attention.self.query"),
            "query"
        );
        assert_eq!(
            target_module("base_model.model.bert.encoder.layer.3.attention.output.dense"),
            "attention.output.dense"
        );
        assert_eq!(
            target_module("base_model.model.model.layers.12.self_attn.v_proj"),
            "v_proj"
        );
        assert_eq!(
            target_module("base_model.model.model.layers.0.mlp.gate_proj"),
            "gate_proj"
        );
    }

    #[test]
    fn every_rule_exports_its_factors_and_head() {
        for rule in RuleKind::ALL {
            let s = GlobalState::initial(layout(2, 6, 5, &[2, 4]), rule, 1).expect("state");
            let f = export(&s, 0.05).expect("export");
            let names = tensor_names(&f.weights).expect("names");
            assert_eq!(names.len(), 2 * 2 + 2, "{rule}");
            assert_eq!(names["m.layer.0.q.lora_A.weight"], vec![4, 5]);
            assert_eq!(f.merged_delta.is_some(), rule == RuleKind::Exact);
            assert!(f.config.contains("\"SEQ_CLS\""));
        }
    }
}
