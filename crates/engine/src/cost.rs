//! What the layer's programs cost the kernel, by the kernel's own account:
//! each program's accumulated run time and number of runs, which the kernel
//! keeps only while run-time statistics are on ([`RunTimeStats`]). Read
//! before and after some work, the difference divided by the connections
//! made is the BPF time per connection, which a busy machine disturbs far
//! less than a connection rate.

use std::os::fd::OwnedFd;
use std::time::Duration;

use connredir_kernel::programs;

use crate::attach::PROGRAMS;
use crate::{program_err, Engine, Error};

/// Keeps the kernel's BPF run-time statistics on while it lives
/// (`BPF_ENABLE_STATS`; the kernel turns them off when the last holder
/// closes, whatever the `kernel.bpf_stats_enabled` sysctl says meanwhile).
#[derive(Debug)]
pub struct RunTimeStats {
    _enabled: OwnedFd,
}

impl RunTimeStats {
    /// Turns the statistics on (needs `CAP_SYS_ADMIN`).
    pub fn enable() -> Result<RunTimeStats, Error> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| Error::RunTimeStats(e.io_error))?;
        Ok(RunTimeStats { _enabled: fd })
    }
}

/// One program's run time and runs, accumulated while statistics were on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramCost {
    /// The program (one of [`crate::programs`]).
    pub program: &'static str,
    /// Time spent running it.
    pub run_time: Duration,
    /// Times it ran.
    pub runs: u64,
}

impl ProgramCost {
    /// What ran between `earlier` (a reading of the same program) and this
    /// reading.
    pub fn since(&self, earlier: &ProgramCost) -> ProgramCost {
        ProgramCost {
            program: self.program,
            run_time: self.run_time.saturating_sub(earlier.run_time),
            runs: self.runs.saturating_sub(earlier.runs),
        }
    }
}

impl Engine {
    /// Every loaded program's run time and runs so far, in the order the
    /// programs are attached (the socket map's acceleration program last,
    /// when it is loaded). Counts only while a [`RunTimeStats`] is held.
    pub fn program_costs(&self) -> Result<Vec<ProgramCost>, Error> {
        let mut costs = Vec::with_capacity(PROGRAMS.len() + 1);
        for program in PROGRAMS.into_iter().chain([programs::ACCEL]) {
            let Some(loaded) = self.bpf.program(program) else {
                continue;
            };
            // The acceleration program loads only when a service accelerates.
            if loaded.fd().is_err() {
                continue;
            }
            let info = loaded.info().map_err(program_err(program))?;
            costs.push(ProgramCost {
                program,
                run_time: info.run_time(),
                runs: info.run_count(),
            });
        }
        Ok(costs)
    }
}
