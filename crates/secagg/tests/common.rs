//! Shared helpers for the round tests.
#![allow(dead_code, clippy::unwrap_used)]

use fedlora_secagg::harness::{Harness, Outcome};
use fedlora_secagg::{ClientInput, RoundConfig, RoundParams, Stage, TensorSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A manifest of two tensors totalling `len` values.
pub fn manifest(len: u32) -> Vec<TensorSpec> {
    let a = len / 2;
    vec![
        TensorSpec {
            name: "lora_A".into(),
            shape: vec![a],
        },
        TensorSpec {
            name: "lora_B".into(),
            shape: vec![len - a],
        },
    ]
}

pub fn config(n: u32, len: u32, params: RoundParams) -> RoundConfig {
    RoundConfig {
        round: 1,
        nonce: [42; 32],
        num_clients: n,
        params,
        manifest: manifest(len),
    }
}

/// Random inputs in [-1, 1] with weights in 1..=weight_bound.
pub fn inputs(n: u32, len: u32, weight_bound: u32, seed: u64) -> Vec<ClientInput> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| ClientInput {
            values: (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            weight: rng.random_range(1..=weight_bound),
        })
        .collect()
}

/// The exact weighted mean of the given clients' (already in-range) inputs.
pub fn weighted_mean(inputs: &[ClientInput], who: &[u32]) -> Vec<f64> {
    let len = inputs[0].values.len();
    let mut acc = vec![0f64; len];
    let mut wsum = 0f64;
    for &i in who {
        let inp = &inputs[i as usize];
        for (a, v) in acc.iter_mut().zip(&inp.values) {
            *a += f64::from(inp.weight) * f64::from(*v);
        }
        wsum += f64::from(inp.weight);
    }
    acc.iter().map(|a| a / wsum).collect()
}

/// Runs a round and, if it finished, checks the aggregate against the plaintext reference of the
/// survivors within the stated bound. Returns the outcome.
pub fn run_and_check(
    config: RoundConfig,
    inputs: Vec<ClientInput>,
    drop_at: Vec<Option<Stage>>,
    seed: u64,
) -> (Outcome, Harness) {
    let mut h = Harness::new(config, inputs.clone(), drop_at, seed).unwrap();
    let outcome = h.run(None);
    assert!(
        h.server_errors.is_empty(),
        "server errors: {:?}",
        h.server_errors
    );
    if let Outcome::Finished(agg) = &outcome {
        assert!(
            h.client_errors.is_empty(),
            "client errors: {:?}",
            h.client_errors
        );
        let reference = weighted_mean(&inputs, &agg.survivors);
        let expected_wsum: u64 = agg
            .survivors
            .iter()
            .map(|&i| u64::from(inputs[i as usize].weight))
            .sum();
        assert_eq!(agg.weight_sum, expected_wsum);
        let worst = agg
            .mean
            .iter()
            .zip(&reference)
            .map(|(m, r)| (f64::from(*m) - r).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= agg.error_bound + 1e-6,
            "error {worst} > bound {}",
            agg.error_bound
        );
    }
    (outcome, h)
}
