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
    };
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
        let mut child = command
            .args(["serve", "--listen", listen, "--poller", poller])
            .args(extra)
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

    /// Resident memory of the server process, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// CPU time (user + system) the server has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
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

    /// Sends a raw HTTP request and returns the whole response (the server closes after it).
    pub fn http(&self, request: &str) -> HttpResponse {
        let mut s = self.tcp();
        s.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read response");
        HttpResponse::parse(&raw)
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.http(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
    }

    /// The value of one sample of /metrics, e.g. `metric("wsrelay_closes_sent_total{code=\"1002\"}")`.
    pub fn metric(&self, sample: &str) -> f64 {
        let start = std::time::Instant::now();
        let response = loop {
            // A server at --max-connections answers 503 until a connection closes.
            let r = self.get("/metrics");
            if r.status != 503 || start.elapsed() > DEADLINE {
                break r;
            }
        };
        assert_eq!(response.status, 200, "GET /metrics");
        let text = response.body_text();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl Server {
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

/// Reads frames until a Close arrives and returns its code (None for an empty Close).
pub fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (b0, payload) = read_server_frame(s);
        if b0 & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// After the close handshake, the server closes TCP: the next read sees EOF.
pub fn expect_eof(s: &mut TcpStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "unexpected bytes after close: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}
