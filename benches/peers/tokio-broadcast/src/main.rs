//! tokio-tungstenite broadcast rooms on a current-thread runtime: the baseline wsrelay's
//! `/r/<room>` is compared against in docs/benchmarks.md. Usage: `tokio-broadcast 127.0.0.1:9003`.
//! Prints "listening on ADDR" once bound.
//!
//! Same contract as wsrelay's raw rooms (SPEC §6): connect to `/r/<room>` and you are a member;
//! every text or binary message goes, same opcode, to every *other* member; a room disappears
//! with its last member. Any other path gets a 404 before the upgrade.
//!
//! The shape is the usual tokio one, with the care a fair comparison needs:
//! * One thread: a current-thread runtime, every task on a `LocalSet`, so the rooms are plain
//!   `Rc<RefCell<..>>` without locks or atomics of our own.
//! * Two tasks per connection: the reader relays what the client sends; the writer owns the
//!   sink and drains the connection's unbounded channel.
//! * A message is received once and shared: `Message::Text` holds `Utf8Bytes` and
//!   `Message::Binary` holds `Bytes`, both reference-counted, so the clone sent to each member
//!   is a reference-count increment, never a payload copy. (tungstenite still encodes a frame
//!   per recipient into that connection's write buffer; that is its design.)
//! * Batched writes: the writer takes everything its channel holds (`recv_many`), feeds it into
//!   tungstenite's write buffer without flushing, then flushes once. All the messages a
//!   recipient got from one wake-up leave in one write, as in wsrelay.
//! * Memory is unbounded per slow consumer (an unbounded channel); wsrelay caps it at
//!   `--max-outbound`. The bench's flow control never lets a queue grow far.

use futures_util::{SinkExt, StreamExt};
use slab::Slab;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::LocalSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The members of one room: each member's channel to its writer task.
type Members = Rc<RefCell<Slab<UnboundedSender<Message>>>>;

/// Every room by name. A room is here iff it has a member.
type Rooms = Rc<RefCell<HashMap<String, Members>>>;

/// Most messages a writer takes from its channel before it flushes: as many as wsrelay puts in
/// one `writev` (IOV_MAX), so neither server splits a backlog the other sends at once.
const BATCH: usize = 1024;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9003".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    LocalSet::new().block_on(&runtime, async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        println!("listening on {}", listener.local_addr().expect("addr"));
        let rooms = Rooms::default();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::task::spawn_local(serve(stream, Rc::clone(&rooms)));
        }
    });
}

/// The room a path names: `/r/<room>`, 1-64 characters of `A-Z a-z 0-9 . _ -` (SPEC §6).
fn room_of(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/r/")?;
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    valid.then_some(name)
}

/// One connection: handshake, join, relay until the client leaves, leave.
async fn serve(stream: TcpStream, rooms: Rooms) {
    let mut room = None;
    // The path is only known inside the handshake callback: keep the name, or refuse with 404.
    // (The large error type is tungstenite's `Callback` signature, not a choice.)
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        match room_of(request.uri().path()) {
            Some(name) => {
                room = Some(name.to_owned());
                Ok(response)
            }
            None => {
                let mut refusal = ErrorResponse::new(Some("no such endpoint\n".into()));
                *refusal.status_mut() = StatusCode::NOT_FOUND;
                Err(refusal)
            }
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    let Some(name) = room else {
        return;
    };

    let (tx, rx) = mpsc::unbounded_channel();
    let members = Rc::clone(rooms.borrow_mut().entry(name.clone()).or_default());
    let me = members.borrow_mut().insert(tx);
    let (sink, mut source) = ws.split();
    let writer = tokio::task::spawn_local(write_batches(sink, rx));

    // Reading past the client's Close lets tungstenite send its reply, then the stream ends.
    while let Some(Ok(message)) = source.next().await {
        if !(message.is_text() || message.is_binary()) {
            continue; // tungstenite answers pings itself
        }
        for (key, member) in members.borrow().iter() {
            if key != me {
                // A cheap clone: the payload is reference-counted. An error means that member's
                // writer is gone (its connection is closing); it leaves the room by itself.
                let _ = member.send(message.clone());
            }
        }
    }

    // Leave: dropping our sender ends our writer once it has written what was queued.
    let empty = {
        let mut list = members.borrow_mut();
        list.remove(me);
        list.is_empty()
    };
    if empty {
        rooms.borrow_mut().remove(&name);
    }
    let _ = writer.await;
}

/// Writes everything the channel holds, one flush per batch; ends when the member leaves.
async fn write_batches(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
    mut rx: UnboundedReceiver<Message>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for message in batch.drain(..) {
            // `feed` only encodes into tungstenite's write buffer (it writes to the socket
            // itself only past `write_buffer_size`, 128 KiB); `flush` below does the write.
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}
