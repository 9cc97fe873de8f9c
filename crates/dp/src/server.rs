//! The server's side of differential privacy for one federation (protocol-spec §7.5–§7.6): fit the
//! round's precision so the noise cannot wrap the ring, refuse a round the budget cannot afford,
//! record the epsilon each round actually realised (fewer survivors carry less noise), and, in
//! `central` mode only, add the noise itself after unmasking.

use fedlora_secagg::quant::Quantizer;
use fedlora_secagg::wire::{RoundParams, RoundSetup};

use crate::accountant::{Accountant, AccountantError, RoundReport};
use crate::calibrate::{calibrate, max_quant_bits, CalibrationError, NoisePlan, PrivacyMode};
use crate::config::{ConfigError, PrivacyConfig, ResolvedPrivacy};
use crate::noise::calibration_for_round;
use crate::sampler::{add_discrete_gaussian_to_ring, SamplerError};

/// Why the server cannot run a round under its privacy configuration.
#[derive(Debug, thiserror::Error)]
pub enum ServerPrivacyError {
    /// The privacy section of the configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The noise cannot be calibrated for this round.
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    /// The accountant refused (budget exceeded) or got invalid input.
    #[error(transparent)]
    Accountant(#[from] AccountantError),
    /// No precision of at least 2 bits leaves room for the noise in this ring.
    #[error("a {ring_bits}-bit ring leaves no room for the configured noise: use fewer clients, a larger max_wrap_probability or a smaller noise multiplier")]
    NoHeadroom {
        /// The ring width.
        ring_bits: u8,
    },
    /// The central-mode sampler failed.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
}

/// A round's noise plan and what the accountant expects it to cost.
#[derive(Debug, Clone, Copy)]
pub struct PlannedRound {
    /// The calibration (variances in ring units).
    pub plan: NoisePlan,
    /// The cost if the planned minimum of survivors is reached.
    pub planned: RoundReport,
}

/// Privacy state of a server across rounds.
#[derive(Debug, Clone)]
pub struct ServerPrivacy {
    privacy: ResolvedPrivacy,
    accountant: Accountant,
}

impl ServerPrivacy {
    /// Validates the configuration and starts an accountant with its delta and budget.
    pub fn new(config: &PrivacyConfig) -> Result<Self, ServerPrivacyError> {
        let privacy = config.resolve()?;
        let accountant = privacy.accountant()?;
        Ok(ServerPrivacy {
            privacy,
            accountant,
        })
    }

    /// The configured mode.
    pub fn mode(&self) -> PrivacyMode {
        self.privacy.mode
    }

    /// The validated configuration.
    pub fn resolved(&self) -> &ResolvedPrivacy {
        &self.privacy
    }

    /// Rounds recorded so far.
    pub fn rounds(&self) -> u64 {
        self.accountant.rounds()
    }

    /// Lowers `params.quant_bits` (if needed) so the configured noise wraps the ring with
    /// probability at most `max_wrap_probability` (protocol-spec §7.4). Call after
    /// [`fedlora_secagg::derive`]; `dim` is the number of values per client.
    pub fn fit_params(
        &self,
        params: &mut RoundParams,
        num_clients: u32,
        dim: u64,
    ) -> Result<(), ServerPrivacyError> {
        if self.privacy.mode == PrivacyMode::None {
            return Ok(());
        }
        let setup = setup_for(params, num_clients);
        let input = calibration_for_round(&self.privacy, &setup, dim)?;
        match max_quant_bits(
            &input,
            f64::from(params.clip),
            self.privacy.max_wrap_probability,
        )? {
            Some(q) => {
                params.quant_bits = params.quant_bits.min(q as u8);
                Ok(())
            }
            None => Err(ServerPrivacyError::NoHeadroom {
                ring_bits: params.ring_bits,
            }),
        }
    }

    /// Calibrates the round and checks the budget: a round that would take the cumulative epsilon
    /// past it is refused before it starts (protocol-spec §7.5).
    pub fn plan_round(
        &self,
        params: &RoundParams,
        num_clients: u32,
        dim: u64,
    ) -> Result<PlannedRound, ServerPrivacyError> {
        let setup = setup_for(params, num_clients);
        let plan = calibrate(&calibration_for_round(&self.privacy, &setup, dim)?)?;
        let mechanism = plan.planned_mechanism(self.privacy.sample_rate)?;
        let planned = self.accountant.check_round(&mechanism)?;
        Ok(PlannedRound { plan, planned })
    }

    /// Records a finished round with the number of clients whose noised input reached the sum and
    /// returns its realised epsilon (protocol-spec §7.6), for the audit log.
    pub fn record_round(
        &mut self,
        plan: &NoisePlan,
        survivors: u32,
    ) -> Result<RoundReport, ServerPrivacyError> {
        let mechanism = plan.round_mechanism(survivors, self.privacy.sample_rate)?;
        Ok(self.accountant.record_round(&mechanism)?)
    }

    /// `central` mode only (a trusted server, for comparison): adds the noise to the unmasked ring
    /// sum (`sum` without the weight word) and returns the re-dequantized weighted mean. Any other
    /// mode returns `None` and leaves `sum` alone.
    pub fn central_noise<R: rand_core::RngCore + rand_core::CryptoRng + ?Sized>(
        &self,
        plan: &NoisePlan,
        params: &RoundParams,
        sum: &mut [u32],
        weight_sum: u64,
        rng: &mut R,
    ) -> Result<Option<Vec<f32>>, ServerPrivacyError> {
        if self.privacy.mode != PrivacyMode::Central {
            return Ok(None);
        }
        add_discrete_gaussian_to_ring(sum, u32::from(params.ring_bits), plan.server_sigma_sq, rng)?;
        let mask = fedlora_secagg::quant::ring_mask(params.ring_bits);
        sum.iter_mut().for_each(|w| *w &= mask);
        let mut words = sum.to_vec();
        words.push(u32::try_from(weight_sum).unwrap_or(u32::MAX));
        let (mean, _) = Quantizer::new(params).weighted_mean(&words).map_err(|e| {
            CalibrationError::InvalidParameter {
                name: "aggregate",
                value: f64::NAN,
                why: if matches!(e, fedlora_secagg::quant::QuantError::EmptyAggregate) {
                    "has no weight"
                } else {
                    "cannot be dequantized"
                },
            }
        })?;
        Ok(Some(mean))
    }
}

/// A setup carrying only what calibration reads: the parameters and the number of clients.
fn setup_for(params: &RoundParams, num_clients: u32) -> RoundSetup {
    RoundSetup {
        version: fedlora_secagg::PROTOCOL_VERSION,
        round: 0,
        nonce: [0; 32],
        client_id: 0,
        num_clients,
        params: params.clone(),
        manifest: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_secagg::{derive, ParamRequest};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn config(mode: &str, z: f64, budget: Option<f64>) -> PrivacyConfig {
        let mut s = format!("mode = \"{mode}\"\nnoise_multiplier = {z:?}\nclip_norm = 0.5\n");
        if let Some(b) = budget {
            s += &format!("budget_epsilon = {b}\n");
        }
        toml::from_str(&s).unwrap()
    }

    fn params(n: u32) -> RoundParams {
        derive(&ParamRequest::new(n)).unwrap().params
    }

    #[test]
    fn precision_is_lowered_to_leave_room_for_noise() {
        // Noise of 50 clip norms on the sum of 20 clients needs more headroom than the clean sum.
        let sp = ServerPrivacy::new(&config("distributed", 50.0, None)).unwrap();
        let mut p = params(20);
        let before = p.quant_bits;
        sp.fit_params(&mut p, 20, 10_000).unwrap();
        assert!(p.quant_bits < before, "{} !< {before}", p.quant_bits);
        fedlora_secagg::params::validate(&p, 20).unwrap();
        let plan = sp.plan_round(&p, 20, 10_000).unwrap().plan;
        assert!(plan.wrap_probability_bound <= 1e-9);
        // Mode none changes nothing.
        let mut q = params(20);
        ServerPrivacy::new(&config("none", 1.0, None))
            .unwrap()
            .fit_params(&mut q, 20, 10_000)
            .unwrap();
        assert_eq!(q, params(20));
    }

    #[test]
    fn budget_refuses_the_round_that_would_exceed_it_and_dropouts_raise_epsilon() {
        let mut sp = ServerPrivacy::new(&config("distributed", 1.0, Some(30.0))).unwrap();
        let mut p = params(20);
        sp.fit_params(&mut p, 20, 1000).unwrap();
        let planned = sp.plan_round(&p, 20, 1000).unwrap();
        // Realised with every client is no worse than with the planned minimum (the threshold).
        let mut spare = sp.clone();
        let all = spare.record_round(&planned.plan, 20).unwrap();
        let minimum = sp.clone().record_round(&planned.plan, p.threshold).unwrap();
        assert!(all.round_epsilon <= minimum.round_epsilon);
        assert!((minimum.round_epsilon - planned.planned.round_epsilon).abs() < 1e-9);
        // Fewer survivors than planned: less noise, larger realised epsilon.
        let fewer = sp
            .clone()
            .record_round(&planned.plan, p.threshold - 3)
            .unwrap();
        assert!(fewer.round_epsilon > minimum.round_epsilon);
        // Spend rounds until the budget refuses the next one.
        let mut refused = false;
        for _ in 0..100 {
            match sp.plan_round(&p, 20, 1000) {
                Ok(r) => {
                    sp.record_round(&r.plan, p.threshold).unwrap();
                }
                Err(ServerPrivacyError::Accountant(AccountantError::BudgetExceeded { .. })) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused && sp.rounds() > 0);
    }

    #[test]
    fn central_mode_noises_the_sum_and_other_modes_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let p = params(10);
        let central = ServerPrivacy::new(&config("central", 1.0, None)).unwrap();
        let plan = central.plan_round(&p, 10, 4).unwrap().plan;
        let mut sum = vec![0u32; 4];
        let mean = central
            .central_noise(&plan, &p, &mut sum, 10, &mut rng)
            .unwrap()
            .unwrap();
        assert_eq!(mean.len(), 4);
        assert!(sum.iter().any(|&w| w != 0));
        let dist = ServerPrivacy::new(&config("distributed", 1.0, None)).unwrap();
        let mut untouched = vec![0u32; 4];
        assert!(dist
            .central_noise(&plan, &p, &mut untouched, 10, &mut rng)
            .unwrap()
            .is_none());
        assert!(untouched.iter().all(|&w| w == 0));
    }
}
