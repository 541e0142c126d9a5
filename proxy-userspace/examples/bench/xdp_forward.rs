//! Part 4: XDP forwarding in the lab: packets per second a NodePort
//! forwards against the same frames dropped by an empty XDP program and
//! against iptables DNAT of the same flows.

use super::*;

/// Part 4: measures, writes the plots into `docs`, renders the section.
pub fn run(_config: &Config, _docs: &Path) -> Result<Section> {
    Ok(Section {
        not_measured: vec![
            "Part 4 of the issue (XDP forwarding packets per second in the lab) is not written yet."
                .into(),
        ],
        ..Section::default()
    })
}
