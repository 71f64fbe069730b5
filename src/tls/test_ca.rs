//! A certificate authority made up by a test: a CA, and a server certificate it signed for
//! `localhost` and `127.0.0.1`, in memory and (on request) as PEM files.
//!
//! Owns: generating them with `rcgen` (each `TestCa` has fresh keys), and the temporary files.
//! Does not: anything outside `#[cfg(test)]`.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct TestCa {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    /// The server's certificate, then the CA's (the chain a server sends).
    pub chain_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

/// The PEM files of a `TestCa`, in a directory removed on drop.
pub struct TestFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A fresh CA and a server certificate valid until 2031-01-02T00:00:00Z.
    pub fn new() -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "wsrelay test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "wsrelay test server");
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let cert = params.signed_by(&key, &issuer).expect("server certificate");

        TestCa {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            chain_pem: format!("{}{}", cert.pem(), ca_cert.pem()),
            chain: vec![cert.der().clone(), ca_cert.der().clone()],
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `ca.pem`, `cert.pem` (the chain) and `key.pem` into a new temporary directory.
    pub fn files(&self) -> TestFiles {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wsrelay-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = TestFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        std::fs::write(&files.ca, &self.ca_pem).expect("write ca.pem");
        std::fs::write(&files.cert, &self.chain_pem).expect("write cert.pem");
        std::fs::write(&files.key, &self.key_pem).expect("write key.pem");
        files
    }
}

impl Drop for TestFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a handshake between `client` and `server` over a non-blocking socket pair, both sides
/// on this thread; the first error either side meets, if any.
pub fn handshake(
    client: &mut crate::tls::TlsSession,
    server: &mut crate::tls::TlsSession,
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    use std::os::unix::net::UnixStream;
    let (mut client_end, mut server_end) = UnixStream::pair()?;
    client_end.set_nonblocking(true)?;
    server_end.set_nonblocking(true)?;
    let mut buf = [0u8; 4096];
    for _ in 0..20 {
        client.write_tls(&mut client_end)?;
        match server.read(&mut server_end, &mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        server.write_tls(&mut server_end)?;
        match client.read(&mut client_end, &mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err(std::io::Error::other("the handshake did not complete"))
}
