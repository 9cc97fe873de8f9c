//! End-to-end: a SecAgg+ round (fedlora-secagg's in-memory harness, real crypto) in which every
//! client clips its update, quantizes it, and adds its distributed discrete Gaussian noise share
//! inside the masks (protocol-spec §7.2). Two clients drop before sending their masked input, so
//! exactly the configured minimum of survivors remains.
//!
//! The same round is run twice with identical client seeds, once without the noise hook: the
//! stochastic rounding then draws the same bits, so the difference of the two unmasked sums is
//! exactly the survivors' summed noise. Its distribution is checked over all coordinates against
//! the configured aggregate variance, and the server's noised sum is checked to differ from the
//! clean sum almost everywhere.
#![allow(clippy::unwrap_used)]

use fedlora_dp::{
    add_discrete_gaussian_to_ring, calibrate, clip_l2_many, epsilon_from_rdp, max_quant_bits,
    ring_to_signed, CalibrationInput, PrivacyMode, Rational,
};
use fedlora_secagg::harness::{Harness, Outcome};
use fedlora_secagg::{Aggregate, Client, ClientInput, RoundConfig, RoundParams, Stage, TensorSpec};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const N: u32 = 8;
const MIN_SURVIVORS: u32 = 6;
const HALF: u32 = 1500;
const DIM: u64 = 2 * HALF as u64;
const COORD_CLIP: f32 = 1.0;
const L2_CLIP: f64 = 1.0;
const Z: f64 = 0.7;

/// The adapter the service uses to plug the sampler into the secagg client.
struct DiscreteGaussianNoise {
    sigma_sq: Rational,
}

impl fedlora_secagg::RingNoise for DiscreteGaussianNoise {
    fn add_noise(
        &mut self,
        words: &mut [u32],
        setup: &fedlora_secagg::wire::RoundSetup,
        rng: &mut dyn rand_core::CryptoRng,
    ) -> Result<(), String> {
        add_discrete_gaussian_to_ring(words, u32::from(setup.params.ring_bits), self.sigma_sq, rng)
            .map_err(|e| e.to_string())
    }
}

fn clipped_inputs(seed: u64) -> Vec<ClientInput> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..N)
        .map(|_| {
            // Values in [-0.05, 0.05): L2 norm about 1.6 > the clip norm 1, so clipping is active.
            let mut a: Vec<f32> = (0..HALF)
                .map(|_| ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1)
                .collect();
            let mut b: Vec<f32> = (0..HALF)
                .map(|_| ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1)
                .collect();
            let report = clip_l2_many(&mut [&mut a, &mut b], L2_CLIP).unwrap();
            assert!(report.clipped && report.norm_after <= L2_CLIP);
            a.extend(b);
            ClientInput {
                values: a,
                weight: 1,
            }
        })
        .collect()
}

fn run_round(params: RoundParams, inputs: &[ClientInput], noise: Option<Rational>) -> Aggregate {
    let config = RoundConfig {
        round: 1,
        nonce: [7; 32],
        num_clients: N,
        params,
        manifest: vec![
            TensorSpec {
                name: "lora_A".into(),
                shape: vec![HALF],
            },
            TensorSpec {
                name: "lora_B".into(),
                shape: vec![HALF],
            },
        ],
    };
    let mut master = ChaCha20Rng::seed_from_u64(99);
    let clients = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let mut rng = ChaCha20Rng::seed_from_u64(master.next_u64());
            let c = Client::new(i as u32, input.clone(), &mut rng);
            match noise {
                Some(sigma_sq) => c.with_noise(Box::new(DiscreteGaussianNoise { sigma_sq })),
                None => c,
            }
        })
        .collect();
    let mut drop_at = vec![None; N as usize];
    drop_at[3] = Some(Stage::MaskedInput);
    drop_at[6] = Some(Stage::MaskedInput);
    let mut h = Harness::with_clients(config, clients, drop_at).unwrap();
    let outcome = h.run(None);
    assert!(h.server_errors.is_empty(), "{:?}", h.server_errors);
    assert!(h.client_errors.is_empty(), "{:?}", h.client_errors);
    match outcome {
        Outcome::Finished(agg) => *agg,
        Outcome::Aborted(r) => panic!("round aborted: {r:?}"),
    }
}

#[test]
fn distributed_noise_in_secure_round_has_configured_variance() {
    let ring_bits = 32u32;
    let template = CalibrationInput {
        mode: PrivacyMode::Distributed,
        noise_multiplier: Z,
        clip_norm: L2_CLIP,
        quant_scale: 1.0,
        dim: DIM,
        num_clients: N,
        min_survivors: MIN_SURVIVORS,
        ring_bits,
        quant_bits: 2,
    };
    // Leave headroom for the noise in the ring (otherwise the sum could wrap).
    let quant_bits = max_quant_bits(&template, f64::from(COORD_CLIP), 1e-9)
        .unwrap()
        .unwrap();
    let plan = calibrate(&CalibrationInput {
        quant_bits,
        quant_scale: 2f64.powi(quant_bits as i32 - 1) / f64::from(COORD_CLIP),
        ..template
    })
    .unwrap();
    assert!(plan.wrap_probability_bound <= 1e-9);
    let params = RoundParams {
        degree: N - 1,
        threshold: 5,
        ring_bits: ring_bits as u8,
        quant_bits: quant_bits as u8,
        clip: COORD_CLIP,
        weight_bound: 1,
    };
    let inputs = clipped_inputs(5);
    let clean = run_round(params.clone(), &inputs, None);
    let noisy = run_round(params, &inputs, Some(plan.client_sigma_sq));
    assert_eq!(noisy.survivors, clean.survivors);
    assert_eq!(noisy.survivors.len() as u32, MIN_SURVIVORS);
    assert_eq!(noisy.weight_sum, clean.weight_sum);

    // The difference of the unmasked sums is the survivors' summed noise.
    let noise: Vec<f64> = noisy
        .sum
        .iter()
        .zip(&clean.sum)
        .map(|(a, b)| ring_to_signed(a.wrapping_sub(*b), ring_bits).unwrap() as f64)
        .collect();
    assert_eq!(noise.len() as u64, DIM);
    let expected_var = plan.aggregate_sigma_sq(MIN_SURVIVORS);
    // The configured target: aggregate sd = z * (L2 sensitivity in ring units).
    let target_sd = Z * plan.l2_sensitivity;
    assert!(expected_var.sqrt() >= target_sd && expected_var.sqrt() < target_sd * 1.0001);
    let d = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / d;
    let var = noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (d - 1.0);
    let sd = expected_var.sqrt();
    assert!(mean.abs() < 5.0 * sd / d.sqrt(), "mean {mean}, sd {sd}");
    // Sample variance of d Gaussians: standard error var * sqrt(2/d) (~2.6% here); 5 SE.
    assert!(
        (var / expected_var - 1.0).abs() < 5.0 * (2.0f64 / d).sqrt(),
        "variance {var} vs configured {expected_var}"
    );
    eprintln!(
        "quant_bits {quant_bits}, client sigma^2 {} ({:.1}), survivors {}, configured aggregate variance {expected_var:.1}, measured {var:.1} (ratio {:.4}), mean {mean:.2}",
        plan.client_sigma_sq,
        plan.client_sigma_sq.to_f64(),
        noisy.survivors.len(),
        var / expected_var
    );
    // Shape: fractions within 1 and 2 sd match the Gaussian (sum of discrete Gaussians, sd >> 1).
    for (k, p) in [(1.0, 0.682_689_492), (2.0, 0.954_499_736)] {
        let frac = noise.iter().filter(|x| x.abs() <= k * sd).count() as f64 / d;
        assert!(
            (frac - p).abs() < 5.0 * (p * (1.0 - p) / d).sqrt(),
            "within {k} sd: {frac} vs {p}"
        );
    }
    // In real units the noise on the mean has sd z * (C + sqrt(d)/scale) / weight_sum >= z * C / n.
    let scale = 2f64.powi(quant_bits as i32 - 1) / f64::from(COORD_CLIP);
    assert!(sd / scale >= Z * L2_CLIP);

    // The server only ever unmasks the noised sum: it differs from the clean sum almost everywhere
    // (P(noise = 0) ~ 1/(sqrt(2 pi) sd), i.e. well below one coordinate here).
    let equal = noisy
        .sum
        .iter()
        .zip(&clean.sum)
        .filter(|(a, b)| a == b)
        .count();
    assert!(equal <= 5, "{equal} coordinates equal the clean sum");

    // Accounting: with the minimum number of survivors the round achieves at least the target
    // noise multiplier, so its epsilon is at most the Gaussian's with z.
    let orders = fedlora_dp::default_orders();
    let realised = plan
        .round_mechanism(noisy.survivors.len() as u32, 1.0)
        .unwrap();
    let eps = epsilon_from_rdp(&orders, &realised.rdp(&orders).unwrap(), 1e-5)
        .unwrap()
        .epsilon;
    let gauss = fedlora_dp::epsilon_sampled_gaussian(Z, 1.0, 1, 1e-5, &orders)
        .unwrap()
        .epsilon;
    assert!(eps <= gauss + 1e-9, "{eps} vs {gauss}");
}
