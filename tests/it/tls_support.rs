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
