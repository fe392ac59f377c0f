//! Flags in, configuration or every problem out.
use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

fn args(extra: &[&str]) -> AgentArgs {
    let mut argv = vec!["nodemesh", "--pod-file", "/tmp/pods.yaml"];
    argv.extend(extra);
    Cli::try_parse_from(argv).expect("clap accepts").agent
}

#[test]
fn defaults_are_valid() {
    let cfg = AgentConfig::try_from(&args(&[])).expect("valid");
    assert_eq!(cfg.outbound_port, 15001);
    assert_eq!(cfg.admin_addr.port(), 4191);
    assert!(!cfg.fast_path, "off unless asked for");
    assert_eq!(cfg.connect_timeout, Duration::from_secs(5));
    assert_eq!(cfg.bpffs, PathBuf::from("/sys/fs/bpf/nodemesh"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = AgentConfig::try_from(&args(&[
        "--outbound-port",
        "0",
        "--connect-timeout",
        "soon",
        "--fast-path",
        "maybe",
        "--bypass-cidr",
        "10.0.0.0/40,10.96.0.0/12",
        "--admin-addr",
        "nowhere",
    ]))
    .unwrap_err();
    let text = err.to_string();
    for flag in [
        "--outbound-port",
        "--connect-timeout",
        "--fast-path",
        "--bypass-cidr",
        "--admin-addr",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    assert_eq!(err.0.len(), 5, "{text}");
}

#[test]
fn cidrs_and_ports() {
    let cfg = AgentConfig::try_from(&args(&["--bypass-port", "22,53", "--bypass-port", "8080"]))
        .expect("valid");
    assert_eq!(cfg.bypass_ports, [22, 53, 8080]);
}

#[test]
fn identity_settings_are_checked_together() {
    let cli = |argv: &[&str]| {
        let mut all = vec!["nodemesh"];
        all.extend(argv);
        Cli::try_parse_from(all).expect("clap accepts").agent
    };
    // Off by default.
    let cfg = AgentConfig::try_from(&cli(&["--node-name", "n1"])).expect("valid");
    assert!(cfg.identity.is_none());
    // On: needs anchors that parse, Kubernetes discovery, sane addresses.
    let dir = std::env::temp_dir().join(format!("nodemesh-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let anchors = dir.join("ca.crt");
    let anchor =
        nodemesh_core::pki::generate_trust_anchor("cluster.local", Duration::from_secs(60))
            .expect("anchor");
    std::fs::write(&anchors, &anchor.cert_pem).expect("write");
    let anchors = anchors.to_string_lossy().into_owned();
    let cfg = AgentConfig::try_from(&cli(&[
        "--node-name",
        "n1",
        "--identity-addr",
        "identity.example:8080",
        "--identity-trust-anchors-file",
        &anchors,
    ]))
    .expect("valid");
    let id = cfg.identity.expect("identity on");
    assert_eq!(id.tunnel_addrs, vec!["[::]:15008".parse().unwrap()]);
    assert_eq!(id.tunnel_idle_timeout, Duration::from_secs(60));
    let err = AgentConfig::try_from(&cli(&[
        "--pod-file",
        "/tmp/pods.yaml",
        "--identity-addr",
        "no-port",
        "--tunnel-addr",
        "0.0.0.0:4191",
    ]))
    .unwrap_err();
    let text = err.to_string();
    for needle in [
        "needs Kubernetes discovery",
        "expected host:port",
        "--identity-trust-anchors-file is needed",
        "--admin-addr and --tunnel-addr both use port 4191",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    std::fs::write(dir.join("bad.crt"), "not a certificate").expect("write");
    let bad = dir.join("bad.crt").to_string_lossy().into_owned();
    let err = AgentConfig::try_from(&cli(&[
        "--node-name",
        "n1",
        "--identity-addr",
        "identity:8080",
        "--identity-trust-anchors-file",
        &bad,
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kubernetes_needs_a_node_name() {
    let cli = |argv: &[&str]| {
        let mut all = vec!["nodemesh"];
        all.extend(argv);
        Cli::try_parse_from(all).expect("clap accepts").agent
    };
    let err = AgentConfig::try_from(&cli(&[])).unwrap_err();
    assert!(err.to_string().contains("--node-name"), "{err}");
    let err = AgentConfig::try_from(&cli(&["--node-name", "Node_1"])).unwrap_err();
    assert!(
        err.to_string().contains("not a Kubernetes node name"),
        "{err}"
    );
    let cfg = AgentConfig::try_from(&cli(&["--node-name", "node-1.example"])).expect("valid");
    assert_eq!(
        cfg.source,
        PodSourceConfig::Kube {
            node_name: "node-1.example".into(),
            kubeconfig: None,
            daemonset: None,
        }
    );
}

#[test]
fn same_port_twice_is_refused() {
    let err = AgentConfig::try_from(&args(&["--admin-addr", "0.0.0.0:15001"])).unwrap_err();
    assert!(err.to_string().contains("both use port 15001"), "{err}");
}

#[test]
fn the_tunnel_listens_on_one_port_on_one_or_more_addresses() {
    assert_eq!(
        tunnel_addrs(&["10.0.0.1:15008".into(), " [fd00::1]:15008".into()]),
        Ok(vec![
            "10.0.0.1:15008".parse().unwrap(),
            "[fd00::1]:15008".parse().unwrap()
        ])
    );
    let err = |list: &[&str]| {
        tunnel_addrs(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
    };
    assert!(err(&["10.0.0.1:15008", "[::]:15009"]).contains("same port"));
    assert!(err(&["[::]:15008", "[::]:15008"]).contains("twice"));
    assert!(err(&["fd00::1:15008"]).contains("not an address:port"));
    assert!(err(&[]).contains("no address"));
}
