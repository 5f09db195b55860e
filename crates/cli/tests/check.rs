//! `connredir check FILE` as a person runs it: the exit status and the exact
//! message for a good file and for several bad ones.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A file in a directory of this test run.
fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("connredir-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `connredir check` in the file's directory, so messages carry the
/// bare file name: (success, stdout, stderr).
fn check(path: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_connredir"))
        .arg("check")
        .arg(path.file_name().unwrap())
        .current_dir(path.parent().unwrap())
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const GOOD: &str = r#"[scope]
cgroups = ["/sys/fs/cgroup/apps"]

[[service]]
name = "scanner"
listen = ["127.0.0.1:15001"]
identity = { uids = [990] }

[[service]]
name = "recorder"
listen = ["127.0.0.1:15002", "[::1]:15002"]
own_connections_by_self = false

[[rule]]
service = "scanner"
destinations = ["0.0.0.0/0"]
ports = ["80", "443"]

[[rule]]
service = "recorder"
ports = ["8000-8999"]
priority = 10
"#;

#[test]
fn a_good_file_is_summarised() {
    let (ok, out, err) = check(&file("good.toml", GOOD));
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "good.toml: ok (1 cgroups and 0 systemd units in scope, 2 services, 2 rules)\n"
    );
}

#[test]
fn bad_files_get_one_message_with_file_line_key_and_what_is_valid() {
    let cases = [
        (
            "unknown-key.toml",
            GOOD.replace("priority = 10", "prio = 10"),
            "error: unknown-key.toml, line 22, key `prio`: unknown field `prio`, expected one of \
             `service`, `action`, `protocol`, `destinations`, `ports`, `uid`, `priority`, `gid`, \
             `cgroup`, `unit`, `command`, `local_ports`, `after`, `executable`\n    22 | prio = 10\n",
        ),
        (
            "bad-prefix.toml",
            GOOD.replace("0.0.0.0/0", "0.0.0.0/40"),
            "error: bad-prefix.toml, line 16, key `destinations`: \"0.0.0.0/40\" is not an address \
             prefix: write an address and a length, like \"10.0.0.0/8\" or \"fd00::/8\", or one \
             address\n    16 | destinations = [\"0.0.0.0/40\"]\n",
        ),
        (
            "missing-service.toml",
            GOOD.replace("service = \"recorder\"", "service = \"recordr\""),
            "error: missing-service.toml, line 20, key `service`: rule 2 names service \
             \"recordr\", which is not defined (defined: scanner, recorder)\n    20 | service = \
             \"recordr\"\n",
        ),
        (
            "port-range.toml",
            GOOD.replace("\"443\"", "\"65536\""),
            "error: port-range.toml, line 17, key `ports`: port 65536 is out of range: ports are \
             1 to 65535\n    17 | ports = [\"80\", \"65536\"]\n",
        ),
        (
            "two-ipv4.toml",
            GOOD.replace("[\"127.0.0.1:15001\"]", "[\"127.0.0.1:15001\", \"127.0.0.2:15001\"]"),
            "error: two-ipv4.toml, line 5, key `name`: invalid service scanner: more than one IPv4 \
             listening address; give at most one IPv4 and one IPv6\n     5 | name = \"scanner\"\n",
        ),
        (
            "on-down.toml",
            GOOD.replace(
                "own_connections_by_self = false",
                "own_connections_by_self = false\non_down = \"open\"",
            ),
            "error: on-down.toml, line 13, key `on_down`: unknown variant `open`, expected \
             `block` or `bypass`\n    13 | on_down = \"open\"\n",
        ),
        (
            "control-key.toml",
            format!("{GOOD}\n[control]\ngroups = [\"connredir\"]\n"),
            "error: control-key.toml, line 25, key `groups`: unknown field `groups`, expected \
             `group`\n    25 | groups = [\"connredir\"]\n",
        ),
        (
            "no-scope.toml",
            GOOD.replace("[scope]\ncgroups = [\"/sys/fs/cgroup/apps\"]\n", ""),
            "error: no-scope.toml: [scope] names no cgroup: give `cgroups` (cgroup v2 \
             directories), `units` (systemd units) or `host = true`\n",
        ),
    ];
    for (name, text, expected) in cases {
        let (ok, out, err) = check(&file(name, &text));
        assert!(!ok, "{name} passed: {out}");
        assert_eq!(err, expected, "{name}");
    }
}

#[test]
fn failure_policies_and_the_control_group_are_accepted() {
    let text =
        GOOD.replace(
            "identity = { uids = [990] }",
            "identity = { uids = [990] }\non_down = \"bypass\"",
        )
        .replace(
            "own_connections_by_self = false",
            "own_connections_by_self = false\non_down = \"block\"",
        ) + "\n[control]\ngroup = \"connredir\"\n";
    let (ok, out, err) = check(&file("policies.toml", &text));
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "policies.toml: ok (1 cgroups and 0 systemd units in scope, 2 services, 2 rules)\n"
    );
}

#[test]
fn a_missing_file_says_so() {
    let path = file("present.toml", GOOD).with_file_name("absent.toml");
    let (ok, _, err) = check(&path);
    assert!(!ok);
    assert_eq!(
        err,
        "error: cannot read absent.toml: No such file or directory (os error 2)\n"
    );
}

/// Where cgroup v2 is mounted, as /proc/self/mountinfo says.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

#[test]
fn a_scope_cgroup_this_machine_lacks_is_a_warning_with_file_line_and_key() {
    let root = cgroup2_root();
    let absent = match &root {
        Some(root) => root.join(format!("connredir-check-absent-{}", std::process::id())),
        None => PathBuf::from("/sys/fs/cgroup/connredir-check-absent"),
    };
    let text = GOOD.replace(
        "cgroups = [\"/sys/fs/cgroup/apps\"]",
        &format!(
            "cgroups = [\n  \"{}\",\n  \"{}\",\n]",
            std::env::temp_dir().display(),
            absent.display()
        ),
    );
    let (ok, out, err) = check(&file("absent-scope.toml", &text));
    assert!(ok, "a warning is no error: {err}");
    assert_eq!(
        out,
        "absent-scope.toml: ok (2 cgroups and 0 systemd units in scope, 2 services, 2 rules)\n"
    );
    let not_cgroup = format!(
        "warning: absent-scope.toml, line 3, key `cgroups`: scope cgroup {tmp} is not a cgroup \
         v2 directory: `connredir up` will stop on it; name a directory of the cgroup v2 \
         hierarchy\n     3 |   \"{tmp}\",\n",
        tmp = std::env::temp_dir().display()
    );
    let missing = match &root {
        Some(_) => format!(
            "warning: absent-scope.toml, line 4, key `cgroups`: scope cgroup {a} does not \
             exist: `connredir up` will create it (and `connredir down` remove it again while \
             empty)\n     4 |   \"{a}\",\n",
            a = absent.display()
        ),
        None => format!(
            "warning: absent-scope.toml, line 4, key `cgroups`: scope cgroup {a} does not \
             exist, and cgroup v2 is not mounted here: `connredir up` needs the unified \
             hierarchy (usually /sys/fs/cgroup)\n     4 |   \"{a}\",\n",
            a = absent.display()
        ),
    };
    assert_eq!(err, format!("{not_cgroup}{missing}"));
}

#[test]
fn an_existing_scope_cgroup_gets_no_warning() {
    let Some(root) = cgroup2_root() else {
        // Nothing exists to name; the warning test covers this machine.
        return;
    };
    let text = GOOD.replace("/sys/fs/cgroup/apps", &root.display().to_string());
    let (ok, _, err) = check(&file("existing-scope.toml", &text));
    assert!(ok, "{err}");
    assert_eq!(err, "");
}

#[test]
fn a_scope_cgroup_outside_the_hierarchy_cannot_be_created() {
    let Some(root) = cgroup2_root() else {
        return;
    };
    let outside = root.join("..").join("connredir-check-outside");
    let text = GOOD.replace("/sys/fs/cgroup/apps", &outside.display().to_string());
    let (ok, _, err) = check(&file("outside-scope.toml", &text));
    assert!(ok, "{err}");
    assert!(
        err.starts_with(&format!(
            "warning: outside-scope.toml, line 2, key `cgroups`: scope cgroup {} does not \
             exist and is not below the cgroup v2 root {}: `connredir up` will stop on it",
            outside.display(),
            root.display()
        )),
        "{err}"
    );
}

#[test]
fn actions_and_conditions_pass_and_what_exceeds_the_per_prefix_limit_is_refused() {
    let text = format!(
        "{GOOD}\n[[rule]]\naction = \"permit\"\ndestinations = [\"192.0.2.1\"]\nports = [\"22\"]\n\
         priority = 0\n\n[[rule]]\naction = \"block\"\nprotocol = \"udp\"\nports = [\"443\"]\n\
         command = \"chrom*\"\n\n[[rule]]\nservice = \"recorder\"\nafter = \"scanner\"\n\
         cgroup = \"/sys/fs/cgroup/apps/recorded\"\ngid = 100\nlocal_ports = \"1024-65535\"\n"
    );
    let (ok, out, err) = check(&file("conditions.toml", &text));
    assert!(ok, "{err}");
    assert!(out.contains("5 rules"), "{out}");

    // GOOD's first two rules apply to 10.0.0.0/8 with three entries; 14
    // more reach 17.
    let mut text = GOOD.to_string();
    for _ in 0..14 {
        text.push_str("\n[[rule]]\naction = \"block\"\ndestinations = [\"10.0.0.0/8\"]\n");
    }
    let (ok, _, err) = check(&file("too-many.toml", &text));
    assert!(!ok);
    assert!(
        err.starts_with("error: too-many.toml, line ")
            && err.contains(
                "line 20, key `service`: invalid rule: 17 rule entries apply to 10.0.0.0/8 \
                             (rules, in evaluation order: 1, 3,"
            )
            && err.contains("at most 16 can, because the connect program judges every entry"),
        "{err}"
    );
}
