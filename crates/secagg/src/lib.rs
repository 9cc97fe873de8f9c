//! SecAgg+ for fedlora: sans-IO state machines for the client and the server.
//!
//! This crate is the protocol of `protocol-spec/` and nothing else: it takes messages and returns
//! messages. It never reads a clock, opens a socket or touches the disk, so an auditor can read the
//! protocol in one place and tests can drive every dropout schedule deterministically
//! ([`harness`]).
//!
//! # Use
//! * Server: [`Server::new`] queues the setup messages. Loop: deliver each client message with
//!   [`Server::handle_message`]; drain [`Server::poll_transmit`] and then [`Server::poll_event`];
//!   when your deadline for the stage expires call [`Server::close_stage`] (a stage closes by itself
//!   when [`Server::waiting_for`] is empty). The round ends with [`ServerEvent::Finished`] or
//!   [`ServerEvent::Aborted`].
//! * Client: [`Client::new`] with the private input. For each server message call
//!   [`Client::handle_message`], then drain [`Client::poll_transmit`] and [`Client::poll_event`].
//!
//! # What it does not do
//! Transport, identities and deadlines live in `fedlora-service`; noise for differential privacy
//! comes in through [`RingNoise`]. The threat model (protocol-spec §2.1) is an honest-but-curious
//! server colluding with a bounded fraction of clients; [`KeyAuthenticator`] adds signed keys
//! against a server that substitutes keys (§8.3).

pub mod client;
pub mod graph;
pub mod harness;
pub mod kdf;
pub mod params;
pub mod prg;
pub mod quant;
pub mod secret;
pub mod server;
pub mod shamir;
pub mod share_box;
mod upload;

pub use client::{Client, ClientError, ClientEvent, ClientInput};
pub use fedlora_wire as wire;
pub use fedlora_wire::{AbortReason, ClientId, RoundParams, Stage, TensorSpec, PROTOCOL_VERSION};
pub use params::{derive, Derivation, ParamError, ParamRequest};
pub use server::{Aggregate, ConfigError, RoundConfig, Server, ServerError, ServerEvent};

/// Signs a client's round keys with its long-term identity and verifies its peers' signatures
/// (protocol-spec §8.3). Implemented by the service with Ed25519.
pub trait KeyAuthenticator: Send + Sync {
    /// Signs `message` with this party's identity key.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
    /// Whether `signature` is `peer`'s signature of `message`.
    fn verify(&self, peer: ClientId, message: &[u8], signature: &[u8]) -> bool;
}

/// Adds differential-privacy noise to the quantized words before they are masked
/// (protocol-spec §7). Words are ring elements modulo `2^ring_bits`; the implementation adds noise
/// modulo `2^32` and the client reduces afterwards. The weight word is not passed. The round's
/// setup is passed so the implementation can calibrate from the client's own privacy settings and
/// the round's quantization (a client never takes its noise level from the server).
pub trait RingNoise: Send {
    /// Adds noise in place.
    fn add_noise(
        &mut self,
        words: &mut [u32],
        setup: &fedlora_wire::RoundSetup,
        rng: &mut dyn rand_core::CryptoRng,
    ) -> Result<(), String>;
}

/// Number of values a manifest describes (protocol-spec §2.4): the sum of the products of the shapes.
pub fn manifest_len(manifest: &[TensorSpec]) -> u64 {
    manifest
        .iter()
        .map(|t| t.shape.iter().map(|&d| u64::from(d)).product::<u64>())
        .fold(0u64, u64::saturating_add)
}
