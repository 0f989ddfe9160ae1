//! The git source: follows one branch or tag of one repository and hands out its policy files.
//!
//! Built for a daemon that must keep enforcing whatever happens to the repository:
//! - The repository is mirrored into a bare repository under the daemon's state folder, and
//!   only the one configured ref is fetched (a ref listing first, a download only when the
//!   ref moved), so a poll of an unchanged remote transfers no objects. Any new commit is
//!   taken, fast-forward or not; [`Fetched::forced`] says when history was rewritten.
//! - Policy files are read from the commit's tree in the object database ([`Source::snapshot`]),
//!   never from a work tree: no half-written files, no symlink tricks, no TOCTOU.
//! - Failures leave the mirror and the last fetched commit as they were. A mirror found damaged
//!   is rebuilt beside the old one and swapped in only once the rebuild fetched the ref, so a
//!   damaged mirror and an unreachable remote at the same time still leave the old one.
//! - Errors say which URL, ref and path failed, never show credentials, and tell a condition
//!   to retry ([`SourceError::is_transient`], with [`Backoff`]) from one that needs a person.
//! - A local repository (a path or `file://`) can be watched ([`Source::watch`]) so that a
//!   commit is picked up at once rather than at the next poll.
//!
//! Credentials: for https, a user and password (or token) written in the URL, then git's
//! credential helpers from the git config of the daemon's user; for ssh, the ssh agent
//! (`SSH_AUTH_SOCK`), then `~/.ssh/id_ed25519`, `id_ecdsa` or `id_rsa` without a passphrase,
//! with the host key checked against `~/.ssh/known_hosts`. Credentials are held in memory
//! only: the mirror's config records the URL without them.
//!
//! One process at a time: [`Source::open`] takes an exclusive lock on `mirror.lock` in the
//! state folder and holds it while the `Source` lives, so a second daemon on the same state
//! fails at start instead of both rewriting one mirror.

mod backoff;
mod error;
mod location;
mod mirror;
mod tree;
mod watch;

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub use backoff::Backoff;
pub use error::{GitDetail, SourceError};
pub use watch::Watch;

use location::Location;

/// What to follow: `url` is https://, ssh://, file:// or a local path; `reference` a branch or
/// tag name; `path` the folder inside the repo holding the policies ("" or "." = the root).
///
/// `reference` may also be a full ref name (`refs/heads/main`, `refs/tags/v1`) or `HEAD` (the
/// remote's current branch). A short name that is both a branch and a tag means the branch.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceSpec {
    pub url: String,
    pub reference: String,
    pub path: PathBuf,
}

impl fmt::Debug for SourceSpec {
    /// Shows the URL without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceSpec")
            .field("url", &location::display_of(&self.url))
            .field("reference", &self.reference)
            .field("path", &self.path)
            .finish()
    }
}

/// One policy file of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// Repo-relative, '/'-separated, e.g. "policies/web.yaml".
    pub path: String,
    /// The blob's id, hex: the same id means the same bytes.
    pub blob: String,
    pub bytes: Vec<u8>,
}

/// The policy files of one commit, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The commit id, hex.
    pub commit: String,
    /// The first line of the commit message.
    pub summary: String,
    /// The author time, seconds since the Unix epoch.
    pub author_time: i64,
    pub files: Vec<PolicyFile>,
}

/// The result of a successful [`Source::fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The commit the ref points at now, hex.
    pub commit: String,
    /// The commit fetched before this one (by this process or, through the mirror, an earlier
    /// one), if any. Equal to `commit` when nothing moved.
    pub previous: Option<String>,
    /// The new commit does not descend from the previous one (a force-push, or a tag moved).
    pub forced: bool,
    /// The mirror was found damaged (or missing) and was rebuilt by this fetch.
    pub recloned: bool,
}

impl Fetched {
    /// The ref moved since the previous fetch (or this is the first one).
    pub fn changed(&self) -> bool {
        self.previous.as_deref() != Some(self.commit.as_str())
    }
}

/// Bounds on what one snapshot reads, so a bad commit cannot exhaust the daemon's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Policy files (`*.yaml`, `*.yml`) under the folder.
    pub max_files: usize,
    /// Bytes of one policy file.
    pub max_file_bytes: u64,
    /// Bytes of all policy files together.
    pub max_total_bytes: u64,
    /// Folders nested under the policy folder.
    pub max_depth: usize,
}

impl Default for Limits {
    /// 4096 files, 16 MiB a file, 64 MiB in all, 32 folders deep: far above a large policy
    /// (100k prefixes are a few MiB of YAML), far below what would hurt the host.
    fn default() -> Self {
        Limits {
            max_files: 4096,
            max_file_bytes: 16 << 20,
            max_total_bytes: 64 << 20,
            max_depth: 32,
        }
    }
}

/// How long one fetch may take in all, unless set with [`Source::set_fetch_timeout`].
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// A followed repository and its mirror. See the module documentation.
pub struct Source {
    location: Location,
    /// The configured reference, as written.
    reference: String,
    /// The remote ref names it may stand for, in order of preference.
    candidates: Vec<String>,
    /// The policy folder, '/'-separated, "" for the root.
    base: String,
    /// The mirror: a bare repository.
    dir: PathBuf,
    repo: git2::Repository,
    /// The last commit fetched for this reference.
    last: Option<git2::Oid>,
    limits: Limits,
    fetch_timeout: Duration,
    /// Holds the exclusive lock on the state folder's mirror.
    _lock: std::fs::File,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("url", &self.location.display())
            .field("reference", &self.reference)
            .field("path", &self.base)
            .field("mirror", &self.dir)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Opens the mirror under `state_dir` (`state_dir/mirror.git`, a bare repository), creating
    /// it when absent and re-creating it when it is damaged or mirrors another URL.
    ///
    /// This does not touch the network: the first [`Source::fetch`] clones. So the daemon can
    /// start, and keep enforcing what it last applied, while the remote is unreachable; and a
    /// mirror from an earlier run answers [`Source::last_fetched`] and [`Source::snapshot`]
    /// at once.
    pub fn open(spec: &SourceSpec, state_dir: &Path) -> Result<Source, SourceError> {
        let location = Location::parse(&spec.url).map_err(|reason| SourceError::InvalidSpec {
            url: location::display_of(&spec.url),
            field: "url",
            reason,
        })?;
        let invalid = |field, reason: String| SourceError::InvalidSpec {
            url: location.display().to_owned(),
            field,
            reason,
        };
        let candidates = candidates(&spec.reference).map_err(|r| invalid("ref", r))?;
        let base = normalize_path(&spec.path).map_err(|r| invalid("path", r))?;
        mirror::init_libgit2();
        let dir = state_dir.join("mirror.git");
        let lock = mirror::lock(&location, state_dir)?;
        let repo = mirror::open_or_create(&location, &dir, state_dir)?;
        let mut source = Source {
            location,
            reference: spec.reference.clone(),
            candidates,
            base,
            dir,
            repo,
            last: None,
            limits: Limits::default(),
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            _lock: lock,
        };
        source.last = source.tracked(&source.repo);
        Ok(source)
    }

    /// Fetches the reference from the remote and returns the commit it now points at. Follows
    /// force-pushes (any new commit, not only fast-forwards). A corrupt or unusable mirror is
    /// rebuilt ([`Fetched::recloned`]). A ref deleted on the remote, an unreachable remote and
    /// the like return an error and leave the mirror and the last fetched commit intact.
    pub fn fetch(&mut self) -> Result<Fetched, SourceError> {
        mirror::fetch(self)
    }

    /// Reads the policy files (`*.yaml` and `*.yml`, recursively under the policy folder) of
    /// `commit` (full hex id) from its tree in the mirror, in memory.
    ///
    /// Hidden entries (a name starting with `.`) are skipped with all below them: they are tool
    /// configuration such as `.github/workflows/*.yml`. A symbolic link or a submodule anywhere
    /// else under the folder is an error ([`SourceError::Symlink`], [`SourceError::Submodule`]):
    /// links are never followed and nothing is silently left out. The [`Limits`] are checked
    /// before anything is read.
    pub fn snapshot(&self, commit: &str) -> Result<Snapshot, SourceError> {
        tree::Reader {
            repo: &self.repo,
            url: self.location.display(),
            base: &self.base,
            limits: &self.limits,
        }
        .snapshot(commit, &|_, _| None)
    }

    /// [`Source::snapshot`], taking the bytes of a file from `reuse(path, blob id)` when it
    /// has them instead of reading the blob (which inflates it). `reuse` must answer only with
    /// the bytes of that blob (e.g. kept from an earlier snapshot's file of the same blob id).
    pub fn snapshot_reusing(
        &self,
        commit: &str,
        reuse: &dyn Fn(&str, &str) -> Option<Vec<u8>>,
    ) -> Result<Snapshot, SourceError> {
        tree::Reader {
            repo: &self.repo,
            url: self.location.display(),
            base: &self.base,
            limits: &self.limits,
        }
        .snapshot(commit, reuse)
    }

    /// The commit of the last successful fetch of this reference, also from an earlier run of
    /// the daemon (the mirror keeps it), if any.
    pub fn last_fetched(&self) -> Option<String> {
        self.last.map(|oid| oid.to_string())
    }

    /// True when the source is a local repository (a path or file:// URL), which the daemon
    /// watches for an immediate pick-up instead of waiting for the poll.
    pub fn is_local(&self) -> bool {
        self.location.local().is_some()
    }

    /// For a local repository: watches it and calls `on_change` (debounced, ~50 ms after the
    /// last event of a burst, on the watcher's thread) whenever a ref may have moved. The
    /// returned guard stops watching on drop. If the repository's folder is removed or moved,
    /// the watch goes quiet; polling still finds new commits.
    pub fn watch(&self, on_change: impl Fn() + Send + 'static) -> Result<Watch, SourceError> {
        let url = self.location.display();
        let Some(path) = self.location.local() else {
            return Err(SourceError::NotLocal { url: url.to_owned() });
        };
        watch::watch(url, path, on_change)
    }

    /// The URL without credentials, for status and logs.
    pub fn display_url(&self) -> &str {
        self.location.display()
    }

    /// Replaces the snapshot limits (default: [`Limits::default`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Replaces the timeout of one whole fetch (default: [`DEFAULT_FETCH_TIMEOUT`]).
    pub fn set_fetch_timeout(&mut self, timeout: Duration) {
        self.fetch_timeout = timeout;
    }

    /// The commit the mirror holds for the first of the reference's candidates it has.
    fn tracked(&self, repo: &git2::Repository) -> Option<git2::Oid> {
        self.candidates.iter().find_map(|name| {
            let oid = repo.refname_to_id(&mirror::tracking_ref(name)).ok()?;
            repo.find_commit(oid).ok().map(|c| c.id())
        })
    }
}

/// The remote ref names a configured reference stands for.
fn candidates(reference: &str) -> Result<Vec<String>, String> {
    if reference.is_empty() {
        return Err("the ref is empty (name a branch or a tag)".into());
    }
    if reference == "HEAD" {
        return Ok(vec!["HEAD".into()]);
    }
    if reference.starts_with("refs/") {
        if !git2::Reference::is_valid_name(reference) {
            return Err(format!("'{reference}' is not a valid ref name"));
        }
        return Ok(vec![reference.to_owned()]);
    }
    let branch = format!("refs/heads/{reference}");
    if !git2::Reference::is_valid_name(&branch) {
        return Err(format!("'{reference}' is not a valid branch or tag name"));
    }
    Ok(vec![branch, format!("refs/tags/{reference}")])
}

/// The policy folder as a '/'-separated repo-relative path, "" for the root.
fn normalize_path(path: &Path) -> Result<String, String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::Normal(part) => {
                let part = part
                    .to_str()
                    .ok_or_else(|| format!("'{}' is not valid UTF-8", path.display()))?;
                parts.push(part);
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "'{}' is absolute; give a folder inside the repository",
                    path.display()
                ));
            }
            Component::ParentDir => {
                return Err(format!("'{}' leaves the repository ('..')", path.display()));
            }
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_become_candidate_ref_names() {
        assert_eq!(candidates("main").unwrap(), ["refs/heads/main", "refs/tags/main"]);
        assert_eq!(
            candidates("release/1.x").unwrap(),
            ["refs/heads/release/1.x", "refs/tags/release/1.x"]
        );
        assert_eq!(candidates("refs/tags/v1").unwrap(), ["refs/tags/v1"]);
        assert_eq!(candidates("HEAD").unwrap(), ["HEAD"]);
        for bad in ["", "a..b", "x~1", "with space", "refs/heads/"] {
            assert!(candidates(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn policy_paths_are_normalized() {
        assert_eq!(normalize_path(Path::new("")).unwrap(), "");
        assert_eq!(normalize_path(Path::new(".")).unwrap(), "");
        assert_eq!(normalize_path(Path::new("./policies/")).unwrap(), "policies");
        assert_eq!(normalize_path(Path::new("a/./b")).unwrap(), "a/b");
        assert!(normalize_path(Path::new("/etc")).is_err());
        assert!(normalize_path(Path::new("a/../b")).is_err());
    }

    /// The daemon moves the source into its reconcile thread (or `spawn_blocking`) and the
    /// watch guard into whatever owns it.
    #[test]
    fn source_and_watch_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Source>();
        send::<Watch>();
        send::<SourceError>();
        send::<Backoff>();
    }

    #[test]
    fn debug_of_a_spec_hides_credentials() {
        let spec = SourceSpec {
            url: "https://bob:hunter2hunter2@example.com/p.git".into(),
            reference: "main".into(),
            path: "policies".into(),
        };
        let shown = format!("{spec:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("bob"), "{shown}");
        assert!(shown.contains("https://example.com/p.git"), "{shown}");
    }
}
