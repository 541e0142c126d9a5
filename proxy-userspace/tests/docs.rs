//! What docs/OPERATIONS.md tells operators stays in step with the code. Needs no root.

use std::path::Path;

fn operations_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rows of the first table after `marker`, header included.
fn table_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("OPERATIONS.md has no {marker:?}"))
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect()
}

/// Every `reason` label of `kproxy_datapath_packets_total` has a row in the
/// table of reasons, and the table names no reason the datapath lacks.
#[test]
fn every_datapath_counter_reason_is_documented() {
    let text = operations_md();
    let table: Vec<&str> = table_after(&text, "The `reason` values are:")
        .into_iter()
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

/// Every flag of `kproxy run` has a row in the flags table.
#[test]
fn every_run_flag_is_documented() {
    let text = operations_md();
    let table = table_after(&text, "## Flags");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(["run", "--help"])
        .output()
        .expect("kproxy run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().split([' ', ',', '=', '<']).next())
        .filter(|w| w.starts_with("--") && *w != "--help")
        .collect();
    assert!(flags.contains(&"--masquerade-all"), "{help}");
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|flag| {
            !table
                .iter()
                .any(|row| row.starts_with(&format!("| `{flag}")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "flags without a row in docs/OPERATIONS.md's Flags table: {missing:?}"
    );
}
