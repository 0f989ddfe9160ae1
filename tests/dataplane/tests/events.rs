//! Events from the XDP program (run with BPF_PROG_TEST_RUN, no traffic needed): which
//! decisions emit one, what it holds, and that the per-CPU rate limit caps a flood and counts
//! the rest as dropped.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use fw_common::DIRECTION_INGRESS;
use fw_common::events::{EVENT_ALLOW, EVENT_AUDIT_DENY, EVENT_BURST, EVENT_DENY, Event};
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_dataplane_tests::packet::{Ipv4, ethernet, tcp};
use fw_loader::{Dataplane, XdpAction};

const POLICY: &str = "\
apiVersion: fw/v1
kind: Policy
metadata: {name: enforce}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: ssh, action: allow, proto: tcp, ports: [22], log: true}
    - {name: web, action: allow, proto: tcp, ports: [80]}
    - {name: quiet, action: allow, proto: tcp, ports: [443]}
---
apiVersion: fw/v1
kind: Policy
metadata: {name: audit}
spec:
  mode: audit
  ingress:
    - {name: no-web, action: deny, proto: tcp, ports: [80]}
";

fn compile_yaml(yaml: &str) -> MapState {
    let loaded = load([Input::new("test.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:#?}", loaded.diagnostics));
    let host = HostIdentity { name: "test-host".into(), labels: BTreeMap::new() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compile")
}

fn rule_id(state: &MapState, name: &str) -> u32 {
    state.rules.iter().find(|(_, r)| r.name.as_deref() == Some(name)).map(|(id, _)| id.0).unwrap()
}

fn frame(port: u16) -> Vec<u8> {
    ethernet(&[], 0x0800, &Ipv4::new(Ipv4Addr::new(198, 51, 100, 7), 6).build(&tcp(port)))
}

#[test]
fn logged_rules_default_denies_and_audit_denies_emit_events_within_the_rate_limit() {
    if !privileged("logged_rules_default_denies_and_audit_denies_emit_events_within_the_rate_limit")
    {
        return;
    }
    let state = compile_yaml(POLICY);
    let mut dp = Dataplane::load(&Capacities::default()).expect("load");
    dp.write_generation(0, &encode(&state)).unwrap();
    dp.set_active_generation(0).unwrap();
    let mut events = dp.events().expect("event reader");
    assert!(dp.events().is_err(), "one reader only");

    let expect = [
        (22, XdpAction::Pass, Some((EVENT_ALLOW, rule_id(&state, "ssh")))),
        (80, XdpAction::Pass, Some((EVENT_AUDIT_DENY, rule_id(&state, "no-web")))),
        (443, XdpAction::Pass, None),
        (23, XdpAction::Drop, Some((EVENT_DENY, 0))),
    ];
    let mut want = Vec::new();
    for (port, action, event) in expect {
        assert_eq!(dp.test_run_ingress(&frame(port)).unwrap().action, action, "port {port}");
        want.extend(event.map(|(verdict, rule)| (port, verdict, rule)));
    }
    let got: Vec<Event> = events.drain();
    let summary: Vec<(u16, u8, u32)> =
        got.iter().map(|e| (e.dst_port, e.verdict, e.rule)).collect();
    assert_eq!(summary, want);
    for e in &got {
        assert_eq!((e.direction, e.proto, e.family), (DIRECTION_INGRESS as u8, 6, 4));
        assert_eq!((&e.src[..4], &e.dst[..4]), (&[198, 51, 100, 7][..], &[192, 0, 2, 200][..]));
        assert_eq!(e.src_port, 40000);
        assert!(e.timestamp_ns > 0);
    }
    assert_eq!(events.stats().unwrap().emitted, 3);
    assert_eq!(events.stats().unwrap().dropped, 0);

    // A flood of default denies on one CPU (a test run repeats on the CPU it started on).
    const FLOOD: u32 = 20_000;
    let started = Instant::now();
    let out = dp.test_run_ingress_repeat(&frame(23), FLOOD).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(out.action, XdpAction::Drop);
    let stats = events.stats().unwrap();
    assert_eq!(stats.emitted + stats.dropped, 3 + u64::from(FLOOD));
    let flood_emitted = stats.emitted - 3;
    // At most the burst plus what the rate refilled while it ran (1000/s), plus slack.
    let limit = EVENT_BURST + (elapsed.as_millis() as u64) + 2;
    assert!(flood_emitted <= limit, "{flood_emitted} events emitted in {elapsed:?}, limit {limit}");
    assert!(flood_emitted >= EVENT_BURST - 3, "the burst is available ({flood_emitted})");
    assert_eq!(events.drain().len() as u64, flood_emitted);
}
