//! The pool of second-level IPv4 chunks (`FW_IN_V4_D2`, derived by the loader from the chunk
//! hash `FW_IN_V4_DIR`): the program reads a /16's second-level chunk from the pool slot its
//! first-level slot in `FW_IN_V4_D1` names, and asks the hash when the slot names none.
//!
//! The differential test covers random policies with the whole pool; this file pins what a
//! wrong pool would change: a state with more second-level chunks than a (deliberately small)
//! pool holds, which must give the reference verdicts through the hash for the /16s left out;
//! applies of the difference that add and remove second-level chunks (slots freed and taken
//! again, in both generations); and a pool slot or a reference changed behind the loader's
//! back, which the program follows (so the pool really is what it reads) and reading the
//! generation back refuses.

use fw_dataplane_tests::harness::PinRoot as Root;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use aya::maps::{Array, Map, MapData};
use fw_common::{V4_DIR_POOL_CHUNKS, V4Dir1Chunk, V4DirChunk, maps};
use fw_compiler::ast::Direction;
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::mapstate::Capacities;
use fw_compiler::model::{Flow, HostPolicy};
use fw_dataplane_tests::packet::tcp_frame;
use fw_dataplane_tests::policy::host_policy;
use fw_dataplane_tests::policygen::enforcing_only;
use fw_dataplane_tests::probe::Expectation;
use fw_loader::{Dataplane, XdpAction};

/// A policy over the /16s `10.i.0.0/16` for each `i` of `nets`: TCP 22 allowed from the /16,
/// TCP 443 from the /24 `10.i.1.0/24` inside it, and denied from the host `10.i.1.7` inside
/// that; for each `i` of `more` also TCP 443 from `10.i.3.0/24` (a second-level chunk that
/// differs). Each /16 holds longer prefixes, so each has a second-level chunk.
fn policy(nets: &[u8], more: &[u8]) -> String {
    let list = |f: &dyn Fn(u8) -> String| nets.iter().map(|&i| f(i)).collect::<Vec<_>>().join(", ");
    let subs: Vec<String> = nets
        .iter()
        .map(|i| format!("10.{i}.1.0/24"))
        .chain(more.iter().map(|i| format!("10.{i}.3.0/24")))
        .collect();
    format!(
        r#"
apiVersion: fw/v1
kind: Policy
metadata: {{name: pool}}
spec:
  defaults: {{ingress: deny}}
  ingress:
    - {{name: hosts, action: deny, from: [{}], proto: tcp, ports: [443]}}
    - {{name: subs, action: allow, from: [{}], proto: tcp, ports: [443]}}
    - {{name: nets, action: allow, from: [{}], proto: tcp, ports: [22]}}
"#,
        list(&|i| format!("10.{i}.1.7/32")),
        subs.join(", "),
        list(&|i| format!("10.{i}.0.0/16")),
    )
}

/// The policy of `nets` and `more`, resolved and encoded.
fn compiled_with(nets: &[u8], more: &[u8]) -> (HostPolicy, Encoded, String) {
    let hp = host_policy(&policy(nets, more));
    let st = fw_compiler::compile::compile(&hp, &Capacities::default()).expect("compiles");
    let digest = st.digest();
    (hp, encode(&st), digest)
}

/// The policy of `nets`, resolved and encoded.
fn compiled(nets: &[u8]) -> (HostPolicy, Encoded, String) {
    compiled_with(nets, &[])
}

/// The second-level chunks `encoded` holds (chunk keys from 256 on).
fn level2_chunks(encoded: &Encoded) -> usize {
    encoded.maps[maps::INGRESS_V4_DIR].len() - 256
}

/// Sources at every level of the /16s 0..32: the host, its /24, other /24s of the /16 in the
/// same /21 (so the first-level slot sends them to the second level; one of them is `more`'s),
/// a /24 far away in the /16, and one outside any /16 of the policy.
fn sources() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for i in 0..32 {
        for (c, d) in [(1, 7), (1, 8), (2, 7), (3, 5), (200, 1)] {
            out.push(Ipv4Addr::new(10, i, c, d));
        }
    }
    out.push(Ipv4Addr::new(192, 0, 2, 1));
    out
}

/// Holds every source's TCP 22 and 443 verdict in the active generation against the reference
/// evaluator's; `context` names the case.
fn assert_reference(dp: &Dataplane, hp: &HostPolicy, context: &str) {
    let only = enforcing_only(hp);
    let mut failures = Vec::new();
    for src in sources() {
        for port in [22, 443] {
            let mut flow = Flow::new(Direction::Ingress, IpAddr::V4(src), 6);
            flow.port = Some(port);
            let want = Expectation::of_flow(hp, &only, &flow).action;
            let got = dp.test_run_ingress(&tcp_frame(src, port)).expect("run").action;
            if got != want {
                failures.push(format!("{src} tcp/{port}: {got:?}, expected {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{context}:\n{}", failures.join("\n"));
}

/// Both generations read back as `encoded` (the arrays checked against the hash) and give the
/// reference verdicts; generation 0 is left active.
fn assert_both_generations(dp: &mut Dataplane, hp: &HostPolicy, encoded: &Encoded, case: &str) {
    let mut want = encoded.clone();
    want.maps.remove(maps::WORKLOADS);
    for g in [1, 0] {
        assert_eq!(dp.read_generation(g).expect("read"), want, "{case}: generation {g}");
        dp.set_active_generation(g).expect("flip");
        assert_reference(dp, hp, &format!("{case}: generation {g}"));
    }
}

/// How many /16s have their second-level chunk in the active generation's pool (the map
/// status), and the pool's capacity.
fn pool_status(dp: &Dataplane) -> (usize, u32) {
    let status = dp.status().expect("status");
    let m = status.maps.iter().find(|m| m.name == maps::INGRESS_V4_DIR2).expect("pool status");
    (m.entries, m.capacity)
}

/// Generation `g`'s inner map `name`, from its pin.
fn pinned_array<V: aya::Pod>(root: &Path, name: &str, g: u32) -> Array<MapData, V> {
    let pin = root.join(format!("{name}_G{g}"));
    Array::try_from(Map::Array(MapData::from_pin(pin).expect("pin"))).expect("array")
}

#[test]
fn chunks_beyond_a_small_pool_are_found_in_the_hash() {
    if !fw_dataplane_tests::harness::privileged("chunks_beyond_a_small_pool_are_found_in_the_hash")
    {
        return;
    }
    let root = Root::new("pool-small");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let nets: Vec<u8> = (0..12).collect();
    let (hp, e, digest) = compiled(&nets);
    assert_eq!(level2_chunks(&e), 12, "one second-level chunk per /16");

    // A pool of 5: seven /16s are looked up in the hash.
    dp.limit_v4_dir_pool(5);
    dp.apply(&e, "r1", &digest, b"one").expect("apply");
    assert_eq!(pool_status(&dp), (5, V4_DIR_POOL_CHUNKS));
    assert_both_generations(&mut dp, &hp, &e, "pool of 5");

    // The whole pool again: a full write takes slots for the /16s left out.
    dp.limit_v4_dir_pool(V4_DIR_POOL_CHUNKS);
    for g in [1, 0] {
        dp.write_generation(g, &e).expect("write");
    }
    assert_eq!(pool_status(&dp), (12, V4_DIR_POOL_CHUNKS));
    assert_both_generations(&mut dp, &hp, &e, "whole pool");

    // No pool at all: every /16 from the hash, and what the pool held is let go.
    dp.limit_v4_dir_pool(0);
    let (hp2, e2, digest2) = compiled(&[20, 21]);
    dp.apply(&e2, "r2", &digest2, b"two").expect("apply");
    assert_eq!(pool_status(&dp), (0, V4_DIR_POOL_CHUNKS));
    assert_both_generations(&mut dp, &hp2, &e2, "no pool");
}

#[test]
fn an_apply_of_the_difference_adds_and_removes_second_level_chunks() {
    let name = "an_apply_of_the_difference_adds_and_removes_second_level_chunks";
    if !fw_dataplane_tests::harness::privileged(name) {
        return;
    }
    let root = Root::new("pool-delta");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    // A pool of 6 for 6 chunks: full.
    dp.limit_v4_dir_pool(6);
    let (hp1, e1, d1) = compiled(&[0, 1, 2, 3, 4, 5]);
    dp.apply(&e1, "r1", &d1, b"one").expect("apply");
    assert_eq!(pool_status(&dp).0, 6);
    assert_both_generations(&mut dp, &hp1, &e1, "before");

    // /16s 2 and 3 go, 7, 8 and 9 come: two freed slots for three new chunks, so one new
    // /16 is looked up in the hash; /16s 0 and 7 get a second /24 (0's chunk is rewritten in
    // its slot).
    let (hp2, e2, d2) = compiled_with(&[0, 1, 4, 5, 7, 8, 9], &[0, 7]);
    let r = dp.apply(&e2, "r2", &d2, b"two").expect("apply");
    assert!(r.standby.written + r.standby.deleted < 60, "only the difference: {r:?}");
    assert_eq!(pool_status(&dp).0, 6);
    assert_both_generations(&mut dp, &hp2, &e2, "after adding and removing");

    // Back: every chunk fits again.
    let r = dp.apply(&e1, "r3", &d1, b"three").expect("apply");
    assert!(r.standby.written + r.standby.deleted < 60, "only the difference: {r:?}");
    assert_eq!(pool_status(&dp).0, 6);
    assert_both_generations(&mut dp, &hp1, &e1, "back");

    // A process adopting the pins learns the allocation from the first-level array: its
    // deltas take free slots only.
    drop(dp);
    let mut dp = Dataplane::adopt(&root.0).expect("adopt");
    let (hp3, e3, d3) = compiled(&[0, 1, 2, 3, 4, 5, 10, 11]);
    dp.apply(&e3, "r4", &d3, b"four").expect("apply");
    assert_eq!(pool_status(&dp).0, 8);
    assert_both_generations(&mut dp, &hp3, &e3, "adopted");

    // And one that only removes chunks (references dropped without reading the allocation);
    // the next allocation still finds those slots free.
    drop(dp);
    let mut dp = Dataplane::adopt(&root.0).expect("adopt");
    dp.apply(&e1, "r5", &d1, b"five").expect("apply");
    assert_eq!(pool_status(&dp).0, 6);
    assert_both_generations(&mut dp, &hp1, &e1, "adopted, removed");
    dp.limit_v4_dir_pool(8);
    dp.apply(&e3, "r6", &d3, b"six").expect("apply");
    assert_eq!(pool_status(&dp).0, 8);
    assert_both_generations(&mut dp, &hp3, &e3, "adopted, added in a pool of 8");
}

#[test]
fn the_program_reads_the_pool_and_reading_back_refuses_a_wrong_one() {
    let name = "the_program_reads_the_pool_and_reading_back_refuses_a_wrong_one";
    if !fw_dataplane_tests::harness::privileged(name) {
        return;
    }
    let root = Root::new("pool-rb");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (hp, e, digest) = compiled(&[0, 1, 2]);
    dp.apply(&e, "r1", &digest, b"one").expect("apply");
    dp.read_generation(1).expect("read");
    dp.set_active_generation(1).expect("flip");
    let sub = Ipv4Addr::new(10, 1, 1, 8);
    let run = |dp: &Dataplane| dp.test_run_ingress(&tcp_frame(sub, 443)).expect("run").action;
    assert_eq!(run(&dp), XdpAction::Pass, "the /24's rule");

    let mut level1: Array<MapData, V4Dir1Chunk> = pinned_array(&root.0, maps::INGRESS_V4_DIR1, 1);
    let mut pool: Array<MapData, V4DirChunk> = pinned_array(&root.0, maps::INGRESS_V4_DIR2, 1);
    // 10.1/16: first-level chunk 10, slot 1.
    let l1 = level1.get(&10, 0).expect("chunk");
    let index = l1.slots[1].pool.checked_sub(1).expect("10.1/16 has a pool slot");
    let held = pool.get(&index, 0).expect("pool chunk");
    let expect_refused = |dp: &Dataplane, case: &str| match dp.read_generation(1) {
        Err(fw_loader::Error::VerifyFailed(name)) => {
            assert_eq!(name, maps::INGRESS_V4_DIR2, "{case}")
        }
        other => panic!("{case}: read back {other:?}"),
    };

    // The pool slot loses the /24 10.1.1.0's classes: the program follows it (the /24's
    // rule no longer matches), and reading back refuses it.
    let mut wrong = held;
    wrong.slots[1] = Default::default();
    pool.set(index, wrong, 0).expect("corrupt");
    assert_eq!(run(&dp), XdpAction::Drop, "the program reads the pool slot");
    expect_refused(&dp, "a pool chunk unlike the hash's");

    // Without the reference the program asks the hash, which is right.
    let mut no_ref = l1;
    no_ref.slots[1].pool = 0;
    level1.set(10, no_ref, 0).expect("unref");
    assert_eq!(run(&dp), XdpAction::Pass, "the hash when the slot names no pool chunk");
    dp.read_generation(1).expect("no reference reads back: the /16 is in the hash");
    pool.set(index, held, 0).expect("restore");

    // References the loader never makes: past the pool, to another /16's slot, and for a
    // /16 the hash has no chunk for.
    let other = l1.slots[2].pool;
    assert_ne!(other, 0, "10.2/16 has a pool slot");
    for (case, slot, pool_ref) in [
        ("past the pool", 1, V4_DIR_POOL_CHUNKS + 1),
        ("another /16's slot", 1, other),
        ("a /16 without a chunk", 200, other),
    ] {
        let mut bad = l1;
        bad.slots[slot].pool = pool_ref;
        level1.set(10, bad, 0).expect("corrupt");
        expect_refused(&dp, case);
    }
    level1.set(10, l1, 0).expect("restore");
    let mut want = e.clone();
    want.maps.remove(maps::WORKLOADS);
    assert_eq!(dp.read_generation(1).expect("read"), want);
    assert_reference(&dp, &hp, "restored");
}
