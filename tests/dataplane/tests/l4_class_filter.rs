//! The ingress class filter (`FW_IN_L4C`, derived by the loader from the exact hash): the
//! program asks the exact hash for a class's entry only when the filter's bit for (class,
//! protocol) is set, so a missing bit would let a class's rule go unmatched.
//!
//! The differential test covers random policies; this file pins the cases a wrong bit would
//! change: a wide and a narrow class's entries for TCP, UDP and ICMP, the other protocols of
//! the same classes, entries added by an apply that writes only the difference (so the delta
//! must set their bits in both generations), entries removed again (their bits may stay), and
//! a filter with a needed bit cleared behind the loader's back, which reading the generation
//! back must refuse.

use fw_dataplane_tests::harness::PinRoot as Root;
use std::net::Ipv4Addr;

use aya::maps::{Array, MapData};
use fw_common::{
    L4_CLASS_FILTER_BITS, L4_CLASS_FILTER_CHUNKS, L4ClassFilterChunk, STAT_DEFAULT_DENY, maps,
};
use fw_compiler::encode::encode;
use fw_compiler::mapstate::Capacities;
use fw_dataplane_tests::harness::{Harness, privileged};
use fw_dataplane_tests::packet::{ETH_P_IP, Ipv4, ethernet, icmp, tcp_frame, udp_frame};
use fw_dataplane_tests::policy::{rule, state};
use fw_dataplane_tests::probe::{Count, Expectation};
use fw_loader::{Dataplane, XdpAction};

/// A wide class (10.0.0.0/8) with a TCP, a UDP and an ICMP entry, a narrow class (one host)
/// with a TCP entry, and no shared entries: every allowed packet is a class's.
const POLICY: &str = r#"
apiVersion: fw/v1
kind: Policy
metadata: {name: classes}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: ssh, action: allow, from: [10.0.0.0/8], proto: tcp, ports: [22]}
    - {name: dns, action: allow, from: [10.0.0.0/8], proto: udp, ports: [53]}
    - {name: ping, action: allow, from: [10.0.0.0/8], proto: icmp, icmp: [echo-request]}
    - {name: admin, action: allow, from: [10.1.1.1/32], proto: tcp, ports: [8443]}
"#;

/// `POLICY` with entries only a delta adds: the wide class gets UDP 123, the narrow class its
/// first UDP entry, and a new /16 class its first entries (TCP and UDP).
const MORE: &str = r#"
    - {name: ntp, action: allow, from: [10.0.0.0/8], proto: udp, ports: [123]}
    - {name: syslog, action: allow, from: [10.1.1.1/32], proto: udp, ports: [514]}
    - {name: lab, action: allow, from: [192.168.0.0/16], proto: tcp, ports: [9000]}
    - {name: lab-udp, action: allow, from: [192.168.0.0/16], proto: udp, ports: [9000]}
"#;

const WIDE: Ipv4Addr = Ipv4Addr::new(10, 2, 3, 4);
const HOST: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
const LAB: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 5);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn echo(src: Ipv4Addr) -> Vec<u8> {
    ethernet(&[], ETH_P_IP, &Ipv4::new(src, 1).build(&icmp(8)))
}

fn pass(c: Count) -> Expectation {
    Expectation { action: XdpAction::Pass, counts: vec![c] }
}

fn denied() -> Expectation {
    Expectation { action: XdpAction::Drop, counts: vec![Count::Stat(STAT_DEFAULT_DENY)] }
}

#[test]
fn class_entries_of_every_protocol_are_found_behind_the_filter() {
    if !privileged("class_entries_of_every_protocol_are_found_behind_the_filter") {
        return;
    }
    let st = state(POLICY);
    let encoded = encode(&st);
    let mut h = Harness::load().expect("load");
    for g in [1, 0] {
        h.dp.write_generation(g, &encoded).expect("write");
    }
    h.dp.set_active_generation(0).expect("flip");
    let (ssh, dns, ping, admin) =
        (rule(&st, "ssh"), rule(&st, "dns"), rule(&st, "ping"), rule(&st, "admin"));
    let cases: Vec<(&str, Vec<u8>, Expectation)> = vec![
        ("wide tcp/22", tcp_frame(WIDE, 22), pass(ssh)),
        ("wide udp/53", udp_frame(WIDE, 53), pass(dns)),
        ("wide icmp echo", echo(WIDE), pass(ping)),
        ("wide tcp/53: the class's UDP entry is not TCP's", tcp_frame(WIDE, 53), denied()),
        ("wide udp/22: the class's TCP entry is not UDP's", udp_frame(WIDE, 22), denied()),
        ("wide tcp/8443: the narrow class's port", tcp_frame(WIDE, 8443), denied()),
        ("host tcp/8443: the narrow class", tcp_frame(HOST, 8443), pass(admin)),
        ("host tcp/22: the wide class under the host", tcp_frame(HOST, 22), pass(ssh)),
        ("host udp/8443", udp_frame(HOST, 8443), denied()),
        ("stranger tcp/22: no class entries", tcp_frame(STRANGER, 22), denied()),
        ("stranger udp/53", udp_frame(STRANGER, 53), denied()),
    ];
    h.assert_cases(&cases);
    // Both generations read back (the filter checked against the hash); the filter holds
    // one bit per (class, protocol) pair at most: (wide: TCP, UDP, ICMP), (narrow: TCP).
    for g in 0..2 {
        let mut want = encoded.clone();
        want.maps.remove(maps::WORKLOADS);
        assert_eq!(h.dp.read_generation(g).expect("read"), want, "generation {g}");
    }
}

/// The set bits of generation `g`'s filter, from its pin.
fn filter_bits(root: &std::path::Path, g: u32) -> u32 {
    let pin = root.join(format!("{}_G{g}", maps::INGRESS_L4_CLASSES));
    let map: Array<MapData, L4ClassFilterChunk> =
        Array::try_from(aya::maps::Map::Array(MapData::from_pin(pin).expect("pin")))
            .expect("array");
    (0..L4_CLASS_FILTER_CHUNKS)
        .map(|i| map.get(&i, 0).expect("chunk").words.iter().map(|w| w.count_ones()).sum::<u32>())
        .sum()
}

#[test]
fn an_apply_of_the_difference_sets_the_bits_of_new_class_entries_in_both_generations() {
    let name = "an_apply_of_the_difference_sets_the_bits_of_new_class_entries_in_both_generations";
    if !privileged(name) {
        return;
    }
    let root = Root::new("l4c");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let before = state(POLICY);
    let after = state(&format!("{POLICY}{MORE}"));
    let (e1, e2) = (encode(&before), encode(&after));
    dp.apply(&e1, "r1", &before.digest(), b"one").expect("apply");
    let run = |dp: &Dataplane, frame: &[u8]| dp.test_run_ingress(frame).expect("run").action;
    assert_eq!(run(&dp, &udp_frame(HOST, 514)), XdpAction::Drop);
    let base = filter_bits(&root.0, 0);
    assert!((1..=4).contains(&base), "one bit per (class, protocol) pair: {base}");

    let r = dp.apply(&e2, "r2", &after.digest(), b"two").expect("apply");
    assert!(r.standby.written + r.standby.deleted < 30, "only the difference: {r:?}");
    for g in 0..2 {
        let mut want = e2.clone();
        want.maps.remove(maps::WORKLOADS);
        assert_eq!(dp.read_generation(g).expect("read"), want, "generation {g}");
    }
    for g in [0, 1] {
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &udp_frame(WIDE, 123)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(HOST, 514)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(LAB, 9000)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(LAB, 9000)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(HOST, 8443)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 123)), XdpAction::Drop, "generation {g}");
        assert!(filter_bits(&root.0, g) > base, "generation {g}");
    }

    // And back: the entries go, their bits may stay (a stale bit costs a hash call only).
    dp.apply(&e1, "r3", &before.digest(), b"three").expect("apply");
    for g in [0, 1] {
        let mut want = e1.clone();
        want.maps.remove(maps::WORKLOADS);
        assert_eq!(dp.read_generation(g).expect("read"), want, "generation {g}");
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &udp_frame(WIDE, 123)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(HOST, 514)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(LAB, 9000)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(WIDE, 53)), XdpAction::Pass, "generation {g}");
    }
    // The map status counts the set bits against the filter's size.
    let status = dp.status().expect("status");
    let m = status.maps.iter().find(|m| m.name == maps::INGRESS_L4_CLASSES).expect("status");
    assert_eq!(m.capacity, L4_CLASS_FILTER_BITS);
    assert!(m.entries >= base as usize, "{m:?}");
}

#[test]
fn reading_back_refuses_a_filter_without_a_needed_bit() {
    if !privileged("reading_back_refuses_a_filter_without_a_needed_bit") {
        return;
    }
    let root = Root::new("l4c-rb");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let st = state(POLICY);
    let e = encode(&st);
    dp.apply(&e, "r1", &st.digest(), b"one").expect("apply");
    dp.read_generation(1).expect("read");
    let pin = root.0.join(format!("{}_G1", maps::INGRESS_L4_CLASSES));
    let mut map: Array<MapData, L4ClassFilterChunk> =
        Array::try_from(aya::maps::Map::Array(MapData::from_pin(pin).expect("pin")))
            .expect("array");
    for i in 0..L4_CLASS_FILTER_CHUNKS {
        map.set(i, L4ClassFilterChunk::default(), 0).expect("clear");
    }
    match dp.read_generation(1) {
        Err(fw_loader::Error::VerifyFailed(name)) => assert_eq!(name, maps::INGRESS_L4_CLASSES),
        other => panic!("a cleared filter read back: {other:?}"),
    }
    // Stale bits are allowed: every bit set reads back.
    for i in 0..L4_CLASS_FILTER_CHUNKS {
        let full = L4ClassFilterChunk { words: [u64::MAX; 512] };
        map.set(i, full, 0).expect("fill");
    }
    dp.read_generation(1).expect("read with every bit set");
}
