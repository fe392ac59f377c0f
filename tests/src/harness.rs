//! The `main` of every test binary: runs the tests, or, when the test bed
//! started this binary as a pod application or as the agent, plays that
//! part instead.
pub use libtest_mimic::{Arguments, Trial};

use crate::{agent, apps};

/// Runs `trials`, or the role named by the first argument.
pub fn main(trials: Vec<Trial>) -> ! {
    play_role();
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    crate::kube::Cluster::teardown_shared();
    conclusion.exit()
}

/// If the test bed started this binary as a pod application or as the
/// agent, plays that part and exits; otherwise returns. Every binary that
/// uses the test bed calls this first thing in `main`.
pub fn play_role() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(apps::ROLE) => apps::main(args.get(2).map(String::as_str)),
        Some(agent::ROLE) => {
            use clap::Parser;
            let argv = std::iter::once("nodemesh".to_owned()).chain(args[2..].iter().cloned());
            std::process::exit(nodemesh::run(nodemesh::Cli::parse_from(argv)).into())
        }
        _ => {}
    }
}

/// `trials![a, b, c]`: one trial per test function, named after it.
#[macro_export]
macro_rules! trials {
    ($($test:path),* $(,)?) => {
        vec![$(
            $crate::harness::Trial::test(stringify!($test), || {
                $test();
                Ok(())
            })
        ),*]
    };
}
