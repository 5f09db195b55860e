//! `connredir doctor`: what keeps the layer from working on this machine,
//! and what else intercepts connections here, each finding with what to do.
//!
//! It only reads: the kernel's features (and whether the layer's programs
//! load, by loading them and letting them go), the running engine's status,
//! the BPF programs attached to the scope's cgroups and their ancestors,
//! the netfilter ruleset (`nft -j`, `iptables-save`) and the policy-routing
//! rules (`ip -j rule`) of the network namespace it runs in.

mod bpf;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, OnDownConfig};
use crate::control;
use crate::lifecycle::Places;

pub use bpf::{AttachMode, Attached};

/// The whole report; `doctor --json` prints it as is.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Something keeps the layer from working (doctor exits with 1).
    pub blocked: bool,
    /// What was found, worst first, each with what to do.
    pub findings: Vec<Finding>,
    /// The kernel's features the layer needs.
    pub kernel: Kernel,
    /// The running engine, if any.
    pub engine: EngineState,
    /// The scope's cgroups and their ancestors, with the programs attached.
    pub cgroups: Vec<CgroupPrograms>,
    /// Netfilter rules that send connections elsewhere.
    pub netfilter: Netfilter,
    /// Policy-routing rules besides the kernel's defaults.
    pub routing: Vec<RoutingRule>,
    /// The running engine's services and whether each listens.
    pub services: Vec<ServiceListening>,
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// The layer cannot work until this is fixed.
    Blocking,
    /// The layer works, but this can send flows around or away from the
    /// services, or refuses them.
    Warning,
    /// Worth knowing.
    Info,
}

/// Which part of the machine a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Area {
    /// Kernel features.
    Kernel,
    /// The running engine and its scope.
    Engine,
    /// Another BPF program on the scope's cgroups or their ancestors.
    Bpf,
    /// A netfilter rule.
    Netfilter,
    /// A policy-routing rule.
    Routing,
    /// A service.
    Service,
}

/// One thing found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// What it is about.
    pub area: Area,
    /// What was found.
    pub what: String,
    /// What to do about it.
    pub advice: String,
}

/// The kernel's features the layer needs.
#[derive(Debug, Serialize)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// Where cgroup v2 is mounted.
    pub cgroup2: Option<PathBuf>,
    /// Whether bpffs is mounted where the pin directory lives.
    pub bpffs: bool,
    /// Whether the kernel has BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
    /// The program types the layer loads (and attaches), all probed at
    /// once by loading the layer's object.
    pub program_types: Vec<&'static str>,
    /// Whether the layer's programs load, verifier and all. Null when it
    /// could not be tried (not root, or no cgroup v2).
    pub programs_load: Option<bool>,
    /// The loader's error when they do not.
    pub load_error: Option<String>,
}

/// The running engine as doctor found it.
#[derive(Debug, Serialize)]
pub struct EngineState {
    /// It answered on its control socket.
    pub running: bool,
    /// The control socket asked.
    pub control_socket: PathBuf,
    /// Why it did not answer.
    pub error: Option<String>,
    /// Its pin directory exists (the layer is attached, running or not).
    pub pinned: bool,
    /// Where the scope below came from: "engine", a configuration file, or
    /// null when nothing named one.
    pub scope_from: Option<String>,
    /// The scope's cgroups.
    pub scope: Vec<PathBuf>,
}

/// One cgroup and what is attached to it.
#[derive(Debug, Serialize)]
pub struct CgroupPrograms {
    /// The cgroup directory.
    pub path: PathBuf,
    /// A scope cgroup (else an ancestor of one).
    pub scope: bool,
    /// Whether it exists.
    pub exists: bool,
    /// The programs attached to it (not inherited), hook by hook.
    pub programs: Vec<Attached>,
    /// Why they could not be read.
    pub error: Option<String>,
}

/// The netfilter rules that send connections elsewhere.
#[derive(Debug, Serialize)]
pub struct Netfilter {
    /// Whether `nft` could list the ruleset.
    pub nft: bool,
    /// Whether `iptables-save` ran (legacy iptables' rules).
    pub iptables: bool,
    /// REDIRECT, TPROXY and DNAT rules.
    pub rules: Vec<InterceptRule>,
}

/// What an intercepting netfilter rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intercept {
    /// REDIRECT: to a local port.
    Redirect,
    /// TPROXY: to a local transparent proxy.
    Tproxy,
    /// DNAT: to another address.
    Dnat,
}

/// One netfilter rule that sends connections elsewhere.
#[derive(Debug, Clone, Serialize)]
pub struct InterceptRule {
    /// `nft` or `iptables-save`/`ip6tables-save`.
    pub source: String,
    /// What it does.
    pub action: Intercept,
    /// Family (ip, ip6, inet), table and chain.
    pub family: String,
    /// The table.
    pub table: String,
    /// The chain.
    pub chain: String,
    /// The chain's hook (`output` sees this machine's connections), when
    /// known.
    pub hook: Option<String>,
    /// The rule, as its source prints it (nft: the JSON expression).
    pub rule: String,
}

/// One policy-routing rule besides the kernel's defaults.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingRule {
    /// 4 or 6.
    pub family: u8,
    /// Its priority.
    pub priority: u64,
    /// The firewall mark it selects, if any.
    pub fwmark: Option<String>,
    /// The table it looks up.
    pub table: Option<String>,
    /// The whole rule as `ip -j rule` gives it.
    pub rule: Value,
}

/// A service of the running engine.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceListening {
    /// Its name.
    pub name: String,
    /// Its addresses.
    pub listen: Vec<std::net::SocketAddr>,
    /// Its own listener is on every address.
    pub up: bool,
    /// What its rules do while it is down.
    pub on_down: OnDownConfig,
}

/// Looks at everything and returns the report; `config`: take the scope
/// from this file instead of the running engine.
pub fn examine(places: &Places, config: Option<&Path>) -> Report {
    let mut findings = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        findings.push(Finding {
            severity: Severity::Warning,
            area: Area::Kernel,
            what: "not run as root: the engine, the BPF programs and the layer's program types \
                   could not be checked"
                .into(),
            advice: "run `connredir doctor` as root (sudo)".into(),
        });
    }
    let kernel = kernel(root, places, &mut findings);
    let (engine, services) = engine(places, config, &mut findings);
    let cgroups = if root {
        cgroups(&engine, places, &mut findings)
    } else {
        Vec::new()
    };
    let netfilter = netfilter(&mut findings);
    let routing = routing(&mut findings);
    findings.sort_by_key(|f| f.severity);
    Report {
        blocked: findings.iter().any(|f| f.severity == Severity::Blocking),
        findings,
        kernel,
        engine,
        cgroups,
        netfilter,
        routing,
        services,
    }
}

/// The layer's program types and what each is for.
const PROGRAM_TYPES: &[&str] = &[
    "cgroup_sock_addr (connect4, connect6, bind4, bind6)",
    "sock_ops",
    "cgroup_sockopt (getsockopt, setsockopt)",
    "sk_msg (on the accel_socks sockhash)",
];

fn kernel(root: bool, places: &Places, findings: &mut Vec<Finding>) -> Kernel {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    let cgroup2 = connredir_host::cgroup::cgroup2_root();
    if cgroup2.is_none() {
        findings.push(Finding {
            severity: Severity::Blocking,
            area: Area::Kernel,
            what: "cgroup v2 is not mounted: the layer's programs attach to cgroup v2 directories"
                .into(),
            advice: "mount it (mount -t cgroup2 none /sys/fs/cgroup), or boot with \
                     systemd.unified_cgroup_hierarchy=1"
                .into(),
        });
    }
    let bpffs_dir = places.pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    let bpffs = is_bpffs(bpffs_dir);
    if !bpffs {
        findings.push(Finding {
            severity: Severity::Info,
            area: Area::Kernel,
            what: format!("bpffs is not mounted at {}", bpffs_dir.display()),
            advice: "nothing to do: `connredir up` mounts it there (mount -t bpf bpf /sys/fs/bpf \
                     does it by hand)"
                .into(),
        });
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if !btf {
        findings.push(Finding {
            severity: Severity::Info,
            area: Area::Kernel,
            what: "the kernel has no BTF (/sys/kernel/btf/vmlinux)".into(),
            advice: "nothing to do for connredir, whose programs need no BTF; tools such as \
                     bpftool's BTF dumps need CONFIG_DEBUG_INFO_BTF=y"
                .into(),
        });
    }
    let (programs_load, load_error) = if root && cgroup2.is_some() {
        // The one true probe: load the layer's object, verifier and all,
        // then let it go. Nothing is attached.
        match connredir_engine::Engine::load() {
            Ok(engine) => {
                drop(engine);
                (Some(true), None)
            }
            Err(e) => {
                let error = format!("{e:#}");
                findings.push(Finding {
                    severity: Severity::Blocking,
                    area: Area::Kernel,
                    what: format!("the layer's programs do not load on kernel {release}: {error}"),
                    advice: "connredir needs Linux 5.18 or newer with cgroup_sock_addr \
                             (connect4/6, bind4/6), sock_ops, cgroup_sockopt and sk_msg programs \
                             and BPF_MAP_TYPE_SK_STORAGE; upgrade the kernel, or check that BPF \
                             is not restricted (lockdown, kernel.unprivileged_bpf_disabled does \
                             not matter for root)"
                        .into(),
                });
                (Some(false), Some(error))
            }
        }
    } else {
        (None, None)
    };
    Kernel {
        release,
        program_types: PROGRAM_TYPES.to_vec(),
        cgroup2,
        bpffs,
        btf,
        programs_load,
        load_error,
    }
}

/// Whether `dir` is a bpffs mount point.
fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is valid; statfs fills it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated and fs a valid out-buffer.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut fs) };
    rc == 0 && fs.f_type as i64 == BPF_FS_MAGIC
}

fn engine(
    places: &Places,
    config: Option<&Path>,
    findings: &mut Vec<Finding>,
) -> (EngineState, Vec<ServiceListening>) {
    let control_socket = control::socket_path(&places.state_dir);
    let pinned = places.pin_dir.exists();
    let status = control::client::status(&places.state_dir);
    let mut state = EngineState {
        running: status.is_ok(),
        control_socket,
        error: status.as_ref().err().map(|e| format!("{e:#}")),
        pinned,
        scope_from: None,
        scope: Vec::new(),
    };
    let mut services = Vec::new();
    if let Ok(status) = &status {
        for s in &status.services {
            services.push(ServiceListening {
                name: s.name.clone(),
                listen: s.listen.clone(),
                up: s.up,
                on_down: s.on_down,
            });
            if s.up {
                continue;
            }
            let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
            let (severity, effect) = match s.on_down {
                OnDownConfig::Block => (
                    Severity::Warning,
                    "its rules refuse the connections they select until it listens",
                ),
                OnDownConfig::Bypass => (
                    Severity::Info,
                    "its rules are skipped (on_down = bypass): its flows go uninspected",
                ),
            };
            findings.push(Finding {
                severity,
                area: Area::Service,
                what: format!(
                    "service {} does not listen on {}: {effect}",
                    s.name,
                    listen.join(" and ")
                ),
                advice: format!(
                    "start the service in the scope so that it listens on {}, or remove its \
                     rules (`connredir rule del ID`)",
                    listen.join(" and ")
                ),
            });
        }
    } else if let (Err(error), true) = (&status, state.control_socket.exists()) {
        // Something is there but did not answer us: refused (not root, not
        // in the control group), or an `up` that died without cleaning up.
        findings.push(Finding {
            severity: Severity::Warning,
            area: Area::Engine,
            what: format!("the control socket did not answer: {error:#}"),
            advice: "run doctor as root (or as a member of the control group); if no \
                     `connredir up` runs, start one: it replaces the stale socket"
                .into(),
        });
    } else {
        findings.push(Finding {
            severity: Severity::Info,
            area: Area::Engine,
            what: if pinned {
                format!(
                    "no `connredir up` answers at {}, but the layer of an earlier run is still \
                     attached (pins in {})",
                    state.control_socket.display(),
                    places.pin_dir.display()
                )
            } else {
                format!(
                    "no `connredir up` answers at {}",
                    state.control_socket.display()
                )
            },
            advice: if pinned {
                "`connredir up --config FILE` takes the attached layer over; `connredir down` \
                 removes it"
                    .into()
            } else {
                "start the layer with `connredir up --config FILE`".into()
            },
        });
    }
    // The scope: --config's, else the engine's, else the default file's.
    let from_file = |path: &Path, findings: &mut Vec<Finding>| match Config::load(path) {
        Ok(config) => Some(config.scope.resolve().map_err(|e| format!("{e:#}"))),
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Warning,
                area: Area::Engine,
                what: format!("cannot read the scope from {}: {e:#}", path.display()),
                advice: "fix the file (`connredir check FILE` says where)".into(),
            });
            None
        }
    };
    let scope = match (config, &status) {
        (Some(path), _) => from_file(path, findings).map(|s| (path.display().to_string(), s)),
        (None, Ok(status)) => Some((
            "engine".to_string(),
            Ok(status.scopes.iter().map(PathBuf::from).collect()),
        )),
        (None, Err(_)) => {
            let default = Path::new(crate::run::DEFAULT_CONFIG);
            if default.exists() {
                from_file(default, findings).map(|s| (default.display().to_string(), s))
            } else {
                findings.push(Finding {
                    severity: Severity::Info,
                    area: Area::Engine,
                    what: "no scope to look at: no engine runs and no configuration was given"
                        .into(),
                    advice: "pass --config FILE to check the programs attached to its scope".into(),
                });
                None
            }
        }
    };
    match scope {
        Some((from, Ok(cgroups))) => {
            state.scope_from = Some(from);
            state.scope = cgroups;
        }
        Some((from, Err(e))) => findings.push(Finding {
            severity: Severity::Warning,
            area: Area::Engine,
            what: format!("the scope of {from} does not resolve: {e}"),
            advice: "start the systemd units it names, or name cgroup directories".into(),
        }),
        None => {}
    }
    (state, services)
}

/// Each scope cgroup and its ancestors (each once), with what is attached,
/// and a finding for each program that is not the layer's.
fn cgroups(
    engine: &EngineState,
    places: &Places,
    findings: &mut Vec<Finding>,
) -> Vec<CgroupPrograms> {
    let ours = bpf::pinned_programs(&places.pin_dir);
    let root = connredir_host::cgroup::cgroup2_root();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for scope in &engine.scope {
        if !scope.exists() {
            let message = crate::config::scope_cgroup_problem(scope, root.as_deref())
                .unwrap_or_else(|| format!("scope cgroup {} does not exist", scope.display()));
            findings.push(Finding {
                severity: Severity::Warning,
                area: Area::Engine,
                what: message,
                advice: "create it, or let `connredir up` create it".into(),
            });
        }
        // The scope cgroup, then its ancestors up to the cgroup v2 root.
        let levels = scope
            .ancestors()
            .take_while(|p| root.as_deref().is_some_and(|r| p.starts_with(r)));
        for (depth, level) in levels.enumerate() {
            if !seen.insert(level.to_owned()) {
                continue;
            }
            let exists = level.exists();
            let (programs, error) = if exists {
                match bpf::attached(level, &ours) {
                    Ok(programs) => (programs, None),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                }
            } else {
                (Vec::new(), None)
            };
            for program in programs.iter().filter(|p| !p.ours) {
                findings.push(foreign(level, depth == 0, program));
            }
            out.push(CgroupPrograms {
                path: level.to_owned(),
                scope: depth == 0,
                exists,
                programs,
                error,
            });
        }
    }
    out
}

/// What a program that is not the layer's means where it is attached.
fn foreign(cgroup: &Path, scope: bool, p: &Attached) -> Finding {
    let place = if scope {
        format!("scope cgroup {}", cgroup.display())
    } else {
        format!("{} (an ancestor of the scope)", cgroup.display())
    };
    let what = format!(
        "BPF program {} (id {}) is attached to {} of {place}, {} attached",
        if p.name.is_empty() { "?" } else { &p.name },
        p.id,
        p.hook,
        match p.mode {
            AttachMode::Multi => "multi",
            AttachMode::Override => "override",
            AttachMode::Exclusive => "exclusively",
        }
    );
    let inspect = format!("see it with `bpftool prog show id {}`", p.id);
    let (severity, advice) = match (p.layer_hook, p.mode) {
        (true, AttachMode::Exclusive) => (
            Severity::Blocking,
            format!(
                "the layer cannot attach its {} program there or below (the kernel refuses \
                 with EPERM): detach it (`bpftool cgroup detach {} {} id {}`), or have its \
                 owner attach it with BPF_F_ALLOW_MULTI (or as a BPF link); {inspect}",
                p.hook,
                cgroup.display(),
                p.hook,
                p.id
            ),
        ),
        (true, AttachMode::Override) if !scope => (
            Severity::Warning,
            format!(
                "the layer's program replaces it for the scope's sockets, so it no longer runs \
                 there; make sure that is meant; {inspect}"
            ),
        ),
        (true, _) => (
            Severity::Warning,
            format!(
                "it runs on the same {} events as the layer for the scope's sockets (the \
                 layer's programs first, then the ancestors'); if it rewrites destinations or \
                 refuses connections it can send flows around or away from the services: \
                 narrow it to leave the scope alone, or detach it; {inspect}",
                p.hook
            ),
        ),
        (false, _) => (
            Severity::Info,
            format!(
                "it does not share a hook with the layer, but sees or filters the scope's \
                 traffic; {inspect}"
            ),
        ),
    };
    Finding {
        severity,
        area: Area::Bpf,
        what,
        advice,
    }
}

/// Runs a program and returns its stdout, or None when it is missing or
/// fails.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netfilter(findings: &mut Vec<Finding>) -> Netfilter {
    let mut rules = Vec::new();
    let nft = output("nft", &["-j", "list", "ruleset"]);
    if let Some(text) = &nft {
        match serde_json::from_str::<Value>(text) {
            Ok(ruleset) => rules.extend(nft_intercepts(&ruleset)),
            Err(e) => findings.push(Finding {
                severity: Severity::Info,
                area: Area::Netfilter,
                what: format!("`nft -j list ruleset` printed no JSON ruleset: {e}"),
                advice: "check the nftables rules by hand (nft list ruleset)".into(),
            }),
        }
    }
    let mut iptables = false;
    for program in ["iptables-save", "ip6tables-save"] {
        if let Some(text) = output(program, &[]) {
            iptables = true;
            rules.extend(iptables_intercepts(program, &text));
        }
    }
    if nft.is_none() && !iptables {
        findings.push(Finding {
            severity: Severity::Info,
            area: Area::Netfilter,
            what: "neither `nft` nor `iptables-save` could list the netfilter rules".into(),
            advice: "install nftables (or iptables) and run doctor as root to check for \
                     REDIRECT, TPROXY and DNAT rules"
                .into(),
        });
    }
    for rule in &rules {
        let output_hook = rule.hook.as_deref().is_none_or(|h| h == "output");
        let action = match rule.action {
            Intercept::Redirect => "REDIRECT",
            Intercept::Tproxy => "TPROXY",
            Intercept::Dnat => "DNAT",
        };
        findings.push(Finding {
            severity: if output_hook {
                Severity::Warning
            } else {
                Severity::Info
            },
            area: Area::Netfilter,
            what: format!(
                "{} {action} rule in {} {} chain {}{}: {}",
                rule.source,
                rule.family,
                rule.table,
                rule.chain,
                rule.hook
                    .as_ref()
                    .map_or(String::new(), |h| format!(" (hook {h})")),
                rule.rule
            ),
            advice: if output_hook {
                "it rewrites this machine's outgoing connections after the layer has decided \
                 them, so it can take flows from (or send them around) the services: exclude \
                 the services' addresses and the scope's cgroups from it (`socket cgroupv2 \
                 level N`), or remove it"
                    .into()
            } else {
                "it acts on traffic arriving from elsewhere, not on this machine's \
                 connections, unless policy routing loops them back (see the routing findings)"
                    .into()
            },
        });
    }
    Netfilter {
        nft: nft.is_some(),
        iptables,
        rules,
    }
}

/// The REDIRECT, TPROXY and DNAT rules of an `nft -j list ruleset` answer,
/// native expressions and iptables-nft's `xt` targets alike.
pub fn nft_intercepts(ruleset: &Value) -> Vec<InterceptRule> {
    let items = ruleset["nftables"].as_array().cloned().unwrap_or_default();
    let hook_of = |family: &str, table: &str, chain: &str| {
        items.iter().find_map(|item| {
            let c = item.get("chain")?;
            (c["family"] == family && c["table"] == table && c["name"] == chain)
                .then(|| c["hook"].as_str().map(str::to_string))
                .flatten()
        })
    };
    let mut out = Vec::new();
    for item in &items {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let exprs = rule["expr"].as_array().cloned().unwrap_or_default();
        let action = exprs.iter().find_map(|e| {
            if e.get("redirect").is_some() {
                Some(Intercept::Redirect)
            } else if e.get("tproxy").is_some() {
                Some(Intercept::Tproxy)
            } else if e.get("dnat").is_some() {
                Some(Intercept::Dnat)
            } else {
                match e.get("xt").and_then(|x| x["name"].as_str()) {
                    Some("REDIRECT") => Some(Intercept::Redirect),
                    Some("TPROXY") => Some(Intercept::Tproxy),
                    Some("DNAT") => Some(Intercept::Dnat),
                    _ => None,
                }
            }
        });
        let Some(action) = action else {
            continue;
        };
        let text = |key: &str| rule[key].as_str().unwrap_or("?").to_string();
        let (family, table, chain) = (text("family"), text("table"), text("chain"));
        out.push(InterceptRule {
            source: "nft".into(),
            action,
            hook: hook_of(&family, &table, &chain),
            family,
            table,
            chain,
            rule: rule["expr"].to_string(),
        });
    }
    out
}

/// The REDIRECT, TPROXY and DNAT rules of `iptables-save` output.
pub fn iptables_intercepts(program: &str, text: &str) -> Vec<InterceptRule> {
    let family = if program.starts_with("ip6") {
        "ip6"
    } else {
        "ip"
    };
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim().to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let target = words.windows(2).find(|w| w[0] == "-j").map(|w| w[1]);
        let action = match target {
            Some("REDIRECT") => Intercept::Redirect,
            Some("TPROXY") => Intercept::Tproxy,
            Some("DNAT") => Intercept::Dnat,
            _ => continue,
        };
        let chain = words.first().copied().unwrap_or("?").to_string();
        let hook = match chain.as_str() {
            "OUTPUT" => Some("output".to_string()),
            "PREROUTING" => Some("prerouting".to_string()),
            _ => None,
        };
        out.push(InterceptRule {
            source: program.into(),
            action,
            family: family.into(),
            table: table.clone(),
            chain,
            hook,
            rule: line.to_string(),
        });
    }
    out
}

/// The kernel's own rules: local (0), main (32766), default (32767).
fn is_default_rule(rule: &Value) -> bool {
    let keys: BTreeSet<&str> = rule
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let plain = keys
        .iter()
        .all(|k| ["priority", "src", "table"].contains(k));
    plain
        && matches!(
            (rule["priority"].as_u64(), rule["table"].as_str()),
            (Some(0), Some("local")) | (Some(32766), Some("main")) | (Some(32767), Some("default"))
        )
}

fn routing(findings: &mut Vec<Finding>) -> Vec<RoutingRule> {
    let mut out = Vec::new();
    for (family, flag) in [(4u8, "-4"), (6, "-6")] {
        let Some(text) = output("ip", &[flag, "-j", "rule"]) else {
            continue;
        };
        let rules: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
        for rule in rules.into_iter().filter(|r| !is_default_rule(r)) {
            let fwmark = rule["fwmark"].as_str().map(str::to_string);
            let table = rule["table"].as_str().map(str::to_string);
            findings.push(Finding {
                severity: Severity::Info,
                area: Area::Routing,
                what: format!(
                    "IPv{family} policy-routing rule {}: {}",
                    rule["priority"], rule
                ),
                advice: if fwmark.is_some() {
                    "marked packets are routed by another table: a TPROXY or mark-based \
                     interception setup; make sure it does not mark the scope's connections \
                     or the services' onward ones"
                        .into()
                } else {
                    "nothing to do unless it sends loopback traffic elsewhere".into()
                },
            });
            out.push(RoutingRule {
                family,
                priority: rule["priority"].as_u64().unwrap_or(0),
                fwmark,
                table,
                rule,
            });
        }
    }
    out
}

/// Prints the report for people: the findings, worst first, each with
/// what to do, then a summary of what was looked at.
pub fn print(report: &Report) {
    let k = &report.kernel;
    println!(
        "kernel {}: cgroup v2 {}, bpffs {}, BTF {}, the layer's programs {}",
        k.release,
        k.cgroup2
            .as_ref()
            .map_or("not mounted".to_string(), |p| format!("at {}", p.display())),
        if k.bpffs { "mounted" } else { "not mounted" },
        if k.btf { "present" } else { "absent" },
        match k.programs_load {
            Some(true) => "load",
            Some(false) => "do NOT load",
            None => "not probed",
        }
    );
    let e = &report.engine;
    println!(
        "engine: {}; scope{}: {}",
        if e.running { "running" } else { "not running" },
        e.scope_from
            .as_ref()
            .map_or(String::new(), |f| format!(" (from {f})")),
        if e.scope.is_empty() {
            "none".to_string()
        } else {
            e.scope
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    for s in &report.services {
        println!(
            "service {}: {}",
            s.name,
            if s.up { "listening" } else { "NOT listening" }
        );
    }
    let foreign: usize = report
        .cgroups
        .iter()
        .map(|c| c.programs.iter().filter(|p| !p.ours).count())
        .sum();
    println!(
        "looked at {} cgroups (scope and ancestors): {foreign} BPF programs not the layer's; \
         {} intercepting netfilter rules; {} policy-routing rules besides the defaults",
        report.cgroups.len(),
        report.netfilter.rules.len(),
        report.routing.len()
    );
    println!();
    if report.findings.is_empty() {
        println!("nothing found that keeps the layer from working or intercepts connections");
    }
    for f in &report.findings {
        let label = match f.severity {
            Severity::Blocking => "BLOCKING",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        println!("{label}: {}", f.what);
        println!("  → {}", f.advice);
    }
    if report.blocked {
        println!("\nthe layer cannot work here until the blocking findings are fixed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_redirect_tproxy_and_xt_targets_are_found_with_their_hooks() {
        let ruleset: Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "nat", "handle": 1}},
            {"chain": {"family": "ip", "table": "nat", "name": "output", "handle": 1, "type": "nat", "hook": "output", "prio": -100}},
            {"rule": {"family": "ip", "table": "nat", "chain": "output", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}}, {"redirect": {"port": 15001}}]}},
            {"chain": {"family": "ip", "table": "mangle", "name": "pre", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150}},
            {"rule": {"family": "ip", "table": "mangle", "chain": "pre", "handle": 2, "expr": [{"tproxy": {"port": 15002}}]}},
            {"rule": {"family": "ip", "table": "mangle", "chain": "pre", "handle": 3, "expr": [{"counter": null}, {"accept": null}]}},
            {"rule": {"family": "ip", "table": "nat", "chain": "OUTPUT", "handle": 4, "expr": [{"xt": {"type": "target", "name": "DNAT"}}]}}]}"#,
        )
        .unwrap();
        let found = nft_intercepts(&ruleset);
        let summary: Vec<(Intercept, &str, Option<&str>)> = found
            .iter()
            .map(|r| (r.action, r.chain.as_str(), r.hook.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Intercept::Redirect, "output", Some("output")),
                (Intercept::Tproxy, "pre", Some("prerouting")),
                (Intercept::Dnat, "OUTPUT", None),
            ]
        );
        assert!(found[0].rule.contains("15001"), "{}", found[0].rule);
    }

    #[test]
    fn iptables_save_targets_are_found_by_table_and_chain() {
        let text = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 3128\n\
                    -A POSTROUTING -j MASQUERADE\nCOMMIT\n*mangle\n-A PREROUTING -p tcp -j TPROXY --on-port 1 --tproxy-mark 0x1/0x1\nCOMMIT\n";
        let found = iptables_intercepts("iptables-save", text);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (
                found[0].action,
                found[0].table.as_str(),
                found[0].hook.as_deref()
            ),
            (Intercept::Redirect, "nat", Some("output"))
        );
        assert_eq!(
            (
                found[1].action,
                found[1].table.as_str(),
                found[1].hook.as_deref()
            ),
            (Intercept::Tproxy, "mangle", Some("prerouting"))
        );
    }

    #[test]
    fn only_the_kernels_own_routing_rules_are_default() {
        let rule = |text: &str| serde_json::from_str::<Value>(text).unwrap();
        assert!(is_default_rule(&rule(
            r#"{"priority":0,"src":"all","table":"local"}"#
        )));
        assert!(is_default_rule(&rule(
            r#"{"priority":32766,"src":"all","table":"main"}"#
        )));
        assert!(!is_default_rule(&rule(
            r#"{"priority":32765,"src":"all","fwmark":"0x1","table":"100"}"#
        )));
        assert!(!is_default_rule(&rule(
            r#"{"priority":0,"src":"all","table":"main"}"#
        )));
    }
}
