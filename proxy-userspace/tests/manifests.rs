//! The cluster manifests (`manifests/**/*.yaml`): every document is a kind we know, parses into
//! its k8s-openapi type with no unknown field anywhere, and the DaemonSet, RBAC and ConfigMap
//! carry what docs/OPERATIONS.md promises. Needs no root and no cluster.
//!
//! k8s-openapi skips unknown fields silently, so a typo such as `hostNetwrok: true` would parse
//! and then be ignored by the API server too (or rejected by strict field validation at apply
//! time). To catch it here, every document goes YAML -> JSON value -> typed object -> JSON value,
//! and every path of the original that the round trip lost is an unknown field.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "kube-system";
const HEALTHZ_PORT: i32 = 10256;
const PIN_PATH: &str = "/sys/fs/bpf/kproxy";

// ---------------------------------------------------------------------------------------------
// Loading and strict parsing
// ---------------------------------------------------------------------------------------------

/// One parsed document, typed by its apiVersion and kind.
enum Manifest {
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
    Service(Box<Service>),
    EndpointSlice(EndpointSlice),
    Node(Box<Node>),
}

impl Manifest {
    /// The kind and metadata, whatever the type.
    fn meta(&self) -> (&'static str, &ObjectMeta) {
        use k8s_openapi::Resource as _;
        match self {
            Manifest::ServiceAccount(o) => (ServiceAccount::KIND, &o.metadata),
            Manifest::ClusterRole(o) => (ClusterRole::KIND, &o.metadata),
            Manifest::ClusterRoleBinding(o) => (ClusterRoleBinding::KIND, &o.metadata),
            Manifest::ConfigMap(o) => (ConfigMap::KIND, &o.metadata),
            Manifest::DaemonSet(o) => (DaemonSet::KIND, &o.metadata),
            Manifest::Service(o) => (Service::KIND, &o.metadata),
            Manifest::EndpointSlice(o) => (EndpointSlice::KIND, &o.metadata),
            Manifest::Node(o) => (Node::KIND, &o.metadata),
        }
    }
}

/// A document and where it came from (`manifests/rbac.yaml#2`: the second document).
struct Document {
    origin: String,
    manifest: Manifest,
}

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every `*.yaml` / `*.yml` under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The non-empty documents of a multi-document YAML text, as JSON values.
fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            Value::deserialize(document).map_err(|e| format!("document {}: {e}", index + 1))?;
        // `---` followed by nothing (or only comments) is an empty document.
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Deserializes `document` into `T` and fails if anything in it is not a field of `T`.
fn strict<T: DeserializeOwned + Serialize>(document: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
    let round_trip = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let unknown = unknown_fields(document, &round_trip);
    if unknown.is_empty() {
        Ok(typed)
    } else {
        Err(format!("unknown fields: {}", unknown.join(", ")))
    }
}

/// Every path present in `original` but lost in `round_trip` (the typed object serialized back).
///
/// What the round trip may legitimately change is not reported:
/// - a key whose value is `null` is the same as no key to the API server, and k8s-openapi drops
///   it (`creationTimestamp: null` in `kubectl create --dry-run -o yaml` output);
/// - scalars are not compared: IntOrString and Quantity normalize (`cpu: 1` comes back `"1"`),
///   and a changed scalar is not an unknown field.
///
/// Empty maps and lists are reported when lost: k8s-openapi keeps `Some(empty)` (pinned by
/// `detector_accepts_what_the_round_trip_normalizes`), so an unknown key stays unknown even when
/// its value is `{}`.
fn unknown_fields(original: &Value, round_trip: &Value) -> Vec<String> {
    let mut lost = Vec::new();
    collect_lost(original, round_trip, "", &mut lost);
    lost
}

fn collect_lost(original: &Value, round_trip: &Value, path: &str, lost: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(original), Value::Object(round_trip)) => {
            for (key, value) in original {
                let child = child_path(path, key);
                match round_trip.get(key) {
                    Some(kept) => collect_lost(value, kept, &child, lost),
                    None if value.is_null() => {}
                    None => lost.push(child),
                }
            }
        }
        (Value::Array(original), Value::Array(round_trip)) => {
            for (index, value) in original.iter().enumerate() {
                let child = format!("{path}[{index}]");
                match round_trip.get(index) {
                    Some(kept) => collect_lost(value, kept, &child, lost),
                    None => lost.push(child),
                }
            }
        }
        // A map or list that came back as something else lost its contents.
        (Value::Object(_) | Value::Array(_), _) => lost.push(path.to_owned()),
        _ => {}
    }
}

/// `spec.template`, and `metadata.labels["app.kubernetes.io/name"]` for keys with dots.
fn child_path(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{key:?}]"),
    }
}

fn parse_manifest(document: &Value) -> Result<Manifest, String> {
    let field = |name: &str| document.get(name).and_then(Value::as_str).unwrap_or("");
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    Ok(match (api_version, kind) {
        ("v1", "ServiceAccount") => Manifest::ServiceAccount(strict(document)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Manifest::ClusterRole(strict(document)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Manifest::ClusterRoleBinding(strict(document)?)
        }
        ("v1", "ConfigMap") => Manifest::ConfigMap(strict(document)?),
        ("apps/v1", "DaemonSet") => Manifest::DaemonSet(Box::new(strict(document)?)),
        ("v1", "Service") => Manifest::Service(Box::new(strict(document)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => Manifest::EndpointSlice(strict(document)?),
        ("v1", "Node") => Manifest::Node(Box::new(strict(document)?)),
        _ => {
            return Err(format!(
                "unknown kind {kind:?} in apiVersion {api_version:?}: this test knows \
                 ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet, \
                 Service, EndpointSlice and Node; add the new kind to parse_manifest"
            ))
        }
    })
}

/// Every document of every manifest, or every problem found (all of them, not just the first).
fn load_manifests() -> Result<Vec<Document>, Vec<String>> {
    let root = manifests_dir();
    let mut documents = Vec::new();
    let mut problems = Vec::new();
    for path in yaml_files(&root) {
        let shown = format!(
            "manifests/{}",
            path.strip_prefix(&root).unwrap_or(&path).display()
        );
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {shown}: {e}"));
        let values = match yaml_documents(&text) {
            Ok(values) => values,
            Err(e) => {
                problems.push(format!("{shown}: {e}"));
                continue;
            }
        };
        for (index, value) in values.iter().enumerate() {
            let origin = format!("{shown}#{}", index + 1);
            match parse_manifest(value) {
                Ok(manifest) => documents.push(Document { origin, manifest }),
                Err(e) => problems.push(format!("{origin}: {e}")),
            }
        }
    }
    if problems.is_empty() {
        Ok(documents)
    } else {
        Err(problems)
    }
}

fn manifests() -> Vec<Document> {
    load_manifests().unwrap_or_else(|problems| {
        panic!(
            "manifests do not parse strictly:\n  {}",
            problems.join("\n  ")
        )
    })
}

/// The one object of a kind named `name`, found with `pick`; fails if there is none or several.
fn the<'a, T, F>(documents: &'a [Document], name: &str, pick: F) -> &'a T
where
    T: k8s_openapi::Metadata<Ty = ObjectMeta>,
    F: Fn(&'a Manifest) -> Option<&'a T>,
{
    let found: Vec<(&str, &T)> = documents
        .iter()
        .filter_map(|d| pick(&d.manifest).map(|object| (d.origin.as_str(), object)))
        .filter(|(_, object)| object.metadata().name.as_deref() == Some(name))
        .collect();
    match found.as_slice() {
        [(_, object)] => object,
        [] => panic!("no {} named {name:?} under manifests/", T::KIND),
        many => panic!(
            "{} {name:?} is defined more than once: {:?}",
            T::KIND,
            many.iter().map(|(origin, _)| origin).collect::<Vec<_>>()
        ),
    }
}

fn daemonset(documents: &[Document]) -> &DaemonSet {
    the(documents, "kproxy", |m| match m {
        Manifest::DaemonSet(object) => Some(&**object),
        _ => None,
    })
}

fn service_account(documents: &[Document]) -> &ServiceAccount {
    the(documents, "kproxy", |m| match m {
        Manifest::ServiceAccount(object) => Some(object),
        _ => None,
    })
}

fn cluster_role(documents: &[Document]) -> &ClusterRole {
    the(documents, "kproxy", |m| match m {
        Manifest::ClusterRole(object) => Some(object),
        _ => None,
    })
}

fn cluster_role_binding(documents: &[Document]) -> &ClusterRoleBinding {
    the(documents, "kproxy", |m| match m {
        Manifest::ClusterRoleBinding(object) => Some(object),
        _ => None,
    })
}

fn config_map(documents: &[Document]) -> &ConfigMap {
    the(documents, "kproxy-config", |m| match m {
        Manifest::ConfigMap(object) => Some(object),
        _ => None,
    })
}

fn pod_spec(daemonset: &DaemonSet) -> &PodSpec {
    daemonset
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("DaemonSet has a pod template spec")
}

fn kproxy_container(pod: &PodSpec) -> &Container {
    match pod.containers.as_slice() {
        [container] => container,
        other => panic!(
            "expected one container, found {:?}",
            other.iter().map(|c| &c.name).collect::<Vec<_>>()
        ),
    }
}

fn args(container: &Container) -> &[String] {
    container.args.as_deref().unwrap_or_default()
}

/// The value of `--name=value` in `args` (the manifests use the `=` form only).
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    let mut values = args.iter().filter_map(|arg| arg.strip_prefix(&prefix));
    let value = values.next();
    assert!(values.next().is_none(), "{name} is given more than once");
    value
}

/// The KubeProxyConfiguration held by the ConfigMap under `key`.
fn kube_proxy_configuration(config_map: &ConfigMap, key: &str) -> Value {
    let text = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .unwrap_or_else(|| panic!("ConfigMap kproxy-config has no key {key:?}"));
    let mut documents =
        yaml_documents(text).unwrap_or_else(|e| panic!("ConfigMap kproxy-config {key}: {e}"));
    assert_eq!(
        documents.len(),
        1,
        "ConfigMap kproxy-config {key} must hold one document"
    );
    documents.remove(0)
}

// ---------------------------------------------------------------------------------------------
// The manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_manifest_parses_strictly_into_a_known_kind() {
    let documents = manifests();
    let files: BTreeSet<&str> = documents
        .iter()
        .filter_map(|d| d.origin.split('#').next())
        .collect();
    for expected in [
        "manifests/rbac.yaml",
        "manifests/configmap.yaml",
        "manifests/daemonset.yaml",
    ] {
        assert!(files.contains(expected), "{expected} is missing or empty");
    }
    assert!(
        files.iter().any(|f| f.starts_with("manifests/examples/")),
        "manifests/examples/ was not read: {files:?}"
    );

    // `kubectl apply -R -f manifests/` would let a later object silently replace an earlier one.
    let mut seen = BTreeSet::new();
    for document in &documents {
        let (kind, meta) = document.manifest.meta();
        let name = meta.name.as_deref().unwrap_or_default();
        assert!(!name.is_empty(), "{}: {kind} has no name", document.origin);
        assert!(
            seen.insert((kind, meta.namespace.as_deref(), name)),
            "{}: {kind} {name} is defined twice",
            document.origin
        );
    }
}

#[test]
fn daemonset_runs_privileged_on_the_host_network_of_every_node() {
    let documents = manifests();
    let daemonset = daemonset(&documents);
    assert_eq!(daemonset.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = daemonset.spec.as_ref().expect("DaemonSet spec");

    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(!selector.is_empty(), "DaemonSet selector is empty");
    for (key, value) in &selector {
        assert_eq!(
            labels.get(key),
            Some(value),
            "pod template lacks selector label {key}"
        );
    }

    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );

    let pod = pod_spec(daemonset);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    let tolerates_everything =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(
        tolerates_everything,
        "needs a toleration `operator: Exists` without key or effect: {:?}",
        pod.tolerations
    );

    let container = kproxy_container(pod);
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged),
        Some(true)
    );
    assert_eq!(
        container.command.as_deref(),
        Some(&["/usr/local/bin/kproxy".to_owned()][..])
    );
    let requests = container
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("resource requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("100m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
}

#[test]
fn daemonset_args_name_this_node_and_the_cluster_source() {
    let documents = manifests();
    let pod = pod_spec(daemonset(&documents));
    let container = kproxy_container(pod);
    let args = args(container);

    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "args: {args:?}"
    );
    assert_eq!(flag(args, "--source"), Some("kube"));
    assert_eq!(flag(args, "--hostname-override"), Some("$(NODE_NAME)"));
    assert_eq!(flag(args, "--bpf-pin-path"), Some(PIN_PATH));
    assert!(
        flag(args, "--pod-interfaces").is_some_and(|globs| !globs.is_empty()),
        "--pod-interfaces is missing: {args:?}"
    );

    let env = container.env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("env NODE_NAME");
    let field_path = node_name
        .value_from
        .as_ref()
        .and_then(|from| from.field_ref.as_ref())
        .map(|field| field.field_path.as_str());
    assert_eq!(field_path, Some("spec.nodeName"));

    // `$(VAR)` in args is expanded by the kubelet only for variables the container defines;
    // anything else is passed literally.
    let defined: BTreeSet<&str> = env.iter().map(|e| e.name.as_str()).collect();
    for arg in args {
        for reference in arg.split("$(").skip(1) {
            let variable = reference.split(')').next().unwrap_or_default();
            assert!(
                defined.contains(variable),
                "{arg}: $({variable}) is not in env"
            );
        }
    }
}

#[test]
fn daemonset_probes_use_livez_and_healthz_on_the_healthz_port() {
    let documents = manifests();
    let container = kproxy_container(pod_spec(daemonset(&documents)));
    for (probe, kind, path) in [
        (&container.liveness_probe, "livenessProbe", "/livez"),
        (&container.readiness_probe, "readinessProbe", "/healthz"),
    ] {
        let probe = probe.as_ref().unwrap_or_else(|| panic!("{kind} missing"));
        let get = probe
            .http_get
            .as_ref()
            .unwrap_or_else(|| panic!("{kind} is not httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{kind}");
        assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT), "{kind}");
        assert!(
            get.host.is_none(),
            "{kind}: host network, the node's address is right"
        );
        assert!(
            probe.period_seconds.is_some_and(|p| (1..=60).contains(&p)),
            "{kind}: periodSeconds {:?}",
            probe.period_seconds
        );
    }

    // The probes only work if kproxy listens where they look.
    let config = kube_proxy_configuration(config_map(&documents), "config.yaml");
    let healthz = config["healthzBindAddress"]
        .as_str()
        .expect("healthzBindAddress");
    assert!(
        healthz.ends_with(&format!(":{HEALTHZ_PORT}")) && !healthz.starts_with("127."),
        "healthzBindAddress {healthz} is not reachable by the kubelet on port {HEALTHZ_PORT}"
    );
}

#[test]
fn daemonset_mounts_bpffs_modules_and_the_config() {
    let documents = manifests();
    let pod = pod_spec(daemonset(&documents));
    let container = kproxy_container(pod);
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mount_of = |volume: &str| {
        let mut found = mounts.iter().filter(|m| m.name == volume);
        let mount = found
            .next()
            .unwrap_or_else(|| panic!("volume {volume} is not mounted"));
        assert!(
            found.next().is_none(),
            "volume {volume} is mounted more than once"
        );
        mount
    };
    let host_path_volume = |path: &str| {
        volumes
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == path))
            .unwrap_or_else(|| panic!("no hostPath volume for {path}"))
    };

    let bpffs = host_path_volume("/sys/fs/bpf");
    assert_eq!(
        bpffs.host_path.as_ref().and_then(|h| h.type_.as_deref()),
        Some("DirectoryOrCreate")
    );
    let bpffs_mount = mount_of(&bpffs.name);
    assert_eq!(bpffs_mount.mount_path, "/sys/fs/bpf");
    assert_eq!(
        bpffs_mount.mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_ne!(
        bpffs_mount.read_only,
        Some(true),
        "kproxy pins into the bpffs"
    );
    let pin_path = flag(args(container), "--bpf-pin-path").expect("--bpf-pin-path");
    assert!(
        Path::new(pin_path).starts_with(&bpffs_mount.mount_path),
        "--bpf-pin-path {pin_path} is not on the host's bpffs mount"
    );

    let modules = host_path_volume("/lib/modules");
    let modules_mount = mount_of(&modules.name);
    assert_eq!(modules_mount.mount_path, "/lib/modules");
    assert_eq!(modules_mount.read_only, Some(true));

    // --config=DIR/FILE: DIR is where the kproxy-config ConfigMap is mounted, FILE a key of it.
    let config_map = config_map(&documents);
    let config_path = flag(args(container), "--config").expect("--config");
    let config_path = Path::new(config_path);
    let (dir, file) = (
        config_path.parent().expect("--config has a directory"),
        config_path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("--config names a file"),
    );
    let config_volume = volumes
        .iter()
        .find(|v| {
            v.config_map.as_ref().map(|c| c.name.as_str()) == config_map.metadata.name.as_deref()
        })
        .expect("a volume of ConfigMap kproxy-config");
    let config_mount = mount_of(&config_volume.name);
    assert_eq!(Path::new(&config_mount.mount_path), dir);
    assert!(
        config_mount.sub_path.is_none(),
        "a subPath mount never sees ConfigMap updates"
    );
    let items = config_volume
        .config_map
        .as_ref()
        .and_then(|c| c.items.as_deref());
    let key = match items {
        None => file,
        Some(items) => items
            .iter()
            .find(|item| item.path == file)
            .map(|item| item.key.as_str())
            .unwrap_or_else(|| panic!("ConfigMap volume items do not project {file}")),
    };
    assert_eq!(key, "config.yaml");
    let config = kube_proxy_configuration(config_map, key);
    assert_eq!(
        config["apiVersion"].as_str(),
        Some("kubeproxy.config.k8s.io/v1alpha1")
    );
}

#[test]
fn configmap_holds_a_kube_proxy_configuration() {
    let documents = manifests();
    let config_map = config_map(&documents);
    assert_eq!(config_map.metadata.namespace.as_deref(), Some(NAMESPACE));
    let config = kube_proxy_configuration(config_map, "config.yaml");
    assert_eq!(
        config["apiVersion"].as_str(),
        Some("kubeproxy.config.k8s.io/v1alpha1")
    );
    assert_eq!(config["kind"].as_str(), Some("KubeProxyConfiguration"));

    // kproxy's own `--config` reader takes it, uses every field it sets and
    // ignores none of them.
    let text = config_map.data.as_ref().unwrap()["config.yaml"].clone();
    let loaded = proxy_userspace::config::parse(std::path::Path::new("config.yaml"), &text)
        .expect("kproxy --config accepts the ConfigMap");
    assert!(
        loaded.ignored.is_empty(),
        "fields kproxy would ignore: {:?}",
        loaded.ignored
    );
    assert_eq!(
        loaded.config.healthz_bind_address.as_deref(),
        Some("0.0.0.0:10256")
    );
    assert!(loaded.config.sync_period.is_some() && loaded.config.min_sync_period.is_some());
    assert!(loaded.config.conntrack_tcp_established_timeout.is_some());
}

#[test]
fn cluster_role_grants_exactly_what_kproxy_needs() {
    let documents = manifests();
    let role = cluster_role(&documents);
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated role grants more than its rules"
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "unexpected rule shape: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (groups, resource, verbs) in [
        (&[""][..], "services", &["list", "watch"][..]),
        (&["discovery.k8s.io"], "endpointslices", &["list", "watch"]),
        (&[""], "nodes", &["get", "list", "watch"]),
        (
            &["", "events.k8s.io"],
            "events",
            &["create", "patch", "update"],
        ),
    ] {
        for group in groups {
            for verb in verbs {
                expected.insert((group.to_string(), resource.to_owned(), verb.to_string()));
            }
        }
    }
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "ClusterRole kproxy: extra (group, resource, verb) {extra:?}, missing {missing:?}"
    );
}

#[test]
fn binding_gives_the_role_to_the_daemonset_service_account() {
    let documents = manifests();
    let account = service_account(&documents);
    let role = cluster_role(&documents);
    let binding = cluster_role_binding(&documents);
    let daemonset = daemonset(&documents);

    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());

    let subjects = binding.subjects.as_deref().unwrap_or_default();
    match subjects {
        [subject] => {
            assert_eq!(subject.kind, "ServiceAccount");
            assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
            assert_eq!(subject.namespace, account.metadata.namespace);
        }
        other => panic!("expected the kproxy ServiceAccount as only subject, got {other:?}"),
    }

    assert_eq!(
        pod_spec(daemonset).service_account_name,
        account.metadata.name
    );
    assert_eq!(daemonset.metadata.namespace, account.metadata.namespace);
}

// ---------------------------------------------------------------------------------------------
// The unknown-field detector itself
// ---------------------------------------------------------------------------------------------

const DAEMONSET_WITH_TYPOS: &str = "
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: typo
spec:
  selector:
    matchLabels: {app: typo}
  template:
    metadata:
      labels: {app: typo}
    spec:
      hostNetwrok: true
      containers:
        - name: c
          image: busybox
          livenessProbe:
            httpGet:
              path: /livez
              port: 10256
              prot: 1
";

fn unknown_fields_of<T: DeserializeOwned + Serialize>(text: &str) -> Vec<String> {
    let documents = yaml_documents(text).expect("fixture is YAML");
    let [document] = documents.as_slice() else {
        panic!("fixture has one document")
    };
    let typed: T = serde_json::from_value(document.clone()).expect("fixture deserializes");
    unknown_fields(document, &serde_json::to_value(&typed).expect("serializes"))
}

#[test]
fn detector_reports_unknown_fields_at_any_depth() {
    assert_eq!(
        unknown_fields_of::<DaemonSet>(DAEMONSET_WITH_TYPOS),
        [
            "spec.template.spec.containers[0].livenessProbe.httpGet.prot",
            "spec.template.spec.hostNetwrok",
        ]
    );
    let documents = yaml_documents(DAEMONSET_WITH_TYPOS).expect("fixture is YAML");
    let error = parse_manifest(&documents[0])
        .err()
        .expect("parse_manifest rejects the typos");
    assert!(error.contains("spec.template.spec.hostNetwrok"), "{error}");
}

#[test]
fn detector_reports_unknown_keys_with_empty_values_and_in_lists() {
    let text = "
apiVersion: v1
kind: ConfigMap
metadata:
  name: typo
  labelz: {}
  ownerReferences:
    - {apiVersion: v1, kind: Node, name: n, uid: u, extra: []}
data: {k: v}
";
    assert_eq!(
        unknown_fields_of::<ConfigMap>(text),
        ["metadata.labelz", "metadata.ownerReferences[0].extra"]
    );
}

#[test]
fn detector_accepts_what_the_round_trip_normalizes() {
    // Nulls, empty maps and lists on known fields, IntOrString and Quantity in both spellings,
    // and label keys with dots: none of it is an unknown field.
    let text = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: fine
  creationTimestamp: null
  labels: {app.kubernetes.io/name: fine}
  annotations: {}
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: fine}
  updateStrategy:
    rollingUpdate: {maxUnavailable: "10%"}
  template:
    metadata:
      creationTimestamp: null
      labels: {app.kubernetes.io/name: fine}
    spec:
      tolerations: []
      securityContext: {}
      containers:
        - name: c
          image: busybox
          args: []
          env: [{name: A, value: ""}]
          ports: [{containerPort: 80, name: http}]
          resources:
            requests: {cpu: 1, memory: 1.5Gi}
            limits: {cpu: "2", memory: 1073741824}
          livenessProbe:
            httpGet: {path: /livez, port: http}
          readinessProbe:
            httpGet: {path: /healthz, port: 8080}
      volumes:
        - name: scratch
          emptyDir: {}
status:
  currentNumberScheduled: 0
"#;
    assert_eq!(unknown_fields_of::<DaemonSet>(text), Vec::<String>::new());
}

#[test]
fn detector_rejects_unknown_kinds_and_wrong_groups() {
    for text in [
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
        "apiVersion: v1\nkind: DaemonSet\nmetadata: {name: x}\n",
        "metadata: {name: x}\n",
    ] {
        let documents = yaml_documents(text).expect("fixture is YAML");
        assert!(parse_manifest(&documents[0]).is_err(), "accepted:\n{text}");
    }
}

#[test]
fn documents_split_on_separators_and_skip_empty_ones() {
    let text = "---\n# only a comment\n---\napiVersion: v1\nkind: ServiceAccount\n\
                metadata: {name: a}\n---\n---\napiVersion: v1\nkind: ServiceAccount\n\
                metadata: {name: b}\n";
    let documents = yaml_documents(text).expect("YAML");
    let names: Vec<&str> = documents
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn child_paths_quote_keys_with_dots() {
    let labels = child_path(&child_path("", "metadata"), "labels");
    assert_eq!(
        child_path(&labels, "app.kubernetes.io/name"),
        r#"metadata.labels["app.kubernetes.io/name"]"#
    );
    assert_eq!(
        child_path("", "kubernetes.io/name"),
        r#"["kubernetes.io/name"]"#
    );
}
