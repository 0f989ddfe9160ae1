//! The loader's one error type.
//!
//! One enum for the whole crate because callers (the daemon, fwctl, tests) mostly report and
//! stop; the variants say which step failed and keep what is needed to act on it, above all the
//! verifier's log when the kernel rejects a program (without it a rejection is undebuggable).

use std::io;

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
}

impl Error {
    pub(crate) fn map(map: impl Into<String>) -> impl FnOnce(MapError) -> Error {
        let map = map.into();
        move |source| Error::Map { map, source: Box::new(source) }
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
