//! Criterion benchmarks of the protocol's hot paths, with a fixed seed and one `BenchmarkId` per
//! parameter. Throughput is reported in bytes of mask (4 bytes per word), so the figures compare
//! directly with `fedlora limits`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use fedlora_secagg::kdf::SessionId;
use fedlora_secagg::prg::{apply_masks, MaskKey, Sign};
use fedlora_secagg::secret::Seed;
use fedlora_secagg::shamir;

fn masks(count: u8) -> Vec<MaskKey> {
    (0..count)
        .map(|i| MaskKey::new(&Seed::from_bytes([i; 32]), &SessionId([1; 32]), Sign::Plus))
        .collect()
}

fn mask_expansion(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_masks");
    for len in [100_000usize, 1_000_000] {
        let keys = masks(8);
        group.throughput(Throughput::Bytes((len * 4 * keys.len()) as u64));
        group.bench_with_input(BenchmarkId::new("8_masks", len), &len, |b, &len| {
            let mut acc = vec![0u32; len];
            b.iter(|| apply_masks(&mut acc, &keys));
        });
    }
    group.finish();
}

fn sharing(c: &mut Criterion) {
    let mut group = c.benchmark_group("shamir");
    for k in [10u32, 40, 100] {
        let holders: Vec<u32> = (0..k).collect();
        let t = (k / 2 + 1) as usize;
        let secret = Seed::from_bytes([3; 32]);
        group.bench_with_input(BenchmarkId::new("split", k), &k, |b, _| {
            let mut rng = ChaCha20Rng::seed_from_u64(1);
            b.iter(|| shamir::split(&secret, t, &holders, &mut rng));
        });
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let shares = shamir::split(&secret, t, &holders, &mut rng).expect("valid threshold");
        group.bench_with_input(BenchmarkId::new("combine", k), &k, |b, _| {
            b.iter(|| shamir::combine(&shares, t));
        });
    }
    group.finish();
}

criterion_group!(benches, mask_expansion, sharing);
criterion_main!(benches);
