//! Compiler benchmark: how parse+lower+resolve and compile scale with the size of a policy set.
//!
//! Plain `harness = false` binary rather than criterion: the interesting sizes take seconds,
//! not nanoseconds, and what we need besides time is peak memory per size, which a statistics
//! harness running everything in one process cannot give. So the parent re-executes this
//! binary once per size (`--child KEY`, under a virtual-memory limit so one exploding size
//! cannot take the machine down); the child generates its input, measures each stage, reads
//! its resident high-water mark (`VmHWM` in `/proc/self/status`) and prints `RESULT` lines
//! (load figures first, compile figures after, so a compile that fails still leaves the first
//! half), which the parent collects into a table. Each child also checks a few hundred probe
//! flows of the compiled state against the reference evaluator (untimed), so a figure is never
//! reported for a compile that is wrong.
//!
//! Inputs come from the deterministic generator in `policygen/` (fixed seed). Times are the
//! minimum over a few repetitions for the small sizes and one run for the large ones.
//!
//! Usage: see `USAGE` (`-- --help`). The exit status is non-zero when a size fails or a check
//! finds a mismatch, not when a target is missed.

#[path = "oracle/mod.rs"]
mod oracle;
#[path = "policygen/mod.rs"]
mod policygen;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use fw_compiler::compile::Split;
use fw_compiler::load::{self, Input};
use fw_compiler::mapstate::{Capacities, ClassId, L4Key, MapState, WorkloadId};
use fw_compiler::model::HostIdentity;
use fw_compiler::source::{SourceFile, SourceMap};
use fw_compiler::yaml::{self, ParseLimits};
use fw_compiler::{compile, lower, resolve};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Series {
    Rules,
    /// The rules series with no `workloads` on any rule (only with `--only`): what the rest
    /// of the compile costs.
    RulesNoWorkloads,
    Prefixes,
}

impl Series {
    fn unit(self) -> &'static str {
        match self {
            Series::Rules | Series::RulesNoWorkloads => "rules",
            Series::Prefixes => "prefixes",
        }
    }
}

struct Size {
    key: &'static str,
    series: Series,
    n: usize,
}

const FULL: &[Size] = &[
    Size { key: "rules-1k", series: Series::Rules, n: 1_000 },
    Size { key: "rules-10k", series: Series::Rules, n: 10_000 },
    Size { key: "rules-100k", series: Series::Rules, n: 100_000 },
    Size { key: "prefixes-100k", series: Series::Prefixes, n: 100_000 },
    Size { key: "prefixes-1m", series: Series::Prefixes, n: 1_000_000 },
];

/// `--quick`: sizes up to 10k, a few seconds in all, for CI.
const QUICK: &[Size] = &[
    Size { key: "rules-1k", series: Series::Rules, n: 1_000 },
    Size { key: "rules-10k", series: Series::Rules, n: 10_000 },
    Size { key: "prefixes-10k", series: Series::Prefixes, n: 10_000 },
];

const USAGE: &str = "\
usage: cargo bench -p fw-compiler --bench compile -- [OPTIONS]
  (no option)        full sizes: 1k, 10k, 100k rules; 100k, 1M prefixes
  --quick            sizes up to 10k, for CI
  --only KEY         one size (also rules-10k-nowl, rules-100k-nowl: no workloads)
  --reps N           every size the best of N runs (default: 7 up to 2k, 3 up to 20k, else 1);
                     on a shared machine the best of several is the figure least disturbed
  --stages           time yaml, lower and resolve one by one (stderr)
  --stats            describe the compiled state: classes, L4 entries per (class, workload)
  --split V4,V6      compile with another layer split than the compiler's default
  --mem-limit-mb N   virtual-memory limit per size (default 8192; 0: none)
  --child KEY        run one size in this process (for profilers)
  --write KEY DIR    write the generated policy files of one size into DIR (for fwctl)";

/// Per child; `--mem-limit-mb N` changes it, 0 removes it.
const DEFAULT_MEM_LIMIT_MB: u64 = 8192;

/// Run only when asked for by name (`--only KEY`): diagnostics, not part of the table.
const EXTRA: &[Size] = &[
    Size { key: "rules-10k-nowl", series: Series::RulesNoWorkloads, n: 10_000 },
    Size { key: "rules-100k-nowl", series: Series::RulesNoWorkloads, n: 100_000 },
];

fn find(key: &str) -> Option<&'static Size> {
    FULL.iter().chain(QUICK).chain(EXTRA).find(|s| s.key == key)
}

/// Raised from the defaults to be safe for the big inputs: each generated file stays under the
/// default limits (50k-prefix chunks, 100-250 documents), but the bench must not measure a
/// limit instead of the compiler if the generator's shapes change.
fn limits() -> ParseLimits {
    ParseLimits { max_file_bytes: 512 << 20, max_events: 64_000_000, ..ParseLimits::default() }
}

/// Raised from the defaults (256k v4 / 128k v6 prefixes, 512k L4 entries per direction) so
/// the 1M-prefix and 100k-rule sets fit; the point is to measure the compiler, not the maps.
fn capacities() -> Capacities {
    Capacities {
        v4_prefixes: 2 << 20,
        v6_prefixes: 2 << 20,
        l4_entries: 8 << 20,
        ..Capacities::default()
    }
}

fn host() -> HostIdentity {
    HostIdentity {
        name: policygen::BENCH_HOST_NAME.to_string(),
        labels: policygen::BENCH_HOST_LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn generate(size: &Size) -> policygen::Generated {
    match size.series {
        Series::Rules => policygen::rules_corpus(size.n, policygen::SEED),
        Series::RulesNoWorkloads => policygen::rules_corpus_with(size.n, policygen::SEED, false),
        Series::Prefixes => policygen::prefixes_corpus(size.n, policygen::SEED),
    }
}

fn repetitions(n: usize) -> usize {
    match n {
        0..=2_000 => 7,
        2_001..=20_000 => 3,
        _ => 1,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `VmHWM` (peak resident set) of this process, in kB.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One size, in this process. Figures go to stdout as `RESULT` lines; progress to stderr.
fn child(
    size: &Size,
    stages: bool,
    stats: bool,
    split: Split,
    reps: Option<usize>,
) -> Result<(), String> {
    let t = Instant::now();
    let generated = generate(size);
    eprintln!(
        "  {}: generated {} files, {:.1} MB, {} rules, {} prefixes, {} policies, {} sets in {:.0} ms",
        size.key,
        generated.files.len(),
        generated.bytes() as f64 / 1e6,
        generated.rules,
        generated.prefixes,
        generated.policies,
        generated.sets,
        ms(t.elapsed())
    );
    let bytes = generated.bytes();
    let limits = limits();
    let caps = capacities();
    let reps = reps.unwrap_or_else(|| repetitions(size.n));

    if stages {
        stage_breakdown(size, &generated, &limits);
    }

    // parse + lower + resolve, through the front door. The last repetition takes the text by
    // move so the peak does not count two copies of it.
    let mut files = Some(generated.files);
    let mut load_time = Duration::MAX;
    let mut loaded = None;
    for rep in 0..reps {
        let inputs: Vec<Input> = if rep + 1 == reps {
            files
                .take()
                .unwrap_or_default()
                .into_iter()
                .map(|(n, t)| Input::new(n, t.into_bytes()))
                .collect()
        } else {
            files.iter().flatten().map(|(n, t)| Input::new(n.clone(), t.as_bytes())).collect()
        };
        drop(loaded.take()); // the previous repetition's result, before measuring again
        let t = Instant::now();
        let l = load::load(inputs, &limits);
        load_time = load_time.min(t.elapsed());
        loaded = Some(l);
    }
    let loaded = loaded.ok_or("no repetitions")?;
    if loaded.has_errors() || loaded.policy_set.is_none() {
        let shown: Vec<String> = loaded
            .diagnostics
            .iter()
            .take(10)
            .map(|d| {
                let at = d.primary.as_ref().map(|l| loaded.sources.location(l.span).to_string());
                format!("{} {} at {}", d.code, d.message, at.unwrap_or_default())
            })
            .collect();
        return Err(format!(
            "generated policy set does not load ({} diagnostics):\n{}",
            loaded.diagnostics.len(),
            shown.join("\n")
        ));
    }
    let warnings = loaded.diagnostics.len();
    let set = loaded.policy_set.as_ref().ok_or("no policy set")?;

    let host = host();
    let mut select_time = Duration::MAX;
    let mut policy = None;
    for _ in 0..reps {
        drop(policy.take()); // the previous repetition's result, before measuring again
        let t = Instant::now();
        let p = set.for_host(&host);
        select_time = select_time.min(t.elapsed());
        policy = Some(p);
    }
    let policy = policy.ok_or("no repetitions")?;
    // Reported now, so the parse figures survive a compile that fails or runs out of memory.
    println!(
        "RESULT key={} n={} bytes={} load_ms={:.3} select_ms={:.3} host_rules={} warnings={} reps={}",
        size.key,
        size.n,
        bytes,
        ms(load_time),
        ms(select_time),
        policy.rules.len(),
        warnings,
        reps
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());

    let mut compile_time = Duration::MAX;
    let mut state = None;
    for _ in 0..reps {
        drop(state.take()); // the previous repetition's result, before measuring again
        let t = Instant::now();
        let s = compile::compile_with(&policy, &caps, split);
        compile_time = compile_time.min(t.elapsed());
        state = Some(s);
    }
    let state = match state.ok_or("no repetitions")? {
        Ok(s) => s,
        Err(diags) => {
            // Time is reported even for a compile that ends in an error (typically capacity).
            println!(
                "RESULT key={} compile_ms={:.3} compile_error={}",
                size.key,
                ms(compile_time),
                diags.first().map_or("?", |d| d.code.as_str())
            );
            if stats {
                // Once more with unlimited capacities, just to show what overflowed.
                let unlimited = Capacities {
                    v4_prefixes: u32::MAX,
                    v6_prefixes: u32::MAX,
                    l4_entries: u32::MAX,
                    rules: u32::MAX,
                    workloads: u32::MAX,
                };
                if let Ok(s) = compile::compile_with(&policy, &unlimited, split) {
                    print_stats(size, &s);
                }
            }
            let shown: Vec<String> =
                diags.iter().take(5).map(|d| format!("{} {}", d.code, d.message)).collect();
            return Err(format!("compile failed:\n{}", shown.join("\n")));
        }
    };
    let peak = peak_rss_kb();
    if stats {
        print_stats(size, &state);
    }

    // Untimed: the compiled lookup must agree with the reference evaluator.
    let flows = oracle::probe_flows(&policy, &[], 300);
    let check = match oracle::compare(&policy, &state, &flows) {
        Ok(n) => format!("ok/{n}"),
        Err(e) => {
            eprintln!("  {}: MISMATCH\n{e}", size.key);
            "MISMATCH".to_string()
        }
    };

    let l4 = state.ingress.l4.len() + state.egress.l4.len();
    let v4 = state.ingress.v4.len() + state.egress.v4.len();
    let v6 = state.ingress.v6.len() + state.egress.v6.len();
    println!(
        "RESULT key={} compile_ms={:.3} peak_kb={} v4={} v6={} l4={} check={}",
        size.key,
        ms(compile_time),
        peak,
        v4,
        v6,
        l4,
        check
    );
    Ok(())
}

/// `--stages`: the front door's three stages timed one by one (one run, stderr only).
fn stage_breakdown(size: &Size, generated: &policygen::Generated, limits: &ParseLimits) {
    let mut sources = SourceMap::new();
    let mut nodes = Vec::new();
    let t = Instant::now();
    // The slowest file, to tell a per-byte cost from a per-file one.
    let mut slowest = (Duration::ZERO, 0usize);
    for (name, text) in &generated.files {
        let file = sources.add(SourceFile::new(name.clone(), text.clone()));
        let t = Instant::now();
        match yaml::parse(file, text.as_bytes(), limits) {
            Ok(n) => nodes.push(n),
            Err(d) => eprintln!("  yaml error in {name}: {}", d.message),
        }
        slowest = slowest.max((t.elapsed(), text.len()));
    }
    let parse = t.elapsed();
    eprintln!("  {}: slowest file: {:.1} ms for {} kB", size.key, ms(slowest.0), slowest.1 / 1000);
    let t = Instant::now();
    let mut documents = Vec::new();
    for n in &nodes {
        let (docs, _diags) = lower::lower(n);
        documents.extend(docs);
    }
    let lower_time = t.elapsed();
    drop(nodes);
    let t = Instant::now();
    let (set, _diags) = resolve::resolve(&documents, &sources);
    let resolve_time = t.elapsed();
    eprintln!(
        "  {}: stages: yaml {:.1} ms, lower {:.1} ms, resolve {:.1} ms (policy set: {})",
        size.key,
        ms(parse),
        ms(lower_time),
        ms(resolve_time),
        set.is_some()
    );
}

/// `--stats`: what the compiled state is made of (stderr): classes, L4 entries with and
/// without a workload, and how entries spread over (class, workload) pairs.
fn print_stats(size: &Size, state: &MapState) {
    for (name, maps) in [("ingress", &state.ingress), ("egress", &state.egress)] {
        let wide: BTreeSet<ClassId> =
            maps.v4.values().chain(maps.v6.values()).map(|c| c.wide).collect();
        let narrow: BTreeSet<ClassId> =
            maps.v4.values().chain(maps.v6.values()).map(|c| c.narrow).collect();
        let classes: BTreeSet<ClassId> = wide.union(&narrow).copied().collect();
        let mut per_pair: BTreeMap<(ClassId, WorkloadId), usize> = BTreeMap::new();
        for key in maps.l4.keys() {
            *per_pair.entry((key.class, key.workload)).or_default() += 1;
        }
        let with_workload: usize =
            per_pair.iter().filter(|((_, w), _)| *w != WorkloadId::NONE).map(|(_, n)| n).sum();
        let pairs_with_workload = per_pair.keys().filter(|(_, w)| *w != WorkloadId::NONE).count();
        // Workload entries that repeat the class's no-workload entry exactly (same L4 prefix,
        // same value): the lookup falls back to (class, 0) on a miss, so these are redundant.
        let redundant = maps
            .l4
            .iter()
            .filter(|(k, v)| {
                k.workload != WorkloadId::NONE
                    && maps.l4.get(&L4Key { workload: WorkloadId::NONE, ..**k }) == Some(*v)
            })
            .count();
        let mut sizes: Vec<usize> = per_pair.values().copied().collect();
        sizes.sort_unstable();
        let pct =
            |p: usize| sizes.get((sizes.len().saturating_sub(1)) * p / 100).copied().unwrap_or(0);
        eprintln!(
            "  {}: {name}: {} v4 + {} v6 prefixes, {} classes ({} wide, {} narrow), {} L4 entries ({} in {} (class, workload) pairs with a workload, {} of them identical to the class's no-workload entry; {} without); entries per pair: median {}, p90 {}, max {}",
            size.key,
            maps.v4.len(),
            maps.v6.len(),
            classes.len(),
            wide.len(),
            narrow.len(),
            maps.l4.len(),
            with_workload,
            pairs_with_workload,
            redundant,
            maps.l4.len() - with_workload,
            pct(50),
            pct(90),
            pct(100),
        );
    }
    eprintln!(
        "  {}: {} workload paths, {} rules",
        size.key,
        state.workloads.len(),
        state.rules.len()
    );
}

/// The `RESULT` lines of one child, merged (a child reports load figures first and compile
/// figures after, so a failed compile still leaves the first half), plus how it ended.
struct Row {
    fields: Vec<(String, String)>,
}

impl Row {
    fn parse(stdout: &str) -> Row {
        let fields = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("RESULT "))
            .flat_map(str::split_whitespace)
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        Row { fields }
    }

    fn get(&self, key: &str) -> Option<&str> {
        // The last report of a field wins.
        self.fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn num(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    /// A figure with `decimals` places, or `-` when the child never reported it.
    fn cell(&self, key: &str, scale: f64, decimals: usize) -> String {
        self.num(key).map_or_else(|| "-".to_string(), |v| format!("{:.*}", decimals, v / scale))
    }

    fn text(&self, key: &str) -> String {
        self.get(key).unwrap_or("-").to_string()
    }

    /// The compile finished (its figures are complete).
    fn compiled(&self) -> bool {
        self.get("l4").is_some()
    }
}

fn n_log_n(n: usize) -> f64 {
    let n = n as f64;
    n * n.log2()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    format!("nproc {cpus}, {model}, Linux {}, {rustc}", kernel.trim())
}

/// `--write KEY DIR`: the generated files of one size, under their generated names.
fn write_corpus(size: &Size, dir: &std::path::Path) -> Result<(), String> {
    let generated = generate(size);
    for (name, text) in &generated.files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    eprintln!(
        "{}: {} files, {:.1} MB, {} rules written to {}; compile them for --host {} {}",
        size.key,
        generated.files.len(),
        generated.bytes() as f64 / 1e6,
        generated.rules,
        dir.display(),
        policygen::BENCH_HOST_NAME,
        policygen::BENCH_HOST_LABELS
            .iter()
            .map(|(k, v)| format!("--label {k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn parent(
    sizes: &[&Size],
    stages: bool,
    stats: bool,
    split: Option<&str>,
    mem_limit_mb: u64,
    reps: Option<usize>,
) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let caps = capacities();
    let limits = limits();
    println!("fw-compiler compile benchmark (seed {:#x})", policygen::SEED);
    println!("machine: {}", machine());
    println!(
        "parse limits raised for the big inputs: max_file_bytes {} MiB, max_events {}",
        limits.max_file_bytes >> 20,
        limits.max_events
    );
    println!(
        "capacities raised: v4_prefixes {}, v6_prefixes {}, l4_entries {} per direction, rules {}",
        caps.v4_prefixes, caps.v6_prefixes, caps.l4_entries, caps.rules
    );
    println!(
        "host: {} {:?}; each size runs in its own process (virtual memory limit {}); times are the best of {}",
        policygen::BENCH_HOST_NAME,
        policygen::BENCH_HOST_LABELS,
        if mem_limit_mb == 0 { "none".to_string() } else { format!("{mem_limit_mb} MB") },
        reps.map_or_else(
            || "7 (n <= 2k), 3 (n <= 20k) or 1 run".to_string(),
            |n| format!("{n} runs")
        )
    );
    println!();

    let mut failed = false;
    let mut rows: Vec<(&Size, Row)> = Vec::new();
    for size in sizes {
        // Under a virtual-memory limit, so a size that explodes fails alone instead of taking
        // the machine down with it.
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(r#"[ "$1" -gt 0 ] && ulimit -v "$1"; shift; exec "$@""#).arg("sh");
        cmd.arg((mem_limit_mb * 1024).to_string()).arg(&exe).arg("--child").arg(size.key);
        if stages {
            cmd.arg("--stages");
        }
        if stats {
            cmd.arg("--stats");
        }
        if let Some(split) = split {
            cmd.arg("--split").arg(split);
        }
        if let Some(reps) = reps {
            cmd.arg("--reps").arg(reps.to_string());
        }
        let output = match cmd.stderr(std::process::Stdio::inherit()).output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("{}: cannot run child: {e}", size.key);
                failed = true;
                continue;
            }
        };
        let mut row = Row::parse(&String::from_utf8_lossy(&output.stdout));
        if !output.status.success() {
            let how = match (row.get("compile_error"), output.status.code()) {
                (Some(code), _) => format!("compile error {code}"),
                (None, Some(c)) => format!("exit {c}"),
                // Killed by a signal: with the limit, that is an allocation failure (abort).
                (None, None) => {
                    format!("killed ({}; memory limit {mem_limit_mb} MB?)", output.status)
                }
            };
            eprintln!("{}: child failed: {how}", size.key);
            row.fields.push(("failed".into(), how));
            failed = true;
        }
        failed |= row.get("check") == Some("MISMATCH");
        rows.push((size, row));
    }

    println!(
        "| size | n | input MB | parse+lower+resolve ms | select ms | compile ms | host rules | v4 / v6 prefixes | L4 entries | peak RSS MB | load t/(n log n) | compile t/(n log n) | check |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (size, row) in &rows {
        let ratio = |key: &str| {
            growth(&rows, size, key).map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
        };
        let compile = match (row.compiled(), row.get("failed")) {
            (true, _) => row.cell("compile_ms", 1.0, 1),
            (false, Some(how)) => match row.num("compile_ms") {
                Some(t) => format!("failed after {t:.0} ms: {how}"),
                None => format!("failed: {how}"),
            },
            (false, None) => "-".to_string(),
        };
        println!(
            "| {} | {} {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |",
            size.key,
            size.n,
            size.series.unit(),
            row.cell("bytes", 1e6, 1),
            row.cell("load_ms", 1.0, 1),
            row.cell("select_ms", 1.0, 2),
            compile,
            row.text("host_rules"),
            row.text("v4"),
            row.text("v6"),
            row.text("l4"),
            row.cell("peak_kb", 1024.0, 0),
            ratio("load_ms"),
            if row.compiled() { ratio("compile_ms") } else { "-".to_string() },
            row.text("check"),
        );
    }
    println!();
    verdict(&rows);
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// `t/(n log n)` of `size` divided by the same for the smallest size of its series that was
/// run: 1 means n log n growth, larger means faster growth.
fn growth(rows: &[(&Size, Row)], size: &Size, key: &str) -> Option<f64> {
    let (small, base) =
        rows.iter().find(|(s, r)| s.series == size.series && r.num(key).is_some())?;
    let row = &rows.iter().find(|(s, _)| s.key == size.key)?.1;
    Some((row.num(key)? / n_log_n(size.n)) / (base.num(key)? / n_log_n(small.n)))
}

/// The target: 100k rules compile in under 1 s, growth no worse than n log n. Growth is judged
/// by the normalised ratio of the largest size of each series: at most 2 (a factor of two of
/// slack for caches and allocator effects over two decades of size).
fn verdict(rows: &[(&Size, Row)]) {
    if let Some((_, row)) = rows.iter().find(|(s, _)| s.key == "rules-100k") {
        match (row.compiled(), row.num("compile_ms")) {
            (true, Some(t)) => println!(
                "target 100k rules compile < 1 s: {} ({t:.0} ms)",
                if t < 1000.0 { "met" } else { "NOT met" }
            ),
            _ => println!("target 100k rules compile < 1 s: NOT met (the compile did not finish)"),
        }
    }
    for series in [Series::Rules, Series::Prefixes] {
        let of: Vec<&(&Size, Row)> = rows.iter().filter(|(s, _)| s.series == series).collect();
        let (Some((small, _)), Some((large, last))) = (of.first(), of.last()) else {
            continue;
        };
        if small.n == large.n {
            continue;
        }
        for (what, key) in [("compile", "compile_ms"), ("parse+lower+resolve", "load_ms")] {
            if key == "compile_ms" && !last.compiled() {
                println!(
                    "growth {what} {} {} -> {}: not measured (the largest compile did not finish)",
                    series.unit(),
                    small.n,
                    large.n
                );
                continue;
            }
            if let Some(ratio) = growth(rows, large, key) {
                println!(
                    "growth {what} {} {} -> {}: t/(n log n) x{ratio:.2}: {}",
                    series.unit(),
                    small.n,
                    large.n,
                    if ratio <= 2.0 { "no worse than n log n" } else { "WORSE than n log n" }
                );
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let reps = match args.iter().position(|a| a == "--reps") {
        Some(pos) => match args.get(pos + 1).and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n > 0 => Some(n),
            _ => {
                eprintln!("--reps needs a number of runs (at least 1)");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    if let Some(pos) = args.iter().position(|a| a == "--write") {
        let (Some(size), Some(dir)) = (args.get(pos + 1).and_then(|k| find(k)), args.get(pos + 2))
        else {
            eprintln!("--write needs a size and a folder\n{USAGE}");
            return ExitCode::FAILURE;
        };
        return match write_corpus(size, std::path::Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let stages = args.iter().any(|a| a == "--stages");
    let stats = args.iter().any(|a| a == "--stats");
    // `--split V4,V6`: the layer split to compile with (default: the compiler's own).
    let split_text = args.iter().position(|a| a == "--split").and_then(|p| args.get(p + 1));
    let split = match split_text.map(|t| (t.as_str(), t.split_once(','))) {
        None => Split::DEFAULT,
        Some((_, Some((a, b)))) if a.parse::<u8>().is_ok() && b.parse::<u8>().is_ok() => {
            Split { v4: a.parse().unwrap_or(0), v6: b.parse().unwrap_or(0) }
        }
        Some(_) => {
            eprintln!("--split needs two prefix lengths, V4,V6");
            return ExitCode::FAILURE;
        }
    };
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        let Some(size) = args.get(pos + 1).and_then(|k| find(k)) else {
            eprintln!(
                "--child needs a size: {}",
                FULL.iter().chain(QUICK).chain(EXTRA).map(|s| s.key).collect::<Vec<_>>().join(", ")
            );
            return ExitCode::FAILURE;
        };
        return match child(size, stages, stats, split, reps) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}: {e}", size.key);
                ExitCode::FAILURE
            }
        };
    }
    let sizes: Vec<&Size> = if let Some(pos) = args.iter().position(|a| a == "--only") {
        match args.get(pos + 1).and_then(|k| find(k)) {
            Some(s) => vec![s],
            None => {
                eprintln!("--only needs a size");
                return ExitCode::FAILURE;
            }
        }
    } else if args.iter().any(|a| a == "--quick") {
        QUICK.iter().collect()
    } else {
        FULL.iter().collect()
    };
    // Anything else (cargo passes `--bench`) is ignored.
    let mem_limit_mb = match args.iter().position(|a| a == "--mem-limit-mb") {
        Some(pos) => match args.get(pos + 1).and_then(|v| v.parse().ok()) {
            Some(mb) => mb,
            None => {
                eprintln!("--mem-limit-mb needs a number (0: no limit)");
                return ExitCode::FAILURE;
            }
        },
        None => DEFAULT_MEM_LIMIT_MB,
    };
    parent(&sizes, stages, stats, split_text.map(String::as_str), mem_limit_mb, reps)
}
