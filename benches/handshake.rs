//! Handshake cost per connection: parse a typical browser upgrade request, validate it and
//! compute the accept key (SPEC §11). Run with `cargo bench --bench handshake`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use wsrelay::protocol::handshake::{parse_request, upgrade_response, validate_upgrade};

/// What Chrome sends to open `ws://localhost:8080/ws?id=alice`.
const BROWSER: &[u8] = b"GET /ws?id=alice HTTP/1.1\r\n\
Host: localhost:8080\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: http://localhost:8080\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse", |b| b.iter(|| parse_request(black_box(BROWSER))));
    group.bench_function("parse+validate", |b| {
        b.iter(|| {
            let Ok(Some((req, _))) = parse_request(black_box(BROWSER)) else {
                unreachable!("the benchmark request is valid")
            };
            validate_upgrade(&req)
        })
    });
    group.bench_function("parse+validate+response", |b| {
        b.iter(|| {
            let Ok(Some((req, _))) = parse_request(black_box(BROWSER)) else {
                unreachable!("the benchmark request is valid")
            };
            let Ok(upgrade) = validate_upgrade(&req) else {
                unreachable!("the benchmark request is valid")
            };
            upgrade_response(&upgrade.accept, None)
        })
    });
    group.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
