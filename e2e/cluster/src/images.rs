//! The container images built by `e2e/images/build.sh`, and podman as this machine runs it.
//!
//! The build script prints a directory holding the image archives (for containerd), the image
//! references (`images.env`) and the podman configuration this sandbox needs (`podman.env`:
//! runc, cgroupfs, no raised rlimits, vfs storage). [`Images::from_env`] reads it from
//! `TTC_IMAGES_DIR`, which `e2e/test.sh` and `e2e/demo.sh` set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Names the directory printed by `e2e/images/build.sh`.
pub const IMAGES_DIR_ENV: &str = "TTC_IMAGES_DIR";

/// The project's images, as built on this machine.
#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
    /// `ghcr.io/ttc-operator/ttc-operator:<appVersion>`.
    pub operator: String,
    /// `ghcr.io/ttc-operator/ttc-sidecar:<appVersion>`.
    pub sidecar: String,
    /// The pod sandbox image containerd is configured with.
    pub pause: String,
    podman_env: Vec<(String, String)>,
}

impl Images {
    /// The images of the directory named by `TTC_IMAGES_DIR`.
    pub fn from_env() -> Result<Self> {
        let dir = std::env::var_os(IMAGES_DIR_ENV).ok_or_else(|| {
            Error::Runtime(format!(
                "{IMAGES_DIR_ENV} is not set: run e2e/images/build.sh and set it to the \
                 directory it prints (e2e/test.sh and e2e/demo.sh do both)"
            ))
        })?;
        Self::load(Path::new(&dir))
    }

    /// The images of `dir` (the directory printed by `e2e/images/build.sh`).
    pub fn load(dir: &Path) -> Result<Self> {
        let refs = read_env_file(&dir.join("images.env"))?;
        let get = |key: &str| {
            refs.get(key).cloned().ok_or_else(|| {
                Error::Runtime(format!("{} has no {key}", dir.join("images.env").display()))
            })
        };
        Ok(Images {
            dir: dir.to_path_buf(),
            operator: get("TTC_OPERATOR_IMAGE")?,
            sidecar: get("TTC_SIDECAR_IMAGE")?,
            pause: get("TTC_PAUSE_IMAGE")?,
            podman_env: read_env_file(&dir.join("podman.env"))?
                .into_iter()
                .collect(),
        })
    }

    /// `podman` with this machine's configuration.
    pub fn podman(&self) -> Command {
        let mut command = Command::new("podman");
        command.envs(self.podman_env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// The environment `podman` needs here (for a podman started another way, e.g. in a pipe).
    pub fn podman_env(&self) -> &[(String, String)] {
        &self.podman_env
    }

    /// The archives to import into containerd (`ctr -n k8s.io images import`), each with the
    /// image it holds.
    pub fn archives(&self) -> Vec<(PathBuf, &str)> {
        vec![
            (self.dir.join("operator.tar"), self.operator.as_str()),
            (self.dir.join("sidecar.tar"), self.sidecar.as_str()),
            (self.dir.join("pause.tar"), self.pause.as_str()),
        ]
    }
}

/// `KEY=VALUE` lines.
fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}
