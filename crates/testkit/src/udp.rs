//! The UDP roles: a toy UDP service built on the `connredir` library the
//! way a service author would write one, and a UDP client.
//!
//! The service receives a client's first datagram on its socket bound to
//! the service address, then opens a socket of its own for that client:
//! bound to the same address (SO_REUSEADDR, SO_REUSEPORT) and connected to
//! the client's address. On that socket the layer answers the redirect
//! options as on an accepted TCP socket; the service sets the records on
//! its onward socket before connecting it, and relays both ways.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use socket2::{Domain, Socket, Type};

use connredir::UdpFlow;

use crate::{emit, kind, outcome};

/// How long a relay leg waits for a datagram before it gives up.
const IDLE: Duration = Duration::from_secs(10);

/// A UDP socket bound to `addr` with SO_REUSEADDR and SO_REUSEPORT.
fn bound(addr: SocketAddr) -> Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The toy UDP service on `listen`; `set_records` hands each flow's records
/// to its onward socket.
pub fn service(name: &str, listen: SocketAddr, set_records: bool) -> Result<()> {
    let socket: UdpSocket = bound(listen)
        .with_context(|| format!("bind {listen}"))?
        .into();
    println!("ready");
    // Onward sockets by client: datagrams that reach the shared socket
    // before the client's own socket exists go the same way.
    let flows: Arc<Mutex<HashMap<SocketAddr, UdpSocket>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = socket.recv_from(&mut buf)?;
        if let Some(onward) = flows.lock().unwrap().get(&client) {
            let _ = onward.send(&buf[..n]);
            continue;
        }
        match open_flow(name, listen, client, set_records) {
            Ok((own, onward)) => {
                let _ = onward.send(&buf[..n]);
                flows.lock().unwrap().insert(client, onward.try_clone()?);
                let flows = Arc::clone(&flows);
                std::thread::spawn(move || {
                    relay(own, onward);
                    flows.lock().unwrap().remove(&client);
                });
            }
            Err(e) => emit(json!({ "proxy": name, "error": format!("{e:#}") })),
        }
    }
}

/// The service's own socket for `client`, and its onward socket to the
/// flow's original destination.
fn open_flow(
    name: &str,
    listen: SocketAddr,
    client: SocketAddr,
    set_records: bool,
) -> Result<(UdpSocket, UdpSocket)> {
    let flow = UdpFlow::open(listen, client).context("open the client's socket")?;
    let records = flow.records();
    let context = flow.context();
    let original = flow.original_destination();
    let destination = match (&original, &records) {
        (Ok(dst), _) => *dst,
        (Err(_), Ok(r)) => r.original_destination().context("record without hops")?,
        (Err(e), Err(_)) => anyhow::bail!("no original destination: {e}"),
    };
    let mut line = json!({
        "proxy": name,
        "peer": client.to_string(),
        "original_dst": original.as_ref().map(|a| a.to_string()).unwrap_or_else(|e| kind(e).into()),
        "records": outcome(&records),
        "context": outcome(&context),
    });
    if let Ok(r) = &records {
        line["chain"] = json!(r.chain().iter().map(|s| s.0).collect::<Vec<_>>());
        line["client_pid"] = json!(r.client().pid);
        line["record_dst"] = json!(r.original_destination().map(|a| a.to_string()));
    }
    if let Ok(c) = &context {
        if let Some((remote, local)) = c.original_addresses() {
            line["context_remote"] = json!(remote.to_string());
            line["context_local"] = json!(local.map(|l| l.to_string()));
        }
    }
    let onward = if set_records {
        flow.connect_onward(destination)
            .with_context(|| format!("connect to {destination} with the records"))?
    } else {
        let onward = UdpSocket::bind(if destination.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        onward
            .connect(destination)
            .with_context(|| format!("connect to {destination}"))?;
        onward
    };
    emit(line);
    Ok((flow.into_socket(), onward))
}

/// Copies datagrams both ways until one side is idle for `IDLE`.
fn relay(own: UdpSocket, onward: UdpSocket) {
    let legs = [
        (own.try_clone(), onward.try_clone()),
        (onward.try_clone(), own.try_clone()),
    ];
    let threads: Vec<_> = legs
        .into_iter()
        .filter_map(|(from, to)| Some((from.ok()?, to.ok()?)))
        .map(|(from, to)| {
            std::thread::spawn(move || {
                let _ = from.set_read_timeout(Some(IDLE));
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = from.recv(&mut buf) {
                    if to.send(&buf[..n]).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// Sends `count` datagrams to `addr` (connected with `connect()`, or with
/// `sendto()` when `unconnected`) and checks each echo. Reports where the
/// echoes came from (`recvfrom`) and, when connected, the socket's peer.
/// With `until`, the socket stays open after the report until that file
/// exists; then it is closed (`{"closed": true}`) while the process lives on
/// until the file is removed, so that what a close does can be seen apart
/// from what an exit does.
pub fn client(
    addr: SocketAddr,
    count: usize,
    unconnected: bool,
    until: Option<&std::path::Path>,
) -> Result<()> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    if !unconnected {
        if let Err(e) = socket.connect(addr) {
            emit(json!({ "ok": false, "connect": e.to_string(), "errno": e.raw_os_error() }));
            return Ok(());
        }
    }
    let mut from = Vec::new();
    let mut ok = true;
    let mut buf = vec![0u8; 65536];
    for i in 0..count {
        let payload = format!("datagram {i} from {}", std::process::id());
        let sent = if unconnected {
            socket.send_to(payload.as_bytes(), addr)
        } else {
            socket.send(payload.as_bytes())
        };
        if let Err(e) = sent {
            ok = false;
            from.push(format!("send error {}", e.raw_os_error().unwrap_or(0)));
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, source)) => {
                ok &= &buf[..n] == payload.as_bytes();
                from.push(source.to_string());
            }
            Err(e) => {
                ok = false;
                from.push(format!("error: {e}"));
            }
        }
    }
    let peer = if unconnected {
        None
    } else {
        Some(
            socket
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("error: {e}")),
        )
    };
    emit(json!({
        "ok": ok,
        "local": socket.local_addr()?.to_string(),
        "from": from,
        "peer": peer,
    }));
    if let Some(until) = until {
        while !until.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(socket);
        emit(json!({ "closed": true }));
        while until.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
