//! Part 1: per-packet cost under `BPF_PROG_TEST_RUN`.
//!
//! Every state is loaded side by side from the benchmark object (fw-ebpf with `bench`: the
//! same ingress program, with a random source address per repetition), and in each round
//! every cell runs once with a large repeat, so all cells share the same drift of a shared
//! machine; figures are the kernel's average per repetition, medians over rounds. The
//! reference programs come from the same object: a bare XDP_PASS and `fw_bench_base`, which
//! only draws the random address. A cell's *net* cost is `ours - base + bare`: the draw is
//! taken out, the test-run loop's own cost (which the bare program also pays) stays in, so
//! `net / bare` is "our program over a bare XDP_PASS". The thread is pinned to one CPU.
//!
//! Diagnostics (not used by the modes): `FW_BENCH_PP_SIZES=v4:1000,v4:100000` replaces the
//! mode's sizes, and `FW_BENCH_PP_COMPARE=PATH` loads every state a second time from another
//! benchmark object (say, a build of another commit; several paths separated by commas) and
//! measures it in the same rounds, interleaved, in rows marked "(compare N)" that the targets
//! ignore. `FW_BENCH_PP_V4_POOL=N` lets the compared objects' data planes use only the first N
//! slots of the pool of second-level IPv4 chunks (`Dataplane::limit_v4_dir_pool`), to see
//! what a smaller pool would cost.

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::Ebpf;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use fw_compiler::ast::Direction;
use fw_compiler::encode::encode;
use fw_loader::{Dataplane, XdpAction};
use serde_json::json;

use crate::report::{Bound, Part, Summary, Table, Target};
use crate::states::{self, Draw, Family, WIDE_PORT};
use crate::{Mode, Settings};

pub struct Aux {
    pub ebpf: Ebpf,
}

impl Aux {
    /// Loads the bench object's reference programs.
    pub fn load(object: &[u8]) -> anyhow::Result<Aux> {
        let mut ebpf = Ebpf::load(object).context("load the benchmark object")?;
        for name in ["fw_bench_base", "fw_bench_pass", "fw_bench_drop", "fw_bench_gen"] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} is not in the benchmark object"))?
                .try_into()?;
            p.load().with_context(|| format!("load {name}"))?;
        }
        Ok(Aux { ebpf })
    }

    pub fn program(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("loaded in Aux::load")
    }

    /// Average ns per repetition and the return value.
    pub fn run(&mut self, name: &str, frame: &[u8], repeat: u32) -> anyhow::Result<(f64, u32)> {
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() };
        let r = self.program(name).test_run(opts).with_context(|| format!("test run {name}"))?;
        Ok((r.duration.as_nanos() as f64, r.return_value))
    }
}

struct Plane {
    /// Loaded from `FW_BENCH_PP_COMPARE`'s object of this number (from 1); 0: the bench's own.
    compare: usize,
    family: Family,
    n: usize,
    dp: Dataplane,
    hit: Vec<u8>,
    miss: Vec<u8>,
    /// No descriptor: the same source (in the first wide prefix) on every repetition.
    fixed: Vec<u8>,
}

fn label(family: Family, n: usize) -> String {
    let n = match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    };
    format!("{} {n}", family.label())
}

pub fn run(
    s: &Settings,
    object: &[u8],
    aux: &mut Aux,
    targets: &mut Vec<Target>,
) -> anyhow::Result<Part> {
    let mut part = Part::new("per_packet", "1. Per-packet cost (BPF_PROG_TEST_RUN)");
    let (rounds, repeat) = (s.pp_rounds, s.pp_repeat);
    part.method = vec![format!(
        "Each state is the generated policy of `xtask/src/states.rs` ({} prefixes per allow \
             rule, wide prefixes and hosts nested in them, plus {} TCP port rules without an \
             address restriction; default deny), compiled and loaded into a data plane of its \
             own from the benchmark object. Sources are drawn in the kernel per repetition: \
             *hit-heavy* in the loaded wide prefixes (TCP 443, allowed), *miss-heavy* in the \
             gaps between them (default deny); *one source* sends the same frame (a source \
             in the first wide prefix) on every repetition, as test-run does without the \
             draw: the cache-warm best case. {rounds} interleaved rounds, repeat {repeat} per \
             call, thread pinned to CPU {}; cells are medians (min-max) over rounds, in ns per \
             packet. *net* = ours - draw-only baseline + bare XDP_PASS.",
        states::PREFIXES_PER_RULE,
        states::PORT_RULES,
        s.bench_cpu
    )];
    crate::sys::pin(0, s.bench_cpu)?;

    let sizes = match std::env::var("FW_BENCH_PP_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|c| -> anyhow::Result<(Family, usize)> {
                let (f, n) = c.split_once(':').context("FW_BENCH_PP_SIZES: family:count")?;
                let f = match f {
                    "v4" => Family::V4,
                    "v6" => Family::V6,
                    _ => anyhow::bail!("FW_BENCH_PP_SIZES: v4 or v6, not {f}"),
                };
                Ok((f, n.parse()?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => s.pp_sizes.clone(),
    };
    let compare_objects = match std::env::var("FW_BENCH_PP_COMPARE") {
        Ok(p) => p
            .split(',')
            .map(|p| std::fs::read(p).with_context(|| format!("read FW_BENCH_PP_COMPARE {p}")))
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => Vec::new(),
    };
    let mut objects: Vec<(usize, &[u8])> = vec![(0, object)];
    for (i, o) in compare_objects.iter().enumerate() {
        objects.push((i + 1, o));
    }
    let pool_limit = match std::env::var("FW_BENCH_PP_V4_POOL") {
        Ok(v) => Some(v.parse::<u32>().context("FW_BENCH_PP_V4_POOL is a number of chunks")?),
        Err(_) => None,
    };
    let mut planes = Vec::new();
    let mut verified = None;
    for &(family, n) in &sizes {
        for &(compare, object) in &objects {
            let st = states::compile_state(family, n, Direction::Ingress, 0);
            let enc = encode(&st);
            let mut dp = Dataplane::load_object(object, &states::capacities(n))
                .context("load the benchmark build of the data plane")?;
            if let (Some(limit), true) = (pool_limit, compare != 0) {
                dp.limit_v4_dir_pool(limit);
            }
            dp.write_generation(0, &enc).context("write generation 0")?;
            dp.set_active_generation(0)?;
            let hit = states::test_frame(family, WIDE_PORT, Some(Draw::new(family, n, true)));
            let miss = states::test_frame(family, WIDE_PORT, Some(Draw::new(family, n, false)));
            // The draws land where they should: a hit is allowed, a miss denied (not checked for
            // the compared objects, which may be experiments that skip steps).
            for _ in 0..if compare == 0 { 8 } else { 0 } {
                let h = dp.test_run_ingress(&hit)?.action;
                let m = dp.test_run_ingress(&miss)?.action;
                anyhow::ensure!(
                    h == XdpAction::Pass && m == XdpAction::Drop,
                    "{}: hit-heavy gave {h:?}, miss-heavy {m:?}",
                    label(family, n)
                );
            }
            let fixed = states::test_frame(family, WIDE_PORT, None);
            anyhow::ensure!(
                compare != 0 || dp.test_run_ingress(&fixed)?.action == XdpAction::Pass,
                "fixed frame"
            );
            if compare == 0 && verified.is_none() {
                verified = dp.ingress_verified_instructions()?;
            }
            eprintln!("per-packet: loaded {}", label(family, n));
            planes.push(Plane { compare, family, n, dp, hit, miss, fixed });
        }
    }
    let base_frame =
        states::test_frame(Family::V4, WIDE_PORT, Some(Draw::new(Family::V4, 1000, true)));
    let mut bare = Vec::new();
    let mut base = Vec::new();
    let mut cells: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        let (t, ret) = aux.run("fw_bench_pass", &base_frame, repeat)?;
        anyhow::ensure!(ret == 2, "the bare program returned {ret}");
        bare.push(t);
        base.push(aux.run("fw_bench_base", &base_frame, repeat)?.0);
        for (i, p) in planes.iter().enumerate() {
            for (what, f) in [("hit", &p.hit), ("miss", &p.miss), ("fixed", &p.fixed)] {
                let out = p.dp.test_run_ingress_repeat(f, repeat)?;
                cells.entry((i, what)).or_default().push(out.duration.as_nanos() as f64);
            }
        }
        eprintln!("per-packet: round {}/{rounds}", round + 1);
    }
    crate::sys::unpin(0);

    let net = |v: &[f64]| -> Vec<f64> {
        v.iter().zip(&base).zip(&bare).map(|((o, b), p)| o - b + p).collect()
    };
    let bare_s = Summary::of(&bare);
    let base_s = Summary::of(&base);
    let mut t = Table::new(
        "ns per packet; × bare is net over bare XDP_PASS, per round",
        &["state", "traffic", "ours", "net", "× bare XDP_PASS"],
    );
    t.row(vec!["bare XDP_PASS".into(), "-".into(), bare_s.cell(1), "-".into(), "1".into()]);
    t.row(vec![
        "draw only (`fw_bench_base`)".into(),
        "-".into(),
        base_s.cell(1),
        "-".into(),
        "-".into(),
    ]);
    let mut data = Vec::new();
    let mut nets: BTreeMap<(Family, usize, &str), Vec<f64>> = BTreeMap::new();
    for (i, p) in planes.iter().enumerate() {
        for what in ["hit", "miss", "fixed"] {
            let raw = &cells[&(i, what)];
            // The fixed frame has no descriptor, so nothing is drawn and nothing subtracted.
            let n = if what == "fixed" { raw.clone() } else { net(raw) };
            let over: Vec<f64> = n.iter().zip(&bare).map(|(n, b)| n / b).collect();
            t.row(vec![
                if p.compare != 0 {
                    format!("{} (compare {})", label(p.family, p.n), p.compare)
                } else {
                    label(p.family, p.n)
                },
                if what == "fixed" {
                    "one source, every repetition".into()
                } else {
                    format!("{what}-heavy")
                },
                Summary::of(raw).cell(1),
                Summary::of(&n).cell(1),
                Summary::of(&over).cell(1),
            ]);
            if p.compare != 0 {
                continue;
            }
            data.push(json!({
                "family": p.family.label(), "prefixes": p.n, "traffic": what,
                "ours_ns": raw, "net_ns": n, "over_bare": over,
            }));
            nets.insert((p.family, p.n, what), n);
        }
    }
    part.tables.push(t);
    part.data = json!({ "repeat": repeat, "rounds": rounds, "bare_ns": bare, "draw_ns": base, "cells": data });

    // R1 and R2, per round, then the median over rounds.
    let per_round =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let r1 = Target::new(
        "R1",
        "per-packet cost, 100k IPv4 prefixes + 1k port rules, over bare XDP_PASS",
        "at most 6x (stretch 3x)",
        Bound::AtMost,
        6.0,
    );
    let big = sizes.iter().any(|&(f, n)| f == Family::V4 && n == 100_000);
    let small = sizes.iter().any(|&(f, n)| f == Family::V4 && n == 1000);
    if big {
        let hit = Summary::of(&per_round(&nets[&(Family::V4, 100_000, "hit")], &bare));
        let miss = Summary::of(&per_round(&nets[&(Family::V4, 100_000, "miss")], &bare));
        targets.push(r1.measured(
            hit.median.max(miss.median),
            format!(
                "the worse of hit-heavy {} and miss-heavy {} (medians, min-max over rounds)",
                hit.cell(1),
                miss.cell(1)
            ),
        ));
    } else {
        targets.push(r1.missing(format!("100k IPv4 not in the {} sizes", s.mode.name())));
    }
    let r2 = Target::new(
        "R2",
        "per-packet cost at 100k IPv4 prefixes over at 1k",
        "at most 1.5x",
        Bound::AtMost,
        1.5,
    );
    if big && small {
        let hit = Summary::of(&per_round(
            &nets[&(Family::V4, 100_000, "hit")],
            &nets[&(Family::V4, 1000, "hit")],
        ));
        let miss = Summary::of(&per_round(
            &nets[&(Family::V4, 100_000, "miss")],
            &nets[&(Family::V4, 1000, "miss")],
        ));
        targets.push(r2.measured(
            hit.median.max(miss.median),
            format!(
                "net cost; the worse of hit-heavy {} and miss-heavy {}",
                hit.cell(2),
                miss.cell(2)
            ),
        ));
    } else {
        targets
            .push(r2.missing(format!("1k and 100k IPv4 not both in the {} sizes", s.mode.name())));
    }
    if let Some(v) = verified {
        part.notes.push(format!(
            "The verifier processed {v} instructions loading this build of `fw_ingress` \
             (the benchmark build: the production one has no draw), of the 1,000,000 it allows."
        ));
    }
    if s.mode == Mode::Smoke {
        part.notes.push("Smoke mode: tiny sizes and repeats; the figures mean nothing.".into());
    }
    Ok(part)
}
