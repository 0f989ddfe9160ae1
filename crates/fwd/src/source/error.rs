//! The source's errors: one enum, each variant naming what the user configured (URL without
//! credentials, ref, path) so a message in status or logs says which source failed and why.
//!
//! libgit2's errors are not carried as `git2::Error`: their messages can quote the URL, and so
//! its credentials, back. [`GitDetail`] keeps the class and code for classification and a
//! message that went through the location's redaction.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A libgit2 error with the URL's credentials removed from its message.
#[derive(Debug, Clone)]
pub struct GitDetail {
    message: String,
    class: git2::ErrorClass,
    code: git2::ErrorCode,
}

impl GitDetail {
    pub(crate) fn new(error: &git2::Error, redact: impl Fn(&str) -> String) -> GitDetail {
        GitDetail { message: redact(error.message()), class: error.class(), code: error.code() }
    }

    /// libgit2's message (redacted).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// libgit2's error class (network, ssh, object database, ...).
    pub fn class(&self) -> git2::ErrorClass {
        self.class
    }

    /// libgit2's error code.
    pub fn code(&self) -> git2::ErrorCode {
        self.code
    }
}

impl fmt::Display for GitDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GitDetail {}

/// Why a source operation failed. URLs in these messages never hold credentials.
///
/// [`SourceError::is_transient`] tells the conditions that may go away by themselves (retry with
/// backoff) from those that need someone to change the configuration or the repository.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configured URL, ref or path cannot be used.
    #[error("source {url}: invalid {field}: {reason}")]
    InvalidSpec { url: String, field: &'static str, reason: String },

    /// The mirror folder cannot be created, read or replaced.
    #[error("source {url}: mirror {}: {action}", dir.display())]
    Io {
        url: String,
        dir: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// Another process (or another `Source` in this one) uses the same state folder.
    #[error("source {url}: the state folder {} is in use by another fwd", dir.display())]
    Locked { url: String, dir: PathBuf },

    /// libgit2 failed on the mirror itself (not the remote) and re-creating it did not help.
    #[error("source {url}: mirror {}: {action}", dir.display())]
    Mirror {
        url: String,
        dir: PathBuf,
        action: &'static str,
        #[source]
        source: GitDetail,
    },

    /// The remote could not be reached or read: network, DNS, a local repository that is gone.
    #[error("source {url}: cannot reach the remote to fetch '{reference}'")]
    Unreachable {
        url: String,
        reference: String,
        #[source]
        source: GitDetail,
    },

    /// The remote took longer than the fetch timeout.
    #[error("source {url}: fetching '{reference}' took longer than {timeout:?}")]
    Timeout { url: String, reference: String, timeout: Duration },

    /// The remote refused the credentials, or there were none it accepts.
    #[error("source {url}: authentication failed")]
    Auth {
        url: String,
        #[source]
        source: GitDetail,
    },

    /// The remote's TLS certificate or SSH host key was not accepted.
    #[error("source {url}: the remote's certificate or host key is not trusted")]
    Certificate {
        url: String,
        #[source]
        source: GitDetail,
    },

    /// libgit2 refused to read a local repository owned by another user.
    #[error(
        "source {url}: the repository is owned by another user; libgit2 refuses it (make the \
         daemon's user own it, or add it to git's safe.directory)"
    )]
    Owner {
        url: String,
        #[source]
        source: GitDetail,
    },

    /// The remote has no branch or tag of that name, and this mirror never saw one.
    #[error("source {url}: no branch or tag '{reference}' on the remote")]
    RefNotFound { url: String, reference: String },

    /// The branch or tag was fetched before but is gone from the remote now. The mirror still
    /// holds `last`, which stays readable.
    #[error(
        "source {url}: '{reference}' was deleted on the remote (last fetched commit {last} is \
         kept)"
    )]
    RefDeleted { url: String, reference: String, last: String },

    /// The ref points at something that is not a commit (a tag of a tree or a blob).
    #[error("source {url}: '{reference}' points at a {kind}, not a commit")]
    NotACommit { url: String, reference: String, kind: String },

    /// `snapshot` was asked for a commit that is not a full hex id.
    #[error("source {url}: '{commit}' is not a commit id (40 hex digits)")]
    InvalidCommit { url: String, commit: String },

    /// `snapshot` was asked for a commit the mirror does not hold.
    #[error("source {url}: commit {commit} is not in the mirror (fetch it first)")]
    UnknownCommit { url: String, commit: String },

    /// The policy folder does not exist in that commit.
    #[error("source {url}: commit {commit} has no folder '{path}'")]
    PathNotFound { url: String, commit: String, path: String },

    /// The policy path names a file, not a folder.
    #[error("source {url}: '{path}' in commit {commit} is a file, not a folder")]
    NotAFolder { url: String, commit: String, path: String },

    /// A symbolic link under the policy folder. Links are never followed: a policy must be the
    /// file itself, so what is enforced is exactly what the commit shows.
    #[error(
        "source {url}: '{path}' in commit {commit} is a symbolic link; links are not followed \
         (commit the file itself, or move the link out of the policy folder)"
    )]
    Symlink { url: String, commit: String, path: String },

    /// A submodule under the policy folder: its content is not in this repository.
    #[error(
        "source {url}: '{path}' in commit {commit} is a submodule; submodules are not read \
         (commit the policies into this repository)"
    )]
    Submodule { url: String, commit: String, path: String },

    /// A name in the tree that is not valid UTF-8.
    #[error("source {url}: a name under '{path}' in commit {commit} is not valid UTF-8")]
    NonUtf8Name { url: String, commit: String, path: String },

    /// More policy files than the limit.
    #[error("source {url}: commit {commit} has more than {limit} policy files under '{path}'")]
    TooManyFiles { url: String, commit: String, path: String, limit: usize },

    /// One policy file larger than the limit.
    #[error("source {url}: '{path}' in commit {commit} is {size} bytes, over the limit of {limit}")]
    FileTooLarge { url: String, commit: String, path: String, size: u64, limit: u64 },

    /// The policy files together larger than the limit.
    #[error(
        "source {url}: the policy files under '{path}' in commit {commit} add up to more than \
         {limit} bytes"
    )]
    TooLarge { url: String, commit: String, path: String, limit: u64 },

    /// Folders nested deeper than the limit under the policy folder.
    #[error("source {url}: '{path}' in commit {commit} is nested more than {limit} folders deep")]
    TooDeep { url: String, commit: String, path: String, limit: usize },

    /// An object of the commit could not be read from the mirror. The next fetch checks the
    /// mirror and re-creates it when it is damaged.
    #[error("source {url}: cannot read '{path}' of commit {commit} from the mirror")]
    Read {
        url: String,
        commit: String,
        path: String,
        #[source]
        source: GitDetail,
    },

    /// `watch` on a source that is not a local repository.
    #[error("source {url}: not a local repository; only local repositories are watched")]
    NotLocal { url: String },

    /// The file watcher could not be set up.
    #[error("source {url}: cannot watch {}", path.display())]
    Watch {
        url: String,
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

impl SourceError {
    /// True when the condition may clear by itself, so retrying later (with backoff) is the
    /// answer: the remote unreachable or slow, a branch deleted on the remote (it may be pushed
    /// again), a mirror that could not be written or repaired, an unreadable object. False when
    /// retrying alone cannot help: a bad URL, ref or path, credentials or certificates refused,
    /// a ref that never existed, a commit whose tree breaks the rules (symlinks, limits).
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. }
            | SourceError::Timeout { .. }
            | SourceError::RefDeleted { .. }
            | SourceError::Mirror { .. }
            | SourceError::Read { .. } => true,
            SourceError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ),
            SourceError::InvalidSpec { .. }
            | SourceError::Auth { .. }
            | SourceError::Certificate { .. }
            | SourceError::Owner { .. }
            | SourceError::RefNotFound { .. }
            | SourceError::NotACommit { .. }
            | SourceError::InvalidCommit { .. }
            | SourceError::UnknownCommit { .. }
            | SourceError::PathNotFound { .. }
            | SourceError::NotAFolder { .. }
            | SourceError::Symlink { .. }
            | SourceError::Submodule { .. }
            | SourceError::NonUtf8Name { .. }
            | SourceError::TooManyFiles { .. }
            | SourceError::FileTooLarge { .. }
            | SourceError::TooLarge { .. }
            | SourceError::TooDeep { .. }
            | SourceError::Locked { .. }
            | SourceError::NotLocal { .. }
            | SourceError::Watch { .. } => false,
        }
    }
}
