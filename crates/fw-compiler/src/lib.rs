//! The fw/v1 policy language.
//!
//! Pipeline, each stage a module with one job: `yaml` (text to spanned nodes) -> `lower`
//! (nodes to the typed `ast`, with diagnostics) -> `resolve` (link sets, check names, select
//! the policies of one host: `model`) -> `compile` (flatten into the logical `mapstate`) ->
//! `encode` (`fw-common` bytes). `eval` is the reference evaluator: the plain statement of what
//! a verdict is, which everything else is tested against.
//!
//! The crate is pure: it reads only what it is given and never touches the kernel.

pub mod ast;
pub mod cache;
pub mod compile;
pub mod diag;
pub mod diff;
pub mod encode;
pub mod entries;
pub mod eval;
pub mod ids;
pub mod incremental;
pub mod load;
pub mod lookup;
pub mod lower;
pub mod mapstate;
pub mod model;
#[cfg(feature = "random-policies")]
pub mod random_policies;
pub mod resolve;
pub mod schema;
pub mod source;
pub mod testing;
pub mod yaml;
