//! rustls configurations from files: the server's certificate chain and key, and what a client
//! trusts.
//!
//! Owns: reading PEM (`load_chain`, `load_key`, `load_roots`), the expiry of a certificate
//! (`not_after_unix`), `server_config` (TLS 1.2 and 1.3, ALPN `http/1.1`) and `client_config`
//! (`Trust`: the Mozilla roots, one CA file, or nothing at all), and `CertError`.
//! Does not: decide when to reload (the server's `server::tls` does, on SIGHUP), or perform I/O
//! beyond reading the files it is given.
//!
//! SPEC §18. One crypto provider for everything: rustls's `ring` backend. rustls's default,
//! aws-lc-rs, needs cmake and a long C build; ring builds quickly and offers the same cipher
//! suites and key types for our use (ECDSA, RSA and Ed25519 keys; AES-GCM and ChaCha20-Poly1305).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use x509_cert::der::Decode;

/// The one application protocol offered and accepted in ALPN (RFC 7301): WebSockets start as
/// HTTP/1.1 (RFC 6455 §4.1). A client that offers ALPN without it is refused; one that offers
/// no ALPN at all is served.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// The crypto provider every configuration here is built on (see the module doc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The protocol versions offered and accepted: TLS 1.3, and 1.2 for older clients.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a certificate, key or CA file could not be used. Each says which file and what is wrong
/// with it, in words an operator can act on.
#[derive(Debug)]
pub enum CertError {
    /// The file could not be read.
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid PEM.
    Pem { path: PathBuf, source: pem::Error },
    /// The file holds no certificate (a key file given as `--tls-cert`, say).
    NoCertificate { path: PathBuf },
    /// The file holds no private key.
    NoKey { path: PathBuf },
    /// The first certificate of the chain could not be parsed as X.509.
    BadCertificate { path: PathBuf, reason: String },
    /// rustls refused the pair: the key does not belong to the certificate, or its type is not
    /// supported.
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// A CA file's certificate could not be added to the trust store.
    BadRoot {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The crypto provider cannot do what is asked of it (TLS 1.2 and 1.3): a build problem,
    /// not a file problem.
    Provider(rustls::Error),
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            CertError::Pem { path, source } => {
                write!(f, "{} is not valid PEM: ", path.display())?;
                match source {
                    // pki-types prints these lines as byte arrays; an operator wants the text.
                    pem::Error::MissingSectionEnd { end_marker } => write!(
                        f,
                        "the {} section has no END line (cut short?)",
                        String::from_utf8_lossy(end_marker)
                    ),
                    pem::Error::IllegalSectionStart { line } => write!(
                        f,
                        "a malformed BEGIN line ({})",
                        String::from_utf8_lossy(line)
                    ),
                    other => write!(f, "{other}"),
                }
            }
            CertError::NoCertificate { path } => write!(
                f,
                "{} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
            CertError::NoKey { path } => write!(
                f,
                "{} holds no private key (expected PKCS#8, PKCS#1 or SEC1 PEM)",
                path.display()
            ),
            CertError::BadCertificate { path, reason } => {
                write!(
                    f,
                    "the first certificate in {} is not valid X.509: {reason}",
                    path.display()
                )
            }
            CertError::Rejected { cert, key, source } => write!(
                f,
                "the key in {} cannot serve the certificate in {}: {source}",
                key.display(),
                cert.display()
            ),
            CertError::BadRoot { path, source } => {
                write!(
                    f,
                    "cannot trust the certificate in {}: {source}",
                    path.display()
                )
            }
            CertError::Provider(source) => write!(f, "the TLS crypto provider refused: {source}"),
        }
    }
}

impl std::error::Error for CertError {}

/// Reads a PEM file of certificates, leaf first (the order a server sends them in).
///
/// # Errors
/// `Read`, `Pem`, or `NoCertificate` if the file has none.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// `Read`, `Pem`, or `NoKey` if the file has none.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        pem::Error::NoItemsFound => CertError::NoKey {
            path: path.to_owned(),
        },
        source => CertError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// A trust store holding every certificate of a PEM file (a test CA, a private CA).
///
/// # Errors
/// As `load_chain`, and `BadRoot` for a certificate rustls cannot use as a trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(path)? {
        roots.add(cert).map_err(|source| CertError::BadRoot {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// When the certificate stops being valid (its `notAfter`, RFC 5280 §4.1.2.5), in seconds since
/// the Unix epoch: the value of the expiry gauge operators alert on.
///
/// # Errors
/// A message if the bytes are not an X.509 certificate.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Result<u64, String> {
    let parsed = x509_cert::Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    Ok(parsed
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs())
}

/// A server configuration for a chain and its key: TLS 1.2 and 1.3, no client certificates,
/// ALPN `http/1.1`.
///
/// # Errors
/// `Rejected` if the key does not match the leaf certificate or is of an unsupported type
/// (rustls checks that the key's public half is the certificate's).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    paths: (&Path, &Path),
) -> Result<ServerConfig, CertError> {
    let rejected = |source| CertError::Rejected {
        cert: paths.0.to_owned(),
        key: paths.1.to_owned(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(CertError::Provider)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(rejected)?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(config)
}

/// What a client trusts to authenticate the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The Mozilla root programme's CAs (the `webpki-roots` crate): what a browser would trust.
    PublicRoots,
    /// Only the CAs in this PEM file (`--ca FILE`): a test or private CA.
    CaFile(PathBuf),
    /// Nothing is checked (`--insecure`): the connection is encrypted but the server is not
    /// authenticated, so anyone on the path can read and change it. For tests only.
    Insecure,
}

/// A client configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, trusting what `trust` says.
///
/// # Errors
/// Those of `load_roots` for `Trust::CaFile`.
pub fn client_config(trust: &Trust) -> Result<ClientConfig, CertError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(CertError::Provider)?;
    let mut config = match trust {
        Trust::PublicRoots => {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(config)
}

/// The name the client asks for (SNI) and checks the certificate against: a DNS name or an IP
/// address, as written in the URL.
///
/// # Errors
/// A message if `host` is neither.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))
}

/// `--insecure`: accepts any certificate for any name. The handshake signatures are still
/// verified (so the session keys really are shared with whoever holds the presented key); only
/// the question "is this key the server's?" goes unasked.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_ca::TestCa;

    #[test]
    fn loads_a_chain_and_key_and_reads_the_expiry() {
        let ca = TestCa::new();
        let files = ca.files();
        let chain = load_chain(&files.cert).unwrap();
        assert_eq!(chain.len(), 2, "leaf and CA");
        let key = load_key(&files.key).unwrap();
        server_config(chain.clone(), key, (&files.cert, &files.key)).unwrap();
        // 2031-01-02T00:00:00Z, the leaf's notAfter in `TestCa`.
        assert_eq!(not_after_unix(&chain[0]).unwrap(), 1_925_078_400);
    }

    #[test]
    fn refuses_files_that_do_not_fit() {
        let ca = TestCa::new();
        let files = ca.files();
        let other = TestCa::new().files();
        let garbage = files.dir.join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        let missing = files.dir.join("missing.pem");

        assert!(matches!(
            load_chain(&files.key),
            Err(CertError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_key(&files.cert),
            Err(CertError::NoKey { .. })
        ));
        assert!(matches!(load_chain(&garbage), Err(CertError::Pem { .. })));
        assert!(matches!(load_chain(&missing), Err(CertError::Read { .. })));
        // A key that is not the certificate's.
        let chain = load_chain(&files.cert).unwrap();
        let wrong_key = load_key(&other.key).unwrap();
        let refused = server_config(chain, wrong_key, (&files.cert, &other.key));
        assert!(
            matches!(refused, Err(CertError::Rejected { .. })),
            "{refused:?}"
        );
        // Every message names the file.
        let e = load_key(&files.cert).unwrap_err().to_string();
        assert!(e.contains(&files.cert.display().to_string()), "{e}");
        // A key file cut short is described in words, not as a byte array.
        let cut = files.dir.join("cut.pem");
        std::fs::write(&cut, "-----BEGIN PRIVATE KEY-----\nMIGH\n").unwrap();
        let e = load_key(&cut).unwrap_err().to_string();
        assert!(e.contains("the PRIVATE KEY section has no END line"), "{e}");
    }

    #[test]
    fn client_configs_for_each_trust() {
        let ca = TestCa::new();
        let files = ca.files();
        for trust in [
            Trust::PublicRoots,
            Trust::CaFile(files.ca.clone()),
            Trust::Insecure,
        ] {
            let config = client_config(&trust).unwrap();
            assert_eq!(config.alpn_protocols, vec![ALPN_HTTP_1_1.to_vec()]);
        }
        assert!(client_config(&Trust::CaFile(files.key.clone())).is_err());
    }

    #[test]
    fn server_names() {
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("not a name").is_err());
    }
}
