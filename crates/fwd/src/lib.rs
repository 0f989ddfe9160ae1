//! `fwd`, the GitOps reconcile daemon: every host follows a git repository of policies and
//! converges on it by itself.
//!
//! [`source`] follows the repository: it mirrors one branch or tag, reads a commit's policy
//! files from the object database, tells transient failures (retry with backoff) from
//! configuration problems, and watches a local repository for an immediate pick-up.

pub mod source;
