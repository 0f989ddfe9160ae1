//! Hand-written frames with their verdicts: the parsing rules of the XDP ingress program, one
//! case per rule (VLAN tags, IPv4 options and fragments, IPv6 extension headers, malformed and
//! truncated headers, always-allowed traffic, non-IP frames), and the generation mechanism
//! (a packet uses only the active generation; an unwritten generation fails closed).
//!
//! The differential test covers random policies; this file states the edge cases by name, so a
//! regression says which rule broke.

use std::net::{Ipv4Addr, Ipv6Addr};

use fw_common::{
    DIRECTION_INGRESS, STAT_ALWAYS_ARP, STAT_ALWAYS_LOOPBACK, STAT_ALWAYS_ND, STAT_DEFAULT_DENY,
    STAT_INTERNAL_ERROR, maps,
};
use fw_compiler::encode::{Encoded, encode};
use fw_dataplane_tests::harness::{Harness, privileged};
use fw_dataplane_tests::packet::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Ext, Ipv4, ethernet, ext_chain, icmp, ipv6,
    tcp, udp,
};
use fw_dataplane_tests::policy::{rule, state};
use fw_dataplane_tests::probe::{Count, Expectation, arp_frame};
use fw_loader::{Error, XdpAction};

const POLICY: &str = r#"
apiVersion: fw/v1
kind: Policy
metadata: {name: web}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: ssh, action: allow, from: [10.0.0.0/8, "2001:db8::/32"], proto: tcp, ports: [22]}
    - {name: dns, action: allow, proto: udp, ports: [53]}
    - {name: ping, action: allow, proto: icmp, icmp: [echo-request]}
    - {name: ping6, action: allow, proto: icmpv6, icmp: [echo-request]}
"#;

const ALLOW_ALL: &str = r#"
apiVersion: fw/v1
kind: Policy
metadata: {name: open}
spec:
  ingress:
    - {name: all, action: allow}
"#;

fn pass(c: Count) -> Expectation {
    Expectation { action: XdpAction::Pass, counts: vec![c] }
}

fn denied() -> Expectation {
    Expectation { action: XdpAction::Drop, counts: vec![Count::Stat(STAT_DEFAULT_DENY)] }
}

const HOST_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("IPv6 literal")
}

fn v4_frame(tags: &[u16], header: Ipv4, l4: &[u8]) -> Vec<u8> {
    ethernet(tags, ETH_P_IP, &header.build(l4))
}

fn v6_frame(src: Ipv6Addr, exts: &[Ext], upper: u8, l4: &[u8]) -> Vec<u8> {
    let (next, mut payload) = ext_chain(exts, upper);
    payload.extend(l4);
    ethernet(&[], ETH_P_IPV6, &ipv6(src, next, &payload))
}

fn dest_opts(n: usize) -> Vec<Ext> {
    vec![Ext::DestOpts { units: 0 }; n]
}

#[test]
fn frames_get_their_documented_verdicts() {
    if !privileged("frames_get_their_documented_verdicts") {
        return;
    }
    let st = state(POLICY);
    let mut h = Harness::load().expect("load");
    h.dp.write_generation(0, &encode(&st)).expect("write");
    h.dp.set_active_generation(0).expect("flip");

    let ssh = rule(&st, "ssh");
    let dns = rule(&st, "dns");
    let ping = rule(&st, "ping");
    let ping6 = rule(&st, "ping6");
    let tcp22 = |src| Ipv4::new(src, 6);
    let malformed = Expectation::malformed;
    let mut bad_version = tcp22(HOST_A).build(&tcp(22));
    bad_version[0] = 0x65;
    let mut short_ihl = tcp22(HOST_A).build(&tcp(22));
    short_ihl[0] = 0x44;
    let mut short_total = tcp22(HOST_A).build(&tcp(22));
    short_total[2..4].copy_from_slice(&16u16.to_be_bytes());
    let mut long_total = tcp22(HOST_A).build(&tcp(22));
    long_total[2..4].copy_from_slice(&100u16.to_be_bytes());
    let mut jumbo = ipv6(v6("2001:db8::1"), 0, &Ext::HopByHop { units: 0 }.build(6));
    jumbo.extend(tcp(22));

    let cases: Vec<(&str, Vec<u8>, Expectation)> = vec![
        ("tcp/22 from an allowed source", v4_frame(&[], tcp22(HOST_A), &tcp(22)), pass(ssh)),
        ("tcp/22 from elsewhere: default deny", v4_frame(&[], tcp22(STRANGER), &tcp(22)), denied()),
        ("tcp/23 from an allowed source", v4_frame(&[], tcp22(HOST_A), &tcp(23)), denied()),
        ("one 802.1Q tag", v4_frame(&[ETH_P_8021Q], tcp22(HOST_A), &tcp(22)), pass(ssh)),
        ("one 802.1ad tag", v4_frame(&[ETH_P_8021AD], tcp22(HOST_A), &tcp(22)), pass(ssh)),
        (
            "802.1ad + 802.1Q (QinQ)",
            v4_frame(&[ETH_P_8021AD, ETH_P_8021Q], tcp22(HOST_A), &tcp(22)),
            pass(ssh),
        ),
        (
            "three VLAN tags: malformed",
            v4_frame(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], tcp22(HOST_A), &tcp(22)),
            malformed(),
        ),
        (
            "40 bytes of IPv4 options",
            v4_frame(&[], Ipv4 { options: vec![1; 40], ..tcp22(HOST_A) }, &tcp(22)),
            pass(ssh),
        ),
        (
            "first fragment: ports are read",
            v4_frame(&[], Ipv4 { more_fragments: true, ..tcp22(HOST_A) }, &tcp(22)),
            pass(ssh),
        ),
        (
            "non-first fragment: no port, so the port rule cannot match",
            v4_frame(&[], Ipv4 { frag_offset: 1, ..tcp22(HOST_A) }, &tcp(22)),
            denied(),
        ),
        (
            "tiny first fragment (8 bytes of TCP): malformed",
            v4_frame(&[], Ipv4 { more_fragments: true, ..tcp22(HOST_A) }, &tcp(22)[..8]),
            malformed(),
        ),
        (
            "IPv4 ethertype, version 6: malformed",
            ethernet(&[], ETH_P_IP, &bad_version),
            malformed(),
        ),
        ("IHL 4: malformed", ethernet(&[], ETH_P_IP, &short_ihl), malformed()),
        ("total length < IHL: malformed", ethernet(&[], ETH_P_IP, &short_total), malformed()),
        ("total length > frame: malformed", ethernet(&[], ETH_P_IP, &long_total), malformed()),
        ("Ethernet header only: malformed", ethernet(&[], ETH_P_IP, &[]), malformed()),
        (
            "UDP header cut (7 of 8 bytes): malformed",
            v4_frame(&[], Ipv4::new(STRANGER, 17), &udp(53, 0)[..7]),
            malformed(),
        ),
        ("udp/53 from anywhere", v4_frame(&[], Ipv4::new(STRANGER, 17), &udp(53, 0)), pass(dns)),
        ("echo request", v4_frame(&[], Ipv4::new(STRANGER, 1), &icmp(8)), pass(ping)),
        (
            "echo reply: no connection tracking yet, so the policy denies it",
            v4_frame(&[], Ipv4::new(STRANGER, 1), &icmp(0)),
            denied(),
        ),
        (
            "AH is the protocol (TCP behind it is not seen)",
            v4_frame(&[], Ipv4::new(HOST_A, 51), &tcp(22)),
            denied(),
        ),
        (
            "loopback source",
            v4_frame(&[], Ipv4::new(Ipv4Addr::new(127, 0, 0, 9), 6), &tcp(80)),
            pass(Count::Stat(STAT_ALWAYS_LOOPBACK)),
        ),
        (
            "IPv6 tcp/22 behind hop-by-hop, routing, destination options, fragment",
            v6_frame(
                v6("2001:db8::1"),
                &[
                    Ext::HopByHop { units: 1 },
                    Ext::Routing { units: 2 },
                    Ext::DestOpts { units: 0 },
                    Ext::Fragment { offset: 0, more: true },
                ],
                6,
                &tcp(22),
            ),
            pass(ssh),
        ),
        (
            "IPv6 non-first fragment: no port",
            v6_frame(v6("2001:db8::1"), &[Ext::Fragment { offset: 9, more: false }], 6, &[0; 8]),
            denied(),
        ),
        (
            "hop-by-hop after another header: malformed",
            v6_frame(
                v6("2001:db8::1"),
                &[Ext::DestOpts { units: 0 }, Ext::HopByHop { units: 0 }],
                6,
                &tcp(22),
            ),
            malformed(),
        ),
        (
            "8 extension headers: parsed",
            v6_frame(v6("2001:db8::1"), &dest_opts(8), 6, &tcp(22)),
            pass(ssh),
        ),
        (
            "9 extension headers: malformed",
            v6_frame(v6("2001:db8::1"), &dest_opts(9), 6, &tcp(22)),
            malformed(),
        ),
        (
            "extension header longer than the packet: malformed",
            v6_frame(v6("2001:db8::1"), &[Ext::DestOpts { units: 4 }], 6, &[]),
            malformed(),
        ),
        ("jumbogram (payload length 0): malformed", ethernet(&[], ETH_P_IPV6, &jumbo), malformed()),
        ("ICMPv6 echo request", v6_frame(v6("2001:db8:9::1"), &[], 58, &icmp(128)), pass(ping6)),
        (
            "neighbour solicitation from anywhere",
            v6_frame(v6("fe80::1"), &[], 58, &icmp(135)),
            pass(Count::Stat(STAT_ALWAYS_ND)),
        ),
        (
            "ND type behind extension headers",
            v6_frame(v6("fe80::1"), &[Ext::HopByHop { units: 0 }], 58, &icmp(136)),
            pass(Count::Stat(STAT_ALWAYS_ND)),
        ),
        (
            "ND types are judged by protocol number, as the model does (even in IPv4)",
            v4_frame(&[], Ipv4::new(STRANGER, 58), &icmp(133)),
            pass(Count::Stat(STAT_ALWAYS_ND)),
        ),
        ("ICMPv6 type 138 is not ND", v6_frame(v6("fe80::1"), &[], 58, &icmp(138)), denied()),
        (
            "ND type in a non-first fragment is not ND",
            v6_frame(v6("fe80::1"), &[Ext::Fragment { offset: 2, more: false }], 58, &icmp(135)),
            denied(),
        ),
        (
            "::1 source",
            v6_frame(v6("::1"), &[], 6, &tcp(80)),
            pass(Count::Stat(STAT_ALWAYS_LOOPBACK)),
        ),
        (
            "::ffff:127.0.0.1 is not loopback",
            v6_frame(v6("::ffff:127.0.0.1"), &[], 6, &tcp(80)),
            denied(),
        ),
        ("ARP", arp_frame(&[]), pass(Count::Stat(STAT_ALWAYS_ARP))),
        ("ARP behind a VLAN tag", arp_frame(&[ETH_P_8021Q]), pass(Count::Stat(STAT_ALWAYS_ARP))),
        ("LLDP: not IP", ethernet(&[], 0x88cc, &[0; 32]), Expectation::not_ip()),
        (
            "0x9100 tag (not decoded by Linux): not IP",
            ethernet(&[], 0x9100, &[0; 32]),
            Expectation::not_ip(),
        ),
    ];

    h.assert_cases(&cases);
}

/// Generation `g` of an encoded state as the loader reads it back (no workload table).
fn without_workloads(e: &Encoded) -> Encoded {
    let mut e = e.clone();
    e.maps.remove(maps::WORKLOADS);
    e
}

#[test]
fn packets_use_only_the_active_generation() {
    if !privileged("packets_use_only_the_active_generation") {
        return;
    }
    let mut h = Harness::load().expect("load");
    let strict = encode(&state(POLICY));
    let open = encode(&state(ALLOW_ALL));
    let stranger_ssh = v4_frame(&[], Ipv4::new(STRANGER, 6), &tcp(22));
    let verdict = |h: &Harness| h.dp.test_run_ingress(&stranger_ssh).expect("test run").action;

    // Nothing written yet: the config is all zeros, which fails closed and is counted.
    assert_eq!(h.dp.active_generation().expect("read"), 0);
    assert_eq!(verdict(&h), XdpAction::Drop);
    assert_eq!(h.dp.stat(DIRECTION_INGRESS, STAT_INTERNAL_ERROR).expect("stat").packets, 1);
    // Always-allowed traffic is decided before any policy map is read.
    assert_eq!(h.dp.test_run_ingress(&arp_frame(&[])).expect("run").action, XdpAction::Pass);

    // Writing the standby generation changes nothing until the flip.
    h.dp.write_generation(1, &strict).expect("write 1");
    assert_eq!(verdict(&h), XdpAction::Drop);
    assert_eq!(h.dp.stat(DIRECTION_INGRESS, STAT_INTERNAL_ERROR).expect("stat").packets, 2);
    h.dp.set_active_generation(1).expect("flip to 1");
    assert_eq!(verdict(&h), XdpAction::Drop);
    assert_eq!(h.dp.stat(DIRECTION_INGRESS, STAT_DEFAULT_DENY).expect("stat").packets, 1);

    h.dp.write_generation(0, &open).expect("write 0");
    assert_eq!(verdict(&h), XdpAction::Drop, "generation 0 is not active");
    h.dp.set_active_generation(0).expect("flip to 0");
    assert_eq!(verdict(&h), XdpAction::Pass);
    h.dp.set_active_generation(1).expect("flip back to 1");
    assert_eq!(verdict(&h), XdpAction::Drop);

    // A write is a sync: the old entries go. Read back equals what was written.
    h.dp.write_generation(1, &open).expect("rewrite 1");
    assert_eq!(h.dp.read_generation(1).expect("read 1"), without_workloads(&open));
    assert_eq!(verdict(&h), XdpAction::Pass);
    assert!(matches!(h.dp.set_active_generation(2), Err(Error::NoSuchGeneration(2))));
    assert!(matches!(h.dp.write_generation(2, &open), Err(Error::NoSuchGeneration(2))));
}

#[test]
fn invalid_state_is_rejected_before_anything_is_written() {
    if !privileged("invalid_state_is_rejected_before_anything_is_written") {
        return;
    }
    let mut h = Harness::load().expect("load");
    let strict = encode(&state(POLICY));
    h.dp.write_generation(0, &strict).expect("write");
    let mut broken = encode(&state(ALLOW_ALL));
    if let Some(e) = broken.maps.get_mut(maps::INGRESS_L4) {
        let mut pairs = e.to_vec();
        if let Some((_, value)) = pairs.first_mut() {
            value[0] = 9; // not an action byte
        }
        *e = pairs.into();
    }
    assert!(matches!(h.dp.write_generation(0, &broken), Err(Error::InvalidState(_))));
    assert_eq!(h.dp.read_generation(0).expect("read"), without_workloads(&strict));
}
