//! The result of one bench run: one value, printed for people or as one JSON object.
//!
//! Owns: `Report` and its parts, `JSON_FIELDS` (the documentation of every JSON field, shown
//! by `wsrelay bench --help` and checked against the struct by a test), and the text rendering.
//! Does not: measure anything (`worker.rs`, `procfs.rs`) or compute rates (`stats.rs`).
//!
//! SPEC §11.

use super::stats::{Errors, Latency};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// What `--json` prints, field by field. Shown after `--help`; a unit test keeps it in step
/// with `Report`.
pub const JSON_FIELDS: &str = "\
JSON output (--json): exactly one object on stdout, with these fields.
Counts named *_total cover the whole run (warm-up and the drain at the end included); the
others cover only the measured window that follows the warm-up. Latencies are in microseconds.

  mode                            \"echo\", \"broadcast\", \"idle\" or \"connect\"
  url                             the URL as given
  processes                       bench processes that shared the load (--processes)
  threads                         worker threads used, all processes together
  connections                     connections asked for (broadcast: rooms x members; connect:
                                  --concurrency, the cycles in flight)
  opened                          WebSocket handshakes completed (connect: over the whole run)
  warmup_secs                     length of the warm-up, excluded from every figure
  duration_secs                   length of the measured window
  sent_total                      data messages sent over the whole run
  received_total                  data messages received over the whole run (broadcast: deliveries)
  sent                            data messages sent in the window
  received                        data messages received in the window (broadcast: deliveries)
  completed                       connect: connect+handshake+close cycles finished in the window;
                                  0 in the other modes
  rate_per_sec                    the mode's throughput in the window: echo messages received,
                                  broadcast deliveries, or connect cycles, per second; idle 0
  bytes_per_sec                   payload bytes received per second in the window
  clean_closes                    connections that ended with a complete close handshake
  errors                          connection failures by kind, counted (never a crash):
  errors.connect                  TCP connects that failed (refused, no free local port, ...)
  errors.handshake                upgrades the server refused or answered wrongly
  errors.timeout                  connects, handshakes or closes past their deadline
  errors.protocol                 connections the server's frames broke RFC 6455 on
  errors.server_closed            connections the server closed while in use
  errors.disconnected             connections reset or hung up without a close handshake
  errors.tls                      wss://: TLS sessions that failed (certificate, TLS protocol)
  errors.process                  --processes: bench processes that died, never got ready or
                                  never reported; their connections are in no other count
  errors.total                    the sum of the errors above
  first_error                     the first failure seen, in words, or null
  latency_us                      null when nothing was measured (idle), else:
  latency_us.count                samples: messages (connect: handshakes) in the window
  latency_us.min                  fastest; echo: send to echo received; broadcast: send to
                                  delivery; connect: connect start to the 101 parsed
  latency_us.mean                 mean
  latency_us.p50                  median
  latency_us.p90                  90th percentile
  latency_us.p99                  99th percentile
  latency_us.p999                 99.9th percentile
  latency_us.max                  slowest
  server                          null without --server-pid, else:
  server.pid                      the process sampled
  server.cpu_secs                 user+system CPU the server used during the window
  server.user_secs                the user-space part of cpu_secs (utime)
  server.sys_secs                 the kernel's part of cpu_secs (stime)
  server.rss_before_kib           server VmRSS before the first connection (idle: after the
                                  priming connections, see server.primed, once two samples
                                  400 ms apart agree, at most 5 s)
  server.rss_after_kib            server VmRSS at the start of the window (all connections open)
  server.rss_per_connection_bytes (rss_after - rss_before) / opened; null in connect mode
  server.anon_before_kib          the anonymous part of rss_before_kib (RssAnon: heap and
                                  private mappings; the rest is mostly code read from files)
  server.anon_after_kib           the anonymous part of rss_after_kib
  server.anon_per_connection_bytes (anon_after - anon_before) / opened: the memory allocated
                                  per connection, without the code pages the first connections
                                  bring in once; null in connect mode
  server.primed                   idle: connections opened, upgraded and closed one at a
                                  time before rss_before was read (--prime), so what the first
                                  connections bring in once (code pages, first pool blocks) is
                                  not counted per connection; 0 in the other modes
  server.rss_cold_kib             idle with --prime > 0: server VmRSS before the priming; null
                                  otherwise
  server.rss_cold_per_connection_bytes (rss_after - rss_cold) / opened: the per-connection
                                  figure from a cold server, one-time costs included; null
                                  without rss_cold_kib
  server.cpu_us_per_message       server CPU per message received in the window (broadcast:
                                  per delivery); null in idle and connect mode
  server.messages_per_cpu_sec     messages (deliveries) received per server CPU-second; null
                                  in idle and connect mode
  server.cpu_us_per_connection    connect: server CPU per completed cycle; null otherwise
";

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub url: String,
    pub processes: usize,
    pub threads: usize,
    pub connections: u64,
    pub opened: u64,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub sent_total: u64,
    pub received_total: u64,
    pub sent: u64,
    pub received: u64,
    pub completed: u64,
    pub rate_per_sec: f64,
    pub bytes_per_sec: f64,
    pub clean_closes: u64,
    pub errors: Errors,
    pub first_error: Option<String>,
    pub latency_us: Option<Latency>,
    pub server: Option<ServerFigures>,
    /// Only in the report of a child process (`--child`), for its coordinator; not shown in
    /// `JSON_FIELDS` because no user ever sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child: Option<ChildExtra>,
}

/// What a child process adds to its report so that its coordinator can merge exactly: the
/// payload bytes behind `bytes_per_sec`, and the latency histogram itself (`stats::
/// encode_histogram`), since percentiles of parts do not add up to percentiles of the whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildExtra {
    pub received_bytes: u64,
    pub latency_histogram: String,
}

/// What `--server-pid` adds: the server's side of the run, from /proc.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerFigures {
    pub pid: u32,
    pub cpu_secs: f64,
    pub user_secs: f64,
    pub sys_secs: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_connection_bytes: Option<f64>,
    pub anon_before_kib: u64,
    pub anon_after_kib: u64,
    pub anon_per_connection_bytes: Option<f64>,
    pub primed: u64,
    pub rss_cold_kib: Option<u64>,
    pub rss_cold_per_connection_bytes: Option<f64>,
    pub cpu_us_per_message: Option<f64>,
    pub messages_per_cpu_sec: Option<f64>,
    pub cpu_us_per_connection: Option<f64>,
}

impl Report {
    /// The report for people: a few lines, the figures that matter first.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "wsrelay bench {} {}: {} connections ({} opened), {} thread(s) in {} process(es), {:.1} s measured after {:.1} s warm-up",
            self.mode, self.url, self.connections, self.opened, self.threads, self.processes, self.duration_secs, self.warmup_secs
        );
        match self.mode {
            "connect" => {
                let _ = writeln!(
                    t,
                    "cycles: {} in the window, {:.0}/s (connect + handshake + close)",
                    self.completed, self.rate_per_sec
                );
            }
            "idle" => {}
            _ => {
                let what = if self.mode == "broadcast" {
                    "deliveries"
                } else {
                    "received"
                };
                let _ = writeln!(
                    t,
                    "messages: sent {} / {} {} in the window ({:.0}/s, {:.2} MB/s); whole run: sent {}, {} {}",
                    self.sent,
                    what,
                    self.received,
                    self.rate_per_sec,
                    self.bytes_per_sec / 1e6,
                    self.sent_total,
                    what,
                    self.received_total
                );
            }
        }
        if let Some(l) = &self.latency_us {
            let what = if self.mode == "connect" {
                "handshake latency"
            } else {
                "latency"
            };
            let _ = writeln!(
                t,
                "{what}: p50 {} p90 {} p99 {} p99.9 {} max {} (mean {}, n={})",
                us(l.p50),
                us(l.p90),
                us(l.p99),
                us(l.p999),
                us(l.max),
                us(l.mean),
                l.count
            );
        }
        if let Some(s) = &self.server {
            let _ = write!(
                t,
                "server (pid {}): {:.2} CPU-s in the window (user {:.2}, system {:.2})",
                s.pid, s.cpu_secs, s.user_secs, s.sys_secs
            );
            if let (Some(per_sec), Some(per_msg)) = (s.messages_per_cpu_sec, s.cpu_us_per_message) {
                let _ = write!(
                    t,
                    ", {per_sec:.0} messages per CPU-s ({per_msg:.2} µs each)"
                );
            }
            if let Some(per_conn) = s.cpu_us_per_connection {
                let _ = write!(t, ", {per_conn:.1} µs per connection cycle");
            }
            let _ = write!(t, "; RSS {} -> {} KiB", s.rss_before_kib, s.rss_after_kib);
            if let Some(bytes) = s.rss_per_connection_bytes {
                let _ = write!(t, " ({bytes:.0} bytes per connection)");
            }
            if let Some(bytes) = s.anon_per_connection_bytes {
                let _ = write!(t, ", anonymous {bytes:.0} bytes per connection");
            }
            if let Some(bytes) = s.rss_cold_per_connection_bytes {
                let _ = write!(
                    t,
                    ", {bytes:.0} bytes per connection counted from before the {} priming connections",
                    s.primed
                );
            }
            t.push('\n');
        }
        let e = &self.errors;
        if e.total == 0 {
            let _ = writeln!(t, "errors: none; {} clean closes", self.clean_closes);
        } else {
            let _ = writeln!(
                t,
                "errors: {} (connect {}, handshake {}, timeout {}, protocol {}, server closed {}, disconnected {}, tls {}, process {}); {} clean closes",
                e.total, e.connect, e.handshake, e.timeout, e.protocol, e.server_closed, e.disconnected, e.tls, e.process, self.clean_closes
            );
        }
        if let Some(first) = &self.first_error {
            let _ = writeln!(t, "first error: {first}");
        }
        t
    }
}

/// Microseconds, shown in the unit that keeps them readable.
fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.1} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            mode: "echo",
            url: "ws://127.0.0.1:1/echo".into(),
            processes: 1,
            threads: 1,
            connections: 10,
            opened: 10,
            warmup_secs: 1.0,
            duration_secs: 5.0,
            sent_total: 100,
            received_total: 100,
            sent: 50,
            received: 50,
            completed: 0,
            rate_per_sec: 10.0,
            bytes_per_sec: 640.0,
            clean_closes: 10,
            errors: Errors::default(),
            first_error: Some("x".into()),
            latency_us: Some(Latency {
                count: 50,
                min: 1.0,
                mean: 2.0,
                p50: 2.0,
                p90: 3.0,
                p99: 4.0,
                p999: 5.0,
                max: 6.0,
            }),
            server: Some(ServerFigures {
                pid: 1,
                cpu_secs: 0.5,
                user_secs: 0.125,
                sys_secs: 0.375,
                rss_before_kib: 1,
                rss_after_kib: 2,
                rss_per_connection_bytes: Some(102.4),
                anon_before_kib: 1,
                anon_after_kib: 2,
                anon_per_connection_bytes: Some(102.4),
                primed: 0,
                rss_cold_kib: None,
                rss_cold_per_connection_bytes: None,
                cpu_us_per_message: Some(1.0),
                messages_per_cpu_sec: Some(1.0),
                cpu_us_per_connection: Some(1.0),
            }),
            child: None,
        }
    }

    /// Every key of the JSON, nested ones as `outer.inner`.
    fn keys(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let name = format!("{prefix}{k}");
                keys(v, &format!("{name}."), out);
                out.push(name);
            }
        }
    }

    /// The documented field names: the first word of each indented line that starts with a
    /// lower-case name.
    fn documented() -> Vec<String> {
        JSON_FIELDS
            .lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_json_field_is_documented_and_every_documented_field_exists() {
        let json = serde_json::to_value(sample()).unwrap();
        let mut got = Vec::new();
        keys(&json, "", &mut got);
        got.sort();
        let mut doc = documented();
        doc.sort();
        assert_eq!(got, doc);
    }

    #[test]
    fn text_names_the_figures() {
        let text = sample().to_text();
        for needle in [
            "messages per CPU-s",
            "p99",
            "102 bytes per connection",
            "errors: none",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
    }
}
