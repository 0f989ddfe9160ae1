//! Results: what every part hands back (tables for people, JSON for tools, target verdicts),
//! and the two files written from them, `BENCHMARKS.md` and `benchmarks/results.json`.
//!
//! A part fills [`Part`]s with [`Table`]s of already formatted cells plus the raw figures as
//! JSON; the targets are [`Target`]s whose value is the ratio the target is about.
//! Both files are written from the same values, so the Markdown never says something the
//! JSON does not.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

/// Median, min and max of a sample.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(v: &[f64]) -> Summary {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        if n == 0 {
            return Summary { n, median: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        Summary { n, median, min: s[0], max: s[n - 1] }
    }

    /// "median (min-max)" with `digits` decimals.
    pub fn cell(&self, digits: usize) -> String {
        if self.n == 0 {
            return "-".into();
        }
        format!("{:.d$} ({:.d$}-{:.d$})", self.median, self.min, self.max, d = digits)
    }
}

/// The `p`th percentile (nearest rank).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[i.clamp(1, s.len()) - 1]
}

#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Part {
    pub id: String,
    pub title: String,
    /// How the part measured, for the report.
    pub method: Vec<String>,
    pub tables: Vec<Table>,
    /// What did not run or did not count, and why.
    pub notes: Vec<String>,
    pub data: Value,
}

impl Part {
    pub fn new(id: &str, title: &str) -> Part {
        Part {
            id: id.into(),
            title: title.into(),
            method: Vec::new(),
            tables: Vec::new(),
            notes: Vec::new(),
            data: Value::Null,
        }
    }
}

/// Which way a target's ratio must go.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtMost,
    AtLeast,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub id: String,
    pub measure: String,
    pub target: String,
    pub bound: Bound,
    pub limit: f64,
    /// The measured ratio; `None` when it was not measured (see `note`).
    pub value: Option<f64>,
    pub met: Option<bool>,
    pub note: String,
}

impl Target {
    pub fn new(id: &str, measure: &str, target: &str, bound: Bound, limit: f64) -> Target {
        Target {
            id: id.into(),
            measure: measure.into(),
            target: target.into(),
            bound,
            limit,
            value: None,
            met: None,
            note: String::new(),
        }
    }

    pub fn measured(mut self, value: f64, note: impl Into<String>) -> Target {
        if value.is_finite() {
            self.value = Some(value);
            self.met = Some(match self.bound {
                Bound::AtMost => value <= self.limit,
                Bound::AtLeast => value >= self.limit,
            });
        }
        self.note = note.into();
        self
    }

    pub fn missing(mut self, why: impl Into<String>) -> Target {
        self.note = why.into();
        self
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_mb: u64,
    pub kernel: String,
    pub commit: String,
    pub load_before: String,
    pub load_after: String,
    pub tools: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub mode: String,
    pub command: String,
    pub duration_s: f64,
    pub machine: Machine,
    pub targets: Vec<Target>,
    pub parts: Vec<Part>,
}

fn ratio_cell(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) if v >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    }
}

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `{}` ({} mode, {:.0} s). Every comparison ran both sides in the same run, \
         interleaved; the targets (R1-R8) are ratios, the absolute \
         figures are context for this machine only. The full method is in \
         docs/benchmarks.md, \"The suite\".\n",
        r.command, r.mode, r.duration_s
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", m.date);
    let _ = writeln!(s, "| machine | {} CPUs, {}, {} MB |", m.cpus, m.cpu, m.memory_mb);
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| commit | {} |", m.commit);
    let _ = writeln!(
        s,
        "| load average (1, 5, 15 min) | {} before, {} after |",
        m.load_before, m.load_after
    );
    for (tool, v) in &m.tools {
        let _ = writeln!(s, "| {tool} | {v} |");
    }
    let load: f64 =
        m.load_before.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    if load >= 0.5 {
        let _ = writeln!(
            s,
            "\n**Noisy figures:** the machine was not idle (load average {} at the start on {} \
             CPUs: other work was running), so single figures can be off by tens of percent; \
             compare the ratios and the min-max ranges, and rerun on a quiet machine before \
             drawing fine conclusions.",
            m.load_before, m.cpus
        );
    }
    let _ = writeln!(s, "\n## Targets\n");
    let _ =
        writeln!(s, "| | measure | target | measured | met | note |\n|---|---|---|---:|---|---|");
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            t.id,
            t.measure,
            t.target,
            ratio_cell(t.value),
            met,
            t.note
        );
    }
    for p in &r.parts {
        let _ = writeln!(s, "\n## {}\n", p.title);
        for line in &p.method {
            let _ = writeln!(s, "{line}");
        }
        if !p.method.is_empty() {
            let _ = writeln!(s);
        }
        for t in &p.tables {
            let _ = writeln!(s, "{}\n", t.title);
            let _ = writeln!(s, "| {} |", t.columns.join(" | "));
            let _ = writeln!(
                s,
                "|{}|",
                t.columns
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i == 0 { "---" } else { "---:" })
                    .collect::<Vec<_>>()
                    .join("|")
            );
            for row in &t.rows {
                let _ = writeln!(s, "| {} |", row.join(" | "));
            }
            let _ = writeln!(s);
        }
        for n in &p.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// Writes `BENCHMARKS.md` and `benchmarks/results.json` under `out`.
pub fn write(out: &Path, r: &Results) -> anyhow::Result<()> {
    let dir = out.join("benchmarks");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(r).context("serialize the results")?;
    std::fs::write(dir.join("results.json"), json + "\n").context("write results.json")?;
    std::fs::write(out.join("BENCHMARKS.md"), markdown(r)).context("write BENCHMARKS.md")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_percentiles() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(s.cell(1), "2.5 (1.0-10.0)");
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 50.0), 50.0);
    }

    #[test]
    fn targets_judge_by_their_bound() {
        let t = Target::new("R1", "m", "at most 6x", Bound::AtMost, 6.0);
        assert_eq!(t.clone().measured(5.9, "").met, Some(true));
        assert_eq!(t.clone().measured(6.1, "").met, Some(false));
        assert_eq!(t.measured(f64::NAN, "").met, None);
        let t = Target::new("R4", "m", "at least 0.6", Bound::AtLeast, 0.6);
        assert_eq!(t.measured(0.7, "").met, Some(true));
    }
}
