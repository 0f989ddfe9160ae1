//! The front door: named byte buffers in, documents, a resolved policy set and diagnostics out.
//!
//! Callers do their own I/O (`fwctl` reads files and folders, the daemon reads blobs from a git
//! tree), so this takes `Input`s: a display name and the bytes. Every stage runs as far as it
//! can and all diagnostics of the run are returned together; a policy set is returned only when
//! there is no error, so nothing half-checked can be compiled or applied.

use crate::ast::Document;
use crate::diag::{Diagnostic, Diagnostics};
use crate::resolve::PolicySet;
use crate::source::{SourceFile, SourceMap};
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

/// Parses, lowers and resolves every input.
pub fn load(inputs: impl IntoIterator<Item = Input>, limits: &ParseLimits) -> Loaded {
    let mut sources = SourceMap::new();
    let mut documents = Vec::new();
    let mut diagnostics = Diagnostics::default();
    for input in inputs {
        // Invalid UTF-8 is kept lossily for display; `yaml::parse` reports it from the bytes.
        let text =
            String::from_utf8_lossy(&input.bytes[..input.bytes.len().min(limits.max_file_bytes)])
                .into_owned();
        let file = sources.add(SourceFile::new(input.name, text));
        match yaml::parse(file, &input.bytes, limits) {
            Ok(nodes) => {
                let (docs, diags) = crate::lower::lower(&nodes);
                documents.extend(docs);
                diagnostics.extend(diags);
            }
            Err(d) => diagnostics.push(d),
        }
    }
    let (policy_set, diags) = crate::resolve::resolve(&documents, &sources);
    diagnostics.extend(diags);
    let policy_set = if diagnostics.has_errors() { None } else { policy_set };
    Loaded { sources, documents, policy_set, diagnostics: diagnostics.into_sorted() }
}
