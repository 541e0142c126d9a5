//! kproxy: a kube-proxy replacement on eBPF. See docs/ARCHITECTURE.md.
//!
//! `model` and `sync` are pure; `datapath` is the only module that touches
//! the kernel; `daemon` wires a source to them.
pub mod address_filter;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod healthcheck;
pub mod inspect;
pub mod maglev;
pub mod model;
pub mod server;
pub mod source;
pub mod sync;
