//! Greedy decoding with a KV cache (llama models). Merge adapters first
//! ([`crate::LoadedModel::merge_lora`]) so each step costs exactly the base model.

use candle_core::{Tensor, D};

use crate::data::{chat_prompt, end_of_turn};
use crate::llama::KvCache;
use crate::model::{LoadedModel, Net, Tok};
use crate::{Result, TrainError};

/// Greedy continuation of the ids `prompt`, at most `max_new` tokens, stopping at `stop`.
pub fn greedy_ids(
    model: &LoadedModel,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    let Net::Llama(m) = &model.net else {
        return Err(TrainError::invalid(
            "generation needs a llama-family (causal LM) model",
        ));
    };
    if prompt.is_empty() {
        return Err(TrainError::invalid("empty prompt"));
    }
    let dev = m.device().clone();
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    let mut input = Tensor::new(prompt, &dev)?.unsqueeze(0)?;
    for _ in 0..max_new {
        let logits = m.last_logits(&input, Some(&mut cache))?;
        let next = logits.argmax(D::Minus1)?.squeeze(0)?.to_scalar::<u32>()?;
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        input = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
    }
    Ok(out)
}

/// Greedy answer to a user prompt, framed the way training frames it (chat template when the
/// vocabulary has one).
pub fn generate(model: &LoadedModel, prompt: &str, max_new: usize) -> Result<String> {
    let Tok::Bpe(tok) = &model.tok else {
        return Err(TrainError::invalid(
            "generation needs a llama-family (causal LM) model",
        ));
    };
    let mut ids = Vec::new();
    if let (Some(b), None) = (tok.bos, tok.token_id("<|im_start|>")) {
        ids.push(b);
    }
    ids.extend(tok.encode(&chat_prompt(tok, prompt)));
    let stop: Vec<u32> = end_of_turn(tok).into_iter().chain(tok.eos).collect();
    let out = greedy_ids(model, &ids, max_new, &stop)?;
    Ok(tok.decode(&out))
}
