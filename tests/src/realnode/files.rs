//! What the real node's daemons read: certificates and tokens, kubeconfigs,
//! containerd's, the kubelet's and CNI's configuration. Every path points
//! into the node's directory; nothing is written elsewhere on the host.
use std::{fs, net::Ipv4Addr, path::Path};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};

/// The admin token (group `system:masters`): the tests, controller-manager,
/// scheduler and kube-proxy use it.
pub const ADMIN_TOKEN: &str = "nodemesh-node-admin";
/// The kubelet's token (user `system:node:<node>`, group `system:nodes`,
/// as the Node authorizer wants).
pub const NODE_TOKEN: &str = "nodemesh-node-kubelet";
/// The API server's port on the node's address.
pub const API_PORT: u16 = 6443;
/// The Service range, and the `kubernetes` Service's address in it.
pub const SERVICE_RANGE: &str = "10.96.0.0/16";
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The pods' range on the node's bridge.
pub const POD_RANGE: &str = "10.88.0.0/16";

fn write(path: &Path, text: impl AsRef<[u8]>) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A CA, the API server's serving certificate (the node's address, the
/// `kubernetes` Service's address and names), the service-account key
/// pair, and the token file.
pub fn pki(dir: &Path, node: &str, node_ip: Ipv4Addr) {
    fs::create_dir_all(dir).expect("pki dir");
    let (issuer, ca_pem) = crate::kube::test_ca("nodemesh real-node CA");

    let server_key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec![
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
        "localhost".to_string(),
    ])
    .expect("server params");
    for ip in [node_ip, KUBERNETES_SERVICE_IP, Ipv4Addr::LOCALHOST] {
        server
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::V4(ip)));
    }
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).expect("server cert");
    let sa_key = KeyPair::generate().expect("sa key");
    write(&dir.join("ca.crt"), ca_pem);
    write(&dir.join("apiserver.crt"), server_cert.pem());
    write(&dir.join("apiserver.key"), server_key.serialize_pem());
    write(&dir.join("sa.key"), sa_key.serialize_pem());
    write(&dir.join("sa.pub"), sa_key.public_key_pem());
    write(
        &dir.join("tokens.csv"),
        format!(
            "{ADMIN_TOKEN},admin,admin-uid,system:masters\n\
             {NODE_TOKEN},system:node:{node},node-uid,system:nodes\n\
             {ALICE},alice,alice-uid\n",
            ALICE = crate::kube::ALICE_TOKEN,
        ),
    );
    crate::kube::write_front_proxy(dir);
}

/// A kubeconfig for the API server at `server` with a bearer token.
pub fn kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) {
    write(
        path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {{server: \"{server}\", certificate-authority: \"{ca}\"}}
users:
- name: user
  user: {{token: \"{token}\"}}
contexts:
- name: node
  context: {{cluster: node, user: user}}
current-context: node
",
            ca = ca.display()
        ),
    );
}

/// containerd: its own root, state and socket in the node directory; the
/// test bed's pause image; cgroupfs (no systemd here); the OOM-score
/// restriction root needs without CAP_SYS_RESOURCE.
pub fn containerd(dir: &Path, sandbox_image: &str) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{d}/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"#
    )
}

/// The pods' network: a bridge with the node as gateway, addresses from
/// host-local IPAM (its state in the node directory).
pub fn cni(dir: &Path) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "nodemesh-node",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{d}/cni-ipam",
        "ranges": [[{{"subnet": "{POD_RANGE}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }}
  ]
}}
"#,
        d = dir.display()
    )
}

/// The kubelet: cgroupfs under `cgroup_root`, no swap check, eviction
/// thresholds low enough for a shared test machine, no cluster DNS, the
/// kubelet API only on the node's address.
pub fn kubelet(dir: &Path, node_ip: Ipv4Addr, cgroup_root: &str) -> String {
    let d = dir.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{node_ip}"
readOnlyPort: 0
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
cgroupRoot: "{cgroup_root}"
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
resolvConf: "{d}/resolv.conf"
clusterDomain: cluster.local
serializeImagePulls: false
evictionHard: {{"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
volumePluginDir: "{d}/kubelet/volume-plugins"
syncFrequency: 5s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
"#
    )
}
