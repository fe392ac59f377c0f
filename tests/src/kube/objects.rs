//! The API side of the test bed's cluster: namespaces, pods (playing the
//! kubelet's part), Services and EndpointSlices, manifests, RBAC checks and
//! service-account tokens.
use super::*;

impl Cluster {
    /// Creates a namespace with labels.
    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels_json(labels)}
        }))
        .expect("namespace");
        self.block_on(
            Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns),
        )
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    }

    /// Sets (or with `None` removes) a namespace label.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"labels": {key: value}}});
        self.block_on(Api::<Namespace>::all(self.client.clone()).patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))
        .unwrap_or_else(|e| panic!("label namespace {name}: {e}"));
    }

    /// A Node object for the simulated `node` (no kubelet registers one
    /// here), with its addresses; deleted when the guard drops.
    pub fn node_object(&self, node: &Node) -> NodeObject<'_> {
        let obj: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
            "metadata": {"name": node.name},
        }))
        .expect("node");
        let api = Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone());
        self.block_on(api.create(&PostParams::default(), &obj))
            .unwrap_or_else(|e| panic!("create node {}: {e}", node.name));
        // Guarded from here: a failed status patch leaves nothing behind.
        let guard = NodeObject {
            cluster: self,
            name: node.name.clone(),
        };
        let status = json!({"status": {"addresses": [
            {"type": "InternalIP", "address": node.ip.to_string()},
            {"type": "InternalIP", "address": node.ip6.to_string()},
        ]}});
        self.block_on(api.patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        ))
        .unwrap_or_else(|e| panic!("node {} status: {e}", node.name));
        guard
    }

    /// Sets (or removes) a namespace annotation in the API.
    pub fn annotate_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.block_on(Api::<Namespace>::all(self.client.clone()).patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))
        .unwrap_or_else(|e| panic!("annotate namespace {name}: {e}"));
    }

    /// Creates a pod in the API on `node`, the simulated pod behind it (its
    /// cgroup named after the API's UID), starts its sandbox process, and
    /// marks it Running with its IP, as kubelet would.
    pub fn run_pod(&self, node: &Node, spec: PodSpec) -> Arc<Pod> {
        let pod = self.create_pod(node, spec);
        pod.start_sandbox();
        self.pod_running(node, &pod);
        pod
    }

    /// Creates the pod in the API and its simulated pod, but does not start
    /// it: no process, no IP in its status yet.
    pub fn create_pod(&self, node: &Node, mut spec: PodSpec) -> Arc<Pod> {
        let mut metadata = json!({
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": spec.labels,
            "annotations": spec.annotations,
        });
        if let Some((kind, name)) = &spec.owner {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": name,
                "uid": "00000000-0000-4000-8000-000000000000", "controller": true
            }]);
        }
        let mut container = json!({"name": "app", "image": "nodemesh.test/app:1"});
        if let Some(port) = spec.probe_port {
            container["readinessProbe"] = json!({"tcpSocket": {"port": port}});
        }
        let api_pod: K8sPod = serde_json::from_value(json!({
            "metadata": metadata,
            "spec": {
                "nodeName": node.name,
                "serviceAccountName": spec.service_account,
                "containers": [container],
            }
        }))
        .expect("pod");
        let created = self
            .block_on(
                Api::<K8sPod>::namespaced(self.client.clone(), &spec.namespace)
                    .create(&PostParams::default(), &api_pod),
            )
            .unwrap_or_else(|e| panic!("create pod {}/{}: {e}", spec.namespace, spec.name));
        spec.uid = created.metadata.uid.clone();
        node.pod(spec)
    }

    /// Patches the pod's status as kubelet does once its sandbox runs.
    pub fn pod_running(&self, node: &Node, pod: &Pod) {
        let [primary, other] = pod.ips();
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": node.host_ip().to_string(),
            "podIP": primary.to_string(),
            "podIPs": [{"ip": primary.to_string()}, {"ip": other.to_string()}],
            "qosClass": pod.qos_class(),
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        self.block_on(
            Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace).patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            ),
        )
        .unwrap_or_else(|e| panic!("patch status of {}: {e}", pod.key()));
    }

    /// Merges `status` into the pod's status.
    pub fn patch_pod_status(&self, pod: &Pod, status: serde_json::Value) {
        let patch = json!({ "status": status });
        self.block_on(
            Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace).patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .unwrap_or_else(|e| panic!("patch status of {}: {e}", pod.key()));
    }

    /// Creates a pod object on another (unsimulated) node with an address,
    /// Running: a remote endpoint for the service index.
    pub fn remote_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        ip: Ipv4Addr,
        service_account: &str,
    ) {
        let api_pod: K8sPod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "nodemesh.test/app:1"}],
            }
        }))
        .expect("pod");
        let api = Api::<K8sPod>::namespaced(self.client.clone(), namespace);
        self.block_on(api.create(&PostParams::default(), &api_pod))
            .unwrap_or_else(|e| panic!("create pod {namespace}/{name}: {e}"));
        let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}});
        self.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patch status of {namespace}/{name}: {e}"));
    }

    /// Deletes a Service.
    pub fn delete_service(&self, namespace: &str, name: &str) {
        self.block_on(
            Api::<Service>::namespaced(self.client.clone(), namespace)
                .delete(name, &DeleteParams::default()),
        )
        .unwrap_or_else(|e| panic!("delete service {namespace}/{name}: {e}"));
    }

    /// Server-side applies every document of a multi-document manifest, for
    /// real or as a dry run. Returns (kind, name) of each object.
    pub fn apply_manifests(
        &self,
        text: &str,
        dry_run: bool,
    ) -> Result<Vec<(String, String)>, String> {
        self.block_on(async {
            let mut applied = Vec::new();
            for doc in nodemesh_cli::install::documents(text) {
                let obj: DynamicObject =
                    serde_norway::from_str(doc).map_err(|e| format!("YAML: {e}\n{doc}"))?;
                let types = obj
                    .types
                    .clone()
                    .ok_or("a document without apiVersion/kind")?;
                let gvk =
                    kube::api::GroupVersionKind::try_from(&types).map_err(|e| e.to_string())?;
                let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                    .await
                    .map_err(|e| format!("{}: {e}", types.kind))?;
                let name = obj
                    .metadata
                    .name
                    .clone()
                    .ok_or("a document without a name")?;
                let api: Api<DynamicObject> = match (&caps.scope, &obj.metadata.namespace) {
                    (kube::discovery::Scope::Namespaced, Some(ns)) => {
                        Api::namespaced_with(self.client.clone(), ns, &ar)
                    }
                    _ => Api::all_with(self.client.clone(), &ar),
                };
                // kube-apiserver v1.20 panics on a server-side apply of an
                // APIService (its aggregator has no field manager): what
                // `kubectl apply` does instead, create or replace.
                if types.kind == "APIService" {
                    let pp = PostParams {
                        dry_run,
                        ..PostParams::default()
                    };
                    match api.create(&pp, &obj).await {
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            let mut obj = obj.clone();
                            let current = api
                                .get(&name)
                                .await
                                .map_err(|e| format!("{} {name}: {e}", types.kind))?;
                            obj.metadata.resource_version = current.metadata.resource_version;
                            api.replace(&name, &pp, &obj)
                                .await
                                .map_err(|e| format!("{} {name}: {e}", types.kind))?;
                        }
                        other => {
                            other.map_err(|e| format!("{} {name}: {e}", types.kind))?;
                        }
                    }
                    applied.push((types.kind, name));
                    continue;
                }
                let mut params = PatchParams::apply("nodemesh-tests").force();
                params.dry_run = dry_run;
                api.patch(&name, &params, &Patch::Apply(&obj))
                    .await
                    .map_err(|e| format!("{} {name}: {e}", types.kind))?;
                applied.push((types.kind, name));
            }
            Ok(applied)
        })
    }

    /// An object as the API server has it now (`None`: there is none).
    pub fn get_object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<serde_json::Value> {
        self.block_on(async {
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
            let (ar, _) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
            api.get_opt(name)
                .await
                .unwrap_or_else(|e| panic!("get {kind} {namespace}/{name}: {e}"))
                .map(|o| serde_json::to_value(o).expect("JSON"))
        })
    }

    /// Deletes every object a manifest names (missing ones are fine) but
    /// CustomResourceDefinitions: cluster-wide, they serve every test of
    /// the shared API server at once, and go with it.
    pub fn delete_manifests(&self, text: &str) {
        self.block_on(async {
            for doc in nodemesh_cli::install::documents(text) {
                let Ok(obj) = serde_norway::from_str::<DynamicObject>(doc) else {
                    continue;
                };
                let (Some(types), Some(name)) = (obj.types.clone(), obj.metadata.name.clone())
                else {
                    continue;
                };
                if types.kind == "CustomResourceDefinition" {
                    continue;
                }
                let Ok(gvk) = kube::api::GroupVersionKind::try_from(&types) else {
                    continue;
                };
                let Ok((ar, caps)) = kube::discovery::pinned_kind(&self.client, &gvk).await else {
                    continue;
                };
                let api: Api<DynamicObject> = match (&caps.scope, &obj.metadata.namespace) {
                    (kube::discovery::Scope::Namespaced, Some(ns)) => {
                        Api::namespaced_with(self.client.clone(), ns, &ar)
                    }
                    _ => Api::all_with(self.client.clone(), &ar),
                };
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        })
    }

    /// Whether the holder of `kubeconfig` may `verb` `resource` (in
    /// `namespace`), as the API server's RBAC says.
    pub fn can(
        &self,
        kubeconfig: &Path,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> bool {
        self.block_on(async {
            let client = client_from(kubeconfig).await;
            let review: k8s_openapi::api::authorization::v1::SelfSubjectAccessReview = serde_json::from_value(json!({
                "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace}}
            }))
            .expect("review");
            let api: Api<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview> = Api::all(client);
            let answer = api.create(&PostParams::default(), &review).await.expect("access review");
            answer.status.map(|s| s.allowed).unwrap_or(false)
        })
    }

    /// The Events in `namespace`: (involved object's name, reason, message).
    pub fn events(&self, namespace: &str) -> Vec<(String, String, String)> {
        self.block_on(async {
            let api: Api<k8s_openapi::api::core::v1::Event> =
                Api::namespaced(self.client.clone(), namespace);
            let list = api.list(&Default::default()).await.expect("list events");
            list.items
                .into_iter()
                .map(|e| {
                    (
                        e.involved_object.name.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default(),
                    )
                })
                .collect()
        })
    }

    /// Sets (or removes) a pod label in the API.
    pub fn label_pod(&self, pod: &Pod, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"labels": {key: value}}});
        self.block_on(
            Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace).patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .unwrap_or_else(|e| panic!("label pod {}: {e}", pod.key()));
    }

    /// Sets (or removes) a pod annotation in the API.
    pub fn annotate_pod(&self, pod: &Pod, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.block_on(
            Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace).patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .unwrap_or_else(|e| panic!("annotate pod {}: {e}", pod.key()));
    }

    /// A Running host-network pod on `node` (its address is the node's),
    /// labelled meshed: one the agent must never capture nor tunnel to.
    pub fn host_network_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &Node,
        service_account: &str,
    ) -> String {
        let api_pod: K8sPod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {nodemesh_core::names::MESH_LABEL: "enabled"}},
            "spec": {
                "nodeName": node.name,
                "hostNetwork": true,
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "nodemesh.test/app:1"}],
            }
        }))
        .expect("pod");
        let api = Api::<K8sPod>::namespaced(self.client.clone(), namespace);
        let created = self
            .block_on(api.create(&PostParams::default(), &api_pod))
            .unwrap_or_else(|e| panic!("create pod {namespace}/{name}: {e}"));
        let ip = node.host_ip().to_string();
        let status = json!({"status": {"phase": "Running", "hostIP": ip, "podIP": ip, "podIPs": [{"ip": ip}]}});
        self.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patch status of {namespace}/{name}: {e}"));
        created.metadata.uid.expect("a uid")
    }

    /// Deletes a pod at once (grace period 0).
    pub fn delete_pod(&self, pod: &Pod) {
        self.block_on(
            Api::<K8sPod>::namespaced(self.client.clone(), &pod.namespace)
                .delete(&pod.name, &DeleteParams::default().grace_period(0)),
        )
        .unwrap_or_else(|e| panic!("delete pod {}: {e}", pod.key()));
    }

    /// A ClusterIP Service `name` in `namespace`: port → targetPort, named
    /// "tcp". Returns its cluster IP.
    pub fn service(&self, namespace: &str, name: &str, port: u16, target_port: u16) -> Ipv4Addr {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "tcp", "port": port, "targetPort": target_port, "protocol": "TCP"}]}
        }))
        .expect("service");
        let created = self
            .block_on(
                Api::<Service>::namespaced(self.client.clone(), namespace)
                    .create(&PostParams::default(), &svc),
            )
            .unwrap_or_else(|e| panic!("create service {namespace}/{name}: {e}"));
        created
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .expect("a cluster IP")
    }

    /// An EndpointSlice (v1beta1: what 1.20 serves) for Service `service`
    /// with these pods as endpoints on `port`, `ready` or not.
    pub fn endpoint_slice(
        &self,
        namespace: &str,
        service: &str,
        port: u16,
        endpoints: &[(&Pod, &Node, bool)],
    ) {
        let eps: Vec<_> = endpoints
            .iter()
            .map(|(pod, node, ready)| {
                json!({
                    "addresses": [pod.ip.to_string()],
                    "conditions": {"ready": ready},
                    "topology": {"kubernetes.io/hostname": node.name},
                    "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name},
                })
            })
            .collect();
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-slice"), "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}],
        }))
        .expect("slice");
        let ar = ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        self.block_on(api.patch(
            &format!("{service}-slice"),
            &PatchParams::apply("nodemesh-tests").force(),
            &Patch::Apply(&obj),
        ))
        .unwrap_or_else(|e| panic!("apply endpoint slice for {namespace}/{service}: {e}"));
    }

    /// A bearer token for a service account (TokenRequest), valid 1h.
    pub fn token(&self, namespace: &str, service_account: &str) -> String {
        self.request_token(
            namespace,
            service_account,
            json!({"audiences": [], "expirationSeconds": 3600}),
        )
    }

    /// TokenRequest with `spec`: the token.
    fn request_token(
        &self,
        namespace: &str,
        service_account: &str,
        spec: serde_json::Value,
    ) -> String {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec
        });
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let resp: serde_json::Value = self
            .block_on(api.create_subresource(
                "token",
                service_account,
                &PostParams::default(),
                &body,
            ))
            .unwrap_or_else(|e| panic!("token for {namespace}/{service_account}: {e}"));
        resp["status"]["token"]
            .as_str()
            .expect("a token")
            .to_owned()
    }

    /// A token for a service account and `audience`, valid 1h; bound to a
    /// pod (name, uid) as a projected service-account token is, if given.
    pub fn bound_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<(&str, &str)>,
        audience: &str,
    ) -> String {
        let mut spec = json!({"audiences": [audience], "expirationSeconds": 3600});
        if let Some((name, uid)) = pod {
            spec["boundObjectRef"] =
                json!({"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid});
        }
        self.request_token(namespace, service_account, spec)
    }

    /// A node agent's pod in the API (there is no kubelet: the agent runs
    /// as a process on `node`): host network, labelled like the
    /// DaemonSet's, Running on the node's address. Returns its UID.
    pub fn agent_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &Node,
        service_account: &str,
    ) -> String {
        // Controlled by the install's DaemonSet (no controller runs here
        // to make it: the test plays its part), as the identity service
        // checks.
        let ds = self
            .block_on(
                Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(
                    self.client.clone(),
                    namespace,
                )
                .get_opt("nodemesh-agent"),
            )
            .ok()
            .flatten()
            .and_then(|d| d.metadata.uid);
        let owners = match ds {
            Some(uid) => json!([{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                 "name": "nodemesh-agent", "uid": uid, "controller": true}]),
            None => json!([]),
        };
        let api_pod: K8sPod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "nodemesh-agent"},
                         "ownerReferences": owners},
            "spec": {
                "nodeName": node.name,
                "hostNetwork": true,
                "serviceAccountName": service_account,
                "containers": [{"name": "agent", "image": "nodemesh.test/nodemesh:1"}],
            }
        }))
        .expect("pod");
        let api = Api::<K8sPod>::namespaced(self.client.clone(), namespace);
        let created = self
            .block_on(api.create(&PostParams::default(), &api_pod))
            .unwrap_or_else(|e| panic!("create pod {namespace}/{name}: {e}"));
        let ip = node.host_ip().to_string();
        let status = json!({"status": {"phase": "Running", "hostIP": ip, "podIP": ip, "podIPs": [{"ip": ip}]}});
        self.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patch status of {namespace}/{name}: {e}"));
        created.metadata.uid.expect("a uid")
    }

    /// A kubeconfig for this API server with `token`.
    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) {
        write_kubeconfig(path, self.port, &self.dir.join("pki/ca.crt"), token);
    }
}

/// A Node object of the test's, deleted on drop.
pub struct NodeObject<'c> {
    cluster: &'c Cluster,
    name: String,
}

impl Drop for NodeObject<'_> {
    fn drop(&mut self) {
        let api = Api::<k8s_openapi::api::core::v1::Node>::all(self.cluster.client.clone());
        let _ = self
            .cluster
            .block_on(api.delete(&self.name, &DeleteParams::default()));
    }
}
