//! The ingress IPv4 hash is preallocated, so a generation's starts with room for 65,536
//! probed prefixes (fw-loader's `V4_HASH_FIRST`) rather than the table's whole capacity, and
//! gets a bigger one when a policy's probed prefixes outgrow it: through `apply`, which sees
//! it before writing; `apply_changes` refuses such a delta before writing anything, with
//! `StaleBase`, which sends its callers to `apply`. A process that adopts the pins knows the
//! hash's size from the kernel, and counts what it holds before a delta could overfill it.
//!
//! The hash of the table's chunks is preallocated too, with room for 1,024 chunks to start
//! (fw-loader's `DIR_HASH_FIRST`), and grows the same way.

use std::net::Ipv4Addr;

use aya::maps::MapData;
use fw_compiler::compile::compile;
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::Capacities;
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::PinRoot as Root;
use fw_dataplane_tests::harness::privileged;
use fw_dataplane_tests::packet::{ETH_P_IP, Ipv4, ethernet, tcp};
use fw_loader::{Dataplane, Error, XdpAction};

/// The hash's first size (fw-loader's `V4_HASH_FIRST`).
const FIRST: u32 = 1 << 16;
/// The chunk hash's first size (fw-loader's `DIR_HASH_FIRST`): the 256 first-level chunks
/// and 768 second-level ones.
const DIR_FIRST: u32 = 1 << 10;

/// The `i`th host: 10.x.y.z, one /32 each, none in a /24 of another, so every host is a
/// probed prefix under its /16's second-level chunk.
fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0001 + (i << 8))
}

/// The `i`th host in a /16 of its own: (10 + i / 256).(i % 256).0.1, so each has a
/// second-level chunk of its own.
fn spread_host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0001 + (i << 16))
}

/// Port 22 allowed from hosts `0..n`, everything else denied.
fn state(n: u32) -> (Encoded, String) {
    state_of(host, n)
}

/// Port 22 allowed from hosts `host(0..n)`, everything else denied.
fn state_of(host: fn(u32) -> Ipv4Addr, n: u32) -> (Encoded, String) {
    let from: Vec<String> = (0..n).map(|i| format!("{}/32", host(i))).collect();
    let yaml = format!(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: p}}\nspec:\n  defaults: {{ingress: deny}}\n  ingress:\n\
         \x20   - {{name: a, action: allow, proto: tcp, ports: [22], from: [{}]}}\n",
        from.join(", ")
    );
    let loaded = load([Input::new("p.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "web-1".into(), ..HostIdentity::default() };
    let state = compile(&set.for_host(&host), &Capacities::default()).expect("compiles");
    (encode(&state), state.digest())
}

fn run(dp: &Dataplane, src: Ipv4Addr) -> XdpAction {
    let frame = ethernet(&[], ETH_P_IP, &Ipv4::new(src, 6).build(&tcp(22)));
    dp.test_run_ingress(&frame).expect("test run").action
}

/// Hosts `0..n` pass (a sample, the last one included), host `n` and a host outside drop.
#[track_caller]
fn assert_allows(dp: &Dataplane, n: u32, step: &str) {
    assert_allows_of(dp, host, 997, n, step);
}

/// Hosts `host(0..n)` pass (every `step`th, the last one included), host `n` and a host
/// outside drop.
#[track_caller]
fn assert_allows_of(dp: &Dataplane, host: fn(u32) -> Ipv4Addr, every: usize, n: u32, step: &str) {
    for i in (0..n).step_by(every).chain([n - 1]) {
        assert_eq!(run(dp, host(i)), XdpAction::Pass, "{step}: host {i}");
    }
    assert_eq!(run(dp, host(n)), XdpAction::Drop, "{step}: host {n}");
    assert_eq!(run(dp, Ipv4Addr::new(192, 0, 2, 1)), XdpAction::Drop, "{step}");
}

/// Both generations read back exactly `want` (the workload table aside).
#[track_caller]
fn assert_holds(dp: &Dataplane, want: &Encoded) {
    let mut want = want.clone();
    want.maps.remove(fw_common::maps::WORKLOADS);
    for g in 0..2 {
        assert!(dp.read_generation(g).expect("read") == want, "generation {g}");
    }
}

/// The size of generation `g`'s pinned hash.
fn hash_size(root: &Root, g: u32) -> u32 {
    pinned_size(root, "FW_IN_V4", g)
}

/// The size of generation `g`'s pinned inner map of `outer`.
fn pinned_size(root: &Root, outer: &str, g: u32) -> u32 {
    let data = MapData::from_pin(root.0.join(format!("{outer}_G{g}"))).expect("pin");
    data.info().expect("info").max_entries()
}

#[test]
fn the_prefix_hash_grows_when_its_probed_prefixes_outgrow_it() {
    if !privileged("the_prefix_hash_grows_when_its_probed_prefixes_outgrow_it") {
        return;
    }
    let root = Root::new("v4grow");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    assert_eq!([hash_size(&root, 0), hash_size(&root, 1)], [FIRST, FIRST]);

    // 60,000 hosts fit the first size: nothing grows.
    let (small, ds) = state(60_000);
    let report = dp.apply(&small, "small", &ds, b"s").expect("apply");
    assert!(report.grown.is_empty(), "{report:?}");
    assert_allows(&dp, 60_000, "small");

    // 70,000 as deltas: refused before anything is written.
    let (big, db) = state(70_000);
    let changes = fw_loader::entry_delta(&small, &big);
    match dp.apply_changes(&ds, &changes, "big", &db, b"s") {
        Err(Error::StaleBase) => {}
        other => panic!("a delta that overfills the hash: {other:?}"),
    }
    assert_allows(&dp, 60_000, "after the refused delta");
    assert_holds(&dp, &small);

    // Whole: both generations get a hash of the next power of two.
    let report = dp.apply(&big, "big", &db, b"s").expect("apply");
    let mut grown = report.grown.clone();
    grown.sort_unstable();
    assert_eq!(grown, [0, 1], "{report:?}");
    assert_eq!([hash_size(&root, 0), hash_size(&root, 1)], [2 * FIRST, 2 * FIRST]);
    assert_allows(&dp, 70_000, "big");
    assert_holds(&dp, &big);

    // Another process adopts the pins and reads them back (the same state writes nothing);
    // not having written the hash, it counts what the hash holds before the next delta, which
    // fits, and writes it as a delta.
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    let again = adopted.apply(&big, "big", &db, b"s").expect("apply");
    assert_eq!((again.standby.written, again.standby.deleted), (0, 0), "{again:?}");
    let (more, dm) = state(70_001);
    let changes = fw_loader::entry_delta(&big, &more);
    let report = adopted.apply_changes(&db, &changes, "more", &dm, b"s").expect("a delta");
    assert!(report.grown.is_empty(), "{report:?}");
    assert_allows(&adopted, 70_001, "more");
    assert_holds(&adopted, &more);
}

#[test]
fn the_chunk_hash_grows_when_a_policy_has_more_chunks() {
    if !privileged("the_chunk_hash_grows_when_a_policy_has_more_chunks") {
        return;
    }
    let root = Root::new("dirgrow");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let size = |g| pinned_size(&root, "FW_IN_V4_DIR", g);
    assert_eq!([size(0), size(1)], [DIR_FIRST, DIR_FIRST]);

    // 768 /16s with a second-level chunk each, and the 256 first-level chunks: full, but fit.
    let chunks = |e: &Encoded| e.maps.get(fw_common::maps::INGRESS_V4_DIR).map_or(0, |m| m.len());
    let (small, ds) = state_of(spread_host, 768);
    assert_eq!(chunks(&small), DIR_FIRST as usize);
    let report = dp.apply(&small, "small", &ds, b"s").expect("apply");
    assert!(report.grown.is_empty(), "{report:?}");
    assert_allows_of(&dp, spread_host, 7, 768, "small");

    // One /16 more as a delta: refused before anything is written.
    let (big, db) = state_of(spread_host, 769);
    assert_eq!(chunks(&big), DIR_FIRST as usize + 1);
    let changes = fw_loader::entry_delta(&small, &big);
    match dp.apply_changes(&ds, &changes, "big", &db, b"s") {
        Err(Error::StaleBase) => {}
        other => panic!("a delta that overfills the chunk hash: {other:?}"),
    }
    assert_allows_of(&dp, spread_host, 7, 768, "after the refused delta");
    assert_holds(&dp, &small);

    // Whole: both generations get a chunk hash of the next power of two.
    let report = dp.apply(&big, "big", &db, b"s").expect("apply");
    let mut grown = report.grown.clone();
    grown.sort_unstable();
    assert_eq!(grown, [0, 1], "{report:?}");
    assert_eq!([size(0), size(1)], [2 * DIR_FIRST, 2 * DIR_FIRST]);
    assert_allows_of(&dp, spread_host, 7, 769, "big");
    assert_holds(&dp, &big);

    // An adopting process knows the size from the kernel: after reading the generations back
    // (the same state writes nothing), a delta that fits is written as one.
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    let again = adopted.apply(&big, "big", &db, b"s").expect("apply");
    assert_eq!((again.standby.written, again.standby.deleted), (0, 0), "{again:?}");
    let (more, dm) = state_of(spread_host, 770);
    let changes = fw_loader::entry_delta(&big, &more);
    let report = adopted.apply_changes(&db, &changes, "more", &dm, b"s").expect("a delta");
    assert!(report.grown.is_empty(), "{report:?}");
    assert_allows_of(&adopted, spread_host, 7, 770, "more");
    assert_holds(&adopted, &more);
}
