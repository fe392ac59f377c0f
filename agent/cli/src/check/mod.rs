//! `nodemesh check [--pre]`: like `linkerd check`, one ✓/× line per check
//! with a hint for each ×; the exit code says whether all passed.
//!
//! - `--pre` (before installing): the API server answers, its version, the
//!   right to create what `nodemesh install` applies, and this machine (if
//!   it is a node): kernel BTF, cgroup v2, bpffs.
//! - after installing: the namespace, the `AuthorizationPolicy` CRD, the
//!   agent DaemonSet ready on every node and at this CLI's version, the
//!   identity service available, the trust anchors' and issuer's validity
//!   (days left), pods that could not be captured (their Events), the
//!   aggregated API available, and each agent's own report through it:
//!   eBPF attached, BTF, cgroup v2, a certificate for each meshed service
//!   account.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use clap::Args;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{ConfigMap, Event, Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams},
};
use nodemesh_core::pki;
use serde::Serialize;

/// What a Warning Event of a pod the agent could not capture is called.
const CAPTURE_FAILED: &str = "NodemeshCaptureFailed";
/// Certificates with fewer days left than this are flagged.
const DAYS_WARNING: u64 = 30;

/// `nodemesh check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Before installing: can nodemesh be installed here?
    #[arg(long)]
    pub pre: bool,
    /// The namespace nodemesh is (or will be) installed in.
    #[arg(long, default_value = "nodemesh")]
    pub namespace: String,
    /// Default: $KUBECONFIG, ~/.kube/config, or the in-cluster account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current one).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// `json`: one object per check.
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Outcome {
    pub check: String,
    pub ok: bool,
    /// What was found (✓) or what to do (×).
    pub detail: String,
}

fn pass(check: &str, detail: impl Into<String>) -> Outcome {
    Outcome {
        check: check.into(),
        ok: true,
        detail: detail.into(),
    }
}

fn fail(check: &str, hint: impl Into<String>) -> Outcome {
    Outcome {
        check: check.into(),
        ok: false,
        detail: hint.into(),
    }
}

/// Runs the checks: the text to print and whether all passed.
pub fn run(args: &CheckArgs) -> (String, bool) {
    let outcomes = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(checks(args)),
        Err(e) => vec![fail("runtime", e.to_string())],
    };
    let ok = outcomes.iter().all(|o| o.ok);
    let text = if args.output == "json" {
        serde_json::to_string_pretty(&outcomes).unwrap_or_default() + "\n"
    } else {
        let mut out = String::new();
        for o in &outcomes {
            let mark = if o.ok { "√" } else { "×" };
            out.push_str(&format!("{mark} {}: {}\n", o.check, o.detail));
        }
        out.push_str(if ok {
            "Status check results are √\n"
        } else {
            "Status check results are ×\n"
        });
        out
    };
    (text, ok)
}

async fn checks(args: &CheckArgs) -> Vec<Outcome> {
    let mut out = Vec::new();
    let client =
        match crate::agents::kube_client(args.kubeconfig.as_deref(), args.context.as_deref()).await
        {
            Ok(c) => c,
            Err(e) => {
                out.push(fail(
                    "kubeconfig",
                    format!("{e} (pass --kubeconfig, or set KUBECONFIG)"),
                ));
                return out;
            }
        };
    let version =
        match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                out.push(fail(
                    "API server",
                    format!("{e} (is the cluster up, the kubeconfig right?)"),
                ));
                return out;
            }
            Err(_) => {
                out.push(fail("API server", "no answer within 10s"));
                return out;
            }
        };
    out.push(pass(
        "API server",
        format!("answers ({})", version.git_version),
    ));
    out.push(
        match major_minor(&version.major, &version.minor, &version.git_version) {
            Some((1, minor)) if minor >= 20 => {
                pass("Kubernetes version", format!("1.{minor} (1.20 or later)"))
            }
            Some((major, minor)) => fail(
                "Kubernetes version",
                format!("{major}.{minor}: nodemesh needs 1.20 or later"),
            ),
            None => fail(
                "Kubernetes version",
                format!(
                    "cannot read {:?}: nodemesh needs 1.20 or later",
                    version.git_version
                ),
            ),
        },
    );
    if args.pre {
        out.extend(can_install(&client, &args.namespace).await);
        out.extend(this_machine(Path::new("/")));
    } else {
        out.extend(installed(&client, &args.namespace).await);
    }
    out
}

/// (major, minor) from `/version`: its fields (`minor` may be `27+`), else
/// its `gitVersion` (`v1.20.2`; some builds leave the fields empty).
fn major_minor(major: &str, minor: &str, git_version: &str) -> Option<(u32, u32)> {
    let num = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    if let (Some(a), Some(b)) = (num(major), num(minor)) {
        return Some((a, b));
    }
    let mut parts = git_version.trim_start_matches('v').split('.');
    Some((num(parts.next()?)?, num(parts.next()?)?))
}

/// The right to create what `nodemesh install` applies.
async fn can_install(client: &Client, namespace: &str) -> Vec<Outcome> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for (group, resource, namespaced) in [
        ("", "namespaces", false),
        ("apiextensions.k8s.io", "customresourcedefinitions", false),
        ("rbac.authorization.k8s.io", "clusterroles", false),
        ("rbac.authorization.k8s.io", "clusterrolebindings", false),
        ("rbac.authorization.k8s.io", "roles", true),
        ("", "serviceaccounts", true),
        ("", "secrets", true),
        ("", "configmaps", true),
        ("", "services", true),
        ("apps", "deployments", true),
        ("apps", "daemonsets", true),
    ] {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("create".into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    namespace: namespaced.then(|| namespace.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(resource),
            Err(e) => {
                return vec![fail(
                    "RBAC to install",
                    format!("cannot ask the API server: {e}"),
                )];
            }
        }
    }
    vec![if missing.is_empty() {
        pass(
            "RBAC to install",
            "may create everything nodemesh install applies",
        )
    } else {
        fail(
            "RBAC to install",
            format!(
                "may not create {} (ask for cluster-admin, or bind these)",
                missing.join(", ")
            ),
        )
    }]
}

/// What a node needs, if this machine is one (`root`: `/`, or a test's).
pub fn this_machine(root: &Path) -> Vec<Outcome> {
    let mut out = Vec::new();
    out.push(if root.join("sys/kernel/btf/vmlinux").exists() {
        pass("this machine: kernel BTF", "/sys/kernel/btf/vmlinux")
    } else {
        fail(
            "this machine: kernel BTF",
            "no /sys/kernel/btf/vmlinux: nodes need a kernel built with CONFIG_DEBUG_INFO_BTF",
        )
    });
    let mounts = std::fs::read_to_string(root.join("proc/mounts")).unwrap_or_default();
    let has = |fs: &str| {
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(fs))
    };
    out.push(if has("cgroup2") {
        pass("this machine: cgroup v2", "mounted")
    } else {
        fail(
            "this machine: cgroup v2",
            "no cgroup2 mount: nodes need cgroup v2 (unified or hybrid)",
        )
    });
    out.push(if has("bpf") || root.join("sys/fs/bpf").is_dir() {
        pass("this machine: bpffs", "/sys/fs/bpf")
    } else {
        fail(
            "this machine: bpffs",
            "no /sys/fs/bpf: mount bpffs there (the agent pins its maps)",
        )
    });
    out
}

/// Days from now to `t` (0 when past).
fn days_left(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now())
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0)
}

/// The validity of the certificates in `pem`: the earliest end.
fn validity(check: &str, pem: Option<&str>) -> Outcome {
    let Some(pem) = pem else {
        return fail(check, "missing (reinstall, or restore it from your files)");
    };
    let certs = match pki::certs_from_pem(pem, check) {
        Ok(c) => c,
        Err(e) => return fail(check, e.to_string()),
    };
    let mut earliest: Option<SystemTime> = None;
    for der in &certs {
        match pki::cert_info(der) {
            Ok(info) => earliest = Some(earliest.map_or(info.not_after, |e| e.min(info.not_after))),
            Err(e) => return fail(check, e.to_string()),
        }
    }
    let Some(end) = earliest else {
        return fail(check, "no certificate");
    };
    let days = days_left(end);
    if end <= SystemTime::now() {
        fail(check, "expired: rotate it (docs/identity.md)")
    } else if days < DAYS_WARNING {
        fail(
            check,
            format!("{days} days left: rotate it soon (docs/identity.md)"),
        )
    } else {
        pass(check, format!("valid, {days} days left"))
    }
}

async fn installed(client: &Client, ns: &str) -> Vec<Outcome> {
    let mut out = Vec::new();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get_opt(ns).await {
        Ok(Some(_)) => out.push(pass("namespace", ns.to_owned())),
        Ok(None) => {
            out.push(fail(
                "namespace",
                format!("{ns} not found: nodemesh install --namespace {ns} | kubectl apply -f -"),
            ));
            return out;
        }
        Err(e) => {
            out.push(fail("namespace", e.to_string()));
            return out;
        }
    }
    let gvk = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
    let crds: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    out.push(
        match crds
            .get_opt("authorizationpolicies.policy.nodemesh.io")
            .await
        {
            Ok(Some(crd)) => {
                let established = crd.data["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Established" && c["status"] == "True")
                    });
                if established {
                    pass("AuthorizationPolicy CRD", "established")
                } else {
                    fail("AuthorizationPolicy CRD", "not established yet")
                }
            }
            Ok(None) => fail(
                "AuthorizationPolicy CRD",
                "missing: apply nodemesh install again",
            ),
            Err(e) => fail("AuthorizationPolicy CRD", e.to_string()),
        },
    );
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    match daemonsets.get_opt("nodemesh-agent").await {
        Ok(Some(ds)) => {
            let s = ds.status.unwrap_or_default();
            let (want, ready, updated) = (
                s.desired_number_scheduled,
                s.number_ready,
                s.updated_number_scheduled.unwrap_or(0),
            );
            out.push(if want > 0 && ready == want && updated == want {
                pass("agents", format!("{ready}/{want} nodes ready"))
            } else if want == 0 {
                fail("agents", "scheduled on no node: check the DaemonSet's node selector and taints")
            } else {
                fail(
                    "agents",
                    format!(
                        "{ready}/{want} nodes ready, {updated} updated: kubectl -n {ns} get pods -l app.kubernetes.io/name=nodemesh-agent (and their logs)"
                    ),
                )
            });
            let image = ds
                .spec
                .template
                .spec
                .and_then(|p| p.containers.into_iter().next())
                .and_then(|c| c.image)
                .unwrap_or_default();
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
            let mine = env!("CARGO_PKG_VERSION");
            out.push(if tag == mine {
                pass("agent version", format!("{mine}, as this CLI"))
            } else {
                fail(
                    "agent version",
                    format!("agents run {image:?}, this CLI is {mine}: upgrade one to match"),
                )
            });
        }
        Ok(None) => out.push(fail(
            "agents",
            format!("no DaemonSet nodemesh-agent in {ns}: apply nodemesh install again"),
        )),
        Err(e) => out.push(fail("agents", e.to_string())),
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    out.push(match deployments.get_opt("nodemesh-identity").await {
        Ok(Some(d)) => {
            let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
            if available > 0 {
                pass("identity service", format!("{available} available"))
            } else {
                fail(
                    "identity service",
                    format!(
                        "none available: new pods get no certificates (kubectl -n {ns} describe deployment nodemesh-identity)"
                    ),
                )
            }
        }
        Ok(None) => fail("identity service", "no Deployment nodemesh-identity: apply nodemesh install again"),
        Err(e) => fail("identity service", e.to_string()),
    });
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    out.push(
        match configmaps.get_opt("nodemesh-identity-trust-anchors").await {
            Ok(cm) => validity(
                "trust anchors",
                cm.as_ref()
                    .and_then(|c| c.data.as_ref())
                    .and_then(|d| d.get("ca-bundle.crt"))
                    .map(String::as_str),
            ),
            Err(e) => fail("trust anchors", e.to_string()),
        },
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    out.push(match secrets.get_opt("nodemesh-identity-issuer").await {
        Ok(secret) => {
            let pem = secret
                .as_ref()
                .and_then(|s| s.data.as_ref())
                .and_then(|d| d.get("tls.crt"))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned());
            validity("issuer", pem.as_deref())
        }
        Err(kube::Error::Api(s)) if s.code == 403 => fail(
            "issuer",
            "may not read the Secret nodemesh-identity-issuer (run as an admin)",
        ),
        Err(e) => fail("issuer", e.to_string()),
    });
    let events: Api<Event> = Api::all(client.clone());
    out.push(
        match events
            .list(&ListParams::default().fields(&format!("reason={CAPTURE_FAILED}")))
            .await
        {
            Ok(list) => {
                let recent: Vec<String> = list
                    .items
                    .iter()
                    .filter(|e| {
                        e.last_timestamp
                            .as_ref()
                            .map(|t| t.0.as_second())
                            .or_else(|| e.event_time.as_ref().map(|t| t.0.as_second()))
                            .is_some_and(|s| {
                                SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)
                                    + Duration::from_secs(3600)
                                    > SystemTime::now()
                            })
                    })
                    .map(|e| {
                        format!(
                            "{}/{}",
                            e.involved_object.namespace.as_deref().unwrap_or_default(),
                            e.involved_object.name.as_deref().unwrap_or_default()
                        )
                    })
                    .collect();
                if recent.is_empty() {
                    pass("capture", "no pod failed to be captured in the last hour")
                } else {
                    fail(
                        "capture",
                        format!(
                            "not captured (refused, fail closed): {} — kubectl describe pod shows why",
                            recent.join(", ")
                        ),
                    )
                }
            }
            Err(e) => fail("capture", e.to_string()),
        },
    );
    out.extend(through_the_api(client).await);
    out
}

/// The aggregated API (what stat, tap and the dashboard read through), and
/// every agent's own view of its node through it: eBPF attached, the
/// kernel's BTF, cgroup v2, a certificate for each meshed service account.
async fn through_the_api(client: &Client) -> Vec<Outcome> {
    use nodemesh_core::{
        names::{API_GROUP, API_VERSION},
        wire::AgentList,
    };
    let mut out = Vec::new();
    let name = format!("{API_VERSION}.{API_GROUP}");
    let gvk = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    let services: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    match services.get_opt(&name).await {
        Ok(Some(svc)) => {
            let available = svc.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Available");
            match available {
                Some(c) if c["status"] == "True" => {
                    out.push(pass("aggregated API", format!("{name} available")))
                }
                Some(c) => {
                    out.push(fail(
                        "aggregated API",
                        format!(
                            "{name} not available: {} — stat, tap and the dashboard cannot read the agents (is the identity service up?)",
                            c["message"].as_str().unwrap_or("no reason given")
                        ),
                    ));
                    return out;
                }
                None => {
                    out.push(fail(
                        "aggregated API",
                        format!("{name}: not checked by the API server yet; try again"),
                    ));
                    return out;
                }
            }
        }
        Ok(None) => {
            out.push(fail(
                "aggregated API",
                format!("no APIService {name}: apply nodemesh install again"),
            ));
            return out;
        }
        Err(e) => {
            out.push(fail("aggregated API", e.to_string()));
            return out;
        }
    }
    let req = match hyper::Request::get(format!("/apis/{API_GROUP}/{API_VERSION}/agents"))
        .body(Vec::new())
    {
        Ok(r) => r,
        Err(e) => {
            out.push(fail("agents", e.to_string()));
            return out;
        }
    };
    let list: AgentList =
        match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
            Ok(Ok(l)) => l,
            Ok(Err(kube::Error::Api(s))) if s.code == 403 => {
                out.push(fail(
                    "agents",
                    format!("{} (bind the ClusterRole nodemesh-viewer)", s.message),
                ));
                return out;
            }
            Ok(Err(e)) => {
                out.push(fail(
                    "agents",
                    format!("cannot read them through the API server: {e}"),
                ));
                return out;
            }
            Err(_) => {
                out.push(fail("agents", "the API server did not answer within 30s"));
                return out;
            }
        };
    if list.agents.is_empty() {
        out.push(fail("agents", "no agent pod is running"));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    for agent in &list.agents {
        let check = format!("agent on {}", agent.node);
        let Some(r) = &agent.report else {
            out.push(fail(
                &check,
                format!(
                    "unreachable: {} (kubectl -n <namespace> logs {})",
                    agent.error.as_deref().unwrap_or("no answer"),
                    agent.pod
                ),
            ));
            continue;
        };
        let mut problems = Vec::new();
        if !r.ready {
            problems
                .push("eBPF not attached or the node's pods not read yet (see its log)".to_owned());
        }
        if !r.btf {
            problems.push("the kernel has no BTF (/sys/kernel/btf/vmlinux)".to_owned());
        }
        let missing: Vec<&str> = r
            .certificates
            .iter()
            .filter(|c| c.not_after.is_none_or(|t| t <= now))
            .map(|c| c.identity.as_str())
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "no certificate for {} (is the identity service reachable from the node?)",
                missing.join(", ")
            ));
        }
        let soonest = r
            .certificates
            .iter()
            .filter_map(|c| c.not_after)
            .min()
            .map(|t| format!(", the first expires in {}h", t.saturating_sub(now) / 3600))
            .unwrap_or_default();
        let budgets = match (r.max_connections, r.memory_limit) {
            (0, _) => String::new(),
            (n, Some(limit)) => format!(
                ", memory limit {} MiB: budgets {n} connections ({} open) and {} requests",
                limit >> 20,
                r.connections_in_use,
                r.max_requests
            ),
            (n, None) => format!(
                ", no memory limit: budgets {n} connections ({} open) and {} requests",
                r.connections_in_use, r.max_requests
            ),
        };
        let facts = format!(
            "{}, kernel {}, BTF, cgroup v2 at {}, eBPF attached, {} meshed pods, {} certificates{soonest}{budgets}",
            r.version,
            r.kernel,
            r.cgroup_root,
            r.meshed_pods,
            r.certificates.len() - missing.len(),
        );
        out.push(if problems.is_empty() {
            pass(&check, facts)
        } else {
            fail(&check, problems.join("; "))
        });
        if r.version != env!("CARGO_PKG_VERSION") {
            out.push(fail(
                &check,
                format!(
                    "runs {}, this CLI is {}: upgrade one to match",
                    r.version,
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests;
