//! kproxy: a kube-proxy replacement on eBPF. See docs/ARCHITECTURE.md.
pub mod model;
pub mod source;
