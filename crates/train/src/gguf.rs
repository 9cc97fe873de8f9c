//! Loading a llama-family model and its tokenizer from a llama.cpp GGUF file, dequantized to f32
//! for training.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::llama::{Llama, LlamaConfig};
use crate::tokenizer::BpeTokenizer;
use crate::weights::Weights;
use crate::{Result, TrainError};

/// llama.cpp stores the rows of `attn_q`/`attn_k` permuted so that rotary pairs are adjacent
/// (its RoPE layout); Hugging Face pairs dimension `i` with `i + head_dim/2`. This undoes
/// llama.cpp's `convert_hf_to_gguf` permutation:
/// `w.reshape((heads, hd/2, 2, in)).transpose(1, 2).reshape((out, in))`.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || out % (2 * heads) != 0 {
        return Err(TrainError::BadModel(format!(
            "cannot un-permute a {out}x{inp} weight over {heads} heads"
        )));
    }
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// A model and tokenizer read from one GGUF file.
#[derive(Debug)]
pub struct GgufModel {
    /// The model, f32.
    pub model: Llama,
    /// The tokenizer built from the GGUF vocabulary and merges.
    pub tokenizer: BpeTokenizer,
}

fn md_u(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    md.get(key)
        .and_then(|v| {
            v.to_u32()
                .ok()
                .map(|x| x as usize)
                .or_else(|| v.to_u64().ok().map(|x| x as usize))
        })
        .ok_or_else(|| TrainError::BadModel(format!("GGUF metadata lacks `{key}`")))
}

fn md_f(md: &HashMap<String, Value>, key: &str, default: f64) -> f64 {
    md.get(key)
        .and_then(|v| v.to_f32().ok())
        .map_or(default, f64::from)
}

/// Reads the file, dequantizes every tensor and builds the model and tokenizer.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel> {
    let (cfg, tensors, tokenizer) = read_gguf(path, device)?;
    let model = Llama::from_weights(cfg, Weights::from_map(tensors)?)?;
    Ok(GgufModel { model, tokenizer })
}

/// The config, the dequantized f32 tensors under Hugging Face names (q/k un-permuted) and the
/// tokenizer of a GGUF file.
pub fn read_gguf(
    path: &Path,
    device: &Device,
) -> Result<(LlamaConfig, HashMap<String, Tensor>, BpeTokenizer)> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| TrainError::io(format!("opening {}", path.display()), e))?;
    let content = Content::read(&mut file)
        .map_err(|e| TrainError::BadModel(format!("{}: {e}", path.display())))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(TrainError::BadModel(format!(
            "GGUF architecture `{arch}` is not llama"
        )));
    }
    let tokenizer = BpeTokenizer::from_gguf(md)?;
    let heads = md_u(md, "llama.attention.head_count")?;
    let kv_heads = md_u(md, "llama.attention.head_count_kv").unwrap_or(heads);
    let hidden = md_u(md, "llama.embedding_length")?;
    let cfg = LlamaConfig {
        vocab_size: md_u(md, "llama.vocab_size").unwrap_or(tokenizer.vocab_size()),
        hidden_size: hidden,
        intermediate_size: md_u(md, "llama.feed_forward_length")?,
        num_hidden_layers: md_u(md, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: md_u(md, "llama.attention.key_length").ok(),
        rms_norm_eps: md_f(md, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: md_f(md, "llama.rope.freq_base", 10_000.0),
        rope_scaling: None,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: tokenizer.bos,
        eos_token_id: tokenizer.eos.map(serde_json::Value::from),
    };
    let mut w = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| TrainError::BadModel(format!("{}: tensor {name}: {e}", path.display())))?;
        let t = q.dequantize(device)?;
        let hf = match hf_name(name) {
            Some(n) => n,
            None => continue, // e.g. rope_freqs: recomputed from the config.
        };
        let t = if name.ends_with("attn_q.weight") {
            unpermute_qk(&t, heads)?
        } else if name.ends_with("attn_k.weight") {
            unpermute_qk(&t, kv_heads)?
        } else {
            t
        };
        w.insert(hf, t);
    }
    Ok((cfg, w, tokenizer))
}

/// `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let module = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let dev = Device::Cpu;
        let (heads, hd, inp) = (3, 4, 2);
        let w = Tensor::arange(0f32, (heads * hd * inp) as f32, &dev)
            .and_then(|t| t.reshape((heads * hd, inp)))
            .expect("w");
        // llama.cpp's permute: reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in).
        let permuted = w
            .reshape((heads, 2, hd / 2, inp))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.reshape((heads * hd, inp)))
            .expect("p");
        let back = unpermute_qk(&permuted, heads).expect("u");
        assert_eq!(
            back.to_vec2::<f32>().expect("b"),
            w.to_vec2::<f32>().expect("w")
        );
        assert!(unpermute_qk(&w, 5).is_err());
    }

    #[test]
    fn names_map() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
