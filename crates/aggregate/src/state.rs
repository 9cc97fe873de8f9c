//! The global state between rounds: the adapter every client starts from, its encoding on the wire
//! and on disk, and the SHA-256 that binds a client's training to the state it was sent.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::init;
use crate::layout::{AdapterLayout, HeadInit};
use crate::rule::RuleKind;
use crate::tensor::{NamedTensors, Tensor};
use crate::AggregateError;

/// Magic bytes of an encoded global state.
pub const MAGIC: &[u8; 8] = b"FLGSTATE";
/// Version of the encoding.
pub const STATE_VERSION: u32 = 1;
/// Largest header accepted when decoding (bytes): a layout of a few thousand layers.
pub const MAX_HEADER: usize = 16 << 20;

/// The global adapter after `round` rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalState {
    /// Rounds run so far (0: the initial state); an aborted round counts, leaving the adapter as
    /// it was.
    pub round: u64,
    /// The rule that produced it (each rule keeps its own tensors).
    pub rule: RuleKind,
    /// Public seed of the initial values.
    pub seed: u64,
    /// The agreed adapter layout.
    pub layout: AdapterLayout,
    /// `A` and `B` of each layer at the global rank, the head, and (`exact`) the merged update of
    /// each frozen weight.
    pub tensors: NamedTensors,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u32,
    round: u64,
    rule: RuleKind,
    seed: u64,
    layout: AdapterLayout,
    tensors: Vec<(String, Vec<usize>)>,
}

impl GlobalState {
    /// The state before the first round: `A` from the public seed, `B = 0`, the head drawn as
    /// Hugging Face initialises it, and (`exact`) zero merged updates.
    pub fn initial(
        layout: AdapterLayout,
        rule: RuleKind,
        seed: u64,
    ) -> Result<Self, AggregateError> {
        layout.validate()?;
        let mut tensors = NamedTensors::new();
        for l in &layout.layers {
            tensors.insert(
                l.a_name(),
                init::lora_a(seed, 0, &l.module, layout.rank, l.inp),
            );
            tensors.insert(l.b_name(), Tensor::zeros(&[l.out, layout.rank]));
            if rule == RuleKind::Exact {
                tensors.insert(l.delta_name(), Tensor::zeros(&[l.out, l.inp]));
            }
        }
        for h in &layout.head {
            let t = match h.init {
                HeadInit::Normal => init::gaussian(seed, 0, "head", &h.name, &h.shape, 0.02),
                HeadInit::Zeros => Tensor::zeros(&h.shape),
            };
            tensors.insert(h.name.clone(), t);
        }
        Ok(GlobalState {
            round: 0,
            rule,
            seed,
            layout,
            tensors,
        })
    }

    /// Checks that the tensors are exactly those the layout and rule call for, with the right
    /// shapes and finite values.
    pub fn validate(&self) -> Result<(), AggregateError> {
        self.layout.validate()?;
        let expected = GlobalState::initial(self.layout.clone(), self.rule, self.seed)?;
        let want: Vec<(&str, &Vec<usize>)> = expected
            .tensors
            .iter()
            .map(|(n, t)| (n, &t.shape))
            .collect();
        let have: Vec<(&str, &Vec<usize>)> =
            self.tensors.iter().map(|(n, t)| (n, &t.shape)).collect();
        if want != have {
            let missing = want.iter().find(|w| !have.contains(w));
            let extra = have.iter().find(|h| !want.contains(h));
            return Err(AggregateError::StateMismatch(format!(
                "tensors do not match the layout and rule {}: missing {:?}, unexpected {:?}",
                self.rule,
                missing.map(|m| m.0),
                extra.map(|e| e.0)
            )));
        }
        if let Some((name, _)) = self
            .tensors
            .iter()
            .find(|(_, t)| t.data.iter().any(|x| !x.is_finite()))
        {
            return Err(AggregateError::NonFinite(name.to_string()));
        }
        Ok(())
    }

    /// The canonical encoding: `MAGIC`, a little-endian u32 header length, a JSON header (round,
    /// rule, seed, layout, tensor names and shapes), then every value as f32 little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            version: STATE_VERSION,
            round: self.round,
            rule: self.rule,
            seed: self.seed,
            layout: self.layout.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|(n, t)| (n.to_string(), t.shape.clone()))
                .collect(),
        };
        // Serializing plain data (strings, integers, finite floats) cannot fail.
        let json = serde_json::to_vec(&header).unwrap_or_default();
        let mut out = Vec::with_capacity(12 + json.len() + 4 * self.tensors.value_count());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        self.tensors.write_values(&mut out);
        out
    }

    /// Decodes and validates an encoded state. Any malformed input is a typed error.
    pub fn decode(bytes: &[u8]) -> Result<Self, AggregateError> {
        let bad = |m: &str| AggregateError::Encoding(m.to_string());
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(bad("not a fedlora global state (bad magic)"));
        }
        let hlen = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if hlen > MAX_HEADER || 12 + hlen > bytes.len() {
            return Err(bad("header length out of range"));
        }
        let header: Header = serde_json::from_slice(&bytes[12..12 + hlen])
            .map_err(|e| AggregateError::Encoding(format!("header: {e}")))?;
        if header.version != STATE_VERSION {
            return Err(AggregateError::Encoding(format!(
                "state version {} (this build reads {STATE_VERSION})",
                header.version
            )));
        }
        let tensors = crate::tensor::read_values(header.tensors, &bytes[12 + hlen..])?;
        let state = GlobalState {
            round: header.round,
            rule: header.rule,
            seed: header.seed,
            layout: header.layout,
            tensors,
        };
        state.validate()?;
        Ok(state)
    }

    /// SHA-256 of [`GlobalState::encode`].
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.encode()).into()
    }

    /// The `A` factor of layer `i` at the global rank.
    pub fn a(&self, i: usize) -> Result<&Tensor, AggregateError> {
        self.tensors.require(&self.layer(i)?.a_name())
    }

    /// The `B` factor of layer `i` at the global rank.
    pub fn b(&self, i: usize) -> Result<&Tensor, AggregateError> {
        self.tensors.require(&self.layer(i)?.b_name())
    }

    fn layer(&self, i: usize) -> Result<&crate::layout::LayerSpec, AggregateError> {
        self.layout
            .layers
            .get(i)
            .ok_or_else(|| AggregateError::MissingTensor(format!("layer {i}")))
    }

    /// The head tensors, in layout order.
    pub fn head(&self) -> Result<NamedTensors, AggregateError> {
        self.layout
            .head
            .iter()
            .map(|h| Ok((h.name.clone(), self.tensors.require(&h.name)?.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::layout;

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let s = GlobalState::initial(layout(2, 6, 5, &[2, 4]), RuleKind::Exact, 3).expect("init");
        let bytes = s.encode();
        assert_eq!(GlobalState::decode(&bytes).expect("decode"), s);
        assert_eq!(s.sha256(), GlobalState::decode(&bytes).expect("d").sha256());
        assert!(GlobalState::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(GlobalState::decode(&longer).is_err());
        let mut nan = bytes.clone();
        let n = nan.len();
        nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            GlobalState::decode(&nan),
            Err(AggregateError::NonFinite(_))
        ));
        assert!(GlobalState::decode(b"FLGSTATE\xff\xff\xff\xff").is_err());
        // A state whose tensors do not fit its rule is refused.
        let mut other = s.clone();
        other.rule = RuleKind::FedAvg;
        assert!(matches!(
            GlobalState::decode(&other.encode()),
            Err(AggregateError::StateMismatch(_))
        ));
    }
}
