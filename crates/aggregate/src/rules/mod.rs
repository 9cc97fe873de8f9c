//! One module per aggregation rule; each cites the paper it follows.

pub mod alternate;
pub mod exact;
pub mod fedavg;
pub mod frozen_a;
pub mod rank_partitioned;
pub mod share_a;
pub mod zero_pad;
