//! Priming (idle mode): a few connections opened, upgraded and closed one at a time before the
//! server's memory is first sampled.
//!
//! Owns: that short sequence of connections, each with its own deadline.
//! Does not: sample the server (`coordinator.rs`) or count anything into the report's tallies.
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
use super::worker::Plan;
use mio::{Events, Interest, Poll, Token};
use std::time::Instant;

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
