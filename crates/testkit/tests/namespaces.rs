//! Namespaces never mix: a process of the scope that enters a network
//! namespace of its own (as `unshare -Urn` does, as uid 65534) stays in its
//! cgroup, so the layer's programs run for it, and it can use the very
//! addresses of a host flow. Its namespace has an instance of the service
//! of its own (as a container with its own proxy would; the client itself
//! may not listen on a service's address). It must neither take nor spoil a
//! host flow's record hand-off, nor be joined with a host flow in the
//! acceleration, nor crowd the host's hand-offs out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use connredir_engine::Service;
use connredir_testkit::{
    by_cgroup, eventually, free_addr, require_program, service_spec, Lab, Proc, Release,
};
use serde_json::Value;

const NOBODY: u32 = 65534;

fn report(lines: &[String]) -> Value {
    serde_json::from_str(lines.iter().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

/// The namespace client: starts the attacker role in `scope/attacker` as
/// uid 65534, waits until it has its own network namespace, starts there
/// the service instance `service` (test-kit role arguments) in the
/// service's cgroup, and lets the client go on. Returns the client and the
/// service instance.
fn attacker_with_service(
    lab: &Lab,
    test: &str,
    args: &[&str],
    service_cgroup: &Path,
    service: &[&str],
) -> (Proc, Proc, Release) {
    let nsenter = require_program(test, "nsenter").expect("nsenter (util-linux)");
    let go = Release::new(test, "go");
    let go_arg = go.arg();
    let mut all = vec!["netns-attacker"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--go", &go_arg]);
    let client = Proc::spawn(&lab.cgroup("scope/attacker"), Some(NOBODY), &all).unwrap();
    client
        .wait_line("its own namespace", |l| l.contains("\"netns\""))
        .unwrap();
    let target = client.pid().to_string();
    let testkit = connredir_testkit::testkit_bin();
    let mut inner = vec![
        "--target",
        &target,
        "--net",
        "--",
        testkit.to_str().unwrap(),
    ];
    inner.extend_from_slice(service);
    let instance = Proc::spawn_program(service_cgroup, None, &nsenter, &inner).unwrap();
    instance
        .wait_line("the service in the namespace", |l| l == "ready")
        .unwrap();
    go.release();
    (client, instance, go)
}

/// A host client (in `scope/client`) connects from `client` to `dst`, which
/// a rule sends to a service whose accept queue is full: its SYN is dropped
/// and its record waits in the hand-off map. Then `attack` runs (with the
/// service's address and the client's), then the service drains its queue:
/// the host flow's record must reach it, intact.
fn with_a_pending_host_flow(
    test: &str,
    attack: impl FnOnce(&Lab, &Path, SocketAddr, SocketAddr, SocketAddr) -> Value,
) {
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let dst = free_addr("127.0.0.2");
    let listen = free_addr("127.0.0.1");
    let (id, cgroup) = lab.own_service("inspector", &[listen], "127.0.0.2/32", Some(dst.port()), 0);
    let release = Release::new(test, "release");
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

    let theirs = attack(&lab, &cgroup, listen, client, dst);

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
    assert_eq!(ours["records"], "ok", "{ours}; the namespace's: {theirs}");
    assert_eq!(
        ours["client_pid"], host_pid,
        "{ours}; the namespace's: {theirs}"
    );
    assert_eq!(ours["chain"], serde_json::json!([id.0]), "{ours}");
    assert_eq!(lab.engine.pending_handoffs().unwrap(), 0);
}

/// Runs a hand-off attack: the namespace client connects from the host
/// client's address (to `connect`), and the service instance of its
/// namespace accepts. Returns the client's report and what the instance's
/// accepted socket carried.
fn handoff_attack(
    lab: &Lab,
    test: &str,
    cgroup: &Path,
    mode: &str,
    listen: SocketAddr,
    client: SocketAddr,
    connect: SocketAddr,
) -> (Value, Value) {
    let (listen, bind, connect) = (listen.to_string(), client.to_string(), connect.to_string());
    let (attacker, instance, _go) = attacker_with_service(
        lab,
        test,
        &[mode, "--bind", &bind, "--connect", &connect],
        cgroup,
        // Accepts at once ("/" exists) and reports what it accepted.
        &[
            "stalled-service",
            "--listen",
            &listen,
            "--until",
            "/",
            "--expect",
            "1",
        ],
    );
    let (status, lines) = attacker.finish().unwrap();
    assert!(status.success(), "namespace client: {lines:?}");
    let theirs = report(&lines);
    let (status, lines) = instance.finish().unwrap();
    assert!(status.success(), "service in the namespace: {lines:?}");
    (theirs, report(&lines))
}

#[test]
fn a_namespace_cannot_take_a_host_flows_pending_record() {
    with_a_pending_host_flow("ns-take", |lab, cgroup, listen, client, _| {
        let (_, accepted) = handoff_attack(lab, "ns-take", cgroup, "take", listen, client, listen);
        // The namespace's connection was not redirected: no record is its.
        assert_eq!(accepted["records"], "NotRedirected", "{accepted}");
        accepted
    });
}

#[test]
fn a_namespace_cannot_replace_a_host_flows_pending_record() {
    with_a_pending_host_flow("ns-replace", |lab, cgroup, listen, client, dst| {
        let (theirs, accepted) =
            handoff_attack(lab, "ns-replace", cgroup, "replace", listen, client, dst);
        // Its own redirected connection carries its own record.
        assert_eq!(accepted["records"], "ok", "{accepted}");
        assert_eq!(accepted["client_pid"], theirs["pid"], "{accepted}");
        accepted
    });
}

/// A service with acceleration, its destination an echo server in the scope,
/// the proxy the test kit's own. Returns the destination, the service's
/// listening address and its cgroup.
fn accelerated(lab: &mut Lab) -> (SocketAddr, SocketAddr, PathBuf) {
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
    let id = lab.register(Service {
        accelerate: true,
        ..service_spec("fast", &[proxy_listen], by_cgroup(&cgroup))
    });
    lab.route(id, "127.0.0.3/32", Some(dst.port()), 0);
    lab.toy_proxy(&cgroup, None, "fast", &[proxy_listen], &[]);
    (dst, proxy_listen, cgroup)
}

/// In its namespace, the client leaves the service instance holding the
/// accepted end of a connection whose 4-tuple the service side of a host
/// flow will have; the host flow's data must still reach the host's
/// service, never that other namespace's socket.
#[test]
fn a_namespace_is_never_joined_with_a_host_flow_in_the_acceleration() {
    let Some(mut lab) = Lab::new("ns-accel") else {
        return;
    };
    let (dst, listen, cgroup) = accelerated(&mut lab);
    let client = free_addr("127.0.0.1");
    let until = Release::new("ns-accel", "until");
    let (listen_arg, bind, connect, until_arg) = (
        listen.to_string(),
        client.to_string(),
        dst.to_string(),
        until.arg(),
    );
    let (attacker, instance, _go) = attacker_with_service(
        &lab,
        "ns-accel",
        &[
            "accel",
            "--bind",
            &bind,
            "--connect",
            &connect,
            "--serve",
            &connect,
            "--until",
            &until_arg,
        ],
        &cgroup,
        &["proxy", "--name", "fast-there", "--listen", &listen_arg],
    );
    attacker
        .wait_line("the namespace's socket in place", |l| {
            l.contains("\"ready\"")
        })
        .unwrap();
    // Its client end has left the maps; the service's ends there stay (the
    // accepted one, and the onward one with its silent server's).
    eventually("the namespace's client end to leave", || {
        (lab.engine.accelerated_sockets().unwrap() == 3).then_some(())
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
    until.release();
    let (_, theirs) = attacker.finish().unwrap();
    drop(instance);
    assert!(status.success(), "{lines:?}");
    let host = report(&lines);
    assert_eq!(host["ok"], true, "{host}; the namespace's: {theirs:?}");
    let log = lab.wait_logged(1, 1);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["accelerated"], true, "{log:?}");
}

/// The namespace client keeps `count` redirected connections half-open to
/// the service instance of its namespace (whose accept queue is full).
/// Returns the client and the instance, which hold them until `until`, and
/// the file that let the client go (kept until the client has seen it).
fn hold_half_open(
    lab: &Lab,
    test: &str,
    cgroup: &Path,
    listen: SocketAddr,
    dst: SocketAddr,
    count: usize,
    until: &Release,
) -> (Proc, Proc, Release) {
    let (listen, connect, until, count) = (
        listen.to_string(),
        dst.to_string(),
        until.arg(),
        count.to_string(),
    );
    attacker_with_service(
        lab,
        test,
        &[
            "hold",
            "--listen",
            &listen,
            "--connect",
            &connect,
            "--until",
            &until,
            "--count",
            &count,
        ],
        cgroup,
        &[
            "stalled-service",
            "--listen",
            &listen,
            "--until",
            &until,
            "--expect",
            "0",
        ],
    )
}

/// Waits (at most 120 s) for the namespace client's count of held
/// connections.
fn held(attacker: &Proc) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(line) = attacker
            .lines()
            .into_iter()
            .find(|l| l.contains("\"held\""))
        {
            return serde_json::from_str(&line).unwrap();
        }
        assert!(Instant::now() < deadline, "{:?}", attacker.lines());
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let (_, cgroup) = lab.own_service("inspector", &[listen], "127.0.0.2/32", Some(dst.port()), 0);
    let until = Release::new("ns-halfopen", "until");
    const HELD: usize = 200;
    let (attacker, instance, _go) =
        hold_half_open(&lab, "ns-halfopen", &cgroup, listen, dst, HELD, &until);
    let held = held(&attacker);
    eprintln!("half-open: {held}");
    assert_eq!(held["held"], HELD, "{held}");
    assert_eq!(lab.engine.pending_handoffs().unwrap(), HELD);
    until.release();
    let (status, lines) = attacker.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    drop(instance);
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
    let Some((mut lab, server)) = Lab::with_server("ns-flood") else {
        return;
    };
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let (_, cgroup) = lab.own_service("inspector", &[listen], "127.0.0.2/32", Some(dst.port()), 0);
    lab.toy_proxy(&cgroup, None, "inspector", &[listen], &[]);

    // More than other namespaces may hold together (8,192 of 65,536).
    const EACH: usize = 5_000;
    let until = Release::new("ns-flood", "until");
    let started = Instant::now();
    let namespaces: Vec<(Proc, Proc, Release)> = (0..2)
        .map(|_| hold_half_open(&lab, "ns-flood", &cgroup, listen, dst, EACH, &until))
        .collect();
    for (attacker, _, _) in &namespaces {
        assert_eq!(held(attacker)["held"], EACH);
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
    let connect = dst.to_string();
    let (status, lines) = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &["client", "--connect", &connect, "--bytes", "1000"],
    )
    .unwrap()
    .finish()
    .unwrap();
    let misses = lab.engine.counters().unwrap().handoff_misses - before;
    until.release();
    for (attacker, instance, _go) in namespaces {
        let (status, lines) = attacker.finish().unwrap();
        assert!(status.success(), "{lines:?}");
        drop(instance);
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
