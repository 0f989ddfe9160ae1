//! The kernel's XDP ingress program against the reference evaluator, on random policies.
//!
//! For each random host policy: compile, encode, write the encoded state into a generation of
//! the loaded program (alternating generations, so every case also flips), read it back and
//! compare, flip to it, then send frames for random ingress flows in random shapes (VLAN tags,
//! IPv4 options, IPv6 extension headers, fragments, truncations) and hold every verdict
//! against `eval::evaluate` and the counters against the deciding rules (see
//! `fw_dataplane_tests::probe` for the exact contract). The program is loaded once; each case
//! rewrites its maps. `PROPTEST_CASES` sets the number of policies (default 256).
//!
//! The ingress IPv4 table has two layouts (`EncodeOptions::v4_dir_l2_budget`): second-level
//! chunks for the /16s holding longer prefixes (the default), and none, so the hash is probed
//! per length under every such /16. Cases alternate between them, so each generation is
//! rewritten from one layout to the other. Every other four cases run with a pool of
//! second-level chunks (`FW_IN_V4_D2`) of one slot (`Dataplane::limit_v4_dir_pool`; random
//! policies seldom have more than two /16s with a chunk), so /16s whose chunk the program
//! finds in the hash meet /16s whose chunk is in the pool, and slots are freed and taken
//! again as the generations are rewritten.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use fw_common::{V4_DIR_POOL_CHUNKS, maps};
use fw_compiler::compile::compile;
use fw_compiler::encode::{EncodeOptions, encode_with};
use fw_compiler::mapstate::Capacities;
use fw_dataplane_tests::harness::{Harness, privileged};
use fw_dataplane_tests::policygen::{enforcing_only, policy_and_flows};
use fw_dataplane_tests::probe::{Cuts, Expectation, Probe, arp_cuts, arp_frame, shape};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const FLOWS_PER_POLICY: usize = 48;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

#[test]
fn xdp_ingress_agrees_with_the_evaluator() {
    if !privileged("xdp_ingress_agrees_with_the_evaluator") {
        return;
    }
    let started = Instant::now();
    let harness = RefCell::new(Harness::load().expect("load the eBPF object"));
    let loaded = started.elapsed();
    let case = Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        // The failing input is printed; there is no source file to persist regressions next to.
        failure_persistence: None,
        ..Config::default()
    });
    let strategy =
        (policy_and_flows(FLOWS_PER_POLICY), prop::collection::vec(shape(), FLOWS_PER_POLICY));
    let result = runner.run(&strategy, |((policy, flows), shapes)| {
        let mut h = harness.borrow_mut();
        let state = compile(&policy, &Capacities::default()).map_err(|d| fail(format!("{d:?}")))?;
        // Cases 0, 1 | 2, 3 | ...: both layouts in each generation, in turn.
        let budget = if (case.get() / 2).is_multiple_of(2) {
            EncodeOptions::default().v4_dir_l2_budget
        } else {
            0
        };
        let encoded = encode_with(&state, &EncodeOptions { v4_dir_l2_budget: budget });
        // Cases 0-3 | 4-7 | ...: the whole pool, then one slot.
        let whole_pool = (case.get() / 4).is_multiple_of(2);
        h.dp.limit_v4_dir_pool(if whole_pool { V4_DIR_POOL_CHUNKS } else { 1 });
        prop_assert!(
            budget > 0 || encoded.maps[maps::INGRESS_V4_DIR].len() == 256,
            "budget 0 builds no second-level chunk"
        );

        // Write the standby generation, verify it, flip.
        let generation = case.get() % fw_common::GENERATIONS;
        case.set(case.get() + 1);
        h.dp.write_generation(generation, &encoded).map_err(fail)?;
        let mut written = encoded.clone();
        written.maps.remove(maps::WORKLOADS);
        let back = h.dp.read_generation(generation).map_err(fail)?;
        prop_assert_eq!(&back, &written, "read back differs from what was written");
        h.dp.set_active_generation(generation).map_err(fail)?;
        h.reset().map_err(fail)?;

        let only = enforcing_only(&policy);
        for (flow, shape) in flows.iter().zip(&shapes) {
            let expect = Expectation::of_flow(&policy, &only, flow);
            let context = |e: String| fail(format!("{e}\nflow {flow:?}\nshape {shape:?}"));
            if flow.arp {
                h.run(&arp_frame(&shape.tags), &expect).map_err(context)?;
                if shape.cuts != Cuts::None {
                    for (frame, e) in arp_cuts(&shape.tags, &expect) {
                        h.run(&frame, &e).map_err(context)?;
                    }
                }
                continue;
            }
            let probe = Probe::new(flow, shape);
            h.run(&probe.frame, &expect).map_err(context)?;
            match shape.cuts {
                Cuts::None => {}
                Cuts::Raw => {
                    for (frame, e) in probe.raw_cuts() {
                        h.run(&frame, &e).map_err(context)?;
                    }
                }
                Cuts::Consistent => {
                    for (frame, e) in probe.consistent_cuts(&expect) {
                        h.run(&frame, &e).map_err(context)?;
                    }
                }
            }
        }
        if let Err(e) = h.check_counters() {
            let culprit = h.pinpoint();
            return Err(fail(format!("{e}\nfirst frame with wrong counters: {culprit}")));
        }
        Ok(())
    });
    let h = harness.borrow();
    eprintln!(
        "{} policies, {} test runs in {:.2?} (load {:.2?})",
        case.get(),
        h.runs,
        started.elapsed(),
        loaded
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
