//! Compiles the kernel programs in `bpf/` into one BPF object with clang.
//!
//! Needs clang and libbpf's headers (Debian: clang, libbpf-dev). Set
//! `CONNREDIR_CLANG` to use another clang binary.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("connredir.bpf.o");
    let clang = env::var("CONNREDIR_CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CONNREDIR_CLANG");
    println!("cargo:rerun-if-changed=bpf");
    println!(
        "cargo:rerun-if-changed={}/connredir/abi.h",
        connredir_abi::HEADER_DIR
    );

    let status = Command::new(&clang)
        // v3: the atomic fetch-and-add and compare-and-swap of the cut-through.
        .args(["-target", "bpf", "-mcpu=v3", "-O2", "-g", "-Wall", "-Werror"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-I{}", connredir_abi::HEADER_DIR))
        .args(["-c", "bpf/connredir.bpf.c", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {clang} ({e}): install clang and libbpf-dev (apt-get install clang libbpf-dev)")
        });
    assert!(
        status.success(),
        "clang failed to build bpf/connredir.bpf.c (see the errors above)"
    );
}
