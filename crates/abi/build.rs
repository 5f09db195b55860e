//! Generates the Rust side of the ABI from `include/connredir/abi.h`, so the
//! record layout, map layouts and constants are written down exactly once.

use std::{env, path::PathBuf};

fn main() {
    let header = "include/connredir/abi.h";
    println!("cargo:rerun-if-changed={header}");
    let bindings = bindgen::Builder::default()
        .header(header)
        .clang_arg("-I/usr/include/x86_64-linux-gnu")
        .allowlist_item("(connredir|CONNREDIR)_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_eq(true)
        .impl_debug(true)
        .prepend_enum_name(false)
        .layout_tests(true)
        .generate()
        .expect("bindgen could not read include/connredir/abi.h");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("abi.rs");
    bindings.write_to_file(out).expect("write abi.rs");
}
