//! The layer's counters, and the other counts read from its maps.
//!
//! Each counter is one row of the table below: its field name (also its
//! name in the status JSON and, as `connredir_<name>_total`, in /metrics),
//! its index (`enum connredir_counter` in maps.h) and its help text. The
//! `Counters` struct, its reader and [`Counters::TABLE`] are made from it,
//! so a new counter is the C enum value and one row here.

use aya::maps::{HashMap, MapData, PerCpuArray};
use connredir_abi::{connredir_handoff_key, connredir_record, map_names};

use crate::{map_err, Engine, Error};

/// One counter: what the status and /metrics call it and say about it, and
/// where the kernel counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Its name: the field of [`Counters`] and the key in the status JSON.
    pub name: &'static str,
    /// One sentence saying what it counts.
    pub help: &'static str,
    /// Its index in the `counters` map (`enum connredir_counter`).
    pub index: u32,
    /// The name of that index in maps.h (`CONNREDIR_CNT_...`).
    pub abi_name: &'static str,
}

/// Makes the `Counters` struct (a field per row, documented by its help
/// text), [`Counters::TABLE`], [`Counters::iter`] and the reader.
macro_rules! counters {
    ($($field:ident = $index:ident, $help:literal;)*) => {
        /// The layer's counters, summed over CPUs.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct Counters {
            $(
                #[doc = $help]
                pub $field: u64,
            )*
        }

        impl Counters {
            /// Every counter, in the order of the struct's fields.
            pub const TABLE: &'static [Counter] = &[$(
                Counter {
                    name: stringify!($field),
                    help: $help,
                    index: connredir_abi::$index,
                    abi_name: stringify!($index),
                },
            )*];

            /// Each counter's name, help text and value, in table order.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> {
                let values = [$(self.$field),*];
                Counters::TABLE
                    .iter()
                    .zip(values)
                    .map(|(c, value)| (c.name, c.help, value))
            }

            /// The counters, each read by its index.
            fn read_each(mut read: impl FnMut(u32) -> Result<u64, Error>) -> Result<Counters, Error> {
                Ok(Counters {
                    $($field: read(connredir_abi::$index)?,)*
                })
            }
        }
    };
}

counters! {
    redirects = CONNREDIR_CNT_REDIRECTS,
        "Connections redirected to a service.";
    loops_prevented = CONNREDIR_CNT_LOOPS_PREVENTED,
        "Times a matching rule was skipped because its service had already handled the flow \
         or was the connecting process.";
    hop_limit = CONNREDIR_CNT_HOP_LIMIT,
        "Connections left alone because their chain was full.";
    handoffs = CONNREDIR_CNT_HANDOFFS,
        "Records carried to an accepted socket.";
    handoff_misses = CONNREDIR_CNT_HANDOFF_MISSES,
        "Connections accepted on a service address without their record.";
    denied_sets = CONNREDIR_CNT_DENIED_SETS,
        "Record sets refused (caller neither root nor a service).";
    records_set = CONNREDIR_CNT_RECORDS_SET,
        "Records set by services on their onward sockets.";
    original_dst_answered = CONNREDIR_CNT_ORIGINAL_DST_ANSWERED,
        "SO_ORIGINAL_DST queries answered from a record.";
    records_inherited = CONNREDIR_CNT_RECORDS_INHERITED,
        "Onward connections of services that set no records, which took the record of the \
         connection they forward.";
    conns_untracked = CONNREDIR_CNT_CONNS_UNTRACKED,
        "Redirected connections missing from conns (its map was full).";
    trace_lost = CONNREDIR_CNT_TRACE_LOST,
        "Decisions lost because the trace ring buffer was full.";
    accel_joined = CONNREDIR_CNT_ACCEL_JOINED,
        "Sockets that joined the sockmap acceleration.";
    accel_passed = CONNREDIR_CNT_ACCEL_PASSED,
        "Joined sockets that wrote before their peer joined, so stayed on TCP.";
    accel_sends = CONNREDIR_CNT_ACCEL_SENDS,
        "Writes of joined sockets moved straight into their peer's receive queue, past TCP.";
    cut_throughs = CONNREDIR_CNT_CUT_THROUGHS,
        "Directions of accelerated flows a service handed to the kernel after inspecting them \
         (cut-through).";
    cut_through_sends = CONNREDIR_CNT_CUT_THROUGH_SENDS,
        "Writes moved straight to the far end of a flow, past its service.";
    failed_closed = CONNREDIR_CNT_FAILED_CLOSED,
        "Selected connects refused because the layer could not write their record (the \
         socket's option memory was full): never let through.";
    service_down_blocked = CONNREDIR_CNT_SERVICE_DOWN_BLOCKED,
        "Selected connects refused while their service's own listener was absent \
         (on_down = \"block\").";
    service_down_bypassed = CONNREDIR_CNT_SERVICE_DOWN_BYPASSED,
        "Services skipped while their own listener was absent (on_down = \"bypass\").";
    binds_refused = CONNREDIR_CNT_BINDS_REFUSED,
        "Binds of a service's address refused to processes that are not the service.";
    self_loops = CONNREDIR_CNT_SELF_LOOPS,
        "Connects of a service's listening process that its own rule would have sent back to \
         itself, kept from looping.";
    forged_records = CONNREDIR_CNT_FORGED_RECORDS,
        "Record sets refused to a service's process because the record was not one the layer \
         issued to that service (forged, changed, or the last hop another service's).";
    permitted = CONNREDIR_CNT_PERMITTED,
        "Connects and UDP datagrams a permit rule sent to their destination.";
    blocked = CONNREDIR_CNT_BLOCKED,
        "Connects and UDP datagrams a block rule refused (EACCES).";
}

/// Reads the counters.
pub(crate) fn read(engine: &Engine) -> Result<Counters, Error> {
    let name = map_names::COUNTERS;
    let map = engine.bpf.map(name).expect("checked at load");
    let array = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_err(name))?;
    Counters::read_each(|index| Ok(array.get(&index, 0).map_err(map_err(name))?.iter().sum()))
}

/// Number of records waiting in the hand-off map (connections redirected
/// whose service has not accepted them yet).
pub(crate) fn pending_handoffs(engine: &Engine) -> Result<usize, Error> {
    let name = map_names::HANDOFF;
    let map = engine.bpf.map(name).expect("checked at load");
    let handoff = HashMap::<&MapData, connredir_handoff_key, connredir_record>::try_from(map)
        .map_err(map_err(name))?;
    Ok(handoff.keys().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_of_the_abi_has_exactly_one_row() {
        // The enum's values run from 0 to CONNREDIR_CNT_MAX - 1 (maps.h), and
        // each row's index is the enum constant its row names.
        for index in 0..connredir_abi::CONNREDIR_CNT_MAX {
            let rows: Vec<&Counter> = Counters::TABLE
                .iter()
                .filter(|c| c.index == index)
                .collect();
            assert_eq!(rows.len(), 1, "counter index {index}: {rows:?}");
        }
        assert_eq!(
            Counters::TABLE.len(),
            connredir_abi::CONNREDIR_CNT_MAX as usize
        );
    }

    #[test]
    fn the_table_names_every_field_with_its_value() {
        let counters = Counters {
            redirects: 3,
            blocked: 7,
            ..Default::default()
        };
        // The status JSON has exactly the table's names, with its values.
        let json = serde_json::to_value(counters).unwrap();
        let fields = json.as_object().unwrap();
        let rows: Vec<(&str, u64)> = counters.iter().map(|(n, _, v)| (n, v)).collect();
        assert_eq!(rows.len(), fields.len());
        for (name, value) in &rows {
            assert_eq!(fields[*name], *value, "{name}");
        }
        assert_eq!(rows[0], ("redirects", 3));
        assert_eq!(counters.iter().last().map(|(_, _, v)| v), Some(7));
        assert!(Counters::TABLE.iter().all(|c| !c.help.is_empty()));
    }

    #[test]
    fn each_counter_is_read_from_its_index() {
        let counters = Counters::read_each(|index| Ok(u64::from(index) * 10)).unwrap();
        for (row, (_, _, value)) in Counters::TABLE.iter().zip(counters.iter()) {
            assert_eq!(value, u64::from(row.index) * 10, "{}", row.name);
        }
    }
}
