//! `wsrelay api ...`: a small command-line client of the server API (SPEC §16, docs/api.md).
//!
//! Owns: the subcommands and their flags, the JSON bodies they send, and `ApiConnection`, a
//! blocking HTTP/1.1 client over one kept-alive `std::net::TcpStream` (bodies by
//! `Content-Length`, as the server's are). The standard library is enough for that: one
//! request, one answer, no TLS (the API is for backends next to the relay; put a TLS proxy in
//! front of it otherwise), so no HTTP crate is pulled in for it.
//! Does not: anything the server must check again anyway (the server validates every field).
//!
//! Exit codes: 0 on a 2xx answer (its JSON is printed on stdout), 1 on any other status (the
//! JSON is printed on stderr), 2 when the server cannot be reached or answers garbage.

use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

/// Flags of `wsrelay api`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The server, `http://host:port` (the API is served on the relay's own port).
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,

    /// The API key (the server's --api-key). Visible in `ps`: prefer --key-file or the
    /// WSRELAY_API_KEY environment variable.
    #[arg(long, global = true)]
    pub key: Option<String>,

    /// File holding the API key (a trailing newline is ignored).
    #[arg(long, value_name = "FILE", global = true, conflicts_with = "key")]
    pub key_file: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: ApiCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ApiCommand {
    /// Publish a message to a room (--room) or an id (--to); prints its msg_id and ack status.
    Publish {
        #[arg(long, conflicts_with = "to", required_unless_present = "to")]
        room: Option<String>,
        #[arg(long)]
        to: Option<String>,
        /// The payload as JSON; text that is not JSON is sent as a JSON string.
        #[arg(long)]
        payload: String,
        /// The `from` members see (default: "api").
        #[arg(long)]
        from: Option<String>,
        /// A message id for duplicate suppression: a repeat is acked, not delivered again.
        #[arg(long)]
        id: Option<String>,
    },
    /// Close every connection of an id with a close code (default 1000) and a reason.
    Disconnect {
        id: String,
        #[arg(long)]
        code: Option<u16>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Who is in a room.
    Presence { room: String },
    /// Every room with its member counts.
    Rooms,
    /// Is an id online, and with how many connections.
    Id { id: String },
}

/// Runs one subcommand; see the module doc for the exit codes.
pub fn run(args: ApiArgs) -> ExitCode {
    match call(&args) {
        Ok((status, body)) => {
            let text = String::from_utf8_lossy(&body);
            if (200..300).contains(&status) {
                println!("{}", text.trim_end());
                ExitCode::SUCCESS
            } else {
                eprintln!("HTTP {status}: {}", text.trim_end());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("wsrelay api: {e}");
            ExitCode::from(2)
        }
    }
}

fn call(args: &ApiArgs) -> io::Result<(u16, Vec<u8>)> {
    let key = match (&args.key, &args.key_file) {
        (Some(key), _) => key.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        (None, None) if std::env::var_os("WSRELAY_API_KEY").is_some() => {
            std::env::var("WSRELAY_API_KEY").map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "WSRELAY_API_KEY is not UTF-8")
            })?
        }
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an API key is required (--key, --key-file or WSRELAY_API_KEY)",
            ))
        }
    };
    let (method, path, body) = request_of(&args.command);
    let mut conn = ApiConnection::connect(&args.url, &key)?;
    conn.call(
        method,
        &path,
        body.as_ref().map(|b| b.to_string()).as_deref(),
    )
}

/// The method, path and body of a subcommand.
fn request_of(command: &ApiCommand) -> (&'static str, String, Option<Value>) {
    match command {
        ApiCommand::Publish {
            room,
            to,
            payload,
            from,
            id,
        } => {
            let payload = serde_json::from_str::<Value>(payload)
                .unwrap_or_else(|_| Value::String(payload.clone()));
            let mut body = json!({ "payload": payload });
            for (name, value) in [("room", room), ("to", to), ("from", from), ("id", id)] {
                if let Some(value) = value {
                    body[name] = Value::String(value.clone());
                }
            }
            ("POST", "/api/publish".into(), Some(body))
        }
        ApiCommand::Disconnect { id, code, reason } => {
            let mut body = json!({ "id": id });
            if let Some(code) = code {
                body["code"] = json!(code);
            }
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            ("POST", "/api/disconnect".into(), Some(body))
        }
        ApiCommand::Presence { room } => {
            ("GET", format!("/api/presence?room={}", encode(room)), None)
        }
        ApiCommand::Rooms => ("GET", "/api/rooms".into(), None),
        ApiCommand::Id { id } => ("GET", format!("/api/ids/{}", encode(id)), None),
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986 §2.3).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One kept-alive HTTP/1.1 connection to the server API: requests go one after the other,
/// each answer read completely (by its `Content-Length`) before the next request.
pub struct ApiConnection {
    reader: BufReader<TcpStream>,
    host: String,
    key: String,
}

impl ApiConnection {
    /// Connects to `url` (`http://host:port`, port 80 if absent).
    ///
    /// # Errors
    /// A URL that is not `http://...`, or the connection fails.
    pub fn connect(url: &str, key: &str) -> io::Result<ApiConnection> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{url:?}: only http:// URLs are supported"),
            )
        })?;
        let host = rest.split('/').next().unwrap_or_default().to_string();
        let address = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:80")
        };
        let stream = TcpStream::connect(&address)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {address}: {e}")))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(ApiConnection {
            reader: BufReader::new(stream),
            host,
            key: key.to_string(),
        })
    }

    /// Sends one request and reads its answer: (status, body).
    ///
    /// # Errors
    /// The connection fails or the answer is not HTTP/1.1 with a `Content-Length`.
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<(u16, Vec<u8>)> {
        self.send(method, path, body)?;
        self.read_answer()
    }

    /// Writes one request without reading its answer (for pipelining: `read_answer` later).
    ///
    /// # Errors
    /// The write fails.
    pub fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> io::Result<()> {
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            self.key,
            body.len()
        );
        self.reader.get_mut().write_all(request.as_bytes())
    }

    /// Reads the next answer: (status, body).
    ///
    /// # Errors
    /// The connection fails or the answer is not HTTP/1.x with a `Content-Length`.
    pub fn read_answer(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(invalid("the server closed the connection"));
        }
        let status = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| invalid("not an HTTP/1.x status line"))?;
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| invalid("an answer without Content-Length"))?;
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies() {
        let command = ApiCommand::Publish {
            room: Some("lobby".into()),
            to: None,
            payload: "{\"n\":1}".into(),
            from: None,
            id: Some("m1".into()),
        };
        let (method, path, body) = request_of(&command);
        assert_eq!((method, path.as_str()), ("POST", "/api/publish"));
        assert_eq!(
            body.unwrap(),
            json!({"room": "lobby", "payload": {"n": 1}, "id": "m1"})
        );
        let command = ApiCommand::Publish {
            room: None,
            to: Some("bob".into()),
            payload: "hello there".into(),
            from: Some("billing".into()),
            id: None,
        };
        let body = request_of(&command).2.unwrap();
        assert_eq!(
            body,
            json!({"to": "bob", "payload": "hello there", "from": "billing"})
        );
    }

    #[test]
    fn ids_and_rooms_are_encoded_in_the_target() {
        let (_, path, _) = request_of(&ApiCommand::Id {
            id: "ann marie/2".into(),
        });
        assert_eq!(path, "/api/ids/ann%20marie%2F2");
        let (_, path, _) = request_of(&ApiCommand::Presence {
            room: "lobby".into(),
        });
        assert_eq!(path, "/api/presence?room=lobby");
    }
}
