//! The control socket of a running `connredir up`: one JSON request per
//! connection, one JSON answer (see [`protocol`]). The socket accepts root,
//! and the members of a group when the operator names one (`[control]
//! group`, `up --control-group`): its file mode says so, and each
//! connection's peer credentials (SO_PEERCRED) are checked as well.
//!
//! [`server`] is the side of `up`, [`client`] the side of the other
//! subcommands.

pub mod client;
pub mod protocol;
pub mod server;

use std::path::{Path, PathBuf};

pub use protocol::{Pending, Request};
pub use server::{handle, Access, ControlSocket, ServiceNames, TraceFeed};

/// Path of the control socket in the state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// "permission denied: the control socket accepts ...", the same words from
/// the daemon and from a client that the socket's mode keeps out.
fn refusal(group: Option<&str>) -> String {
    match group {
        Some(group) => format!(
            "permission denied: the control socket accepts root and members of group {group}"
        ),
        None => "permission denied: the control socket accepts root only \
                 (`connredir up --control-group GROUP` or [control] group lets a group in)"
            .into(),
    }
}
