//! Compiles the kernel programs in `bpf/` into one BPF object.
//!
//! Each entry file (one per hook family, see `ENTRY_FILES`) is compiled on
//! its own by clang, so each must include everything it uses; bpftool's
//! static linker (`bpftool gen object`) then joins the objects into the one
//! object the engine loads, merging the maps every entry file defines (weak
//! definitions in `bpf/lib/maps.h`).
//!
//! Needs clang, libbpf's headers and bpftool (Debian: clang, libbpf-dev,
//! bpftool; `scripts/setup` installs them). Set `CONNREDIR_CLANG` or
//! `CONNREDIR_BPFTOOL` to use other binaries.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The entry files, one per hook family: each holds its programs (`SEC`)
/// and is compiled on its own.
const ENTRY_FILES: &[&str] = &[
    "connect.c",
    "bind.c",
    "sockops.c",
    "sockopt.c",
    "sk_msg.c",
    "peer.c",
    "release.c",
    "sockname.c",
];

/// The object the crate embeds (see `src/lib.rs`).
const OBJECT: &str = "connredir.bpf.o";

fn main() {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CONNREDIR_CLANG").unwrap_or_else(|_| "clang".into());
    let bpftool = env::var("CONNREDIR_BPFTOOL").unwrap_or_else(|_| "bpftool".into());
    println!("cargo:rerun-if-env-changed=CONNREDIR_CLANG");
    println!("cargo:rerun-if-env-changed=CONNREDIR_BPFTOOL");
    // Directories: cargo looks at every file under them.
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-changed={}", connredir_abi::HEADER_DIR);

    let arch_include = arch_include_dir();
    let mut objects = Vec::new();
    for entry in ENTRY_FILES {
        let source = Path::new("bpf").join(entry);
        let object = out_dir.join(entry).with_extension("o");
        let mut cmd = Command::new(&clang);
        // v3: the atomic fetch-and-add and compare-and-swap of the cut-through.
        cmd.args([
            "-target", "bpf", "-mcpu=v3", "-O2", "-g", "-Wall", "-Werror",
        ]);
        if let Some(dir) = &arch_include {
            cmd.arg(format!("-I{}", dir.display()));
        }
        cmd.arg(format!("-I{}", connredir_abi::HEADER_DIR))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object);
        let status = cmd.status().unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} ({e}) to build {}: install clang and libbpf-dev \
                 (apt-get install clang libbpf-dev)",
                source.display()
            )
        });
        assert!(
            status.success(),
            "clang failed to build {} on its own (see the errors above); an entry file must \
             include every bpf/lib/ header it uses",
            source.display()
        );
        objects.push(object);
    }

    let object = out_dir.join(OBJECT);
    let status = Command::new(&bpftool)
        .args(["gen", "object"])
        .arg(&object)
        .args(&objects)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {bpftool} ({e}) to link {OBJECT} from {}: install bpftool \
                 (apt-get install bpftool)",
                ENTRY_FILES.join(", ")
            )
        });
    assert!(
        status.success(),
        "bpftool gen object failed to link {OBJECT} from {} (see the errors above): a map \
         defined in several entry files must be weak (bpf/lib/maps.h), a global function \
         defined in one only",
        ENTRY_FILES.join(", ")
    );
}

/// The multiarch include directory (`/usr/include/<triplet>`, where Debian
/// keeps `asm/`) of the architecture being built for, or of the host's C
/// compiler when the target's is not there; `None` when neither exists.
fn arch_include_dir() -> Option<PathBuf> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let little = env::var("CARGO_CFG_TARGET_ENDIAN").map_or(true, |e| e == "little");
    let triplet = match arch.as_str() {
        "x86" => "i386-linux-gnu".to_owned(),
        "arm" => "arm-linux-gnueabihf".to_owned(),
        "powerpc64" if little => "powerpc64le-linux-gnu".to_owned(),
        "mips64" if little => "mips64el-linux-gnuabi64".to_owned(),
        other => format!("{other}-linux-gnu"),
    };
    let target = Path::new("/usr/include").join(triplet);
    if target.is_dir() {
        return Some(target);
    }
    let host = Command::new(env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(|t| Path::new("/usr/include").join(t))?;
    host.is_dir().then_some(host)
}
