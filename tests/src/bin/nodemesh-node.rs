//! `nodemesh-node up|down`: a real Kubernetes node on this machine (what
//! `cargo xtask node up|down` runs). See `nodemesh_tests::realnode`.
use std::{path::PathBuf, process::ExitCode};

use nodemesh_tests::realnode::{RealNode, RealNodeOptions};

const USAGE: &str = "usage: nodemesh-node up --images DIR | nodemesh-node down

up    starts etcd, kube-apiserver, controller-manager, scheduler, kube-proxy,
      containerd and the kubelet (v1.20.2) as node `nodemesh-dev` in its own
      network and mount namespaces, imports the images in DIR
      (`cargo xtask image`), waits until the node is Ready, and prints how to
      use it. It keeps running until `down`.
down  stops all of it and removes what it made (also after a crash).";

const NAME: &str = "nodemesh-dev";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => {
            let Some(images) = args
                .iter()
                .position(|a| a == "--images")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
            else {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            };
            up(images)
        }
        Some("down") => {
            RealNode::remove(NAME);
            eprintln!("real node: {NAME} removed");
            ExitCode::SUCCESS
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn up(images: PathBuf) -> ExitCode {
    let archives: Vec<PathBuf> = std::fs::read_dir(&images)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".oci.tar"))
        .collect();
    let pause = nodemesh_tests::realnode::pause_image();
    let node = RealNode::start(RealNodeOptions {
        name: NAME.into(),
        veth: "nmrdev".into(),
        subnet: 250,
        images: archives,
        pause_image: pause,
        detached: true,
    });
    println!(
        "real node {} is Ready (API server https://{}).

  export KUBECONFIG={}
  kubectl get nodes
  nodemesh install --host-cgroup-root {} | kubectl apply -f -

Logs: {}/*.log. Stop it with `cargo xtask node down`.",
        node.name,
        node.api_addr(),
        node.cluster.kubeconfig.display(),
        node.cgroup_v2.display(),
        node.dir.display(),
    );
    ExitCode::SUCCESS
}
