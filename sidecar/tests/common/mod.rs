//! Shared set-up for tests that run the real default model (fetched once into the cache).

use std::path::PathBuf;
use ttc_sidecar::model_store::{DEFAULT_MODEL, ModelStore};

/// Path of the default model, fetched into the cache on first use.
pub fn default_model_path() -> PathBuf {
    ModelStore::default_location()
        .ensure(&DEFAULT_MODEL, false)
        .unwrap_or_else(|e| panic!("the tests need the default model: {e}"))
}
