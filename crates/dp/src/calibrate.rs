//! Noise calibration in ring units for each privacy mode, with Kairouz, Liu, Steinke 2021
//! ("The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation")
//! accounting for quantization and modular clipping (protocol-spec §7.4).

use crate::accountant::{ddg_tau, RoundMechanism};
use crate::sampler::{Rational, SamplerError};
use serde::{Deserialize, Serialize};

/// Errors of the calibration module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    /// A real-valued parameter was NaN, infinite, or out of its range.
    #[error("invalid {name}: {value} ({why})")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What the range is.
        why: &'static str,
    },
    /// Client counts were inconsistent (need 1 <= min_survivors <= num_clients).
    #[error("need 1 <= min_survivors ({min_survivors}) <= num_clients ({num_clients})")]
    InvalidClientCounts {
        /// Clients selected for the round.
        num_clients: u32,
        /// Minimum number of clients whose input reaches the sum.
        min_survivors: u32,
    },
    /// The ring or quantization widths were outside 1..=32 or quant_bits > ring_bits.
    #[error("need 1 <= quant_bits ({quant_bits}) <= ring_bits ({ring_bits}) <= 32")]
    InvalidBits {
        /// Quantization bits.
        quant_bits: u32,
        /// Ring bits.
        ring_bits: u32,
    },
    /// The survivors given for a realised round were zero or more than the clients selected.
    #[error("survivors {survivors} must be in 1..={num_clients}")]
    InvalidSurvivors {
        /// Survivors reported.
        survivors: u32,
        /// Clients selected.
        num_clients: u32,
    },
    /// The calibrated variance could not be represented for the sampler.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
}

/// Where the noise is added (protocol-spec §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// No noise; no DP guarantee (infinite epsilon).
    None,
    /// Each client adds a share of the noise inside the masks; the sum over the minimum number of
    /// survivors carries the target noise.
    Distributed,
    /// Each client adds the full noise itself.
    Local,
    /// The (trusted) server adds the noise after unmasking. For comparison only: the server sees
    /// the noiseless sum.
    Central,
}

/// Inputs of the calibration (protocol-spec §7.4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationInput {
    /// The privacy mode.
    pub mode: PrivacyMode,
    /// Target noise multiplier z: aggregate noise std / L2 sensitivity.
    pub noise_multiplier: f64,
    /// L2 clipping norm C of one client's update, in real units.
    pub clip_norm: f64,
    /// Quantization scale: ring units per real unit, 2^(quant_bits-1) / c.
    pub quant_scale: f64,
    /// Number of coordinates d that carry the update (and the noise).
    pub dim: u64,
    /// Clients selected for the round, n.
    pub num_clients: u32,
    /// Minimum number of clients whose input reaches the sum, m (the secagg threshold or more).
    pub min_survivors: u32,
    /// Ring width b (words mod 2^b).
    pub ring_bits: u32,
    /// Quantization width q (each client's quantized coordinate lies in [-2^(q-1), 2^(q-1)]).
    pub quant_bits: u32,
}

/// The calibrated noise for a round (protocol-spec §7.4). All variances are in ring units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NoisePlan {
    /// The privacy mode.
    pub mode: PrivacyMode,
    /// Target noise multiplier z.
    pub noise_multiplier: f64,
    /// L2 sensitivity in ring units after scaling and stochastic rounding:
    /// C * quant_scale + sqrt(d) (Kairouz et al. 2021, Thm. 1 / rounded norm bound with beta = 0).
    pub l2_sensitivity: f64,
    /// L1 sensitivity in ring units: l2 * min(sqrt(d), l2) (integers: L1 <= L2^2).
    pub l1_sensitivity: f64,
    /// Discrete Gaussian variance each client adds to each coordinate (0 for `none`, `central`).
    pub client_sigma_sq: Rational,
    /// Discrete Gaussian variance the server adds after unmasking (`central` only, else 0).
    pub server_sigma_sq: Rational,
    /// Number of coordinates.
    pub dim: u64,
    /// Clients selected.
    pub num_clients: u32,
    /// Minimum survivors the plan is calibrated for.
    pub min_survivors: u32,
    /// Union bound over coordinates on the probability that some coordinate of the noised sum
    /// wraps around the ring when all n clients survive (a utility loss, not a privacy loss).
    pub wrap_probability_bound: f64,
}

fn check_real(name: &'static str, value: f64, positive: bool) -> Result<(), CalibrationError> {
    if !value.is_finite() || value < 0.0 || (positive && value == 0.0) {
        return Err(CalibrationError::InvalidParameter {
            name,
            value,
            why: if positive {
                "must be finite and > 0"
            } else {
                "must be finite and >= 0"
            },
        });
    }
    Ok(())
}

/// L2 sensitivity after scaling to ring units and stochastic rounding: each coordinate moves by
/// less than 1, so the norm grows by at most sqrt(d) (Kairouz et al. 2021, bound with beta = 0;
/// the tighter beta > 0 bound needs conditional rounding, which the quantizer does not do).
///
/// Implements protocol-spec §7.4.
pub fn rounded_l2_sensitivity(clip_norm: f64, quant_scale: f64, dim: u64) -> f64 {
    clip_norm * quant_scale + (dim as f64).sqrt()
}

/// P(some coordinate wraps) <= d * 2 exp(-H^2 / (2 n sigma^2)), H = 2^(b-1) - n 2^(q-1) - 1 the
/// headroom left by the largest clean sum (sums of discrete Gaussians are sub-Gaussian, CKS20).
///
/// Implements protocol-spec §7.4.
pub fn wrap_probability_bound(
    ring_bits: u32,
    quant_bits: u32,
    num_clients: u32,
    total_sigma_sq: f64,
    dim: u64,
) -> f64 {
    let headroom = 2f64.powi(ring_bits as i32 - 1)
        - f64::from(num_clients) * 2f64.powi(quant_bits as i32 - 1)
        - 1.0;
    if headroom <= 0.0 {
        return 1.0;
    }
    if total_sigma_sq == 0.0 {
        return 0.0;
    }
    (2.0 * dim as f64 * (-headroom * headroom / (2.0 * total_sigma_sq)).exp()).min(1.0)
}

/// The smallest ring width b (<= 32) for which [`wrap_probability_bound`] is at most
/// `max_wrap_probability`, or `None` if even 32 bits do not suffice.
///
/// Implements protocol-spec §7.4.
pub fn required_ring_bits(
    quant_bits: u32,
    num_clients: u32,
    total_sigma_sq: f64,
    dim: u64,
    max_wrap_probability: f64,
) -> Option<u32> {
    (quant_bits.max(1)..=32).find(|&b| {
        wrap_probability_bound(b, quant_bits, num_clients, total_sigma_sq, dim)
            <= max_wrap_probability
    })
}

/// The largest quantization width q (at most `input.ring_bits - 1`) for which the calibrated noise
/// keeps [`NoisePlan::wrap_probability_bound`] at most `max_wrap_probability`, with the scale
/// 2^(q-1)/`coord_clip` that the secagg quantizer uses (`input.quant_bits` and `input.quant_scale`
/// are ignored). The noise grows with the scale, so a ring sized for the clean sum alone wraps
/// once noise is added: the server should cap q with this before deriving the round's parameters.
/// Returns `None` if no q >= 2 fits.
///
/// Implements the modular-clipping budget of protocol-spec §7.4.
pub fn max_quant_bits(
    input: &CalibrationInput,
    coord_clip: f64,
    max_wrap_probability: f64,
) -> Result<Option<u32>, CalibrationError> {
    check_real("coord_clip", coord_clip, true)?;
    if !(0.0..=1.0).contains(&max_wrap_probability) {
        return Err(CalibrationError::InvalidParameter {
            name: "max_wrap_probability",
            value: max_wrap_probability,
            why: "must be in [0, 1]",
        });
    }
    for q in (2..input.ring_bits.min(32)).rev() {
        let mut i = *input;
        i.quant_bits = q;
        i.quant_scale = 2f64.powi(q as i32 - 1) / coord_clip;
        let plan = calibrate(&i)?;
        if plan.wrap_probability_bound <= max_wrap_probability {
            return Ok(Some(q));
        }
    }
    Ok(None)
}

/// Calibrates the noise for a round.
///
/// * `distributed`: each client adds N_Z(0, s^2) with s chosen so that m survivors' noise alone
///   gives the target: Delta/(sqrt(m) s) + sqrt(d) tau(s, m) <= 1/z, which by Kairouz et al. 2021
///   Prop. 14 makes the round's RDP at most that of the Gaussian with multiplier z
///   (s^2 starts at max(z^2 Delta^2 / m, 1) and grows by 0.1% until the tau term fits).
/// * `local`: each client adds N_Z(0, z^2 Delta^2) (its own noise suffices).
/// * `central`: the server adds N_Z(0, z^2 Delta^2) after unmasking.
/// * `none`: no noise.
///
///
/// Implements protocol-spec §7.4.
pub fn calibrate(input: &CalibrationInput) -> Result<NoisePlan, CalibrationError> {
    let CalibrationInput {
        mode,
        noise_multiplier: z,
        clip_norm,
        quant_scale,
        dim,
        num_clients,
        min_survivors,
        ring_bits,
        quant_bits,
    } = *input;
    if mode != PrivacyMode::None {
        check_real("noise_multiplier", z, true)?;
    }
    check_real("clip_norm", clip_norm, true)?;
    check_real("quant_scale", quant_scale, true)?;
    if dim == 0 {
        return Err(CalibrationError::InvalidParameter {
            name: "dim",
            value: 0.0,
            why: "must be >= 1",
        });
    }
    if min_survivors == 0 || min_survivors > num_clients {
        return Err(CalibrationError::InvalidClientCounts {
            num_clients,
            min_survivors,
        });
    }
    if quant_bits == 0 || quant_bits > ring_bits || ring_bits > 32 {
        return Err(CalibrationError::InvalidBits {
            quant_bits,
            ring_bits,
        });
    }
    let l2 = rounded_l2_sensitivity(clip_norm, quant_scale, dim);
    let l1 = l2 * (dim as f64).sqrt().min(l2);
    let full = z * z * l2 * l2;
    let (client, server) = match mode {
        PrivacyMode::None => (0.0, 0.0),
        PrivacyMode::Local => (full, 0.0),
        PrivacyMode::Central => (0.0, full),
        PrivacyMode::Distributed => {
            let m = f64::from(min_survivors);
            let d = (dim as f64).sqrt();
            // Floor of 1 ring unit^2 per share: the sum bound is stated for shares with sigma >= 1/2.
            let mut s2 = (full / m).max(1.0);
            while l2 / (m * s2).sqrt() + d * ddg_tau(s2, u64::from(min_survivors)) > 1.0 / z {
                s2 *= 1.001;
            }
            (s2, 0.0)
        }
    };
    let client_sigma_sq = Rational::from_f64_ceil(client)?;
    let server_sigma_sq = Rational::from_f64_ceil(server)?;
    let total = f64::from(num_clients) * client_sigma_sq.to_f64() + server_sigma_sq.to_f64();
    let wrap = if mode == PrivacyMode::Central {
        // The server adds its noise after unmasking, outside the ring.
        wrap_probability_bound(ring_bits, quant_bits, num_clients, 0.0, dim)
    } else {
        wrap_probability_bound(ring_bits, quant_bits, num_clients, total, dim)
    };
    Ok(NoisePlan {
        mode,
        noise_multiplier: z,
        l2_sensitivity: l2,
        l1_sensitivity: l1,
        client_sigma_sq,
        server_sigma_sq,
        dim,
        num_clients,
        min_survivors,
        wrap_probability_bound: wrap,
    })
}

impl NoisePlan {
    /// The mechanism a round realises when `survivors` clients' noised inputs reach the sum
    /// (protocol-spec §7.6): the sum holds `survivors` client noise shares (plus the server's in
    /// `central` mode). With the planned minimum this is the planned mechanism; fewer survivors
    /// realise less noise and a larger epsilon, which the service records in its audit log.
    pub fn round_mechanism(
        &self,
        survivors: u32,
        sample_rate: f64,
    ) -> Result<RoundMechanism, CalibrationError> {
        if survivors == 0 || survivors > self.num_clients {
            return Err(CalibrationError::InvalidSurvivors {
                survivors,
                num_clients: self.num_clients,
            });
        }
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(CalibrationError::InvalidParameter {
                name: "sample_rate",
                value: sample_rate,
                why: "must be in [0, 1]",
            });
        }
        let d = self.dim as f64;
        let (s2, summands) = match self.mode {
            PrivacyMode::None => return Ok(RoundMechanism::NoNoise),
            PrivacyMode::Central => (self.server_sigma_sq.to_f64(), 1u64),
            PrivacyMode::Distributed | PrivacyMode::Local => {
                (self.client_sigma_sq.to_f64(), u64::from(survivors))
            }
        };
        let total_sd = (s2 * summands as f64).sqrt();
        Ok(RoundMechanism::DistributedDiscreteGaussian {
            sample_rate,
            l2_scale: self.l2_sensitivity / total_sd,
            l1_scale: self.l1_sensitivity / total_sd,
            tau: ddg_tau(s2, summands),
            dim: d,
        })
    }

    /// The planned mechanism: the configured minimum number of survivors.
    pub fn planned_mechanism(&self, sample_rate: f64) -> Result<RoundMechanism, CalibrationError> {
        self.round_mechanism(self.min_survivors, sample_rate)
    }

    /// Aggregate noise variance in ring units in the unmasked sum with `survivors` clients.
    pub fn aggregate_sigma_sq(&self, survivors: u32) -> f64 {
        f64::from(survivors) * self.client_sigma_sq.to_f64() + self.server_sigma_sq.to_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accountant::{default_orders, epsilon_from_rdp, epsilon_sampled_gaussian};
    use proptest::prelude::*;

    fn input(mode: PrivacyMode) -> CalibrationInput {
        CalibrationInput {
            mode,
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            quant_scale: 2f64.powi(15), // quant_bits 16, c = 1
            dim: 10_000,
            num_clients: 10,
            min_survivors: 8,
            ring_bits: 32,
            quant_bits: 16,
        }
    }

    #[test]
    fn distributed_sum_over_minimum_carries_target() {
        let p = calibrate(&input(PrivacyMode::Distributed)).unwrap();
        let delta = 2f64.powi(15) + 100.0;
        assert_eq!(p.l2_sensitivity, delta);
        let agg = p.aggregate_sigma_sq(8);
        assert!(
            agg >= delta * delta && agg < delta * delta * 1.0001,
            "{agg}"
        );
        assert_eq!(p.server_sigma_sq, Rational::ZERO);
        // Realised with the minimum: the same epsilon as the Gaussian with z = 1 (tau ~ 0).
        let o = default_orders();
        let mech = p.planned_mechanism(1.0).unwrap();
        let e = epsilon_from_rdp(&o, &mech.rdp(&o).unwrap(), 1e-5)
            .unwrap()
            .epsilon;
        let g = epsilon_sampled_gaussian(1.0, 1.0, 1, 1e-5, &o)
            .unwrap()
            .epsilon;
        assert!(e <= g + 1e-9, "{e} vs {g}");
        // More survivors: more noise, smaller epsilon; fewer: larger.
        let more = p.round_mechanism(10, 1.0).unwrap();
        let less = p.round_mechanism(4, 1.0).unwrap();
        let eps = |m: RoundMechanism| {
            epsilon_from_rdp(&o, &m.rdp(&o).unwrap(), 1e-5)
                .unwrap()
                .epsilon
        };
        assert!(eps(more) < e && eps(less) > e);
        assert!(p.wrap_probability_bound < 1e-100);
    }

    #[test]
    fn local_and_central_carry_full_noise() {
        let l = calibrate(&input(PrivacyMode::Local)).unwrap();
        let c = calibrate(&input(PrivacyMode::Central)).unwrap();
        let full = l.l2_sensitivity * l.l2_sensitivity;
        assert!((l.client_sigma_sq.to_f64() / full - 1.0).abs() < 1e-9);
        assert!((c.server_sigma_sq.to_f64() / full - 1.0).abs() < 1e-9);
        assert!(c.client_sigma_sq.is_zero());
        let n = calibrate(&input(PrivacyMode::None)).unwrap();
        assert!(n.client_sigma_sq.is_zero() && n.server_sigma_sq.is_zero());
        assert_eq!(n.planned_mechanism(1.0).unwrap(), RoundMechanism::NoNoise);
    }

    #[test]
    fn tau_inflates_tiny_shares() {
        // Tiny per-client shares (sigma < 1 ring unit): tau is not negligible and calibration must
        // add noise beyond z^2 Delta^2 / m.
        let mut i = input(PrivacyMode::Distributed);
        i.quant_scale = 0.5;
        i.dim = 4;
        i.clip_norm = 1.0;
        i.num_clients = 50;
        i.min_survivors = 50;
        let p = calibrate(&i).unwrap();
        let naive = (0.5f64 + 2.0).powi(2) / 50.0;
        assert!(
            p.client_sigma_sq.to_f64() > naive * 1.01,
            "{} vs {naive}",
            p.client_sigma_sq
        );
        let s2 = p.client_sigma_sq.to_f64();
        assert!(p.l2_sensitivity / (50.0 * s2).sqrt() + 2.0 * ddg_tau(s2, 50) <= 1.0);
    }

    #[test]
    fn wrap_bound_and_ring_bits() {
        // 10 clients at 16 bits need 20 bits for the clean sum (19 leave no headroom); noise needs a little more.
        assert_eq!(wrap_probability_bound(19, 16, 10, 1e6, 1000), 1.0);
        assert!(wrap_probability_bound(20, 16, 10, 0.0, 1000) == 0.0);
        let b = required_ring_bits(16, 10, 1e10, 1_000_000, 1e-9).unwrap();
        assert!(wrap_probability_bound(b, 16, 10, 1e10, 1_000_000) <= 1e-9);
        assert!(wrap_probability_bound(b - 1, 16, 10, 1e10, 1_000_000) > 1e-9);
        assert_eq!(required_ring_bits(16, 1 << 20, 0.0, 1, 1e-9), None);
    }

    #[test]
    fn rejects_bad_input() {
        let good = input(PrivacyMode::Distributed);
        for (z, c, s) in [
            (f64::NAN, 1.0, 1.0),
            (-1.0, 1.0, 1.0),
            (0.0, 1.0, 1.0),
            (1.0, f64::INFINITY, 1.0),
            (1.0, 1.0, 0.0),
        ] {
            let mut i = good;
            i.noise_multiplier = z;
            i.clip_norm = c;
            i.quant_scale = s;
            assert!(
                matches!(
                    calibrate(&i),
                    Err(CalibrationError::InvalidParameter { .. })
                ),
                "{z} {c} {s}"
            );
        }
        let mut i = good;
        i.min_survivors = 11;
        assert!(matches!(
            calibrate(&i),
            Err(CalibrationError::InvalidClientCounts { .. })
        ));
        let mut i = good;
        i.quant_bits = 33;
        assert!(matches!(
            calibrate(&i),
            Err(CalibrationError::InvalidBits { .. })
        ));
        let mut i = good;
        i.noise_multiplier = 1e30;
        assert!(matches!(calibrate(&i), Err(CalibrationError::Sampler(_))));
        let p = calibrate(&good).unwrap();
        assert!(matches!(
            p.round_mechanism(0, 1.0),
            Err(CalibrationError::InvalidSurvivors { .. })
        ));
        assert!(matches!(
            p.round_mechanism(11, 1.0),
            Err(CalibrationError::InvalidSurvivors { .. })
        ));
        assert!(matches!(
            p.round_mechanism(5, 2.0),
            Err(CalibrationError::InvalidParameter { .. })
        ));
    }

    #[test]
    fn max_quant_bits_leaves_room_for_noise() {
        // 10 clients, ring 24 bits: secagg alone would use q = 24 - 5 = 19 bits; with z = 1 and
        // an L2 clip 10x the coordinate clip the noise needs far more headroom.
        let mut i = input(PrivacyMode::Distributed);
        i.ring_bits = 24;
        i.clip_norm = 10.0;
        let q = max_quant_bits(&i, 1.0, 1e-9).unwrap().unwrap();
        assert!(q < 19, "{q}");
        let mut at = i;
        at.quant_bits = q;
        at.quant_scale = 2f64.powi(q as i32 - 1);
        assert!(calibrate(&at).unwrap().wrap_probability_bound <= 1e-9);
        at.quant_bits = q + 1;
        at.quant_scale = 2f64.powi(q as i32);
        assert!(calibrate(&at).unwrap().wrap_probability_bound > 1e-9);
        // Central mode adds noise outside the ring: only the clean sum must fit.
        let mut c = i;
        c.mode = PrivacyMode::Central;
        // 10 * 2^19 + 1 < 2^23 but 10 * 2^20 > 2^23.
        assert_eq!(max_quant_bits(&c, 1.0, 1e-9).unwrap(), Some(20));
        assert!(max_quant_bits(&i, f64::NAN, 1e-9).is_err());
        assert!(max_quant_bits(&i, 1.0, 2.0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Law: m survivors' shares always carry at least the target aggregate variance.
        #[test]
        fn distributed_shares_sum_to_target(z in 0.3f64..5.0, m in 1u32..50, extra in 0u32..20, scale in 1.0f64..1e5, d in 1u64..100_000) {
            let i = CalibrationInput { mode: PrivacyMode::Distributed, noise_multiplier: z, clip_norm: 1.0, quant_scale: scale, dim: d, num_clients: m + extra, min_survivors: m, ring_bits: 32, quant_bits: 8 };
            let p = calibrate(&i).unwrap();
            let target = z * z * p.l2_sensitivity * p.l2_sensitivity;
            prop_assert!(p.aggregate_sigma_sq(m) >= target * (1.0 - 1e-12));
        }
    }
}
