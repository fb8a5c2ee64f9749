//! Compile-fail tests of `#[lora]`: each file in `tests/ui/` makes one mistake, and its `.stderr`
//! is what the user sees. Regenerate with `TRYBUILD=overwrite cargo test --test macro_ui`, then
//! read the diff.

#[test]
fn ui() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
