//! The engine's error type, and the conversions of aya's and the kernel's
//! errors into it (a verifier rejection shows the end of its log).

use std::path::PathBuf;

use aya::maps::MapError;
use aya::programs::ProgramError;

/// Errors of the engine; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading BPF programs needs root.
    #[error("connredir must run as root to load BPF programs (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    NotRoot,
    /// The object could not be loaded.
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// The verifier rejected a program.
    #[error(
        "the kernel's verifier rejected program {name} ({errno}); its last words:\n{last_lines}\n\
         (this is a bug in connredir or a kernel it was not built for: please report it with `uname -r`)"
    )]
    Verifier {
        /// Program name.
        name: &'static str,
        /// The error the kernel returned.
        errno: std::io::Error,
        /// The end of the verifier's log.
        last_lines: String,
    },
    /// The kernel does not have a program type or hook the layer needs.
    #[error(
        "this kernel cannot load program {name} ({errno}): connredir needs Linux 5.18 or later \
         built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_JIT"
    )]
    Unsupported {
        /// Program name.
        name: &'static str,
        /// The error the kernel returned.
        errno: std::io::Error,
    },
    /// A program could not be loaded or attached for another reason.
    #[error("program {name} could not be loaded or attached: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: ProgramError,
    },
    /// A program could not be attached to a cgroup (or its link pinned).
    #[error("attaching {program} to {}: {source}", cgroup.display())]
    Attach {
        /// Program name.
        program: &'static str,
        /// The cgroup.
        cgroup: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// bpffs is missing or a pin cannot be made.
    #[error("pinning in {}: {why}", dir.display())]
    Pin {
        /// The pin directory.
        dir: PathBuf,
        /// What went wrong and what to do.
        why: String,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: MapError,
    },
    /// The kernel gave no random bytes for the key that seals records.
    #[error("cannot read random bytes for the record seal key (getrandom): {0}")]
    SealKey(#[source] std::io::Error),
    /// A cgroup path is unusable.
    #[error("cgroup {path}: {why}")]
    Cgroup {
        /// The path given.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A service definition is invalid.
    #[error("invalid service {0}")]
    InvalidService(String),
    /// A rule definition is invalid.
    #[error("invalid rule: {0}")]
    InvalidRule(String),
    /// No such service.
    #[error("no service with id {0}")]
    UnknownService(u32),
    /// No such rule.
    #[error("no rule with id {0}")]
    UnknownRule(u32),
    /// The kernel's BPF run-time statistics could not be turned on.
    #[error("turning on the kernel's BPF run-time statistics (BPF_ENABLE_STATS, needs CAP_SYS_ADMIN): {0}")]
    RunTimeStats(#[source] std::io::Error),
    /// Another failure of the host's cgroups, bpffs or processes.
    #[error(transparent)]
    Host(connredir_host::Error),
}

impl From<connredir_host::Error> for Error {
    /// Keeps the engine's own variants (and so their messages) for the
    /// cgroup and bpffs failures it always reported as such.
    fn from(e: connredir_host::Error) -> Error {
        match e {
            connredir_host::Error::Cgroup { path, why } => Error::Cgroup { path, why },
            connredir_host::Error::Bpffs { path, why } => Error::Pin { dir: path, why },
            other => Error::Host(other),
        }
    }
}

/// Lines of the verifier's log worth showing: its end, where it says why.
const VERIFIER_LINES: usize = 12;

pub(crate) fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            // 524 is the kernel's ENOTSUPP, which some BPF paths return.
            let unsupported = matches!(
                io_error.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
            );
            if lines.is_empty() && unsupported {
                Error::Unsupported {
                    name,
                    errno: io_error,
                }
            } else {
                let tail = lines[lines.len().saturating_sub(VERIFIER_LINES)..]
                    .iter()
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Error::Verifier {
                    name,
                    errno: io_error,
                    last_lines: tail,
                }
            }
        }
        source => Error::Program { name, source },
    }
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(errno: i32, log: &str) -> Error {
        program_err("connredir_connect4")(ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.into()),
        })
    }

    #[test]
    fn a_verifier_rejection_shows_the_end_of_its_log() {
        let log: String = (1..=40).map(|i| format!("{i}: insn\n")).collect::<String>()
            + "R1 invalid mem access 'scalar'\nprocessed 9 insns\n";
        let text = load_error(libc::EACCES, &log).to_string();
        assert!(text.starts_with(
            "the kernel's verifier rejected program connredir_connect4 (Permission denied (os error 13)); its last words:\n  31: insn\n"
        ), "{text}");
        assert!(text.contains("  R1 invalid mem access 'scalar'\n  processed 9 insns\n"));
        assert!(!text.contains("30: insn"), "{text}");
    }

    #[test]
    fn a_kernel_without_the_hook_is_named_as_such() {
        let text = load_error(libc::EINVAL, "").to_string();
        assert!(
            text.contains("connredir needs Linux 5.18 or later"),
            "{text}"
        );
    }
}
