//! Rule counters through the direct-mapped front (`fw_common::maps::RULE_COUNTER_CACHE`) and
//! the hash behind it: two rules whose ids share a front slot are both counted exactly (the
//! first in the slot, the second in the hash), a removed rule's counts go from both places
//! while a kept rule's stay, and a reset empties both.

use std::net::Ipv4Addr;

use fw_common::rule_counter_slot;
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::{PinRoot, privileged};
use fw_dataplane_tests::packet::{ETH_P_IP, Ipv4, ethernet, tcp};
use fw_loader::{Dataplane, XdpAction};

/// Rules allowing TCP `1000 + i` from 10.1.0.0/16, for `i` in `ports` (named `r<i>`).
fn state(ports: impl Iterator<Item = u16>) -> MapState {
    let mut y = String::from(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  defaults: {ingress: deny}\n  ingress:\n",
    );
    for i in ports {
        let port = 1000 + i;
        y.push_str(&format!(
            "    - {{name: r{i}, action: allow, proto: tcp, ports: [{port}], from: [10.1.0.0/16]}}\n"
        ));
    }
    let loaded = load([Input::new("p.yaml", y.as_str())], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "web-1".into(), ..HostIdentity::default() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compiles")
}

fn rule_id(state: &MapState, i: u16) -> u32 {
    let name = format!("r{i}");
    let id = state.rules.iter().find(|(_, r)| r.name.as_deref() == Some(&name)).map(|(id, _)| id.0);
    id.unwrap_or_else(|| panic!("no rule {name}"))
}

fn send(dp: &Dataplane, i: u16) {
    let frame =
        ethernet(&[], ETH_P_IP, &Ipv4::new(Ipv4Addr::new(10, 1, 0, 9), 6).build(&tcp(1000 + i)));
    assert_eq!(dp.test_run_ingress(&frame).expect("test run").action, XdpAction::Pass);
}

fn packets(dp: &Dataplane, rule: u32) -> Option<u64> {
    dp.rule_counters().expect("counters").get(&rule).map(|c| c.packets)
}

#[test]
fn rules_sharing_a_front_slot_are_both_counted_removed_and_reset() {
    if !privileged("rules_sharing_a_front_slot_are_both_counted_removed_and_reset") {
        return;
    }
    // 400 rules into 4,096 slots: ids that share a slot are all but certain (and the ids are
    // deterministic, so the test always finds the same pair).
    let all = state(0..400);
    let mut by_slot = std::collections::BTreeMap::new();
    let (a, b) = (0..400u16)
        .find_map(|i| {
            let slot = rule_counter_slot(rule_id(&all, i));
            by_slot.insert(slot, i).map(|j| (j, i))
        })
        .expect("two rules share a slot");
    let (id_a, id_b) = (rule_id(&all, a), rule_id(&all, b));
    assert_eq!(rule_counter_slot(id_a), rule_counter_slot(id_b));

    let root = PinRoot::new("rule-counters");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    dp.apply(&encode(&all), "r1", &all.digest(), b"one").expect("apply");
    // The test thread may move between CPUs: counts are per CPU and summed, so they must be
    // exact wherever each packet ran.
    send(&dp, a);
    send(&dp, b);
    send(&dp, b);
    send(&dp, a);
    send(&dp, b);
    assert_eq!(packets(&dp, id_a), Some(2));
    assert_eq!(packets(&dp, id_b), Some(3));
    let total: u64 = dp.rule_counters().expect("counters").values().map(|c| c.packets).sum();
    assert_eq!(total, 5, "no other rule counted anything");

    // Without rule a: its counts go (front or hash), b's stay, and a's slot is free for b.
    let without = state((0..400).filter(|&i| i != a));
    let r = dp.apply(&encode(&without), "r2", &without.digest(), b"two").expect("apply");
    assert_eq!(r.counters_removed, 1, "{r:?}");
    assert_eq!(packets(&dp, id_a), None);
    assert_eq!(packets(&dp, id_b), Some(3));
    send(&dp, b);
    assert_eq!(packets(&dp, id_b), Some(4));

    dp.reset_counters().expect("reset");
    assert!(dp.rule_counters().expect("counters").is_empty());
    send(&dp, b);
    assert_eq!(packets(&dp, id_b), Some(1));
}
