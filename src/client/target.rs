//! Where the client connects: a server URL, which protocol its path speaks, and the resource
//! name each attempt requests (with `?id=` and `?since=` filled in).
//!
//! Owns: `Target` (a parsed `ws://` URL and its `Endpoint`), `Target::resource`, and the query
//! editing and percent-encoding it needs.
//! Does not: parse the URL's syntax (`protocol::client_handshake::WsUrl` does), connect, or know
//! which msg_id was seen last (`outbox::Seen` does).
//!
//! SPEC §6 (`/ws`, `?id=`, `?since=`), §7; RFC 6455 §3 (the resource name); RFC 3986 §2.1, §3.4
//! (percent-encoding, the query).

use crate::protocol::client_handshake::{UrlError, WsUrl};

/// What a server path speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: JSON envelopes with ids, acks and recovery (SPEC §6).
    Envelope,
    /// Anything else (`/echo`, `/r/ROOM`): each line is one text frame, each message is printed.
    Raw,
}

/// One server URL the client may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The URL as the user wrote it, for messages.
    pub text: String,
    pub url: WsUrl,
    pub endpoint: Endpoint,
}

impl Target {
    /// Parses a `ws://` URL; the path `/ws` is the envelope protocol, every other path is raw.
    ///
    /// # Errors
    /// Those of `WsUrl::parse`.
    pub fn parse(text: &str) -> Result<Target, UrlError> {
        let url = WsUrl::parse(text)?;
        let path = url.resource.split('?').next().unwrap_or_default();
        let endpoint = if path == "/ws" {
            Endpoint::Envelope
        } else {
            Endpoint::Raw
        };
        Ok(Target {
            text: text.to_string(),
            url,
            endpoint,
        })
    }

    /// The resource name for one connection attempt. On `/ws`, `id` becomes `?id=` and `since`
    /// (the last msg_id received) becomes `?since=`, replacing any the URL already had, so that
    /// a reconnect asks for exactly what it missed (SPEC §6 "Recovery"). Raw endpoints get the
    /// URL's resource unchanged: they know neither parameter.
    /// `epoch` goes with `since` only (SPEC §13: it names the history `since` belongs to).
    pub fn resource(&self, id: Option<&str>, since: Option<&str>, epoch: Option<&str>) -> String {
        match self.endpoint {
            Endpoint::Raw => self.url.resource.clone(),
            Endpoint::Envelope => {
                let mut resource = self.url.resource.clone();
                if let Some(id) = id {
                    resource = set_query_param(&resource, "id", id);
                }
                if let Some(since) = since {
                    resource = set_query_param(&resource, "since", since);
                    if let Some(epoch) = epoch {
                        resource = set_query_param(&resource, "epoch", epoch);
                    }
                }
                resource
            }
        }
    }
}

/// `resource` with the query parameter `key` set to `value` (percent-encoded): an existing
/// `key=...` is replaced in place, otherwise `key=value` is appended.
pub fn set_query_param(resource: &str, key: &str, value: &str) -> String {
    let (path, query) = match resource.split_once('?') {
        Some((path, query)) => (path, query),
        None => (resource, ""),
    };
    let encoded = format!("{key}={}", percent_encode(value));
    let mut pairs: Vec<String> = Vec::new();
    let mut replaced = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or_default();
        if name == key {
            if !replaced {
                pairs.push(encoded.clone());
                replaced = true;
            }
        } else {
            pairs.push(pair.to_string());
        }
    }
    if !replaced {
        pairs.push(encoded);
    }
    format!("{path}?{}", pairs.join("&"))
}

/// RFC 3986 §2.1: every byte outside the unreserved set (`A-Z a-z 0-9 - . _ ~`) as `%XX`, so an
/// id with `&`, `=`, spaces or non-ASCII letters arrives as one parameter.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let cases: &[(&str, Endpoint)] = &[
            ("ws://h/ws", Endpoint::Envelope),
            ("ws://h/ws?id=a", Endpoint::Envelope),
            ("ws://h:9/ws?token=x", Endpoint::Envelope),
            ("ws://h/echo", Endpoint::Raw),
            ("ws://h/r/lobby", Endpoint::Raw),
            ("ws://h/wsx", Endpoint::Raw),
            ("ws://h/ws/", Endpoint::Raw),
            ("ws://h", Endpoint::Raw),
        ];
        for &(url, want) in cases {
            assert_eq!(Target::parse(url).unwrap().endpoint, want, "{url}");
        }
        assert_eq!(Target::parse("http://h/ws"), Err(UrlError::NotWebSocket));
    }

    fn check(url: &str, id: Option<&str>, since: Option<&str>, expected: &str) {
        let target = Target::parse(url).unwrap();
        assert_eq!(
            target.resource(id, since, None),
            expected,
            "{url} {id:?} {since:?}"
        );
    }

    #[test]
    fn resources() {
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
            ("ws://h/ws", None, None, "/ws"),
            ("ws://h/ws", Some("alice"), None, "/ws?id=alice"),
            ("ws://h/ws", Some("alice"), Some("1700000000000042"), "/ws?id=alice&since=1700000000000042"),
            ("ws://h/ws", None, Some("7"), "/ws?since=7"),
            ("ws://h/ws?id=old", Some("new"), None, "/ws?id=new"),
            ("ws://h/ws?id=a&since=3", None, Some("9"), "/ws?id=a&since=9"),
            ("ws://h/ws?since=3&x=1&since=4", None, Some("9"), "/ws?since=9&x=1"),
            ("ws://h/ws?id=a", None, None, "/ws?id=a"),
            ("ws://h/ws?token=t.u.v", Some("bob"), None, "/ws?token=t.u.v&id=bob"),
            ("ws://h/ws?", Some("bob"), None, "/ws?id=bob"),
            ("ws://h/ws", Some("a b&c=d/é"), None, "/ws?id=a%20b%26c%3Dd%2F%C3%A9"),
            ("ws://h/echo", Some("alice"), Some("7"), "/echo"),
            ("ws://h/r/lobby?x=1", Some("alice"), None, "/r/lobby?x=1"),
        ];
        for &(url, id, since, want) in cases {
            check(url, id, since, want);
        }
    }

    #[test]
    fn the_epoch_goes_with_since_only() {
        let target = Target::parse("ws://h/ws").unwrap();
        let epoch = Some("00000000000000ff");
        assert_eq!(
            target.resource(Some("a"), Some("7"), epoch),
            "/ws?id=a&since=7&epoch=00000000000000ff"
        );
        assert_eq!(target.resource(Some("a"), None, epoch), "/ws?id=a");
    }

    #[test]
    fn percent_encoding() {
        let cases: &[(&str, &str)] = &[
            ("", ""),
            ("Az09-._~", "Az09-._~"),
            ("a b", "a%20b"),
            ("%", "%25"),
            ("?#", "%3F%23"),
            ("ü", "%C3%BC"),
        ];
        for &(input, want) in cases {
            assert_eq!(percent_encode(input), want, "{input:?}");
        }
    }
}
