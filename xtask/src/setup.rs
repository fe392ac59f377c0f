//! `cargo xtask setup`: everything a fresh machine of this kind needs before
//! `cargo build` works, installed idempotently and reported step by step.
//!
//! - apt packages the tests use (iproute2; etcd and Go to build and run a
//!   real kube-apiserver);
//! - `rust-src` for the pinned toolchain (the eBPF object is built with
//!   `-Z build-std=core`);
//! - `bpf-linker`, built against the pinned toolchain's own libLLVM (Debian's
//!   LLVM is too old), in a project-owned prefix outside `target/` so
//!   `cargo clean` does not throw it away. The facts behind it: docs/datapath.md;
//! - `cargo-deny`, pinned, in the same prefix (the dependency checks of
//!   `cargo xtask test`, deny.toml);
//! - Kubernetes v1.20.2 (kube-apiserver for the tests' API server; kubelet,
//!   controller-manager, scheduler and kube-proxy for the real node) built
//!   once from Debian's source package (the registries here ship no binary;
//!   see xtask/scripts/build-kube.sh), cached next to bpf-linker; the real
//!   node's containerd, runc and CNI plugins come from Debian.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo-deny `cargo xtask test` checks the dependency graph with
/// (deny.rs names its database directory after this version's scheme).
const CARGO_DENY_VERSION: &str = "0.20.2";
/// Debian packages the test bed and demo rely on.
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "etcd-server",
    "golang-go",
    // Replaces the Kubernetes tree's vendored reflect2 1.0.1 (see
    // build-kube.sh).
    "golang-github-modern-go-reflect2-dev",
    "rsync",
    "make",
    "ca-certificates",
    // Real clients the tests and benchmarks drive through the mesh.
    "iperf3",
    "wrk",
    // The real node: container runtime, CNI plugins, kube-proxy's tools,
    // and the static busybox its test images are made of.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "busybox-static",
    // What the real-node tests check eBPF attachments with.
    "bpftool",
    // The dashboard's test runs it in a real browser (headless).
    "chromium",
    // A real server-first protocol through the mesh.
    "mariadb-server",
    "mariadb-client",
    // What a pod uses in the tests to knock on an agent's tap port, and
    // the HTTP clients that half-close (`nc -N`, socat) through the mesh.
    "curl",
    "netcat-openbsd",
    "socat",
];
pub use crate::tools::{KUBE_VERSION, kube_bin_dir, tools_dir};

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    apt(APT_PACKAGES)?;
    let toolchain = Toolchain::current()?;
    rust_src(&toolchain)?;
    bpf_linker(&toolchain)?;
    cargo_deny()?;
    kube_components()?;
    println!("setup: done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The Kubernetes components built from source: the API server for every
/// Kubernetes test, the rest for the real node.
pub const KUBE_COMPONENTS: &[&str] = &[
    "kube-apiserver",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
];

fn kube_components() -> Result<()> {
    let out = kube_bin_dir();
    let missing: Vec<&str> = KUBE_COMPONENTS
        .iter()
        .copied()
        .filter(|c| !runs(&out.join(c)))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: Kubernetes v{KUBE_VERSION} components present ({})",
            out.display()
        );
        return Ok(());
    }
    println!(
        "setup: building {} v{KUBE_VERSION} from Debian's source package (once; 2-4 minutes each)",
        missing.join(", ")
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-kube.sh");
    let work = tools_dir().join("kube-build");
    let ok = Command::new("bash")
        .arg(&script)
        .arg(&work)
        .arg(&out)
        .args(&missing)
        .status()
        .context("cannot run build-kube.sh")?
        .success();
    if !ok || missing.iter().any(|c| !runs(&out.join(c))) {
        bail!("building Kubernetes components failed (see the output above)");
    }
    Ok(())
}

/// Install the Debian packages that are missing (none: no apt call at all).
pub fn apt(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("setup: apt packages present ({})", packages.join(" "));
        return Ok(());
    }
    println!("setup: installing apt packages: {}", missing.join(" "));
    let install = |cmd: &mut Command| -> Result<bool> {
        Ok(cmd
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?
            .success())
    };
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    if !install(Command::new("apt-get").args(&args))? {
        // A fresh machine may have no package lists yet.
        println!("setup: apt-get install failed; updating package lists and retrying");
        if !install(Command::new("apt-get").args(["update", "-q"]))? {
            bail!("apt-get update failed");
        }
        if !install(Command::new("apt-get").args(&args))? {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// The toolchain rustup selects here (rust-toolchain.toml).
pub struct Toolchain {
    pub name: String,
    pub sysroot: PathBuf,
    pub llvm_major: String,
}

impl Toolchain {
    fn current() -> Result<Self> {
        let out = |args: &[&str]| -> Result<String> {
            let o = Command::new("rustc")
                .args(args)
                .output()
                .context("cannot run rustc")?;
            if !o.status.success() {
                bail!(
                    "rustc {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let sysroot = PathBuf::from(out(&["--print", "sysroot"])?);
        let verbose = out(&["-vV"])?;
        let llvm_major = verbose
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .context("rustc -vV does not name its LLVM version")?
            .to_string();
        let name = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| {
            sysroot
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        Ok(Self {
            name,
            sysroot,
            llvm_major,
        })
    }

    /// The toolchain's `libLLVM.so.*` (full C API, BPF target included).
    fn libllvm(&self) -> Result<PathBuf> {
        let lib = self.sysroot.join("lib");
        let mut found: Vec<PathBuf> = fs::read_dir(&lib)
            .with_context(|| format!("cannot read {}", lib.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so."))
            })
            .collect();
        found.sort();
        found
            .pop()
            .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
    }
}

fn rust_src(tc: &Toolchain) -> Result<()> {
    let core = tc
        .sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.exists() {
        println!("setup: rust-src present ({})", tc.name);
        return Ok(());
    }
    println!("setup: adding rust-src to toolchain {}", tc.name);
    let ok = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", &tc.name])
        .status()
        .context("cannot run rustup")?
        .success();
    if !ok || !core.exists() {
        bail!(
            "rustup component add rust-src --toolchain {} failed",
            tc.name
        );
    }
    Ok(())
}

fn bpf_linker(tc: &Toolchain) -> Result<()> {
    let prefix = tools_dir();
    let bin = prefix.join("bin/bpf-linker");
    let libllvm = tc.libllvm()?;
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?
        .to_owned();
    let stamp_path = prefix.join("bpf-linker.stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm {}\n",
        libllvm.display()
    );
    let llvm_lib = prefix.join("llvm/lib");
    if bin.exists()
        && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && llvm_lib.join(&soname).exists()
        && runs(&bin)
    {
        println!("setup: bpf-linker present ({})", bin.display());
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (1-2 minutes)",
        libllvm.display()
    );
    fs::create_dir_all(&llvm_lib)?;
    // One link for the linker (-lLLVM), one under the soname for run time
    // (the binary's RUNPATH points here).
    for name in [Path::new("libLLVM.so"), Path::new(&soname)] {
        let link = llvm_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    let ok = Command::new("cargo")
        .args([
            "install",
            "--locked",
            "--force",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            &format!("llvm-{}", tc.llvm_major),
            "--root",
        ])
        .arg(&prefix)
        .env("LLVM_PREFIX", prefix.join("llvm"))
        .status()
        .context("cannot run cargo install")?
        .success();
    if !ok || !runs(&bin) {
        bail!("building bpf-linker failed");
    }
    fs::write(&stamp_path, stamp)?;
    Ok(())
}

/// The cargo-fuzz `cargo xtask fuzz` runs (installed by that command,
/// not by setup: fuzzing is not part of the test suite).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, installed (pinned, in the tools prefix) if missing.
pub fn cargo_fuzz() -> Result<PathBuf> {
    let bin = tools_dir().join("bin/cargo-fuzz");
    cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION, &bin, "1-2 minutes")?;
    Ok(bin)
}

/// Where setup puts cargo-deny.
pub fn cargo_deny_bin() -> PathBuf {
    tools_dir().join("bin/cargo-deny")
}

fn cargo_deny() -> Result<()> {
    cargo_tool(
        "cargo-deny",
        CARGO_DENY_VERSION,
        &cargo_deny_bin(),
        "2-3 minutes",
    )
}

/// `cargo install`s `name@version` into the tools prefix unless `bin`
/// already says it is that version.
fn cargo_tool(name: &str, version: &str, bin: &Path, takes: &str) -> Result<()> {
    let found = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.as_deref() == Some(&format!("{name} {version}")) {
        println!("setup: {name} present ({})", bin.display());
        return Ok(());
    }
    println!("setup: building {name} {version} ({takes})");
    let ok = Command::new("cargo")
        .args([
            "install",
            "--locked",
            "--force",
            &format!("{name}@{version}"),
            "--root",
        ])
        .arg(tools_dir())
        .status()
        .context("cannot run cargo install")?
        .success();
    if !ok || !runs(bin) {
        bail!("building {name} failed");
    }
    Ok(())
}

fn runs(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
