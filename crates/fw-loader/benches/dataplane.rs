//! Data-plane benchmark (plain binary, `harness = false`; needs root).
//!
//! 1. Per-packet cost of the XDP ingress program (`BPF_PROG_TEST_RUN` with a large repeat, the
//!    kernel's average per repetition) on generated states with 1k, 10k and 100k IPv4 prefixes
//!    (half /24s, half /32s nested in them, 100 prefixes per rule, plus 1k port rules without an
//!    address restriction), for a packet whose source is a /32 nested in a /24 (hit) and one
//!    matching no prefix (miss), side by side with a bare XDP program (`mov r0, 2; exit`, i.e.
//!    XDP_PASS, loaded here with a raw `BPF_PROG_LOAD`; it is benchmark-only and exists only in
//!    this process). Rounds are interleaved; figures are medians over rounds.
//! 2. Apply time through `Dataplane::apply` on a data plane pinned under a private bpffs root
//!    (removed afterwards), with fwctl's saved state (the rule table): a full load of the 100k
//!    state into an empty data plane; a one-rule change (one port rule's port, back and forth)
//!    against the loaded 100k state, warm (the same `Dataplane` as the previous apply, which
//!    knows what each generation holds) as p50/p99 over `--changes` cycles, and cold (a fresh
//!    `Dataplane` adopting the pins, as a one-shot `fwctl apply` does) over `--cold` cycles,
//!    and warm given as entry deltas (`Dataplane::apply_changes`, deltas computed beforehand).
//!    Each is reported to *enforced* (from the call through the flip) and to *complete*
//!    (through the replay onto the old generation and the clean-up). The timed region starts
//!    with the encoded desired state in hand: compiling is the compiler's figure.
//!
//! `cargo bench -p fw-loader --bench dataplane [-- --rounds N --repeat N --changes N --cold N]`

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fw_compiler::ast::{Action, Direction, Mode, PortRange, Proto};
use fw_compiler::compile::compile;
use fw_compiler::encode::encode;
use fw_compiler::ids;
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::{
    AddrTerm, DirectionDefault, HostIdentity, HostPolicy, ResolvedRule, RuleId,
};
use fw_compiler::source::{Location, Span};
use fw_loader::{Dataplane, XdpAction};
use ipnet::{IpNet, Ipv4Net};

const PREFIXES_PER_RULE: usize = 100;
const PORT_RULES: usize = 1000;
const HIT_PORT: u16 = 443;
const MISS_SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// Prefix `i`: pair `k = i / 2` is the /24 `10.0.0.0 + k * 512` (every other /24, so no two
/// can be merged into a shorter prefix) and the /32 `.7` inside it.
fn prefix(i: usize) -> Ipv4Net {
    let k = u32::try_from(i / 2).expect("small index");
    let base = 0x0a00_0000 + (k << 9);
    if i.is_multiple_of(2) {
        Ipv4Net::new(Ipv4Addr::from(base), 24).expect("valid /24")
    } else {
        Ipv4Net::new(Ipv4Addr::from(base + 7), 32).expect("valid /32")
    }
}

/// The deepest-hit source address: the /32 of the last pair.
fn hit_src(n: usize) -> Ipv4Addr {
    assert!(n.is_multiple_of(2), "an even number of prefixes ends with a /32");
    prefix(n - 1).addr()
}

fn rule(
    key: &str,
    ids: &BTreeMap<String, u32>,
    index: u32,
    peers: Vec<AddrTerm>,
    port: u16,
) -> ResolvedRule {
    ResolvedRule {
        id: RuleId(ids[key]),
        direction: Direction::Ingress,
        policy: "bench".into(),
        index,
        name: None,
        action: Action::Allow,
        mode: Mode::Enforce,
        log: false,
        peers,
        proto: Proto::Tcp,
        ports: vec![PortRange { start: port, end: port }],
        icmp: Vec::new(),
        workloads: Vec::new(),
        span: Span::default(),
        location: Location { file: "bench.yaml".into(), line: index + 1, column: 5 },
    }
}

/// A host policy with `n` IPv4 prefixes; `port_shift` moves port rule 0 (the one-rule change).
fn host_policy(n: usize, port_shift: u16) -> HostPolicy {
    // The /24s and the /32s go to different rules (ports 443 and 8443), so each /32 has a class
    // of its own (its rule and its /24's rule) and the compiler keeps every prefix.
    let groups: Vec<Vec<usize>> = [0, 1]
        .into_iter()
        .flat_map(|parity| {
            let members: Vec<usize> = (0..n).filter(|i| i % 2 == parity).collect();
            members.chunks(PREFIXES_PER_RULE).map(<[usize]>::to_vec).collect::<Vec<_>>()
        })
        .collect();
    let prefix_rules = groups.len();
    let keys: Vec<String> =
        (0..prefix_rules + PORT_RULES).map(|i| format!("bench/ingress/{i}")).collect();
    let ids = ids::assign(keys.iter().cloned());
    let mut rules = Vec::new();
    for (r, group) in groups.iter().enumerate() {
        let peers = group.iter().map(|&i| AddrTerm::Net(IpNet::V4(prefix(i)))).collect();
        let port = if group[0].is_multiple_of(2) { HIT_PORT } else { 8443 };
        rules.push(rule(&keys[r], &ids, r as u32, peers, port));
    }
    for p in 0..PORT_RULES {
        let i = prefix_rules + p;
        let port = 20000 + p as u16 + if p == 0 { port_shift } else { 0 };
        rules.push(rule(&keys[i], &ids, i as u32, vec![AddrTerm::Any], port));
    }
    let deny = DirectionDefault {
        verdict: Action::Deny,
        audit: Action::Deny,
        verdict_policy: Some("bench".into()),
        audit_policy: None,
    };
    HostPolicy {
        host: HostIdentity { name: "web-1".into(), labels: BTreeMap::new() },
        rules,
        ingress_default: deny,
        egress_default: DirectionDefault::default(),
        policies: vec!["bench".into()],
    }
}

fn state(n: usize, port_shift: u16) -> MapState {
    compile(&host_policy(n, port_shift), &Capacities::default())
        .unwrap_or_else(|d| panic!("compile failed: {d:?}"))
}

/// Ethernet + IPv4 + TCP SYN from `src` to port `dport`.
fn frame(src: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&[10, 255, 255, 254]);
    let sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let csum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// The bare program: `r0 = 2 (XDP_PASS); exit`, loaded with a raw `BPF_PROG_LOAD`.
struct BarePass {
    fd: i32,
}

impl BarePass {
    fn load() -> std::io::Result<Self> {
        let insns: [u8; 16] = [0xb7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&6u32.to_ne_bytes()); // BPF_PROG_TYPE_XDP
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes()); // insn_cnt
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..61].copy_from_slice(b"fw_bench_pass");
        // SAFETY: `attr` is a zeroed bpf_attr prefix for BPF_PROG_LOAD (cmd 5) whose pointers
        // (`insns`, `license`) outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_mut_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd: fd as i32 })
    }

    /// The kernel's average time per repetition, and the return value.
    fn test_run(&self, data: &[u8], repeat: u32) -> std::io::Result<(Duration, u32)> {
        let mut attr = [0u8; 80];
        attr[0..4].copy_from_slice(&(self.fd as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
        // SAFETY: `attr` is a bpf_attr prefix for BPF_PROG_TEST_RUN (cmd 10); `data` outlives
        // the call and no output buffer is given.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 10, attr.as_mut_ptr(), attr.len()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
        let ns = u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"));
        Ok((Duration::from_nanos(u64::from(ns)), retval))
    }
}

impl Drop for BarePass {
    fn drop(&mut self) {
        // SAFETY: `fd` is this struct's own descriptor.
        unsafe { libc::close(self.fd) };
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() as f64)).ceil() as usize;
    v[i.clamp(1, v.len()) - 1]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// This thread's CPU time (user and system) in ms: unlike wall time, not inflated by other
/// processes on a shared machine.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Removes the bench's pin root even when the bench panics.
struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = fw_loader::unload_pinned(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("dataplane bench: SKIPPED (needs root: BPF_PROG_LOAD, BPF_PROG_TEST_RUN, bpffs)");
        return;
    }
    if fw_loader::object().is_empty() {
        println!("dataplane bench: SKIPPED (the eBPF object was not built: AYA_BUILD_SKIP set?)");
        return;
    }
    let rounds = arg(&args, "--rounds", 7) as usize;
    let repeat = arg(&args, "--repeat", 1_000_000) as u32;
    let changes_count = arg(&args, "--changes", 100) as usize;
    let cold = arg(&args, "--cold", 5) as usize;
    let sizes = [1_000usize, 10_000, 100_000];

    // --- 1. per-packet cost ---
    let caps = Capacities {
        l4_entries: 1 << 14,
        rules: 1 << 12,
        v6_prefixes: 1 << 10,
        ..Capacities::default()
    };
    let bare = BarePass::load().expect("load the bare XDP_PASS program");
    let mut planes = Vec::new();
    for &n in &sizes {
        let t = Instant::now();
        let st = state(n, 0);
        let enc = encode(&st);
        let v4 = st.ingress.v4.len();
        let mut dp = Dataplane::load(&caps).expect("load the data plane");
        dp.write_generation(0, &enc).expect("write generation 0");
        dp.set_active_generation(0).expect("activate generation 0");
        let hit = frame(hit_src(n), HIT_PORT);
        let miss = frame(MISS_SRC, HIT_PORT);
        assert_eq!(dp.test_run_ingress(&hit).expect("test run").action, XdpAction::Pass);
        assert_eq!(dp.test_run_ingress(&miss).expect("test run").action, XdpAction::Drop);
        println!(
            "state {n}: {v4} ingress IPv4 trie entries, {} rules, hit src {} (compile+load {:.0} ms)",
            st.rules.len(),
            hit_src(n),
            ms(t.elapsed())
        );
        planes.push((n, dp, hit, miss));
    }
    let probe = frame(MISS_SRC, HIT_PORT);
    let mut bare_ns = Vec::new();
    let mut cells: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        let (d, ret) = bare.test_run(&probe, repeat).expect("bare test run");
        assert_eq!(ret, 2, "bare program returns XDP_PASS");
        bare_ns.push(d.as_nanos() as f64);
        for (n, dp, hit, miss) in &planes {
            for (what, f) in [("hit", hit), ("miss", miss)] {
                let out = dp.test_run_ingress_repeat(f, repeat).expect("test run");
                cells.entry((*n, what)).or_default().push(out.duration.as_nanos() as f64);
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    drop(planes);
    let bare_med = median(&mut bare_ns);
    println!();
    println!(
        "per-packet cost (kernel test-run average, repeat {repeat}, median of {rounds} interleaved rounds)"
    );
    println!("bare XDP_PASS: {bare_med:.1} ns/packet");
    println!("| IPv4 prefixes | packet | ns/packet | × bare XDP_PASS |");
    println!("|---:|---|---:|---:|");
    let mut med = BTreeMap::new();
    for ((n, what), v) in cells.iter_mut() {
        let m = median(v);
        med.insert((*n, *what), m);
        println!("| {n} | {what} | {m:.1} | {:.1} |", m / bare_med);
    }
    for what in ["hit", "miss"] {
        println!("100k over 1k ({what}): {:.2}", med[&(100_000, what)] / med[&(1_000, what)]);
    }

    // --- 2. apply time ---
    let root =
        PinRoot(PathBuf::from(format!("/sys/fs/bpf/fw-bench-dataplane-{}", std::process::id())));
    let big = state(100_000, 0);
    let changed = state(100_000, 1);
    let encs = [encode(&big), encode(&changed)];
    let digests = [big.digest(), changed.digest()];
    // What fwctl saves with a generation: the state without its prefix and L4 entries.
    let rule_table = |s: &MapState| {
        let mut t = s.clone();
        for d in [&mut t.ingress, &mut t.egress] {
            d.v4.clear();
            d.v6.clear();
            d.l4.clear();
        }
        serde_json::to_vec(&t).expect("serialize")
    };
    let saved = [rule_table(&big), rule_table(&changed)];
    let full_json = serde_json::to_vec(&big).expect("serialize").len();
    let apply_caps = Capacities::default();
    let print_report = |label: &str, total: Duration, r: &fw_loader::ApplyReport| {
        let steps: Vec<String> =
            r.timings.iter().map(|(s, d)| format!("{s} {:.3} ms", ms(*d))).collect();
        println!("{label}: total {:.3} ms; {}", ms(total), steps.join(", "));
    };
    // Time from the call until the flip returned (the state is enforced), from the report.
    let enforced = |r: &fw_loader::ApplyReport| {
        let mut t = 0.0;
        for (s, d) in &r.timings {
            t += ms(*d);
            if *s == "flip" {
                break;
            }
        }
        t
    };
    println!();
    println!(
        "saved state (rule table) {} bytes; the full state as JSON would be {full_json} bytes",
        saved[0].len()
    );
    for i in 0..3 {
        let mut dp = Dataplane::load_pinned(&root.0, &apply_caps).expect("load pinned");
        let t = Instant::now();
        let r = dp.apply(&encs[0], "full", &digests[0], &saved[0]).expect("apply 100k");
        let total = t.elapsed();
        print_report(&format!("full load 100k #{}", i + 1), total, &r);
        println!("  standby entries {:?}, replay entries {:?}", r.standby, r.replay);
        dp.unload().expect("unload");
    }

    // The user-space part of an apply's diff step: comparing two 100k encodings in memory.
    let mut in_memory = Vec::new();
    let mut in_memory_cpu = Vec::new();
    for _ in 0..20 {
        let (t, c) = (Instant::now(), thread_cpu_ms());
        let d = fw_loader::entry_delta(&encs[0], &encs[1]);
        in_memory_cpu.push(thread_cpu_ms() - c);
        in_memory.push(ms(t.elapsed()));
        assert_eq!(d.values().map(|d| d.len()).sum::<usize>(), 2);
    }
    println!(
        "in-memory entry diff of the two 100k encodings: median {:.3} ms wall, {:.3} ms CPU, of 20",
        median(&mut in_memory),
        median(&mut in_memory_cpu)
    );

    // Warm: one process applies one-rule changes back and forth against the loaded state.
    let mut dp = Dataplane::load_pinned(&root.0, &apply_caps).expect("load pinned");
    dp.apply(&encs[0], "base", &digests[0], &saved[0]).expect("apply 100k");
    let mut warm_enforced = Vec::new();
    let mut warm_total = Vec::new();
    let mut warm_cpu = Vec::new();
    let mut steps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut k = 0;
    for i in 0..changes_count {
        k = (i + 1) % 2;
        let (t, c) = (Instant::now(), thread_cpu_ms());
        let r = dp
            .apply(&encs[k], &format!("change-{i}"), &digests[k], &saved[k])
            .expect("apply change");
        let total = t.elapsed();
        warm_cpu.push(thread_cpu_ms() - c);
        if i == 0 {
            print_report("warm one-rule change #1", total, &r);
            println!("  standby entries {:?}, replay entries {:?}", r.standby, r.replay);
        }
        assert_eq!(r.standby.written + r.standby.deleted, 2, "one L4 entry out, one in");
        warm_enforced.push(enforced(&r));
        warm_total.push(ms(total));
        for (s, d) in &r.timings {
            steps.entry(s).or_default().push(ms(*d));
        }
    }
    // Warm, the change given as entry deltas (`apply_changes`): what the daemon can do when
    // its compile tells it what changed. The deltas are computed before the timed region.
    let view = |e: &fw_compiler::encode::Encoded| {
        let mut e = e.clone();
        e.maps.remove(fw_common::maps::WORKLOADS);
        e
    };
    let changes = [
        fw_loader::entry_delta(&view(&encs[1]), &view(&encs[0])),
        fw_loader::entry_delta(&view(&encs[0]), &view(&encs[1])),
    ];
    let mut delta_enforced = Vec::new();
    let mut delta_total = Vec::new();
    for i in 0..changes_count {
        let (base, next) = (k, 1 - k);
        let t = Instant::now();
        let r = dp
            .apply_changes(
                &digests[base],
                &changes[next],
                &format!("delta-{i}"),
                &digests[next],
                &saved[next],
            )
            .expect("apply changes");
        let total = t.elapsed();
        if i == 0 {
            print_report("warm one-rule change as deltas #1", total, &r);
        }
        assert_eq!(r.standby.written + r.standby.deleted, 2, "one L4 entry out, one in");
        delta_enforced.push(enforced(&r));
        delta_total.push(ms(total));
        k = next;
    }

    // Where a cold apply's time goes: reading a generation back from the kernel.
    let mut reads = Vec::new();
    for _ in 0..5 {
        let g = dp.active_generation().expect("active generation");
        let t = Instant::now();
        dp.read_generation(g).expect("read generation");
        reads.push(ms(t.elapsed()));
    }
    drop(dp);

    // Cold: a fresh process (a new `Dataplane` adopting the pins, as `fwctl apply` does).
    let mut cold_enforced = Vec::new();
    let mut cold_total = Vec::new();
    for i in 0..cold {
        k = (k + 1) % 2;
        let t = Instant::now();
        let mut dp = Dataplane::adopt(&root.0).expect("adopt");
        let r = dp.apply(&encs[k], &format!("cold-{i}"), &digests[k], &saved[k]).expect("apply");
        let total = t.elapsed();
        let adopt = ms(total) - r.timings.iter().map(|(_, d)| ms(*d)).sum::<f64>();
        if i == 0 {
            print_report(&format!("cold one-rule change #1 (adopt {adopt:.1} ms)"), total, &r);
        }
        cold_enforced.push(adopt + enforced(&r));
        cold_total.push(ms(total));
    }
    let dp = Dataplane::adopt(&root.0).expect("adopt");
    assert_eq!(dp.read_generation(0).expect("g0"), dp.read_generation(1).expect("g1"));
    dp.unload().expect("unload");
    drop(root);

    println!();
    println!(
        "read back one 100k generation from the kernel: median {:.1} ms of 5",
        median(&mut reads)
    );
    println!();
    println!("one-rule change against the loaded 100k state (ms):");
    println!("| case | n | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    let row = |label: &str, v: &mut Vec<f64>| {
        let n = v.len();
        if n == 0 {
            return;
        }
        let (m, p) = (median(v), pct(v, 99.0));
        let x = v.iter().copied().fold(f64::MIN, f64::max);
        println!("| {label} | {n} | {m:.3} | {p:.3} | {x:.3} |");
    };
    row("warm, to enforced (through the flip)", &mut warm_enforced);
    row("warm, to complete (through replay and clean-up)", &mut warm_total);
    row("warm, whole apply, this thread's CPU time", &mut warm_cpu);
    row("warm, given as deltas (apply_changes), to enforced", &mut delta_enforced);
    row("warm, given as deltas (apply_changes), to complete", &mut delta_total);
    row("cold (adopt + apply), to enforced", &mut cold_enforced);
    row("cold (adopt + apply), to complete", &mut cold_total);
    println!();
    println!("warm steps (ms):");
    println!("| step | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (s, v) in steps.iter_mut() {
        let m = median(v);
        let p = pct(v, 99.0);
        let x = v.iter().copied().fold(f64::MIN, f64::max);
        println!("| {s} | {m:.3} | {p:.3} | {x:.3} |");
    }
}
