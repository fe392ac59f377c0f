//! `cargo xtask …`: the project's own set-up and orchestration. It never
//! hides the build: `cargo build` alone builds everything once `setup` ran.
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodemesh development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (rust-src, bpf-linker, apt
    /// packages). Idempotent and quick when everything is present.
    Setup,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
    }
}
