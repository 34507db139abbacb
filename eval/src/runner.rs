//! Running the configurations: each family's items through fixed depths (the engine's batches)
//! and through the sidecar's policies (a [`TtcService`] per configuration).

use std::time::Instant;

use ttc_core::{
    AnswerType, Candidate, Feedback, HttpEndpoint, TtcOptions, TtcPolicy, TtcStrategy,
    VerifierSpec, VoteWeighting, extract_answer, majority_vote,
};
use ttc_energy::EnergySource;
use ttc_sidecar::chat_template::ChatMessage;
use ttc_sidecar::engine::sampler::SamplerConfig;
use ttc_sidecar::engine::stop::StopStrings;
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{EngineError, GenerationRequest};
use ttc_sidecar::ttc_service::{TtcRequest, TtcService};

use crate::checker::CheckerServer;
use crate::configuration::{Configuration, EvalVerifier};
use crate::results::{ConfigResult, EvalReport, ItemRecord, add_pass_at_k, summarise};
use crate::settings::EvalSettings;
use crate::tasks::{TaskFamily, TaskItem, generate};
use crate::{EvalError, report};

/// Runs the evaluation on `engine` (which must run under an energy meter), with greedy on each
/// of `size_models` as model-size points; `progress` hears a line per finished configuration.
pub async fn run(
    engine: &EngineHandle,
    size_models: &[EngineHandle],
    settings: &EvalSettings,
    mut progress: impl FnMut(&str),
) -> Result<EvalReport, EvalError> {
    let depths = settings.checked_depths()?;
    // The checking tool serves the HTTP verifier of the tool-checkable families.
    let checker = if settings.families.iter().any(|f| f.is_tool_checkable()) {
        Some(
            CheckerServer::start()
                .await
                .map_err(|e| EvalError::Settings(format!("starting the checking tool: {e}")))?,
        )
    } else {
        None
    };
    let mut results = Vec::new();
    for &family in &settings.families {
        let mut run = FamilyRun {
            engine,
            settings,
            family,
            prepared: prepare(engine, family, settings)?,
            sampled: SamplerConfig {
                temperature: settings.temperature,
                top_p: 1.0,
                top_k: 0,
            },
            results: Vec::new(),
            progress: &mut progress,
        };
        run.fixed_depths(size_models, &depths).await?;
        run.early_stop().await?;
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
        run.adaptive(&depths, tool.clone()).await?;
        run.best_of_n(tool).await?;
        results.extend(run.results);
    }
    let findings = report::findings(&results, settings);
    let notes = notes(settings, size_models, &results);
    Ok(EvalReport {
        model: engine.engine().name().to_owned(),
        settings: settings.clone(),
        results,
        findings,
        notes,
    })
}

/// How the run was made: the energy source, the items, the seeds, the verifiers, the models.
fn notes(
    settings: &EvalSettings,
    size_models: &[EngineHandle],
    results: &[ConfigResult],
) -> Vec<String> {
    let source = results
        .iter()
        .map(|r| r.energy_source)
        .find(|s| *s == EnergySource::Estimate)
        .or(results.first().map(|r| r.energy_source))
        .unwrap_or(EnergySource::Estimate);
    vec![
        format!(
            "Energy source: {}{}.",
            source,
            if source.is_measured() {
                " (measured by hardware counters)"
            } else {
                " — NOT measured: this process's CPU seconds x declared watts per core"
            }
        ),
        "Items: ttc_eval::tasks::generate(family, items, seed); each family's generator is documented there.".into(),
        format!(
            "Samples: item i uses seeds s_i + j for sample j in every configuration (common random numbers); vote@k runs k samples as one batch, policy-vote@k the greedy answer and k-1 samples as one batch (the sidecar's MajorityVote at a fixed k), early-stop/adaptive/best-of-N run through TtcService (greedy answer first) in windows of {} (later windows reuse the first window's prefill).",
            settings.window
        ),
        "pass@k is what an oracle verifier would reach with k samples (unbiased estimate from the deepest vote's samples) — a ceiling, not a strategy.".into(),
        "best-of-N+schema: structured_output's JSON schema, which checks structure, not values. best-of-N+tool: the checking tool (ttc_eval::checker) behind the HTTP verifier on the families a tool can check (addition, larger-of-two, letter counting); it recomputes what the question asks without the answer key, which on these families makes it as strong as an oracle, so it shows what a calculator, a test suite or a type checker buys. A regex such as ^\\s*\\d+\\s*$ checks the format, not the sum, so it is not used.".into(),
        if size_models.is_empty() {
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
        },
    ]
}

/// One family's configurations, run in order; each result is reported as it finishes.
struct FamilyRun<'a, P: FnMut(&str)> {
    engine: &'a EngineHandle,
    settings: &'a EvalSettings,
    family: TaskFamily,
    prepared: Vec<Prepared>,
    /// Sampling of every configuration but greedy.
    sampled: SamplerConfig,
    results: Vec<ConfigResult>,
    progress: &'a mut P,
}

const GREEDY: SamplerConfig = SamplerConfig {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
};

impl<P: FnMut(&str)> FamilyRun<'_, P> {
    fn done(&mut self, result: ConfigResult) {
        (self.progress)(&progress_line(&result));
        self.results.push(result);
    }

    /// Every item as one batch of `n` on `engine` (see [`run_batch`]).
    async fn batches(
        &self,
        engine: &EngineHandle,
        prepared: &[Prepared],
        n: usize,
        sampler: SamplerConfig,
        greedy_first_row: bool,
    ) -> Result<Vec<ItemRecord>, EvalError> {
        let mut records = Vec::with_capacity(prepared.len());
        for p in prepared {
            records.push(run_batch(engine, self.settings, p, n, sampler, greedy_first_row).await?);
        }
        Ok(records)
    }

    /// Greedy (on this model and each size model), votes at each depth, and the sidecar's vote
    /// (greedy first) at the deepest.
    async fn fixed_depths(
        &mut self,
        size_models: &[EngineHandle],
        depths: &[usize],
    ) -> Result<(), EvalError> {
        let (engine, family) = (self.engine, self.family);
        let records = self
            .batches(engine, &self.prepared, 1, GREEDY, false)
            .await?;
        self.done(summarise(family, Configuration::Greedy, records));
        for other in size_models {
            let prepared = prepare(other, family, self.settings)?;
            let records = self.batches(other, &prepared, 1, GREEDY, false).await?;
            let name = other.engine().name().to_owned();
            let mut result = summarise(family, Configuration::OtherModel, records);
            result.label = format!("greedy [{name}]");
            result.model = Some(name);
            self.done(result);
        }
        for &k in depths {
            let records = self
                .batches(engine, &self.prepared, k, self.sampled, false)
                .await?;
            self.done(summarise(family, Configuration::Vote { k }, records));
        }
        add_pass_at_k(&mut self.results, depths);
        // The sidecar's vote at the deepest fixed depth: greedy first, as its plans draw.
        if let Some(&k) = depths.last().filter(|&&k| k > 1) {
            let records = self
                .batches(engine, &self.prepared, k, self.sampled, true)
                .await?;
            self.done(summarise(family, Configuration::PolicyVote { k }, records));
        }
        Ok(())
    }

    /// The sidecar's early-stopping vote, without a budget.
    async fn early_stop(&mut self) -> Result<(), EvalError> {
        let settings = self.settings;
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
            self.engine,
            settings,
            &self.prepared,
            ServiceRun::plain(policy, self.sampled),
        )
        .await?;
        let early = Configuration::EarlyStop {
            max_samples: settings.max_samples,
            agreement: settings.early_stop_agreement,
        };
        self.done(summarise(self.family, early, records));
        Ok(())
    }

    /// The controller under an allocation: what the vote depth nearest 4 cost here, so adaptive
    /// and uniform depth are compared at (about) equal energy. With the family's own verifier
    /// (if any), and again with the checking tool where one applies, to compare with uniform
    /// best-of-k. Where it votes, once more with every answer's correctness fed back, as a
    /// client with labels would: feedback tells it whether depth makes answers right, not only
    /// whether it changes them.
    async fn adaptive(
        &mut self,
        depths: &[usize],
        tool: Option<VerifierSpec>,
    ) -> Result<(), EvalError> {
        let reference_depth = depths
            .iter()
            .copied()
            .min_by_key(|d| d.abs_diff(4))
            .unwrap_or(1);
        let allocation_joules = self
            .results
            .iter()
            .find(|r| r.configuration == Configuration::Vote { k: reference_depth })
            .map_or(0.0, |r| r.mean_joules);
        let schema = self.family.verifier();
        let mut runs = vec![(
            schema.as_ref().map(|_| EvalVerifier::Schema),
            schema.clone(),
            false,
        )];
        if schema.is_none() {
            runs.push((None, None, true));
        }
        if let Some(spec) = tool {
            runs.push((Some(EvalVerifier::Tool), Some(spec), false));
        }
        for (kind, verifier, feedback) in runs {
            let policy = TtcPolicy {
                strategy: TtcStrategy::Adaptive,
                min_samples: 1,
                max_samples: self.settings.max_samples as u32,
                early_stop_agreement: self.settings.early_stop_agreement,
                difficulty_aware: true,
                verifier,
                ..TtcPolicy::default()
            };
            let run = ServiceRun {
                policy,
                allocation: Some(allocation_joules),
                sampler: self.sampled,
                feedback,
            };
            let records = run_service(self.engine, self.settings, &self.prepared, run).await?;
            let adaptive = Configuration::Adaptive {
                allocation_joules,
                reference_depth,
                verifier: kind,
                feedback,
            };
            self.done(summarise(self.family, adaptive, records));
        }
        Ok(())
    }

    /// Best-of-N with the family's own verifier and with the checking tool, where they apply.
    async fn best_of_n(&mut self, tool: Option<VerifierSpec>) -> Result<(), EvalError> {
        let verifiers = [
            self.family
                .verifier()
                .map(|spec| (EvalVerifier::Schema, spec)),
            tool.map(|spec| (EvalVerifier::Tool, spec)),
        ];
        for (kind, spec) in verifiers.into_iter().flatten() {
            let policy = TtcPolicy {
                strategy: TtcStrategy::BestOfN,
                min_samples: 1,
                max_samples: self.settings.max_samples as u32,
                difficulty_aware: false,
                verifier: Some(spec),
                ..TtcPolicy::default()
            };
            let run = ServiceRun::plain(policy, self.sampled);
            let records = run_service(self.engine, self.settings, &self.prepared, run).await?;
            let configuration = Configuration::BestOfN {
                max_samples: self.settings.max_samples,
                verifier: kind,
            };
            self.done(summarise(self.family, configuration, records));
        }
        Ok(())
    }
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

fn progress_line(r: &ConfigResult) -> String {
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
                    effort: None,
                    reasoning_budget: None,
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
