//! Workload paths to cgroup ids: what the kernel's workload table is keyed by.
//!
//! The compiler knows workloads as cgroup v2 paths relative to the hierarchy root
//! (`system.slice/app.service`); the egress programs know the calling process's cgroup id and
//! those of its ancestors (`bpf_get_current_cgroup_id`, `bpf_get_current_ancestor_cgroup_id`),
//! which on cgroup v2 is the inode number of the cgroup's directory. So resolving is a `stat`
//! of `<root>/<path>`. A path that does not exist (the service is not running, the slice was
//! never made) is simply absent from the result: no process can be in a cgroup that does not
//! exist, so nothing is lost; when it appears later, the next apply picks it up (watching
//! cgroup creation is the daemon's business).
//!
//! Ids are not reused while the cgroup exists, but a removed and re-created cgroup gets a new
//! id, which is why resolution belongs to every apply rather than to compilation.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use fw_compiler::mapstate::WorkloadId;

use crate::{Dataplane, Error, WriteStats};

/// The default mount point of the cgroup v2 hierarchy.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";

/// Resolves workload paths (relative to the cgroup v2 root `root`, as in
/// `MapState::workloads`) to cgroup id -> workload class. Missing cgroups are left out; a
/// path that exists but is not a directory, or that escapes the root (`..`), is left out too.
/// If two paths name the same cgroup (they cannot after the compiler's normalisation), the
/// lower class wins, deterministically.
pub fn resolve(root: &Path, workloads: &BTreeMap<String, WorkloadId>) -> BTreeMap<u64, u32> {
    let mut out = BTreeMap::new();
    for (path, class) in workloads {
        let Some(dir) = join(root, path) else { continue };
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        if !meta.is_dir() {
            continue;
        }
        out.entry(meta.ino()).and_modify(|c: &mut u32| *c = (*c).min(class.0)).or_insert(class.0);
    }
    out
}

/// `root/path` for a relative path without `..` components (leading and repeated slashes are
/// ignored); `None` otherwise.
fn join(root: &Path, path: &str) -> Option<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return None;
        }
        dir.push(part);
    }
    Some(dir)
}

impl Dataplane {
    /// Resolves `workloads` against the cgroup v2 root `root` ([`resolve`]) and makes
    /// generation `generation`'s workload table hold exactly the result. The apply path calls
    /// this for the generation it is writing, next to [`Dataplane::write_generation`].
    pub fn write_workload_paths(
        &mut self,
        generation: u32,
        root: &Path,
        workloads: &BTreeMap<String, WorkloadId>,
    ) -> Result<WriteStats, Error> {
        self.write_workloads(generation, &resolve(root, workloads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_below_the_root_only() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(join(root, "system.slice/a.service"), Some(root.join("system.slice/a.service")));
        assert_eq!(join(root, "/x//y/"), Some(root.join("x/y")));
        assert_eq!(join(root, "x/../../etc"), None);
    }

    #[test]
    fn missing_and_non_directory_paths_are_absent() {
        let tmp = std::env::temp_dir().join(format!("fw-loader-wl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("a/b")).unwrap();
        std::fs::write(tmp.join("file"), b"").unwrap();
        let ino = |p: &str| std::fs::metadata(tmp.join(p)).unwrap().ino();
        let (a, b) = (ino("a"), ino("a/b"));
        let wl: BTreeMap<String, WorkloadId> = [
            ("a".to_string(), WorkloadId(1)),
            ("a/b".to_string(), WorkloadId(2)),
            ("missing".to_string(), WorkloadId(3)),
            ("file".to_string(), WorkloadId(4)),
        ]
        .into();
        let got = resolve(&tmp, &wl);
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(got, [(a, 1), (b, 2)].into());
    }
}
