//! The demo page (SPEC §8): a chat in the browser that talks to `/ws` like any other client.
//!
//! Owns: the page's three files, `index.html`, `demo.css` and `demo.js` (embedded in the binary
//! with `include_str!`, so the server needs no files and the page no CDN or build step), and the
//! HTTP responses that serve them at `/`, `/demo.css` and `/demo.js` with their headers.
//! Does not: speak WebSocket or know the relay's rules: the page is an ordinary `/ws` client of
//! docs/protocol.md, and its counters come from the reactor's `/stats.json`.
//!
//! Implements SPEC §8.
//!
//! Why three paths rather than one page with the script inline: the page's
//! Content-Security-Policy (`POLICY`) runs scripts and styles only when they come from this
//! server's own paths (`'self'`, without `'unsafe-inline'`). If a bug ever let a peer's text into
//! the page as markup, an inline `<script>` or an `onerror=` attribute would still not run. An
//! inline script could be allowed by a nonce (fresh randomness in every response) or by the
//! script's SHA-256 (a hash the crate does not otherwise need); two more GETs are simpler.

use crate::protocol::handshake;

/// The page itself.
const INDEX_HTML: &str = include_str!("index.html");
/// Its style sheet.
const DEMO_CSS: &str = include_str!("demo.css");
/// Its script: the `/ws` client, the counters, and the rendering (as text only).
const DEMO_JS: &str = include_str!("demo.js");

/// The Content-Security-Policy of every demo response (CSP Level 3).
///
/// * `default-src 'none'`: nothing loads unless listed below.
/// * `script-src 'self'`, `style-src 'self'`: files from this server only; no inline script,
///   no event-handler attributes, no `eval`.
/// * `connect-src 'self'`: `fetch` and `WebSocket` to this host only (CSP3: `'self'` covers
///   `ws:`/`wss:` to the same host and port).
/// * `img-src data:`: the empty favicon (`<link rel="icon" href="data:,">`), which spares the
///   server a `/favicon.ico` 404 on every load.
/// * `require-trusted-types-for 'script'` with `trusted-types 'none'`: in browsers that
///   enforce Trusted Types, assigning a string to `innerHTML` (or any other HTML sink) throws.
///   The page renders peers' text with `textContent` only; this makes a slip fail loudly.
/// * `base-uri 'none'`, `form-action 'none'`, `frame-ancestors 'none'`: no `<base>` hijack, no
///   form posted anywhere, no framing by another site (clickjacking).
pub const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

/// The headers every demo file is served with, besides `Content-Type` and `Content-Length`
/// (which `http_response` writes).
///
/// `no-cache` lets a browser keep a copy but not use it without asking again: the files change
/// with the binary and are a few kilobytes, so a reload always shows the running server's page.
const HEADERS: [(&str, &str); 4] = [
    ("Cache-Control", "no-cache"),
    ("Content-Security-Policy", POLICY),
    // The browser must not guess a type other than the one sent (a script served as text).
    ("X-Content-Type-Options", "nosniff"),
    // A `?token=` never leaks to another site through a Referer header.
    ("Referrer-Policy", "no-referrer"),
];

/// The complete HTTP response for a demo path (`/`, `/demo.css`, `/demo.js`), or `None` for
/// any other path.
pub fn response(path: &str) -> Option<Vec<u8>> {
    let (content_type, body) = match path {
        "/" => ("text/html; charset=utf-8", INDEX_HTML),
        "/demo.css" => ("text/css; charset=utf-8", DEMO_CSS),
        "/demo.js" => ("text/javascript; charset=utf-8", DEMO_JS),
        _ => return None,
    };
    Some(handshake::http_response(
        200,
        content_type,
        &HEADERS,
        body.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Splits a response into its head and body.
    fn split(response: &[u8]) -> (String, String) {
        let text = String::from_utf8(response.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            k.eq_ignore_ascii_case(name).then_some(v)
        })
    }

    /// (path, expected Content-Type, a fragment of the body)
    fn check(path: &str, content_type: &str, fragment: &str) {
        let response = response(path).unwrap_or_else(|| panic!("{path}: no response"));
        let (head, body) = split(&response);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{path}: {head}");
        assert_eq!(header(&head, "Content-Type"), Some(content_type), "{path}");
        assert_eq!(
            header(&head, "Content-Length"),
            Some(body.len().to_string().as_str()),
            "{path}"
        );
        assert_eq!(header(&head, "Cache-Control"), Some("no-cache"), "{path}");
        assert_eq!(
            header(&head, "Content-Security-Policy"),
            Some(POLICY),
            "{path}"
        );
        assert!(body.contains(fragment), "{path}");
    }

    #[test]
    fn serves_the_three_files() {
        let cases = [
            ("/", "text/html; charset=utf-8", "<script src=\"/demo.js\""),
            ("/demo.css", "text/css; charset=utf-8", "@media"),
            ("/demo.js", "text/javascript; charset=utf-8", "wsrelay.v1"),
        ];
        for (path, content_type, fragment) in cases {
            check(path, content_type, fragment);
        }
        for path in ["/index.html", "/demo.js/", "/demo", "//"] {
            assert!(response(path).is_none(), "{path}");
        }
    }

    /// Does `html` hold something like ` onclick=`?
    fn has_handler_attribute(html: &str) -> bool {
        html.match_indices(" on").any(|(at, _)| {
            let rest = &html[at + 3..];
            let name_len = rest.chars().take_while(char::is_ascii_alphabetic).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    /// The page must never need what the policy forbids: inline scripts, inline styles or
    /// handler attributes, HTML sinks. (The browser test shows it working under the policy;
    /// this pins the reasons in the source.)
    #[test]
    fn files_stay_within_the_policy() {
        assert!(!INDEX_HTML.contains("<style"));
        assert!(!INDEX_HTML.contains("style="));
        assert!(
            !has_handler_attribute(INDEX_HTML),
            "no event-handler attributes"
        );
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!DEMO_JS.contains(sink), "demo.js uses {sink}");
        }
    }
}
