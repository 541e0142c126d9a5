//! `--source dir:PATH`: reading a directory of manifests.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proxy_userspace::source::dir::{
    load_dir, parse_documents, DirChanges, DirError, DirSource, Object,
};

/// A scratch directory removed on drop (also when the test panics).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kproxy-dir-source-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create scratch dir");
        ScratchDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write fixture");
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const SERVICE_WEB: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 198.18.100.1
  ports:
  - name: http
    port: 80
";

fn names(objects: &[Object]) -> Vec<String> {
    objects
        .iter()
        .map(|object| format!("{} {}", object.kind(), object.qualified_name()))
        .collect()
}

fn parse(name: &str, text: &str) -> Result<Vec<Object>, DirError> {
    parse_documents(Path::new(name), text)
}

#[track_caller]
fn parse_error(name: &str, text: &str) -> DirError {
    match parse(name, text) {
        Ok(objects) => panic!("expected an error, got {:?}", names(&objects)),
        Err(error) => error,
    }
}

#[test]
fn multi_document_file() {
    let text = "\
---
# the web Service
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
---
---
# only a comment
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.0.1]}]
--- {apiVersion: v1, kind: Node, metadata: {name: node-a}}
...
";
    let objects = parse("all.yaml", text).expect("parses");
    assert_eq!(
        names(&objects),
        [
            "Service shop/web",
            "EndpointSlice default/web-1",
            "Node node-a"
        ]
    );
    let Object::EndpointSlice(slice) = &objects[1] else {
        panic!("second object is the slice");
    };
    assert_eq!(slice.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(slice.endpoints[0].addresses, ["198.19.0.1"]);
    let Object::Node(node) = &objects[2] else {
        panic!("third object is the Node");
    };
    assert_eq!(node.metadata.namespace, None, "Nodes have no namespace");
}

#[test]
fn crlf_line_endings() {
    let db = SERVICE_WEB.replace("web", "db");
    let text = format!("{SERVICE_WEB}---\n{db}").replace('\n', "\r\n");
    let objects = parse("crlf.yaml", &text).expect("parses");
    assert_eq!(
        names(&objects),
        ["Service default/web", "Service default/db"]
    );

    let text = text.replacen("port: 80", "port: x", 2);
    let error = parse_error("crlf.yaml", &text);
    assert_eq!(error.line(), Some(9), "{error}");
    let text =
        format!("{SERVICE_WEB}---\n{}", db.replace("port: 80", "port: x")).replace('\n', "\r\n");
    let error = parse_error("crlf.yaml", &text);
    assert_eq!(error.line(), Some(19), "{error}");
}

#[test]
fn list_is_expanded() {
    let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web}
  spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: settings}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  endpoints: []
---
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: db, namespace: data}
  spec: {clusterIP: 198.18.100.2, ports: [{port: 5432}]}
";
    let objects = parse("list.yaml", text).expect("parses");
    assert_eq!(
        names(&objects),
        [
            "Service default/web",
            "EndpointSlice default/web-1",
            "Service data/db"
        ]
    );
}

#[test]
fn unknown_kinds_are_skipped() {
    let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: 3}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {port: \"80\"}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative-web}
spec: {template: {spec: {containers: [{image: web}]}}}
---
apiVersion: v1
kind: ConfigMapList
items: [{metadata: {name: x}}]
---
";
    let objects = parse("app.yaml", &format!("{text}{SERVICE_WEB}")).expect("parses");
    assert_eq!(names(&objects), ["Service default/web"]);
}

#[test]
fn syntax_error_names_the_file_line() {
    // Line 15 is indented as a key of nothing: a syntax error there.
    let text = format!(
        "{SERVICE_WEB}---
apiVersion: v1
kind: Service
metadata:
  name: db
 namespace: data
"
    );
    assert_eq!(text.lines().nth(15 - 1), Some(" namespace: data"));
    let error = parse_error("manifests/x.yaml", &text);
    assert!(matches!(error, DirError::Syntax { .. }), "{error}");
    assert_eq!(error.line(), Some(15), "{error}");
    let message = error.to_string();
    assert!(message.starts_with("manifests/x.yaml:15: "), "{message}");
    assert!(message.contains("fix the file"), "{message}");
    assert!(
        !message.contains("at line 5 "),
        "document-relative line leaked: {message}"
    );
}

#[test]
fn type_error_in_second_document_names_the_file_line() {
    let text = format!(
        "{SERVICE_WEB}---
apiVersion: v1
kind: Service
metadata:
  name: db
spec:
  clusterIP: 198.18.100.2
  ports:
  - name: pg
    port: fivefourthreetwo
"
    );
    assert_eq!(text.lines().nth(19 - 1), Some("    port: fivefourthreetwo"));
    let error = parse_error("manifests/x.yaml", &text);
    assert!(matches!(error, DirError::Invalid { .. }), "{error}");
    assert_eq!(error.line(), Some(19), "{error}");
    let message = error.to_string();
    assert!(
        message.starts_with(
            "manifests/x.yaml:19: Service default/db: spec.ports[0].port: invalid type"
        ),
        "{message}"
    );
    assert!(
        message.ends_with("fix the file, the last good state stays programmed"),
        "{message}"
    );
}

#[test]
fn type_error_in_a_list_item_names_the_file_line() {
    let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web}
  spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1}
  addressType: IPv4
  endpoints:
  - addresses: 198.19.0.1
";
    let error = parse_error("list.yaml", text);
    assert_eq!(error.line(), Some(13), "{error}");
    assert!(
        error
            .to_string()
            .contains("EndpointSlice default/web-1: items[1].endpoints[0].addresses"),
        "{error}"
    );
}

#[test]
fn port_out_of_range_names_the_line() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 198.18.100.1
  ports:
  - name: http
    port: 80
  - name: big
    port: 70000
";
    let error = parse_error("web.yaml", text);
    assert_eq!(error.line(), Some(10), "{error}");
    let message = error.to_string();
    assert!(message.contains("Service default/web"), "{message}");
    assert!(message.contains("spec.ports[1].port"), "{message}");
    assert!(message.contains("out of range"), "{message}");
}

#[test]
fn values_the_model_cannot_use_are_errors_with_lines() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "unknown protocol",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: 80\n    protocol: tcp\n",
            7,
            "\"tcp\" is not one of TCP, UDP, SCTP",
        ),
        (
            "bad clusterIP",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 198.18.100.300\n",
            5,
            "is not an IP address",
        ),
        (
            "slice port out of range",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\nports:\n- port: 0\n",
            7,
            "port 0 is out of range",
        ),
        (
            "bad addressType",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: ipv4\nendpoints: []\n",
            4,
            "\"ipv4\" is not one of IPv4, IPv6, FQDN",
        ),
        (
            "endpoint without address",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints:\n- addresses: []\n",
            6,
            "an endpoint needs one address",
        ),
        (
            "address of the wrong family (reported at the object)",
            "# slices\n\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints:\n- addresses: [\"2001:db8::1\"]\n",
            3,
            "endpoints[0].addresses[0]: \"2001:db8::1\" is not an IPv4 address",
        ),
    ];
    for (name, text, line, needle) in cases {
        let error = parse_error("f.yaml", text);
        assert_eq!(error.line(), Some(*line), "{name}: {error}");
        assert!(error.to_string().contains(needle), "{name}: {error}");
    }
}

#[test]
fn apiversion_and_kind_are_required() {
    let text = format!("{SERVICE_WEB}---\n\nmetadata: {{name: x}}\nspec: {{}}\n");
    let error = parse_error("a.yaml", &text);
    assert_eq!(error.line(), Some(12), "{error}");
    assert!(
        error
            .to_string()
            .contains("apiVersion and kind are missing"),
        "{error}"
    );

    let error = parse_error("a.yaml", "kind: Service\nmetadata: {name: x}\n");
    assert!(
        error.to_string().contains("Service has no apiVersion"),
        "{error}"
    );

    let error = parse_error("a.yaml", "apiVersion: v1\nmetadata: {name: x}\n");
    assert!(error.to_string().contains("kind is missing"), "{error}");

    let text = "apiVersion: v1\nkind: List\nitems:\n- metadata: {name: x}\n- kind: Service\n  metadata: {name: y}\n";
    let error = parse_error("a.yaml", text);
    assert_eq!(error.line(), Some(4), "the first bad item: {error}");
    assert!(
        error
            .to_string()
            .contains("items[0]: apiVersion and kind are missing"),
        "{error}"
    );
}

#[test]
fn wrong_apiversion_is_an_error() {
    let text = "\
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: web-1}
addressType: IPv4
endpoints: []
";
    let error = parse_error("slices.yaml", text);
    assert_eq!(error.line(), Some(5), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("EndpointSlice has apiVersion discovery.k8s.io/v1beta1, kproxy reads discovery.k8s.io/v1"),
        "{message}"
    );
}

#[test]
fn objects_need_a_name() {
    let error = parse_error("a.yaml", "apiVersion: v1\nkind: Service\nspec: {}\n");
    assert!(
        error.to_string().contains("Service has no metadata.name"),
        "{error}"
    );
}

#[test]
fn json_files() {
    let dir = ScratchDir::new();
    dir.write(
        "web.json",
        "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Service\",\n\t\"metadata\": {\"name\": \"web\"},\n\t\"spec\": {\"ports\": [{\"port\": 80}]}\n}\n",
    );
    let snapshot = load_dir(&dir.0).expect("loads");
    assert_eq!(snapshot.services.len(), 1);

    let text = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\",\n  \"metadata\": {\"name\": \"web\"},\n  \"spec\": {\"ports\": [{\"port\": \"http\"}]}\n}\n";
    let error = parse_error("web.json", text);
    assert_eq!(error.line(), Some(5), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("web.json:5: Service default/web: invalid type"),
        "{error}"
    );
}

#[test]
fn load_dir_reads_files_in_name_order() {
    let dir = ScratchDir::new();
    dir.write("20-b.yml", &SERVICE_WEB.replace("web", "b"));
    dir.write("10-a.yaml", &SERVICE_WEB.replace("web", "a"));
    dir.write("30-c.YAML", &SERVICE_WEB.replace("web", "c"));
    let snapshot = load_dir(&dir.0).expect("loads");
    let services: Vec<_> = snapshot
        .services
        .iter()
        .map(|service| service.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(services, ["a", "b", "c"]);
}

#[test]
fn hidden_temp_and_other_files_are_ignored() {
    let dir = ScratchDir::new();
    dir.write("web.yaml", SERVICE_WEB);
    let garbage = "this: is: not: yaml: [\n";
    dir.write(".hidden.yaml", garbage);
    dir.write(".web.yaml.swp", garbage);
    dir.write("web.yaml~", garbage);
    dir.write("#web.yaml#", garbage);
    dir.write("notes.txt", garbage);
    dir.write("README.md", garbage);
    fs::create_dir(dir.0.join("sub.yaml")).expect("mkdir");
    fs::create_dir(dir.0.join("nested")).expect("mkdir");
    dir.write("nested/other.yaml", garbage);
    let snapshot = load_dir(&dir.0).expect("loads");
    assert_eq!(snapshot.services.len(), 1);
    assert!(snapshot.endpoint_slices.is_empty());
}

#[test]
fn empty_dir_is_an_empty_snapshot() {
    let dir = ScratchDir::new();
    let snapshot = load_dir(&dir.0).expect("loads");
    assert!(snapshot.services.is_empty());
    assert!(snapshot.endpoint_slices.is_empty());
    assert!(snapshot.nodes.is_empty());

    dir.write("empty.yaml", "");
    dir.write("comments.yaml", "# nothing yet\n---\n");
    let snapshot = load_dir(&dir.0).expect("loads");
    assert!(snapshot.services.is_empty());
}

#[test]
fn duplicates_across_files_name_both_files() {
    let dir = ScratchDir::new();
    dir.write("a.yaml", SERVICE_WEB);
    dir.write(
        "b.yaml",
        &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: web}}\n---\n{SERVICE_WEB}"),
    );
    let error = load_dir(&dir.0).expect_err("duplicate");
    let DirError::Duplicate {
        kind,
        name,
        line,
        first_line,
        ..
    } = &error
    else {
        panic!("expected a duplicate error: {error}");
    };
    assert_eq!((*kind, name.as_str()), ("Service", "default/web"));
    assert_eq!((*line, *first_line), (5, 1));
    let message = error.to_string();
    let a = dir.0.join("a.yaml");
    let b = dir.0.join("b.yaml");
    assert!(
        message.starts_with(&format!("{}:5: ", b.display())),
        "{message}"
    );
    assert!(message.contains(&format!("{}:1", a.display())), "{message}");
}

#[test]
fn duplicates_after_namespace_defaulting() {
    let dir = ScratchDir::new();
    dir.write("a.yaml", SERVICE_WEB);
    dir.write(
        "b.yaml",
        &SERVICE_WEB.replace("name: web", "name: web\n  namespace: default"),
    );
    assert!(matches!(load_dir(&dir.0), Err(DirError::Duplicate { .. })));

    // The same name in another namespace or of another kind is no duplicate.
    dir.write(
        "b.yaml",
        &SERVICE_WEB.replace("name: web", "name: web\n  namespace: shop"),
    );
    let snapshot = load_dir(&dir.0).expect("loads");
    assert_eq!(snapshot.services.len(), 2);
}

#[test]
fn missing_dir_is_an_error() {
    let dir = ScratchDir::new();
    let missing = dir.0.join("nope");
    let error = load_dir(&missing).expect_err("missing");
    assert!(matches!(error, DirError::ListDir { .. }));
    assert!(error.to_string().contains("nope"), "{error}");
}

/// The `Arc` of each Service in a snapshot, by name.
fn services_by_name(
    snapshot: &proxy_userspace::model::Snapshot,
) -> std::collections::BTreeMap<String, Arc<k8s_openapi::api::core::v1::Service>> {
    snapshot
        .services
        .iter()
        .map(|s| (s.metadata.name.clone().unwrap_or_default(), Arc::clone(s)))
        .collect()
}

#[test]
fn a_dir_source_parses_only_changed_files() {
    let dir = ScratchDir::new();
    dir.write("a.yaml", &SERVICE_WEB.replace("web", "a"));
    dir.write("b.yaml", &SERVICE_WEB.replace("web", "b"));
    let mut source = DirSource::new(&dir.0);
    let first = services_by_name(&source.load().expect("loads"));

    // Nothing changed: the very same objects (the model skips them).
    let again = services_by_name(&source.load().expect("loads"));
    assert!(Arc::ptr_eq(&first["a"], &again["a"]));
    assert!(Arc::ptr_eq(&first["b"], &again["b"]));

    // b changes: a is still the same object, b is read again.
    dir.write(
        "b.yaml",
        &SERVICE_WEB.replace("web", "b").replace("80", "81"),
    );
    let changed = services_by_name(&source.load().expect("loads"));
    assert!(Arc::ptr_eq(&first["a"], &changed["a"]));
    assert!(!Arc::ptr_eq(&first["b"], &changed["b"]));
    let port = |s: &k8s_openapi::api::core::v1::Service| {
        s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
    };
    assert_eq!(port(&changed["b"]), 81);

    // A broken file fails the load; once fixed, the rest is still shared.
    dir.write("b.yaml", "kind: Service\nmetadata: [\n");
    assert!(source.load().is_err());
    dir.write("b.yaml", &SERVICE_WEB.replace("web", "b"));
    let fixed = services_by_name(&source.load().expect("loads"));
    assert!(Arc::ptr_eq(&first["a"], &fixed["a"]));
    assert_eq!(port(&fixed["b"]), 80);

    // A copy in a new file is still a duplicate; a removed file's objects go.
    dir.write("c.yaml", &SERVICE_WEB.replace("web", "a"));
    assert!(matches!(source.load(), Err(DirError::Duplicate { .. })));
    fs::remove_file(dir.0.join("c.yaml")).expect("remove");
    fs::remove_file(dir.0.join("a.yaml")).expect("remove");
    let left = services_by_name(&source.load().expect("loads"));
    assert_eq!(left.keys().collect::<Vec<_>>(), ["b"]);
}

#[test]
fn load_changes_reads_only_the_files_the_watcher_named() {
    let dir = ScratchDir::new();
    let a = dir.write("a.yaml", &SERVICE_WEB.replace("web", "a"));
    dir.write("b.yaml", &SERVICE_WEB.replace("web", "b"));
    let mut source = DirSource::new(&dir.0);
    // The first load reads everything, whatever it is told.
    let names = |source: &mut DirSource, changes| {
        services_by_name(&source.load_changes(changes).expect("loads"))
            .into_keys()
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&mut source, DirChanges::default()), ["a", "b"]);

    // c.yaml appears but the watcher has not named it yet: not read.
    let c = dir.write("c.yaml", &SERVICE_WEB.replace("web", "c"));
    assert_eq!(names(&mut source, DirChanges::default()), ["a", "b"]);
    // Nor when only a temporary file is named (`sed -i` writes one).
    let mut changes = DirChanges::default();
    changes.add(dir.write("sedX1b2c3", "scratch"));
    assert_eq!(names(&mut source, changes), ["a", "b"]);
    let mut changes = DirChanges::default();
    changes.add(c);
    assert_eq!(names(&mut source, changes), ["a", "b", "c"]);

    // A named file that is gone takes its objects with it.
    fs::remove_file(&a).expect("remove");
    let mut changes = DirChanges::default();
    changes.add(a);
    assert_eq!(names(&mut source, changes), ["b", "c"]);

    // A ConfigMap mount swaps its `..data` link: every file is read again.
    fs::remove_file(dir.0.join("b.yaml")).expect("remove");
    let mut changes = DirChanges::default();
    changes.add(dir.0.join("..data"));
    assert_eq!(names(&mut source, changes), ["c"]);

    // After an error the next load reads everything, named or not.
    let broken = dir.write("d.yaml", "kind: Service\nmetadata: [\n");
    let mut changes = DirChanges::default();
    changes.add(broken.clone());
    assert!(source.load_changes(changes).is_err());
    dir.write("d.yaml", &SERVICE_WEB.replace("web", "d"));
    dir.write("e.yaml", &SERVICE_WEB.replace("web", "e"));
    assert_eq!(names(&mut source, DirChanges::default()), ["c", "d", "e"]);
}
