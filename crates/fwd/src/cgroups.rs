//! Watching the cgroup tree for the workload paths, so a cgroup created, removed or
//! re-created (a restarted service gets a new cgroup, with a new id) is re-resolved at once.
//!
//! Why it is built this way:
//! - inotify works on cgroupfs for directory creation and removal, which is all that changes
//!   a cgroup id. Watching the whole tree recursively would put a watch on every cgroup of
//!   the host; instead each workload path's existing ancestors (from the cgroup root down)
//!   and the path itself are watched, non-recursively: a `mkdir` or `rmdir` anywhere on the
//!   way is seen, and after each change the set of watched directories is recomputed.
//! - Only creations and removals wake the daemon: cgroupfs files change all the time
//!   (`cgroup.events`, `cgroup.procs`) and those modifications say nothing about ids.
//! - The watcher only signals; the reconcile loop re-resolves every path (a `stat` each) and
//!   rewrites the workload table when the result differs, so a burst of events costs one
//!   comparison per event and at most one write.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher};

/// The directories to watch for `paths` (relative to `root`, as in a policy's workloads): the
/// root and, for each path, every existing directory from the root down to the path.
pub fn watch_set<'a>(root: &Path, paths: impl IntoIterator<Item = &'a str>) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for path in paths {
        out.insert(root.to_path_buf());
        let mut dir = root.to_path_buf();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                break;
            }
            dir.push(part);
            if !dir.is_dir() {
                break;
            }
            out.insert(dir.clone());
        }
    }
    out
}

/// A set of non-recursive inotify watches that calls back on directory creation and removal.
pub struct CgroupWatch {
    watcher: notify::RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
}

impl std::fmt::Debug for CgroupWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupWatch").field("watched", &self.watched).finish_non_exhaustive()
    }
}

impl CgroupWatch {
    pub fn new(on_change: impl Fn() + Send + 'static) -> Result<CgroupWatch, notify::Error> {
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let wake = match event {
                Ok(e) => matches!(
                    e.kind,
                    EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other
                ),
                // An overflow or a lost watch: re-resolving is always safe.
                Err(_) => true,
            };
            if wake {
                on_change();
            }
        })?;
        Ok(CgroupWatch { watcher, watched: BTreeSet::new() })
    }

    /// Makes the watched directories exactly `want` (directories that vanished meanwhile are
    /// skipped; they are picked up by their parent's watch when they come back).
    pub fn set(&mut self, want: BTreeSet<PathBuf>) {
        for gone in self.watched.difference(&want) {
            let _ = self.watcher.unwatch(gone);
        }
        let mut now = BTreeSet::new();
        for dir in want {
            if self.watched.contains(&dir)
                || self.watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok()
            {
                now.insert(dir);
            }
        }
        self.watched = now;
    }

    pub fn watched(&self) -> &BTreeSet<PathBuf> {
        &self.watched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_set_is_every_existing_directory_on_the_way_to_each_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("x")).unwrap();
        let set = watch_set(root, ["a/b/c", "/x/y/", "../etc", "a"]);
        let want: BTreeSet<PathBuf> =
            [root.to_path_buf(), root.join("a"), root.join("a/b"), root.join("x")].into();
        assert_eq!(set, want);
        assert!(watch_set(root, std::iter::empty()).is_empty());
    }

    #[test]
    fn a_directory_made_and_removed_under_a_watched_one_calls_back() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = CgroupWatch::new(move || {
            let _ = tx.send(());
        })
        .unwrap();
        w.set(watch_set(tmp.path(), ["svc"]));
        assert_eq!(w.watched().len(), 1);
        std::fs::create_dir(tmp.path().join("svc")).unwrap();
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("create seen");
        w.set(watch_set(tmp.path(), ["svc"]));
        assert_eq!(w.watched().len(), 2);
        while rx.try_recv().is_ok() {}
        std::fs::remove_dir(tmp.path().join("svc")).unwrap();
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("removal seen");
    }
}
