//! The bytes under the client's WebSocket: the TCP socket itself (`ws://`), or TLS over it
//! (`wss://`), split into a writing half for the session thread and a reading half for the
//! reader thread.
//!
//! Owns: the client's TLS handshake (`Wire::open`), sharing one rustls session between the two
//! threads, and the ciphertext the reader has received but not yet handed to rustls.
//! Does not: speak HTTP or RFC 6455 (`connection.rs` does, over these bytes), or decide what
//! to trust (`tls::config::client_config` does, from `--ca` / `--insecure`).
//!
//! SPEC §7, §18. Blocking I/O, like the rest of the client. The one rustls session sits behind
//! a mutex; neither thread holds it while it waits on the socket: the reader reads ciphertext
//! into its own buffer first, then locks to decrypt it, so a writer is never stuck behind a
//! reader waiting for the server to speak.

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Ciphertext read from the socket at once by the reader (one TLS record is at most ~16 KiB).
const CIPHER_BUFFER_BYTES: usize = 32 * 1024;

/// The writing half (and the owner of the connection's lifetime).
#[derive(Debug)]
pub enum Wire {
    Plain(TcpStream),
    Tls {
        stream: TcpStream,
        session: Arc<Mutex<ClientConnection>>,
    },
}

/// The reading half, for the reader thread.
pub enum WireReader {
    Plain(TcpStream),
    Tls {
        stream: TcpStream,
        session: Arc<Mutex<ClientConnection>>,
        /// Ciphertext read from the socket; `cipher[start..end]` not yet given to rustls.
        cipher: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

impl Wire {
    /// Wraps a connected socket: as it is, or, with a TLS configuration, after a complete TLS
    /// handshake with `host` (whose certificate must name it), within `timeout`.
    ///
    /// # Errors
    /// `host` is not a DNS name or IP address; the socket failed; or the handshake did (an
    /// `InvalidData` error carrying the `rustls::Error`: an untrusted certificate, say).
    pub fn open(
        mut stream: TcpStream,
        tls: Option<&Arc<ClientConfig>>,
        host: &str,
        timeout: Duration,
    ) -> io::Result<Wire> {
        let Some(config) = tls else {
            return Ok(Wire::Plain(stream));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let mut session = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
        stream.set_read_timeout(Some(timeout))?;
        while session.is_handshaking() {
            // Sends the ClientHello, reads the server's flight, answers it: blocking, and
            // bounded by the read timeout.
            session.complete_io(&mut stream)?;
        }
        Ok(Wire::Tls {
            stream,
            session: Arc::new(Mutex::new(session)),
        })
    }

    /// The TCP socket, for its settings (timeouts, Nagle).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Wire::Plain(stream) | Wire::Tls { stream, .. } => stream,
        }
    }

    /// A reading half; both halves share the socket (and the TLS session).
    ///
    /// # Errors
    /// The socket could not be duplicated.
    pub fn reader(&self) -> io::Result<WireReader> {
        Ok(match self {
            Wire::Plain(stream) => WireReader::Plain(stream.try_clone()?),
            Wire::Tls { stream, session } => WireReader::Tls {
                stream: stream.try_clone()?,
                session: session.clone(),
                cipher: vec![0u8; CIPHER_BUFFER_BYTES].into_boxed_slice(),
                start: 0,
                end: 0,
            },
        })
    }

    /// Writes all of `bytes` (encrypted, for TLS).
    ///
    /// # Errors
    /// The socket's errors (a timeout included); a TLS session that already failed.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Wire::Plain(stream) => stream.write_all(bytes),
            Wire::Tls { stream, session } => {
                let mut session = lock(session)?;
                let mut rest = bytes;
                while !rest.is_empty() {
                    // rustls takes plaintext up to its buffer limit; sending makes room.
                    let n = session.writer().write(rest)?;
                    rest = &rest[n..];
                    if n == 0 && !session.wants_write() {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    while session.wants_write() {
                        session.write_tls(stream)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Shuts both directions of the socket: a reader blocked in `read` returns.
    pub fn shutdown(&self) {
        // NotConnected when the peer already reset us: nothing left to shut.
        let _ = self.socket().shutdown(Shutdown::Both);
    }
}

impl WireReader {
    /// # Errors
    /// As `TcpStream::set_read_timeout`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            WireReader::Plain(stream) | WireReader::Tls { stream, .. } => {
                stream.set_read_timeout(timeout)
            }
        }
    }
}

impl Read for WireReader {
    /// Plaintext, with a blocking socket's contract: `Ok(0)` at the end of the stream (TCP or
    /// TLS `close_notify`), a timeout as `WouldBlock`/`TimedOut`.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (stream, session, cipher, start, end) = match self {
            WireReader::Plain(stream) => return stream.read(buf),
            WireReader::Tls {
                stream,
                session,
                cipher,
                start,
                end,
            } => (stream, session, cipher, start, end),
        };
        loop {
            {
                let mut tls = lock(session)?;
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // TCP closed without close_notify: the WebSocket close handshake (or its
                    // absence) tells whether the conversation was complete.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if start < end {
                    let mut pending = &cipher[*start..*end];
                    let taken = tls.read_tls(&mut pending)?;
                    // 0 with bytes pending: rustls has seen close_notify and reads no more.
                    *start = if taken == 0 { *end } else { *start + taken };
                    if let Err(e) = tls.process_new_packets() {
                        // Tell the server why, if it listens (a fatal alert is queued).
                        let _ = tls.write_tls(stream);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // Whatever processing queued (an alert, a key update) goes out now.
                    while tls.wants_write() {
                        tls.write_tls(stream)?;
                    }
                    continue;
                }
            }
            // Nothing decrypted and nothing pending: wait for the server, without the lock.
            let n = stream.read(cipher)?;
            if n == 0 {
                return Ok(0);
            }
            (*start, *end) = (0, n);
        }
    }
}

fn lock(session: &Mutex<ClientConnection>) -> io::Result<MutexGuard<'_, ClientConnection>> {
    // Poisoned only if the other thread panicked while holding it.
    session
        .lock()
        .map_err(|_| io::Error::other("the TLS session was left broken by a panic"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::config::{client_config, server_config, Trust};
    use crate::tls::test_ca::TestCa;
    use crate::tls::TlsSession;
    use std::net::TcpListener;
    use std::path::Path;

    /// A one-connection TLS echo server on a thread, over a blocking socket: what the client
    /// sends comes back, until it hangs up.
    fn echo_server(ca: &TestCa) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let config = Arc::new(
            server_config(ca.chain.clone(), ca.key(), (Path::new("c"), Path::new("k"))).unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            // `TlsSession::read` returns only when the socket has nothing more (it is made for
            // non-blocking sockets); a short read timeout gives it that moment, so the loop
            // gets to send the handshake answers in between.
            socket
                .set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let mut session = TlsSession::server(config).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                session.write_tls(&mut socket).unwrap();
                match session.read(&mut socket, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => session.writer(&mut socket).write_all(&buf[..n]).unwrap(),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        (addr, handle)
    }

    #[test]
    fn tls_both_ways_over_the_two_halves() {
        let ca = TestCa::new();
        let files = ca.files();
        let (addr, server) = echo_server(&ca);
        let config = Arc::new(client_config(&Trust::CaFile(files.ca.clone())).unwrap());
        let stream = TcpStream::connect(addr).unwrap();
        let mut wire =
            Wire::open(stream, Some(&config), "localhost", Duration::from_secs(5)).unwrap();
        let mut reader = wire.reader().unwrap();
        reader
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // More than one record's worth, so the reader decrypts across several reads.
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let writer = std::thread::spawn({
            let sent = sent.clone();
            move || {
                wire.write_all(&sent).unwrap();
                wire
            }
        });
        let mut received = vec![0u8; sent.len()];
        reader.read_exact(&mut received).unwrap();
        assert!(received == sent);
        let wire = writer.join().unwrap();
        wire.shutdown();
        assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);
        server.join().unwrap();
    }

    #[test]
    fn an_untrusted_server_fails_the_handshake() {
        let ca = TestCa::new();
        let (addr, _server) = echo_server(&ca);
        let config = Arc::new(client_config(&Trust::PublicRoots).unwrap());
        let stream = TcpStream::connect(addr).unwrap();
        let e = Wire::open(stream, Some(&config), "localhost", Duration::from_secs(5)).unwrap_err();
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(inner, Some(rustls::Error::InvalidCertificate(_))),
            "{e}"
        );
    }
}
