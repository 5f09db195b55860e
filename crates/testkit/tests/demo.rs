//! `connredir demo` prints its report and nothing else: the engine's and
//! the proxies' log lines stay out of it, or go whole to the `--log` file.

use std::process::Command;

use connredir_testkit::{require_privileges, require_program, workspace_bin};

#[test]
fn the_demo_prints_its_report_only_and_logs_to_a_file_when_asked() {
    if !require_privileges("demo") || require_program("demo", "curl").is_none() {
        return;
    }
    let out = Command::new(workspace_bin("connredir"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stderr, "", "log lines beside the report");
    assert!(
        stdout.contains("chain [scanner → recorder], verdict allow")
            && stdout.ends_with("torn down: programs detached, proxies stopped, cgroups removed\n"),
        "{stdout}"
    );

    let log = std::env::temp_dir().join(format!("connredir-demo-{}.log", std::process::id()));
    let out = Command::new(workspace_bin("connredir"))
        .arg("demo")
        .arg("--log")
        .arg(&log)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    // The engine's lines and each proxy's, none overwriting another.
    assert!(
        logged.contains("service registered id=service 1 name=scanner")
            && logged.contains("programs detached"),
        "{logged}"
    );
    let proxies = logged
        .lines()
        .filter(|l| l.contains("connredir_proxy"))
        .count();
    assert!(proxies >= 2, "{logged}");
}
