//! A datapath of the bench's own under a private pin dir.

use super::*;

// ---------------------------------------------------------------------------
// A datapath under a private pin dir, removed even on error.
// ---------------------------------------------------------------------------

pub struct Lab {
    // Declared first: program and map fds close before the pins go.
    pub datapath: Datapath,
    pub pins: PathBuf,
}

impl Lab {
    pub fn load(tag: &str, sizes: MapSizes) -> Result<Self> {
        Self::load_with(tag, sizes, SkbChecksum::Read)
    }

    /// The same, its tc programs updating checksums as `skb_checksum` says.
    pub fn load_with(tag: &str, sizes: MapSizes, skb_checksum: SkbChecksum) -> Result<Self> {
        let pins = PathBuf::from(format!("/run/kproxy-bench-{}-{tag}", std::process::id()));
        match Datapath::load_with(&pins, sizes, skb_checksum) {
            Ok(datapath) => Ok(Self { datapath, pins }),
            // A load that failed half way (say, a program the verifier
            // refuses) may have pinned maps and mounted the pin dir already.
            Err(error) => {
                remove_pins(&pins);
                Err(error).with_context(|| format!("loading the datapath at {}", pins.display()))
            }
        }
    }

    pub fn apply(&mut self, syncer: &mut Syncer, state: &DesiredState) -> Result<()> {
        let mut maps = self.datapath.maps().context("opening the maps")?;
        let report = syncer.apply(&mut maps, state);
        ensure!(
            report.failed.is_empty()
                && report.failed_deletes.is_empty()
                && report.failed_writes.is_empty(),
            "programming {} frontends failed: {} frontends, {} deletes, {:?} (maps too small?)",
            state.frontends.len(),
            report.failed.len(),
            report.failed_deletes.len(),
            report.failed_writes
        );
        // As the daemon does after a clean sync.
        let flags = syncer.datapath_flags();
        if flags != 0 {
            let config = proxy_common::DatapathConfig {
                flags,
                ..Default::default()
            };
            self.datapath
                .write_config(&config)
                .context("writing the datapath config")?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        remove_pins(&self.pins);
    }
}

/// Unpins what a datapath pinned under `pins` and removes the directory.
fn remove_pins(pins: &Path) {
    let _ = datapath::cleanup(pins);
    let _ = umount2(pins, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(pins);
}
