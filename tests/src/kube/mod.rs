//! A real Kubernetes API server (kube-apiserver v1.20.2 + etcd) on
//! 127.0.0.1 for the tests, and the kubelet's part played by the test bed:
//! pods are created in the API with `spec.nodeName`, get a simulated pod
//! whose cgroup is named after their API UID, and their status is patched
//! to Running with the pod's IP.
//!
//! One shared API server per test process ([`Cluster::shared`]), each test
//! in namespaces of its own; a test that restarts the API server gets a
//! private one ([`Cluster::start`]). Its processes die with the test
//! process (`PR_SET_PDEATHSIG` from a thread that lives as long) and sit in
//! a cgroup named after the test process, which the leftover sweep clears.
mod objects;

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Pod as K8sPod, Service, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::ApiResource,
};
use serde_json::json;

use crate::{
    node::{Node, Pod, PodSpec},
    sys::{cgroup2_mount, remove_cgroup_tree, spawn_kept},
};

static CLUSTERS: AtomicU32 = AtomicU32::new(0);
static NAMES: AtomicU32 = AtomicU32::new(0);

/// The test bed's async runtime, for the kube client.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("test bed runtime")
    })
}

/// Where `cargo xtask setup` put kube-apiserver (`kube_bin_dir()`).
mod tools {
    include!("../../../xtask/src/tools.rs");
}
pub use objects::NodeObject;
pub use tools::kube_bin_dir;

/// A fresh name for a namespace or object: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// etcd + kube-apiserver on 127.0.0.1.
pub struct Cluster {
    pub dir: PathBuf,
    cgroup: PathBuf,
    pub port: u16,
    etcd_port: u16,
    etcd: Mutex<Option<Child>>,
    apiserver: Mutex<Option<Child>>,
    /// Admin kubeconfig (token in group system:masters).
    pub kubeconfig: PathBuf,
    pub client: Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The API server shared by all tests of this process (started on
    /// first use, stopped by [`Cluster::teardown_shared`]).
    pub fn shared() -> &'static Cluster {
        SHARED.get_or_init(Cluster::start)
    }

    /// Stops the shared API server and removes its files (statics are never
    /// dropped; the test harness calls this when the tests are done).
    pub fn teardown_shared() {
        if let Some(cluster) = SHARED.get() {
            cluster.teardown();
        }
    }

    fn teardown(&self) {
        self.stop_apiserver();
        if let Some(mut etcd) = self.etcd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        remove_cgroup_tree(&self.cgroup);
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// A private API server (removed on drop).
    pub fn start() -> Cluster {
        crate::node::sweep_once();
        let bin = kube_bin_dir().join("kube-apiserver");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo xtask setup` (it builds kube-apiserver once)",
            bin.display()
        );
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "etcd is missing: run `cargo xtask setup` (apt package etcd-server)"
        );
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let name = format!("nmt{}-kube{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let cgroup = cgroup2_mount().join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("pki")).expect("cluster dir");
        fs::create_dir_all(&cgroup).expect("cluster cgroup");
        write_pki(&dir.join("pki"));
        let port = free_port();
        let t0 = Instant::now();
        // etcd first, up before the API server needs it: a port taken
        // between choosing and binding it (other tests run) means another
        // try on other ports, not an API server waiting for nothing.
        let (etcd, etcd_port) = start_etcd(&dir, &cgroup);
        let kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            port,
            &dir.join("pki/ca.crt"),
            "nodemesh-test-admin",
        );
        let apiserver = spawn_kept(
            apiserver_command(&bin, &dir, port, etcd_port),
            cgroup.clone(),
        );
        let client = runtime().block_on(client_from(&kubeconfig));
        let cluster = Cluster {
            dir,
            cgroup,
            port,
            etcd_port,
            etcd: Mutex::new(Some(etcd)),
            apiserver: Mutex::new(Some(apiserver)),
            kubeconfig,
            client,
        };
        cluster.wait_ready(Duration::from_secs(60));
        eprintln!(
            "test bed: kube-apiserver v1.20.2 ready on 127.0.0.1:{port} in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        cluster
    }

    /// An API server run by somebody else (the real node's): the client
    /// helpers only; `dir` is this handle's scratch, removed on drop.
    pub fn external(dir: PathBuf, kubeconfig: PathBuf, port: u16) -> Cluster {
        let client = runtime().block_on(client_from(&kubeconfig));
        let _ = fs::create_dir_all(&dir);
        Cluster {
            cgroup: dir.join("no-cgroup"),
            dir,
            port,
            etcd_port: 0,
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
            kubeconfig,
            client,
        }
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = runtime().block_on(async {
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("request");
                self.client.request_text(req).await.is_ok()
            });
            if ok {
                return;
            }
            if let Some(status) = self
                .apiserver
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "kube-apiserver exited ({status}):\n{}",
                    tail(&self.dir.join("apiserver.log"), 40)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "kube-apiserver not ready after {timeout:?}:\n{}",
                    tail(&self.dir.join("apiserver.log"), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the API server (etcd keeps the data).
    pub fn stop_apiserver(&self) {
        if let Some(mut child) = self.apiserver.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server again on the same port and data.
    pub fn start_apiserver(&self) {
        let bin = kube_bin_dir().join("kube-apiserver");
        let child = spawn_kept(
            apiserver_command(&bin, &self.dir, self.port, self.etcd_port),
            self.cgroup.clone(),
        );
        *self.apiserver.lock().unwrap() = Some(child);
        self.wait_ready(Duration::from_secs(60));
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        runtime().block_on(f)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Client {
    let file = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

fn labels_json(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// etcd on free ports, answering: (the process, its client port).
fn start_etcd(dir: &Path, cgroup: &Path) -> (Child, u16) {
    for attempt in 1..=3 {
        let port = free_port();
        let _ = fs::remove_dir_all(dir.join("etcd"));
        let mut etcd = spawn_kept(etcd_command(dir, port), cgroup.to_owned());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (etcd, port);
            }
            if let Ok(Some(status)) = etcd.try_wait() {
                eprintln!(
                    "test bed: etcd exited ({status}) on try {attempt}:\n{}",
                    tail(&dir.join("etcd.log"), 10)
                );
                break;
            }
            if Instant::now() > deadline {
                let _ = etcd.kill();
                let _ = etcd.wait();
                eprintln!("test bed: etcd not listening after 15 s on try {attempt}");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("etcd would not start:\n{}", tail(&dir.join("etcd.log"), 40));
}

fn etcd_command(dir: &Path, port: u16) -> Command {
    let peer = free_port();
    let mut cmd = Command::new("/usr/bin/etcd");
    cmd.args(["--name", "nodemesh-test", "--log-level", "warn"])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{port}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{port}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg(format!(
            "--initial-cluster=nodemesh-test=http://127.0.0.1:{peer}"
        ))
        .stdin(Stdio::null())
        .stdout(log_file(dir, "etcd.log"))
        .stderr(log_file(dir, "etcd.log"));
    cmd
}

fn apiserver_command(bin: &Path, dir: &Path, port: u16, etcd_port: u16) -> Command {
    let pki = dir.join("pki");
    let p = |f: &str| pki.join(f).display().to_string();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
        .arg(format!("--secure-port={port}"))
        .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
        .arg(format!("--client-ca-file={}", p("ca.crt")))
        .arg(format!("--token-auth-file={}", p("tokens.csv")))
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!("--service-account-key-file={}", p("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            p("sa.key")
        ))
        .arg("--api-audiences=https://kubernetes.default.svc")
        .arg(format!("--service-cluster-ip-range={SERVICE_RANGE}"))
        .arg("--authorization-mode=RBAC")
        // No controller-manager creates default service accounts here.
        .arg("--disable-admission-plugins=ServiceAccount")
        .args(front_proxy_flags(&pki))
        .arg(format!("--cert-dir={}", dir.join("certs").display()))
        .stdin(Stdio::null())
        .stdout(log_file(dir, "apiserver.log"))
        .stderr(log_file(dir, "apiserver.log"));
    cmd
}

fn log_file(dir: &Path, name: &str) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .expect("log file")
}

/// A CA for a test API server: the issuer and its certificate (PEM).
pub(crate) fn test_ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    (Issuer::new(ca, ca_key), ca_cert.pem())
}

/// A CA, the API server's serving certificate, the service account signing
/// key pair and the admin token.
fn write_pki(pki: &Path) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let (issuer, ca_pem) = test_ca("nodemesh test CA");

    let server_key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
        "127.0.0.1".to_string(),
    ])
    .expect("server params");
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).expect("server cert");

    let sa_key = KeyPair::generate().expect("sa key");
    fs::write(pki.join("ca.crt"), ca_pem).expect("write");
    fs::write(pki.join("apiserver.crt"), server_cert.pem()).expect("write");
    fs::write(pki.join("apiserver.key"), server_key.serialize_pem()).expect("write");
    fs::write(pki.join("sa.key"), sa_key.serialize_pem()).expect("write");
    fs::write(pki.join("sa.pub"), sa_key.public_key_pem()).expect("write");
    // `alice`: a user in no group, for RBAC tests (bound as a test needs).
    fs::write(
        pki.join("tokens.csv"),
        format!(
            "nodemesh-test-admin,admin,admin-uid,system:masters\n{ALICE_TOKEN},alice,alice-uid\n"
        ),
    )
    .expect("write");
    write_front_proxy(pki);
}

/// The token of `alice`, a user of the test API servers in no group.
pub const ALICE_TOKEN: &str = "nodemesh-test-alice";

/// The test API server's Service network (`--service-cluster-ip-range`).
pub const SERVICE_RANGE: &str = "10.96.0.0/16";

/// The front proxy's CA and client certificate: how the API server reaches
/// aggregated APIs (nodemesh's `tap.nodemesh.io`) as itself, naming the user
/// in request headers.
pub(crate) fn write_front_proxy(pki: &Path) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let (issuer, ca_pem) = test_ca("nodemesh test front-proxy CA");
    let key = KeyPair::generate().expect("front proxy key");
    let mut client = CertificateParams::new(Vec::<String>::new()).expect("params");
    client
        .distinguished_name
        .push(DnType::CommonName, "front-proxy-client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = client.signed_by(&key, &issuer).expect("front proxy cert");
    fs::write(pki.join("front-proxy-ca.crt"), ca_pem).expect("write");
    fs::write(pki.join("front-proxy-client.crt"), cert.pem()).expect("write");
    fs::write(pki.join("front-proxy-client.key"), key.serialize_pem()).expect("write");
}

/// kube-apiserver flags for [`write_front_proxy`]'s files in `pki`.
pub(crate) fn front_proxy_flags(pki: &Path) -> Vec<String> {
    let p = |f: &str| pki.join(f).display().to_string();
    vec![
        format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
        "--requestheader-allowed-names=front-proxy-client".into(),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
        format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
    ]
}

fn write_kubeconfig(path: &Path, port: u16, ca: &Path, token: &str) {
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: \"https://127.0.0.1:{port}\", certificate-authority: \"{ca}\"}}
users:
- name: user
  user: {{token: \"{token}\"}}
contexts:
- name: test
  context: {{cluster: test, user: user}}
current-context: test
",
        ca = ca.display()
    );
    fs::write(path, text).expect("write kubeconfig");
}
