//! `fwctl apply | diff | status | unload | events`: the commands that touch the kernel.
//!
//! Why it is built this way:
//! - Compiling happens before anything is opened in the kernel, so a policy that does not
//!   compile or does not fit changes nothing.
//! - The kernel holds map entries, not rules. To say what an apply would change as rules, the
//!   last applied state's rule table is saved next to the maps by the loader (in a pinned map
//!   the active generation's record names, see fw-loader's `pin`): the `MapState` without its
//!   prefix and L4 entries (host, defaults, workloads, rules), which is O(rules) where the
//!   entries are O(policy size) (3.6 MB of JSON for a 100k-prefix state, against the loader's
//!   aim of applying a one-rule change in well under a millisecond). `diff` renders rules
//!   from `MapState::diff` between that table and the desired state's, and counts the map
//!   entries that would change by reading the active generation from the kernel and diffing
//!   it against the desired encoding (the kernel, not the saved table, says what is loaded).
//!   Without a saved table (none recorded, or it does not parse) the diff shows entries only.
//! - A fresh data plane drops everything until a state is written, so `apply` writes the state
//!   before it attaches any interface or cgroup.
//! - Workloads are cgroup paths relative to the cgroup the egress programs attach to (`--cgroup`,
//!   default the cgroup v2 mount); each apply resolves them to cgroup ids afresh (a re-created
//!   cgroup has a new id) and writes them into the generation it writes, with the rest.
//! - `diff` also compares the kernel's workload table (cgroup id -> workload class, which the
//!   saved state cannot hold: ids are resolved at apply time) with what apply would write, so a
//!   cgroup created or re-created since the last apply shows as a change, named by its path.
//! - `events` names rules from the saved rule table (as `status` does), re-read when an event
//!   names a rule it does not know (an apply happened meanwhile).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use fw_compiler::ast::{Action, Direction};
use fw_compiler::diff::MapDiff;
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::mapstate::{Capacities, MapState, RuleInfo, WorkloadId};
use fw_compiler::model::HostIdentity;
use fw_loader::enforce::{Enforced, Origin, Target, enforce};
use fw_loader::{Dataplane, Desired, Error as LoaderError};

use crate::render::{self, Format};

#[derive(Args)]
pub struct DataplaneArgs {
    /// Policy files, or folders searched for *.yaml and *.yml.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The host's name (default: this machine's hostname).
    #[arg(long = "host", value_name = "NAME")]
    host: Option<String>,
    /// A host label, `key=value`; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::parse_label)]
    labels: Vec<(String, String)>,
    /// An interface to attach the ingress program to; repeat for more (apply needs at least one).
    #[arg(long = "interface", value_name = "IF")]
    interfaces: Vec<String>,
    /// The cgroup v2 directory the egress programs attach to and workload paths are relative
    /// to (default: the cgroup v2 mount point).
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// The bpffs directory the data plane is pinned under.
    #[arg(long, value_name = "ROOT", default_value = fw_loader::DEFAULT_ROOT)]
    bpffs: PathBuf,
    /// The policy revision to record (default: the first 12 hex digits of the state digest).
    #[arg(long)]
    revision: Option<String>,
}

#[derive(Args)]
pub struct RootArgs {
    /// The bpffs directory the data plane is pinned under.
    #[arg(long, value_name = "ROOT", default_value = fw_loader::DEFAULT_ROOT)]
    bpffs: PathBuf,
}

fn require_root(command: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("fwctl {command} needs root (it loads eBPF programs and pins maps); run it as root");
    }
    Ok(())
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the hostname; give --host")?;
    Ok(name.trim().to_string())
}

/// Compiles the policy for the host the arguments describe; `None` after printing errors.
fn desired(args: &DataplaneArgs) -> Result<Option<MapState>> {
    let Some(loaded) = crate::load_checked(&args.paths) else { return Ok(None) };
    let set = loaded.policy_set.context("no policy set")?;
    let host = HostIdentity {
        name: match &args.host {
            Some(h) => h.clone(),
            None => hostname()?,
        },
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    match fw_compiler::compile::compile(&set.for_host(&host), &Capacities::default()) {
        Ok(state) => Ok(Some(state)),
        Err(errors) => {
            eprint!("{}", render::diagnostics(&errors, &loaded.sources, Format::Human, false));
            eprintln!("policy does not compile for host {}: nothing was changed", host.name);
            Ok(None)
        }
    }
}

/// Whether `path` is a directory on a cgroup v2 file system (a v1 hierarchy, as on hybrid
/// hosts, has directories that look alike but cannot take BPF programs).
fn is_cgroup2(path: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a properly sized, writable statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type as i64 == CGROUP2_SUPER_MAGIC && path.is_dir()
}

/// The encoding without the workload table, which the kernel keys by cgroup id.
fn kernel_view(state: &MapState) -> Encoded {
    let mut e = encode(state);
    e.maps.remove(fw_common::maps::WORKLOADS);
    e
}

fn loader(e: LoaderError) -> anyhow::Error {
    anyhow::Error::new(e)
}

pub fn apply(args: &DataplaneArgs) -> Result<ExitCode> {
    require_root("apply")?;
    if args.interfaces.is_empty() {
        bail!("give at least one --interface");
    }
    let Some(state) = desired(args)? else { return Ok(ExitCode::from(1)) };
    let digest = state.digest();
    let revision = args.revision.clone().unwrap_or_else(|| digest.chars().take(12).collect());
    let saved = serde_json::to_vec(&rule_table(&state))?;
    let encoded = encode(&state);

    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => fw_loader::cgroup2_mount().map_err(loader)?,
    };
    // Checked before anything is opened in the kernel, like the policy.
    if !is_cgroup2(&cgroup) {
        bail!("{} is not a cgroup v2 directory: nothing was changed", cgroup.display());
    }
    let workloads = fw_loader::workloads::resolve(&cgroup, &state.workloads);

    let target = Target {
        root: &args.bpffs,
        caps: &Capacities::default(),
        interfaces: &args.interfaces,
        cgroup: &cgroup,
    };
    let desired = Desired {
        encoded: &encoded,
        workloads: Some(&workloads),
        revision: &revision,
        digest: &digest,
        saved_state: &saved,
    };
    let (dp, done) = enforce(&target, &desired).map_err(loader)?;
    let Enforced { origin, apply: report, egress, attached, detached, .. } = done;

    println!(
        "{} data plane under {} (program {} id {})",
        match &origin {
            Origin::Loaded => "loaded and pinned the",
            Origin::Adopted | Origin::Held => "adopted the",
            Origin::Upgraded(_) => "upgraded the",
        },
        args.bpffs.display(),
        fw_common::programs::INGRESS,
        dp.ingress_program_id().map_err(loader)?
    );
    if let Origin::Upgraded(up) = &origin {
        println!(
            "upgraded abi {} -> {}: {} links swapped in place",
            up.from_abi,
            up.to_abi,
            up.links.len()
        );
    }
    println!(
        "applied revision {revision} (digest {digest}): generation {} -> {}, standby {} written {} deleted, replay {} written {} deleted",
        report.from,
        report.to,
        report.standby.written,
        report.standby.deleted,
        report.replay.written,
        report.replay.deleted
    );
    if report.both_at_once {
        println!(
            "first load: both generations written at once (nothing attached yet, no grace period to wait for)"
        );
    }
    if !report.grown.is_empty() {
        println!("grew the inner maps of generation(s) {:?}", report.grown);
    }
    let timings: Vec<String> = report
        .timings
        .iter()
        .map(|(s, d)| format!("{s} {:.1} ms", d.as_secs_f64() * 1e3))
        .collect();
    println!("timings: {}", timings.join(", "));
    for a in attached {
        println!("attached to {} ({}, link {})", a.interface, a.mode, a.link_id);
    }
    for d in detached {
        println!("detached {}", d.display());
    }
    println!(
        "workloads: {} of {} resolved under {}",
        workloads.len(),
        state.workloads.len(),
        cgroup.display()
    );
    for d in &egress.detached {
        println!("replaced {}", d.display());
    }
    let links: Vec<String> =
        egress.links.iter().map(|l| format!("{} link {}", l.program, l.link_id)).collect();
    println!(
        "egress {} {} ({})",
        if egress.attached { "attached to" } else { "already attached to" },
        egress.cgroup.display(),
        links.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

/// `state` without its prefix and L4 entries: what is saved with a generation (see the module
/// docs). `MapState::diff` of two of these lists rule, default, workload and host changes.
fn rule_table(state: &MapState) -> MapState {
    let mut t = state.clone();
    for d in [&mut t.ingress, &mut t.egress] {
        d.v4.clear();
        d.v6.clear();
        d.l4.clear();
    }
    t
}

/// The saved rule table of the state the active generation holds, by its record.
fn kernel_state(dp: &Dataplane) -> Result<std::result::Result<MapState, String>> {
    let active = dp.active_generation().map_err(loader)?;
    if dp.applied(active).map_err(loader)?.is_none() {
        return Ok(Err(format!("generation {active} has no record")));
    }
    let Some(bytes) = dp.saved_state(active).map_err(loader)? else {
        return Ok(Err("no saved rule table".into()));
    };
    match serde_json::from_slice(&bytes) {
        Ok(s) => Ok(Ok(s)),
        Err(e) => Ok(Err(format!("the saved rule table does not parse: {e}"))),
    }
}

/// Per direction, how many prefix and port entries an entry diff changes (as `render_diff`
/// words it for a full `MapDiff`).
fn render_entry_counts(deltas: &BTreeMap<&'static str, fw_loader::MapDelta>) -> String {
    use fw_common::maps;
    let n = |name: &str| deltas.get(name).map_or(0, fw_loader::MapDelta::len);
    let mut out = String::new();
    for (dir, v4, v6, l4) in [
        ("ingress", maps::INGRESS_V4, maps::INGRESS_V6, maps::INGRESS_L4),
        ("egress", maps::EGRESS_V4, maps::EGRESS_V6, maps::EGRESS_L4),
    ] {
        // Ingress also has the exact L4 table, and the IPv4 chunks are derived, not entries.
        let exact = if dir == "ingress" { n(maps::INGRESS_L4_EXACT) } else { 0 };
        let (prefixes, ports) = (n(v4) + n(v6), n(l4) + exact);
        if prefixes + ports > 0 {
            let _ = writeln!(out, "  {dir}: {prefixes} prefix and {ports} port entries change");
        }
    }
    out
}

fn action(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn rule_line(sign: char, r: &RuleInfo) -> String {
    let who = match &r.name {
        Some(n) => format!("{}/{n}", r.policy),
        None => format!("{}#{}", r.policy, r.index),
    };
    let audit = if r.audit { " [audit]" } else { "" };
    format!(
        "{sign} {} {}{audit} ({who}, {}:{})",
        direction(r.direction),
        r.summary,
        r.location.file,
        r.location.line
    )
}

/// The diff as rules, then what changes besides rules.
pub fn render_diff(d: &MapDiff) -> String {
    let mut out = String::new();
    if let Some((old, new)) = &d.host {
        let _ = writeln!(out, "~ host {} -> {}", old.name, new.name);
    }
    for (_, r) in &d.rules.removed {
        let _ = writeln!(out, "{}", rule_line('-', r));
    }
    for (_, r) in &d.rules.added {
        let _ = writeln!(out, "{}", rule_line('+', r));
    }
    for (_, old, new) in &d.rules.changed {
        if old.summary != new.summary || old.action != new.action || old.audit != new.audit {
            let _ = writeln!(out, "{}", rule_line('-', old));
            let _ = writeln!(out, "{}", rule_line('+', new));
        } else {
            let _ = writeln!(out, "{} (metadata: log, name or location)", rule_line('~', new));
        }
    }
    for (dir, dd) in [(Direction::Ingress, &d.ingress), (Direction::Egress, &d.egress)] {
        if let Some((old, new)) = &dd.defaults {
            let _ = writeln!(
                out,
                "~ {} default {} -> {}",
                direction(dir),
                action(old.verdict),
                action(new.verdict)
            );
        }
        let n = dd.v4.len() + dd.v6.len() + dd.l4.len();
        if n > 0 {
            let _ = writeln!(
                out,
                "  {}: {} prefix and {} port entries change",
                direction(dir),
                dd.v4.len() + dd.v6.len(),
                dd.l4.len()
            );
        }
    }
    out
}

/// One change of the kernel's workload table (cgroup id -> workload class), named by the
/// workload path when one resolves to that cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadChange {
    pub path: Option<String>,
    /// `None` for a desired path whose cgroup does not exist (so nothing enters the table).
    pub cgroup: Option<u64>,
    pub old: Option<u32>,
    pub new: Option<u32>,
}

/// What applying would change in the workload table: `held` is what the kernel's active
/// generation holds; `desired` the new state's paths, which `resolve` turns into cgroup ids as
/// apply does; `old_paths` the applied state's paths when known, to name cgroups the new state
/// no longer lists. With `old_paths` known, paths without a cgroup (not in the table, now or
/// after the apply) are listed too (`cgroup: None`) when they are added, removed or change
/// class, so a policy edit shows before its cgroup exists.
pub fn workload_changes(
    held: &BTreeMap<u64, u32>,
    desired: &BTreeMap<String, WorkloadId>,
    old_paths: Option<&BTreeMap<String, WorkloadId>>,
    resolve: impl Fn(&str) -> Option<u64>,
) -> Vec<WorkloadChange> {
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    let mut want: BTreeMap<u64, u32> = BTreeMap::new();
    let mut unresolved = Vec::new();
    for (path, class) in desired {
        match resolve(path) {
            Some(id) => {
                names.entry(id).or_insert_with(|| path.clone());
                // As `workloads::resolve`: two paths on one cgroup, the lower class wins.
                want.entry(id).and_modify(|c| *c = (*c).min(class.0)).or_insert(class.0);
            }
            None => {
                if let Some(old) = old_paths {
                    let before = old.get(path).map(|c| c.0);
                    if before != Some(class.0) {
                        unresolved.push((path.clone(), before, Some(class.0)));
                    }
                }
            }
        }
    }
    for (path, class) in old_paths.into_iter().flatten() {
        match resolve(path) {
            Some(id) => {
                names.entry(id).or_insert_with(|| path.clone());
            }
            None if !desired.contains_key(path) => {
                unresolved.push((path.clone(), Some(class.0), None));
            }
            None => {}
        }
    }
    let ids: std::collections::BTreeSet<u64> = held.keys().chain(want.keys()).copied().collect();
    let mut out: Vec<WorkloadChange> = ids
        .into_iter()
        .filter_map(|id| {
            let (old, new) = (held.get(&id).copied(), want.get(&id).copied());
            (old != new).then(|| WorkloadChange {
                path: names.get(&id).cloned(),
                cgroup: Some(id),
                old,
                new,
            })
        })
        .collect();
    out.extend(unresolved.into_iter().map(|(path, old, new)| WorkloadChange {
        path: Some(path),
        cgroup: None,
        old,
        new,
    }));
    out
}

/// `+ workload system.slice/app.service (cgroup 1234) -> class 3`, `-` for a removed entry,
/// `~ ... class 2 -> 3` for a changed one.
pub fn render_workload_change(c: &WorkloadChange) -> String {
    let name = c.path.as_deref().unwrap_or("(no workload path names it)");
    let at = match c.cgroup {
        Some(id) => format!("cgroup {id}"),
        None => "no such cgroup: not in the kernel table".to_string(),
    };
    match (c.old, c.new) {
        (None, Some(n)) => format!("+ workload {name} ({at}) -> class {n}"),
        (Some(o), None) => format!("- workload {name} ({at}) -> class {o}"),
        (Some(o), Some(n)) => format!("~ workload {name} ({at}) class {o} -> {n}"),
        (None, None) => format!("  workload {name} ({at})"),
    }
}

/// Exit 0: no change; 1: changes; 2: the diff could not be computed (1 is taken).
pub fn diff(args: &DataplaneArgs) -> Result<ExitCode> {
    match diff_inner(args) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

fn diff_inner(args: &DataplaneArgs) -> Result<ExitCode> {
    require_root("diff")?;
    let Some(state) = desired(args)? else { return Ok(ExitCode::from(2)) };
    let dp = match Dataplane::adopt(&args.bpffs) {
        Ok(dp) => Some(dp),
        Err(LoaderError::NotPinned(_)) => None,
        Err(e) => return Err(loader(e)),
    };
    // Workload paths resolve against the cgroup apply would use: --cgroup, else the one the
    // egress programs are attached to, else the cgroup v2 mount.
    let recorded = match &dp {
        Some(dp) => dp.recorded_cgroup().map_err(loader)?.map(PathBuf::from),
        None => None,
    };
    let cgroup = match args.cgroup.clone().or(recorded) {
        Some(c) => c,
        None => fw_loader::cgroup2_mount().map_err(loader)?,
    };
    let resolve = |path: &str| {
        let one = BTreeMap::from([(path.to_string(), WorkloadId(0))]);
        fw_loader::workloads::resolve(&cgroup, &one).into_keys().next()
    };
    let Some(dp) = dp else {
        println!("nothing is loaded under {}: applying would add every rule", args.bpffs.display());
        let empty = MapState { rules: BTreeMap::new(), ..state.clone() };
        print!("{}", render_diff(&empty.diff(&state)));
        let none = BTreeMap::new();
        for c in workload_changes(&BTreeMap::new(), &state.workloads, Some(&none), resolve) {
            println!("{}", render_workload_change(&c));
        }
        return Ok(ExitCode::from(1));
    };
    let active = dp.active_generation().map_err(loader)?;
    let held_workloads = dp.read_workloads(active).map_err(loader)?;
    let held = dp.read_generation(active).map_err(loader)?;
    let deltas = fw_loader::entry_delta(&held, &kernel_view(&state));
    match kernel_state(&dp)? {
        Ok(old) => {
            let d = old.diff(&rule_table(&state));
            let w =
                workload_changes(&held_workloads, &state.workloads, Some(&old.workloads), resolve);
            if d.is_empty() && deltas.is_empty() && w.is_empty() {
                println!("no changes (digest {})", state.digest());
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}{}", render_diff(&d), render_entry_counts(&deltas));
            for c in &w {
                println!("{}", render_workload_change(c));
            }
            Ok(ExitCode::from(1))
        }
        Err(why) => {
            println!("cannot name rules ({why}); map entries that would change:");
            let w = workload_changes(&held_workloads, &state.workloads, None, resolve);
            if deltas.is_empty() && w.is_empty() {
                println!("no changes");
                return Ok(ExitCode::SUCCESS);
            }
            for (name, d) in deltas {
                println!("  {name}: {} written, {} deleted", d.upsert.len(), d.remove.len());
            }
            for c in &w {
                println!("{}", render_workload_change(c));
            }
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    root: RootArgs,
    /// Ask a running fwd on its status socket instead of reading the kernel.
    #[arg(long, value_name = "PATH", conflicts_with = "bpffs")]
    socket: Option<PathBuf>,
    /// With --socket: `human` or `json` (the document as fwd serves it).
    #[arg(long, value_name = "FORMAT", default_value = "human", value_parser = ["human", "json"])]
    format: String,
}

pub fn status(args: &StatusArgs) -> Result<ExitCode> {
    if let Some(socket) = &args.socket {
        return crate::daemon::status(socket, args.format == "json");
    }
    let args = &args.root;
    require_root("status")?;
    let dp = match Dataplane::adopt(&args.bpffs) {
        Ok(dp) => dp,
        Err(LoaderError::NotPinned(root)) => {
            println!("nothing is loaded under {}", root.display());
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(loader(e)),
    };
    let s = dp.status().map_err(loader)?;
    println!("root {} (abi {})", s.root.display(), s.abi);
    println!("program {} id {}", s.program, s.program_id);
    if s.attachments.is_empty() {
        println!("  not attached");
    }
    for a in &s.attachments {
        println!(
            "  attached to {} ({} mode, link {}, program {})",
            a.interface, a.mode, a.link_id, a.program_id
        );
    }
    if let Some(c) = &s.cgroup {
        println!("cgroup {c}");
    }
    for l in dp.cgroup_attachments().map_err(loader)? {
        println!("  {} link {} program {}", l.program, l.link_id, l.program_id);
    }
    for (g, applied) in s.generations.iter().enumerate() {
        let mark = if g as u32 == s.active_generation { "active " } else { "standby" };
        match applied {
            Some(a) => {
                println!("generation {g} {mark}: revision {} digest {}", a.revision, a.digest)
            }
            None if s.empty.get(g) == Some(&true) => {
                println!("generation {g} {mark}: empty (nothing applied yet)")
            }
            None => println!("generation {g} {mark}: unknown (no record)"),
        }
    }
    // Both holding the same applied state, or both as the loader created them.
    let consistent = s.generations.windows(2).all(|w| w[0].is_some() && w[0] == w[1])
        || s.empty.iter().all(|&e| e);
    println!("generations {}", if consistent { "consistent" } else { "differ" });
    println!("maps (active generation):");
    for m in &s.maps {
        println!("  {:<12} {:>8} / {}", m.name, m.entries, m.capacity);
    }
    let rules = match kernel_state(&dp)? {
        Ok(state) => state.rules,
        Err(why) => {
            println!("rule names unavailable: {why}");
            BTreeMap::new()
        }
    };
    println!("counters:");
    let counters = dp.rule_counters().map_err(loader)?;
    if counters.is_empty() {
        println!("  (none)");
    }
    for (id, c) in counters {
        let name = rules
            .get(&fw_compiler::model::RuleId(id))
            .map(|r| rule_line(' ', r).trim_start().to_string())
            .unwrap_or_else(|| "(unknown rule)".into());
        println!("  rule {id:<6} {:>10} packets {:>12} bytes  {name}", c.packets, c.bytes);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unload(args: &RootArgs) -> Result<ExitCode> {
    require_root("unload")?;
    let removed = unload_at(&args.bpffs)?;
    for p in &removed {
        println!("removed {}", p.display());
    }
    println!("unloaded: {} pins and directories removed", removed.len());
    Ok(ExitCode::SUCCESS)
}

fn unload_at(root: &Path) -> Result<Vec<PathBuf>> {
    match fw_loader::unload_pinned(root) {
        Ok(r) => Ok(r),
        Err(LoaderError::NotPinned(root)) => bail!("nothing is loaded under {}", root.display()),
        Err(e) => Err(loader(e)),
    }
}

#[derive(Args)]
pub struct EventsArgs {
    /// The bpffs directory the data plane is pinned under.
    #[arg(long, value_name = "ROOT", default_value = fw_loader::DEFAULT_ROOT)]
    bpffs: PathBuf,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

/// The saved rule table of the active generation (empty, with a note on stderr, when there is
/// none).
fn saved_rules(dp: &Dataplane) -> Result<BTreeMap<fw_compiler::model::RuleId, RuleInfo>> {
    Ok(match kernel_state(dp)? {
        Ok(state) => state.rules,
        Err(why) => {
            eprintln!("rule names unavailable: {why}");
            BTreeMap::new()
        }
    })
}

/// `CLOCK_REALTIME` minus `CLOCK_MONOTONIC` in nanoseconds: added to a `bpf_ktime_get_ns`
/// timestamp it gives wall-clock time (to within clock adjustments since).
fn boot_offset_ns() -> i128 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    wall - i128::from(fw_loader::conntrack::monotonic_ns())
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn address(family: u8, raw: &[u8; 16]) -> Option<std::net::IpAddr> {
    if family == 4 {
        let [a, b, c, d, ..] = *raw;
        Some(std::net::Ipv4Addr::new(a, b, c, d).into())
    } else if family == 6 {
        Some(std::net::Ipv6Addr::from(*raw).into())
    } else {
        None
    }
}

fn endpoint(family: u8, raw: &[u8; 16], port: u16, with_port: bool) -> String {
    let Some(ip) = address(family, raw) else { return "?".into() };
    match (ip, with_port) {
        (std::net::IpAddr::V6(v6), true) => format!("[{v6}]:{port}"),
        (ip, true) => format!("{ip}:{port}"),
        (ip, false) => ip.to_string(),
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        p => format!("proto-{p}"),
    }
}

/// One line for one event.
pub fn render_event(
    e: &fw_common::events::Event,
    rules: &BTreeMap<fw_compiler::model::RuleId, RuleInfo>,
    offset_ns: i128,
) -> String {
    use fw_common::events::{EVENT_ALLOW, EVENT_AUDIT_DENY, EVENT_DENY};
    let wall_ns = i128::from(e.timestamp_ns) + offset_ns;
    let when = rfc3339(i64::try_from(wall_ns.div_euclid(1_000_000_000)).unwrap_or(0));
    let dir =
        if u32::from(e.direction) == fw_common::DIRECTION_EGRESS { "egress" } else { "ingress" };
    let verdict = match e.verdict {
        EVENT_ALLOW => "allow",
        EVENT_DENY => "deny",
        EVENT_AUDIT_DENY => "audit-deny",
        _ => "unknown",
    };
    let ports = matches!(e.proto, 6 | 17);
    let proto = if ports {
        proto_name(e.proto)
    } else {
        format!("{} type {}", proto_name(e.proto), e.dst_port)
    };
    // On egress the local address is not chosen yet when the program runs.
    let src = if e.src == [0; 16] && e.src_port == 0 {
        "local".to_string()
    } else {
        endpoint(e.family, &e.src, e.src_port, ports)
    };
    let dst = endpoint(e.family, &e.dst, e.dst_port, ports);
    let rule = if e.rule == 0 {
        "default".to_string()
    } else {
        match rules.get(&fw_compiler::model::RuleId(e.rule)) {
            Some(r) => {
                let who = match &r.name {
                    Some(n) => format!("{}/{n}", r.policy),
                    None => format!("{}#{}", r.policy, r.index),
                };
                format!("rule {who} ({})", r.location)
            }
            None => format!("rule {} (unknown)", e.rule),
        }
    };
    format!("{when} {dir} {verdict} {proto} {src} -> {dst} {rule}")
}

pub fn events(args: &EventsArgs) -> Result<ExitCode> {
    require_root("events")?;
    let mut dp = match Dataplane::adopt(&args.bpffs) {
        Ok(dp) => dp,
        Err(LoaderError::NotPinned(root)) => bail!("nothing is loaded under {}", root.display()),
        Err(e) => return Err(loader(e)),
    };
    let mut rules = saved_rules(&dp)?;
    let mut reader = dp.events().map_err(loader)?;
    let offset = boot_offset_ns();
    let mut seen = 0u64;
    if args.count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let batch = reader.wait(std::time::Duration::from_millis(500)).map_err(loader)?;
        for e in batch {
            if e.rule != 0 && !rules.contains_key(&fw_compiler::model::RuleId(e.rule)) {
                rules = saved_rules(&dp)?;
            }
            println!("{}", render_event(&e, &rules, offset));
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_table_changes_are_named_by_path_and_cgroup() {
        let ids = BTreeMap::from([
            ("a".to_string(), 11u64),
            ("b".to_string(), 22),
            ("c".to_string(), 33),
        ]);
        let resolve = |p: &str| ids.get(p).copied();
        let w = |pairs: &[(&str, u32)]| -> BTreeMap<String, WorkloadId> {
            pairs.iter().map(|(p, c)| (p.to_string(), WorkloadId(*c))).collect()
        };
        let old = w(&[("a", 1), ("b", 2), ("gone", 4)]);
        let new = w(&[("a", 1), ("b", 5), ("c", 3), ("later", 6)]);
        // The kernel holds a (unchanged), b with its old class, and a cgroup no path names.
        let held = BTreeMap::from([(11, 1), (22, 2), (99, 7)]);
        let lines: Vec<String> = workload_changes(&held, &new, Some(&old), resolve)
            .iter()
            .map(render_workload_change)
            .collect();
        assert_eq!(
            lines,
            [
                "~ workload b (cgroup 22) class 2 -> 5",
                "+ workload c (cgroup 33) -> class 3",
                "- workload (no workload path names it) (cgroup 99) -> class 7",
                "+ workload later (no such cgroup: not in the kernel table) -> class 6",
                "- workload gone (no such cgroup: not in the kernel table) -> class 4",
            ]
        );
        // Same paths, same classes, same cgroups: nothing.
        let table = BTreeMap::from([(11, 1), (22, 5), (33, 3)]);
        assert_eq!(workload_changes(&table, &new, Some(&new), resolve), vec![]);
        // Unknown applied state: unresolved paths are not table changes.
        assert_eq!(workload_changes(&table, &new, None, resolve), vec![]);
    }

    #[test]
    fn epoch_seconds_format_as_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_705_200), "2026-11-26T15:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn an_event_names_its_rule_and_location() {
        let e = fw_common::events::Event {
            timestamp_ns: 5_000_000_000,
            rule: 7,
            direction: fw_common::DIRECTION_INGRESS as u8,
            verdict: fw_common::events::EVENT_DENY,
            proto: 6,
            family: 4,
            src_port: 51000,
            dst_port: 22,
            src: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        let rule = RuleInfo {
            direction: Direction::Ingress,
            policy: "base".into(),
            index: 0,
            name: Some("blocklist-in".into()),
            action: Action::Deny,
            audit: false,
            log: true,
            location: fw_compiler::source::Location {
                file: "policies/base.yaml".into(),
                line: 31,
                column: 7,
            },
            summary: String::new(),
            rank: 0,
        };
        let rules = [(fw_compiler::model::RuleId(7), rule)].into();
        let offset = 1_795_705_200i128 * 1_000_000_000 - 5_000_000_000;
        assert_eq!(
            render_event(&e, &rules, offset),
            "2026-11-26T15:00:00Z ingress deny tcp 192.0.2.1:51000 -> 10.0.0.1:22 \
             rule base/blocklist-in (policies/base.yaml:31:7)"
        );
        let default = fw_common::events::Event { rule: 0, ..e };
        assert!(render_event(&default, &rules, offset).ends_with(" default"));
        let audit = fw_common::events::Event { verdict: fw_common::events::EVENT_AUDIT_DENY, ..e };
        assert!(render_event(&audit, &rules, offset).contains(" audit-deny tcp "));
    }
}
