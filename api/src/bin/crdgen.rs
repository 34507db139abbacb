//! Writes the InferencePolicy CRD manifest to `api/inferencepolicy.crd.yaml` and its field
//! reference to `docs/inferencepolicy-reference.md`.
//!
//! `crdgen -` prints the manifest instead, `crdgen PATH` writes only the manifest to PATH;
//! `crdgen --reference -` prints the reference, `crdgen --reference PATH` writes only it.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match args.as_slice() {
        ["-"] => print!("{}", ttc_api::crd_manifest_yaml()?),
        ["--reference", "-"] => print!("{}", ttc_api::reference_markdown()),
        ["--reference", path] => std::fs::write(path, ttc_api::reference_markdown())?,
        [path] if !path.starts_with("--") => std::fs::write(path, ttc_api::crd_manifest_yaml()?)?,
        [] => {
            let manifest = crate_dir.join(ttc_api::CRD_MANIFEST_PATH);
            std::fs::write(&manifest, ttc_api::crd_manifest_yaml()?)?;
            eprintln!("wrote {}", manifest.display());
            let reference = crate_dir.join(ttc_api::REFERENCE_DOC_PATH);
            if let Some(dir) = reference.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&reference, ttc_api::reference_markdown())?;
            eprintln!("wrote {}", reference.display());
        }
        _ => return Err("usage: crdgen [- | PATH | --reference (- | PATH)]".into()),
    }
    Ok(())
}
