//! `fedlora limits`: this machine's throughput bound for the server's work, measured in-process.
//!
//! The server of a round must (a) add every survivor's masked vector into one accumulator and
//! (b) expand an AES-128-CTR keystream for every mask it removes. Raw keystream generation and raw
//! `u32` summation, on the same thread pool the protocol uses, are the bound no implementation can
//! beat; `fedlora simulate` reports its server time as a ratio to it.

use std::time::Instant;

use clap::Args;
use rayon::prelude::*;
use serde::Serialize;

use fedlora_secagg::kdf::SessionId;
use fedlora_secagg::prg::{apply_masks, keystream_into, MaskKey, Sign, CHUNK_WORDS};
use fedlora_secagg::secret::Seed;

/// Measure AES-CTR expansion and u32 summation throughput on this machine.
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// Megabytes processed per measurement (more is steadier, slower).
    #[arg(long, default_value_t = 256)]
    pub megabytes: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Measured throughputs, bytes per second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// Threads in the pool the figures were measured with.
    pub threads: usize,
    /// Raw AES-128-CTR keystream, one thread.
    pub aes_ctr_bytes_per_sec_1t: f64,
    /// Raw AES-128-CTR keystream, all threads of the pool.
    pub aes_ctr_bytes_per_sec: f64,
    /// `acc[i] += v[i]` over u32, one thread.
    pub sum_bytes_per_sec_1t: f64,
    /// `acc[i] += v[i]` over u32, all threads.
    pub sum_bytes_per_sec: f64,
    /// The protocol's fused expand-and-add ([`apply_masks`]), all threads.
    pub fused_mask_add_bytes_per_sec: f64,
}

impl Limits {
    /// Seconds the bound allows for expanding `prg_words` mask words and summing `sum_words` words.
    pub fn bound_seconds(&self, prg_words: u64, sum_words: u64) -> f64 {
        prg_words as f64 * 4.0 / self.aes_ctr_bytes_per_sec
            + sum_words as f64 * 4.0 / self.sum_bytes_per_sec
    }
}

/// Scratch block for keystream measurements: 4 KiB, like the protocol's own expansion blocks.
const SCRATCH: usize = 4096;

fn best_of<F: FnMut()>(reps: usize, bytes: usize, mut f: F) -> f64 {
    f(); // warm-up: page faults, CPU frequency
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

impl Limits {
    /// The fastest of two measurements, field by field: on a shared machine the bound taken before
    /// and after a run differ, and the strictest (fastest) one is the honest bound.
    pub fn best(self, other: Limits) -> Limits {
        Limits {
            threads: self.threads,
            aes_ctr_bytes_per_sec_1t: self
                .aes_ctr_bytes_per_sec_1t
                .max(other.aes_ctr_bytes_per_sec_1t),
            aes_ctr_bytes_per_sec: self.aes_ctr_bytes_per_sec.max(other.aes_ctr_bytes_per_sec),
            sum_bytes_per_sec_1t: self.sum_bytes_per_sec_1t.max(other.sum_bytes_per_sec_1t),
            sum_bytes_per_sec: self.sum_bytes_per_sec.max(other.sum_bytes_per_sec),
            fused_mask_add_bytes_per_sec: self
                .fused_mask_add_bytes_per_sec
                .max(other.fused_mask_add_bytes_per_sec),
        }
    }
}

/// Measures the bound on the current rayon pool.
pub fn measure(megabytes: usize) -> Limits {
    let bytes = megabytes.max(1) << 20;
    let words = bytes / 4;
    let key = [7u8; 16];
    // Keystream into an L1-resident scratch block: the cipher's own speed, with no memory traffic,
    // so the bound is as strict as it can be.
    let blocks = bytes / SCRATCH;
    let keystream = |thread_blocks: usize, offset: usize| {
        let mut scratch = [0u8; SCRATCH];
        for b in 0..thread_blocks {
            keystream_into(&key, ((offset + b) * SCRATCH) as u64, &mut scratch);
            std::hint::black_box(&scratch);
        }
    };
    let aes_1t = best_of(3, bytes, || keystream(blocks, 0));
    let threads = rayon::current_num_threads();
    let aes = best_of(3, bytes, || {
        (0..threads)
            .into_par_iter()
            .for_each(|t| keystream(blocks / threads, t * (blocks / threads)))
    });
    let mut acc = vec![1u32; words];
    let input: Vec<u32> = (0..words as u32).collect();
    let sum_1t = best_of(3, bytes, || {
        acc.iter_mut()
            .zip(&input)
            .for_each(|(a, v)| *a = a.wrapping_add(*v));
    });
    let sum = best_of(3, bytes, || {
        acc.par_chunks_mut(CHUNK_WORDS)
            .zip(input.par_chunks(CHUNK_WORDS))
            .for_each(|(a, v)| {
                a.iter_mut()
                    .zip(v)
                    .for_each(|(a, v)| *a = a.wrapping_add(*v))
            });
    });
    std::hint::black_box(&acc);
    let masks: Vec<MaskKey> = (0..4u8)
        .map(|i| MaskKey::new(&Seed::from_bytes([i; 32]), &SessionId([0; 32]), Sign::Plus))
        .collect();
    let mut small = vec![0u32; words / 4];
    let fused = best_of(3, bytes, || apply_masks(&mut small, &masks));
    std::hint::black_box(&small);
    Limits {
        threads: rayon::current_num_threads(),
        aes_ctr_bytes_per_sec_1t: aes_1t,
        aes_ctr_bytes_per_sec: aes,
        sum_bytes_per_sec_1t: sum_1t,
        sum_bytes_per_sec: sum,
        fused_mask_add_bytes_per_sec: fused,
    }
}

/// Runs `fedlora limits`.
pub fn run(args: LimitsArgs, json: bool) -> anyhow::Result<()> {
    crate::ranges::int("--megabytes", args.megabytes as u64, 1, 1 << 16)?;
    crate::threads::init(args.threads)?;
    eprintln!(
        "measuring AES-128-CTR and u32 summation over {} MB ...",
        args.megabytes
    );
    let l = measure(args.megabytes);
    let gb = |x: f64| x / 1e9;
    crate::output::emit(
        json,
        || {
            format!(
                "threads: {}\nAES-128-CTR keystream: {:.2} GB/s ({:.2} GB/s on one thread)\nu32 summation: {:.2} GB/s ({:.2} GB/s on one thread)\nfused mask expand+add: {:.2} GB/s",
                l.threads,
                gb(l.aes_ctr_bytes_per_sec),
                gb(l.aes_ctr_bytes_per_sec_1t),
                gb(l.sum_bytes_per_sec),
                gb(l.sum_bytes_per_sec_1t),
                gb(l.fused_mask_add_bytes_per_sec)
            )
        },
        &l,
    )
}
