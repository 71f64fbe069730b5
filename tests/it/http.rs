//! The HTTP side of the server: plain requests and rejected upgrades (SPEC §3).

use crate::poller_tests;
use crate::support::*;
use std::io::Write;

fn upgrade(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

fn plain_requests(poller: &str) {
    let server = Server::start(poller, &[]);
    let cases: &[(&str, String, u16, &str)] = &[
        (
            "healthz",
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            200,
            "ok",
        ),
        (
            "index",
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            200,
            "<!doctype html>",
        ),
        (
            "unknown path",
            "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            404,
            "",
        ),
        (
            "post",
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".into(),
            405,
            "",
        ),
        (
            "echo without upgrade",
            "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            426,
            "websocket",
        ),
        (
            "bad version",
            upgrade("/echo", "Sec-WebSocket-Version: 8\r\n"),
            426,
            "13",
        ),
        ("missing version", upgrade("/echo", ""), 426, "13"),
        (
            "short key",
            "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .into(),
            400,
            "",
        ),
        (
            "no host",
            "GET /echo HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .into(),
            400,
            "",
        ),
        (
            "no connection upgrade token",
            "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .into(),
            400,
            "",
        ),
        (
            "upgrade to unknown path",
            upgrade("/nope", "Sec-WebSocket-Version: 13\r\n"),
            404,
            "",
        ),
        (
            "garbage",
            "\x16\x03\x01\x02\x00\x01\x00\r\n\r\n".into(),
            400,
            "",
        ),
    ];
    for (name, request, status, body_has) in cases {
        let r = server.http(request);
        assert_eq!(r.status, *status, "{name}: {}", r.head);
        assert!(
            r.header("Connection").unwrap_or("").contains("close"),
            "{name}"
        );
        assert_eq!(
            r.header("Content-Length")
                .map(|v| v.parse::<usize>().unwrap()),
            Some(r.body.len()),
            "{name}"
        );
        assert!(!r.body.is_empty(), "{name}: every answer says why");
        assert!(
            r.body_text().contains(body_has),
            "{name}: {}",
            r.body_text()
        );
        if *status == 426 {
            assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"), "{name}");
        }
    }
    assert_eq!(
        server.metric("wsrelay_http_responses_total{status=\"426\"}"),
        3.0
    );
}

fn oversized_head_gets_431(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = server.tcp();
    let mut request = String::from("GET /echo HTTP/1.1\r\nHost: x\r\n");
    while request.len() <= 9000 {
        request.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    // The head never ends: the server must not wait for it past 8 KiB.
    s.write_all(request.as_bytes()).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

fn upgrade_response_is_exact(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = server.tcp();
    // Header names and tokens in any case, inside comma lists (SPEC §3).
    write!(
        s,
        "GET /echo HTTP/1.1\r\nhost: test\r\nUPGRADE: WebSocket\r\nconnection: keep-alive, Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nSEC-WEBSOCKET-VERSION: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_http_head(&mut s);
    assert_eq!(
        head,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
}

fn pipelined_frames_are_kept(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = server.tcp();
    let mut bytes = upgrade("/echo", "Sec-WebSocket-Version: 13\r\n").into_bytes();
    bytes.extend(client_frame(0x81, b"first"));
    bytes.extend(client_frame(0x82, b"second"));
    s.write_all(&bytes).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"));
    assert_eq!(read_server_frame(&mut s), (0x81, b"first".to_vec()));
    assert_eq!(read_server_frame(&mut s), (0x82, b"second".to_vec()));
}

fn request_split_into_single_bytes(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut s = server.tcp();
    let mut bytes = upgrade("/echo", "Sec-WebSocket-Version: 13\r\n").into_bytes();
    bytes.extend(client_frame(0x81, b"slow"));
    for b in bytes {
        s.write_all(&[b]).unwrap();
    }
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"));
    assert_eq!(read_server_frame(&mut s), (0x81, b"slow".to_vec()));
}

fn stats_json_has_the_live_counters(poller: &str) {
    let server = Server::start(poller, &[]);
    let mut ws = server.ws("/echo");
    ws.send(tungstenite::Message::text("one")).unwrap();
    ws.read().unwrap();
    let r = server.get("/stats.json");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("Cache-Control"), Some("no-store"));
    let body = r.body_text();
    assert!(
        body.starts_with(&format!("{{\"poller\":\"{poller}\"")),
        "{body}"
    );
    assert!(body.contains("\"connections\":1,"), "{body}");
    assert!(body.contains("\"messages_in\":1,"), "{body}");
    assert!(body.contains("\"auth_required\":0"), "{body}");
}

poller_tests!(
    stats_json_has_the_live_counters,
    plain_requests,
    oversized_head_gets_431,
    upgrade_response_is_exact,
    pipelined_frames_are_kept,
    request_split_into_single_bytes,
);
