//! CPU thread count. candle's matmuls ask `RAYON_NUM_THREADS` on every call and otherwise use every
//! core; on the 2-core machines this project runs on, one thread made a small training loop about
//! 10x faster than the default pool (measured), because gemm's per-call fork/join overhead swamps
//! the small matmuls of a LoRA step. So the default is 1 thread on up to 4 cores and half the
//! cores above that (a guess for big machines, not a measurement); `--threads` overrides it.

/// The default for a machine with `cores` logical cores.
pub fn default_threads(cores: usize) -> usize {
    if cores <= 4 {
        1
    } else {
        cores / 2
    }
}

/// Sets the thread count for candle and rayon and returns it. `requested` wins, then an explicit
/// `RAYON_NUM_THREADS`, then [`default_threads`]. Call it once, early, before training starts.
pub fn configure_threads(requested: Option<usize>) -> usize {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n = requested
        .filter(|n| *n > 0)
        .or(from_env)
        .unwrap_or_else(|| default_threads(cores));
    // candle reads this variable on every matmul; setting it here is how a library can steer it.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // The global pool may already exist (e.g. in tests); then the variable above still applies.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(default_threads(1), 1);
        assert_eq!(default_threads(2), 1);
        assert_eq!(default_threads(16), 8);
    }
}
