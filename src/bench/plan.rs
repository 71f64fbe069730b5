//! From flags to a plan: checks every flag and how the flags combine, then decides which thread
//! opens which connection, for a whole run or for one process's part of a `--processes` run.
//!
//! Owns: `plan` (flags in, a `Setup` of per-thread `Plan`s out, or the reason the run cannot
//! start), the dealing of connections to threads (round-robin; a broadcast room never split, its
//! senders witnessed inside the room), and how many processes `--processes` comes to.
//! Does not: open sockets, start threads or processes (`coordinator.rs`, `multi.rs`), or
//! resolve anything but the target address (`target.rs`). Everything here is checked before the
//! first connection, so a bad flag never sends a byte.
//!
//! SPEC §11; the load policy of this machine (loopback only unless `--allow-remote`, bounded
//! phases).

use super::client::TlsTarget;
use super::flags::{BroadcastArgs, CommonArgs, ConnectArgs, EchoArgs, IdleArgs, Mode, Processes};
use super::multi::Part;
use super::worker::{self, ConnPlan, Plan, Traffic};
use super::{client, stats, target};
use crate::protocol::client_handshake::WsUrl;
use crate::tls::{self, Trust};
use std::sync::Arc;
use std::time::Duration;

/// The longest any phase of a run may be (a bench is a bounded run, not a soak test).
const MAX_PHASE: Duration = Duration::from_secs(24 * 3600);

/// Descriptors a process needs besides its connections (stdio, pollers, wakers).
pub(super) const SPARE_FDS: u64 = 64;

/// The checked shape of a run (or of one process's part of it), before any socket exists.
#[derive(Debug)]
pub(super) struct Setup {
    pub(super) traffic: Traffic,
    /// Connections asked for (see `connections` in `JSON_FIELDS`).
    pub(super) connections: u64,
    /// Connect mode: the cycle budget; 0 otherwise.
    pub(super) cycles: u64,
    /// What `--processes` divides: connections (echo, idle), rooms (broadcast) or concurrent
    /// slots (connect).
    pub(super) units: usize,
    pub(super) plans: Vec<Plan>,
}

/// Checks the flags and decides which thread opens which connection, for the whole run or
/// for one process's part of it (`Part::share`: a consecutive run of connections, rooms or
/// slots, so global connection numbers, room names and source addresses stay what one process
/// would have used).
pub(super) fn plan(mode: &Mode, part: Part) -> Result<Setup, String> {
    let common = mode.common();
    let url = WsUrl::parse(&common.url).map_err(|e| format!("{}: {e}", common.url))?;
    let target = target::resolve(&url.host, url.port, common.allow_remote)?;
    let tls = tls_target(&url, common)?;
    check_phases(common)?;
    let max_threads = match common.threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let run = RunShape {
        url,
        sources: common.source_addrs.clone().map(|s| s.0).unwrap_or_default(),
        part,
        max_threads,
    };
    let shape = match mode {
        Mode::Echo(a) => echo(a, &run)?,
        Mode::Idle(a) => idle(a, &run)?,
        Mode::Broadcast(a) => broadcast(a, &run)?,
        Mode::Connect(a) => connect(a, &run)?,
    };

    // Each thread's share of --rate follows its share of the senders.
    let weight_total: f64 = shape.per_thread.iter().map(|t| t.weight).sum();
    let threads = shape.per_thread.len();
    let host = run.url.host_header();
    let plans = shape
        .per_thread
        .into_iter()
        .enumerate()
        .map(|(i, share)| Plan {
            traffic: shape.traffic,
            target,
            host: host.clone(),
            tls: tls.clone(),
            conns: share.conns,
            sources: run.sources.clone(),
            source_offset: shape.first + i,
            source_step: threads,
            connect_timeout: common.connect_timeout,
            warmup: common.warmup,
            duration: common.duration,
            window: shape.window,
            size: shape.size,
            rate: shape.rate.map(|r| r * share.weight / weight_total.max(1.0)),
            seed: fastrand::u64(..),
            compression: common.compression,
        })
        .collect();
    Ok(Setup {
        traffic: shape.traffic,
        connections: shape.connections,
        cycles: shape.cycles,
        units: shape.units,
        plans,
    })
}

/// What `wss://` needs on every connection: the client configuration from `--ca` or
/// `--insecure` (or the public roots), and the name the certificate must carry.
///
/// # Errors
/// `--ca`/`--insecure` with a `ws://` URL; a CA file that cannot be used; a host that is no
/// DNS name or IP address.
fn tls_target(url: &WsUrl, common: &CommonArgs) -> Result<Option<TlsTarget>, String> {
    if !url.secure {
        if common.ca.is_some() || common.insecure {
            return Err("--ca and --insecure apply to wss:// URLs only".into());
        }
        return Ok(None);
    }
    let trust = match (&common.ca, common.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => {
            // Once, not once per --processes child.
            if common.child.is_none() {
                eprintln!(
                    "wsrelay bench: warning: --insecure: the server's certificate is not checked"
                );
            }
            Trust::Insecure
        }
        (None, false) => Trust::PublicRoots,
    };
    let config = tls::config::client_config(&trust).map_err(|e| format!("--ca: {e}"))?;
    Ok(Some(TlsTarget {
        config: Arc::new(config),
        name: tls::config::server_name(&url.host)?,
    }))
}

/// A window of zero, or any phase beyond `MAX_PHASE`, is refused.
fn check_phases(common: &CommonArgs) -> Result<(), String> {
    if common.duration.is_zero() {
        return Err("--duration must be above zero".into());
    }
    for (flag, value) in [
        ("--duration", common.duration),
        ("--warmup", common.warmup),
        ("--connect-timeout", common.connect_timeout),
    ] {
        if value > MAX_PHASE {
            return Err(format!(
                "{flag} may be at most {}",
                humantime::format_duration(MAX_PHASE)
            ));
        }
    }
    Ok(())
}

fn check_rate(rate: Option<f64>) -> Result<(), String> {
    match rate {
        Some(r) if !(r > 0.0 && r.is_finite()) => Err("--rate must be a positive number".into()),
        _ => Ok(()),
    }
}

/// `min`: the bytes the mode's stamp takes at the start of each payload.
fn check_size(size: usize, min: usize) -> Result<(), String> {
    if size < min {
        Err(format!(
            "--size must be at least {min} (the send time rides in the payload)"
        ))
    } else if size > client::MAX_MESSAGE {
        Err(format!("--size must be at most {}", client::MAX_MESSAGE))
    } else {
        Ok(())
    }
}

/// What every mode's shaping needs from the common flags.
struct RunShape {
    url: WsUrl,
    /// `--source-addrs`, empty if not given.
    sources: Vec<std::net::IpAddr>,
    part: Part,
    max_threads: usize,
}

impl RunShape {
    /// The source address of connection `g` (numbered over the whole run).
    fn source_of(&self, g: usize) -> Option<std::net::IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[g % self.sources.len()])
    }

    /// This process's consecutive share of `units` (first, count), and of `rate` in proportion.
    fn share(
        &self,
        units: usize,
        rate: Option<f64>,
    ) -> Result<(usize, usize, Option<f64>), String> {
        let (first, count) = self.part.share(units);
        if count == 0 {
            return Err(format!("part {} of {units} is empty", self.part));
        }
        Ok((first, count, rate.map(|r| r * count as f64 / units as f64)))
    }
}

/// Echo: connections dealt round-robin, each keeping `--window` messages in flight.
fn echo(a: &EchoArgs, run: &RunShape) -> Result<Shape, String> {
    if a.connections == 0 || a.window == 0 {
        return Err("--connections and --window must be at least 1".into());
    }
    check_size(a.size, stats::STAMP_BYTES)?;
    check_rate(a.rate)?;
    let (first, count, rate) = run.share(a.connections, a.rate)?;
    let threads = run.max_threads.min(count);
    let per_thread = spread(count, threads, |k| ConnPlan {
        resource: run.url.resource.clone(),
        source: run.source_of(first + k),
        witness: None,
    });
    Ok(Shape {
        traffic: Traffic::Echo,
        connections: count as u64,
        cycles: 0,
        first,
        units: count,
        size: a.size,
        window: a.window,
        rate,
        per_thread,
    })
}

/// Idle: connections dealt round-robin, on the URL as given or each with an id of its own.
fn idle(a: &IdleArgs, run: &RunShape) -> Result<Shape, String> {
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let (first, count, _) = run.share(a.connections, None)?;
    let threads = run.max_threads.min(count);
    let per_thread = spread(count, threads, |k| ConnPlan {
        resource: if a.unique_ids {
            target::unique_id_resource(&run.url.resource, first + k)
        } else {
            run.url.resource.clone()
        },
        source: run.source_of(first + k),
        witness: None,
    });
    Ok(Shape {
        traffic: Traffic::Idle,
        connections: count as u64,
        cycles: 0,
        first,
        units: count,
        size: 0,
        window: 0,
        rate: None,
        per_thread,
    })
}

/// Broadcast: whole rooms dealt to threads (a room is never split: all its members share one
/// thread of one process), each sender witnessed by the next member of its room.
fn broadcast(a: &BroadcastArgs, run: &RunShape) -> Result<Shape, String> {
    if a.rooms == 0 || a.members < 2 || a.senders == 0 || a.senders > a.members {
        return Err("need --rooms >= 1, --members >= 2 and 1 <= --senders <= --members".into());
    }
    if a.window == 0 {
        return Err("--window must be at least 1".into());
    }
    check_size(a.size, stats::STAMP_BYTES + stats::SENDER_BYTES)?;
    check_rate(a.rate)?;
    let (first, count, rate) = run.share(a.rooms, a.rate)?;
    let threads = run.max_threads.min(count);
    let rooms = first..first + count;
    let per_thread = broadcast_layout(rooms, a.members, a.senders, threads)
        .into_iter()
        .map(|members| {
            let senders = members.iter().filter(|m| m.witness.is_some()).count();
            let conns = members
                .into_iter()
                .map(|m| ConnPlan {
                    resource: target::room_resource(&run.url.resource, m.room),
                    source: run.source_of(m.global),
                    witness: m.witness,
                })
                .collect();
            ThreadShare {
                conns,
                weight: senders as f64,
            }
        })
        .collect();
    Ok(Shape {
        traffic: Traffic::Broadcast,
        connections: (count * a.members) as u64,
        cycles: 0,
        first,
        units: count,
        size: a.size,
        window: a.window,
        rate,
        per_thread,
    })
}

/// Connect: `--concurrency` slots dealt round-robin, sharing the cycle budget.
fn connect(a: &ConnectArgs, run: &RunShape) -> Result<Shape, String> {
    if a.concurrency == 0 || a.connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    let (first, count, _) = run.share(a.concurrency, None)?;
    let threads = run.max_threads.min(count);
    let per_thread = spread(count, threads, |_| ConnPlan {
        resource: run.url.resource.clone(),
        source: None,
        witness: None,
    });
    Ok(Shape {
        traffic: Traffic::Connect,
        connections: count as u64,
        cycles: run.part.share_u64(a.connections).1,
        first,
        units: count,
        size: 0,
        window: 0,
        rate: None,
        per_thread,
    })
}

/// What the flags of one mode come to, before it is cut into `Plan`s.
struct Shape {
    traffic: Traffic,
    /// Connections asked for (see `connections` in `JSON_FIELDS`).
    connections: u64,
    /// Connect mode: the cycle budget; 0 otherwise.
    cycles: u64,
    /// The first connection, room or slot of this process's part, and how many it has.
    first: usize,
    units: usize,
    size: usize,
    window: u32,
    rate: Option<f64>,
    per_thread: Vec<ThreadShare>,
}

/// The connections of one thread, and its weight in sharing `--rate` (its senders).
struct ThreadShare {
    conns: Vec<ConnPlan>,
    weight: f64,
}

/// Deals `n` connections round-robin to `threads` threads (connection `g` to thread
/// `g % threads`); each thread's weight for the rate share is its connection count.
fn spread(n: usize, threads: usize, conn: impl Fn(usize) -> ConnPlan) -> Vec<ThreadShare> {
    let mut out: Vec<ThreadShare> = (0..threads)
        .map(|_| ThreadShare {
            conns: Vec::new(),
            weight: 0.0,
        })
        .collect();
    for g in 0..n {
        if let Some(share) = out.get_mut(g % threads) {
            share.conns.push(conn(g));
            share.weight += 1.0;
        }
    }
    out
}

/// One member of a broadcast run, as its thread sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    room: usize,
    /// Index over all members of the run (for the source address).
    global: usize,
    /// For a sender: the slot of its witness in the same thread.
    witness: Option<usize>,
}

/// Lays out the members of the rooms of this process: its `k`-th room goes to thread
/// `k % threads`, its members in consecutive slots there; the first `senders` members of each
/// room send, each witnessed by the next member of its room (`worker::witness`).
fn broadcast_layout(
    rooms: std::ops::Range<usize>,
    members: usize,
    senders: usize,
    threads: usize,
) -> Vec<Vec<Member>> {
    let mut out: Vec<Vec<Member>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, room) in rooms.enumerate() {
        let Some(slots) = out.get_mut(k % threads) else {
            continue;
        };
        let room_start = slots.len();
        for m in 0..members {
            let slot = room_start + m;
            slots.push(Member {
                room,
                global: room * members + m,
                witness: (m < senders).then(|| worker::witness(slot, room_start, members)),
            });
        }
    }
    out
}

/// How many processes `--processes` comes to: never more than there are units to share;
/// `auto` divides the connections by what one process may open under the hard descriptor
/// limit.
pub(super) fn processes_for(asked: Processes, connections: u64, units: usize) -> usize {
    let n = match asked {
        Processes::Count(n) => n,
        Processes::Auto => {
            let hard = rlimit::Resource::NOFILE
                .get()
                .map_or(u64::MAX, |(_soft, hard)| hard);
            auto_processes(connections, hard)
        }
    };
    n.clamp(1, units.max(1))
}

/// Processes needed for `connections` when each may hold `hard_limit` descriptors, of which
/// `SPARE_FDS` are not for connections.
pub(super) fn auto_processes(connections: u64, hard_limit: u64) -> usize {
    let per_process = hard_limit.saturating_sub(SPARE_FDS).max(1);
    usize::try_from(connections.div_ceil(per_process)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        mode: Mode,
    }

    fn setup(args: &str) -> Result<Setup, String> {
        let argv = std::iter::once("bench").chain(args.split_whitespace());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        plan(&cli.mode, cli.mode.common().child.unwrap_or(Part::WHOLE))
    }

    #[test]
    fn flags_are_checked_before_any_socket() {
        let bad: &[(&str, &str)] = &[
            ("echo ws://192.0.2.1/echo", "loopback"),
            ("echo --insecure ws://127.0.0.1/echo", "wss:// URLs only"),
            (
                "echo --ca /nonexistent/ca.pem wss://127.0.0.1/echo",
                "cannot read",
            ),
            ("echo ws://127.0.0.1:1/echo --size 7", "--size"),
            ("echo ws://127.0.0.1:1/echo --rate 0", "--rate"),
            ("echo ws://127.0.0.1:1/echo --threads 0", "--threads"),
            ("echo ws://127.0.0.1:1/echo --duration 0s", "--duration"),
            (
                "echo ws://127.0.0.1:1/echo --duration 1000years",
                "--duration",
            ),
            ("idle ws://127.0.0.1:1/echo --warmup 25h", "--warmup"),
            (
                "echo ws://127.0.0.1:1/echo --connections 0",
                "--connections",
            ),
            ("broadcast ws://127.0.0.1:1/r/b --members 1", "--members"),
            ("broadcast ws://127.0.0.1:1/r/b --senders 11", "--senders"),
            ("broadcast ws://127.0.0.1:1/r/b --size 11", "--size"),
            (
                "connect ws://127.0.0.1:1/echo --concurrency 0",
                "--concurrency",
            ),
            (
                "idle ws://127.0.0.1:1/echo --source-addrs 127.0.0.9-127.0.0.1",
                "range",
            ),
            ("idle ws://127.0.0.1:1/echo --processes 0", "--processes"),
            ("idle ws://127.0.0.1:1/echo --processes x", "--processes"),
            ("idle ws://127.0.0.1:1/echo --child 2/2", "--child"),
            (
                "idle ws://127.0.0.1:1/echo --connections 1 --child 1/2",
                "empty",
            ),
        ];
        for (args, needle) in bad {
            match setup(args) {
                Ok(_) => panic!("{args}: accepted"),
                Err(e) => assert!(e.contains(needle), "{args}: {e}"),
            }
        }
    }

    #[test]
    fn echo_connections_are_dealt_round_robin_with_their_source_addresses() {
        let s = setup("echo ws://127.0.0.1:9/echo --connections 5 --threads 2 --rate 100 --source-addrs 127.0.0.1-127.0.0.3")
            .unwrap();
        assert_eq!(
            (s.traffic, s.plans.len(), s.connections),
            (Traffic::Echo, 2, 5)
        );
        let sources: Vec<Vec<String>> = s
            .plans
            .iter()
            .map(|p| {
                p.conns
                    .iter()
                    .map(|c| c.source.unwrap().to_string())
                    .collect()
            })
            .collect();
        // Connection g goes to thread g % 2 and binds address g % 3.
        assert_eq!(sources[0], ["127.0.0.1", "127.0.0.3", "127.0.0.2"]);
        assert_eq!(sources[1], ["127.0.0.2", "127.0.0.1"]);
        // The rate is shared by connection count: 3/5 and 2/5 of 100.
        assert_eq!(s.plans[0].rate, Some(60.0));
        assert_eq!(s.plans[1].rate, Some(40.0));
        assert_eq!(s.plans[0].host, "127.0.0.1:9");
        assert!(s.plans[0].conns.iter().all(|c| c.resource == "/echo"));
    }

    #[test]
    fn threads_never_outnumber_the_work() {
        let s = setup("idle ws://127.0.0.1:9/ --connections 1 --threads 8").unwrap();
        assert_eq!(s.plans.len(), 1);
        let s = setup("broadcast ws://127.0.0.1:9/r/b --rooms 3 --threads 8").unwrap();
        assert_eq!(s.plans.len(), 3);
        let s = setup("connect ws://127.0.0.1:9/echo --concurrency 5 --threads 2 --connections 40")
            .unwrap();
        assert_eq!((s.plans.len(), s.connections, s.cycles), (2, 5, 40));
        assert_eq!(s.plans[0].conns.len() + s.plans[1].conns.len(), 5);
    }

    #[test]
    fn broadcast_rooms_stay_on_one_thread_with_witnesses_inside_the_room() {
        let layout = broadcast_layout(0..3, 4, 2, 2);
        // Rooms 0 and 2 on thread 0, room 1 on thread 1.
        let rooms: Vec<Vec<usize>> = layout
            .iter()
            .map(|t| t.iter().map(|m| m.room).collect())
            .collect();
        assert_eq!(rooms[0], [0, 0, 0, 0, 2, 2, 2, 2]);
        assert_eq!(rooms[1], [1, 1, 1, 1]);
        let witnesses: Vec<Option<usize>> = layout[0].iter().map(|m| m.witness).collect();
        assert_eq!(
            witnesses,
            [Some(1), Some(2), None, None, Some(5), Some(6), None, None]
        );
        for thread in &layout {
            for m in thread {
                if let Some(w) = m.witness {
                    assert_eq!(thread[w].room, m.room);
                }
            }
        }
        let globals: Vec<usize> = layout[1].iter().map(|m| m.global).collect();
        assert_eq!(globals, [4, 5, 6, 7]);
    }

    #[test]
    fn idle_connections_share_the_url_unless_each_gets_its_own_id() {
        let resources = |args: &str| -> Vec<Vec<String>> {
            setup(args)
                .unwrap()
                .plans
                .iter()
                .map(|p| p.conns.iter().map(|c| c.resource.clone()).collect())
                .collect()
        };
        assert_eq!(
            resources("idle ws://127.0.0.1:9/ws?id=a --connections 3 --threads 2"),
            [vec!["/ws?id=a", "/ws?id=a"], vec!["/ws?id=a"]]
        );
        // Connection g (dealt to thread g % 2) is bench-g.
        assert_eq!(
            resources("idle ws://127.0.0.1:9/ws --connections 3 --threads 2 --unique-ids"),
            [
                vec!["/ws?id=bench-0", "/ws?id=bench-2"],
                vec!["/ws?id=bench-1"]
            ]
        );
    }

    #[test]
    fn broadcast_rooms_are_named_from_the_base_url() {
        let s =
            setup("broadcast ws://127.0.0.1:9/r/bench --rooms 2 --members 2 --threads 1 --rate 10")
                .unwrap();
        let resources: Vec<&str> = s.plans[0]
            .conns
            .iter()
            .map(|c| c.resource.as_str())
            .collect();
        assert_eq!(
            resources,
            ["/r/bench-0", "/r/bench-0", "/r/bench-1", "/r/bench-1"]
        );
        assert_eq!(s.plans[0].rate, Some(10.0));
        assert!(s.plans[0].target.ip().is_loopback());
    }

    #[test]
    fn a_child_plans_its_consecutive_part_with_global_numbers() {
        // Connections 3 and 4 of 0..5 (part 1 of 2 takes the last two) bind addresses 3 % 3
        // and 4 % 3, as one process would have; the rate follows the share: 2/5 of 100.
        let s = setup("echo ws://127.0.0.1:9/echo --connections 5 --threads 1 --rate 100 --source-addrs 127.0.0.1-127.0.0.3 --child 1/2")
            .unwrap();
        assert_eq!((s.connections, s.units), (2, 2));
        let sources: Vec<String> = s.plans[0]
            .conns
            .iter()
            .map(|c| c.source.unwrap().to_string())
            .collect();
        assert_eq!(sources, ["127.0.0.1", "127.0.0.2"]);
        assert_eq!(s.plans[0].rate, Some(40.0));

        // Broadcast: whole rooms; part 1 of 2 of 3 rooms is room 2 alone, named as usual.
        let s =
            setup("broadcast ws://127.0.0.1:9/r/b --rooms 3 --members 2 --threads 4 --child 1/2")
                .unwrap();
        assert_eq!((s.connections, s.units, s.plans.len()), (2, 1, 1));
        assert!(s.plans[0].conns.iter().all(|c| c.resource == "/r/b-2"));

        // Connect: a share of the slots and of the cycle budget, sources from the part's first
        // slot on.
        let s = setup("connect ws://127.0.0.1:9/echo --concurrency 4 --connections 11 --threads 2 --child 1/2")
            .unwrap();
        assert_eq!((s.connections, s.cycles), (2, 5));
        let offsets: Vec<usize> = s.plans.iter().map(|p| p.source_offset).collect();
        assert_eq!(offsets, [2, 3]);
    }

    #[test]
    fn process_counts() {
        // (asked, connections, units, hard descriptor limit for auto, expected)
        let cases: &[(Processes, u64, usize, usize)] = &[
            (Processes::Count(1), 100, 100, 1),
            (Processes::Count(4), 100, 100, 4),
            (Processes::Count(4), 2, 2, 2),
            (Processes::Count(4), 30, 3, 3),
        ];
        for &(asked, connections, units, want) in cases {
            assert_eq!(processes_for(asked, connections, units), want, "{asked:?}");
        }
        // auto: 20,000 descriptors per process, 64 spare.
        let cases: &[(u64, usize)] = &[(1, 1), (19_936, 1), (19_937, 2), (50_000, 3)];
        for &(connections, want) in cases {
            assert_eq!(auto_processes(connections, 20_000), want, "{connections}");
        }
        assert_eq!(
            auto_processes(10, 0),
            10,
            "a limit below the spare: one each"
        );
        assert_eq!(
            processes_for(Processes::Auto, 10, 10),
            1,
            "10 connections fit any limit"
        );
    }
}
