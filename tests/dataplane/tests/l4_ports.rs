//! The ingress program's L4 lookups by name: the shared table's TCP and UDP port entries from
//! the port array (`FW_IN_L4P`, mirrored by the loader from the exact hash), the exact hash
//! and the trie behind it, each skipped when the config's `l4_flags` say it holds nothing.
//!
//! The differential test covers random policies; this file pins the cases where a wrong chunk
//! or slot, a stale mirror or a wrong flag would change a verdict or a counter: ports at the
//! edges of a chunk, the same port in the other protocol, a range in the trie with an exact
//! entry inside it, a class's entry next to the shared table's, and a port moved by an apply
//! that writes only the difference (so the array is patched, not rewritten).

use fw_dataplane_tests::harness::PinRoot as Root;
use std::net::Ipv4Addr;

use fw_common::{Bytes, CONFIG_INGRESS, DirectionConfig, L4F_TRIE_SHARED, STAT_DEFAULT_DENY, maps};
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::mapstate::Capacities;
use fw_dataplane_tests::harness::{Harness, privileged};
use fw_dataplane_tests::packet::{ETH_P_IP, Ipv4, ethernet, icmp, tcp, tcp_frame, udp_frame};
use fw_dataplane_tests::policy::{rule, state};
use fw_dataplane_tests::probe::{Count, Expectation};
use fw_loader::{Dataplane, XdpAction};

/// Shared TCP and UDP ports at both ends of a chunk and of the port space, a UDP range (a
/// trie entry of the shared table) with a denied port inside it (an exact entry), a class's
/// TCP port, and a shared ICMP type (exact, outside the array).
const POLICY: &str = r#"
apiVersion: fw/v1
kind: Policy
metadata: {name: ports}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: web, action: allow, proto: tcp, ports: [1, 255, 256, 443]}
    - {name: dns, action: allow, proto: udp, ports: [53, 65535]}
    - {name: range, action: allow, proto: udp, ports: [1000-1999]}
    - {name: hole, action: deny, proto: udp, ports: [1500]}
    - {name: ssh, action: allow, from: [10.0.0.0/8], proto: tcp, ports: [22]}
    - {name: ping, action: allow, proto: icmp, icmp: [echo-request]}
"#;

fn ingress_flags(e: &Encoded) -> u8 {
    let config = &e.maps[maps::CONFIG];
    let (_, v) = config.iter().find(|(k, _)| *k == CONFIG_INGRESS.to_le_bytes()).expect("ingress");
    DirectionConfig::from_bytes(v).expect("config").l4_flags
}

const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn pass(c: Count) -> Expectation {
    Expectation { action: XdpAction::Pass, counts: vec![c] }
}

fn drop_by(c: Count) -> Expectation {
    Expectation { action: XdpAction::Drop, counts: vec![c] }
}

fn denied() -> Expectation {
    drop_by(Count::Stat(STAT_DEFAULT_DENY))
}

#[test]
fn shared_ports_come_from_the_port_array_and_the_rest_from_the_hash_and_trie() {
    if !privileged("shared_ports_come_from_the_port_array_and_the_rest_from_the_hash_and_trie") {
        return;
    }
    let st = state(POLICY);
    let encoded = encode(&st);
    // The UDP range is the only trie entry: the program must ask the trie for the shared
    // table (behind a zero slot) and may skip it for the classes.
    assert_eq!(ingress_flags(&encoded), L4F_TRIE_SHARED);
    let mut h = Harness::load().expect("load");
    for g in [1, 0] {
        h.dp.write_generation(g, &encoded).expect("write");
    }
    h.dp.set_active_generation(0).expect("flip");

    let (web, dns, range, hole, ssh, ping) = (
        rule(&st, "web"),
        rule(&st, "dns"),
        rule(&st, "range"),
        rule(&st, "hole"),
        rule(&st, "ssh"),
        rule(&st, "ping"),
    );
    let cases: Vec<(&str, Vec<u8>, Expectation)> = vec![
        ("tcp/1: chunk 0, slot 1", tcp_frame(STRANGER, 1), pass(web)),
        ("tcp/255: the last slot of chunk 0", tcp_frame(STRANGER, 255), pass(web)),
        ("tcp/256: the first slot of chunk 1", tcp_frame(STRANGER, 256), pass(web)),
        ("tcp/443", tcp_frame(STRANGER, 443), pass(web)),
        ("tcp/257: a zero slot next to entries", tcp_frame(STRANGER, 257), denied()),
        ("tcp/53: the UDP entry is not TCP's", tcp_frame(STRANGER, 53), denied()),
        ("udp/443: the TCP entry is not UDP's", udp_frame(STRANGER, 443), denied()),
        ("udp/53", udp_frame(STRANGER, 53), pass(dns)),
        ("udp/65535: the last slot of the last chunk", udp_frame(STRANGER, 65535), pass(dns)),
        ("udp/1000: the trie's range behind a zero slot", udp_frame(STRANGER, 1000), pass(range)),
        ("udp/1999: the range's last port", udp_frame(STRANGER, 1999), pass(range)),
        ("udp/1500: the exact deny inside the range", udp_frame(STRANGER, 1500), drop_by(hole)),
        ("udp/2000: past the range", udp_frame(STRANGER, 2000), denied()),
        ("tcp/22 from the class", tcp_frame(HOST_A, 22), pass(ssh)),
        ("tcp/22 from elsewhere", tcp_frame(STRANGER, 22), denied()),
        ("tcp/443 from the class: the shared entry", tcp_frame(HOST_A, 443), pass(web)),
        (
            "icmp echo: a shared exact entry outside the array",
            ethernet(&[], ETH_P_IP, &Ipv4::new(STRANGER, 1).build(&icmp(8))),
            pass(ping),
        ),
        (
            "non-first fragment: no port, so not the array's tcp/443",
            ethernet(
                &[],
                ETH_P_IP,
                &Ipv4 { frag_offset: 1, ..Ipv4::new(STRANGER, 6) }.build(&tcp(0)),
            ),
            denied(),
        ),
    ];
    h.assert_cases(&cases);
}

#[test]
fn an_apply_of_the_difference_patches_the_port_array_in_both_generations() {
    if !privileged("an_apply_of_the_difference_patches_the_port_array_in_both_generations") {
        return;
    }
    let root = Root::new("l4ports");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let before = state(POLICY);
    // web moves from 443 to 8443 and dns from 53 and 65535 to 54: slots set and cleared in
    // chunks that keep other entries (tcp/1-256, udp/53-54) or lose their only one.
    let after = state(
        &POLICY
            .replace("ports: [1, 255, 256, 443]", "ports: [1, 255, 256, 8443]")
            .replace("ports: [53, 65535]", "ports: [54]"),
    );
    let (e1, e2) = (encode(&before), encode(&after));
    dp.apply(&e1, "r1", &before.digest(), b"one").expect("apply");
    let run = |dp: &Dataplane, frame: &[u8]| dp.test_run_ingress(frame).expect("run").action;
    assert_eq!(run(&dp, &tcp_frame(STRANGER, 443)), XdpAction::Pass);
    assert_eq!(run(&dp, &udp_frame(STRANGER, 65535)), XdpAction::Pass);

    let r = dp.apply(&e2, "r2", &after.digest(), b"two").expect("apply");
    assert!(r.standby.written + r.standby.deleted < 10, "only the difference: {r:?}");
    // Reading a generation back checks the port array against the exact hash entry by entry.
    for g in 0..2 {
        let mut want = e2.clone();
        want.maps.remove(maps::WORKLOADS);
        assert_eq!(dp.read_generation(g).expect("read"), want, "generation {g}");
    }
    for g in [0, 1] {
        dp.set_active_generation(g).expect("flip");
        assert_eq!(run(&dp, &tcp_frame(STRANGER, 443)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(STRANGER, 8443)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &tcp_frame(STRANGER, 256)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 53)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 54)), XdpAction::Pass, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 65535)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 1500)), XdpAction::Drop, "generation {g}");
        assert_eq!(run(&dp, &udp_frame(STRANGER, 1501)), XdpAction::Pass, "generation {g}");
    }
}
