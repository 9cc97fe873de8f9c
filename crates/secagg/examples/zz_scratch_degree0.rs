#![allow(clippy::unwrap_used)]
use fedlora_secagg::harness::{Harness, Outcome};
use fedlora_secagg::{params, ClientInput, RoundConfig, RoundParams, TensorSpec};
fn main() {
    let p = RoundParams { degree: 0, threshold: 1, ring_bits: 24, quant_bits: 19, clip: 1.0, weight_bound: 1 };
    println!("validate(degree 0, threshold 1, n = 10) = {:?}", params::validate(&p, 10));
    let cfg = RoundConfig { round: 1, nonce: [1; 32], num_clients: 10, params: p, manifest: vec![TensorSpec { name: "x".into(), shape: vec![3] }] };
    let inputs = (0..10).map(|i| ClientInput { values: vec![i as f32 / 10.0; 3], weight: 1 }).collect();
    let mut h = Harness::new(cfg, inputs, vec![], 1).unwrap();
    match h.run(None) { Outcome::Finished(a) => println!("finished: masks_removed {} (self masks only), survivors {:?}", a.masks_removed, a.survivors), o => println!("{o:?}") }
    let p3 = RoundParams { degree: 3, threshold: 3, ring_bits: 24, quant_bits: 19, clip: 1.0, weight_bound: 1 };
    println!("validate(degree 3 (odd), threshold 3, n = 10) = {:?}", params::validate(&p3, 10));
}
