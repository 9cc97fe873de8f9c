//! Times the parts of one training step (forward, backward, optimizer) on MiniLM or SmolLM2 with
//! fixed-shape batches, for performance work. Needs the assets.
//!
//!     cargo run --release -p fedlora-train --example step_timing -- minilm 16 128 5

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use fedlora_train::model::{LoadedModel, ModelSpec, Net};
use fedlora_train::rng::SeededRng;
use fedlora_train::{LoraConfig, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("minilm", String::as_str);
    let b: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let t: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(128);
    let steps: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let threads = fedlora_train::threads::configure_threads(None);
    let dev = Device::Cpu;
    let mut model = LoadedModel::load(&ModelSpec::parse(which), 2, 0, &dev)?;
    model.attach_lora(
        &LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![Target::Q, Target::V],
        },
        0,
    )?;
    let vars = model
        .trainable()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-4,
            ..ParamsAdamW::default()
        },
    )?;
    let mut rng = SeededRng::new(1);
    let vocab = match &model.net {
        Net::Bert(m) => m.cfg.vocab_size,
        Net::Llama(m) => m.cfg.vocab_size,
    };
    let ids: Vec<u32> = (0..b * t)
        .map(|_| 1000 + rng.below(vocab - 1000) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    let mask = Tensor::ones((b, t), candle_core::DType::F32, &dev)?;
    let labels = Tensor::from_vec((0..b as u32).map(|i| i % 2).collect::<Vec<_>>(), b, &dev)?;
    let positions = Tensor::arange(0u32, (b * t) as u32, &dev)?;
    let targets = Tensor::from_vec(
        (0..b * t)
            .map(|_| rng.below(1000) as u32)
            .collect::<Vec<_>>(),
        b * t,
        &dev,
    )?;
    for s in 0..steps {
        let t0 = Instant::now();
        let loss = match &model.net {
            Net::Bert(m) => m.loss(&ids, &mask, &labels, None)?,
            Net::Llama(m) => m.lm_loss(&ids, &mask, &positions, &targets, None)?,
        };
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        let total = (t3 - t0).as_secs_f64();
        println!(
            "step {s}: forward {:.3}s backward {:.3}s update {:.3}s -> {:.0} tokens/s ({threads} threads)",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (b * t) as f64 / total
        );
    }
    Ok(())
}
