//! End-to-end tests of the rules' actions (`permit`, `block`) and their
//! conditions on the connecting process (cgroup subtree, command name,
//! executable file name, gid)
//! and on the flow (local port, `after`): real programs on the test's own
//! cgroup tree, clients as uid 65534, one process that matches and one that
//! does not, and the trace naming the deciding rule.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use connredir_engine::{
    Action, CgroupCondition, CommandCondition, Decision, ExecutableCondition, Protocol, Rule,
    RuleId, ServiceId, TraceEvent,
};
use connredir_testkit::{eventually, free_addr, testkit_bin, EchoServer, Lab, Proc, UdpEchoServer};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// Runs the probe case `case` against `addr` in `cgroup` as `uid`: "ok"
/// (one byte echoed) or the errno's name.
fn connect(lab: &Lab, cgroup: &str, uid: Option<u32>, case: &str, addr: SocketAddr) -> String {
    connect_with(lab, &testkit_bin(), cgroup, uid, case, addr)
}

/// [`connect`], with the test kit's binary at `program` (a copy under
/// another file name).
fn connect_with(
    lab: &Lab,
    program: &Path,
    cgroup: &str,
    uid: Option<u32>,
    case: &str,
    addr: SocketAddr,
) -> String {
    let addr = addr.to_string();
    let args = ["probe", case, addr.as_str()];
    let (status, lines) = Proc::spawn_program(&lab.cgroup(cgroup), uid, program, &args)
        .unwrap()
        .finish()
        .unwrap();
    assert!(status.success(), "probe {case} failed: {lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    report["result"].as_str().unwrap().to_string()
}

/// A toy proxy registered as `name` (its own cgroup), with a redirect rule
/// for `dst` (its address and port) at `priority`. Returns its id and its
/// index in `lab.procs`.
fn scanner(lab: &mut Lab, name: &str, dst: SocketAddr, priority: u32) -> (ServiceId, usize) {
    let listen = vec![free_addr("127.0.0.1"), free_addr("::1")];
    let prefix = format!("{}/{}", dst.ip(), if dst.is_ipv6() { 128 } else { 32 });
    let (id, cgroup) = lab.own_service(name, &listen, &prefix, Some(dst.port()), priority);
    let index = lab.toy_proxy(&cgroup, None, name, &listen, &[]);
    (id, index)
}

/// A rule with `action` for `dst` (address and port) at `priority`.
fn action_rule(action: Action, dst: SocketAddr, priority: u32) -> Rule {
    let prefix = format!("{}/{}", dst.ip(), if dst.is_ipv6() { 128 } else { 32 });
    Rule {
        destinations: vec![prefix.parse().unwrap()],
        ports: vec![dst.port()..=dst.port()],
        priority,
        ..Rule::tcp_action(action)
    }
}

/// The decisions traced while `f` runs.
fn traced(lab: &mut Lab, n: usize, f: impl FnOnce(&Lab)) -> Vec<TraceEvent> {
    // The engine has one trace reader: taken once, kept in the lab's thread.
    thread_local! {
        static TRACER: std::cell::RefCell<Option<connredir_engine::Tracer>> = const { std::cell::RefCell::new(None) };
    }
    let mut tracer = TRACER
        .with(|t| t.borrow_mut().take())
        .unwrap_or_else(|| lab.engine.tracer().unwrap());
    tracer.set_enabled(true).unwrap();
    f(lab);
    let mut events = Vec::new();
    eventually("the decisions", || {
        events.extend(tracer.poll(Duration::from_millis(100)));
        (events.len() >= n).then_some(())
    });
    tracer.set_enabled(false).unwrap();
    TRACER.with(|t| *t.borrow_mut() = Some(tracer));
    events
}

fn servers() -> Vec<EchoServer> {
    vec![
        EchoServer::start("127.0.0.2:0").unwrap(),
        EchoServer::start("[::1]:0").unwrap(),
    ]
}

#[test]
fn a_permit_rule_above_a_redirect_rule_exempts_exactly_what_it_names() {
    let Some((mut lab, _server)) = Lab::with_server("permit") else {
        return;
    };
    for (i, server) in servers().iter().enumerate() {
        let dst = server.addr();
        let (_, proxy) = scanner(&mut lab, &format!("scanner{i}"), dst, 10);
        let permit = lab
            .engine
            .add_rule(Rule {
                uid: Some(NOBODY),
                ..action_rule(Action::Permit, dst, 1)
            })
            .unwrap();
        let before = lab.engine.counters().unwrap().permitted;
        let events = traced(&mut lab, 1, |lab| {
            // uid 65534 is what the permit rule names: direct, no service.
            assert_eq!(
                connect(lab, "scope/app", Some(NOBODY), "connect", dst),
                "ok"
            );
        });
        assert_eq!(
            lab.proxy_log(proxy).len(),
            0,
            "{dst}: the permitted flow reached the service"
        );
        let decided = events.iter().find(|e| e.destination == dst).unwrap();
        assert_eq!(decided.decision, Decision::Permitted, "{decided:?}");
        assert_eq!((decided.rule, decided.service), (Some(permit.0), None));
        assert_eq!(lab.engine.counters().unwrap().permitted, before + 1);
        // Root is not named: the redirect rule below still holds.
        assert_eq!(connect(&lab, "scope/app", None, "connect", dst), "ok");
        assert_eq!(
            lab.wait_logged(proxy, 1).len(),
            1,
            "{dst}: root's flow was not inspected"
        );
    }
}

#[test]
fn a_block_rule_refuses_before_any_service_sees_the_flow() {
    let Some((mut lab, _server)) = Lab::with_server("block") else {
        return;
    };
    for (i, server) in servers().iter().enumerate() {
        let dst = server.addr();
        let (_, proxy) = scanner(&mut lab, &format!("scanner{i}"), dst, 10);
        let block = lab
            .engine
            .add_rule(Rule {
                uid: Some(NOBODY),
                ..action_rule(Action::Block, dst, 1)
            })
            .unwrap();
        let before = lab.engine.counters().unwrap().blocked;
        let events = traced(&mut lab, 1, |lab| {
            assert_eq!(
                connect(lab, "scope/app", Some(NOBODY), "connect", dst),
                "EACCES"
            );
        });
        let decided = events.iter().find(|e| e.destination == dst).unwrap();
        assert_eq!(decided.decision, Decision::Blocked, "{decided:?}");
        assert_eq!((decided.rule, decided.service), (Some(block.0), None));
        assert_eq!(lab.engine.counters().unwrap().blocked, before + 1);
        assert_eq!(
            lab.engine.rule_hits().unwrap().get(&block).copied(),
            Some(1)
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            lab.proxy_log(proxy).len(),
            0,
            "{dst}: a blocked flow reached the service"
        );
        // Root is not named: inspected as before.
        assert_eq!(connect(&lab, "scope/app", None, "connect", dst), "ok");
        assert_eq!(lab.wait_logged(proxy, 1).len(), 1);
    }
}

/// Adds a block rule for `dst` with `condition` applied, and checks that
/// the `matching` probe (cgroup, case) is refused and the `other` is not;
/// both as uid 65534. The trace names the rule.
fn block_only(
    lab: &mut Lab,
    dst: SocketAddr,
    condition: impl FnOnce(Rule) -> Rule,
    matching: (&str, &str),
    other: (&str, &str),
) -> RuleId {
    let rule = lab
        .engine
        .add_rule(condition(action_rule(Action::Block, dst, 0)))
        .unwrap();
    let events = traced(lab, 2, |lab| {
        assert_eq!(
            connect(lab, matching.0, Some(NOBODY), matching.1, dst),
            "EACCES",
            "{matching:?} should match"
        );
        assert_eq!(
            connect(lab, other.0, Some(NOBODY), other.1, dst),
            "ok",
            "{other:?} should not match"
        );
    });
    assert!(
        events
            .iter()
            .any(|e| e.decision == Decision::Blocked && e.rule == Some(rule.0)),
        "{events:?}"
    );
    lab.engine.remove_rule(rule).unwrap();
    rule
}

#[test]
fn a_cgroup_condition_holds_for_the_whole_subtree() {
    let Some((mut lab, server)) = Lab::with_server("cond-cgroup") else {
        return;
    };
    let container = lab.cgroup("scope/container");
    lab.cgroup("scope/container/child/grandchild");
    let condition = CgroupCondition::resolve(&container).unwrap();
    block_only(
        &mut lab,
        server.addr(),
        |r| Rule {
            cgroup: Some(condition),
            ..r
        },
        ("scope/container/child/grandchild", "connect"),
        ("scope/neighbour", "connect"),
    );
}

#[test]
fn a_command_condition_matches_exactly_or_as_a_prefix() {
    let Some((mut lab, server)) = Lab::with_server("cond-command") else {
        return;
    };
    let exact = CommandCondition::parse("quicbrowser").unwrap();
    block_only(
        &mut lab,
        server.addr(),
        |r| Rule {
            command: Some(exact),
            ..r
        },
        ("scope/app", "connect-as-quicbrowser"),
        ("scope/app", "connect-as-quicbrowser2"),
    );
    let prefix = CommandCondition::parse("quic*").unwrap();
    block_only(
        &mut lab,
        server.addr(),
        |r| Rule {
            command: Some(prefix),
            ..r
        },
        ("scope/app", "connect-as-quicbrowser2"),
        ("scope/app", "connect-as-qui"),
    );
}

/// Copies of the test kit's binary under other file names, in a directory
/// every user can read; removed on drop.
struct NamedCopies {
    dir: PathBuf,
}

impl NamedCopies {
    fn new(test: &str) -> NamedCopies {
        use std::os::unix::fs::PermissionsExt;
        let dir = PathBuf::from(format!("/tmp/connredir-test-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        NamedCopies { dir }
    }

    /// The binary as `name` (mode 0755).
    fn copy(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::copy(testkit_bin(), &path).unwrap();
        path
    }
}

impl Drop for NamedCopies {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn an_executable_condition_names_the_file_name_whole() {
    let Some((mut lab, server)) = Lab::with_server("cond-executable") else {
        return;
    };
    let dst = server.addr();
    let copies = NamedCopies::new("cond-executable");
    // The same binary under two names, each run under the other's command
    // name: the executable's file name decides, not the command name, and
    // a name that only starts with the rule's is another name.
    let netclient = copies.copy("netclient");
    let netclient2 = copies.copy("netclient2");
    // The longest name a rule holds, and that name with one byte more: a
    // longer name is never cut to the rule's length.
    let longest = "n".repeat(ExecutableCondition::MAX_LEN);
    let at_limit = copies.copy(&longest);
    let over_limit = copies.copy(&format!("{longest}x"));
    let cases = [
        (
            "netclient",
            &netclient,
            "connect-as-netclient2",
            &netclient2,
            "connect-as-netclient",
        ),
        (
            longest.as_str(),
            &at_limit,
            "connect",
            &over_limit,
            "connect",
        ),
    ];
    for (name, matching, matching_case, other, other_case) in cases {
        let rule = lab
            .engine
            .add_rule(Rule {
                executable: Some(ExecutableCondition::parse(name).unwrap()),
                ..action_rule(Action::Block, dst, 0)
            })
            .unwrap();
        let events = traced(&mut lab, 2, |lab| {
            assert_eq!(
                connect_with(lab, matching, "scope/app", Some(NOBODY), matching_case, dst),
                "EACCES",
                "{} should match {name}",
                matching.display()
            );
            assert_eq!(
                connect_with(lab, other, "scope/app", Some(NOBODY), other_case, dst),
                "ok",
                "{} should not match {name}",
                other.display()
            );
        });
        let deciding: Vec<_> = events
            .iter()
            .filter(|e| e.decision == Decision::Blocked)
            .collect();
        assert_eq!(deciding.len(), 1, "{events:?}");
        assert_eq!(deciding[0].rule, Some(rule.0), "{events:?}");
        assert_eq!(lab.engine.rule_hits().unwrap()[&rule], 1);
        lab.engine.remove_rule(rule).unwrap();
    }
}

#[test]
fn a_gid_condition_names_the_process_group() {
    let Some((mut lab, server)) = Lab::with_server("cond-gid") else {
        return;
    };
    let dst = server.addr();
    let rule = lab
        .engine
        .add_rule(Rule {
            gid: Some(NOBODY),
            ..action_rule(Action::Block, dst, 0)
        })
        .unwrap();
    // The test kit runs a uid's process with the same gid.
    assert_eq!(
        connect(&lab, "scope/app", Some(NOBODY), "connect", dst),
        "EACCES"
    );
    assert_eq!(connect(&lab, "scope/app", None, "connect", dst), "ok");
    assert_eq!(lab.engine.rule_hits().unwrap()[&rule], 1);
}

#[test]
fn a_local_port_condition_names_the_bound_port() {
    let Some((mut lab, server)) = Lab::with_server("cond-local-port") else {
        return;
    };
    let port = free_addr("127.0.0.1").port();
    block_only(
        &mut lab,
        server.addr(),
        |r| Rule {
            local_ports: Some(port..=port),
            ..r
        },
        ("scope/app", &format!("connect-from-{port}")),
        ("scope/app", "connect"),
    );
}

#[test]
fn an_after_condition_takes_only_flows_the_named_service_inspected() {
    let Some((mut lab, server)) = Lab::with_server("cond-after") else {
        return;
    };
    let dst = server.addr();
    // The scanner inspects uid 65534's flows only; the recorder, only
    // what the scanner already inspected.
    let (scanner_id, scanner) = scanner(&mut lab, "scanner", dst, 1);
    let first = lab.engine.rules().next().unwrap().0;
    lab.engine.remove_rule(first).unwrap();
    lab.engine
        .add_rule(Rule {
            uid: Some(NOBODY),
            destinations: vec![format!("{}/32", dst.ip()).parse().unwrap()],
            ports: vec![dst.port()..=dst.port()],
            priority: 1,
            ..Rule::tcp_to(scanner_id)
        })
        .unwrap();
    let listen = vec![free_addr("127.0.0.1")];
    let (recorder_id, cgroup) = lab.own_service("recorder", &listen, "0.0.0.0/32", None, 0);
    let recorder = lab.toy_proxy(&cgroup, None, "recorder", &listen, &[]);
    lab.engine
        .add_rule(Rule {
            after: Some(scanner_id),
            destinations: vec![format!("{}/32", dst.ip()).parse().unwrap()],
            ports: vec![dst.port()..=dst.port()],
            priority: 2,
            ..Rule::tcp_to(recorder_id)
        })
        .unwrap();
    assert_eq!(connect(&lab, "scope/app", None, "connect", dst), "ok");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        lab.proxy_log(recorder).len(),
        0,
        "a flow no scanner saw was recorded"
    );
    assert_eq!(
        connect(&lab, "scope/app", Some(NOBODY), "connect", dst),
        "ok"
    );
    assert_eq!(lab.wait_logged(scanner, 1).len(), 1);
    assert_eq!(
        lab.wait_logged(recorder, 1).len(),
        1,
        "the scanned flow was not recorded"
    );
}

#[test]
fn a_udp_block_rule_refuses_the_datagrams_of_the_command_it_names() {
    // "Block QUIC from browsers so they use TCP": UDP to the port, from
    // one command name; IPv4 and IPv6.
    let Some((mut lab, _server)) = Lab::with_server("block-udp") else {
        return;
    };
    for ip in ["127.0.0.2", "[::1]"] {
        let server = UdpEchoServer::start(&format!("{ip}:0")).unwrap();
        let dst = server.addr();
        let rule = lab
            .engine
            .add_rule(Rule {
                protocol: Protocol::Udp,
                command: Some(CommandCondition::parse("browser*").unwrap()),
                ..action_rule(Action::Block, dst, 0)
            })
            .unwrap();
        let events = traced(&mut lab, 1, |lab| {
            assert_eq!(
                connect(lab, "scope/app", Some(NOBODY), "udp-as-browser-main", dst),
                "EACCES"
            );
        });
        assert!(
            events
                .iter()
                .any(|e| e.decision == Decision::Blocked && e.rule == Some(rule.0)),
            "{events:?}"
        );
        assert_eq!(
            connect(&lab, "scope/app", Some(NOBODY), "udp-as-resolver", dst),
            "ok"
        );
        lab.engine.remove_rule(rule).unwrap();
    }
}
