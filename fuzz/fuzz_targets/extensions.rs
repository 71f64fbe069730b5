//! Fuzzes Sec-WebSocket-Extensions: the offer parser, the server's choice and the client's
//! check of the answer. The assertions live in
//! `wsrelay::protocol::deflate::negotiate::fuzz::check` so the corpus replay test on stable runs
//! exactly the same checks.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsrelay::protocol::deflate::negotiate::fuzz::check(data);
});
