//! The subcommands' side of the control socket: one request, one typed
//! answer; or, for `trace`, the stream of decisions.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

use super::protocol::{
    Conn, Created, Request, Response, Status, Streaming, TraceLine, TraceMessage,
};
use super::{refusal, socket_path};
use crate::config::{RuleConfig, ServiceConfig};

/// The name of a group, by id.
fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero group is valid; getgrgid_r fills it with pointers
    // into `buf`, which outlives every use of `group`.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given.
    let rc = unsafe { libc::getgrgid_r(gid, &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getgrgid_r succeeded, so gr_name points at a NUL-terminated
    // string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(group.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Connects to the control socket of the running `up` to ask `request`.
fn connect(state_dir: &Path, request: &Request) -> Result<UnixStream> {
    let path = socket_path(state_dir);
    UnixStream::connect(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            // The socket's mode keeps us out: say who it lets in.
            let group = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.mode() & 0o060 != 0 && m.gid() != 0)
                .map(|m| group_name(m.gid()).unwrap_or_else(|| m.gid().to_string()));
            anyhow::anyhow!(
                "connredir {}: {}",
                request.command(),
                refusal(group.as_deref())
            )
        } else {
            anyhow::Error::new(e).context(format!(
                "cannot reach a running `connredir up` at {} (is it running, and are you root?)",
                path.display()
            ))
        }
    })
}

/// The error a refused request gets, named after the command that asked.
fn refused(request: &Request, error: String) -> anyhow::Error {
    if error.starts_with("permission denied") {
        anyhow::anyhow!("connredir {}: {error}", request.command())
    } else {
        anyhow::anyhow!(error)
    }
}

/// Sends one request to the running `up` and returns its data.
fn call<T: DeserializeOwned>(state_dir: &Path, request: &Request) -> Result<Option<T>> {
    let mut stream = connect(state_dir, request)?;
    // A refused request may find the socket closed for writing; its answer
    // says why, so read it in any case.
    let sent = serde_json::to_writer(&mut stream, request)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(stream.write_all(b"\n")?));
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        sent?;
    }
    let response: Response<T> = serde_json::from_str(&line).context("malformed answer")?;
    if let Some(error) = response.error {
        return Err(refused(request, error));
    }
    Ok(response.data)
}

/// Like [`call`], for requests whose answer carries data.
fn call_for<T: DeserializeOwned>(state_dir: &Path, request: &Request) -> Result<T> {
    call(state_dir, request)?.context("malformed answer: no data")
}

/// `status`: scopes, services, rules with hits, counters.
pub fn status(state_dir: &Path) -> Result<Status> {
    call_for(state_dir, &Request::Status)
}

/// `conns`: the live redirected sockets.
pub fn conns(state_dir: &Path) -> Result<Vec<Conn>> {
    call_for(state_dir, &Request::Conns)
}

/// `service add`: registers `service`, returns its id.
pub fn service_add(state_dir: &Path, service: ServiceConfig) -> Result<Created> {
    call_for(state_dir, &Request::ServiceAdd { service })
}

/// `service del`: unregisters the service named `name`.
pub fn service_del(state_dir: &Path, name: String) -> Result<()> {
    call::<serde::de::IgnoredAny>(state_dir, &Request::ServiceDel { name }).map(drop)
}

/// `rule add`: adds `rule`, returns its id.
pub fn rule_add(state_dir: &Path, rule: RuleConfig) -> Result<Created> {
    call_for(
        state_dir,
        &Request::RuleAdd {
            rule: Box::new(rule),
        },
    )
}

/// `rule del`: removes the rule with this id.
pub fn rule_del(state_dir: &Path, id: u32) -> Result<()> {
    call::<serde::de::IgnoredAny>(state_dir, &Request::RuleDel { id }).map(drop)
}

/// `trace`: opens the stream of decisions; each item is one decision, until
/// the engine closes the connection.
pub fn trace(state_dir: &Path) -> Result<impl Iterator<Item = Result<TraceLine>>> {
    let request = Request::Trace;
    let mut stream = connect(state_dir, &request)?;
    serde_json::to_writer(&mut stream, &request)?;
    stream.write_all(b"\n")?;
    let mut lines = BufReader::new(stream).lines();
    let first = lines.next().context("the engine closed the connection")??;
    let answer: Response<Streaming> = serde_json::from_str(&first).context("malformed answer")?;
    if let Some(error) = answer.error {
        return Err(refused(&request, error));
    }
    Ok(lines.filter_map(|line| {
        let message = line
            .map_err(anyhow::Error::from)
            .and_then(|line| serde_json::from_str(&line).context("malformed trace line"));
        match message {
            Ok(TraceMessage::Decision(line)) => Some(Ok(line)),
            Ok(TraceMessage::Heartbeat) => None,
            Err(e) => Some(Err(e)),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_by_id() {
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }
}
