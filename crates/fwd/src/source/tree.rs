//! Reads a commit's policy files straight from the object database.
//!
//! Nothing is checked out: the tree is walked in memory and each blob is read whole, so what is
//! compiled is exactly what the commit holds, with no half-written files, no symlink tricks and
//! no window between checking a file and reading it. The walk is iterative (a tree nested
//! thousands deep cannot overflow the stack) and checks every limit before it reads a blob,
//! taking the size from the object's header, so an oversized commit costs no memory.
//!
//! Rules, in the order a person meets them:
//! - Hidden entries (a name starting with `.`) are skipped with everything below them: they are
//!   tool configuration (`.github/workflows/*.yml`, `.gitlab-ci.yml`, `.yamllint.yml`), never
//!   policy, and a policy folder at the repository's root would otherwise pick them up.
//! - A symbolic link or a submodule anywhere else under the policy folder is an error, whatever
//!   its name: following a link would make the policy depend on more than the file a reviewer
//!   sees, and skipping one could silently drop a policy (for a firewall, fail open).
//! - Files named `*.yaml` or `*.yml` (any case) are policies; other files are ignored.

use git2::{ObjectType, Oid, Repository, TreeWalkMode};

use super::{Limits, PolicyFile, Snapshot, SourceError};
use crate::source::error::GitDetail;

const MODE_TREE: i32 = 0o040_000;
const MODE_LINK: i32 = 0o120_000;
const MODE_GITLINK: i32 = 0o160_000;

/// What a snapshot needs to know about its source, for reading and for messages.
pub(crate) struct Reader<'a> {
    pub(crate) repo: &'a Repository,
    pub(crate) url: &'a str,
    /// The policy folder, '/'-separated, "" for the root.
    pub(crate) base: &'a str,
    pub(crate) limits: &'a Limits,
}

/// True for `*.yaml` and `*.yml`, any case.
pub(crate) fn is_policy_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.ends_with(".yaml") && lower.len() > 5) || (lower.ends_with(".yml") && lower.len() > 4)
}

impl<'a> Reader<'a> {
    pub(crate) fn snapshot(
        &self,
        commit: &str,
        reuse: &dyn Fn(&str, &str) -> Option<Vec<u8>>,
    ) -> Result<Snapshot, SourceError> {
        let oid = parse_commit(commit).ok_or_else(|| SourceError::InvalidCommit {
            url: self.url.to_owned(),
            commit: commit.to_owned(),
        })?;
        let commit = self.repo.find_commit(oid).map_err(|_| SourceError::UnknownCommit {
            url: self.url.to_owned(),
            commit: oid.to_string(),
        })?;
        let id = oid.to_string();
        let read_err = |path: &str, e: &git2::Error| SourceError::Read {
            url: self.url.to_owned(),
            commit: id.clone(),
            path: path.to_owned(),
            source: GitDetail::new(e, str::to_owned),
        };
        let root = commit.tree().map_err(|e| read_err("", &e))?;
        let folder = self.folder(&id, root)?;
        let files = self.collect(&id, &folder, reuse)?;
        Ok(Snapshot {
            commit: id,
            summary: String::from_utf8_lossy(commit.summary_bytes().unwrap_or_default())
                .into_owned(),
            author_time: commit.author().when().seconds(),
            files,
        })
    }

    /// Checks that the policy folder's objects are all in the mirror, without reading blobs.
    pub(crate) fn check_present(&self, oid: Oid) -> Result<(), git2::Error> {
        let commit = self.repo.find_commit(oid)?;
        let root = commit.tree()?;
        let Some(entry) = (if self.base.is_empty() {
            None
        } else {
            root.get_path(std::path::Path::new(self.base)).ok()
        }) else {
            return check_tree(self.repo, &root);
        };
        if entry.kind() == Some(ObjectType::Tree) {
            let tree = self.repo.find_tree(entry.id())?;
            check_tree(self.repo, &tree)?;
        }
        Ok(())
    }

    /// The policy folder's tree: each component must be a folder, not a link or a submodule.
    fn folder(&self, commit: &str, root: git2::Tree<'a>) -> Result<git2::Tree<'a>, SourceError> {
        let mut tree = root;
        let mut walked = String::new();
        for part in self.base.split('/').filter(|p| !p.is_empty()) {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(part);
            let err_ctx =
                |walked: &str| (self.url.to_owned(), commit.to_owned(), walked.to_owned());
            let Some((id, mode)) = tree.get_name(part).map(|e| (e.id(), e.filemode())) else {
                let (url, commit, path) = err_ctx(&walked);
                return Err(SourceError::PathNotFound { url, commit, path });
            };
            match mode {
                MODE_TREE => {}
                MODE_LINK => {
                    let (url, commit, path) = err_ctx(&walked);
                    return Err(SourceError::Symlink { url, commit, path });
                }
                MODE_GITLINK => {
                    let (url, commit, path) = err_ctx(&walked);
                    return Err(SourceError::Submodule { url, commit, path });
                }
                _ => {
                    let (url, commit, path) = err_ctx(&walked);
                    return Err(SourceError::NotAFolder { url, commit, path });
                }
            }
            let next = self.repo.find_tree(id).map_err(|e| SourceError::Read {
                url: self.url.to_owned(),
                commit: commit.to_owned(),
                path: walked.clone(),
                source: GitDetail::new(&e, str::to_owned),
            })?;
            tree = next;
        }
        Ok(tree)
    }

    /// The policy files under `folder`, sorted by path, within the limits.
    fn collect(
        &self,
        commit: &str,
        folder: &git2::Tree<'_>,
        reuse: &dyn Fn(&str, &str) -> Option<Vec<u8>>,
    ) -> Result<Vec<PolicyFile>, SourceError> {
        let limits = self.limits;
        let url = || self.url.to_owned();
        let at = |prefix: &str, name: &str| {
            if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") }
        };
        let odb = self.repo.odb().map_err(|e| SourceError::Read {
            url: url(),
            commit: commit.to_owned(),
            path: self.base.to_owned(),
            source: GitDetail::new(&e, str::to_owned),
        })?;
        let mut files = Vec::new();
        let mut total: u64 = 0;
        // (tree, its repo-relative path, depth below the policy folder)
        let mut stack = vec![(folder.clone(), self.base.to_owned(), 0usize)];
        while let Some((tree, prefix, depth)) = stack.pop() {
            for entry in &tree {
                let Ok(name) = std::str::from_utf8(entry.name_bytes()) else {
                    return Err(SourceError::NonUtf8Name {
                        url: url(),
                        commit: commit.to_owned(),
                        path: prefix.clone(),
                    });
                };
                if name.starts_with('.') {
                    continue;
                }
                let path = at(&prefix, name);
                let read_err = |e: &git2::Error| SourceError::Read {
                    url: url(),
                    commit: commit.to_owned(),
                    path: path.clone(),
                    source: GitDetail::new(e, str::to_owned),
                };
                match entry.filemode() {
                    MODE_TREE => {
                        if depth + 1 > limits.max_depth {
                            return Err(SourceError::TooDeep {
                                url: url(),
                                commit: commit.to_owned(),
                                path,
                                limit: limits.max_depth,
                            });
                        }
                        let sub = self.repo.find_tree(entry.id()).map_err(|e| read_err(&e))?;
                        stack.push((sub, path, depth + 1));
                    }
                    MODE_LINK => {
                        return Err(SourceError::Symlink {
                            url: url(),
                            commit: commit.to_owned(),
                            path,
                        });
                    }
                    MODE_GITLINK => {
                        return Err(SourceError::Submodule {
                            url: url(),
                            commit: commit.to_owned(),
                            path,
                        });
                    }
                    _ if is_policy_name(name) => {
                        if files.len() >= limits.max_files {
                            return Err(SourceError::TooManyFiles {
                                url: url(),
                                commit: commit.to_owned(),
                                path: self.display_base(),
                                limit: limits.max_files,
                            });
                        }
                        let (size, _) = odb.read_header(entry.id()).map_err(|e| read_err(&e))?;
                        let size = size as u64;
                        if size > limits.max_file_bytes {
                            return Err(SourceError::FileTooLarge {
                                url: url(),
                                commit: commit.to_owned(),
                                path,
                                size,
                                limit: limits.max_file_bytes,
                            });
                        }
                        total += size;
                        if total > limits.max_total_bytes {
                            return Err(SourceError::TooLarge {
                                url: url(),
                                commit: commit.to_owned(),
                                path: self.display_base(),
                                limit: limits.max_total_bytes,
                            });
                        }
                        let blob = entry.id().to_string();
                        let bytes = match reuse(&path, &blob) {
                            Some(bytes) => bytes,
                            None => self
                                .repo
                                .find_blob(entry.id())
                                .map_err(|e| read_err(&e))?
                                .content()
                                .to_vec(),
                        };
                        files.push(PolicyFile { path, blob, bytes });
                    }
                    _ => {}
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    fn display_base(&self) -> String {
        if self.base.is_empty() { ".".to_owned() } else { self.base.to_owned() }
    }
}

/// A full hex commit id (SHA-1 or SHA-256 length).
fn parse_commit(commit: &str) -> Option<Oid> {
    let hex = commit.len() == 40 || commit.len() == 64;
    if !hex || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Oid::from_str(commit).ok()
}

/// Every object under `tree` exists in the object database (headers only, nothing inflated).
fn check_tree(repo: &Repository, tree: &git2::Tree<'_>) -> Result<(), git2::Error> {
    let odb = repo.odb()?;
    let mut missing = None;
    tree.walk(TreeWalkMode::PreOrder, |_, entry| {
        if entry.filemode() == MODE_GITLINK {
            return git2::TreeWalkResult::Ok;
        }
        if !odb.exists(entry.id()) {
            missing = Some(entry.id());
            return git2::TreeWalkResult::Abort;
        }
        git2::TreeWalkResult::Ok
    })
    .or_else(|e| if missing.is_some() { Ok(()) } else { Err(e) })?;
    match missing {
        Some(oid) => Err(git2::Error::new(
            git2::ErrorCode::NotFound,
            git2::ErrorClass::Odb,
            format!("object {oid} is missing"),
        )),
        None => Ok(()),
    }
}
