//! Tokens for `wsrelay client --token-cmd`: run the command that prints a token, read when the
//! token expires, and decide when to fetch the next one (SPEC §16; docs/protocol.md, "Token
//! refresh and expiry").
//!
//! Owns: `fetch` (run the command with a deadline, in a process group of its own that is killed
//! whole when the deadline passes), `exp_of` (the `exp` claim, read without
//! verifying: the client only schedules with it, the relay is the one that checks), and
//! `refresh_delay` (when to refresh: at 80% of the lifetime left).
//! Does not: send the token (the session does, in the upgrade's `Authorization` header and in
//! `refresh` commands), decide what an expired connection does (the session reconnects), or
//! choose the thread it runs on (`fetch` blocks; the session runs refreshes on a thread of their
//! own so that its loop keeps reading and pinging).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the token command may run before the attempt is given up (and the command killed).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The share of a token's remaining lifetime after which the client refreshes it: late enough
/// not to hammer the issuer, early enough that a slow or failing command has time for retries.
pub const REFRESH_AT: f64 = 0.8;

/// Never refresh sooner than this after getting a token (a token that is already nearly
/// expired, or a clock far off, must not turn into a busy loop of commands).
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(1);

/// Bytes of output a token command may print; a JWT is a few hundred.
const MAX_OUTPUT_BYTES: u64 = 64 * 1024;

/// Runs `command` with `sh -c` and returns the token it printed (the first line, trimmed).
///
/// # Errors
/// The command cannot be started, exits unsuccessfully, prints nothing usable, or runs longer
/// than `timeout` (it is then killed, with everything it started).
pub fn fetch(command: &str, timeout: Duration) -> Result<String, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A process group of its own: on timeout the whole group is killed, so a program the
        // shell started (`curl ...`) cannot live on holding the output pipe open.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run the token command: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("the token command has no output pipe".to_string());
    };
    // The output is read on a thread so that this one can wait with a deadline: a command
    // that hangs is killed instead of stopping the client.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.take(MAX_OUTPUT_BYTES).read_to_end(&mut out);
        let _ = tx.send(read.map(|_| out));
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            kill_group(&mut child);
            return Err(format!("cannot read the token command's output: {e}"));
        }
        Err(_) => {
            kill_group(&mut child);
            return Err(format!(
                "the token command did not finish within {}s",
                timeout.as_secs_f64()
            ));
        }
    };
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for the token command: {e}"))?;
    if !status.success() {
        return Err(format!("the token command failed ({status})"));
    }
    parse_output(&output)
}

/// Kills the command's process group (the shell and whatever it started) and reaps the shell.
fn kill_group(child: &mut Child) {
    // The group id is the shell's pid (`process_group(0)`). A pid that does not fit is not
    // one the kernel gave out; the shell is then killed alone.
    match libc::pid_t::try_from(child.id()) {
        // SAFETY: killpg only sends a signal; the group is the one this function created.
        Ok(group) => unsafe {
            libc::killpg(group, libc::SIGKILL);
        },
        Err(_) => {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

/// The token in a command's output: its first line, without surrounding whitespace.
///
/// # Errors
/// Empty output, or a first line with inner whitespace or control characters (it goes into a
/// header line and a JSON string: CR or LF would end the header early).
pub fn parse_output(output: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(output);
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err("the token command printed no token".to_string());
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the token command printed more than one word".to_string());
    }
    Ok(token.to_string())
}

/// The `exp` claim of a JWT in seconds since the epoch, read without checking the signature.
pub fn exp_of(token: &str) -> Option<f64> {
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    claims.get("exp")?.as_f64()
}

/// How long to wait before refreshing a token that expires at `exp` (seconds since the epoch),
/// at wall-clock time `now` (the same unit): `REFRESH_AT` of the lifetime left, at least
/// `MIN_REFRESH_DELAY`. A token without `exp` is never refreshed (`None`).
pub fn refresh_delay(exp: Option<f64>, now: f64) -> Option<Duration> {
    let left = exp? - now;
    let delay = if left.is_finite() && left > 0.0 {
        Duration::from_secs_f64((left * REFRESH_AT).min(u32::MAX as f64))
    } else {
        Duration::ZERO
    };
    Some(delay.max(MIN_REFRESH_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn exp_is_read_from_the_payload() {
        assert_eq!(exp_of(&jwt(r#"{"sub":"a","exp":1700000000}"#)), Some(1.7e9));
        assert_eq!(exp_of(&jwt(r#"{"sub":"a","exp":1.5}"#)), Some(1.5));
        assert_eq!(exp_of(&jwt(r#"{"sub":"a"}"#)), None);
        assert_eq!(exp_of(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(exp_of("not-a-jwt"), None);
        assert_eq!(exp_of("a.!!!.c"), None);
    }

    #[test]
    fn refresh_comes_at_80_percent_of_the_lifetime_left() {
        let s = Duration::from_secs;
        // (exp, now, expected delay)
        let cases = [
            (Some(1100.0), 1000.0, Some(s(80))),
            (Some(1010.0), 1000.0, Some(s(8))),
            (Some(1000.5), 1000.0, Some(MIN_REFRESH_DELAY)),
            (Some(900.0), 1000.0, Some(MIN_REFRESH_DELAY)),
            (Some(f64::INFINITY), 1000.0, Some(MIN_REFRESH_DELAY)),
            (None, 1000.0, None),
        ];
        for (exp, now, want) in cases {
            assert_eq!(refresh_delay(exp, now), want, "{exp:?} at {now}");
        }
    }

    #[test]
    fn the_output_is_one_word() {
        assert_eq!(parse_output(b"abc.def.ghi\n"), Ok("abc.def.ghi".into()));
        assert_eq!(parse_output(b"  abc \nsecond line\n"), Ok("abc".into()));
        assert!(parse_output(b"").is_err());
        assert!(parse_output(b"\n").is_err());
        assert!(parse_output(b"a b\n").is_err());
        assert!(parse_output(b"a\rX: y\n").is_err());
    }

    #[test]
    fn commands_run_with_a_deadline() {
        assert_eq!(fetch("echo tok.en.x", FETCH_TIMEOUT), Ok("tok.en.x".into()));
        let failed = fetch("echo tok; exit 3", FETCH_TIMEOUT).unwrap_err();
        assert!(failed.contains("failed"), "{failed}");
        let hung = fetch("sleep 30", Duration::from_millis(200)).unwrap_err();
        assert!(hung.contains("did not finish"), "{hung}");
    }

    /// A command that times out is killed with everything it started: a program still
    /// running under the shell (as `curl` would) must not outlive it holding the pipe open.
    #[test]
    fn a_timeout_kills_what_the_command_started() {
        let dir = std::env::temp_dir().join(format!("wsrelay-token-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("pid");
        let command = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let hung = fetch(&command, Duration::from_millis(300)).unwrap_err();
        assert!(hung.contains("did not finish"), "{hung}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        // Killed: gone, or a zombie waiting for whoever adopted it to reap it.
        let stat = format!("/proc/{}/stat", pid.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let alive = std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .map(|rest| !rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(false);
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the command's child {} is still running",
                pid.trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
