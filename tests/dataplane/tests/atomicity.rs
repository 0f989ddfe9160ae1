//! The generation flip under a flood of real packets: while a sender in a test namespace floods
//! UDP at the host end of a veth pair (the ingress program attached there, pinned under a bpffs
//! root of the test's own), two policies that decide the flood differently are applied in turn,
//! many times. Every flooded packet must be decided by the deciding rule of policy A or of
//! policy B, never by anything else, and the programs must stay the same.
//!
//! The two policies are built so that a packet which saw a mix of generations would show up
//! on a rule of its own. Each is a policy of its own (`gen-a` or `gen-b`) with one rule plus
//! the same policy `shared`, whose two rules therefore keep one id in A and in B (an apply
//! deletes the counters of rules neither generation holds any more, so a rule only one side
//! held would lose what it counted by the end of the next apply):
//! - `flood`, restricted to the sender's /32: A allows the flood by it, B denies it. The
//!   sender's address therefore has a different address class in each (a class id is a hash of
//!   its rule set), and neither class has L4 entries in the other policy's table;
//! - `mixed` (in `shared`), allowing the flood's port from any address: it sits in the shared
//!   table (rules without an address restriction), so in a pure lookup it loses to `flood`
//!   (A: both allow, `gen-a` ranks before `shared` by name; B: deny beats allow) and never decides a
//!   flood packet. A lookup that took the LPM of one generation and the L4 table of the other
//!   misses the class and is decided by `mixed` instead;
//! - `rest` (in `shared`), allowing anything else: the namespace's own traffic (IPv6 neighbour
//!   discovery and MLD reports, which come on their own schedule) is decided there and never
//!   reaches the default.
//!
//! So the flood may only ever count on A's and B's `flood` rules: `mixed` must stay at zero,
//! no rule outside the two policies may count, and no stats slot may either (default, internal
//! error, malformed, ...) except ARP and neighbour discovery, which are always allowed before
//! any generation is read. `flood` of the policy just replaced loses its counters in the
//! apply, so the test reads them before each apply and keeps the highest count seen.

use fw_dataplane_tests::harness::PinRoot;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fw_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, STAT_ALWAYS_ARP, STAT_ALWAYS_ND, STATS_PER_DIRECTION,
    stat_index,
};
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, ClassId, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_loader::{Dataplane, Opened};
use fw_netkit::{Netns, UdpEchoServer, UdpFlood, VethPair};

/// How many applies the flood sees (A and B alternating).
const APPLIES: usize = 200;

fn state(yaml: &str) -> MapState {
    let loaded = load([Input::new("p.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "h1".into(), ..HostIdentity::default() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compiles")
}

fn policy(name: &str, flood: &str, peer: IpAddr, port: u16) -> String {
    format!(
        "apiVersion: fw/v1
kind: Policy
metadata: {{name: {name}}}
spec:
  defaults: {{ingress: deny}}
  ingress:
    - {{name: flood, action: {flood}, from: [{peer}/32], proto: udp, ports: [{port}]}}
---
apiVersion: fw/v1
kind: Policy
metadata: {{name: shared}}
spec:
  ingress:
    - {{name: mixed, action: allow, proto: udp, ports: [{port}]}}
    - {{name: rest, action: allow}}
"
    )
}

fn rule_id(st: &MapState, name: &str) -> u32 {
    assert_eq!(st.rules.len(), 3, "three rules per policy");
    let id = st.rules.iter().find(|(_, r)| r.name.as_deref() == Some(name)).map(|(id, _)| id.0);
    id.unwrap_or_else(|| panic!("no rule {name}"))
}

/// The address class of `peer` (a /32 in the policy, so a class of the narrow layer; no rule
/// has a wide prefix, so its wide class holds no entries in either policy).
fn class_of(st: &MapState, peer: IpAddr) -> ClassId {
    let IpAddr::V4(v4) = peer else { panic!("IPv4 peer") };
    let net = ipnet::Ipv4Net::new(v4, 32).expect("/32");
    let classes = st.ingress.v4.get(&net).expect("the peer's /32 is in the LPM table");
    let wide = classes.wide;
    assert!(!st.ingress.l4.keys().any(|k| k.class == wide), "no wide-layer entries");
    classes.narrow
}

/// The mixes this test relies on to be visible really are: the sender's class in one policy
/// has no L4 entries in the other (so a mixed lookup falls to the shared table, whose entry
/// for the flood's port is `mixed`).
fn assert_mixes_are_visible(a: &MapState, b: &MapState, peer: IpAddr) {
    let (ca, cb) = (class_of(a, peer), class_of(b, peer));
    assert_ne!(ca, cb, "the sender's class must differ between the policies");
    for (this, other, class) in [(a, b, ca), (b, a, cb)] {
        assert!(this.ingress.l4.keys().any(|k| k.class == class), "{class:?} has entries");
        assert!(
            !other.ingress.l4.keys().any(|k| k.class == class),
            "{class:?} must have no L4 entries in the other policy"
        );
        assert!(this.ingress.l4.keys().any(|k| k.class == ClassId::SHARED), "a shared table");
    }
}

/// Every stats slot but ARP's and neighbour discovery's, by (direction, slot), with what it
/// counted.
fn stray_stats(dp: &Dataplane) -> BTreeMap<(u32, u32), u64> {
    let mut out = BTreeMap::new();
    for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
        for slot in 0..STATS_PER_DIRECTION {
            if direction == DIRECTION_INGRESS && (slot == STAT_ALWAYS_ARP || slot == STAT_ALWAYS_ND)
            {
                continue;
            }
            let c = dp.stat(direction, slot).expect("stat");
            if c.packets != 0 {
                out.insert((direction, slot), c.packets);
            }
        }
    }
    assert_eq!(stat_index(DIRECTION_EGRESS, STATS_PER_DIRECTION - 1) + 1, fw_common::STATS_ENTRIES);
    out
}

#[test]
fn a_flood_across_many_applies_is_only_ever_decided_by_one_generation() {
    if !privileged("a_flood_across_many_applies_is_only_ever_decided_by_one_generation") {
        return;
    }
    let root = PinRoot::new("atomicity");
    let ns = Netns::new().expect("netns");
    let veth = VethPair::new(&ns).expect("veth");
    let host = IpAddr::V4(veth.host_v4());
    let peer = IpAddr::V4(veth.peer_v4());
    // A receiver on the host, so allowed datagrams are consumed rather than answered with
    // port-unreachable errors.
    let sink = UdpEchoServer::start(SocketAddr::new(host, 0)).expect("sink");
    let port = sink.addr().port();

    let a = state(&policy("gen-a", "allow", peer, port));
    let b = state(&policy("gen-b", "deny", peer, port));
    let (rule_a, rule_b) = (rule_id(&a, "flood"), rule_id(&b, "flood"));
    let mixed = [rule_id(&a, "mixed")];
    let rest = [rule_id(&a, "rest")];
    assert_eq!(mixed, [rule_id(&b, "mixed")], "`mixed` has one id in both policies");
    assert_eq!(rest, [rule_id(&b, "rest")], "`rest` has one id in both policies");
    assert_ne!(rule_a, rule_b);
    assert_mixes_are_visible(&a, &b, peer);
    let (enc_a, enc_b) = (encode(&a), encode(&b));

    let (mut dp, opened) =
        Dataplane::open_pinned(&root.0, &Capacities::default()).expect("load and pin");
    assert_eq!(opened, Opened::Loaded);
    dp.apply(&enc_a, "a", &a.digest(), b"").expect("apply A");
    let attachment = dp.attach_xdp(veth.host_name()).expect("attach");
    let program = dp.ingress_program_id().expect("program id");
    assert_eq!(attachment.program_id, program);
    // Neighbour resolution before the counters start, so the flood starts at once.
    let _ = ns.run(move || {
        fw_netkit::udp_echo(SocketAddr::new(host, port), b"hi", Duration::from_millis(500))
    });
    dp.reset_counters().expect("reset counters");

    let flood = UdpFlood::start_in(&ns, SocketAddr::new(peer, 0), SocketAddr::new(host, port), 16)
        .expect("flood");
    let started = Instant::now();
    while dp.rule_counters().expect("counters").get(&rule_a).is_none_or(|c| c.packets == 0) {
        assert!(started.elapsed() < Duration::from_secs(10), "the flood never reached rule A");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
    let mut note = |dp: &Dataplane| {
        for (rule, c) in dp.rule_counters().expect("counters") {
            let best = seen.entry(rule).or_default();
            *best = (*best).max(c.packets);
        }
    };
    for i in 0..APPLIES {
        let (enc, st, rev) = if i % 2 == 0 { (&enc_b, &b, "b") } else { (&enc_a, &a, "a") };
        note(&dp);
        dp.apply(enc, rev, &st.digest(), b"").expect("apply");
        assert_eq!(dp.ingress_program_id().expect("program id"), program, "apply {i}");
        // Let each generation decide a share of the flood.
        std::thread::sleep(Duration::from_millis(3));
    }
    let elapsed = t.elapsed();
    let sent = flood.stop().expect("flood");
    note(&dp);

    let attachments = fw_loader::attachments(&root.0).expect("attachments");
    assert_eq!(attachments.len(), 1);
    assert_eq!(attachments[0].program_id, program, "the link still runs the same program");
    assert_eq!(attachments[0].link_id, attachment.link_id, "the same link");

    let counters = dp.rule_counters().expect("counters");
    let held = |r: &u32| *r == rule_a || *r == rule_b || mixed.contains(r) || rest.contains(r);
    let strays: Vec<_> = seen.iter().filter(|(r, n)| !held(r) && **n > 0).collect();
    assert!(strays.is_empty(), "rules neither generation holds decided packets: {strays:?}");
    let by_mixed: Vec<_> = counters.iter().filter(|(r, _)| mixed.contains(r)).collect();
    assert!(
        by_mixed.is_empty(),
        "mixed lookups (LPM of one generation, L4 of the other): {by_mixed:?}"
    );
    let by_rest: u64 = rest.iter().filter_map(|r| counters.get(r)).map(|c| c.packets).sum();
    let stats = stray_stats(&dp);
    assert!(stats.is_empty(), "packets decided by no rule of A or B: {stats:?}");
    let got = |r| seen.get(&r).copied().unwrap_or(0);
    let (by_a, by_b) = (got(rule_a), got(rule_b));
    assert!(by_a > 0 && by_b > 0, "both generations decided flood packets: A {by_a}, B {by_b}");
    assert!(by_a + by_b <= sent.sent, "counted {} of {} sent", by_a + by_b, sent.sent);
    eprintln!(
        "{APPLIES} applies in {elapsed:?} under a flood of {} datagrams ({} send errors): \
         A allowed {by_a}, B denied {by_b}, no mixed lookup \
         ({by_rest} packets of the namespace's own by the rest rules)",
        sent.sent, sent.failed
    );
}
