//! Connection tracking in the XDP program, frame by frame (BPF_PROG_TEST_RUN): entries are
//! seeded into the table at chosen ages, so the timeouts and the matching rules of replies and
//! related ICMP errors can be checked exactly, which real traffic can only do by waiting.
//! The policy denies all ingress by default, so every Pass below is connection tracking.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use fw_common::conntrack::{
    CT_FAMILY_V4, CT_STATE_ESTABLISHED, CT_STATE_OTHER, ConntrackKey, ConntrackValue,
};
use fw_common::{DIRECTION_INGRESS, STAT_ALWAYS_RELATED, STAT_ALWAYS_REPLY, STAT_DEFAULT_DENY};
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::Capacities;
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_dataplane_tests::packet::{Ipv4, ethernet, icmp, tcp, udp};
use fw_loader::conntrack::monotonic_ns;
use fw_loader::{Dataplane, XdpAction};

const POLICY: &str = "\
apiVersion: fw/v1
kind: Policy
metadata: {name: closed}
spec:
  defaults: {ingress: deny}
";

/// The frames' fixed destination (packet.rs): the host.
const LOCAL: [u8; 4] = [192, 0, 2, 200];
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The frames' fixed TCP/UDP source port (packet.rs).
const REMOTE_PORT: u16 = 40000;
const SEC: u64 = 1_000_000_000;

fn key(proto: u8, local: [u8; 4], local_port: u16, remote_port: u16) -> ConntrackKey {
    let mut k =
        ConntrackKey { family: CT_FAMILY_V4, proto, local_port, remote_port, ..Default::default() };
    k.local[..4].copy_from_slice(&local);
    k.remote[..4].copy_from_slice(&REMOTE.octets());
    k
}

fn v4(proto: u8, payload: &[u8]) -> Vec<u8> {
    ethernet(&[], 0x0800, &Ipv4::new(REMOTE, proto).build(payload))
}

/// An ICMP destination-unreachable (port unreachable) about a UDP datagram the host (`from`)
/// sent from `local_port` to the remote's `REMOTE_PORT`.
fn port_unreachable(from: [u8; 4], local_port: u16) -> Vec<u8> {
    let mut p = vec![3, 3, 0, 0, 0, 0, 0, 0];
    p.extend([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend(from);
    p.extend(REMOTE.octets());
    p.extend(local_port.to_be_bytes());
    p.extend(REMOTE_PORT.to_be_bytes());
    p.extend([0, 8, 0, 0]);
    v4(1, &p)
}

#[test]
fn replies_and_related_errors_match_live_flows_only() {
    if !privileged("replies_and_related_errors_match_live_flows_only") {
        return;
    }
    let loaded = load([Input::new("t.yaml", POLICY)], &ParseLimits::default());
    let set = loaded.policy_set.expect("policy");
    let host = HostIdentity { name: "h".into(), labels: BTreeMap::new() };
    let state = compile(&set.for_host(&host), &Capacities::default()).expect("compile");
    let mut dp = Dataplane::load(&Capacities::default()).expect("load");
    dp.write_generation(0, &encode(&state)).unwrap();
    dp.set_active_generation(0).unwrap();

    let now = monotonic_ns();
    let at = |age: u64, state: u32| ConntrackValue { last_seen_ns: now - age, state, _pad: 0 };
    let seeds = [
        (key(17, LOCAL, 5353, REMOTE_PORT), at(0, CT_STATE_OTHER)),
        (key(17, LOCAL, 5354, REMOTE_PORT), at(59 * SEC, CT_STATE_OTHER)),
        (key(17, LOCAL, 5355, REMOTE_PORT), at(61 * SEC, CT_STATE_OTHER)),
        (key(6, LOCAL, 443, REMOTE_PORT), at(200 * SEC, CT_STATE_ESTABLISHED)),
        (key(6, LOCAL, 444, REMOTE_PORT), at(200 * SEC, CT_STATE_OTHER)),
        (key(6, LOCAL, 445, REMOTE_PORT), at(10 * SEC, CT_STATE_OTHER)),
        // ICMP echo: local port = identifier (packet.rs's icmp() uses 1), remote port 0.
        (key(1, LOCAL, 1, 0), at(5 * SEC, CT_STATE_OTHER)),
        // A flow of another local address: an error about it is not addressed to LOCAL.
        (key(17, [192, 0, 2, 201], 5353, REMOTE_PORT), at(0, CT_STATE_OTHER)),
    ];
    for (k, v) in &seeds {
        dp.conntrack_insert(k, v).unwrap();
    }
    assert_eq!(dp.conntrack_entries().unwrap().len(), seeds.len());

    use XdpAction::{Drop, Pass};
    let cases: [(&str, Vec<u8>, XdpAction); 12] = [
        ("udp reply", v4(17, &udp(5353, 0)), Pass),
        ("udp reply at 59 s", v4(17, &udp(5354, 0)), Pass),
        ("udp reply at 61 s: expired", v4(17, &udp(5355, 0)), Drop),
        ("udp to an untracked port", v4(17, &udp(5356, 0)), Drop),
        ("tcp established at 200 s", v4(6, &tcp(443)), Pass),
        ("tcp handshake at 200 s: expired", v4(6, &tcp(444)), Drop),
        ("tcp handshake at 10 s", v4(6, &tcp(445)), Pass),
        ("tcp, right port, other protocol's entry", v4(6, &tcp(5353)), Drop),
        ("icmp echo reply", v4(1, &icmp(0)), Pass),
        ("icmp echo request is not a reply", v4(1, &icmp(8)), Drop),
        ("port unreachable about a tracked flow", port_unreachable(LOCAL, 5353), Pass),
        ("port unreachable about an untracked flow", port_unreachable(LOCAL, 6000), Drop),
    ];
    for (what, frame, want) in &cases {
        assert_eq!(dp.test_run_ingress(frame).unwrap().action, *want, "{what}");
    }
    // Embedded source is another host address than the error's destination: not related,
    // although that flow is tracked.
    let foreign = port_unreachable([192, 0, 2, 201], 5353);
    assert_eq!(dp.test_run_ingress(&foreign).unwrap().action, Drop, "error for another address");

    let stat = |s| dp.stat(DIRECTION_INGRESS, s).unwrap().packets;
    assert_eq!(stat(STAT_ALWAYS_REPLY), 5);
    assert_eq!(stat(STAT_ALWAYS_RELATED), 1);
    assert_eq!(stat(STAT_DEFAULT_DENY), 7);
}

const ALLOW_5353: &str = "\
apiVersion: fw/v1
kind: Policy
metadata: {name: mdns}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: mdns, action: allow, from: [0.0.0.0/0], proto: udp, ports: [5353]}
";

/// The conntrack lookup is made only where it can change the verdict: a reply the policy
/// allows passes as the policy's allow (counted under the rule, not as a reply); a reply the
/// policy denies passes as a reply.
#[test]
fn replies_the_policy_allows_are_counted_under_the_rule() {
    if !privileged("replies_the_policy_allows_are_counted_under_the_rule") {
        return;
    }
    let loaded = load([Input::new("t.yaml", ALLOW_5353)], &ParseLimits::default());
    let set = loaded.policy_set.expect("policy");
    let host = HostIdentity { name: "h".into(), labels: BTreeMap::new() };
    let state = compile(&set.for_host(&host), &Capacities::default()).expect("compile");
    let mut dp = Dataplane::load(&Capacities::default()).expect("load");
    dp.write_generation(0, &encode(&state)).unwrap();
    dp.set_active_generation(0).unwrap();
    let now = monotonic_ns();
    let fresh = ConntrackValue { last_seen_ns: now, state: CT_STATE_OTHER, _pad: 0 };
    for port in [5353, 5400] {
        dp.conntrack_insert(&key(17, LOCAL, port, REMOTE_PORT), &fresh).unwrap();
    }
    let stat = |dp: &Dataplane, s| dp.stat(DIRECTION_INGRESS, s).unwrap().packets;
    let ruled =
        |dp: &Dataplane| dp.rule_counters().unwrap().values().map(|c| c.packets).sum::<u64>();

    let pass = fw_loader::XdpAction::Pass;
    assert_eq!(dp.test_run_ingress(&v4(17, &udp(5353, 0))).unwrap().action, pass);
    assert_eq!((stat(&dp, STAT_ALWAYS_REPLY), ruled(&dp)), (0, 1), "allowed: the rule counts it");
    assert_eq!(dp.test_run_ingress(&v4(17, &udp(5400, 0))).unwrap().action, pass);
    assert_eq!((stat(&dp, STAT_ALWAYS_REPLY), ruled(&dp)), (1, 1), "denied: passes as a reply");
    assert_eq!(
        dp.test_run_ingress(&v4(17, &udp(5401, 0))).unwrap().action,
        fw_loader::XdpAction::Drop
    );
    assert_eq!(stat(&dp, STAT_DEFAULT_DENY), 1);
}
