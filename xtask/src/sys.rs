//! What the suite needs from the machine: the benchmark build of the kernel object, CPU
//! pinning, CPU time of other threads, memory figures, commands with timings, and a
//! description of the machine for the report.
//!
//! The benchmark object is built here, by running cargo on crates/fw-ebpf with its `bench`
//! feature, rather than by fw-loader's build script: the production object (what fw-loader
//! embeds and fwctl loads) is then never built with the feature, whatever a workspace build
//! unifies. It uses the nested target directory fw-loader's build script shares between its
//! builds (`<target>/fw-ebpf-build`, same flags), so `core` is compiled once for both and a
//! cold benchmark build costs seconds. Cargo keeps each feature set's artifacts apart and
//! re-links the uplifted binary on every build, fresh or not, so the production build always
//! picks up its own object; a test checks the embedded object holds no benchmark code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Builds fw-ebpf with `--features bench` (as aya-build builds it: nightly, build-std, BTF)
/// and returns the object's bytes.
pub fn bench_object(root: &Path) -> anyhow::Result<Vec<u8>> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let target_dir = target.join("fw-ebpf-build").join("target").join("fw-ebpf");
    let arch = std::env::consts::ARCH;
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let status = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--features", "bench", "--bins", "--target-dir"])
        .arg(&target_dir)
        .current_dir(root.join("crates/fw-ebpf"))
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("run cargo for the benchmark build of fw-ebpf")?;
    if !status.success() {
        bail!("the benchmark build of fw-ebpf failed ({status})");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/fw-ebpf");
    std::fs::read(&obj).with_context(|| format!("read {}", obj.display()))
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Pins thread or process `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("sched_setaffinity({pid}, cpu {cpu}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets thread or process `pid` (0: the calling thread) to `SCHED_FIFO` at `priority`, or
/// back to `SCHED_OTHER` with priority 0. Under the kernel's real-time throttling (95% of each
/// second by default) a busy FIFO thread cannot lock its CPU up.
pub fn fifo(pid: i32, priority: i32) -> anyhow::Result<()> {
    let policy = if priority > 0 { libc::SCHED_FIFO } else { libc::SCHED_OTHER };
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: `param` is a valid sched_param for the call.
    if unsafe { libc::sched_setscheduler(pid, policy, &param) } != 0 {
        bail!("sched_setscheduler({pid}, {policy}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Lets thread or process `pid` run on every CPU again.
pub fn unpin(pid: i32) {
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus() {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPUs online (not this thread's affinity, which pinning narrows).
pub fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Time thread `pid` has run on a CPU so far, from /proc/PID/schedstat (nanoseconds; the
/// tick-based user and system times of /proc/PID/stat are too coarse for short runs), else
/// from /proc/PID/stat.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    if let Some(ns) = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
    {
        return Some(Duration::from_nanos(ns));
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (0-based 11, 12).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Busy and total jiffies of `cpu` from /proc/stat.
pub fn cpu_jiffies(cpu: usize) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("cpu{cpu} ")))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The share of `cpu`'s time spent busy over the next `over`.
pub fn cpu_busy(cpu: usize, over: Duration) -> f64 {
    let a = cpu_jiffies(cpu);
    std::thread::sleep(over);
    match (a, cpu_jiffies(cpu)) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => 0.0,
    }
}

/// A field of /proc/self/status in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The kernel memory charged to the BPF maps this process holds open (`memlock` of each map
/// descriptor's fdinfo), in bytes.
pub fn bpf_map_memlock() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else { return 0 };
    let mut total = 0;
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        if !text.contains("map_type:") {
            continue;
        }
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            total += v;
        }
    }
    total
}

/// Runs `cmd`, fails on a non-zero exit (with its stderr), returns stdout and the wall time.
pub fn run_timed(cmd: &mut Command) -> anyhow::Result<(String, Duration)> {
    let what = format!("{cmd:?}");
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.chars().take(2000).collect();
        bail!("{what} failed ({}): {err}", out.status);
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), elapsed))
}

/// As [`run_timed`], with `input` on the command's stdin (timed from the spawn, so the time
/// includes reading the input, as `tool -f file` would).
pub fn run_timed_stdin(cmd: &mut Command, input: &str) -> anyhow::Result<(String, Duration)> {
    use std::io::Write as _;
    use std::process::Stdio;
    let what = format!("{cmd:?}");
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {what}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().with_context(|| format!("wait for {what}"))?;
    let elapsed = t.elapsed();
    let _ = writer.join();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.chars().take(2000).collect();
        bail!("{what} failed ({}): {err}", out.status);
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), elapsed))
}

/// The first line of `program args`' output, or "not found".
pub fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not found".into())
}

pub fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn mem_total_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// UTC date and time, from the system clock.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// The commit the workspace is at, with `-dirty` when it has changes.
pub fn git_commit(root: &Path) -> String {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root)
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if rev.is_empty() {
        "unknown".into()
    } else if dirty {
        format!("{rev}-dirty")
    } else {
        rev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_production_object_holds_no_benchmark_code() {
        let obj = fw_loader::object();
        // Built with AYA_BUILD_SKIP: there is no object to look at.
        if obj.is_empty() {
            return;
        }
        // Program names and the bench module's symbols all start with this.
        let needle = b"fw_bench";
        assert!(
            !obj.windows(needle.len()).any(|w| w == needle),
            "the embedded fw-ebpf object was built with the `bench` feature"
        );
        assert!(obj.windows(10).any(|w| w == b"fw_ingress"), "the ingress program is named");
    }

    #[test]
    fn the_date_is_formatted_as_utc() {
        let d = utc_now();
        assert_eq!(d.len(), 23, "{d}");
        assert!(d.ends_with(" UTC"));
    }

    #[test]
    fn this_thread_has_a_cpu_time() {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        assert!(cpu_time(pid).is_some());
    }
}
