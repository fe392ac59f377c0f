//! Builds the eBPF object (ebpf/programs) for the bpfel target and leaves it
//! in OUT_DIR, where `redirect` embeds it. Needs the toolchain's `rust-src`
//! and `bpf-linker`; `cargo xtask setup` installs both.
//!
//! Without bpf-linker (a fresh checkout: `cargo test -p nodemesh-dataplane`
//! needs no eBPF), the object is left empty with a warning, and an agent
//! built so refuses to install capture, saying why. Every build of
//! `cargo xtask` sets `NODEMESH_REQUIRE_EBPF`: there a missing bpf-linker is
//! an error, never an agent without its programs.
// aya-build's inner cargo reads its settings from this process's
// environment, which only `set_var` (unsafe since edition 2024) changes.
#![allow(unsafe_code)]
use std::{env, path::PathBuf};

fn main() {
    if let Err(e) = build() {
        // A readable error beats a wall of cargo:warning lines.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

// `tools_dir()`: where `cargo xtask setup` keeps bpf-linker.
include!("../../xtask/src/tools.rs");

fn build() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NODEMESH_TOOLS");
    println!("cargo:rerun-if-env-changed=XDG_CACHE_HOME");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest
        .ancestors()
        .nth(2)
        .expect("agent/dataplane/ is two levels below the workspace");
    let programs = workspace.join("ebpf/programs");
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("ebpf/common").display()
    );

    // rustc calls `bpf-linker` by name for the bpf targets.
    let tools_bin = tools_dir().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = vec![tools_bin.clone()];
    dirs.extend(env::split_paths(&path));
    // Built again when the linker changes, or once it is installed (a path
    // that does not exist makes cargo run this again every time, which is
    // when NODEMESH_REQUIRE_EBPF is read: no rerun-if-env-changed for it,
    // so `cargo xtask` and plain cargo share one build).
    let linker = dirs
        .iter()
        .map(|d| d.join("bpf-linker"))
        .find(|l| l.is_file());
    println!(
        "cargo:rerun-if-changed={}",
        linker
            .clone()
            .unwrap_or_else(|| tools_bin.join("bpf-linker"))
            .display()
    );
    // A fuzz build (`cargo fuzz`, nightly, sanitizers) never loads them.
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = PathBuf::from(env::var("OUT_DIR")?).join("nodemesh-ebpf");
        std::fs::write(&out, b"")?;
        return Ok(());
    }
    if linker.is_none() {
        let missing = format!(
            "bpf-linker is not installed (looked in {} and PATH): run `cargo xtask setup`",
            tools_bin.display()
        );
        if env::var_os("NODEMESH_REQUIRE_EBPF").is_some() {
            anyhow::bail!(missing);
        }
        println!(
            "cargo:warning={missing}; built without the eBPF programs (enough for `cargo test -p nodemesh-dataplane`, not for an agent)"
        );
        let out = PathBuf::from(env::var("OUT_DIR")?).join("nodemesh-ebpf");
        std::fs::write(&out, b"")?;
        return Ok(());
    }
    let joined = env::join_paths(dirs)?;
    // SAFETY: build scripts are single-threaded here; the inner cargo that
    // aya-build spawns inherits these.
    unsafe {
        env::set_var("PATH", joined);
        // `-Z build-std=core` on the pinned stable toolchain.
        env::set_var("RUSTC_BOOTSTRAP", "1");
        // aya-build turns every line the inner cargo prints into a
        // cargo:warning; keep only real diagnostics.
        env::set_var("CARGO_TERM_QUIET", "true");
    }
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    let root_dir = programs.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nodemesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
