//! Counters the reactor keeps, and their rendering in the Prometheus text format (SPEC §9).
//!
//! Owns: plain `u64` counters (the reactor is single-threaded, so no atomics are needed) and the
//! text exposition format, version 0.0.4.
//! Does not: gauges that can be derived from the connection slab (the reactor passes those in at
//! render time) or any I/O. TLS counters live with the listener's TLS (`tls::TlsStats`); only
//! their rendering is here (`render_tls`).
//!
//! Counting costs an integer add on the hot path; nothing is formatted until /metrics is asked for.

use crate::tls::{Failure, ServerTls};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: u64,
    /// Connections refused before or at the handshake, by reason ("max_connections", ...).
    pub rejected: BTreeMap<&'static str, u64>,
    /// HTTP responses other than 101, by status.
    pub http_responses: BTreeMap<u16, u64>,
    pub upgrades: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Close frames we sent, by code.
    pub closes_sent: BTreeMap<u16, u64>,
    /// Close frames the peers sent, by code (1005 when the frame carried no code).
    pub closes_received: BTreeMap<u16, u64>,
    /// Protocol violations, by the short reason of `ProtocolError`.
    pub protocol_errors: BTreeMap<&'static str, u64>,
    /// Connections that ended without a close handshake (EOF, reset, I/O error).
    pub abnormal_closes: u64,
    pub handshake_timeouts: u64,
    pub close_timeouts: u64,
    pub pings_sent: u64,
    pub half_open_drops: u64,
    pub slow_consumer_closes: u64,
    pub slow_consumer_drops: u64,
    pub timer_expiries: u64,
    pub loop_iterations: u64,
    pub poll_wakeups: u64,
    pub poll_events: u64,
    pub poll_wait: Duration,
    pub accept_pauses: u64,
    /// Times a kept-alive HTTP connection stopped being read: it pipelined more than the
    /// server buffers while an answer was pending (`http::MAX_PIPELINED_BYTES`).
    pub http_read_pauses: u64,
    /// Socket reads ended by a short read instead of a `WouldBlock` (edge-triggered epoll only,
    /// `Poller::short_read_drains`).
    pub reads_stopped_short: u64,
    /// Times a kept-alive HTTP connection stopped being served and read: its unsent answers
    /// reached the bound (`http::MAX_QUEUED_ANSWER_BYTES`), the client not reading them.
    pub http_output_pauses: u64,
}

/// Values derived at render time rather than counted.
pub struct Gauges<'a> {
    pub poller: &'a str,
    /// (state name, number of connections in it).
    pub connections: &'a [(&'static str, usize)],
    /// Bytes queued on connections still reading requests (kept-alive API connections).
    pub http_queued_bytes: usize,
}

impl Metrics {
    pub fn bump(map: &mut BTreeMap<&'static str, u64>, key: &'static str) {
        *map.entry(key).or_insert(0) += 1;
    }

    pub fn bump_code(map: &mut BTreeMap<u16, u64>, code: u16) {
        *map.entry(code).or_insert(0) += 1;
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self, gauges: &Gauges<'_>) -> String {
        let mut out = String::with_capacity(4096);
        let mut w = Writer::new(&mut out);

        w.family("wsrelay_poller_info", "gauge", "Readiness backend in use.");
        w.sample("wsrelay_poller_info", &[("poller", gauges.poller)], 1);

        w.family(
            "wsrelay_connections",
            "gauge",
            "Open TCP connections by state.",
        );
        for (state, n) in gauges.connections {
            w.sample("wsrelay_connections", &[("state", state)], *n);
        }

        w.counter(
            "wsrelay_accepted_total",
            "TCP connections accepted.",
            self.accepted,
        );
        w.family(
            "wsrelay_rejected_total",
            "counter",
            "Connections refused, by reason.",
        );
        for (reason, n) in &self.rejected {
            w.sample("wsrelay_rejected_total", &[("reason", reason)], *n);
        }
        w.counter(
            "wsrelay_upgrades_total",
            "Successful WebSocket upgrades.",
            self.upgrades,
        );
        w.family(
            "wsrelay_http_responses_total",
            "counter",
            "HTTP responses other than 101, by status.",
        );
        for (status, n) in &self.http_responses {
            w.sample(
                "wsrelay_http_responses_total",
                &[("status", &status.to_string())],
                *n,
            );
        }
        w.counter(
            "wsrelay_messages_in_total",
            "WebSocket data messages received.",
            self.messages_in,
        );
        w.counter(
            "wsrelay_messages_out_total",
            "WebSocket data messages queued for sending.",
            self.messages_out,
        );
        w.counter(
            "wsrelay_bytes_in_total",
            "Bytes read from sockets.",
            self.bytes_in,
        );
        w.counter(
            "wsrelay_bytes_out_total",
            "Bytes written to sockets.",
            self.bytes_out,
        );
        w.family(
            "wsrelay_closes_sent_total",
            "counter",
            "Close frames sent, by code.",
        );
        for (code, n) in &self.closes_sent {
            w.sample(
                "wsrelay_closes_sent_total",
                &[("code", &code.to_string())],
                *n,
            );
        }
        w.family(
            "wsrelay_closes_received_total",
            "counter",
            "Close frames received, by code.",
        );
        for (code, n) in &self.closes_received {
            w.sample(
                "wsrelay_closes_received_total",
                &[("code", &code.to_string())],
                *n,
            );
        }
        w.family(
            "wsrelay_protocol_errors_total",
            "counter",
            "Protocol violations by peers, by kind.",
        );
        for (reason, n) in &self.protocol_errors {
            w.sample("wsrelay_protocol_errors_total", &[("reason", reason)], *n);
        }
        w.counter(
            "wsrelay_abnormal_closes_total",
            "Connections ended without a close handshake.",
            self.abnormal_closes,
        );
        w.counter(
            "wsrelay_handshake_timeouts_total",
            "Connections closed at the handshake deadline.",
            self.handshake_timeouts,
        );
        w.counter(
            "wsrelay_close_timeouts_total",
            "Close handshakes that timed out.",
            self.close_timeouts,
        );
        w.counter(
            "wsrelay_pings_sent_total",
            "Heartbeat pings sent.",
            self.pings_sent,
        );
        w.counter(
            "wsrelay_half_open_drops_total",
            "Connections dropped for not answering a heartbeat.",
            self.half_open_drops,
        );
        w.counter(
            "wsrelay_slow_consumer_closes_total",
            "Connections closed (1008) for exceeding --max-outbound.",
            self.slow_consumer_closes,
        );
        w.counter(
            "wsrelay_slow_consumer_drops_total",
            "Messages dropped for a consumer over --max-outbound (policy drop).",
            self.slow_consumer_drops,
        );
        w.counter(
            "wsrelay_timer_expiries_total",
            "Timers that fired.",
            self.timer_expiries,
        );
        w.counter(
            "wsrelay_accept_pauses_total",
            "Times the listener paused on descriptor exhaustion.",
            self.accept_pauses,
        );
        w.counter(
            "wsrelay_http_read_pauses_total",
            "Times an HTTP connection was not read while its pipelined requests waited for an answer.",
            self.http_read_pauses,
        );
        w.counter(
            "wsrelay_http_output_pauses_total",
            "Times an HTTP connection was not served or read while its unsent answers were at the bound.",
            self.http_output_pauses,
        );
        w.family(
            "wsrelay_http_queued_bytes",
            "gauge",
            "Bytes of HTTP answers queued on connections that read requests, not yet sent.",
        );
        w.sample("wsrelay_http_queued_bytes", &[], gauges.http_queued_bytes);
        w.counter(
            "wsrelay_loop_iterations_total",
            "Event loop iterations.",
            self.loop_iterations,
        );
        w.counter(
            "wsrelay_poll_wakeups_total",
            "Returns from the poller's wait call.",
            self.poll_wakeups,
        );
        w.counter(
            "wsrelay_reads_stopped_short_total",
            "Reads of a socket ended by a short read, without the read that returns EAGAIN (edge-triggered epoll).",
            self.reads_stopped_short,
        );
        w.counter(
            "wsrelay_poll_events_total",
            "Readiness events reported by the poller.",
            self.poll_events,
        );
        w.family(
            "wsrelay_poll_wait_seconds_total",
            "counter",
            "Time spent inside the poller's wait call.",
        );
        w.sample(
            "wsrelay_poll_wait_seconds_total",
            &[],
            self.poll_wait.as_secs_f64(),
        );
        out
    }
}

/// Writes the Prometheus text format (exposition format 0.0.4): `# HELP` and `# TYPE` lines
/// per family, then `name{label="value"} number` samples. Shared by the reactor's metrics and
/// the app's (`app/metrics.rs`), so the format lives in one place.
pub struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    pub fn new(out: &mut String) -> Writer<'_> {
        Writer { out }
    }

    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                // Label values here are our own identifiers; escape anyway, as the format asks.
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Renders the TLS families (SPEC §18) of a listener that speaks TLS: handshakes completed by
/// version, failures by reason (before and after the handshake), reloads, and the served
/// certificate's expiry as a gauge to alert on. Every version and reason is rendered, zeros
/// included, so that a dashboard or alert finds its series before the first event.
pub fn render_tls(out: &mut String, tls: &ServerTls) {
    let stats = &tls.stats;
    let mut w = Writer::new(out);
    w.family(
        "wsrelay_tls_handshakes_total",
        "counter",
        "TLS handshakes completed, by protocol version.",
    );
    for version in ["TLSv1.2", "TLSv1.3"] {
        let n = stats.handshakes.get(version).copied().unwrap_or(0);
        w.sample("wsrelay_tls_handshakes_total", &[("version", version)], n);
    }
    for (name, help, counts) in [
        (
            "wsrelay_tls_handshake_failures_total",
            "TLS sessions that failed before the handshake completed, by reason.",
            &stats.handshake_failures,
        ),
        (
            "wsrelay_tls_session_failures_total",
            "TLS sessions that failed after the handshake, by reason.",
            &stats.session_failures,
        ),
    ] {
        w.family(name, "counter", help);
        for failure in Failure::ALL {
            let n = counts.get(&failure).copied().unwrap_or(0);
            w.sample(name, &[("reason", failure.reason())], n);
        }
    }
    w.family(
        "wsrelay_tls_reloads_total",
        "counter",
        "Certificate reloads (SIGHUP), by result; a failed one keeps the previous pair.",
    );
    w.sample(
        "wsrelay_tls_reloads_total",
        &[("result", "ok")],
        stats.reloads_ok,
    );
    w.sample(
        "wsrelay_tls_reloads_total",
        &[("result", "failed")],
        stats.reloads_failed,
    );
    w.gauge(
        "wsrelay_tls_certificate_not_after_seconds",
        "When the served certificate expires, in seconds since the Unix epoch.",
        tls.not_after_unix(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_and_labels() {
        let mut m = Metrics {
            accepted: 3,
            ..Metrics::default()
        };
        Metrics::bump_code(&mut m.closes_sent, 1002);
        Metrics::bump(&mut m.rejected, "max_connections");
        let text = m.render(&Gauges {
            poller: "epoll",
            connections: &[("open", 2)],
            http_queued_bytes: 0,
        });
        assert!(text.contains("# TYPE wsrelay_accepted_total counter\nwsrelay_accepted_total 3\n"));
        assert!(text.contains("wsrelay_closes_sent_total{code=\"1002\"} 1\n"));
        assert!(text.contains("wsrelay_rejected_total{reason=\"max_connections\"} 1\n"));
        assert!(text.contains("wsrelay_connections{state=\"open\"} 2\n"));
        assert!(text.contains("wsrelay_poller_info{poller=\"epoll\"} 1\n"));
        // Every non-comment line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn renders_tls_families_with_every_series() {
        use crate::tls::test_ca::TestCa;
        use crate::tls::Handshake;
        let ca = TestCa::new();
        let files = ca.files();
        let mut tls = ServerTls::load(&files.cert, &files.key).unwrap();
        tls.stats.handshake_completed(&Handshake {
            version: "TLSv1.3",
            alpn: None,
        });
        tls.stats.failed(Failure::PlainHttp, true);
        tls.stats.failed(Failure::Renegotiation, false);
        tls.stats.reloads_failed = 2;
        let mut text = String::new();
        render_tls(&mut text, &tls);
        for line in [
            "wsrelay_tls_handshakes_total{version=\"TLSv1.3\"} 1\n",
            "wsrelay_tls_handshakes_total{version=\"TLSv1.2\"} 0\n",
            "wsrelay_tls_handshake_failures_total{reason=\"plain_http\"} 1\n",
            "wsrelay_tls_handshake_failures_total{reason=\"timeout\"} 0\n",
            "wsrelay_tls_session_failures_total{reason=\"renegotiation\"} 1\n",
            "wsrelay_tls_reloads_total{result=\"failed\"} 2\n",
            "wsrelay_tls_reloads_total{result=\"ok\"} 0\n",
            "# TYPE wsrelay_tls_certificate_not_after_seconds gauge\n\
             wsrelay_tls_certificate_not_after_seconds 1925078400\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for reason in Failure::ALL.map(Failure::reason) {
            let series = format!("wsrelay_tls_handshake_failures_total{{reason=\"{reason}\"}}");
            assert!(text.contains(&series), "{series}");
        }
    }
}
