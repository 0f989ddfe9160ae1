//! Helpers for the privileged data-plane tests (tests/*.rs): a packet builder, the policy and
//! flow generators, flows turned into frames with what the program must do with them, and a
//! harness that runs frames through the loaded XDP program with `BPF_PROG_TEST_RUN` and checks
//! verdicts and counters.
//!
//! The tests need root (they load programs and create maps); without it they print why and
//! pass without checking anything. CI runs them as root.

pub mod harness;
pub mod packet;
pub mod policy;
pub mod policygen;
pub mod probe;
