//! Priming (idle mode): a few connections opened, upgraded and closed one at a time before the
//! server's memory is first sampled.
//!
//! Owns: that short sequence of connections, each with its own deadline, and `settled`, the
//! wait for the server's memory to stop changing after them.
//! Does not: read /proc itself (`procfs.rs`, handed in by `coordinator.rs`) or count anything
//! into the report's tallies.
//!
//! Why: the first connections a server accepts run code that its start-up did not (the accept,
//! the request parser, the upgrade, the close), and the kernel maps the executable's pages for
//! that code as it first runs, 64 KiB at a time; the first ones also give the server's pools and
//! tables their first blocks. Those are costs of the process, paid once whether it then holds
//! ten connections or ten thousand. Paid before the baseline, they are not divided among the
//! held connections, so `rss_per_connection_bytes` is what one more connection costs; the report
//! keeps the sample taken before the priming too (`rss_cold_kib`), so the cold figure is there
//! as well (docs/benchmarks.md, "What an idle connection costs").

use super::client::{Client, Codec, Dial, State, Step};
use super::procfs::Sample;
use super::worker::Plan;
use mio::{Events, Interest, Poll, Token};
use std::time::{Duration, Instant};

/// How far apart two samples of the server must agree for its memory to count as settled:
/// longer than a server takes to give back what a burst left (wsrelay frees its pools' spares
/// and trims its heap after 250 ms idle, docs/benchmarks.md, "What an idle connection costs").
const SETTLE_STEP: Duration = Duration::from_millis(400);

/// At most this long waiting for the server's memory to settle; past it the last sample is
/// the baseline (a server whose memory keeps moving while idle gives a noisy figure anyway).
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// How many connections idle mode primes the server with unless `--prime` says otherwise: a
/// handful is enough for every path a held connection takes to have run once.
pub const DEFAULT_PRIME: usize = 16;

/// Opens `count` connections the way `plan`'s first connection would (same URL, source
/// address and TLS), one at a time: each connects, completes the upgrade, closes with a close
/// handshake and waits for the server to close TCP, within the plan's connect timeout.
///
/// # Errors
/// The first connection that fails, in words: the run stops there, since a server that cannot
/// take one connection at a time would not give a meaningful figure for ten thousand.
pub fn prime(plan: &Plan, count: usize) -> Result<(), String> {
    let Some(conn) = plan.conns.first() else {
        return Ok(());
    };
    let mut poll = Poll::new().map_err(|e| format!("priming: cannot create a poller: {e}"))?;
    let mut events = Events::with_capacity(8);
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut codec = Codec::new();
    let mut buf = vec![0u8; 16 * 1024];
    for i in 1..=count {
        let failed = |what: String| format!("priming connection {i} of {count}: {what}");
        let dial = Dial {
            target: plan.target,
            tls: plan.tls.as_ref(),
            host: &plan.host,
            compression: plan.compression,
        };
        let started = Instant::now();
        let deadline = started + plan.connect_timeout;
        let mut client = Client::connect(dial, conn.source, &conn.resource, &mut rng, started)
            .map_err(|e| failed(e.to_string()))?;
        poll.registry()
            .register(
                client.stream_mut(),
                Token(0),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| failed(e.to_string()))?;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| failed("no clean close within --connect-timeout".into()))?;
            match poll.poll(&mut events, Some(left)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(failed(e.to_string())),
            }
            if events.is_empty() {
                continue; // the deadline is checked at the top
            }
            let step = client
                .on_ready(&mut buf, &mut codec, &mut rng, |_| {})
                .map_err(|f| failed(f.to_string()))?;
            if step == Step::Closed {
                break;
            }
            if client.state() == State::Open {
                client.close(&mut rng);
                client.flush().map_err(|f| failed(f.to_string()))?;
            }
        }
        // Dropping `client` closes the socket, which also takes it off the poller.
    }
    Ok(())
}

/// The server's memory once it stopped changing after the priming: samples `SETTLE_STEP` apart
/// until two agree (RSS and its anonymous part), at most `SETTLE_LIMIT`.
///
/// Why wait: right after the last priming connection closed the server still holds what those
/// connections left behind and gives back when it goes idle (buffer spares, a receive pool's
/// pages, free heap). Sampled at once, that memory would be in the baseline and gone by the
/// time all connections are open, and every held connection would look cheaper by its share
/// (about 128 KiB among 10,000 on uring in the first version of this: 10 bytes each).
///
/// # Errors
/// Reading the server's /proc failed.
pub fn settled(sample: impl FnMut() -> Result<Sample, String>) -> Result<Sample, String> {
    settle(sample, SETTLE_STEP, SETTLE_LIMIT)
}

fn settle(
    mut sample: impl FnMut() -> Result<Sample, String>,
    step: Duration,
    limit: Duration,
) -> Result<Sample, String> {
    let start = Instant::now();
    let mut last = sample()?;
    loop {
        std::thread::sleep(step);
        let now = sample()?;
        let same = now.rss_kib == last.rss_kib && now.anon_kib == last.anon_kib;
        if same {
            return Ok(now);
        }
        if start.elapsed() >= limit {
            eprintln!(
                "wsrelay bench: the server's memory was still changing {:.1} s after the \
                 priming; the baseline is the last sample (RSS {} KiB)",
                limit.as_secs_f64(),
                now.rss_kib
            );
            return Ok(now);
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rss_kib: u64, anon_kib: u64) -> Sample {
        Sample {
            cpu_ticks: 0,
            user_ticks: 0,
            rss_kib,
            anon_kib,
        }
    }

    /// Samples from a script; past its end, the last one again and again.
    fn script(samples: &[Sample]) -> impl FnMut() -> Result<Sample, String> + '_ {
        let mut i = 0;
        move || {
            let s = samples[i.min(samples.len() - 1)];
            i += 1;
            Ok(s)
        }
    }

    #[test]
    fn the_baseline_is_taken_once_memory_stops_changing() {
        // The server gives back the priming's leftovers (RSS, then the anonymous part), then
        // holds still: the baseline is the settled figure, not the first one.
        let samples = [
            at(9000, 5000),
            at(8900, 5000),
            at(8900, 4900),
            at(8900, 4900),
        ];
        let limit = Duration::from_secs(60);
        let got = settle(script(&samples), Duration::from_millis(1), limit).unwrap();
        assert_eq!(got, at(8900, 4900));
    }

    #[test]
    fn memory_that_never_settles_gives_the_last_sample_at_the_limit() {
        let mut rss = 1000;
        let moving = || {
            rss += 4;
            Ok(at(rss, rss))
        };
        let start = Instant::now();
        let got = settle(moving, Duration::from_millis(1), Duration::from_millis(30)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(got.rss_kib > 1004, "{got:?}");
    }

    #[test]
    fn a_failed_read_is_an_error() {
        let failing = || Err("gone".to_string());
        assert_eq!(
            settle(failing, Duration::from_millis(1), Duration::from_secs(1)),
            Err("gone".to_string())
        );
    }
}
