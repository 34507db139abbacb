//! The evaluation: where test-time compute buys accuracy per joule, and where not.
//!
//! For each task family ([`crate::tasks`], seeded) the same items run under every
//! [`Configuration`]: greedy, fixed votes of `k` samples, early-stop voting, the adaptive policy
//! under a joules-per-request allocation, and best-of-N with the family's verifier where the
//! family has one. Every sample of item `i` uses the same sampling seeds in every configuration
//! (common random numbers), so vote@4's samples are the first four of vote@8's and configurations
//! are compared item by item (paired sign test), not only by their totals.
//!
//! Energy figures carry the meter's source: `estimate` (CPU time x declared watts) is never
//! presented as a measurement.

pub mod checker;
pub mod plot;
pub mod report;
pub mod stats;
pub mod tasks;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::stats::{Proportion, mean, pass_at_k, wilson_95};
use crate::tasks::{TaskFamily, TaskItem, generate};
use ttc_core::{
    AnswerType, Candidate, Feedback, FeedbackError, HttpEndpoint, StopReason, TtcError, TtcOptions,
    TtcPolicy, TtcStrategy, VerifierSpec, VoteWeighting, extract_answer, majority_vote,
};
use ttc_energy::EnergySource;
use ttc_sidecar::chat_template::ChatMessage;
use ttc_sidecar::engine::sampler::SamplerConfig;
use ttc_sidecar::engine::stop::StopStrings;
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{EngineError, GenerationRequest};
use ttc_sidecar::ttc_service::{TtcRequest, TtcService};

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

/// What to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvalSettings {
    /// Task families, in report order.
    pub families: Vec<TaskFamily>,
    /// Items per family.
    pub items: usize,
    /// Fixed vote depths (samples per request).
    pub depths: Vec<usize>,
    /// Seed of the items and of the samples.
    pub seed: u64,
    /// Sampling temperature of every configuration but greedy.
    pub temperature: f32,
    /// Token limit per sample; `None`: 32, or 64 for JSON answers.
    pub max_tokens: Option<usize>,
    /// Most samples of the early-stop, adaptive and best-of-N configurations.
    pub max_samples: usize,
    /// Early-stop agreement threshold.
    pub early_stop_agreement: f64,
    /// Samples per window of the early-stop, adaptive and best-of-N configurations.
    #[serde(default = "default_window")]
    pub window: usize,
}

fn default_window() -> usize {
    TtcOptions::default().window
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            families: vec![
                TaskFamily::SingleDigitAddition,
                TaskFamily::LargerOfTwo,
                TaskFamily::StructuredOutput,
            ],
            items: 20,
            depths: vec![1, 4, 8],
            seed: 7,
            temperature: 0.7,
            max_tokens: None,
            max_samples: 8,
            early_stop_agreement: 0.75,
            window: default_window(),
        }
    }
}

/// One way of answering a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Configuration {
    /// One sample at temperature 0.
    Greedy,
    /// Majority vote over exactly `k` samples, generated as one batch.
    Vote {
        /// Samples.
        k: usize,
    },
    /// The sidecar's own majority vote at a fixed depth `k`, without early stopping: the greedy
    /// answer and `k - 1` samples, one batch (what policy MajorityVote with minSamples =
    /// maxSamples = k draws). Against [`Configuration::Vote`] it measures what the greedy row
    /// does to the vote; against [`Configuration::EarlyStop`], what stopping early costs.
    PolicyVote {
        /// Rows, the greedy one included.
        k: usize,
    },
    /// Policy MajorityVote: windows of `window` samples until the agreement threshold or the
    /// maximum.
    EarlyStop {
        /// Most samples.
        max_samples: usize,
        /// Agreement threshold.
        agreement: f64,
    },
    /// Policy Adaptive (difficulty-aware) under an allocation: voting, or best-of-N where it has
    /// a verifier.
    Adaptive {
        /// Joules per request allocated to the pod.
        allocation_joules: f64,
        /// The vote depth whose measured mean joules set the allocation.
        reference_depth: usize,
        /// The verifier the policy names, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verifier: Option<EvalVerifier>,
        /// Whether each answer's correctness is fed back to the pod (`POST /v1/ttc/feedback`
        /// with the expected answer), as a client with labels would.
        #[serde(default)]
        feedback: bool,
    },
    /// Greedy on another model than the report's: a model-size point (the result's `model`
    /// names it).
    OtherModel,
    /// Policy BestOfN: sample until the verifier accepts one.
    BestOfN {
        /// Most samples.
        max_samples: usize,
        /// Which verifier checks the candidates.
        #[serde(default)]
        verifier: EvalVerifier,
    },
}

/// The verifier of a best-of-N configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EvalVerifier {
    /// The family's JSON schema: checks structure, not values.
    #[default]
    Schema,
    /// The checking tool ([`checker`]) behind the HTTP verifier: recomputes what the question
    /// asks.
    Tool,
}

impl Configuration {
    /// A short label for tables and plots.
    pub fn label(&self) -> String {
        match self {
            Self::Greedy => "greedy".into(),
            Self::OtherModel => "greedy (other model)".into(),
            Self::Vote { k } => format!("vote@{k}"),
            Self::PolicyVote { k } => format!("policy-vote@{k}"),
            Self::EarlyStop { max_samples, .. } => format!("early-stop@{max_samples}"),
            Self::Adaptive {
                reference_depth,
                verifier,
                feedback,
                ..
            } => {
                let checked = match verifier {
                    None => "",
                    Some(EvalVerifier::Schema) => "+schema",
                    Some(EvalVerifier::Tool) => "+tool",
                };
                let told = if *feedback { "+feedback" } else { "" };
                format!("adaptive{checked}{told}(=vote@{reference_depth} J)")
            }
            Self::BestOfN {
                max_samples,
                verifier: EvalVerifier::Schema,
            } => format!("best-of-{max_samples}+schema"),
            Self::BestOfN {
                max_samples,
                verifier: EvalVerifier::Tool,
            } => format!("best-of-{max_samples}+tool"),
        }
    }

    /// Whether the configuration spends test-time compute (more than one greedy sample).
    pub fn is_ttc(&self) -> bool {
        !matches!(self, Self::Greedy | Self::OtherModel | Self::Vote { k: 1 })
    }
}

/// One item answered under one configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemRecord {
    /// The item's id (`family/index`).
    pub item_id: String,
    /// The expected answer.
    pub expected: String,
    /// The chosen answer (normalised), if any.
    pub answer: Option<String>,
    /// Whether the chosen answer is right.
    pub correct: bool,
    /// Samples drawn.
    pub samples: usize,
    /// Samples whose own answer is right.
    pub correct_samples: usize,
    /// Whether the verifier accepted the chosen sample (best-of-N only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Joules of the request.
    pub joules: f64,
    /// Where the joules figure comes from.
    pub energy_source: EnergySource,
    /// Prompt tokens computed (once per request: later windows reuse the prefill).
    pub prompt_tokens: usize,
    /// Tokens generated over all samples.
    pub completion_tokens: usize,
    /// Wall-clock seconds of the request.
    pub latency_s: f64,
    /// Why sampling stopped (configurations that run through the TTC service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
}

/// pass@k: the chance that at least one of `k` samples is right (an oracle verifier's ceiling).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PassAtK {
    /// Samples.
    pub k: usize,
    /// Mean over items of the unbiased estimate.
    pub value: f64,
    /// Samples per item it was estimated from.
    pub from_samples: usize,
}

/// One family under one configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigResult {
    /// The family.
    pub family: TaskFamily,
    /// The model, when not the report's (model-size points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The configuration.
    pub configuration: Configuration,
    /// Its label.
    pub label: String,
    /// Accuracy with its 95% Wilson interval.
    pub accuracy: Proportion,
    /// pass@k for vote configurations (estimated from the deepest vote's samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_at_k: Option<PassAtK>,
    /// Mean joules per request.
    pub mean_joules: f64,
    /// Source of the joules (`estimate` if any request's figure was estimated).
    pub energy_source: EnergySource,
    /// Mean samples per request.
    pub mean_samples: f64,
    /// Mean generated tokens per request (all samples).
    pub mean_completion_tokens: f64,
    /// Mean prompt tokens computed per request.
    pub mean_prompt_tokens: f64,
    /// Mean wall-clock seconds per request.
    pub mean_latency_s: f64,
    /// Every item.
    pub items: Vec<ItemRecord>,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvalReport {
    /// The model's name.
    pub model: String,
    /// The settings.
    pub settings: EvalSettings,
    /// Results, family by family, configuration by configuration.
    pub results: Vec<ConfigResult>,
    /// What the results show, in sentences.
    pub findings: Vec<String>,
    /// How the run was made (sources, caveats).
    pub notes: Vec<String>,
}

/// Token limit of one sample for `answer_type`.
fn max_tokens_for(settings: &EvalSettings, answer_type: AnswerType) -> usize {
    settings.max_tokens.unwrap_or(match answer_type {
        AnswerType::Json => 64,
        _ => 32,
    })
}

/// Sampling seed of item `index`: sample `j` uses this plus `j` in every configuration.
fn sample_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64 * 1024)
}

struct Prepared {
    item: TaskItem,
    prompt: Vec<u32>,
    seed: u64,
}

/// The family's items as prompts for `engine`: the item's question as a user turn in the
/// model's chat template.
fn prepare(
    engine: &EngineHandle,
    family: TaskFamily,
    settings: &EvalSettings,
) -> Result<Vec<Prepared>, EngineError> {
    generate(family, settings.items, settings.seed)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let prompt = engine.engine().encode_chat(&[ChatMessage {
                role: "user".into(),
                content: item.prompt.clone(),
            }])?;
            Ok(Prepared {
                item,
                prompt,
                seed: sample_seed(settings.seed, i),
            })
        })
        .collect()
}

/// Runs the evaluation on `engine` (which must run under an energy meter), with greedy on each
/// of `size_models` as model-size points; `progress` hears a line per finished configuration.
pub async fn run(
    engine: &EngineHandle,
    size_models: &[EngineHandle],
    settings: &EvalSettings,
    mut progress: impl FnMut(&str),
) -> Result<EvalReport, EvalError> {
    if settings.families.is_empty() || settings.items == 0 || settings.depths.is_empty() {
        return Err(EvalError::Settings(
            "at least one family, one item and one depth are needed".into(),
        ));
    }
    if settings.depths.contains(&0) || settings.max_samples == 0 {
        return Err(EvalError::Settings(
            "depths and max samples must be at least 1".into(),
        ));
    }
    let mut depths = settings.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    // The checking tool serves the HTTP verifier of the tool-checkable families.
    let checker = if settings.families.iter().any(|f| f.is_tool_checkable()) {
        Some(
            checker::CheckerServer::start()
                .await
                .map_err(|e| EvalError::Settings(format!("starting the checking tool: {e}")))?,
        )
    } else {
        None
    };
    let mut results = Vec::new();
    for &family in &settings.families {
        let prepared = prepare(engine, family, settings)?;
        let mut family_results = Vec::new();
        let greedy = SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        };
        let sampled = SamplerConfig {
            temperature: settings.temperature,
            top_p: 1.0,
            top_k: 0,
        };
        let mut records = Vec::new();
        for p in &prepared {
            records.push(run_batch(engine, settings, p, 1, greedy, false).await?);
        }
        family_results.push(summarise(family, Configuration::Greedy, records));
        progress(&progress_line(family_results.last()));
        for other in size_models {
            let mut records = Vec::new();
            for p in &prepare(other, family, settings)? {
                records.push(run_batch(other, settings, p, 1, greedy, false).await?);
            }
            let name = other.engine().name().to_owned();
            let mut result = summarise(family, Configuration::OtherModel, records);
            result.label = format!("greedy [{name}]");
            result.model = Some(name);
            family_results.push(result);
            progress(&progress_line(family_results.last()));
        }
        for &k in &depths {
            let mut records = Vec::new();
            for p in &prepared {
                records.push(run_batch(engine, settings, p, k, sampled, false).await?);
            }
            family_results.push(summarise(family, Configuration::Vote { k }, records));
            progress(&progress_line(family_results.last()));
        }
        add_pass_at_k(&mut family_results, &depths);
        // The sidecar's vote at the deepest fixed depth: greedy first, as its plans draw.
        if let Some(&k) = depths.last().filter(|&&k| k > 1) {
            let mut records = Vec::new();
            for p in &prepared {
                records.push(run_batch(engine, settings, p, k, sampled, true).await?);
            }
            family_results.push(summarise(family, Configuration::PolicyVote { k }, records));
            progress(&progress_line(family_results.last()));
        }

        let early = Configuration::EarlyStop {
            max_samples: settings.max_samples,
            agreement: settings.early_stop_agreement,
        };
        let policy = TtcPolicy {
            strategy: TtcStrategy::MajorityVote,
            min_samples: 1,
            max_samples: settings.max_samples as u32,
            early_stop_agreement: settings.early_stop_agreement,
            difficulty_aware: false,
            verifier: None,
            ..TtcPolicy::default()
        };
        let records = run_service(
            engine,
            settings,
            &prepared,
            ServiceRun::plain(policy, sampled),
        )
        .await?;
        family_results.push(summarise(family, early, records));
        progress(&progress_line(family_results.last()));

        // The allocation: what the vote depth nearest 4 cost here, so adaptive and uniform
        // depth are compared at (about) equal energy.
        let reference_depth = depths
            .iter()
            .copied()
            .min_by_key(|d| d.abs_diff(4))
            .unwrap_or(1);
        let allocation_joules = family_results
            .iter()
            .find(|r| r.configuration == Configuration::Vote { k: reference_depth })
            .map_or(0.0, |r| r.mean_joules);
        let tool = checker
            .as_ref()
            .filter(|_| family.is_tool_checkable())
            .map(|c| {
                VerifierSpec::Http(HttpEndpoint {
                    url: c.url(),
                    timeout: std::time::Duration::from_secs(2),
                    accept_score: 0.5,
                })
            });
        let schema = family.verifier();
        // The controller under the allocation: with the family's own verifier (if any), and
        // again with the checking tool where one applies, to compare with uniform best-of-k.
        // Where it votes, once more with every answer's correctness fed back, as a client with
        // labels would: feedback tells it whether depth makes answers right, not only whether
        // it changes them.
        let mut adaptive_runs = vec![(
            schema.as_ref().map(|_| EvalVerifier::Schema),
            schema.clone(),
            false,
        )];
        if schema.is_none() {
            adaptive_runs.push((None, None, true));
        }
        if let Some(spec) = &tool {
            adaptive_runs.push((Some(EvalVerifier::Tool), Some(spec.clone()), false));
        }
        let verifiers = [
            schema.map(|spec| (EvalVerifier::Schema, spec)),
            tool.map(|spec| (EvalVerifier::Tool, spec)),
        ];
        for (kind, verifier, feedback) in adaptive_runs {
            let adaptive = Configuration::Adaptive {
                allocation_joules,
                reference_depth,
                verifier: kind,
                feedback,
            };
            let policy = TtcPolicy {
                strategy: TtcStrategy::Adaptive,
                min_samples: 1,
                max_samples: settings.max_samples as u32,
                early_stop_agreement: settings.early_stop_agreement,
                difficulty_aware: true,
                verifier,
                ..TtcPolicy::default()
            };
            let records = run_service(
                engine,
                settings,
                &prepared,
                ServiceRun {
                    policy,
                    allocation: Some(allocation_joules),
                    sampler: sampled,
                    feedback,
                },
            )
            .await?;
            family_results.push(summarise(family, adaptive, records));
            progress(&progress_line(family_results.last()));
        }

        for (kind, spec) in verifiers.into_iter().flatten() {
            let policy = TtcPolicy {
                strategy: TtcStrategy::BestOfN,
                min_samples: 1,
                max_samples: settings.max_samples as u32,
                difficulty_aware: false,
                verifier: Some(spec),
                ..TtcPolicy::default()
            };
            let records = run_service(
                engine,
                settings,
                &prepared,
                ServiceRun::plain(policy, sampled),
            )
            .await?;
            family_results.push(summarise(
                family,
                Configuration::BestOfN {
                    max_samples: settings.max_samples,
                    verifier: kind,
                },
                records,
            ));
            progress(&progress_line(family_results.last()));
        }
        results.extend(family_results);
    }
    let findings = report::findings(&results, settings);
    let source = results
        .iter()
        .map(|r| r.energy_source)
        .find(|s| *s == EnergySource::Estimate)
        .or(results.first().map(|r| r.energy_source))
        .unwrap_or(EnergySource::Estimate);
    let notes = vec![
        format!(
            "Energy source: {}{}.",
            source,
            if source.is_measured() {
                " (measured by hardware counters)"
            } else {
                " — NOT measured: this process's CPU seconds x declared watts per core"
            }
        ),
        "Items: ttc::tasks::generate(family, items, seed); each family's generator is documented there.".into(),
        format!(
            "Samples: item i uses seeds s_i + j for sample j in every configuration (common random numbers); vote@k runs k samples as one batch, policy-vote@k the greedy answer and k-1 samples as one batch (the sidecar's MajorityVote at a fixed k), early-stop/adaptive/best-of-N run through TtcService (greedy answer first) in windows of {} (later windows reuse the first window's prefill).",
            settings.window
        ),
        "pass@k is what an oracle verifier would reach with k samples (unbiased estimate from the deepest vote's samples) — a ceiling, not a strategy.".into(),
        "best-of-N+schema: structured_output's JSON schema, which checks structure, not values. best-of-N+tool: the checking tool (eval::checker) behind the HTTP verifier on the families a tool can check (addition, larger-of-two, letter counting); it recomputes what the question asks without the answer key, which on these families makes it as strong as an oracle, so it shows what a calculator, a test suite or a type checker buys. A regex such as ^\\s*\\d+\\s*$ checks the format, not the sum, so it is not used.".into(),
    ];
    let mut notes = notes;
    notes.push(if size_models.is_empty() {
        "Only one model is evaluated: no model-size points on the frontier.".into()
    } else {
        format!(
            "Model-size points (crosses on the plots): greedy on {}, same items, each model's own chat template (or its fallback when the file has none).",
            size_models
                .iter()
                .map(|m| m.engine().name().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    Ok(EvalReport {
        model: engine.engine().name().to_owned(),
        settings: settings.clone(),
        results,
        findings,
        notes,
    })
}

fn progress_line(result: Option<&ConfigResult>) -> String {
    result.map_or_else(String::new, |r| {
        format!(
            "{} {}: {:.0}% ({}/{}), {:.3} J/request ({})",
            r.family.name(),
            r.label,
            r.accuracy.estimate * 100.0,
            r.items.iter().filter(|i| i.correct).count(),
            r.items.len(),
            r.mean_joules,
            r.energy_source
        )
    })
}

/// `n` samples of one item as one batch, majority-voted; with `greedy_first_row`, the first row
/// is the greedy answer (as the sidecar's plans draw it).
async fn run_batch(
    engine: &EngineHandle,
    settings: &EvalSettings,
    p: &Prepared,
    n: usize,
    sampler: SamplerConfig,
    greedy_first_row: bool,
) -> Result<ItemRecord, EvalError> {
    // Every request pays for its own prefill, whichever configuration ran the item before.
    engine.engine().clear_prefix_cache();
    let started = Instant::now();
    let out = engine
        .generate(GenerationRequest {
            prompt: p.prompt.clone(),
            n,
            max_tokens: max_tokens_for(settings, p.item.answer_type),
            sampler,
            seed: p.seed,
            stop: StopStrings::default(),
            greedy_first_row,
        })
        .await?;
    let latency_s = started.elapsed().as_secs_f64();
    let energy = out.energy.ok_or(EvalError::NoEnergy)?;
    let candidates: Vec<Candidate> = out
        .completions
        .iter()
        .map(|c| Candidate {
            answer: extract_answer(&c.text, p.item.answer_type),
            logprob: c.logprob,
            tokens: c.token_ids.len(),
            retrace_logprob: Some(c.sample_logprob),
        })
        .collect();
    let answer = majority_vote(&candidates, VoteWeighting::Uniform).map(|v| v.answer);
    let correct_samples = out
        .completions
        .iter()
        .filter(|c| p.item.is_correct(&c.text))
        .count();
    Ok(ItemRecord {
        item_id: p.item.id.clone(),
        expected: p.item.expected.clone(),
        correct: answer.as_deref() == Some(p.item.expected.as_str()),
        answer,
        samples: out.completions.len(),
        correct_samples,
        verified: None,
        joules: energy.joules,
        energy_source: energy.source,
        prompt_tokens: out.prompt_tokens,
        completion_tokens: out.completion_tokens,
        latency_s,
        stop_reason: None,
    })
}

/// How one configuration runs through a [`TtcService`].
struct ServiceRun {
    policy: TtcPolicy,
    /// Joules per request allocated to the pod.
    allocation: Option<f64>,
    sampler: SamplerConfig,
    /// Whether each answer's correctness is fed back.
    feedback: bool,
}

impl ServiceRun {
    /// No allocation, no feedback.
    fn plain(policy: TtcPolicy, sampler: SamplerConfig) -> Self {
        Self {
            policy,
            allocation: None,
            sampler,
            feedback: false,
        }
    }
}

/// Every item through one fresh [`TtcService`], in order (the controller learns as it goes, as
/// it would in a pod).
async fn run_service(
    engine: &EngineHandle,
    settings: &EvalSettings,
    prepared: &[Prepared],
    run: ServiceRun,
) -> Result<Vec<ItemRecord>, EvalError> {
    let ServiceRun {
        policy,
        allocation,
        sampler,
        feedback,
    } = run;
    let service = TtcService::with_options(
        policy,
        TtcOptions {
            window: settings.window,
            ..TtcOptions::default()
        },
    )?;
    service.set_allocation(allocation);
    let mut records = Vec::with_capacity(prepared.len());
    for p in prepared {
        // The request's own windows reuse its prefill; earlier configurations' do not count.
        engine.engine().clear_prefix_cache();
        let started = Instant::now();
        let answer = service
            .answer(
                engine,
                TtcRequest {
                    id: p.item.id.clone(),
                    prompt: p.prompt.clone(),
                    prompt_text: p.item.prompt.clone(),
                    answer_type: p.item.answer_type,
                    max_tokens: max_tokens_for(settings, p.item.answer_type),
                    sampler,
                    seed: p.seed,
                    stop: StopStrings::default(),
                },
            )
            .await?;
        let latency_s = started.elapsed().as_secs_f64();
        let energy = answer.energy.ok_or(EvalError::NoEnergy)?;
        let outcome = answer.outcome;
        if feedback && let Some(ticket) = &outcome.feedback_ticket {
            service.feedback(ticket, &Feedback::Expected(p.item.expected.clone()))?;
        }
        let correct_samples = outcome
            .answers
            .iter()
            .filter(|a| a.as_deref() == Some(p.item.expected.as_str()))
            .count();
        records.push(ItemRecord {
            item_id: p.item.id.clone(),
            expected: p.item.expected.clone(),
            correct: outcome.answer.as_deref() == Some(p.item.expected.as_str()),
            answer: outcome.answer,
            samples: outcome.samples,
            correct_samples,
            verified: outcome.verified,
            joules: energy.joules,
            energy_source: energy.source,
            // Prefilled once: later windows reuse it from the prefix cache.
            prompt_tokens: outcome.prompt_tokens,
            completion_tokens: answer.completion_tokens,
            latency_s,
            stop_reason: outcome.stop_reason,
        });
    }
    Ok(records)
}

/// Accuracy, means and the energy source of one configuration's records.
pub fn summarise(
    family: TaskFamily,
    configuration: Configuration,
    items: Vec<ItemRecord>,
) -> ConfigResult {
    let correct = items.iter().filter(|i| i.correct).count() as u64;
    let energy_source = if items
        .iter()
        .any(|i| i.energy_source == EnergySource::Estimate)
    {
        EnergySource::Estimate
    } else {
        items
            .first()
            .map_or(EnergySource::Estimate, |i| i.energy_source)
    };
    ConfigResult {
        family,
        model: None,
        label: configuration.label(),
        configuration,
        accuracy: wilson_95(correct, items.len() as u64),
        pass_at_k: None,
        mean_joules: mean(items.iter().map(|i| i.joules)),
        energy_source,
        mean_samples: mean(items.iter().map(|i| i.samples as f64)),
        mean_completion_tokens: mean(items.iter().map(|i| i.completion_tokens as f64)),
        mean_prompt_tokens: mean(items.iter().map(|i| i.prompt_tokens as f64)),
        mean_latency_s: mean(items.iter().map(|i| i.latency_s)),
        items,
    }
}

/// pass@k of every vote row, estimated from the deepest vote's samples of the same items.
fn add_pass_at_k(results: &mut [ConfigResult], depths: &[usize]) {
    let Some(&deepest) = depths.last() else {
        return;
    };
    let counts: Vec<(u64, u64)> = results
        .iter()
        .find(|r| r.configuration == Configuration::Vote { k: deepest })
        .map(|r| {
            r.items
                .iter()
                .map(|i| (i.samples as u64, i.correct_samples as u64))
                .collect()
        })
        .unwrap_or_default();
    for r in results.iter_mut() {
        if let Configuration::Vote { k } = r.configuration {
            let values: Vec<f64> = counts
                .iter()
                .filter_map(|&(n, c)| pass_at_k(n, c, k as u64))
                .collect();
            if !values.is_empty() {
                r.pass_at_k = Some(PassAtK {
                    k,
                    value: mean(values.iter().copied()),
                    from_samples: deepest,
                });
            }
        }
    }
}

/// Two-sided exact sign test on paired outcomes: `wins` items right only under one
/// configuration, `losses` right only under the other. 1.0 when there is no discordant pair.
pub fn sign_test(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    if n == 0 {
        return 1.0;
    }
    let tail = wins.min(losses);
    // Sum of C(n, i) / 2^n for i <= tail, in logs to stay finite for large n.
    let ln_choose =
        |n: usize, k: usize| -> f64 { (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum() };
    let p: f64 = (0..=tail)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * p).min(1.0)
}

/// Items right under `a` but not `b`, and right under `b` but not `a` (matched by item id).
pub fn discordant(a: &ConfigResult, b: &ConfigResult) -> (usize, usize) {
    let mut wins = 0;
    let mut losses = 0;
    for x in &a.items {
        if let Some(y) = b.items.iter().find(|y| y.item_id == x.item_id) {
            match (x.correct, y.correct) {
                (true, false) => wins += 1,
                (false, true) => losses += 1,
                _ => {}
            }
        }
    }
    (wins, losses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_test_reference_values() {
        // 8 wins, 0 losses: 2 / 256.
        assert!((sign_test(8, 0) - 2.0 / 256.0).abs() < 1e-12);
        assert_eq!(sign_test(0, 0), 1.0);
        assert_eq!(sign_test(3, 3), 1.0);
        // 9 vs 1: 2 * (1 + 10) / 1024.
        assert!((sign_test(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn labels_are_distinct() {
        let labels = [
            Configuration::Greedy.label(),
            Configuration::Vote { k: 4 }.label(),
            Configuration::PolicyVote { k: 4 }.label(),
            Configuration::EarlyStop {
                max_samples: 8,
                agreement: 0.75,
            }
            .label(),
            Configuration::Adaptive {
                allocation_joules: 1.0,
                reference_depth: 4,
                verifier: None,
                feedback: false,
            }
            .label(),
            Configuration::Adaptive {
                allocation_joules: 1.0,
                reference_depth: 4,
                verifier: None,
                feedback: true,
            }
            .label(),
            Configuration::Adaptive {
                allocation_joules: 1.0,
                reference_depth: 4,
                verifier: Some(EvalVerifier::Tool),
                feedback: false,
            }
            .label(),
            Configuration::BestOfN {
                max_samples: 8,
                verifier: EvalVerifier::Schema,
            }
            .label(),
            Configuration::BestOfN {
                max_samples: 8,
                verifier: EvalVerifier::Tool,
            }
            .label(),
        ];
        let set: std::collections::HashSet<_> = labels.iter().collect();
        assert_eq!(set.len(), labels.len());
    }
}
