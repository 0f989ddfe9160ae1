//! Linking documents into a policy set, and selecting the policy of one host.
//!
//! `lower` checks each document on its own; everything that needs more than one document
//! happens here: names unique per kind, set references that exist and do not form cycles, sets
//! that are not empty once their excepts are removed, rules whose addresses cannot meet their
//! protocol, host selectors that no tested host matches.
//!
//! Resolution is done once for the whole set, not per host: sets are linked into shared
//! `Arc`s, every rule of every policy gets its id and location here, and `for_host` only picks
//! policies and clones rules. That is also what makes rule ids independent of the host: they
//! are assigned over all rules of all policies, so the same rule has the same id in every
//! host's compile (and `ids` keeps them stable when other policies come and go).
//!
//! Hostile input: the set graph is walked iteratively, and nesting of set references is
//! capped at [`MAX_SET_DEPTH`], because later stages (the evaluator's `contains`, dropping the
//! `Arc`s) recurse along it. Address arithmetic is done on sorted ranges in linear passes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;

use crate::ast::{self, Action, AddressItem, Direction, Document, Mode, Proto};
use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::ids;
use crate::model::{
    AddrTerm, DirectionDefault, Flow, FlowState, HostIdentity, HostPolicy, ResolvedRule,
    ResolvedSet, RuleId,
};
use crate::source::{SourceMap, Sp, Span};

/// How deeply AddressSets may include each other: a set of plain addresses has depth 1, a set
/// that includes it depth 2, and so on. Real policies use a few levels; the cap keeps the
/// recursion of later stages bounded.
pub const MAX_SET_DEPTH: usize = 16;

/// A checked, linked policy set: everything needed to build any host's policy.
#[derive(Clone, Debug)]
pub struct PolicySet {
    /// Every AddressSet, linked.
    pub sets: BTreeMap<String, Arc<ResolvedSet>>,
    /// Sorted by name.
    pub policies: Vec<ast::Policy>,
    /// Sorted by name.
    pub tests: Vec<ast::PolicyTest>,
    /// The resolved rules of each policy, parallel to `policies`, in (direction, index) order.
    rules: Vec<Vec<ResolvedRule>>,
}

impl PolicySet {
    /// The rules and defaults that apply to one host.
    pub fn for_host(&self, host: &HostIdentity) -> HostPolicy {
        let mut out = HostPolicy {
            host: host.clone(),
            rules: Vec::new(),
            ingress_default: DirectionDefault::default(),
            egress_default: DirectionDefault::default(),
            policies: Vec::new(),
        };
        // `policies` is sorted by name and each policy's rules by (direction, index), so the
        // concatenation is in (policy, direction, index) order.
        let selected: Vec<(&ast::Policy, &Vec<ResolvedRule>)> = self
            .policies
            .iter()
            .zip(&self.rules)
            .filter(|(p, _)| selects(p.hosts.as_ref(), host))
            .collect();
        // Sized once: the rules are large, and growing by doubling would copy them again.
        out.rules.reserve_exact(selected.iter().map(|(_, rules)| rules.len()).sum());
        for (policy, rules) in &selected {
            out.policies.push(policy.metadata.name.value.clone());
            out.rules.extend(rules.iter().cloned());
        }
        let policies: Vec<&ast::Policy> = selected.iter().map(|(p, _)| *p).collect();
        out.ingress_default = direction_default(&policies, Direction::Ingress);
        out.egress_default = direction_default(&policies, Direction::Egress);
        out
    }

    /// The distinct hosts that the PolicyTests describe, sorted.
    pub fn test_hosts(&self) -> Vec<HostIdentity> {
        let hosts: BTreeSet<HostIdentity> = self.tests.iter().map(host_of_test).collect();
        hosts.into_iter().collect()
    }

    /// All resolved rules of one policy, in (direction, index) order; `None` for an unknown
    /// policy. Independent of any host.
    pub fn policy_rules(&self, policy: &str) -> Option<&[ResolvedRule]> {
        let i = self.policies.iter().position(|p| p.metadata.name.value == policy)?;
        self.rules.get(i).map(Vec::as_slice)
    }
}

/// Semantics rule 3, per `DirectionDefault`'s docs. `policies` are the selected ones, sorted
/// by name, so "first" is by name.
fn direction_default(policies: &[&ast::Policy], direction: Direction) -> DirectionDefault {
    let denying: Vec<&ast::Policy> = policies
        .iter()
        .copied()
        .filter(|p| p.defaults.get(direction).is_some_and(|a| a.value == Action::Deny))
        .collect();
    let name = |p: &ast::Policy| p.metadata.name.value.clone();
    let first_enforcing = denying.iter().find(|p| p.mode == Mode::Enforce).map(|p| name(p));
    let first_any = denying.first().map(|p| name(p));
    DirectionDefault {
        verdict: if first_enforcing.is_some() { Action::Deny } else { Action::Allow },
        audit: if first_any.is_some() { Action::Deny } else { Action::Allow },
        audit_policy: first_enforcing.clone().or(first_any),
        verdict_policy: first_enforcing,
    }
}

/// Whether a policy with this `hosts` selector applies to the host: every label present with
/// the same value, and, when names are given, one of the globs matches the host name.
pub fn selects(selector: Option<&ast::HostSelector>, host: &HostIdentity) -> bool {
    let Some(sel) = selector else { return true };
    let labels_ok = sel.labels.iter().all(|(k, v)| host.labels.get(k) == Some(&v.value));
    let names_ok = sel.names.is_empty() || sel.names.iter().any(|g| glob_matches(g, &host.name));
    labels_ok && names_ok
}

/// Shell-style glob match of a whole name: `*` any run of characters (also none), `?` one
/// character, `[abc]`, `[a-z]`, `[!a]` one character in (or not in) a class. A `[` without a
/// closing `]` is an ordinary character. No regex: the language is tiny and this keeps
/// matching at most O(pattern × name) and obviously terminating.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // The last `*` seen: the pattern position after it, and the name position it resumes at.
    // Backtracking only to the last star is enough for globs (a classic result), so this is
    // O(pattern * name) at worst.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                pi += 1;
                star = Some((pi, ni));
                continue;
            }
            Some(_) => {
                let (ok, width) = match_one(&p, pi, n[ni]);
                if ok {
                    pi += width;
                    ni += 1;
                    continue;
                }
            }
            None => {}
        }
        match star {
            Some((sp, sn)) => {
                // Let the star eat one more character and retry.
                pi = sp;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == '*')
}

/// Matches one pattern token (not `*`) at `pi` against `c`: whether it matched and how many
/// pattern characters the token spans.
fn match_one(p: &[char], pi: usize, c: char) -> (bool, usize) {
    match p.get(pi) {
        Some('?') => (true, 1),
        Some('[') => {
            let negated = p.get(pi + 1) == Some(&'!');
            let first = pi + 1 + usize::from(negated);
            // A `]` right after `[` or `[!` is a member; the class ends at the next one.
            let close = p.iter().skip(first + 1).position(|&x| x == ']').map(|k| k + first + 1);
            match close {
                Some(close) => {
                    let members = p.get(first..close).unwrap_or(&[]);
                    (class_contains(members, c) != negated, close - pi + 1)
                }
                None => (c == '[', 1),
            }
        }
        Some(&x) => (x == c, 1),
        None => (false, 1),
    }
}

fn class_contains(members: &[char], c: char) -> bool {
    let mut i = 0;
    while i < members.len() {
        match (members.get(i), members.get(i + 1), members.get(i + 2)) {
            (Some(&lo), Some('-'), Some(&hi)) => {
                if lo <= c && c <= hi {
                    return true;
                }
                i += 3;
            }
            (Some(&x), _, _) => {
                if x == c {
                    return true;
                }
                i += 1;
            }
            _ => break,
        }
    }
    false
}

/// The host a PolicyTest describes.
pub fn host_of_test(t: &ast::PolicyTest) -> HostIdentity {
    HostIdentity { name: t.host.name.value.clone(), labels: t.host.labels.clone() }
}

/// The protocol number given to a test case whose proto is `any`: 255 is reserved by IANA, so
/// it is a protocol no rule names. Such a case therefore matches only rules with `proto: any`
/// (which is what "any protocol" can promise).
pub const ANY_PROTO_NUMBER: u8 = 255;

/// The flow a test case describes: a new packet or connection (not a reply), not on loopback.
pub fn flow_of_case(case: &ast::TestCase) -> Flow {
    Flow {
        direction: case.direction,
        peer: case.peer.value,
        proto: case.proto.number().unwrap_or(ANY_PROTO_NUMBER),
        port: case.port,
        icmp_type: case.icmp,
        workload: case.workload.clone(),
        state: FlowState::New,
        loopback: false,
        arp: false,
    }
}

/// Checks and links all documents. The policy set is returned only when there is no error;
/// warnings come with it.
pub fn resolve(docs: &[Document], sources: &SourceMap) -> (Option<PolicySet>, Vec<Diagnostic>) {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    resolve_on(docs, sources, threads)
}

/// [`resolve`] with the rules of large inputs resolved on at most `threads` threads (the
/// result is the same for every `threads`).
fn resolve_on(
    docs: &[Document],
    sources: &SourceMap,
    threads: usize,
) -> (Option<PolicySet>, Vec<Diagnostic>) {
    let mut diags = Diagnostics::default();

    // Names unique per kind; the first definition wins for everything below.
    let mut sets: BTreeMap<String, &ast::AddressSet> = BTreeMap::new();
    let mut policies: BTreeMap<String, &ast::Policy> = BTreeMap::new();
    let mut tests: BTreeMap<String, &ast::PolicyTest> = BTreeMap::new();
    for doc in docs {
        let meta = doc.metadata();
        let first = match doc {
            Document::AddressSet(d) => insert_first(&mut sets, meta, d),
            Document::Policy(d) => insert_first(&mut policies, meta, d),
            Document::PolicyTest(d) => insert_first(&mut tests, meta, d),
        };
        if let Some(first) = first {
            diags.push(
                Diagnostic::error(
                    Code::DuplicateName,
                    format!(
                        "there is already a {} named `{}`",
                        doc.kind().as_str(),
                        meta.name.value
                    ),
                )
                .at(meta.name.span, "defined again here")
                .also(first, "first defined here")
                .hint(format!("names must be unique among all {} documents", doc.kind().as_str())),
            );
        }
    }
    for policy in policies.values() {
        check_rule_names(policy, &mut diags);
    }

    check_unknown_refs(&sets, &policies, &mut diags);
    let linked = link_sets(&sets, &mut diags);
    check_empty_sets(&sets, &linked, &mut diags);

    let (owned, rules) = resolve_rules(&policies, &linked, sources, &mut diags, threads);

    let tests: Vec<ast::PolicyTest> = tests.into_values().cloned().collect();
    check_selectors_against_tests(&policies, &tests, &mut diags);

    let set = PolicySet { sets: linked.sets, policies: owned, tests, rules };
    let set = (!diags.has_errors()).then_some(set);
    (set, diags.into_sorted())
}

/// Inserts `value` under its name unless the name is taken; returns the span of the earlier
/// definition's name when it is.
fn insert_first<'a, T: HasMetadata>(
    map: &mut BTreeMap<String, &'a T>,
    meta: &ast::Metadata,
    value: &'a T,
) -> Option<Span> {
    if let Some(first) = map.get(&meta.name.value) {
        return Some(first.metadata().name.span);
    }
    map.insert(meta.name.value.clone(), value);
    None
}

/// The three document types, for `insert_first`.
trait HasMetadata {
    fn metadata(&self) -> &ast::Metadata;
}

impl HasMetadata for ast::AddressSet {
    fn metadata(&self) -> &ast::Metadata {
        &self.metadata
    }
}

impl HasMetadata for ast::Policy {
    fn metadata(&self) -> &ast::Metadata {
        &self.metadata
    }
}

impl HasMetadata for ast::PolicyTest {
    fn metadata(&self) -> &ast::Metadata {
        &self.metadata
    }
}

/// Rule names are unique within a policy (over both directions). This matters beyond tidiness:
/// a rule's id is derived from its name, so two rules with one name would share an id.
fn check_rule_names(policy: &ast::Policy, diags: &mut Diagnostics) {
    let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
    for direction in Direction::ALL {
        for rule in policy.rules(direction) {
            let Some(name) = &rule.name else { continue };
            if let Some(first) = seen.get(name.value.as_str()) {
                diags.push(
                    Diagnostic::error(
                        Code::DuplicateName,
                        format!(
                            "policy `{}` already has a rule named `{}`",
                            policy.metadata.name.value, name.value
                        ),
                    )
                    .at(name.span, "defined again here")
                    .also(*first, "first defined here")
                    .hint(
                        "rule names must be unique within a policy; rename one or leave it unnamed",
                    ),
                );
            } else {
                seen.insert(name.value.as_str(), name.span);
            }
        }
    }
}

/// Every `{set: NAME}` in an address list.
fn set_refs(items: &[Sp<AddressItem>]) -> impl Iterator<Item = &Sp<String>> {
    items.iter().filter_map(|i| match &i.value {
        AddressItem::Set(name) => Some(name),
        _ => None,
    })
}

/// The set references of an AddressSet, addresses first, then excepts.
fn refs_of_set(set: &ast::AddressSet) -> Vec<&Sp<String>> {
    set_refs(&set.addresses).chain(set_refs(&set.except)).collect()
}

fn check_unknown_refs(
    sets: &BTreeMap<String, &ast::AddressSet>,
    policies: &BTreeMap<String, &ast::Policy>,
    diags: &mut Diagnostics,
) {
    let mut refs: Vec<&Sp<String>> = sets.values().flat_map(|s| refs_of_set(s)).collect();
    for policy in policies.values() {
        for direction in Direction::ALL {
            for rule in policy.rules(direction) {
                refs.extend(rule.peers.iter().flat_map(|p| set_refs(p)));
            }
        }
    }
    for r in refs {
        if sets.contains_key(&r.value) {
            continue;
        }
        let mut d = Diagnostic::error(
            Code::UnknownSet,
            format!("there is no AddressSet named `{}`", r.value),
        )
        .at(r.span, "unknown AddressSet");
        if let Some(hint) = unknown_set_hint(&r.value, sets.keys()) {
            d = d.hint(hint);
        }
        diags.push(d);
    }
}

/// "did you mean X?" for a close name, else the known names when there are few.
fn unknown_set_hint<'a>(
    wanted: &str,
    known: impl Iterator<Item = &'a String> + Clone,
) -> Option<String> {
    let limit = (wanted.chars().count() / 3).max(1);
    let closest =
        known.clone().map(|k| (edit_distance(wanted, k), k)).filter(|(d, _)| *d <= limit).min();
    if let Some((_, name)) = closest {
        return Some(format!("did you mean `{name}`?"));
    }
    let all: Vec<&String> = known.collect();
    match all.len() {
        0 => Some("no AddressSet is defined".to_string()),
        1..=8 => Some(format!(
            "the AddressSets are: {}",
            all.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        )),
        _ => None,
    }
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, &cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            let insert = cur[j] + 1;
            let delete = prev[j + 1] + 1;
            cur.push(substitute.min(insert).min(delete));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Linked sets, and what is known about each.
struct Linked {
    sets: BTreeMap<String, Arc<ResolvedSet>>,
    /// Sets that could not be linked completely (an unknown or cyclic reference, too deep, or
    /// including such a set). They are left out of `sets`; the error is already reported.
    broken: BTreeSet<String>,
    /// Dependencies before dependents.
    order: Vec<String>,
}

/// Finds cycles (FW015) with an iterative depth-first walk, then links sets in post-order so
/// every referenced set is built before the sets that include it.
fn link_sets(sets: &BTreeMap<String, &ast::AddressSet>, diags: &mut Diagnostics) -> Linked {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let refs: BTreeMap<&str, Vec<&Sp<String>>> =
        sets.iter().map(|(name, s)| (name.as_str(), refs_of_set(s))).collect();
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for root in sets.keys() {
        if marks.contains_key(root.as_str()) {
            continue;
        }
        marks.insert(root.as_str(), Mark::Visiting);
        // Each frame: a set and how many of its references have been followed.
        let mut stack: Vec<(&str, usize)> = vec![(root.as_str(), 0)];
        while let Some(&(name, next)) = stack.last() {
            let out = refs.get(name).map(Vec::as_slice).unwrap_or(&[]);
            let Some(r) = out.get(next) else {
                marks.insert(name, Mark::Done);
                order.push(name.to_string());
                stack.pop();
                continue;
            };
            if let Some(top) = stack.last_mut() {
                top.1 += 1;
            }
            let Some((&target, _)) = refs.get_key_value(r.value.as_str()) else {
                continue; // unknown: reported by check_unknown_refs
            };
            match marks.get(target) {
                None => {
                    marks.insert(target, Mark::Visiting);
                    stack.push((target, 0));
                }
                Some(Mark::Visiting) => report_cycle(&stack, target, &refs, diags),
                Some(Mark::Done) => {}
            }
        }
    }

    let mut linked = Linked { sets: BTreeMap::new(), broken: BTreeSet::new(), order };
    let mut depth: BTreeMap<String, usize> = BTreeMap::new();
    for name in &linked.order {
        let Some(set) = sets.get(name) else { continue };
        let mut broken = false;
        let mut deepest = 0;
        let mut term = |item: &Sp<AddressItem>| match &item.value {
            AddressItem::Net(net) => Some(AddrTerm::Net(*net)),
            AddressItem::Any => Some(AddrTerm::Any),
            AddressItem::Set(r) => match (linked.sets.get(&r.value), depth.get(&r.value)) {
                (Some(s), Some(&d)) => {
                    deepest = deepest.max(d);
                    Some(AddrTerm::Set(s.clone()))
                }
                // Unknown, cyclic (not built yet when the cycle closes) or broken.
                _ => {
                    broken = true;
                    None
                }
            },
        };
        let addresses: Vec<AddrTerm> = set.addresses.iter().filter_map(&mut term).collect();
        let except: Vec<AddrTerm> = set.except.iter().filter_map(&mut term).collect();
        let my_depth = deepest + 1;
        if !broken && my_depth > MAX_SET_DEPTH {
            // Reported once, at the set that crosses the limit; sets above it are broken too.
            diags.push(
                Diagnostic::error(
                    Code::InputTooLarge,
                    format!("AddressSet `{name}` nests set references more than {MAX_SET_DEPTH} levels deep"),
                )
                .at(set.metadata.name.span, "too deeply nested")
                .hint("flatten some of the sets it includes"),
            );
            broken = true;
        }
        if broken {
            linked.broken.insert(name.clone());
            continue;
        }
        depth.insert(name.clone(), my_depth);
        linked
            .sets
            .insert(name.clone(), Arc::new(ResolvedSet { name: name.clone(), addresses, except }));
    }
    linked
}

/// A reference from the top of `stack` to `target`, which is on the stack: the cycle is the
/// stack from `target` up, back to `target`.
fn report_cycle(
    stack: &[(&str, usize)],
    target: &str,
    refs: &BTreeMap<&str, Vec<&Sp<String>>>,
    diags: &mut Diagnostics,
) {
    let Some(start) = stack.iter().position(|(n, _)| *n == target) else {
        return;
    };
    let cycle = &stack[start..];
    // The reference each set on the cycle follows is the last one taken from it.
    let edges: Vec<(&str, Span)> = cycle
        .iter()
        .filter_map(|&(name, next)| {
            let r = refs.get(name)?.get(next.checked_sub(1)?)?;
            Some((name, r.span))
        })
        .collect();
    let path: Vec<&str> = cycle.iter().map(|(n, _)| *n).chain([target]).collect();
    let mut d = Diagnostic::error(
        Code::SetCycle,
        format!("AddressSets include each other in a cycle: {}", path.join(" -> ")),
    )
    .hint("remove one of the references so the sets no longer include themselves");
    for (i, (from, span)) in edges.iter().enumerate() {
        let to = path.get(i + 1).copied().unwrap_or(target);
        let label = format!("`{from}` includes `{to}`");
        d = if i == 0 { d.at(*span, label) } else { d.also(*span, label) };
    }
    diags.push(d);
}

/// FW017: a set whose addresses are all removed by its excepts.
fn check_empty_sets(
    sets: &BTreeMap<String, &ast::AddressSet>,
    linked: &Linked,
    diags: &mut Diagnostics,
) {
    let mut memo = RangeMemo::default();
    for name in &linked.order {
        let (Some(resolved), Some(doc)) = (linked.sets.get(name), sets.get(name)) else {
            continue;
        };
        // A set without excepts that lists an address or `any` is not empty, without
        // expanding it into ranges (a block list of 100k prefixes, on every commit).
        let lists_an_address = resolved.addresses.iter().any(|t| !matches!(t, AddrTerm::Set(_)));
        if resolved.except.is_empty() && lists_an_address {
            continue;
        }
        if !memo.set(resolved).is_empty() {
            continue;
        }
        let mut d = Diagnostic::error(
            Code::EmptyAddressList,
            format!("AddressSet `{name}` is empty once its excepts are removed"),
        )
        .at(doc.metadata.name.span, "matches no address")
        .hint("remove the except entries that cover all of its addresses, or the set itself");
        if let Some(first) = doc.except.first() {
            d = d.also(first.span, "the excepts start here");
        }
        diags.push(d);
    }
}

/// From this many rules on, `resolve_rules` spreads the policies over threads.
const PARALLEL_MIN_RULES: usize = 4096;

/// Resolves the rules of every policy, assigning ids over all of them at once: the resolved
/// rules of each policy, and each policy's own copy for the `PolicySet`, in name order. Large inputs are resolved on up to `threads` threads; the result and the order
/// of the diagnostics are the same on any number of threads.
fn resolve_rules(
    policies: &BTreeMap<String, &ast::Policy>,
    linked: &Linked,
    sources: &SourceMap,
    diags: &mut Diagnostics,
    threads: usize,
) -> (Vec<ast::Policy>, Vec<Vec<ResolvedRule>>) {
    // `policy\0direction\0name`, or `#index` for an unnamed rule. Written piece by piece
    // rather than with `format!`: it runs for every rule, and the formatting machinery was a
    // sixth of resolving.
    let key = |policy: &str, direction: Direction, index: usize, rule: &ast::Rule| {
        let mut k = String::with_capacity(policy.len() + 32);
        k.push_str(policy);
        k.push('\0');
        k.push_str(direction.as_str());
        k.push('\0');
        match &rule.name {
            Some(n) => k.push_str(&n.value),
            None => {
                k.push('#');
                ids::push_decimal(&mut k, index as u64);
            }
        }
        k
    };
    let mut keys = Vec::new();
    for (name, policy) in policies {
        for direction in Direction::ALL {
            for (index, rule) in policy.rules(direction).iter().enumerate() {
                keys.push(key(name, direction, index, rule));
            }
        }
    }
    // Keys were pushed in the order the loop below visits the rules: ids go by position.
    let ids = ids::assign_each(&keys);
    drop(keys);

    // Contiguous runs of policies of about equal rule counts, one per thread, each with the
    // position of its first rule's id; their results are put back in policy order.
    let policies: Vec<(&String, &ast::Policy)> = policies.iter().map(|(n, p)| (n, *p)).collect();
    let count = |p: &ast::Policy| Direction::ALL.iter().map(|d| p.rules(*d).len()).sum::<usize>();
    let threads = if ids.len() < PARALLEL_MIN_RULES { 1 } else { threads.max(1) };
    let per_thread = ids.len().div_ceil(threads).max(1);
    let mut runs: Vec<(usize, &[(&String, &ast::Policy)])> = Vec::new();
    let (mut start, mut first_id, mut rules_in_run) = (0, 0, 0);
    for (i, (_, policy)) in policies.iter().enumerate() {
        rules_in_run += count(policy);
        if rules_in_run >= per_thread || i + 1 == policies.len() {
            runs.push((first_id, &policies[start..=i]));
            first_id += rules_in_run;
            start = i + 1;
            rules_in_run = 0;
        }
    }
    let work = |(first_id, run): (usize, &[(&String, &ast::Policy)])| {
        let mut diags = Diagnostics::default();
        let ids = ids.get(first_id..).unwrap_or_default();
        let out = resolve_run(run, ids, linked, sources, &mut diags);
        (out, diags.items)
    };
    let done: Vec<_> = if runs.len() <= 1 {
        runs.into_iter().map(work).collect()
    } else {
        std::thread::scope(|scope| {
            let mut runs = runs.into_iter();
            let here = runs.next();
            let helpers: Vec<_> = runs
                .map(|run| {
                    let spawned = std::thread::Builder::new()
                        .name("fw-resolve".into())
                        .spawn_scoped(scope, move || work(run));
                    // Without a thread (the system would not start one), here.
                    spawned.map_err(|_| run)
                })
                .collect();
            let mut done: Vec<_> = here.into_iter().map(work).collect();
            for helper in helpers {
                done.push(match helper {
                    Ok(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(run) => work(run),
                });
            }
            done
        })
    };
    let mut owned = Vec::with_capacity(policies.len());
    let mut out = Vec::with_capacity(policies.len());
    for ((run_owned, run_rules), run_diags) in done {
        owned.extend(run_owned);
        out.extend(run_rules);
        diags.extend(run_diags);
    }
    (owned, out)
}

/// One run of policies (name order) from `resolve_rules`, with the ids of its rules in
/// visiting order: each policy's own copy and its resolved rules.
fn resolve_run(
    run: &[(&String, &ast::Policy)],
    ids: &[u32],
    linked: &Linked,
    sources: &SourceMap,
    diags: &mut Diagnostics,
) -> (Vec<ast::Policy>, Vec<Vec<ResolvedRule>>) {
    let mut ids = ids.iter().copied();
    let mut memo = RangeMemo::default();
    let mut owned = Vec::with_capacity(run.len());
    let mut out = Vec::with_capacity(run.len());
    for &(name, policy) in run {
        owned.push(policy.clone());
        let mut rules = Vec::new();
        for direction in Direction::ALL {
            for (index, rule) in policy.rules(direction).iter().enumerate() {
                let id = ids.next().unwrap_or(0);
                let peers = resolve_peers(rule.peers.as_deref(), linked);
                if let (Some(peers), Some(items)) = (&peers, &rule.peers) {
                    check_family(rule, items, peers, &mut memo, diags);
                }
                rules.push(ResolvedRule {
                    id: RuleId(id),
                    direction,
                    policy: name.clone(),
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    name: rule.name.as_ref().map(|n| n.value.clone()),
                    action: rule.action.value,
                    mode: policy.mode,
                    log: rule.log,
                    peers: peers.unwrap_or_default(),
                    proto: rule.proto.value,
                    ports: rule.ports.iter().map(|p| p.value).collect(),
                    icmp: rule.icmp.iter().map(|t| t.value).collect(),
                    workloads: rule.workloads.iter().map(|w| w.value.clone()).collect(),
                    span: rule.span,
                    location: sources.location(rule.span),
                });
            }
        }
        out.push(rules);
    }
    (owned, out)
}

/// Absent = any. `None` when a referenced set is unknown or broken (already reported).
fn resolve_peers(items: Option<&[Sp<AddressItem>]>, linked: &Linked) -> Option<Vec<AddrTerm>> {
    let Some(items) = items else {
        return Some(vec![AddrTerm::Any]);
    };
    items
        .iter()
        .map(|item| match &item.value {
            AddressItem::Net(net) => Some(AddrTerm::Net(*net)),
            AddressItem::Any => Some(AddrTerm::Any),
            AddressItem::Set(name) => {
                linked.sets.get(&name.value).map(|s| AddrTerm::Set(s.clone()))
            }
        })
        .collect()
}

/// FW029 (a warning: the rule is legal, it just can never match): `proto: icmp` with only IPv6
/// addresses, `proto: icmpv6` with only IPv4 ones. Judged on the expanded addresses, so a set
/// whose IPv4 part is all excepted counts as IPv6-only.
fn check_family(
    rule: &ast::Rule,
    items: &[Sp<AddressItem>],
    peers: &[AddrTerm],
    memo: &mut RangeMemo,
    diags: &mut Diagnostics,
) {
    let (needed, other) = match rule.proto.value {
        Proto::Icmp => ("IPv4", "IPv6"),
        Proto::Icmpv6 => ("IPv6", "IPv4"),
        _ => return,
    };
    let ranges: Vec<Range> = peers.iter().flat_map(|t| memo.term(t)).collect();
    let has_v4 = ranges.iter().any(|r| !r.v6);
    let has_v6 = ranges.iter().any(|r| r.v6);
    let mismatch = match rule.proto.value {
        Proto::Icmp => has_v6 && !has_v4,
        _ => has_v4 && !has_v6,
    };
    if !mismatch {
        return;
    }
    let mut d = Diagnostic::warning(
        Code::FamilyMismatch,
        format!(
            "this rule can never match: `proto: {}` is {needed} only, but its addresses are all {other}",
            rule.proto.value.as_str()
        ),
    )
    .at(rule.proto.span, format!("{needed} only"))
    .hint(match rule.proto.value {
        Proto::Icmp => "for ICMP over IPv6 use `proto: icmpv6`",
        _ => "for ICMP over IPv4 use `proto: icmp`",
    });
    if let Some(first) = items.first() {
        d = d.also(first.span, format!("{other} addresses"));
    }
    diags.push(d);
}

/// FW018: with PolicyTests present, a policy that none of their hosts selects is likely a
/// typo in the selector (or a missing test). A warning, since tests need not cover every host.
fn check_selectors_against_tests(
    policies: &BTreeMap<String, &ast::Policy>,
    tests: &[ast::PolicyTest],
    diags: &mut Diagnostics,
) {
    if tests.is_empty() {
        return;
    }
    let hosts: BTreeSet<HostIdentity> = tests.iter().map(host_of_test).collect();
    for (name, policy) in policies {
        let Some(sel) = &policy.hosts else { continue };
        if hosts.iter().any(|h| selects(Some(sel), h)) {
            continue;
        }
        let listed: Vec<String> = hosts.iter().take(5).map(|h| format!("`{}`", h.name)).collect();
        let more = if hosts.len() > 5 { ", ..." } else { "" };
        diags.push(
            Diagnostic::warning(
                Code::SelectorMatchesNoTestHost,
                format!("policy `{name}` selects none of the hosts that PolicyTests describe"),
            )
            .at(sel.span, "matches no tested host")
            .hint(format!(
                "tested hosts: {}{more}; check the labels and name globs, or add a PolicyTest for these hosts",
                listed.join(", ")
            )),
        );
    }
}

/// An inclusive range of addresses of one family (IPv4 addresses are widened to u128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    v6: bool,
    lo: u128,
    hi: u128,
}

const ALL_V4: Range = Range { v6: false, lo: 0, hi: u32::MAX as u128 };
const ALL_V6: Range = Range { v6: true, lo: 0, hi: u128::MAX };

fn net_range(net: &IpNet) -> Range {
    match net {
        IpNet::V4(n) => Range {
            v6: false,
            lo: u32::from(n.network()).into(),
            hi: u32::from(n.broadcast()).into(),
        },
        IpNet::V6(n) => {
            Range { v6: true, lo: u128::from(n.network()), hi: u128::from(n.broadcast()) }
        }
    }
}

/// Sorted, disjoint, non-adjacent.
fn normalize(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.v6 == r.v6 && r.lo <= last.hi.saturating_add(1) => {
                last.hi = last.hi.max(r.hi);
            }
            _ => out.push(r),
        }
    }
    out
}

/// `a` minus `b`; both normalized. One pass over both.
fn subtract(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut j = 0;
    for &r in a {
        // Skip what lies wholly before this range (ordering by family, then address).
        while b.get(j).is_some_and(|x| (x.v6, x.hi) < (r.v6, r.lo)) {
            j += 1;
        }
        let mut cur = Some(r);
        let mut k = j;
        while let (Some(c), Some(x)) = (cur, b.get(k)) {
            if (x.v6, x.lo) > (c.v6, c.hi) {
                break;
            }
            // Here x overlaps c, and they are of the same family.
            if x.lo > c.lo {
                out.push(Range { hi: x.lo - 1, ..c });
            }
            cur = (x.hi < c.hi).then(|| Range { lo: x.hi + 1, ..c });
            k += 1;
        }
        out.extend(cur);
    }
    out
}

/// Expanded address ranges of sets, each set computed once (sets are shared, so expanding
/// through the `Arc`s without a memo could cost exponential time on a crafted input).
#[derive(Default)]
struct RangeMemo {
    sets: BTreeMap<String, Vec<Range>>,
}

impl RangeMemo {
    fn term(&mut self, term: &AddrTerm) -> Vec<Range> {
        match term {
            AddrTerm::Any => vec![ALL_V4, ALL_V6],
            AddrTerm::Net(net) => vec![net_range(net)],
            AddrTerm::Set(set) => self.set(set),
        }
    }

    /// Recursion here follows set nesting, which `link_sets` caps at `MAX_SET_DEPTH`.
    fn set(&mut self, set: &ResolvedSet) -> Vec<Range> {
        if let Some(r) = self.sets.get(&set.name) {
            return r.clone();
        }
        let addresses = normalize(set.addresses.iter().flat_map(|t| self.term(t)).collect());
        let except = normalize(set.except.iter().flat_map(|t| self.term(t)).collect());
        let ranges = subtract(&addresses, &except);
        self.sets.insert(set.name.clone(), ranges.clone());
        ranges
    }
}

/// Whether an address is in the expanded ranges (for tests of the range arithmetic against
/// `AddrTerm::contains`).
#[cfg(test)]
fn ranges_contain(ranges: &[Range], ip: std::net::IpAddr) -> bool {
    let (v6, x) = match ip {
        std::net::IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        std::net::IpAddr::V6(a) => (true, u128::from(a)),
    };
    ranges.iter().any(|r| r.v6 == v6 && r.lo <= x && x <= r.hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::{Defaults, HostSelector, Metadata, PolicyTest, Rule, TestCase, TestHost};
    use crate::diag::Severity;
    use crate::source::{FileId, SourceFile};
    use std::cell::Cell;
    use std::net::IpAddr;

    /// Builds AST values with distinct dummy spans, so tests can tell which span a diagnostic
    /// points at.
    struct B {
        next: Cell<u32>,
    }

    impl B {
        fn new() -> Self {
            Self { next: Cell::new(0) }
        }

        fn span(&self) -> Span {
            let s = self.next.get();
            self.next.set(s + 10);
            Span::new(FileId(0), s, s + 5)
        }

        fn sp<T>(&self, v: T) -> Sp<T> {
            Sp::new(v, self.span())
        }

        fn meta(&self, name: &str) -> Metadata {
            Metadata { name: self.sp(name.to_string()), description: None, document: self.span() }
        }

        fn item(&self, s: &str) -> Sp<AddressItem> {
            let v = if s == "any" {
                AddressItem::Any
            } else if let Some(name) = s.strip_prefix('@') {
                AddressItem::Set(self.sp(name.to_string()))
            } else if s.contains('/') {
                AddressItem::Net(s.parse().unwrap())
            } else {
                AddressItem::Net(IpNet::from(s.parse::<IpAddr>().unwrap()))
            };
            self.sp(v)
        }

        fn items(&self, list: &[&str]) -> Vec<Sp<AddressItem>> {
            list.iter().map(|s| self.item(s)).collect()
        }

        /// `@name` is a set reference.
        fn set(&self, name: &str, addresses: &[&str], except: &[&str]) -> Document {
            Document::AddressSet(ast::AddressSet {
                metadata: self.meta(name),
                addresses: self.items(addresses),
                except: self.items(except),
            })
        }

        fn rule(
            &self,
            name: Option<&str>,
            action: Action,
            peers: Option<&[&str]>,
            proto: Proto,
        ) -> Rule {
            Rule {
                span: self.span(),
                name: name.map(|n| self.sp(n.to_string())),
                action: self.sp(action),
                peers: peers.map(|p| self.items(p)),
                proto: self.sp(proto),
                ports: vec![],
                icmp: vec![],
                log: false,
                workloads: vec![],
            }
        }

        fn policy(&self, name: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> ast::Policy {
            ast::Policy {
                metadata: self.meta(name),
                hosts: None,
                mode: Mode::Enforce,
                defaults: Defaults::default(),
                ingress,
                egress,
            }
        }

        fn selector(&self, labels: &[(&str, &str)], names: &[&str]) -> HostSelector {
            HostSelector {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), self.sp(v.to_string())))
                    .collect(),
                names: names.iter().map(|n| self.sp(n.to_string())).collect(),
                span: self.span(),
            }
        }

        fn test(&self, name: &str, host: &str, labels: &[(&str, &str)]) -> Document {
            Document::PolicyTest(PolicyTest {
                metadata: self.meta(name),
                host: TestHost {
                    name: self.sp(host.to_string()),
                    labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                },
                cases: vec![],
            })
        }
    }

    fn sources() -> SourceMap {
        let mut s = SourceMap::new();
        s.add(SourceFile::new("p.yaml", "x\n".repeat(10_000)));
        s
    }

    fn run(docs: &[Document]) -> (Option<PolicySet>, Vec<Diagnostic>) {
        resolve(docs, &sources())
    }

    fn codes(diags: &[Diagnostic]) -> Vec<Code> {
        diags.iter().map(|d| d.code).collect()
    }

    fn host(name: &str, labels: &[(&str, &str)]) -> HostIdentity {
        HostIdentity {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn primary(d: &Diagnostic) -> Span {
        d.primary.as_ref().unwrap().span
    }

    #[test]
    fn clean_input_resolves_without_diagnostics() {
        let b = B::new();
        let docs = [
            b.set("office", &["203.0.113.0/24", "@partners"], &["203.0.113.99"]),
            b.set("partners", &["198.51.100.0/24"], &[]),
            Document::Policy(b.policy(
                "web",
                vec![b.rule(Some("https"), Action::Allow, Some(&["@office"]), Proto::Tcp)],
                vec![],
            )),
        ];
        let (set, diags) = run(&docs);
        assert_eq!(diags, vec![]);
        let set = set.unwrap();
        let office = &set.sets["office"];
        let term = AddrTerm::Set(office.clone());
        assert!(term.contains("198.51.100.1".parse().unwrap()));
        assert!(!term.contains("203.0.113.99".parse().unwrap()));
        let p = set.for_host(&host("h", &[]));
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].peers, vec![AddrTerm::Set(office.clone())]);
        assert_eq!(p.rules[0].location, sources().location(p.rules[0].span));
        assert_eq!(&*p.rules[0].location.file, "p.yaml");
    }

    #[test]
    fn duplicate_names_per_kind() {
        let b = B::new();
        let first = b.set("a", &["10.0.0.0/8"], &[]);
        let second = b.set("a", &["11.0.0.0/8"], &[]);
        // Same name, other kind: fine.
        let policy = Document::Policy(b.policy("a", vec![], vec![]));
        let (set, diags) = run(&[first.clone(), second.clone(), policy]);
        assert!(set.is_none());
        assert_eq!(codes(&diags), vec![Code::DuplicateName]);
        assert_eq!(primary(&diags[0]), second.metadata().name.span);
        assert_eq!(diags[0].secondary[0].span, first.metadata().name.span);
        assert_eq!(diags[0].secondary[0].message, "first defined here");
    }

    #[test]
    fn duplicate_rule_names_within_a_policy() {
        let b = B::new();
        let r1 = b.rule(Some("x"), Action::Allow, None, Proto::Tcp);
        let r2 = b.rule(Some("x"), Action::Deny, None, Proto::Tcp);
        let r3 = b.rule(Some("y"), Action::Deny, None, Proto::Tcp);
        let (span1, span2) = (r1.name.as_ref().unwrap().span, r2.name.as_ref().unwrap().span);
        let (_, diags) = run(&[Document::Policy(b.policy("p", vec![r1, r3], vec![r2]))]);
        assert_eq!(codes(&diags), vec![Code::DuplicateName]);
        assert_eq!(primary(&diags[0]), span2);
        assert_eq!(diags[0].secondary[0].span, span1);
    }

    #[test]
    fn unknown_set_suggests_a_close_name() {
        let b = B::new();
        let docs = [
            b.set("office", &["10.0.0.0/8"], &[]),
            b.set("partners", &["11.0.0.0/8"], &[]),
            Document::Policy(b.policy(
                "p",
                vec![b.rule(None, Action::Allow, Some(&["@ofice"]), Proto::Any)],
                vec![],
            )),
        ];
        let (set, diags) = run(&docs);
        assert!(set.is_none());
        assert_eq!(codes(&diags), vec![Code::UnknownSet]);
        assert_eq!(diags[0].hint.as_deref(), Some("did you mean `office`?"));

        // Nothing close: the few known sets are listed.
        let docs = [
            b.set("office", &["10.0.0.0/8", "@zzzzzz"], &[]),
            b.set("partners", &["11.0.0.0/8"], &[]),
        ];
        let (_, diags) = run(&docs);
        assert_eq!(codes(&diags), vec![Code::UnknownSet]);
        assert_eq!(diags[0].hint.as_deref(), Some("the AddressSets are: `office`, `partners`"));

        let docs = [Document::Policy(b.policy(
            "p",
            vec![b.rule(None, Action::Allow, Some(&["@x"]), Proto::Any)],
            vec![],
        ))];
        let (_, diags) = run(&docs);
        assert_eq!(diags[0].hint.as_deref(), Some("no AddressSet is defined"));
    }

    #[test]
    fn set_cycles_are_reported_with_each_reference() {
        let b = B::new();
        let a = b.set("a", &["10.0.0.0/8", "@b"], &[]);
        let bb = b.set("b", &["@c"], &[]);
        let c = b.set("c", &["@a"], &[]);
        // The span of the set name inside the first `{set: NAME}` item.
        let ref_span = |d: &Document| match d {
            Document::AddressSet(s) => s
                .addresses
                .iter()
                .find_map(|i| match &i.value {
                    AddressItem::Set(name) => Some(name.span),
                    _ => None,
                })
                .unwrap(),
            _ => unreachable!(),
        };
        let (set, diags) = run(&[c.clone(), a.clone(), bb.clone()]);
        assert!(set.is_none());
        assert_eq!(codes(&diags), vec![Code::SetCycle]);
        let d = &diags[0];
        assert!(d.message.ends_with("a -> b -> c -> a"), "{}", d.message);
        assert_eq!(primary(d), ref_span(&a));
        let secondary: Vec<Span> = d.secondary.iter().map(|l| l.span).collect();
        assert_eq!(secondary, vec![ref_span(&bb), ref_span(&c)]);
        assert_eq!(d.secondary[1].message, "`c` includes `a`");

        // A set that includes itself, through its excepts.
        let selfish = b.set("s", &["10.0.0.0/8"], &["@s"]);
        let (_, diags) = run(&[selfish]);
        assert_eq!(codes(&diags), vec![Code::SetCycle]);
        assert!(diags[0].message.ends_with("s -> s"));
    }

    #[test]
    fn a_set_including_a_cycle_is_not_reported_twice() {
        let b = B::new();
        let docs = [b.set("a", &["@b"], &[]), b.set("b", &["@a"], &[]), b.set("x", &["@a"], &[])];
        let (_, diags) = run(&docs);
        assert_eq!(codes(&diags), vec![Code::SetCycle]);
    }

    #[test]
    fn deep_nesting_is_capped() {
        let b = B::new();
        let mut docs = vec![b.set("s0", &["10.0.0.0/8"], &[])];
        for i in 1..MAX_SET_DEPTH {
            docs.push(b.set(&format!("s{i}"), &[&format!("@s{}", i - 1)], &[]));
        }
        let (set, diags) = run(&docs);
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(set.unwrap().sets.len(), MAX_SET_DEPTH);
        let n = MAX_SET_DEPTH;
        docs.push(b.set(&format!("s{n}"), &[&format!("@s{}", n - 1)], &[]));
        docs.push(b.set(&format!("s{}", n + 1), &[&format!("@s{n}")], &[]));
        let (set, diags) = run(&docs);
        assert!(set.is_none());
        assert_eq!(codes(&diags), vec![Code::InputTooLarge]);
        assert!(diags[0].message.contains(&format!("`s{n}`")));
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let b = B::new();
        let mut docs = vec![b.set("s0", &["10.0.0.0/8"], &[])];
        for i in 1..50_000 {
            docs.push(b.set(&format!("s{i}"), &[&format!("@s{}", i - 1)], &[]));
        }
        docs.push(b.set("s0x", &["@s49999"], &[]));
        let (_, diags) = run(&docs);
        assert_eq!(codes(&diags), vec![Code::InputTooLarge]);
    }

    #[test]
    fn sets_empty_after_excepts() {
        let b = B::new();
        let empty = b.set("e", &["10.0.0.0/25", "10.0.0.128/25"], &["10.0.0.0/24"]);
        let split =
            b.set("split", &["10.0.0.0/24"], &["10.0.0.0/25", "10.0.0.128/26", "10.0.0.192/26"]);
        let not_empty = b.set("ok", &["10.0.0.0/24", "2001:db8::/32"], &["10.0.0.0/24"]);
        let via_ref = b.set("r", &["@inner"], &["10.0.0.0/8"]);
        let inner = b.set("inner", &["10.1.0.0/16", "10.2.0.0/16"], &[]);
        let (set, diags) = run(&[empty.clone(), split.clone(), not_empty, via_ref.clone(), inner]);
        assert!(set.is_none());
        assert!(diags.iter().all(|d| d.code == Code::EmptyAddressList));
        let mut spans: Vec<Span> = diags.iter().map(primary).collect();
        spans.sort();
        let mut want = vec![
            empty.metadata().name.span,
            split.metadata().name.span,
            via_ref.metadata().name.span,
        ];
        want.sort();
        assert_eq!(spans, want);
    }

    #[test]
    fn range_arithmetic_agrees_with_contains() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["10.0.0.0/8"], &["10.1.0.0/16", "10.255.255.255/32"]),
            (&["0.0.0.0/0", "::/0"], &["0.0.0.0/1", "::/1"]),
            (&["10.0.0.0/24", "10.0.0.0/25"], &["10.0.0.1/32", "10.0.0.3/32", "10.0.0.2/31"]),
            (&["255.255.255.255/32"], &["255.255.255.254/31"]),
        ];
        let probes = [
            "10.0.0.0",
            "10.0.0.1",
            "10.0.0.2",
            "10.0.0.3",
            "10.0.0.4",
            "10.1.2.3",
            "10.2.0.0",
            "10.255.255.255",
            "10.255.255.254",
            "0.0.0.0",
            "200.0.0.1",
            "255.255.255.255",
            "::",
            "8000::1",
            "::1",
            "ffff::",
        ];
        for (addresses, except) in cases {
            let to_terms = |l: &[&str]| {
                l.iter().map(|s| AddrTerm::Net(s.parse().unwrap())).collect::<Vec<_>>()
            };
            let set = ResolvedSet {
                name: "t".into(),
                addresses: to_terms(addresses),
                except: to_terms(except),
            };
            let ranges = RangeMemo::default().set(&set);
            let term = AddrTerm::Set(Arc::new(set));
            for p in probes {
                let ip: IpAddr = p.parse().unwrap();
                assert_eq!(
                    ranges_contain(&ranges, ip),
                    term.contains(ip),
                    "{addresses:?} - {except:?} at {p}"
                );
            }
        }
    }

    #[test]
    fn family_mismatch_warns() {
        let b = B::new();
        let v6only = b.set("v6", &["2001:db8::/32", "10.0.0.0/8"], &["10.0.0.0/8"]);
        let bad_icmp = b.rule(None, Action::Allow, Some(&["@v6"]), Proto::Icmp);
        let bad_icmpv6 = b.rule(None, Action::Allow, Some(&["192.0.2.1"]), Proto::Icmpv6);
        let ok = [
            b.rule(None, Action::Allow, Some(&["192.0.2.1", "2001:db8::1"]), Proto::Icmp),
            b.rule(None, Action::Allow, None, Proto::Icmpv6),
            b.rule(None, Action::Allow, Some(&["any"]), Proto::Icmp),
            b.rule(None, Action::Allow, Some(&["2001:db8::1"]), Proto::Tcp),
        ];
        let want = vec![bad_icmp.proto.span, bad_icmpv6.proto.span];
        let mut rules = vec![bad_icmp, bad_icmpv6];
        rules.extend(ok);
        let (set, diags) = run(&[v6only, Document::Policy(b.policy("p", rules, vec![]))]);
        assert!(set.is_some(), "warnings only");
        assert!(
            diags.iter().all(|d| d.code == Code::FamilyMismatch && d.severity == Severity::Warning)
        );
        assert_eq!(diags.iter().map(primary).collect::<Vec<_>>(), want);
    }

    /// Enough rules to be resolved on several threads, with warnings from many policies: the
    /// same policy set (ids included) and the same diagnostics in the same order either way.
    #[test]
    fn resolving_on_threads_gives_the_same_set_and_diagnostics() {
        let b = B::new();
        let mut docs = vec![
            b.set("v6", &["2001:db8::/32", "10.0.0.0/8"], &["10.0.0.0/8"]),
            b.set("mixed", &["192.0.2.0/24", "@v6"], &[]),
        ];
        for p in 0..700 {
            let mut ingress = Vec::new();
            for r in 0..4 {
                let name = format!("r{r}");
                let peers: &[&str] = match (p + r) % 4 {
                    0 => &["@v6"],
                    1 => &["@mixed", "198.51.100.7"],
                    2 => &["192.0.2.1"],
                    _ => &["any"],
                };
                let proto = if (p + r) % 3 == 0 { Proto::Icmp } else { Proto::Icmpv6 };
                ingress.push(b.rule(
                    (r % 2 == 0).then_some(name.as_str()),
                    Action::Allow,
                    Some(peers),
                    proto,
                ));
            }
            let egress = vec![
                b.rule(None, Action::Deny, None, Proto::Tcp),
                b.rule(Some("out"), Action::Allow, Some(&["@mixed"]), Proto::Udp),
            ];
            docs.push(Document::Policy(b.policy(&format!("p{p:03}"), ingress, egress)));
        }
        let sources = sources();
        let (set, diags) = resolve_on(&docs, &sources, 1);
        let rules = set.as_ref().map_or(0, |s| s.rules.iter().map(Vec::len).sum::<usize>());
        assert!(rules >= PARALLEL_MIN_RULES, "{rules} rules");
        assert!(diags.len() > 100, "{} diagnostics", diags.len());
        assert!(diags.iter().all(|d| d.code == Code::FamilyMismatch));
        let expected = format!("{set:?}\n{diags:?}");
        for threads in [2, 3, 8] {
            let (set, diags) = resolve_on(&docs, &sources, threads);
            assert!(format!("{set:?}\n{diags:?}") == expected, "{threads} threads differ");
        }
    }

    #[test]
    fn selector_matching_no_test_host_warns() {
        let b = B::new();
        let mut web = b.policy("web", vec![], vec![]);
        web.hosts = Some(b.selector(&[("role", "web")], &[]));
        let mut typo = b.policy("typo", vec![], vec![]);
        typo.hosts = Some(b.selector(&[("role", "wbe")], &[]));
        let typo_span = typo.hosts.as_ref().unwrap().span;
        let everywhere = b.policy("all", vec![], vec![]);
        let docs =
            vec![Document::Policy(web), Document::Policy(typo), Document::Policy(everywhere)];

        // Without PolicyTests there is nothing to compare with.
        let (_, diags) = run(&docs);
        assert!(diags.is_empty());

        let mut with_test = docs.clone();
        with_test.push(b.test("t", "web-1", &[("role", "web")]));
        let (set, diags) = run(&with_test);
        assert!(set.is_some());
        assert_eq!(codes(&diags), vec![Code::SelectorMatchesNoTestHost]);
        assert_eq!(diags[0].severity, Severity::Warning);
        assert_eq!(primary(&diags[0]), typo_span);
        assert!(diags[0].message.contains("`typo`"));
    }

    #[test]
    fn host_selection() {
        let b = B::new();
        let sel = b.selector(&[("role", "web"), ("env", "prod")], &["web-*", "edge-[0-9]"]);
        assert!(selects(
            Some(&sel),
            &host("web-1", &[("role", "web"), ("env", "prod"), ("x", "y")])
        ));
        assert!(selects(Some(&sel), &host("edge-7", &[("role", "web"), ("env", "prod")])));
        assert!(!selects(Some(&sel), &host("edge-77", &[("role", "web"), ("env", "prod")])));
        assert!(!selects(Some(&sel), &host("web-1", &[("role", "web")])), "missing label");
        assert!(
            !selects(Some(&sel), &host("web-1", &[("role", "web"), ("env", "dev")])),
            "other value"
        );
        assert!(!selects(Some(&sel), &host("db-1", &[("role", "web"), ("env", "prod")])), "name");
        let labels_only = b.selector(&[("role", "web")], &[]);
        assert!(selects(Some(&labels_only), &host("anything", &[("role", "web")])));
        let names_only = b.selector(&[], &["db?"]);
        assert!(selects(Some(&names_only), &host("db1", &[])));
        assert!(!selects(Some(&names_only), &host("db12", &[])));
        assert!(selects(None, &host("x", &[])));
    }

    #[test]
    fn globs() {
        let cases = [
            ("*", "", true),
            ("*", "abc", true),
            ("web-*", "web-", true),
            ("web-*", "web-12", true),
            ("web-*", "db-12", false),
            ("*-prod", "web-1-prod", true),
            ("*-prod", "web-1-prod2", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXcYYb", false),
            ("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("?", "x", true),
            ("?", "", false),
            ("??", "é1", true),
            ("web-[0-9]", "web-5", true),
            ("web-[0-9]", "web-a", false),
            ("web-[!0-9]", "web-a", true),
            ("web-[!0-9]", "web-5", false),
            ("[abc]x", "bx", true),
            ("[abc]x", "dx", false),
            ("[]]", "]", true),
            ("[!]]", "a", true),
            ("[a-]", "-", true),
            ("web[", "web[", true),
            ("web[1", "web1", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(glob_matches(pattern, name), want, "{pattern:?} vs {name:?}");
        }
    }

    #[test]
    fn defaults_per_direction() {
        let b = B::new();
        let mut deny_enf = b.policy("b-enf", vec![], vec![]);
        deny_enf.defaults.ingress = Some(b.sp(Action::Deny));
        let mut deny_audit = b.policy("a-audit", vec![], vec![]);
        deny_audit.mode = Mode::Audit;
        deny_audit.defaults.ingress = Some(b.sp(Action::Deny));
        deny_audit.defaults.egress = Some(b.sp(Action::Deny));
        let mut allow_enf = b.policy("0-allow", vec![], vec![]);
        allow_enf.defaults.egress = Some(b.sp(Action::Allow));
        let mut elsewhere = b.policy("c-elsewhere", vec![], vec![]);
        elsewhere.hosts = Some(b.selector(&[("role", "db")], &[]));
        elsewhere.defaults.egress = Some(b.sp(Action::Deny));

        let docs: Vec<Document> = [deny_enf, deny_audit, allow_enf, elsewhere]
            .into_iter()
            .map(Document::Policy)
            .collect();
        let (set, diags) = run(&docs);
        assert!(diags.is_empty());
        let p = set.unwrap().for_host(&host("h", &[]));
        assert_eq!(p.policies, vec!["0-allow", "a-audit", "b-enf"]);
        assert_eq!(
            p.ingress_default,
            DirectionDefault {
                verdict: Action::Deny,
                audit: Action::Deny,
                verdict_policy: Some("b-enf".into()),
                audit_policy: Some("b-enf".into()),
            }
        );
        // Only the audit policy denies egress; the db-only policy does not count for this host.
        assert_eq!(
            p.egress_default,
            DirectionDefault {
                verdict: Action::Allow,
                audit: Action::Deny,
                verdict_policy: None,
                audit_policy: Some("a-audit".into()),
            }
        );
    }

    #[test]
    fn for_host_selects_and_orders_rules() {
        let b = B::new();
        let mut web = b.policy(
            "web",
            vec![
                b.rule(None, Action::Allow, None, Proto::Tcp),
                b.rule(Some("n"), Action::Deny, None, Proto::Udp),
            ],
            vec![b.rule(None, Action::Allow, Some(&["10.0.0.0/8"]), Proto::Any)],
        );
        web.hosts = Some(b.selector(&[("role", "web")], &[]));
        let mut base = b.policy("base", vec![], vec![b.rule(None, Action::Deny, None, Proto::Any)]);
        base.mode = Mode::Audit;
        let docs = vec![Document::Policy(web), Document::Policy(base)];
        let (set, _) = run(&docs);
        let set = set.unwrap();

        let p = set.for_host(&host("w", &[("role", "web")]));
        let order: Vec<(String, Direction, u32)> =
            p.rules.iter().map(|r| (r.policy.clone(), r.direction, r.index)).collect();
        assert_eq!(
            order,
            vec![
                ("base".into(), Direction::Egress, 0),
                ("web".into(), Direction::Ingress, 0),
                ("web".into(), Direction::Ingress, 1),
                ("web".into(), Direction::Egress, 0),
            ]
        );
        assert_eq!(p.rules[0].mode, Mode::Audit);
        assert_eq!(p.rules[1].peers, vec![AddrTerm::Any], "absent from = any");
        assert_eq!(p.rules[2].name.as_deref(), Some("n"));
        let ids: BTreeSet<RuleId> = p.rules.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 4);
        assert!(!ids.contains(&RuleId(0)));

        let other = set.for_host(&host("d", &[("role", "db")]));
        assert_eq!(other.policies, vec!["base"]);
        assert_eq!(other.rules, p.rules[..1]);
    }

    #[test]
    fn rule_ids_do_not_depend_on_host_or_other_policies() {
        let b = B::new();
        let mut web = b.policy(
            "web",
            vec![
                b.rule(Some("https"), Action::Allow, None, Proto::Tcp),
                b.rule(None, Action::Deny, None, Proto::Any),
            ],
            vec![],
        );
        web.hosts = Some(b.selector(&[("role", "web")], &[]));
        let db = b.policy("db", vec![b.rule(None, Action::Allow, None, Proto::Tcp)], vec![]);
        let ids_of = |set: &PolicySet, h: &HostIdentity| -> BTreeMap<(String, u32), RuleId> {
            set.for_host(h).rules.iter().map(|r| ((r.policy.clone(), r.index), r.id)).collect()
        };
        let web_host = host("w", &[("role", "web")]);
        let (before, _) = run(&[Document::Policy(web.clone()), Document::Policy(db.clone())]);
        let before = before.unwrap();

        // A new policy sorted first, selected by another host only.
        let mut aaa =
            b.policy("aaa", vec![b.rule(None, Action::Deny, None, Proto::Any); 3], vec![]);
        aaa.hosts = Some(b.selector(&[("role", "x")], &[]));
        let (after, _) = run(&[Document::Policy(aaa), Document::Policy(web), Document::Policy(db)]);
        let after = after.unwrap();
        assert_eq!(ids_of(&before, &web_host), ids_of(&after, &web_host));

        // The db rule has the same id for every host that gets it.
        let db_id = |set: &PolicySet, h: &HostIdentity| {
            set.for_host(h).rules.iter().find(|r| r.policy == "db").map(|r| r.id)
        };
        assert_eq!(db_id(&after, &web_host), db_id(&after, &host("x", &[("role", "x")])));
        assert_eq!(db_id(&before, &web_host), db_id(&after, &web_host));
        // And it is the id of its key.
        let want = ids::assign(
            [
                "aaa\0ingress\0#0",
                "aaa\0ingress\0#1",
                "aaa\0ingress\0#2",
                "db\0ingress\0#0",
                "web\0ingress\0https",
                "web\0ingress\0#1",
            ]
            .map(String::from),
        );
        assert_eq!(db_id(&after, &web_host), Some(RuleId(want["db\0ingress\0#0"])));
    }

    #[test]
    fn test_hosts_and_case_flows() {
        let b = B::new();
        let t = match b.test("t", "web-1", &[("role", "web")]) {
            Document::PolicyTest(t) => t,
            _ => unreachable!(),
        };
        assert_eq!(host_of_test(&t), host("web-1", &[("role", "web")]));
        let case = TestCase {
            span: b.span(),
            direction: Direction::Egress,
            peer: b.sp("10.0.5.3".parse().unwrap()),
            proto: Proto::Tcp,
            port: Some(5432),
            icmp: None,
            workload: Some("system.slice/app.service".into()),
            expect: b.sp(ast::Expect::Allow),
        };
        let f = flow_of_case(&case);
        assert_eq!(
            f,
            Flow {
                port: Some(5432),
                workload: Some("system.slice/app.service".into()),
                ..Flow::new(Direction::Egress, "10.0.5.3".parse().unwrap(), 6)
            }
        );
        let any = flow_of_case(&TestCase { proto: Proto::Any, port: None, ..case });
        assert_eq!(any.proto, ANY_PROTO_NUMBER);
    }
}
