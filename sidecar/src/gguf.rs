//! Reading GGUF files: opening with clear errors, and typed access to metadata.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

/// Why a model file could not be used. Every variant names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(
        "model file {path} does not exist; run `ttc-sidecar fetch-model` for the default model or pass --model with the path of a GGUF file"
    )]
    Missing { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "model file {path} is not a valid GGUF file ({reason}); download it again (`ttc-sidecar fetch-model --force` for the default model)"
    )]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "model file {path} is truncated: its tensors need {needed} bytes but the file has {actual}; download it again (`ttc-sidecar fetch-model --force` for the default model)"
    )]
    Truncated {
        path: PathBuf,
        needed: u64,
        actual: u64,
    },
    #[error("model file {path} lacks metadata key `{key}` (or it has the wrong type)")]
    MissingMetadata { path: PathBuf, key: String },
}

/// An opened GGUF file: its parsed header plus a reader positioned anywhere.
pub struct GgufFile {
    /// Where the file lives.
    pub path: PathBuf,
    /// Parsed header: metadata and tensor directory.
    pub content: Content,
    /// Reader for tensor data.
    pub reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and validates a GGUF file: parses the header and checks that every tensor's data
    /// lies within the file, so a truncated download fails here with a clear message rather than
    /// half-way through loading.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let (gguf, actual) = Self::read_header(path)?;
        let content = &gguf.content;
        let mut needed = content.tensor_data_offset;
        for (name, info) in &content.tensor_infos {
            // A hostile header may claim sizes whose product or offsets overflow: an error, not
            // a wrapped size that passes the check.
            let end = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|elems| {
                    (elems / info.ggml_dtype.block_size() as u64)
                        .checked_mul(info.ggml_dtype.type_size() as u64)
                })
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes)
                });
            let Some(end) = end else {
                return Err(GgufError::Invalid {
                    path: path.to_owned(),
                    reason: format!("tensor {name} claims a size or offset beyond any file"),
                });
            };
            needed = needed.max(end);
        }
        if needed > actual {
            return Err(GgufError::Truncated {
                path: path.to_owned(),
                needed,
                actual,
            });
        }
        Ok(gguf)
    }

    /// Opens a GGUF file for its metadata only, without checking that the tensor data is all
    /// there: the first part of a split file carries the whole header (vocabulary, template,
    /// hyperparameters). Loading weights from it fails.
    pub fn open_header(path: &Path) -> Result<Self, GgufError> {
        Ok(Self::read_header(path)?.0)
    }

    /// The parsed header, and the file's length.
    fn read_header(path: &Path) -> Result<(Self, u64), GgufError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => GgufError::Missing {
                path: path.to_owned(),
            },
            _ => GgufError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        let actual = file
            .metadata()
            .map_err(|source| GgufError::Io {
                path: path.to_owned(),
                source,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| GgufError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let gguf = Self {
            path: path.to_owned(),
            content,
            reader,
        };
        Ok((gguf, actual))
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingMetadata {
            path: self.path.clone(),
            key: key.to_owned(),
        }
    }

    /// A metadata value, if present.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A required unsigned integer (any integer width).
    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        self.value(key)
            .and_then(value_as_u32)
            .ok_or_else(|| self.missing(key))
    }

    /// An optional unsigned integer.
    pub fn u32_opt(&self, key: &str) -> Option<u32> {
        self.value(key).and_then(value_as_u32)
    }

    /// A required float.
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        self.value(key)
            .and_then(|v| match v {
                Value::F32(x) => Some(*x),
                Value::F64(x) => Some(*x as f32),
                _ => None,
            })
            .ok_or_else(|| self.missing(key))
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<&str, GgufError> {
        self.value(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .ok_or_else(|| self.missing(key))
    }

    /// A required array whose every element `element` converts.
    fn array<'a, T>(
        &'a self,
        key: &str,
        element: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Vec<T>, GgufError> {
        let array = self
            .value(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| self.missing(key))?;
        array
            .iter()
            .map(|v| element(v).ok_or_else(|| self.missing(key)))
            .collect()
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.array(key, |v| v.to_string().ok().map(String::as_str))
    }

    /// A required array of integers.
    pub fn integers(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        self.array(key, value_as_i64)
    }

    /// A required array of floats.
    pub fn floats(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        self.array(key, |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }
}

fn value_as_u32(v: &Value) -> Option<u32> {
    value_as_i64(v).and_then(|x| u32::try_from(x).ok())
}

fn value_as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}
