//! Rewrites connredir-abi's generated bindings from its C headers, and the
//! Python package's `_abi.py` from the `uapi.h` bindings.

use std::process::ExitCode;

fn main() -> ExitCode {
    for binding in &connredir_abi_codegen::BINDINGS {
        let path = connredir_abi_codegen::output_path(binding);
        let text = match connredir_abi_codegen::generate(binding) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    let path = connredir_abi_codegen::python::python_output_path();
    let text = match connredir_abi_codegen::python::generate_python() {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {}", path.display());
    ExitCode::SUCCESS
}
