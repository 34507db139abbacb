//! Shared set-up for tests that run the real default model (fetched once into the cache).

use std::path::PathBuf;
use ttc_sidecar::model_store::{DEFAULT_MODEL, KnownModel, ModelStore};

/// Path of the default model, fetched into the cache on first use.
#[allow(dead_code)] // Not every test binary uses every model.
pub fn default_model_path() -> PathBuf {
    model_path(&DEFAULT_MODEL)
}

/// Path of a known model, fetched into the cache on first use.
#[allow(dead_code)] // Not every test binary uses every model.
pub fn model_path(model: &KnownModel) -> PathBuf {
    ModelStore::default_location()
        .ensure(model, false)
        .unwrap_or_else(|e| panic!("the tests need the model {}: {e}", model.name))
}
