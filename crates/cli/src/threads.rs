//! The worker pool shared by the protocol's parallel loops.

/// Sizes rayon's global pool once; `None` keeps rayon's default (one thread per core). `--threads`
/// is checked as in every subcommand.
pub fn init(threads: Option<usize>) -> anyhow::Result<()> {
    crate::ranges::threads(threads)?;
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot size the thread pool: {e}"))?;
    }
    Ok(())
}
