//! The ways connredir is shipped: the Debian package and the Kubernetes
//! manifests.
//!
//! The package (`scripts/package`, cargo-deb) is built from the workspace's
//! own build, installed with `dpkg -i` into a throwaway root (an overlay
//! over `/` whose writes go to a tmpfs of a private mount namespace, so the
//! host is never changed), the README's quick start for the package is run
//! from the installed files, `connredir up` runs from them on a scope cgroup
//! of the test's own (in a bpffs of the namespace's own), `dpkg -r` must take
//! that layer down (stop `up`, remove its pins and the cgroup it created),
//! and after `dpkg -P` nothing of the package may be left but dpkg's own
//! bookkeeping (`tests/package_install.sh` does the part inside the
//! namespace).
//!
//! Every manifest in `deploy/kubernetes` passes kubernetes-validate (strict,
//! against a pinned Kubernetes version, offline: scripts/setup installs it
//! with its schemas), and the configuration in the ConfigMap passes
//! `connredir check`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use connredir_testkit::{
    require_privileges, require_program, require_setup_tool, workspace_bin, TestDir,
};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.33.0";

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The build directory of this test's profile (`target/<profile>`), where
/// the workspace build left the binaries and the library.
fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .expect("the test executable's path")
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
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

#[test]
fn the_package_installs_runs_its_quick_start_and_leaves_nothing_when_removed() {
    let test = "the_package_installs_runs_its_quick_start_and_leaves_nothing_when_removed";
    if !require_privileges(test) {
        return;
    }
    for program in ["dpkg", "unshare", "chroot", "cc", "pkg-config", "cargo"] {
        if require_program(test, program).is_none() {
            return;
        }
    }
    let in_ci = std::env::var("CI").as_deref() == Ok("true");
    let cargo_deb = Command::new("cargo").args(["deb", "--version"]).output();
    if !cargo_deb.is_ok_and(|o| o.status.success()) {
        assert!(
            !in_ci,
            "{test}: cargo-deb is not installed (scripts/setup installs it)"
        );
        eprintln!("SKIPPED {test}: cargo-deb is not installed (run scripts/setup)");
        return;
    }
    // Overlayfs over / needs a kernel with overlayfs; say so plainly.
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"))
    {
        let _ = Command::new("modprobe").arg("overlay").status();
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems
            .lines()
            .any(|l| l.trim_end().ends_with("overlay"))
        {
            assert!(
                !in_ci,
                "{test}: the kernel has no overlayfs for the throwaway root"
            );
            eprintln!("SKIPPED {test}: the kernel has no overlayfs for the throwaway root");
            return;
        }
    }

    // The package from what the workspace build made (scripts/test builds
    // the workspace first): the test checks the package, its installation
    // and removal, not the optimisation of its binaries, so it packages
    // this profile's build instead of compiling a release build.
    let profile_dir = profile_dir();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(name) => name.to_string(),
        None => panic!("no profile in {}", profile_dir.display()),
    };
    // cargo-deb clears earlier packages of the same name from its target
    // directory's `debian/`: it works on a target directory of its own,
    // holding (hard links to) what the build made, so that a package built
    // by hand in target/debian stays.
    let stage = TestDir::new("package-target", None);
    let staged = stage.0.join(profile_dir.file_name().unwrap());
    std::fs::create_dir_all(&staged).unwrap();
    for built in [
        "connredir",
        "connredir-proxy",
        "libconnredir.so",
        "libconnredir.a",
    ] {
        let from = profile_dir.join(built);
        assert!(
            from.exists(),
            "{built} is missing in {}: run `cargo build --workspace` before the tests (scripts/test does)",
            profile_dir.display()
        );
        if std::fs::hard_link(&from, staged.join(built)).is_err() {
            std::fs::copy(&from, staged.join(built)).unwrap();
        }
    }
    let out = TestDir::new("package-deb", None);
    run(
        "scripts/package",
        Command::new(repo().join("scripts/package"))
            .args(["--profile", &profile, "--no-build", "--fast", "--output"])
            .arg(&out.0)
            .env("CARGO_TARGET_DIR", &stage.0),
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb in {}: {debs:?}", out.0.display());

    // Install, quick start, remove, purge, and the check of what is left:
    // all in a mount namespace of its own, whose mounts (the overlay, its
    // tmpfs) end with it.
    let work = TestDir::new("package-root", None);
    let output = Command::new("unshare")
        .arg("--mount")
        .arg(repo().join("crates/testkit/tests/package_install.sh"))
        .arg(&debs[0])
        .arg(&work.0)
        .output()
        .expect("start unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "installing, using and removing the package failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("libconnredir: ok"), "{stdout}");
    assert!(
        stdout.contains("nothing of the package is left"),
        "{stdout}"
    );
}

/// Validates `files` strictly (unknown fields are errors) against the
/// pinned Kubernetes version.
fn validate(program: &Path, files: &[PathBuf]) -> Output {
    Command::new(program)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("start kubernetes-validate")
}

#[test]
fn every_kubernetes_manifest_passes_kubernetes_validate() {
    let test = "every_kubernetes_manifest_passes_kubernetes_validate";
    let Some(program) = require_setup_tool(test, "kubernetes-validate/bin/kubernetes-validate")
    else {
        return;
    };
    let dir = repo().join("deploy/kubernetes");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    let output = validate(&program, &manifests);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kubernetes-validate rejects a manifest:\n{stdout}\n{stderr}"
    );
    // Every resource the deployment needs was validated, not skipped.
    for resource in [
        "namespace/connredir",
        "configmap/connredir-config",
        "daemonset/connredir ",
        "daemonset/connredir-scanner",
        "daemonset/connredir-recorder",
        "service/connredir-metrics",
    ] {
        assert!(
            stdout.contains(&format!("passed for resource {resource}")),
            "{resource} was not validated:\n{stdout}\n{stderr}"
        );
    }

    // The validation can fail: a misspelt field is refused.
    let broken = TestDir::new("manifest-broken", None);
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    assert!(daemonset.contains("      hostPID: true\n"));
    let misspelt = broken.0.join("daemonset.yaml");
    std::fs::write(
        &misspelt,
        daemonset.replace("      hostPID: true\n", "      hostPid: true\n"),
    )
    .unwrap();
    let output = validate(&program, &[misspelt]);
    assert!(
        !output.status.success(),
        "a misspelt field passed kubernetes-validate:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn the_configmaps_configuration_passes_connredir_check() {
    let test = "the_configmaps_configuration_passes_connredir_check";
    let Some(program) = require_setup_tool(test, "kubernetes-validate/bin/kubernetes-validate")
    else {
        return;
    };
    // The venv's Python has PyYAML (kubernetes-validate reads YAML with it).
    let python = program.with_file_name("python");
    let dir = TestDir::new("configmap", None);
    let toml = dir.0.join("connredir.toml");
    run(
        "extract connredir.toml from the ConfigMap",
        Command::new(&python)
            .arg("-c")
            .arg(
                "import sys, yaml\n\
                 doc = yaml.safe_load(open(sys.argv[1]))\n\
                 open(sys.argv[2], 'w').write(doc['data']['connredir.toml'])\n",
            )
            .arg(repo().join("deploy/kubernetes/configmap.yaml"))
            .arg(&toml),
    );
    let output = run(
        "connredir check",
        Command::new(workspace_bin("connredir"))
            .arg("check")
            .arg(&toml),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("2 services, 2 rules"),
        "connredir check did not read both services and both rules:\n{stdout}"
    );
}
