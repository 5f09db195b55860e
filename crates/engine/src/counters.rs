//! The layer's counters, and the other counts read from its maps.

use aya::maps::{HashMap, MapData, PerCpuArray};
use connredir_abi::{connredir_handoff_key, connredir_record, map_names};

use crate::{map_err, Engine, Error, Plain};

/// The layer's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Connections redirected to a service.
    pub redirects: u64,
    /// Times a matching rule was skipped because its service had already
    /// handled the flow or was the connecting process.
    pub loops_prevented: u64,
    /// Connections left alone because their chain was full.
    pub hop_limit: u64,
    /// Records carried to an accepted socket.
    pub handoffs: u64,
    /// Connections accepted on a service address without their record.
    pub handoff_misses: u64,
    /// Record sets refused (caller neither root nor a service).
    pub denied_sets: u64,
    /// Records set by services on their onward sockets.
    pub records_set: u64,
    /// `SO_ORIGINAL_DST` queries answered from a record.
    pub original_dst_answered: u64,
    /// Onward connections of services that set no records, which took the
    /// record of the connection they forward.
    pub records_inherited: u64,
    /// Redirected connections missing from `conns` (its map was full).
    pub conns_untracked: u64,
    /// Decisions lost because the trace ring buffer was full.
    pub trace_lost: u64,
    /// Sockets that joined the sockmap acceleration.
    pub accel_joined: u64,
    /// Joined sockets that wrote before their peer joined, so stayed on TCP.
    pub accel_passed: u64,
    /// Writes of joined sockets moved straight into their peer's receive
    /// queue, past TCP.
    pub accel_sends: u64,
    /// Directions of accelerated flows a service handed to the kernel
    /// after inspecting them (cut-through).
    pub cut_throughs: u64,
    /// Writes moved straight to the far end of a flow, past its service.
    pub cut_through_sends: u64,
    /// Selected connects refused because the layer could not write their
    /// record (the socket's option memory was full): never let through.
    pub failed_closed: u64,
    /// Selected connects refused while their service's own listener was
    /// absent (`on_down = "block"`).
    pub service_down_blocked: u64,
    /// Services skipped while their own listener was absent
    /// (`on_down = "bypass"`).
    pub service_down_bypassed: u64,
    /// Binds of a service's address refused to processes that are not the
    /// service.
    pub binds_refused: u64,
    /// Connects of a service's listening process that its own rule would
    /// have sent back to itself, kept from looping.
    pub self_loops: u64,
    /// Record sets refused to a service's process because the record was
    /// not one the layer issued to that service (forged, changed, or the
    /// last hop another service's).
    pub forged_records: u64,
}

/// Reads the counters.
pub(crate) fn read(engine: &Engine) -> Result<Counters, Error> {
    let name = map_names::COUNTERS;
    let map = engine.bpf.map(name).expect("checked at load");
    let array = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_err(name))?;
    let read = |index: u32| -> Result<u64, Error> {
        Ok(array.get(&index, 0).map_err(map_err(name))?.iter().sum())
    };
    use connredir_abi::*;
    Ok(Counters {
        redirects: read(CONNREDIR_CNT_REDIRECTS)?,
        loops_prevented: read(CONNREDIR_CNT_LOOPS_PREVENTED)?,
        hop_limit: read(CONNREDIR_CNT_HOP_LIMIT)?,
        handoffs: read(CONNREDIR_CNT_HANDOFFS)?,
        handoff_misses: read(CONNREDIR_CNT_HANDOFF_MISSES)?,
        denied_sets: read(CONNREDIR_CNT_DENIED_SETS)?,
        records_set: read(CONNREDIR_CNT_RECORDS_SET)?,
        original_dst_answered: read(CONNREDIR_CNT_ORIGINAL_DST_ANSWERED)?,
        records_inherited: read(CONNREDIR_CNT_RECORDS_INHERITED)?,
        conns_untracked: read(CONNREDIR_CNT_CONNS_UNTRACKED)?,
        trace_lost: read(CONNREDIR_CNT_TRACE_LOST)?,
        accel_joined: read(CONNREDIR_CNT_ACCEL_JOINED)?,
        accel_passed: read(CONNREDIR_CNT_ACCEL_PASSED)?,
        accel_sends: read(CONNREDIR_CNT_ACCEL_SENDS)?,
        cut_throughs: read(CONNREDIR_CNT_CUT_THROUGHS)?,
        cut_through_sends: read(CONNREDIR_CNT_CUT_THROUGH_SENDS)?,
        failed_closed: read(CONNREDIR_CNT_FAILED_CLOSED)?,
        service_down_blocked: read(CONNREDIR_CNT_SERVICE_DOWN_BLOCKED)?,
        service_down_bypassed: read(CONNREDIR_CNT_SERVICE_DOWN_BYPASSED)?,
        binds_refused: read(CONNREDIR_CNT_BINDS_REFUSED)?,
        self_loops: read(CONNREDIR_CNT_SELF_LOOPS)?,
        forged_records: read(CONNREDIR_CNT_FORGED_RECORDS)?,
    })
}

/// Number of records waiting in the hand-off map (connections redirected
/// whose service has not accepted them yet).
pub(crate) fn pending_handoffs(engine: &Engine) -> Result<usize, Error> {
    let name = map_names::HANDOFF;
    let map = engine.bpf.map(name).expect("checked at load");
    let handoff =
        HashMap::<&MapData, Plain<connredir_handoff_key>, Plain<connredir_record>>::try_from(map)
            .map_err(map_err(name))?;
    Ok(handoff.keys().count())
}
