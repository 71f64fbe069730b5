//! Micro benchmarks of permessage-deflate (SPEC §17): compressing chat-like JSON the way each
//! `--compression` mode does (`shared`: a reset after every message; `dedicated`: context
//! kept), and inflating it. Throughput is in uncompressed bytes, so results read as MB/s of
//! messages. Messages cycle through variants, so `dedicated` cannot just point back at an
//! identical previous message. The difference between the two modes on small messages is
//! the reset (zlib-rs clears a 128 KiB hash table).
//!
//! Quick run: `cargo bench --bench deflate -- --warm-up-time 1 --measurement-time 2`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsrelay::protocol::deflate::{Deflater, Inflater};

const SIZES: [usize; 3] = [256, 1024, 16 * 1024];
const LIMIT: usize = 1 << 20;

/// A chat-like JSON array of about `n` bytes; `variant` changes every number in it.
fn json(n: usize, variant: usize) -> Vec<u8> {
    let mut s = String::from("[");
    let mut i = variant * 7919;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"type":"message","room":"lobby","from":"user-{i}","text":"hello number {i}, how are you?","ts":{}}},"#,
            1_700_000_000 + i * 37
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

fn compress(c: &mut Criterion) {
    let mut group = c.benchmark_group("compress");
    for size in SIZES {
        let messages: Vec<Vec<u8>> = (0..16).map(|v| json(size, v)).collect();
        group.throughput(Throughput::Bytes(size as u64));
        for (mode, takeover) in [("shared", false), ("dedicated", true)] {
            let mut deflater = Deflater::new(15, takeover);
            let mut out = Vec::with_capacity(size);
            let mut next = messages.iter().cycle();
            group.bench_function(BenchmarkId::new(mode, size), |b| {
                b.iter(|| {
                    out.clear();
                    let message = next.next().map_or(&[][..], Vec::as_slice);
                    deflater.compress(black_box(message), &mut out)
                })
            });
        }
    }
    group.finish();
}

fn inflate(c: &mut Criterion) {
    let mut group = c.benchmark_group("inflate");
    for size in SIZES {
        let message = json(size, 0);
        let mut payload = Vec::new();
        Deflater::new(15, false)
            .compress(&message, &mut payload)
            .unwrap_or_else(|e| panic!("{e}"));
        group.throughput(Throughput::Bytes(size as u64));
        let mut inflater = Inflater::new(15, false);
        let mut out = Vec::with_capacity(size);
        group.bench_function(BenchmarkId::new("no_context_takeover", size), |b| {
            b.iter(|| {
                out.clear();
                inflater.inflate_message(black_box(&payload), &mut out, LIMIT)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, compress, inflate);
criterion_main!(benches);
