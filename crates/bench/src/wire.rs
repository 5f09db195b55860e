//! The reports the worker roles send back to the driver: one JSON object on
//! one line of the worker's stdout. Both ends use these types, so a field
//! renamed on one side cannot go unnoticed on the other.
//!
//! Fields are declared in alphabetical order: the key order of the lines as
//! they were first written (from JSON maps, which sort their keys), so the
//! lines stay byte for byte the same; a test pins them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A worker report: written as one line by the worker, read back from that
/// line by the driver.
pub trait Report: Serialize + DeserializeOwned {
    /// The report as its line (without the newline).
    fn to_line(&self) -> String {
        // Plain structs of numbers and strings: serialising cannot fail.
        serde_json::to_string(self).expect("a worker report serialises")
    }

    /// Reads a report from its line.
    fn from_line(line: &str) -> serde_json::Result<Self> {
        serde_json::from_str(line)
    }
}

/// Whether a line a worker printed is a report (the other lines are words
/// such as `ready`).
pub fn is_report(line: &str) -> bool {
    line.starts_with('{')
}

/// `connect-loop`: the connections made, one after the other, and how long
/// they took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectLoop {
    /// Connections made.
    pub count: u64,
    /// Time for all of them, in nanoseconds.
    pub elapsed_ns: u64,
}

impl Report for ConnectLoop {}

/// `load`: the small requests answered by all clients together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Requests answered in full.
    pub count: u64,
    /// Time from the start to the last client's end, in nanoseconds.
    pub elapsed_ns: u64,
    /// Connections that failed.
    pub errors: u64,
    /// The error of one failed connection (`null` when none failed).
    pub last_error: Option<String>,
    /// Median time to the first byte of the answer, in microseconds.
    pub p50_us: u32,
    /// 99th percentile of that time, in microseconds.
    pub p99_us: u32,
}

impl Report for Load {}

/// `bulk`: one download read to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bulk {
    /// Bytes received.
    pub bytes: u64,
    /// Time from connect to the end of the data, in nanoseconds.
    pub elapsed_ns: u64,
}

impl Report for Bulk {}

/// `hold`, first report: every connection is open (and has sent its bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldOpened {
    /// Time to open them all, in nanoseconds.
    pub elapsed_ns: u64,
    /// Connections open.
    pub opened: u64,
}

impl Report for HoldOpened {}

/// `hold`, last report: told to, it has closed them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldClosed {
    /// Connections closed.
    pub closed: u64,
}

impl Report for HoldClosed {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each report's line, exactly as the driver has always read it.
    #[test]
    fn lines_are_unchanged() {
        fn check<R: Report + PartialEq + std::fmt::Debug>(report: R, line: &str) {
            assert_eq!(report.to_line(), line);
            assert!(is_report(line));
            assert_eq!(R::from_line(line).unwrap(), report);
        }
        check(
            ConnectLoop {
                count: 3,
                elapsed_ns: 42,
            },
            r#"{"count":3,"elapsed_ns":42}"#,
        );
        check(
            Load {
                count: 10,
                elapsed_ns: 5_000,
                errors: 0,
                last_error: None,
                p50_us: 70,
                p99_us: 300,
            },
            r#"{"count":10,"elapsed_ns":5000,"errors":0,"last_error":null,"p50_us":70,"p99_us":300}"#,
        );
        check(
            Load {
                count: 1,
                elapsed_ns: 9,
                errors: 2,
                last_error: Some("Connection refused (os error 111)".into()),
                p50_us: 1,
                p99_us: 1,
            },
            r#"{"count":1,"elapsed_ns":9,"errors":2,"last_error":"Connection refused (os error 111)","p50_us":1,"p99_us":1}"#,
        );
        check(
            Bulk {
                bytes: 1 << 20,
                elapsed_ns: 77,
            },
            r#"{"bytes":1048576,"elapsed_ns":77}"#,
        );
        check(
            HoldOpened {
                elapsed_ns: 8,
                opened: 100,
            },
            r#"{"elapsed_ns":8,"opened":100}"#,
        );
        check(HoldClosed { closed: 100 }, r#"{"closed":100}"#);
        assert!(!is_report("ready"));
    }
}
