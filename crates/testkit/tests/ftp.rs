//! A client that asks the kernel where it is connected: Python's `ftplib`
//! (the standard library's FTP client) opens each passive-mode data
//! connection to the address `getpeername()` gives for its control
//! connection, not to the address it was told to use (PASV) or connected
//! to. Behind a NAT redirect that is the server; behind the layer it must be
//! too, or the data connection goes to the service's address. The server
//! is pyftpdlib (Debian's `python3-pyftpdlib`); the control connection goes
//! through a service (the test kit's forwarding proxy), the data
//! connections, which no rule names, straight to the server. The client
//! runs as an unprivileged user in the scope, on IPv4 and IPv6.

use std::net::SocketAddr;
use std::path::Path;

use connredir_testkit::{
    free_addr, host_prefix, require_python_module, wait_listening, Lab, Proc, TestDir,
};
use serde_json::Value;

/// The unprivileged user the client and the server run as.
const NOBODY: u32 = 65534;

/// The file the client downloads.
const CONTENT: &str = "through the control connection's peer\n";

/// Logs in anonymously, downloads `hello.txt` over a passive data
/// connection (PASV on IPv4, EPSV on IPv6), and prints what it got and
/// what `getpeername()` said of the control connection.
const CLIENT: &str = r#"
import ftplib, json, sys
host, port = sys.argv[1], int(sys.argv[2])
ftp = ftplib.FTP()
try:
    ftp.connect(host, port, timeout=10)
    peer = ftp.sock.getpeername()
    ftp.login()
    chunks = []
    ftp.retrbinary("RETR hello.txt", chunks.append)
    ftp.quit()
    print(json.dumps({"ok": True, "peer": [peer[0], peer[1]], "content": b"".join(chunks).decode()}), flush=True)
except Exception as e:
    print(json.dumps({"ok": False, "error": repr(e)}), flush=True)
"#;

fn ftp_client_downloads_through_the_service(server_ip: &str, proxy_ip: &str, test: &str) {
    let python = Path::new("/usr/bin/python3");
    if !require_python_module(test, "pyftpdlib") {
        return;
    }
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let dir = TestDir::new(test, Some(NOBODY));
    dir.write("hello.txt", CONTENT);
    let script = dir.write("client.py", CLIENT);
    // The server, outside the scope.
    let server = free_addr(server_ip);
    let passive = free_addr(server_ip).port();
    let (port, range) = (server.port().to_string(), format!("{passive}-{passive}"));
    let interface = server.ip().to_string();
    let folder = dir.0.to_str().unwrap().to_string();
    let ftpd = Proc::spawn_program(
        &lab.cgroup("outside"),
        Some(NOBODY),
        python,
        &[
            "-m",
            "pyftpdlib",
            "-i",
            &interface,
            "-p",
            &port,
            "-r",
            &range,
            "-d",
            &folder,
        ],
    )
    .expect("start pyftpdlib");
    lab.procs.push(ftpd);
    wait_listening(server).expect("pyftpdlib listens");
    // The service for the control connection.
    let listen = free_addr(proxy_ip);
    let (_, cgroup) = lab.own_service(
        "inspector",
        &[listen],
        &host_prefix(server),
        Some(server.port()),
        0,
    );
    let proxy = lab.toy_proxy(&cgroup, None, "inspector", &[listen], &[]);

    let client = Proc::spawn_program(
        &lab.cgroup("scope/client"),
        Some(NOBODY),
        python,
        &[&script, &interface, &port],
    )
    .unwrap();
    let (status, lines) = client.finish().unwrap();
    assert!(status.success(), "{status}: {lines:?}");
    let report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["content"], CONTENT, "{report}");
    let peer = format!(
        "{}",
        SocketAddr::new(
            report["peer"][0].as_str().unwrap().parse().unwrap(),
            report["peer"][1].as_u64().unwrap() as u16
        )
    );
    assert_eq!(peer, server.to_string(), "getpeername(): {report}");
    let log = lab.wait_logged(proxy, 1);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["original_dst"], server.to_string(), "{log:?}");
}

#[test]
fn ftplib_takes_its_data_connection_to_the_server_ipv4() {
    ftp_client_downloads_through_the_service("127.0.0.2", "127.0.0.1", "ftp-v4");
}

#[test]
fn ftplib_takes_its_data_connection_to_the_server_ipv6() {
    ftp_client_downloads_through_the_service("::1", "::1", "ftp-v6");
}
