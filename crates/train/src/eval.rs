//! Evaluation: mean loss for every task, accuracy for classification, exact match of the final
//! `#### N` answer for generation (the GSM8K rule).

use candle_core::D;
use serde::Serialize;

use crate::data::{final_answer, Encoded, Example};
use crate::generate::generate;
use crate::model::LoadedModel;
use crate::trainer::progress_bar;
use crate::Result;

/// Held-out figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    /// Examples scored.
    pub examples: usize,
    /// Mean per-example loss (classification) or per-token loss (generation).
    pub loss: f64,
    /// Fraction classified correctly (classification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Fraction whose generated `#### N` equals the reference (generation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Examples whose answer was generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated: Option<usize>,
}

/// Accuracy and loss of a classifier over `items`, `batch` at a time.
pub fn classify(
    model: &LoadedModel,
    items: &[Encoded],
    batch: usize,
    progress: bool,
) -> Result<EvalReport> {
    classify_with_predictions(model, items, batch, progress, None)
}

/// [`classify`], also collecting each item's predicted label into `predictions` (for checking a
/// model against another implementation example by example).
pub fn classify_with_predictions(
    model: &LoadedModel,
    items: &[Encoded],
    batch: usize,
    progress: bool,
    mut predictions: Option<&mut Vec<u32>>,
) -> Result<EvalReport> {
    // A merged copy records no autograd graph through the encoder (only the head is a variable).
    let mut merged = model.clone();
    merged.merge_lora()?;
    let model = &merged;
    let mut correct = 0usize;
    let mut loss_sum = 0f64;
    let bar = progress_bar(items.len() as u64, progress);
    bar.set_prefix("eval ");
    for chunk in items.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = model.collate(&refs, None)?;
        let crate::model::Net::Bert(m) = &model.net else {
            return Err(crate::TrainError::invalid("accuracy needs a classifier"));
        };
        let logits = m.logits(&b.ids, &b.mask, None)?;
        let labels = b
            .labels
            .as_ref()
            .ok_or_else(|| crate::TrainError::invalid("no labels"))?;
        let loss = candle_nn::loss::cross_entropy(&logits, labels)?.to_scalar::<f32>()?;
        loss_sum += f64::from(loss) * chunk.len() as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let gold = labels.to_vec1::<u32>()?;
        correct += pred.iter().zip(&gold).filter(|(p, g)| p == g).count();
        if let Some(out) = predictions.as_deref_mut() {
            out.extend_from_slice(&pred);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let n = items.len().max(1) as f64;
    Ok(EvalReport {
        examples: items.len(),
        loss: loss_sum / n,
        accuracy: Some(correct as f64 / n),
        exact_match: None,
        generated: None,
    })
}

/// Teacher-forced completion loss over `items`, plus exact match of greedy answers for the first
/// `generate_n` examples (generation is the slow part).
pub fn generative(
    model: &LoadedModel,
    items: &[Encoded],
    examples: &[Example],
    batch: usize,
    generate_n: usize,
    max_new: usize,
    progress: bool,
) -> Result<EvalReport> {
    // Score a merged copy: with no trainable variables left, candle records no autograd graph,
    // so activations are freed layer by layer instead of being held for a backward pass that
    // never comes (for SmolLM2 at batch 16 x 320 that graph is over 10 GB).
    let mut merged = model.clone();
    merged.merge_lora()?;
    let mut loss_sum = 0f64;
    let mut count = 0usize;
    for chunk in items.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = merged.collate(&refs, None)?;
        let n = b.targets.as_ref().map_or(0, |t| t.elem_count());
        if n == 0 {
            continue;
        }
        loss_sum += f64::from(merged.loss(&b, None)?.to_scalar::<f32>()?) * n as f64;
        count += n;
    }
    let todo: Vec<&Example> = examples.iter().take(generate_n).collect();
    let bar = progress_bar(todo.len() as u64, progress);
    bar.set_prefix("generate ");
    let mut hits = 0usize;
    for ex in &todo {
        if let Example::Gen { prompt, answer } = ex {
            let out = generate(&merged, prompt, max_new)?;
            if final_answer(&out).is_some() && final_answer(&out) == final_answer(answer) {
                hits += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(EvalReport {
        examples: items.len(),
        loss: if count == 0 {
            0.0
        } else {
            loss_sum / count as f64
        },
        accuracy: None,
        exact_match: if todo.is_empty() {
            None
        } else {
            Some(hits as f64 / todo.len() as f64)
        },
        generated: Some(todo.len()),
    })
}
