//! The client's noise hook: discrete Gaussian noise added to the quantized words inside the masks
//! (protocol-spec §7.3), calibrated from the client's own privacy settings and the round's setup.
//!
//! A client never takes its noise level from the server: the server could otherwise ask for none.
//! It takes from the setup only what it cannot know by itself (quantization scale, ring width,
//! number of clients, threshold) and calibrates with [`calibrate`].

use fedlora_secagg::wire::RoundSetup;
use fedlora_secagg::RingNoise;

use crate::calibrate::{calibrate, CalibrationError, CalibrationInput, NoisePlan, PrivacyMode};
use crate::config::ResolvedPrivacy;
use crate::sampler::add_discrete_gaussian_to_ring;

/// The calibration inputs for one round: the client's settings plus the round's quantization.
/// `min_survivors` is the round's threshold: a round that completes has at least that many
/// inputs in its sum, so `distributed` noise calibrated to it is enough whenever a result exists.
pub fn calibration_for_round(
    privacy: &ResolvedPrivacy,
    setup: &RoundSetup,
    dim: u64,
) -> Result<CalibrationInput, CalibrationError> {
    let p = &setup.params;
    let clip_norm = match (privacy.mode, privacy.clip_norm) {
        (PrivacyMode::None, c) => c.unwrap_or(1.0),
        (_, Some(c)) => c,
        (_, None) => {
            return Err(CalibrationError::InvalidParameter {
                name: "clip_norm",
                value: f64::NAN,
                why: "is required for a mode with noise",
            })
        }
    };
    Ok(CalibrationInput {
        mode: privacy.mode,
        noise_multiplier: privacy.noise_multiplier,
        clip_norm,
        quant_scale: f64::from(1u32 << (p.quant_bits.saturating_sub(1))) / f64::from(p.clip),
        dim,
        num_clients: setup.num_clients,
        min_survivors: p.threshold,
        ring_bits: u32::from(p.ring_bits),
        quant_bits: u32::from(p.quant_bits),
    })
}

/// [`RingNoise`] for `distributed` and `local` modes; adds nothing for `none` and `central`
/// (in `central` the trusted server adds the noise after unmasking).
#[derive(Debug, Clone)]
pub struct ClientNoise {
    privacy: ResolvedPrivacy,
    /// The plan used for the last round, for the client's own report.
    pub last_plan: Option<NoisePlan>,
}

impl ClientNoise {
    /// A hook for a validated privacy configuration.
    pub fn new(privacy: ResolvedPrivacy) -> Self {
        ClientNoise {
            privacy,
            last_plan: None,
        }
    }
}

impl RingNoise for ClientNoise {
    fn add_noise(
        &mut self,
        words: &mut [u32],
        setup: &RoundSetup,
        rng: &mut dyn rand_core::CryptoRng,
    ) -> Result<(), String> {
        if matches!(self.privacy.mode, PrivacyMode::None | PrivacyMode::Central) {
            return Ok(());
        }
        let input = calibration_for_round(&self.privacy, setup, words.len() as u64)
            .map_err(|e| e.to_string())?;
        let plan = calibrate(&input).map_err(|e| e.to_string())?;
        add_discrete_gaussian_to_ring(
            words,
            u32::from(setup.params.ring_bits),
            plan.client_sigma_sq,
            rng,
        )
        .map_err(|e| e.to_string())?;
        self.last_plan = Some(plan);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::ring_to_signed;
    use fedlora_secagg::wire::{RoundParams, RoundSetup};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn setup() -> RoundSetup {
        RoundSetup {
            version: fedlora_secagg::PROTOCOL_VERSION,
            round: 1,
            nonce: [0; 32],
            client_id: 0,
            num_clients: 10,
            params: RoundParams {
                degree: 9,
                threshold: 6,
                ring_bits: 32,
                quant_bits: 20,
                clip: 1.0,
                weight_bound: 1,
            },
            manifest: vec![],
        }
    }

    fn privacy(mode: PrivacyMode) -> ResolvedPrivacy {
        ResolvedPrivacy {
            mode,
            noise_multiplier: 1.0,
            clip_norm: Some(0.5),
            delta: 1e-5,
            sample_rate: 1.0,
            budget_epsilon: None,
            max_wrap_probability: 1e-9,
        }
    }

    #[test]
    fn distributed_hook_adds_the_calibrated_variance() {
        let mut hook = ClientNoise::new(privacy(PrivacyMode::Distributed));
        let mut words = vec![0u32; 20_000];
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        hook.add_noise(&mut words, &setup(), &mut rng).unwrap();
        let plan = hook.last_plan.unwrap();
        // Calibrated to the threshold (6 survivors): each client carries 1/6 of the variance.
        let expected = calibrate(
            &calibration_for_round(&privacy(PrivacyMode::Distributed), &setup(), 20_000).unwrap(),
        )
        .unwrap()
        .client_sigma_sq
        .to_f64();
        assert_eq!(plan.client_sigma_sq.to_f64(), expected);
        let xs: Vec<f64> = words
            .iter()
            .map(|&w| ring_to_signed(w, 32).unwrap() as f64)
            .collect();
        let var = xs.iter().map(|x| x * x).sum::<f64>() / xs.len() as f64;
        assert!(
            (var / expected - 1.0).abs() < 0.05,
            "variance {var} vs {expected}"
        );
        // Local mode carries the whole noise on each client: about 6x more.
        let mut local = ClientNoise::new(privacy(PrivacyMode::Local));
        local
            .add_noise(&mut [0u32; 10], &setup(), &mut rng)
            .unwrap();
        let ratio = local.last_plan.unwrap().client_sigma_sq.to_f64() / expected;
        assert!((ratio - 6.0).abs() < 0.01, "ratio {ratio}");
    }

    #[test]
    fn none_and_central_add_nothing_and_missing_clip_is_an_error() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for mode in [PrivacyMode::None, PrivacyMode::Central] {
            let mut words = vec![7u32; 100];
            ClientNoise::new(privacy(mode))
                .add_noise(&mut words, &setup(), &mut rng)
                .unwrap();
            assert!(words.iter().all(|&w| w == 7));
        }
        let mut p = privacy(PrivacyMode::Distributed);
        p.clip_norm = None;
        assert!(ClientNoise::new(p)
            .add_noise(&mut [0u32; 4], &setup(), &mut rng)
            .is_err());
    }
}
