//! The command line as a person gets it wrong: what `connredir` says about
//! arguments it cannot take, and about a `run` that has no scope to run in.

use std::process::{Command, Output};

fn connredir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_connredir"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A state directory with no control socket in it: no engine there.
fn no_engine() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("connredir-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn run_needs_a_command() {
    let out = connredir(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("the following required arguments were not provided")
            && err.contains("<COMMAND>..."),
        "{err}"
    );
}

#[test]
fn run_takes_a_scope_or_a_configuration_not_both() {
    let out = connredir(&[
        "run",
        "--scope",
        "/sys/fs/cgroup/a",
        "--config",
        "a.toml",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("the argument '--scope <CGROUP|UNIT>' cannot be used with '--config <FILE>'"),
        "{err}"
    );
}

#[test]
fn run_with_a_missing_configuration_names_it() {
    let state = no_engine();
    let out = connredir(&[
        "run",
        "--state-dir",
        state.to_str().unwrap(),
        "--config",
        "/nonexistent/connredir.toml",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: cannot read /nonexistent/connredir.toml: No such file or directory (os error 2)\n"
    );
}

#[test]
fn run_without_an_engine_or_a_file_says_what_to_do() {
    if std::path::Path::new("/etc/connredir/connredir.toml").exists() {
        // That file names the scope then; the message cannot appear here.
        eprintln!("/etc/connredir/connredir.toml exists: the no-scope message is not checked");
        return;
    }
    let state = no_engine();
    let out = connredir(&["run", "--state-dir", state.to_str().unwrap(), "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "error: no scope to run in: no `connredir up` is running (no control socket at \
             {}/control.sock) and /etc/connredir/connredir.toml does not exist. Start the layer \
             with `connredir up --config FILE`, or name the scope: `connredir run --scope \
             CGROUP|UNIT -- COMMAND` or `connredir run --config FILE -- COMMAND`\n",
            state.display()
        )
    );
}

#[test]
fn doctor_refuses_unknown_options_and_teaches_in_its_help() {
    let out = connredir(&["doctor", "--yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected argument '--yaml'"),
        "{}",
        stderr(&out)
    );
    let help = connredir(&["doctor", "--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("Examples:") && text.contains("connredir doctor --config"),
        "{text}"
    );
}

#[test]
fn every_subcommand_that_acts_shows_an_example_in_its_help() {
    for command in ["run", "up", "check", "doctor", "demo"] {
        let help = connredir(&[command, "--help"]);
        assert!(help.status.success(), "{command}");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            text.contains(&format!("connredir {command}")),
            "{command} --help shows no example:\n{text}"
        );
    }
}

#[test]
fn rule_add_refuses_an_executable_path_without_an_engine() {
    let state = no_engine();
    let out = connredir(&[
        "rule",
        "add",
        "--state-dir",
        state.to_str().unwrap(),
        "--action",
        "block",
        "--executable",
        "/usr/bin/curl",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: invalid rule: executable \"/usr/bin/curl\": give the executable's file name (\"curl\"), not a path")
            && !err.contains("control.sock"),
        "{err}"
    );
}
