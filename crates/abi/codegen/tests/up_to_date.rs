//! The committed bindings are what the headers give: a header changed
//! without regenerating fails here, with the command that fixes it.

use connredir_abi_codegen::python::{generate_python, python_output_path};
use connredir_abi_codegen::{generate, output_path, BINDINGS, COMMAND};

#[test]
fn committed_bindings_match_the_headers() {
    for binding in &BINDINGS {
        let path = output_path(binding);
        let expected = generate(binding).unwrap_or_else(|e| panic!("{e}"));
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `{COMMAND}`", path.display()));
        assert!(
            committed == expected,
            "{} is not what include/connredir/{} gives: run `{COMMAND}` and commit the result",
            path.display(),
            binding.header
        );
    }
}

#[test]
fn committed_python_abi_matches_the_header() {
    let path = python_output_path();
    let expected = generate_python().unwrap_or_else(|e| panic!("{e}"));
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `{COMMAND}`", path.display()));
    assert!(
        committed == expected,
        "{} is not what include/connredir/uapi.h gives: run `{COMMAND}` and commit the result",
        path.display()
    );
}
