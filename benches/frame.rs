//! Micro benchmarks of the frame codec (SPEC §11): decode, encode, unmask and UTF-8 validation,
//! each with byte throughput so results read as GB/s, and each next to the baseline it should be
//! compared with (memcpy for unmasking, std for UTF-8).
//!
//! Quick run: `cargo bench --bench frame -- --warm-up-time 1 --measurement-time 2`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsrelay::protocol::frame::{decode_frame, encode_into, OpCode, Role};
use wsrelay::protocol::mask::{unmask, unmask_naive};
use wsrelay::protocol::utf8::Utf8Validator;

const SIZES: [usize; 3] = [64, 4 * 1024, 64 * 1024];
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const MAX_PAYLOAD: u64 = 1 << 20;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The server's hot path: a masked client frame, decoded and unmasked in place. Unmasking again
/// on every iteration just toggles the payload, which the decoder does not inspect.
fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in SIZES {
        let mut frame = Vec::new();
        encode_into(&mut frame, true, OpCode::Binary, &payload(size), Some(KEY));
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(BenchmarkId::new("masked", size), |b| {
            b.iter(|| decode_frame(black_box(&mut frame), Role::Server, MAX_PAYLOAD))
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in SIZES {
        let data = payload(size);
        let mut out = Vec::with_capacity(size + 14);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("server_unmasked", size), |b| {
            b.iter(|| {
                out.clear();
                encode_into(&mut out, true, OpCode::Binary, black_box(&data), None);
            })
        });
        group.bench_function(BenchmarkId::new("client_masked", size), |b| {
            b.iter(|| {
                out.clear();
                encode_into(&mut out, true, OpCode::Binary, black_box(&data), Some(KEY));
            })
        });
    }
    group.finish();
}

/// Unmasking 64 KiB next to copying 64 KiB: both read and write every byte once, so memcpy is
/// the ceiling the word loop is measured against. The byte loop shows what the word loop buys.
fn unmasking(c: &mut Criterion) {
    const LEN: usize = 64 * 1024;
    let mut group = c.benchmark_group("unmask_64KiB");
    group.throughput(Throughput::Bytes(LEN as u64));
    let mut buf = payload(LEN);
    let source = payload(LEN);
    group.bench_function("unmask", |b| b.iter(|| unmask(black_box(&mut buf), KEY)));
    group.bench_function("unmask_naive", |b| {
        b.iter(|| unmask_naive(black_box(&mut buf), KEY, 0))
    });
    group.bench_function("memcpy", |b| {
        b.iter(|| black_box(&mut buf).copy_from_slice(black_box(&source)))
    });
    group.finish();
}

/// 64 KiB of mixed text (ASCII with 2-, 3- and 4-byte characters), validated whole and in 4 KiB
/// fragments by the incremental validator, and whole by std.
fn utf8(c: &mut Criterion) {
    let mut text = String::new();
    while text.len() < 64 * 1024 {
        text.push_str("The quick brown fox jumps over the lazy dog. Ünïcödé € 🦀 ");
    }
    let bytes = text.as_bytes();
    let mut group = c.benchmark_group("utf8_64KiB");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("validator_whole", |b| {
        b.iter(|| {
            let mut v = Utf8Validator::default();
            v.feed(black_box(bytes)).and_then(|()| v.finish())
        })
    });
    group.bench_function("validator_4KiB_pieces", |b| {
        b.iter(|| {
            let mut v = Utf8Validator::default();
            for piece in black_box(bytes).chunks(4096) {
                v.feed(piece)?;
            }
            v.finish()
        })
    });
    group.bench_function("std_from_utf8", |b| {
        b.iter(|| std::str::from_utf8(black_box(bytes)).is_ok())
    });
    group.finish();
}

/// The server's common case: small payloads at whatever alignment they land in the read buffer.
fn unmasking_small(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask_small");
    for size in [16usize, 64, 125] {
        let mut storage = vec![0x5au8; size + 3];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("unaligned", size), |b| {
            b.iter(|| unmask(black_box(&mut storage[3..]), KEY))
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, unmasking, unmasking_small, utf8);
criterion_main!(benches);
