//! Fuzz target: the frame reader the server, the client and the bench all use
//! (`wsrelay::protocol::decoder::FrameReader`), on arbitrary bytes cut at arbitrary points.
//! The invariants live in `wsrelay::protocol::decoder::fuzz::check` (compiled under
//! `--cfg fuzzing`, which cargo fuzz sets) so that the stable test suite can replay the corpus
//! through the very same checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsrelay::protocol::decoder::fuzz::check(data);
});
