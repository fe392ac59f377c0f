//! Kubernetes discovery against a real API server: label opt-in, namespace
//! opt-in, opt-out, release, deletion, bad input, the service index, API
//! server restarts, and the install manifests with their RBAC.
//!
//! Longer than 500 lines on purpose: one scenario family, each test a
//! story read top to bottom; splitting would scatter the shared checks.
use std::{net::SocketAddr, process::Command, time::Duration};

use nodemesh_core::names::MESH_LABEL;
use nodemesh_tests::{
    Agent, AgentOptions, CgroupDriver, Cluster, Metrics, Node, Pod, PodSpec, Qos, agent,
    eventually, kube::unique,
};
use serde_json::{Value, json};

const ECHO: u16 = 8080;

fn meshed(m: &Metrics) -> f64 {
    m.sum("nodemesh_meshed_pods", &[])
}

fn echo(pod: &Pod) -> SocketAddr {
    SocketAddr::from((pod.ip, ECHO))
}

fn redirected(x: &nodemesh_tests::Exchange) -> bool {
    x.redirected()
}

fn source_errors(m: &Metrics, reason: &str) -> f64 {
    m.sum("nodemesh_pod_source_errors_total", &[("reason", reason)])
}

fn capture_errors(m: &Metrics, reason: &str) -> f64 {
    m.sum("nodemesh_pod_capture_errors_total", &[("reason", reason)])
}

/// A fresh namespace on the shared API server.
fn namespace(cluster: &Cluster, labels: &[(&str, &str)]) -> String {
    let ns = unique("nmt");
    cluster.namespace(&ns, labels);
    ns
}

pub fn a_labelled_pod_is_captured_from_the_api() {
    let cluster = Cluster::shared();
    let ns = namespace(cluster, &[]);
    let node = Node::new();
    let client = cluster.run_pod(
        &node,
        PodSpec::new(&ns, "web-7d4b9c-x1")
            .meshed()
            .label("pod-template-hash", "7d4b9c")
            .owner("ReplicaSet", "web-7d4b9c")
            .service_account("web"),
    );
    // Another QoS class and the other cgroup driver: found all the same.
    let other = cluster.run_pod(
        &node,
        PodSpec::new(&ns, "batch-x2")
            .meshed()
            .owner("Job", "batch")
            .qos(Qos::Guaranteed)
            .driver(CgroupDriver::Cgroupfs),
    );
    let server = cluster.run_pod(&node, PodSpec::new(&ns, "db-0").owner("StatefulSet", "db"));
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));
    agent.wait_metric("both meshed pods captured", |m| meshed(m) == 2.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    assert!(redirected(&app.exchange_ok(echo(&server), 1000)));
    let mut app2 = other.tcp();
    assert!(redirected(&app2.exchange_ok(echo(&server), 1000)));
    agent.wait_metric("connections counted with workload labels", |m| {
        m.sum(
            "nodemesh_tcp_close_total",
            &[
                ("namespace", ns.as_str()),
                ("workload_kind", "deployment"),
                ("workload_name", "web"),
                ("pod", "web-7d4b9c-x1"),
                ("serviceaccount", "web"),
            ],
        ) == 1.0
            && m.sum(
                "nodemesh_tcp_close_total",
                &[
                    ("workload_kind", "job"),
                    ("workload_name", "batch"),
                    ("serviceaccount", "default"),
                ],
            ) == 1.0
    });
}

pub fn a_namespace_label_meshes_its_pods_and_the_opt_out_wins() {
    let cluster = Cluster::shared();
    let ns = namespace(cluster, &[]);
    let node = Node::new();
    let a = cluster.run_pod(&node, PodSpec::new(&ns, "a"));
    let b = cluster.run_pod(&node, PodSpec::new(&ns, "b"));
    let out = cluster.run_pod(
        &node,
        PodSpec::new(&ns, "opted-out").label(MESH_LABEL, "disabled"),
    );
    let other_ns = namespace(cluster, &[]);
    let server = cluster.run_pod(&node, PodSpec::new(&other_ns, "server"));
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));
    let mut srv = server.tcp();
    srv.listen(ECHO);
    assert_eq!(meshed(&agent.metrics()), 0.0);
    let (mut a_app, mut out_app) = (a.tcp(), out.tcp());
    assert!(!redirected(&a_app.exchange_ok(echo(&server), 100)));

    cluster.label_namespace(&ns, MESH_LABEL, Some("enabled"));
    agent.wait_metric("a and b captured, not the opted-out pod", |m| {
        meshed(m) == 2.0
    });
    assert!(
        redirected(&a_app.exchange_ok(echo(&server), 100)),
        "same process, now captured"
    );
    assert!(
        !redirected(&out_app.exchange_ok(echo(&server), 100)),
        "the pod label wins"
    );
    let mut b_app = b.tcp();
    assert!(redirected(&b_app.exchange_ok(echo(&server), 100)));

    cluster.label_namespace(&ns, MESH_LABEL, None);
    agent.wait_metric("all released", |m| meshed(m) == 0.0);
    assert!(!redirected(&a_app.exchange_ok(echo(&server), 100)));
    assert!(node.pinned_pod_links().is_empty());
}

pub fn unlabelling_releases_and_deleting_cleans_up() {
    let cluster = Cluster::shared();
    let ns = namespace(cluster, &[]);
    let node = Node::new();
    let client = cluster.run_pod(&node, PodSpec::new(&ns, "client").meshed());
    let server = cluster.run_pod(&node, PodSpec::new(&ns, "server"));
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));
    agent.wait_metric("captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    assert!(redirected(&app.exchange_ok(echo(&server), 100)));

    cluster.label_pod(&client, MESH_LABEL, None);
    agent.wait_metric("released", |m| meshed(m) == 0.0);
    assert!(!redirected(&app.exchange_ok(echo(&server), 100)));
    assert!(node.pinned_pod_links().is_empty());

    cluster.label_pod(&client, MESH_LABEL, Some("enabled"));
    agent.wait_metric("captured again", |m| meshed(m) == 1.0);
    assert!(redirected(&app.exchange_ok(echo(&server), 100)));

    cluster.delete_pod(&client);
    let m = agent.wait_metric("released after deletion", |m| meshed(m) == 0.0);
    assert_eq!(
        m.sum("nodemesh_tcp_open_total", &[("pod", "client")]),
        0.0,
        "series gone"
    );
    assert!(
        node.pinned_pod_links().is_empty(),
        "no link left for a deleted pod"
    );
    agent.wait_log("pod released");
}

pub fn bad_pods_are_reported_once_retried_and_the_rest_served() {
    let cluster = Cluster::shared();
    let ns = namespace(cluster, &[]);
    let node = Node::new();
    let good = cluster.run_pod(&node, PodSpec::new(&ns, "good").meshed());
    let server = cluster.run_pod(&node, PodSpec::new(&ns, "server"));
    // No IP yet: created, not started.
    let pending = cluster.create_pod(&node, PodSpec::new(&ns, "pending").meshed());
    // Its status names another QoS class than where its cgroup is.
    let misplaced = cluster.run_pod(&node, PodSpec::new(&ns, "misplaced").meshed());
    cluster.patch_pod_status(&misplaced, json!({"qosClass": "Burstable"}));
    let odd_owner = cluster.run_pod(
        &node,
        PodSpec::new(&ns, "canary-1")
            .meshed()
            .owner("Rollout", "canary"),
    );
    let odd_label = cluster.run_pod(&node, PodSpec::new(&ns, "typo").label(MESH_LABEL, "yes"));
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));

    let m = agent.wait_metric("problems counted", |m| {
        capture_errors(m, "netns_not_found") == 1.0
            && capture_errors(m, "cgroup_not_found") == 1.0
            && source_errors(m, "unknown_owner") == 1.0
            && source_errors(m, "invalid_label") == 1.0
    });
    assert_eq!(
        meshed(&m),
        2.0,
        "good and canary-1 are captured\n{}",
        m.text
    );
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = good.tcp();
    assert!(redirected(&app.exchange_ok(echo(&server), 1000)));
    let mut typo = odd_label.tcp();
    assert!(
        !redirected(&typo.exchange_ok(echo(&server), 100)),
        "a malformed label does not mesh"
    );
    let mut canary = odd_owner.tcp();
    assert!(redirected(&canary.exchange_ok(echo(&server), 100)));
    agent.wait_metric("unknown owner used as is", |m| {
        m.sum(
            "nodemesh_tcp_open_total",
            &[("workload_kind", "rollout"), ("workload_name", "canary")],
        ) == 1.0
    });

    // Retries (and more events about these pods) log and count nothing new.
    cluster.label_pod(&odd_label, "touched", Some("1"));
    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.metrics();
    assert_eq!(
        capture_errors(&m, "netns_not_found") + capture_errors(&m, "cgroup_not_found"),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        source_errors(&m, "invalid_label") + source_errors(&m, "unknown_owner"),
        2.0,
        "{}",
        m.text
    );
    let log = agent.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("cannot capture pod") && l.contains("/pending"))
            .count(),
        1,
        "logged once"
    );

    // The pods' owners are told, on the pods.
    let events = cluster.events(&ns);
    assert!(
        events.iter().any(|(pod, reason, message)| pod == "pending"
            && reason == "NodemeshCaptureFailed"
            && message.contains("netns_not_found")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(pod, reason, _)| pod == "misplaced" && reason == "NodemeshCaptureFailed"),
        "{events:?}"
    );

    // Once kubelet's part is done, both are captured without a restart.
    pending.start_sandbox();
    cluster.pod_running(&node, &pending);
    cluster.patch_pod_status(&misplaced, json!({"qosClass": "BestEffort"}));
    agent.wait_metric("pending and misplaced captured", |m| meshed(m) == 4.0);
}

pub fn the_service_index_follows_services_and_slices() {
    let cluster = Cluster::shared();
    let ns = namespace(cluster, &[(MESH_LABEL, "enabled")]);
    let node = Node::new();
    let local = cluster.run_pod(&node, PodSpec::new(&ns, "web-local").service_account("web"));
    cluster.remote_pod(
        &ns,
        "web-remote",
        "another-node",
        "10.99.0.7".parse().unwrap(),
        "web",
    );
    let vip = cluster.service(&ns, "web", 80, ECHO);
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(cluster));
    let services = || -> Vec<Value> {
        let (status, body) = agent.get("/v1/services").expect("GET /v1/services");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    };
    let web = |all: &[Value]| {
        all.iter()
            .find(|s| s["name"] == "web" && s["namespace"] == ns.as_str())
            .cloned()
    };

    let svc = eventually("the service is indexed", Duration::from_secs(15), || {
        web(&services()).ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(svc["addr"], format!("{vip}:80"));
    assert_eq!(svc["endpoints"], json!([]));

    cluster.endpoint_slice(&ns, "web", ECHO, &[(&local, &node, true)]);
    // Slices and pods arrive on separate watches: wait for both.
    let indexed = |n: usize| {
        move |svc: &Value| {
            let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
            eps.len() == n && eps.iter().all(|e| e["identity"].is_string())
        }
    };
    let svc = eventually(
        "the local endpoint is indexed",
        Duration::from_secs(15),
        || {
            let svc = web(&services()).ok_or("service gone")?;
            indexed(1)(&svc)
                .then_some(svc.clone())
                .ok_or(svc.to_string())
        },
    );
    let ep = &svc["endpoints"][0];
    assert_eq!(ep["addr"], format!("{}:{ECHO}", local.ip));
    assert_eq!(ep["node"], node.name.as_str());
    assert_eq!(ep["ready"], true);
    assert_eq!(
        ep["identity"],
        format!("spiffe://cluster.local/ns/{ns}/sa/web")
    );
    assert_eq!(ep["meshed"], true, "meshed by its namespace");

    // The remote pod joins, not ready; its identity comes from the pod.
    let remote_pod_ip: std::net::Ipv4Addr = "10.99.0.7".parse().unwrap();
    cluster.block_on(async {
        use kube::api::{Api, DynamicObject, Patch, PatchParams};
        let ar = kube::discovery::ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(cluster.client.clone(), &ns, &ar);
        let patch = json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "web-slice", "namespace": ns, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [local.ip.to_string()], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": node.name}},
                {"addresses": [remote_pod_ip.to_string()], "conditions": {"ready": false},
                 "topology": {"kubernetes.io/hostname": "another-node"}},
            ],
            "ports": [{"name": "tcp", "port": ECHO, "protocol": "TCP"}],
        });
        api.patch("web-slice", &PatchParams::apply("nodemesh-tests").force(), &Patch::Apply(&patch))
            .await
            .expect("update slice");
    });
    let svc = eventually(
        "the remote endpoint is indexed",
        Duration::from_secs(15),
        || {
            let svc = web(&services()).ok_or("service gone")?;
            indexed(2)(&svc)
                .then_some(svc.clone())
                .ok_or(svc.to_string())
        },
    );
    let remote_ep = svc["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["addr"] == format!("{remote_pod_ip}:{ECHO}"))
        .cloned()
        .expect("remote endpoint");
    assert_eq!(remote_ep["ready"], false);
    assert_eq!(remote_ep["node"], "another-node");
    assert_eq!(
        remote_ep["identity"],
        format!("spiffe://cluster.local/ns/{ns}/sa/web")
    );

    cluster.delete_service(&ns, "web");
    eventually(
        "the service leaves the index",
        Duration::from_secs(15),
        || web(&services()).map_or(Ok(()), |s| Err(s.to_string())),
    );
}

pub fn the_api_server_going_away_loses_nothing() {
    // A private API server: this test stops it.
    let cluster = Cluster::start();
    let ns = namespace(&cluster, &[]);
    let node = Node::new();
    let a = cluster.run_pod(&node, PodSpec::new(&ns, "a").meshed());
    let b = cluster.run_pod(&node, PodSpec::new(&ns, "b"));
    let server = cluster.run_pod(&node, PodSpec::new(&ns, "server"));
    let agent = Agent::start_ready(&node, AgentOptions::default().kube(&cluster));
    agent.wait_metric("a captured", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let (mut a_app, mut b_app) = (a.tcp(), b.tcp());

    // 1. The API server restarts: the agent keeps serving, then resumes.
    cluster.stop_apiserver();
    agent.wait_log("Kubernetes watch failed; retrying with backoff");
    assert!(
        redirected(&a_app.exchange_ok(echo(&server), 1000)),
        "served while the API is away"
    );
    assert_eq!(
        meshed(&agent.metrics()),
        1.0,
        "nothing dropped while the API is away"
    );
    cluster.start_apiserver();
    cluster.label_pod(&b, MESH_LABEL, Some("enabled"));
    // Watches retry with backoff (up to 30s between attempts).
    eventually(
        "b captured after the restart",
        Duration::from_secs(60),
        || {
            let m = agent.metrics();
            (meshed(&m) == 2.0).then_some(()).ok_or(m.text)
        },
    );
    agent.wait_log("Kubernetes watch recovered");
    assert!(redirected(&b_app.exchange_ok(echo(&server), 1000)));

    // 2. The agent loses the API while things change: it catches up.
    node.partition_from_host(cluster.port, true);
    cluster.delete_pod(&a);
    cluster.label_pod(&b, MESH_LABEL, None);
    let c = cluster.run_pod(&node, PodSpec::new(&ns, "c").meshed());
    std::thread::sleep(Duration::from_secs(2));
    node.partition_from_host(cluster.port, false);
    let m = eventually("only c captured once back", Duration::from_secs(60), || {
        let m = agent.metrics();
        let only_c = meshed(&m) == 1.0 && node.pinned_pod_links() == [c.uid.clone()];
        only_c.then_some(m.clone()).ok_or(m.text)
    });
    assert_eq!(
        m.sum("nodemesh_tcp_open_total", &[("pod", "a")]),
        0.0,
        "a's series gone"
    );
    let mut c_app = c.tcp();
    assert!(redirected(&c_app.exchange_ok(echo(&server), 1000)));
    assert!(!redirected(&b_app.exchange_ok(echo(&server), 1000)));
}

/// `nodemesh` with these arguments (the agent's own CLI, in this binary).
fn nodemesh(args: &[&str]) -> std::process::Output {
    Command::new(std::env::current_exe().expect("current_exe"))
        .arg(agent::ROLE)
        .args(args)
        .output()
        .expect("run nodemesh")
}

pub fn install_manifests_apply_and_grant_discovery_what_it_needs() {
    let cluster = Cluster::shared();
    let mesh_ns = unique("nmt-mesh");
    let out = nodemesh(&[
        "install",
        "--namespace",
        &mesh_ns,
        "--bypass-port",
        "22",
        "--pod-cidr",
        "10.244.0.0/16,fd00:10:244::/56",
    ]);
    assert!(out.status.success(), "{out:?}");
    let manifests = String::from_utf8(out.stdout).expect("UTF-8");

    // The API server accepts every object as it is (a dry run needs the
    // namespace to exist)…
    let namespace_doc = nodemesh_tests_first_document(&manifests);
    assert!(namespace_doc.contains("kind: Namespace"), "{namespace_doc}");
    cluster
        .apply_manifests(&namespace_doc, false)
        .expect("the namespace");
    let kinds = cluster.apply_manifests(&manifests, true).expect("dry run");
    // (21: with the identity service's NetworkPolicy.)
    assert_eq!(kinds.len(), 21, "{kinds:?}");
    // …for real too (but the cluster's one aggregated API and its
    // ClusterRoles: the test of the aggregated API owns them meanwhile).
    cluster
        .apply_manifests(&nodemesh_tests::mesh::without_singletons(&manifests), false)
        .expect("apply");
    let uninstall = nodemesh_tests::mesh::without_singletons(
        &String::from_utf8(nodemesh(&["uninstall", "--namespace", &mesh_ns]).stdout)
            .expect("UTF-8"),
    );
    struct Remove<'a>(&'a Cluster, String);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            self.0.delete_manifests(&self.1);
        }
    }
    let _cleanup = Remove(cluster, uninstall.clone());

    // The agent's service account token can do what discovery needs, and no more.
    let token = cluster.token(&mesh_ns, "nodemesh-agent");
    let node = Node::new();
    let kubeconfig = node.dir.join("agent.kubeconfig");
    cluster.kubeconfig_with_token(&kubeconfig, &token);
    for (verb, group, resource) in [
        ("watch", "", "pods"),
        ("list", "", "namespaces"),
        ("list", "", "services"),
        ("list", "discovery.k8s.io", "endpointslices"),
        ("watch", "policy.nodemesh.io", "authorizationpolicies"),
        ("create", "", "events"),
    ] {
        assert!(
            cluster.can(&kubeconfig, verb, group, resource, None),
            "{verb} {resource} denied"
        );
    }
    for (verb, group, resource) in [
        ("list", "", "secrets"),
        ("create", "", "pods"),
        ("delete", "", "pods"),
        ("update", "", "namespaces"),
        ("list", "apps", "daemonsets"),
        ("delete", "", "events"),
        ("update", "policy.nodemesh.io", "authorizationpolicies"),
    ] {
        assert!(
            !cluster.can(&kubeconfig, verb, group, resource, None),
            "{verb} {resource} allowed"
        );
    }

    // The identity service's token: TokenReviews, reading pods, checking
    // callers of its aggregated API, no more.
    let identity_kubeconfig = node.dir.join("identity.kubeconfig");
    cluster.kubeconfig_with_token(
        &identity_kubeconfig,
        &cluster.token(&mesh_ns, "nodemesh-identity"),
    );
    for (verb, group, resource, allowed) in [
        ("create", "authentication.k8s.io", "tokenreviews", true),
        ("list", "", "pods", true),
        ("get", "", "pods", true),
        ("watch", "", "pods", false),
        (
            "create",
            "authorization.k8s.io",
            "subjectaccessreviews",
            true,
        ),
        ("list", "", "secrets", false),
        ("create", "", "pods", false),
        // Policies: read, and only their status written.
        ("watch", "policy.nodemesh.io", "authorizationpolicies", true),
        (
            "update",
            "policy.nodemesh.io",
            "authorizationpolicies",
            false,
        ),
    ] {
        assert_eq!(
            cluster.can(&identity_kubeconfig, verb, group, resource, None),
            allowed,
            "identity: {verb} {resource}"
        );
    }
    assert!(
        !cluster.can(
            &kubeconfig,
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            None
        ),
        "the agent cannot review tokens"
    );

    // An agent as the DaemonSet runs it: its token, its DaemonSet.
    let as_installed = || {
        AgentOptions::default()
            .kube_as(cluster, &kubeconfig)
            .arg("--namespace")
            .arg(&mesh_ns)
            .arg("--daemonset")
            .arg("nodemesh-agent")
    };
    // Discovery runs under that token: a meshed pod is captured.
    let ns = namespace(cluster, &[]);
    let client = cluster.run_pod(&node, PodSpec::new(&ns, "client").meshed());
    let server = cluster.run_pod(&node, PodSpec::new(&ns, "server"));
    let mut agent = Agent::start_ready(&node, as_installed());
    agent.wait_metric("captured with the agent's own token", |m| meshed(m) == 1.0);
    let mut srv = server.tcp();
    srv.listen(ECHO);
    let mut app = client.tcp();
    assert!(redirected(&app.exchange_ok(echo(&server), 1000)));
    assert!(
        !agent.log().to_lowercase().contains("forbidden"),
        "no permission errors:\n{}",
        agent.log_tail(30)
    );

    // A restart keeps eBPF in place; once the DaemonSet is deleted
    // (uninstall), the stopping agent removes it.
    let status = agent.stop(Duration::from_secs(20)).expect("stopped");
    assert!(status.success());
    assert!(node.pins.exists(), "a plain stop keeps the eBPF state");
    let mut agent = Agent::start_ready(&node, as_installed());
    agent.wait_metric("captured again", |m| meshed(m) == 1.0);
    // The audit: an RBAC slip (the agent's bindings gone) plus a restart
    // must not unmesh the node — a 403 is no evidence of an uninstall.
    let bindings: String = nodemesh_cli::install::documents(&manifests)
        .into_iter()
        .filter(|d| {
            (d.contains("kind: RoleBinding") || d.contains("kind: ClusterRoleBinding"))
                && d.contains("-agent")
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
    cluster.delete_manifests(&bindings);
    nodemesh_tests::eventually("the agent's rights gone", Duration::from_secs(10), || {
        if cluster.can(&kubeconfig, "get", "apps", "daemonsets", Some(&mesh_ns)) {
            Err("still allowed".to_string())
        } else {
            Ok(())
        }
    });
    let status = agent.stop(Duration::from_secs(20)).expect("stopped");
    assert!(status.success());
    assert!(
        node.pins.exists(),
        "a 403 at stop uninstalled: {}",
        agent.log_tail(10)
    );
    cluster
        .apply_manifests(&bindings, false)
        .expect("the bindings again");
    let mut agent = Agent::start_ready(&node, as_installed());
    agent.wait_metric("captured again", |m| meshed(m) == 1.0);
    // A real uninstall: the DaemonSet goes, and the agent's rights right
    // after it (as `kubectl delete -f` does), before the agent is told to
    // stop: what it saw while it could still ask counts.
    let daemonset_only: String = nodemesh_tests_first_document(&uninstall);
    cluster.delete_manifests(&daemonset_only);
    agent.wait_log("evidence of an uninstall");
    cluster.delete_manifests(&bindings);
    let status = agent.stop(Duration::from_secs(20)).expect("stopped");
    assert!(status.success());
    assert!(
        agent.log().contains("nodemesh is being uninstalled"),
        "{}",
        agent.log_tail(10)
    );
    assert!(!node.pins.exists(), "eBPF state removed on uninstall");
    assert!(
        !redirected(&app.exchange_ok(echo(&server), 1000)),
        "connections go direct again"
    );
}

fn nodemesh_tests_first_document(text: &str) -> String {
    nodemesh_cli::install::documents(text)
        .first()
        .map(|d| d.to_string())
        .expect("a document")
}
