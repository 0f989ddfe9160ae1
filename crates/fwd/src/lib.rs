//! `fwd`, the GitOps reconcile daemon: every host follows a git repository of policies and
//! converges on it by itself.
//!
//! [`source`] follows the repository: it mirrors one branch or tag, reads a commit's policy
//! files from the object database, tells transient failures (retry with backoff) from
//! configuration problems, and watches a local repository for an immediate pick-up.
//! [`policy`] compiles a commit's files for this host, [`engine`] is the reconcile loop that
//! owns the data plane (through fw-loader's shared `enforce` path), [`cgroups`] watches the
//! workload cgroups, [`status`] and [`metrics`] are what it reports, [`server`] serves them,
//! and [`config`] is the configuration file.

pub mod cgroups;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod source;
pub mod status;
