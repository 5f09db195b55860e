//! pid identities die with their process: once a service's registered
//! process exits, the next process to get that pid (here an unprivileged
//! one, given the pid on purpose) is not the service.

use std::time::Duration;

use connredir_engine::{Identity, Service};
use connredir_testkit::{free_addr, service_spec, EchoServer, Lab, Proc, Release};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Starts `args` in `cgroup` as `uid` with process id `pid`, by setting the
/// kernel's last-allocated pid just before the fork (other forks on the
/// machine can take it first: a few tries).
fn spawn_with_pid(lab: &Lab, cgroup: &str, uid: u32, pid: u32, args: &[&str]) -> Proc {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write ns_last_pid (needs root)");
        let proc = Proc::spawn(&lab.cgroup(cgroup), Some(uid), args).unwrap();
        if proc.pid() == pid {
            return proc;
        }
        // Not the pid we wanted: let it finish, and try again.
        let _ = proc.finish();
    }
    panic!("could not start a process with pid {pid}");
}

/// The service of these tests: its proxy (by cgroup) and one more process
/// (by pid), with a context only it may read.
fn guarded(pid: u32, cgroup: &std::path::Path, listen: std::net::SocketAddr) -> Service {
    Service {
        name: "guarded".into(),
        listen: vec![listen],
        identity: Identity {
            pids: vec![pid],
            cgroups: vec![cgroup.to_owned()],
            ..Default::default()
        },
        context: Some(b"only for the service".to_vec()),
        own_connections_by_self: true,
        accelerate: false,
        transparent: false,
        on_down: Default::default(),
    }
}

/// A long-lived process of the test, in `cgroup`, to register by its pid.
fn worker(lab: &Lab, cgroup: &str) -> Proc {
    let proc = Proc::spawn(
        &lab.cgroup(cgroup),
        None,
        &["echo", "--listen", "127.0.0.1:0"],
    )
    .unwrap();
    proc.wait_line("worker ready", |l| l == "ready").unwrap();
    proc
}

#[test]
fn a_new_process_with_a_departed_services_pid_is_not_the_service() {
    let Some((mut lab, server)) = Lab::with_server("pid-reuse") else {
        return;
    };
    let dst = server.addr();
    let release = Release::new("pid-reuse", "release");
    let connect = dst.to_string();
    let departed = Proc::spawn(
        &lab.cgroup("scope/worker"),
        None,
        &[
            "service-probe",
            "--connect",
            &connect,
            "--after",
            &release.arg(),
        ],
    )
    .unwrap();
    departed.wait_line("probe ready", |l| l == "ready").unwrap();
    let pid = departed.pid();
    // The service: its proxy (by cgroup) and one more process (by pid).
    let cgroup = lab.cgroup("services/guarded");
    let listen = free_addr("127.0.0.1");
    let id = lab
        .engine
        .add_service(guarded(pid, &cgroup, listen))
        .unwrap();
    lab.route(id, "127.0.0.2/32", Some(dst.port()), 0);
    let proxy = Proc::spawn(
        &cgroup,
        None,
        &[
            "proxy",
            "--name",
            "guarded",
            "--listen",
            &listen.to_string(),
        ],
    )
    .unwrap();
    proxy.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proxy);

    // While it lives, the process is the service: it may set records, and
    // its own connection is not redirected to itself.
    release.release();
    let (status, lines) = departed.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["set"], "ok", "{report}");
    assert_eq!(report["records"], "NotRedirected", "{report}");
    // The identity goes when the process does; give that a moment.
    std::thread::sleep(Duration::from_millis(200));
    let (status, lines) = spawn_with_pid(
        &lab,
        "scope/client",
        NOBODY,
        pid,
        &["service-probe", "--connect", &connect],
    )
    .finish()
    .unwrap();
    assert!(status.success(), "{lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["pid"], pid, "{report}");
    // Not the service: it may not set records,
    assert_eq!(report["set"], "AccessDenied", "{report}");
    // its connection is the service's to inspect (not "by self"),
    assert_eq!(report["records"], "ok", "{report}");
    assert_eq!(report["chain"], serde_json::json!([id.0]), "{report}");
    // and the service's context is not for it.
    assert_eq!(report["context"], "AccessDenied", "{report}");
    let log = lab.wait_logged(0, 1);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["client_pid"], pid, "{log:?}");
}

#[test]
fn registering_a_pid_that_does_not_exist_is_an_error() {
    let Some(mut lab) = Lab::new("pid-absent") else {
        return;
    };
    let mut gone = worker(&lab, "scope/worker");
    let pid = gone.pid();
    gone.kill().unwrap();
    let identity = Identity {
        pids: vec![pid],
        ..Default::default()
    };
    let added = lab
        .engine
        .add_service(service_spec("ghost", &[free_addr("127.0.0.1")], identity));
    let err = added.expect_err("a pid with no process is no identity");
    assert!(err.to_string().contains(&format!("pid {pid}")), "{err}");
    assert_eq!(lab.engine.services().count(), 0);
}

/// Removes a pin directory (which detaches its links) when dropped.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = connredir_engine::Engine::remove_pinned(&self.0);
    }
}

/// The kernel tells a departed service process from a later one with its
/// pid also when no engine runs to remove the identity: a pinned layer whose
/// engine has stopped (as between `connredir up` runs).
#[test]
fn without_a_running_engine_a_reused_pid_is_still_not_the_service() {
    let name = "pid-pinned";
    if !connredir_testkit::require_privileges(name) {
        return;
    }
    // Dropped in reverse: processes, then the pins (detaching), then the tree.
    let tree = connredir_testkit::test_tree(name).unwrap();
    let pins = Pins(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/connredir-test-{name}-{}",
        std::process::id()
    )));
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let dst = server.addr();
    let mut engine = connredir_engine::Engine::load_pinned(&pins.0).unwrap();
    for cgroup in ["scope", "services"] {
        engine.attach(tree.cgroup(cgroup).unwrap()).unwrap();
    }
    let spawn = |cgroup: &str, uid: Option<u32>, args: &[&str]| {
        Proc::spawn(&tree.cgroup(cgroup).unwrap(), uid, args).unwrap()
    };
    let release = Release::new(name, "release");
    let connect = dst.to_string();
    let departed = spawn(
        "scope/worker",
        None,
        &[
            "service-probe",
            "--connect",
            &connect,
            "--after",
            &release.arg(),
        ],
    );
    departed.wait_line("probe ready", |l| l == "ready").unwrap();
    let pid = departed.pid();
    let cgroup = tree.cgroup("services/guarded").unwrap();
    let listen = free_addr("127.0.0.1");
    let id = engine.add_service(guarded(pid, &cgroup, listen)).unwrap();
    engine
        .add_rule(connredir_engine::Rule {
            destinations: vec!["127.0.0.2/32".parse().unwrap()],
            ports: vec![dst.port()..=dst.port()],
            ..connredir_engine::Rule::tcp_to(id)
        })
        .unwrap();
    let proxy = spawn(
        "services/guarded",
        None,
        &[
            "proxy",
            "--name",
            "guarded",
            "--listen",
            &listen.to_string(),
        ],
    );
    proxy.wait_line("proxy ready", |l| l == "ready").unwrap();
    // The engine stops (after a complete start, as `up` does); the layer
    // stays attached, its identities with it.
    engine.finish_takeover().unwrap();
    drop(engine);
    // The process, the service while it lives (the kernel agrees), exits.
    release.release();
    let (status, lines) = departed.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["set"], "ok", "{report}");
    assert_eq!(report["records"], "NotRedirected", "{report}");

    let mut impostor = None;
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let proc = spawn(
            "scope/client",
            Some(NOBODY),
            &["service-probe", "--connect", &connect],
        );
        if proc.pid() == pid {
            impostor = Some(proc);
            break;
        }
        let _ = proc.finish();
    }
    let (status, lines) = impostor.expect("a process with the pid").finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["pid"], pid, "{report}");
    assert_eq!(report["set"], "AccessDenied", "{report}");
    assert_eq!(report["records"], "ok", "{report}");
    assert_eq!(report["context"], "AccessDenied", "{report}");
    drop(proxy);
    drop(pins);
    drop(tree);
}
