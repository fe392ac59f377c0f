//! nodemesh: a service mesh for Kubernetes with one proxy per node.
//!
//! This crate is the `nodemesh` binary's command line and nothing else: it
//! parses the flags and hands each command to the crate that does it —
//! `agent` and `cleanup` to `nodemesh-dataplane` (the node agent),
//! `identity` to `nodemesh-identity` (the signing service), `install` and
//! `uninstall` to `nodemesh-cli` (the operator's commands). Those share
//! only `nodemesh-core`; see docs/architecture.md.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use nodemesh_cli::{check, dashboard, edges, install, stat, tap, term, top};
use nodemesh_core::config::ConfigErrors;
use nodemesh_dataplane::config::{AgentArgs, AgentConfig};
use nodemesh_identity::{IdentityArgs, IdentityConfig};
use tracing::{error, level_filters::LevelFilter};
use tracing_subscriber::EnvFilter;

/// Exit codes: success, failure, bad flags or configuration (clap uses 2
/// as well).
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "nodemesh",
    version,
    about = "A service mesh for Kubernetes with one proxy per node",
    long_about = "nodemesh meshes the pods labelled nodemesh.io/mesh=enabled: eBPF programs steer \
their TCP connections into one proxy per node, which relays them and counts what passes.\n\n\
Run `nodemesh agent` on every node (as root: it loads eBPF and enters pod namespaces)."
)]
pub struct Cli {
    /// What to log: a level (error, warn, info, debug, trace) or tracing
    /// directives like "info,nodemesh_dataplane::proxy=debug".
    #[arg(
        long,
        global = true,
        env = "NODEMESH_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log_level: String,

    /// Log as human-readable text or as JSON lines.
    #[arg(long, global = true, env = "NODEMESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent: load eBPF, capture the node's meshed pods, proxy
    /// their connections, serve /metrics on :4191.
    Agent(Box<AgentArgs>),
    /// Run the identity service: sign workload certificates for agents
    /// (service-account token checked with the API server; only for pods
    /// on the agent's own node).
    Identity(Box<IdentityArgs>),
    /// Print the Kubernetes manifests that install nodemesh:
    /// `nodemesh install | kubectl apply -f -`.
    Install(Box<install::InstallArgs>),
    /// Print what removes an installation: `nodemesh uninstall | kubectl
    /// delete -f -`. Each agent detaches its eBPF programs as it stops.
    Uninstall {
        /// The namespace nodemesh was installed in.
        #[arg(long, default_value = "nodemesh", value_name = "NAME")]
        namespace: String,
    },
    /// Golden metrics per workload (success rate, requests per second,
    /// latency percentiles, TCP connections), merged from agents' sliding
    /// windows (no Prometheus), every node's, through the API server
    /// (ClusterRole nodemesh-viewer): `nodemesh stat deploy -n shop`.
    Stat(Box<stat::StatArgs>),
    /// A web UI with live golden metrics (namespaces, workloads with
    /// sparklines, a workload's peers, edges and top paths, live requests),
    /// served by this process on 127.0.0.1:50750 from assets in the binary;
    /// it reads the agents through the API server as the kubeconfig's user.
    Dashboard(Box<dashboard::DashboardArgs>),
    /// Who talked to whom in the last 10 minutes and how securely (mTLS,
    /// node-local, or plaintext), with both identities, from what the
    /// servers' agents saw (nodemesh-viewer): `nodemesh edges deploy -n shop`.
    Edges(Box<edges::EdgesArgs>),
    /// Check a cluster before installing (`--pre`: version, RBAC, this
    /// machine's kernel BTF, cgroup v2, bpffs) or after (agents ready and
    /// current, identity service, certificate validity, capture errors, the
    /// aggregated API, each agent's eBPF and certificates): one line per
    /// check with a hint; exit code 1 if any fails.
    Check(Box<check::CheckArgs>),
    /// Live requests as they happen (method, authority, path, status,
    /// latency, both identities; never headers or bodies), filtered by the
    /// agents, from every node (ClusterRole nodemesh-tapper):
    /// `nodemesh tap deploy/web -n shop`.
    Tap(Box<tap::TapArgs>),
    /// The busiest paths of a workload, live (method, path, count,
    /// success, best and worst latency), from the agents' taps
    /// (nodemesh-viewer).
    Top(Box<top::TopArgs>),
    /// Detach the mesh's eBPF programs from this node and remove everything
    /// pinned (refused while an agent runs).
    Cleanup {
        /// The agent's --bpffs directory.
        #[arg(
            long,
            env = "NODEMESH_BPFFS",
            default_value = "/sys/fs/bpf/nodemesh",
            value_name = "PATH"
        )]
        bpffs: PathBuf,
    },
}

/// Parses the command line and runs it; the binary's whole `main`.
pub fn main() -> ExitCode {
    ExitCode::from(run(Cli::parse()))
}

/// A command's failure, its text escaped (it may carry what an agent or
/// the API server said): exit code 1.
fn failed(e: impl std::fmt::Display) -> u8 {
    eprintln!("error: {}", term::printable(&e.to_string()));
    EXIT_FAILURE
}

/// A command's output, escaped but for its lines (what agents said is
/// shown, never obeyed by the terminal).
fn shown(text: &str) -> u8 {
    print!("{}", term::printable_lines(text));
    EXIT_OK
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> u8 {
    let ebpf_log_level = match init_tracing(&cli.log_level, &cli.log_format) {
        Ok(level) => level,
        Err(e) => {
            eprintln!("error: --log-level {:?}: {e}", cli.log_level);
            return EXIT_USAGE;
        }
    };
    match cli.command {
        Command::Agent(args) => run_agent(&args, ebpf_log_level),
        Command::Identity(args) => run_identity(&args),
        Command::Install(args) => print_or_fail(install::render(&args)),
        Command::Uninstall { namespace } => print_or_fail(install::uninstall(&namespace)),
        Command::Dashboard(args) => match dashboard::run(&args) {
            Ok(()) => EXIT_OK,
            Err(e) => failed(e),
        },
        Command::Edges(args) => match edges::run(&args) {
            Ok(text) => shown(&text),
            Err(e) => failed(e),
        },
        Command::Check(args) => {
            let (text, ok) = check::run(&args);
            print!("{}", term::printable_lines(&text));
            if ok { EXIT_OK } else { EXIT_FAILURE }
        }
        Command::Top(args) => match top::run(&args) {
            Ok(()) => EXIT_OK,
            Err(e @ tap::TapError::Resource(_)) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
            Err(e) => failed(e),
        },
        Command::Tap(args) => match tap::run(&args) {
            Ok(()) => EXIT_OK,
            Err(e @ tap::TapError::Resource(_)) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
            Err(e) => failed(e),
        },
        Command::Stat(args) => match stat::run(&args) {
            Ok(text) => shown(&text),
            Err(e @ (stat::StatError::Window(_) | stat::StatError::FromAndTo)) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
            Err(e) => failed(e),
        },
        Command::Cleanup { bpffs } => match nodemesh_dataplane::redirect::cleanup(&bpffs) {
            Ok(report) if report.removed => {
                println!(
                    "removed nodemesh eBPF state at {} ({} captured pods detached)",
                    bpffs.display(),
                    report.pod_links
                );
                EXIT_OK
            }
            Ok(_) => {
                println!("nothing to remove at {}", bpffs.display());
                EXIT_OK
            }
            Err(e) => {
                eprintln!("error: {}", chain(&e));
                EXIT_FAILURE
            }
        },
    }
}

fn print_or_fail(rendered: Result<String, ConfigErrors>) -> u8 {
    match rendered {
        Ok(text) => {
            print!("{text}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
    }
}

fn run_agent(args: &AgentArgs, ebpf_log_level: u8) -> u8 {
    let cfg = match AgentConfig::try_from(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match nodemesh_dataplane::main(cfg, ebpf_log_level) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let e = chain(&e);
            error!(error = %e, "agent failed");
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

fn run_identity(args: &IdentityArgs) -> u8 {
    let cfg = match IdentityConfig::try_from(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match nodemesh_identity::main(cfg) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let e = chain(&e);
            error!(error = %e, "identity service failed");
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

/// An error and its causes, "outer: inner: innermost".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Most messages already quote their source.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Installs the log subscriber (which also receives `log` records, such as
/// the eBPF programs' via aya-log). Returns the aya-log level the programs
/// should log at: what the filter lets through for their target
/// (`nodemesh_ebpf`), 0 off … 5 trace, so they never emit records that
/// would be dropped.
fn init_tracing(filter: &str, format: &str) -> Result<u8, String> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(filter)
        .map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| e.to_string())?;
    use tracing::{Level, enabled};
    Ok(if enabled!(target: "nodemesh_ebpf", Level::TRACE) {
        5
    } else if enabled!(target: "nodemesh_ebpf", Level::DEBUG) {
        4
    } else if enabled!(target: "nodemesh_ebpf", Level::INFO) {
        3
    } else if enabled!(target: "nodemesh_ebpf", Level::WARN) {
        2
    } else if enabled!(target: "nodemesh_ebpf", Level::ERROR) {
        1
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
