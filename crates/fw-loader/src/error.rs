//! The loader's one error type.
//!
//! One enum for the whole crate because callers (the daemon, fwctl, tests) mostly report and
//! stop; the variants say which step failed and keep what is needed to act on it, above all the
//! verifier's log when the kernel rejects a program (without it a rejection is undebuggable).

use std::io;
use std::path::PathBuf;

use aya::maps::MapError;
use aya::programs::ProgramError;
use fw_compiler::encode::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// fw-loader was compiled with `AYA_BUILD_SKIP=1`, so it embeds no eBPF object.
    #[error("the eBPF object was not built (fw-loader was compiled with AYA_BUILD_SKIP set)")]
    ObjectNotBuilt,

    /// Parsing the object or creating its maps failed.
    #[error("loading the eBPF object failed: {0}")]
    Object(#[source] Box<aya::EbpfError>),

    /// The object lacks a program this loader needs (an object from another version).
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),

    /// The object lacks a map this loader needs.
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),

    /// The kernel's verifier rejected a program.
    #[error("the verifier rejected program {program}: {source}\n{verifier_log}")]
    Verifier {
        program: &'static str,
        #[source]
        source: io::Error,
        /// The verifier's log, as the kernel wrote it.
        verifier_log: String,
    },

    /// Any other failure of a program operation (wrong type, test run, ...).
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: Box<MapError>,
    },

    /// A capacity of 0: the kernel does not create empty maps.
    #[error("the capacity for {0} must be at least 1")]
    ZeroCapacity(&'static str),

    /// A generation index outside `0..GENERATIONS`.
    #[error("generation {0} does not exist (there are {n})", n = fw_common::GENERATIONS)]
    NoSuchGeneration(u32),

    /// The encoded state violates what the programs rely on (checked before anything is
    /// written).
    #[error("the encoded map state is invalid: {0}")]
    InvalidState(#[source] DecodeError),

    /// The encoded state names a map this loader does not know.
    #[error("the encoded map state has an unknown map {0}")]
    UnknownMap(String),

    /// The kernel holds an entry this loader cannot read (a value of the wrong size).
    #[error("map {map}: unexpected entry: {reason}")]
    Entry { map: &'static str, reason: &'static str },

    /// Reading the number of CPUs (for per-CPU maps) failed.
    #[error("cannot read the number of CPUs: {0}")]
    Cpus(#[source] io::Error),

    /// The pin root is not on a BPF filesystem.
    #[error(
        "{0} is not on a BPF filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or choose another --bpffs root"
    )]
    NotBpffs(PathBuf),

    /// Nothing is pinned under this bpffs root (no record map).
    #[error("nothing is loaded under {0} (no pinned record)")]
    NotPinned(PathBuf),

    /// A data plane is already pinned under this root (a load would replace it).
    #[error("a data plane is already pinned under {0}; adopt it or unload it first")]
    AlreadyPinned(PathBuf),

    /// The pinned programs were built from a different object than the one embedded here; the
    /// maps' layout may differ, so they are not adopted. `Dataplane::upgrade_pinned` replaces
    /// them in place (or unload first).
    #[error(
        "the programs pinned under {root} have ABI {pinned}, this build has {embedded}; unload them first"
    )]
    AbiMismatch { root: PathBuf, pinned: String, embedded: String },

    /// A file-system operation on the bpffs root failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Pinning an object failed.
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },

    /// Opening a pinned link failed.
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },

    /// Attaching the XDP program to an interface failed (in driver mode and in SKB mode).
    #[error("cannot attach XDP to {interface}: {source}")]
    Attach {
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },

    /// Swapping a pinned link's program (`BPF_LINK_UPDATE`) failed; the links already swapped
    /// were swapped back.
    #[error("cannot swap the program of link {path}: {source}")]
    LinkUpdate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A pinned link is not of the kind its pin name says (link type or attach type), so its
    /// program was not swapped; the links already swapped were swapped back.
    #[error("link {path} is not a {program} attachment; not swapped")]
    LinkMismatch { path: PathBuf, program: &'static str },

    /// The pinned record map holds something this loader cannot parse.
    #[error("the pinned record is corrupt: {0}")]
    Record(&'static str),

    /// A revision must be one line of at most `max` bytes.
    #[error("the revision must be a single line of at most {max} bytes")]
    BadRevision { max: usize },

    /// The saved state is larger than the record can hold.
    #[error("the saved state is {len} bytes, more than {max}")]
    StateTooLarge { len: usize, max: usize },

    /// After writing, the kernel's map does not hold what was written.
    #[error("map {0}: read-back after writing does not match the desired state")]
    VerifyFailed(&'static str),

    /// `Dataplane::apply_changes` cannot apply the change on top of what the data plane is
    /// known to hold (the standby does not hold the base state as far as this process knows,
    /// or the change does not fit the maps): nothing was written; apply the whole state.
    #[error("the change cannot be applied on top of what is loaded; apply the whole state")]
    StaleBase,

    /// The kernel gave no random bytes for a write id (`getrandom`).
    #[error("no random bytes for a write id: {0}")]
    Random(#[source] std::io::Error),

    /// A syscall of the verification after a write failed.
    #[error("map {map}: verifying the written entries failed")]
    Verify {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// A batched map command (a write, a delete, or the read of a verification or read-back)
    /// failed; the error says how many entries it did.
    #[error("map {map}: {source}")]
    Batch {
        map: &'static str,
        #[source]
        source: crate::batch::BatchError,
    },

    /// A map syscall the loader makes itself (not through aya) failed.
    #[error("map {map}: {source}")]
    MapSyscall {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// `FW_LOADER_HOOK` asked the apply to stop at this step (a test of failing static).
    #[error("apply aborted at step {0} (FW_LOADER_HOOK)")]
    HookAbort(&'static str),
}

impl Error {
    pub(crate) fn map(map: impl Into<String>) -> impl FnOnce(MapError) -> Error {
        let map = map.into();
        move |source| Error::Map { map, source: Box::new(source) }
    }

    pub(crate) fn batch(map: &'static str) -> impl FnOnce(crate::batch::BatchError) -> Error {
        move |source| Error::Batch { map, source }
    }

    pub(crate) fn program(program: &'static str) -> impl FnOnce(ProgramError) -> Error {
        move |source| match source {
            ProgramError::LoadError { io_error, verifier_log } => Error::Verifier {
                program,
                source: io_error,
                verifier_log: verifier_log.to_string(),
            },
            source => Error::Program { program, source: Box::new(source) },
        }
    }
}
