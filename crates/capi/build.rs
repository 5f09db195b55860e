//! Gives the shared library its soname, so that programs linked against
//! `libconnredir.so` load `libconnredir.so.MAJOR` and a later incompatible
//! release can be installed beside it.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libconnredir.so.{major}");
}
