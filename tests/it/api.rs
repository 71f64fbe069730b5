//! The server API for backends (SPEC §16; docs/api.md): real sockets, an HTTP client written
//! here by hand (independent of the crate's own `wsrelay api` client, which is tested once at
//! the end through the binary), and `/ws` clients from tungstenite on the receiving side.

use crate::poller_tests;
use crate::relay_support::*;
use crate::support::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

pub(crate) const KEY: &str = "test-api-key-0123";

/// A server with the API on (and `extra` flags).
fn start(poller: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

/// One answer: status, head (status line and headers), body as JSON.
pub(crate) struct Answer {
    pub(crate) status: u16,
    head: String,
    pub(crate) json: Value,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One kept-alive HTTP/1.1 connection, parsed by hand: requests written whole, answers read
/// by their `Content-Length`.
pub(crate) struct Api {
    reader: BufReader<TcpStream>,
}

impl Api {
    pub(crate) fn connect(server: &Server) -> Api {
        Api::on(server.tcp())
    }

    /// On a connection the test opened itself (on a chosen worker, `workers_api.rs`).
    pub(crate) fn on(tcp: TcpStream) -> Api {
        Api {
            reader: BufReader::new(tcp),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// The bytes of a request with `Authorization: Bearer <key>` (if any) and `extra` headers.
    fn request(method: &str, path: &str, key: Option<&str>, extra: &str, body: &str) -> String {
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    pub(crate) fn call(&mut self, method: &str, path: &str, body: &str) -> Answer {
        self.write(Api::request(method, path, Some(KEY), "", body).as_bytes());
        self.answer()
    }

    pub(crate) fn publish(&mut self, body: Value) -> Answer {
        self.call("POST", "/api/publish", &body.to_string())
    }

    fn answer(&mut self) -> Answer {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .expect("answer within the deadline");
            assert!(n > 0, "connection closed; head so far: {head:?}");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .expect("Content-Length");
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&body)));
        Answer { status, head, json }
    }

    /// The status line and headers of an answer that has no body (to HEAD).
    fn head_only(&mut self) -> String {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("answer in time");
            assert!(n > 0, "connection closed; head so far: {head:?}");
            if line == "\r\n" {
                return head;
            }
            head.push_str(&line);
        }
    }

    /// The server closes the connection (in order, after its answers).
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest)),
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

fn api_metric(server: &Server, endpoint: &str, status: u16) -> f64 {
    server.metric(&format!(
        "wsrelay_api_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}"
    ))
}

fn publish_to_a_room_reaches_every_member(poller: &str) {
    let server = start(poller, &[]);
    let mut alice = Client::as_id(&server, "alice");
    alice.join("lobby", "alice");
    let mut bob = Client::as_id(&server, "bob");
    bob.join("lobby", "bob");
    alice.expect("presence"); // bob's join
    let mut api = Api::connect(&server);
    let answer = api.publish(json!({"room": "lobby", "payload": {"n": 1}}));
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["status"], "delivered");
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    for member in [&mut alice, &mut bob] {
        let m = member.expect("message");
        assert_eq!(m["room"], "lobby");
        assert_eq!(
            m["from"], "api",
            "an API message without `from` is from \"api\""
        );
        assert_eq!(m["payload"], json!({"n": 1}));
        assert_eq!(m["msg_id"], answer.json["msg_id"]);
    }
    // A `from` of the backend's choosing, on the same connection.
    let answer = api.publish(json!({"room": "lobby", "payload": "hi", "from": "billing"}));
    assert_eq!(answer.json["status"], "delivered");
    assert_eq!(alice.expect("message")["from"], "billing");
    assert_eq!(api_metric(&server, "publish", 200), 2.0);
}

fn publish_to_an_offline_id_is_queued_then_delivered(poller: &str) {
    let server = start(poller, &[]);
    let mut api = Api::connect(&server);
    let answer = api.publish(json!({"to": "bob", "payload": {"n": 1}, "id": "order-7"}));
    assert_eq!(answer.json["status"], "queued", "{}", answer.json);
    let msg_id = answer.json["msg_id"].clone();
    // The same message id again: acked as the first, stored once (SPEC §6 dedup).
    let again = api.publish(json!({"to": "bob", "payload": {"n": 1}, "id": "order-7"}));
    assert_eq!(again.json["msg_id"], msg_id, "{}", again.json);
    let mut bob = Client::as_id(&server, "bob");
    let m = bob.expect("message");
    assert_eq!(m["from"], "api");
    assert_eq!(m["to"], "bob");
    assert_eq!(m["msg_id"], msg_id);
    // Nothing else was queued: the next message bob gets is the live one.
    let live = api.publish(json!({"to": "bob", "payload": "live"}));
    assert_eq!(live.json["status"], "delivered");
    assert_eq!(bob.expect("message")["payload"], "live");
}

/// With `--data-dir` the answer waits for the fsync (SPEC §13): what was answered `queued`
/// survives SIGKILL right after the answer.
fn file_engine_answers_after_the_fsync(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut server = start(poller, &["--data-dir", data]);
    let mut api = Api::connect(&server);
    let mut ids = Vec::new();
    for i in 0..20 {
        let answer = api.publish(json!({"to": "bob", "payload": {"n": i}}));
        assert_eq!(answer.json["status"], "queued", "{}", answer.json);
        ids.push(answer.json["msg_id"].clone());
    }
    // Pipelined: the answers wait for their batches' fsyncs, and come back in order.
    let mut pipelined = String::new();
    for i in 20..40 {
        let body = json!({"to": "bob", "payload": {"n": i}}).to_string();
        pipelined.push_str(&Api::request("POST", "/api/publish", Some(KEY), "", &body));
    }
    api.write(pipelined.as_bytes());
    for _ in 20..40 {
        let answer = api.answer();
        assert_eq!(answer.json["status"], "queued", "{}", answer.json);
        ids.push(answer.json["msg_id"].clone());
    }
    server.signal("KILL");
    server.wait_exit(DEADLINE);
    let server = start_again(poller, dir.path(), server.addr);
    let mut bob = Client::as_id(&server, "bob");
    for (i, id) in ids.iter().enumerate() {
        let m = bob.expect("message");
        assert_eq!(m["payload"], json!({"n": i}));
        assert_eq!(&m["msg_id"], id);
    }
}

/// A client that sends its last request and shuts its sending side (`shutdown(SHUT_WR)`)
/// still gets the answer, though the file engine gives it only after the fsync, after the EOF.
fn a_half_closed_client_gets_its_deferred_answer(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = start(poller, &["--data-dir", data]);
    for extra in ["Connection: close\r\n", ""] {
        let mut api = Api::connect(&server);
        let body = json!({"to": "bob", "payload": extra}).to_string();
        api.write(Api::request("POST", "/api/publish", Some(KEY), extra, &body).as_bytes());
        api.reader
            .get_ref()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let answer = api.answer();
        assert_eq!(answer.status, 200, "{extra:?}: {}", answer.json);
        assert_eq!(
            answer.json["status"], "queued",
            "{extra:?}: {}",
            answer.json
        );
        api.expect_closed();
    }
    // Two pipelined requests, then the EOF: both answered, in order.
    let mut api = Api::connect(&server);
    let mut two = String::new();
    for n in 0..2 {
        let body = json!({"to": "bob", "payload": n}).to_string();
        two.push_str(&Api::request("POST", "/api/publish", Some(KEY), "", &body));
    }
    api.write(two.as_bytes());
    api.reader
        .get_ref()
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    for _ in 0..2 {
        assert_eq!(api.answer().json["status"], "queued");
    }
    api.expect_closed();
    assert_eq!(api_metric(&server, "publish", 200), 4.0);
    let mut bob = Client::as_id(&server, "bob");
    for payload in [
        json!("Connection: close\r\n"),
        json!(""),
        json!(0),
        json!(1),
    ] {
        assert_eq!(bob.expect("message")["payload"], payload);
    }
}

/// Clients that hang up while their publish waits for the fsync: the server neither crashes
/// nor keeps the connections, the messages are stored all the same, and the counters agree
/// (docs/api.md, "Metrics": the API counts the answer it gave, HTTP only what it queued).
fn a_connection_closed_while_its_answer_is_pending(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = start(poller, &["--data-dir", data]);
    let mut api = Api::connect(&server);
    assert_eq!(api.call("GET", "/api/rooms", "").status, 200);
    let responses_before = server.metric("wsrelay_http_responses_total{status=\"200\"}");
    for n in 0..10 {
        let mut api = Api::connect(&server);
        let body = json!({"to": "bob", "payload": n}).to_string();
        api.write(Api::request("POST", "/api/publish", Some(KEY), "", &body).as_bytes());
        drop(api);
    }
    // None of the ten is left: `api` and the /metrics request itself read request heads.
    server.wait_for_metric("wsrelay_connections{state=\"handshaking\"}", 2.0);
    server.wait_for_metric(
        "wsrelay_api_requests_total{endpoint=\"publish\",status=\"200\"}",
        10.0,
    );
    let mut bob = Client::as_id(&server, "bob");
    let mut got: Vec<i64> = (0..10)
        .map(|_| bob.expect("message")["payload"].as_i64().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    // Still serving.
    assert_eq!(api.call("GET", "/api/rooms", "").status, 200);
    let responses =
        server.metric("wsrelay_http_responses_total{status=\"200\"}") - responses_before;
    // The ten answers were still queued (the server answers what a client that hung up had
    // sent, then closes), and this call; /metrics reads add a few more.
    assert!(responses >= 11.0, "{responses}");
}

/// The file engine refuses a message when too many bytes wait for the disk (store busy): a
/// publish through the API is answered `rejected` with the reason and no msg_id, like a
/// client's send. Bursts of publishes on many connections until one finds the store busy.
fn an_engine_rejection_reaches_the_api(poller: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = start(
        poller,
        &[
            "--data-dir",
            data,
            "--max-in-flight-bytes",
            "1",
            "--offline-max",
            "100000",
        ],
    );
    let mut conns: Vec<Api> = (0..20).map(|_| Api::connect(&server)).collect();
    let start_at = std::time::Instant::now();
    let mut rejected = None;
    while rejected.is_none() {
        assert!(
            start_at.elapsed() < DEADLINE,
            "no publish found the store busy"
        );
        let body = json!({"to": "bob", "payload": "x"}).to_string();
        let bytes = Api::request("POST", "/api/publish", Some(KEY), "", &body);
        for api in &mut conns {
            api.write(bytes.as_bytes());
        }
        for api in &mut conns {
            let answer = api.answer();
            assert_eq!(answer.status, 200, "{}", answer.json);
            match answer.json["status"].as_str() {
                Some("queued") => assert!(answer.json["msg_id"].is_string()),
                Some("rejected") => rejected = Some(answer.json),
                _ => panic!("{}", answer.json),
            }
        }
    }
    let rejected = rejected.unwrap();
    assert!(rejected.get("msg_id").is_none(), "{rejected}");
    assert!(
        rejected["reason"].as_str().unwrap().contains("busy"),
        "{rejected}"
    );
    assert!(api_metric(&server, "publish", 200) >= 20.0);
}

/// A `Content-Length` that is not digits, or values that disagree: the bytes behind the head
/// cannot be delimited, so 400 and the close; a request pipelined behind is not served.
fn bad_content_length_is_400_then_close(poller: &str) {
    let server = start(poller, &[]);
    let next = Api::request("GET", "/api/rooms", Some(KEY), "", "");
    for lengths in [
        "Content-Length: five\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: -5\r\n",
    ] {
        let mut api = Api::connect(&server);
        api.write(
            format!(
                "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n{lengths}\r\nhello{next}"
            )
            .as_bytes(),
        );
        let answer = api.answer();
        assert_eq!(answer.status, 400, "{lengths:?}: {}", answer.json);
        assert_eq!(answer.header("Connection"), Some("close"), "{lengths:?}");
        assert!(
            answer.json["error"]
                .as_str()
                .unwrap()
                .contains("Content-Length"),
            "{}",
            answer.json
        );
        api.expect_closed();
    }
    assert_eq!(api_metric(&server, "publish", 400), 4.0);
}

/// `Connection: close` ends the connection after its answer: a request pipelined behind it
/// is neither served nor answered.
fn a_request_after_connection_close_is_ignored(poller: &str) {
    let server = start(poller, &[]);
    let mut api = Api::connect(&server);
    let mut bytes = Api::request("GET", "/api/rooms", Some(KEY), "Connection: close\r\n", "");
    let body = json!({"room": "lobby", "payload": "must not be published"}).to_string();
    bytes.push_str(&Api::request("POST", "/api/publish", Some(KEY), "", &body));
    api.write(bytes.as_bytes());
    let answer = api.answer();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("Connection"), Some("close"));
    api.expect_closed();
    assert_eq!(api_metric(&server, "rooms", 200), 1.0);
    let metrics = server.get("/metrics").body_text();
    assert!(
        !metrics.contains("wsrelay_api_requests_total{endpoint=\"publish\""),
        "the pipelined publish was served"
    );
}

/// A client pipelining far more than the server buffers while an answer is pending (the
/// file engine answers from its storage thread): the server stops reading until it has
/// answered (`MAX_PIPELINED_BYTES`), then goes on; every request is answered, in order.
fn pipelining_beyond_the_buffer_waits_for_the_answers(poller: &str) {
    const N: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = start(
        poller,
        &[
            "--data-dir",
            data,
            "--fsync",
            "never",
            "--offline-max",
            "5000",
        ],
    );
    let mut api = Api::connect(&server);
    let padding = "x".repeat(300);
    let mut bytes = String::new();
    for i in 0..N {
        let body = json!({"to": "bob", "payload": {"n": i, "pad": padding}}).to_string();
        bytes.push_str(&Api::request("POST", "/api/publish", Some(KEY), "", &body));
    }
    assert!(bytes.len() > 1 << 20, "well over the server's buffer");
    // Written by another thread: the server's reading pauses, so this write blocks until the
    // answers read below make room.
    let mut writer = api.reader.get_ref().try_clone().unwrap();
    let writing = std::thread::spawn(move || writer.write_all(bytes.as_bytes()).unwrap());
    let mut previous = 0u64;
    for _ in 0..N {
        let answer = api.answer();
        assert_eq!(answer.json["status"], "queued", "{}", answer.json);
        let id: u64 = answer.json["msg_id"].as_str().unwrap().parse().unwrap();
        assert!(id > previous);
        previous = id;
    }
    writing.join().unwrap();
    // The file engine's histograms are outside `Metrics::parse`'s subset: read the one line.
    let text = server.get("/metrics").body_text();
    let pauses: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("wsrelay_http_read_pauses_total "))
        .expect("wsrelay_http_read_pauses_total in /metrics")
        .parse()
        .unwrap();
    assert!(pauses >= 1.0, "the server paused reading");
    let mut bob = Client::as_id(&server, "bob");
    for i in 0..N {
        assert_eq!(bob.expect("message")["payload"]["n"], i);
    }
}

/// The server's resident set size in bytes (Linux: /proc/<pid>/status).
fn rss_bytes(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// One line of /metrics as a number, if the series is there (for waiting on it to appear).
fn metric_line(server: &Server, series: &str) -> Option<f64> {
    let text = server.get("/metrics").body_text();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.parse().unwrap())
}

/// A client that pipelines requests and never reads its answers: the server stops serving
/// (and reading) it once its unsent answers reach the bound, so what the server holds for it
/// stays bounded; others are still served; once the client reads, everything is answered.
fn a_pipeliner_that_never_reads_stays_bounded(poller: &str) {
    const CAP: usize = 2 << 20;
    const BOUND: f64 = (256 << 10) as f64;
    // One worker, whatever TEST_WORKERS says: across workers each `rooms` answer waits for the
    // other workers' parts, too slowly for the answers to ever reach the bound this tests.
    let server = start(poller, &["--workers", "1"]);
    // Sixty rooms with long names make each `rooms` answer about 3 KiB for a request of about
    // 90 bytes: what a server without the bound would queue grows 30 times faster than what
    // it reads.
    let mut member = Client::as_id(&server, "member");
    for i in 0..60 {
        member.join(
            &format!("room-with-a-rather-long-name-number-{i:03}"),
            "member",
        );
    }
    let mut api = Api::connect(&server);
    let one_answer = api.call("GET", "/api/rooms", "");
    assert_eq!(one_answer.status, 200);
    assert_eq!(one_answer.json["rooms"].as_array().map(Vec::len), Some(60));
    let rss_before = rss_bytes(&server);

    let hog = Api::connect(&server);
    let mut writer = hog.reader.get_ref().try_clone().unwrap();
    let request = Api::request("GET", "/api/rooms", Some(KEY), "", "");
    let batch = request.repeat(1000);
    let batches = CAP / batch.len();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let writing = std::thread::spawn(move || {
        for _ in 0..batches {
            writer.write_all(batch.as_bytes()).unwrap();
            counter.fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    // Until the server pauses the hog, or the hog has written everything (a server that keeps
    // reading lets it; so may TCP's buffers, which loopback grows to megabytes).
    let start_at = std::time::Instant::now();
    loop {
        let all =
            written.load(std::sync::atomic::Ordering::SeqCst) == batches * 1000 * request.len();
        let paused =
            metric_line(&server, "wsrelay_http_output_pauses_total").is_some_and(|n| n >= 1.0);
        if all || paused {
            break;
        }
        assert!(
            start_at.elapsed() < DEADLINE,
            "no pause and the writer is not done"
        );
        std::thread::yield_now();
    }
    // What the server holds for the hog: a few samples while the hog keeps not reading (a
    // server without the bound grew by about 19 MiB here, with it by under 1 MiB).
    let iterations = metric_line(&server, "wsrelay_loop_iterations_total").unwrap();
    for _ in 0..10 {
        let grown = rss_bytes(&server).saturating_sub(rss_before);
        assert!(
            grown < 16 << 20,
            "the server grew by {grown} bytes for a client that reads nothing"
        );
        let queued = metric_line(&server, "wsrelay_http_queued_bytes").expect("the gauge");
        assert!(
            queued <= BOUND + 16.0 * 1024.0,
            "{queued} bytes of answers queued"
        );
        // Others are served meanwhile.
        assert_eq!(api.call("GET", "/api/rooms", "").status, 200);
    }
    // The paused socket has bytes to read all along: a level-triggered poller that still
    // watched it for reading would report it on every wait, a busy loop (over a thousand
    // iterations here on poll); twenty requests need about 30.
    let spent = metric_line(&server, "wsrelay_loop_iterations_total").unwrap() - iterations;
    assert!(spent < 200.0, "{spent} loop iterations while paused");
    // The hog reads: the server resumes and answers every request, in order.
    let mut hog = hog;
    for _ in 0..batches * 1000 {
        let answer = hog.answer();
        assert_eq!(answer.status, 200, "{}", answer.json);
        assert!(answer.json["rooms"].is_array(), "{}", answer.json);
    }
    writing.join().unwrap();
    let pauses = metric_line(&server, "wsrelay_http_output_pauses_total").unwrap();
    assert!(pauses >= 1.0, "{pauses}");
}

fn start_again(poller: &str, dir: &Path, addr: std::net::SocketAddr) -> Server {
    let data = dir.to_str().unwrap();
    Server::start_on(poller, addr, &["--api-key", KEY, "--data-dir", data])
}

fn wrong_or_missing_key_is_401(poller: &str) {
    let server = start(poller, &[]);
    let mut api = Api::connect(&server);
    for (key, label) in [
        (None, "missing"),
        (Some("nope"), "wrong key"),
        (Some(&KEY[..KEY.len() - 1]), "wrong key"),
    ] {
        api.write(Api::request("GET", "/api/rooms", key, "", "").as_bytes());
        let answer = api.answer();
        assert_eq!(answer.status, 401, "{key:?}");
        assert_eq!(answer.header("WWW-Authenticate"), Some("Bearer"));
        let error = answer.json["error"].as_str().unwrap();
        assert!(error.contains(label), "{error}");
    }
    api.write(
        Api::request(
            "GET",
            "/api/rooms",
            None,
            &format!("Authorization: Basic {KEY}\r\n"),
            "",
        )
        .as_bytes(),
    );
    assert_eq!(api.answer().status, 401);
    // The connection stayed usable: a refusal whose body was read keeps it alive.
    assert_eq!(api.call("GET", "/api/rooms", "").status, 200);
    assert_eq!(api_metric(&server, "rooms", 401), 4.0);
    // Without --api-key the API does not exist.
    let off = Server::start(poller, &[]);
    let response = off.http(&Api::request("GET", "/api/rooms", Some(KEY), "", ""));
    assert_eq!(response.status, 404);
}

fn bodies_are_bounded_and_checked(poller: &str) {
    let server = start(poller, &["--api-max-body", "200"]);
    let mut api = Api::connect(&server);
    // Malformed JSON: 400 saying what is wrong; the connection stays.
    let answer = api.call("POST", "/api/publish", "{\"room\":\"lobby\",\"payload\":");
    assert_eq!(answer.status, 400);
    let error = answer.json["error"].as_str().unwrap();
    assert!(
        error.contains("malformed JSON body") && error.contains("EOF"),
        "{error}"
    );
    for (body, says) in [
        (json!({"room": "lobby"}), "payload"),
        (json!({"payload": 1}), "exactly one of `room` and `to`"),
        (json!({"room": "lob by", "payload": 1}), "room"),
        (
            json!({"room": "lobby", "to": "bob", "payload": 1}),
            "exactly one",
        ),
        (
            json!({"room": "lobby", "payload": 1, "extra": 1}),
            "unknown field `extra`",
        ),
    ] {
        let answer = api.publish(body.clone());
        assert_eq!(answer.status, 400, "{body}");
        let error = answer.json["error"].as_str().unwrap();
        assert!(error.contains(says), "{body}: {error}");
    }
    // Unknown path 404, wrong method 405 with Allow, on the same connection.
    assert_eq!(api.call("GET", "/api/nothing", "").status, 404);
    let answer = api.call("GET", "/api/publish", "");
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("Allow"), Some("POST"));
    assert_eq!(api.call("GET", "/api/rooms", "").status, 200);

    // Over the bound: 413 from the head alone (the body is never sent), then the close.
    let mut big = Api::connect(&server);
    big.write(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer x\r\nContent-Length: 201\r\n\r\n");
    let answer = big.answer();
    assert_eq!(answer.status, 413);
    assert_eq!(answer.header("Connection"), Some("close"));
    assert!(answer.json["error"].as_str().unwrap().contains("200 bytes"));
    big.expect_closed();
    // Chunked bodies: 411, then the close (the bytes behind cannot be delimited).
    let mut chunked = Api::connect(&server);
    chunked.write(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    assert_eq!(chunked.answer().status, 411);
    chunked.expect_closed();
    assert_eq!(api_metric(&server, "publish", 413), 1.0);
    assert_eq!(api_metric(&server, "publish", 400), 6.0);
}

fn connection_close_http10_and_the_idle_deadline(poller: &str) {
    let server = start(poller, &["--api-idle-timeout", "300ms"]);
    let mut api = Api::connect(&server);
    api.write(Api::request("GET", "/api/rooms", Some(KEY), "Connection: close\r\n", "").as_bytes());
    let answer = api.answer();
    assert_eq!(answer.header("Connection"), Some("close"));
    api.expect_closed();
    let mut old = Api::connect(&server);
    old.write(format!("GET /api/rooms HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\n\r\n").as_bytes());
    assert_eq!(old.answer().status, 200);
    old.expect_closed();
    // Kept alive: a request within --api-idle-timeout is served (the pause is the scenario,
    // idle time shorter than the timeout, not a wait for something to happen)...
    let mut idle = Api::connect(&server);
    assert_eq!(
        idle.call("GET", "/api/rooms", "").header("Connection"),
        Some("keep-alive")
    );
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert_eq!(idle.call("GET", "/api/rooms", "").status, 200);
    // ...then idle past it: the server closes it (EOF, no reset), no sooner than the timeout
    // after the last answer and long before the default (30 s) or the request deadline (10 s).
    let answered = std::time::Instant::now();
    idle.expect_closed();
    let after = answered.elapsed();
    assert!(
        after >= std::time::Duration::from_millis(290),
        "closed {after:?} after the answer, before the 300 ms idle timeout"
    );
    assert!(
        after < std::time::Duration::from_secs(5),
        "closed {after:?} after the answer: not by the 300 ms idle timeout"
    );
}

/// RFC 7230 §3.3: an answer to HEAD has no body, whatever its `Content-Length` says; a body
/// sent anyway would be read as the start of the next answer on a kept-alive connection.
fn head_is_answered_without_a_body(poller: &str) {
    let server = start(poller, &[]);
    let mut api = Api::connect(&server);
    // The API's endpoints take GET or POST: HEAD is refused (405), kept alive, without a body.
    api.write(Api::request("HEAD", "/api/rooms", Some(KEY), "", "").as_bytes());
    let head = api.head_only();
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: "),
        "{head}"
    );
    assert!(head.contains("keep-alive"), "{head}");
    // The next answer on the connection is the GET's own, not the rest of the HEAD's.
    let answer = api.call("GET", "/api/rooms", "");
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert!(answer.json["rooms"].is_array(), "{}", answer.json);
}

fn disconnect_closes_every_device_with_the_code(poller: &str) {
    let server = start(poller, &[]);
    let mut phone = Client::as_id(&server, "bob");
    let mut laptop = Client::as_id(&server, "bob");
    let mut alice = Client::as_id(&server, "alice");
    let mut api = Api::connect(&server);
    let answer = api.call(
        "POST",
        "/api/disconnect",
        &json!({"id": "bob", "code": 4003, "reason": "kicked"}).to_string(),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json, json!({"id": "bob", "disconnected": 2}));
    for device in [&mut phone, &mut laptop] {
        assert_eq!(u16::from(close_code(&mut device.ws)), 4003);
    }
    // Alice is still connected: a message to her goes through.
    assert_eq!(
        api.publish(json!({"to": "alice", "payload": 1})).json["status"],
        "delivered"
    );
    assert_eq!(alice.expect("message")["payload"], 1);
    for code in [1001, 2999, 5000] {
        let answer = api.call(
            "POST",
            "/api/disconnect",
            &json!({"id": "alice", "code": code}).to_string(),
        );
        assert_eq!(answer.status, 400, "{code}");
    }
    let answer = api.call(
        "POST",
        "/api/disconnect",
        &json!({"id": "nobody"}).to_string(),
    );
    assert_eq!(answer.json["disconnected"], 0);
}

fn presence_rooms_and_ids_match_what_clients_did(poller: &str) {
    let server = start(poller, &[]);
    let mut a1 = Client::as_id(&server, "alice");
    a1.join("lobby", "alice");
    let mut a2 = Client::as_id(&server, "alice");
    a2.join("lobby", "alice");
    let mut bob = Client::as_id(&server, "bob");
    bob.join("lobby", "bob");
    let mut carol = Client::as_id(&server, "carol");
    carol.join("games", "carol");
    let mut api = Api::connect(&server);
    let presence = api.call("GET", "/api/presence?room=lobby", "").json;
    assert_eq!(
        presence,
        json!({"room": "lobby", "members": [
            {"id": "alice", "connections": 2, "info": null},
            {"id": "bob", "connections": 1, "info": null},
        ]})
    );
    let rooms = api.call("GET", "/api/rooms", "").json;
    assert_eq!(
        rooms,
        json!({"rooms": [
            {"room": "games", "members": 1, "connections": 1},
            {"room": "lobby", "members": 2, "connections": 3},
        ]})
    );
    assert_eq!(
        api.call("GET", "/api/ids/alice", "").json,
        json!({"id": "alice", "online": true, "connections": 2})
    );
    // Bob leaves the room, carol goes away: the API sees it.
    bob.send(json!({"type": "leave", "room": "lobby"}));
    bob.expect("presence");
    carol.ws.close(None).unwrap();
    let _ = close_code_or_end(&mut carol);
    let gone = wait_until(&mut api, "/api/ids/carol", |v| v["online"] == false);
    assert_eq!(
        gone,
        json!({"id": "carol", "online": false, "connections": 0})
    );
    let presence = api.call("GET", "/api/presence?room=lobby", "").json;
    assert_eq!(
        presence["members"],
        json!([{"id": "alice", "connections": 2, "info": null}])
    );
    assert_eq!(api.call("GET", "/api/presence", "").status, 400);
}

/// Reads until the peer's Close or the end (after our own Close).
fn close_code_or_end(client: &mut Client) -> Option<u16> {
    loop {
        match client.ws.read() {
            Ok(tungstenite::Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Asks `path` until `done` holds for the answer (the server's own view of a close the test
/// started), failing after `DEADLINE`.
fn wait_until(api: &mut Api, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let json = api.call("GET", path, "").json;
        if done(&json) {
            return json;
        }
        assert!(start.elapsed() < DEADLINE, "{path}: {json}");
        std::thread::sleep(std::time::Duration::from_millis(10)); // poll interval
    }
}

/// SPEC §16: a backend publishing 10,000 messages over one kept-alive connection; half one by
/// one, half pipelined 100 at a time. Every one is answered `delivered` in order, and bob
/// gets all of them, in order.
fn ten_thousand_publishes_over_one_connection(poller: &str) {
    const N: usize = 10_000;
    let server = start(poller, &[]);
    let mut bob = Client::as_id(&server, "bob");
    let reader = std::thread::spawn(move || {
        (0..N)
            .map(|_| bob.expect("message")["payload"]["n"].as_u64().unwrap())
            .collect::<Vec<u64>>()
    });
    let mut api = Api::connect(&server);
    let mut previous = 0u64;
    let mut check = |answer: Answer| {
        assert_eq!(answer.json["status"], "delivered", "{}", answer.json);
        let id: u64 = answer.json["msg_id"].as_str().unwrap().parse().unwrap();
        assert!(id > previous, "answers in request order");
        previous = id;
    };
    for i in 0..N / 2 {
        check(api.publish(json!({"to": "bob", "payload": {"n": i}})));
    }
    for batch in (N / 2..N).step_by(100) {
        let mut bytes = String::new();
        for i in batch..batch + 100 {
            let body = json!({"to": "bob", "payload": {"n": i}}).to_string();
            bytes.push_str(&Api::request("POST", "/api/publish", Some(KEY), "", &body));
        }
        api.write(bytes.as_bytes());
        for _ in 0..100 {
            check(api.answer());
        }
    }
    let got = reader.join().unwrap();
    assert_eq!(got, (0..N as u64).collect::<Vec<_>>());
    assert_eq!(api_metric(&server, "publish", 200), N as f64);
}

/// `wsrelay api`: prints the JSON answer, exit 0 on 2xx and 1 otherwise.
fn the_cli_client(poller: &str) {
    let server = start(poller, &[]);
    let mut bob = Client::as_id(&server, "bob");
    bob.join("lobby", "bob");
    let url = format!("http://{}", server.addr);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(["api", "--url", &url])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--key",
        KEY,
        "publish",
        "--room",
        "lobby",
        "--payload",
        "{\"n\":1}",
    ]);
    assert!(out.status.success(), "{out:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"], "delivered");
    assert_eq!(bob.expect("message")["payload"], json!({"n": 1}));
    let out = run(&["--key", KEY, "presence", "lobby"]);
    let presence: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        presence["members"],
        json!([{"id": "bob", "connections": 1, "info": null}])
    );
    let out = run(&["--key", KEY, "rooms"]);
    assert!(out.status.success());
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), format!("{KEY}\n")).unwrap();
    let out = run(&[
        "--key-file",
        key_file.path().to_str().unwrap(),
        "disconnect",
        "bob",
        "--code",
        "4000",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(u16::from(close_code(&mut bob.ws)), 4000);
    let out = run(&["--key", "wrong", "rooms"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

poller_tests!(
    publish_to_a_room_reaches_every_member,
    publish_to_an_offline_id_is_queued_then_delivered,
    file_engine_answers_after_the_fsync,
    pipelining_beyond_the_buffer_waits_for_the_answers,
    a_pipeliner_that_never_reads_stays_bounded,
    a_half_closed_client_gets_its_deferred_answer,
    a_connection_closed_while_its_answer_is_pending,
    an_engine_rejection_reaches_the_api,
    bad_content_length_is_400_then_close,
    a_request_after_connection_close_is_ignored,
    wrong_or_missing_key_is_401,
    bodies_are_bounded_and_checked,
    connection_close_http10_and_the_idle_deadline,
    head_is_answered_without_a_body,
    disconnect_closes_every_device_with_the_code,
    presence_rooms_and_ids_match_what_clients_did,
    ten_thousand_publishes_over_one_connection,
    the_cli_client,
);
