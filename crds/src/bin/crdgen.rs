//! Writes the InferencePolicy CRD manifest to `crds/inferencepolicy.crd.yaml` (or stdout with `-`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = ttc_crds::crd_manifest_yaml()?;
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        Some(path) => std::fs::write(path, yaml)?,
        None => {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(ttc_crds::CRD_MANIFEST_PATH);
            std::fs::write(&path, yaml)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
