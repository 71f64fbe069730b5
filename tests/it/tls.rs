//! `wsrelay serve --tls-cert --tls-key` (SPEC §18): what the server says about the pair it is
//! given, before it listens.

use crate::tls_support::TestCa;
use std::process::Command;

/// Runs `wsrelay serve ARGS` on a free port; it must exit at once. Returns its status and
/// stderr.
fn serve_refuses(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run wsrelay serve");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_certificate_or_key_is_refused_in_words() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let missing = ca.dir.join("missing.pem");
    let (cert, key) = (ca.cert.to_str().unwrap(), ca.key.to_str().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (&["--tls-cert", cert], "--tls-key"),
        (&["--tls-key", key], "--tls-cert"),
        (
            &["--tls-cert", missing.to_str().unwrap(), "--tls-key", key],
            "cannot read",
        ),
        // The two files swapped.
        (
            &["--tls-cert", key, "--tls-key", cert],
            "holds no certificate",
        ),
        // A key that is not the certificate's.
        (
            &["--tls-cert", cert, "--tls-key", other.key.to_str().unwrap()],
            "cannot serve the certificate",
        ),
    ];
    for (args, message) in cases {
        let (code, stderr) = serve_refuses(args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
