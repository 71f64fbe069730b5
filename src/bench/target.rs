//! Where the load generator may send its load, and from which local addresses.
//!
//! Owns: resolving the URL's host and refusing any target outside the loopback range unless
//! `--allow-remote` is given; parsing `--source-addrs` ranges; naming the rooms of a broadcast
//! run and the ids of an idle run with `--unique-ids`.
//! Does not: open sockets (`client.rs` binds and connects).
//!
//! SPEC §11; the machine policy of this project: load goes only to 127.0.0.0/8 (or ::1).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// The most source addresses a range may name. 256 addresses already give about 7 million
/// ephemeral ports, far beyond any descriptor limit.
const MAX_SOURCE_ADDRS: usize = 256;

/// Parses `--source-addrs`: one address (`127.0.0.2`) or an inclusive IPv4 range
/// (`127.0.0.1-127.0.0.20`).
///
/// # Errors
/// A message naming what is wrong: not an address, an empty or reversed range, more than
/// `MAX_SOURCE_ADDRS` addresses, or an IPv6 range.
pub fn parse_source_addrs(text: &str) -> Result<Vec<IpAddr>, String> {
    let text = text.trim();
    let Some((first, last)) = text.split_once('-') else {
        return text
            .parse::<IpAddr>()
            .map(|ip| vec![ip])
            .map_err(|_| format!("{text:?} is not an IP address"));
    };
    let parse = |s: &str| {
        s.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{s:?} is not an IPv4 address (ranges are IPv4 only)"))
    };
    let (first, last) = (u32::from(parse(first)?), u32::from(parse(last)?));
    if last < first {
        return Err(format!("{text:?}: the range ends before it starts"));
    }
    let count = (last - first) as usize + 1;
    if count > MAX_SOURCE_ADDRS {
        return Err(format!(
            "{text:?} names {count} addresses; at most {MAX_SOURCE_ADDRS}"
        ));
    }
    Ok((first..=last)
        .map(|n| IpAddr::V4(Ipv4Addr::from(n)))
        .collect())
}

/// Resolves `host:port` and picks the address to load.
///
/// # Errors
/// The name does not resolve, or it resolves outside loopback and `allow_remote` is false.
pub fn resolve(host: &str, port: u16, allow_remote: bool) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    choose_target(&addrs, allow_remote).map_err(|e| format!("{host}: {e}"))
}

/// Picks the target among resolved addresses: IPv4 first (a server on 127.0.0.1 is the common
/// case, and `localhost` often resolves to ::1 first), and only loopback unless `allow_remote`.
///
/// # Errors
/// No address, or a non-loopback one without `allow_remote`. Every address is checked, so a
/// name that resolves to loopback and something else is refused too.
pub fn choose_target(addrs: &[SocketAddr], allow_remote: bool) -> Result<SocketAddr, String> {
    if !allow_remote {
        if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "{} is not a loopback address; load goes only to 127.0.0.0/8 or ::1 unless --allow-remote",
                remote.ip()
            ));
        }
    }
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| "resolves to no address".to_string())
}

/// The resource name of room `room` of a broadcast run: the base path with `-<room>` appended,
/// the query kept (`/r/bench?x=1` -> `/r/bench-3?x=1`).
pub fn room_resource(base: &str, room: usize) -> String {
    match base.split_once('?') {
        Some((path, query)) => format!("{path}-{room}?{query}"),
        None => format!("{base}-{room}"),
    }
}

/// The resource of connection `n` of an idle run with `--unique-ids`: `id=bench-<n>` added to
/// the query (`/ws` -> `/ws?id=bench-7`, `/ws?since=1` -> `/ws?since=1&id=bench-7`).
pub fn unique_id_resource(base: &str, n: usize) -> String {
    let separator = match base.split_once('?') {
        None => "?",
        Some((_, "")) => "",
        Some(_) => "&",
    };
    format!("{base}{separator}id=bench-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn source_addr_ranges() {
        let ok: &[(&str, Vec<IpAddr>)] = &[
            ("127.0.0.2", ips(&["127.0.0.2"])),
            ("::1", ips(&["::1"])),
            (
                "127.0.0.1-127.0.0.3",
                ips(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]),
            ),
            (" 127.0.0.9 - 127.0.0.9 ", ips(&["127.0.0.9"])),
            ("127.0.0.255-127.0.1.0", ips(&["127.0.0.255", "127.0.1.0"])),
        ];
        for (text, want) in ok {
            assert_eq!(parse_source_addrs(text).as_ref(), Ok(want), "{text}");
        }
        assert_eq!(
            parse_source_addrs("127.0.0.1-127.0.0.20").map(|v| v.len()),
            Ok(20)
        );
        for bad in [
            "",
            "localhost",
            "127.0.0.5-127.0.0.1",
            "127.0.0.1-",
            "::1-::2",
            "127.0.0.1-127.0.2.0",
        ] {
            assert!(parse_source_addrs(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_loopback_targets_unless_allowed() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // (name, resolved addresses, --allow-remote, the target chosen or a refusal)
        type Case = (&'static str, Vec<SocketAddr>, bool, Result<SocketAddr, ()>);
        let cases: &[Case] = &[
            (
                "v4 loopback",
                vec![a("127.0.0.1:80")],
                false,
                Ok(a("127.0.0.1:80")),
            ),
            (
                "elsewhere in 127/8",
                vec![a("127.3.2.1:80")],
                false,
                Ok(a("127.3.2.1:80")),
            ),
            ("v6 loopback", vec![a("[::1]:80")], false, Ok(a("[::1]:80"))),
            (
                "v4 preferred",
                vec![a("[::1]:80"), a("127.0.0.1:80")],
                false,
                Ok(a("127.0.0.1:80")),
            ),
            ("private", vec![a("10.0.0.1:80")], false, Err(())),
            ("documentation", vec![a("192.0.2.1:80")], false, Err(())),
            (
                "mixed",
                vec![a("127.0.0.1:80"), a("192.0.2.1:80")],
                false,
                Err(()),
            ),
            ("unspecified", vec![a("0.0.0.0:80")], false, Err(())),
            (
                "remote allowed",
                vec![a("192.0.2.1:80")],
                true,
                Ok(a("192.0.2.1:80")),
            ),
            ("nothing", vec![], false, Err(())),
        ];
        for (name, addrs, allow, want) in cases {
            let got = choose_target(addrs, *allow).map_err(|_| ());
            assert_eq!(&got, want, "{name}");
        }
    }

    #[test]
    fn resolving_localhost_stays_on_loopback() {
        assert!(resolve("127.0.0.1", 9, false).is_ok());
        assert!(resolve("192.0.2.1", 9, false).is_err());
    }

    #[test]
    fn room_names() {
        let cases: &[(&str, usize, &str)] = &[
            ("/r/bench", 0, "/r/bench-0"),
            ("/r/bench", 12, "/r/bench-12"),
            ("/r/bench?x=1", 3, "/r/bench-3?x=1"),
        ];
        for &(base, room, want) in cases {
            assert_eq!(room_resource(base, room), want);
        }
    }

    #[test]
    fn unique_ids() {
        let cases: &[(&str, usize, &str)] = &[
            ("/ws", 0, "/ws?id=bench-0"),
            ("/ws", 9999, "/ws?id=bench-9999"),
            ("/ws?", 3, "/ws?id=bench-3"),
            ("/ws?since=12", 3, "/ws?since=12&id=bench-3"),
        ];
        for &(base, n, want) in cases {
            assert_eq!(unique_id_resource(base, n), want);
        }
    }
}
