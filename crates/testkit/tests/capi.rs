//! libconnredir from C, end to end: the library, its headers and
//! connredir.pc installed by `scripts/install-capi` into a temporary prefix,
//! C programs compiled against the installed files with
//! `pkg-config --cflags --libs connredir`, run in the lab's cgroups.
//!
//! `crates/capi/c/wfp_check.c` asks the WFP control codes the Windows way
//! (`WSAIoctl` of `<connredir/wfp.h>`): one test per behaviour the
//! reference pages state. `crates/capi/c/proxy.c`, a thread-per-connection
//! proxy, chains with `connredir-proxy` in both orders, curl as the client.
//! `crates/capi/c/udp_service.c`, a UDP service on the library's UDP flow
//! calls, chains with the test kit's UDP service in both orders, the test
//! kit's UDP client as the client.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use connredir_abi::{connredir_default_context, connredir_record};
use connredir_engine::Protocol;
use connredir_testkit::{
    by_cgroup, free_addr, require_program, workspace_bin, EchoServer, Lab, Proc, UdpEchoServer,
};
use serde_json::{json, Value};

/// The unprivileged user clients and unprivileged callers run as.
const NOBODY: u32 = 65534;

/// The installed library and the C programs built against it.
struct Built {
    /// `wfp_check.c`, linked with the shared library.
    wfp_check: PathBuf,
    /// `wfp_check.c`, linked with the static library.
    wfp_check_static: PathBuf,
    /// `proxy.c`, linked with the shared library.
    proxy: PathBuf,
    /// `udp_service.c`, linked with the shared library.
    udp_service: PathBuf,
}

/// Runs `command`; panics with its output when it fails. Returns stdout.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The directory removed when the test process exits.
fn prefix_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/connredir-capi-{}", std::process::id()))
}

/// Installs libconnredir into a temporary prefix every user can read (the
/// unprivileged cases run the programs as nobody) and compiles the C
/// programs against it, once per test process. None when the test must be
/// skipped (no C compiler or pkg-config, outside CI).
fn built(test: &str) -> Option<&'static Built> {
    static BUILT: OnceLock<Option<Built>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cc = require_program(test, "cc")?;
            let pkg_config = require_program(test, "pkg-config")?;
            Some(build(&cc, &pkg_config))
        })
        .as_ref()
}

fn build(cc: &Path, pkg_config: &Path) -> Built {
    use std::os::unix::fs::PermissionsExt;
    let prefix = prefix_dir();
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(&prefix).unwrap();
    std::fs::set_permissions(&prefix, std::fs::Permissions::from_mode(0o755)).unwrap();
    extern "C" fn remove_prefix() {
        let _ = std::fs::remove_dir_all(prefix_dir());
    }
    // SAFETY: the handler only removes the directory this process made.
    unsafe { libc::atexit(remove_prefix) };

    // The library the workspace build made, next to its binaries
    // (`target/<profile>/deps/..`).
    let from = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    assert!(
        from.join("libconnredir.so").exists() && from.join("libconnredir.a").exists(),
        "libconnredir is missing in {}: run `cargo build --workspace` before the tests (scripts/test does)",
        from.display()
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    run(Command::new(repo.join("scripts/install-capi"))
        .arg("--from")
        .arg(&from)
        .arg(&prefix));

    let pc_path = prefix.join("lib/pkgconfig");
    let pkg = |args: &[&str]| -> Vec<String> {
        run(Command::new(pkg_config)
            .env("PKG_CONFIG_PATH", &pc_path)
            .args(args)
            .arg("connredir"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
    };
    let shared = pkg(&["--cflags", "--libs"]);
    // Static: the same flags, the archive by name (the shared library
    // beside it would win a plain -lconnredir) and its private libraries.
    let mut static_flags = pkg(&["--cflags"]);
    static_flags.extend(pkg(&["--static", "--libs"]).into_iter().map(|f| {
        if f == "-lconnredir" {
            "-l:libconnredir.a".into()
        } else {
            f
        }
    }));
    let rpath = format!("-Wl,-rpath,{}", prefix.join("lib").display());
    let sources = repo.join("crates/capi/c");
    let compile = |source: &str, output: &str, flags: &[String]| -> PathBuf {
        let out = prefix.join(output);
        run(Command::new(cc)
            .args([
                "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o",
            ])
            .arg(&out)
            .arg(sources.join(source))
            .args(flags)
            .arg(&rpath));
        out
    };
    Built {
        wfp_check: compile("wfp_check.c", "wfp_check", &shared),
        wfp_check_static: compile("wfp_check.c", "wfp_check_static", &static_flags),
        proxy: compile("proxy.c", "proxy", &shared),
        udp_service: compile("udp_service.c", "udp_service", &shared),
    }
}

/// The calls a wfp_check run reported, by label.
fn calls(lines: &[String]) -> HashMap<String, Value> {
    lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|v| (v["call"].as_str().expect("a call label").to_string(), v))
        .collect()
}

/// Runs a wfp_check case that needs no redirected connection, in `cgroup`
/// as `uid`; returns its calls.
fn own_case(
    lab: &Lab,
    program: &Path,
    cgroup: &str,
    uid: Option<u32>,
    case: &str,
) -> HashMap<String, Value> {
    let proc = Proc::spawn_program(&lab.cgroup(cgroup), uid, program, &[case]).unwrap();
    let (status, lines) = proc.finish().unwrap();
    assert!(status.success(), "{case}: {status}: {lines:?}");
    calls(&lines)
}

/// Runs a wfp_check case on a redirected connection: registers it as a
/// service whose rule sends the echo server's address to it, starts it in
/// the service's cgroup, and has an unprivileged client connect there.
/// `extra` gives its arguments after the listening address. None when
/// skipped.
fn redirected_case(
    test: &str,
    case: &str,
    extra: impl FnOnce(&Lab) -> Vec<String>,
) -> Option<HashMap<String, Value>> {
    let built = built(test)?;
    let (mut lab, server) = Lab::with_server(test)?;
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let prefix = format!("{}/32", dst.ip());
    let (_, cgroup) = lab.own_service("wfp", &[listen], &prefix, Some(dst.port()), 0);
    let mut args = vec![case.to_string(), listen.to_string()];
    args.extend(extra(&lab));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let check = Proc::spawn_program(&cgroup, None, &built.wfp_check, &args).unwrap();
    check
        .wait_line("wfp_check ready", |l| l == "ready")
        .unwrap();
    // The check echoes the client's bytes once it has asked: the client
    // checks that it was its own flow the check saw.
    let dst = dst.to_string();
    let client_args = ["client", "--connect", &dst, "--bytes", "10"];
    let client = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &client_args).unwrap();
    let (status, lines) = check.finish().unwrap();
    assert!(status.success(), "{case}: {status}: {lines:?}");
    let (status, client_lines) = client.finish().unwrap();
    assert!(
        status.success(),
        "{case}: client {status}: {client_lines:?}"
    );
    let report: Value = serde_json::from_str(client_lines.last().expect("a report")).unwrap();
    assert_eq!(report["ok"], true, "{case}: {report}");
    Some(calls(&lines))
}

/// Asserts one reported call: its return value, error name and bytes returned.
fn expect(calls: &HashMap<String, Value>, label: &str, error: &str, bytes: usize) {
    let call = calls
        .get(label)
        .unwrap_or_else(|| panic!("no call {label}: {calls:?}"));
    let rc = if error == "ok" { 0 } else { -1 };
    assert_eq!(
        (&call["rc"], &call["error"], &call["bytes"]),
        (&json!(rc), &json!(error), &json!(bytes)),
        "{label}: {call}"
    );
}

const RECORDS_SIZE: usize = std::mem::size_of::<connredir_record>();
const CONTEXT_SIZE: usize = std::mem::size_of::<connredir_default_context>();

/// "Pass as an output buffer size ... of 0 to query the buffer size
/// required": success, with the size in bytes returned; a buffer of that
/// size then takes the blob.
#[test]
fn an_output_size_of_zero_returns_the_size_needed() {
    let Some(calls) = redirected_case("capisize", "size", |_| vec![]) else {
        return;
    };
    expect(&calls, "records-size", "ok", RECORDS_SIZE);
    expect(&calls, "records-exact", "ok", RECORDS_SIZE);
    assert_eq!(calls["records-magic"]["ok"], true, "{calls:?}");
    expect(&calls, "context-size", "ok", CONTEXT_SIZE);
    expect(&calls, "context-exact", "ok", CONTEXT_SIZE);
}

/// "If the output buffer size is not sufficient to hold the data, ... will
/// return ERROR_INSUFFICIENT_BUFFER and the required buffer size will be
/// returned in ... lpcbBytesReturned."
#[test]
fn a_buffer_too_small_fails_with_the_size_needed() {
    let Some(calls) = redirected_case("capismall", "too-small", |_| vec![]) else {
        return;
    };
    for (code, size) in [("records", RECORDS_SIZE), ("context", CONTEXT_SIZE)] {
        for short in ["ulong", "one-short"] {
            expect(
                &calls,
                &format!("{code}-{short}"),
                "ERROR_INSUFFICIENT_BUFFER",
                size,
            );
        }
    }
}

/// "This error [WSAEINVAL] is returned if the cbOutBuffer parameter is less
/// than the size of a ULONG", with bytes returned zero.
#[test]
fn an_output_size_smaller_than_a_ulong_is_an_invalid_argument() {
    let Some(calls) = redirected_case("capitiny", "tiny", |_| vec![]) else {
        return;
    };
    for len in 1..4 {
        expect(&calls, &format!("records-{len}"), "WSAEINVAL", 0);
        expect(&calls, &format!("context-{len}"), "WSAEINVAL", 0);
    }
}

/// The redirect context "is used if ... the connection was redirected by
/// the calling redirect service": a process that is not the service (the
/// service's own child, moved out of its cgroup) is refused the context of
/// the very same socket, though not its records; the service still gets it.
#[test]
fn the_context_is_only_for_the_redirecting_service() {
    let procs = |lab: &Lab| {
        vec![lab
            .cgroup("scope/other")
            .join("cgroup.procs")
            .display()
            .to_string()]
    };
    let Some(calls) = redirected_case("capictx", "context-denied", procs) else {
        return;
    };
    expect(&calls, "service-context", "ok", CONTEXT_SIZE);
    expect(&calls, "other-context", "WSAEACCES", 0);
    expect(&calls, "other-records", "ok", RECORDS_SIZE);
    expect(&calls, "service-context-again", "ok", CONTEXT_SIZE);
}

/// WSAENOTCONN: "The socket s is not connected."
#[test]
fn a_query_on_an_unconnected_socket_is_not_connected() {
    let Some(built) = built("capinotconn") else {
        return;
    };
    let Some(lab) = Lab::new("capinotconn") else {
        return;
    };
    let calls = own_case(
        &lab,
        &built.wfp_check,
        "services",
        Some(NOBODY),
        "not-connected",
    );
    expect(&calls, "records", "WSAENOTCONN", 0);
    expect(&calls, "context", "WSAENOTCONN", 0);
}

/// WSAENOTSOCK: "The descriptor s is not a socket" (a pipe, then a closed
/// descriptor), for all three codes.
#[test]
fn a_descriptor_that_is_not_a_socket_is_not_a_socket() {
    let Some(built) = built("capinotsock") else {
        return;
    };
    let Some(lab) = Lab::new("capinotsock") else {
        return;
    };
    let calls = own_case(
        &lab,
        &built.wfp_check,
        "services",
        Some(NOBODY),
        "not-a-socket",
    );
    for label in ["records", "context", "set", "records-closed"] {
        expect(&calls, label, "WSAENOTSOCK", 0);
    }
}

/// WSAEOPNOTSUPP: "returned if the ... IOCTL is not supported by the
/// transport provider": a process outside the layer's scope, for all three
/// codes.
#[test]
fn outside_the_layer_the_codes_are_not_supported() {
    let Some(built) = built("capinotsup") else {
        return;
    };
    let Some(lab) = Lab::new("capinotsup") else {
        return;
    };
    let calls = own_case(
        &lab,
        &built.wfp_check,
        "outside",
        Some(NOBODY),
        "not-supported",
    );
    for label in ["records", "context", "set"] {
        expect(&calls, label, "WSAEOPNOTSUPP", 0);
    }
}

/// WSAEACCES on set: "the user lacks the required administrative
/// privileges": an unprivileged process that is no service may not set
/// records; root may set the very same blob.
#[test]
fn setting_records_without_privilege_is_access_denied() {
    let Some(built) = built("capiacces") else {
        return;
    };
    let Some(lab) = Lab::new("capiacces") else {
        return;
    };
    let calls = own_case(&lab, &built.wfp_check, "scope/client", Some(NOBODY), "set");
    expect(&calls, "set", "WSAEACCES", 0);
    assert!(lab.engine.counters().unwrap().denied_sets >= 1);
    let calls = own_case(&lab, &built.wfp_check, "scope/client", None, "set");
    expect(&calls, "set", "ok", 0);
}

/// WSAEFAULT for pointers the call cannot use, and WSAEINVAL for "not a
/// valid command" and for a set whose cbOutBuffer is not zero ("must be set
/// to zero").
#[test]
fn bad_pointers_are_faults_and_bad_commands_invalid() {
    let Some(built) = built("capifault") else {
        return;
    };
    let Some(lab) = Lab::new("capifault") else {
        return;
    };
    let calls = own_case(&lab, &built.wfp_check, "services", Some(NOBODY), "faults");
    expect(&calls, "no-bytes-returned", "WSAEFAULT", 0);
    expect(&calls, "null-output", "WSAEFAULT", 0);
    expect(&calls, "null-input", "WSAEFAULT", 0);
    expect(&calls, "set-with-output", "WSAEINVAL", 0);
    expect(&calls, "unknown-code", "WSAEINVAL", 0);
}

/// The static library answers as the shared one does.
#[test]
fn the_static_library_answers_alike() {
    let Some(built) = built("capistatic") else {
        return;
    };
    let Some(lab) = Lab::new("capistatic") else {
        return;
    };
    for case in ["not-a-socket", "faults", "not-connected"] {
        let shared = own_case(&lab, &built.wfp_check, "services", Some(NOBODY), case);
        let fixed = own_case(
            &lab,
            &built.wfp_check_static,
            "services",
            Some(NOBODY),
            case,
        );
        assert!(!shared.is_empty());
        assert_eq!(shared, fixed, "{case}");
    }
}

/// Starts `program ARGS` as a proxy in `cgroup`, waits for `ready`, and
/// returns its index in `lab.procs`.
fn start_proxy(lab: &mut Lab, cgroup: &Path, program: &Path, args: &[&str]) -> usize {
    let proc = Proc::spawn_program(cgroup, None, program, args).unwrap();
    proc.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proc);
    lab.procs.len() - 1
}

/// The C proxy and `connredir-proxy` on one flow, each order of the two:
/// curl (as nobody) gets its answer, each proxy logs the flow exactly once,
/// with the chain in rule order, and the C proxy reads its own redirect
/// state and the original destination from both the records and the
/// context.
#[test]
fn a_c_proxy_and_the_reference_proxy_chain_in_both_orders() {
    let Some(curl) = require_program("capichain", "curl") else {
        return;
    };
    let Some(built) = built("capichain") else {
        return;
    };
    for c_first in [true, false] {
        let Some(mut lab) = Lab::new("capichain") else {
            return;
        };
        let web = EchoServer::start_replying_once("127.0.0.2:0").unwrap();
        let dst = web.addr();
        let prefix = format!("{}/32", dst.ip());
        let (c_priority, r_priority) = if c_first { (1, 2) } else { (2, 1) };

        let c_listen = free_addr("127.0.0.1");
        let (c_id, c_cgroup) =
            lab.own_service("cproxy", &[c_listen], &prefix, Some(dst.port()), c_priority);
        let c_listen = c_listen.to_string();
        let c_proxy = start_proxy(&mut lab, &c_cgroup, &built.proxy, &["cproxy", &c_listen]);

        let r_listen = free_addr("127.0.0.1");
        let (r_id, r_cgroup) = lab.own_service(
            "reference",
            &[r_listen],
            &prefix,
            Some(dst.port()),
            r_priority,
        );
        let r_listen = r_listen.to_string();
        let reference = workspace_bin("connredir-proxy");
        let r_args = ["--name", "reference", "--listen", &r_listen];
        let r_proxy = start_proxy(&mut lab, &r_cgroup, &reference, &r_args);

        let url = format!("http://{dst}/from-c");
        let args = ["-sS", "--max-time", "10", "--http0.9", &url];
        let client = Proc::spawn_program(&lab.cgroup("scope/curl"), Some(NOBODY), &curl, &args);
        let (status, lines) = client.unwrap().finish().unwrap();
        let what = format!("C proxy first: {c_first}");
        assert!(status.success(), "{what}: curl {status}: {lines:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("GET /from-c")),
            "{what}: {lines:?}"
        );

        let chain = if c_first {
            json!([c_id.0, r_id.0])
        } else {
            json!([r_id.0, c_id.0])
        };
        let (c_chain, r_chain) = if c_first {
            (json!([c_id.0]), chain.clone())
        } else {
            (chain.clone(), json!([r_id.0]))
        };
        lab.wait_logged(c_proxy, 1);
        lab.wait_logged(r_proxy, 1);
        // Once each: nothing more comes.
        std::thread::sleep(Duration::from_millis(300));
        let c_log = lab.proxy_log(c_proxy);
        let r_log = lab.proxy_log(r_proxy);
        assert_eq!(c_log.len(), 1, "{what}: {c_log:?}");
        assert_eq!(r_log.len(), 1, "{what}: {r_log:?}");

        let c = &c_log[0];
        assert_eq!(c["proxy"], "cproxy", "{what}: {c}");
        assert_eq!(c["verdict"], "allow", "{what}: {c}");
        assert_eq!(c["chain"], c_chain, "{what}: {c}");
        assert_eq!(c["state"], "redirected_by_self", "{what}: {c}");
        assert_eq!(c["original_dst"], dst.to_string(), "{what}: {c}");
        assert_eq!(c["context_dst"], dst.to_string(), "{what}: {c}");
        assert_eq!(c["records_bytes"], RECORDS_SIZE, "{what}: {c}");
        assert!(c["bytes_up"].as_u64().unwrap() > 0, "{what}: {c}");
        assert_eq!(c["bytes_up"], c["bytes_down"], "{what}: echoed: {c}");

        let r = &r_log[0];
        assert_eq!(r["verdict"], "allow", "{what}: {r}");
        assert_eq!(r["chain"], r_chain, "{what}: {r}");
        assert_eq!(r["original_dst"], dst.to_string(), "{what}: {r}");
        assert_eq!(r["bytes_up"], c["bytes_up"], "{what}: {r}");

        assert_eq!(web.accepted().len(), 1, "{what}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 2, "{what}: {counters:?}");
        assert_eq!(counters.handoff_misses, 0, "{what}: {counters:?}");
    }
}

/// The C UDP service and the test kit's UDP service on the same flows, each
/// order of the two: each client (the UDP client role, as nobody) gets
/// every echo from the original destination, each service handles each
/// flow exactly once, with the chain in rule order, and the C service reads
/// the records, its redirect state, the context and the original
/// destination on its own socket for the flow.
#[test]
fn a_c_udp_service_and_the_test_kits_chain_in_both_orders() {
    const FLOWS: usize = 2;
    let Some(built) = built("capiudp") else {
        return;
    };
    for c_first in [true, false] {
        let Some(mut lab) = Lab::new("capiudp") else {
            return;
        };
        let server = UdpEchoServer::start("127.0.0.2:0").unwrap();
        let dst = server.addr();
        let prefix = format!("{}/32", dst.ip());
        let (c_priority, k_priority) = if c_first { (1, 2) } else { (2, 1) };

        let c_listen = free_addr("127.0.0.1");
        let c_cgroup = lab.cgroup("services/cudp");
        let c_id = lab.service("cudp", &[c_listen], by_cgroup(&c_cgroup), None);
        lab.route_protocol(c_id, Protocol::Udp, &prefix, Some(dst.port()), c_priority);
        let c_listen = c_listen.to_string();
        let c_service = start_proxy(
            &mut lab,
            &c_cgroup,
            &built.udp_service,
            &["cudp", &c_listen],
        );
        let (k_id, k_service) = lab.udp_service(
            "toy",
            free_addr("127.0.0.1"),
            &prefix,
            dst.port(),
            k_priority,
            &[],
        );

        let what = format!("C service first: {c_first}");
        let dst_text = dst.to_string();
        for _ in 0..FLOWS {
            let args = ["udp-client", "--connect", &dst_text];
            let client = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).unwrap();
            let (status, lines) = client.finish().unwrap();
            assert!(status.success(), "{what}: client {status}: {lines:?}");
            let report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
            assert_eq!(report["ok"], true, "{what}: {report}");
            assert_eq!(
                report["from"],
                json!(vec![dst_text.clone(); 3]),
                "{what}: {report}"
            );
            assert_eq!(report["peer"], dst_text, "{what}: {report}");
        }

        let chain = if c_first {
            json!([c_id.0, k_id.0])
        } else {
            json!([k_id.0, c_id.0])
        };
        let (c_chain, k_chain) = if c_first {
            (json!([c_id.0]), chain.clone())
        } else {
            (chain.clone(), json!([k_id.0]))
        };
        lab.wait_logged(c_service, FLOWS);
        lab.wait_logged(k_service, FLOWS);
        // Once each: nothing more comes.
        std::thread::sleep(Duration::from_millis(300));
        let c_log = lab.proxy_log(c_service);
        let k_log = lab.proxy_log(k_service);
        assert_eq!(c_log.len(), FLOWS, "{what}: {c_log:?}");
        assert_eq!(k_log.len(), FLOWS, "{what}: {k_log:?}");
        for c in &c_log {
            assert_eq!(c["proxy"], "cudp", "{what}: {c}");
            assert_eq!(c["verdict"], "allow", "{what}: {c}");
            assert_eq!(c["chain"], c_chain, "{what}: {c}");
            assert_eq!(c["state"], "redirected_by_self", "{what}: {c}");
            assert_eq!(c["original_dst"], dst_text, "{what}: {c}");
            assert_eq!(c["context_dst"], dst_text, "{what}: {c}");
            assert_eq!(c["records_bytes"], RECORDS_SIZE, "{what}: {c}");
        }
        for k in &k_log {
            assert_eq!(k["records"], "ok", "{what}: {k}");
            assert_eq!(k["chain"], k_chain, "{what}: {k}");
            assert_eq!(k["original_dst"], dst_text, "{what}: {k}");
        }

        // Three datagrams per flow, each once, from the last service's
        // onward socket of that flow.
        let sources = server.sources();
        assert_eq!(sources.len(), 3 * FLOWS, "{what}: {sources:?}");
        let distinct: std::collections::HashSet<_> = sources.iter().collect();
        assert_eq!(distinct.len(), FLOWS, "{what}: {sources:?}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 2 * FLOWS as u64, "{what}: {counters:?}");
        assert_eq!(counters.hop_limit, 0, "{what}: {counters:?}");
        // The C service handed each record on itself, as issued.
        assert_eq!(counters.records_inherited, 0, "{what}: {counters:?}");
        assert_eq!(counters.denied_sets, 0, "{what}: {counters:?}");
        assert_eq!(counters.forged_records, 0, "{what}: {counters:?}");
    }
}
