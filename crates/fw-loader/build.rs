//! Builds the kernel crate (crates/fw-ebpf) for `bpfel-unknown-none` with the nightly
//! toolchain through aya-build, and leaves the object at `$OUT_DIR/fw-ebpf` for
//! `include_bytes_aligned!`.
//!
//! fw-ebpf is outside the workspace (so host builds never compile it), which is also why this
//! script changes into its directory first: aya-build runs `cargo build --package fw-ebpf` in
//! the current directory, and there cargo finds fw-ebpf as a package of its own. Without a
//! build-dependency on fw-ebpf, cargo does not know when to rerun this script, so the inputs
//! are listed explicitly (fw-ebpf's sources and manifest, and fw-common, which it compiles).
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for tooling that only needs the host code, e.g.
//! rust-analyzer): an empty object is embedded and `Dataplane::load` reports
//! `Error::ObjectNotBuilt`.

use std::path::{Path, PathBuf};
use std::{env, fs};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let crates = manifest_dir.parent().context("fw-loader has no parent directory")?;
    let ebpf_dir = crates.join("fw-ebpf");
    let common_dir = crates.join("fw-common");
    for input in [
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("Cargo.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    let ebpf_src = ebpf_dir.join("src");
    let ebpf_src = ebpf_src.to_str().context("fw-ebpf path is not UTF-8")?;

    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    share_nested_target_dir(&out_dir)?;

    env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("cannot enter {}", ebpf_dir.display()))?;
    // `root_dir` only feeds aya-build's rerun-if-changed; the sources (not the directory,
    // which may hold a target/ from a manual build) are what matters.
    aya_build::build_ebpf(
        [Package { name: "fw-ebpf", root_dir: ebpf_src, ..Default::default() }],
        Toolchain::default(),
    )?;

    // With AYA_BUILD_SKIP aya-build builds nothing: embed an empty object (not one left from an
    // earlier build, which could be stale) so the crate compiles and loading says why it fails.
    let skipped =
        env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let object = out_dir.join("fw-ebpf");
    if skipped || !object.exists() {
        fs::write(&object, []).with_context(|| format!("cannot write {}", object.display()))?;
    }
    Ok(())
}

/// aya-build gives the nested cargo the target directory `$OUT_DIR/aya-build/target/fw-ebpf`,
/// and every build-script unit has its own `$OUT_DIR`: `cargo build`, `cargo test` and
/// `cargo clippy` of differently selected packages each get one, and each would compile
/// `core` and the eBPF crate from scratch (most of a minute). Pointing `$OUT_DIR/aya-build` at
/// one directory per target directory (`<target>/fw-ebpf-build`) lets them share that work;
/// the nested cargo locks it, so concurrent builds wait for each other instead of colliding.
/// The object itself is still copied into each `$OUT_DIR`. When `$OUT_DIR` is not laid out as
/// `<target>/<profile>/build/<unit>/out`, nothing is shared and aya-build works as usual.
fn share_nested_target_dir(out_dir: &Path) -> anyhow::Result<()> {
    let build = out_dir.parent().and_then(Path::parent);
    let Some(target) = build
        .filter(|b| b.file_name().is_some_and(|n| n == "build"))
        .and_then(Path::parent)
        .and_then(Path::parent)
    else {
        return Ok(());
    };
    let shared = target.join("fw-ebpf-build");
    fs::create_dir_all(&shared).with_context(|| format!("cannot create {}", shared.display()))?;
    let link = out_dir.join("aya-build");
    match fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(&link).ok().as_deref() == Some(shared.as_path()) {
                return Ok(());
            }
            fs::remove_file(&link)
        }
        Ok(m) if m.is_dir() => fs::remove_dir_all(&link),
        Ok(_) => fs::remove_file(&link),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("cannot replace {}", link.display()))?;
    std::os::unix::fs::symlink(&shared, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), shared.display()))
}
