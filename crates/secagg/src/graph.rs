//! The masking graph (protocol-spec §5.1).
//!
//! Members (the clients that advertised keys) are placed on a ring in the order of
//! `SHA-256(graph_seed ‖ id)`, a public pseudo-random permutation every party computes from the
//! session id. Each member's neighbours are the `degree / 2` nearest members on either side: the
//! Harary graph H(m, degree) of SecAgg+ (Bell et al. 2020, §3). When `degree ≥ m − 1` every member
//! neighbours every other: classic SecAgg (Bonawitz et al. 2017).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use fedlora_wire::ClientId;

/// The neighbour relation of one session.
#[derive(Debug, Clone)]
pub struct NeighbourGraph {
    /// Ring position of each member.
    position: HashMap<ClientId, usize>,
    /// Members in ring order.
    ring: Vec<ClientId>,
    /// Neighbours on each side; `None` for the complete graph.
    half_degree: Option<usize>,
}

impl NeighbourGraph {
    /// Implements the graph construction (protocol-spec §5.1). `members` need not be sorted.
    pub fn new(seed: &[u8; 32], members: &[ClientId], degree: u32) -> Self {
        let mut keyed: Vec<([u8; 32], ClientId)> = members
            .iter()
            .map(|&id| {
                let mut h = Sha256::new();
                h.update(seed);
                h.update(id.to_le_bytes());
                (h.finalize().into(), id)
            })
            .collect();
        keyed.sort();
        let ring: Vec<ClientId> = keyed.into_iter().map(|(_, id)| id).collect();
        let position = ring.iter().enumerate().map(|(p, &id)| (id, p)).collect();
        let m = ring.len();
        let half = (degree / 2) as usize;
        let complete = degree as usize + 1 >= m || 2 * half + 1 >= m;
        NeighbourGraph {
            position,
            ring,
            half_degree: (!complete).then_some(half),
        }
    }

    /// Whether every member neighbours every other.
    pub fn is_complete(&self) -> bool {
        self.half_degree.is_none()
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: ClientId) -> bool {
        self.position.contains_key(&id)
    }

    /// Whether two distinct members are neighbours.
    pub fn are_neighbours(&self, a: ClientId, b: ClientId) -> bool {
        if a == b {
            return false;
        }
        let (Some(&pa), Some(&pb)) = (self.position.get(&a), self.position.get(&b)) else {
            return false;
        };
        match self.half_degree {
            None => true,
            Some(half) => {
                let m = self.ring.len();
                let d = pa.abs_diff(pb);
                d.min(m - d) <= half
            }
        }
    }

    /// A member's neighbours (not including itself), sorted by id; empty for a non-member.
    pub fn neighbours(&self, id: ClientId) -> Vec<ClientId> {
        let Some(&p) = self.position.get(&id) else {
            return Vec::new();
        };
        let m = self.ring.len();
        let mut out: Vec<ClientId> = match self.half_degree {
            None => self.ring.iter().copied().filter(|&x| x != id).collect(),
            Some(half) => (1..=half)
                .flat_map(|d| [self.ring[(p + d) % m], self.ring[(p + m - d) % m]])
                .collect(),
        };
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn relation_is_symmetric_and_regular(m in 2u32..60, half in 1u32..8, seed in any::<[u8; 32]>()) {
            let members: Vec<u32> = (0..m).map(|i| i * 2 + 5).collect();
            let g = NeighbourGraph::new(&seed, &members, half * 2);
            for &a in &members {
                let na = g.neighbours(a);
                let expected = if g.is_complete() { m as usize - 1 } else { 2 * half as usize };
                prop_assert_eq!(na.len(), expected);
                for &b in &members {
                    prop_assert_eq!(g.are_neighbours(a, b), g.are_neighbours(b, a));
                    prop_assert_eq!(g.are_neighbours(a, b), na.contains(&b));
                }
            }
        }
    }

    #[test]
    fn complete_when_degree_covers_everyone() {
        let g = NeighbourGraph::new(&[0; 32], &[1, 2, 3, 4], 3);
        assert!(g.is_complete());
        assert_eq!(g.neighbours(2), vec![1, 3, 4]);
        assert!(!g.are_neighbours(2, 9));
        assert!(g.neighbours(9).is_empty());
    }
}
