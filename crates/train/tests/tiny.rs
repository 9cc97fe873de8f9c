//! Fast tests on tiny randomly initialised models built in code (no assets): the base is frozen,
//! autograd agrees with finite differences, an untrained adapter changes nothing, training
//! lowers the loss, and adapters survive a save/load round trip in PEFT format.

use candle_core::{Tensor, Var};
use fedlora_train::adapter::{
    adapter_tensors, flatten, load_adapter, read_adapter, save_adapter, unflatten,
};
use fedlora_train::data::{Encoded, Example};
use fedlora_train::model::{LoadedModel, Net};
use fedlora_train::rng::SeededRng;
use fedlora_train::trainer::{batch_loss, train, TrainConfig};
use fedlora_train::{LoraConfig, Target};

fn all_targets(dropout: f32) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: Target::ALL.to_vec(),
    }
}

fn gen_examples() -> Vec<Example> {
    (0..16)
        .map(|i| Example::Gen {
            prompt: format!("n{}", i % 4),
            answer: format!("ab{}", "c".repeat(i % 4 + 1)),
        })
        .collect()
}

fn class_examples() -> Vec<Example> {
    (0..32)
        .map(|i| {
            let label = i % 2;
            let text = if label == 1 {
                format!("buy cheap pills now {i}")
            } else {
                format!("meeting notes for the team {i}")
            };
            Example::Class { text, label }
        })
        .collect()
}

fn loss_of(model: &LoadedModel, refs: &[&Encoded]) -> f32 {
    batch_loss(model, refs)
        .expect("loss")
        .to_scalar::<f32>()
        .expect("scalar")
}

/// Gives every B a random value so that gradients of A are non-zero too.
fn randomize_b(model: &LoadedModel, seed: u64, std: f32) {
    let mut rng = SeededRng::new(seed);
    for (name, v) in model.trainable() {
        if name.contains("lora_B") {
            let (o, r) = v.dims2().expect("dims");
            v.set(&rng.normal_tensor((o, r), std, v.device()).expect("t"))
                .expect("set");
        }
    }
}

fn base_weights(model: &LoadedModel) -> Vec<Tensor> {
    match &model.net {
        Net::Llama(m) => m
            .layers
            .iter()
            .flat_map(|l| l.proj.iter().map(|p| p.weight.clone()))
            .chain([m.embed.clone()])
            .collect(),
        Net::Bert(m) => m
            .layers
            .iter()
            .flat_map(|l| l.proj.iter().map(|p| p.weight.clone()))
            .collect(),
    }
}

fn check_gradients_only_on_lora(mut model: LoadedModel, examples: &[Example]) {
    model.attach_lora(&all_targets(0.0), 1).expect("attach");
    randomize_b(&model, 2, 0.5);
    let enc = model.encode(examples, 32).expect("encode");
    let refs: Vec<&Encoded> = enc.iter().take(4).collect();
    let loss = batch_loss(&model, &refs).expect("loss");
    let grads = loss.backward().expect("backward");
    let params = model.trainable();
    assert!(!params.is_empty());
    for (name, v) in &params {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let n = g
            .sqr()
            .and_then(|s| s.sum_all())
            .and_then(|s| s.to_scalar::<f32>())
            .expect("norm");
        assert!(n > 0.0 && n.is_finite(), "{name} gradient norm {n}");
    }
    for w in base_weights(&model) {
        assert!(
            grads.get(&w).is_none(),
            "a frozen base weight received a gradient"
        );
    }
}

#[test]
fn llama_gradients_reach_every_lora_matrix_and_no_base_weight() {
    check_gradients_only_on_lora(LoadedModel::tiny_llama(1).expect("model"), &gen_examples());
}

#[test]
fn bert_gradients_reach_every_lora_matrix_and_no_base_weight() {
    check_gradients_only_on_lora(
        LoadedModel::tiny_bert(2, 1).expect("model"),
        &class_examples(),
    );
}

/// Central differences in f64 around f32 parameters.
fn finite_difference(model: &LoadedModel, refs: &[&Encoded], v: &Var, idx: usize, eps: f32) -> f64 {
    let orig = v
        .as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("vals");
    let dims = v.dims().to_vec();
    let eval_at = |delta: f32| {
        let mut vals = orig.clone();
        vals[idx] += delta;
        v.set(&Tensor::from_vec(vals, dims.as_slice(), v.device()).expect("t"))
            .expect("set");
        f64::from(loss_of(model, refs))
    };
    let plus = eval_at(eps);
    let minus = eval_at(-eps);
    eval_at(0.0);
    (plus - minus) / (2.0 * f64::from(eps))
}

fn check_finite_differences(mut model: LoadedModel, examples: &[Example]) {
    model.attach_lora(&all_targets(0.0), 3).expect("attach");
    // Moderate B keeps the loss close to quadratic at the step size below.
    randomize_b(&model, 4, 0.1);
    let enc = model.encode(examples, 32).expect("encode");
    let refs: Vec<&Encoded> = enc.iter().take(3).collect();
    let loss = batch_loss(&model, &refs).expect("loss");
    let grads = loss.backward().expect("backward");
    let params = model.trainable();
    let mut checked = 0;
    for (name, v) in params.iter() {
        let g = grads
            .get(v.as_tensor())
            .expect("grad")
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("g");
        // The entry with the largest gradient: a well-conditioned comparison.
        let (idx, &ga) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .expect("max");
        // eps = 1e-3: small enough for the strongly curved attention logits of a random model,
        // large enough that f32 rounding of the loss (~1e-7 relative) stays below 1e-3.
        let fd = finite_difference(&model, &refs, v, idx, 1e-3);
        let err = (fd - f64::from(ga)).abs();
        assert!(
            err <= 0.02 * f64::from(ga.abs()) + 2e-3,
            "{name}[{idx}]: autograd {ga} vs finite difference {fd}"
        );
        checked += 1;
    }
    assert_eq!(checked, params.len());
}

#[test]
fn llama_autograd_matches_finite_differences() {
    check_finite_differences(LoadedModel::tiny_llama(5).expect("model"), &gen_examples());
}

#[test]
fn bert_autograd_matches_finite_differences() {
    check_finite_differences(
        LoadedModel::tiny_bert(3, 5).expect("model"),
        &class_examples(),
    );
}

#[test]
fn untrained_adapter_leaves_outputs_unchanged() {
    let model = LoadedModel::tiny_llama(6).expect("model");
    let enc = model.encode(&gen_examples(), 32).expect("encode");
    let refs: Vec<&Encoded> = enc.iter().take(4).collect();
    let before = loss_of(&model, &refs);
    let mut with = model.clone();
    with.attach_lora(&all_targets(0.0), 7).expect("attach");
    let after = loss_of(&with, &refs);
    assert_eq!(before, after);
}

fn check_loss_falls(mut model: LoadedModel, examples: &[Example], lr: f64) {
    model
        .attach_lora(
            &LoraConfig {
                dropout: 0.0,
                ..all_targets(0.0)
            },
            8,
        )
        .expect("attach");
    let enc = model.encode(examples, 32).expect("encode");
    let cfg = TrainConfig {
        steps: 40,
        batch_size: 8,
        lr,
        warmup_steps: 4,
        seed: 9,
        ..TrainConfig::default()
    };
    let rep = train(&model, &enc, &cfg).expect("train");
    assert!(
        rep.final_loss < 0.7 * rep.first_loss,
        "loss {} -> {}",
        rep.first_loss,
        rep.final_loss
    );
    assert!(rep.tokens_per_second > 0.0);
}

#[test]
fn training_lowers_llama_loss() {
    check_loss_falls(
        LoadedModel::tiny_llama(10).expect("model"),
        &gen_examples(),
        2e-2,
    );
}

#[test]
fn training_lowers_bert_loss() {
    check_loss_falls(
        LoadedModel::tiny_bert(2, 10).expect("model"),
        &class_examples(),
        2e-2,
    );
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let run = || {
        let mut model = LoadedModel::tiny_llama(11).expect("model");
        model.attach_lora(&all_targets(0.1), 12).expect("attach");
        let enc = model.encode(&gen_examples(), 32).expect("encode");
        let cfg = TrainConfig {
            steps: 5,
            batch_size: 4,
            seed: 13,
            ..TrainConfig::default()
        };
        train(&model, &enc, &cfg).expect("train");
        flatten(&adapter_tensors(&model)).expect("flat")
    };
    assert_eq!(run(), run());
}

#[test]
fn adapter_round_trips_through_peft_files() {
    for (mut model, examples) in [
        (LoadedModel::tiny_llama(20).expect("llama"), gen_examples()),
        (
            LoadedModel::tiny_bert(2, 20).expect("bert"),
            class_examples(),
        ),
    ] {
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::V, Target::Down],
        };
        let pristine = model.clone();
        model.attach_lora(&lora, 21).expect("attach");
        let enc = model.encode(&examples, 32).expect("encode");
        let cfg = TrainConfig {
            steps: 3,
            batch_size: 4,
            lr: 1e-2,
            ..TrainConfig::default()
        };
        train(&model, &enc, &cfg).expect("train");
        let dir = std::env::temp_dir().join(format!(
            "fedlora-adapter-{}-{}",
            std::process::id(),
            model.name
        ));
        save_adapter(&model, &lora, &dir).expect("save");
        let (cfg_file, tensors) = read_adapter(&dir, &candle_core::Device::Cpu).expect("read");
        assert_eq!(cfg_file.r, 2);
        assert!(tensors.keys().all(|k| k.starts_with("base_model.model.")));
        assert!(tensors.keys().any(|k| k.ends_with(".lora_A.weight")));

        // A fresh copy of the base model with the adapter loaded computes the same loss.
        let mut loaded = pristine.clone();
        let lora_back = load_adapter(&mut loaded, &dir).expect("load");
        assert_eq!(lora_back, lora);
        assert_eq!(
            flatten(&adapter_tensors(&loaded)).expect("a"),
            flatten(&adapter_tensors(&model)).expect("b")
        );
        let refs: Vec<&Encoded> = enc.iter().take(4).collect();
        let l1 = loss_of(&model, &refs);
        let l2 = loss_of(&loaded, &refs);
        assert_eq!(l1, l2);

        // Merging folds the adapter into the base without changing outputs.
        let mut merged = loaded.clone();
        merged.merge_lora().expect("merge");
        let l3 = loss_of(&merged, &refs);
        assert!((l1 - l3).abs() < 1e-4, "{l1} vs merged {l3}");

        // The flat vector a federated client uploads round-trips too.
        let named = adapter_tensors(&model);
        let flat = flatten(&named).expect("flat");
        let back = unflatten(&named, &flat, &candle_core::Device::Cpu).expect("unflatten");
        assert_eq!(flatten(&back).expect("again"), flat);
        assert!(unflatten(&named, &flat[1..], &candle_core::Device::Cpu).is_err());

        // A wrong model for the file is a clear error, not a panic.
        let mut other = if model.is_classifier() {
            LoadedModel::tiny_llama(1).expect("other")
        } else {
            LoadedModel::tiny_bert(2, 1).expect("other")
        };
        assert!(load_adapter(&mut other, &dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
