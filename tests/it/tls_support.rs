//! TLS for the integration tests: a CA and server certificate made up by the test itself, the
//! real server started with them, and clients for it (rustls under `tungstenite`, raw TLS for
//! HTTP).
//!
//! `rcgen` makes the certificates (fresh keys every time), so no key material lives in the repo.

use crate::support::{HttpResponse, Metrics, Server, DEADLINE};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wsrelay::tls::config::{client_config, server_name};
use wsrelay::tls::Trust;

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`, as PEM files
/// in a directory that is removed on drop.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA certificate (what `--ca` trusts).
    pub ca: PathBuf,
    /// The server's chain: its certificate, then the CA's.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wsrelay it CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let dir = std::env::temp_dir().join(format!(
            "wsrelay-it-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        std::fs::write(&ca.ca, ca_cert.pem()).unwrap();
        std::fs::write(&ca.cert, format!("{}{}", cert.pem(), ca_cert.pem())).unwrap();
        std::fs::write(&ca.key, key.serialize_pem()).unwrap();
        ca
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS stream to the server, handshake completed.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

impl TestCa {
    /// Flags that make `wsrelay serve` speak TLS with this CA's server certificate.
    pub fn serve_flags(&self) -> [&str; 4] {
        [
            "--tls-cert",
            self.cert.to_str().unwrap(),
            "--tls-key",
            self.key.to_str().unwrap(),
        ]
    }

    /// A client configuration that trusts this CA only.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::new(client_config(&Trust::CaFile(self.ca.clone())).unwrap())
    }

    /// Puts another CA's server pair in this CA's cert and key files (a renewal on disk).
    pub fn install_pair_of(&self, other: &TestCa) {
        std::fs::copy(&other.cert, &self.cert).unwrap();
        std::fs::copy(&other.key, &self.key).unwrap();
    }
}

/// `wsrelay serve` speaking TLS with `ca`'s server certificate.
pub fn tls_server(poller: &str, ca: &TestCa, extra: &[&str]) -> Server {
    let mut args: Vec<&str> = ca.serve_flags().to_vec();
    args.extend_from_slice(extra);
    Server::start(poller, &args)
}

/// A TLS connection to `addr` by the name `localhost`, with the handshake completed.
///
/// # Errors
/// The handshake failed (an untrusted certificate, say).
pub fn try_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(DEADLINE))?;
    tcp.set_write_timeout(Some(DEADLINE))?;
    tcp.set_nodelay(true)?;
    let conn = ClientConnection::new(config, server_name("localhost").unwrap())
        .map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

pub fn tls(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsStream {
    try_tls(addr, config).expect("TLS handshake")
}

/// A WebSocket client from `tungstenite` over a rustls stream trusting `ca`.
pub fn wss(server: &Server, ca: &TestCa, path: &str) -> tungstenite::WebSocket<TlsStream> {
    wss_with(server, ca.client_config(), path)
}

pub fn wss_with(
    server: &Server,
    config: Arc<ClientConfig>,
    path: &str,
) -> tungstenite::WebSocket<TlsStream> {
    let url = format!("wss://localhost:{}{path}", server.addr.port());
    let (ws, response) = tungstenite::client(url, tls(server.addr, config)).expect("handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// Reads a TLS stream to its end: the bytes, and whether it ended with `close_notify` (true)
/// or a bare TCP end (false).
pub fn read_tls_to_end(stream: &mut TlsStream) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (bytes, true),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return (bytes, false),
            Err(e) => panic!("TLS read failed after {} bytes: {e}", bytes.len()),
        }
    }
}

/// `GET path` over TLS; the whole response.
pub fn tls_get(server: &Server, ca: &TestCa, path: &str) -> HttpResponse {
    let mut stream = tls(server.addr, ca.client_config());
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let (raw, _) = read_tls_to_end(&mut stream);
    HttpResponse::parse(&raw)
}

/// /metrics of a TLS server.
pub fn tls_metrics(server: &Server, ca: &TestCa) -> Metrics {
    let response = tls_get(server, ca, "/metrics");
    assert_eq!(response.status, 200, "GET /metrics");
    Metrics::parse(&response.body_text())
}

/// Polls /metrics (over TLS) until `sample` reaches `value`, failing after `DEADLINE`.
pub fn wait_for_tls_metric(server: &Server, ca: &TestCa, sample: &str, value: f64) {
    let start = std::time::Instant::now();
    loop {
        let now = tls_metrics(server, ca).get(sample);
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
