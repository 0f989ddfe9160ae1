//! The apply protocol on a pinned data plane (a bpffs root of the test's own): the kernel
//! ends up holding the desired state in both generations whoever wrote last, counters of
//! removed rules go while those of kept rules stay, and entries changed behind the protocol's
//! back are found by `drift` and repaired by the next apply.

use fw_dataplane_tests::harness::PinRoot as Root;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use fw_common::maps;
use fw_compiler::compile::compile;
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_dataplane_tests::harness::privileged;
use fw_dataplane_tests::packet::{ETH_P_IP, Ipv4, ethernet, tcp};
use fw_loader::enforce::{Target, enforce};
use fw_loader::{Dataplane, Desired, XdpAction};
use fw_netkit::Cgroup;

fn state(yaml: &str) -> MapState {
    let loaded = load([Input::new("p.yaml", yaml)], &ParseLimits::default());
    let set = loaded.policy_set.unwrap_or_else(|| panic!("{:?}", loaded.diagnostics));
    let host = HostIdentity { name: "web-1".into(), ..HostIdentity::default() };
    compile(&set.for_host(&host), &Capacities::default()).expect("compiles")
}

/// `keep` always; `gone` (from 10.2.0.0/16, a /32 nested in it allowed on another port)
/// only when `with_gone`.
fn policy(with_gone: bool) -> String {
    let mut y = String::from(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  defaults: {ingress: deny}\n  ingress:\n\
         \x20   - {name: keep, action: allow, proto: tcp, ports: [22], from: [10.1.0.0/16]}\n",
    );
    if with_gone {
        y.push_str(
            "    - {name: gone, action: allow, proto: tcp, ports: [80], from: [10.2.0.0/16]}\n\
             \x20   - {name: nested, action: allow, proto: tcp, ports: [81], from: [10.2.3.4/32]}\n",
        );
    }
    y
}

fn rule_id(state: &MapState, name: &str) -> u32 {
    let id = state.rules.iter().find(|(_, r)| r.name.as_deref() == Some(name)).map(|(id, _)| id.0);
    id.unwrap_or_else(|| panic!("no rule {name}"))
}

fn frame(src: Ipv4Addr, port: u16) -> Vec<u8> {
    ethernet(&[], ETH_P_IP, &Ipv4::new(src, 6).build(&tcp(port)))
}

fn kernel_view(e: &Encoded) -> Encoded {
    let mut e = e.clone();
    e.maps.remove(maps::WORKLOADS);
    e
}

fn assert_holds(dp: &Dataplane, want: &Encoded) {
    for g in 0..2 {
        assert_eq!(dp.read_generation(g).expect("read"), kernel_view(want), "generation {g}");
    }
}

#[test]
fn counters_of_a_removed_rule_go_and_those_of_a_kept_rule_stay() {
    if !privileged("counters_of_a_removed_rule_go_and_those_of_a_kept_rule_stay") {
        return;
    }
    let root = Root::new("apply");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (with, without) = (state(&policy(true)), state(&policy(false)));
    let (keep, gone) = (rule_id(&with, "keep"), rule_id(&with, "gone"));
    assert_eq!(rule_id(&without, "keep"), keep, "rule ids are stable");
    let r = dp.apply(&encode(&with), "r1", &with.digest(), b"one").expect("apply");
    assert_eq!(r.counters_removed, 0);

    let run = |dp: &Dataplane, src: [u8; 4], port| {
        dp.test_run_ingress(&frame(Ipv4Addr::from(src), port)).expect("test run").action
    };
    assert_eq!(run(&dp, [10, 1, 0, 9], 22), XdpAction::Pass);
    assert_eq!(run(&dp, [10, 2, 0, 9], 80), XdpAction::Pass);
    let counters = dp.rule_counters().expect("counters");
    assert_eq!(counters.get(&keep).map(|c| c.packets), Some(1));
    assert_eq!(counters.get(&gone).map(|c| c.packets), Some(1));

    let r = dp.apply(&encode(&without), "r2", &without.digest(), b"two").expect("apply");
    assert_eq!(r.counters_removed, 1, "{r:?}");
    assert_holds(&dp, &encode(&without));
    let counters = dp.rule_counters().expect("counters");
    assert_eq!(counters.get(&gone), None, "the removed rule's counters are deleted");
    assert_eq!(counters.get(&keep).map(|c| c.packets), Some(1), "the kept rule's survive");
    assert_eq!(run(&dp, [10, 2, 0, 9], 80), XdpAction::Drop);
    assert_eq!(run(&dp, [10, 1, 0, 9], 22), XdpAction::Pass);
    assert_eq!(dp.rule_counters().expect("counters").get(&keep).map(|c| c.packets), Some(2));
    // The saved state follows the applies; older ones are unpinned.
    assert_eq!(dp.saved_state(0).expect("saved").as_deref(), Some(&b"two"[..]));
    assert_eq!(dp.saved_state(1).expect("saved").as_deref(), Some(&b"two"[..]));
    let states: Vec<_> = std::fs::read_dir(&root.0)
        .expect("root")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("FW_STATE"))
        .collect();
    assert_eq!(states.len(), 1, "{states:?}");
}

#[test]
fn a_data_plane_loaded_here_is_known_to_be_empty_without_reading_it() {
    if !privileged("a_data_plane_loaded_here_is_known_to_be_empty_without_reading_it") {
        return;
    }
    let root = Root::new("apply-fresh");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    for g in 0..2 {
        // What the first apply diffs against is what the kernel holds.
        let cached = dp.cached_state(g).expect("a cache entry for a fresh generation");
        assert_eq!(cached, dp.read_generation(g).expect("read"), "generation {g}");
        assert_eq!(dp.applied(g).expect("record"), None, "nothing is applied yet");
        assert!(dp.nothing_applied(g).expect("record"), "generation {g}");
    }
    let s = state(&policy(true));
    let r = dp.apply(&encode(&s), "r1", &s.digest(), b"one").expect("apply");
    // The old generation was known to hold what the standby held: the same deltas.
    assert_eq!(r.replay, r.standby, "{r:?}");
    // `load_pinned` released the root's lock: another process may have adopted and attached
    // the programs since, so the apply went through the flip, the grace period and the replay.
    assert!(!r.both_at_once, "{r:?}");
    assert_holds(&dp, &encode(&s));
    assert!(!dp.nothing_applied(0).expect("record") && !dp.nothing_applied(1).expect("record"));
    // Another process knows nothing of the cache: it reads, and finds the same.
    drop(dp);
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    let again = adopted.apply(&encode(&s), "r1", &s.digest(), b"one").expect("apply");
    assert_eq!((again.standby.written, again.replay.written), (0, 0), "{again:?}");
    assert!(adopted.drift(&encode(&s)).expect("drift").is_clean());
}

#[test]
fn a_first_load_through_enforce_writes_both_generations_at_once() {
    if !privileged("a_first_load_through_enforce_writes_both_generations_at_once") {
        return;
    }
    let root = Root::new("apply-first");
    let cg = Cgroup::new().expect("cgroup");
    let caps = Capacities::default();
    let target = Target { root: &root.0, caps: &caps, interfaces: &[], cgroup: cg.dir() };
    let s = state(&policy(true));
    let (enc, digest) = (encode(&s), s.digest());
    let desired = Desired {
        encoded: &enc,
        workloads: None,
        revision: "r1",
        digest: &digest,
        saved_state: b"one",
    };
    let (mut dp, done) = enforce(&target, &desired).expect("enforce");
    // Loaded, applied and attached under the root's lock: no program could run before the
    // attach, so both generations got the same deltas at once and nothing waited.
    let r = &done.apply;
    assert!(r.both_at_once, "{r:?}");
    assert!(r.standby.written > 5, "{r:?}");
    assert_eq!(r.replay, r.standby, "{r:?}");
    assert_holds(&dp, &enc);
    for g in 0..2 {
        let applied = dp.applied(g).expect("record").expect("a record");
        assert_eq!((applied.revision.as_str(), applied.digest.as_str()), ("r1", digest.as_str()));
        assert_eq!(dp.saved_state(g).expect("saved").as_deref(), Some(&b"one"[..]));
        // What the next apply trusts without reading is what the kernel holds.
        let cached = dp.cached_state(g).expect("a cache entry");
        assert_eq!(cached, dp.read_generation(g).expect("read"), "generation {g}");
    }
    // The programs are attached now: the next apply flips, waits and replays.
    let s2 = state(&policy(false));
    let enc2 = encode(&s2);
    let r2 = dp.apply(&enc2, "r2", &s2.digest(), b"two").expect("apply");
    assert!(!r2.both_at_once, "{r2:?}");
    assert!(r2.standby.deleted >= 2 && r2.standby.deleted < 10, "{r2:?}");
    assert_eq!(r2.standby, r2.replay, "{r2:?}");
    assert_holds(&dp, &enc2);
    drop(dp);
    let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
    assert!(adopted.drift(&enc2).expect("drift").is_clean());
    // An enforce that adopts the pins does not know what runs them either.
    drop(adopted);
    let (_, again) = enforce(&target, &desired).expect("enforce");
    assert!(!again.apply.both_at_once, "{:?}", again.apply);
}

#[test]
fn each_apply_writes_only_the_diff_and_another_writer_is_noticed() {
    if !privileged("each_apply_writes_only_the_diff_and_another_writer_is_noticed") {
        return;
    }
    let root = Root::new("apply");
    let mut a = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (with, without) = (encode(&state(&policy(true))), encode(&state(&policy(false))));
    let full = a.apply(&with, "r1", "d1", b"s").expect("apply");
    assert!(full.standby.written > 5, "{full:?}");
    // The second apply of the same process knows what both generations hold: an unchanged
    // state writes nothing at all.
    let same = a.apply(&with, "r1", "d1", b"s").expect("apply");
    assert_eq!((same.standby.written, same.standby.deleted), (0, 0), "{same:?}");
    assert_eq!((same.replay.written, same.replay.deleted), (0, 0), "{same:?}");
    // Removing two rules (a /16 and a /32 nested in it, their L4 entries): only those go,
    // in each generation, and the removal of the nested /32 is verified as an exact key.
    let less = a.apply(&without, "r2", "d2", b"s").expect("apply");
    assert!(less.standby.deleted >= 2 && less.standby.deleted < 10, "{less:?}");
    assert_eq!(less.standby, less.replay);
    assert_holds(&a, &without);

    // Another process applies meanwhile: `a`'s knowledge of both generations is stale, and
    // the records say so (their write ids changed), so `a` reads them back and still ends up
    // with exactly what it applies.
    let mut b = Dataplane::adopt(&root.0).expect("adopt");
    b.apply(&with, "r3", "d3", b"t").expect("apply");
    assert_holds(&b, &with);
    let back = a.apply(&without, "r4", "d4", b"s").expect("apply");
    assert!(back.standby.deleted >= 2, "{back:?}");
    assert_holds(&a, &without);
    assert_eq!(a.applied(0).expect("record").map(|r| r.revision), Some("r4".into()));
}

#[test]
fn drift_finds_entries_changed_behind_the_protocol_and_an_apply_repairs_them() {
    if !privileged("drift_finds_entries_changed_behind_the_protocol_and_an_apply_repairs_them") {
        return;
    }
    let root = Root::new("apply");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (with, without) = (encode(&state(&policy(true))), encode(&state(&policy(false))));
    dp.apply(&without, "r1", "d1", b"s").expect("apply");
    assert!(dp.drift(&without).expect("drift").is_clean());

    // Someone writes the active generation's maps directly (no record change).
    let active = dp.active_generation().expect("active");
    let mut other = Dataplane::adopt(&root.0).expect("adopt");
    other.write_generation(active, &with).expect("write by hand");
    drop(other);
    let from = [10, 2, 0, 9].into();
    assert_eq!(dp.test_run_ingress(&frame(from, 80)).expect("run").action, XdpAction::Pass);

    let report = dp.drift(&without).expect("drift");
    assert!(!report.is_clean());
    let g = &report.generations[active as usize];
    assert!(g.active && g.recorded && !g.maps.is_empty(), "{report:?}");
    assert!(report.generations.iter().filter(|g| !g.active).all(|g| g.maps.is_empty()));
    assert_eq!(report.entries(), g.maps.values().map(|d| d.len()).sum::<usize>());

    // The repair is an ordinary apply: it writes only the drifted entries (into the old
    // active generation, on the replay), through the flip.
    let r = dp.apply(&without, "r1", "d1", b"s").expect("repair");
    assert_eq!((r.standby.written, r.standby.deleted), (0, 0), "{r:?}");
    assert_eq!(r.replay.written + r.replay.deleted, report.entries(), "{r:?}");
    assert!(dp.drift(&without).expect("drift").is_clean());
    assert_holds(&dp, &without);
    assert_eq!(dp.test_run_ingress(&frame(from, 80)).expect("run").action, XdpAction::Drop);
}

#[test]
fn an_apply_whose_written_entries_do_not_decode_changes_nothing() {
    if !privileged("an_apply_whose_written_entries_do_not_decode_changes_nothing") {
        return;
    }
    let root = Root::new("apply");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let good = encode(&state(&policy(false)));
    dp.apply(&good, "r1", "d1", b"s").expect("apply");
    let before = dp.applied(0).expect("record");

    // A /24 with host bits set: only the new entry is bad, the rest is what is loaded.
    let mut host_bits = good.clone();
    let v4 = host_bits.maps.get_mut(maps::INGRESS_V4).expect("v4");
    v4.push(&[24, 0, 0, 0, 203, 0, 113, 7], &[1, 0, 0, 0]);
    v4.sort();
    // A key given twice with two values (sorted, so only the duplicate is wrong).
    let mut twice = good.clone();
    let v4 = twice.maps.get_mut(maps::INGRESS_V4).expect("v4");
    let mut pairs = v4.to_vec();
    let first = pairs.first().cloned().expect("an entry");
    pairs.insert(1, (first.0, vec![0x7f, 0, 0, 0]));
    *v4 = pairs.into();
    for bad in [host_bits, twice] {
        let err = dp.apply(&bad, "r2", "d2", b"t").expect_err("refused");
        assert!(matches!(err, fw_loader::Error::InvalidState(_)), "{err:?}");
        assert_holds(&dp, &good);
        assert_eq!(dp.applied(0).expect("record"), before);
        assert_eq!(dp.applied(1).expect("record"), before);
    }
}

/// Both generations' cache entries hold `want` (but the workload table) in `want`'s own
/// buffers, not in copies.
fn assert_cache_shares(dp: &Dataplane, want: &Encoded) {
    for g in 0..fw_common::GENERATIONS {
        let cached = dp.cached_state(g).expect("a cache entry");
        assert_eq!(cached, kernel_view(want), "generation {g}");
        for (name, entries) in &cached.maps {
            let shared = want.maps.get(name).is_some_and(|w| w.shares(entries));
            assert!(shared, "generation {g}: {name} is a copy");
        }
    }
}

#[test]
fn a_change_given_as_deltas_applies_on_top_of_the_state_applied_last_only() {
    if !privileged("a_change_given_as_deltas_applies_on_top_of_the_state_applied_last_only") {
        return;
    }
    let root = Root::new("apply");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let (with, without) = (state(&policy(true)), state(&policy(false)));
    let (enc_with, enc_without) = (encode(&with), encode(&without));
    let gone = rule_id(&with, "gone");
    dp.apply(&enc_with, "r1", &with.digest(), b"one").expect("apply");
    assert_cache_shares(&dp, &enc_with);
    assert_eq!(
        dp.test_run_ingress(&frame([10, 2, 0, 9].into(), 80)).expect("run").action,
        XdpAction::Pass
    );
    let changes = fw_loader::entry_delta(&kernel_view(&enc_with), &kernel_view(&enc_without));
    assert!(!changes.is_empty());

    // Not on top of what is loaded: refused, nothing written.
    let err = dp.apply_changes("not-the-base", &changes, "r2", &without.digest(), b"two");
    assert!(matches!(err, Err(fw_loader::Error::StaleBase)), "{err:?}");
    let mut fresh = Dataplane::adopt(&root.0).expect("adopt");
    let err = fresh.apply_changes(&with.digest(), &changes, "r2", &without.digest(), b"two");
    assert!(
        matches!(err, Err(fw_loader::Error::StaleBase)),
        "a fresh process knows nothing: {err:?}"
    );
    drop(fresh);
    // A key written twice: refused before anything is written.
    let mut twice = changes.clone();
    let d = twice.get_mut(maps::INGRESS_V4).expect("a v4 change");
    let e = d.remove.first().cloned().expect("a removed prefix");
    d.upsert.push(&e, &[1, 0, 0, 0]);
    let err = dp.apply_changes(&with.digest(), &twice, "r2", &without.digest(), b"two");
    assert!(matches!(err, Err(fw_loader::Error::InvalidState(_))), "{err:?}");
    assert_holds(&dp, &enc_with);

    let r =
        dp.apply_changes(&with.digest(), &changes, "r2", &without.digest(), b"two").expect("apply");
    let n: usize = changes.values().map(|d| d.len()).sum();
    assert_eq!(r.standby.written + r.standby.deleted, n, "{r:?}");
    assert_eq!(r.standby, r.replay);
    assert_holds(&dp, &enc_without);
    // Given the desired encoding, the cache keeps its buffers instead of the patched copies.
    dp.share_cached_maps(&enc_without);
    assert_cache_shares(&dp, &enc_without);
    assert_eq!(
        dp.test_run_ingress(&frame([10, 2, 0, 9].into(), 80)).expect("run").action,
        XdpAction::Drop
    );
    assert_eq!(dp.rule_counters().expect("counters").get(&gone), None);
    assert_eq!(dp.saved_state(0).expect("saved").as_deref(), Some(&b"two"[..]));
    // The next change builds on it; the base is now `without`. With a workload table (cgroup
    // id -> class; the id needs no cgroup behind it for the table), both generations get it.
    let back = fw_loader::entry_delta(&kernel_view(&enc_without), &kernel_view(&enc_with));
    let workloads: BTreeMap<u64, u32> = [(1, 7)].into();
    let r = dp
        .apply_changes_with_workloads(
            &without.digest(),
            &back,
            Some(&workloads),
            "r3",
            &with.digest(),
            b"one",
        )
        .expect("apply");
    let upserts: usize = back.values().map(|d| d.upsert.len()).sum();
    assert_eq!(r.standby.written, upserts + 1, "the changes and one workload: {r:?}");
    assert_eq!(r.replay.written, upserts + 1, "{r:?}");
    assert_holds(&dp, &enc_with);
    let status = dp.status().expect("status");
    let table = status.maps.iter().find(|m| m.name == maps::WORKLOADS).expect("FW_WORKLOADS");
    assert_eq!(table.entries, 1);
    // Every other generational map's count (walked key by key) is its encoded entries'.
    let counted = |m: &&fw_loader::MapStatus| {
        maps::GENERATIONAL.contains(&m.name) && m.name != maps::WORKLOADS
    };
    for m in status.maps.iter().filter(counted) {
        let want = enc_with.maps.get(m.name).map_or(0, |e| e.len());
        assert_eq!(m.entries, want, "{}", m.name);
    }
    assert!(status.maps.iter().any(|m| m.name == maps::INGRESS_V4 && m.entries > 0));
    assert!(dp.drift(&enc_with).expect("drift").is_clean());
    // The drift check read both generations; what it keeps is `enc_with`'s buffers.
    assert_cache_shares(&dp, &enc_with);
}

/// A policy allowing TCP port 22 from `n` prefixes of every length /8 to /32, the set chosen
/// by `shift` (a shift by one removes one prefix of each length and adds another).
fn many_prefixes(n: u32, shift: u32) -> String {
    let mut from = Vec::new();
    for len in 8..=32u32 {
        for i in 0..n {
            let addr = Ipv4Addr::from((i + shift + 1) << (32 - len));
            from.push(format!("{addr}/{len}"));
        }
    }
    format!(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: p}}\nspec:\n  defaults: {{ingress: deny}}\n  ingress:\n\
         \x20   - {{name: many, action: allow, proto: tcp, ports: [22], from: [{}]}}\n",
        from.join(", ")
    )
}

#[test]
fn full_loads_and_large_and_small_changes_of_every_prefix_length_read_back_exactly() {
    if !privileged(
        "full_loads_and_large_and_small_changes_of_every_prefix_length_read_back_exactly",
    ) {
        return;
    }
    let root = Root::new("apply");
    let mut dp = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let run = |dp: &Dataplane, src: Ipv4Addr| {
        dp.test_run_ingress(&frame(src, 22)).expect("test run").action
    };
    // A full load (verified against one batched read per hash), a change of two prefixes per
    // length (verified key by key), a change of most of them (batched again).
    for (step, shift) in [(0, 0), (1, 1), (2, 25)] {
        let enc = encode(&state(&many_prefixes(40, shift)));
        let r = dp.apply(&enc, &format!("r{step}"), &format!("d{step}"), b"s").expect("apply");
        assert!(r.standby.written > 0 && r.standby == r.replay, "{r:?}");
        assert_holds(&dp, &enc);
        // The first /8 and the first /32 of this set let a packet through; an address in no
        // prefix does not.
        let first = |len: u32| Ipv4Addr::from((shift + 1) << (32 - len));
        let in_8 = Ipv4Addr::from(u32::from(first(8)) | 0x0001_0203);
        assert_eq!(run(&dp, in_8), XdpAction::Pass, "step {step}");
        assert_eq!(run(&dp, first(32)), XdpAction::Pass, "step {step}");
        assert_eq!(run(&dp, Ipv4Addr::new(255, 255, 255, 254)), XdpAction::Drop, "step {step}");
        // Another process reads both generations back (batched) as exactly what was applied,
        // so applying it again writes nothing.
        let mut adopted = Dataplane::adopt(&root.0).expect("adopt");
        assert_holds(&adopted, &enc);
        let again = adopted.apply(&enc, "again", "again", b"s").expect("apply");
        assert_eq!((again.standby.written, again.standby.deleted), (0, 0), "{again:?}");
    }
}
