//! `cargo xtask …`: the project's own set-up and orchestration. It never
//! hides the build: `cargo build` alone builds everything once `setup` ran.
mod deny;
mod image;
mod layers;
mod setup;
mod tools;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodemesh development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src,
    /// bpf-linker, cargo-deny, Kubernetes components). Idempotent and quick when everything is present.
    Setup,
    /// Set up, then run the whole suite: formatting, clippy (host and eBPF
    /// target), the dependency rules, unit tests, the in-process proxy
    /// tests, the end-to-end tests on the netns bed, and the real-node tier
    /// (the images on a real kubelet and containerd). Needs root.
    Test {
        /// Skip cargo fmt, clippy, the layer rules and cargo-deny.
        #[arg(long)]
        no_lint: bool,
        /// Passed to the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check the dependency rules of docs/architecture.md: crates one way,
    /// data-plane modules pointing down only, unsafe only where allowed.
    Layers,
    /// Set up, build the release agent, and run it on a simulated node with
    /// a few pods; prints what the proxy saw per pod, then cleans up.
    Demo,
    /// Build the container images (no container engine needed): the
    /// nodemesh image `nodemesh install` references, and the test bed's app
    /// and pause images, as OCI archives in target/images.
    Image,
    /// A real Kubernetes node on this machine (etcd, API server,
    /// controller-manager, scheduler, kube-proxy, containerd, kubelet) in
    /// namespaces of its own, with the images imported: `up` starts it and
    /// prints how to use it, `down` removes all of it.
    Node {
        #[arg(value_enum)]
        action: NodeAction,
    },
    /// Set up, build in release, and print the benchmark tables: same node
    /// (direct vs fast path on/off), then cross-node (direct vs mTLS tunnel).
    Bench {
        /// Flags for the benchmark (--round-trips N, --size BYTES,
        /// --bulk-mib N, --repeats N; --peers ZTUNNEL: only the cross-node
        /// comparison with a ztunnel binary, e.g. ../shared/peers/ztunnel).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every fuzz target (tests/fuzz: the pod file, Kubernetes objects,
    /// protocol detection, the CONNECT request, the wire types, annotation
    /// values and policies) for `--time` seconds each, with cargo-fuzz on
    /// the nightly toolchain; a crash stops it with the input saved under
    /// tests/fuzz/artifacts (make it a unit test).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Set up, build in release, and run the chaos table: a victim's
    /// steady wrk load while an attacker pod (meshed, and unmeshed) runs
    /// each attack on the same nodes, the agents under a 512 MiB memory
    /// limit; prints the victim's latency and errors per attack.
    Chaos,
    /// Set up, build in release, and soak one agent: 10 000 connections at
    /// once (tunnel, inbound, same-node), a minute of churn, then idle;
    /// prints RSS, open files, CPU and client errors per phase.
    Soak {
        /// Flags for the soak (--connections N, --churn-seconds N).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NodeAction {
    Up,
    Down,
}

fn node(action: NodeAction) -> Result<()> {
    match action {
        NodeAction::Up => {
            setup::run()?;
            let images = build_images("release")?;
            release_build()?;
            run_bin(
                "nodemesh-node",
                &["up".into(), "--images".into(), images.display().to_string()],
            )
        }
        NodeAction::Down => {
            release_build()?;
            run_bin("nodemesh-node", &["down".into()])
        }
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { no_lint, args } => test(no_lint, &args),
        Task::Layers => layers::run(&workspace()),
        Task::Demo => {
            setup::run()?;
            let bin = release_build()?;
            run_bin(
                "nodemesh-demo",
                &["--agent".into(), bin.display().to_string()],
            )
        }
        Task::Image => {
            let dir = build_images("release")?;
            println!(
                "xtask: push with e.g. `skopeo copy oci-archive:{}/nodemesh-{}.oci.tar docker://REGISTRY/nodemesh:{}`",
                dir.display(),
                image::VERSION,
                image::VERSION
            );
            Ok(())
        }
        Task::Node { action } => node(action),
        Task::Fuzz { time, targets } => fuzz(time, &targets),
        Task::Chaos => {
            setup::run()?;
            let bin = release_build()?;
            run_bin(
                "nodemesh-chaos",
                &["--agent".into(), bin.display().to_string()],
            )
        }
        Task::Soak { args } => {
            setup::run()?;
            let bin = release_build()?;
            let mut all = vec!["--agent".into(), bin.display().to_string()];
            all.extend(args);
            run_bin("nodemesh-soak", &all)
        }
        Task::Bench { args } => {
            setup::run()?;
            let bin = release_build()?;
            let mut all = vec!["--agent".into(), bin.display().to_string()];
            all.extend(args);
            run_bin("nodemesh-bench", &all)
        }
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(env_cargo())
        .args(args)
        .env(REQUIRE_EBPF, "1")
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

/// Makes agent/dataplane/build.rs fail without bpf-linker rather than
/// build an agent with no eBPF programs.
const REQUIRE_EBPF: &str = "NODEMESH_REQUIRE_EBPF";

fn env_cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (network namespaces, cgroups, BPF); run it as root");
    }
    Ok(())
}

fn test(no_lint: bool, args: &[String]) -> Result<()> {
    setup::run()?;
    if !no_lint {
        cargo(&["fmt", "--all", "--", "--check"])?;
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
        clippy_ebpf()?;
        layers::run(&workspace())?;
        deny::run(&workspace())?;
    }
    require_root("the end-to-end tests")?;
    // The real-node tier runs the images, built from the test build's
    // binaries (no second, release build).
    let images = build_images("dev")?;
    let mut test_args = vec!["test"];
    if !args.is_empty() {
        test_args.push("--");
        test_args.extend(args.iter().map(String::as_str));
    }
    println!("xtask: cargo {}", test_args.join(" "));
    let status = Command::new(env_cargo())
        .args(&test_args)
        .env(REQUIRE_EBPF, "1")
        .env("NODEMESH_IMAGES", &images)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed", test_args.join(" "));
    }
    Ok(())
}

/// The fuzz targets, in tests/fuzz/Cargo.toml's order.
const FUZZ_TARGETS: &[&str] = &[
    "pod_file",
    "kube_objects",
    "detect",
    "connect_request",
    "wire",
    "annotations",
];

fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
    let cargo_fuzz = setup::cargo_fuzz()?;
    for t in only {
        if !FUZZ_TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?}: {}", FUZZ_TARGETS.join(", "));
        }
    }
    let fuzz_dir = workspace().join("tests/fuzz");
    let started = std::time::Instant::now();
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        println!("xtask: fuzzing {target} for {seconds}s");
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let status = Command::new("rustup")
            .args(["run", "nightly"])
            .arg(&cargo_fuzz)
            .args(["fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // Its own target dir: another toolchain and flags.
            .env("CARGO_TARGET_DIR", target_dir().join("fuzz"))
            .status()
            .context("cannot run cargo fuzz")?;
        if !status.success() {
            bail!(
                "fuzz target {target} found a crash: its input is under {}; make it a unit test",
                fuzz_dir.join("artifacts").join(target).display()
            );
        }
    }
    println!(
        "xtask: every fuzz target ran {seconds}s without a crash ({:.0}s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Clippy on the eBPF crate, for its own target.
fn clippy_ebpf() -> Result<()> {
    let args = [
        "clippy",
        "--package",
        "nodemesh-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ];
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(env_cargo())
        .args(args)
        // -Z build-std on the pinned stable toolchain, as agent/build.rs does.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir().join("ebpf-clippy"))
        .status()
        .context("cannot run cargo clippy")?;
    if !status.success() {
        bail!("clippy on the eBPF crate failed");
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the release agent and the demo/bench drivers; returns the agent.
fn release_build() -> Result<PathBuf> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "nodemesh",
        "--package",
        "nodemesh-tests",
        "--bins",
    ])?;
    Ok(target_dir().join("release/nodemesh"))
}

/// Builds the binaries (`profile`: `release`, or `dev` for the tests) and
/// writes every image's archive to target/images; returns that directory.
fn build_images(profile: &str) -> Result<PathBuf> {
    cargo(&[
        "build",
        "--profile",
        profile,
        "--package",
        "nodemesh",
        "--package",
        "nodemesh-tests",
        "--bin",
        "nodemesh",
        "--bin",
        "nodemesh-testapp",
    ])?;
    let bins = target_dir().join(if profile == "dev" { "debug" } else { profile });
    let dir = target_dir().join("images");
    for image in image::images(&bins)? {
        let out = image::archive_path(&dir, &image);
        image.write_archive(&out)?;
        let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        println!(
            "xtask: image {} → {} ({:.1} MiB)",
            image.reference(),
            out.display(),
            size as f64 / (1 << 20) as f64
        );
    }
    Ok(dir)
}

fn run_bin(name: &str, args: &[String]) -> Result<()> {
    require_root(name)?;
    let bin = target_dir().join("release").join(name);
    let status = Command::new(&bin)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("{name} failed");
    }
    Ok(())
}
