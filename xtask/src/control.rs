//! Part 4: the control plane. Compile time; a full load of 100k and 1M prefixes into fresh
//! maps, against `nft -f` (both set layouts) and `iptables-restore` loading the same set into
//! a fresh namespace table; one-rule changes against the loaded 100k state, given whole
//! (`Dataplane::apply`) and as entry deltas (`Dataplane::apply_changes`); the generation
//! flip; memory.
//!
//! Our full loads go through `enforce` on a private bpffs root (removed at the end, also on
//! failure): what `fwctl apply` and fwd do on a host without a data plane (load and pin,
//! apply, attach, under the root's lock; attached here to a cgroup of the bench's own and to
//! no interface). The timed region is the apply, by its report's steps, with the encoded
//! state in hand (the compile is timed on its own; loading the programs is not loading
//! prefixes). *To enforced* is until the flip returned; *complete* includes the grace period,
//! the replay onto the old generation and the clean-up. On this first load nothing runs the
//! programs before the attach, so the apply writes both generations at once and neither
//! waits nor replays: *to enforced* and *complete* are then nearly the same. The one-rule
//! changes run on a data plane from `Dataplane::load_pinned`, which releases the root's lock
//! (another process could attach it), so every apply there goes through every step.
//! nftables and iptables load from a file, as an operator would, each into a fresh table
//! (the previous one deleted, untimed); their time is the whole command, since the rules are
//! enforced when it returns.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use fw_compiler::ast::Direction;
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::mapstate::MapState;
use fw_loader::enforce::{self, enforce};
use fw_loader::{ApplyReport, Dataplane, Desired};
use fw_netkit::{Cgroup, Netns, VethPair};
use serde_json::json;

use crate::netfilter::{self, Layout};
use crate::report::{Bound, Part, Summary, Table, Target, percentile};
use crate::states::{self, Family};
use crate::{Settings, sys};

/// Removes a pin root even when the bench fails.
struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = fw_loader::unload_pinned(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What fwctl saves with a generation: the state without its prefix and L4 entries.
fn rule_table(s: &MapState) -> Vec<u8> {
    let mut t = s.clone();
    for d in [&mut t.ingress, &mut t.egress] {
        d.v4.clear();
        d.v6.clear();
        d.l4.clear();
    }
    serde_json::to_vec(&t).expect("a map state serializes")
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Time from the call until the flip returned, from an apply's report.
fn enforced(r: &ApplyReport) -> f64 {
    let mut t = 0.0;
    for (s, d) in &r.timings {
        t += ms(*d);
        if *s == "flip" {
            break;
        }
    }
    t
}

fn step(r: &ApplyReport, name: &str) -> f64 {
    r.timings.iter().find(|(s, _)| *s == name).map_or(f64::NAN, |(_, d)| ms(*d))
}

fn size_label(n: usize) -> String {
    if n >= 1_000_000 { format!("{}M", n / 1_000_000) } else { format!("{}k", n / 1000) }
}

struct Loaded {
    enc: Encoded,
    digest: String,
    saved: Vec<u8>,
}

pub fn run(s: &Settings, targets: &mut Vec<Target>) -> anyhow::Result<Part> {
    let mut part = Part::new("control", "4. Control plane");
    part.method = vec![format!(
        "Full loads: {} rounds per size ({} at 1M), ours and the netfilter tools interleaved. One-rule \
         changes: {} cycles each against the loaded {} state (port rule 0 moves between two \
         ports: one L4 entry out, one in). Times in ms, medians (min-max).",
        s.cp_full_rounds,
        s.cp_big_rounds,
        s.cp_changes,
        size_label(s.cp_sizes[0])
    )];
    let have_nft = sys::have("nft");
    let have_ipt = sys::have("iptables-restore");
    let ns = Netns::new()?;
    let veth = VethPair::new(&ns)?;
    let dev = veth.peer_name().to_string();
    let tmp = std::env::temp_dir().join(format!("fw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let root = PinRoot(PathBuf::from(format!("/sys/fs/bpf/fw-bench-{}", std::process::id())));
    let cg = Cgroup::new()?;

    let mut compile_t = Table::new(
        "compile (fw-compiler, from the host policy; best of the rounds)",
        &["prefixes", "compile ms", "encode ms", "trie entries", "L4 entries"],
    );
    let mut load_t = Table::new(
        "full load into fresh maps / tables, ms",
        &["prefixes", "engine", "to enforced", "complete", "× nft -f interval"],
    );
    // The apply's own report of each step, so a full load's time can be told apart without
    // timers of one's own (see docs/benchmarks.md, "Full loads").
    const STEPS: [&str; 7] =
        ["diff", "write standby", "flip", "save state", "grace period", "replay", "clean up"];
    let mut steps_t = Table::new(
        "our full load by step (the apply's report), ms",
        &[
            "prefixes",
            "diff",
            "write standby",
            "flip",
            "save state",
            "grace period",
            "replay",
            "clean up",
        ],
    );
    let mut data = serde_json::Map::new();
    let mut r6 = None;
    let mut loaded_100k: Option<(MapState, Loaded)> = None;
    let mut memory = Vec::new();

    for &n in &s.cp_sizes {
        let label = size_label(n);
        // Compile.
        let mut ct = Vec::new();
        let mut et = Vec::new();
        let mut st = None;
        for _ in 0..s.cp_full_rounds.min(3) {
            let policy = states::host_policy(Family::V4, n, Direction::Ingress, 0);
            let t = Instant::now();
            let m = fw_compiler::compile::compile(&policy, &states::capacities(n))
                .map_err(|d| anyhow::anyhow!("compile: {d:?}"))?;
            ct.push(ms(t.elapsed()));
            let t = Instant::now();
            let enc = encode(&m);
            et.push(ms(t.elapsed()));
            st = Some((m, enc));
        }
        let (m, enc) = st.expect("at least one round");
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        compile_t.row(vec![
            label.clone(),
            format!("{:.1}", min(&ct)),
            format!("{:.1}", min(&et)),
            (m.ingress.v4.len() + m.ingress.v6.len()).to_string(),
            m.ingress.l4.len().to_string(),
        ]);
        let l = Loaded { digest: m.digest(), saved: rule_table(&m), enc };

        // Netfilter files for this size.
        let nft_ok = have_nft && n <= s.cp_netfilter_max;
        let ipt_ok = have_ipt && n <= s.iptables_max;
        let nft_file = |layout: Layout| -> anyhow::Result<PathBuf> {
            let p = tmp.join(format!("nft-{}-{n}.nft", layout.name()));
            let chain = netfilter::nft_chain(layout, &dev);
            std::fs::write(&p, netfilter::nft_sets(n, layout) + &chain)?;
            Ok(p)
        };
        let files = if nft_ok {
            Some((nft_file(Layout::Interval)?, nft_file(Layout::Hash)?))
        } else {
            None
        };
        let ipt_file = tmp.join(format!("iptables-{n}.rules"));
        if ipt_ok {
            std::fs::write(&ipt_file, netfilter::iptables_rules(n, &dev, true))?;
        }

        let mut ours_enf = Vec::new();
        let mut ours_all = Vec::new();
        let mut ours_steps: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
        let mut nft_i = Vec::new();
        let mut nft_h = Vec::new();
        let mut ipt = Vec::new();
        let rounds = if n >= 1_000_000 { s.cp_big_rounds } else { s.cp_full_rounds };
        for round in 0..rounds {
            // As `fwctl apply` and fwd load a host's first policy: `enforce` loads and pins the
            // data plane, applies and attaches (to a cgroup of the bench's own, no interface),
            // all under the root's lock. Timed: the apply, by its report's steps (loading the
            // programs, the verifier's work, is not loading prefixes).
            let caps = states::capacities(n);
            let target =
                enforce::Target { root: &root.0, caps: &caps, interfaces: &[], cgroup: cg.dir() };
            let desired = Desired {
                encoded: &l.enc,
                workloads: None,
                revision: "full",
                digest: &l.digest,
                saved_state: &l.saved,
            };
            let (dp, done) = enforce(&target, &desired).context("full load")?;
            let r = done.apply;
            ours_all.push(r.timings.iter().map(|(_, d)| ms(*d)).sum());
            ours_enf.push(enforced(&r));
            for (name, out) in STEPS.iter().zip(&mut ours_steps) {
                out.push(step(&r, name));
            }
            if round == 0 {
                let (kb, mem) = (sys::status_kb("VmRSS").unwrap_or(0), sys::bpf_map_memlock());
                memory.push((n, mem, kb));
            }
            dp.unload().context("unload")?;
            if let Some((fi, fh)) = &files {
                for (f, out) in [(fi, &mut nft_i), (fh, &mut nft_h)] {
                    let _ = sys::run_timed(ns.command("nft").args([
                        "delete",
                        "table",
                        "netdev",
                        netfilter::TABLE,
                    ]));
                    let (_, d) = sys::run_timed(ns.command("nft").arg("-f").arg(f))?;
                    out.push(ms(d));
                }
                let _ = sys::run_timed(ns.command("nft").args([
                    "delete",
                    "table",
                    "netdev",
                    netfilter::TABLE,
                ]));
            }
            if ipt_ok {
                let _ = sys::run_timed(ns.command("iptables").args(["-t", "raw", "-F"]));
                let _ = sys::run_timed(ns.command("iptables").args(["-t", "raw", "-X"]));
                let (_, d) = sys::run_timed(ns.command("iptables-restore").arg(&ipt_file))?;
                ipt.push(ms(d));
                let _ = sys::run_timed(ns.command("iptables").args(["-t", "raw", "-F"]));
                let _ = sys::run_timed(ns.command("iptables").args(["-t", "raw", "-X"]));
            }
            eprintln!(
                "control: {label} round {}/{}: ours {:.0} ms (enforced {:.0}), nft interval {:?}, hash {:?}, iptables {:?}",
                round + 1,
                rounds,
                ours_all[round],
                ours_enf[round],
                nft_i.last(),
                nft_h.last(),
                ipt.last()
            );
        }
        let ratio =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
        let cell = |v: &[f64]| Summary::of(v).cell(1);
        let nft_ratio = |v: &[f64]| {
            if nft_i.is_empty() { "-".into() } else { Summary::of(&ratio(v, &nft_i)).cell(3) }
        };
        let mut row = vec![label.clone()];
        row.extend(ours_steps.iter().map(|v| Summary::of(v).cell(1)));
        steps_t.row(row);
        load_t.row(vec![
            label.clone(),
            "ours (apply)".into(),
            cell(&ours_enf),
            cell(&ours_all),
            nft_ratio(&ours_all),
        ]);
        if nft_ok {
            load_t.row(vec![
                label.clone(),
                "`nft -f`, interval sets".into(),
                "-".into(),
                cell(&nft_i),
                "1".into(),
            ]);
            load_t.row(vec![
                label.clone(),
                "`nft -f`, hash sets".into(),
                "-".into(),
                cell(&nft_h),
                nft_ratio(&nft_h),
            ]);
        } else {
            part.notes.push(format!(
                "{label}: nftables not measured ({}).",
                if have_nft { "above this mode's netfilter size" } else { "nft not installed" }
            ));
        }
        if ipt_ok {
            load_t.row(vec![
                label.clone(),
                "`iptables-restore`".into(),
                "-".into(),
                cell(&ipt),
                nft_ratio(&ipt),
            ]);
        } else {
            part.notes.push(format!(
                "{label}: iptables not measured ({}).",
                if have_ipt { "above this mode's iptables size" } else { "iptables not installed" }
            ));
        }
        data.insert(
            label.clone(),
            json!({ "compile_ms": ct, "encode_ms": et, "ours_enforced_ms": ours_enf, "ours_complete_ms": ours_all,
                    "nft_interval_ms": nft_i, "nft_hash_ms": nft_h, "iptables_restore_ms": ipt }),
        );
        if n == s.cp_sizes[0] && !nft_i.is_empty() {
            let r = Summary::of(&ratio(&ours_all, &nft_i));
            let e = Summary::of(&ratio(&ours_enf, &nft_i));
            let h = Summary::of(&ratio(&ours_all, &nft_h));
            r6 = Some((r, e, h, n));
        }
        if n == s.cp_sizes[0] {
            loaded_100k = Some((m, l));
        }
    }
    part.tables.push(compile_t);
    part.tables.push(load_t);
    part.tables.push(steps_t);

    let r6t = Target::new(
        "R6",
        "full 100k load over `nft -f` of the same set",
        "at most 0.1x",
        Bound::AtMost,
        0.1,
    );
    match r6 {
        Some((r, e, h, n)) => targets.push(r6t.measured(
            r.median,
            format!(
                "ours to complete over `nft -f` (interval sets), per round {}; to enforced {}; \
                 complete over hash sets {}{}",
                r.cell(3),
                e.cell(3),
                h.cell(3),
                if n == 100_000 { String::new() } else { format!(" (at {n} prefixes)") }
            ),
        )),
        None => targets.push(r6t.missing("nft not measured")),
    }

    // One-rule changes against the first size's state.
    let (m, l) = loaded_100k.context("no state")?;
    let n = s.cp_sizes[0];
    let changed = states::compile_state(Family::V4, n, Direction::Ingress, 1);
    let encs = [l.enc.clone(), encode(&changed)];
    let digests = [l.digest.clone(), changed.digest()];
    let saved = [l.saved.clone(), rule_table(&changed)];
    drop(m);
    let mut dp = Dataplane::load_pinned(&root.0, &states::capacities(n))?;
    dp.apply(&encs[0], "base", &digests[0], &saved[0])?;
    let mut cur = 0;
    let (mut a_enf, mut a_all, mut flips) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..s.cp_changes {
        let next = 1 - cur;
        let t = Instant::now();
        let r = dp.apply(&encs[next], &format!("change-{i}"), &digests[next], &saved[next])?;
        a_all.push(ms(t.elapsed()));
        a_enf.push(enforced(&r));
        flips.push(step(&r, "flip"));
        anyhow::ensure!(
            r.standby.written + r.standby.deleted == 2,
            "a one-rule change wrote {:?}",
            r.standby
        );
        cur = next;
    }
    let view = |e: &Encoded| {
        let mut e = e.clone();
        e.maps.remove(fw_common::maps::WORKLOADS);
        e
    };
    let deltas = [
        fw_loader::entry_delta(&view(&encs[1]), &view(&encs[0])),
        fw_loader::entry_delta(&view(&encs[0]), &view(&encs[1])),
    ];
    let (mut d_enf, mut d_all) = (Vec::new(), Vec::new());
    for i in 0..s.cp_changes {
        let next = 1 - cur;
        let t = Instant::now();
        let r = dp.apply_changes(
            &digests[cur],
            &deltas[next],
            &format!("delta-{i}"),
            &digests[next],
            &saved[next],
        )?;
        d_all.push(ms(t.elapsed()));
        d_enf.push(enforced(&r));
        flips.push(step(&r, "flip"));
        cur = next;
    }
    // The flip on its own: one write of the one-element generation array.
    let mut flip_only = Vec::new();
    for _ in 0..s.cp_changes {
        let g = dp.active_generation()?;
        let t = Instant::now();
        dp.set_active_generation(g)?;
        flip_only.push(ms(t.elapsed()));
    }
    dp.unload()?;
    drop(root);
    let _ = std::fs::remove_dir_all(&tmp);

    let mut ch = Table::new(
        &format!("one-rule change against the loaded {} state, ms", size_label(n)),
        &["how", "cycles", "p50", "p99", "max"],
    );
    let row = |t: &mut Table, what: &str, v: &[f64]| {
        let x = Summary::of(v);
        t.row(vec![
            what.into(),
            v.len().to_string(),
            format!("{:.3}", percentile(v, 50.0)),
            format!("{:.3}", percentile(v, 99.0)),
            format!("{:.3}", x.max),
        ]);
    };
    row(&mut ch, "`apply_changes` (entry deltas), to enforced", &d_enf);
    row(&mut ch, "`apply_changes`, complete (grace period, replay)", &d_all);
    row(&mut ch, "`apply` (whole encoded state), to enforced", &a_enf);
    row(&mut ch, "`apply`, complete", &a_all);
    row(&mut ch, "generation flip inside the applies", &flips);
    row(&mut ch, "generation flip alone (`set_active_generation`)", &flip_only);
    ch.row(vec![
        "fwd: commit to enforced".into(),
        "-".into(),
        "in fwd's own bench: docs/benchmarks.md, \"fwd\"".into(),
        "-".into(),
        "-".into(),
    ]);
    part.tables.push(ch);

    let mut mem = Table::new(
        "memory with the state loaded (both generations)",
        &["prefixes", "BPF map memory MB (memlock)", "this process's RSS MB"],
    );
    for (n, bytes, kb) in &memory {
        mem.row(vec![
            size_label(*n),
            format!("{:.1}", *bytes as f64 / 1e6),
            format!("{:.0}", *kb as f64 / 1024.0),
        ]);
    }
    mem.row(vec![
        "peak of the whole run".into(),
        "-".into(),
        format!("{:.0}", sys::status_kb("VmHWM").unwrap_or(0) as f64 / 1024.0),
    ]);
    part.tables.push(mem);
    part.notes.push(
        "BPF map memory is the `memlock` the kernel charges for the maps this process holds \
         while the state is loaded (the bench's own reference programs' maps included, a few \
         hundred kB); nftables' and iptables' kernel memory is not measured."
            .into(),
    );
    data.insert(
        "changes".into(),
        json!({ "apply_changes_enforced_ms": d_enf, "apply_changes_complete_ms": d_all,
                "apply_enforced_ms": a_enf, "apply_complete_ms": a_all, "flip_ms": flips,
                "flip_only_ms": flip_only, "fwd_commit_to_enforced": "measured by `cargo bench -p fwd --bench reconcile`: docs/benchmarks.md, section fwd",
                "memory": memory.iter().map(|(n, b, kb)| json!({"prefixes": n, "bpf_memlock_bytes": b, "rss_kb": kb})).collect::<Vec<_>>() }),
    );
    part.data = serde_json::Value::Object(data);
    let scale = if n == 100_000 { String::new() } else { format!(" (at {n} prefixes)") };
    targets.push(
        Target::new("R6b", "generation flip, p99 (ms)", "at most 20 ms", Bound::AtMost, 20.0)
            .measured(
                percentile(&flips, 99.0),
                format!(
                    "the flip step of {} applies; alone: p99 {:.3} ms{scale}",
                    flips.len(),
                    percentile(&flip_only, 99.0)
                ),
            ),
    );
    targets.push(
        Target::new("R8", "one-rule change to enforced, p99 (ms), without a full reload", "at most 1 ms", Bound::AtMost, 1.0)
            .measured(
                percentile(&d_enf, 99.0),
                format!(
                    "`apply_changes` (deltas); `apply` of the whole state: p99 {:.2} ms to enforced, {:.1} ms complete{scale}",
                    percentile(&a_enf, 99.0),
                    percentile(&a_all, 99.0)
                ),
            ),
    );
    Ok(part)
}
