//! Forward-pass throughput of a loaded model: a prompt's prefill, and decode steps of `b` rows
//! sharing one prompt's KV cache. Timed to the device's completion (GPU work is queued
//! asynchronously), best of a few repeats. Used by `ttc-bench` (against llama.cpp) and the
//! device check.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::kv_cache::KvCache;
use super::llama::{Llama, ModelError};

/// The token every measured position holds (time does not depend on which).
pub const TOKEN: u32 = 504;

/// Seconds `f` takes, after the device has finished everything it queued.
fn timed(model: &Llama, f: impl FnOnce() -> Result<(), ModelError>) -> Result<f64, ModelError> {
    model.device().synchronize()?;
    let t = Instant::now();
    f()?;
    model.device().synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

fn prompt(model: &Llama, tokens: usize) -> Result<Tensor, ModelError> {
    Ok(Tensor::new(vec![TOKEN; tokens], model.device())?.unsqueeze(0)?)
}

/// Prefill tokens per second of a `tokens`-token prompt (best of `repeats`, after a warm-up).
pub fn prefill_tok_s(model: &Llama, tokens: usize, repeats: usize) -> Result<f64, ModelError> {
    let prompt = prompt(model, tokens)?;
    let mut best = f64::MAX;
    for _ in 0..=repeats.max(1) {
        let mut cache = model.new_cache();
        best = best.min(timed(model, || {
            model.forward(&prompt, &mut cache).map(drop)
        })?);
    }
    Ok(tokens as f64 / best)
}

/// One batch size's decode figures.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Decode {
    /// Milliseconds per step (every row advances one token).
    pub step_ms: f64,
    /// Tokens per second, all rows together.
    pub summed_tok_s: f64,
}

/// `steps` decode steps of `rows` rows after a shared `prompt_tokens`-token prompt (best of
/// `repeats`).
pub fn decode(
    model: &Llama,
    prompt_tokens: usize,
    rows: usize,
    steps: usize,
    repeats: usize,
) -> Result<Decode, ModelError> {
    let prompt = prompt(model, prompt_tokens)?;
    let step = Tensor::new(vec![TOKEN; rows], model.device())?.unsqueeze(1)?;
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let mut prefix = model.new_cache();
        model.forward(&prompt, &mut prefix)?;
        let mut cache = KvCache::sharing(Arc::new(prefix), rows)?;
        best = best.min(timed(model, || {
            for _ in 0..steps {
                model.forward(&step, &mut cache)?;
            }
            Ok(())
        })?);
    }
    Ok(Decode {
        step_ms: best / steps as f64 * 1e3,
        summed_tok_s: (rows * steps) as f64 / best,
    })
}
