//! An in-memory driver for one server and N clients (the simulator and the tests).
//!
//! Every message is really encoded and decoded ([`fedlora_wire`]), so byte counts are those of the
//! wire. Dropouts follow a plan: a client that drops at stage `S` sends nothing for `S` or later;
//! the server's stage deadline is modelled by closing the stage once every live client has spoken.
//! Time is not read here: a caller that wants timings passes a [`Clock`].

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

use fedlora_wire::{decode_server, encode_client, encode_server, AbortReason, Stage};

use crate::client::{Client, ClientInput};
use crate::server::{Aggregate, ConfigError, RoundConfig, Server, ServerEvent};

/// A monotonic clock, supplied by the caller (the protocol itself never reads time).
pub trait Clock: Sync {
    /// Nanoseconds since an arbitrary origin.
    fn now_nanos(&self) -> u64;
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The server produced the aggregate.
    Finished(Box<Aggregate>),
    /// The server aborted.
    Aborted(AbortReason),
}

/// Per-stage time, in nanoseconds, when a clock was given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageTimes {
    /// Server time spent in the stage (ingesting messages and closing the stage).
    pub server_nanos: u64,
    /// Sum over clients of the time each spent producing its message for the stage.
    pub client_nanos_total: u64,
    /// Clients that did work in the stage.
    pub clients_active: u32,
}

/// Clients processed together before the server ingests their messages: bounds the memory of
/// in-flight masked vectors.
const BATCH: usize = 64;

/// The driver.
pub struct Harness {
    server: Server,
    clients: Vec<Option<Client>>,
    drop_at: Vec<Option<Stage>>,
    inbox: Vec<Vec<Vec<u8>>>,
    /// Bytes each client sent.
    pub bytes_up: Vec<u64>,
    /// Bytes each client received.
    pub bytes_down: Vec<u64>,
    /// Errors clients returned (client id, error text); a correct run has none.
    pub client_errors: Vec<(u32, String)>,
    /// Errors the server returned for client messages; a correct run has none.
    pub server_errors: Vec<(u32, String)>,
    /// Times per stage, in protocol order (filled only when a clock is given).
    pub stage_times: Vec<(Stage, StageTimes)>,
    outcome: Option<Outcome>,
    progress: Option<Box<dyn FnMut(Progress) + Send>>,
}

/// Produces the input of a [`Client::deferred`] client when its masked input is due; `None`
/// makes that client drop out (it sends nothing more).
pub type InputSource<'a> = dyn FnMut(u32) -> Option<ClientInput> + 'a;

/// Progress within a stage, reported after each batch of clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The stage being collected (`None` once the round is over).
    pub stage: Option<Stage>,
    /// Clients processed so far in this stage.
    pub done: usize,
    /// Clients in the round.
    pub total: usize,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("server", &self.server)
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// A round with fresh clients built from `inputs`, each seeded from `seed`.
    pub fn new(
        config: RoundConfig,
        inputs: Vec<ClientInput>,
        drop_at: Vec<Option<Stage>>,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        let mut master = ChaCha20Rng::seed_from_u64(seed);
        let clients = inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| {
                let mut rng = ChaCha20Rng::seed_from_u64(master.next_u64());
                Client::new(i as u32, input, &mut rng)
            })
            .collect();
        Self::with_clients(config, clients, drop_at)
    }

    /// A round with caller-built clients (e.g. with authenticators or noise). Client `i` must have
    /// id `i`; `drop_at[i]` is the stage at which it stops, if any.
    pub fn with_clients(
        config: RoundConfig,
        clients: Vec<Client>,
        mut drop_at: Vec<Option<Stage>>,
    ) -> Result<Self, ConfigError> {
        let n = clients.len();
        drop_at.resize(n, None);
        Ok(Harness {
            server: Server::new(config)?,
            clients: clients.into_iter().map(Some).collect(),
            drop_at,
            inbox: vec![Vec::new(); n],
            bytes_up: vec![0; n],
            bytes_down: vec![0; n],
            client_errors: Vec::new(),
            server_errors: Vec::new(),
            stage_times: Vec::new(),
            outcome: None,
            progress: None,
        })
    }

    /// Calls `f` after each batch of clients, for progress display.
    pub fn on_progress(&mut self, f: impl FnMut(Progress) + Send + 'static) {
        self.progress = Some(Box::new(f));
    }

    /// The server, for inspection.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Client `i`, unless it dropped.
    pub fn client(&self, i: usize) -> Option<&Client> {
        self.clients.get(i).and_then(Option::as_ref)
    }

    /// Runs the round to its end.
    pub fn run(&mut self, clock: Option<&dyn Clock>) -> Outcome {
        self.run_with_inputs(clock, None)
    }

    /// Runs the round to its end; `inputs` supplies the inputs of [`Client::deferred`] clients,
    /// one client at a time and in id order, right before each receives the share broadcast, so at
    /// most one batch of inputs is alive at once.
    pub fn run_with_inputs(
        &mut self,
        clock: Option<&dyn Clock>,
        mut inputs: Option<&mut InputSource<'_>>,
    ) -> Outcome {
        loop {
            if let Some(outcome) = self.step_with_inputs(clock, inputs.as_deref_mut()) {
                return outcome;
            }
        }
    }

    fn now(clock: Option<&dyn Clock>) -> u64 {
        clock.map_or(0, Clock::now_nanos)
    }

    /// One exchange: deliver the server's messages, let clients answer, let the server ingest and
    /// close the stage. Returns the outcome once the round is over.
    pub fn step(&mut self, clock: Option<&dyn Clock>) -> Option<Outcome> {
        self.step_with_inputs(clock, None)
    }

    fn step_with_inputs(
        &mut self,
        clock: Option<&dyn Clock>,
        mut inputs: Option<&mut InputSource<'_>>,
    ) -> Option<Outcome> {
        while let Some((to, msg)) = self.server.poll_transmit() {
            // Encoding our own messages cannot fail for valid rounds; a failure is a bug to surface.
            match encode_server(&msg) {
                Ok(bytes) => {
                    if let Some(slot) = self.inbox.get_mut(to as usize) {
                        self.bytes_down[to as usize] += bytes.len() as u64;
                        slot.push(bytes);
                    }
                }
                Err(e) => self.server_errors.push((to, format!("encode: {e}"))),
            }
        }
        if let Some(outcome) = self.outcome.clone() {
            // Let clients see the abort (if any), then stop.
            self.deliver_all(clock);
            return Some(outcome);
        }
        let stage = self.server.stage();
        let mut times = StageTimes::default();
        let ids: Vec<usize> = (0..self.clients.len()).collect();
        for batch in ids.chunks(BATCH) {
            if let Some(source) = inputs.as_deref_mut() {
                self.provide_due_inputs(batch, source);
            }
            let uploads = self.clients_answer(batch, clock, &mut times);
            let start = Self::now(clock);
            for (from, bytes) in &uploads {
                if let Err(e) = self.server.handle_bytes(*from, bytes) {
                    self.server_errors.push((*from, e.to_string()));
                }
            }
            times.server_nanos += Self::now(clock) - start;
            // Freeing the in-memory "network buffers" is the simulation's cost, not the server's
            // (a real receiver reuses its buffers), so it happens after the timer.
            drop(uploads);
            if let Some(f) = self.progress.as_mut() {
                f(Progress {
                    stage,
                    done: batch[batch.len() - 1] + 1,
                    total: self.clients.len(),
                });
            }
        }
        let start = Self::now(clock);
        if self.server.stage() == stage {
            self.server.close_stage();
        }
        times.server_nanos += Self::now(clock) - start;
        if let (Some(stage), Some(_)) = (stage, clock) {
            self.stage_times.push((stage, times));
        }
        while let Some(event) = self.server.poll_event() {
            match event {
                ServerEvent::Finished(agg) => self.outcome = Some(Outcome::Finished(agg)),
                ServerEvent::Aborted(reason) => self.outcome = Some(Outcome::Aborted(reason)),
                ServerEvent::StageClosed { .. } => {}
            }
        }
        None
    }

    fn deliver_all(&mut self, clock: Option<&dyn Clock>) {
        let ids: Vec<usize> = (0..self.clients.len()).collect();
        let mut times = StageTimes::default();
        for batch in ids.chunks(BATCH) {
            let _ = self.clients_answer(batch, clock, &mut times);
        }
    }

    /// Clients in `batch` process their inbox in parallel; returns their encoded messages.
    fn clients_answer(
        &mut self,
        batch: &[usize],
        clock: Option<&dyn Clock>,
        times: &mut StageTimes,
    ) -> Vec<(u32, Vec<u8>)> {
        let lo = batch[0];
        let hi = batch[batch.len() - 1] + 1;
        let drop_at = &self.drop_at[lo..hi];
        let results: Vec<ClientResult> = self.clients[lo..hi]
            .par_iter_mut()
            .zip(self.inbox[lo..hi].par_iter_mut())
            .zip(drop_at.par_iter())
            .map(|((slot, inbox), drop_stage)| run_client(slot, inbox, *drop_stage, clock))
            .collect();
        let mut uploads = Vec::new();
        for (offset, r) in results.into_iter().enumerate() {
            let id = (lo + offset) as u32;
            if r.worked {
                times.clients_active += 1;
                times.client_nanos_total += r.nanos;
            }
            self.client_errors
                .extend(r.errors.into_iter().map(|e| (id, e)));
            for bytes in r.sent {
                self.bytes_up[id as usize] += bytes.len() as u64;
                uploads.push((id, bytes));
            }
        }
        uploads
    }
}

impl Harness {
    /// Asks `source` for the input of each deferred client of `batch` whose share broadcast is
    /// waiting in its inbox. A client without input drops out, as if it had stopped there.
    fn provide_due_inputs(&mut self, batch: &[usize], source: &mut InputSource<'_>) {
        for &id in batch {
            let Some(client) = self.clients[id].as_mut() else {
                continue;
            };
            if !client.input_due() || self.inbox[id].is_empty() {
                continue;
            }
            match source(id as u32) {
                Some(input) => {
                    if let Err(e) = client.provide_input(input) {
                        self.client_errors.push((id as u32, e.to_string()));
                        self.clients[id] = None;
                    }
                }
                None => self.clients[id] = None,
            }
        }
    }
}

struct ClientResult {
    sent: Vec<Vec<u8>>,
    errors: Vec<String>,
    nanos: u64,
    worked: bool,
}

fn run_client(
    slot: &mut Option<Client>,
    inbox: &mut Vec<Vec<u8>>,
    drop_stage: Option<Stage>,
    clock: Option<&dyn Clock>,
) -> ClientResult {
    let mut out = ClientResult {
        sent: Vec::new(),
        errors: Vec::new(),
        nanos: 0,
        worked: false,
    };
    let messages = std::mem::take(inbox);
    let Some(client) = slot.as_mut() else {
        return out;
    };
    if messages.is_empty() {
        return out;
    }
    let start = clock.map_or(0, Clock::now_nanos);
    for bytes in messages {
        match decode_server(&bytes) {
            Ok(msg) => {
                if let Err(e) = client.handle_message(msg) {
                    out.errors.push(e.to_string());
                }
            }
            Err(e) => out.errors.push(e.to_string()),
        }
    }
    let mut dropped = false;
    while let Some(msg) = client.poll_transmit() {
        if drop_stage.is_some_and(|s| msg.stage() >= s) {
            dropped = true;
            break;
        }
        match encode_client(&msg) {
            Ok(bytes) => out.sent.push(bytes),
            Err(e) => out.errors.push(format!("encode: {e}")),
        }
    }
    while client.poll_event().is_some() {}
    out.nanos = clock.map_or(0, Clock::now_nanos) - start;
    out.worked = true;
    if dropped {
        *slot = None;
    }
    out
}
