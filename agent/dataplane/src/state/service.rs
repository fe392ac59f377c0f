//! Services in the store: each Service's cluster IPs and TCP ports, and the
//! endpoints its EndpointSlices (or Endpoints) list, joined with the pods
//! behind them when asked. Only the fields used are kept.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use nodemesh_core::wire::{EndpointView, ServiceView};

use super::pod::Pod;

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// What a Service contributes: its cluster IPs and TCP ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
}

/// One EndpointSlice (or one Endpoints object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: ObjectKey,
    /// (port name, port) pairs, TCP only.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Services and their endpoints.
#[derive(Debug, Default)]
pub(super) struct Services {
    pub(super) services: HashMap<ObjectKey, ServiceInfo>,
    pub(super) slices: HashMap<ObjectKey, SliceInfo>,
}

impl Services {
    /// Every Service VIP:port with its endpoints, sorted; `pod` finds the
    /// pod that owns an endpoint address.
    pub(super) fn views<'a>(&'a self, pod: impl Fn(IpAddr) -> Option<&'a Pod>) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .services
            .iter()
            .flat_map(|(key, svc)| {
                let pod = &pod;
                svc.cluster_ips.iter().flat_map(move |ip| {
                    svc.ports
                        .iter()
                        .map(move |port| self.view(key, SocketAddr::new(*ip, port.port), port, pod))
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name, a.addr).cmp(&(&b.namespace, &b.name, b.addr)));
        out
    }

    fn view<'a>(
        &'a self,
        key: &ObjectKey,
        addr: SocketAddr,
        port: &ServicePort,
        pod: &impl Fn(IpAddr) -> Option<&'a Pod>,
    ) -> ServiceView {
        let mut endpoints = Vec::new();
        for slice in self.slices.values().filter(|s| &s.service == key) {
            // The slice port with the Service port's name carries the target port.
            let Some(target) = slice
                .ports
                .iter()
                .find(|(name, _)| *name == port.name)
                .map(|(_, p)| *p)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                for ip in &ep.addresses {
                    let pod = pod(*ip);
                    endpoints.push(EndpointView {
                        addr: SocketAddr::new(*ip, target),
                        node: ep.node.clone().or_else(|| pod.and_then(|p| p.node.clone())),
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        identity: pod.and_then(|p| p.identity()).map(|id| id.uri().to_owned()),
                        meshed: pod.is_some_and(Pod::meshed),
                    });
                }
            }
        }
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        ServiceView {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            addr,
            port_name: port.name.clone(),
            endpoints,
        }
    }
}
