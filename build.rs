//! Build script: tells the tests whether the shared PyTorch fixtures are present.
//!
//! Tests that need the fixtures carry `#[cfg_attr(not(ditc_fixtures), ignore = "needs ../shared/fixtures")]`,
//! so without them they show as `ignored` in the test summary instead of passing without checking
//! anything. The folder is `../shared/fixtures` beside the repository, or `$DITC_FIXTURES` (a path, relative
//! to the repository root) at build time; its path is handed to the tests as `DITC_FIXTURES_DIR`, so
//! `tests/common` looks exactly where this script looked.
//!
//! Rebuilds: this script reruns only when itself, `$DITC_FIXTURES` or the watched folder changes. A path
//! that does not exist must never be watched (cargo would rerun the script, and rebuild the crate, on
//! every build), so without the fixtures it watches `../shared` when that exists (creating the fixtures
//! inside it then triggers a rerun); with neither, `touch build.rs` after adding the fixtures.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(ditc_fixtures)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DITC_FIXTURES");
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dir = match std::env::var_os("DITC_FIXTURES") {
        Some(d) => root.join(d),
        None => root.join("../shared/fixtures"),
    };
    println!("cargo:rustc-env=DITC_FIXTURES_DIR={}", dir.display());
    if dir.is_dir() {
        println!("cargo:rustc-cfg=ditc_fixtures");
        println!("cargo:rerun-if-changed={}", dir.display());
    } else if let Some(parent) = dir.parent().filter(|p| is_small_folder_to_watch(p, &root)) {
        println!("cargo:rerun-if-changed={}", parent.display());
    }
}

/// The fixtures' parent is worth watching if it exists and is not the repository or a folder above it
/// (cargo scans a watched folder recursively: the repository's `target/` or a whole workspace of
/// checkouts would make every build slow).
fn is_small_folder_to_watch(parent: &Path, root: &Path) -> bool {
    let (Ok(parent), Ok(root)) = (parent.canonicalize(), root.canonicalize()) else {
        return false;
    };
    parent.is_dir() && !root.starts_with(&parent)
}
