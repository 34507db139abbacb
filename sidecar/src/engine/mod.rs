//! The inference engine: a loaded model plus shared-prefix batched sampling.
//!
//! A request for `n` samples prefills its prompt once, shares the prompt's KV cache with `n` rows
//! (one copy, read by all: [`kv_cache::KvCache::sharing`]), and decodes the rows in lock-step; a row that stops (end of turn, stop string, token limit)
//! leaves the batch so the others run cheaper. [`Generation`] is a resumable state machine
//! (sample, then decode), so the [`worker`] can run the decode steps of concurrent requests as one
//! shared pass ([`decode_together`]). Prefilled prompts are kept
//! in a [`prefix_cache`]: the next window of a test-time-compute request (the same prompt) starts
//! decoding at once.

pub mod kv_cache;
pub mod llama;
pub mod prefix_cache;
pub mod sampler;
pub mod stop;
pub mod throughput;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::chat_template::{CHATML, ChatMessage, ChatTemplate, GEMMA_TURNS, TemplateError};
use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use kv_cache::KvCache;
use llama::{Kernels, Llama, ModelError, Segment, WeightFormat};
use prefix_cache::{Prefill, PrefixCache};
use sampler::{Sampler, SamplerConfig};
use stop::{StopCheck, StopStrings};

/// Why the engine could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    // Boxed like `ModelError::Compute`.
    #[error("model computation failed: {0}")]
    Compute(Box<candle_core::Error>),
    #[error(
        "the prompt has {prompt} tokens and asks for up to {max_tokens} more, but the model's context holds {context}"
    )]
    ContextLength {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "--cuda needs a build with the `cuda` feature, and this one has none: use the sidecar's CUDA image, or build one with e2e/cuda/build.sh (docs/gpu.md)"
    )]
    NoCudaBuild,
    #[error("the engine has shut down")]
    ShutDown,
    /// Admission control refused the request (no room in the memory budget or row cap).
    #[error(transparent)]
    Overloaded(#[from] crate::admission::Refusal),
}

/// Sets how many threads compute: candle's and our kernels' pool. `None`: every CPU this process
/// may use. Returns the count.
///
/// Both `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS` are set: candle 0.11 sizes its spinning pool
/// from the first but reads the second on every f32 matmul, and without it counts the physical
/// cores by parsing /proc/cpuinfo, each time (measured: 4.5% of a decode step).
///
/// # Safety
/// Changes the environment: call before any other thread exists (first thing in `main`).
pub unsafe fn set_compute_threads(threads: Option<usize>) -> usize {
    let threads = threads
        .filter(|t| *t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // SAFETY: the caller's contract (no other thread reads the environment concurrently).
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    threads
}

/// Default memory for prefilled prompts kept for reuse (see [`prefix_cache`]).
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 64 << 20;

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Compute(Box::new(e))
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// In-memory weight format.
    pub weights: WeightFormat,
    /// Run on the first CUDA device (needs the `cuda` feature); implies [`Kernels::Candle`].
    pub cuda: bool,
    /// What computes the linear layers and decode attention on the CPU.
    pub kernels: Kernels,
    /// Bytes of prefilled prompts kept for reuse; 0 disables the prefix cache.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            weights: WeightFormat::default(),
            cuda: false,
            kernels: Kernels::default(),
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

/// A loaded model with its tokenizer and chat template.
pub struct Engine {
    model: Llama,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    name: String,
    path: PathBuf,
    prefixes: Mutex<PrefixCache>,
    reasoning_model: bool,
}

/// Why a sample stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of turn or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller went away.
    Cancelled,
}

/// What to generate for one prompt.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Number of samples.
    pub n: usize,
    /// Token limit per sample.
    pub max_tokens: usize,
    /// Sampling settings shared by all rows.
    pub sampler: SamplerConfig,
    /// Row `i` samples with seed `seed + i`.
    pub seed: u64,
    /// Stop strings.
    pub stop: StopStrings,
    /// Whether row 0 decodes greedily (temperature 0) whatever `sampler` says: a batch that
    /// carries the model's most likely answer next to its samples (best-of-N's first window).
    pub greedy_first_row: bool,
}

/// One finished sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Which of the `n` samples this is.
    pub index: usize,
    /// Generated text (without the stop string or end-of-turn token).
    pub text: String,
    /// Generated token ids (including the end-of-turn token, if any).
    pub token_ids: Vec<u32>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Sum of the chosen tokens' log-probabilities.
    pub logprob: f64,
    /// Sum of the chosen tokens' log-probabilities under the request's sampling distribution
    /// ([`sampler::Pick::sample_logprob`]), the greedy row's too: how likely one of the
    /// request's samples is, at least, to retrace this one token for token.
    pub sample_logprob: f64,
}

/// A streaming event of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// New text of sample `index`.
    Text { index: usize, delta: String },
    /// Sample `index` has finished.
    Finished { index: usize, finish: FinishReason },
}

/// Tokens one forward pass processed, for energy attribution: `tokens` counts every position
/// the pass computed (prompt positions in a prefill, one per row in a decode step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardPass {
    pub tokens: usize,
    pub elapsed: Duration,
    /// Rows of the whole pass: more than this request's when concurrent requests shared it.
    pub batch_rows: usize,
}

/// Energy one request used, with where the figure came from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RequestJoules {
    /// Joules attributed to the request (its token share of every batch it was in).
    pub joules: f64,
    /// `nvml`, `rapl` or `estimate`.
    pub source: ttc_energy::EnergySource,
}

impl RequestJoules {
    /// Two parts of one request together; one estimated part makes the whole an estimate.
    pub fn sum(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Self {
                joules: a.joules + b.joules,
                source: if a.source == ttc_energy::EnergySource::Estimate {
                    a.source
                } else {
                    b.source
                },
            }),
            (a, b) => a.or(b),
        }
    }
}

/// The result of a whole generation.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// Samples in index order.
    pub completions: Vec<Completion>,
    /// Prompt tokens (computed once, whatever `n`).
    pub prompt_tokens: usize,
    /// Generated tokens over all samples.
    pub completion_tokens: usize,
    /// Every forward pass, in order: the first is the prefill.
    pub passes: Vec<ForwardPass>,
    /// Energy, when the generation ran under a meter.
    pub energy: Option<RequestJoules>,
}

impl Engine {
    /// Loads a GGUF model from `path`; `name` is what the API reports.
    pub fn load(path: &Path, name: &str, options: &EngineOptions) -> Result<Self, EngineError> {
        let device = if options.cuda {
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::NoCudaBuild);
            }
            Device::new_cuda(0)?
        } else {
            Device::Cpu
        };
        let mut gguf = GgufFile::open(path)?;
        let tokenizer = GgufTokenizer::from_gguf(&gguf)?;
        let bos = tokenizer
            .bos_id
            .and_then(|id| tokenizer.token(id))
            .unwrap_or_default()
            .to_owned();
        let eos = tokenizer
            .token(tokenizer.eos_ids[0])
            .unwrap_or_default()
            .to_owned();
        let source = match gguf.string("tokenizer.chat_template") {
            Ok(source) => source,
            Err(_) if tokenizer.id_of("<start_of_turn>").is_some() => GEMMA_TURNS,
            Err(_) => CHATML,
        }
        .to_owned();
        let template = ChatTemplate::new(&source, &bos, &eos)?;
        let model = Llama::load(&mut gguf, options.weights, options.kernels, &device)?;
        // R1-style models think in a `<think>` block: their template writes it or their
        // vocabulary has it as one token.
        let reasoning_model = source.contains("<think>") || tokenizer.encode("<think>")?.len() == 1;
        Ok(Self {
            reasoning_model,
            model,
            tokenizer,
            template,
            name: name.to_owned(),
            path: path.to_owned(),
            prefixes: Mutex::new(PrefixCache::new(options.prefix_cache_bytes)),
        })
    }

    fn prefixes(&self) -> MutexGuard<'_, PrefixCache> {
        // The cache is consistent between calls; a panic elsewhere leaves it usable.
        self.prefixes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every kept prefill (evaluations call it so that each configuration pays for its
    /// own prefills).
    pub fn clear_prefix_cache(&self) {
        let mut prefixes = self.prefixes();
        let max_bytes = prefixes.max_bytes();
        *prefixes = PrefixCache::new(max_bytes);
    }

    /// Prefix-cache lookups that hit and missed, and bytes kept.
    pub fn prefix_cache_stats(&self) -> (u64, u64, usize) {
        let prefixes = self.prefixes();
        let (hits, misses) = prefixes.hits_and_misses();
        (hits, misses, prefixes.bytes())
    }

    /// The loaded weights.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The served model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the model reasons in a `<think>` block before answering (DeepSeek-R1 distills):
    /// the adaptive policy then spends depth on a reasoning budget rather than on votes.
    pub fn is_reasoning_model(&self) -> bool {
        self.reasoning_model
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of KV cache one position takes (the admission's unit of memory).
    pub fn kv_bytes_per_position(&self) -> u64 {
        let c = self.model.config();
        // Keys and values of every layer, f32 as the engine keeps them.
        (c.n_layer * 2 * c.n_kv_head * c.head_dim * 4) as u64
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> usize {
        self.model.config().context_length
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// Renders a conversation with the model's chat template and tokenizes it, ending with the
    /// assistant's turn header.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let text = self.template.render(messages, true)?;
        Ok(self.tokenizer.encode(&text)?)
    }

    /// Tokenizes a plain prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.tokenizer.encode(text)?)
    }

    /// Checks that a request fits the model before any work starts.
    pub fn check(&self, request: &GenerationRequest) -> Result<(), EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.context_length();
        if request.prompt.len() + request.max_tokens > context {
            return Err(EngineError::ContextLength {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                context,
            });
        }
        Ok(())
    }

    /// Runs a request to completion, reporting events as they happen; `on_event` returns false
    /// to cancel.
    pub fn generate(
        &self,
        request: GenerationRequest,
        on_event: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<GenerationOutput, EngineError> {
        let mut generation = Generation::new(self, request)?;
        while !generation.step(self, on_event)? {}
        Ok(generation.finish())
    }
}

/// What a generation needs after [`Generation::sample`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Every row has finished.
    Done,
    /// A decode pass over these tokens, one per live row.
    Decode(Vec<u32>),
}

/// One decode pass for several generations at once: concurrent requests share the pass, so the
/// weights stream once for all their rows ([`Llama::forward_many`]). `steps` pairs each
/// generation with the tokens its [`Generation::sample`] returned. On an error no generation
/// has advanced its logits; each should be failed.
pub fn decode_together(
    engine: &Engine,
    steps: &mut [(&mut Generation, Vec<u32>)],
) -> Result<(), EngineError> {
    let model = &engine.model;
    let started = Instant::now();
    let tokens = steps
        .iter()
        .map(|(_, t)| Ok(Tensor::new(t.as_slice(), model.device())?.unsqueeze(1)?))
        .collect::<Result<Vec<_>, EngineError>>()?;
    let mut segments: Vec<Segment<'_>> = steps
        .iter_mut()
        .zip(&tokens)
        .map(|((generation, _), tokens)| Segment {
            tokens,
            cache: &mut generation.cache,
        })
        .collect();
    let logits = model.forward_many(&mut segments)?;
    let elapsed = started.elapsed();
    let batch_rows = steps.iter().map(|(_, tokens)| tokens.len()).sum();
    for ((generation, tokens), logits) in steps.iter_mut().zip(logits) {
        generation.logits = Some(logits);
        generation.passes.push(ForwardPass {
            tokens: tokens.len(),
            elapsed,
            batch_rows,
        });
    }
    Ok(())
}

struct Row {
    index: usize,
    sampler: Sampler,
    ids: Vec<u32>,
    shown: usize,
    logprob: f64,
    sample_logprob: f64,
}

/// A generation in progress: resumable one forward pass at a time.
pub struct Generation {
    request: GenerationRequest,
    cache: KvCache,
    rows: Vec<Row>,
    done: Vec<Completion>,
    /// Logits of the last pass: one row after the prefill (shared by all samples), else one per row.
    logits: Option<Tensor>,
    passes: Vec<ForwardPass>,
}

impl Generation {
    /// Validates the request and prepares its rows.
    pub fn new(engine: &Engine, request: GenerationRequest) -> Result<Self, EngineError> {
        engine.check(&request)?;
        // A prompt prefilled before starts from its keys, values and last logits.
        let (cache, logits) = match engine.prefixes().get(&request.prompt) {
            Some(prefill) => (
                KvCache::sharing(prefill.cache, request.n)?,
                Some(prefill.logits),
            ),
            None => (engine.model.new_cache(), None),
        };
        let rows = (0..request.n)
            .map(|index| Row {
                index,
                sampler: if index == 0 && request.greedy_first_row {
                    Sampler::greedy_within(request.sampler)
                } else {
                    Sampler::new(request.sampler, request.seed.wrapping_add(index as u64))
                },
                ids: Vec::new(),
                shown: 0,
                logprob: 0.0,
                sample_logprob: 0.0,
            })
            .collect();
        Ok(Self {
            cache,
            request,
            rows,
            done: Vec::new(),
            logits,
            passes: Vec::new(),
        })
    }

    /// Tokens of the forward pass the next [`step`](Self::step) will run.
    pub fn next_pass_tokens(&self) -> usize {
        if self.logits.is_none() && self.passes.is_empty() {
            self.request.prompt.len()
        } else {
            self.rows.len()
        }
    }

    /// Runs one step: samples every live row (after the prompt's prefill, the first time) and
    /// runs the decode pass of the rows that go on. Returns true when every row has finished.
    pub fn step(
        &mut self,
        engine: &Engine,
        on_event: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<bool, EngineError> {
        match self.sample(engine, on_event)? {
            Next::Done => Ok(true),
            Next::Decode(tokens) => {
                decode_together(engine, &mut [(self, tokens)])?;
                Ok(false)
            }
        }
    }

    /// Samples the next token of every live row from the last pass's logits (running the
    /// prompt's prefill first, the first time) and reports the rows' events. Rows that finished
    /// leave the batch; the others' tokens are what the next decode pass needs.
    pub fn sample(
        &mut self,
        engine: &Engine,
        on_event: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<Next, EngineError> {
        let model = &engine.model;
        let logits = match self.logits.take() {
            Some(logits) => logits,
            None => {
                let started = Instant::now();
                let prompt =
                    Tensor::new(self.request.prompt.as_slice(), model.device())?.unsqueeze(0)?;
                let logits = model.forward(&prompt, &mut self.cache)?;
                // The prompt's keys and values become the prefix every sample reads, and the
                // prefix cache's entry: one copy of them however many rows continue.
                let prefix = Arc::new(std::mem::replace(&mut self.cache, model.new_cache()));
                engine.prefixes().insert(
                    &self.request.prompt,
                    Prefill {
                        cache: prefix.clone(),
                        logits: logits.clone(),
                    },
                );
                self.cache = KvCache::sharing(prefix, self.rows.len())?;
                self.passes.push(ForwardPass {
                    tokens: self.request.prompt.len(),
                    elapsed: started.elapsed(),
                    batch_rows: 1,
                });
                logits
            }
        };
        let logits = logits.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(self.rows.len());
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut cancelled = false;
        for (position, mut row) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            let row_logits = logits.get(position).unwrap_or(&logits[0]);
            let pick = row.sampler.pick(row_logits);
            row.ids.push(pick.token);
            row.logprob += f64::from(pick.logprob);
            row.sample_logprob += f64::from(pick.sample_logprob);
            let finish = self.advance(engine, &mut row, pick.token, on_event, &mut cancelled)?;
            match finish {
                Some(finish) => self.finish_row(engine, row, finish, on_event)?,
                None => {
                    next.push(pick.token);
                    keep.push(position as u32);
                    self.rows.push(row);
                }
            }
        }
        if cancelled {
            for row in std::mem::take(&mut self.rows) {
                self.finish_row(engine, row, FinishReason::Cancelled, &mut |_| true)?;
            }
        }
        if self.rows.is_empty() {
            return Ok(Next::Done);
        }
        if keep.len() < self.cache.rows() {
            self.cache.select_rows(&keep)?;
        }
        Ok(Next::Decode(next))
    }

    /// Emits the row's new text; returns why it finished, if it did.
    fn advance(
        &self,
        engine: &Engine,
        row: &mut Row,
        token: u32,
        on_event: &mut dyn FnMut(GenerationEvent) -> bool,
        cancelled: &mut bool,
    ) -> Result<Option<FinishReason>, EngineError> {
        if engine.tokenizer.is_eos(token) {
            return Ok(Some(FinishReason::Stop));
        }
        let text = engine.tokenizer.decode(&row.ids)?;
        // A multi-byte character can span tokens: wait until it is complete.
        let (visible, stopped) = if text.ends_with('\u{FFFD}') {
            (row.shown, false)
        } else {
            match self.request.stop.check(&text) {
                StopCheck::Stopped { at } => (at, true),
                StopCheck::Continue { safe } => (safe, false),
            }
        };
        if visible > row.shown {
            let delta = text[row.shown..visible].to_owned();
            row.shown = visible;
            if !on_event(GenerationEvent::Text {
                index: row.index,
                delta,
            }) {
                *cancelled = true;
            }
        }
        if stopped {
            return Ok(Some(FinishReason::Stop));
        }
        if row.ids.len() >= self.request.max_tokens {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn finish_row(
        &mut self,
        engine: &Engine,
        row: Row,
        finish: FinishReason,
        on_event: &mut dyn FnMut(GenerationEvent) -> bool,
    ) -> Result<(), EngineError> {
        let mut text = engine.tokenizer.decode(&row.ids)?;
        if let StopCheck::Stopped { at } = self.request.stop.check(&text) {
            text.truncate(at);
        }
        // Text held back for a possible stop string that never came is still part of the answer.
        if finish != FinishReason::Cancelled && text.len() > row.shown {
            on_event(GenerationEvent::Text {
                index: row.index,
                delta: text[row.shown..].to_owned(),
            });
        }
        on_event(GenerationEvent::Finished {
            index: row.index,
            finish,
        });
        self.done.push(Completion {
            index: row.index,
            text,
            token_ids: row.ids,
            finish,
            logprob: row.logprob,
            sample_logprob: row.sample_logprob,
        });
        Ok(())
    }

    /// The finished output; samples in index order.
    pub fn finish(mut self) -> GenerationOutput {
        self.done.sort_by_key(|c| c.index);
        let completion_tokens = self.done.iter().map(|c| c.token_ids.len()).sum();
        GenerationOutput {
            completions: self.done,
            prompt_tokens: self.request.prompt.len(),
            completion_tokens,
            passes: self.passes,
            energy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RequestJoules;
    use ttc_energy::EnergySource;

    #[test]
    fn parts_of_a_request_add_up_and_one_estimate_taints_the_whole() {
        let part = |joules, source| Some(RequestJoules { joules, source });
        let both = RequestJoules::sum(part(1.5, EnergySource::Nvml), part(2.0, EnergySource::Nvml));
        assert_eq!(both, part(3.5, EnergySource::Nvml));
        for (a, b) in [
            (EnergySource::Estimate, EnergySource::Nvml),
            (EnergySource::Nvml, EnergySource::Estimate),
        ] {
            let sum = RequestJoules::sum(part(1.0, a), part(1.0, b)).unwrap();
            assert_eq!(sum.source, EnergySource::Estimate);
        }
        assert_eq!(
            RequestJoules::sum(None, part(1.0, EnergySource::Rapl)),
            part(1.0, EnergySource::Rapl)
        );
        assert_eq!(RequestJoules::sum(None, None), None);
    }
}
