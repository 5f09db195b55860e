//! The Python package (`python/`): it installs with pip into a fresh virtual
//! environment, from the repository and nothing else; its unit tests pass
//! against the installed copy; and its example proxy (`python/examples/
//! proxy.py`), run as an unprivileged user on the installed package, chains
//! with `connredir-proxy` in both orders under the real layer, curl (uid
//! 65534) as the client; its example UDP service (`python/examples/
//! udp_service.py`, on `connredir.udp_flow` and `udp_connect_onward`)
//! chains with the test kit's UDP service in both orders, the test kit's
//! UDP client (uid 65534) as the client.
//!
//! The interpreter is `$CONNREDIR_PYTHON`, else `/usr/bin/python3` (the one
//! scripts/setup installs with venv, setuptools and wheel), else `python3`
//! on PATH.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use connredir_engine::{Protocol, Rule, ServiceId};
use connredir_testkit::{
    by_cgroup, free_addr, require_program, workspace_bin, EchoServer, Lab, Proc, UdpEchoServer,
};
use serde_json::{json, Value};

/// The unprivileged user that runs the client and the Python proxy.
const NOBODY: u32 = 65534;

/// The repository's `python/` directory.
fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python")
}

/// The interpreter to test with; None when the test must be skipped (no
/// Python, outside CI).
fn python(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONNREDIR_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        return Some(system.to_owned());
    }
    require_program(test, "python3")
}

/// Runs a command to its end; panics with its output when it fails.
fn run(what: &str, command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Copies a directory tree, leaving out Python's caches and build output.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name_text = name.to_string_lossy();
        if name_text == "__pycache__" || name_text == "build" || name_text.ends_with(".egg-info") {
            continue;
        }
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// Lets every user read (and search) everything under `path`: the proxy
/// runs as an unprivileged user on the installed package.
fn readable_by_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = meta.permissions().mode();
    let extra = if meta.is_dir() || mode & 0o100 != 0 {
        0o005
    } else {
        0o004
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | extra)).unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            readable_by_all(&entry.unwrap().path());
        }
    }
}

/// A virtual environment with the package pip-installed from a copy of
/// `python/` (so that no build output lands in the repository), removed on
/// drop.
struct Venv {
    dir: PathBuf,
}

impl Venv {
    /// Makes the environment with `python` and installs the package: no
    /// index, no build isolation, so pip fetches nothing and the build
    /// backend is the system's setuptools (the package needs nothing else).
    fn install(python: &Path, tag: &str) -> Venv {
        let dir =
            std::env::temp_dir().join(format!("connredir-python-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let venv = Venv { dir };
        let source = venv.dir.join("src");
        copy_tree(&package_dir(), &source);
        run(
            "python3 -m venv",
            Command::new(python)
                .args(["-m", "venv", "--system-site-packages"])
                .arg(venv.dir.join("venv")),
        );
        run(
            "pip install",
            Command::new(venv.python())
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-index",
                    "--no-build-isolation",
                    "--disable-pip-version-check",
                ])
                .arg(&source)
                // Nothing from the repository may shadow the installed copy.
                .current_dir(&venv.dir),
        );
        readable_by_all(&venv.dir);
        venv
    }

    /// The environment's interpreter.
    fn python(&self) -> PathBuf {
        self.dir.join("venv/bin/python3")
    }

    /// The example proxy, copied where every user can read it.
    fn proxy_script(&self) -> PathBuf {
        self.example("proxy.py")
    }

    /// An example, copied where every user can read it.
    fn example(&self, name: &str) -> PathBuf {
        self.dir.join("src/examples").join(name)
    }
}

impl Drop for Venv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `pip install` from the repository gives an importable package made of
/// the standard library alone, and its unit tests pass against the
/// installed copy (not the source tree).
#[test]
fn the_package_installs_with_pip_and_its_unit_tests_pass() {
    let Some(python) = python("py_install") else {
        return;
    };
    let venv = Venv::install(&python, "install");
    let where_from = run(
        "import connredir",
        Command::new(venv.python())
            .args(["-c", "import connredir; print(connredir.__file__)"])
            .current_dir(&venv.dir),
    );
    let file = String::from_utf8_lossy(&where_from.stdout)
        .trim()
        .to_string();
    assert!(
        file.starts_with(venv.dir.join("venv").to_str().unwrap()) && file.contains("site-packages"),
        "connredir imported from {file}, not the environment"
    );
    let tests = package_dir().join("tests");
    let output = run(
        "python -m unittest",
        Command::new(venv.python())
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(&tests)
            .arg("-t")
            .arg(&tests)
            .current_dir(&venv.dir),
    );
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(report.contains("\nOK"), "{report}");
    let ran = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(ran >= 20, "only {ran} unit tests ran: {report}");
}

/// Registers a service in its own cgroup `services/NAME` with one rule for
/// `dst` at `priority`; returns its id, cgroup and listening address.
fn service_for(
    lab: &mut Lab,
    name: &str,
    dst: std::net::SocketAddr,
    priority: u32,
) -> (ServiceId, PathBuf, std::net::SocketAddr) {
    let cgroup = lab.cgroup(&format!("services/{name}"));
    let listen = free_addr("127.0.0.1");
    let id = lab.service(name, &[listen], by_cgroup(&cgroup), None);
    lab.engine
        .add_rule(Rule {
            destinations: vec![format!("{}/32", dst.ip()).parse().unwrap()],
            ports: vec![dst.port()..=dst.port()],
            priority,
            ..Rule::tcp_to(id)
        })
        .expect("add rule");
    (id, cgroup, listen)
}

/// Waits (at most 10 s) for the first JSON line of `lab.procs[index]`, then
/// a moment more, and returns all of them (a second would be a flow seen
/// twice).
fn logged(lab: &Lab, index: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.proxy_log(index).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    lab.proxy_log(index)
}

/// The example Python proxy (installed package, uid 65534) and
/// `connredir-proxy` on one flow from curl (uid 65534), in both priority
/// orders: the request reaches the server once and comes back, each proxy
/// sees the flow once, with the chain in priority order and the same flow
/// id, and the Python proxy's set_records hands on the sealed record as the
/// layer issued it (an unprivileged process may set no other).
#[test]
fn a_python_proxy_and_the_reference_proxy_chain_in_both_orders() {
    let Some(python) = python("py_chain") else {
        return;
    };
    let Some(curl) = require_program("py_chain", "curl") else {
        return;
    };
    if !connredir_testkit::require_privileges("py_chain") {
        return;
    }
    let venv = Venv::install(&python, "chain");
    for python_first in [true, false] {
        let Some((mut lab, server)) =
            Lab::with_server_from("pychain", || EchoServer::start_replying_once("127.0.0.2:0"))
        else {
            return;
        };
        let dst = server.addr();
        let (py_priority, rust_priority) = if python_first { (1, 2) } else { (2, 1) };

        let (py_id, py_cgroup, py_listen) = service_for(&mut lab, "python", dst, py_priority);
        let script = venv.proxy_script();
        let py_listen_text = py_listen.to_string();
        let args = [
            script.to_str().unwrap(),
            "--name",
            "python",
            "--listen",
            &py_listen_text,
        ];
        let proc = Proc::spawn_program(&py_cgroup, Some(NOBODY), &venv.python(), &args)
            .expect("start the Python proxy");
        proc.wait_line("Python proxy ready", |l| l == "ready")
            .unwrap();
        assert!(
            proc.lines().contains(&format!("service {}", py_id.0)),
            "the Python proxy's listener is service {}: {:?}",
            py_id.0,
            proc.lines()
        );
        lab.procs.push(proc);
        let py_proxy = lab.procs.len() - 1;

        let (rust_id, rust_cgroup, rust_listen) = service_for(&mut lab, "rust", dst, rust_priority);
        let rust_listen = rust_listen.to_string();
        let proc = Proc::spawn_program(
            &rust_cgroup,
            None,
            &workspace_bin("connredir-proxy"),
            &["--name", "rust", "--listen", &rust_listen],
        )
        .expect("start connredir-proxy");
        proc.wait_line("connredir-proxy ready", |l| l == "ready")
            .unwrap();
        lab.procs.push(proc);
        let rust_proxy = lab.procs.len() - 1;

        let url = format!("http://{dst}/python-chain");
        let client = Proc::spawn_program(
            &lab.cgroup("scope/curl"),
            Some(NOBODY),
            &curl,
            &["-sS", "--max-time", "10", "--http0.9", &url],
        )
        .unwrap();
        let (status, lines) = client.finish().unwrap();
        let order = if python_first {
            "python first"
        } else {
            "rust first"
        };
        assert!(status.success(), "{order}: curl: {status}: {lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("GET /python-chain HTTP/1.1")),
            "{order}: the echo server's answer: {lines:?}"
        );

        let (first, second) = if python_first {
            (py_id.0, rust_id.0)
        } else {
            (rust_id.0, py_id.0)
        };
        let py_log = logged(&lab, py_proxy);
        let rust_log = logged(&lab, rust_proxy);
        assert_eq!(py_log.len(), 1, "{order}: Python proxy: {py_log:?}");
        assert_eq!(rust_log.len(), 1, "{order}: connredir-proxy: {rust_log:?}");
        let (py, rust) = (&py_log[0], &rust_log[0]);
        let (py_chain, rust_chain) = if python_first {
            (json!([first]), json!([first, second]))
        } else {
            (json!([first, second]), json!([first]))
        };
        assert_eq!(py["chain"], py_chain, "{order}: {py}");
        assert_eq!(rust["chain"], rust_chain, "{order}: {rust}");
        assert_eq!(py["state"], "redirected_by_self", "{order}: {py}");
        assert_eq!(
            py["context"],
            dst.to_string(),
            "{order}: the default context: {py}"
        );
        for entry in [py, rust] {
            assert_eq!(entry["verdict"], "allow", "{order}: {entry}");
            assert_eq!(entry["original_dst"], dst.to_string(), "{order}: {entry}");
            assert_eq!(entry["client"]["uid"], NOBODY, "{order}: {entry}");
            assert_eq!(entry["client"]["command"], "curl", "{order}: {entry}");
            let up = entry["bytes_up"].as_u64().unwrap();
            assert!(up > 0, "{order}: {entry}");
            assert_eq!(entry["bytes_down"], up, "{order}: the echo: {entry}");
        }
        assert!(py["flow"].is_string(), "{order}: {py}");
        assert_eq!(
            py["flow"], rust["flow"],
            "{order}: one flow id on the chain"
        );
        assert_eq!(server.accepted().len(), 1, "{order}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 2, "{order}: {counters:?}");
        assert_eq!(counters.handoff_misses, 0, "{order}: {counters:?}");
        // Both proxies handed the record on themselves (set, not inherited
        // through SO_ORIGINAL_DST), and the layer took both as issued.
        assert_eq!(counters.records_set, 2, "{order}: {counters:?}");
        assert_eq!(counters.records_inherited, 0, "{order}: {counters:?}");
        assert_eq!(counters.denied_sets, 0, "{order}: {counters:?}");
        assert_eq!(counters.forged_records, 0, "{order}: {counters:?}");
    }
}

/// The example Python UDP service (installed package, uid 65534) and the
/// test kit's UDP service on the same flows, in both priority orders: each
/// client (uid 65534) gets every echo from the original destination, each
/// service handles each flow once, with the chain in priority order, and
/// the Python service reads the records, its redirect state, the context
/// and the original destination on its socket for the flow, and hands the
/// sealed record on as the layer issued it.
#[test]
fn a_python_udp_service_and_the_test_kits_chain_in_both_orders() {
    const FLOWS: usize = 2;
    let Some(python) = python("py_udp") else {
        return;
    };
    if !connredir_testkit::require_privileges("py_udp") {
        return;
    }
    let venv = Venv::install(&python, "udp");
    for python_first in [true, false] {
        let Some(mut lab) = Lab::new("pyudp") else {
            return;
        };
        let server = UdpEchoServer::start("127.0.0.2:0").unwrap();
        let dst = server.addr();
        let prefix = format!("{}/32", dst.ip());
        let (py_priority, kit_priority) = if python_first { (1, 2) } else { (2, 1) };

        let py_cgroup = lab.cgroup("services/pyudp");
        let py_listen = free_addr("127.0.0.1");
        let py_id = lab.service("pyudp", &[py_listen], by_cgroup(&py_cgroup), None);
        lab.route_protocol(py_id, Protocol::Udp, &prefix, Some(dst.port()), py_priority);
        let script = venv.example("udp_service.py");
        let py_listen = py_listen.to_string();
        let args = [
            script.to_str().unwrap(),
            "--name",
            "pyudp",
            "--listen",
            &py_listen,
        ];
        let proc = Proc::spawn_program(&py_cgroup, Some(NOBODY), &venv.python(), &args)
            .expect("start the Python UDP service");
        proc.wait_line("Python UDP service ready", |l| l == "ready")
            .unwrap();
        assert!(
            proc.lines().contains(&format!("service {}", py_id.0)),
            "the Python UDP service's address is service {}: {:?}",
            py_id.0,
            proc.lines()
        );
        lab.procs.push(proc);
        let py_service = lab.procs.len() - 1;
        let (kit_id, kit_service) = lab.udp_service(
            "toy",
            free_addr("127.0.0.1"),
            &prefix,
            dst.port(),
            kit_priority,
            &[],
        );

        let order = if python_first {
            "python first"
        } else {
            "test kit first"
        };
        let dst_text = dst.to_string();
        for _ in 0..FLOWS {
            let args = ["udp-client", "--connect", &dst_text];
            let client = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).unwrap();
            let (status, lines) = client.finish().unwrap();
            assert!(status.success(), "{order}: client {status}: {lines:?}");
            let report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
            assert_eq!(report["ok"], true, "{order}: {report}");
            assert_eq!(
                report["from"],
                json!(vec![dst_text.clone(); 3]),
                "{order}: {report}"
            );
            assert_eq!(report["peer"], dst_text, "{order}: {report}");
        }

        let (py_chain, kit_chain) = if python_first {
            (json!([py_id.0]), json!([py_id.0, kit_id.0]))
        } else {
            (json!([kit_id.0, py_id.0]), json!([kit_id.0]))
        };
        lab.wait_logged(py_service, FLOWS);
        lab.wait_logged(kit_service, FLOWS);
        // Once each: nothing more comes.
        std::thread::sleep(Duration::from_millis(300));
        let py_log = lab.proxy_log(py_service);
        let kit_log = lab.proxy_log(kit_service);
        assert_eq!(py_log.len(), FLOWS, "{order}: Python: {py_log:?}");
        assert_eq!(kit_log.len(), FLOWS, "{order}: test kit: {kit_log:?}");
        for py in &py_log {
            assert_eq!(py["verdict"], "allow", "{order}: {py}");
            assert_eq!(py["chain"], py_chain, "{order}: {py}");
            assert_eq!(py["state"], "redirected_by_self", "{order}: {py}");
            assert_eq!(py["original_dst"], dst_text, "{order}: {py}");
            assert_eq!(
                py["context"], dst_text,
                "{order}: the default context: {py}"
            );
            assert_eq!(py["client"]["uid"], NOBODY, "{order}: {py}");
        }
        for kit in &kit_log {
            assert_eq!(kit["records"], "ok", "{order}: {kit}");
            assert_eq!(kit["chain"], kit_chain, "{order}: {kit}");
            assert_eq!(kit["original_dst"], dst_text, "{order}: {kit}");
        }

        // Three datagrams per flow, each once, from the last service's
        // onward socket of that flow.
        let sources = server.sources();
        assert_eq!(sources.len(), 3 * FLOWS, "{order}: {sources:?}");
        let distinct: std::collections::HashSet<_> = sources.iter().collect();
        assert_eq!(distinct.len(), FLOWS, "{order}: {sources:?}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(
            counters.redirects,
            2 * FLOWS as u64,
            "{order}: {counters:?}"
        );
        assert_eq!(counters.hop_limit, 0, "{order}: {counters:?}");
        // The Python service handed the record on itself, as issued.
        assert_eq!(counters.records_inherited, 0, "{order}: {counters:?}");
        assert_eq!(counters.denied_sets, 0, "{order}: {counters:?}");
        assert_eq!(counters.forged_records, 0, "{order}: {counters:?}");
    }
}
