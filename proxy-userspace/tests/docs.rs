//! What docs/OPERATIONS.md tells operators stays in step with the code. Needs no root.

use std::path::Path;

fn operations_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `reason` label of `kproxy_datapath_packets_total` has a row in the
/// table of reasons, and the table names no reason the datapath lacks.
#[test]
fn every_datapath_counter_reason_is_documented() {
    let text = operations_md();
    let table: Vec<&str> = text
        .split("The `reason` values are:")
        .nth(1)
        .expect("OPERATIONS.md introduces the reasons table")
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .filter_map(|row| row.split('`').nth(1))
        .collect();
    let names = proxy_common::stat::NAMES;
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !table.contains(n))
        .collect();
    let unknown: Vec<&str> = table
        .iter()
        .copied()
        .filter(|n| !names.contains(n))
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "reasons missing from docs/OPERATIONS.md: {missing:?}; documented but not counted: {unknown:?}"
    );
}
