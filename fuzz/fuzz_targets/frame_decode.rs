//! Fuzz target: the frame decoder and message assembler on arbitrary bytes.
//! The invariants live in `wsrelay::protocol::decoder::fuzz_check` so that the stable test
//! suite can replay the corpus through the very same checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsrelay::protocol::decoder::fuzz_check(data);
});
