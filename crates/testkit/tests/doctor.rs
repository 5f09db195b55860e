//! `connredir doctor` finds what else intercepts connections: a BPF program
//! of someone else's on a scope cgroup (one this test loads and attaches to
//! its own cgroup only), an nftables REDIRECT rule (in a network namespace
//! this test makes, never the host's ruleset), and an exclusive attachment
//! that keeps the layer out, which `up` then indeed cannot pass.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use connredir_testkit::{require_privileges, require_program, test_tree, workspace_bin};
use serde_json::Value;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a 128-byte `union bpf_attr`; its pointers point at
    // buffers that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

/// Loads a connect4 program that allows every connection and changes
/// nothing (`r0 = 1; exit`), named `foreign_allow`.
fn load_foreign_program() -> OwnedFd {
    // mov64 r0, 1; exit
    let insns: [u64; 2] = [0xb7 | (1u64 << 32), 0x95];
    let license = c"GPL";
    let mut attr = [0u64; 16];
    // prog_type @0, insn_cnt @4, insns @8, license @16, prog_name @48,
    // expected_attach_type @68.
    attr[0] = u64::from(BPF_PROG_TYPE_CGROUP_SOCK_ADDR) | (2u64 << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"foreign_allow");
    attr[6] = u64::from_ne_bytes(name[..8].try_into().unwrap());
    attr[7] = u64::from_ne_bytes(name[8..].try_into().unwrap());
    attr[8] = u64::from(BPF_CGROUP_INET4_CONNECT) << 32;
    let fd = bpf(BPF_PROG_LOAD, &mut attr).expect("load a tiny connect4 program");
    // SAFETY: the kernel gave us this descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Attaches `prog` to `cgroup`'s connect4 hook through a BPF link (as
/// multi); detached when the returned link is closed.
fn link(prog: &OwnedFd, cgroup: &Path) -> OwnedFd {
    let dir = std::fs::File::open(cgroup).unwrap();
    let mut attr = [0u64; 16];
    // prog_fd @0, target_fd @4, attach_type @8, flags @12.
    attr[0] = prog.as_raw_fd() as u32 as u64 | ((dir.as_raw_fd() as u32 as u64) << 32);
    attr[1] = u64::from(BPF_CGROUP_INET4_CONNECT);
    let fd = bpf(BPF_LINK_CREATE, &mut attr).expect("link the program to the test cgroup");
    // SAFETY: the kernel gave us this descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Attaches `prog` to `cgroup`'s connect4 hook the old way, without
/// BPF_F_ALLOW_MULTI: nothing else may attach there or below. Detached
/// again on drop (and with the cgroup, were the test to die first).
struct Exclusive<'a> {
    prog: &'a OwnedFd,
    cgroup: std::fs::File,
}

impl<'a> Exclusive<'a> {
    fn attach(prog: &'a OwnedFd, cgroup: &Path) -> Exclusive<'a> {
        let cgroup = std::fs::File::open(cgroup).unwrap();
        let mut attr = [0u64; 16];
        // target_fd @0, attach_bpf_fd @4, attach_type @8, attach_flags @12.
        attr[0] = cgroup.as_raw_fd() as u32 as u64 | ((prog.as_raw_fd() as u32 as u64) << 32);
        attr[1] = u64::from(BPF_CGROUP_INET4_CONNECT);
        bpf(BPF_PROG_ATTACH, &mut attr).expect("attach the program exclusively");
        Exclusive { prog, cgroup }
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let mut attr = [0u64; 16];
        attr[0] =
            self.cgroup.as_raw_fd() as u32 as u64 | ((self.prog.as_raw_fd() as u32 as u64) << 32);
        attr[1] = u64::from(BPF_CGROUP_INET4_CONNECT);
        let _ = bpf(BPF_PROG_DETACH, &mut attr);
    }
}

/// The id of a loaded program.
fn prog_id(prog: &OwnedFd) -> u32 {
    let mut info = [0u32; 20];
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u32 as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(15, &mut attr).expect("BPF_OBJ_GET_INFO_BY_FD");
    info[1]
}

/// A network namespace of this test's, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let name = format!("connredir-test-{name}-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// Loads an nftables ruleset into the namespace.
    fn nft(&self, ruleset: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft -f failed");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `connredir doctor --json` with a configuration whose scope is
/// `scope`, in the network namespace `netns`: (exit code, report).
fn doctor(netns: &Netns, dir: &Path, scope: &Path) -> (Option<i32>, Value) {
    let config = dir.join("connredir.toml");
    std::fs::write(
        &config,
        format!("[scope]\ncgroups = [\"{}\"]\n", scope.display()),
    )
    .unwrap();
    let net = format!("--net={}", netns.path().display());
    let out = Command::new("nsenter")
        .arg(&net)
        .arg(workspace_bin("connredir"))
        .args(["doctor", "--json", "--config"])
        .arg(&config)
        .args(places(dir))
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {out:?}"));
    (out.status.code(), report)
}

/// A pin and state directory of this test's, where no engine runs.
fn places(dir: &Path) -> Vec<String> {
    vec![
        "--pin-dir".into(),
        format!("/sys/fs/bpf/connredir-test-doctor-{}", std::process::id()),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
    ]
}

/// The findings of a report whose text contains `needle`.
fn findings<'a>(report: &'a Value, needle: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["what"].as_str().unwrap().contains(needle))
        .collect()
}

#[test]
fn doctor_finds_a_foreign_bpf_program_and_an_nftables_redirect() {
    if !require_privileges("doctor") {
        return;
    }
    if require_program("doctor", "nft").is_none() || require_program("doctor", "nsenter").is_none()
    {
        return;
    }
    let tree = test_tree("doctor").unwrap();
    let scope = tree.cgroup("scope").unwrap();
    let dir = std::env::temp_dir().join(format!("connredir-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let netns = Netns::new("doctor");

    // Nothing of anyone's yet: a clean bill of health for the scope.
    let (code, report) = doctor(&netns, &dir, &scope);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["blocked"], false);
    assert_eq!(report["cgroups"][0]["path"], scope.display().to_string());
    assert_eq!(report["cgroups"][0]["programs"], Value::Array(vec![]));
    assert_eq!(report["netfilter"]["rules"], Value::Array(vec![]));
    assert_eq!(report["kernel"]["programs_load"], true, "{report:#}");

    // Someone else's connect4 program on the scope, and a REDIRECT rule in
    // the namespace's nat output chain.
    let prog = load_foreign_program();
    let id = prog_id(&prog);
    let _link = link(&prog, &scope);
    netns.nft(
        "table ip intercept {\n chain out {\n  type nat hook output priority -100;\n  \
         tcp dport 8080 redirect to :15001\n }\n}\n",
    );
    let (code, report) = doctor(&netns, &dir, &scope);
    assert_eq!(
        code,
        Some(0),
        "a multi attachment does not block: {report:#}"
    );
    let programs = report["cgroups"][0]["programs"].as_array().unwrap();
    assert_eq!(programs.len(), 1, "{report:#}");
    let program = &programs[0];
    assert_eq!(program["id"], id);
    assert_eq!(program["name"], "foreign_allow");
    assert_eq!(program["hook"], "cgroup_inet4_connect");
    assert_eq!(program["mode"], "multi");
    assert_eq!(program["ours"], false);
    let found = findings(&report, &format!("(id {id})"));
    assert_eq!(found.len(), 1, "{report:#}");
    assert_eq!(found[0]["severity"], "warning");
    assert_eq!(found[0]["area"], "bpf");
    assert!(
        found[0]["advice"]
            .as_str()
            .unwrap()
            .contains(&format!("bpftool prog show id {id}")),
        "{report:#}"
    );

    let rules = report["netfilter"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{report:#}");
    assert_eq!(rules[0]["action"], "redirect");
    assert_eq!(rules[0]["table"], "intercept");
    assert_eq!(rules[0]["chain"], "out");
    assert_eq!(rules[0]["hook"], "output");
    assert!(rules[0]["rule"].as_str().unwrap().contains("15001"));
    let found = findings(&report, "nft REDIRECT rule in ip intercept chain out");
    assert_eq!(found.len(), 1, "{report:#}");
    assert_eq!(found[0]["severity"], "warning");

    // The text form says the same, with what to do.
    let net = format!("--net={}", netns.path().display());
    let config = dir.join("connredir.toml");
    let text = Command::new("nsenter")
        .arg(&net)
        .arg(workspace_bin("connredir"))
        .args(["doctor", "--config"])
        .arg(&config)
        .args(places(&dir))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "warning: BPF program foreign_allow (id {id}) is attached to cgroup_inet4_connect \
             of scope cgroup {}",
            scope.display()
        )) && text.contains("warning: nft REDIRECT rule in ip intercept chain out (hook output)"),
        "{text}"
    );
    drop(netns);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn doctor_says_an_exclusive_program_blocks_the_layer_and_up_indeed_fails() {
    if !require_privileges("doctor-exclusive") {
        return;
    }
    if require_program("doctor-exclusive", "nsenter").is_none() {
        return;
    }
    let tree = test_tree("doctor-exclusive").unwrap();
    // The program sits on the parent; the scope is below it.
    let parent = tree.cgroup("held").unwrap();
    let scope = tree.cgroup("held/scope").unwrap();
    let dir =
        std::env::temp_dir().join(format!("connredir-doctor-exclusive-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let netns = Netns::new("doctor-exclusive");
    let prog = load_foreign_program();
    let id = prog_id(&prog);
    let exclusive = Exclusive::attach(&prog, &parent);

    let (code, report) = doctor(&netns, &dir, &scope);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["blocked"], true);
    let ancestor = &report["cgroups"][1];
    assert_eq!(ancestor["path"], parent.display().to_string());
    assert_eq!(ancestor["programs"][0]["id"], id);
    assert_eq!(ancestor["programs"][0]["mode"], "exclusive");
    let found = findings(&report, &format!("(id {id})"));
    assert_eq!(found.len(), 1, "{report:#}");
    assert_eq!(found[0]["severity"], "blocking");
    assert_eq!(
        report["findings"][0]["severity"], "blocking",
        "worst first: {report:#}"
    );

    // What doctor says holds: `up` cannot attach below it.
    let mut up = Command::new(workspace_bin("connredir"))
        .args(["up", "--config"])
        .arg(dir.join("connredir.toml"))
        .args(places(&dir))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            let _ = Command::new(workspace_bin("connredir"))
                .arg("down")
                .args(places(&dir))
                .output();
            panic!("up attached below an exclusive program");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    drop(exclusive);
    // With it gone, nothing blocks.
    let (code, report) = doctor(&netns, &dir, &scope);
    assert_eq!(code, Some(0), "{report:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
