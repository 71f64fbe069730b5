//! The counters compression adds to /metrics, and their Prometheus text.
//!
//! Owns: `CompressionMetrics`, plain `u64` counters for one reactor (single-threaded, so no
//! atomics), and their rendering in the text exposition format 0.0.4.
//! Does not: count anything itself (the reactor bumps the fields where it compresses, sends and
//! inflates) or serve /metrics.
//!
//! SPEC §9, §17. Counting is an integer add; nothing is formatted until /metrics is asked for.

use std::fmt::Write;

/// Compression counters of one reactor. "Compressions" and "messages out" differ on purpose: a
/// room message is compressed once and sent to many members, and the difference shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressionMetrics {
    /// Times a message was run through a compressor.
    pub compressions: u64,
    /// Bytes given to the compressor.
    pub bytes_before_compression: u64,
    /// Bytes it produced (payload, without the `00 00 ff ff` tail).
    pub bytes_after_compression: u64,
    /// Compressions zlib failed; those messages went out uncompressed.
    pub compress_failures: u64,
    /// Messages queued to a connection with RSV1 set (one per recipient).
    pub messages_out: u64,
    /// Messages to a connection that negotiated compression, sent uncompressed because they
    /// were shorter than `--compression-min`.
    pub messages_out_small: u64,
    /// Compressed messages received and inflated.
    pub messages_in: u64,
    /// Their compressed payload bytes, as received.
    pub bytes_in_compressed: u64,
    /// What they inflated to.
    pub bytes_in_inflated: u64,
    /// Compressed messages that failed: invalid data (1007) or over `--max-message` (1009).
    pub inflate_errors: u64,
}

impl CompressionMetrics {
    /// Bytes before compression per byte after, over every compression so far; `None` before
    /// the first one (a ratio of nothing is not 0).
    pub fn ratio(&self) -> Option<f64> {
        (self.bytes_after_compression > 0)
            .then(|| self.bytes_before_compression as f64 / self.bytes_after_compression as f64)
    }

    /// Appends every metric, in the Prometheus text format, to `out`.
    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, u64); 10] = [
            (
                "wsrelay_compressions_total",
                "Messages run through a compressor (a room message counts once per reactor).",
                self.compressions,
            ),
            (
                "wsrelay_compression_bytes_before_total",
                "Bytes given to the compressor.",
                self.bytes_before_compression,
            ),
            (
                "wsrelay_compression_bytes_after_total",
                "Compressed bytes the compressor produced.",
                self.bytes_after_compression,
            ),
            (
                "wsrelay_compression_failures_total",
                "Compressions that failed; the message was sent uncompressed.",
                self.compress_failures,
            ),
            (
                "wsrelay_compressed_messages_out_total",
                "Messages sent compressed (RSV1), one per recipient.",
                self.messages_out,
            ),
            (
                "wsrelay_compression_small_messages_out_total",
                "Messages sent uncompressed to a compressing connection: below --compression-min.",
                self.messages_out_small,
            ),
            (
                "wsrelay_compressed_messages_in_total",
                "Compressed messages received.",
                self.messages_in,
            ),
            (
                "wsrelay_compressed_bytes_in_total",
                "Compressed payload bytes received.",
                self.bytes_in_compressed,
            ),
            (
                "wsrelay_inflated_bytes_in_total",
                "Bytes the received compressed messages inflated to.",
                self.bytes_in_inflated,
            ),
            (
                "wsrelay_inflate_errors_total",
                "Compressed messages refused: invalid data (1007) or too big once inflated (1009).",
                self.inflate_errors,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
        // A gauge that only exists once there is something to divide: absent, not 0, before.
        if let Some(ratio) = self.ratio() {
            let name = "wsrelay_compression_ratio";
            let _ = writeln!(
                out,
                "# HELP {name} Bytes before compression per byte after, since start."
            );
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {ratio:.3}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[test]
    fn every_counter_is_rendered_with_help_and_type() {
        let metrics = CompressionMetrics {
            compressions: 1,
            bytes_before_compression: 2,
            bytes_after_compression: 3,
            compress_failures: 4,
            messages_out: 5,
            messages_out_small: 6,
            messages_in: 7,
            bytes_in_compressed: 8,
            bytes_in_inflated: 9,
            inflate_errors: 10,
        };
        let mut text = String::new();
        metrics.render(&mut text);
        let names = [
            "wsrelay_compressions_total",
            "wsrelay_compression_bytes_before_total",
            "wsrelay_compression_bytes_after_total",
            "wsrelay_compression_failures_total",
            "wsrelay_compressed_messages_out_total",
            "wsrelay_compression_small_messages_out_total",
            "wsrelay_compressed_messages_in_total",
            "wsrelay_compressed_bytes_in_total",
            "wsrelay_inflated_bytes_in_total",
            "wsrelay_inflate_errors_total",
        ];
        for (i, name) in names.iter().enumerate() {
            assert_eq!(value(&text, name), Some((i + 1).to_string()), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
        }
        assert_eq!(
            value(&text, "wsrelay_compression_ratio").as_deref(),
            Some("0.667")
        );
    }

    #[test]
    fn no_ratio_before_the_first_compression() {
        let mut text = String::new();
        CompressionMetrics::default().render(&mut text);
        assert_eq!(CompressionMetrics::default().ratio(), None);
        assert_eq!(value(&text, "wsrelay_compression_ratio"), None);
        assert_eq!(
            value(&text, "wsrelay_compressions_total").as_deref(),
            Some("0")
        );
    }
}
