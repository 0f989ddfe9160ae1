//! The ingress IPv4 table split between the hash the program probes and the loader's record
//! of the prefixes it never probes (fw-loader's `v4rest`): a /16 gaining or losing its
//! second-level chunk moves its /17-/24 prefixes between the two, whether the change comes
//! whole (`apply`) or as deltas (`apply_changes`); packets still find every prefix, and a
//! generation reads back exactly. A generation laid out by an older loader (every prefix in
//! the hash, no record) reads back exactly too and is re-sorted by the next apply.

use fw_dataplane_tests::harness::PinRoot as Root;
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use fw_common::{Bytes as _, Ipv4LpmKey};
use fw_compiler::compile::compile;
use fw_compiler::encode::{EncodeOptions, Encoded, encode_with};
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_dataplane_tests::packet::{ETH_P_IP, Ipv4, ethernet, tcp};
use fw_loader::{Dataplane, XdpAction};

/// Port 22 from the prefixes of at most /20, port 80 from the longer ones (two rules, so the
/// compiler keeps the nested prefixes apart).
fn state(from: &[&str]) -> MapState {
    let short = |n: &&&str| n.split('/').nth(1).and_then(|l| l.parse::<u8>().ok()) <= Some(20);
    let (wide, long): (Vec<&str>, Vec<&str>) = from.iter().partition(short);
    let yaml = format!(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: p}}\nspec:\n  defaults: {{ingress: deny}}\n  ingress:\n\
         \x20   - {{name: a, action: allow, proto: tcp, ports: [22], from: [{}]}}\n\
         \x20   - {{name: b, action: allow, proto: tcp, ports: [80], from: [{}]}}\n",
        wide.join(", "),
        long.join(", ")
    );
    let loaded = load([Input::new("p.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "web-1".into(), ..HostIdentity::default() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compiles")
}

/// One second-level chunk at most: the /16 with the most prefixes longer than /16 gets it,
/// the others are probed in the hash at /17-/32.
fn encoded(from: &[&str]) -> (Encoded, String) {
    let s = state(from);
    (encode_with(&s, &EncodeOptions { v4_dir_l2_budget: 1 }), s.digest())
}

/// 10.1/16 holds more long prefixes than 10.3/16 in `A`, fewer in `B`: the chunk moves, and
/// with it the place of both /20s (not otherwise changed).
const A: &[&str] =
    &["10.1.0.0/20", "10.1.2.0/28", "10.1.3.0/29", "10.3.0.0/20", "10.2.0.0/16", "11.0.0.0/8"];
const B: &[&str] = &[
    "10.1.0.0/20",
    "10.1.2.0/28",
    "10.1.3.0/29",
    "10.3.0.0/20",
    "10.3.9.0/25",
    "10.3.9.128/26",
    "10.3.10.0/27",
    "10.2.0.0/16",
    "11.0.0.0/8",
];

fn run(dp: &Dataplane, src: [u8; 4], port: u16) -> XdpAction {
    let frame = ethernet(&[], ETH_P_IP, &Ipv4::new(Ipv4Addr::from(src), 6).build(&tcp(port)));
    dp.test_run_ingress(&frame).expect("test run").action
}

fn kernel_view(e: &Encoded) -> Encoded {
    let mut e = e.clone();
    e.maps.remove(fw_common::maps::WORKLOADS);
    e
}

#[track_caller]
fn assert_holds(dp: &Dataplane, want: &Encoded) {
    for g in 0..2 {
        let held = dp.read_generation(g).expect("read");
        // The prefix table first, for a readable failure.
        let v4 = fw_common::maps::INGRESS_V4;
        assert_eq!(held.maps.get(v4), want.maps.get(v4), "generation {g}");
        assert_eq!(held, kernel_view(want), "generation {g}");
    }
}

/// Every prefix of both sets lets its packets through on port 22, in whichever generation is
/// active.
fn assert_passes(dp: &Dataplane, step: &str) {
    for src in [[10, 1, 5, 5], [10, 1, 2, 3], [10, 3, 5, 5], [10, 2, 7, 7], [11, 200, 0, 1]] {
        assert_eq!(run(dp, src, 22), XdpAction::Pass, "{step}: {src:?}");
    }
    for src in [[10, 1, 2, 3], [10, 1, 3, 7]] {
        assert_eq!(run(dp, src, 80), XdpAction::Pass, "{step}: {src:?}");
    }
    assert_eq!(run(dp, [10, 1, 5, 5], 80), XdpAction::Drop, "{step}");
    assert_eq!(run(dp, [12, 1, 5, 5], 22), XdpAction::Drop, "{step}");
}

/// Generation `g`'s hash as pinned (what the program probes).
fn hash(root: &Root, g: u32) -> HashMap<MapData, [u8; 8], [u8; 8]> {
    let data = MapData::from_pin(root.0.join(format!("FW_IN_V4_G{g}"))).expect("hash pin");
    HashMap::try_from(Map::from_map_data(data).expect("map")).expect("a hash")
}

fn key(net: &str) -> [u8; 8] {
    let net: ipnet::Ipv4Net = net.parse().expect("a prefix");
    Ipv4LpmKey { prefix_len: u32::from(net.prefix_len()), addr: net.network().octets() }.to_bytes()
}

fn in_hash(root: &Root, g: u32, net: &str) -> bool {
    hash(root, g).get(&key(net), 0).is_ok()
}

#[test]
fn a_chunk_that_moves_takes_its_prefixes_between_the_hash_and_the_record() {
    if !privileged("a_chunk_that_moves_takes_its_prefixes_between_the_hash_and_the_record") {
        return;
    }
    let root = Root::new("v4rec");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let ((a, da), (b, db)) = (encoded(A), encoded(B));
    dp.apply(&a, "a", &da, b"s").expect("apply");
    assert_holds(&dp, &a);
    assert_passes(&dp, "a");
    for g in 0..2 {
        // 10.1/16 has the chunk: its /20 is answered there; 10.3/16 has none.
        assert!(!in_hash(&root, g, "10.1.0.0/20") && in_hash(&root, g, "10.3.0.0/20"));
        assert!(!in_hash(&root, g, "10.2.0.0/16") && !in_hash(&root, g, "11.0.0.0/8"));
        assert!(in_hash(&root, g, "10.1.2.0/28"));
    }

    // Whole: the chunk goes to 10.3/16, both /20s swap places.
    dp.apply(&b, "b", &db, b"s").expect("apply");
    assert_holds(&dp, &b);
    assert_passes(&dp, "b");
    for g in 0..2 {
        assert!(in_hash(&root, g, "10.1.0.0/20") && !in_hash(&root, g, "10.3.0.0/20"));
    }

    // As deltas, back: the same moves.
    let changes = fw_loader::entry_delta(&b, &a);
    dp.apply_changes(&db, &changes, "a2", &da, b"s").expect("apply changes");
    assert_holds(&dp, &a);
    assert_passes(&dp, "a2");
    for g in 0..2 {
        assert!(!in_hash(&root, g, "10.1.0.0/20") && in_hash(&root, g, "10.3.0.0/20"));
    }

    // Another process reads both generations back exactly (hash and record), so the same
    // state writes nothing.
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    assert_holds(&adopted, &a);
    let again = adopted.apply(&a, "a3", &da, b"s").expect("apply");
    assert_eq!((again.standby.written, again.standby.deleted), (0, 0), "{again:?}");
}

#[test]
fn a_generation_laid_out_by_an_older_loader_reads_back_exactly_and_is_re_sorted() {
    if !privileged("a_generation_laid_out_by_an_older_loader_reads_back_exactly_and_is_re_sorted") {
        return;
    }
    let root = Root::new("v4rec");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (a, da) = encoded(A);
    dp.apply(&a, "a", &da, b"s").expect("apply");
    drop(dp);
    // What a loader that kept every prefix in the hash left: every prefix in the hash, no
    // record.
    let table = a.maps.get(fw_common::maps::INGRESS_V4).expect("a table");
    assert!(table.iter().any(|(k, _)| *k == key("0.0.0.0/0")), "the default class's /0");
    for g in 0..2 {
        let mut h = hash(&root, g);
        for (k, v) in table {
            let (k, v): ([u8; 8], [u8; 8]) = (k.try_into().expect("8"), v.try_into().expect("8"));
            h.insert(k, v, 0).expect("insert");
        }
        std::fs::remove_file(root.0.join(format!("FW_IN_V4R_G{g}"))).expect("a record pin");
    }
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    assert_holds(&adopted, &a);
    assert_passes(&adopted, "legacy");
    // The next apply of the same state writes no entry of the table but re-sorts it.
    adopted.apply(&a, "a2", &da, b"s").expect("apply");
    assert_holds(&adopted, &a);
    assert_passes(&adopted, "re-sorted");
    for g in 0..2 {
        assert!(!in_hash(&root, g, "10.1.0.0/20") && !in_hash(&root, g, "11.0.0.0/8"), "{g}");
        assert!(root.0.join(format!("FW_IN_V4R_G{g}")).exists());
    }
}

#[test]
fn a_lost_record_changes_no_verdict_and_the_next_apply_writes_it_again() {
    if !privileged("a_lost_record_changes_no_verdict_and_the_next_apply_writes_it_again") {
        return;
    }
    let root = Root::new("v4rec");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (a, da) = encoded(A);
    dp.apply(&a, "a", &da, b"s").expect("apply");
    drop(dp);
    for g in 0..2 {
        std::fs::remove_file(root.0.join(format!("FW_IN_V4R_G{g}"))).expect("a record pin");
    }
    // The program never reads the record: every verdict stays. A read-back lacks its
    // prefixes (what the kernel holds), and the next apply of the same state writes them.
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    assert_passes(&adopted, "no record");
    let v4 = fw_common::maps::INGRESS_V4;
    let held = adopted.read_generation(0).expect("read");
    let want = a.maps.get(v4).expect("a table");
    assert!(held.maps.get(v4).is_some_and(|h| h.len() < want.len()), "{held:?}");
    let r = adopted.apply(&a, "a2", &da, b"s").expect("apply");
    assert!(r.standby.written > 0, "{r:?}");
    assert_holds(&adopted, &a);
    assert_passes(&adopted, "written again");
}
