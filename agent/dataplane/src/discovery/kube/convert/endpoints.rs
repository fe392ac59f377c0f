//! Services and their endpoints: EndpointSlice `v1` and `v1beta1`, or core
//! Endpoints, reduced to what the state keeps.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use nodemesh_core::names::PortSet;
use serde::Deserialize;
use tracing::warn;

use super::{meta_key, opaque_ports};
use crate::state::{EndpointInfo, ObjectKey, ServiceInfo, ServicePort, SliceInfo};

pub(in crate::discovery::kube) fn service_info(s: &Service) -> ServiceInfo {
    let spec = s.spec.as_ref();
    let mut cluster_ips: Vec<IpAddr> = spec
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .chain(spec.and_then(|s| s.cluster_ip.as_ref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    let ports = spec
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.filter(|n| !n.is_empty()),
                port: u16::try_from(p.port).ok()?,
                app_protocol: p.app_protocol.filter(|a| !a.is_empty()),
            })
        })
        .collect();
    let opaque_ports = opaque_ports(s.metadata.annotations.as_ref()).unwrap_or_else(|problem| {
        tracing::warn!(service = ?s.metadata.name, namespace = ?s.metadata.namespace, %problem, "Service annotation ignored");
        PortSet::default()
    });
    let prefer_zone = matches!(
        spec.and_then(|s| s.traffic_distribution.as_deref()),
        Some("PreferClose" | "PreferSameZone")
    );
    ServiceInfo {
        cluster_ips,
        ports,
        opaque_ports,
        prefer_zone,
    }
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Node's zone (and a v1beta1 endpoint's topology key for it).
pub(in crate::discovery::kube) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

pub(in crate::discovery::kube) fn slice_v1(s: &EndpointSlice) -> Option<SliceInfo> {
    let service = ObjectKey {
        namespace: s.metadata.namespace.clone()?,
        name: s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone(),
    };
    let ports = s
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.clone().filter(|n| !n.is_empty()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = s
        .endpoints
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            EndpointInfo {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                node: e.node_name.clone(),
                zone: e.zone.clone(),
                for_zones: e
                    .hints
                    .as_ref()
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|zones| zones.iter().map(|z| z.name.clone()).collect()),
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            }
        })
        .collect();
    Some(SliceInfo {
        service,
        ports,
        endpoints,
    })
}

/// `discovery.k8s.io/v1beta1`, which the k8s-openapi types no longer
/// carry: the fields read from JSON. A list or map may be absent or
/// `null` (a slice of a Service scaled to zero says `endpoints: null`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BetaSlice {
    #[serde(default, deserialize_with = "null_is_default")]
    endpoints: Vec<BetaEndpoint>,
    #[serde(default, deserialize_with = "null_is_default")]
    ports: Vec<BetaPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BetaEndpoint {
    #[serde(default, deserialize_with = "null_is_default")]
    addresses: Vec<String>,
    #[serde(default, deserialize_with = "null_is_default")]
    conditions: BetaConditions,
    #[serde(default, deserialize_with = "null_is_default")]
    topology: BTreeMap<String, String>,
    #[serde(default)]
    node_name: Option<String>,
}

/// A `null` reads as the type's default, as an absent field does.
fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Default, Deserialize)]
struct BetaConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct BetaPort {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

pub(in crate::discovery::kube) fn slice_v1beta1(s: &DynamicObject) -> Option<SliceInfo> {
    let service = ObjectKey {
        namespace: s.metadata.namespace.clone()?,
        name: s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone(),
    };
    let beta: BetaSlice = match serde_json::from_value(s.data.clone()) {
        Ok(b) => b,
        Err(e) => {
            warn!(slice = ?s.metadata.name, error = %e, "malformed v1beta1 EndpointSlice ignored");
            return None;
        }
    };
    let ports = beta
        .ports
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.filter(|n| !n.is_empty()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = beta
        .endpoints
        .into_iter()
        .map(|e| {
            let ready = e.conditions.ready.unwrap_or(true);
            EndpointInfo {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                for_zones: None,
                node: e
                    .node_name
                    .or_else(|| e.topology.get("kubernetes.io/hostname").cloned()),
                zone: e.topology.get(ZONE_LABEL).cloned(),
                ready,
                serving: e.conditions.serving.unwrap_or(ready),
                terminating: e.conditions.terminating.unwrap_or(false),
            }
        })
        .collect();
    Some(SliceInfo {
        service,
        ports,
        endpoints,
    })
}

/// Core Endpoints: one object per Service, subsets of ready and not-ready
/// addresses.
pub(in crate::discovery::kube) fn endpoints_v1(e: &Endpoints) -> Option<SliceInfo> {
    let service = meta_key(&e.metadata)?;
    let mut ports = Vec::new();
    let mut endpoints = Vec::new();
    for subset in e.subsets.as_deref().unwrap_or_default() {
        for p in subset.ports.as_deref().unwrap_or_default() {
            if p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                && let Ok(port) = u16::try_from(p.port)
            {
                let entry = (p.name.clone().filter(|n| !n.is_empty()), port);
                if !ports.contains(&entry) {
                    ports.push(entry);
                }
            }
        }
        for (addresses, ready) in [
            (&subset.addresses, true),
            (&subset.not_ready_addresses, false),
        ] {
            for a in addresses.as_deref().unwrap_or_default() {
                endpoints.push(EndpointInfo {
                    addresses: a.ip.parse().into_iter().collect(),
                    node: a.node_name.clone(),
                    ready,
                    serving: ready,
                    ..EndpointInfo::default()
                });
            }
        }
    }
    Some(SliceInfo {
        service,
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1beta1_slices_are_read_from_json() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": "node-1"}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "terminating": true}}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]
        }))
        .unwrap();
        let slice = slice_v1beta1(&obj).expect("a slice");
        assert_eq!(slice.service.name, "web");
        assert_eq!(slice.ports, vec![(Some("http".into()), 8080)]);
        assert_eq!(slice.endpoints[0].node.as_deref(), Some("node-1"));
        assert!(slice.endpoints[0].ready && slice.endpoints[0].serving);
        assert!(!slice.endpoints[1].ready && slice.endpoints[1].terminating);
    }

    #[test]
    fn a_v1beta1_slice_with_no_endpoints_is_an_empty_slice_not_a_malformed_one() {
        // What the API server sends for a Service scaled to zero.
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": null,
            "ports": null
        }))
        .unwrap();
        let slice = slice_v1beta1(&obj).expect("an empty slice");
        assert!(slice.endpoints.is_empty() && slice.ports.is_empty());
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": ["10.1.0.2"], "conditions": null, "topology": null}],
            "ports": [{"name": null, "port": 80}]
        }))
        .unwrap();
        let slice = slice_v1beta1(&obj).expect("a slice");
        assert!(slice.endpoints[0].ready, "no conditions: ready");
        assert_eq!(slice.ports, vec![(None, 80)]);
    }
}
