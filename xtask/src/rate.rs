//! Part 2: packets per second on a veth pair, ours against nftables, iptables and a bare
//! XDP_DROP.
//!
//! The generator is `fw_bench_gen` run with `BPF_PROG_TEST_RUN` and
//! `BPF_F_TEST_XDP_LIVE_FRAMES` (this kernel has no pktgen) on the bench CPU: each frame is
//! a 64-byte UDP datagram whose IPv4 source the program draws from the loaded wide prefixes
//! (hit-heavy), transmitted out of the host end of a veth pair. The receiving end lives in a
//! namespace of its own; its NAPI runs threaded (GRO on, so veth has NAPI without an XDP
//! program) and the NAPI thread is pinned to the other CPU, so generator and receiver do not
//! share a CPU. Both run `SCHED_FIFO` while traffic flows, so builds or tests sharing the
//! machine cannot take their CPU away (real-time throttling still leaves 5% to the rest). Engines take turns on the receiving end, round by round: our production
//! ingress program (XDP, driver mode), nftables at netdev ingress (interval sets, then hash
//! sets), iptables in raw PREROUTING, and a bare XDP_DROP. Every one ends in a drop.
//!
//! Received packets are what the receiving veth consumed from its ring (`rx_packets`; frames
//! the full ring refused count as `rx_dropped`). A run counts only when the generator offered
//! at least 1.2 times what was received (the receiver was the bottleneck) or the receiver's
//! NAPI thread was at least 95% busy; otherwise the generator was the limit and the run says
//! nothing about the engine, so it is reported and left out.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, XdpMode};
use fw_common::{DIRECTION_INGRESS, STAT_DEFAULT_DENY};
use fw_compiler::ast::Direction;
use fw_compiler::encode::encode;
use fw_loader::Dataplane;
use fw_netkit::{Netns, VethPair};
use serde_json::json;

use crate::Settings;
use crate::netfilter::{self, Layout};
use crate::perpacket::Aux;
use crate::report::{Bound, Part, Summary, Table, Target};
use crate::states::{self, Draw, Family};
use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Engine {
    Ours,
    NftInterval,
    NftHash,
    Iptables,
    XdpDrop,
}

impl Engine {
    /// The engine's name in `FW_BENCH_RATE_ENGINES`.
    fn key(self) -> &'static str {
        match self {
            Engine::Ours => "ours",
            Engine::NftInterval => "nft-interval",
            Engine::NftHash => "nft-hash",
            Engine::Iptables => "iptables",
            Engine::XdpDrop => "drop",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Engine::Ours => "ours (XDP)",
            Engine::NftInterval => "nftables, interval sets",
            Engine::NftHash => "nftables, hash sets",
            Engine::Iptables => "iptables (one rule per prefix)",
            Engine::XdpDrop => "bare XDP_DROP",
        }
    }
}

struct Sample {
    offered: u64,
    received: u64,
    seconds: f64,
    busy: f64,
    counts: bool,
}

/// `ip -s -j link show` of the receiving device: (rx_packets, rx_dropped).
fn rx_stats(ns: &Netns, dev: &str) -> anyhow::Result<(u64, u64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j")?;
    let rx = &v[0]["stats64"]["rx"];
    Ok((rx["packets"].as_u64().unwrap_or(0), rx["dropped"].as_u64().unwrap_or(0)))
}

/// The NAPI threads of `dev` (`napi/<dev>-<id>`).
fn napi_threads(dev: &str) -> Vec<i32> {
    let prefix = format!("napi/{dev}-");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end().starts_with(&prefix))
        })
        .collect()
}

fn ns_sh(ns: &Netns, script: &str) -> anyhow::Result<()> {
    sys::run_timed(Command::new("ip").args(["netns", "exec", ns.name(), "sh", "-c", script]))?;
    Ok(())
}

fn nft(ns: &Netns, script: &str) -> anyhow::Result<Duration> {
    let mut cmd = ns.command("nft");
    cmd.args(["-f", "-"]);
    Ok(sys::run_timed_stdin(&mut cmd, script)?.1)
}

pub fn run(s: &Settings, aux: &mut Aux, targets: &mut Vec<Target>) -> anyhow::Result<Part> {
    let mut part = Part::new("packet_rate", "2. Packet rate on a veth pair");
    let sizes = s.rate_sizes.clone();
    let n_target = if sizes.contains(&100_000) { 100_000 } else { sizes[sizes.len() - 1] };
    let list = sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    part.method = vec![format!(
        "{list} IPv4 prefixes (the same list for every engine), 64-byte UDP frames with \
         hit-heavy random sources from a live-frames XDP generator on CPU {}, receiver's \
         NAPI thread on CPU {}; {} interleaved rounds of {:.1} s per engine. Packets per \
         second are what the receiver took in (medians, min-max over the rounds that \
         counted).",
        s.bench_cpu, s.receiver_cpu, s.rate_rounds, s.rate_seconds
    )];
    let missing = |t: Target, why: &str| t.missing(why.to_string());
    let r3 = Target::new(
        "R3",
        "veth packets per second, ours over nftables interval set, 100k prefixes",
        "at least 6x (stretch 10x)",
        Bound::AtLeast,
        6.0,
    );
    let r3b = Target::new(
        "R3b",
        "the same over the nftables hash-set layout",
        "at least 4x",
        Bound::AtLeast,
        4.0,
    );
    let r4 = Target::new(
        "R4",
        "veth packets per second, ours at 100k over bare XDP_DROP",
        "at least 0.6 (stretch 0.8)",
        Bound::AtLeast,
        0.6,
    );
    if sys::cpus() < 2 {
        let why = "skipped: one CPU, no quiet CPU for the receiver";
        part.notes.push(format!("Packet rate {why}."));
        targets.extend([missing(r3, why), missing(r3b, why), missing(r4, why)]);
        return Ok(part);
    }
    if !sys::have("ethtool") {
        let why = "skipped: ethtool not installed (scripts/setup.sh installs it)";
        part.notes.push(format!("Packet rate {why}."));
        targets.extend([missing(r3, why), missing(r3b, why), missing(r4, why)]);
        return Ok(part);
    }
    let have_nft = sys::have("nft");
    let have_ipt = sys::have("iptables-restore");
    if !have_nft {
        part.notes.push(
            "nft not installed (scripts/setup.sh installs it): nftables not measured.".into(),
        );
    }
    if !have_ipt {
        part.notes
            .push("iptables not installed (scripts/setup.sh installs it): not measured.".into());
    }

    let ns = Netns::new()?;
    let veth = VethPair::new(&ns)?;
    let dev = veth.peer_name().to_string();
    // GRO first: it gives the veth its NAPI instance, which threaded mode needs.
    sys::run_timed(ns.command("ethtool").args(["-K", &dev, "gro", "on"]))
        .context("enable GRO on the receiving veth (ethtool)")?;
    ns_sh(&ns, &format!("echo 1 > /sys/class/net/{dev}/threaded"))?;
    std::thread::sleep(Duration::from_millis(100));
    let threads = napi_threads(&dev);
    // Pinned, and real-time: the receiver's CPU is shared with whatever else the machine
    // runs, and a time-shared receiver would measure the neighbours.
    let mut realtime = !threads.is_empty();
    for &t in &threads {
        sys::pin(t, s.receiver_cpu)?;
        realtime &= sys::fifo(t, 50).is_ok();
    }
    if threads.is_empty() {
        part.notes.push(format!(
            "No NAPI thread found for {dev}: the receiver's CPU load is read from /proc/stat for CPU {}.",
            s.receiver_cpu
        ));
    }
    // Without a real-time receiver (no NAPI thread, or no permission for SCHED_FIFO, as in
    // some containers) the receiver's CPU has to be quiet on its own, or the figures would
    // be the neighbours'.
    if !realtime {
        let busy = sys::cpu_busy(s.receiver_cpu, Duration::from_millis(500));
        if busy > 0.3 {
            let why = format!(
                "skipped: no quiet CPU (CPU {} was {:.0}% busy with other work and the \
                 receiver could not run SCHED_FIFO)",
                s.receiver_cpu,
                busy * 100.0
            );
            part.notes.push(format!("Packet rate {why}."));
            targets.extend([missing(r3, &why), missing(r3b, &why), missing(r4, &why)]);
            return Ok(part);
        }
        part.notes.push("The receiver could not run SCHED_FIFO; its CPU was quiet.".into());
    }

    let mut all: BTreeMap<usize, BTreeMap<Engine, Vec<Sample>>> = BTreeMap::new();
    for &n in &sizes {
        let mut engines = vec![Engine::Ours];
        if have_nft {
            engines.extend([Engine::NftInterval, Engine::NftHash]);
        }
        if have_ipt && n <= s.iptables_max {
            engines.push(Engine::Iptables);
        } else if have_ipt {
            part.notes
                .push(format!("{n} prefixes: iptables not measured (above this mode's size)."));
        }
        engines.push(Engine::XdpDrop);
        // Diagnostics (not used by the modes): `FW_BENCH_RATE_ENGINES=ours,drop` keeps only
        // the engines named (ours, nft-interval, nft-hash, iptables, drop), e.g. to profile
        // one engine's receiver alone.
        if let Ok(only) = std::env::var("FW_BENCH_RATE_ENGINES") {
            let keep: Vec<&str> = only.split(',').map(str::trim).collect();
            engines.retain(|e| keep.contains(&e.key()));
            anyhow::ensure!(!engines.is_empty(), "FW_BENCH_RATE_ENGINES: no engine left");
        }
        // Engines' state, loaded once per size (the previous size's removed first).
        let _ = nft(&ns, &format!("delete table netdev {}\n", netfilter::TABLE));
        for flag in ["-F", "-X"] {
            let _ = sys::run_timed(ns.command("iptables").args(["-t", "raw", flag]));
        }
        let st = states::compile_state(Family::V4, n, Direction::Ingress, 0);
        let mut dp = Dataplane::load(&states::capacities(n)).context("load the data plane")?;
        dp.write_generation(0, &encode(&st))?;
        dp.set_active_generation(0)?;
        if have_nft {
            nft(&ns, &netfilter::nft_sets(n, Layout::Interval))?;
            nft(&ns, &netfilter::nft_sets(n, Layout::Hash))?;
        }
        if engines.contains(&Engine::Iptables) {
            let mut cmd = ns.command("iptables-restore");
            sys::run_timed_stdin(&mut cmd, &netfilter::iptables_rules(n, &dev, false))?;
        }

        let frame = states::udp_frame(
            veth.peer_mac(),
            veth.host_mac(),
            veth.peer_v4(),
            Draw::new(Family::V4, n, true),
        );
        // struct xdp_md: data (metadata length) 0, data_end the frame's length (the kernel
        // insists), data_meta 0, ingress_ifindex the device to transmit from, rx queue 0,
        // egress_ifindex 0.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&veth.host_ifindex().to_ne_bytes());
        sys::pin(0, s.bench_cpu)?;

        let mut samples: BTreeMap<Engine, Vec<Sample>> = BTreeMap::new();
        for round in 0..s.rate_rounds {
            for &engine in &engines {
                // Attach.
                let mut link = None;
                match engine {
                    Engine::Ours => {
                        let p = dp.ingress_program()?;
                        link = Some(ns.run(|| p.attach(&dev, XdpMode::Driver))??);
                    }
                    Engine::XdpDrop => {
                        let p = aux.program("fw_bench_drop");
                        link = Some(ns.run(|| p.attach(&dev, XdpMode::Driver))??);
                    }
                    Engine::NftInterval => {
                        nft(&ns, &netfilter::nft_chain(Layout::Interval, &dev))?;
                    }
                    Engine::NftHash => {
                        nft(&ns, &netfilter::nft_chain(Layout::Hash, &dev))?;
                    }
                    Engine::Iptables => {
                        sys::run_timed(ns.command("iptables").args([
                            "-t",
                            "raw",
                            "-I",
                            "PREROUTING",
                            "-i",
                            &dev,
                            "-j",
                            netfilter::CHAIN,
                        ]))?;
                    }
                }
                let deny_before = dp.stat(DIRECTION_INGRESS, STAT_DEFAULT_DENY)?.packets;
                let sample = measure(s, aux, &ns, &dev, &threads, &frame, &ctx);
                // Detach before looking at the result, so a failed run leaves nothing attached.
                match engine {
                    Engine::Ours => {
                        let p = dp.ingress_program()?;
                        if let Some(l) = link.take() {
                            ns.run(|| p.detach(l))??;
                        }
                    }
                    Engine::XdpDrop => {
                        let p = aux.program("fw_bench_drop");
                        if let Some(l) = link.take() {
                            ns.run(|| p.detach(l))??;
                        }
                    }
                    Engine::NftInterval | Engine::NftHash => {
                        let layout =
                            if engine == Engine::NftHash { Layout::Hash } else { Layout::Interval };
                        nft(
                            &ns,
                            &format!(
                                "delete chain netdev {} rx_{}\n",
                                netfilter::TABLE,
                                layout.name()
                            ),
                        )?;
                    }
                    Engine::Iptables => {
                        sys::run_timed(ns.command("iptables").args([
                            "-t",
                            "raw",
                            "-D",
                            "PREROUTING",
                            "-i",
                            &dev,
                            "-j",
                            netfilter::CHAIN,
                        ]))?;
                    }
                }
                let sample = sample?;
                if engine == Engine::Ours {
                    let denied =
                        dp.stat(DIRECTION_INGRESS, STAT_DEFAULT_DENY)?.packets - deny_before;
                    anyhow::ensure!(
                        denied >= sample.received / 2,
                        "our program denied {denied} of {} received packets",
                        sample.received
                    );
                }
                eprintln!(
                    "rate: round {}/{} {:32} offered {:>10.0}/s received {:>10.0}/s busy {:>3.0}%{}",
                    round + 1,
                    s.rate_rounds,
                    engine.label(),
                    sample.offered as f64 / sample.seconds,
                    sample.received as f64 / sample.seconds,
                    sample.busy * 100.0,
                    if sample.counts { "" } else { " (does not count)" }
                );
                samples.entry(engine).or_default().push(sample);
            }
        }
        sys::unpin(0);
        drop(dp);
        all.insert(n, samples);
    }
    drop(veth);
    drop(ns);

    let mut data = Vec::new();
    for (&n, samples) in &all {
        let mut t = Table::new(
            &format!(
                "{n} prefixes: packets per second received (median, min-max over counted runs)"
            ),
            &["engine", "received pps", "offered pps", "receiver busy %", "runs counted"],
        );
        for (engine, v) in samples {
            let counted: Vec<&Sample> = v.iter().filter(|x| x.counts).collect();
            let pps: Vec<f64> = counted.iter().map(|x| x.received as f64 / x.seconds).collect();
            let off: Vec<f64> = v.iter().map(|x| x.offered as f64 / x.seconds).collect();
            let busy: Vec<f64> = v.iter().map(|x| x.busy * 100.0).collect();
            let received = if counted.is_empty() {
                let all: Vec<f64> = v.iter().map(|x| x.received as f64 / x.seconds).collect();
                format!("{} (no run counted)", Summary::of(&all).cell(0))
            } else {
                Summary::of(&pps).cell(0)
            };
            t.row(vec![
                engine.label().into(),
                received,
                Summary::of(&off).cell(0),
                Summary::of(&busy).cell(0),
                format!("{}/{}", counted.len(), v.len()),
            ]);
            if counted.len() < v.len() {
                part.notes.push(format!(
                "{n} prefixes, {}: {} of {} runs did not count (the generator offered less than 1.2x what was \
                 received and the receiver was under 95% busy).",
                engine.label(),
                v.len() - counted.len(),
                v.len()
            ));
            }
            data.push(json!({
                "prefixes": n,
                "engine": engine.label(),
                "runs": v.iter().map(|x| json!({
                    "offered": x.offered, "received": x.received, "seconds": x.seconds,
                    "receiver_busy": x.busy, "counts": x.counts,
                })).collect::<Vec<_>>(),
            }));
        }
        part.tables.push(t);
    }
    part.data = json!({ "runs": data });
    let n = n_target;
    let samples = &all[&n];

    // Ratios per round (both sides of the same round, when both counted), then the median.
    let ratio = |a: Engine, b: Engine| -> Option<Summary> {
        let (va, vb) = (samples.get(&a)?, samples.get(&b)?);
        let r: Vec<f64> = va
            .iter()
            .zip(vb)
            .filter(|(x, y)| x.counts && y.counts && y.received > 0)
            .map(|(x, y)| (x.received as f64 / x.seconds) / (y.received as f64 / y.seconds))
            .collect();
        (!r.is_empty()).then(|| Summary::of(&r))
    };
    let scale =
        if n == 100_000 { String::new() } else { format!(" (measured at {n} prefixes, not 100k)") };
    // When ours counted but the other engine never did (the generator, not the receiver, was
    // its limit), the other engine takes in at least what was measured, so ours over it is at
    // most the measured ratio: enough to say "not met" for an at-least target below its
    // limit, and nothing otherwise.
    let bound = |a: Engine, b: Engine| -> Option<Summary> {
        let (va, vb) = (samples.get(&a)?, samples.get(&b)?);
        let r: Vec<f64> = va
            .iter()
            .zip(vb)
            .filter(|(x, y)| x.counts && y.received > 0)
            .map(|(x, y)| (x.received as f64 / x.seconds) / (y.received as f64 / y.seconds))
            .collect();
        (!r.is_empty()).then(|| Summary::of(&r))
    };
    for (t, other) in [(r3, Engine::NftInterval), (r3b, Engine::NftHash), (r4, Engine::XdpDrop)] {
        match (ratio(Engine::Ours, other), bound(Engine::Ours, other)) {
            (Some(r), _) => {
                targets.push(t.measured(r.median, format!("per-round ratios {}{scale}", r.cell(2))))
            }
            (None, Some(b)) if b.max < t.limit => targets.push(t.measured(
                b.median,
                format!(
                    "an upper bound: no {} run counted (the generator was its limit), so it \
                     takes in at least what was measured; per-round {}{scale}",
                    other.label(),
                    b.cell(2)
                ),
            )),
            _ => targets
                .push(t.missing(format!("no round where both {} and ours counted", other.label()))),
        }
    }
    Ok(part)
}

/// One run of the generator against whatever the receiver runs now.
fn measure(
    s: &Settings,
    aux: &mut Aux,
    ns: &Netns,
    dev: &str,
    threads: &[i32],
    frame: &[u8],
    ctx: &[u8],
) -> anyhow::Result<Sample> {
    let thread_cpu = || threads.iter().filter_map(|&t| sys::cpu_time(t)).sum::<Duration>();
    let (rx0, _) = rx_stats(ns, dev)?;
    let (cpu0, j0) = (thread_cpu(), sys::cpu_jiffies(s.receiver_cpu));
    // The generator is real-time too while it runs, for the same reason.
    // Best effort: without the permission the generator stays time-shared.
    let rt = sys::fifo(0, 40).is_ok();
    let start = Instant::now();
    let mut offered = 0u64;
    let mut chunk = 50_000u32;
    while start.elapsed().as_secs_f64() < s.rate_seconds {
        let t = Instant::now();
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(ctx),
            repeat: chunk,
            attrs: TestRunAttrs::new().xdp_live_frames(256),
            ..TestRunOptions::new()
        };
        let r = aux.program("fw_bench_gen").test_run(opts);
        if r.is_err() && rt {
            sys::fifo(0, 0)?;
        }
        r.context("run the live-frames generator")?;
        offered += u64::from(chunk);
        // Chunks of about 0.2 s: few calls, and a run ends close to its time.
        let per = t.elapsed().as_secs_f64() / f64::from(chunk);
        chunk = ((0.2 / per.max(1e-9)) as u32).clamp(10_000, 20_000_000);
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu1 = thread_cpu();
    if rt {
        sys::fifo(0, 0)?;
    }
    // What the ring still holds is taken in within a few ms.
    std::thread::sleep(Duration::from_millis(50));
    let (rx1, _) = rx_stats(ns, dev)?;
    let busy = if threads.is_empty() {
        match (j0, sys::cpu_jiffies(s.receiver_cpu)) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => 0.0,
        }
    } else {
        (cpu1 - cpu0).as_secs_f64() / seconds
    };
    let received = rx1.saturating_sub(rx0);
    let counts = offered as f64 >= 1.2 * received as f64 || busy >= 0.95;
    Ok(Sample { offered, received, seconds, busy, counts })
}
