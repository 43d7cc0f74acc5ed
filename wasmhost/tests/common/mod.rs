//! Shared by the integration tests that load a built `.wasm`.

use std::path::PathBuf;

/// The module at `$var`, else `target/wasm32-wasip1/release/<file>`; panics naming the make
/// target that builds it when missing.
pub fn built_wasm(var: &str, file: &str, make_target: &str) -> Vec<u8> {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/wasm32-wasip1/release")
            .join(file)
    });
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{} missing ({e}); run `make {make_target}` first",
            path.display()
        )
    })
}
