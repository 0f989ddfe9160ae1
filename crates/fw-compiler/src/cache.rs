//! Loading the same policy set again and again, as a daemon does on every commit: files that
//! did not change are not parsed and lowered again.
//!
//! Why it is built this way:
//! - Parsing and lowering a file is a function of the file's id (its position in the input,
//!   which every span carries), its name, its bytes and the parse limits, and of nothing
//!   else (`load`'s module docs: files are loaded independently). So a file is taken from the
//!   cache only when all four are equal to an earlier load's: the bytes are compared in full,
//!   not by a hash or an id the caller vouches for. That is what makes the result the same as
//!   [`crate::load::load`]'s for the same inputs, whatever was loaded before; the tests check
//!   it over sequences of commits that add, remove, rename and change files and change them
//!   back.
//! - Resolution needs every document and is run in full on each load (the same code as
//!   `load`'s last step, `load::assemble`); only per-file work is reused.
//! - The cache keeps the files of the last load only: a file removed or renamed leaves it at
//!   the next load, so its size follows the policy set's.
//! - It keeps what is costly to parse and cheap to hold, and no more: address sets, however
//!   large (a prefix takes about as much memory parsed as it takes text, and is what makes a
//!   large policy slow to parse), and rules and test cases up to a budget
//!   ([`DEFAULT_RULE_BUDGET`]). A parsed rule takes several times its text in memory (spans,
//!   names, peer and port lists), so a policy set with 100k rules would hold tens of MB in the
//!   cache to save a few hundred milliseconds a commit; past the budget its files are parsed
//!   again at each load. Cached or not, a file's result is the same.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ast::Document;
use crate::load::{Input, Loaded, LoadedFile, assemble, file_id, load_files};
use crate::source::FileId;
use crate::yaml::ParseLimits;

/// What one [`LoadCache::load`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Files taken from the cache.
    pub reused: usize,
    /// Files parsed and lowered.
    pub parsed: usize,
    /// Bytes of the files parsed and lowered.
    pub parsed_bytes: usize,
    /// Parsing and lowering the files not in the cache.
    pub parse: Duration,
    /// Putting the files together and resolving the policy set.
    pub resolve: Duration,
}

/// The rules and test cases [`LoadCache::new`] keeps parsed, over all its files (see the module
/// docs): about 4 MB of documents, and 30 ms or so of parsing saved per load.
pub const DEFAULT_RULE_BUDGET: usize = 10_000;

/// The parsed and lowered files of the last load, by position and name.
#[derive(Debug)]
pub struct LoadCache {
    limits: ParseLimits,
    threads: usize,
    /// At most this many rules and test cases in `files`.
    rule_budget: usize,
    files: HashMap<(FileId, String), LoadedFile>,
    /// Where each name of the last load is in `files`.
    names: HashMap<String, FileId>,
}

impl LoadCache {
    /// A cache for loads with `limits`, parsing on as many threads as [`crate::load::load`].
    pub fn new(limits: ParseLimits) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self::with_threads(limits, threads)
    }

    /// [`LoadCache::new`] with at most `threads` threads parsing.
    pub fn with_threads(limits: ParseLimits, threads: usize) -> Self {
        Self {
            limits,
            threads,
            rule_budget: DEFAULT_RULE_BUDGET,
            files: HashMap::new(),
            names: HashMap::new(),
        }
    }

    /// Keeps at most `rules` rules and test cases parsed (see the module docs); 0 keeps only
    /// files without any.
    #[must_use]
    pub fn with_rule_budget(mut self, rules: usize) -> Self {
        self.rule_budget = rules;
        self
    }

    pub fn limits(&self) -> &ParseLimits {
        &self.limits
    }

    /// The bytes of the file the last load had at `name`, if it is cached.
    pub fn bytes_of(&self, name: &str) -> Option<&[u8]> {
        let id = *self.names.get(name)?;
        self.files.get(&(id, name.to_owned())).map(|f| f.source.text.as_bytes())
    }

    /// What [`crate::load::load_with_threads`] returns for `inputs`, parsing only the files
    /// that differ from the last load's (by position, name or bytes).
    pub fn load(&mut self, inputs: impl IntoIterator<Item = Input>) -> (Loaded, LoadStats) {
        let mut stats = LoadStats::default();
        let t0 = Instant::now();
        let mut old = std::mem::take(&mut self.files);
        let mut slots: Vec<Option<LoadedFile>> = Vec::new();
        let mut misses = Vec::new();
        // Rules and test cases in `self.files` so far: files kept from the last load first,
        // then new ones, each while it fits.
        let mut held = 0;
        for (i, input) in inputs.into_iter().enumerate() {
            let id = file_id(i);
            let key = (id, input.name);
            // Only a file whose text is its bytes is cached (a file that is not UTF-8 or over
            // the size limit keeps a lossy or cut text), so comparing the text compares the
            // bytes.
            match old.remove(&key) {
                Some(file) if file.source.text.as_bytes() == input.bytes.as_slice() => {
                    stats.reused += 1;
                    held += rule_count(&file);
                    if held <= self.rule_budget {
                        slots.push(Some(file.clone()));
                        self.files.insert(key, file);
                    } else {
                        held -= rule_count(&file);
                        slots.push(Some(file));
                    }
                }
                _ => {
                    stats.parsed += 1;
                    stats.parsed_bytes += input.bytes.len();
                    slots.push(None);
                    misses.push((id, Input { name: key.1, bytes: input.bytes }));
                }
            }
        }
        drop(old);
        // A file in UTF-8 within the size limit gets its bytes as its text (`load::load_file`);
        // only those are cached.
        let cacheable: Vec<bool> = misses
            .iter()
            .map(|(_, i)| {
                i.bytes.len() <= self.limits.max_file_bytes && std::str::from_utf8(&i.bytes).is_ok()
            })
            .collect();
        let loaded = load_files(misses, &self.limits, self.threads);
        for ((id, file), cache) in loaded.into_iter().zip(cacheable) {
            let rules = rule_count(&file);
            if cache && held + rules <= self.rule_budget {
                held += rules;
                self.files.insert((id, file.source.name.clone()), file.clone());
            }
            if let Some(slot) = slots.get_mut(id.0 as usize) {
                *slot = Some(file);
            }
        }
        self.names = self.files.keys().map(|(id, name)| (name.clone(), *id)).collect();
        stats.parse = t0.elapsed();
        let t1 = Instant::now();
        let files = slots.into_iter().enumerate().filter_map(|(i, f)| Some((file_id(i), f?)));
        let loaded = assemble(files);
        stats.resolve = t1.elapsed();
        (loaded, stats)
    }
}

/// The rules and test cases of `file`'s documents: what [`LoadCache`]'s budget counts.
fn rule_count(file: &LoadedFile) -> usize {
    file.documents
        .iter()
        .map(|d| match d {
            Document::Policy(p) => p.ingress.len() + p.egress.len(),
            Document::PolicyTest(t) => t.cases.len(),
            Document::AddressSet(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load_with_threads;

    /// Everything a caller sees, as text: file names and texts, documents, diagnostics, policy
    /// set.
    fn render(loaded: &Loaded) -> String {
        let files: Vec<(&str, &str)> =
            loaded.sources.files().map(|(_, f)| (f.name.as_str(), f.text.as_str())).collect();
        format!(
            "{files:?}\n{:#?}\n{:#?}\n{:#?}",
            loaded.documents, loaded.diagnostics, loaded.policy_set
        )
    }

    fn set(name: &str, addrs: &str) -> String {
        format!(
            "apiVersion: fw/v1\nkind: AddressSet\nmetadata: {{name: {name}}}\nspec:\n  addresses: [{addrs}]\n"
        )
    }

    fn policy(name: &str, port: u16, from: &str) -> String {
        format!(
            "apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n  defaults: {{ingress: deny}}\n  ingress:\n    - {{name: svc, action: allow, from: [{from}], proto: tcp, ports: [{port}]}}\n"
        )
    }

    /// A sequence of commits: the cached load equals a fresh load at every step, including
    /// files added, removed, renamed, changed, changed back, made invalid and not UTF-8.
    #[test]
    fn a_cached_load_equals_a_fresh_load_across_commits() {
        let blocks = set("block", "10.0.0.0/24, 10.0.2.0/24, 192.0.2.7");
        let clients = set("clients", "10.20.0.0/16");
        let base = |port| policy("base", port, "{set: clients}");
        let deny = "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: blocklist}\nspec:\n  ingress:\n    - {name: blocked, action: deny, from: [{set: block}]}\n".to_string();
        let commits: Vec<Vec<(&str, String)>> = vec![
            vec![
                ("p/base.yaml", base(80)),
                ("p/block.yaml", blocks.clone()),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
            ],
            // One rule changes.
            vec![
                ("p/base.yaml", base(81)),
                ("p/block.yaml", blocks.clone()),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
            ],
            // Changed back.
            vec![
                ("p/base.yaml", base(80)),
                ("p/block.yaml", blocks.clone()),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
            ],
            // A file removed (the ones after it move up a position).
            vec![
                ("p/base.yaml", base(80)),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.replace("{set: block}", "10.9.0.0/16")),
            ],
            // Added back under another name, at the end.
            vec![
                ("p/base.yaml", base(80)),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
                ("p/z-block.yaml", blocks.clone()),
            ],
            // Renamed, same position and bytes.
            vec![
                ("p/base.yaml", base(80)),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
                ("p/zz-block.yaml", blocks.clone()),
            ],
            // An invalid file, then a file that is not UTF-8 (errors, no policy set).
            vec![
                ("p/base.yaml", base(80).replace("tcp", "tcpp")),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
                ("p/zz-block.yaml", blocks.clone()),
            ],
            vec![
                ("p/base.yaml", base(80)),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
                ("p/zz-block.yaml", blocks.clone()),
                ("p/zzz.yaml", String::new()),
            ],
            // A duplicate name across files (a resolve error), then the first commit again.
            vec![
                ("p/base.yaml", base(80)),
                ("p/base2.yaml", base(90)),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
                ("p/zz-block.yaml", blocks.clone()),
            ],
            vec![
                ("p/base.yaml", base(80)),
                ("p/block.yaml", blocks.clone()),
                ("p/clients.yaml", clients.clone()),
                ("p/deny.yaml", deny.clone()),
            ],
        ];
        let limits = ParseLimits::default();
        let mut cache = LoadCache::with_threads(limits, 1);
        let mut reused_total = 0;
        for (n, commit) in commits.iter().enumerate() {
            let mut inputs: Vec<Input> =
                commit.iter().map(|(name, text)| Input::new(*name, text.as_bytes())).collect();
            if n == 7 {
                inputs.last_mut().expect("file").bytes = b"a: \xff\xfe\n".to_vec();
            }
            let fresh = load_with_threads(inputs.clone(), &limits, 1);
            let (cached, stats) = cache.load(inputs.clone());
            assert_eq!(render(&cached), render(&fresh), "commit {n}");
            assert_eq!(stats.reused + stats.parsed, inputs.len());
            reused_total += stats.reused;
            if n == 1 {
                assert_eq!((stats.reused, stats.parsed), (3, 1), "only the changed file is parsed");
            }
            if n == 6 || n == 7 || n == 8 {
                assert!(cached.has_errors(), "commit {n}");
            }
        }
        assert!(reused_total > 10, "the cache was used: {reused_total}");
        assert!(cache.files.len() <= commits.last().map_or(0, Vec::len));
    }

    /// Parsed on several threads or taken from the cache: the same result.
    #[test]
    fn a_cached_load_of_a_large_set_equals_a_fresh_one() {
        let mut inputs: Vec<Input> = (0..400)
            .map(|i| {
                let text = format!(
                    "{}---\n{}",
                    set(&format!("s{i}"), &format!("10.{}.{}.0/24", i / 256, i % 256)),
                    policy(&format!("p{i}"), 1000 + i as u16, &format!("{{set: s{i}}}"))
                );
                Input::new(format!("p/{i:03}.yaml"), text)
            })
            .collect();
        let limits = ParseLimits::default();
        let mut cache = LoadCache::with_threads(limits, 3);
        for round in 0..3 {
            if round == 1 {
                inputs[17].bytes = policy("p17", 4444, "any").into_bytes();
            }
            let fresh = load_with_threads(inputs.clone(), &limits, 2);
            let (cached, stats) = cache.load(inputs.clone());
            assert!(!cached.has_errors(), "{:?}", cached.diagnostics.first());
            assert_eq!(render(&cached), render(&fresh), "round {round}");
            if round > 0 {
                assert_eq!(stats.parsed, usize::from(round == 1));
            }
        }
    }

    /// Files past the rule budget are not kept: they are parsed at every load, with the same
    /// result; address sets are kept whatever the budget.
    #[test]
    fn files_past_the_rule_budget_are_parsed_again_with_the_same_result() {
        let inputs: Vec<Input> = vec![
            Input::new("p/a.yaml", policy("a", 80, "{set: clients}")),
            Input::new("p/b.yaml", policy("b", 81, "{set: clients}")),
            Input::new("p/c.yaml", policy("c", 82, "{set: clients}")),
            Input::new("p/clients.yaml", set("clients", "10.20.0.0/16, 10.30.0.0/16")),
        ];
        let limits = ParseLimits::default();
        let mut cache = LoadCache::with_threads(limits, 1).with_rule_budget(2);
        let fresh = load_with_threads(inputs.clone(), &limits, 1);
        for round in 0..3 {
            let (cached, stats) = cache.load(inputs.clone());
            assert!(!cached.has_errors(), "{:?}", cached.diagnostics.first());
            assert_eq!(render(&cached), render(&fresh), "round {round}");
            let mut kept: Vec<&str> = cache.names.keys().map(String::as_str).collect();
            kept.sort_unstable();
            assert_eq!(kept, ["p/a.yaml", "p/b.yaml", "p/clients.yaml"], "round {round}");
            assert_eq!(cache.bytes_of("p/c.yaml"), None);
            let want = if round == 0 { (0, 4) } else { (3, 1) };
            assert_eq!((stats.reused, stats.parsed), want, "round {round}");
        }
        // A budget of 0 keeps the address set only.
        let mut cache = LoadCache::with_threads(limits, 1).with_rule_budget(0);
        for _ in 0..2 {
            let (cached, _) = cache.load(inputs.clone());
            assert_eq!(render(&cached), render(&fresh));
            assert_eq!(cache.names.keys().collect::<Vec<_>>(), ["p/clients.yaml"]);
        }
    }
}
