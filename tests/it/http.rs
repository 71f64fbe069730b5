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

/// A complete response as it arrived: head, blank line, body.
fn on_the_wire(r: &HttpResponse) -> String {
    format!("{}\r\n\r\n{}", r.head, r.body_text())
}

/// The common head of a refusal without headers of its own.
fn refusal(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Every kind of refusal reaches the client byte for byte, with the headers its status needs
/// (SPEC §3; docs/protocol.md, "HTTP statuses before the upgrade"), whichever layer refused: the
/// request parser, the upgrade rules, or the app's router and admission.
fn refusals_are_exact_on_the_wire(poller: &str) {
    let server = Server::start(poller, &[]);
    let valid = |path: &str| upgrade(path, "Sec-WebSocket-Version: 13\r\n");
    let cases: Vec<(&str, String, String)> = vec![
        (
            "parser: not HTTP",
            "\x16\x03\x01\x02\x00\x01\x00\r\n\r\n".into(),
            refusal("400 Bad Request", "malformed HTTP/1.1 request\n"),
        ),
        (
            "upgrade rules: bad version",
            upgrade("/echo", "Sec-WebSocket-Version: 8\r\n"),
            "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 33\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\n\r\nSec-WebSocket-Version must be 13\n"
                .into(),
        ),
        (
            "router: a method other than GET, on a reactor endpoint too",
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".into(),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 20\r\nConnection: close\r\nAllow: GET\r\n\r\nonly GET is allowed\n"
                .into(),
        ),
        (
            "router: unknown path",
            valid("/nope"),
            refusal("404 Not Found", "no such endpoint\n"),
        ),
        (
            "router: a WebSocket path without Upgrade",
            "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 42\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\n\r\nthis endpoint requires Upgrade: websocket\n"
                .into(),
        ),
        (
            "admission: invalid room name",
            valid("/r/a%20b"),
            refusal(
                "400 Bad Request",
                "room names are 1-64 characters of A-Z a-z 0-9 . _ -\n",
            ),
        ),
        (
            "admission: no id",
            valid("/ws"),
            refusal("400 Bad Request", "?id=<your id> is required\n"),
        ),
    ];
    for (name, request, expected) in &cases {
        let r = server.http(request);
        assert_eq!(on_the_wire(&r), *expected, "{name}");
    }
    // Each refusal is counted under its status, as every other answer is.
    let counted = |status: &str| {
        let sample = format!("wsrelay_http_responses_total{{status=\"{status}\"}}");
        server.metric(&sample)
    };
    assert_eq!(counted("400"), 3.0);
    assert_eq!(counted("404"), 1.0);
    assert_eq!(counted("405"), 1.0);
    assert_eq!(counted("426"), 2.0);
}

/// The reactor's endpoints are routed like every other path: a valid upgrade aimed at one of
/// them, or at the demo page, is answered in plain HTTP (RFC 7230 §6.7 lets a server ignore
/// Upgrade), never upgraded, and a path next to them is not found.
fn plain_endpoints_answer_an_upgrade_in_http(poller: &str) {
    let server = Server::start(poller, &[]);
    let valid = |path: &str| upgrade(path, "Sec-WebSocket-Version: 13\r\n");
    let health = server.http(&valid("/healthz"));
    assert_eq!(
        on_the_wire(&health),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n\
         Connection: close\r\n\r\nok\n"
    );
    let metrics = server.http(&valid("/metrics"));
    assert_eq!(metrics.status, 200, "{}", metrics.head);
    assert!(metrics.body_text().contains("wsrelay_connections"));
    let page = server.http(&valid("/"));
    assert_eq!(page.status, 200, "{}", page.head);
    assert!(page.body_text().starts_with("<!doctype html>"));
    assert_eq!(server.http(&valid("/healthz/x")).status, 404);
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
    refusals_are_exact_on_the_wire,
    plain_endpoints_answer_an_upgrade_in_http,
    stats_json_has_the_live_counters,
    plain_requests,
    oversized_head_gets_431,
    upgrade_response_is_exact,
    pipelined_frames_are_kept,
    request_split_into_single_bytes,
);
