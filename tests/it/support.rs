//! Test harness: starts the real `wsrelay` binary on a free loopback port and talks to it.
//!
//! Every wait here is bounded by a deadline on an observable event (a line printed, a byte
//! read); nothing sleeps to synchronise.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Runs the named test body once per poller, as its own `#[test]`, so every behaviour is checked
/// on every backend without copied tests. Usage: `poller_tests!(echo_text, echo_binary);` in a
/// module that defines `fn echo_text(poller: &str)` and so on.
#[macro_export]
macro_rules! poller_tests {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::$name("epoll") } )*
        }
        mod poll {
            $( #[test] fn $name() { super::$name("poll") } )*
        }
        mod select {
            $( #[test] fn $name() { super::$name("select") } )*
        }
        mod uring {
            $( #[test] fn $name() {
                if $crate::support::uring_available() {
                    super::$name("uring")
                }
            } )*
        }
    };
}

/// Whether this machine can run `--poller uring` (Linux 6.0+ with io_uring allowed). Where it
/// cannot, says so in one line (per test) and the uring variant of the test passes without
/// running: the other pollers still cover the behaviour. With `WSRELAY_REQUIRE_URING=1` (CI,
/// on a machine known to have io_uring) it fails the test instead, so that a run cannot go
/// green with no uring coverage at all.
pub fn uring_available() -> bool {
    #[cfg(target_os = "linux")]
    let result = wsrelay::poller::UringPoller::new().map(drop);
    #[cfg(not(target_os = "linux"))]
    let result: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
    match result {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var("WSRELAY_REQUIRE_URING").as_deref() != Ok("1"),
                "io_uring is required (WSRELAY_REQUIRE_URING=1) but: {e}"
            );
            eprintln!("skipped on uring: {e}");
            false
        }
    }
}

/// The `msg_id` of a message or ack envelope, as a number (msg_ids are decimal strings).
pub fn msg_id(v: &serde_json::Value) -> u64 {
    v["msg_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no msg_id in {v}"))
        .parse()
        .unwrap()
}

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Like `start`, but the server runs under `prlimit --nofile=N:N`, so that raising its own
    /// soft limit cannot take it past N descriptors.
    pub fn start_with_fd_limit(poller: &str, nofile: u32, extra: &[&str]) -> Server {
        Server::spawn(
            Command::new("prlimit")
                .arg(format!("--nofile={nofile}:{nofile}"))
                .arg(env!("CARGO_BIN_EXE_wsrelay")),
            poller,
            "127.0.0.1:0",
            extra,
        )
    }

    /// Like `start`, but on a fixed address: a server restarted where its clients knew it.
    pub fn start_on(poller: &str, listen: SocketAddr, extra: &[&str]) -> Server {
        Server::spawn(
            &mut Command::new(env!("CARGO_BIN_EXE_wsrelay")),
            poller,
            &listen.to_string(),
            extra,
        )
    }

    /// Starts `wsrelay serve` on 127.0.0.1:0 with the given poller and extra flags, and waits
    /// (bounded) for the line that announces the port.
    pub fn start(poller: &str, extra: &[&str]) -> Server {
        Server::spawn(
            &mut Command::new(env!("CARGO_BIN_EXE_wsrelay")),
            poller,
            "127.0.0.1:0",
            extra,
        )
    }

    fn spawn(command: &mut Command, poller: &str, listen: &str, extra: &[&str]) -> Server {
        // TEST_WORKERS=N runs every server of the suite with --workers N (unless the test
        // chose its own), to see which cases hold across workers (docs/operations.md).
        let workers = std::env::var("TEST_WORKERS")
            .ok()
            .filter(|_| !extra.contains(&"--workers"));
        let mut child = command
            .args(["serve", "--listen", listen, "--poller", poller])
            .args(extra)
            .args(workers.iter().flat_map(|n| ["--workers", n.as_str()]))
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "wsrelay=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wsrelay");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("server did not announce its port");
        let addr = line
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        Server { child, addr }
    }

    /// The server's process id (prlimit execs the server, so it is the same process).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the server.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the server to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < within,
                "server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval for try_wait
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A TCP connection to the server with read and write deadlines set.
    pub fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.set_write_timeout(Some(DEADLINE)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// A WebSocket client from the independent `tungstenite` implementation.
    pub fn ws(&self, path: &str) -> tungstenite::WebSocket<TcpStream> {
        let (ws, response) = tungstenite::client(self.url(path), self.tcp()).expect("handshake");
        assert_eq!(response.status(), 101);
        ws
    }

    /// Sends a raw HTTP request and returns the whole response. The server closes after it, in
    /// order: a reset (which can cut the response short) fails the test.
    pub fn http(&self, request: &str) -> HttpResponse {
        let mut s = self.tcp();
        s.write_all(request.as_bytes()).unwrap();
        let (raw, ending) = read_until_end(&mut s, DEADLINE);
        assert_eq!(
            ending,
            Ending::Eof,
            "reset after {:?}",
            String::from_utf8_lossy(&raw)
        );
        HttpResponse::parse(&raw)
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
    }

    /// Every sample of /metrics, parsed (and checked against the text format on the way).
    pub fn metrics(&self) -> Metrics {
        let start = std::time::Instant::now();
        let response = loop {
            // A server at --max-connections answers 503 until a connection closes.
            let r = self.get("/metrics");
            if r.status != 503 || start.elapsed() > DEADLINE {
                break r;
            }
        };
        assert_eq!(response.status, 200, "GET /metrics");
        Metrics::parse(&response.body_text())
    }

    /// The value of one sample of /metrics, e.g.
    /// `metric("wsrelay_closes_sent_total{code=\"1002\"}")`. A sample the server does not
    /// print fails the test: a renamed metric must not read as 0.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics().get(sample)
    }

    /// Polls /metrics until `sample` reaches `value`, failing the test after `DEADLINE`. For
    /// outcomes the server alone observes (a deadline firing), /metrics is how a test sees them.
    pub fn wait_for_metric(&self, sample: &str, value: f64) {
        let start = std::time::Instant::now();
        loop {
            let now = self.metric(sample);
            if now == value {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{sample} is {now}, expected {value}"
            );
            std::thread::sleep(Duration::from_millis(20)); // poll interval, not a synchronisation
        }
    }
}

/// One reading of /metrics: every family declared (`# TYPE`) and every sample, by series
/// (`name{labels}`).
pub struct Metrics {
    families: Vec<String>,
    samples: Vec<(String, f64)>,
}

impl Metrics {
    /// Parses the Prometheus text format, checking it line by line: `# HELP`/`# TYPE`
    /// comments, then `name{labels} value` samples of families declared before them.
    pub fn parse(text: &str) -> Metrics {
        let mut families: Vec<String> = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kind = parts.next().unwrap();
                assert!(kind == "HELP" || kind == "TYPE", "{line}");
                let name = parts.next().expect("a family name");
                assert!(name.starts_with("wsrelay_"), "{line}");
                if kind == "TYPE" {
                    let kind = parts.next().unwrap_or("");
                    assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                    families.push(name.to_string());
                    if kind == "histogram" {
                        // Its samples are these three series (the file engine's histograms).
                        for part in ["_bucket", "_sum", "_count"] {
                            families.push(format!("{name}{part}"));
                        }
                    }
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            assert!(
                families.iter().any(|f| f == name),
                "sample before its # TYPE: {line}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "{line}");
            }
            assert!(
                !samples.iter().any(|(s, _)| s == series),
                "series printed twice: {line}"
            );
            samples.push((series.to_string(), value.parse::<f64>().expect("value")));
        }
        Metrics { families, samples }
    }

    /// The value of `series`; fails the test if the server does not print it.
    pub fn get(&self, series: &str) -> f64 {
        self.samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| {
                let family = &series[..series.find('{').unwrap_or(series.len())];
                panic!(
                    "no series {series} in /metrics; {family} has {:?}",
                    self.family(family)
                )
            })
    }

    /// The samples of a labelled family, as (series, value). A labelled series appears once it
    /// has counted something, so "none closed with 1008" is: the family exists, and its
    /// samples hold no `code="1008"`. Fails the test if the family is not declared at all.
    pub fn family(&self, name: &str) -> Vec<(String, f64)> {
        assert!(
            self.families.iter().any(|f| f == name),
            "no family {name} in /metrics (renamed?)"
        );
        self.samples
            .iter()
            .filter(|(s, _)| s == name || s.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
            .cloned()
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn parse(raw: &[u8]) -> HttpResponse {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8(raw[..split].to_vec()).unwrap();
        let status = head[9..12].parse().unwrap();
        HttpResponse {
            status,
            head,
            body: raw[split + 4..].to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Builds a masked client frame by hand, independently of the crate's codec.
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first_byte];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Performs the upgrade on a raw socket and returns it, positioned after the 101 response.
pub fn raw_upgrade(server: &Server, path: &str) -> TcpStream {
    let mut s = server.tcp();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Reads byte by byte up to the end of an HTTP head (so no frame bytes are swallowed).
pub fn read_http_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Reads one unmasked server frame by hand: (first byte, payload).
pub fn read_server_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("frame header");
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (h[0], payload)
}

/// Splits bytes the server sent into its frames: (first byte, payload). Fails the test on a
/// masked frame or a frame cut short.
pub fn parse_server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "a frame cut short: {bytes:?}");
        assert_eq!(bytes[1] & 0x80, 0, "server frames are never masked");
        let (len, header) = match bytes[1] & 0x7f {
            126 => (
                u16::from_be_bytes(bytes[2..4].try_into().unwrap()) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let payload = bytes
            .get(header..header + len)
            .unwrap_or_else(|| panic!("a frame cut short: {} bytes left", bytes.len()));
        frames.push((bytes[0], payload.to_vec()));
        bytes = &bytes[header + len..];
    }
    frames
}

/// Reads frames until a Close arrives and returns its code (None for an empty Close).
pub fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (b0, payload) = read_server_frame(s);
        if b0 & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// How a connection ended, as its peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A FIN: the server closed, or shut down its sending side, in order. What it sent before
    /// arrived whole.
    Eof,
    /// A TCP reset: the connection was torn down (for example closed with unread input), and
    /// what was in flight may be lost. Never what "closed cleanly" means.
    Reset,
}

/// Reads until the connection ends, within `within`, and returns every byte read and how it
/// ended. Fails the test if it is still open at `within`.
pub fn read_until_end(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Ending) {
    s.set_read_timeout(Some(within)).unwrap();
    let start = std::time::Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (bytes, Ending::Eof),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (bytes, Ending::Reset)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "connection not ended after {:?} ({e}); read {} bytes",
                start.elapsed(),
                bytes.len()
            ),
        }
    }
}

/// After the close handshake the server closes TCP in order: the next read sees EOF (a FIN),
/// with nothing before it. A reset fails: it is not a clean close.
pub fn expect_eof(s: &mut TcpStream) {
    let (rest, ending) = read_until_end(s, DEADLINE);
    assert_eq!(ending, Ending::Eof, "the server reset the connection");
    assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}");
}

/// `wsrelay serve` with `args` that must refuse to start: its exit code and what it printed on
/// stderr (its warnings only, so that a refusal is the one line there). Like `Server::start`,
/// it runs TEST_WORKERS workers unless `args` choose their count, so that a data directory made
/// by a server of the suite is refused for the reason the test means.
pub fn refused_to_start(poller: &str, args: &[&str]) -> (Option<i32>, String) {
    let workers = std::env::var("TEST_WORKERS")
        .ok()
        .filter(|_| !args.contains(&"--workers"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--poller", poller])
        .args(args)
        .args(workers.iter().flat_map(|n| ["--workers", n.as_str()]))
        .env("RUST_LOG", "wsrelay=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wsrelay");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("wsrelay {args:?} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(10)); // poll interval for try_wait
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}
