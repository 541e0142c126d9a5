//! Part 2: new-connection setup latency (p50/p99) and request throughput
//! from a client pod through kproxy, kube-proxy's iptables mode and its
//! nftables mode, in a lab of network namespaces of the bench's own.

use super::*;

/// Part 2: measures, writes the plots into `docs`, renders the section.
pub fn run(_config: &Config, _docs: &Path) -> Result<Section> {
    Ok(Section {
        not_measured: vec![
            "Part 2 of the issue (connection setup latency p50/p99 and throughput through a lab \
             namespace, kproxy vs iptables vs nftables mode) is not written yet."
                .into(),
        ],
        ..Section::default()
    })
}
