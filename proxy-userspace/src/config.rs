//! `--config FILE`: the KubeProxyConfiguration fields that apply to kproxy.
//!
//! kube-proxy's config file is read as is, so existing ConfigMaps carry
//! over. Fields kproxy uses are returned in [`FileConfig`]; every other
//! field that is set is listed in [`Loaded::ignored`] so the log can say so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};
use thiserror::Error;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "{path}: expected apiVersion {API_VERSION} and kind {KIND}, found {found}; point --config at a KubeProxyConfiguration"
    )]
    WrongKind { path: PathBuf, found: String },
    #[error("{path}: field {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The fields kproxy applies. `None`: not set in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub hostname_override: Option<String>,
    pub cluster_cidrs: Vec<String>,
    pub nodeport_addresses: Vec<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub kubeconfig: Option<PathBuf>,
    pub conntrack_tcp_established_timeout: Option<Duration>,
    pub conntrack_tcp_close_wait_timeout: Option<Duration>,
    pub conntrack_udp_timeout: Option<Duration>,
    /// `iptables.masqueradeAll`, or `nftables.masqueradeAll` in mode
    /// nftables (which section kube-proxy reads).
    pub masquerade_all: bool,
}

#[derive(Debug)]
pub struct Loaded {
    pub config: FileConfig,
    /// Dotted paths of fields that are set but that kproxy does not use.
    pub ignored: Vec<String>,
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses a Go duration as kube-proxy writes them (`30s`, `1m0s`, `24h0m0s`, `500ms`).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s or 1m0s: {e}"))
}

pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let Value::Mapping(root) = value else {
        return Err(ConfigError::WrongKind {
            path: path.to_owned(),
            found: "not a mapping".into(),
        });
    };
    let api_version = str_of(&root, "apiVersion").unwrap_or_default();
    let kind = str_of(&root, "kind").unwrap_or_default();
    if api_version != API_VERSION || kind != KIND {
        return Err(ConfigError::WrongKind {
            path: path.to_owned(),
            found: format!("{api_version:?} {kind:?}"),
        });
    }

    let mut reader = Reader {
        path,
        ignored: Vec::new(),
    };
    let mut config = FileConfig::default();
    // Older configs have the sync periods only in the section of the mode
    // (`iptables`, `ipvs`, `nftables`; no mode is iptables): that
    // section's apply where the top-level fields are not set.
    let mode_section = match str_of(&root, "mode").unwrap_or_default() {
        "" => "iptables",
        mode => mode,
    };
    // masqueradeAll: the nftables section in mode nftables, else the
    // iptables one (ipvs mode reads that too).
    let masquerade_section = if mode_section == "nftables" {
        "nftables"
    } else {
        "iptables"
    };
    let (mut section_sync, mut section_min_sync) = (None, None);
    for (key, value) in &root {
        let key = key.as_str().unwrap_or_default();
        match key {
            "apiVersion" | "kind" => {}
            "hostnameOverride" => config.hostname_override = reader.string(key, value)?,
            "clusterCIDR" => {
                config.cluster_cidrs = reader
                    .string(key, value)?
                    .map(|s| {
                        s.split(',')
                            .map(|c| c.trim().to_owned())
                            .filter(|c| !c.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
            }
            "nodePortAddresses" => config.nodeport_addresses = reader.strings(key, value)?,
            "healthzBindAddress" => config.healthz_bind_address = reader.string(key, value)?,
            "metricsBindAddress" => config.metrics_bind_address = reader.string(key, value)?,
            "syncPeriod" => config.sync_period = reader.duration(key, value)?,
            "minSyncPeriod" => config.min_sync_period = reader.duration(key, value)?,
            "iptables" | "ipvs" | "nftables" => {
                let applies = key == mode_section;
                reader.section(key, value, |r, k, v| match k {
                    "syncPeriod" if applies => {
                        section_sync = r.duration(k, v)?;
                        Ok(true)
                    }
                    "minSyncPeriod" if applies => {
                        section_min_sync = r.duration(k, v)?;
                        Ok(true)
                    }
                    "masqueradeAll" if key == masquerade_section => {
                        config.masquerade_all = r.boolean(k, v)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
            }
            "clientConnection" => {
                reader.section(key, value, |r, k, v| match k {
                    "kubeconfig" => {
                        config.kubeconfig =
                            r.string(k, v)?.filter(|s| !s.is_empty()).map(PathBuf::from);
                        Ok(true)
                    }
                    _ => Ok(false),
                })?;
            }
            "conntrack" => {
                reader.section(key, value, |r, k, v| {
                    let slot = match k {
                        "tcpEstablishedTimeout" => &mut config.conntrack_tcp_established_timeout,
                        "tcpCloseWaitTimeout" => &mut config.conntrack_tcp_close_wait_timeout,
                        "udpTimeout" => &mut config.conntrack_udp_timeout,
                        _ => return Ok(false),
                    };
                    // 0 means "leave the system's value" in kube-proxy: our default.
                    *slot = r.duration(k, v)?;
                    Ok(true)
                })?;
            }
            "mode" => {
                let mode = reader.string(key, value)?.unwrap_or_default();
                if !mode.is_empty() {
                    reader
                        .ignored
                        .push(format!("mode ({mode}: kproxy always uses eBPF)"));
                }
            }
            other => {
                if !is_empty(value) {
                    reader.ignored.push(other.to_owned());
                }
            }
        }
    }
    config.sync_period = config.sync_period.or(section_sync);
    config.min_sync_period = config.min_sync_period.or(section_min_sync);
    Ok(Loaded {
        config,
        ignored: reader.ignored,
    })
}

fn str_of<'a>(map: &'a Mapping, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

/// Not set: null, or a Go zero value (kubeadm writes every field, most of
/// them as `""`, `0`, `0s` or `false`), or a collection of those.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || parse_go_duration(s).is_ok_and(|d| d.is_zero()),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.values().all(is_empty),
        _ => false,
    }
}

struct Reader<'p> {
    path: &'p Path,
    ignored: Vec<String>,
}

impl Reader<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_owned(),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// An empty string is not set: the file is a Go struct, where "" is
    /// the zero value kube-proxy replaces with its default.
    fn string(&self, key: &str, value: &Value) -> Result<Option<String>, ConfigError> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            other => Err(self.err(key, format!("expected a string, found {other:?}"))),
        }
    }

    fn strings(&self, key: &str, value: &Value) -> Result<Vec<String>, ConfigError> {
        match value {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| self.err(key, "expected a list of strings"))
                })
                .collect(),
            _ => Err(self.err(key, "expected a list of strings")),
        }
    }

    fn boolean(&self, key: &str, value: &Value) -> Result<bool, ConfigError> {
        match value {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            other => Err(self.err(key, format!("expected true or false, found {other:?}"))),
        }
    }

    /// A zero duration is not set either: kube-proxy defaults it (`0s`
    /// sync periods are what kubeadm writes).
    fn duration(&self, key: &str, value: &Value) -> Result<Option<Duration>, ConfigError> {
        match self.string(key, value)? {
            None => Ok(None),
            Some(s) => parse_go_duration(&s)
                .map(|d| Some(d).filter(|d| !d.is_zero()))
                .map_err(|m| self.err(key, m)),
        }
    }

    /// Walks a nested mapping; `apply` returns whether it used the field.
    fn section(
        &mut self,
        name: &str,
        value: &Value,
        mut apply: impl FnMut(&mut Self, &str, &Value) -> Result<bool, ConfigError>,
    ) -> Result<(), ConfigError> {
        let Value::Mapping(map) = value else {
            if is_empty(value) {
                return Ok(());
            }
            return Err(self.err(name, "expected a mapping"));
        };
        for (k, v) in map {
            let k = k.as_str().unwrap_or_default();
            let path = format!("{name}.{k}");
            if !apply(self, k, v).map_err(|e| match e {
                ConfigError::Field {
                    path: p, message, ..
                } => ConfigError::Field {
                    path: p,
                    field: path.clone(),
                    message,
                },
                other => other,
            })? && !is_empty(v)
            {
                self.ignored.push(path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBEADM_STYLE: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16,fd00::/108
conntrack:
  maxPerCore: 32768
  tcpEstablishedTimeout: 24h0m0s
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  masqueradeAll: false
  minSyncPeriod: 2s
  syncPeriod: 1m0s
metricsBindAddress: 127.0.0.1:10249
mode: iptables
nodePortAddresses: [primary]
"#;

    #[test]
    fn reads_the_fields_that_apply_and_lists_the_rest() {
        let loaded = parse(Path::new("c.yaml"), KUBEADM_STYLE).unwrap();
        let c = &loaded.config;
        assert_eq!(c.cluster_cidrs, ["10.244.0.0/16", "fd00::/108"]);
        assert_eq!(c.nodeport_addresses, ["primary"]);
        assert_eq!(c.healthz_bind_address.as_deref(), Some("0.0.0.0:10256"));
        assert_eq!(c.metrics_bind_address.as_deref(), Some("127.0.0.1:10249"));
        assert_eq!(c.sync_period, Some(Duration::from_secs(60)));
        assert_eq!(c.min_sync_period, Some(Duration::from_secs(2)));
        assert_eq!(
            c.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(c.hostname_override, None, "\"\" is not a name");
        let ignored = loaded.ignored.join(",");
        for field in [
            "bindAddress",
            "clientConnection.qps",
            "conntrack",
            "mode (iptables",
        ] {
            assert!(ignored.contains(field), "{field} not reported in {ignored}");
        }
        assert!(!ignored.contains("iptables.syncPeriod"), "{ignored}");
        assert!(
            !c.masquerade_all && !ignored.contains("masquerade"),
            "{ignored}"
        );
    }

    /// kube-proxy reads `nftables.masqueradeAll` in mode nftables and
    /// `iptables.masqueradeAll` otherwise (ipvs included).
    #[test]
    fn masquerade_all_comes_from_the_section_kube_proxy_reads() {
        let config = |mode: &str, iptables: bool, nftables: bool| {
            let text = format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: \"{mode}\"\niptables:\n  masqueradeAll: {iptables}\nnftables:\n  masqueradeAll: {nftables}\n"
            );
            parse(Path::new("c.yaml"), &text).unwrap()
        };
        for mode in ["", "iptables", "ipvs"] {
            assert!(config(mode, true, false).config.masquerade_all, "{mode:?}");
            let other = config(mode, false, true);
            assert!(!other.config.masquerade_all, "{mode:?}");
            assert!(
                other.ignored.iter().any(|f| f == "nftables.masqueradeAll"),
                "{mode:?}: {:?}",
                other.ignored
            );
        }
        assert!(config("nftables", false, true).config.masquerade_all);
        assert!(!config("nftables", true, false).config.masquerade_all);
        let wrong = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  masqueradeAll: yes please\n";
        let err = parse(Path::new("c.yaml"), wrong).unwrap_err().to_string();
        assert!(err.contains("iptables.masqueradeAll"), "{err}");
    }

    #[test]
    fn top_level_sync_periods_win_over_the_iptables_section() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nsyncPeriod: 30s\nminSyncPeriod: 0s\niptables:\n  syncPeriod: 5m0s\n  minSyncPeriod: 3s\n";
        let c = parse(Path::new("c.yaml"), text).unwrap().config;
        assert_eq!(c.sync_period, Some(Duration::from_secs(30)));
        // A zero top-level field is unset (kube-proxy defaults it): the
        // section's value applies.
        assert_eq!(c.min_sync_period, Some(Duration::from_secs(3)));
    }

    #[test]
    fn the_sync_periods_of_the_configured_mode_apply() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\niptables:\n  syncPeriod: 5m0s\nnftables:\n  syncPeriod: 45s\n  minSyncPeriod: 2s\n";
        let loaded = parse(Path::new("c.yaml"), text).unwrap();
        assert_eq!(loaded.config.sync_period, Some(Duration::from_secs(45)));
        assert_eq!(loaded.config.min_sync_period, Some(Duration::from_secs(2)));
        assert!(
            loaded.ignored.iter().any(|f| f == "iptables.syncPeriod"),
            "{:?}",
            loaded.ignored
        );
    }

    /// What `kubeadm` writes into the kube-proxy ConfigMap (trimmed of the
    /// logging and winkernel sections): every field, most of them Go zero
    /// values that kube-proxy replaces with its defaults.
    const KUBEADM_GENERATED: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForAlpha: ""
"#;

    #[test]
    fn a_kubeadm_generated_config_leaves_kproxy_its_defaults() {
        let loaded = parse(Path::new("config.conf"), KUBEADM_GENERATED).unwrap();
        assert_eq!(
            loaded.config,
            FileConfig {
                cluster_cidrs: vec!["10.244.0.0/16".into()],
                kubeconfig: Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")),
                ..FileConfig::default()
            }
        );
        // Only what is set to something kproxy does not do is reported.
        assert_eq!(loaded.ignored, ["bindAddress"]);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let wrong = parse(Path::new("c.yaml"), "apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(
            wrong.to_string().contains("KubeProxyConfiguration"),
            "{wrong}"
        );
        let bad = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables:\n  syncPeriod: soon\n";
        let err = parse(Path::new("c.yaml"), bad).unwrap_err().to_string();
        assert!(
            err.contains("c.yaml") && err.contains("iptables.syncPeriod"),
            "{err}"
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("24h0m0s").unwrap(),
            Duration::from_secs(86400)
        );
        assert_eq!(parse_go_duration("1m0s").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_go_duration("fast").is_err());
    }
}
