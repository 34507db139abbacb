//! The evaluation: where test-time compute buys accuracy per joule, and where not.
//!
//! For each task family ([`tasks`], seeded) the same items run under every [`Configuration`]
//! ([`runner`]): greedy, fixed votes of `k` samples, early-stop voting, the adaptive policy
//! under a joules-per-request allocation, and best-of-N with the family's verifier where the
//! family has one. Every sample of item `i` uses the same sampling seeds in every configuration
//! (common random numbers), so vote@4's samples are the first four of vote@8's and configurations
//! are compared item by item (paired sign test), not only by their totals.
//!
//! Energy figures carry the meter's source: `estimate` (CPU time x declared watts) is never
//! presented as a measurement.

pub mod checker;
pub mod configuration;
pub mod plot;
pub mod report;
pub mod results;
pub mod runner;
pub mod settings;
pub mod stats;
pub mod tasks;

use ttc_core::{FeedbackError, TtcError};
use ttc_sidecar::engine::EngineError;

pub use configuration::{Configuration, EvalVerifier};
pub use results::{
    ConfigResult, EvalReport, ItemRecord, PassAtK, discordant, sign_test, summarise,
};
pub use runner::run;
pub use settings::EvalSettings;

/// Why the evaluation could not run or write its results.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The engine failed on a request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A configuration's policy was rejected.
    #[error(transparent)]
    Policy(#[from] TtcError),
    /// The pod refused an item's feedback.
    #[error("feeding back an item's expected answer: {0}")]
    Feedback(#[from] FeedbackError),
    /// The engine returned no energy figure (it must run under a meter).
    #[error("the engine reported no energy for a request: spawn it with an energy meter")]
    NoEnergy,
    /// The settings cannot produce an evaluation.
    #[error("invalid evaluation settings: {0}")]
    Settings(String),
    /// A result file could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Results could not be serialised.
    #[error("serialising results: {0}")]
    Json(#[from] serde_json::Error),
    /// A plot could not be drawn.
    #[error("plotting {path}: {message}")]
    Plot {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
}
