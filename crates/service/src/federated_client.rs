//! The client's side of federated rounds (protocol-spec §9): it keeps the global state the server
//! sent, checks that a round trains from (or scores) exactly that state, runs the
//! [`Contributor`] on a blocking thread while the protocol's first stages go on, and hands the
//! result to the state machine when its masked input is due.

use std::sync::{Arc, Mutex};

use fedlora_aggregate::{GlobalState, Upload, PARTITION_WEIGHTS};
use fedlora_secagg::wire::RoundSetup;
use fedlora_secagg::ClientInput;
use sha2::{Digest, Sha256};

use crate::federated::{Contributor, Purpose, ServerFederation};
use crate::session::RoundStart;

/// A contributor shared with the blocking threads that run it.
pub type SharedContributor = Arc<Mutex<Box<dyn Contributor>>>;

/// Work started for a round: training (an update) or evaluation (a score).
#[derive(Debug)]
pub struct Pending {
    /// What the round is for.
    pub purpose: Purpose,
    handle: tokio::task::JoinHandle<Result<Upload, String>>,
}

/// The client's federated state across rounds.
pub struct FedClient {
    contributor: SharedContributor,
    latest: Option<(Arc<GlobalState>, String)>,
}

impl std::fmt::Debug for FedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedClient")
            .field("latest", &self.latest.as_ref().map(|(_, h)| h))
            .finish_non_exhaustive()
    }
}

impl FedClient {
    /// A client that trains with `contributor`.
    pub fn new(contributor: Box<dyn Contributor>) -> Self {
        FedClient {
            contributor: Arc::new(Mutex::new(contributor)),
            latest: None,
        }
    }

    /// A global state frame (`sha256 || encoding`): checked, decoded and kept. Returns its hash.
    pub fn receive_state(&mut self, payload: &[u8]) -> Result<String, String> {
        if payload.len() < 32 {
            return Err("global state frame shorter than its hash".into());
        }
        let (hash, bytes) = payload.split_at(32);
        if Sha256::digest(bytes).as_slice() != hash {
            return Err("global state hash mismatch".into());
        }
        let state = GlobalState::decode(bytes).map_err(|e| format!("global state: {e}"))?;
        let hex = hex::encode(hash);
        self.latest = Some((Arc::new(state), hex.clone()));
        Ok(hex)
    }

    /// Starts the work of a federated round on a blocking thread, after checking that the round
    /// names the state this client holds. `round_index` is the number of the round in the run.
    pub fn start(&self, start: &RoundStart) -> Result<Pending, String> {
        let want = start
            .global_sha256
            .as_deref()
            .ok_or("the round start names no global state")?;
        let (state, have) = self
            .latest
            .as_ref()
            .ok_or("the round start came before any global state")?;
        if want != have {
            return Err(format!(
                "the round starts from global state {want}, this client was sent {have}"
            ));
        }
        let state = state.clone();
        let contributor = self.contributor.clone();
        let purpose = start.purpose;
        let handle = tokio::task::spawn_blocking(move || {
            let mut c = contributor
                .lock()
                .map_err(|_| "the trainer panicked in an earlier round".to_string())?;
            match purpose {
                Purpose::Train => c.contribute(state.round, &state),
                Purpose::Eval => c.evaluate(&state).map(|e| e.upload(u32::MAX)),
                Purpose::Vector => Err("not a federated round".into()),
            }
        });
        Ok(Pending { purpose, handle })
    }
}

/// Values at the end of a round's manifest that are public weights (no noise).
pub fn public_tail(setup: &RoundSetup) -> usize {
    setup
        .manifest
        .last()
        .filter(|t| t.name == PARTITION_WEIGHTS)
        .map_or(0, |t| t.shape.iter().map(|&d| d as usize).product())
}

impl FedClient {
    /// Checks the setup of a federated round against this client's own view of it: a training
    /// round sums exactly the manifest its rule gives for the state it was sent, an evaluation
    /// round exactly `[metric, loss]`.
    pub fn check_setup(&self, purpose: Purpose, setup: &RoundSetup) -> Result<(), String> {
        let want = match purpose {
            Purpose::Eval => ServerFederation::eval_manifest(),
            Purpose::Train => {
                let (state, _) = self.latest.as_ref().ok_or("no global state")?;
                crate::federated::to_specs(&state.rule.rule().manifest(state))?
            }
            Purpose::Vector => return Ok(()),
        };
        if setup.manifest != want {
            return Err(format!(
                "the round's manifest ({} tensors, {} values) is not the one this client's rule and global state give ({} tensors, {} values)",
                setup.manifest.len(),
                fedlora_secagg::manifest_len(&setup.manifest),
                want.len(),
                fedlora_secagg::manifest_len(&want)
            ));
        }
        Ok(())
    }
}

/// Waits for the round's work and turns it into the state machine's input: the private part
/// clipped in L2 for differential privacy (training only), then checked against the round's
/// per-value clip and weight bound (clipped values counted and reported, the weight capped with a
/// warning, non-finite values refused). Returns the input and the number of clipped values. While
/// the work runs, a progress line a minute says so.
pub async fn take_input(
    pending: Pending,
    setup: &RoundSetup,
    clip_norm: Option<f64>,
) -> Result<(ClientInput, u64), String> {
    let started = std::time::Instant::now();
    let mut handle = pending.handle;
    let verb = match pending.purpose {
        Purpose::Eval => "scoring the global adapter",
        _ => "training locally",
    };
    let mut upload = loop {
        tokio::select! {
            done = &mut handle => break done.map_err(|e| format!("local work stopped: {e}"))??,
            _ = tokio::time::sleep(PROGRESS_EVERY) => tracing::info!(
                target: "progress::client",
                "round {}: still {verb} ({:.0} s)",
                setup.round,
                started.elapsed().as_secs_f64()
            ),
        }
    };
    let want = fedlora_secagg::manifest_len(&setup.manifest);
    if upload.values.len() as u64 != want {
        return Err(format!(
            "the update has {} values, the round's manifest {want}: the server's rule or layout differs from this client's",
            upload.values.len()
        ));
    }
    if let (Purpose::Train, Some(c)) = (pending.purpose, clip_norm) {
        fedlora_dp::clip_l2(upload.private_values_mut(), c)
            .map_err(|e| format!("clipping: {e}"))?;
    }
    let mut input = ClientInput {
        values: std::mem::take(&mut upload.values),
        weight: upload.weight.max(1),
    };
    let what = match pending.purpose {
        Purpose::Eval => "the held-out score",
        _ => "the trained update",
    };
    let range = crate::contribution::check(
        &mut input,
        setup.params.clip,
        setup.params.weight_bound,
        setup.round,
        what,
    )?;
    Ok((input, range.clipped))
}

/// How often a client waiting on its local work says so.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::EvalContribution;
    use fedlora_aggregate::{AdapterLayout, HeadInit, HeadSpec, LayerSpec, RuleKind};

    struct Nothing;
    impl Contributor for Nothing {
        fn contribute(&mut self, _: u64, _: &GlobalState) -> Result<Upload, String> {
            Err("unused".into())
        }
        fn evaluate(&mut self, _: &GlobalState) -> Result<EvalContribution, String> {
            Err("unused".into())
        }
    }

    fn state() -> GlobalState {
        let layout = AdapterLayout {
            model: "m".into(),
            rank: 2,
            alpha: 4.0,
            partitions: vec![2],
            layers: vec![LayerSpec {
                module: "m.0.q".into(),
                out: 4,
                inp: 3,
            }],
            head: vec![HeadSpec {
                name: "m.classifier.bias".into(),
                shape: vec![2],
                init: HeadInit::Zeros,
            }],
        };
        GlobalState::initial(layout, RuleKind::FedAvg, 1).expect("state")
    }

    fn frame(s: &GlobalState) -> Vec<u8> {
        let bytes = s.encode();
        let mut p = Sha256::digest(&bytes).to_vec();
        p.extend_from_slice(&bytes);
        p
    }

    #[test]
    fn a_damaged_state_or_a_round_naming_another_state_is_refused() {
        let mut fed = FedClient::new(Box::new(Nothing));
        let good = frame(&state());
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(fed
            .receive_state(&bad)
            .expect_err("hash")
            .contains("hash mismatch"));
        let mut bad_body = state().encode();
        bad_body[12] = b'#';
        let mut bad_frame = Sha256::digest(&bad_body).to_vec();
        bad_frame.extend_from_slice(&bad_body);
        assert!(fed
            .receive_state(&bad_frame)
            .expect_err("decode")
            .contains("global state"));
        let sha = fed.receive_state(&good).expect("good");
        let start = |sha: Option<String>| RoundStart {
            peers: vec![],
            purpose: Purpose::Train,
            global_sha256: sha,
        };
        let e = fed
            .start(&start(Some("00".repeat(32))))
            .expect_err("other state");
        assert!(e.contains("this client was sent"), "{e}");
        assert!(fed.start(&start(None)).is_err());
        // A setup whose manifest is not the rule's is refused.
        let mut setup = fedlora_secagg::wire::RoundSetup {
            version: fedlora_secagg::PROTOCOL_VERSION,
            round: 1,
            nonce: [0; 32],
            client_id: 0,
            num_clients: 3,
            params: fedlora_secagg::derive(&fedlora_secagg::ParamRequest::new(3))
                .expect("p")
                .params,
            manifest: crate::federated::to_specs(&RuleKind::FedAvg.rule().manifest(&state()))
                .expect("specs"),
        };
        assert!(fed.check_setup(Purpose::Train, &setup).is_ok());
        setup.manifest[0].shape = vec![3, 3];
        assert!(fed
            .check_setup(Purpose::Train, &setup)
            .expect_err("manifest")
            .contains("manifest"));
        assert!(fed.check_setup(Purpose::Eval, &setup).is_err());
        assert_eq!(sha.len(), 64);
    }
}
