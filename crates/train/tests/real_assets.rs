//! Tests on the real shipped assets (fetched by `deploy/fetch-assets.sh`; CI runs it first).
//! Each test prints a skip message and passes when its asset is missing, so a checkout without
//! assets still builds and tests.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fedlora_train::data::{assets_dir, spam_task};
use fedlora_train::gguf::read_gguf;
use fedlora_train::llama::Llama;
use fedlora_train::model::{LoadedModel, ModelSpec, Net, MINILM_DIR, SMOLLM2_GGUF};
use fedlora_train::run::{evaluate, EvalConfig};
use fedlora_train::trainer::{train, TrainConfig};
use fedlora_train::weights::Weights;
use fedlora_train::{LoraConfig, Target};

fn asset_or_skip(rel: &str, test: &str) -> Option<std::path::PathBuf> {
    let p = assets_dir().join(rel);
    if p.exists() {
        Some(p)
    } else {
        // Written to the process's stderr directly: the test harness captures `eprintln!`, and a
        // skip must be visible in CI logs.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: asset {} missing; run deploy/fetch-assets.sh",
            p.display()
        );
        None
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

#[test]
fn smollm2_logits_match_stock_candle_models() {
    let Some(path) = asset_or_skip(SMOLLM2_GGUF, "smollm2_logits_match_stock_candle_models") else {
        return;
    };
    fedlora_train::threads::configure_threads(None);
    let dev = Device::Cpu;
    let (cfg, tensors, tok) = read_gguf(&path, &dev).expect("read gguf");
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads()
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(cfg.vocab_size, 49152);
    let ids =
        tok.encode("<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n");
    let input = Tensor::new(ids.as_slice(), &dev)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");

    let ours = Llama::from_weights(cfg.clone(), Weights::from_map(tensors.clone()).expect("w"))
        .expect("ours");
    let ours_logits = ours
        .last_logits(&input, None)
        .expect("ours fwd")
        .squeeze(0)
        .expect("sq");

    // 1) candle-transformers' f32 llama on the same (dequantized, un-permuted) weights: must agree
    //    to float rounding.
    let stock_cfg: candle_transformers::models::llama::LlamaConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads(), "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": 8192, "tie_word_embeddings": true
    }))
    .expect("stock config");
    let stock_cfg = stock_cfg.into_config(false);
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let stock =
        candle_transformers::models::llama::Llama::load(vb, &stock_cfg).expect("stock load");
    let mut cache =
        candle_transformers::models::llama::Cache::new(false, DType::F32, &stock_cfg, &dev)
            .expect("cache");
    let stock_logits = stock
        .forward(&input, 0, &mut cache)
        .expect("stock fwd")
        .squeeze(0)
        .expect("sq");
    let d = max_abs_diff(&ours_logits, &stock_logits);
    eprintln!(
        "max |ours - stock f32 llama| over {} logits: {d}",
        cfg.vocab_size
    );
    assert!(d < 1e-2, "logits differ by {d}");

    // 2) candle-transformers' quantized llama reading the GGUF directly (llama.cpp's own row
    //    layout and interleaved RoPE, Q4_1 weights, 8-bit activations): agreement here checks the
    //    q/k un-permutation; the tolerance covers the activation quantization.
    let mut f = std::fs::File::open(&path).expect("open");
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).expect("content");
    let mut q = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content, &mut f, &dev,
    )
    .expect("q");
    let q_logits = q.forward(&input, 0).expect("q fwd").squeeze(0).expect("sq");
    let top = |t: &Tensor| {
        t.argmax(0)
            .and_then(|x| x.to_scalar::<u32>())
            .expect("argmax")
    };
    let cos = {
        let dot = (&ours_logits * &q_logits)
            .and_then(|x| x.sum_all())
            .and_then(|x| x.to_scalar::<f32>())
            .expect("dot");
        let n = |t: &Tensor| {
            t.sqr()
                .and_then(|x| x.sum_all())
                .and_then(|x| x.to_scalar::<f32>())
                .expect("n")
                .sqrt()
        };
        dot / (n(&ours_logits) * n(&q_logits))
    };
    eprintln!(
        "vs quantized stock model: top-1 ours {} stock {}, cosine {cos}",
        top(&ours_logits),
        top(&q_logits)
    );
    assert_eq!(top(&ours_logits), top(&q_logits));
    assert!(cos > 0.99, "cosine {cos}");
}

#[test]
fn minilm_hidden_states_match_stock_candle_bert() {
    let Some(dir) = asset_or_skip(MINILM_DIR, "minilm_hidden_states_match_stock_candle_bert")
    else {
        return;
    };
    fedlora_train::threads::configure_threads(None);
    let dev = Device::Cpu;
    let model = LoadedModel::load(&ModelSpec::MiniLm, 2, 0, &dev).expect("load");
    let Net::Bert(ours) = &model.net else {
        panic!("not bert")
    };
    let fedlora_train::model::Tok::WordPiece(tok) = &model.tok else {
        panic!("not wordpiece")
    };
    let a = tok.encode(
        "Congratulations, you have won a free cruise! Reply now.",
        128,
    );
    let b = tok.encode("Minutes of the meeting are attached.", 128);
    let t = a.len();
    let mut ids = a.clone();
    ids.extend(b.iter().copied().chain(std::iter::repeat_n(0, t - b.len())));
    let mask: Vec<f32> = (0..2 * t)
        .map(|i| if i < t || i - t < b.len() { 1.0 } else { 0.0 })
        .collect();
    let ids = Tensor::from_vec(ids, (2, t), &dev).expect("ids");
    let mask = Tensor::from_vec(mask, (2, t), &dev).expect("mask");
    let ours_h = ours.encode(&ids, &mask, None).expect("ours");

    let text = std::fs::read_to_string(dir.join("config.json")).expect("config");
    let cfg: candle_transformers::models::bert::Config = serde_json::from_str(&text).expect("cfg");
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).expect("st");
    let w: HashMap<String, Tensor> = w.into_iter().collect();
    let vb = VarBuilder::from_tensors(w, DType::F32, &dev);
    let stock = candle_transformers::models::bert::BertModel::load(vb, &cfg).expect("stock");
    let types = ids.zeros_like().expect("types");
    let stock_h = stock
        .forward(&ids, &types, Some(&mask.to_dtype(DType::U32).expect("m")))
        .expect("stock fwd");
    // Compare real tokens only (padded rows are don't-care).
    let d_a = max_abs_diff(&ours_h.get(0).expect("a"), &stock_h.get(0).expect("a"));
    let nb = b.len();
    let d_b = max_abs_diff(
        &ours_h.get(1).and_then(|x| x.narrow(0, 0, nb)).expect("b"),
        &stock_h.get(1).and_then(|x| x.narrow(0, 0, nb)).expect("b"),
    );
    eprintln!("max |ours - stock bert| hidden: {d_a} / {d_b}");
    assert!(d_a < 1e-3 && d_b < 1e-3, "{d_a} {d_b}");
}

#[test]
fn short_lora_run_on_spam_beats_untrained_baseline() {
    if asset_or_skip(MINILM_DIR, "short_lora_run_on_spam").is_none()
        || asset_or_skip("spam-assassin/package/data", "short_lora_run_on_spam").is_none()
    {
        return;
    }
    let threads = fedlora_train::threads::configure_threads(None);
    let dev = Device::Cpu;
    let seed = 1;
    let mut data = spam_task(seed).expect("spam");
    assert_eq!(data.train.len() + data.test.len(), 6046);
    data.truncate(Some(640), Some(200));
    let mut model = LoadedModel::load(&ModelSpec::MiniLm, 2, seed, &dev).expect("load");
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: vec![Target::Q, Target::V],
    };
    model.attach_lora(&lora, seed).expect("attach");
    let max_len = 64;
    let train_set = model.encode(&data.train, max_len).expect("enc");
    let test_set = model.encode(&data.test, max_len).expect("enc");
    let ecfg = EvalConfig {
        batch_size: 50,
        ..EvalConfig::default()
    };
    let before = evaluate(&model, &data, &test_set, &ecfg).expect("before");
    let cfg = TrainConfig {
        steps: 40,
        batch_size: 16,
        lr: 2e-3,
        warmup_steps: 4,
        seed,
        ..TrainConfig::default()
    };
    let rep = train(&model, &train_set, &cfg).expect("train");
    let after = evaluate(&model, &data, &test_set, &ecfg).expect("after");
    let (b, a) = (before.accuracy.expect("acc"), after.accuracy.expect("acc"));
    eprintln!(
        "spam, MiniLM + LoRA r=8 q,v, {threads} thread(s): accuracy {b:.3} -> {a:.3}, loss {:.3} -> {:.3}, {:.0} tokens/s",
        rep.first_loss, rep.final_loss, rep.tokens_per_second
    );
    assert!(a > b + 0.05, "accuracy {b} -> {a}");
    assert!(a > 0.8, "accuracy after training {a}");
}

#[derive(serde::Deserialize)]
struct TokenCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct TokenFixture {
    cases: Vec<TokenCase>,
}

fn fixture(name: &str) -> TokenFixture {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("parse fixture")
}

/// The reference ids were produced by Hugging Face `transformers` (the SmolLM2 tokenizer it builds
/// from the same GGUF) and `tokenizers` (MiniLM's tokenizer.json); see the fixture files.
#[test]
fn tokenizers_match_hugging_face_reference_ids() {
    if let Some(path) = asset_or_skip(SMOLLM2_GGUF, "tokenizers_match_hugging_face_reference_ids") {
        let mut f = std::fs::File::open(&path).expect("open");
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).expect("content");
        let tok =
            fedlora_train::tokenizer::BpeTokenizer::from_gguf(&content.metadata).expect("tok");
        for case in fixture("smollm2_tokens.json").cases {
            assert_eq!(tok.encode(&case.text), case.ids, "{:?}", case.text);
            assert_eq!(tok.decode(&case.ids), case.text);
        }
    }
    if let Some(dir) = asset_or_skip(MINILM_DIR, "tokenizers_match_hugging_face_reference_ids") {
        let tok = fedlora_train::tokenizer::WordPiece::from_file(&dir.join("tokenizer.json"))
            .expect("tok");
        for case in fixture("minilm_tokens.json").cases {
            assert_eq!(tok.encode(&case.text, 512), case.ids, "{:?}", case.text);
        }
    }
}
