//! Fuzz target: arbitrary bytes as one policy file through the whole front door, and when a
//! policy set comes out, compile it for a few hosts and hold the compiled lookup against the
//! reference evaluator on flows derived from the input.
//!
//! The check itself is shared with the benchmark and `tests/no_panic.rs` (which runs it on
//! stable over mutated seeds), so all three exercise the same oracle. A panic anywhere, or an
//! `Err` from the oracle (lookup and evaluation disagree, two compiles differ, a compile fails
//! on a valid set for a reason other than capacity), is a crash.

#![no_main]

#[path = "../../crates/fw-compiler/benches/oracle/mod.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fewer flows than the default budget so the fuzzer runs more inputs per second; fuzz
    // inputs are small, so every boundary point of their rules usually still fits.
    let budget = oracle::Budget { flows_per_host: 200, hosts: 6, determinism: true };
    if let Err(finding) = oracle::check_bytes(data, &budget) {
        panic!("{finding}");
    }
});
