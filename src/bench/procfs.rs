//! What the load generator learns about the server process from Linux's /proc: CPU time used
//! and resident memory.
//!
//! Owns: parsing `/proc/PID/stat` (utime + stime) and `/proc/PID/status` (VmRSS, RssAnon), and
//! reading both at once as a `Sample`.
//! Does not: decide when to sample (`coordinator.rs` and `multi.rs` sample at the edges of
//! the measured window) or compute per-message figures (`stats.rs`).
//!
//! SPEC §11 (`--server-pid`); proc(5).

use std::io;

/// The unit of utime and stime in /proc/PID/stat. The kernel reports them in USER_HZ, an ABI
/// constant of 100 on every architecture Linux runs on today (alpha, which used 1024, is
/// gone); reading sysconf(_SC_CLK_TCK) would need `unsafe` outside `poller/`.
pub const USER_HZ: u64 = 100;

/// One reading of the server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time so far, in clock ticks of `USER_HZ`.
    pub cpu_ticks: u64,
    /// The user-space part of `cpu_ticks` (utime); the rest is the kernel's (stime).
    pub user_ticks: u64,
    /// Resident set size, in KiB.
    pub rss_kib: u64,
    /// The anonymous part of `rss_kib` (heap and private mappings), in KiB: memory the process
    /// allocated. The rest is mostly pages of its executable and libraries, read from their
    /// files the first time code in them runs, and paid once however many connections there
    /// are (docs/benchmarks.md, "What an idle connection costs, and what RSS also counts").
    pub anon_kib: u64,
}

impl Sample {
    /// CPU seconds between an earlier sample and this one.
    pub fn cpu_secs_since(&self, earlier: &Sample) -> f64 {
        self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / USER_HZ as f64
    }

    /// User-space CPU seconds between an earlier sample and this one (the rest of
    /// `cpu_secs_since` is system time: the kernel working for the process).
    pub fn user_secs_since(&self, earlier: &Sample) -> f64 {
        self.user_ticks.saturating_sub(earlier.user_ticks) as f64 / USER_HZ as f64
    }
}

/// Reads the CPU time and RSS of process `pid`.
///
/// # Errors
/// The process does not exist (or is not ours to read), or the files do not have the expected
/// shape (not Linux).
pub fn sample(pid: u32) -> io::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let malformed =
        |what| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/{what}"));
    let (user_ticks, sys_ticks) = parse_user_sys_ticks(&stat).ok_or_else(|| malformed("stat"))?;
    Ok(Sample {
        cpu_ticks: user_ticks.saturating_add(sys_ticks),
        user_ticks,
        rss_kib: parse_vm_rss_kib(&status).ok_or_else(|| malformed("status"))?,
        anon_kib: parse_status_kib(&status, "RssAnon:").ok_or_else(|| malformed("status"))?,
    })
}

/// utime + stime (fields 14 and 15 of proc(5)) from the text of /proc/PID/stat.
///
/// Field 2, the command name, is in parentheses and may itself contain spaces and ')', so the
/// fields are counted from the last ')': after it come field 3 (state), then 4, 5, ...
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (utime, stime) = parse_user_sys_ticks(stat)?;
    utime.checked_add(stime)
}

/// utime and stime (fields 14 and 15 of proc(5)) apart, from the text of /proc/PID/stat.
pub fn parse_user_sys_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_ascii_whitespace();
    // Field 3 is the first after ')': utime (14) is 11 further, stime (15) right after it.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The VmRSS line of /proc/PID/status (`VmRSS: 12345 kB`, a tab after the colon), in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmRSS:")
}

/// The line of /proc/PID/status that starts with `key` (`VmRSS:`, `RssAnon:`; the value in
/// kB after a tab), in KiB. `None` if the line is missing or not in kB: a figure that cannot
/// be read is an error, never 0.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_ascii_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line with fields 3..=15 numbered by their own value, so utime = 14 and stime = 15.
    fn stat_line(comm: &str) -> String {
        format!("4242 ({comm}) S 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20")
    }

    #[test]
    fn cpu_ticks() {
        let cases: &[(&str, String, Option<u64>)] = &[
            ("plain", stat_line("wsrelay"), Some(29)),
            ("spaces in the name", stat_line("tokio echo"), Some(29)),
            ("parentheses in the name", stat_line("a) b (c"), Some(29)),
            (
                "truncated",
                "4242 (x) S 4 5 6 7 8 9 10 11 12 13 14".to_string(),
                None,
            ),
            (
                "not a number",
                "1 (x) S 4 5 6 7 8 9 10 11 12 13 u s".to_string(),
                None,
            ),
            ("no name", "garbage".to_string(), None),
        ];
        for (name, text, want) in cases {
            assert_eq!(parse_cpu_ticks(text), *want, "{name}");
            if want.is_some() {
                assert_eq!(parse_user_sys_ticks(text), Some((14, 15)), "{name}");
            }
        }
    }

    #[test]
    fn vm_rss() {
        let cases: &[(&str, &str, Option<u64>)] = &[
            (
                "status",
                "Name:\twsrelay\nVmPeak:\t  9000 kB\nVmRSS:\t    4321 kB\nThreads:\t1\n",
                Some(4321),
            ),
            (
                "no VmRSS (a kernel thread)",
                "Name:\tkthreadd\nThreads:\t1\n",
                None,
            ),
            ("unexpected unit", "VmRSS:\t 12 MB\n", None),
            ("no number", "VmRSS:\t kB\n", None),
        ];
        for &(name, text, want) in cases {
            assert_eq!(parse_vm_rss_kib(text), want, "{name}");
        }
    }

    #[test]
    fn rss_anon() {
        let status = "VmRSS:	    4321 kB
RssAnon:	    1200 kB
RssFile:	    3121 kB
";
        assert_eq!(parse_status_kib(status, "RssAnon:"), Some(1200));
        assert_eq!(parse_status_kib(status, "RssFile:"), Some(3121));
        assert_eq!(
            parse_status_kib(
                "VmRSS:	 12 kB
",
                "RssAnon:"
            ),
            None
        );
    }

    #[test]
    fn cpu_seconds_between_samples() {
        let a = Sample {
            cpu_ticks: 100,
            user_ticks: 40,
            rss_kib: 0,
            anon_kib: 0,
        };
        let b = Sample {
            cpu_ticks: 350,
            user_ticks: 90,
            rss_kib: 0,
            anon_kib: 0,
        };
        assert_eq!(b.cpu_secs_since(&a), 2.5);
        assert_eq!(b.user_secs_since(&a), 0.5);
        assert_eq!(a.cpu_secs_since(&b), 0.0);
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id()).expect("our own /proc entry");
        assert!(s.rss_kib > 0);
        assert!(s.anon_kib > 0 && s.anon_kib <= s.rss_kib, "{s:?}");
    }
}
