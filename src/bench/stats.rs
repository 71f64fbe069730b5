//! Counting and timing for the load generator: the timestamp each message carries, what one
//! thread counts, and the arithmetic that turns counts into rates.
//!
//! Owns: the payload layout (a send time in the first 8 bytes, a sender slot in the next 4 for
//! broadcast), `Tally` (one thread's counters and latency histogram) and `Errors`, the latency
//! summary, and the report math (rates, CPU per message, RSS per connection).
//! Does not: read clocks, sockets or /proc; every function here is handed its numbers, so the
//! math is unit-tested on its own.
//!
//! SPEC §11.

use super::client::Failure;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Bytes of the send time at the start of every payload: nanoseconds since the run's base
/// instant, little-endian. One process sends and receives, so one monotonic clock serves both
/// ends and latency is a subtraction.
pub const STAMP_BYTES: usize = 8;

/// Bytes of the sender's slot after the stamp (broadcast only): which connection of the
/// receiving thread sent the message, so its window can be credited.
pub const SENDER_BYTES: usize = 4;

/// The highest latency the histogram tells apart; slower messages are recorded as this.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Writes the send time into the first `STAMP_BYTES` of `payload` (which is at least that long).
pub fn write_stamp(payload: &mut [u8], nanos: u64) {
    if let Some(head) = payload.get_mut(..STAMP_BYTES) {
        head.copy_from_slice(&nanos.to_le_bytes());
    }
}

/// The send time carried by `payload`, if it is long enough to carry one.
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    let bytes = payload.get(..STAMP_BYTES)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Writes the sender slot after the stamp.
pub fn write_sender(payload: &mut [u8], slot: u32) {
    if let Some(field) = payload.get_mut(STAMP_BYTES..STAMP_BYTES + SENDER_BYTES) {
        field.copy_from_slice(&slot.to_le_bytes());
    }
}

/// The sender slot carried by `payload`.
pub fn read_sender(payload: &[u8]) -> Option<u32> {
    let bytes = payload.get(STAMP_BYTES..STAMP_BYTES + SENDER_BYTES)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Connection failures by kind. Every failure is counted here, never a panic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    /// TCP connect failed (refused, no route, no free local port for the source address).
    pub connect: u64,
    /// The server's answer to the upgrade request was not a valid 101.
    pub handshake: u64,
    /// Connect, handshake or close did not finish within its deadline.
    pub timeout: u64,
    /// The server's frames broke RFC 6455 as a client sees it.
    pub protocol: u64,
    /// The server sent a Close while the connection was in use.
    pub server_closed: u64,
    /// The connection was reset or hung up without a close handshake.
    pub disconnected: u64,
    /// `wss://`: the TLS session failed (an untrusted certificate, a TLS protocol error).
    #[serde(default)]
    pub tls: u64,
    /// With `--processes`: bench processes that died, never got ready or never reported
    /// (their connections are missing from every other count).
    #[serde(default)]
    pub process: u64,
    /// The sum of the above.
    pub total: u64,
}

impl Errors {
    pub fn count(&mut self, failure: Failure) {
        let field = match failure {
            Failure::Connect => &mut self.connect,
            Failure::Handshake(_) => &mut self.handshake,
            Failure::Timeout => &mut self.timeout,
            Failure::Protocol(_) => &mut self.protocol,
            Failure::ServerClosed(_) => &mut self.server_closed,
            Failure::Disconnected => &mut self.disconnected,
            Failure::Tls(_) => &mut self.tls,
        };
        *field += 1;
        self.total += 1;
    }

    /// Counts one bench process lost (see `process`).
    pub fn count_process(&mut self) {
        self.process += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Errors) {
        self.connect += other.connect;
        self.handshake += other.handshake;
        self.timeout += other.timeout;
        self.protocol += other.protocol;
        self.server_closed += other.server_closed;
        self.disconnected += other.disconnected;
        self.tls += other.tls;
        self.process += other.process;
        self.total += other.total;
    }
}

/// What one worker thread counted. "Total" counts cover the whole run (warm-up and the drain
/// at the end included); the others only the measured window.
#[derive(Debug)]
pub struct Tally {
    /// WebSocket handshakes completed.
    pub opened: u64,
    pub sent_total: u64,
    pub received_total: u64,
    pub sent: u64,
    pub received: u64,
    /// Payload bytes of the messages in `received`.
    pub received_bytes: u64,
    /// Connect mode: connect + handshake + close cycles finished in the window.
    pub completed: u64,
    /// Connections that ended with a complete close handshake.
    pub clean_closes: u64,
    pub errors: Errors,
    /// Message latency in nanoseconds (connect mode: handshake latency), window only.
    pub latency: Histogram<u64>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            opened: 0,
            sent_total: 0,
            received_total: 0,
            sent: 0,
            received: 0,
            received_bytes: 0,
            completed: 0,
            clean_closes: 0,
            errors: Errors::default(),
            latency: new_histogram(),
        }
    }

    /// Records one latency; values beyond the histogram's range are clamped to its top.
    pub fn record_latency(&mut self, nanos: u64) {
        self.latency.saturating_record(nanos.max(1));
    }

    pub fn merge(&mut self, other: &Tally) {
        self.opened += other.opened;
        self.sent_total += other.sent_total;
        self.received_total += other.received_total;
        self.sent += other.sent;
        self.received += other.received;
        self.received_bytes += other.received_bytes;
        self.completed += other.completed;
        self.clean_closes += other.clean_closes;
        self.errors.merge(&other.errors);
        // Both histograms have the same bounds, so adding cannot fail; if it somehow did, the
        // summary would only miss that thread's samples.
        let _ = self.latency.add(&other.latency);
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant digits: every latency is known to within 0.1%.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant, valid bounds")
}

/// A histogram in hdrhistogram's V2 format, base64: how a bench child hands its latencies to
/// the coordinating process, which adds them up before taking percentiles (percentiles
/// themselves cannot be merged).
pub fn encode_histogram(h: &Histogram<u64>) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| format!("cannot serialize a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The inverse of `encode_histogram`; the text comes from a child process, so a malformed one
/// is an error, never a panic.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram is not in the V2 format: {e:?}"))
}

/// A latency distribution in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Summarises a histogram of nanoseconds; `None` when it holds no sample.
pub fn summarize(h: &Histogram<u64>) -> Option<Latency> {
    if h.is_empty() {
        return None;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Some(Latency {
        count: h.len(),
        min: us(h.min()),
        mean: h.mean() / 1000.0,
        p50: us(h.value_at_quantile(0.50)),
        p90: us(h.value_at_quantile(0.90)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
    })
}

/// `count` per second over `window`; 0 for an empty window.
pub fn per_sec(count: u64, window: Duration) -> f64 {
    let secs = window.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Microseconds of CPU per item; `None` when there was no item.
pub fn cpu_us_per(cpu_secs: f64, count: u64) -> Option<f64> {
    (count > 0).then(|| cpu_secs * 1e6 / count as f64)
}

/// Items per CPU-second; `None` when no CPU time was measured (a rate over nothing).
pub fn per_cpu_sec(count: u64, cpu_secs: f64) -> Option<f64> {
    (cpu_secs > 0.0).then(|| count as f64 / cpu_secs)
}

/// RSS growth per connection in bytes, from two VmRSS samples in KiB. Negative when the
/// process gave memory back; `None` without connections.
pub fn rss_per_connection(before_kib: u64, after_kib: u64, connections: u64) -> Option<f64> {
    (connections > 0).then(|| (after_kib as f64 - before_kib as f64) * 1024.0 / connections as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::client_handshake::ClientHandshakeError;

    #[test]
    fn stamps_round_trip_and_short_payloads_carry_none() {
        let cases: &[(&str, usize, u64, u32)] = &[
            ("minimum echo size", 8, 0, 0),
            ("typical", 64, 123_456_789, 7),
            ("large values", 12, u64::MAX, u32::MAX),
        ];
        for &(name, size, nanos, slot) in cases {
            let mut payload = vec![0xAA; size];
            write_stamp(&mut payload, nanos);
            assert_eq!(read_stamp(&payload), Some(nanos), "{name}");
            if size >= STAMP_BYTES + SENDER_BYTES {
                write_sender(&mut payload, slot);
                assert_eq!(read_sender(&payload), Some(slot), "{name}");
                assert_eq!(read_stamp(&payload), Some(nanos), "{name}: stamp kept");
            }
        }
        assert_eq!(read_stamp(&[1, 2, 3, 4, 5, 6, 7]), None);
        assert_eq!(read_sender(&[0; 11]), None);
        // Writing into a too-short payload changes nothing and does not panic.
        let mut short = [9u8; 4];
        write_stamp(&mut short, 1);
        write_sender(&mut short, 1);
        assert_eq!(short, [9; 4]);
    }

    #[test]
    fn errors_count_by_kind_and_merge() {
        let mut e = Errors::default();
        for f in [
            Failure::Connect,
            Failure::Connect,
            Failure::Handshake(Some(ClientHandshakeError::Status(404))),
            Failure::Timeout,
            Failure::Disconnected,
        ] {
            e.count(f);
        }
        assert_eq!((e.connect, e.handshake, e.timeout, e.total), (2, 1, 1, 5));
        let mut sum = e;
        sum.merge(&e);
        assert_eq!((sum.connect, sum.disconnected, sum.total), (4, 2, 10));
        sum.count_process();
        assert_eq!((sum.process, sum.total), (1, 11));
    }

    #[test]
    fn histograms_survive_encoding() {
        let mut t = Tally::new();
        for ns in [1, 999, 1_000_000, u64::MAX] {
            t.record_latency(ns);
        }
        let text = encode_histogram(&t.latency).unwrap();
        let back = decode_histogram(&text).unwrap();
        assert_eq!(back, t.latency);
        for bad in ["", "not base64!", "AAAA"] {
            assert!(decode_histogram(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tallies_merge_counts_and_histograms() {
        let mut a = Tally::new();
        a.sent = 3;
        a.received = 2;
        a.record_latency(1_000);
        let mut b = Tally::new();
        b.sent = 1;
        b.received = 5;
        b.record_latency(3_000);
        b.record_latency(0); // clamped to 1 ns
        b.record_latency(u64::MAX); // clamped to the histogram's top
        a.merge(&b);
        assert_eq!((a.sent, a.received), (4, 7));
        assert_eq!(a.latency.len(), 4);
    }

    #[test]
    fn latency_summary_in_microseconds() {
        let mut t = Tally::new();
        assert_eq!(summarize(&t.latency), None);
        for us in 1..=1000u64 {
            t.record_latency(us * 1000);
        }
        let l = summarize(&t.latency).unwrap();
        assert_eq!(l.count, 1000);
        // hdrhistogram keeps 3 significant digits: compare within 0.1%.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        for (name, got, want) in [
            ("min", l.min, 1.0),
            ("p50", l.p50, 500.0),
            ("p90", l.p90, 900.0),
            ("p99", l.p99, 990.0),
            ("p999", l.p999, 999.0),
            ("max", l.max, 1000.0),
            ("mean", l.mean, 500.5),
        ] {
            assert!(close(got, want), "{name}: {got} vs {want}");
        }
    }

    #[test]
    fn report_math() {
        let s = Duration::from_secs;
        assert_eq!(per_sec(500, s(2)), 250.0);
        assert_eq!(per_sec(500, Duration::ZERO), 0.0);
        assert_eq!(cpu_us_per(2.0, 1_000_000), Some(2.0));
        assert_eq!(cpu_us_per(2.0, 0), None);
        assert_eq!(per_cpu_sec(1_000_000, 2.0), Some(500_000.0));
        assert_eq!(per_cpu_sec(10, 0.0), None);
        // 10,000 connections grew RSS by 5,000 KiB: 512 bytes each.
        assert_eq!(rss_per_connection(20_000, 25_000, 10_000), Some(512.0));
        assert_eq!(rss_per_connection(25_000, 20_000, 10_000), Some(-512.0));
        assert_eq!(rss_per_connection(1, 2, 0), None);
    }
}
