//! `--source dir:PATH`: multi-document YAML files of Service, EndpointSlice, Node.
//!
//! The files hold the objects kubectl would show (`kubectl get svc,endpointslices
//! -o yaml` output works as is). Other kinds are skipped, so a directory of
//! ordinary manifests can be pointed at directly.
//!
//! Errors name the file and the line (1-based, within the file) and say what
//! to do. serde only reports positions relative to the text it parses, so each
//! document is parsed on its own and its start line added back; and since a
//! typed object cannot be chosen before its `kind` is known, a document is read
//! in passes over the same text: a header pass (`apiVersion`, `kind`, names),
//! then a typed pass steered by what the header pass found, then a pass that
//! checks what k8s-openapi accepts but the model relies on (port ranges, ...).
//! Every pass reads the text itself, so every error carries its position.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::model::{Snapshot, DEFAULT_NAMESPACE};

/// What to tell the user after every problem in a file: the daemon keeps what
/// it last programmed until the directory parses again.
const FIX: &str = "fix the file, the last good state stays programmed";

/// One object kproxy reads from a manifest file.
// Unboxed: each object is parsed once and moved straight into the Snapshot.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        self.object_kind().name()
    }

    /// `namespace/name`, or `name` for a Node.
    pub fn qualified_name(&self) -> String {
        let metadata = match self {
            Object::Service(service) => &service.metadata,
            Object::EndpointSlice(slice) => &slice.metadata,
            Object::Node(node) => &node.metadata,
        };
        let name = metadata.name.as_deref().unwrap_or("");
        match (self, metadata.namespace.as_deref()) {
            (Object::Node(_), _) => name.to_owned(),
            (_, namespace) => format!("{}/{name}", namespace.unwrap_or(DEFAULT_NAMESPACE)),
        }
    }

    fn object_kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum DirError {
    #[error("{}: cannot list the directory: {source}; check that it exists and is readable", .path.display())]
    ListDir { path: PathBuf, source: io::Error },

    #[error("{}: cannot read the file: {source}; {FIX}", .path.display())]
    ReadFile { path: PathBuf, source: io::Error },

    #[error("{}:{line}: syntax error: {message}; {FIX}", .file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{}:{line}: {message}; {FIX}", .file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        message: String,
    },

    #[error(
        "{}:{line}: {kind} {name} is already defined at {}:{first_line}; remove one of the two, the last good state stays programmed",
        .file.display(),
        .first_file.display()
    )]
    Duplicate {
        kind: &'static str,
        name: String,
        file: PathBuf,
        line: usize,
        first_file: PathBuf,
        first_line: usize,
    },
}

impl DirError {
    /// The file the problem is in (the directory for `ListDir`).
    pub fn file(&self) -> &Path {
        match self {
            DirError::ListDir { path, .. } | DirError::ReadFile { path, .. } => path,
            DirError::Syntax { file, .. }
            | DirError::Invalid { file, .. }
            | DirError::Duplicate { file, .. } => file,
        }
    }

    /// The 1-based line in [`DirError::file`], when the problem has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            DirError::ListDir { .. } | DirError::ReadFile { .. } => None,
            DirError::Syntax { line, .. }
            | DirError::Invalid { line, .. }
            | DirError::Duplicate { line, .. } => Some(*line),
        }
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `path` (not
/// in subdirectories), in name order. Hidden files (editor swap files, the
/// `..data` links of a mounted ConfigMap) and backups ending in `~` are skipped.
pub fn load_dir(path: &Path) -> Result<Snapshot, DirError> {
    DirSource::new(path).load()
}

/// A directory source that remembers what it parsed. It parses a file
/// again only when its text changed, and hands out the same `Arc` for every
/// object of an unchanged file, so the model recomputes only what a change
/// touched. Told which files changed (`load_changes`, from the watcher), it
/// reads only those; one object per file then makes a change cost one
/// object, whatever the size of the directory.
pub struct DirSource {
    path: PathBuf,
    /// By file (in name order), what its text parsed to when it last
    /// parsed cleanly.
    files: BTreeMap<PathBuf, ParsedFile>,
    /// How many times each (kind, namespace/name) is defined across
    /// `files`, and how many are defined more than once (an error).
    defined: HashMap<(Kind, String), usize>,
    duplicates: usize,
    /// The snapshot of `files`, until one of them changes.
    snapshot: Option<Snapshot>,
    /// False until a load read the whole directory, and again after an
    /// error: the next load then reads every file.
    complete: bool,
}

/// What changed in the directory since the last load, as a watcher reports it.
#[derive(Clone, Debug, Default)]
pub struct DirChanges {
    everything: bool,
    files: BTreeSet<PathBuf>,
}

impl DirChanges {
    /// Read the whole directory again (a full resync, a lost event).
    pub fn everything() -> Self {
        DirChanges {
            everything: true,
            files: BTreeSet::new(),
        }
    }

    /// A path the watcher named. The directory itself or a `..` entry (a
    /// ConfigMap mount's `..data` link swap, which changes every file at
    /// once) stands for everything; a file that is not a manifest (an
    /// editor's temporary file) for nothing.
    pub fn add(&mut self, path: PathBuf) {
        self.files.insert(path);
    }

    pub fn add_everything(&mut self) {
        self.everything = true;
    }

    pub fn is_empty(&self) -> bool {
        !self.everything && self.files.is_empty()
    }
}

struct ParsedFile {
    text: String,
    objects: Vec<SharedObject>,
}

/// One object of a file, shared with the snapshots that hold it.
struct SharedObject {
    kind: Kind,
    qualified_name: String,
    line: usize,
    object: Shared,
}

enum Shared {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Arc<Node>),
}

impl DirSource {
    pub fn new(path: &Path) -> Self {
        DirSource {
            path: path.to_owned(),
            files: BTreeMap::new(),
            defined: HashMap::new(),
            duplicates: 0,
            snapshot: None,
            complete: false,
        }
    }

    /// The directory's objects now, every file read (see [`load_dir`] for
    /// which files count).
    pub fn load(&mut self) -> Result<Snapshot, DirError> {
        self.load_changes(DirChanges::everything())
    }

    /// The directory's objects now, reading only the files in `changes`
    /// (everything on the first load, after an error, or when `changes`
    /// names something other than a manifest file of the directory). On an
    /// error nothing is returned, and the next load reads everything.
    pub fn load_changes(&mut self, changes: DirChanges) -> Result<Snapshot, DirError> {
        let result = self.refresh(changes).and_then(|()| self.snapshot());
        self.complete = result.is_ok();
        result
    }

    fn refresh(&mut self, changes: DirChanges) -> Result<(), DirError> {
        let mut named = Vec::new();
        let mut everything = changes.everything || !self.complete;
        for file in changes.files {
            let name = file.file_name().and_then(|name| name.to_str());
            if file.parent() != Some(self.path.as_path())
                || name.is_none_or(|n| n.starts_with(".."))
            {
                // The directory itself, or a ConfigMap mount swapping its
                // `..data` link (every file changes at once).
                everything = true;
            } else if name.is_some_and(is_manifest_name) {
                named.push(file);
            }
            // Anything else (an editor's or `sed -i`'s temporary file) is
            // never read, so its changes change nothing.
        }
        if !everything {
            for file in named {
                // metadata() follows symlinks, as the listing does.
                if fs::metadata(&file).is_ok_and(|m| m.is_file()) {
                    self.read(file)?;
                } else {
                    self.forget(&file);
                }
            }
            return Ok(());
        }
        let files = manifest_files(&self.path)?;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| files.binary_search(path).is_err())
            .cloned()
            .collect();
        for file in gone {
            self.forget(&file);
        }
        for file in files {
            self.read(file)?;
        }
        Ok(())
    }

    /// Reads one file; parses it only when its text changed.
    fn read(&mut self, file: PathBuf) -> Result<(), DirError> {
        let text = fs::read_to_string(&file).map_err(|source| DirError::ReadFile {
            path: file.clone(),
            source,
        })?;
        if self
            .files
            .get(&file)
            .is_some_and(|parsed| parsed.text == text)
        {
            return Ok(());
        }
        self.forget(&file);
        let objects: Vec<SharedObject> = parse_located(&file, &text)?
            .into_iter()
            .map(|(object, line)| SharedObject {
                kind: object.object_kind(),
                qualified_name: object.qualified_name(),
                line,
                object: match object {
                    Object::Service(service) => Shared::Service(Arc::new(service)),
                    Object::EndpointSlice(slice) => Shared::EndpointSlice(Arc::new(slice)),
                    Object::Node(node) => Shared::Node(Arc::new(node)),
                },
            })
            .collect();
        for object in &objects {
            let count = self
                .defined
                .entry((object.kind, object.qualified_name.clone()))
                .or_default();
            *count += 1;
            if *count == 2 {
                self.duplicates += 1;
            }
        }
        self.files.insert(file, ParsedFile { text, objects });
        self.snapshot = None;
        Ok(())
    }

    /// Drops what a file held.
    fn forget(&mut self, file: &Path) {
        let Some(parsed) = self.files.remove(file) else {
            return;
        };
        self.snapshot = None;
        for object in parsed.objects {
            let identity = (object.kind, object.qualified_name);
            if let Some(count) = self.defined.get_mut(&identity) {
                *count -= 1;
                match *count {
                    0 => {
                        self.defined.remove(&identity);
                    }
                    1 => self.duplicates -= 1,
                    _ => {}
                }
            }
        }
    }

    /// Every remembered object, in file name order; an object defined twice
    /// is an error. Assembled again only after a file changed.
    fn snapshot(&mut self) -> Result<Snapshot, DirError> {
        // Counted as files change, so only a directory with a duplicate
        // pays for finding it.
        if self.duplicates > 0 {
            if let Some(error) = self.first_duplicate() {
                return Err(error);
            }
        }
        let files = &self.files;
        let snapshot = self.snapshot.get_or_insert_with(|| {
            let mut snapshot = Snapshot::default();
            for object in files.values().flat_map(|parsed| &parsed.objects) {
                match &object.object {
                    Shared::Service(service) => snapshot.services.push(Arc::clone(service)),
                    Shared::EndpointSlice(slice) => {
                        snapshot.endpoint_slices.push(Arc::clone(slice))
                    }
                    Shared::Node(node) => snapshot.nodes.push(Arc::clone(node)),
                }
            }
            snapshot
        });
        Ok(snapshot.clone())
    }

    /// The first object, in file name order, defined a second time.
    fn first_duplicate(&self) -> Option<DirError> {
        let mut defined: HashMap<(Kind, &str), (&Path, usize)> = HashMap::new();
        for (file, parsed) in &self.files {
            for object in &parsed.objects {
                let identity = (object.kind, object.qualified_name.as_str());
                if let Some((first_file, first_line)) = defined.get(&identity) {
                    return Some(DirError::Duplicate {
                        kind: object.kind.name(),
                        name: object.qualified_name.clone(),
                        file: file.clone(),
                        line: object.line,
                        first_file: first_file.to_path_buf(),
                        first_line: *first_line,
                    });
                }
                defined.insert(identity, (file, object.line));
            }
        }
        None
    }
}

/// Parses one file's text: YAML documents separated by `---` lines (JSON when
/// `file` ends in `.json`). Empty documents and kinds kproxy does not read are
/// skipped; `kind: List` is expanded. Services and EndpointSlices without a
/// namespace get `default`.
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<Object>, DirError> {
    Ok(parse_located(file, text)?
        .into_iter()
        .map(|(object, _)| object)
        .collect())
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let list_error = |source| DirError::ListDir {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::debug!(file = ?entry.path(), "skipping a file whose name is not UTF-8");
            continue;
        };
        if !is_manifest_name(name) {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks: ConfigMap mounts are links to files.
        match fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => files.push(path),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "skipping an unreadable entry");
            }
        }
    }
    files.sort();
    Ok(files)
}

fn is_manifest_name(name: &str) -> bool {
    if name.starts_with('.') || name.ends_with('~') || name.starts_with('#') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| lower.len() > ext.len() && lower.ends_with(ext))
}

/// Objects with the file line their document (or List) starts on.
fn parse_located(file: &Path, text: &str) -> Result<Vec<(Object, usize)>, DirError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_json = file
        .extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    let documents = if is_json {
        vec![Document {
            text: text.to_owned(),
            start_line: 1,
        }]
    } else {
        split_documents(text)
    };
    let format = if is_json { Format::Json } else { Format::Yaml };
    let mut objects = Vec::new();
    for document in &documents {
        let Some(line) = document.first_content_line() else {
            continue;
        };
        let parsed = parse_document(format, document, file, line)?;
        objects.extend(parsed.into_iter().map(|object| (object, line)));
    }
    Ok(objects)
}

/// One YAML document: its text and the file line its first line is on.
struct Document {
    text: String,
    start_line: usize,
}

impl Document {
    /// The file line of the first line that is not blank, a comment or a
    /// directive; `None` for an empty document.
    fn first_content_line(&self) -> Option<usize> {
        self.text
            .lines()
            .position(|line| {
                let line = line.trim();
                !(line.is_empty() || line.starts_with('#') || line.starts_with('%'))
            })
            .map(|index| self.start_line + index)
    }

    /// A position serde reported (1-based within the document) in the file.
    fn file_line(&self, document_line: usize) -> usize {
        self.start_line + document_line.max(1) - 1
    }
}

/// Splits on `---` lines. The marker itself is blanked rather than dropped
/// (`--- {a: 1}` keeps its content) so each document's line 1 is its marker
/// line and columns stay as in the file.
fn split_documents(text: &str) -> Vec<Document> {
    let mut documents = vec![Document {
        text: String::new(),
        start_line: 1,
    }];
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        let is_marker =
            content == "---" || content.starts_with("--- ") || content.starts_with("---\t");
        if is_marker {
            documents.push(Document {
                text: format!("   {}", &line[3..]),
                start_line: index + 1,
            });
        } else {
            let current = documents.last_mut().expect("starts with one document");
            current.text.push_str(line);
        }
    }
    documents
}

#[derive(Clone, Copy)]
enum Format {
    Yaml,
    Json,
}

/// A problem serde reported, its line relative to the parsed text.
struct FormatError {
    line: Option<usize>,
    message: String,
    syntax: bool,
}

impl FormatError {
    fn from_yaml(error: serde_yaml::Error, syntax: bool) -> Self {
        let line = error.location().map(|location| location.line());
        let mut message = error.to_string();
        // The position goes in front of the message; drop the repetition.
        if let Some(location) = error.location() {
            let suffix = format!(" at line {} column {}", location.line(), location.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
        FormatError {
            line,
            message,
            syntax,
        }
    }

    fn from_json(error: serde_json::Error) -> Self {
        let line = (error.line() > 0).then_some(error.line());
        let mut message = error.to_string();
        let suffix = format!(" at line {} column {}", error.line(), error.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
        if message == "trailing characters" {
            message.push_str(" after the object: a .json file holds one object (or a List)");
        }
        FormatError {
            line,
            message,
            syntax: matches!(
                error.classify(),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof
            ),
        }
    }
}

/// Rewrites "line N" in a message about a document into file lines.
fn shift_line_numbers(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match after[..digits].parse::<usize>() {
            Ok(number) if after[digits..].starts_with(" column") => {
                out.push_str(&(number + offset).to_string());
                rest = &after[digits..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

impl Format {
    fn deserialize<'de, S>(self, text: &'de str, seed: S) -> Result<S::Value, FormatError>
    where
        S: DeserializeSeed<'de>,
    {
        match self {
            Format::Yaml => seed
                .deserialize(serde_yaml::Deserializer::from_str(text))
                .map_err(|error| {
                    // Anything that a no-op pass also rejects is malformed YAML.
                    let syntax =
                        IgnoredAny::deserialize(serde_yaml::Deserializer::from_str(text)).is_err();
                    FormatError::from_yaml(error, syntax)
                }),
            Format::Json => {
                let mut deserializer = serde_json::Deserializer::from_str(text);
                let value = seed
                    .deserialize(&mut deserializer)
                    .map_err(FormatError::from_json)?;
                deserializer.end().map_err(FormatError::from_json)?;
                Ok(value)
            }
        }
    }
}

fn parse_document(
    format: Format,
    document: &Document,
    file: &Path,
    content_line: usize,
) -> Result<Vec<Object>, DirError> {
    let located = |error: FormatError, label: Option<&str>| {
        let line = error
            .line
            .map_or(content_line, |line| document.file_line(line));
        let message = shift_line_numbers(&error.message, document.start_line - 1);
        if error.syntax {
            DirError::Syntax {
                file: file.to_owned(),
                line,
                message,
            }
        } else {
            let message = match label {
                Some(label) => format!("{label}: {message}"),
                None => message,
            };
            DirError::Invalid {
                file: file.to_owned(),
                line,
                message,
            }
        }
    };

    let header: Option<Header> = format
        .deserialize(&document.text, PhantomData)
        .map_err(|error| located(error, None))?;
    let Some(header) = header else {
        return Ok(Vec::new());
    };
    let plan = Plan::of(&header, Parent::Document, file, content_line);
    if !plan.reads_objects() {
        return Ok(Vec::new());
    }

    let objects = RefCell::new(Vec::new());
    let current = Cell::new(None);
    for pass in [Pass::Typed, Pass::Check] {
        let seed = PlanSeed {
            plan: &plan,
            pass,
            objects: &objects,
            current: &current,
        };
        format
            .deserialize(&document.text, seed)
            .map_err(|error| located(error, current.get()))?;
    }

    let mut objects = objects.into_inner();
    for object in &mut objects {
        default_namespace(object);
        check_addresses(object).map_err(|message| DirError::Invalid {
            file: file.to_owned(),
            line: content_line,
            message: format!("{} {}: {message}", object.kind(), object.qualified_name()),
        })?;
    }
    Ok(objects)
}

fn default_namespace(object: &mut Object) {
    let metadata = match object {
        Object::Service(service) => &mut service.metadata,
        Object::EndpointSlice(slice) => &mut slice.metadata,
        Object::Node(_) => return,
    };
    if metadata.namespace.as_deref().is_none_or(str::is_empty) {
        metadata.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
}

/// Endpoint addresses must be of the slice's family; the family is a sibling
/// field, so this runs on the typed object (the line is the object's).
fn check_addresses(object: &Object) -> Result<(), String> {
    let Object::EndpointSlice(slice) = object else {
        return Ok(());
    };
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        _ => return Ok(()),
    };
    for (e, endpoint) in slice.endpoints.iter().enumerate() {
        for (a, address) in endpoint.addresses.iter().enumerate() {
            let matches = match address.parse::<IpAddr>() {
                Ok(ip) => ip.is_ipv4() == want_v4,
                Err(_) => false,
            };
            if !matches {
                return Err(format!(
                    "endpoints[{e}].addresses[{a}]: {address:?} is not an {} address",
                    slice.address_type
                ));
            }
        }
    }
    Ok(())
}

/// The kinds kproxy reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The kind this (group, kind) names; a `Service` of another API group
    /// (Knative's, say) is a different resource, not ours.
    fn lookup(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|known| {
            known.name() == kind && api_group(known.api_version()) == api_group(api_version)
        })
    }
}

/// `discovery.k8s.io/v1` -> `discovery.k8s.io`; the core group is "".
fn api_group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

/// What the header pass reads of every document (and List item).
#[derive(Deserialize)]
#[serde(expecting = "a Kubernetes object (a mapping with apiVersion, kind and metadata)")]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<HeaderMetadata>,
    items: Option<Vec<Header>>,
}

#[derive(Deserialize)]
struct HeaderMetadata {
    name: Option<String>,
    namespace: Option<String>,
}

/// Where a header sits.
#[derive(Clone, Copy)]
enum Parent {
    Document,
    List,
    TypedList(Kind),
}

/// How the later passes read a document: the header pass's verdict.
enum Plan {
    Skip,
    Object {
        kind: Kind,
        label: String,
    },
    List(Vec<Plan>),
    /// Raised where the node is, so the error gets its line.
    Reject(String),
}

impl Plan {
    fn of(header: &Header, parent: Parent, file: &Path, line: usize) -> Plan {
        // Items of a `ServiceList` (etc.) may leave out `apiVersion` and
        // `kind`, as the API server returns them.
        let implied = match parent {
            Parent::TypedList(kind) => Some((kind.api_version(), kind.name())),
            Parent::Document | Parent::List => None,
        };
        let api_version = header
            .api_version
            .as_deref()
            .or(implied.map(|(api_version, _)| api_version));
        let kind = header.kind.as_deref().or(implied.map(|(_, kind)| kind));
        let (api_version, kind) = match (api_version, kind) {
            (Some(api_version), Some(kind)) => (api_version, kind),
            (None, None) => {
                return Plan::Reject(
                    "apiVersion and kind are missing: every object needs both \
                     (for example `apiVersion: v1` and `kind: Service`)"
                        .to_owned(),
                )
            }
            (None, Some(kind)) => {
                return Plan::Reject(format!(
                    "{kind} has no apiVersion: add one (for example `apiVersion: {}`)",
                    Kind::ALL
                        .into_iter()
                        .find(|known| known.name() == kind)
                        .map_or("v1", Kind::api_version)
                ))
            }
            (Some(_), None) => {
                return Plan::Reject(
                    "kind is missing: add one (Service, EndpointSlice or Node)".to_owned(),
                )
            }
        };

        if let Some(item_kind) = kind.strip_suffix("List") {
            let items_parent = if kind == "List" {
                Parent::List
            } else if let Some(item_kind) = Kind::lookup(api_version, item_kind) {
                if api_version != item_kind.api_version() {
                    return Plan::Reject(format!(
                        "{kind} has apiVersion {api_version}, kproxy reads {}: change apiVersion",
                        item_kind.api_version()
                    ));
                }
                Parent::TypedList(item_kind)
            } else {
                tracing::debug!(file = %file.display(), line, kind, "skipping a list kproxy does not read");
                return Plan::Skip;
            };
            if !matches!(parent, Parent::Document) {
                return Plan::Reject("a List inside a List is not supported".to_owned());
            }
            let items = header.items.iter().flatten();
            return Plan::List(
                items
                    .map(|item| Plan::of(item, items_parent, file, line))
                    .collect(),
            );
        }

        let metadata = header.metadata.as_ref();
        let name = metadata.and_then(|metadata| metadata.name.as_deref());
        let Some(known) = Kind::lookup(api_version, kind) else {
            if Kind::ALL.iter().any(|known| known.name() == kind) {
                // Likely another project's resource (Knative's Service), but
                // maybe a typo: say so where it can be seen.
                tracing::info!(
                    file = %file.display(),
                    line,
                    api_version,
                    kind,
                    name,
                    "skipping an object of another API group"
                );
                return Plan::Skip;
            }
            tracing::debug!(
                file = %file.display(),
                line,
                api_version,
                kind,
                name,
                "skipping an object kproxy does not read"
            );
            return Plan::Skip;
        };
        if api_version != known.api_version() {
            return Plan::Reject(format!(
                "{kind} has apiVersion {api_version}, kproxy reads {}: change apiVersion",
                known.api_version()
            ));
        }
        let Some(name) = name.filter(|name| !name.is_empty()) else {
            return Plan::Reject(format!("{kind} has no metadata.name: add one"));
        };
        let label = match known {
            Kind::Node => format!("Node {name}"),
            _ => {
                let namespace = metadata
                    .and_then(|metadata| metadata.namespace.as_deref())
                    .filter(|namespace| !namespace.is_empty())
                    .unwrap_or(DEFAULT_NAMESPACE);
                format!("{kind} {namespace}/{name}")
            }
        };
        Plan::Object { kind: known, label }
    }

    fn reads_objects(&self) -> bool {
        match self {
            Plan::Skip => false,
            Plan::Object { .. } | Plan::Reject(_) => true,
            Plan::List(items) => items.iter().any(Plan::reads_objects),
        }
    }
}

#[derive(Clone, Copy)]
enum Pass {
    /// Deserialize the k8s-openapi types.
    Typed,
    /// Check values the types accept but the model cannot use.
    Check,
}

/// Walks a document as its [`Plan`] says.
struct PlanSeed<'p> {
    plan: &'p Plan,
    pass: Pass,
    objects: &'p RefCell<Vec<Object>>,
    /// The object being read, to name it in an error.
    current: &'p Cell<Option<&'p str>>,
}

impl<'de> DeserializeSeed<'de> for PlanSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        match self.plan {
            Plan::Skip => IgnoredAny::deserialize(deserializer).map(drop),
            Plan::Reject(message) => deserializer.deserialize_any(Reject(message)),
            Plan::List(items) => deserializer.deserialize_map(ListVisitor { items, seed: self }),
            Plan::Object { kind, label } => {
                self.current.set(Some(label));
                match (self.pass, kind) {
                    (Pass::Typed, Kind::Service) => {
                        let object = Object::Service(Service::deserialize(deserializer)?);
                        self.objects.borrow_mut().push(object);
                    }
                    (Pass::Typed, Kind::EndpointSlice) => {
                        let object =
                            Object::EndpointSlice(EndpointSlice::deserialize(deserializer)?);
                        self.objects.borrow_mut().push(object);
                    }
                    (Pass::Typed, Kind::Node) => {
                        let object = Object::Node(Node::deserialize(deserializer)?);
                        self.objects.borrow_mut().push(object);
                    }
                    (Pass::Check, Kind::Service) => {
                        ServiceCheck::deserialize(deserializer)?;
                    }
                    (Pass::Check, Kind::EndpointSlice) => {
                        EndpointSliceCheck::deserialize(deserializer)?;
                    }
                    (Pass::Check, Kind::Node) => {
                        IgnoredAny::deserialize(deserializer)?;
                    }
                }
                self.current.set(None);
                Ok(())
            }
        }
    }
}

struct ListVisitor<'p> {
    items: &'p [Plan],
    seed: PlanSeed<'p>,
}

impl<'de> Visitor<'de> for ListVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(field) = map.next_key::<ListField>()? {
            match field {
                ListField::Items => map.next_value_seed(ItemsSeed {
                    items: self.items,
                    seed: &self.seed,
                })?,
                ListField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ListField {
    Items,
    #[serde(other)]
    Other,
}

struct ItemsSeed<'p, 's> {
    items: &'p [Plan],
    seed: &'s PlanSeed<'p>,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        // `items: null` reads as no items, as in the header pass.
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of objects")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for plan in self.items {
            let item = PlanSeed {
                plan,
                pass: self.seed.pass,
                objects: self.seed.objects,
                current: self.seed.current,
            };
            seq.next_element_seed(item)?;
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Fails on whatever node it is given, so the error carries that node's position.
struct Reject<'m>(&'m str);

impl Reject<'_> {
    fn fail<E: de::Error>(&self) -> Result<(), E> {
        Err(E::custom(self.0))
    }
}

impl<'de> Visitor<'de> for Reject<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.fail()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.fail()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.fail()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.fail()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.fail()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.fail()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.fail()
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.fail()
    }
}

// The check pass: mirrors of the fields the model relies on, each checked
// while its own node is read so a bad value is reported on its own line.

#[derive(Deserialize)]
struct ServiceCheck {
    #[allow(dead_code)]
    spec: Option<ServiceSpecCheck>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct ServiceSpecCheck {
    #[serde(rename = "type")]
    type_: Option<Checked<ServiceType>>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<Checked<ClusterIp>>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<Checked<ClusterIp>>>,
    ports: Option<Vec<PortCheck>>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct PortCheck {
    port: Option<PortNumber>,
    protocol: Option<Checked<PortProtocol>>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct EndpointSliceCheck {
    #[serde(rename = "addressType")]
    address_type: Option<Checked<AddressType>>,
    ports: Option<Vec<PortCheck>>,
    endpoints: Option<Vec<EndpointCheck>>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct EndpointCheck {
    addresses: Option<NonEmptyList>,
}

/// A string field with a rule. The check runs inside the visitor so the
/// error gets the value's own position.
struct Checked<R>(PhantomData<R>);

trait Rule {
    fn check(value: &str) -> Result<(), String>;
}

impl<'de, R: Rule> Deserialize<'de> for Checked<R> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringVisitor<R>(PhantomData<R>);

        impl<R: Rule> Visitor<'_> for StringVisitor<R> {
            type Value = Checked<R>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                R::check(value).map_err(E::custom)?;
                Ok(Checked(PhantomData))
            }
        }

        deserializer.deserialize_str(StringVisitor(PhantomData))
    }
}

fn one_of(value: &str, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(format!("{value:?} is not one of {}", allowed.join(", ")))
    }
}

struct ServiceType;

impl Rule for ServiceType {
    fn check(value: &str) -> Result<(), String> {
        one_of(
            value,
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
        )
    }
}

struct PortProtocol;

impl Rule for PortProtocol {
    fn check(value: &str) -> Result<(), String> {
        one_of(value, &["TCP", "UDP", "SCTP"])
    }
}

struct AddressType;

impl Rule for AddressType {
    fn check(value: &str) -> Result<(), String> {
        one_of(value, &["IPv4", "IPv6", "FQDN"])
    }
}

struct ClusterIp;

impl Rule for ClusterIp {
    fn check(value: &str) -> Result<(), String> {
        if value.is_empty() || value == "None" || value.parse::<IpAddr>().is_ok() {
            Ok(())
        } else {
            Err(format!(
                "{value:?} is not an IP address (use an address, \"None\" for headless, or leave it out)"
            ))
        }
    }
}

struct PortNumber;

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NumberVisitor;

        impl Visitor<'_> for NumberVisitor {
            type Value = PortNumber;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number")
            }

            fn visit_i64<E: de::Error>(self, port: i64) -> Result<PortNumber, E> {
                if (1..=65535).contains(&port) {
                    Ok(PortNumber)
                } else {
                    Err(E::custom(format!("port {port} is out of range 1-65535")))
                }
            }

            fn visit_u64<E: de::Error>(self, port: u64) -> Result<PortNumber, E> {
                self.visit_i64(i64::try_from(port).unwrap_or(i64::MAX))
            }
        }

        deserializer.deserialize_i64(NumberVisitor)
    }
}

struct NonEmptyList;

impl<'de> Deserialize<'de> for NonEmptyList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = NonEmptyList;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NonEmptyList, A::Error> {
                let mut count = 0usize;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    count += 1;
                }
                if count == 0 {
                    Err(de::Error::custom(
                        "the list is empty: an endpoint needs one address",
                    ))
                } else {
                    Ok(NonEmptyList)
                }
            }
        }

        deserializer.deserialize_seq(ListVisitor)
    }
}
