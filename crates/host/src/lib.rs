//! Host plumbing of connredir, apart from BPF: where cgroup v2 is and
//! trees of cgroups made and removed again, bpffs, what `/proc` says about
//! sockets and processes, and child processes started inside a cgroup.
//!
//! The engine, the command line, the test kit and the benchmark share these
//! helpers, so each exists once.

#![warn(missing_docs)]

pub mod bpffs;
pub mod cgroup;
pub mod child;
mod error;
pub mod procfs;

pub use error::Error;
