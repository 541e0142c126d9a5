//! SPEC.md section 1 and the ClusterIP part of section 2, as tables.
//!
//! Each case is a set of objects (multi-document YAML) and the frontends the
//! model must produce, written `vip:port/PROTO ns/name:portname -> backends`,
//! with backends `ip:port` plus ` local` / ` terminating`, or `reject`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;
use proxy_userspace::model::{
    desired_state, local_endpoints, Backend, DesiredState, Endpoint, FrontendKind, ModelConfig,
    Snapshot,
};
use serde::Deserialize;

struct Case {
    name: &'static str,
    node: &'static str,
    proxy_name: Option<&'static str>,
    objects: &'static str,
    want: &'static [&'static str],
}

const fn case(name: &'static str, objects: &'static str, want: &'static [&'static str]) -> Case {
    Case {
        name,
        node: "node-a",
        proxy_name: None,
        objects,
        want,
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
        "1.1 a Service without clusterIP has no ClusterIP frontend",
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
    ),
];

#[test]
fn spec_table() {
    let mut failures = Vec::new();
    for case in CASES {
        let snapshot = snapshot_from_yaml(case.objects);
        let config = ModelConfig {
            node_name: case.node.to_owned(),
            proxy_name: case.proxy_name.map(str::to_owned),
            ..ModelConfig::default()
        };
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
        let config = ModelConfig {
            node_name: case.node.to_owned(),
            proxy_name: case.proxy_name.map(str::to_owned),
            ..ModelConfig::default()
        };
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
    ) {
        let config = ModelConfig {
            node_name: node_name.to_owned(),
            proxy_name: proxy_name.map(str::to_owned),
            ..ModelConfig::default()
        };
        let snapshot = Snapshot { services, endpoint_slices: slices, nodes: vec![] };
        let shuffled = Snapshot {
            services: shuffled_services,
            endpoint_slices: shuffled_slices,
            nodes: vec![],
        };
        let state = desired_state(&snapshot, &config);
        prop_assert_eq!(&state, &desired_state(&snapshot, &config));
        prop_assert_eq!(&state, &desired_state(&shuffled, &config));
        for (key, frontend) in &state.frontends {
            prop_assert!(key.port != 0);
            prop_assert!(frontend.backends.windows(2).all(|pair| pair[0] < pair[1]));
            let mut addresses: Vec<_> = frontend.backends.iter().map(|b| (b.ip, b.port)).collect();
            addresses.dedup();
            prop_assert_eq!(addresses.len(), frontend.backends.len());
            for backend in &frontend.backends {
                prop_assert_eq!(backend.ip.is_ipv4(), key.ip.is_ipv4());
                prop_assert!(backend.port != 0);
                prop_assert!(!backend.local || node_name == "node-a");
            }
        }
    }
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
    );
    (
        prop_oneof![Just("default"), Just("shop")],
        prop_oneof![Just("a"), Just("b")],
        prop_oneof![
            Just(None),
            Just(Some("ClusterIP")),
            Just(Some("ExternalName"))
        ],
        prop::option::of(ip.clone()),
        prop::option::of(prop::collection::vec(ip, 0..3)),
        prop::collection::vec(port, 0..3),
        prop::option::of(prop_oneof![Just("kproxy"), Just("other")]),
        any::<bool>(),
    )
        .prop_map(
            |(namespace, name, type_, cluster_ip, cluster_ips, ports, proxy, headless)| {
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
                                .map(|(name, port, protocol)| ServicePort {
                                    name: name.map(str::to_owned),
                                    port,
                                    protocol: protocol.map(str::to_owned),
                                    ..ServicePort::default()
                                })
                                .collect(),
                        ),
                        ..ServiceSpec::default()
                    }),
                    status: None,
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
                        .map(|(addresses, conditions, node_name)| SliceEndpoint {
                            addresses: addresses.into_iter().map(str::to_owned).collect(),
                            conditions: conditions.map(|(ready, serving, terminating)| {
                                EndpointConditions {
                                    ready,
                                    serving,
                                    terminating,
                                }
                            }),
                            node_name: node_name.map(str::to_owned),
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
                .push(serde_yaml::from_value(value).expect("a Service")),
            Some("EndpointSlice") => snapshot
                .endpoint_slices
                .push(serde_yaml::from_value(value).expect("an EndpointSlice")),
            other => panic!("unexpected kind {other:?} in test YAML"),
        }
    }
    snapshot
}

fn render(state: &DesiredState) -> Vec<String> {
    state
        .frontends
        .iter()
        .map(|(key, frontend)| {
            let backends = if frontend.backends.is_empty() {
                "reject".to_owned()
            } else {
                let backends: Vec<String> = frontend.backends.iter().map(backend).collect();
                backends.join(", ")
            };
            format!(
                "{}/{} {}/{}:{} -> {backends}",
                SocketAddr::new(key.ip, key.port),
                key.protocol.as_str(),
                frontend.service.namespace,
                frontend.service.name,
                frontend.service.port_name,
            )
        })
        .collect()
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

/// `ip:port` followed by the conditions that hold, e.g. `198.19.0.1:80 ready local`.
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
    }
}
