//! Part 3: the cost of `connect()` with our egress programs holding 100k prefixes, against
//! no program.
//!
//! cgroup v2 membership is per process, so each side is a child process (this binary's
//! hidden `connect-child` command) started inside a cgroup of the bench's own and inside the
//! bench's network namespace, pinned to the bench CPU: one cgroup has the data plane's egress
//! programs attached (connect4/6, sendmsg4/6 and the connection tracker), the other nothing.
//! The child runs `SCHED_FIFO`, so other work on the machine does not land in its figures.
//! The child connects to a closed TCP port on the namespace's own veth address (not a
//! loopback address, which the programs let through without a lookup), so every `connect()`
//! runs the full egress lookup, sends a SYN and gets a RST back (`ECONNREFUSED`). The policy
//! allows egress by default and none of its prefixes holds the address, so the lookup walks
//! the trie and the three L4 tables and allows. Sides alternate, round by round.

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use anyhow::Context as _;
use fw_common::{DIRECTION_EGRESS, STAT_DEFAULT_ALLOW};
use fw_compiler::ast::Direction;
use fw_compiler::encode::encode;
use fw_loader::Dataplane;
use fw_netkit::{Cgroup, Netns, VethPair};
use serde_json::json;

use crate::report::{Bound, Part, Summary, Table, Target};
use crate::states::{self, Family};
use crate::{Settings, sys};

/// The child: `count` refused connects to `addr` after a warm-up; prints ns per connect.
pub fn child(addr: SocketAddr, count: u32, cpu: usize) -> anyhow::Result<()> {
    sys::pin(0, cpu)?;
    // Real-time, like the packet-rate threads: both sides alike, neither time-shared with
    // whatever else the machine runs.
    // Best effort: some containers do not allow it.
    let _ = sys::fifo(0, 30);
    let once = || match TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(anyhow::anyhow!("connect {addr}: {e}")),
        Ok(_) => Err(anyhow::anyhow!("connect {addr} was accepted; the port must be closed")),
    };
    for _ in 0..count.min(200) {
        once()?;
    }
    let t = Instant::now();
    for _ in 0..count {
        once()?;
    }
    println!("{}", t.elapsed().as_nanos() as f64 / f64::from(count));
    Ok(())
}

pub fn run(s: &Settings, targets: &mut Vec<Target>) -> anyhow::Result<Part> {
    let mut part = Part::new("egress", "3. Egress: connect() with 100k prefixes");
    let n = s.egress_prefixes;
    part.method = vec![format!(
        "{n} IPv4 prefixes in egress allow rules plus {} port rules (default allow); a child \
         process per side and round makes {} refused TCP connects to the namespace's own \
         veth address after 200 warm-up connects, pinned to CPU {}; {} interleaved rounds. \
         Cells are µs per `connect()` (socket, connect, RST, close), medians (min-max).",
        states::PORT_RULES,
        s.egress_connects,
        s.bench_cpu,
        s.egress_rounds
    )];
    let ns = Netns::new()?;
    let veth = VethPair::new(&ns)?;
    let addr = SocketAddr::new(veth.peer_v4().into(), 9);
    let st = states::compile_state(Family::V4, n, Direction::Egress, 0);
    let mut dp = Dataplane::load(&states::capacities(n)).context("load the data plane")?;
    dp.write_generation(0, &encode(&st))?;
    dp.set_active_generation(0)?;
    let with = Cgroup::new()?;
    let without = Cgroup::new()?;
    let _links = dp.attach_egress(with.dir()).context("attach the egress programs")?;
    let exe = std::env::current_exe().context("this binary's path")?;
    let exe = exe.to_str().context("this binary's path is not UTF-8")?.to_string();

    let run_child = |cg: &Cgroup| -> anyhow::Result<f64> {
        let mut cmd = ns.command(&exe);
        cmd.args(["connect-child", "--addr", &addr.to_string()]).args([
            "--count",
            &s.egress_connects.to_string(),
            "--cpu",
            &s.bench_cpu.to_string(),
        ]);
        cg.prepare(&mut cmd);
        let (out, _) = sys::run_timed(&mut cmd)?;
        out.trim().parse::<f64>().with_context(|| format!("connect-child printed {out:?}"))
    };
    let (mut prog, mut none) = (Vec::new(), Vec::new());
    let before = dp.stat(DIRECTION_EGRESS, STAT_DEFAULT_ALLOW)?.packets;
    for round in 0..s.egress_rounds {
        // Alternate which side goes first.
        if round % 2 == 0 {
            prog.push(run_child(&with)?);
            none.push(run_child(&without)?);
        } else {
            none.push(run_child(&without)?);
            prog.push(run_child(&with)?);
        }
        eprintln!(
            "egress: round {}/{}: {:.2} µs with, {:.2} µs without",
            round + 1,
            s.egress_rounds,
            prog[round] / 1e3,
            none[round] / 1e3
        );
    }
    let allowed = dp.stat(DIRECTION_EGRESS, STAT_DEFAULT_ALLOW)?.packets - before;
    let expected = u64::from(s.egress_connects) * s.egress_rounds as u64;
    anyhow::ensure!(
        allowed >= expected,
        "the egress programs decided {allowed} connects, expected at least {expected}"
    );
    let ratios: Vec<f64> = prog.iter().zip(&none).map(|(a, b)| a / b).collect();
    let us = |v: &[f64]| Summary::of(&v.iter().map(|x| x / 1e3).collect::<Vec<_>>()).cell(2);
    let mut t = Table::new("µs per connect()", &["side", "µs per connect", "× no program"]);
    t.row(vec!["no program".into(), us(&none), "1".into()]);
    t.row(vec![
        format!("our egress programs, {n} prefixes"),
        us(&prog),
        Summary::of(&ratios).cell(2),
    ]);
    part.tables.push(t);
    part.data = json!({ "prefixes": n, "connects": s.egress_connects, "with_ns": prog, "without_ns": none, "ratio": ratios });
    let r = Summary::of(&ratios);
    let scale = if n == 100_000 { String::new() } else { format!(" (at {n} prefixes, not 100k)") };
    targets.push(
        Target::new(
            "R7",
            "`connect()` cost with 100k prefixes over no program",
            "at most 1.3x",
            Bound::AtMost,
            1.3,
        )
        .measured(r.median, format!("per-round ratios {}{scale}", r.cell(2))),
    );
    Ok(part)
}
