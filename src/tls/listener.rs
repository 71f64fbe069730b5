//! The TLS of a listening socket: the certificate it serves, reloadable while it runs, and what
//! its sessions did.
//!
//! Owns: `ServerTls` (where the chain and key were loaded from, the configuration new sessions
//! are made from, the leaf's expiry) and `TlsStats` (handshakes by version, failures by reason,
//! reloads).
//! Does not: watch for SIGHUP (the reactor's signal handling calls `reload`), render /metrics
//! (`server::metrics::render_tls` does), or touch sessions already made: each holds its own
//! reference to the configuration it started with.
//!
//! SPEC §18: "certificates reloaded on SIGHUP without dropping connections".

use super::config::{self, CertError};
use super::session::{Failure, Handshake, TlsSession};
use log::{info, warn};
use rustls::ServerConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    /// What new sessions are made from. Replaced whole by a successful reload; sessions made
    /// earlier keep the `Arc` they were given, so open connections never notice.
    config: Arc<ServerConfig>,
    /// The served leaf certificate's `notAfter`, in seconds since the Unix epoch.
    not_after: u64,
    pub stats: TlsStats,
}

impl ServerTls {
    /// Loads the PEM chain (leaf first) and key, and checks that they belong together.
    ///
    /// # Errors
    /// A `CertError` naming the file and what is wrong with it.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ServerTls, CertError> {
        let (config, not_after) = load_pair(cert_path, key_path)?;
        Ok(ServerTls {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            config,
            not_after,
            stats: TlsStats::default(),
        })
    }

    /// Reads the same two files again. On success, new sessions get the new pair; on failure
    /// the current pair stays in service. Either way the outcome is logged and counted.
    ///
    /// # Errors
    /// The `CertError` that kept the new pair out.
    pub fn reload(&mut self) -> Result<(), CertError> {
        match load_pair(&self.cert_path, &self.key_path) {
            Ok((config, not_after)) => {
                self.config = config;
                self.not_after = not_after;
                self.stats.reloads_ok += 1;
                info!(
                    "TLS certificate reloaded from {} (valid until {})",
                    self.cert_path.display(),
                    describe_time(not_after)
                );
                Ok(())
            }
            Err(e) => {
                self.stats.reloads_failed += 1;
                warn!(
                    "TLS reload failed, still serving the certificate valid until {}: {e}",
                    describe_time(self.not_after)
                );
                Err(e)
            }
        }
    }

    /// A session for a newly accepted connection, with the current pair.
    ///
    /// # Errors
    /// Only rustls's own checks on the configuration, which `load` already passed.
    pub fn session(&self) -> Result<TlsSession, rustls::Error> {
        TlsSession::server(self.config.clone())
    }

    /// When the served certificate expires, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> u64 {
        self.not_after
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<(Arc<ServerConfig>, u64), CertError> {
    let chain = config::load_chain(cert_path)?;
    let key = config::load_key(key_path)?;
    let leaf = chain.first().ok_or_else(|| CertError::NoCertificate {
        path: cert_path.to_owned(),
    })?;
    let not_after = config::not_after_unix(leaf).map_err(|reason| CertError::BadCertificate {
        path: cert_path.to_owned(),
        reason,
    })?;
    let config = config::server_config(chain, key, (cert_path, key_path))?;
    Ok((Arc::new(config), not_after))
}

/// A Unix time as a UTC date for the log.
fn describe_time(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map_or_else(|| format!("{unix} (Unix time)"), |t| t.to_string())
}

/// What the listener's TLS sessions did, for /metrics. Plain counters: the reactor is
/// single-threaded.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Completed handshakes, by protocol version ("TLSv1.2", "TLSv1.3").
    pub handshakes: BTreeMap<&'static str, u64>,
    /// Sessions that failed before their handshake completed, by reason.
    pub handshake_failures: BTreeMap<Failure, u64>,
    /// Sessions that failed after it (a renegotiation attempt, a record that does not decrypt).
    pub session_failures: BTreeMap<Failure, u64>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

impl TlsStats {
    pub fn handshake_completed(&mut self, handshake: &Handshake) {
        *self.handshakes.entry(handshake.version).or_insert(0) += 1;
    }

    /// Counts a failed session; `handshaking` says whether its handshake was still under way.
    pub fn failed(&mut self, failure: Failure, handshaking: bool) {
        let map = if handshaking {
            &mut self.handshake_failures
        } else {
            &mut self.session_failures
        };
        *map.entry(failure).or_insert(0) += 1;
    }

    /// Completed handshakes of all versions.
    pub fn handshakes_total(&self) -> u64 {
        self.handshakes.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::config::{client_config, server_name, Trust};
    use crate::tls::test_ca::{handshake, TestCa};

    fn client(ca_file: &Path) -> TlsSession {
        let config = client_config(&Trust::CaFile(ca_file.to_owned())).unwrap();
        TlsSession::client(Arc::new(config), server_name("localhost").unwrap()).unwrap()
    }

    #[test]
    fn reload_swaps_the_pair_for_new_sessions_only() {
        let old = TestCa::new();
        let files = old.files();
        let old_ca = files.dir.join("old-ca.pem");
        std::fs::copy(&files.ca, &old_ca).unwrap();
        let mut tls = ServerTls::load(&files.cert, &files.key).unwrap();
        assert_eq!(tls.not_after_unix(), 1_925_078_400);
        let mut before = tls.session().unwrap();

        // A new pair, from a different CA, in the same files.
        let new = TestCa::new();
        std::fs::write(&files.cert, &new.chain_pem).unwrap();
        std::fs::write(&files.key, &new.key_pem).unwrap();
        std::fs::write(&files.ca, &new.ca_pem).unwrap();
        tls.reload().unwrap();
        assert_eq!(tls.stats.reloads_ok, 1);

        // New sessions serve the new certificate: a client trusting only the old CA refuses it.
        handshake(&mut client(&files.ca), &mut tls.session().unwrap()).unwrap();
        assert!(handshake(&mut client(&old_ca), &mut tls.session().unwrap()).is_err());
        // A session made before the reload still serves the old one.
        handshake(&mut client(&old_ca), &mut before).unwrap();
    }

    #[test]
    fn a_failed_reload_keeps_the_current_pair() {
        let ca = TestCa::new();
        let files = ca.files();
        let mut tls = ServerTls::load(&files.cert, &files.key).unwrap();
        let serving = tls.config.clone();

        // Half-way through a renewal: the certificate is new, the key still the old one.
        std::fs::write(&files.cert, TestCa::new().chain_pem).unwrap();
        let e = tls.reload().unwrap_err();
        assert!(matches!(e, CertError::Rejected { .. }), "{e}");
        // Or the file is gone.
        std::fs::remove_file(&files.key).unwrap();
        assert!(matches!(tls.reload(), Err(CertError::Read { .. })));

        assert!(Arc::ptr_eq(&serving, &tls.config), "still the first pair");
        assert_eq!((tls.stats.reloads_ok, tls.stats.reloads_failed), (0, 2));
        handshake(&mut client(&files.ca), &mut tls.session().unwrap()).unwrap();
    }

    #[test]
    fn stats_count_by_version_and_reason() {
        let mut stats = TlsStats::default();
        let done = Handshake {
            version: "TLSv1.3",
            alpn: None,
        };
        stats.handshake_completed(&done);
        stats.handshake_completed(&done);
        stats.failed(Failure::PlainHttp, true);
        stats.failed(Failure::Renegotiation, false);
        assert_eq!(stats.handshakes_total(), 2);
        assert_eq!(stats.handshake_failures.get(&Failure::PlainHttp), Some(&1));
        assert_eq!(
            stats.session_failures.get(&Failure::Renegotiation),
            Some(&1)
        );
        assert_eq!(stats.handshake_failures.get(&Failure::Renegotiation), None);
    }

    #[test]
    fn times_for_the_log() {
        assert_eq!(describe_time(1_925_078_400), "2031-01-02 00:00:00 UTC");
    }
}
