//! The front door: named byte buffers in, documents, a resolved policy set and diagnostics out.
//!
//! Callers do their own I/O (`fwctl` reads files and folders, the daemon reads blobs from a git
//! tree), so this takes `Input`s: a display name and the bytes. Every stage runs as far as it
//! can and all diagnostics of the run are returned together; a policy set is returned only when
//! there is no error, so nothing half-checked can be compiled or applied.
//!
//! Files are parsed and lowered independently of each other, so a large policy set spreads
//! them over the machine's cores: workers take the next file from a shared queue and the
//! results are put back in input order (file ids are input positions), so the output is the
//! same whatever the number of threads. Only resolution, which needs every document, runs
//! once over all of them.

use std::sync::Mutex;

use crate::ast::Document;
use crate::diag::{Diagnostic, Diagnostics};
use crate::resolve::PolicySet;
use crate::source::{FileId, SourceFile, SourceMap};
use crate::yaml::{self, ParseLimits};

/// One policy file: the name to show (usually a relative path) and its raw bytes.
#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Input {
    pub fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Self { name: name.into(), bytes: bytes.into() }
    }
}

/// The result of loading a set of files.
#[derive(Debug)]
pub struct Loaded {
    pub sources: SourceMap,
    pub documents: Vec<Document>,
    /// `Some` only when no diagnostic is an error.
    pub policy_set: Option<PolicySet>,
    /// Errors and warnings from every stage, sorted by position.
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Below this much input in all, files are loaded on the calling thread: starting threads
/// would cost more than they save (parsing runs at roughly 10-20 MB/s).
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// Parses, lowers and resolves every input, using up to as many threads as the process may
/// run on (`std::thread::available_parallelism`).
pub fn load(inputs: impl IntoIterator<Item = Input>, limits: &ParseLimits) -> Loaded {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    load_with_threads(inputs, limits, threads)
}

/// [`load`] with at most `threads` threads parsing and lowering files (0 or 1: all on the
/// calling thread). The result is the same for every `threads`.
pub fn load_with_threads(
    inputs: impl IntoIterator<Item = Input>,
    limits: &ParseLimits,
    threads: usize,
) -> Loaded {
    let inputs: Vec<Input> = inputs.into_iter().collect();
    let numbered = inputs.into_iter().enumerate().map(|(i, input)| (file_id(i), input)).collect();
    assemble(load_files(numbered, limits, threads))
}

/// The files' sources, documents and diagnostics, in file order, and the policy set resolved
/// from them: the last step of [`load_with_threads`], shared with `cache`, which loads some
/// files and takes the others from earlier loads. `files` must be every file, in order.
pub(crate) fn assemble(files: impl IntoIterator<Item = (FileId, LoadedFile)>) -> Loaded {
    let mut sources = SourceMap::new();
    let mut documents = Vec::new();
    let mut diagnostics = Diagnostics::default();
    for (id, file) in files {
        let added = sources.add(file.source);
        debug_assert_eq!(added, id, "files are added in input order");
        documents.extend(file.documents);
        diagnostics.extend(file.diagnostics);
    }
    let (policy_set, diags) = crate::resolve::resolve(&documents, &sources);
    diagnostics.extend(diags);
    let policy_set = if diagnostics.has_errors() { None } else { policy_set };
    Loaded { sources, documents, policy_set, diagnostics: diagnostics.into_sorted() }
}

/// One file, parsed and lowered: a function of its id (the spans carry it), its name, its
/// bytes and the parse limits only.
#[derive(Clone, Debug)]
pub(crate) struct LoadedFile {
    pub(crate) source: SourceFile,
    pub(crate) documents: Vec<Document>,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

/// Every input through [`load_file`], in input order, on up to `threads` threads.
pub(crate) fn load_files(
    numbered: Vec<(FileId, Input)>,
    limits: &ParseLimits,
    threads: usize,
) -> Vec<(FileId, LoadedFile)> {
    let total: usize = numbered.iter().map(|(_, i)| i.bytes.len()).sum();
    let threads = if total < PARALLEL_MIN_BYTES { 1 } else { threads.min(numbered.len()) };
    let numbered = numbered.into_iter();
    if threads <= 1 {
        return numbered.map(|(id, input)| (id, load_file(id, input, limits))).collect();
    }
    let queue = Mutex::new(numbered.collect::<Vec<_>>().into_iter());
    let work = || {
        let mut done = Vec::new();
        loop {
            // The lock is held only to take the next file (a poisoned lock means another
            // worker panicked; that panic is re-raised when the scope ends).
            let next = match queue.lock() {
                Ok(mut q) => q.next(),
                Err(_) => None,
            };
            let Some((id, input)) = next else { break };
            done.push((id, load_file(id, input, limits)));
        }
        done
    };
    // Lowering recurses along the node tree, which may be as deep as the depth budget: the
    // helpers get the stack the parser's own thread gets (reserved, not touched).
    let stack = (limits.max_depth.saturating_add(16)).saturating_mul(256 << 10);
    let mut results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("fw-load".into())
                    .stack_size(stack)
                    .spawn_scoped(scope, work)
                    .ok()
            })
            .collect();
        // The calling thread works too; without helpers (no threads to be had) it does all.
        let mut results = work();
        for helper in helpers {
            match helper.join() {
                Ok(done) => results.extend(done),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    });
    results.sort_unstable_by_key(|(id, _)| *id);
    results
}

pub(crate) fn file_id(index: usize) -> FileId {
    FileId(u32::try_from(index).unwrap_or(u32::MAX))
}

fn load_file(id: FileId, input: Input, limits: &ParseLimits) -> LoadedFile {
    let Input { name, bytes } = input;
    let (text, parsed) = match String::from_utf8(bytes) {
        // The usual case: the bytes become the text without a copy.
        Ok(text) if text.len() <= limits.max_file_bytes => {
            let parsed = yaml::parse(id, text.as_bytes(), limits);
            (text, parsed)
        }
        other => {
            let bytes = other.map_or_else(|e| e.into_bytes(), String::into_bytes);
            // Invalid UTF-8 is kept lossily for display; `yaml::parse` reports it from the
            // bytes (and a file over the limit as too large).
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(limits.max_file_bytes)])
                .into_owned();
            let parsed = yaml::parse(id, &bytes, limits);
            (text, parsed)
        }
    };
    let (documents, diagnostics) = match parsed {
        Ok(nodes) => crate::lower::lower(&nodes),
        Err(d) => (Vec::new(), vec![d]),
    };
    LoadedFile { source: SourceFile::new(name, text), documents, diagnostics }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn files_of(dir: &str) -> Vec<(String, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| {
                        let bytes = std::fs::read(e.path()).ok()?;
                        Some((e.file_name().to_string_lossy().into_owned(), bytes))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Everything a caller sees, as text: file names, documents, diagnostics, policy set.
    fn render(loaded: &Loaded) -> String {
        let names: Vec<&str> = loaded.sources.files().map(|(_, f)| f.name.as_str()).collect();
        format!(
            "{names:?}\n{:#?}\n{:#?}\n{:#?}",
            loaded.documents, loaded.diagnostics, loaded.policy_set
        )
    }

    fn assert_same_for_any_threads(inputs: &[Input]) -> Loaded {
        let total: usize = inputs.iter().map(|i| i.bytes.len()).sum();
        assert!(total >= PARALLEL_MIN_BYTES, "too small to load in parallel: {total} bytes");
        let limits = ParseLimits::default();
        let sequential = load_with_threads(inputs.to_vec(), &limits, 1);
        let expected = render(&sequential);
        for threads in [2, 3, 8] {
            let parallel = load_with_threads(inputs.to_vec(), &limits, threads);
            assert!(render(&parallel) == expected, "{threads} threads load differently");
        }
        sequential
    }

    /// Every fixture and fuzz seed, many times over under different names, plus a file that
    /// is not UTF-8 and one over the size limit: errors of every stage, in the same order.
    #[test]
    fn parallel_loading_reports_the_same_diagnostics_in_the_same_order() {
        let mut corpus = files_of("tests/fixtures/invalid");
        corpus.extend(files_of("tests/fixtures/valid"));
        corpus.extend(files_of("../../fuzz/seeds/parse_compile"));
        assert!(corpus.len() >= 25);
        let mut inputs: Vec<Input> = (0..30)
            .flat_map(|round| {
                corpus
                    .iter()
                    .map(move |(name, bytes)| Input::new(format!("{round}/{name}"), bytes.clone()))
            })
            .collect();
        inputs.insert(7, Input::new("binary.yaml", b"a: \xff\xfe\n".to_vec()));
        let limits = ParseLimits::default();
        inputs.insert(100, Input::new("huge.yaml", vec![b'#'; limits.max_file_bytes + 1]));
        let loaded = assert_same_for_any_threads(&inputs);
        assert!(loaded.has_errors());
        assert!(loaded.diagnostics.len() > 100, "{} diagnostics", loaded.diagnostics.len());
    }

    /// A policy set that loads: the same documents, rule ids and policy set either way.
    #[test]
    fn parallel_loading_builds_the_same_policy_set() {
        let inputs: Vec<Input> = (0..600)
            .map(|i| {
                let text = format!(
                    "apiVersion: fw/v1\nkind: AddressSet\nmetadata: {{name: set-{i}}}\n\
                     spec:\n  addresses: [10.{}.{}.0/24, 2001:db8:{i:x}::/48]\n---\n\
                     apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: policy-{i}}}\nspec:\n  \
                     hosts: {{labels: {{role: web}}, names: [\"web-*\"]}}\n  \
                     ingress:\n    - {{name: https, action: allow, from: [{{set: set-{i}}}], \
                     proto: tcp, ports: [443, 8000-8100]}}\n    - {{action: deny, from: [any]}}\n  \
                     egress:\n    - {{action: allow, to: [{{set: set-{}}}], proto: udp, ports: \
                     [53], workloads: [system.slice/app-{i}.service]}}\n",
                    i / 256,
                    i % 256,
                    (i + 1) % 600
                );
                Input::new(format!("policies/{i:03}.yaml"), text)
            })
            .collect();
        let loaded = assert_same_for_any_threads(&inputs);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics.first());
        assert_eq!(loaded.policy_set.map(|s| s.policies.len()), Some(600));
    }
}
