//! A deterministic generator of large fw/v1 policy sets, as YAML text.
//!
//! The benchmark needs inputs at sizes nobody would write by hand (100k rules, a million
//! prefixes), and they must be the same on every run and every machine so figures can be
//! compared over time. So this is a fixed-seed generator (SplitMix64, written out here rather
//! than pulled from `rand`, whose streams may change between versions) that writes the text a
//! user would write: several files, block-style documents, flow lists, a mix of IPv4 and IPv6,
//! sets that include other sets, port ranges, audit policies, workloads and host selectors.
//!
//! It produces text, not AST values, on purpose: the benchmark measures parsing and lowering
//! too, and the fuzz target and tests can reuse it without depending on any compiler type.
//! Everything generated is meant to be valid; the benchmark fails loudly if it is not.
//!
//! Shapes (rules series, `rules_corpus`): four to twelve rules per policy, 60% ingress; one
//! AddressSet per twenty rules with one to eight entries, a fifth of them including earlier sets
//! (earlier only, so there is never a cycle) and about one in seven with an `except`. Addresses
//! are three quarters IPv4 (10/8, 172.16/12, 192.168/16 and public space), mostly hosts and
//! small subnets, a few /16-/23, never a whole fleet range. Peers: three quarters set references,
//! the rest inline CIDRs; about 5% of rules have no peer restriction (`any` or absent: ICMP rules
//! and public services on well-known ports), which puts them into every address class. Ports:
//! well-known ones, random high ports, and ranges; a fifth of egress rules name one or two
//! workloads from a pool of n/100 cgroup paths (at most 400). 5% of policies are in audit mode,
//! 15% set defaults; 40% select every host, the rest select by label and/or name glob, and the
//! benchmark host (`web-1`, `role: web`) is selected by about 85% of them.
//!
//! The prefix series (`prefixes_corpus`) puts nearly all of its size into a blocklist split over
//! 50k-prefix sets (85% IPv4: /32, /24 and a few larger; 15% IPv6), with a handful of ordinary
//! rules and sets around it, one of them in audit mode, one with a workload.

// Each user of this module (bench, fuzz target, tests) uses a different part of it.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The seed every figure in `docs/benchmarks.md` was produced with.
pub const SEED: u64 = 0x5eed_f00d_2024_0001;

/// SplitMix64: tiny, fast, good enough for shaping test data, and fixed forever.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-high (no modulo bias worth mentioning here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One generated policy set.
#[derive(Clone, Debug)]
pub struct Generated {
    /// (file name, YAML text), in the order a loader would read a folder.
    pub files: Vec<(String, String)>,
    /// Rules written (ingress and egress, every policy).
    pub rules: usize,
    /// Address entries written into AddressSets and rules (CIDRs and bare IPs).
    pub prefixes: usize,
    pub policies: usize,
    pub sets: usize,
}

impl Generated {
    pub fn bytes(&self) -> usize {
        self.files.iter().map(|(_, t)| t.len()).sum()
    }
}

/// The host the benchmark compiles for: most generated policies select it.
pub const BENCH_HOST_NAME: &str = "web-1";
pub const BENCH_HOST_LABELS: &[(&str, &str)] = &[("role", "web"), ("zone", "z1")];

const WELL_KNOWN_PORTS: &[u16] =
    &[22, 25, 53, 80, 123, 443, 3306, 5432, 6379, 8080, 8443, 9090, 9100, 11211, 27017];
const PUBLIC_PORTS: &[u16] = &[22, 53, 80, 123, 443, 8443];

/// Writes documents into files of at most `per_file` documents each.
struct Files {
    prefix: &'static str,
    per_file: usize,
    in_current: usize,
    current: String,
    done: Vec<(String, String)>,
}

impl Files {
    fn new(prefix: &'static str, per_file: usize) -> Self {
        Self { prefix, per_file, in_current: 0, current: String::new(), done: Vec::new() }
    }

    /// Starts a document and returns the buffer to write it into.
    fn doc(&mut self) -> &mut String {
        if self.in_current == self.per_file {
            self.flush();
        }
        if self.in_current > 0 {
            self.current.push_str("---\n");
        }
        self.in_current += 1;
        &mut self.current
    }

    fn flush(&mut self) {
        if self.in_current > 0 {
            let name = format!("{}-{:04}.yaml", self.prefix, self.done.len());
            self.done.push((name, std::mem::take(&mut self.current)));
            self.in_current = 0;
        }
    }

    fn finish(mut self) -> Vec<(String, String)> {
        self.flush();
        self.done
    }
}

fn v4_mask(len: u32) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

fn v6_mask(len: u32) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len) }
}

/// An IPv4 CIDR with no host bits set. A /32 is sometimes written as a bare IP, as users do.
fn v4_cidr(rng: &mut Rng, base: u32, base_len: u32, len: u32, out: &mut String) {
    let addr = (base & v4_mask(base_len)) | (rng.next_u64() as u32 & !v4_mask(base_len));
    let addr = Ipv4Addr::from(addr & v4_mask(len));
    if len == 32 && rng.chance(50) {
        let _ = write!(out, "{addr}");
    } else {
        let _ = write!(out, "{addr}/{len}");
    }
}

/// An IPv6 CIDR with no host bits set. Always written with its length: a bare address ending
/// in `::` would end a plain scalar on `:` inside a YAML flow list.
fn v6_cidr(rng: &mut Rng, base: u128, base_len: u32, len: u32, out: &mut String) {
    let random = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    let addr = (base & v6_mask(base_len)) | (random & !v6_mask(base_len));
    let _ = write!(out, "{}/{len}", Ipv6Addr::from(addr & v6_mask(len)));
}

/// The address ranges the fleet lives in: internal v4, some public v4, documentation and
/// unique-local v6.
fn fleet_v4(rng: &mut Rng) -> (u32, u32) {
    match rng.below(4) {
        0 => (u32::from(Ipv4Addr::new(10, 0, 0, 0)), 8),
        1 => (u32::from(Ipv4Addr::new(172, 16, 0, 0)), 12),
        2 => (u32::from(Ipv4Addr::new(192, 168, 0, 0)), 16),
        // Anywhere public-looking: 32.0.0.0/3.
        _ => (u32::from(Ipv4Addr::new(32, 0, 0, 0)), 3),
    }
}

fn fleet_v6(rng: &mut Rng) -> (u128, u32) {
    if rng.chance(50) {
        (u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)), 32)
    } else {
        (u128::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)), 8)
    }
}

/// One address entry in a realistic length: mostly hosts and small subnets, a few larger
/// blocks, never a whole fleet range (a `192.168.0.0/16` drawn again and again would put
/// every rule that names it into every class below it, which no real policy set does).
fn address(rng: &mut Rng, out: &mut String) {
    if rng.chance(75) {
        let (base, base_len) = fleet_v4(rng);
        let len = match rng.below(100) {
            0..45 => 32,
            45..55 => rng.range(29, 31) as u32,
            55..70 => rng.range(25, 28) as u32,
            70..90 => 24,
            90..97 => rng.range(20, 23) as u32,
            _ => rng.range(16, 19) as u32,
        };
        v4_cidr(rng, base, base_len, len.max(base_len + 8), out);
    } else {
        let (base, base_len) = fleet_v6(rng);
        let len = *rng.pick(&[48, 56, 64, 64, 64, 96, 112, 128, 128]);
        v6_cidr(rng, base, base_len, len, out);
    }
}

fn set_name(i: usize) -> String {
    format!("net-{i:05}")
}

fn workload(rng: &mut Rng, pool: usize) -> String {
    let i = rng.below(pool as u64);
    match i % 3 {
        0 => format!("system.slice/svc-{i}.service"),
        1 => format!("kubepods.slice/kubepods-burstable.slice/pod-{i}"),
        _ => format!("user.slice/user-{}.slice/session-{i}.scope", 1000 + i % 7),
    }
}

fn ports(rng: &mut Rng, out: &mut String, public: bool) {
    let count = *rng.pick(&[1, 1, 1, 2, 2, 3, 4]);
    out.push_str("      ports: [");
    for k in 0..count {
        if k > 0 {
            out.push_str(", ");
        }
        let roll = rng.below(100);
        if public || roll < 60 {
            let pool = if public { PUBLIC_PORTS } else { WELL_KNOWN_PORTS };
            let _ = write!(out, "{}", rng.pick(pool));
        } else if roll < 90 {
            let _ = write!(out, "{}", rng.range(1024, 65535));
        } else {
            let start = rng.range(1024, 60000);
            let end = start + rng.range(1, 1000);
            let _ = write!(out, "{start}-{end}");
        }
    }
    out.push_str("]\n");
}

/// A rules-series policy set with exactly `n_rules` rules.
pub fn rules_corpus(n_rules: usize, seed: u64) -> Generated {
    rules_corpus_with(n_rules, seed, true)
}

/// `rules_corpus`, optionally without `workloads` on egress rules (the same text otherwise:
/// the random stream is consumed the same way), to tell what workloads cost.
pub fn rules_corpus_with(n_rules: usize, seed: u64, workloads: bool) -> Generated {
    let mut rng = Rng::new(seed ^ n_rules as u64);
    let n_sets = (n_rules / 20).max(8);
    let workload_pool = (n_rules / 100).clamp(4, 400);
    let mut prefixes = 0usize;

    // Address sets; set i may include sets below i only, so there is no cycle.
    let mut sets = Files::new("sets", 250);
    for i in 0..n_sets {
        let doc = sets.doc();
        let _ = write!(
            doc,
            "apiVersion: fw/v1\nkind: AddressSet\nmetadata:\n  name: {}\n",
            set_name(i)
        );
        if rng.chance(10) {
            let _ = writeln!(doc, "  description: generated set {i}");
        }
        doc.push_str("spec:\n  addresses: [");
        let count = rng.range(1, 8);
        let mut first_v4: Option<(u32, u32)> = None;
        for k in 0..count {
            if k > 0 {
                doc.push_str(", ");
            }
            if i > 0 && k < 2 && rng.chance(20) {
                let _ = write!(doc, "{{set: {}}}", set_name(rng.below(i as u64) as usize));
                continue;
            }
            if first_v4.is_none() && rng.chance(60) {
                // Remember one v4 subnet so an `except` can carve a piece out of it.
                let len = *rng.pick(&[20, 22, 24, 24, 26]);
                let base = ((rng.next_u64() as u32) & v4_mask(len) & 0x00ff_ffff) | 0x0a00_0000;
                let _ = write!(doc, "{}/{len}", Ipv4Addr::from(base));
                first_v4 = Some((base, len));
            } else {
                address(&mut rng, doc);
            }
            prefixes += 1;
        }
        doc.push_str("]\n");
        if let Some((base, len)) = first_v4
            && rng.chance(25)
        {
            let sub = len + 4;
            let piece = base | ((rng.next_u64() as u32) & !v4_mask(len) & v4_mask(sub));
            let _ = writeln!(doc, "  except: [{}/{sub}]", Ipv4Addr::from(piece));
            prefixes += 1;
        }
    }

    let mut policies = Files::new("policies", 100);
    let mut written = 0usize;
    let mut n_policies = 0usize;
    while written < n_rules {
        let p = n_policies;
        n_policies += 1;
        let n_here = (rng.range(4, 12) as usize).min(n_rules - written);
        written += n_here;
        let doc = policies.doc();
        let _ =
            write!(doc, "apiVersion: fw/v1\nkind: Policy\nmetadata:\n  name: svc-{p:05}\nspec:\n");
        match rng.below(100) {
            0..40 => {}
            40..70 => doc.push_str("  hosts: {labels: {role: web}}\n"),
            70..85 => doc.push_str("  hosts: {labels: {role: db}, names: [\"db-*\"]}\n"),
            _ => doc.push_str("  hosts: {names: [\"web-*\", \"edge-?\"]}\n"),
        }
        if rng.chance(5) {
            doc.push_str("  mode: audit\n");
        }
        match rng.below(100) {
            0..10 => doc.push_str("  defaults: {ingress: deny}\n"),
            10..13 => doc.push_str("  defaults: {ingress: deny, egress: allow}\n"),
            13..15 => doc.push_str("  defaults: {egress: deny}\n"),
            _ => {}
        }
        let n_ingress = (n_here * 6).div_ceil(10);
        for (direction, range) in [("ingress", 0..n_ingress), ("egress", n_ingress..n_here)] {
            if range.is_empty() {
                continue;
            }
            let _ = writeln!(doc, "  {direction}:");
            for r in range {
                let pool = workloads.then_some(workload_pool);
                prefixes += rule(&mut rng, doc, direction, r, n_sets, pool);
            }
        }
    }

    let mut files = sets.finish();
    files.extend(policies.finish());
    Generated { files, rules: n_rules, prefixes, policies: n_policies, sets: n_sets }
}

/// Writes one rule; returns how many address entries it wrote inline. `workloads`: the size
/// of the pool of cgroup paths, `None` to write no `workloads` at all.
fn rule(
    rng: &mut Rng,
    doc: &mut String,
    direction: &str,
    index: usize,
    n_sets: usize,
    workloads: Option<usize>,
) -> usize {
    let mut prefixes = 0;
    if rng.chance(70) {
        let _ = writeln!(doc, "    - name: r{index}");
        doc.push_str("      action: ");
    } else {
        doc.push_str("    - action: ");
    }
    doc.push_str(if rng.chance(20) { "deny\n" } else { "allow\n" });
    let peer_key = if direction == "ingress" { "from" } else { "to" };
    let proto = match rng.below(100) {
        0..55 => "tcp",
        55..75 => "udp",
        75..80 => "icmp",
        80..85 => "icmpv6",
        _ => "any",
    };
    let roll = rng.below(100);
    let public = matches!(proto, "tcp" | "udp") && roll >= 97;
    match proto {
        // ICMP rules name addresses of their own family only (a v6-only peer list with `icmp`
        // is an error), so they take inline CIDRs or nothing.
        "icmp" | "icmpv6" => {
            if roll < 70 {
                let _ = write!(doc, "      {peer_key}: [");
                if proto == "icmp" {
                    let (base, base_len) = fleet_v4(rng);
                    v4_cidr(rng, base, base_len, 24.max(base_len), doc);
                } else {
                    let (base, base_len) = fleet_v6(rng);
                    v6_cidr(rng, base, base_len, 64, doc);
                }
                doc.push_str("]\n");
                prefixes += 1;
            }
        }
        _ if public => {
            // `any` written out, or left absent (absent means any).
            if rng.chance(50) {
                let _ = writeln!(doc, "      {peer_key}: [any]");
            }
        }
        _ if roll < 75 => {
            let _ = write!(
                doc,
                "      {peer_key}: [{{set: {}}}",
                set_name(rng.below(n_sets as u64) as usize)
            );
            if rng.chance(25) {
                let _ = write!(doc, ", {{set: {}}}", set_name(rng.below(n_sets as u64) as usize));
            }
            doc.push_str("]\n");
        }
        _ => {
            let _ = write!(doc, "      {peer_key}: [");
            for k in 0..rng.range(1, 3) {
                if k > 0 {
                    doc.push_str(", ");
                }
                address(rng, doc);
                prefixes += 1;
            }
            doc.push_str("]\n");
        }
    }
    let _ = writeln!(doc, "      proto: {proto}");
    match proto {
        "tcp" | "udp" => ports(rng, doc, public),
        "icmp" if rng.chance(60) => doc.push_str(rng.pick::<&str>(&[
            "      icmp: [echo-request]\n",
            "      icmp: [8, 0]\n",
            "      icmp: [echo-request, 3, 11]\n",
        ])),
        "icmpv6" if rng.chance(60) => doc.push_str(rng.pick::<&str>(&[
            "      icmp: [echo-request]\n",
            "      icmp: [128, 129]\n",
            "      icmp: [echo-request, 1, 2]\n",
        ])),
        _ => {}
    }
    if rng.chance(10) {
        doc.push_str("      log: true\n");
    }
    if direction == "egress" && rng.chance(20) {
        // Drawn even when not written, so both variants consume the random stream alike and
        // differ only in the `workloads` lines.
        let pool = workloads.unwrap_or(1);
        let mut paths = vec![workload(rng, pool)];
        if rng.chance(30) {
            paths.push(workload(rng, pool));
        }
        if workloads.is_some() {
            let _ = writeln!(doc, "      workloads: [{}]", paths.join(", "));
        }
    }
    prefixes
}

/// Prefixes in one blocklist chunk (one set, one file).
const CHUNK: usize = 50_000;

/// A prefix-series policy set: about `n_prefixes` addresses, nearly all in a blocklist, with
/// about twenty rules.
pub fn prefixes_corpus(n_prefixes: usize, seed: u64) -> Generated {
    let mut rng = Rng::new(seed ^ (n_prefixes as u64).rotate_left(32));
    let mut files = Vec::new();
    let mut prefixes = 0usize;
    let mut chunk_names = Vec::new();
    let big = n_prefixes.saturating_sub(200);
    let chunks = big.div_ceil(CHUNK).max(1);
    for c in 0..chunks {
        let here = (big - c * CHUNK).min(CHUNK);
        let name = format!("blocklist-{c:03}");
        let mut text = String::with_capacity(here * 24 + 128);
        let _ = write!(
            text,
            "apiVersion: fw/v1\nkind: AddressSet\nmetadata:\n  name: {name}\n  description: feed chunk {c}\nspec:\n  addresses:\n"
        );
        for _ in 0..here {
            text.push_str("    - ");
            if rng.chance(85) {
                // Public v4 space (1.0.0.0 up to 223.255.255.255): single hosts, some /24s and
                // a few larger blocks, as threat feeds look.
                let len = match rng.below(100) {
                    0..70 => 32,
                    70..90 => 24,
                    _ => rng.range(16, 23) as u32,
                };
                let base = rng.range(0x0100_0000, 0xdfff_ffff) as u32;
                let addr = Ipv4Addr::from(base & v4_mask(len));
                let _ = write!(text, "{addr}/{len}");
            } else {
                let len = *rng.pick(&[32, 40, 48, 48, 56, 64, 128]);
                v6_cidr(&mut rng, 0x2000_u128 << 112, 3, len, &mut text);
            }
            text.push('\n');
        }
        prefixes += here;
        files.push((format!("feeds/{name}.yaml"), text));
        chunk_names.push(name);
    }

    let mut sets = String::new();
    let _ = write!(
        sets,
        "apiVersion: fw/v1\nkind: AddressSet\nmetadata:\n  name: blocklist\nspec:\n  addresses: ["
    );
    for (i, name) in chunk_names.iter().enumerate() {
        if i > 0 {
            sets.push_str(", ");
        }
        let _ = write!(sets, "{{set: {name}}}");
    }
    // Our own ranges are never blocked, whatever the feed says.
    sets.push_str("]\n  except: [10.0.0.0/8, 2001:db8::/32]\n");
    prefixes += 2;
    for (name, count) in [("allowlist", 150), ("partners", 30), ("monitoring", 20)] {
        let _ = write!(
            sets,
            "---\napiVersion: fw/v1\nkind: AddressSet\nmetadata:\n  name: {name}\nspec:\n  addresses: ["
        );
        for k in 0..count {
            if k > 0 {
                sets.push_str(", ");
            }
            address(&mut rng, &mut sets);
        }
        sets.push_str("]\n");
        prefixes += count;
    }
    files.push(("sets.yaml".to_string(), sets));

    let policies = "\
apiVersion: fw/v1
kind: Policy
metadata:
  name: blocklist
spec:
  ingress:
    - {name: feed-in, action: deny, from: [{set: blocklist}], log: true}
  egress:
    - {name: feed-out, action: deny, to: [{set: blocklist}], log: true}
---
apiVersion: fw/v1
kind: Policy
metadata:
  name: base
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: ssh, action: allow, from: [{set: allowlist}], proto: tcp, ports: [22]}
    - {name: metrics, action: allow, from: [{set: monitoring}], proto: tcp, ports: [9100, 9090-9099]}
    - {name: partners-api, action: allow, from: [{set: partners}], proto: tcp, ports: [8443]}
    - {name: ping, action: allow, proto: icmp, icmp: [echo-request]}
    - {name: ping6, action: allow, proto: icmpv6, icmp: [echo-request]}
    - {name: dns, action: allow, from: [{set: allowlist}], proto: udp, ports: [53]}
  egress:
    - {name: dns-out, action: allow, to: [10.0.0.53, 10.0.0.54], proto: udp, ports: [53]}
    - {name: smtp, action: deny, to: [any], proto: tcp, ports: [25]}
---
apiVersion: fw/v1
kind: Policy
metadata:
  name: web
spec:
  hosts: {labels: {role: web}}
  ingress:
    - {name: https, action: allow, from: [any], proto: tcp, ports: [80, 443]}
    - {name: quic, action: allow, proto: udp, ports: [443]}
    - {name: app, action: allow, from: [{set: partners}], proto: tcp, ports: [8000-8100]}
  egress:
    - {name: db, action: allow, to: [10.0.5.0/24], proto: tcp, ports: [5432], workloads: [system.slice/app.service]}
    - {name: cache, action: allow, to: [10.0.6.0/24, fd00:6::/64], proto: tcp, ports: [6379]}
---
apiVersion: fw/v1
kind: Policy
metadata:
  name: feed-trial
spec:
  mode: audit
  egress:
    - {name: partners-only-8443, action: deny, to: [{set: partners}], proto: tcp, ports: [8000-8999]}
";
    files.push(("policies.yaml".to_string(), policies.to_string()));
    // 16 rules; 5 inline addresses in them.
    Generated { files, rules: 16, prefixes: prefixes + 5, policies: 4, sets: chunks + 4 }
}
