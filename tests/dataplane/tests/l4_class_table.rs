//! The ingress class table (`FW_IN_L4K`, a cuckoo table the loader derives from the exact
//! hash's address-class entries): while its header says it is complete, the program looks a
//! class's exact entry up there and not in the hash, so a wrong table changes verdicts.
//!
//! The differential test covers random policies (every one of which fits the table); this
//! file pins what it cannot see: that the program really reads the table (an entry taken out
//! behind the loader's back stops matching, and reading the generation back refuses the
//! table), that entries added and removed by an apply of the difference move in both
//! generations, and that a table marked incomplete, or too small for the policy, leaves the
//! class entries to the hash with the same verdicts.

use fw_dataplane_tests::harness::PinRoot as Root;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{Array, Map, MapData};
use fw_common::{
    L4_CLASS_BUCKET_SLOTS, L4_CLASS_BUCKETS, L4_CLASS_TABLE_CHUNKS, L4_CLASS_TABLE_HEADER,
    L4_CLASS_TABLE_INCOMPLETE, L4ClassSlot, L4ClassTableChunk, maps,
};
use fw_compiler::encode::encode;
use fw_compiler::mapstate::Capacities;
use fw_dataplane_tests::harness::privileged;
use fw_dataplane_tests::packet::{tcp_frame, udp_frame};
use fw_loader::{Dataplane, XdpAction};

/// A wide class (10.0.0.0/8) with TCP and UDP entries, a narrow class (one host) with its
/// own, and a shared entry.
const POLICY: &str = r#"
apiVersion: fw/v1
kind: Policy
metadata: {name: classes}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: ssh, action: allow, from: [10.0.0.0/8], proto: tcp, ports: [22]}
    - {name: dns, action: allow, from: [10.0.0.0/8], proto: udp, ports: [53]}
    - {name: admin, action: allow, from: [10.1.1.1/32], proto: tcp, ports: [8443]}
    - {name: web, action: allow, proto: tcp, ports: [443]}
"#;

/// Entries only a delta adds: a new port of the wide class, the narrow class's first UDP
/// entry, and a new class.
const MORE: &str = r#"
    - {name: ntp, action: allow, from: [10.0.0.0/8], proto: udp, ports: [123]}
    - {name: syslog, action: allow, from: [10.1.1.1/32], proto: udp, ports: [514]}
    - {name: lab, action: allow, from: [192.168.0.0/16], proto: tcp, ports: [9000]}
"#;

const WIDE: Ipv4Addr = Ipv4Addr::new(10, 2, 3, 4);
const HOST: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
const LAB: Ipv4Addr = Ipv4Addr::new(192, 168, 5, 5);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// TCP 22 as an L4 word (`proto << 24 | port`).
const TCP_22: u32 = 6 << 24 | 22;

/// Generation `g`'s class table, from its pin.
fn table(root: &Path, g: u32) -> Array<MapData, L4ClassTableChunk> {
    let pin = root.join(format!("{}_G{g}", maps::INGRESS_L4_CLASS_TABLE));
    Array::try_from(Map::Array(MapData::from_pin(pin).expect("pin"))).expect("array")
}

/// Whether generation `g`'s table says it holds every class entry.
fn complete(root: &Path, g: u32) -> bool {
    table(root, g).get(&L4_CLASS_TABLE_HEADER, 0).expect("header").incomplete
        != L4_CLASS_TABLE_INCOMPLETE
}

/// The class entries generation `g`'s table holds.
fn held(root: &Path, g: u32) -> Vec<L4ClassSlot> {
    let t = table(root, g);
    (0..L4_CLASS_TABLE_CHUNKS)
        .flat_map(|c| t.get(&c, 0).expect("chunk").buckets)
        .flat_map(|b| b.slots)
        .filter(|s| s.class != 0)
        .collect()
}

fn run(dp: &Dataplane, frame: &[u8]) -> XdpAction {
    dp.test_run_ingress(frame).expect("run").action
}

#[test]
fn class_entries_follow_an_apply_of_the_difference_in_both_generations() {
    let name = "class_entries_follow_an_apply_of_the_difference_in_both_generations";
    if !privileged(name) {
        return;
    }
    let root = Root::new("l4k-delta");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let before = fw_dataplane_tests::policy::state(POLICY);
    let after = fw_dataplane_tests::policy::state(&format!("{POLICY}{MORE}"));
    let (e1, e2) = (encode(&before), encode(&after));
    dp.apply(&e1, "r1", &before.digest(), b"one").expect("apply");
    // ssh, dns (wide) and admin (narrow); the shared web entry is not a class entry.
    for g in 0..2 {
        assert!(complete(&root.0, g), "generation {g}");
        assert_eq!(held(&root.0, g).len(), 3, "generation {g}");
    }

    let r = dp.apply(&e2, "r2", &after.digest(), b"two").expect("apply");
    assert!(r.standby.written + r.standby.deleted < 30, "only the difference: {r:?}");
    for g in 0..2 {
        // Reading back checks that the table holds exactly the hash's class entries.
        let mut want = e2.clone();
        want.maps.remove(maps::WORKLOADS);
        assert_eq!(dp.read_generation(g).expect("read"), want, "generation {g}");
        assert!(complete(&root.0, g), "generation {g}");
        assert_eq!(held(&root.0, g).len(), 6, "generation {g}");
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &udp_frame(WIDE, 123)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(HOST, 514)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(LAB, 9000)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(HOST, 8443)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(HOST, 22)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(WIDE, 8443)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 123)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(STRANGER, 443)), XdpAction::Pass, "generation {g}");
    }

    // And back: the entries leave the table.
    dp.apply(&e1, "r3", &before.digest(), b"three").expect("apply");
    for g in 0..2 {
        let mut want = e1.clone();
        want.maps.remove(maps::WORKLOADS);
        assert_eq!(dp.read_generation(g).expect("read"), want, "generation {g}");
        assert_eq!(held(&root.0, g).len(), 3, "generation {g}");
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &udp_frame(WIDE, 123)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(HOST, 514)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(LAB, 9000)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(WIDE, 53)), XdpAction::Pass, "generation {g}");
    }
    // The map status counts the entries against the table's slots.
    let status = dp.status().expect("status");
    let m = status.maps.iter().find(|m| m.name == maps::INGRESS_L4_CLASS_TABLE).expect("status");
    assert_eq!(m.capacity, L4_CLASS_BUCKETS * L4_CLASS_BUCKET_SLOTS as u32);
    assert_eq!(m.entries, 3, "{m:?}");
}

#[test]
fn the_program_reads_the_table_and_the_hash_only_when_the_table_is_incomplete() {
    if !privileged("the_program_reads_the_table_and_the_hash_only_when_the_table_is_incomplete") {
        return;
    }
    let root = Root::new("l4k-tamper");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let st = fw_dataplane_tests::policy::state(POLICY);
    let e = encode(&st);
    dp.apply(&e, "r1", &st.digest(), b"one").expect("apply");
    dp.set_active_generation(1).expect("flip");
    assert_eq!(run(&dp, &tcp_frame(WIDE, 22)), XdpAction::Pass);

    // Take the TCP 22 entry out of generation 1's table, behind the loader's back: the hash
    // still holds it, but a complete table is the program's answer, so the packet is denied.
    let mut t = table(&root.0, 1);
    let mut taken = 0;
    for c in 0..L4_CLASS_TABLE_CHUNKS {
        let mut chunk = t.get(&c, 0).expect("chunk");
        let before = chunk;
        for s in chunk.buckets.iter_mut().flat_map(|b| b.slots.iter_mut()) {
            if s.word == TCP_22 {
                *s = L4ClassSlot::default();
                taken += 1;
            }
        }
        if chunk != before {
            t.set(c, chunk, 0).expect("write");
        }
    }
    assert_eq!(taken, 1);
    assert_eq!(run(&dp, &tcp_frame(WIDE, 22)), XdpAction::Drop);
    assert_eq!(run(&dp, &udp_frame(WIDE, 53)), XdpAction::Pass);
    match dp.read_generation(1) {
        Err(fw_loader::Error::VerifyFailed(name)) => {
            assert_eq!(name, maps::INGRESS_L4_CLASS_TABLE)
        }
        other => panic!("a table without an entry read back: {other:?}"),
    }

    // Marked incomplete, the table is not read: the class filter and the hash answer.
    let marked =
        L4ClassTableChunk { incomplete: L4_CLASS_TABLE_INCOMPLETE, ..L4ClassTableChunk::default() };
    t.set(L4_CLASS_TABLE_HEADER, marked, 0).expect("header");
    assert_eq!(run(&dp, &tcp_frame(WIDE, 22)), XdpAction::Pass);
    assert_eq!(run(&dp, &tcp_frame(HOST, 8443)), XdpAction::Pass);
    assert_eq!(run(&dp, &tcp_frame(WIDE, 8443)), XdpAction::Drop);
    dp.read_generation(1).expect("an incomplete table reads back");
    // An apply of the difference maintains the complete table of generation 0 and leaves
    // generation 1's incomplete one alone (until a full write builds it again); both read
    // back, and both give the policy's verdicts.
    let more = fw_dataplane_tests::policy::state(&format!("{POLICY}{MORE}"));
    dp.apply(&encode(&more), "r2", &more.digest(), b"two").expect("apply");
    assert!(complete(&root.0, 0));
    assert!(!complete(&root.0, 1));
    for g in 0..2 {
        dp.read_generation(g).expect("read");
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &tcp_frame(WIDE, 22)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(HOST, 514)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(WIDE, 514)), XdpAction::Drop, "generation {g}");
    }
}

#[test]
fn a_policy_with_more_class_entries_than_slots_is_left_to_the_hash() {
    if !privileged("a_policy_with_more_class_entries_than_slots_is_left_to_the_hash") {
        return;
    }
    // One class with an entry for every other TCP port from 1000: more entries than slots,
    // none of them adjacent (so none merge into a range).
    let slots = L4_CLASS_BUCKETS as usize * L4_CLASS_BUCKET_SLOTS;
    let ports: Vec<String> = (0..slots + 100).map(|i| (1000 + 2 * i).to_string()).collect();
    let policy = format!(
        "{POLICY}    - {{name: many, action: allow, from: [172.16.0.0/12], proto: tcp, ports: [{}]}}\n",
        ports.join(", ")
    );
    let root = Root::new("l4k-overflow");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let st = fw_dataplane_tests::policy::state(&policy);
    let e = encode(&st);
    dp.apply(&e, "r1", &st.digest(), b"one").expect("apply");
    let source = Ipv4Addr::new(172, 16, 9, 9);
    let last = u16::try_from(1000 + 2 * (slots + 99)).expect("a port");
    for g in 0..2 {
        assert!(!complete(&root.0, g), "generation {g}");
        dp.read_generation(g).expect("read");
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &tcp_frame(source, 1000)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(source, last)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(source, 1001)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(WIDE, 22)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(WIDE, 22)), XdpAction::Drop, "generation {g}");
    }
}
