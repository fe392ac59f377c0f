//! The `nodemesh` binary: see `nodemesh --help`.
fn main() -> std::process::ExitCode {
    nodemesh::main()
}
