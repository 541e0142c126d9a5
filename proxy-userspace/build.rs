//! Builds the eBPF object with aya-build so `cargo build` of kproxy embeds it.
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let metadata_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ebpf_dir = metadata_dir
        .parent()
        .context("proxy-userspace has no parent directory")?
        .join("proxy-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-changed=../proxy-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF object failed: run `cargo xtask setup` (rust-src, bpf-linker)")?;
    // With AYA_BUILD_SKIP=1 nothing is built; leave an empty object so the
    // crate still compiles and loading fails with a clear message instead.
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("proxy-ebpf");
    if !out.exists() {
        std::fs::write(&out, [])?;
    }
    Ok(())
}
