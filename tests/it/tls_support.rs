//! TLS for the integration tests: a CA and server certificate made up by the test itself, and
//! a one-connection TLS server for clients to meet.
//!
//! `rcgen` makes the certificates (fresh keys every time), so no key material lives in the repo.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use wsrelay::tls::{ServerTls, TlsSession};

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

/// Accepts one connection and runs the server side of a TLS session on it, answering
/// nothing above TLS, until the client hangs up or the session fails.
pub fn one_tls_connection(ca: &TestCa) -> (SocketAddr, JoinHandle<()>) {
    let tls = Arc::new(ServerTls::load(&ca.cert, &ca.key).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let Ok((mut socket, _)) = listener.accept() else {
            return;
        };
        // `TlsSession::read` returns once the socket has nothing more; the short timeout gives
        // it that moment on this blocking socket, so handshake answers get sent in between.
        let _ = socket.set_read_timeout(Some(Duration::from_millis(5)));
        let mut session: TlsSession = tls.session().unwrap();
        let mut buf = [0u8; 4096];
        for _ in 0..2000 {
            if session.write_tls(&mut socket).is_err() {
                return;
            }
            match session.read(&mut socket, &mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
    });
    (addr, handle)
}

/// A TLS terminator in front of a plain server: accepts TLS on its own port and relays the
/// plaintext to `upstream`, one mio loop on a thread, every connection a `TlsSession` driven by
/// readiness the way the reactor drives its own. It lets the client and the bench be tested
/// over `wss://` against the real relay behind it. Stops when dropped.
pub struct TlsTerminator {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One relayed connection: TLS from the client, plain TCP to the server.
struct Relay {
    down: mio::net::TcpStream,
    tls: TlsSession,
    up: mio::net::TcpStream,
    /// Plaintext from the client not yet written upstream, and the reverse.
    to_up: Vec<u8>,
    to_down: Vec<u8>,
}

impl TlsTerminator {
    pub fn start(ca: &TestCa, upstream: SocketAddr) -> TlsTerminator {
        use std::sync::atomic::AtomicBool;
        let tls = ServerTls::load(&ca.cert, &ca.key).unwrap();
        let mut listener = mio::net::TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut poll = mio::Poll::new().unwrap();
            let mut events = mio::Events::with_capacity(256);
            const LISTENER: mio::Token = mio::Token(usize::MAX);
            poll.registry()
                .register(&mut listener, LISTENER, mio::Interest::READABLE)
                .unwrap();
            let mut relays: slab::Slab<Relay> = slab::Slab::new();
            while !stopping.load(Ordering::Relaxed) {
                poll.poll(&mut events, Some(Duration::from_millis(50)))
                    .unwrap();
                for event in &events {
                    if event.token() == LISTENER {
                        while let Ok((mut down, _)) = listener.accept() {
                            let Ok(mut up) = mio::net::TcpStream::connect(upstream) else {
                                continue;
                            };
                            let entry = relays.vacant_entry();
                            let both = mio::Interest::READABLE | mio::Interest::WRITABLE;
                            let registry = poll.registry();
                            registry
                                .register(&mut down, mio::Token(entry.key() * 2), both)
                                .unwrap();
                            registry
                                .register(&mut up, mio::Token(entry.key() * 2 + 1), both)
                                .unwrap();
                            entry.insert(Relay {
                                down,
                                tls: tls.session().unwrap(),
                                up,
                                to_up: Vec::new(),
                                to_down: Vec::new(),
                            });
                        }
                        continue;
                    }
                    let key = event.token().0 / 2;
                    let done = match relays.get_mut(key) {
                        Some(relay) => !relay.pump(),
                        None => false,
                    };
                    if done {
                        let mut relay = relays.remove(key);
                        let _ = poll.registry().deregister(&mut relay.down);
                        let _ = poll.registry().deregister(&mut relay.up);
                    }
                }
            }
        });
        TlsTerminator {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The terminator's `wss://` URL for `path`, by the name its certificate carries.
    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }
}

impl Relay {
    /// Moves every byte that can move, both ways, until each socket would block (edge-triggered
    /// readiness reports nothing twice). False once either side has ended.
    fn pump(&mut self) -> bool {
        use std::io::{ErrorKind, Read, Write};
        let mut buf = [0u8; 16 * 1024];
        let mut open = true;
        loop {
            match self.tls.read(&mut self.down, &mut buf) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => self.to_up.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        loop {
            match self.up.read(&mut buf) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => self.to_down.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The connect to upstream has not completed yet.
                Err(e) if e.kind() == ErrorKind::NotConnected => break,
                Err(_) => return false,
            }
        }
        while !self.to_up.is_empty() {
            match self.up.write(&self.to_up) {
                Ok(n) => drop(self.to_up.drain(..n)),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {
                    break
                }
                Err(_) => return false,
            }
        }
        while !self.to_down.is_empty() {
            match self.tls.writer(&mut self.down).write(&self.to_down) {
                Ok(n) => drop(self.to_down.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        if self.tls.write_tls(&mut self.down).is_err() {
            return false;
        }
        // An end is passed on once what was read before it has been delivered.
        open || !(self.to_up.is_empty() && self.to_down.is_empty() && !self.tls.wants_write())
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
