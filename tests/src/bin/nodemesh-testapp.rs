//! The test bed's apps as a container image's entrypoint, for the real
//! node: `nodemesh-testapp tcp|http|grpc [--do REQUEST-JSON]... [--control PORT]`
//! (see `nodemesh_tests::apps::standalone`).
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    nodemesh_tests::apps::standalone(&args)
}
