//! The server's state machine (protocol-spec §4.2).
//!
//! A [`Server`] is created with the round's configuration; it immediately queues one
//! [`RoundSetup`] per invited client. The caller then loops: deliver each client message with
//! [`Server::handle_message`], drain [`Server::poll_transmit`] and [`Server::poll_event`], and call
//! [`Server::close_stage`] when its deadline for the current stage expires. A stage also closes by
//! itself as soon as every client the server waits for has answered ([`Server::waiting_for`]).
//! The server never reads a clock or a socket, and it keeps no client's masked input: each one is
//! added into a single accumulator on arrival.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rayon::prelude::*;
use x25519_dalek::{PublicKey, StaticSecret};

use fedlora_wire::{
    AbortReason, AdvertiseKeys, ClientId, ClientMessage, EncryptedShare, KeyBroadcast, MaskedInput,
    PublicKeys, RoundParams, RoundSetup, ServerMessage, ShareBroadcast, ShareKeys, Stage,
    TensorSpec, UnmaskRequest, UnmaskResponse, PROTOCOL_VERSION,
};

use crate::graph::NeighbourGraph;
use crate::kdf::{self, SessionId};
use crate::params::{self, ParamError};
use crate::prg::{apply_masks, MaskKey, Sign};
use crate::quant::{ring_mask, QuantError, Quantizer};
use crate::secret::Seed;
use crate::shamir::{self, Share};
use crate::share_box::CIPHERTEXT_BYTES;
use crate::upload::PartialUpload;
use crate::{manifest_len, KeyAuthenticator};

/// Everything the server fixes before a round starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundConfig {
    /// Round number.
    pub round: u64,
    /// Fresh random nonce (protocol-spec §3.2).
    pub nonce: [u8; 32],
    /// Clients invited; ids `0..num_clients`.
    pub num_clients: u32,
    /// Numeric parameters, e.g. from [`crate::params::derive`].
    pub params: RoundParams,
    /// Layout of the input vector.
    pub manifest: Vec<TensorSpec>,
}

/// A configuration the server refuses to run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The parameters are unsafe or inconsistent.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// The manifest describes no values, or more than the wire format carries.
    #[error("manifest must describe between 1 and {max} values, got {got}")]
    ManifestSize {
        /// Elements described.
        got: u64,
        /// The limit.
        max: u64,
    },
}

/// A client message the server rejected. The round goes on without it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ServerError {
    /// The sender is not an invited client.
    #[error("client {0} is not part of this round")]
    UnknownClient(ClientId),
    /// The round already ended.
    #[error("the round is over")]
    RoundOver,
    /// The message belongs to another stage (late, early or replayed).
    #[error("client {from} sent a {got} message during stage {expected}")]
    WrongStage {
        /// Sender.
        from: ClientId,
        /// The current stage.
        expected: Stage,
        /// The message's stage.
        got: Stage,
    },
    /// The sender is not among the clients expected in this stage (it dropped earlier).
    #[error("client {from} is not expected in stage {stage}")]
    NotExpected {
        /// Sender.
        from: ClientId,
        /// The current stage.
        stage: Stage,
    },
    /// The sender already sent its message for this stage.
    #[error("duplicate {stage} message from client {from}")]
    Duplicate {
        /// Sender.
        from: ClientId,
        /// The current stage.
        stage: Stage,
    },
    /// The bytes are not a client message (protocol-spec §4.3).
    #[error("undecodable message from client {from}: {detail}")]
    Undecodable {
        /// Sender.
        from: ClientId,
        /// The decoder's complaint.
        detail: String,
    },
    /// The message's content is malformed (wrong addressing, sizes, signature, share values).
    #[error("malformed {stage} message from client {from}: {detail}")]
    Malformed {
        /// Sender.
        from: ClientId,
        /// The current stage.
        stage: Stage,
        /// What is wrong.
        detail: String,
    },
}

/// What the server reports to its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// A stage closed; `survivors` clients sent their message for it.
    StageClosed {
        /// The stage that closed.
        stage: Stage,
        /// Clients whose message arrived.
        survivors: u32,
    },
    /// The round produced its aggregate.
    Finished(Box<Aggregate>),
    /// The round ended without an aggregate.
    Aborted(AbortReason),
}

/// The result of a round: the weighted mean of the survivors' inputs (protocol-spec §4.2.5).
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Round number.
    pub round: u64,
    /// Clients whose input is in the sum (U3).
    pub survivors: Vec<ClientId>,
    /// Clients that shared keys but sent no input (U2 \ U3); their masks were removed.
    pub dropped: Vec<ClientId>,
    /// The unmasked ring sum of the weighted, quantized values (without the weight word).
    pub sum: Vec<u32>,
    /// Sum of the survivors' weights.
    pub weight_sum: u64,
    /// The weighted mean, dequantized.
    pub mean: Vec<f32>,
    /// Bound on `|mean − exact weighted mean of the clipped inputs|` from quantization alone.
    pub error_bound: f64,
    /// Masks the server expanded to unmask: one self mask per survivor plus one pairwise mask per
    /// (dropped client, surviving neighbour) pair. The work the PRG bound is computed for.
    pub masks_removed: u64,
}

enum Phase {
    Collecting(Stage),
    Finished,
    Aborted,
}

/// The server's side of one round (protocol-spec §4.2).
pub struct Server {
    config: RoundConfig,
    vector_len: usize,
    phase: Phase,
    verifier: Option<Box<dyn KeyAuthenticator>>,
    advertised: BTreeMap<ClientId, AdvertiseKeys>,
    session: Option<SessionId>,
    graph: Option<NeighbourGraph>,
    shared: BTreeMap<ClientId, Vec<EncryptedShare>>,
    commitments: BTreeMap<ClientId, [u8; 32]>,
    accumulator: Vec<u32>,
    uploaded: BTreeSet<ClientId>,
    /// Masked inputs arriving in pieces (§4.3.2 streaming); their words are in `accumulator`
    /// already and are taken back out unless the upload completes.
    partial: BTreeMap<ClientId, PartialUpload>,
    unmask_requested: BTreeSet<ClientId>,
    responded: BTreeSet<ClientId>,
    self_mask_shares: BTreeMap<ClientId, Vec<Share>>,
    mask_key_shares: BTreeMap<ClientId, Vec<Share>>,
    outbox: VecDeque<(ClientId, ServerMessage)>,
    events: VecDeque<ServerEvent>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("round", &self.config.round)
            .field("stage", &self.stage())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Validates the configuration and queues the setup message for every invited client.
    pub fn new(config: RoundConfig) -> Result<Self, ConfigError> {
        params::validate(&config.params, config.num_clients)?;
        let len = manifest_len(&config.manifest);
        let max = u64::from(fedlora_wire::MAX_VECTOR_WORDS) - 1;
        if len == 0 || len > max {
            return Err(ConfigError::ManifestSize { got: len, max });
        }
        let outbox = (0..config.num_clients)
            .map(|client_id| {
                (
                    client_id,
                    ServerMessage::Setup(RoundSetup {
                        version: PROTOCOL_VERSION,
                        round: config.round,
                        nonce: config.nonce,
                        client_id,
                        num_clients: config.num_clients,
                        params: config.params.clone(),
                        manifest: config.manifest.clone(),
                    }),
                )
            })
            .collect();
        Ok(Server {
            vector_len: len as usize,
            config,
            phase: Phase::Collecting(Stage::AdvertiseKeys),
            verifier: None,
            advertised: BTreeMap::new(),
            session: None,
            graph: None,
            shared: BTreeMap::new(),
            commitments: BTreeMap::new(),
            accumulator: Vec::new(),
            uploaded: BTreeSet::new(),
            partial: BTreeMap::new(),
            unmask_requested: BTreeSet::new(),
            responded: BTreeSet::new(),
            self_mask_shares: BTreeMap::new(),
            mask_key_shares: BTreeMap::new(),
            outbox,
            events: VecDeque::new(),
        })
    }

    /// Also checks each client's key signature on arrival (protocol-spec §8.3), so a client with a
    /// bad signature is dropped instead of making every honest client refuse the broadcast.
    pub fn with_verifier(mut self, verifier: Box<dyn KeyAuthenticator>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// The round's configuration.
    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    /// The stage being collected, or `None` once the round is over.
    pub fn stage(&self) -> Option<Stage> {
        match self.phase {
            Phase::Collecting(s) => Some(s),
            _ => None,
        }
    }

    /// The session id, once the advertise stage has closed.
    pub fn session_id(&self) -> Option<SessionId> {
        self.session
    }

    /// The next message to send: `(recipient, message)`.
    pub fn poll_transmit(&mut self) -> Option<(ClientId, ServerMessage)> {
        self.outbox.pop_front()
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Clients whose message for the current stage has not arrived yet.
    pub fn waiting_for(&self) -> Vec<ClientId> {
        let Phase::Collecting(stage) = self.phase else {
            return Vec::new();
        };
        let expected: Box<dyn Iterator<Item = ClientId>> = match stage {
            Stage::AdvertiseKeys => Box::new(0..self.config.num_clients),
            Stage::ShareKeys => Box::new(self.advertised.keys().copied()),
            Stage::MaskedInput => Box::new(self.shared.keys().copied()),
            Stage::Unmask => Box::new(self.unmask_requested.iter().copied()),
        };
        expected.filter(|c| !self.has_sent(stage, *c)).collect()
    }

    fn has_sent(&self, stage: Stage, c: ClientId) -> bool {
        match stage {
            Stage::AdvertiseKeys => self.advertised.contains_key(&c),
            Stage::ShareKeys => self.shared.contains_key(&c),
            Stage::MaskedInput => self.uploaded.contains(&c),
            Stage::Unmask => self.responded.contains(&c),
        }
    }

    fn is_expected(&self, stage: Stage, c: ClientId) -> bool {
        match stage {
            Stage::AdvertiseKeys => c < self.config.num_clients,
            Stage::ShareKeys => self.advertised.contains_key(&c),
            Stage::MaskedInput => self.shared.contains_key(&c),
            Stage::Unmask => self.unmask_requested.contains(&c),
        }
    }

    /// Feeds one client message. A rejected message leaves the round as it was.
    pub fn handle_message(
        &mut self,
        from: ClientId,
        msg: ClientMessage,
    ) -> Result<(), ServerError> {
        self.admit(from, msg.stage())?;
        match msg {
            ClientMessage::AdvertiseKeys(m) => self.on_advertise(from, m)?,
            ClientMessage::ShareKeys(m) => self.on_share_keys(from, m)?,
            ClientMessage::MaskedInput(m) => self.on_masked_input(from, m)?,
            ClientMessage::UnmaskResponse(m) => self.on_unmask_response(from, m)?,
        }
        self.close_if_complete();
        Ok(())
    }

    /// Feeds one encoded client message (protocol-spec §4.3). Same as decoding and calling
    /// [`Self::handle_message`], except that a masked vector is added into the accumulator straight
    /// from its wire bytes, with no intermediate copy: the server's hot path.
    pub fn handle_bytes(&mut self, from: ClientId, bytes: &[u8]) -> Result<(), ServerError> {
        let undecodable = |e: fedlora_wire::DecodeError| ServerError::Undecodable {
            from,
            detail: e.to_string(),
        };
        match fedlora_wire::view_masked_input(bytes).map_err(undecodable)? {
            Some(packed) => {
                self.admit(from, Stage::MaskedInput)?;
                self.check_vector_shape(from, packed.ring_bits, packed.count as usize)?;
                let width = usize::from(packed.ring_bits / 8);
                self.accumulator
                    .par_chunks_mut(crate::prg::CHUNK_WORDS)
                    .zip(packed.payload.par_chunks(crate::prg::CHUNK_WORDS * width))
                    .for_each(|(acc, bytes)| {
                        fedlora_wire::add_packed_words(acc, packed.ring_bits, bytes)
                    });
                self.uploaded.insert(from);
                self.close_if_complete();
                Ok(())
            }
            None => {
                let msg = fedlora_wire::decode_client(bytes).map_err(undecodable)?;
                self.handle_message(from, msg)
            }
        }
    }

    /// Starts a masked input that will arrive in pieces (protocol-spec §4.3.2, streaming): the
    /// same admission and shape checks as a whole message, from the header alone
    /// (`fedlora_wire::masked_input_shape`). The words then go in with
    /// [`Self::masked_input_piece`] as they arrive and count once [`Self::end_masked_input`]
    /// accepts the upload; until then they can be taken back ([`Self::cancel_masked_input`]), and
    /// closing the stage takes back every upload still in progress.
    pub fn begin_masked_input(
        &mut self,
        from: ClientId,
        ring_bits: u8,
        count: u32,
    ) -> Result<(), ServerError> {
        self.admit(from, Stage::MaskedInput)?;
        self.check_vector_shape(from, ring_bits, count as usize)?;
        let width = fedlora_wire::packed_word_bytes(ring_bits).ok_or_else(|| {
            Self::malformed(from, Stage::MaskedInput, format!("ring width {ring_bits}"))
        })?;
        self.partial
            .insert(from, PartialUpload::new(ring_bits, width, count));
        Ok(())
    }

    /// Adds the next piece of `from`'s masked input into the sum. A piece that overruns the
    /// announced length ends the upload: everything it added is taken back.
    pub fn masked_input_piece(
        &mut self,
        from: ClientId,
        piece: bytes::Bytes,
    ) -> Result<(), ServerError> {
        let Some(upload) = self.partial.get_mut(&from) else {
            return Err(self.no_upload(from));
        };
        if let Err(e) = upload.feed(&mut self.accumulator, piece) {
            self.cancel_masked_input(from);
            return Err(Self::malformed(from, Stage::MaskedInput, e.to_string()));
        }
        Ok(())
    }

    /// Ends `from`'s streamed masked input: accepted (it now counts, as a whole message would)
    /// if every announced byte arrived, else taken back out of the sum.
    pub fn end_masked_input(&mut self, from: ClientId) -> Result<(), ServerError> {
        let Some(upload) = self.partial.remove(&from) else {
            return Err(self.no_upload(from));
        };
        if let Err(e) = upload.check_complete() {
            upload.take_back(&mut self.accumulator);
            return Err(Self::malformed(from, Stage::MaskedInput, e.to_string()));
        }
        self.uploaded.insert(from);
        self.close_if_complete();
        Ok(())
    }

    /// Takes `from`'s unfinished masked input back out of the sum (its connection was lost);
    /// `false` when none was in progress.
    pub fn cancel_masked_input(&mut self, from: ClientId) -> bool {
        match self.partial.remove(&from) {
            Some(upload) => {
                upload.take_back(&mut self.accumulator);
                true
            }
            None => false,
        }
    }

    /// Clients whose masked input is arriving in pieces right now.
    pub fn uploads_in_progress(&self) -> Vec<ClientId> {
        self.partial.keys().copied().collect()
    }

    fn no_upload(&self, from: ClientId) -> ServerError {
        match self.phase {
            Phase::Collecting(Stage::MaskedInput) => {
                Self::malformed(from, Stage::MaskedInput, "no upload in progress")
            }
            Phase::Collecting(expected) => ServerError::WrongStage {
                from,
                expected,
                got: Stage::MaskedInput,
            },
            _ => ServerError::RoundOver,
        }
    }

    /// Checks that `from` may send a `stage` message now.
    fn admit(&self, from: ClientId, stage: Stage) -> Result<(), ServerError> {
        if from >= self.config.num_clients {
            return Err(ServerError::UnknownClient(from));
        }
        let Phase::Collecting(current) = self.phase else {
            return Err(ServerError::RoundOver);
        };
        if stage != current {
            return Err(ServerError::WrongStage {
                from,
                expected: current,
                got: stage,
            });
        }
        if self.has_sent(stage, from)
            || (stage == Stage::MaskedInput && self.partial.contains_key(&from))
        {
            return Err(ServerError::Duplicate { from, stage });
        }
        if !self.is_expected(stage, from) {
            return Err(ServerError::NotExpected { from, stage });
        }
        Ok(())
    }

    /// Clients that shared keys but sent no masked input (U2 \ U3, protocol-spec §4.2.4).
    fn dropped(&self) -> Vec<ClientId> {
        self.shared
            .keys()
            .copied()
            .filter(|c| !self.uploaded.contains(c))
            .collect()
    }

    fn close_if_complete(&mut self) {
        if self.waiting_for().is_empty() {
            self.close_stage();
        }
    }

    fn malformed(from: ClientId, stage: Stage, detail: impl Into<String>) -> ServerError {
        ServerError::Malformed {
            from,
            stage,
            detail: detail.into(),
        }
    }

    fn on_advertise(&mut self, from: ClientId, m: AdvertiseKeys) -> Result<(), ServerError> {
        if let Some(v) = &self.verifier {
            let msg = kdf::advertise_signing_bytes(
                self.config.round,
                &self.config.nonce,
                from,
                &m.cipher_pk,
                &m.mask_pk,
            );
            if !v.verify(from, &msg, &m.signature) {
                return Err(Self::malformed(from, Stage::AdvertiseKeys, "bad signature"));
            }
        }
        self.advertised.insert(from, m);
        Ok(())
    }

    fn on_share_keys(&mut self, from: ClientId, m: ShareKeys) -> Result<(), ServerError> {
        let stage = Stage::ShareKeys;
        let graph = self.graph.as_ref().ok_or(ServerError::RoundOver)?;
        let expected = graph.neighbours(from);
        let mut receivers: Vec<ClientId> = m.shares.iter().map(|s| s.receiver).collect();
        receivers.sort_unstable();
        if receivers != expected {
            return Err(Self::malformed(
                from,
                stage,
                "shares must be addressed to exactly the sender's neighbours",
            ));
        }
        if let Some(s) = m
            .shares
            .iter()
            .find(|s| s.sender != from || s.ciphertext.len() != CIPHERTEXT_BYTES)
        {
            return Err(Self::malformed(
                from,
                stage,
                format!(
                    "share for {} has sender {} and {} bytes",
                    s.receiver,
                    s.sender,
                    s.ciphertext.len()
                ),
            ));
        }
        self.commitments.insert(from, m.self_mask_commitment);
        self.shared.insert(from, m.shares);
        Ok(())
    }

    /// The ring width and length a masked vector must have (protocol-spec §4.2.4).
    fn check_vector_shape(
        &self,
        from: ClientId,
        ring_bits: u8,
        len: usize,
    ) -> Result<(), ServerError> {
        let stage = Stage::MaskedInput;
        let bits = self.config.params.ring_bits;
        if ring_bits != bits {
            return Err(Self::malformed(
                from,
                stage,
                format!("ring width {ring_bits} instead of {bits}"),
            ));
        }
        if len != self.vector_len + 1 {
            return Err(Self::malformed(
                from,
                stage,
                format!("{len} words instead of {}", self.vector_len + 1),
            ));
        }
        Ok(())
    }

    fn on_masked_input(&mut self, from: ClientId, m: MaskedInput) -> Result<(), ServerError> {
        let stage = Stage::MaskedInput;
        self.check_vector_shape(from, m.ring_bits, m.words.len())?;
        let bits = self.config.params.ring_bits;
        let mask = ring_mask(bits);
        if bits < 32 && m.words.iter().any(|&w| w & !mask != 0) {
            return Err(Self::malformed(from, stage, "word outside the ring"));
        }
        // Fold into the accumulator right away: the individual masked vector is not kept.
        self.accumulator
            .par_chunks_mut(crate::prg::CHUNK_WORDS)
            .zip(m.words.par_chunks(crate::prg::CHUNK_WORDS))
            .for_each(|(acc, words)| {
                acc.iter_mut()
                    .zip(words)
                    .for_each(|(a, w)| *a = a.wrapping_add(*w))
            });
        self.uploaded.insert(from);
        Ok(())
    }

    fn on_unmask_response(&mut self, from: ClientId, m: UnmaskResponse) -> Result<(), ServerError> {
        let graph = self.graph.as_ref().ok_or(ServerError::RoundOver)?;
        let mut seen = BTreeSet::new();
        // A self-mask share is wanted for a survivor the responder neighbours (or itself); a
        // mask-key share for a neighbour that shared keys but did not upload.
        let self_shares = Self::revealed(from, "self-mask", &m.self_mask_shares, &mut seen, |o| {
            self.uploaded.contains(&o) && (o == from || graph.are_neighbours(o, from))
        })?;
        let key_shares = Self::revealed(from, "mask-key", &m.mask_key_shares, &mut seen, |o| {
            self.shared.contains_key(&o)
                && !self.uploaded.contains(&o)
                && graph.are_neighbours(o, from)
        })?;
        for (owner, share) in self_shares {
            self.self_mask_shares.entry(owner).or_default().push(share);
        }
        for (owner, share) in key_shares {
            self.mask_key_shares.entry(owner).or_default().push(share);
        }
        self.responded.insert(from);
        Ok(())
    }

    /// Parses revealed shares of one kind, refusing owners that were not asked for and duplicates
    /// (an owner appears at most once across both kinds: `seen` is shared).
    fn revealed(
        from: ClientId,
        kind: &str,
        shares: &[fedlora_wire::RevealedShare],
        seen: &mut BTreeSet<ClientId>,
        wanted: impl Fn(ClientId) -> bool,
    ) -> Result<Vec<(ClientId, Share)>, ServerError> {
        let stage = Stage::Unmask;
        shares
            .iter()
            .map(|r| {
                if !wanted(r.owner) || !seen.insert(r.owner) {
                    return Err(Self::malformed(
                        from,
                        stage,
                        format!("unrequested or duplicate {kind} share of {}", r.owner),
                    ));
                }
                let share = Share::from_bytes(from, &r.share)
                    .map_err(|e| Self::malformed(from, stage, e.to_string()))?;
                Ok((r.owner, share))
            })
            .collect()
    }

    /// Ends the current stage: clients that have not answered count as dropped. Called by the
    /// driver when its deadline expires, and by the server itself once nobody is missing.
    pub fn close_stage(&mut self) {
        let Phase::Collecting(stage) = self.phase else {
            return;
        };
        // An upload still arriving when its stage closes never counts (§4.3.2 streaming).
        for (_, upload) in std::mem::take(&mut self.partial) {
            upload.take_back(&mut self.accumulator);
        }
        let survivors = match stage {
            Stage::AdvertiseKeys => self.advertised.len(),
            Stage::ShareKeys => self.shared.len(),
            Stage::MaskedInput => self.uploaded.len(),
            Stage::Unmask => self.responded.len(),
        } as u32;
        self.events
            .push_back(ServerEvent::StageClosed { stage, survivors });
        let threshold = self.config.params.threshold;
        if survivors < threshold {
            return self.abort(AbortReason::TooFewSurvivors {
                stage,
                survivors,
                threshold,
            });
        }
        let result = match stage {
            Stage::AdvertiseKeys => self.close_advertise(),
            Stage::ShareKeys => self.close_share_keys(),
            Stage::MaskedInput => self.close_masked_input(),
            Stage::Unmask => self.close_unmask(),
        };
        if let Err(reason) = result {
            self.abort(reason);
        }
    }

    /// Ends the round without an aggregate (operator shutdown, whole-round deadline).
    pub fn cancel(&mut self, detail: impl Into<String>) {
        if matches!(self.phase, Phase::Collecting(_)) {
            self.abort(AbortReason::Cancelled {
                detail: detail.into(),
            });
        }
    }

    fn abort(&mut self, reason: AbortReason) {
        self.phase = Phase::Aborted;
        self.accumulator = Vec::new();
        self.outbox.clear();
        for c in 0..self.config.num_clients {
            self.outbox
                .push_back((c, ServerMessage::Abort(reason.clone())));
        }
        self.events.push_back(ServerEvent::Aborted(reason));
    }

    /// Implements the key broadcast (protocol-spec §4.2.2).
    fn close_advertise(&mut self) -> Result<(), AbortReason> {
        let keys: Vec<PublicKeys> = self
            .advertised
            .iter()
            .map(|(&client, keys)| PublicKeys {
                client,
                keys: keys.clone(),
            })
            .collect();
        let c = &self.config;
        let session = kdf::session_id(
            c.round,
            &c.nonce,
            c.num_clients,
            &c.params,
            &c.manifest,
            &keys,
        );
        let members: Vec<ClientId> = self.advertised.keys().copied().collect();
        self.graph = Some(NeighbourGraph::new(
            &kdf::graph_seed(&session),
            &members,
            c.params.degree,
        ));
        self.session = Some(session);
        let broadcast = KeyBroadcast { keys };
        for &m in &members {
            self.outbox
                .push_back((m, ServerMessage::KeyBroadcast(broadcast.clone())));
        }
        self.phase = Phase::Collecting(Stage::ShareKeys);
        Ok(())
    }

    /// Implements the share forwarding (protocol-spec §4.2.3).
    fn close_share_keys(&mut self) -> Result<(), AbortReason> {
        let graph = self.graph.as_ref().ok_or(AbortReason::Cancelled {
            detail: "internal: no graph".into(),
        })?;
        let live: BTreeSet<ClientId> = self.shared.keys().copied().collect();
        // Every live client's secrets must be held by at least t live clients (itself included).
        for &c in &live {
            let holders = 1 + graph
                .neighbours(c)
                .iter()
                .filter(|n| live.contains(n))
                .count();
            check_holders(Stage::ShareKeys, c, holders, self.config.params.threshold)?;
        }
        let mut inbox: BTreeMap<ClientId, Vec<EncryptedShare>> = BTreeMap::new();
        for shares in self.shared.values() {
            for s in shares {
                if live.contains(&s.receiver) {
                    inbox.entry(s.receiver).or_default().push(s.clone());
                }
            }
        }
        for &c in &live {
            let shares = inbox.remove(&c).unwrap_or_default();
            self.outbox
                .push_back((c, ServerMessage::ShareBroadcast(ShareBroadcast { shares })));
        }
        self.accumulator = vec![0u32; self.vector_len + 1];
        self.phase = Phase::Collecting(Stage::MaskedInput);
        Ok(())
    }

    /// Implements the unmask request (protocol-spec §4.2.4).
    fn close_masked_input(&mut self) -> Result<(), AbortReason> {
        let graph = self.graph.as_ref().ok_or(AbortReason::Cancelled {
            detail: "internal: no graph".into(),
        })?;
        let survivors: Vec<ClientId> = self.uploaded.iter().copied().collect();
        let dropped = self.dropped();
        let threshold = self.config.params.threshold;
        for &c in self.shared.keys() {
            let live_neighbours = graph
                .neighbours(c)
                .iter()
                .filter(|n| self.uploaded.contains(n))
                .count();
            let survived = self.uploaded.contains(&c);
            // A dropped client with no surviving neighbour left no mask in the sum.
            if survived || live_neighbours > 0 {
                check_holders(
                    Stage::MaskedInput,
                    c,
                    live_neighbours + usize::from(survived),
                    threshold,
                )?;
            }
        }
        let request = UnmaskRequest {
            survivors: survivors.clone(),
            dropped,
        };
        for &c in &survivors {
            self.outbox
                .push_back((c, ServerMessage::UnmaskRequest(request.clone())));
        }
        self.unmask_requested = survivors.into_iter().collect();
        self.phase = Phase::Collecting(Stage::Unmask);
        Ok(())
    }

    /// Implements mask removal and the result (protocol-spec §4.2.5).
    fn close_unmask(&mut self) -> Result<(), AbortReason> {
        let graph = self.graph.clone().ok_or(AbortReason::Cancelled {
            detail: "internal: no graph".into(),
        })?;
        let session = self.session.ok_or(AbortReason::Cancelled {
            detail: "internal: no session".into(),
        })?;
        let t = self.config.params.threshold;
        let stage = Stage::Unmask;
        let mut masks: Vec<MaskKey> = Vec::new();
        // Self masks of the survivors.
        for &c in &self.uploaded {
            let shares = self
                .self_mask_shares
                .get(&c)
                .map_or(&[][..], |v| v.as_slice());
            check_holders(stage, c, shares.len(), t)?;
            let seed = shamir::combine(shares, t as usize).map_err(|_| reconstruction_failed(c))?;
            // A wrong share yields a different seed; the commitment catches it (protocol-spec §3.7).
            let committed = self
                .commitments
                .get(&c)
                .ok_or_else(|| reconstruction_failed(c))?;
            let recomputed = kdf::self_mask_commitment(&seed, &session, c);
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                &recomputed[..],
                &committed[..],
            )) {
                return Err(reconstruction_failed(c));
            }
            masks.push(MaskKey::new(&seed, &session, Sign::Minus));
        }
        // Pairwise masks the survivors added towards dropped neighbours.
        let dropped = self.dropped();
        for &c in &dropped {
            let live: Vec<ClientId> = graph
                .neighbours(c)
                .into_iter()
                .filter(|n| self.uploaded.contains(n))
                .collect();
            if live.is_empty() {
                continue;
            }
            let shares = self
                .mask_key_shares
                .get(&c)
                .map_or(&[][..], |v| v.as_slice());
            check_holders(stage, c, shares.len(), t)?;
            let sk_bytes =
                shamir::combine(shares, t as usize).map_err(|_| reconstruction_failed(c))?;
            let sk = StaticSecret::from(*sk_bytes.expose());
            // The reconstructed key must match the advertised one: this catches wrong shares.
            let advertised = self
                .advertised
                .get(&c)
                .ok_or_else(|| reconstruction_failed(c))?;
            if PublicKey::from(&sk).to_bytes() != advertised.mask_pk {
                return Err(reconstruction_failed(c));
            }
            let derived: Result<Vec<MaskKey>, AbortReason> = live
                .par_iter()
                .map(|&j| {
                    let pk = self
                        .advertised
                        .get(&j)
                        .ok_or_else(|| reconstruction_failed(j))?;
                    let seed: Seed = crate::client::pairwise_seed(&sk, &pk.mask_pk, &session, c, j)
                        .map_err(|_| reconstruction_failed(c))?;
                    // Survivor j added Sign::pairwise(j, c); remove it.
                    Ok(MaskKey::new(&seed, &session, Sign::pairwise(j, c).flip()))
                })
                .collect();
            masks.extend(derived?);
        }
        let mut sum = std::mem::take(&mut self.accumulator);
        apply_masks(&mut sum, &masks);
        let mask = ring_mask(self.config.params.ring_bits);
        sum.iter_mut().for_each(|w| *w &= mask);
        let quantizer = Quantizer::new(&self.config.params);
        let (mean, weight_sum) =
            quantizer
                .weighted_mean(&sum)
                .map_err(|e: QuantError| AbortReason::Cancelled {
                    detail: e.to_string(),
                })?;
        let survivors: Vec<ClientId> = self.uploaded.iter().copied().collect();
        let error_bound = quantizer.error_bound(survivors.len(), weight_sum);
        sum.pop();
        self.phase = Phase::Finished;
        self.events
            .push_back(ServerEvent::Finished(Box::new(Aggregate {
                round: self.config.round,
                survivors,
                dropped,
                sum,
                weight_sum,
                mean,
                error_bound,
                masks_removed: masks.len() as u64,
            })));
        Ok(())
    }
}

fn check_holders(
    stage: Stage,
    client: ClientId,
    holders: usize,
    threshold: u32,
) -> Result<(), AbortReason> {
    if holders < threshold as usize {
        Err(AbortReason::NeighbourhoodBelowThreshold {
            stage,
            client,
            holders: holders as u32,
            threshold,
        })
    } else {
        Ok(())
    }
}

fn reconstruction_failed(client: ClientId) -> AbortReason {
    AbortReason::ReconstructionFailed { client }
}
