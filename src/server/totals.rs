//! Process totals from the figures of several workers (`--workers N`, SPEC §14): the Prometheus
//! text of every worker merged into one, and the fields of /stats.json likewise.
//!
//! Owns: the merge itself (pure: texts in, one text out) and the table that says, per family,
//! how a process figure is made of the workers' (`RULES`).
//! Does not: gather the figures (the reactor asks the other workers over their queues,
//! `scrape.rs`), render the per-worker gauges (`workers.rs`), or know what a family counts.
//!
//! # Sum, or the same on every worker
//!
//! A counter counts work, and the work of the process is the work of its workers: counters
//! sum, per label set, and so do histograms (each bucket, `_sum` and `_count`: a histogram of
//! the process is the sum of the workers' histograms, bucket by bucket). Most gauges are a
//! worker's share of the process's state (its connections, its rooms, its queued bytes) and sum
//! too. Some are not shares but facts about the process that every worker states alike: the
//! poller in use, a configured limit, the certificate served. Summed, they would read N times
//! too high, so they are listed as `Same` and the answering worker's value is given. Every gauge
//! a multi-worker server renders is listed in `RULES` with its decision (the integration test
//! `workers::every_gauge_has_a_merge_rule` fails on one that is not), so a new gauge cannot be
//! summed by accident; one left unlisted sums. A few are neither: a state the process is in
//! only if every worker is (`Min`: the file engine's writes work) or a time the workers spent
//! side by side (`Max`: reading their logs at start-up). docs/operations.md ("Workers") has
//! the table with the reasons.

use std::collections::HashMap;
use std::fmt::{self, Write};

/// How the workers' values of one family make the process's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Added up, per label set: work done, or a share of the process's state.
    Sum,
    /// The same fact on every worker: the answering worker's value, as it stated it.
    Same,
    /// The smallest value: a 0/1 state that holds for the process only if it holds on every
    /// worker.
    Min,
    /// The largest value: a duration the workers spent at once, each on its own part.
    Max,
}

/// Every gauge family (and the one counter) that a worker renders, and how it merges. Counters
/// and histograms not listed sum.
pub const RULES: &[(&str, Merge)] = &[
    // The reactor: each worker's own connections and buffers.
    ("wsrelay_connections", Merge::Sum),
    ("wsrelay_http_queued_bytes", Merge::Sum),
    // The hub: each worker's rooms, ids and what its engine holds. A raw room with members on
    // two workers is a room on each, and counts twice in `wsrelay_rooms` (docs/operations.md).
    ("wsrelay_rooms", Merge::Sum),
    ("wsrelay_room_members", Merge::Sum),
    // With the engine bus each worker counts the ids online anywhere whose inbox is homed at it
    // (`Engine::ids_online`): an id connected on two workers is one share, counted once.
    ("wsrelay_ids_online", Merge::Sum),
    ("wsrelay_offline_pending", Merge::Sum),
    ("wsrelay_retained_messages", Merge::Sum),
    ("wsrelay_retained_bytes", Merge::Sum),
    ("wsrelay_store_in_flight_bytes", Merge::Sum),
    ("wsrelay_dedup_records", Merge::Sum),
    ("wsrelay_dedup_bytes", Merge::Sum),
    ("wsrelay_token_connections", Merge::Sum),
    ("wsrelay_engine_streams", Merge::Sum),
    ("wsrelay_engine_messages", Merge::Sum),
    ("wsrelay_engine_bytes", Merge::Sum),
    ("wsrelay_engine_pending_messages", Merge::Sum),
    ("wsrelay_engine_in_flight", Merge::Sum),
    ("wsrelay_room_history_rooms", Merge::Sum),
    ("wsrelay_room_history_messages", Merge::Sum),
    ("wsrelay_room_history_bytes", Merge::Sum),
    // The workers' engine bus (`/ws`): each worker states its own queue, by its own label.
    ("wsrelay_engine_bus_depth", Merge::Sum),
    ("wsrelay_engine_bus_held", Merge::Sum),
    // Direct messages each home holds back until deliveries are reported: its own share.
    ("wsrelay_engine_bus_parked", Merge::Sum),
    // Members of the rooms homed at each worker: every envelope room member once.
    ("wsrelay_engine_bus_presence_members", Merge::Sum),
    // The file engine with workers (`--data-dir`): a log per worker, each its share.
    ("wsrelay_engine_disk_bytes", Merge::Sum),
    ("wsrelay_engine_segments", Merge::Sum),
    ("wsrelay_engine_startup_records", Merge::Sum),
    ("wsrelay_engine_torn_tail_bytes", Merge::Sum),
    ("wsrelay_engine_fsync_policy", Merge::Same),
    // Writes work for the process only if they work on every worker's log.
    ("wsrelay_engine_store_ok", Merge::Min),
    // The workers read their logs at the same time: the start-up took the longest.
    ("wsrelay_engine_startup_seconds", Merge::Max),
    // Facts about the process, stated alike by every worker.
    ("wsrelay_poller_info", Merge::Same),
    ("wsrelay_engine_info", Merge::Same),
    ("wsrelay_room_history_limit", Merge::Same),
    ("wsrelay_tls_certificate_not_after_seconds", Merge::Same),
    // A counter that is not work shared out: one SIGHUP makes every worker reload its own copy
    // of the pair, so each worker's count is the process's.
    ("wsrelay_tls_reloads_total", Merge::Same),
];

/// Fields of /stats.json that are facts about the process rather than shares of it. The others
/// (connections, messages, rooms, ...) sum.
pub const STATS_SAME: &[&str] = &["uptime_ms", "auth_required"];

/// How `family` merges (`RULES`; a family not listed sums).
pub fn rule(family: &str) -> Merge {
    RULES
        .iter()
        .find(|(name, _)| *name == family)
        .map_or(Merge::Sum, |(_, merge)| *merge)
}

/// Whether `family` has a decision in `RULES`.
pub fn listed(family: &str) -> bool {
    RULES.iter().any(|(name, _)| *name == family)
}

/// A sample's value: counts stay integers (printed without a fraction), seconds are floats.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    fn parse(text: &str) -> Option<Value> {
        text.parse::<u64>()
            .map(Value::Int)
            .ok()
            .or_else(|| text.parse::<f64>().ok().map(Value::Float))
    }

    fn add(self, other: Value) -> Value {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a
                .checked_add(b)
                .map_or(Value::Float(a as f64 + b as f64), Value::Int),
            (a, b) => Value::Float(a.as_f64() + b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Value::Int(n) => n as f64,
            Value::Float(x) => x,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

/// One family as merged so far: its comment lines and its samples in the order first seen.
#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    merge: Option<Merge>,
    /// (series: the name with its labels, as printed; value).
    samples: Vec<(String, Value)>,
    /// Index into `samples` by series.
    index: HashMap<String, usize>,
}

/// Merges the Prometheus texts of several workers into the process's: the first text is the
/// answering worker's (its order of families and samples is kept; what only others print
/// follows). Lines that are not comments or samples of our renderers are left out.
pub fn merge_metrics<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut families: Vec<(String, Family)> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut family_of = |name: &str, families: &mut Vec<(String, Family)>| -> usize {
        *by_name.entry(name.to_string()).or_insert_with(|| {
            families.push((name.to_string(), Family::default()));
            families.len() - 1
        })
    };
    for text in texts {
        // Samples belong to the family of the last `# TYPE` (a histogram's `_bucket`, `_sum`
        // and `_count` series included).
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                let i = family_of(name, &mut families);
                families[i].1.help.get_or_insert_with(|| help.to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
                let i = family_of(name, &mut families);
                let family = &mut families[i].1;
                family.kind.get_or_insert_with(|| kind.to_string());
                family.merge.get_or_insert(rule(name));
                current = Some(i);
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Some(value) = Value::parse(value) else {
                continue;
            };
            let i = match current {
                Some(i) => i,
                // A sample without a `# TYPE` before it (none of ours): its own family.
                None => family_of(
                    &series[..series.find('{').unwrap_or(series.len())],
                    &mut families,
                ),
            };
            let family = &mut families[i].1;
            let merge = family.merge.unwrap_or(Merge::Sum);
            match family.index.get(series) {
                Some(&at) => {
                    let old = family.samples[at].1;
                    family.samples[at].1 = match merge {
                        Merge::Sum => old.add(value),
                        Merge::Same => old,
                        Merge::Min if value.as_f64() < old.as_f64() => value,
                        Merge::Max if value.as_f64() > old.as_f64() => value,
                        Merge::Min | Merge::Max => old,
                    };
                }
                None => {
                    family
                        .index
                        .insert(series.to_string(), family.samples.len());
                    family.samples.push((series.to_string(), value));
                }
            }
        }
    }
    let mut out = String::with_capacity(8192);
    for (name, family) in &families {
        if let Some(help) = &family.help {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        if let Some(kind) = &family.kind {
            let _ = writeln!(out, "# TYPE {name} {kind}");
        }
        for (series, value) in &family.samples {
            let _ = writeln!(out, "{series} {value}");
        }
    }
    out
}

/// Merges the /stats.json fields of several workers (the answering worker's first, whose
/// order is kept): `STATS_SAME` fields are the answering worker's, the others sum.
pub fn merge_stats(parts: &[Vec<(&'static str, u64)>]) -> Vec<(&'static str, u64)> {
    let mut merged: Vec<(&'static str, u64)> = Vec::new();
    for part in parts {
        for &(name, value) in part {
            match merged.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) if !STATS_SAME.contains(&name) => {
                    *total = total.saturating_add(value)
                }
                Some(_) => {}
                None => merged.push((name, value)),
            }
        }
    }
    merged
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const WORKER_0: &str = "\
# HELP wsrelay_poller_info Readiness backend in use.
# TYPE wsrelay_poller_info gauge
wsrelay_poller_info{poller=\"epoll\"} 1
# HELP wsrelay_connections Open TCP connections by state.
# TYPE wsrelay_connections gauge
wsrelay_connections{state=\"open\"} 3
wsrelay_connections{state=\"http\"} 1
# HELP wsrelay_messages_in_total WebSocket data messages received.
# TYPE wsrelay_messages_in_total counter
wsrelay_messages_in_total 10
# HELP wsrelay_closes_sent_total Close frames sent, by code.
# TYPE wsrelay_closes_sent_total counter
wsrelay_closes_sent_total{code=\"1000\"} 2
# HELP wsrelay_poll_wait_seconds_total Time spent inside the poller's wait call.
# TYPE wsrelay_poll_wait_seconds_total counter
wsrelay_poll_wait_seconds_total 1.5
# HELP wsrelay_room_history_limit Configured.
# TYPE wsrelay_room_history_limit gauge
wsrelay_room_history_limit 100
# HELP wsrelay_fsync_seconds Fsync latency.
# TYPE wsrelay_fsync_seconds histogram
wsrelay_fsync_seconds_bucket{le=\"0.001\"} 1
wsrelay_fsync_seconds_bucket{le=\"+Inf\"} 2
wsrelay_fsync_seconds_sum 0.25
wsrelay_fsync_seconds_count 2
";

    const WORKER_1: &str = "\
# HELP wsrelay_poller_info Readiness backend in use.
# TYPE wsrelay_poller_info gauge
wsrelay_poller_info{poller=\"epoll\"} 1
# HELP wsrelay_connections Open TCP connections by state.
# TYPE wsrelay_connections gauge
wsrelay_connections{state=\"open\"} 4
wsrelay_connections{state=\"http\"} 0
# HELP wsrelay_messages_in_total WebSocket data messages received.
# TYPE wsrelay_messages_in_total counter
wsrelay_messages_in_total 32
# HELP wsrelay_closes_sent_total Close frames sent, by code.
# TYPE wsrelay_closes_sent_total counter
wsrelay_closes_sent_total{code=\"1000\"} 1
wsrelay_closes_sent_total{code=\"1008\"} 5
# HELP wsrelay_poll_wait_seconds_total Time spent inside the poller's wait call.
# TYPE wsrelay_poll_wait_seconds_total counter
wsrelay_poll_wait_seconds_total 0.25
# HELP wsrelay_room_history_limit Configured.
# TYPE wsrelay_room_history_limit gauge
wsrelay_room_history_limit 100
# HELP wsrelay_fsync_seconds Fsync latency.
# TYPE wsrelay_fsync_seconds histogram
wsrelay_fsync_seconds_bucket{le=\"0.001\"} 0
wsrelay_fsync_seconds_bucket{le=\"+Inf\"} 3
wsrelay_fsync_seconds_sum 1.5
wsrelay_fsync_seconds_count 3
";

    #[test]
    fn counters_histograms_and_shares_sum_facts_do_not() {
        let text = merge_metrics([WORKER_0, WORKER_1]);
        for line in [
            "wsrelay_poller_info{poller=\"epoll\"} 1\n",
            "wsrelay_connections{state=\"open\"} 7\n",
            "wsrelay_connections{state=\"http\"} 1\n",
            "wsrelay_messages_in_total 42\n",
            "wsrelay_closes_sent_total{code=\"1000\"} 3\n",
            // A label set only the second worker counted is there, once.
            "wsrelay_closes_sent_total{code=\"1008\"} 5\n",
            "wsrelay_poll_wait_seconds_total 1.75\n",
            "wsrelay_room_history_limit 100\n",
            "wsrelay_fsync_seconds_bucket{le=\"0.001\"} 1\n",
            "wsrelay_fsync_seconds_bucket{le=\"+Inf\"} 5\n",
            "wsrelay_fsync_seconds_sum 1.75\n",
            "wsrelay_fsync_seconds_count 5\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Each family once, its comments before its samples, in the first worker's order.
        assert_eq!(
            text.matches("# TYPE wsrelay_connections gauge\n").count(),
            1
        );
        assert_eq!(text.matches("# HELP wsrelay_connections ").count(), 1);
        let at = |needle: &str| text.find(needle).unwrap();
        assert!(at("# TYPE wsrelay_poller_info") < at("# TYPE wsrelay_connections"));
        assert!(at("# TYPE wsrelay_closes_sent_total") < at("wsrelay_closes_sent_total{"));
        assert!(
            at("wsrelay_closes_sent_total{code=\"1000\"}")
                < at("wsrelay_closes_sent_total{code=\"1008\"}")
        );
        assert_eq!(text.lines().count(), WORKER_0.lines().count() + 1);
    }

    #[test]
    fn a_state_of_every_worker_is_the_least_and_a_time_side_by_side_the_longest() {
        let worker = |ok: u8, secs: &str| {
            format!(
                "# TYPE wsrelay_engine_store_ok gauge\nwsrelay_engine_store_ok {ok}\n\
                 # TYPE wsrelay_engine_startup_seconds gauge\nwsrelay_engine_startup_seconds {secs}\n"
            )
        };
        let (w0, w1) = (worker(1, "0.5"), worker(0, "1.25"));
        for texts in [[&w0, &w1], [&w1, &w0]] {
            let text = merge_metrics(texts.map(String::as_str));
            assert!(text.contains("wsrelay_engine_store_ok 0\n"), "{text}");
            assert!(
                text.contains("wsrelay_engine_startup_seconds 1.25\n"),
                "{text}"
            );
        }
    }

    #[test]
    fn one_worker_merges_to_itself() {
        assert_eq!(merge_metrics([WORKER_0]), WORKER_0);
    }

    #[test]
    fn a_worker_with_a_label_set_the_answering_one_lacks_keeps_the_family_order() {
        // The answering worker prints no sample of the family yet; the other one does.
        let a = "# HELP wsrelay_x_total X.\n# TYPE wsrelay_x_total counter\n";
        let b = "# HELP wsrelay_x_total X.\n# TYPE wsrelay_x_total counter\nwsrelay_x_total{r=\"a\"} 2\n";
        assert_eq!(merge_metrics([a, b]), b);
    }

    #[test]
    fn integers_stay_integers_and_overflow_turns_to_float() {
        assert_eq!(Value::Int(2).add(Value::Int(3)), Value::Int(5));
        assert_eq!(Value::Int(1).add(Value::Float(0.5)), Value::Float(1.5));
        assert!(matches!(
            Value::Int(u64::MAX).add(Value::Int(1)),
            Value::Float(_)
        ));
        assert_eq!(Value::parse("7"), Some(Value::Int(7)));
        assert_eq!(Value::parse("0.5"), Some(Value::Float(0.5)));
        assert_eq!(Value::parse("x"), None);
        assert_eq!(Value::Float(2.0).to_string(), "2");
    }

    #[test]
    fn stats_sum_except_the_process_facts() {
        let a = vec![
            ("connections", 3),
            ("messages_in", 10),
            ("uptime_ms", 500),
            ("auth_required", 1),
        ];
        let b = vec![
            ("connections", 4),
            ("messages_in", 32),
            ("uptime_ms", 498),
            ("auth_required", 1),
            ("rooms", 2),
        ];
        assert_eq!(
            merge_stats(&[a, b]),
            vec![
                ("connections", 7),
                ("messages_in", 42),
                ("uptime_ms", 500),
                ("auth_required", 1),
                ("rooms", 2),
            ]
        );
    }

    #[test]
    fn the_table_names_each_family_once() {
        for (i, (name, _)) in RULES.iter().enumerate() {
            assert!(name.starts_with("wsrelay_"), "{name}");
            assert!(
                !RULES[i + 1..].iter().any(|(n, _)| n == name),
                "{name} twice"
            );
        }
        assert_eq!(rule("wsrelay_poller_info"), Merge::Same);
        assert_eq!(rule("wsrelay_messages_in_total"), Merge::Sum);
        assert!(!listed("wsrelay_messages_in_total"));
    }
}
