//! Fuzzes the HTTP upgrade handshake: parse, validate, respond, and chunked feeding.
//! The assertions live in `wsrelay::protocol::handshake::fuzz::check` (compiled under
//! `--cfg fuzzing`) so the corpus replay test on stable runs exactly the same checks.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsrelay::protocol::handshake::fuzz::check(data);
});
