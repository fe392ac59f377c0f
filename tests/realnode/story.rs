//! The story of the real-node tier (see main.rs).
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    batch::v1::Job,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use nodemesh_tests::{
    Metrics, TcpApp, eventually,
    realnode::{self, AGENT_PINS, RealNode, RealNodeOptions},
    sys::{http_get, read_or_empty},
};
use serde_json::json;

const ECHO: u16 = 8080;
const CONTROL: u16 = 7000;
const SYSTEM: &str = "nodemesh";

/// The image archives `cargo xtask image` wrote.
fn image_archives() -> Vec<PathBuf> {
    let dir = std::env::var_os("NODEMESH_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target/images")
        });
    let v = realnode::IMAGE_VERSION;
    ["nodemesh", "testapp", "pause"]
        .iter()
        .map(|name| dir.join(format!("{name}-{v}.oci.tar")))
        .collect()
}

struct Story {
    node: RealNode,
    t0: Instant,
    ns: String,
    plain: String,
}

impl Story {
    fn step(&self, what: &str) {
        eprintln!(
            "real node: {what} ({:.1}s)",
            self.t0.elapsed().as_secs_f64()
        );
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.node.cluster.block_on(f)
    }

    fn client(&self) -> kube::Client {
        self.node.cluster.client.clone()
    }

    fn metrics(&self) -> Metrics {
        match http_get(
            &self.node.netns,
            SocketAddr::from((self.node.ip, 4191)),
            "/metrics",
        ) {
            Ok((200, body)) => Metrics::parse(&body),
            other => panic!("agent /metrics: {other:?}"),
        }
    }

    fn wait_metric(&self, what: &str, ok: impl Fn(&Metrics) -> bool) -> Metrics {
        eventually(what, Duration::from_secs(60), || {
            let m = match http_get(
                &self.node.netns,
                SocketAddr::from((self.node.ip, 4191)),
                "/metrics",
            ) {
                Ok((200, body)) => Metrics::parse(&body),
                other => return Err(format!("{other:?}")),
            };
            if ok(&m) { Ok(m) } else { Err(m.text) }
        })
    }

    /// `nodemesh install <args>` applied, as `kubectl apply -f -` would.
    fn install(&self) {
        #[derive(Parser)]
        struct Install {
            #[command(flatten)]
            args: nodemesh_cli::install::InstallArgs,
        }
        let host_cgroup = self.node.cgroup_v2.display().to_string();
        let args = Install::parse_from([
            "install",
            "--host-cgroup-root",
            &host_cgroup,
            "--image",
            &realnode::nodemesh_image(),
            "--service-cidr",
            realnode::files::SERVICE_RANGE,
            // The node's bridge plugin enforces no NetworkPolicy: the
            // identity service's is accepted and in place, not in force.
            "--pod-cidr",
            realnode::files::POD_RANGE,
        ])
        .args;
        let manifests = nodemesh_cli::install::render(&args).expect("install renders");
        self.node
            .cluster
            .apply_manifests(&manifests, false)
            .unwrap_or_else(|e| panic!("apply the install: {e}"));
        self.wait_installed();
    }

    /// `nodemesh check [--pre]` against the node's API server, as its admin.
    fn check(&self, pre: bool) -> (String, bool) {
        nodemesh_cli::check::run(&nodemesh_cli::check::CheckArgs {
            pre,
            namespace: SYSTEM.into(),
            kubeconfig: Some(self.node.dir.join("admin.kubeconfig")),
            context: None,
            output: "text".into(),
        })
    }

    fn wait_installed(&self) {
        let ds: Api<DaemonSet> = Api::namespaced(self.client(), SYSTEM);
        let deploy: Api<Deployment> = Api::namespaced(self.client(), SYSTEM);
        eventually(
            "agent and identity service Ready",
            Duration::from_secs(120),
            || {
                let agents = self
                    .block_on(ds.get_opt("nodemesh-agent"))
                    .map_err(|e| e.to_string())?
                    .and_then(|d| d.status)
                    .map(|s| (s.number_ready, s.updated_number_scheduled.unwrap_or(0)));
                let identity = self
                    .block_on(deploy.get_opt("nodemesh-identity"))
                    .map_err(|e| e.to_string())?
                    .and_then(|d| d.status)
                    .and_then(|s| s.ready_replicas);
                match (agents, identity) {
                    (Some((1, 1)), Some(1)) => Ok(()),
                    other => Err(format!(
                        "(agents ready, updated), identity ready: {other:?}\n{}",
                        self.agent_log_tail()
                    )),
                }
            },
        );
    }

    /// The newest agent container log, from the node's log directory.
    fn agent_log_tail(&self) -> String {
        let mut logs: Vec<PathBuf> = walk(&self.node.dir.join("log/pods"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("nodemesh-agent"))
            .collect();
        logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        logs.last()
            .map(|p| {
                let text = read_or_empty(p);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            })
            .unwrap_or_default()
    }

    /// The Running pod of `app` in `ns`: name, address, UID, restarts.
    fn pod(&self, ns: &str, app: &str) -> (String, IpAddr, String, i32) {
        let pods: Api<Pod> = Api::namespaced(self.client(), ns);
        eventually(
            &format!("{ns}/{app} Running"),
            Duration::from_secs(90),
            || {
                let list = self
                    .block_on(pods.list(&ListParams::default().labels(&format!("app={app}"))))
                    .map_err(|e| e.to_string())?;
                list.items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .find_map(|p| {
                        let status = p.status.as_ref()?;
                        (status.phase.as_deref() == Some("Running")).then_some(())?;
                        let ip = status.pod_ip.as_ref()?.parse().ok()?;
                        let restarts = status
                            .container_statuses
                            .as_ref()?
                            .iter()
                            .map(|c| c.restart_count)
                            .sum();
                        Some((
                            p.metadata.name.clone()?,
                            ip,
                            p.metadata.uid.clone()?,
                            restarts,
                        ))
                    })
                    .ok_or_else(|| format!("{} pods, none Running yet", list.items.len()))
            },
        )
    }

    /// Drives the test app of `app` in `ns` over its control port.
    fn app(&self, ns: &str, app: &str) -> TcpApp {
        let (name, ip, _, _) = self.pod(ns, app);
        eventually(
            &format!("{ns}/{name} control port"),
            Duration::from_secs(30),
            || {
                TcpApp::connect(&self.node.netns, SocketAddr::new(ip, CONTROL), &name)
                    .map_err(|e| e.to_string())
            },
        )
    }

    fn apply(&self, yaml: &str) {
        self.node
            .cluster
            .apply_manifests(yaml, false)
            .unwrap_or_else(|e| panic!("apply: {e}"));
    }

    /// Pinned pod links, by pod UID.
    fn pinned_pods(&self) -> Vec<String> {
        let dir = PathBuf::from(AGENT_PINS)
            .join(format!("v{}", nodemesh_common::LAYOUT_VERSION))
            .join("links/pods");
        let mut uids: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        uids.sort();
        uids
    }

    /// nodemesh programs attached anywhere in the node's cgroup tree
    /// (`bpftool cgroup tree`).
    fn attached(&self) -> Vec<String> {
        let out = std::process::Command::new("bpftool")
            .args(["cgroup", "tree"])
            .arg(&self.node.cgroup_v2)
            .output()
            .expect("run bpftool (cargo xtask setup installs it)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("nodemesh_"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// After an uninstall: the agent gone, nothing attached, nothing pinned.
    fn assert_clean(&self, how: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client(), SYSTEM);
        eventually(
            &format!("{how}: agent pods gone"),
            Duration::from_secs(90),
            || {
                let list = self
                    .block_on(pods.list(
                        &ListParams::default().labels("app.kubernetes.io/name=nodemesh-agent"),
                    ))
                    .map_err(|e| e.to_string())?;
                if list.items.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} left", list.items.len()))
                }
            },
        );
        let attached = self.attached();
        assert!(
            attached.is_empty(),
            "{how}: programs still attached: {attached:#?}"
        );
        assert!(
            !PathBuf::from(AGENT_PINS).exists(),
            "{how}: {AGENT_PINS} is still there: {:?}",
            walk(&PathBuf::from(AGENT_PINS))
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn apps_yaml(ns: &str, plain: &str) -> String {
    let image = realnode::testapp_image();
    // The control port is the test's channel to the app, not the app's
    // traffic: exempt from inbound capture, so it survives the agent's
    // restart (a captured connection is reset when its agent goes).
    let deployment = |ns: &str, app: &str, args: &str| {
        format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata:
      labels: {{app: {app}}}
      annotations: {{config.nodemesh.io/skip-inbound-ports: \"{CONTROL}\"}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: {image}
        imagePullPolicy: IfNotPresent
        args: {args}
"
        )
    };
    let listen = format!(r#"'{{"op":"listen","port":{ECHO}}}'"#);
    [
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"),
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {plain}}}\n"),
        deployment(
            ns,
            "server",
            &format!("[tcp, --do, {listen}, --control, \"{CONTROL}\"]"),
        ),
        deployment(ns, "client", &format!("[tcp, --control, \"{CONTROL}\"]")),
        deployment(
            plain,
            "plain-client",
            &format!("[tcp, --control, \"{CONTROL}\"]"),
        ),
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {ns}}}
spec:
  selector: {{app: server}}
  ports: [{{name: echo, protocol: TCP, port: 80, targetPort: {ECHO}}}]
"
        ),
    ]
    .join("---\n")
}

pub fn nodemesh_runs_on_a_real_node_as_installed() {
    let node = RealNode::start(RealNodeOptions::for_tests(
        image_archives(),
        &realnode::pause_image(),
    ));
    let pid = std::process::id();
    let story = Story {
        node,
        t0: Instant::now(),
        ns: format!("shop-{pid}"),
        plain: format!("plain-{pid}"),
    };

    // 1. Install as a user does; agent and identity service become Ready;
    //    `nodemesh check` says so (and `--pre` that this node can run it).
    story.install();
    for pre in [true, false] {
        // The API server checks the aggregated API on its own schedule.
        eventually(
            &format!("nodemesh check{} passes", if pre { " --pre" } else { "" }),
            Duration::from_secs(90),
            || {
                let (text, ok) = story.check(pre);
                if ok { Ok(text) } else { Err(text) }
            },
        );
    }
    story.step("installed: agent DaemonSet and identity Deployment Ready; nodemesh check passes (aggregated API available, the agent's own report through it)");

    // 2. Apps running unmeshed, then the namespace labelled: captured with
    //    no restart.
    story.apply(&apps_yaml(&story.ns, &story.plain));
    let (server_name, server_ip, _, _) = story.pod(&story.ns, "server");
    let (client_name, _, client_uid, client_restarts) = story.pod(&story.ns, "client");
    let to_server = SocketAddr::new(server_ip, ECHO);
    let mut client = story.app(&story.ns, "client");
    let x = client.exchange_ok(to_server, 64 << 10);
    assert!(!x.redirected(), "not meshed yet: {x:?}");
    story.node.cluster.label_namespace(
        &story.ns,
        nodemesh_core::names::MESH_LABEL,
        Some("enabled"),
    );
    story.wait_metric("both pods captured", |m| {
        m.sum("nodemesh_meshed_pods", &[]) == 2.0
    });
    let x = client.exchange_ok(to_server, 1 << 20);
    assert!(x.intact && x.redirected(), "{x:?}");
    let (name, _, uid, restarts) = story.pod(&story.ns, "client");
    assert_eq!(
        (name, uid, restarts),
        (client_name.clone(), client_uid.clone(), client_restarts),
        "captured without a restart"
    );
    story.step("a labelled namespace's Deployments captured with no restart");

    // 3. Identities on both sides (one node: no TLS inside it).
    let client_id = format!("spiffe://cluster.local/ns/{}/sa/default", story.ns);
    story.wait_metric("identities on both sides", |m| {
        m.sum(
            "nodemesh_tcp_peer_open_total",
            &[
                ("pod", &client_name),
                ("direction", "outbound"),
                ("peer_identity", &client_id),
            ],
        ) >= 1.0
            && m.sum(
                "nodemesh_tcp_peer_open_total",
                &[
                    ("pod", &server_name),
                    ("direction", "inbound"),
                    ("peer_identity", &client_id),
                ],
            ) >= 1.0
    });
    let m = story.metrics();
    assert!(
        m.sum("nodemesh_identity_certificates", &[]) >= 1.0,
        "a workload certificate from the identity service (reached with no cluster DNS)\n{}",
        m.text
    );
    story.step("identities recorded on both sides; certificate issued");

    // 4. The Service through kube-proxy: unmeshed and meshed clients.
    let svc_ip: IpAddr = story
        .block_on(
            Api::<k8s_openapi::api::core::v1::Service>::namespaced(story.client(), &story.ns)
                .get("server"),
        )
        .expect("the Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .expect("a cluster IP");
    let vip = SocketAddr::new(svc_ip, 80);
    let mut plain = story.app(&story.plain, "plain-client");
    // kube-proxy programs a new Service's rules on its next sync (until
    // then the VIP refuses): wait for that, not for the mesh.
    let x = eventually(
        "kube-proxy serves the Service",
        Duration::from_secs(30),
        || plain.exchange(vip, 256 << 10).map_err(|f| format!("{f:?}")),
    );
    assert!(x.intact && !x.redirected(), "{x:?}");
    let x = client.exchange_ok(vip, 256 << 10);
    assert!(x.intact && x.redirected(), "{x:?}");
    story.step("Service traffic: unmeshed via kube-proxy, meshed via the agent");

    // 4a. The audit: a pod that lets in mutual TLS only still gets its
    //     kubelet's probes (they come from the bridge's address, not the
    //     node's hostIP: only the node's own socket says it is the kubelet).
    let image = realnode::testapp_image();
    let serve = format!(
        r#"'{{"op":"serve","port":{ECHO},"knobs":{{"status":200,"delay_ms":0,"bytes":16,"name":null}}}}'"#
    );
    story.apply(&format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: guarded, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: guarded}}}}
  template:
    metadata:
      labels: {{app: guarded}}
      annotations: {{config.nodemesh.io/default-inbound-policy: all-authenticated}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: app
        image: {image}
        imagePullPolicy: IfNotPresent
        args: [http, --do, {serve}, --control, \"{CONTROL}\"]
        readinessProbe:
          httpGet: {{path: /ready, port: {ECHO}}}
          periodSeconds: 1
",
        ns = story.ns
    ));
    let pods: Api<Pod> = Api::namespaced(story.client(), &story.ns);
    eventually(
        "the all-authenticated pod Ready through its httpGet probe",
        Duration::from_secs(60),
        || {
            let list = story
                .block_on(pods.list(&ListParams::default().labels("app=guarded")))
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .map(|_| ())
                .ok_or_else(|| "not Ready yet".to_string())
        },
    );
    let (_, guarded_ip, _, _) = story.pod(&story.ns, "guarded");
    // And plaintext from a pod is still refused there.
    let refused = plain.exchange(SocketAddr::new(guarded_ip, ECHO), 100);
    assert!(refused.is_err(), "{refused:?}");
    story.step("an all-authenticated pod with an httpGet readiness probe is Ready; plaintext to it refused");

    // 4b. `nodemesh stat` through the API server (its aggregated API,
    //     reached through the Service's cluster IP as installed): the
    //     meshed Deployments' connections.
    let stat = nodemesh_cli::stat::StatArgs {
        resource: nodemesh_cli::stat::Resource::Deploy,
        name: None,
        namespace: Some(story.ns.clone()),
        all_namespaces: false,
        to: None,
        from: None,
        window: "1m".into(),
        output: nodemesh_cli::stat::Output::Json,
        reach: nodemesh_cli::agents::Reach {
            kubeconfig: Some(story.node.dir.join("admin.kubeconfig")),
            ..Default::default()
        },
    };
    let lines: Vec<serde_json::Value> = eventually(
        "nodemesh stat through the API server",
        Duration::from_secs(60),
        || {
            // Fresh connections each try: the window is a minute.
            let x = client.exchange_ok(to_server, 1024);
            assert!(x.redirected(), "{x:?}");
            let out = nodemesh_cli::stat::run(&stat).map_err(|e| e.to_string())?;
            let lines: Vec<serde_json::Value> =
                serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
            if lines.iter().any(|l| l["tcp_opened"].as_u64() >= Some(1)) {
                Ok(lines)
            } else {
                Err(out)
            }
        },
    );
    story.step(&format!(
        "nodemesh stat through the API server: {}",
        lines
            .iter()
            .map(|l| format!("{} {} connections", l["name"], l["tcp_opened"]))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // 5. A Job in the meshed namespace runs to completion (no sidecar to
    //    keep it alive), its connection meshed.
    let exchange =
        json!({"op": "exchange", "to": to_server, "bytes": 65536, "seed": 7, "timeout_ms": 10000});
    story.apply(&format!(
        "apiVersion: batch/v1
kind: Job
metadata: {{name: once, namespace: {ns}}}
spec:
  backoffLimit: 0
  template:
    metadata: {{labels: {{app: once}}}}
    spec:
      restartPolicy: Never
      containers:
      - name: app
        image: {image}
        imagePullPolicy: IfNotPresent
        args: [tcp, --do, '{exchange}']
",
        ns = story.ns,
        image = realnode::testapp_image(),
    ));
    let jobs: Api<Job> = Api::namespaced(story.client(), &story.ns);
    eventually("the Job completes", Duration::from_secs(90), || {
        let status = story
            .block_on(jobs.get("once"))
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        match (status.succeeded, status.failed) {
            (Some(1), _) => Ok(()),
            (_, Some(n)) if n > 0 => {
                let job_log = walk(&story.node.dir.join("log/pods"))
                    .into_iter()
                    .find(|p| p.to_string_lossy().contains(&format!("{}_once-", story.ns)))
                    .map(|p| read_or_empty(&p))
                    .unwrap_or_default();
                panic!(
                    "the Job failed: {status:?}\nits log:\n{job_log}\n{}",
                    story.agent_log_tail()
                )
            }
            _ => Err(format!("{status:?}")),
        }
    });
    let job_log = walk(&story.node.dir.join("log/pods"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&format!("{}_once-", story.ns)))
        .map(|p| read_or_empty(&p))
        .unwrap_or_default();
    assert!(
        job_log.contains(r#""result":"exchanged""#)
            && job_log.contains(r#""kernel_local":"127.0.0.1:"#),
        "the Job's exchange went through the agent: {job_log}"
    );
    story.step("a Job in a meshed namespace ran to completion, meshed");

    // 6. Deleting a pod releases it (its links unpinned); its successor is
    //    captured.
    assert!(
        story.pinned_pods().contains(&client_uid),
        "{:?}",
        story.pinned_pods()
    );
    drop(client);
    let pods: Api<Pod> = Api::namespaced(story.client(), &story.ns);
    story
        .block_on(pods.delete(&client_name, &DeleteParams::default()))
        .expect("delete the client pod");
    eventually("the deleted pod released", Duration::from_secs(60), || {
        let pinned = story.pinned_pods();
        if pinned.contains(&client_uid) {
            Err(format!("{pinned:?}"))
        } else {
            Ok(())
        }
    });
    let (_, _, new_uid, _) = story.pod(&story.ns, "client");
    assert_ne!(new_uid, client_uid);
    eventually("its successor captured", Duration::from_secs(60), || {
        let pinned = story.pinned_pods();
        if pinned.contains(&new_uid) {
            Ok(())
        } else {
            Err(format!("{pinned:?}"))
        }
    });
    let mut client = story.app(&story.ns, "client");
    // Attached (pinned) comes a moment before served: meanwhile its
    // connections are refused (fail closed), never sent around the mesh.
    let deadline = Instant::now() + Duration::from_secs(30);
    let x = loop {
        match client.exchange(to_server, 1000) {
            Ok(x) => break x,
            Err(f) if f.kind == "denied" && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100))
            }
            Err(f) => panic!(
                "the successor's connection failed: {f:?}\n{}",
                story.agent_log_tail()
            ),
        }
    };
    assert!(x.redirected(), "{x:?}");
    story.step("a deleted pod released, its successor captured");

    // 7. `kubectl rollout restart daemonset`: a meshed client connecting all
    //    along is refused at worst, never carried around the mesh.
    let stop = Arc::new(AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut meshed, mut bypassed, mut refused) = (0u32, Vec::new(), 0u32);
            let mut window: Option<(Instant, Instant)> = None;
            while !stop.load(Ordering::Relaxed) {
                match client.exchange_with_timeout(to_server, 4096, Duration::from_secs(5)) {
                    Ok(x) if x.redirected() => meshed += 1,
                    Ok(x) => bypassed.push(x),
                    Err(_) => {
                        refused += 1;
                        let now = Instant::now();
                        window = Some((window.map_or(now, |w| w.0), now));
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
            let refusing = window.map_or(Duration::ZERO, |(a, b)| b - a);
            (meshed, bypassed, refused, refusing)
        })
    };
    thread::sleep(Duration::from_millis(500));
    let ds: Api<DaemonSet> = Api::namespaced(story.client(), SYSTEM);
    let before = story
        .block_on(ds.get("nodemesh-agent"))
        .expect("the DaemonSet");
    let generation = before.metadata.generation.unwrap_or(0);
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": format!("{:?}", std::time::SystemTime::now())
    }}}}});
    story
        .block_on(ds.patch(
            "nodemesh-agent",
            &PatchParams::default(),
            &Patch::Merge(&restart),
        ))
        .expect("rollout restart");
    eventually(
        "the restarted agent Ready",
        Duration::from_secs(120),
        || {
            let d = story
                .block_on(ds.get("nodemesh-agent"))
                .map_err(|e| e.to_string())?;
            let s = d.status.unwrap_or_default();
            let done = s.observed_generation.unwrap_or(0) > generation
                && s.updated_number_scheduled == Some(1)
                && s.number_ready == 1;
            if done { Ok(()) } else { Err(format!("{s:?}")) }
        },
    );
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (meshed, bypassed, refused, refusing) = looping.join().expect("the client loop");
    assert!(
        bypassed.is_empty(),
        "{} connections bypassed the mesh during the restart: {bypassed:#?}",
        bypassed.len()
    );
    assert!(
        meshed > 10,
        "the loop ran ({meshed} meshed, {refused} refused)"
    );
    story.step(&format!(
        "rollout restart: {meshed} connections meshed, {refused} refused over {:.1}s, 0 bypassed",
        refusing.as_secs_f64()
    ));

    // 8. Every documented way to uninstall leaves the node clean.
    let uninstall = nodemesh_cli::install::uninstall(SYSTEM).expect("uninstall manifest");
    story.node.cluster.delete_manifests(&uninstall);
    story.assert_clean("nodemesh uninstall | kubectl delete -f -");
    story.step(
        "uninstalled (nodemesh uninstall | kubectl delete -f -): nothing attached, nothing pinned",
    );

    let namespaces: Api<Namespace> = Api::all(story.client());
    let wait_namespace_gone = || {
        eventually(
            "the system namespace gone",
            Duration::from_secs(120),
            || match story.block_on(namespaces.get_opt(SYSTEM)) {
                Ok(None) => Ok(()),
                other => Err(format!("{:?}", other.map(|n| n.and_then(|n| n.status)))),
            },
        )
    };
    wait_namespace_gone();
    story.install();
    story
        .block_on(namespaces.delete(SYSTEM, &DeleteParams::default()))
        .expect("delete the namespace");
    story.assert_clean("kubectl delete namespace nodemesh");
    // The aggregated API outlives its namespace (cluster-scoped), and while
    // it cannot answer, the API server's discovery fails for it and no
    // namespace can finish deleting: the README's uninstall says to delete
    // it too.
    story.node.cluster.delete_manifests(&format!(
        "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: {}.{}\n",
        nodemesh_core::names::API_VERSION,
        nodemesh_core::names::API_GROUP
    ));
    story.step("uninstalled (namespace deleted first, then the APIService): nothing attached, nothing pinned");
    wait_namespace_gone();
    // What namespace deletion leaves: the cluster-scoped objects.
    story.node.cluster.delete_manifests(&uninstall);

    story.install();
    story
        .block_on(ds.delete("nodemesh-agent", &DeleteParams::default()))
        .expect("delete the DaemonSet");
    story.assert_clean("kubectl delete daemonset nodemesh-agent");
    // `nodemesh check` names what is missing, with a hint: the agents, and
    // (scaled to zero) the identity service.
    let deploy: Api<Deployment> = Api::namespaced(story.client(), SYSTEM);
    story
        .block_on(deploy.patch(
            "nodemesh-identity",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 0}})),
        ))
        .expect("scale the identity service to 0");
    eventually(
        "the identity service stopped",
        Duration::from_secs(60),
        || {
            let d = story
                .block_on(deploy.get("nodemesh-identity"))
                .map_err(|e| e.to_string())?;
            match d.status.and_then(|s| s.available_replicas).unwrap_or(0) {
                0 => Ok(()),
                n => Err(format!("{n} available")),
            }
        },
    );
    // (The API server notices the aggregated API's endpoints going on its
    // own schedule.)
    let wants = [
        "× agents: no DaemonSet nodemesh-agent in nodemesh: apply nodemesh install again",
        "× identity service: none available",
        "× aggregated API: v1alpha1.tap.nodemesh.io not available",
        "√ trust anchors: valid",
        "Status check results are ×",
    ];
    eventually(
        "nodemesh check names what is missing",
        Duration::from_secs(60),
        || {
            let (text, ok) = story.check(false);
            match wants.iter().find(|w| !text.contains(**w)) {
                None if !ok => Ok(()),
                None => Err(format!("check passed:\n{text}")),
                Some(w) => Err(format!("{w:?} not in:\n{text}")),
            }
        },
    );
    story.step("uninstalled (DaemonSet alone deleted): nothing attached, nothing pinned; nodemesh check says what is missing");
    story.node.cluster.delete_manifests(&uninstall);
}
