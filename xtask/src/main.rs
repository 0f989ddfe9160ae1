//! `cargo xtask bench [--quick|--full|--smoke]`: the benchmark suite against nftables and
//! iptables, run on this machine, written to `BENCHMARKS.md` and `benchmarks/results.json`.
//!
//! Why it is built this way:
//! - One binary runs every part in one process, so every comparison (ours against a bare
//!   program, nftables, iptables or no program) runs both sides in the same run, interleaved
//!   round by round, and the report gives ratios; absolute figures are context.
//! - The suite measures the real kernel objects: the production ingress program for packet
//!   rates, a benchmark build of it (fw-ebpf's `bench` feature, built here into a target
//!   directory of its own, never into the production object) for per-packet costs, real
//!   nftables and iptables rule sets in a throwaway network namespace, and the real apply
//!   path. Every namespace, veth pair, cgroup and pin root is an RAII guard (fw-netkit's),
//!   removed also when a part fails.
//! - A part that cannot run (no root, a missing tool, no second CPU) says so in the report
//!   and the targets it feeds stay "not measured"; nothing is made up.
//! - `--smoke` runs every part with tiny sizes in seconds and checks that both files parse, for
//!   a quick check while working on the suite; CI runs the quick mode into a temporary
//!   directory. Neither asserts on timings.

mod control;
mod egress;
mod netfilter;
mod perpacket;
mod rate;
mod report;
mod states;
mod sys;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::report::{Bound, Machine, Part, Results, Target};
use crate::states::Family;

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the benchmark suite and writes BENCHMARKS.md and benchmarks/results.json.
    Bench {
        /// The quick mode (the default): every part, fewer sizes and rounds; under 5 minutes.
        #[arg(long, conflicts_with_all = ["full", "smoke"])]
        quick: bool,
        /// Every size, more rounds; takes longer.
        #[arg(long, conflicts_with = "smoke")]
        full: bool,
        /// Every part with tiny sizes, in seconds; checks the output files parse (CI).
        #[arg(long)]
        smoke: bool,
        /// Directory to write BENCHMARKS.md and benchmarks/ into (default: the workspace
        /// root; smoke mode: a temporary directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only these parts (comma-separated: per-packet, rate, egress, control).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Internal: the connect() loop of the egress part, run in a cgroup and a namespace.
    #[command(hide = true)]
    ConnectChild {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        cpu: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Smoke,
    Quick,
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Smoke => "smoke",
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

/// Sizes, rounds and durations of a mode.
pub struct Settings {
    pub mode: Mode,
    /// The CPU the measuring thread (and the packet generator) runs on.
    pub bench_cpu: usize,
    /// The CPU the packet-rate receiver runs on.
    pub receiver_cpu: usize,
    pub pp_sizes: Vec<(Family, usize)>,
    pub pp_rounds: usize,
    pub pp_repeat: u32,
    /// Prefix counts of the packet-rate part; the targets use 100k (or the largest).
    pub rate_sizes: Vec<usize>,
    pub rate_rounds: usize,
    pub rate_seconds: f64,
    pub egress_prefixes: usize,
    pub egress_rounds: usize,
    pub egress_connects: u32,
    pub cp_sizes: Vec<usize>,
    pub cp_full_rounds: usize,
    /// Full-load rounds at 1M prefixes and above (each takes seconds).
    pub cp_big_rounds: usize,
    pub cp_changes: usize,
    /// The largest set nftables and iptables are asked to load.
    pub cp_netfilter_max: usize,
    pub iptables_max: usize,
}

impl Settings {
    fn new(mode: Mode) -> Settings {
        let cpus = sys::cpus();
        let (bench_cpu, receiver_cpu) = (0, if cpus > 1 { 1 } else { 0 });
        let v4 = |n| (Family::V4, n);
        let v6 = |n| (Family::V6, n);
        match mode {
            Mode::Smoke => Settings {
                mode,
                bench_cpu,
                receiver_cpu,
                pp_sizes: vec![v4(1000), v6(1000)],
                pp_rounds: 3,
                pp_repeat: 1000,
                rate_sizes: vec![1000],
                rate_rounds: 1,
                rate_seconds: 0.2,
                egress_prefixes: 1000,
                egress_rounds: 2,
                egress_connects: 200,
                cp_sizes: vec![1000],
                cp_full_rounds: 1,
                cp_big_rounds: 1,
                cp_changes: 5,
                cp_netfilter_max: 1000,
                iptables_max: 1000,
            },
            Mode::Quick => Settings {
                mode,
                bench_cpu,
                receiver_cpu,
                pp_sizes: vec![
                    v4(1000),
                    v4(10_000),
                    v4(100_000),
                    v4(1_000_000),
                    v6(10_000),
                    v6(100_000),
                ],
                pp_rounds: 7,
                pp_repeat: 300_000,
                rate_sizes: vec![100_000],
                rate_rounds: 3,
                rate_seconds: 1.5,
                egress_prefixes: 100_000,
                egress_rounds: 7,
                egress_connects: 3000,
                cp_sizes: vec![100_000, 1_000_000],
                cp_full_rounds: 3,
                cp_big_rounds: 1,
                cp_changes: 50,
                cp_netfilter_max: 100_000,
                iptables_max: 100_000,
            },
            Mode::Full => Settings {
                mode,
                bench_cpu,
                receiver_cpu,
                pp_sizes: vec![
                    v4(1000),
                    v4(10_000),
                    v4(100_000),
                    v4(1_000_000),
                    v6(10_000),
                    v6(100_000),
                ],
                pp_rounds: 11,
                pp_repeat: 2_000_000,
                rate_sizes: vec![10_000, 100_000, 1_000_000],
                rate_rounds: 7,
                rate_seconds: 3.0,
                egress_prefixes: 100_000,
                egress_rounds: 11,
                egress_connects: 10_000,
                cp_sizes: vec![100_000, 1_000_000],
                cp_full_rounds: 5,
                cp_big_rounds: 3,
                cp_changes: 200,
                cp_netfilter_max: 1_000_000,
                iptables_max: 100_000,
            },
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::ConnectChild { addr, count, cpu } => egress::child(addr, count, cpu),
        Cmd::Bench { full, smoke, out, only, .. } => {
            let mode = if smoke {
                Mode::Smoke
            } else if full {
                Mode::Full
            } else {
                Mode::Quick
            };
            bench(mode, out, &only)
        }
    }
}

fn bench(mode: Mode, out: Option<PathBuf>, only: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = sys::workspace_root();
    // A smoke run writes into a temporary directory, removed once both files have parsed.
    let temporary = out.is_none() && mode == Mode::Smoke;
    let out = match (out, mode) {
        (Some(o), _) => o,
        (None, Mode::Smoke) => {
            std::env::temp_dir().join(format!("fw-bench-smoke-{}", std::process::id()))
        }
        (None, _) => root.clone(),
    };
    let s = Settings::new(mode);
    let want = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
    let load_before = sys::loadavg();
    let mut parts: Vec<Part> = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;

    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if !root_user && (mode != Mode::Smoke || ci) {
        // Never replace a report with an empty one; CI runs as root, so there it is a failure.
        anyhow::bail!(
            "the suite needs root (BPF_PROG_LOAD, bpffs, network namespaces, cgroups): \
             run `sudo cargo xtask bench`"
        );
    }
    if !root_user {
        // Smoke mode outside CI: the report is still written and parsed, with every part
        // marked as not run.
        let mut p = Part::new("skipped", "Not run");
        p.notes.push(
            "Not run as root: every part needs BPF_PROG_LOAD, bpffs, network namespaces and \
             cgroups. Run `sudo cargo xtask bench`."
                .into(),
        );
        parts.push(p);
    } else {
        eprintln!("bench: building the benchmark object (fw-ebpf --features bench)");
        let object = sys::bench_object(&root)?;
        let mut aux = perpacket::Aux::load(&object)?;
        if want("per-packet") {
            parts.push(perpacket::run(&s, &object, &mut aux, &mut targets)?);
        }
        if want("rate") {
            parts.push(rate::run(&s, &mut aux, &mut targets)?);
        }
        if want("egress") {
            parts.push(egress::run(&s, &mut targets)?);
        }
        if want("control") {
            parts.push(control::run(&s, &mut targets)?);
        }
    }
    let mut all = all_targets();
    for t in targets {
        if let Some(slot) = all.iter_mut().find(|a| a.id == t.id) {
            *slot = t;
        }
    }
    let command = format!("cargo xtask bench --{}", mode.name());
    let results = Results {
        mode: mode.name().into(),
        command,
        duration_s: started.elapsed().as_secs_f64(),
        machine: Machine {
            date: sys::utc_now(),
            cpu: sys::cpu_model(),
            cpus: sys::cpus(),
            memory_mb: sys::mem_total_mb(),
            kernel: sys::kernel(),
            commit: sys::git_commit(&root),
            load_before,
            load_after: sys::loadavg(),
            tools: vec![
                ("rustc".into(), sys::version("rustc", &["--version"])),
                ("nft".into(), sys::version("nft", &["--version"])),
                ("iptables".into(), sys::version("iptables", &["--version"])),
            ],
        },
        targets: all,
        parts,
    };
    report::write(&out, &results)?;
    // Both files must parse back: what the smoke test checks, and cheap enough to always do.
    let json = std::fs::read_to_string(out.join("benchmarks/results.json"))?;
    let v: serde_json::Value = serde_json::from_str(&json).context("results.json parses")?;
    anyhow::ensure!(v["targets"].as_array().is_some_and(|t| !t.is_empty()), "no targets");
    let md = std::fs::read_to_string(out.join("BENCHMARKS.md"))?;
    anyhow::ensure!(md.starts_with("# Benchmarks") && md.contains("| R8 |"), "BENCHMARKS.md");
    for t in &results.targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let value = t.value.map_or("-".into(), |v| format!("{v:.2}"));
        println!("{:4} {:>8}  {verdict:13} {}", t.id, value, t.measure);
    }
    if temporary {
        std::fs::remove_dir_all(&out).with_context(|| format!("remove {}", out.display()))?;
        println!(
            "bench: smoke run ok ({:.0} s); both files parsed",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    println!(
        "bench: wrote {} and {} in {:.0} s",
        out.join("BENCHMARKS.md").display(),
        out.join("benchmarks/results.json").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every target (R1-R8), not measured until a part measures it.
fn all_targets() -> Vec<Target> {
    let none = "not run";
    vec![
        Target::new(
            "R1",
            "per-packet cost, 100k IPv4 prefixes + 1k port rules, over bare XDP_PASS",
            "at most 6x (stretch 3x)",
            Bound::AtMost,
            6.0,
        )
        .missing(none),
        Target::new(
            "R2",
            "per-packet cost at 100k IPv4 prefixes over at 1k",
            "at most 1.5x",
            Bound::AtMost,
            1.5,
        )
        .missing(none),
        Target::new(
            "R3",
            "veth packets per second, ours over nftables interval set, 100k prefixes",
            "at least 6x (stretch 10x)",
            Bound::AtLeast,
            6.0,
        )
        .missing(none),
        Target::new(
            "R3b",
            "the same over the nftables hash-set layout",
            "at least 4x",
            Bound::AtLeast,
            4.0,
        )
        .missing(none),
        Target::new(
            "R4",
            "veth packets per second, ours at 100k over bare XDP_DROP",
            "at least 0.6 (stretch 0.8)",
            Bound::AtLeast,
            0.6,
        )
        .missing(none),
        Target::new(
            "R6",
            "full 100k load over `nft -f` of the same set",
            "at most 0.1x",
            Bound::AtMost,
            0.1,
        )
        .missing(none),
        Target::new("R6b", "generation flip, p99 (ms)", "at most 20 ms", Bound::AtMost, 20.0)
            .missing(none),
        Target::new(
            "R7",
            "`connect()` cost with 100k prefixes over no program",
            "at most 1.3x",
            Bound::AtMost,
            1.3,
        )
        .missing(none),
        Target::new(
            "R8",
            "one-rule change to enforced, p99 (ms), without a full reload",
            "at most 1 ms",
            Bound::AtMost,
            1.0,
        )
        .missing(none),
    ]
}
