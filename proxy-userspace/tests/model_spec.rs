//! SPEC.md sections 1, 2, 4 and 8 (what the model decides), as tables.
//!
//! Each case is a set of objects (multi-document YAML) and the frontends the
//! model must produce, written
//! `[Kind ]vip:port/PROTO ns/name:portname -> backends[; flags]`:
//! - `Kind` is left out for ClusterIP;
//! - backends are `ip:port` plus ` local` / ` terminating`, or, when there is
//!   none, `reject` or `drop`;
//! - flags, each only when it holds: `policy Local`, `snat`,
//!   `cluster: <backends>` (only when they differ from the backends) and
//!   `from <cidrs>` (loadBalancerSourceRanges).
//!
//! Then the health checks, `health PORT ns/name: N local`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;
use proxy_userspace::model::{
    cluster_endpoints, desired_state, local_endpoints, Backend, DesiredState, Endpoint, Frontend,
    FrontendKind, Hint, Model, ModelConfig, ModelUpdate, ServicePortName, Snapshot,
};
use serde::Deserialize;

struct Case {
    name: &'static str,
    node: &'static str,
    proxy_name: Option<&'static str>,
    objects: &'static str,
    want: &'static [&'static str],
}

/// The addresses NodePorts answer on in every case: two IPv4, one IPv6.
const NODE_ADDRESSES: [&str; 3] = ["192.0.2.10", "192.0.2.11", "2001:db8:ff::10"];

const fn case(name: &'static str, objects: &'static str, want: &'static [&'static str]) -> Case {
    Case {
        name,
        node: "node-a",
        proxy_name: None,
        objects,
        want,
    }
}

fn config_for(case: &Case) -> ModelConfig {
    ModelConfig {
        node_name: case.node.to_owned(),
        proxy_name: case.proxy_name.map(str::to_owned),
        node_addresses: NODE_ADDRESSES
            .iter()
            .map(|ip| ip.parse().expect("an IP"))
            .collect(),
        ..ModelConfig::default()
    }
}

const CASES: &[Case] = &[
    // 1.1: what is skipped.
    case(
        "1.1 type ExternalName is skipped",
        r#"
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: db.example.org, clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[],
    ),
    case(
        "1.1 clusterIP None (headless) is skipped, whatever clusterIPs says",
        r#"
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, clusterIPs: [198.18.100.1], ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: headless-1, labels: {kubernetes.io/service-name: headless}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[],
    ),
    case(
        "1.1 service-proxy-name label (any value) is skipped when kproxy has no proxy name",
        r#"
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: empty-label, labels: {service.kubernetes.io/service-proxy-name: ""}}
spec: {clusterIP: 198.18.100.2, ports: [{port: 80}]}
---
kind: Service
metadata: {name: ours}
spec: {clusterIP: 198.18.100.3, ports: [{port: 80}]}
"#,
        &["198.18.100.3:80/TCP default/ours: -> reject"],
    ),
    Case {
        name: "1.1 with a proxy name, only Services labelled with that name are served",
        node: "node-a",
        proxy_name: Some("kproxy"),
        objects: r#"
kind: Service
metadata: {name: ours, labels: {service.kubernetes.io/service-proxy-name: kproxy}}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}
spec: {clusterIP: 198.18.100.2, ports: [{port: 80}]}
---
kind: Service
metadata: {name: unlabelled}
spec: {clusterIP: 198.18.100.3, ports: [{port: 80}]}
"#,
        want: &["198.18.100.1:80/TCP default/ours: -> reject"],
    },
    case(
        "1.1 a Service labelled service.kubernetes.io/headless is skipped",
        r#"
kind: Service
metadata: {name: web, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[],
    ),
    case(
        "1.1 an EndpointSlice labelled service.kubernetes.io/headless is ignored",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ""}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.2]}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.2:80"],
    ),
    case(
        "1.1 a Service without clusterIP gets no frontend at all",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: "", ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[],
    ),
    case(
        "1.1 a NodePort or LoadBalancer Service without clusterIP is skipped, externalIPs and ingress IPs too",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  ipFamilies: [IPv4, IPv6]
  externalIPs: [203.0.113.5, "2001:db8:ee::5"]
  ports: [{port: 80, nodePort: 30080}]
---
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: ""
  clusterIPs: [""]
  externalIPs: [203.0.113.6]
  ports: [{port: 80, nodePort: 30081}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[],
    ),
    // 1.2: which slices belong to a Service.
    case(
        "1.2 slices belong by kubernetes.io/service-name in the Service's namespace",
        r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-other-ns, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.2]}]
---
kind: EndpointSlice
metadata: {name: web-unlabelled, namespace: shop}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.3]}]
---
kind: EndpointSlice
metadata: {name: web-wrong-label, namespace: shop, labels: {app: web, kubernetes.io/service-name: webapp}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.4]}]
"#,
        &["198.18.100.1:80/TCP shop/web: -> 198.19.0.1:80"],
    ),
    case(
        "1.2 managed-by is not checked: hand-made slices count",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata:
  name: web-by-hand
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: me.example.org}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:80"],
    ),
    case(
        "1.2 all slices of a Service merge",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.19.0.2]}, {addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.19.0.3]}]
"#,
        &["198.18.100.1:80/TCP default/web:http -> 198.19.0.1:8080, 198.19.0.2:8080, 198.19.0.3:8080"],
    ),
    case(
        "1.2 only slices of the frontend's address family; FQDN slices are ignored",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ["2001:db8:1::1"]}]
---
kind: EndpointSlice
metadata: {name: web-fqdn, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.9]}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:80"],
    ),
    // 1.3: joining ports.
    case(
        "1.3 ports join by name, never by number; targetPort is never read",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{name: http, port: 80, targetPort: 9999}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: metrics, port: 80}, {name: http, port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &["198.18.100.1:80/TCP default/web:http -> 198.19.0.1:8080"],
    ),
    case(
        "1.3 ports join by protocol too (unset means TCP)",
        r#"
kind: Service
metadata: {name: dns}
spec: {clusterIP: 198.18.100.10, ports: [{name: dns, port: 53, protocol: UDP}]}
---
kind: EndpointSlice
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353}, {name: dns, port: 53, protocol: UDP}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &["198.18.100.10:53/UDP default/dns:dns -> 198.19.0.1:53"],
    ),
    case(
        "1.3 unnamed ports: unset and empty names are the same name",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080}, {name: http, port: 8081}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.2]}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080, 198.19.0.2:8080"],
    ),
    case(
        "1.3 traffic goes to addresses[0] only",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1, 198.19.0.2]}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080"],
    ),
    case(
        "1.3 slice ports without a number are ignored",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &["198.18.100.1:80/TCP default/web:http -> reject"],
    ),
    case(
        "1.3 duplicate ip:port across slices collapse, preferring the non-terminating copy",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.19.0.2], conditions: {ready: false, serving: true, terminating: true}}
---
kind: EndpointSlice
metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], conditions: {ready: true}}
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080"],
    ),
    case(
        "1.3 duplicate ip:port where every copy terminates stays one backend",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], conditions: {ready: false, terminating: true}}]
---
kind: EndpointSlice
metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], conditions: {ready: false, terminating: true}}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 terminating"],
    ),
    // 1.4: conditions and locality.
    case(
        "1.4 ready unset means ready",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], conditions: {}}
- {addresses: [198.19.0.2]}
- {addresses: [198.19.0.3], conditions: {ready: false, serving: true, terminating: true}}
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080, 198.19.0.2:8080"],
    ),
    case(
        "1.4 serving unset means serving",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], conditions: {ready: false, terminating: true}}]
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 terminating"],
    ),
    case(
        "1.4 terminating unset means not terminating",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], conditions: {ready: false, serving: true}}]
"#,
        &["198.18.100.1:80/TCP default/web: -> reject"],
    ),
    case(
        "1.4 an endpoint is local when nodeName is this node's name",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a}
- {addresses: [198.19.0.2], nodeName: node-b}
- {addresses: [198.19.0.3]}
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 local, 198.19.0.2:8080, 198.19.0.3:8080"],
    ),
    // 1.5: the cluster set.
    case(
        "1.5 the cluster set is the ready endpoints",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], conditions: {ready: true, serving: true, terminating: false}}
- {addresses: [198.19.0.2], conditions: {ready: false, serving: false, terminating: false}}
- {addresses: [198.19.0.3], conditions: {ready: false, serving: true, terminating: true}}
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080"],
    ),
    case(
        "1.5 no ready endpoint: the serving and terminating ones (graceful termination)",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-a}
- {addresses: [198.19.0.2], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [198.19.0.3], conditions: {ready: false, serving: true, terminating: false}}
- {addresses: [198.19.0.4], conditions: {ready: false, serving: true, terminating: true}}
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 local terminating, 198.19.0.4:8080 terminating"],
    ),
    // Section 2: ClusterIP frontends.
    case(
        "2 dual-stack: one frontend per clusterIP, each with its own family",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, clusterIPs: [198.18.100.1, "2001:db8:100::1"], ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8:1::1"]}]
"#,
        &[
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080",
            "[2001:db8:100::1]:80/TCP default/web: -> [2001:db8:1::1]:8080",
        ],
    ),
    case(
        "2 clusterIPs wins over clusterIP",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, clusterIPs: ["2001:db8:100::1"], ports: [{port: 80}]}
"#,
        &["[2001:db8:100::1]:80/TCP default/web: -> reject"],
    ),
    case(
        "2 the same port for TCP and UDP is two frontends",
        r#"
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 198.18.100.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
endpoints: [{addresses: [198.19.0.1]}, {addresses: [198.19.0.2], conditions: {ready: false}}]
"#,
        &[
            "198.18.100.10:53/TCP kube-system/dns:dns-tcp -> 198.19.0.1:53",
            "198.18.100.10:53/UDP kube-system/dns:dns -> 198.19.0.1:53",
        ],
    ),
    case(
        "2 SCTP ports are frontends too",
        r#"
kind: Service
metadata: {name: sig}
spec: {clusterIP: 198.18.100.1, ports: [{name: sig, port: 3868, protocol: SCTP}]}
---
kind: EndpointSlice
metadata: {name: sig-1, labels: {kubernetes.io/service-name: sig}}
addressType: IPv4
ports: [{name: sig, port: 3868, protocol: SCTP}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &["198.18.100.1:3868/SCTP default/sig:sig -> 198.19.0.1:3868"],
    ),
    case(
        "2 an unparseable clusterIP is skipped, the others still work",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIPs: [198.18.100.300, "2001:db8:100::1"], ports: [{port: 80}]}
"#,
        &["[2001:db8:100::1]:80/TCP default/web: -> reject"],
    ),
    case(
        "2 every Service port is a frontend; each joins its own slice port",
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{name: http, port: 80}, {name: https, port: 443}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: https, port: 8443}, {name: http, port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[
            "198.18.100.1:80/TCP default/web:http -> 198.19.0.1:8080",
            "198.18.100.1:443/TCP default/web:https -> 198.19.0.1:8443",
        ],
    ),
    case(
        "2 two Services claiming one frontend: the lowest namespace/name wins",
        r#"
kind: Service
metadata: {name: web, namespace: zeta}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: web, namespace: alpha}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: zeta, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &["198.18.100.1:80/TCP alpha/web: -> reject"],
    ),    // Section 2: NodePort frontends.
    case(
        "2 NodePort: one frontend per node address of the Service's family, port = nodePort",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 198.18.100.1
  ipFamilies: [IPv4]
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], nodeName: node-b}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080",
        ],
    ),
    case(
        "2 NodePort: an IPv6-only Service gets only the IPv6 node address",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIPs: ["2001:db8:100::1"]
  ipFamilies: [IPv6]
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8:1::1"]}]
"#,
        &[
            "NodePort [2001:db8:ff::10]:30080/TCP default/web: -> [2001:db8:1::1]:8080; snat",
            "[2001:db8:100::1]:80/TCP default/web: -> [2001:db8:1::1]:8080",
        ],
    ),
    case(
        "2 NodePort dual-stack, families from clusterIPs: each node address gets its family's endpoints",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIPs: [198.18.100.1, "2001:db8:100::1"]
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8:1::1"]}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080",
            "NodePort [2001:db8:ff::10]:30080/TCP default/web: -> [2001:db8:1::1]:8080; snat",
            "[2001:db8:100::1]:80/TCP default/web: -> [2001:db8:1::1]:8080",
        ],
    ),
    case(
        "2 ipFamilies listing a family without a clusterIP in it: no frontend of that family",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIPs: [198.18.100.1]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  externalIPs: [203.0.113.5, "2001:db8:ee::5"]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: "2001:db8:ee::10"}]
---
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
---
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8:1::1"]}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080",
            "ExternalIP 203.0.113.5:80/TCP default/web: -> 198.19.0.1:8080; snat",
            "LoadBalancer 203.0.113.10:80/TCP default/web: -> 198.19.0.1:8080; snat",
        ],
    ),
    case(
        "2 NodePort: the same nodePort for TCP and UDP is two frontends",
        r#"
kind: Service
metadata: {name: dns}
spec:
  type: NodePort
  clusterIP: 198.18.100.10
  ipFamilies: [IPv4]
  ports:
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
  - {name: dns-tcp, port: 53, protocol: TCP, nodePort: 30053}
---
kind: EndpointSlice
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[
            "NodePort 192.0.2.10:30053/TCP default/dns:dns-tcp -> 198.19.0.1:53; snat",
            "NodePort 192.0.2.10:30053/UDP default/dns:dns -> 198.19.0.1:53; snat",
            "NodePort 192.0.2.11:30053/TCP default/dns:dns-tcp -> 198.19.0.1:53; snat",
            "NodePort 192.0.2.11:30053/UDP default/dns:dns -> 198.19.0.1:53; snat",
            "198.18.100.10:53/TCP default/dns:dns-tcp -> 198.19.0.1:53",
            "198.18.100.10:53/UDP default/dns:dns -> 198.19.0.1:53",
        ],
    ),
    // Section 2: LoadBalancer and externalIP frontends.
    case(
        "2 LoadBalancer: NodePorts too, and the ingress IP",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080; snat",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080",
            "LoadBalancer 203.0.113.10:80/TCP default/web: -> 198.19.0.1:8080; snat",
        ],
    ),
    case(
        "2 allocateLoadBalancerNodePorts false (nodePort unset or 0): no NodePort, the LB IP works",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 198.18.100.1
  ports: [{name: http, port: 80}, {name: https, port: 443, nodePort: 0}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[
            "198.18.100.1:80/TCP default/web:http -> 198.19.0.1:8080",
            "198.18.100.1:443/TCP default/web:https -> 198.19.0.1:8443",
            "LoadBalancer 203.0.113.10:80/TCP default/web:http -> 198.19.0.1:8080; snat",
            "LoadBalancer 203.0.113.10:443/TCP default/web:https -> 198.19.0.1:8443; snat",
        ],
    ),
    case(
        "2 LoadBalancer ingress: ipMode VIP or unset count; Proxy and hostname-only are skipped",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 198.18.100.1
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.10}
    - {ip: 203.0.113.11, ipMode: VIP}
    - {ip: 203.0.113.12, ipMode: Proxy}
    - {hostname: lb.example.org}
    - {ip: 203.0.113.13, hostname: lb2.example.org}
    - {ip: 203.0.113.300}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080",
            "LoadBalancer 203.0.113.10:80/TCP default/web: -> 198.19.0.1:8080; snat",
            "LoadBalancer 203.0.113.11:80/TCP default/web: -> 198.19.0.1:8080; snat",
            "LoadBalancer 203.0.113.13:80/TCP default/web: -> 198.19.0.1:8080; snat",
        ],
    ),
    case(
        "2 ingress IPs of a Service that is no longer type LoadBalancer are not frontends",
        r#"
kind: Service
metadata: {name: was-lb}
spec: {type: ClusterIP, clusterIP: 198.18.100.1, ports: [{port: 80}]}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
kind: Service
metadata: {name: lb}
spec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, clusterIP: 198.18.100.2, ports: [{port: 80}]}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.20}]
"#,
        &[
            "198.18.100.1:80/TCP default/was-lb: -> reject",
            "198.18.100.2:80/TCP default/lb: -> reject",
            "LoadBalancer 203.0.113.20:80/TCP default/lb: -> reject; snat",
        ],
    ),
    case(
        "2 externalIPs x each port, of the Service's families; unparseable ones skipped",
        r#"
kind: Service
metadata: {name: web}
spec:
  clusterIP: 198.18.100.1
  externalIPs: [203.0.113.5, not-an-ip, "2001:db8:ee::5", 203.0.113.6]
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [198.19.0.1]}]
"#,
        &[
            "198.18.100.1:53/UDP default/web:dns -> 198.19.0.1:5353",
            "198.18.100.1:80/TCP default/web:http -> 198.19.0.1:8080",
            "ExternalIP 203.0.113.5:53/UDP default/web:dns -> 198.19.0.1:5353; snat",
            "ExternalIP 203.0.113.5:80/TCP default/web:http -> 198.19.0.1:8080; snat",
            "ExternalIP 203.0.113.6:53/UDP default/web:dns -> 198.19.0.1:5353; snat",
            "ExternalIP 203.0.113.6:80/TCP default/web:http -> 198.19.0.1:8080; snat",
        ],
    ),
    // Section 4: traffic policies.
    case(
        "4 externalTrafficPolicy Local: the local set, no SNAT; the cluster set kept for this node's own traffic",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIP: 198.18.100.1
  externalIPs: [203.0.113.5]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a}
- {addresses: [198.19.0.2], nodeName: node-b}
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080 local; policy Local; cluster: 198.19.0.1:8080 local, 198.19.0.2:8080",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080 local; policy Local; cluster: 198.19.0.1:8080 local, 198.19.0.2:8080",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 local, 198.19.0.2:8080",
            "ExternalIP 203.0.113.5:80/TCP default/web: -> 198.19.0.1:8080 local; policy Local; cluster: 198.19.0.1:8080 local, 198.19.0.2:8080",
            "LoadBalancer 203.0.113.10:80/TCP default/web: -> 198.19.0.1:8080 local; policy Local; cluster: 198.19.0.1:8080 local, 198.19.0.2:8080",
            "health 32000 default/web: 1 local",
        ],
    ),
    case(
        "4 externalTrafficPolicy Local, no local endpoint: drop (not reject); this node's own traffic still served",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.2], nodeName: node-b}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> drop; policy Local; cluster: 198.19.0.2:8080",
            "NodePort 192.0.2.11:30080/TCP default/web: -> drop; policy Local; cluster: 198.19.0.2:8080",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.2:8080",
        ],
    ),
    case(
        "3/4 traffic policy Local and no usable endpoint anywhere: reject, as kube-proxy does",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.2], nodeName: node-b, conditions: {ready: false}}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> reject; policy Local",
            "NodePort 192.0.2.11:30080/TCP default/web: -> reject; policy Local",
            "198.18.100.1:80/TCP default/web: -> reject; policy Local",
        ],
    ),
    case(
        "4 internalTrafficPolicy Local: the local set on ClusterIPs only, drop without one; external frontends follow externalTrafficPolicy",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  internalTrafficPolicy: Local
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a}
- {addresses: [198.19.0.2], nodeName: node-b}
---
kind: Service
metadata: {name: remote}
spec: {internalTrafficPolicy: Local, clusterIP: 198.18.100.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: remote-1, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.3], nodeName: node-b}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080 local, 198.19.0.2:8080; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080 local, 198.19.0.2:8080; snat",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 local; policy Local",
            "198.18.100.2:80/TCP default/remote: -> drop; policy Local",
        ],
    ),
    case(
        "1.5/4 terminating fallback, separately for the local and the cluster set",
        r#"
kind: Service
metadata: {name: local-terminating}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: local-terminating-1, labels: {kubernetes.io/service-name: local-terminating}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.19.0.2], nodeName: node-b}
---
kind: Service
metadata: {name: all-terminating}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 198.18.100.2
  ports: [{port: 80, nodePort: 30081}]
---
kind: EndpointSlice
metadata: {name: all-terminating-1, labels: {kubernetes.io/service-name: all-terminating}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.19.0.4], nodeName: node-b, conditions: {ready: false, serving: true, terminating: true}}
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/local-terminating: -> 198.19.0.1:8080 local terminating; policy Local; cluster: 198.19.0.2:8080",
            "NodePort 192.0.2.10:30081/TCP default/all-terminating: -> 198.19.0.3:8080 local terminating; policy Local; cluster: 198.19.0.3:8080 local terminating, 198.19.0.4:8080 terminating",
            "NodePort 192.0.2.11:30080/TCP default/local-terminating: -> 198.19.0.1:8080 local terminating; policy Local; cluster: 198.19.0.2:8080",
            "NodePort 192.0.2.11:30081/TCP default/all-terminating: -> 198.19.0.3:8080 local terminating; policy Local; cluster: 198.19.0.3:8080 local terminating, 198.19.0.4:8080 terminating",
            "198.18.100.1:80/TCP default/local-terminating: -> 198.19.0.2:8080",
            "198.18.100.2:80/TCP default/all-terminating: -> 198.19.0.3:8080 local terminating, 198.19.0.4:8080 terminating",
        ],
    ),
    case(
        "4 loadBalancerSourceRanges: only on LB frontends, only the frontend's family, invalid entries skipped",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIPs: [198.18.100.1, "2001:db8:100::1"]
  externalIPs: [203.0.113.5]
  loadBalancerSourceRanges: [203.0.113.0/24, " 198.51.100.7/16 ", "2001:db8:aa::/48", bogus, 10.0.0.1, 10.0.0.0/33]
  ports: [{port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}, {ip: "2001:db8:ee::10"}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> reject; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> reject; snat",
            "198.18.100.1:80/TCP default/web: -> reject",
            "ExternalIP 203.0.113.5:80/TCP default/web: -> reject; snat",
            "LoadBalancer 203.0.113.10:80/TCP default/web: -> reject; snat; from 198.51.0.0/16, 203.0.113.0/24",
            "LoadBalancer [2001:db8:ee::10]:80/TCP default/web: -> reject; snat; from 2001:db8:aa::/48",
            "NodePort [2001:db8:ff::10]:30080/TCP default/web: -> reject; snat",
            "[2001:db8:100::1]:80/TCP default/web: -> reject",
        ],
    ),
    case(
        "4 loadBalancerSourceRanges with no valid range of the family allow every source (as kube-proxy)",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 198.18.100.1
  loadBalancerSourceRanges: [bogus, "2001:db8:aa::/48"]
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
"#,
        &[
            "198.18.100.1:80/TCP default/web: -> reject",
            "LoadBalancer 203.0.113.10:80/TCP default/web: -> reject; snat",
        ],
    ),
    case(
        "4 healthCheckNodePort: unique local ready IPs; terminating-only, other node and policy Cluster",
        r#"
kind: Service
metadata: {name: ready}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIP: 198.18.100.1
  ports: [{name: http, port: 80}, {name: https, port: 443}]
---
kind: EndpointSlice
metadata: {name: ready-1, labels: {kubernetes.io/service-name: ready}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a}
- {addresses: [198.19.0.2], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.19.0.3], nodeName: node-b}
---
kind: Service
metadata: {name: terminating}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  clusterIP: 198.18.100.2
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: terminating-1, labels: {kubernetes.io/service-name: terminating}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.4], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
---
kind: Service
metadata: {name: elsewhere}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  externalTrafficPolicy: Local
  healthCheckNodePort: 32002
  clusterIP: 198.18.100.3
  ports: [{port: 80}]
---
kind: EndpointSlice
metadata: {name: elsewhere-1, labels: {kubernetes.io/service-name: elsewhere}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.5], nodeName: node-b}]
---
kind: Service
metadata: {name: cluster}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  externalTrafficPolicy: Cluster
  healthCheckNodePort: 32003
  clusterIP: 198.18.100.4
  ports: [{port: 80}]
---
kind: EndpointSlice
metadata: {name: cluster-1, labels: {kubernetes.io/service-name: cluster}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.6], nodeName: node-a}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/terminating: -> 198.19.0.4:8080 local terminating; policy Local",
            "NodePort 192.0.2.11:30080/TCP default/terminating: -> 198.19.0.4:8080 local terminating; policy Local",
            "198.18.100.1:80/TCP default/ready:http -> 198.19.0.1:8080 local, 198.19.0.3:8080",
            "198.18.100.1:443/TCP default/ready:https -> 198.19.0.1:8443 local, 198.19.0.3:8443",
            "198.18.100.2:80/TCP default/terminating: -> 198.19.0.4:8080 local terminating",
            "198.18.100.3:80/TCP default/elsewhere: -> 198.19.0.5:8080",
            "198.18.100.4:80/TCP default/cluster: -> 198.19.0.6:8080 local",
            "health 32000 default/ready: 1 local",
            "health 32001 default/terminating: 0 local",
            "health 32002 default/elsewhere: 0 local",
        ],
    ),
    case(
        "4 a NodePort Service with externalTrafficPolicy Local has no health check",
        r#"
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], nodeName: node-a}]
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080 local; policy Local",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080 local; policy Local",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 local",
        ],
    ),
    // Section 8: topology hints. Every case has a "hinted" Service whose
    // hints apply, as a control for the ones whose hints must be ignored.
    case(
        "8 hints apply only when every ready endpoint has one and one matches this node's zone",
        r#"
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Service
metadata: {name: hinted}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: hinted-1, labels: {kubernetes.io/service-name: hinted}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [198.19.0.2], hints: {forZones: [{name: zone-b}]}}
- {addresses: [198.19.0.3], hints: {forZones: [{name: zone-b}, {name: zone-a}]}}
- {addresses: [198.19.0.4], conditions: {ready: false}}
---
kind: Service
metadata: {name: one-unhinted}
spec: {clusterIP: 198.18.100.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: one-unhinted-1, labels: {kubernetes.io/service-name: one-unhinted}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [198.19.0.2]}
- {addresses: [198.19.0.3], hints: {forZones: []}}
---
kind: Service
metadata: {name: no-match}
spec: {clusterIP: 198.18.100.3, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: no-match-1, labels: {kubernetes.io/service-name: no-match}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-b}]}}
- {addresses: [198.19.0.2], hints: {forZones: [{name: zone-c}]}}
"#,
        &[
            "198.18.100.1:80/TCP default/hinted: -> 198.19.0.1:8080, 198.19.0.3:8080",
            "198.18.100.2:80/TCP default/one-unhinted: -> 198.19.0.1:8080, 198.19.0.2:8080, 198.19.0.3:8080",
            "198.18.100.3:80/TCP default/no-match: -> 198.19.0.1:8080, 198.19.0.2:8080",
        ],
    ),
    case(
        "8 hints narrow the cluster set of every frontend kind, never the local set",
        r#"
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  clusterIP: 198.18.100.1
  ports: [{port: 80, nodePort: 30080}]
---
kind: Service
metadata: {name: hinted}
spec: {type: NodePort, clusterIP: 198.18.100.2, ports: [{port: 80, nodePort: 30081}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}
- {addresses: [198.19.0.2], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}
---
kind: EndpointSlice
metadata: {name: hinted-1, labels: {kubernetes.io/service-name: hinted}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}
- {addresses: [198.19.0.2], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}
"#,
        &[
            "NodePort 192.0.2.10:30080/TCP default/web: -> 198.19.0.1:8080 local; policy Local; cluster: 198.19.0.2:8080",
            "NodePort 192.0.2.10:30081/TCP default/hinted: -> 198.19.0.2:8080; snat",
            "NodePort 192.0.2.11:30080/TCP default/web: -> 198.19.0.1:8080 local; policy Local; cluster: 198.19.0.2:8080",
            "NodePort 192.0.2.11:30081/TCP default/hinted: -> 198.19.0.2:8080; snat",
            "198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080 local; policy Local",
            "198.18.100.2:80/TCP default/hinted: -> 198.19.0.2:8080",
        ],
    ),
    case(
        "8 the zone is this Node's topology.kubernetes.io/zone label, not another Node's",
        r#"
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-b}}
---
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [198.19.0.2], hints: {forZones: [{name: zone-b}]}}
"#,
        &["198.18.100.1:80/TCP default/web: -> 198.19.0.2:8080"],
    ),
    Case {
        name: "8 no Node object, or no zone label: zone hints are ignored",
        node: "node-c",
        proxy_name: None,
        objects: r#"
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [198.19.0.2], hints: {forZones: [{name: zone-b}], forNodes: [{name: node-c}]}}
"#,
        // node-c has no Node object: no zone, so forZones is ignored;
        // forNodes is not on every endpoint, so it is ignored too.
        want: &["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080, 198.19.0.2:8080"],
    },
    case(
        "8 forNodes applies like forZones and before it",
        r#"
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Service
metadata: {name: by-node}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: by-node-1, labels: {kubernetes.io/service-name: by-node}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-a}], forNodes: [{name: node-b}]}}
- {addresses: [198.19.0.2], hints: {forZones: [{name: zone-b}], forNodes: [{name: node-a}]}}
---
kind: Service
metadata: {name: node-hint-missing}
spec: {clusterIP: 198.18.100.2, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: node-hint-missing-1, labels: {kubernetes.io/service-name: node-hint-missing}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forZones: [{name: zone-a}]}}
- {addresses: [198.19.0.2], hints: {forZones: [{name: zone-b}], forNodes: [{name: node-a}]}}
---
kind: Service
metadata: {name: no-node-match}
spec: {clusterIP: 198.18.100.3, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: no-node-match-1, labels: {kubernetes.io/service-name: no-node-match}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.0.1], hints: {forNodes: [{name: node-b}]}}
- {addresses: [198.19.0.2], hints: {forNodes: [{name: node-c}]}}
"#,
        &[
            "198.18.100.1:80/TCP default/by-node: -> 198.19.0.2:8080",
            "198.18.100.2:80/TCP default/node-hint-missing: -> 198.19.0.1:8080",
            "198.18.100.3:80/TCP default/no-node-match: -> 198.19.0.1:8080, 198.19.0.2:8080",
        ],
    ),
];

#[test]
fn spec_table() {
    let mut failures = Vec::new();
    for case in CASES {
        let snapshot = snapshot_from_yaml(case.objects);
        let config = config_for(case);
        let got = render(&desired_state(&snapshot, &config));
        let want: Vec<String> = case.want.iter().map(|line| line.to_string()).collect();
        if got != want {
            failures.push(format!(
                "{}\n  want: {want:#?}\n  got:  {got:#?}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn spec_table_is_independent_of_object_order() {
    for case in CASES {
        let snapshot = snapshot_from_yaml(case.objects);
        let mut reversed = snapshot.clone();
        reversed.services.reverse();
        reversed.endpoint_slices.reverse();
        reversed.nodes.reverse();
        let config = config_for(case);
        assert_eq!(
            desired_state(&snapshot, &config),
            desired_state(&reversed, &config),
            "{}",
            case.name
        );
    }
}

#[test]
fn frontends_carry_kind_and_service_port_name() {
    let snapshot = snapshot_from_yaml(
        r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.1, ports: [{name: http, port: 80}]}
"#,
    );
    let state = desired_state(&snapshot, &ModelConfig::default());
    let frontend = state.frontends.values().next().expect("one frontend");
    assert_eq!(frontend.kind, FrontendKind::ClusterIp);
    assert_eq!(frontend.service.namespace, "shop");
    assert_eq!(frontend.service.name, "web");
    assert_eq!(frontend.service.port_name, "http");
}

#[test]
fn an_empty_node_name_makes_nothing_local() {
    let snapshot = snapshot_from_yaml(
        r#"
kind: Service
metadata: {name: web}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1], nodeName: ""}]
"#,
    );
    let got = render(&desired_state(&snapshot, &ModelConfig::default()));
    assert_eq!(got, ["198.18.100.1:80/TCP default/web: -> 198.19.0.1:8080"]);
}

/// SPEC 1.5, local set: computed on its own, not filtered from the cluster set.
#[test]
fn local_endpoint_set() {
    struct LocalCase {
        name: &'static str,
        endpoints: &'static [&'static str],
        want: &'static [&'static str],
    }
    const LOCAL_CASES: &[LocalCase] = &[
        LocalCase {
            name: "local ready endpoints only",
            endpoints: &[
                "198.19.0.1:80 ready local",
                "198.19.0.2:80 ready",
                "198.19.0.3:80 serving terminating local",
            ],
            want: &["198.19.0.1:80 local"],
        },
        LocalCase {
            name: "no local ready endpoint: local serving and terminating, even with remote ready ones",
            endpoints: &[
                "198.19.0.1:80 ready",
                "198.19.0.2:80 serving terminating local",
                "198.19.0.3:80 terminating local",
                "198.19.0.4:80 serving local",
            ],
            want: &["198.19.0.2:80 local terminating"],
        },
        LocalCase {
            name: "no local endpoint at all",
            endpoints: &["198.19.0.1:80 ready", "198.19.0.2:80 serving terminating"],
            want: &[],
        },
    ];
    for case in LOCAL_CASES {
        let endpoints: Vec<Endpoint> = case.endpoints.iter().map(|e| endpoint(e)).collect();
        let got: Vec<String> = local_endpoints(&endpoints).iter().map(backend).collect();
        assert_eq!(got, case.want, "{}", case.name);
    }
}

/// SPEC 1.5 and 8, cluster set: ready endpoints narrowed by hints only when
/// every ready endpoint has that kind of hint and one is for this node.
#[test]
fn cluster_endpoint_set() {
    struct ClusterCase {
        name: &'static str,
        endpoints: &'static [&'static str],
        want: &'static [&'static str],
    }
    const CLUSTER_CASES: &[ClusterCase] = &[
        ClusterCase {
            name: "no hints: every ready endpoint",
            endpoints: &["198.19.0.1:80 ready", "198.19.0.2:80 serving terminating"],
            want: &["198.19.0.1:80"],
        },
        ClusterCase {
            name: "zone hints on every ready endpoint, one here: only those here",
            endpoints: &[
                "198.19.0.1:80 ready zone:here",
                "198.19.0.2:80 ready zone:elsewhere",
                "198.19.0.3:80 serving terminating",
            ],
            want: &["198.19.0.1:80"],
        },
        ClusterCase {
            name: "a ready endpoint without a zone hint: hints ignored",
            endpoints: &["198.19.0.1:80 ready zone:here", "198.19.0.2:80 ready"],
            want: &["198.19.0.1:80", "198.19.0.2:80"],
        },
        ClusterCase {
            name: "no zone hint here: hints ignored",
            endpoints: &[
                "198.19.0.1:80 ready zone:elsewhere",
                "198.19.0.2:80 ready zone:elsewhere",
            ],
            want: &["198.19.0.1:80", "198.19.0.2:80"],
        },
        ClusterCase {
            name: "node hints first",
            endpoints: &[
                "198.19.0.1:80 ready zone:here node:elsewhere",
                "198.19.0.2:80 ready zone:elsewhere node:here",
            ],
            want: &["198.19.0.2:80"],
        },
        ClusterCase {
            name: "no ready endpoint: the terminating fallback ignores hints",
            endpoints: &[
                "198.19.0.1:80 serving terminating zone:here",
                "198.19.0.2:80 serving terminating zone:elsewhere",
            ],
            want: &["198.19.0.1:80 terminating", "198.19.0.2:80 terminating"],
        },
    ];
    for case in CLUSTER_CASES {
        let endpoints: Vec<Endpoint> = case.endpoints.iter().map(|e| endpoint(e)).collect();
        let got: Vec<String> = cluster_endpoints(&endpoints).iter().map(backend).collect();
        assert_eq!(got, case.want, "{}", case.name);
    }
}

#[test]
fn frontend_new_has_the_defaults_of_policy_cluster() {
    let service = ServicePortName {
        namespace: "shop".to_owned(),
        name: "web".to_owned(),
        port_name: String::new(),
    };
    let backends = vec![backend_at("198.19.0.1:8080")];
    let cluster_ip = Frontend::new(service.clone(), FrontendKind::ClusterIp, backends.clone());
    assert!(!cluster_ip.snat && !cluster_ip.policy_local && !cluster_ip.drop_when_empty);
    assert_eq!(cluster_ip.cluster_backends, backends);
    assert!(cluster_ip.source_ranges.is_empty());
    let node_port = Frontend::new(service, FrontendKind::NodePort, backends.clone());
    assert!(node_port.snat && !node_port.policy_local);
    assert_eq!(node_port.cluster_backends, backends);
}

fn backend_at(address: &str) -> Backend {
    let address: SocketAddr = address.parse().expect("ip:port");
    Backend {
        ip: address.ip(),
        port: address.port(),
        terminating: false,
        local: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// desired_state never panics, gives the same answer for the same input
    /// in any order, and keeps its output invariants.
    #[test]
    fn deterministic_and_order_independent(
        (services, shuffled_services) in shuffled(prop::collection::vec(arb_service(), 0..6)),
        (slices, shuffled_slices) in shuffled(prop::collection::vec(arb_slice(), 0..8)),
        node_name in prop_oneof![Just(""), Just("node-a")],
        proxy_name in prop::option::of(Just("kproxy")),
        zone in prop::option::of(prop_oneof![Just("zone-a"), Just("zone-b")]),
        masquerade_all in any::<bool>(),
    ) {
        let node_addresses: Vec<IpAddr> =
            ["192.0.2.10", "2001:db8:ff::10"].iter().map(|ip| ip.parse().unwrap()).collect();
        let config = ModelConfig {
            node_name: node_name.to_owned(),
            proxy_name: proxy_name.map(str::to_owned),
            node_addresses: node_addresses.clone(),
            masquerade_all,
            ..ModelConfig::default()
        };
        let nodes: Vec<Node> = zone.into_iter().map(|zone| Node {
            metadata: ObjectMeta {
                name: Some("node-a".to_owned()),
                labels: Some(BTreeMap::from([(
                    "topology.kubernetes.io/zone".to_owned(),
                    zone.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }).collect();
        let nodes = shared(nodes);
        let snapshot = Snapshot {
            services: shared(services),
            endpoint_slices: shared(slices),
            nodes: nodes.clone(),
        };
        let shuffled = Snapshot {
            services: shared(shuffled_services),
            endpoint_slices: shared(shuffled_slices),
            nodes,
        };
        let state = desired_state(&snapshot, &config);
        prop_assert_eq!(&state, &desired_state(&snapshot, &config));
        prop_assert_eq!(&state, &desired_state(&shuffled, &config));
        for (key, frontend) in &state.frontends {
            prop_assert!(key.port != 0);
            for backends in [&frontend.backends, &frontend.cluster_backends] {
                prop_assert!(backends.windows(2).all(|pair| pair[0] < pair[1]));
                let mut addresses: Vec<_> = backends.iter().map(|b| (b.ip, b.port)).collect();
                addresses.dedup();
                prop_assert_eq!(addresses.len(), backends.len());
                for backend in backends {
                    prop_assert_eq!(backend.ip.is_ipv4(), key.ip.is_ipv4());
                    prop_assert!(backend.port != 0);
                    prop_assert!(!backend.local || node_name == "node-a");
                }
            }
            let external = frontend.kind.is_external();
            // SPEC 5: external traffic with policy Cluster, and every
            // ClusterIP flow with --masquerade-all.
            let snat = if external { !frontend.policy_local } else { masquerade_all };
            prop_assert_eq!(frontend.snat, snat);
            prop_assert!(!frontend.drop_when_empty || frontend.policy_local);
            if frontend.policy_local {
                prop_assert!(frontend.backends.iter().all(|b| b.local));
            }
            if !(external && frontend.policy_local) {
                prop_assert_eq!(&frontend.cluster_backends, &frontend.backends);
            }
            if frontend.kind == FrontendKind::NodePort {
                prop_assert!(node_addresses.contains(&key.ip));
            }
            if frontend.kind != FrontendKind::LoadBalancer {
                prop_assert!(frontend.source_ranges.is_empty());
            }
            for (network, len) in &frontend.source_ranges {
                prop_assert_eq!(network.is_ipv4(), key.ip.is_ipv4());
                let bits = if network.is_ipv4() { 32 } else { 128 };
                prop_assert!(*len <= bits);
            }
        }
        let ports: Vec<u16> = state.health_checks.iter().map(|check| check.port).collect();
        prop_assert!(ports.windows(2).all(|pair| pair[0] < pair[1]));
        prop_assert!(!ports.contains(&0));
    }
}

fn shared<T>(items: Vec<T>) -> Vec<Arc<T>> {
    items.into_iter().map(Arc::new).collect()
}

/// What one object of the pool is in the next step of an incremental run.
#[derive(Clone, Copy, Debug)]
enum Step {
    Absent,
    /// The same `Arc` as in the step before (a new one if it was absent).
    Kept,
    /// Equal content, a new `Arc` (a relist, a rewritten file).
    Reread,
    /// The pool's other version of the object.
    Changed,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::Absent),
        Just(Step::Kept),
        Just(Step::Reread),
        Just(Step::Changed)
    ]
}

/// Any Service, or one of a few plain ones whose slices `arb_any_slice`
/// often makes, so that changes reach frontends.
fn arb_any_service() -> impl Strategy<Value = Service> {
    let plain = (prop_oneof![Just("a"), Just("b")], 1..3u8).prop_map(|(name, ip)| {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: 198.18.100.{ip}, ports: [{{port: 80}}]}}"
        ))
        .expect("a Service")
    });
    prop_oneof![arb_service(), plain]
}

/// Any EndpointSlice, or a plain one of Service a or b.
fn arb_any_slice() -> impl Strategy<Value = EndpointSlice> {
    let plain = (
        prop_oneof![Just("a"), Just("b")],
        prop::collection::vec((1..5u8, any::<bool>()), 1..3),
    )
        .prop_map(|(service, endpoints)| {
            let endpoints: Vec<String> = endpoints
                .iter()
                .map(|(ip, ready)| {
                    format!("{{addresses: [198.19.0.{ip}], conditions: {{ready: {ready}}}}}")
                })
                .collect();
            serde_yaml::from_str(&format!(
                "metadata: {{name: {service}-x, namespace: default, \
                 labels: {{kubernetes.io/service-name: {service}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
                endpoints.join(", ")
            ))
            .expect("an EndpointSlice")
        });
    prop_oneof![arb_slice(), plain]
}

/// Applies one step to each object of a pool of (version 1, version 2).
fn advance<T: Clone>(
    current: &mut [Option<Arc<T>>],
    pool: &[(T, T)],
    steps: &[Step],
) -> Vec<Arc<T>> {
    for (i, (slot, (first, second))) in current.iter_mut().zip(pool).enumerate() {
        *slot = match steps[i % steps.len()] {
            Step::Absent => None,
            Step::Kept => slot.take().or_else(|| Some(Arc::new(first.clone()))),
            Step::Reread => Some(Arc::new(slot.as_deref().unwrap_or(first).clone())),
            Step::Changed => Some(Arc::new(second.clone())),
        };
    }
    current.iter().flatten().cloned().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A `Model` taken through a run of snapshots, where objects stay (the
    /// same `Arc`), go, come back, are re-read or change, holds after every
    /// step exactly what `desired_state` computes from nothing; and it
    /// recomputes no Service whose objects all stayed.
    #[test]
    fn incremental_model_matches_a_fresh_computation(
        services in prop::collection::vec((arb_any_service(), arb_any_service()), 0..6),
        slices in prop::collection::vec((arb_any_slice(), arb_any_slice()), 0..8),
        steps in prop::collection::vec(
            (
                prop::collection::vec(arb_step(), 1..6),
                prop::collection::vec(arb_step(), 1..8),
                prop_oneof![Just(""), Just("node-a")],
            ),
            1..6,
        ),
    ) {
        let mut model = Model::default();
        let mut current_services = vec![None; services.len()];
        let mut current_slices = vec![None; slices.len()];
        for (service_steps, slice_steps, node_name) in steps {
            let config = ModelConfig {
                node_name: node_name.to_owned(),
                node_addresses: vec!["192.0.2.10".parse().unwrap()],
                ..ModelConfig::default()
            };
            let snapshot = Snapshot {
                services: advance(&mut current_services, &services, &service_steps),
                endpoint_slices: advance(&mut current_slices, &slices, &slice_steps),
                nodes: Vec::new(),
            };
            model.update(&snapshot, &config);
            prop_assert_eq!(model.state(), &desired_state(&snapshot, &config));
            // Nothing changed: nothing is recomputed.
            let again = model.update(&snapshot, &config);
            prop_assert_eq!(again, ModelUpdate::default());
        }
    }
}

/// `count` ClusterIP Services `svc-N` with one slice each.
fn many_services(count: usize) -> Snapshot {
    let mut documents = Vec::new();
    for i in 0..count {
        documents.push(format!(
            r#"
kind: Service
metadata: {{name: svc-{i}}}
spec: {{clusterIP: 198.18.{}.{}, ports: [{{port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: svc-{i}-1, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: [198.19.{}.{}]}}]
"#,
            100 + i / 250,
            i % 250 + 1,
            i / 250,
            i % 250 + 1
        ));
    }
    snapshot_from_yaml(&documents.join("---\n"))
}

#[test]
fn a_model_update_recomputes_only_the_changed_service() {
    let config = ModelConfig::default();
    let mut snapshot = many_services(300);
    let mut model = Model::default();
    assert_eq!(model.update(&snapshot, &config).recomputed, 300);
    assert_eq!(model.state().frontends.len(), 300);

    // One endpoint of svc-7 moves: only svc-7 is computed again.
    let index = snapshot
        .endpoint_slices
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("svc-7-1"))
        .unwrap();
    let mut slice = (*snapshot.endpoint_slices[index]).clone();
    slice.endpoints[0].addresses = vec!["198.19.9.9".into()];
    snapshot.endpoint_slices[index] = Arc::new(slice);
    let update = model.update(&snapshot, &config);
    assert_eq!(
        update,
        ModelUpdate {
            recomputed: 1,
            removed: 0
        }
    );
    let rendered = render(model.state());
    assert!(rendered.contains(&"198.18.100.8:80/TCP default/svc-7: -> 198.19.9.9:8080".to_owned()));

    // svc-3 is deleted: nothing is computed, its frontend goes.
    snapshot
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("svc-3"));
    let update = model.update(&snapshot, &config);
    assert_eq!(
        update,
        ModelUpdate {
            recomputed: 0,
            removed: 1
        }
    );
    assert_eq!(model.state().frontends.len(), 299);

    // A config change recomputes everything.
    let other = ModelConfig {
        node_name: "node-a".into(),
        ..ModelConfig::default()
    };
    assert_eq!(model.update(&snapshot, &other).recomputed, 299);
    assert_eq!(model.state(), &desired_state(&snapshot, &other));
}

fn shuffled<T: Clone + std::fmt::Debug>(
    items: impl Strategy<Value = Vec<T>>,
) -> impl Strategy<Value = (Vec<T>, Vec<T>)> {
    items.prop_flat_map(|items| (Just(items.clone()), Just(items).prop_shuffle()))
}

fn arb_service() -> impl Strategy<Value = Service> {
    let ip = prop_oneof![
        Just(""),
        Just("None"),
        Just("198.18.100.1"),
        Just("198.18.100.2"),
        Just("2001:db8:100::1"),
        Just("not-an-ip"),
    ];
    let port = (
        prop_oneof![
            Just(None),
            Just(Some("")),
            Just(Some("http")),
            Just(Some("dns"))
        ],
        prop_oneof![Just(0), Just(53), Just(80), Just(70000), Just(-1)],
        arb_protocol(),
        prop::option::of(prop_oneof![Just(0), Just(30080), Just(30081)]),
    );
    let policy = || prop::option::of(prop_oneof![Just("Local"), Just("Cluster")]);
    let external = (
        policy(),
        policy(),
        prop::collection::vec(
            prop_oneof![
                Just("203.0.113.5"),
                Just("198.18.100.1"),
                Just("2001:db8:ee::5"),
                Just("bogus"),
            ],
            0..3,
        ),
        prop::collection::vec(
            (
                prop::option::of(prop_oneof![
                    Just("203.0.113.10"),
                    Just("203.0.113.5"),
                    Just("2001:db8:ee::10"),
                ]),
                prop::option::of(prop_oneof![Just("VIP"), Just("Proxy")]),
            ),
            0..3,
        ),
        prop::option::of(prop_oneof![Just(0), Just(32000), Just(32001)]),
        prop::collection::vec(
            prop_oneof![
                Just("203.0.113.0/24"),
                Just("2001:db8::/32"),
                Just("bogus"),
                Just("10.1.2.3/0"),
            ],
            0..3,
        ),
        prop::option::of(prop::collection::vec(
            prop_oneof![Just("IPv4"), Just("IPv6")],
            0..3,
        )),
    );
    (
        prop_oneof![Just("default"), Just("shop")],
        prop_oneof![Just("a"), Just("b")],
        prop_oneof![
            Just(None),
            Just(Some("ClusterIP")),
            Just(Some("ExternalName")),
            Just(Some("NodePort")),
            Just(Some("LoadBalancer")),
        ],
        prop::option::of(ip.clone()),
        prop::option::of(prop::collection::vec(ip, 0..3)),
        prop::collection::vec(port, 0..3),
        prop::option::of(prop_oneof![Just("kproxy"), Just("other")]),
        any::<bool>(),
        external,
    )
        .prop_map(
            |(
                namespace,
                name,
                type_,
                cluster_ip,
                cluster_ips,
                ports,
                proxy,
                headless,
                external,
            )| {
                let (etp, itp, external_ips, ingress, hcnp, ranges, families) = external;
                let mut labels = BTreeMap::new();
                if let Some(proxy) = proxy {
                    labels.insert(
                        "service.kubernetes.io/service-proxy-name".to_owned(),
                        proxy.to_owned(),
                    );
                }
                if headless {
                    labels.insert("service.kubernetes.io/headless".to_owned(), String::new());
                }
                Service {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    },
                    spec: Some(ServiceSpec {
                        type_: type_.map(str::to_owned),
                        cluster_ip: cluster_ip.map(str::to_owned),
                        cluster_ips: cluster_ips
                            .map(|ips| ips.into_iter().map(str::to_owned).collect()),
                        ports: Some(
                            ports
                                .into_iter()
                                .map(|(name, port, protocol, node_port)| ServicePort {
                                    name: name.map(str::to_owned),
                                    port,
                                    protocol: protocol.map(str::to_owned),
                                    node_port,
                                    ..ServicePort::default()
                                })
                                .collect(),
                        ),
                        external_traffic_policy: etp.map(str::to_owned),
                        internal_traffic_policy: itp.map(str::to_owned),
                        external_ips: Some(external_ips.into_iter().map(str::to_owned).collect()),
                        health_check_node_port: hcnp,
                        load_balancer_source_ranges: Some(
                            ranges.into_iter().map(str::to_owned).collect(),
                        ),
                        ip_families: families
                            .map(|families| families.into_iter().map(str::to_owned).collect()),
                        ..ServiceSpec::default()
                    }),
                    status: Some(ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: Some(
                                ingress
                                    .into_iter()
                                    .map(|(ip, ip_mode)| LoadBalancerIngress {
                                        ip: ip.map(str::to_owned),
                                        ip_mode: ip_mode.map(str::to_owned),
                                        hostname: Some("lb.example.org".to_owned()),
                                        ..LoadBalancerIngress::default()
                                    })
                                    .collect(),
                            ),
                        }),
                        ..ServiceStatus::default()
                    }),
                }
            },
        )
}

fn arb_slice() -> impl Strategy<Value = EndpointSlice> {
    let port = (
        prop_oneof![
            Just(None),
            Just(Some("")),
            Just(Some("http")),
            Just(Some("dns"))
        ],
        prop::option::of(prop_oneof![Just(0), Just(53), Just(8080), Just(70000)]),
        arb_protocol(),
    );
    let condition = prop::option::of(any::<bool>());
    let endpoint = (
        prop::collection::vec(
            prop_oneof![
                Just("198.19.0.1"),
                Just("198.19.0.2"),
                Just("2001:db8:1::1"),
                Just("db.example.org"),
                Just(""),
            ],
            0..3,
        ),
        prop::option::of((condition.clone(), condition.clone(), condition)),
        prop::option::of(prop_oneof![Just("node-a"), Just("node-b")]),
        prop::option::of((
            prop::collection::vec(prop_oneof![Just("zone-a"), Just("zone-b")], 0..2),
            prop::collection::vec(prop_oneof![Just("node-a"), Just("node-b")], 0..2),
        )),
    );
    (
        prop_oneof![Just("default"), Just("shop")],
        prop::option::of(prop_oneof![Just("a"), Just("b")]),
        any::<bool>(),
        prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN"), Just("bogus")],
        prop::collection::vec(port, 0..3),
        prop::collection::vec(endpoint, 0..4),
    )
        .prop_map(
            |(namespace, service, headless, address_type, ports, endpoints)| {
                let mut labels = BTreeMap::new();
                if let Some(service) = service {
                    labels.insert("kubernetes.io/service-name".to_owned(), service.to_owned());
                }
                if headless {
                    labels.insert("service.kubernetes.io/headless".to_owned(), String::new());
                }
                EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some("slice".to_owned()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    },
                    address_type: address_type.to_owned(),
                    ports: Some(
                        ports
                            .into_iter()
                            .map(|(name, port, protocol)| EndpointPort {
                                name: name.map(str::to_owned),
                                port,
                                protocol: protocol.map(str::to_owned),
                                ..EndpointPort::default()
                            })
                            .collect(),
                    ),
                    endpoints: endpoints
                        .into_iter()
                        .map(|(addresses, conditions, node_name, hints)| SliceEndpoint {
                            addresses: addresses.into_iter().map(str::to_owned).collect(),
                            conditions: conditions.map(|(ready, serving, terminating)| {
                                EndpointConditions {
                                    ready,
                                    serving,
                                    terminating,
                                }
                            }),
                            node_name: node_name.map(str::to_owned),
                            hints: hints.map(|(zones, nodes)| EndpointHints {
                                for_zones: Some(
                                    zones
                                        .into_iter()
                                        .map(|name| ForZone {
                                            name: name.to_owned(),
                                        })
                                        .collect(),
                                ),
                                for_nodes: Some(
                                    nodes
                                        .into_iter()
                                        .map(|name| ForNode {
                                            name: name.to_owned(),
                                        })
                                        .collect(),
                                ),
                            }),
                            ..SliceEndpoint::default()
                        })
                        .collect(),
                }
            },
        )
}

fn arb_protocol() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        Just(None),
        Just(Some("TCP")),
        Just(Some("UDP")),
        Just(Some("SCTP")),
        Just(Some("ICMP")),
    ]
}

/// Reads test objects from multi-document YAML. `apiVersion` may be left out.
fn snapshot_from_yaml(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).expect("test YAML parses");
        match value.get("kind").and_then(|kind| kind.as_str()) {
            Some("Service") => snapshot
                .services
                .push(Arc::new(serde_yaml::from_value(value).expect("a Service"))),
            Some("EndpointSlice") => snapshot.endpoint_slices.push(Arc::new(
                serde_yaml::from_value(value).expect("an EndpointSlice"),
            )),
            Some("Node") => snapshot
                .nodes
                .push(Arc::new(serde_yaml::from_value(value).expect("a Node"))),
            other => panic!("unexpected kind {other:?} in test YAML"),
        }
    }
    snapshot
}

fn render(state: &DesiredState) -> Vec<String> {
    let frontends = state.frontends.iter().map(|(key, frontend)| {
        let backends = |backends: &[Backend]| {
            if backends.is_empty() {
                let empty = if frontend.drop_when_empty {
                    "drop"
                } else {
                    "reject"
                };
                empty.to_owned()
            } else {
                let backends: Vec<String> = backends.iter().map(backend).collect();
                backends.join(", ")
            }
        };
        let kind = match frontend.kind {
            FrontendKind::ClusterIp => String::new(),
            kind => format!("{} ", kind.as_str()),
        };
        let mut line = format!(
            "{kind}{}/{} {}/{}:{} -> {}",
            SocketAddr::new(key.ip, key.port),
            key.protocol.as_str(),
            frontend.service.namespace,
            frontend.service.name,
            frontend.service.port_name,
            backends(&frontend.backends),
        );
        if frontend.policy_local {
            line.push_str("; policy Local");
        }
        if frontend.snat {
            line.push_str("; snat");
        }
        if frontend.cluster_backends != frontend.backends {
            line.push_str("; cluster: ");
            line.push_str(&backends(&frontend.cluster_backends));
        }
        if !frontend.source_ranges.is_empty() {
            let ranges: Vec<String> = frontend
                .source_ranges
                .iter()
                .map(|(ip, len)| format!("{ip}/{len}"))
                .collect();
            line.push_str("; from ");
            line.push_str(&ranges.join(", "));
        }
        line
    });
    let health_checks = state.health_checks.iter().map(|check| {
        format!(
            "health {} {}/{}: {} local",
            check.port, check.namespace, check.name, check.local_endpoints
        )
    });
    frontends.chain(health_checks).collect()
}

fn backend(backend: &Backend) -> String {
    let mut text = SocketAddr::new(backend.ip, backend.port).to_string();
    if backend.local {
        text.push_str(" local");
    }
    if backend.terminating {
        text.push_str(" terminating");
    }
    text
}

/// `ip:port` followed by the conditions that hold, e.g. `198.19.0.1:80 ready local`,
/// and the hints: `zone:here`, `zone:elsewhere`, `node:here`, `node:elsewhere`.
fn endpoint(spec: &str) -> Endpoint {
    let mut words = spec.split_whitespace();
    let address: SocketAddr = words.next().expect("an address").parse().expect("ip:port");
    let flags: Vec<&str> = words.collect();
    let ip: IpAddr = address.ip();
    Endpoint {
        ip,
        port: address.port(),
        ready: flags.contains(&"ready"),
        serving: flags.contains(&"serving") || flags.contains(&"ready"),
        terminating: flags.contains(&"terminating"),
        local: flags.contains(&"local"),
        zone_hint: hint(&flags, "zone"),
        node_hint: hint(&flags, "node"),
    }
}

fn hint(flags: &[&str], kind: &str) -> Hint {
    if flags.contains(&format!("{kind}:here").as_str()) {
        Hint::Here
    } else if flags.contains(&format!("{kind}:elsewhere").as_str()) {
        Hint::Elsewhere
    } else {
        Hint::Unset
    }
}

#[test]
fn nodeport_addresses_come_from_the_node_filtered_by_flag() {
    use proxy_userspace::model::nodeport_addresses;
    let snapshot = snapshot_from_yaml(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n    - {type: Hostname, address: node-a}\n    - {type: InternalIP, address: 198.18.0.1}\n    - {type: InternalIP, address: 198.18.0.2}\n    - {type: ExternalIP, address: 198.19.1.1}\n    - {type: InternalIP, address: 127.0.0.1}\n    - {type: InternalIP, address: \"2001:db8::1\"}\n",
    );
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let all = nodeport_addresses(&snapshot.nodes, "node-a", &[]);
    assert_eq!(
        all,
        vec![
            ip("198.18.0.1"),
            ip("198.18.0.2"),
            ip("198.19.1.1"),
            ip("2001:db8::1")
        ]
    );
    let cidr = nodeport_addresses(&snapshot.nodes, "node-a", &["198.19.0.0/16".into()]);
    assert_eq!(cidr, vec![ip("198.19.1.1")]);
    let primary = nodeport_addresses(&snapshot.nodes, "node-a", &["primary".into()]);
    assert_eq!(primary, vec![ip("198.18.0.1"), ip("2001:db8::1")]);
    assert!(nodeport_addresses(&snapshot.nodes, "other", &[]).is_empty());
}

#[test]
fn primary_falls_back_to_the_first_external_ip_of_a_family_without_internal_ip() {
    use proxy_userspace::model::nodeport_addresses;
    let snapshot = snapshot_from_yaml(
        r#"
kind: Node
metadata: {name: node-a}
status:
  addresses:
  - {type: ExternalIP, address: 198.19.1.1}
  - {type: InternalIP, address: 198.18.0.1}
  - {type: ExternalIP, address: "2001:db8:e::1"}
  - {type: ExternalIP, address: "2001:db8:e::2"}
---
kind: Node
metadata: {name: node-b}
status:
  addresses:
  - {type: Hostname, address: node-b}
  - {type: ExternalIP, address: 198.19.2.2}
  - {type: ExternalIP, address: 198.19.2.1}
"#,
    );
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let primary = |node: &str| nodeport_addresses(&snapshot.nodes, node, &["primary".into()]);
    assert_eq!(
        primary("node-a"),
        vec![ip("198.18.0.1"), ip("2001:db8:e::1")]
    );
    assert_eq!(primary("node-b"), vec![ip("198.19.2.2")]);
}

#[test]
fn nodeport_addresses_skip_entries_that_are_neither_a_cidr_nor_primary() {
    use proxy_userspace::model::{nodeport_addresses, NodePortAddress};
    let snapshot = snapshot_from_yaml(
        r#"
kind: Node
metadata: {name: node-a}
status:
  addresses:
  - {type: InternalIP, address: 198.18.0.1}
  - {type: ExternalIP, address: 198.19.1.1}
"#,
    );
    let filter: Vec<String> = ["10.0.0.1", "198.19.0.0/33", "bogus", " 198.19.0.0/16 "]
        .map(str::to_owned)
        .to_vec();
    assert_eq!(
        nodeport_addresses(&snapshot.nodes, "node-a", &filter),
        vec!["198.19.1.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        NodePortAddress::parse(" 198.19.7.7/16"),
        Some(NodePortAddress::Cidr("198.19.0.0".parse().unwrap(), 16))
    );
    assert_eq!(
        NodePortAddress::parse("primary"),
        Some(NodePortAddress::Primary)
    );
    for bad in [
        "10.0.0.1",
        "10.0.0.0/33",
        "::/129",
        "10.0.0.0/-1",
        "Primary",
        "",
    ] {
        assert_eq!(NodePortAddress::parse(bad), None, "{bad}");
    }
}

/// SPEC 8: a zone label change on this Node takes effect without a
/// restart: the incremental model recomputes the hinted Services on the
/// next update, and only then.
#[test]
fn a_zone_label_change_takes_effect_on_the_next_update() {
    let world = |zone: &str| {
        snapshot_from_yaml(&format!(
            r#"
kind: Node
metadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}
---
kind: Service
metadata: {{name: hinted}}
spec: {{clusterIP: 198.18.100.1, ports: [{{port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: hinted-1, labels: {{kubernetes.io/service-name: hinted}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [198.19.0.1], hints: {{forZones: [{{name: zone-a}}]}}}}
- {{addresses: [198.19.0.2], hints: {{forZones: [{{name: zone-b}}]}}}}
"#
        ))
    };
    let config = ModelConfig {
        node_name: "node-a".into(),
        ..ModelConfig::default()
    };
    let mut model = Model::default();
    let mut zone_a = world("zone-a");
    model.update(&zone_a, &config);
    assert_eq!(
        render(model.state()),
        ["198.18.100.1:80/TCP default/hinted: -> 198.19.0.1:8080"]
    );
    // The same Node object (the same `Arc`): nothing to recompute.
    assert_eq!(model.update(&zone_a, &config), ModelUpdate::default());

    // The Node is relabelled: only its object changes.
    zone_a.nodes = world("zone-b").nodes;
    let update = model.update(&zone_a, &config);
    assert_eq!(update.recomputed, 1, "{update:?}");
    assert_eq!(
        render(model.state()),
        ["198.18.100.1:80/TCP default/hinted: -> 198.19.0.2:8080"]
    );
    assert_eq!(model.state(), &desired_state(&zone_a, &config));
}
