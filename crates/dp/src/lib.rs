//! Differential privacy for fedlora (protocol-spec §7): per-client L2 clipping, an exact discrete
//! Gaussian sampler (Canonne, Kamath, Steinke 2020) that adds noise in the secure-aggregation ring
//! after quantization and before masking, noise calibration for the `none`, `distributed`, `local`
//! and `central` modes with Kairouz, Liu, Steinke 2021's accounting for quantization and modular
//! clipping, and a Rényi-DP accountant with a budget.
//!
//! This crate has no I/O, no clock and no async runtime; every sampler takes the caller's
//! cryptographic RNG (`rand_core` 0.9 `RngCore + CryptoRng`).

pub mod accountant;
pub mod calibrate;
pub mod clip;
pub mod config;
pub mod noise;
pub mod sampler;
pub mod server;

pub use accountant::{
    default_orders, epsilon_from_rdp, epsilon_sampled_gaussian, noise_multiplier_for_epsilon,
    rdp_sampled_gaussian, Accountant, AccountantError, EpsilonAtOrder, RoundMechanism, RoundReport,
};
pub use calibrate::{
    calibrate, max_quant_bits, required_ring_bits, CalibrationError, CalibrationInput, NoisePlan,
    PrivacyMode,
};
pub use clip::{clip_l2, clip_l2_many, ClipError, ClipReport};
pub use config::{ConfigError, PrivacyConfig, ResolvedPrivacy};
pub use noise::{calibration_for_round, ClientNoise};
pub use sampler::{
    add_discrete_gaussian_to_ring, ring_to_signed, sample_discrete_gaussian, DiscreteGaussian,
    Rational, SamplerError,
};
pub use server::{PlannedRound, ServerPrivacy, ServerPrivacyError};
