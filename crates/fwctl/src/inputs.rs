//! Turning command-line paths into compiler inputs.
//!
//! A path is a file, or a folder searched recursively for `*.yaml` and `*.yml`. Files are
//! sorted so that output never depends on directory order. A file larger than the parse limit
//! is not read in full: its size is enough for the compiler to reject it, so a stray 100 MB
//! file costs nothing. Problems with paths are diagnostics like any other.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use fw_compiler::diag::{Code, Diagnostic};
use fw_compiler::load::Input;
use fw_compiler::yaml::ParseLimits;

/// Collects the inputs under `paths`.
pub fn collect(paths: &[PathBuf], limits: &ParseLimits) -> (Vec<Input>, Vec<Diagnostic>) {
    let mut files = Vec::new();
    let mut diags = Vec::new();
    for path in paths {
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                let before = files.len();
                walk(path, &mut files, &mut diags);
                if files.len() == before {
                    diags.push(
                        Diagnostic::error(
                            Code::NoPolicyFiles,
                            format!("no *.yaml or *.yml files under {}", path.display()),
                        )
                        .hint("policy files must end in .yaml or .yml"),
                    );
                }
            }
            Ok(_) => files.push(path.clone()),
            Err(e) => diags.push(io_error(path, &e)),
        }
    }
    files.sort();
    files.dedup();
    let mut inputs = Vec::with_capacity(files.len());
    for file in files {
        match read_bounded(&file, limits.max_file_bytes) {
            Ok(bytes) => inputs.push(Input::new(file.display().to_string(), bytes)),
            Err(e) => diags.push(io_error(&file, &e)),
        }
    }
    (inputs, diags)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, diags: &mut Vec<Diagnostic>) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(io_error(dir, &e));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                diags.push(io_error(dir, &e));
                continue;
            }
        };
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            // Hidden folders (.git and the like) never hold policy.
            if !entry.file_name().to_string_lossy().starts_with('.') {
                walk(&path, files, diags);
            }
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(path);
        }
    }
}

/// Reads at most `limit + 1` bytes: enough for the parser to see the file is too large.
fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn io_error(path: &Path, e: &std::io::Error) -> Diagnostic {
    Diagnostic::error(Code::Io, format!("cannot read {}: {e}", path.display()))
}
