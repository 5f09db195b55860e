//! The error type of the host helpers.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the host helpers; each says what went wrong where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A cgroup path is unusable.
    #[error("cgroup {path}: {why}")]
    Cgroup {
        /// The path given.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// bpffs is missing at a path and cannot be mounted there.
    #[error("bpffs at {path}: {why}")]
    Bpffs {
        /// Where bpffs was wanted.
        path: PathBuf,
        /// What went wrong and what to do.
        why: String,
    },
    /// A child process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Asking whether a child process exited failed.
    #[error("cannot wait for process {pid}: {source}")]
    Wait {
        /// The child's pid.
        pid: u32,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A child process closed its output (it exited) without printing the
    /// line waited for.
    #[error("process {pid} ended its output without the line waited for")]
    OutputEnded {
        /// The child's pid.
        pid: u32,
    },
    /// A child process printed no line waited for in time.
    #[error("process {pid} printed no line waited for within {limit:?}")]
    LineTimeout {
        /// The child's pid.
        pid: u32,
        /// How long was waited.
        limit: Duration,
    },
    /// A child process did not exit in time.
    #[error("process {pid} did not exit within {limit:?}")]
    StillRunning {
        /// The child's pid.
        pid: u32,
        /// How long was waited.
        limit: Duration,
    },
}
