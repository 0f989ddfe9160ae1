//! Rendering diagnostics for people (code frames), for tools (JSON) and for GitHub Actions
//! (workflow annotations). The compiler hands over data; only this module formats it.

use std::io::IsTerminal;

use fw_compiler::diag::{Diagnostic, Severity};
use fw_compiler::source::SourceMap;
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Code frames, coloured on a terminal.
    Human,
    /// A JSON list of diagnostics.
    Json,
    /// GitHub Actions workflow annotations.
    Github,
}

/// Whether to colour output: only on a terminal, and never when NO_COLOR is set.
pub fn colour(stream_is_terminal: bool) -> bool {
    stream_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub fn stdout_colour() -> bool {
    colour(std::io::stdout().is_terminal())
}

/// Renders every diagnostic in `format`.
pub fn diagnostics(
    diags: &[Diagnostic],
    sources: &SourceMap,
    format: Format,
    colour: bool,
) -> String {
    match format {
        Format::Human => diags.iter().map(|d| human(d, sources, colour)).collect(),
        Format::Json => {
            let records: Vec<_> = diags.iter().map(|d| d.to_record(sources)).collect();
            let mut s = serde_json::to_string_pretty(&records).unwrap_or_else(|_| "[]".into());
            s.push('\n');
            s
        }
        Format::Github => diags.iter().map(|d| github(d, sources)).collect(),
    }
}

/// One diagnostic as a miette code frame.
pub fn human(d: &Diagnostic, sources: &SourceMap, colour: bool) -> String {
    let theme = if colour { GraphicalTheme::unicode() } else { GraphicalTheme::unicode_nocolor() };
    let handler = GraphicalReportHandler::new_themed(theme).with_links(false).with_width(100);
    let mut help: Vec<String> = Vec::new();
    let mut report = MietteDiagnostic::new(d.message.clone())
        .with_code(d.code.as_str())
        .with_severity(match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        });
    let mut source = None;
    if let Some(primary) = &d.primary {
        let file = sources.get(primary.span.file);
        report = report.and_label(LabeledSpan::new_primary_with_span(
            Some(primary.message.clone()),
            (primary.span.start as usize, primary.span.len() as usize),
        ));
        for other in &d.secondary {
            if other.span.file == primary.span.file {
                report = report.and_label(LabeledSpan::new_with_span(
                    Some(other.message.clone()),
                    (other.span.start as usize, other.span.len() as usize),
                ));
            } else {
                help.push(format!("{}: {}", other.message, sources.location(other.span)));
            }
        }
        source = Some(NamedSource::new(file.name.clone(), file.text.clone()));
    }
    if let Some(h) = &d.hint {
        help.insert(0, h.clone());
    }
    if !help.is_empty() {
        report = report.with_help(help.join("\n"));
    }
    let report = match source {
        Some(src) => miette::Report::new(report).with_source_code(src),
        None => miette::Report::new(report),
    };
    let mut out = String::new();
    if handler.render_report(&mut out, report.as_ref()).is_err() {
        out = format!("{}: {}\n", d.code, d.message);
    }
    out
}

/// `::error file=...,line=...,col=...,title=FW002::message`
fn github(d: &Diagnostic, sources: &SourceMap) -> String {
    let level = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    let r = d.to_record(sources);
    let mut props = Vec::new();
    if let (Some(file), Some(line), Some(col)) = (&r.file, r.line, r.column) {
        props.push(format!("file={}", escape_property(file)));
        props.push(format!("line={line}"));
        props.push(format!("col={col}"));
        if let Some((end_line, end_col)) = r.end {
            props.push(format!("endLine={end_line}"));
            if end_line == line {
                props.push(format!("endColumn={end_col}"));
            }
        }
    }
    props.push(format!("title={}", escape_property(r.code)));
    let mut message = d.message.clone();
    if let Some(h) = &d.hint {
        message.push_str(&format!("\nhint: {h}"));
    }
    format!("::{level} {}::{}\n", props.join(","), escape_data(&message))
}

fn escape_data(s: &str) -> String {
    s.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
}

fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// "2 errors, 1 warning"
pub fn summary(diags: &[Diagnostic]) -> String {
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    format!("{}, {}", count(errors, "error"), count(warnings, "warning"))
}

/// "1 file", "2 files".
pub fn count(n: usize, word: &str) -> String {
    if n == 1 { format!("{n} {word}") } else { format!("{n} {word}s") }
}
