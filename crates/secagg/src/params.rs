//! Choosing the round parameters: graph degree, threshold and ring width (protocol-spec §5).
//!
//! The degree `k` and threshold `t` follow the reasoning of SecAgg+ (Bell et al. 2020, §4) and of
//! the graph parameter finder in Google's federated compute code, for the Harary ring graph:
//!
//! * privacy: the subgraph of honest, surviving clients must stay connected, or the server learns
//!   sums of components. On a ring with `k/2` neighbours a side it is disconnected only if `k/2`
//!   consecutive ring positions are all dropped or corrupt; a union bound over the `n` starting
//!   positions gives `n · (δ + γ)^(k/2) ≤ 2^-σ`;
//! * secrecy: an honest client's two secrets leak only if `t` of its `k` neighbours are corrupt,
//!   `n · P[Bin(k, γ) ≥ t] ≤ 2^-σ`; and `2t > k + 1`, so no two disjoint sets of holders can each
//!   reach the threshold (the defence against a server that asks some holders for `b` and others
//!   for `s_sk`);
//! * correctness: every neighbourhood keeps at least `t` survivors,
//!   `n · P[Bin(k + 1, 1 − δ) < t] ≤ 2^-η`.
//!
//! The smallest even `k` that satisfies all three, with the smallest admissible `t`, is chosen.
//! When `k` would reach `n − 1` the complete graph is used (classic SecAgg), with `t` the strict
//! majority and above the number of corrupt clients; its failure probability is then reported,
//! not guaranteed, because small rounds cannot reach 2^-20 at high dropout rates.
//!
//! The ring is `Z_{2^b}` with `b ∈ {8, 16, 24, 32}`: the smallest width leaving at least
//! `min_quant_bits` of precision once `⌈log2 n⌉ + 1` bits of headroom are reserved for the sum, and
//! with `n · W < 2^b` for the weight sum. Everything is integer-exact, so the sum cannot wrap: when no
//! width fits, derivation fails rather than silently overflowing.

use fedlora_wire::RoundParams;
use serde::Serialize;

/// What the operator asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamRequest {
    /// Clients invited to the round.
    pub clients: u32,
    /// Expected fraction of clients that drop out before the end of the round (δ).
    pub expected_dropout: f64,
    /// Assumed fraction of clients colluding with the server (γ).
    pub corrupt_fraction: f64,
    /// Privacy failure allowed: 2^-security_bits (σ, default 40).
    pub security_bits: f64,
    /// Correctness failure allowed: 2^-failure_bits (η, default 20).
    pub failure_bits: f64,
    /// Clipping range `[-clip, clip]` of every value.
    pub clip: f32,
    /// Largest client weight.
    pub weight_bound: u32,
    /// Minimum fixed-point precision in bits.
    pub min_quant_bits: u8,
    /// Cap on the precision, to leave headroom in the ring for noise added inside the masks
    /// (protocol-spec §7): `None` uses every bit the sum does not need.
    pub max_quant_bits: Option<u8>,
    /// Force a ring width instead of the smallest one that fits.
    pub ring_bits: Option<u8>,
}

impl ParamRequest {
    /// A request with the defaults of protocol-spec §5.4 for `clients` clients.
    pub fn new(clients: u32) -> Self {
        ParamRequest {
            clients,
            expected_dropout: 0.1,
            corrupt_fraction: 0.05,
            security_bits: 40.0,
            failure_bits: 20.0,
            clip: 1.0,
            weight_bound: 1,
            min_quant_bits: 16,
            max_quant_bits: None,
            ring_bits: None,
        }
    }
}

/// The chosen parameters and the probabilities they achieve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Derivation {
    /// The parameters to put in [`fedlora_wire::RoundSetup`].
    #[serde(skip)]
    pub params: RoundParams,
    /// Whether the complete graph (classic SecAgg) was chosen.
    pub complete_graph: bool,
    /// log2 of the bound on the honest-survivor graph disconnecting.
    pub log2_disconnect: f64,
    /// log2 of the bound on corrupt neighbours reaching the threshold.
    pub log2_reveal: f64,
    /// log2 of the bound on some neighbourhood falling below the threshold.
    pub log2_failure: f64,
    /// Whether the failure bound meets 2^-failure_bits.
    pub failure_goal_met: bool,
}

/// Why parameters could not be derived.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    /// Secure aggregation needs at least two clients.
    #[error("at least 2 clients are needed, got {0}")]
    TooFewClients(u32),
    /// A rate is NaN, negative or not below one, or the two rates sum to one or more.
    #[error("{name} must be in [0, 1) and dropout + corrupt < 1, got {value}")]
    BadRate {
        /// Which parameter.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// The clipping range is not a positive finite number.
    #[error("clip must be positive and finite, got {0}")]
    BadClip(f32),
    /// The weight bound is zero.
    #[error("weight bound must be at least 1")]
    ZeroWeightBound,
    /// A security or failure exponent is not positive and finite.
    #[error("{name} must be positive and finite, got {value}")]
    BadExponent {
        /// Which parameter.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// No ring width up to 32 bits holds the sum without overflow.
    #[error("the sum of {clients} clients at {quant_bits}-bit precision with weight bound {weight_bound} needs a {needed}-bit ring; at most 32 bits are supported: lower the precision, the weight bound or the number of clients per round")]
    RingTooNarrow {
        /// Clients in the round.
        clients: u32,
        /// Requested precision.
        quant_bits: u8,
        /// Weight bound.
        weight_bound: u32,
        /// Bits that would be needed.
        needed: u32,
    },
    /// The degree is neither the complete graph (`num_clients − 1`) nor an even number of at least 2:
    /// a degree-0 graph would let the server unmask each input from its owner's own share.
    #[error("degree {degree} is invalid for {num_clients} clients (need an even degree >= 2, or {complete} for the complete graph)", complete = num_clients.saturating_sub(1))]
    BadDegree {
        /// The degree given.
        degree: u32,
        /// Clients in the round.
        num_clients: u32,
    },
    /// The threshold is not a strict majority of the neighbourhood (itself included).
    #[error(
        "threshold {threshold} must be a strict majority of the neighbourhood of {neighbourhood}"
    )]
    BadThreshold {
        /// The threshold given.
        threshold: u32,
        /// Neighbourhood size, the client itself included.
        neighbourhood: u32,
    },
    /// A forced ring width is not 8, 16, 24 or 32, or does not hold the sum.
    #[error("ring width {ring_bits} cannot hold the sum (needs one of 8/16/24/32 with at least {needed} bits)")]
    BadRingBits {
        /// The width given.
        ring_bits: u8,
        /// Bits needed.
        needed: u32,
    },
}

/// ⌈log2 n⌉ for n ≥ 1.
pub fn ceil_log2(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// log2 of P[Bin(n, p) ≥ t], computed in log space so that tails down to 2^-1000 are exact enough.
pub fn log2_binomial_upper_tail(n: u32, p: f64, t: u32) -> f64 {
    if t == 0 {
        return 0.0;
    }
    if t > n || p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    // ln C(n, t) by a running product.
    let mut ln_c = 0.0;
    for i in 0..t {
        ln_c += f64::from(n - i).ln() - f64::from(i + 1).ln();
    }
    let mut ln_term = ln_c + f64::from(t) * ln_p + f64::from(n - t) * ln_q;
    let mut terms = vec![ln_term];
    for k in t..n {
        ln_term += f64::from(n - k).ln() - f64::from(k + 1).ln() + ln_p - ln_q;
        terms.push(ln_term);
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|x| (x - max).exp()).sum();
    ((max + sum.ln()) / std::f64::consts::LN_2).min(0.0)
}

fn check_rate(name: &'static str, value: f64) -> Result<(), ParamError> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(ParamError::BadRate { name, value })
    }
}

/// Implements the ring-size rule of protocol-spec §5.3: returns `(headroom, needed)`, where
/// `headroom = ⌈log2 n⌉ + 1` bits keep the sum of `n` values of `quant_bits` precision from
/// overflowing, and `needed` is the smallest ring width that also holds the weight sum `n · W`.
fn ring_bits_needed(clients: u32, weight_bound: u32, quant_bits: u8) -> (u32, u32) {
    let headroom = ceil_log2(u64::from(clients)) + 1;
    let weight_bits = 64 - (u64::from(clients) * u64::from(weight_bound)).leading_zeros();
    let needed = (u32::from(quant_bits) + headroom).max(weight_bits + 1);
    (headroom, needed)
}

/// Implements the ring-width choice (protocol-spec §5.3). Returns `(ring_bits, quant_bits)`.
pub fn choose_ring(
    clients: u32,
    weight_bound: u32,
    min_quant_bits: u8,
    forced: Option<u8>,
) -> Result<(u8, u8), ParamError> {
    let (headroom, needed) = ring_bits_needed(clients, weight_bound, min_quant_bits);
    let fits = |b: u8| u32::from(b) >= needed;
    let b =
        match forced {
            Some(b) if [8, 16, 24, 32].contains(&b) && fits(b) => b,
            Some(b) => {
                return Err(ParamError::BadRingBits {
                    ring_bits: b,
                    needed,
                })
            }
            None => [8u8, 16, 24, 32].into_iter().find(|&b| fits(b)).ok_or(
                ParamError::RingTooNarrow {
                    clients,
                    quant_bits: min_quant_bits,
                    weight_bound,
                    needed,
                },
            )?,
        };
    // The precision uses every bit the headroom leaves; at most 31 so the scale fits an i32 range.
    let q = (u32::from(b) - headroom).min(31) as u8;
    Ok((b, q))
}

/// Implements the parameter derivation (protocol-spec §5.2–§5.4).
pub fn derive(req: &ParamRequest) -> Result<Derivation, ParamError> {
    let n = req.clients;
    if n < 2 {
        return Err(ParamError::TooFewClients(n));
    }
    check_rate("expected dropout", req.expected_dropout)?;
    check_rate("corrupt fraction", req.corrupt_fraction)?;
    check_rate(
        "expected dropout + corrupt fraction",
        req.expected_dropout + req.corrupt_fraction,
    )?;
    for (name, value) in [
        ("security bits", req.security_bits),
        ("failure bits", req.failure_bits),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(ParamError::BadExponent { name, value });
        }
    }
    if !(req.clip.is_finite() && req.clip > 0.0) {
        return Err(ParamError::BadClip(req.clip));
    }
    if req.weight_bound == 0 {
        return Err(ParamError::ZeroWeightBound);
    }
    let (ring_bits, mut quant_bits) =
        choose_ring(n, req.weight_bound, req.min_quant_bits, req.ring_bits)?;
    if let Some(cap) = req.max_quant_bits {
        if cap < req.min_quant_bits.max(2) {
            return Err(ParamError::BadExponent {
                name: "max quant bits (below the minimum precision)",
                value: f64::from(cap),
            });
        }
        quant_bits = quant_bits.min(cap);
    }
    let (delta, gamma) = (req.expected_dropout, req.corrupt_fraction);
    let log2_n = f64::from(n).log2();
    let mut k = 2u32;
    while k + 1 < n {
        let log2_disconnect = log2_n + f64::from(k / 2) * (delta + gamma).log2();
        if log2_disconnect <= -req.security_bits {
            let size = k + 1;
            let majority = size / 2 + 1;
            let t = (majority..=size)
                .find(|&t| log2_n + log2_binomial_upper_tail(k, gamma, t) <= -req.security_bits);
            if let Some(t) = t {
                // Fewer than t survivors among k + 1 = more than k + 1 - t dropouts.
                let log2_failure = log2_n + log2_binomial_upper_tail(size, delta, size - t + 1);
                if log2_failure <= -req.failure_bits {
                    return Ok(Derivation {
                        params: round_params(k, t, ring_bits, quant_bits, req),
                        complete_graph: false,
                        log2_disconnect,
                        log2_reveal: log2_n + log2_binomial_upper_tail(k, gamma, t),
                        log2_failure,
                        failure_goal_met: true,
                    });
                }
            }
        }
        k += 2;
    }
    // Complete graph: the corrupt set is a fixed ⌊γn⌋ clients, so t above it keeps both secrets
    // of every honest client out of reach; the strict majority stops split requests.
    let corrupt = (gamma * f64::from(n)).floor() as u32;
    let t = (n / 2 + 1).max(corrupt + 1).min(n);
    let log2_failure = log2_binomial_upper_tail(n, delta, n - t + 1);
    Ok(Derivation {
        params: round_params(n - 1, t, ring_bits, quant_bits, req),
        complete_graph: true,
        log2_disconnect: f64::NEG_INFINITY,
        log2_reveal: f64::NEG_INFINITY,
        log2_failure,
        failure_goal_met: log2_failure <= -req.failure_bits,
    })
}

fn round_params(k: u32, t: u32, ring_bits: u8, quant_bits: u8, req: &ParamRequest) -> RoundParams {
    RoundParams {
        degree: k,
        threshold: t,
        ring_bits,
        quant_bits,
        clip: req.clip,
        weight_bound: req.weight_bound,
    }
}

/// Checks parameters received from a server before a client acts on them (protocol-spec §5.5).
pub fn validate(params: &RoundParams, num_clients: u32) -> Result<(), ParamError> {
    if num_clients < 2 {
        return Err(ParamError::TooFewClients(num_clients));
    }
    if !(params.clip.is_finite() && params.clip > 0.0) {
        return Err(ParamError::BadClip(params.clip));
    }
    if params.weight_bound == 0 {
        return Err(ParamError::ZeroWeightBound);
    }
    let (_, needed) = ring_bits_needed(num_clients, params.weight_bound, params.quant_bits);
    if ![8, 16, 24, 32].contains(&params.ring_bits)
        || u32::from(params.ring_bits) < needed
        || params.quant_bits < 2
    {
        return Err(ParamError::BadRingBits {
            ring_bits: params.ring_bits,
            needed,
        });
    }
    let complete = params.degree >= num_clients - 1;
    if !complete && (params.degree < 2 || params.degree % 2 != 0) {
        return Err(ParamError::BadDegree {
            degree: params.degree,
            num_clients,
        });
    }
    let size = params.degree.min(num_clients - 1) + 1;
    if params.threshold > size || 2 * params.threshold <= size {
        return Err(ParamError::BadThreshold {
            threshold: params.threshold,
            neighbourhood: size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tail_matches_direct_sum() {
        // P[Bin(10, 0.5) >= 8] = (45 + 10 + 1) / 1024.
        let direct = (56.0f64 / 1024.0).log2();
        assert!((log2_binomial_upper_tail(10, 0.5, 8) - direct).abs() < 1e-12);
        assert_eq!(log2_binomial_upper_tail(10, 0.3, 0), 0.0);
        assert_eq!(log2_binomial_upper_tail(10, 0.3, 11), f64::NEG_INFINITY);
    }

    #[test]
    fn thousand_clients_get_a_sparse_graph() {
        let mut req = ParamRequest::new(1024);
        req.weight_bound = 1000;
        let d = derive(&req).unwrap();
        assert!(!d.complete_graph);
        let p = &d.params;
        assert_eq!(p.degree % 2, 0);
        assert!(p.degree < 100, "degree {}", p.degree);
        assert!(2 * p.threshold > p.degree + 1);
        assert!(d.log2_disconnect <= -40.0 && d.log2_reveal <= -40.0 && d.log2_failure <= -20.0);
        // 1024 clients: 11 bits of headroom; 32-bit ring leaves 21 bits of precision.
        assert_eq!((p.ring_bits, p.quant_bits), (32, 21));
        validate(p, 1024).unwrap();
    }

    #[test]
    fn small_rounds_use_the_complete_graph() {
        let d = derive(&ParamRequest::new(10)).unwrap();
        assert!(d.complete_graph);
        assert_eq!(d.params.degree, 9);
        assert_eq!(d.params.threshold, 6);
        assert_eq!((d.params.ring_bits, d.params.quant_bits), (24, 19));
        validate(&d.params, 10).unwrap();
    }

    #[test]
    fn a_sum_that_cannot_fit_is_refused_not_wrapped() {
        let mut req = ParamRequest::new(1 << 20);
        req.min_quant_bits = 16;
        assert!(matches!(
            derive(&req),
            Err(ParamError::RingTooNarrow { needed: 37, .. })
        ));
        let mut req = ParamRequest::new(1024);
        req.weight_bound = u32::MAX;
        assert!(matches!(
            derive(&req),
            Err(ParamError::RingTooNarrow { .. })
        ));
        let mut req = ParamRequest::new(10);
        req.ring_bits = Some(16);
        assert!(matches!(
            derive(&req),
            Err(ParamError::BadRingBits {
                ring_bits: 16,
                needed: 21
            })
        ));
    }

    #[test]
    fn precision_can_be_capped_for_noise_headroom() {
        let mut req = ParamRequest::new(10);
        req.max_quant_bits = Some(17);
        let d = derive(&req).unwrap();
        assert_eq!((d.params.ring_bits, d.params.quant_bits), (24, 17));
        validate(&d.params, 10).unwrap();
        req.max_quant_bits = Some(8);
        assert!(matches!(derive(&req), Err(ParamError::BadExponent { .. })));
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        assert_eq!(
            derive(&ParamRequest::new(1)),
            Err(ParamError::TooFewClients(1))
        );
        let mut r = ParamRequest::new(10);
        r.expected_dropout = f64::NAN;
        assert!(matches!(derive(&r), Err(ParamError::BadRate { .. })));
        let mut r = ParamRequest::new(10);
        r.expected_dropout = 0.6;
        r.corrupt_fraction = 0.5;
        assert!(matches!(derive(&r), Err(ParamError::BadRate { .. })));
        let mut r = ParamRequest::new(10);
        r.clip = f32::INFINITY;
        assert!(matches!(derive(&r), Err(ParamError::BadClip(_))));
        let mut r = ParamRequest::new(10);
        r.weight_bound = 0;
        assert_eq!(derive(&r), Err(ParamError::ZeroWeightBound));
        let mut r = ParamRequest::new(10);
        r.security_bits = -1.0;
        assert!(matches!(derive(&r), Err(ParamError::BadExponent { .. })));
    }

    #[test]
    fn validate_refuses_a_minority_threshold() {
        let mut p = derive(&ParamRequest::new(10)).unwrap().params;
        p.threshold = 5;
        assert_eq!(
            validate(&p, 10),
            Err(ParamError::BadThreshold {
                threshold: 5,
                neighbourhood: 10
            })
        );
        // Degree 0 with threshold 1 would let the server unmask each input alone.
        let mut q = derive(&ParamRequest::new(10)).unwrap().params;
        q.degree = 0;
        q.threshold = 1;
        assert_eq!(
            validate(&q, 10),
            Err(ParamError::BadDegree {
                degree: 0,
                num_clients: 10
            })
        );
        q.degree = 3;
        q.threshold = 3;
        assert_eq!(
            validate(&q, 10),
            Err(ParamError::BadDegree {
                degree: 3,
                num_clients: 10
            })
        );
        p.threshold = 6;
        p.ring_bits = 16;
        assert!(validate(&p, 10).is_err());
    }
}
