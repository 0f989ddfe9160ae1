//! fwd's configuration file.
//!
//! Why it is built this way:
//! - Every field but `source.url` has a default, written once here (the `default_*`
//!   functions) and listed in the README; a file with only the URL is a working setup.
//! - Unknown fields are errors, not warnings: a misspelt `intreval` silently ignored would
//!   leave a host polling at the default, which nobody notices until it matters. The YAML
//!   parser reports them with line and column, and [`ConfigError`] keeps the file name so the
//!   message reads `FILE:LINE:COLUMN: ...`.
//! - Durations are strings with a unit (`500ms`, `30s`, `5m`, `1h`), the way people write
//!   them in YAML; a bare number is refused rather than guessed.
//! - Parsing is separate from reading the file and from looking up the hostname, so the rules
//!   are unit-tested without a file system.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole configuration, with defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub host: HostConfig,
    /// Interfaces the XDP ingress program attaches to.
    #[serde(default = "default_interfaces")]
    pub interfaces: Vec<String>,
    /// Where the egress programs attach and workload paths are relative to; `None`: the cgroup
    /// v2 mount point.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// fwd's own state (the git mirror).
    #[serde(default = "default_state")]
    pub state: PathBuf,
    /// The status socket.
    #[serde(default = "default_status")]
    pub status: PathBuf,
    /// Where `GET /metrics` is served.
    #[serde(default = "default_metrics")]
    pub metrics: String,
    /// How often the kernel maps are compared with the desired state in full.
    #[serde(default = "default_drift_interval", deserialize_with = "duration")]
    pub drift_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `https://`, `ssh://`, `file://` or a local path.
    pub url: String,
    /// A branch or tag.
    #[serde(default = "default_ref", rename = "ref")]
    pub reference: String,
    /// The folder inside the repository holding the policies.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// How often the remote is fetched.
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// `None`: the machine's hostname ([`Config::host_name`]).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_interfaces() -> Vec<String> {
    vec!["eth0".into()]
}
fn default_bpffs() -> PathBuf {
    PathBuf::from(fw_loader::DEFAULT_ROOT)
}
fn default_state() -> PathBuf {
    PathBuf::from("/var/lib/fwd")
}
fn default_status() -> PathBuf {
    PathBuf::from("/run/fwd/status.sock")
}
fn default_metrics() -> String {
    "127.0.0.1:9469".into()
}
fn default_drift_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_ref() -> String {
    "main".into()
}
fn default_path() -> PathBuf {
    PathBuf::from("policies")
}
fn default_interval() -> Duration {
    Duration::from_secs(30)
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse or does not match the schema (the message carries line and
    /// column).
    #[error("{file}:{message}")]
    Syntax { file: String, message: String },
    /// It parses, but a value is not usable.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// Parses a duration written as an integer with a unit: `ms`, `s`, `m` or `h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("`{text}` is not a duration like 30s"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "" => return Err(format!("`{text}` has no unit: write e.g. {n}s (units: ms, s, m, h)")),
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (units: ms, s, m, h)")),
    };
    ms.map(Duration::from_millis).ok_or_else(|| format!("`{text}` is too long"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

impl Config {
    /// Parses `text` (named `file` in messages) and checks the values.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            message: syntax_message(&e.to_string()),
        })?;
        config
            .check()
            .map_err(|message| ConfigError::Invalid { file: file.to_string(), message })?;
        Ok(config)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&path.display().to_string(), &text)
    }

    fn check(&self) -> Result<(), String> {
        if self.source.url.trim().is_empty() {
            return Err("source.url is empty".into());
        }
        if self.source.reference.trim().is_empty() {
            return Err("source.ref is empty".into());
        }
        if self.source.interval.is_zero() {
            return Err("source.interval must be above zero".into());
        }
        if self.drift_interval.is_zero() {
            return Err("drift_interval must be above zero".into());
        }
        if self.interfaces.iter().any(|i| i.is_empty() || i.len() > 15 || i.contains('/')) {
            return Err("an interface name is empty, longer than 15 bytes or has a `/`".into());
        }
        if let Some(name) = &self.host.name
            && name.trim().is_empty()
        {
            return Err("host.name is empty (leave it out to use the hostname)".into());
        }
        if self.metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "metrics: `{}` is not an address like 127.0.0.1:9469",
                self.metrics
            ));
        }
        for (what, p) in [("bpffs", &self.bpffs), ("state", &self.state), ("status", &self.status)]
        {
            if !p.is_absolute() {
                return Err(format!("{what}: `{}` is not an absolute path", p.display()));
            }
        }
        if let Some(c) = &self.cgroup
            && !c.is_absolute()
        {
            return Err(format!("cgroup: `{}` is not an absolute path", c.display()));
        }
        Ok(())
    }

    /// The host name to compile for: `host.name`, else `hostname`.
    pub fn host_name(
        &self,
        hostname: impl FnOnce() -> std::io::Result<String>,
    ) -> Result<String, String> {
        match &self.host.name {
            Some(n) => Ok(n.clone()),
            None => hostname()
                .map(|h| h.trim().to_string())
                .map_err(|e| format!("cannot read the hostname ({e}); set host.name")),
        }
    }
}

/// The machine's hostname.
pub fn hostname() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
}

/// serde-saphyr's message as `LINE:COLUMN: message` (its first line reads `error: line L
/// column C: message`, followed by a snippet of `<input>` we leave out).
fn syntax_message(raw: &str) -> String {
    let first = raw.lines().next().unwrap_or("").trim();
    let rest = first.strip_prefix("error: ").unwrap_or(first);
    if let Some(loc) = rest.strip_prefix("line ")
        && let Some((line, after)) = loc.split_once(" column ")
        && let Some((col, msg)) = after.split_once(": ")
        && line.bytes().all(|b| b.is_ascii_digit())
        && col.bytes().all(|b| b.is_ascii_digit())
    {
        return format!("{line}:{col}: {msg}");
    }
    format!(" {rest}")
}

impl fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.url, self.reference, self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_url_is_required_and_every_default_is_the_documented_one() {
        let c = Config::parse("c.yaml", "source: {url: file:///srv/policies.git}\n").unwrap();
        assert_eq!(c.source.url, "file:///srv/policies.git");
        assert_eq!(c.source.reference, "main");
        assert_eq!(c.source.path, PathBuf::from("policies"));
        assert_eq!(c.source.interval, Duration::from_secs(30));
        assert_eq!(c.host, HostConfig { name: None, labels: BTreeMap::new() });
        assert_eq!(c.interfaces, ["eth0"]);
        assert_eq!(c.cgroup, None);
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/fw"));
        assert_eq!(c.state, PathBuf::from("/var/lib/fwd"));
        assert_eq!(c.status, PathBuf::from("/run/fwd/status.sock"));
        assert_eq!(c.metrics, "127.0.0.1:9469");
        assert_eq!(c.drift_interval, Duration::from_secs(60));
        assert_eq!(c.host_name(|| Ok("web-1\n".into())).unwrap(), "web-1");
    }

    #[test]
    fn the_example_of_the_documentation_parses() {
        let text = "source:
  url: file:///srv/policies.git
  ref: main
  path: policies
  interval: 30s
host: {name: web-1, labels: {role: web}}
interfaces: [eth0]
cgroup: /sys/fs/cgroup
bpffs: /sys/fs/bpf/fw
state: /var/lib/fwd
status: /run/fwd/status.sock
metrics: 127.0.0.1:9469
drift_interval: 2m
";
        let c = Config::parse("c.yaml", text).unwrap();
        assert_eq!(c.host.name.as_deref(), Some("web-1"));
        assert_eq!(c.host.labels.get("role").map(String::as_str), Some("web"));
        assert_eq!(c.cgroup, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(c.drift_interval, Duration::from_secs(120));
        assert_eq!(c.host_name(|| Err(std::io::Error::other("no"))).unwrap(), "web-1");
    }

    #[test]
    fn unknown_fields_are_errors_with_file_line_and_column() {
        let text = "source:\n  url: /srv/p\n  intreval: 5s\n";
        let e = Config::parse("fwd.yaml", text).unwrap_err().to_string();
        assert!(e.starts_with("fwd.yaml:3:"), "{e}");
        assert!(e.contains("intreval"), "{e}");
        let e = Config::parse("fwd.yaml", "source: {url: x}\nmetric: 1\n").unwrap_err().to_string();
        assert!(e.starts_with("fwd.yaml:2:"), "{e}");
        assert!(e.contains("metric"), "{e}");
    }

    #[test]
    fn a_missing_url_and_bad_values_are_errors() {
        let e = Config::parse("f", "source: {ref: main}\n").unwrap_err().to_string();
        assert!(e.contains("url"), "{e}");
        for (text, want) in [
            ("source: {url: x, interval: 30}\n", "no unit"),
            ("source: {url: x, interval: 3 weeks}\n", "f:1:28: `3 weeks`: unknown unit"),
            ("source: {url: x, interval: 0s}\n", "above zero"),
            ("source: {url: x}\nmetrics: nowhere\n", "metrics"),
            ("source: {url: x}\nbpffs: relative/dir\n", "absolute"),
            ("source: {url: ''}\n", "url is empty"),
            ("source: {url: x}\nhost: {name: ''}\n", "host.name"),
            ("source: {url: x}\ninterfaces: [a-very-long-interface-name]\n", "15 bytes"),
            ("- not a mapping\n", "f:"),
            ("source: {url: x}\nsource: {url: y}\n", "f:"),
            ("\u{0}\u{1}: [\n", "f:"),
        ] {
            let e = Config::parse("f", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
    }
}
