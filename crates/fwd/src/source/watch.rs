//! Watching a local repository so that a commit is picked up at once instead of at the next poll.
//!
//! A commit or a push moves a ref, and git moves a ref by writing `<ref>.lock` and renaming it
//! over the ref (or over `packed-refs`, or `HEAD`). So the watch covers exactly the places a ref
//! can live: the git folder (for `HEAD`), the common folder (for `packed-refs`; it differs from
//! the git folder in a linked worktree) and `refs/` recursively; and it reports only events
//! that touch those names, not the index or object writes of a `git add`. The events are
//! debounced (a commit is a burst of several renames) and the callback only says "may have
//! moved": the caller fetches and compares commits, so a spurious call costs one local fetch
//! and a missed one is caught by the poll.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::SourceError;

/// How long events must be quiet before the callback runs. A `git commit` writes its ref
/// updates within a few milliseconds; 50 ms keeps commit-to-enforced well under 200 ms.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(50);

/// Watches a local repository; dropping it stops the watch (and its thread).
pub struct Watch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// Starts watching the repository at `path` (a work tree, its `.git`, or a bare repository).
pub(crate) fn watch(
    url: &str,
    path: &Path,
    on_change: impl Fn() + Send + 'static,
) -> Result<Watch, SourceError> {
    let open_err = |source: notify::Error| SourceError::Watch {
        url: url.to_owned(),
        path: path.to_owned(),
        source,
    };
    let repo = git2::Repository::open(path).map_err(|e| {
        open_err(notify::Error::generic(&format!("not a git repository: {}", e.message())))
    })?;
    let git_dir = repo.path().to_path_buf();
    let common_dir = repo.commondir().to_path_buf();
    drop(repo);
    let refs_dir = common_dir.join("refs");
    let interesting = Interesting { git_dir: git_dir.clone(), common_dir: common_dir.clone() };

    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        match result {
            Ok(events) => {
                // Reads (the daemon's own fetch lists the refs) are not changes: reacting to them
                // would make every fetch trigger the next one.
                let moved = events.iter().any(|e| {
                    !matches!(e.kind, EventKind::Access(_))
                        && e.paths.iter().any(|p| interesting.matches(p))
                });
                if moved {
                    on_change();
                }
            }
            Err(errors) => {
                // The watch may have lost events (a queue overflow): say "may have moved".
                for error in &errors {
                    tracing::warn!(%error, "watching the local repository");
                }
                on_change();
            }
        }
    })
    .map_err(open_err)?;

    let watch = |debouncer: &mut Debouncer<_, _>, dir: &Path, mode| {
        debouncer.watch(dir, mode).map_err(|source| SourceError::Watch {
            url: url.to_owned(),
            path: dir.to_owned(),
            source,
        })
    };
    watch(&mut debouncer, &git_dir, RecursiveMode::NonRecursive)?;
    if common_dir != git_dir {
        watch(&mut debouncer, &common_dir, RecursiveMode::NonRecursive)?;
    }
    watch(&mut debouncer, &refs_dir, RecursiveMode::Recursive)?;
    Ok(Watch { _debouncer: debouncer })
}

/// Which paths can hold a ref.
struct Interesting {
    git_dir: PathBuf,
    common_dir: PathBuf,
}

impl Interesting {
    fn matches(&self, path: &Path) -> bool {
        if path.extension().is_some_and(|e| e == "lock") {
            return false;
        }
        if path.starts_with(self.common_dir.join("refs")) {
            return true;
        }
        let Some(name) = path.file_name() else { return false };
        let parent = path.parent();
        (name == "HEAD" && parent == Some(self.git_dir.as_path()))
            || (name == "packed-refs" && parent == Some(self.common_dir.as_path()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ref_files_are_interesting() {
        let i = Interesting { git_dir: "/r/.git".into(), common_dir: "/r/.git".into() };
        assert!(i.matches(Path::new("/r/.git/refs/heads/main")));
        assert!(i.matches(Path::new("/r/.git/refs/heads/team/x")));
        assert!(i.matches(Path::new("/r/.git/HEAD")));
        assert!(i.matches(Path::new("/r/.git/packed-refs")));
        assert!(!i.matches(Path::new("/r/.git/refs/heads/main.lock")));
        assert!(!i.matches(Path::new("/r/.git/index")));
        assert!(!i.matches(Path::new("/r/.git/objects/ab/cdef")));
        assert!(!i.matches(Path::new("/r/.git/logs/HEAD")));

        let wt =
            Interesting { git_dir: "/m/.git/worktrees/w".into(), common_dir: "/m/.git".into() };
        assert!(wt.matches(Path::new("/m/.git/worktrees/w/HEAD")));
        assert!(wt.matches(Path::new("/m/.git/packed-refs")));
        assert!(!wt.matches(Path::new("/m/.git/HEAD")));
    }
}
