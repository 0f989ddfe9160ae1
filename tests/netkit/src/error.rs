//! The one error type of the kit. Failures to set up a namespace, link or cgroup are errors
//! (the test cannot go on); what happened to a probe's traffic is not an error but an
//! [`crate::Outcome`], because "refused" or "timed out" is often exactly what a test expects.

use std::io;
use std::time::Duration;

/// What went wrong while building or tearing down a test fixture.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper command (`ip`, `ping`, ...) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    /// A helper command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?}")]
    CommandTimeout { command: String, timeout: Duration },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// /proc/self/mountinfo lists no cgroup2 file system.
    #[error("no cgroup v2 mount in /proc/self/mountinfo")]
    NoCgroup2,
    /// Every veth slot is held by a live test.
    #[error("all {0} veth slots are in use")]
    NoFreeSlot(u16),
    /// A link did not reach operstate "up" in time.
    #[error("link {name} did not come up within {timeout:?}")]
    LinkNotUp { name: String, timeout: Duration },
    /// The caller passed something the kit cannot use (bad cgroup name, address outside the
    /// pair's subnet, ...).
    #[error("{0}")]
    Invalid(String),
}

/// The kit's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}
