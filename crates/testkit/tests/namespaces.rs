//! Namespaces never mix: a process of the scope that enters a network
//! namespace of its own (as `unshare -Urn` does, as uid 65534) stays in its
//! cgroup, so the layer's programs run for it, and it can use the very
//! addresses of a host flow. It must neither take nor spoil a host flow's
//! record hand-off, nor be joined with a host flow in the acceleration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use connredir_engine::Service;
use connredir_testkit::{by_cgroup, free_addr, EchoServer, Lab, Proc};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Polls `what` until it returns Some, for at most 10 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file whose creation releases a waiting role; removed on drop.
struct Release(PathBuf);

impl Release {
    fn new(test: &str) -> Release {
        let path =
            std::env::temp_dir().join(format!("connredir-{test}-{}-release", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Release(path)
    }
    fn arg(&self) -> String {
        self.0.display().to_string()
    }
    fn release(&self) {
        std::fs::write(&self.0, b"").unwrap();
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn report(lines: &[String]) -> Value {
    serde_json::from_str(lines.iter().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

/// Runs the namespace client in `scope/attacker` as uid 65534 and returns
/// its report.
fn attacker(lab: &Lab, args: &[&str]) -> Value {
    let mut all = vec!["netns-attacker"];
    all.extend_from_slice(args);
    let (status, lines) = Proc::spawn(&lab.cgroup("scope/attacker"), Some(NOBODY), &all)
        .unwrap()
        .finish()
        .unwrap();
    assert!(status.success(), "attacker {args:?}: {status}, {lines:?}");
    report(&lines)
}

/// A host client (in `scope/client`) connects from `client` to `dst`, which
/// a rule sends to a service whose accept queue is full: its SYN is dropped
/// and its record waits in the hand-off map. Then `attack` runs (with the
/// service's address and the client's), then the service drains its queue.
/// Returns the report of the service's accepted socket from the client, and
/// the attacker's.
fn with_a_pending_host_flow(
    test: &str,
    attack: impl FnOnce(&Lab, SocketAddr, SocketAddr, SocketAddr) -> Value,
) {
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let dst = free_addr("127.0.0.2");
    let listen = free_addr("127.0.0.1");
    let cgroup = lab.cgroup("services/inspector");
    let id = lab.service("inspector", &[listen], by_cgroup(&cgroup), None);
    lab.route(id, "127.0.0.2/32", Some(dst.port()), 0);
    let release = Release::new(test);
    let (listen_arg, until) = (listen.to_string(), release.arg());
    let service = Proc::spawn(
        &cgroup,
        None,
        &[
            "stalled-service",
            "--listen",
            &listen_arg,
            "--until",
            &until,
            "--expect",
            "2",
        ],
    )
    .unwrap();
    service
        .wait_line("service ready", |l| l == "ready")
        .unwrap();
    // From outside the scope (not redirected): fills the accept queue.
    let filler = std::net::TcpStream::connect(listen).unwrap();

    let client = free_addr("127.0.0.1");
    let (bind, connect) = (client.to_string(), dst.to_string());
    let host = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &[
            "bound-client",
            "--bind",
            &bind,
            "--connect",
            &connect,
            "--bytes",
            "0",
        ],
    )
    .unwrap();
    eventually("the host flow's record to wait for its service", || {
        (lab.engine.pending_handoffs().unwrap() == 1).then_some(())
    });

    let theirs = attack(&lab, listen, client, dst);

    release.release();
    let (status, lines) = host.finish().unwrap();
    assert!(status.success(), "host client: {lines:?}");
    let host_pid = report(&lines)["pid"].clone();
    let (status, lines) = service.finish().unwrap();
    assert!(status.success(), "service: {lines:?}");
    drop(filler);
    let accepted: Vec<Value> = lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ours = accepted
        .iter()
        .find(|a| a["peer"] == client.to_string())
        .unwrap_or_else(|| panic!("the host flow was not accepted: {accepted:?}"));
    // The host flow's record reached its service, intact.
    assert_eq!(ours["records"], "ok", "{ours}; attacker: {theirs}");
    assert_eq!(ours["client_pid"], host_pid, "{ours}; attacker: {theirs}");
    assert_eq!(ours["chain"], serde_json::json!([id.0]), "{ours}");
    assert_eq!(lab.engine.pending_handoffs().unwrap(), 0);
}

#[test]
fn a_namespace_cannot_take_a_host_flows_pending_record() {
    with_a_pending_host_flow("ns-take", |lab, listen, client, _| {
        let (listen, bind) = (listen.to_string(), client.to_string());
        let theirs = attacker(lab, &["take", "--listen", &listen, "--bind", &bind]);
        // Its own connection was not redirected: nothing is its record.
        assert_eq!(theirs["records"], "NotRedirected", "{theirs}");
        theirs
    });
}

#[test]
fn a_namespace_cannot_replace_a_host_flows_pending_record() {
    with_a_pending_host_flow("ns-replace", |lab, listen, client, dst| {
        let (listen, bind, dst) = (listen.to_string(), client.to_string(), dst.to_string());
        let theirs = attacker(
            lab,
            &[
                "replace",
                "--listen",
                &listen,
                "--bind",
                &bind,
                "--connect",
                &dst,
            ],
        );
        // Its own redirected connection carries its own record.
        assert_eq!(theirs["records"], "ok", "{theirs}");
        assert_eq!(theirs["client_pid"], theirs["pid"], "{theirs}");
        theirs
    });
}

/// A service with acceleration, its destination an echo server in the scope,
/// the proxy the test kit's own. Returns the destination and the service's
/// listening address.
fn accelerated(lab: &mut Lab) -> (SocketAddr, SocketAddr) {
    let dst = free_addr("127.0.0.3");
    let listen = dst.to_string();
    let echo = Proc::spawn(
        &lab.cgroup("scope/server"),
        None,
        &["echo", "--listen", &listen],
    )
    .unwrap();
    echo.wait_line("echo ready", |l| l == "ready").unwrap();
    lab.procs.push(echo);
    let cgroup = lab.cgroup("services/fast");
    let proxy_listen = free_addr("127.0.0.1");
    let id = lab
        .engine
        .add_service(Service {
            name: "fast".into(),
            listen: vec![proxy_listen],
            identity: by_cgroup(&cgroup),
            context: None,
            own_connections_by_self: true,
            accelerate: true,
            on_down: Default::default(),
        })
        .unwrap();
    lab.route(id, "127.0.0.3/32", Some(dst.port()), 0);
    let listen = proxy_listen.to_string();
    let proxy = Proc::spawn(
        &cgroup,
        None,
        &["proxy", "--name", "fast", "--listen", &listen],
    )
    .unwrap();
    proxy.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proxy);
    (dst, proxy_listen)
}

/// The namespace client holds, in the acceleration maps, the key that the
/// service side of a host flow will have; the host flow's data must still go
/// to the service, never into the namespace's socket.
#[test]
fn a_namespace_is_never_joined_with_a_host_flow_in_the_acceleration() {
    let Some(mut lab) = Lab::new("ns-accel") else {
        return;
    };
    let (dst, listen) = accelerated(&mut lab);
    let client = free_addr("127.0.0.1");
    let release = Release::new("ns-accel");
    let (listen_arg, bind, connect, until) = (
        listen.to_string(),
        client.to_string(),
        dst.to_string(),
        release.arg(),
    );
    let attacker = Proc::spawn(
        &lab.cgroup("scope/attacker"),
        Some(NOBODY),
        &[
            "netns-attacker",
            "accel",
            "--listen",
            &listen_arg,
            "--bind",
            &bind,
            "--connect",
            &connect,
            "--until",
            &until,
        ],
    )
    .unwrap();
    attacker
        .wait_line("the namespace's socket in place", |l| {
            l.contains("\"ready\"")
        })
        .unwrap();
    // Its client end has left the maps; its accepted end stays.
    eventually("the namespace's client end to leave", || {
        (lab.engine.accelerated_sockets().unwrap() == 1).then_some(())
    });

    let (status, lines) = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &[
            "bound-client",
            "--bind",
            &bind,
            "--connect",
            &connect,
            "--bytes",
            "10000",
        ],
    )
    .unwrap()
    .finish()
    .unwrap();
    release.release();
    let (_, theirs) = attacker.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let host = report(&lines);
    let theirs = report(&theirs);
    assert_eq!(
        theirs["received"], 0,
        "the namespace read the host flow: {theirs}"
    );
    assert_eq!(host["ok"], true, "{host}; attacker: {theirs}");
    let log = lab.wait_logged(1, 1);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["accelerated"], true, "{log:?}");
}

/// Half-open connections held from a namespace keep hand-off entries only
/// while their sockets live; every one goes when they close.
#[test]
fn hand_off_entries_of_a_namespace_go_with_its_sockets() {
    let Some(mut lab) = Lab::new("ns-halfopen") else {
        return;
    };
    let dst = free_addr("127.0.0.2");
    let listen = free_addr("127.0.0.1");
    let id = lab.service(
        "absent",
        &[listen],
        by_cgroup(Path::new(&lab.cgroup("services/absent"))),
        None,
    );
    lab.route(id, "127.0.0.2/32", Some(dst.port()), 0);
    let release = Release::new("ns-halfopen");
    let (listen_arg, connect, until) = (listen.to_string(), dst.to_string(), release.arg());
    const HELD: usize = 200;
    let held = HELD.to_string();
    let attacker = Proc::spawn(
        &lab.cgroup("scope/attacker"),
        Some(NOBODY),
        &[
            "netns-attacker",
            "hold",
            "--listen",
            &listen_arg,
            "--bind",
            "127.0.0.1:0",
            "--connect",
            &connect,
            "--until",
            &until,
            "--count",
            &held,
        ],
    )
    .unwrap();
    let line = attacker
        .wait_line("half-open connections", |l| l.contains("\"held\""))
        .unwrap();
    let held: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(held["held"], HELD, "{held}");
    assert_eq!(lab.engine.pending_handoffs().unwrap(), HELD);
    release.release();
    let (status, lines) = attacker.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    eventually("the namespace's entries to go", || {
        (lab.engine.pending_handoffs().unwrap() == 0).then_some(())
    });
}

/// Namespaces of the scope holding as many half-open redirected connections
/// as they can hold together at most a bounded share of the hand-off map, so
/// they cannot keep the host's own flows from handing their records to their
/// service. (Without the bound, four namespaces of 17,000 each filled all
/// 65,536 entries and a host flow lost its record.)
#[test]
fn namespaces_cannot_fill_the_hand_off_map_for_the_host() {
    let Some(mut lab) = Lab::new("ns-flood") else {
        return;
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let cgroup = lab.cgroup("services/inspector");
    let id = lab.service("inspector", &[listen], by_cgroup(&cgroup), None);
    lab.route(id, "127.0.0.2/32", Some(dst.port()), 0);
    let listen_arg = listen.to_string();
    let proxy = Proc::spawn(
        &cgroup,
        None,
        &["proxy", "--name", "inspector", "--listen", &listen_arg],
    )
    .unwrap();
    proxy.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proxy);

    // More than other namespaces may hold together (8,192 of 65,536).
    const EACH: usize = 5_000;
    let release = Release::new("ns-flood");
    let (connect, until, each) = (dst.to_string(), release.arg(), EACH.to_string());
    let attackers: Vec<Proc> = (0..2)
        .map(|_| {
            Proc::spawn(
                &lab.cgroup("scope/attacker"),
                Some(NOBODY),
                &[
                    "netns-attacker",
                    "hold",
                    "--listen",
                    &listen_arg,
                    "--bind",
                    "127.0.0.1:0",
                    "--connect",
                    &connect,
                    "--until",
                    &until,
                    "--count",
                    &each,
                ],
            )
            .unwrap()
        })
        .collect();
    let started = Instant::now();
    for attacker in &attackers {
        let deadline = Instant::now() + Duration::from_secs(120);
        let line = loop {
            if let Some(line) = attacker
                .lines()
                .into_iter()
                .find(|l| l.contains("\"held\""))
            {
                break line;
            }
            assert!(Instant::now() < deadline, "{:?}", attacker.lines());
            std::thread::sleep(Duration::from_millis(50));
        };
        let held: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(held["held"], EACH, "{held}");
    }
    let pending = lab.engine.pending_handoffs().unwrap();
    eprintln!(
        "{} half-open connections held in {:?}; hand-off entries: {pending}",
        2 * EACH,
        started.elapsed()
    );
    let bound = connredir_abi::CONNREDIR_MAX_FOREIGN_HANDOFFS as usize;
    assert_eq!(pending, bound, "other namespaces hold their share, no more");

    let before = lab.engine.counters().unwrap().handoff_misses;
    let bytes = "1000";
    let (status, lines) = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &["client", "--connect", &connect, "--bytes", bytes],
    )
    .unwrap()
    .finish()
    .unwrap();
    let misses = lab.engine.counters().unwrap().handoff_misses - before;
    release.release();
    for attacker in attackers {
        let (status, lines) = attacker.finish().unwrap();
        assert!(status.success(), "{lines:?}");
    }
    let log = lab.wait_logged(0, 1);
    assert_eq!(misses, 0, "the host flow's record was lost: {log:?}");
    assert!(status.success(), "{lines:?}");
    assert_eq!(report(&lines)["ok"], true, "{lines:?}");
    assert_eq!(log[0]["records"], "ok", "{log:?}");
    eventually("the namespaces' entries to go", || {
        (lab.engine.pending_handoffs().unwrap() == 0).then_some(())
    });
}

/// Creates a BPF hash map with the given sizes and pins it at `path`.
fn pin_hash_map(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    // union bpf_attr for BPF_MAP_CREATE (its first fields) and BPF_OBJ_PIN.
    #[repr(C)]
    #[derive(Default)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        rest: [u32; 27],
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
    }
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let mut create = Create {
        map_type: BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max_entries,
        map_flags: BPF_F_NO_PREALLOC,
        ..Default::default()
    };
    let size = std::mem::size_of::<Create>() as libc::c_uint;
    // SAFETY: create is a valid bpf_attr prefix for BPF_MAP_CREATE (0).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &mut create as *mut Create, size) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = Pin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
        path_fd: 0,
    };
    let size = std::mem::size_of::<Pin>() as libc::c_uint;
    // SAFETY: pin is a valid bpf_attr prefix for BPF_OBJ_PIN (6).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, &mut pin as *mut Pin, size) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}: {err}", path.display());
}

/// A layer pinned by a connredir whose hand-off key had no namespace (36
/// bytes) is not taken over with keys of another size: the engine refuses
/// the pin directory and says what to do.
#[test]
fn a_layer_pinned_with_keys_without_namespaces_is_not_taken_over() {
    if !connredir_testkit::require_privileges("ns-pins") {
        return;
    }
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0.join("handoff"));
            let _ = connredir_engine::Engine::remove_pinned(&self.0);
        }
    }
    let dir = Dir(PathBuf::from(format!(
        "/sys/fs/bpf/connredir-test-ns-pins-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let record = std::mem::size_of::<connredir_abi::connredir_record>() as u32;
    pin_hash_map(
        &dir.0.join("handoff"),
        36,
        record,
        connredir_abi::CONNREDIR_MAX_HANDOFFS,
    );
    let err = connredir_engine::Engine::load_pinned(&dir.0)
        .expect_err("a hand-off map with 36-byte keys must not be reused");
    let text = err.to_string();
    assert!(text.contains("map handoff"), "{text}");
    assert!(text.contains("connredir down"), "{text}");
}
