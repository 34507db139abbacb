//! Runs test-time compute for one request: asks the [`TtcController`] for a plan, draws samples
//! window by window from the engine, verifies or votes, and books what the request cost so the
//! controller keeps the pod within its energy allocation.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::engine::sampler::SamplerConfig;
use crate::engine::stop::StopStrings;
use crate::engine::worker::EngineHandle;
use crate::engine::{
    Completion, EngineError, FinishReason, GenerationEvent, GenerationOutput, GenerationRequest,
    RequestJoules,
};
use ttc_api::EnergySource;
use ttc_core::power::PowerBudget;
use ttc_core::reasoning::BudgetForcing;
use ttc_core::{
    AnswerType, Effort, Feedback, FeedbackError, FeedbackReceipt, FeedbackTicket, MeasuredEnergy,
    PromptFeatures, RequestFeatures, ScoreTransport, TicketKeys, TtcController, TtcError,
    TtcOptions, TtcOutcome, TtcPlan, TtcPolicy, TtcReport, TtcSession, Verdict, Verifier,
    WindowDecision,
};

use crate::score_client::HttpScoreClient;

/// One request for an answer chosen by test-time compute.
#[derive(Debug, Clone)]
pub struct TtcRequest {
    /// The response's id, under which the client may post feedback on the answer.
    pub id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// The prompt's text (for prompt features and HTTP verifiers).
    pub prompt_text: String,
    /// How answers are extracted and compared.
    pub answer_type: AnswerType,
    /// Token limit per sample.
    pub max_tokens: usize,
    /// Sampling settings of every sample.
    pub sampler: SamplerConfig,
    /// Sample `i` uses seed `seed + i`.
    pub seed: u64,
    /// Stop strings.
    pub stop: StopStrings,
    /// The depth the client asks for, within the policy's range.
    pub effort: Option<Effort>,
    /// The most reasoning tokens the client allows.
    pub reasoning_budget: Option<usize>,
}

/// The chosen answer and what it took.
#[derive(Debug, Clone)]
pub struct TtcAnswer {
    /// The sample returned to the client.
    pub chosen: Completion,
    /// Strategy, depth, agreement, joules.
    pub outcome: TtcOutcome,
    /// Prompt tokens (of one sample).
    pub prompt_tokens: usize,
    /// Generated tokens over all samples.
    pub completion_tokens: usize,
    /// Joules of every sample together.
    pub energy: Option<RequestJoules>,
}

/// The pod's test-time-compute controller, shared by all requests.
pub struct TtcService {
    controller: Mutex<TtcController>,
    power: Mutex<PowerBudget>,
    /// Sign the feedback tickets of responses and check those posted back.
    keys: TicketKeys,
}

/// A key of this process alone (two v4 UUIDs: 244 bits from the OS's generator): tickets come back only to
/// the replica that wrote them. Replicas behind one Service share keys through a file instead
/// ([`TtcService::with_ticket_keys`]).
fn process_key() -> TicketKeys {
    let key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    TicketKeys::new(vec![key.into_bytes()]).expect("64 bytes is long enough")
}

impl TtcService {
    /// A service for `policy`, without an allocation until one is set.
    pub fn new(policy: TtcPolicy) -> Result<Self, TtcError> {
        Self::with_options(policy, TtcOptions::default())
    }

    /// A service for `policy` with these sidecar-side settings (window size, vote weighting,
    /// budget controller).
    pub fn with_options(policy: TtcPolicy, options: TtcOptions) -> Result<Self, TtcError> {
        // Without a TLS backend no HTTP verifier can be built; the policy that names one is
        // refused with that reason, and every other policy works.
        let transport = HttpScoreClient::new()
            .map(|client| Arc::new(client) as Arc<dyn ScoreTransport>)
            .inspect_err(|e| tracing::warn!(error = %e, "no HTTP client for ttc.verifier.http"))
            .ok();
        let default_window =
            Duration::from_secs(u64::from(ttc_api::policy::DEFAULT_WINDOW_SECONDS));
        Ok(Self {
            controller: Mutex::new(TtcController::with_transport(policy, options, transport)?),
            power: Mutex::new(PowerBudget::new(Instant::now(), default_window)),
            keys: process_key(),
        })
    }

    /// Signs and checks feedback tickets with `keys` (the first signs; all are accepted), so
    /// that every replica sharing them takes every replica's tickets.
    pub fn with_ticket_keys(mut self, keys: TicketKeys) -> Self {
        self.keys = keys;
        self
    }

    fn controller(&self) -> MutexGuard<'_, TtcController> {
        // The controller's state stays consistent between calls; a panic elsewhere leaves it usable.
        self.controller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn power(&self) -> MutexGuard<'_, PowerBudget> {
        self.power.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the pod's power limits: a cap in watts and an energy budget per window (from its
    /// allocation in the policy's status), and the policy's window. The budget controller holds
    /// the joules per request they allow at the measured request rate, as well as the
    /// joules-per-request allocation, whichever is tighter.
    pub fn set_power_limits(
        &self,
        watts: Option<f64>,
        joules_per_window: Option<f64>,
        window: Option<Duration>,
    ) {
        let bound = {
            let mut power = self.power();
            power.set_limits(watts, joules_per_window, window);
            power.joules_per_request(Instant::now())
        };
        self.controller().set_cap(bound);
    }

    /// Sets the pod's allocation in joules per request (`None`: no budget).
    pub fn set_allocation(&self, joules_per_request: Option<f64>) {
        self.controller().set_allocation(joules_per_request);
    }

    /// Replaces the policy, keeping what was learned.
    pub fn set_policy(&self, policy: TtcPolicy) -> Result<(), TtcError> {
        self.controller().set_policy(policy)
    }

    /// Takes a client's verdict on an answer: `ticket` is the response's
    /// `ttc.feedbackTicket`. Tells the depth-value learner whether depth made answers right.
    pub fn feedback(
        &self,
        ticket: &str,
        feedback: &Feedback,
    ) -> Result<FeedbackReceipt, FeedbackError> {
        let ticket = FeedbackTicket::decode(ticket, &self.keys)?;
        self.controller().feedback(&ticket, feedback)
    }

    /// Budget and depth-value state, for metrics and status.
    pub fn report(&self) -> TtcReport {
        self.controller().report()
    }

    /// Answers one request with as much depth as the budget and the policy allow.
    pub async fn answer(
        &self,
        engine: &EngineHandle,
        request: TtcRequest,
    ) -> Result<TtcAnswer, EngineError> {
        let features = RequestFeatures {
            prompt: PromptFeatures::from_text(&request.prompt_text, request.prompt.len()),
            answer_type: request.answer_type,
            max_tokens: request.max_tokens,
            reasoning_model: engine.engine().is_reasoning_model(),
            row_limit: engine
                .admission()
                .map(|a| a.rows_fitting(request.prompt.len(), request.max_tokens)),
            effort: request.effort,
            reasoning_budget: request.reasoning_budget,
        };
        let bound = self.power().joules_per_request(Instant::now());
        let (mut session, verifier) = {
            let mut controller = self.controller();
            controller.set_cap(bound);
            (controller.plan(&features), controller.verifier())
        };
        let plan = session.plan().clone();
        let mut window = session.first_window();
        let mut samples: Vec<Completion> = Vec::new();
        let prompt_tokens = request.prompt.len();
        let (mut energy, mut completion_tokens) = (None, 0);
        // A plan of one sample votes on nothing: decode its most likely answer (greedy) rather
        // than a random one.
        let sampler = if plan.max_samples == 1 {
            SamplerConfig {
                temperature: 0.0,
                ..request.sampler
            }
        } else {
            request.sampler
        };
        loop {
            let generation = GenerationRequest {
                prompt: request.prompt.clone(),
                n: window,
                // A reasoning plan first spends its reasoning budget; the answer follows.
                max_tokens: plan
                    .reasoning_tokens
                    .unwrap_or(request.max_tokens)
                    .min(plan.max_tokens)
                    .max(1),
                sampler,
                seed: request.seed.wrapping_add(samples.len() as u64),
                stop: request.stop.clone(),
                greedy_first_row: samples.is_empty() && session.greedy_first(),
            };
            let generated = draw_window(
                engine,
                &request,
                generation,
                &plan,
                &session,
                verifier.as_deref(),
            )
            .await;
            let (out, mut streamed) = match generated {
                Ok(drawn) => drawn,
                // No room for a later window: answer with the samples drawn (depth shed).
                Err(EngineError::Overloaded(_)) if !samples.is_empty() => break,
                Err(e) => {
                    self.controller().abandon(&plan);
                    return Err(e);
                }
            };
            completion_tokens += out.completion_tokens;
            {
                // Decode passes (a prefill has more tokens than rows) teach the window learner
                // what extra rows cost on this engine.
                let mut controller = self.controller();
                for pass in out.passes.iter().filter(|p| p.tokens <= p.batch_rows) {
                    controller.observe_pass(pass.batch_rows, pass.elapsed.as_secs_f64());
                }
            }
            energy = RequestJoules::sum(energy, out.energy);
            for completion in out.completions {
                // Rows cut short by a settled window are no samples (their tokens are billed).
                if completion.finish == FinishReason::Cancelled && streamed.is_some() {
                    continue;
                }
                let given = streamed
                    .as_mut()
                    .and_then(|verdicts| verdicts.get_mut(completion.index)?.take());
                add_sample(
                    &mut session,
                    verifier.as_deref(),
                    &request.prompt_text,
                    &completion,
                    given,
                )
                .await;
                samples.push(completion);
            }
            match session.decide() {
                WindowDecision::Continue { samples } => window = samples.max(1),
                WindowDecision::Stop { .. } => break,
            }
        }
        let RequestJoules { joules, source } = energy.unwrap_or(RequestJoules {
            joules: 0.0,
            source: EnergySource::Estimate,
        });
        let mut outcome = session.finish(MeasuredEnergy {
            joules,
            prompt_tokens,
            completion_tokens,
        });
        outcome.feedback_ticket = Some(outcome.ticket(&request.id).encode(&self.keys));
        self.controller().record(&outcome);
        self.power().record(Instant::now());
        let chosen = outcome
            .chosen_index
            .and_then(|i| samples.get(i))
            .or(samples.first())
            .cloned()
            .ok_or(EngineError::ShutDown)?;
        Ok(TtcAnswer {
            chosen,
            outcome,
            prompt_tokens,
            completion_tokens,
            energy: Some(RequestJoules { joules, source }),
        })
    }
}

/// Draws one window of the plan. Rows stream and the window ends early once the rows that
/// finished settle it: best-of-N at the first accepted row, a vote once it is decided. Returns
/// the window and, when rows streamed, the verdicts given on the way (none for a vote).
async fn draw_window(
    engine: &EngineHandle,
    request: &TtcRequest,
    generation: GenerationRequest,
    plan: &TtcPlan,
    session: &TtcSession,
    verifier: Option<&Verifier>,
) -> Result<(GenerationOutput, Option<Vec<Option<Verdict>>>), EngineError> {
    match (plan.reasoning_tokens, verifier) {
        (Some(_), _) => Ok((force_answers(engine, request, generation).await?, None)),
        (None, Some(verifier)) if session.needs_verdicts() => {
            let (out, verdicts) =
                verified_window(engine, generation, verifier, &request.prompt_text).await?;
            Ok((out, Some(verdicts)))
        }
        (None, _) if generation.n > 1 => {
            let mut judge = Voting {
                session,
                texts: Vec::new(),
            };
            Ok((
                streamed_window(engine, generation, &mut judge).await?,
                Some(Vec::new()),
            ))
        }
        _ => Ok((engine.generate(generation).await?, None)),
    }
}

/// Adds a finished row to the session as a sample, with its verdict where the session needs one
/// (the one `given` while the row streamed, else the verifier's now).
async fn add_sample(
    session: &mut TtcSession,
    verifier: Option<&Verifier>,
    prompt_text: &str,
    completion: &Completion,
    given: Option<Verdict>,
) {
    let index = session.add_sample(
        &completion.text,
        completion.logprob,
        completion.token_ids.len(),
        Some(completion.sample_logprob),
    );
    if session.needs_verdicts()
        && let Some(verifier) = verifier
    {
        let verdict = match given {
            Some(verdict) => verdict,
            None => verifier.verify(prompt_text, &completion.text).await,
        };
        session.add_verdict(index, verdict);
    }
}

/// Judges a window's rows as they finish: whether the request is settled.
trait RowJudge {
    /// Row `index` finished with `text`; true when the rows still running are no longer needed.
    fn finished(&mut self, index: usize, text: &str) -> impl Future<Output = bool> + Send;
}

/// Best-of-N: settled at the first row the verifier accepts.
struct Verifying<'a> {
    verifier: &'a Verifier,
    prompt_text: &'a str,
    /// Each finished row's verdict, by row index.
    verdicts: Vec<Option<Verdict>>,
}

impl RowJudge for Verifying<'_> {
    async fn finished(&mut self, index: usize, text: &str) -> bool {
        let verdict = self.verifier.verify(self.prompt_text, text).await;
        let accepted = verdict.accepted;
        self.verdicts[index] = Some(verdict);
        accepted
    }
}

/// A vote: settled once the rows that finished decide it ([`TtcSession::settled_with`]).
struct Voting<'a> {
    session: &'a TtcSession,
    texts: Vec<String>,
}

impl RowJudge for Voting<'_> {
    fn finished(&mut self, _index: usize, text: &str) -> impl Future<Output = bool> + Send {
        self.texts.push(text.to_owned());
        std::future::ready(self.session.settled_with(&self.texts))
    }
}

/// A window's rows, streamed: `judge` sees each row that finishes, and once it says the request
/// is settled the rows still running are cancelled (dropping the stream does that). Every row
/// of a window costs a share of each pass until the longest is done, so a window no longer
/// waits for rows that ramble to the token limit once the rows that finished decide the answer.
/// The output includes the cancelled rows, cut short.
async fn streamed_window(
    engine: &EngineHandle,
    generation: GenerationRequest,
    judge: &mut impl RowJudge,
) -> Result<GenerationOutput, EngineError> {
    let mut texts = vec![String::new(); generation.n];
    let submission = engine.submit(generation, true).await?;
    if let Some(mut events) = submission.events {
        while let Some(event) = events.recv().await {
            match event {
                GenerationEvent::Text { index, delta } => texts[index].push_str(&delta),
                GenerationEvent::Finished { index, finish }
                    if finish != FinishReason::Cancelled =>
                {
                    if judge.finished(index, &texts[index]).await {
                        break;
                    }
                }
                GenerationEvent::Finished { .. } => {}
            }
        }
    }
    submission.done.await.unwrap_or(Err(EngineError::ShutDown))
}

/// A best-of-N window: each row is verified as it finishes and the first one accepted cancels
/// the rest (`streamed_window`). Returns the output and the verdict of each row that
/// finished, by row index.
pub async fn verified_window(
    engine: &EngineHandle,
    generation: GenerationRequest,
    verifier: &Verifier,
    prompt_text: &str,
) -> Result<(GenerationOutput, Vec<Option<Verdict>>), EngineError> {
    let mut judge = Verifying {
        verifier,
        prompt_text,
        verdicts: (0..generation.n).map(|_| None).collect(),
    };
    let output = streamed_window(engine, generation, &mut judge).await?;
    Ok((output, judge.verdicts))
}

/// Budget forcing (s1, Muennighoff et al. 2025): runs `reasoning` (whose `max_tokens` is the
/// reasoning budget); every sample that hit the budget with its reasoning still open gets the
/// forced suffix (`</think>` and an answer cue) and continues from there for the request's own
/// `max_tokens`. The joules and tokens of both passes are the request's.
async fn force_answers(
    engine: &EngineHandle,
    request: &TtcRequest,
    reasoning: GenerationRequest,
) -> Result<GenerationOutput, EngineError> {
    let forcing = BudgetForcing::default();
    let mut out = engine.generate(reasoning.clone()).await?;
    for completion in &mut out.completions {
        let Some(suffix) = forcing
            .forced_suffix(&completion.text)
            .filter(|_| completion.finish == FinishReason::Length)
        else {
            continue;
        };
        let suffix_ids = engine.engine().encode(&suffix)?;
        let mut prompt = reasoning.prompt.clone();
        prompt.extend(&completion.token_ids);
        prompt.extend(&suffix_ids);
        let answer = engine
            .generate(GenerationRequest {
                prompt,
                n: 1,
                max_tokens: request.max_tokens.max(1),
                seed: reasoning.seed.wrapping_add(completion.index as u64),
                ..reasoning.clone()
            })
            .await?;
        let Some(tail) = answer.completions.into_iter().next() else {
            continue;
        };
        completion.text = format!("{}{suffix}{}", completion.text, tail.text);
        completion.token_ids.extend(suffix_ids);
        completion.token_ids.extend(tail.token_ids);
        completion.logprob += tail.logprob;
        completion.finish = tail.finish;
        out.completion_tokens += answer.completion_tokens;
        out.passes.extend(answer.passes);
        out.energy = RequestJoules::sum(out.energy, answer.energy);
    }
    Ok(out)
}
