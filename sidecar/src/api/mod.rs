//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! plus `/v1/ttc/feedback` (clients' verdicts on answers chosen by test-time compute),
//! `/metrics`, `/healthz` and `/readyz`. Every bad request gets a 4xx with an OpenAI-style error body.

pub mod error;
pub mod ttc_object;
pub mod types;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::engine::sampler::SamplerConfig;
use crate::engine::stop::StopStrings;
use crate::engine::worker::{DEADLINE, EngineHandle};
use crate::engine::{
    Completion, GenerationEvent, GenerationOutput, GenerationRequest, RequestJoules,
};
use crate::ttc_service::{TtcRequest, TtcService};
pub use error::ApiError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ttc_core::{Feedback, FeedbackError, StopReason, TtcOutcome};
use ttc_object::TtcObject;
use ttc_telemetry::{DepthClassLabels, RequestRecord, SidecarMetrics};
use types::*;

/// Bounds on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most samples per request.
    pub max_n: usize,
    /// `max_tokens` when the request gives none (capped by what the context has left).
    pub default_max_tokens: usize,
    /// The longest a request may take, waiting for room included; a client's
    /// `X-Request-Timeout` may ask for less.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_n: 64,
            default_max_tokens: 512,
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// What a request asks of test-time compute: how to compare answers, and the depth fields other
/// servers' clients send (OpenAI's `reasoning_effort`, vLLM's `thinking_token_budget`, llama.cpp's
/// `reasoning_budget`).
struct TtcWishes {
    answer_type: Option<ttc_core::AnswerType>,
    effort: Option<ttc_core::Effort>,
    reasoning_budget: Option<usize>,
}

fn ttc_wishes(s: &SamplingFields) -> Result<TtcWishes, ApiError> {
    use ttc_core::Effort;
    let effort = match s.reasoning_effort.as_deref() {
        None => None,
        Some("low" | "minimal") => Some(Effort::Low),
        Some("medium") => Some(Effort::Medium),
        Some("high") => Some(Effort::High),
        Some(other) => {
            return Err(ApiError::invalid(
                Some("reasoning_effort"),
                format!("reasoning_effort must be low, medium or high; got {other:?}"),
            ));
        }
    };
    let budget = |field: &'static str, value: Option<i64>| match value {
        None | Some(-1) => Ok(None),
        Some(v) if v >= 0 => Ok(Some(v as usize)),
        Some(v) => Err(ApiError::invalid(
            Some(field),
            format!("{field} must be a number of tokens (0 or more, -1 for none); got {v}"),
        )),
    };
    let thinking = budget("thinking_token_budget", s.thinking_token_budget)?;
    let reasoning = budget("reasoning_budget", s.reasoning_budget)?;
    Ok(TtcWishes {
        answer_type: s.ttc.answer_type,
        effort,
        reasoning_budget: match (thinking, reasoning) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    })
}

/// The message roles OpenAI's chat API accepts; anything else is refused, naming the message.
const MESSAGE_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The header in which a client gives its own deadline, in seconds.
pub const REQUEST_TIMEOUT_HEADER: &str = "x-request-timeout";

/// The client's deadline, when it gives one.
fn client_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(REQUEST_TIMEOUT_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Some(Duration::from_secs_f64(s.min(1e6))))
        .ok_or_else(|| {
            ApiError::invalid(
                Some(REQUEST_TIMEOUT_HEADER),
                "X-Request-Timeout must be a positive number of seconds",
            )
        })
}

/// Answers within the request's deadline: the server's longest ([`Limits::request_timeout`]) or
/// the client's `X-Request-Timeout` when shorter. A request waits for room no longer than that;
/// past it the answer is dropped, which cancels its rows (they leave the batch at the next
/// step), and the client gets 504. A stream's deadline covers its admission; closing the stream
/// cancels it.
async fn answer_by_deadline(
    state: AppState,
    headers: &HeaderMap,
    req: Prepared,
    started: Instant,
) -> Result<Response, ApiError> {
    let limit = client_timeout(headers)?.map_or(state.limits.request_timeout, |t| {
        t.min(state.limits.request_timeout)
    });
    let deadline = started + limit;
    let answered = DEADLINE.scope(deadline, answer(state.clone(), req, started));
    let result = match tokio::time::timeout_at(deadline.into(), answered).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::deadline(limit.as_secs_f64())),
    };
    if let (Err(error), Some(metrics)) = (&result, &state.metrics)
        && let Some(reason) = error.refusal
    {
        metrics.record_refusal(reason);
    }
    result
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub limits: Limits,
    /// Test-time compute, when a policy is in force; requests without `n` then get the depth the
    /// budget allows and one chosen answer.
    pub ttc: Option<Arc<TtcService>>,
    /// OTLP and Prometheus metrics (`GET /metrics`), when enabled.
    pub metrics: Option<SidecarMetrics>,
}

/// What one answered request is recorded as in the metrics.
struct Served<'a> {
    operation: &'a str,
    usage: &'a Usage,
    started: Instant,
    strategy: &'a str,
    depth: usize,
    /// Why a TTC request stopped drawing samples.
    stop_reason: Option<StopReason>,
    /// Samples shed under load.
    shed_samples: usize,
}

fn record(state: &AppState, served: Served<'_>) {
    let Some(metrics) = &state.metrics else {
        return;
    };
    let duration = served.started.elapsed();
    let output = served.usage.completion_tokens as u64;
    metrics.record_request(&RequestRecord {
        operation: served.operation,
        input_tokens: served.usage.prompt_tokens as u64,
        output_tokens: output,
        duration,
        time_per_output_token: (output > 0).then(|| duration / output as u32),
        energy: served.usage.energy.as_ref().map(|e| (e.joules, e.source)),
        strategy: served.strategy,
        depth: served.depth as u64,
        error_type: None,
    });
    if let Some(reason) = served.stop_reason {
        metrics.record_stop(reason.label());
    }
    if served.shed_samples > 0 {
        metrics.record_depth_shed(served.shed_samples as u64);
    }
    publish_ttc_state(state);
}

/// Sets the gauges of the test-time-compute controller's state: the budget and, per class of
/// request, whether depth still pays and what feedback says it gains.
fn publish_ttc_state(state: &AppState) {
    let (Some(metrics), Some(ttc)) = (&state.metrics, &state.ttc) else {
        return;
    };
    let report = ttc.report();
    if let Some(target) = report.budget.allocation_joules_per_request {
        let mean = report.budget.window_mean_joules.unwrap_or(0.0);
        metrics.set_budget(target, target - mean);
    }
    for class in &report.depth_value.classes {
        metrics.set_depth_value(
            &DepthClassLabels {
                answer_type: class.class.answer_type.label(),
                difficulty_bin: class.class.bin,
            },
            class.depth_pays,
            class.gain,
        );
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state
        .metrics
        .as_ref()
        .map(SidecarMetrics::encode_prometheus)
    {
        Some(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                SidecarMetrics::PROMETHEUS_CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Some(Err(e)) => ApiError::internal(format!("encoding metrics: {e}")).into_response(),
        None => ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            ..ApiError::invalid(None, "metrics are disabled")
        }
        .into_response(),
    }
}

/// Whether a request runs under test-time compute: a policy is in force, the client did not ask
/// for several choices, and did not opt out. A stream runs under it only when the client opts
/// in (`"ttc": {"enabled": true}`): its answer is known only after the vote, so it comes as one
/// chunk instead of token by token.
fn ttc_for<'a>(state: &'a AppState, s: &SamplingFields) -> Option<&'a Arc<TtcService>> {
    let opted_in = s.ttc.enabled == Some(true);
    let wanted = s.n.is_none() && (!s.stream || opted_in) && s.ttc.enabled != Some(false);
    state.ttc.as_ref().filter(|_| wanted)
}

async fn run_ttc(
    service: &TtcService,
    state: &AppState,
    id: &str,
    request: GenerationRequest,
    prompt_text: String,
    wishes: TtcWishes,
) -> Result<(Completion, Usage, TtcOutcome), ApiError> {
    let answer = service
        .answer(
            &state.engine,
            TtcRequest {
                id: id.to_owned(),
                prompt: request.prompt,
                prompt_text,
                answer_type: wishes.answer_type.unwrap_or_default(),
                max_tokens: request.max_tokens,
                sampler: request.sampler,
                seed: request.seed,
                stop: request.stop,
                effort: wishes.effort,
                reasoning_budget: wishes.reasoning_budget,
            },
        )
        .await?;
    let usage = Usage {
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
        total_tokens: answer.prompt_tokens + answer.completion_tokens,
        energy: answer.energy.map(energy_usage),
    };
    Ok((answer.chosen, usage, answer.outcome))
}

/// Live while the engine's worker runs; 503 once it has ended, so the kubelet restarts the pod.
async fn healthz(State(state): State<AppState>) -> Response {
    if state.engine.is_running() {
        "ok".into_response()
    } else {
        ApiError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal("the inference engine has stopped")
        }
        .into_response()
    }
}

/// The API's routes. The metrics' admission gauges read the engine's admission control.
pub fn router(state: AppState) -> Router {
    if let (Some(metrics), Some(admission)) = (&state.metrics, state.engine.admission()) {
        let admission = admission.clone();
        metrics.observe_admission(move || admission.state().into());
    }
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/ttc/feedback", post(feedback))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(|| async { "ready" }))
        .fallback(|| async {
            ApiError {
                status: axum::http::StatusCode::NOT_FOUND,
                ..ApiError::invalid(None, "no such endpoint")
            }
        })
        .with_state(state)
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let param = match e.classify() {
            serde_json::error::Category::Data => None,
            _ => Some("body"),
        };
        ApiError::invalid(param, format!("could not parse the JSON body: {e}"))
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Validates the sampling fields and builds the engine request.
fn build_request(
    state: &AppState,
    prompt: Vec<u32>,
    prompt_param: &'static str,
    s: SamplingFields,
) -> Result<GenerationRequest, ApiError> {
    // The model name was checked by the handler, before the prompt was tokenized.
    let engine = state.engine.engine();
    let n = s.n.unwrap_or(1);
    if n < 1 || n as usize > state.limits.max_n {
        return Err(ApiError::invalid(
            Some("n"),
            format!("n must be between 1 and {}, got {n}", state.limits.max_n),
        ));
    }
    let context = engine.context_length();
    if prompt.len() >= context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                Some(prompt_param),
                format!(
                    "the prompt has {} tokens but the model's context holds {context}",
                    prompt.len()
                ),
            )
        });
    }
    let room = context - prompt.len();
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        None => state.limits.default_max_tokens.min(room),
        Some(m) if m < 1 || m as usize > room => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    Some("max_tokens"),
                    format!(
                        "max_tokens must be between 1 and {room} (the context left after the {}-token prompt), got {m}",
                        prompt.len()
                    ),
                )
            });
        }
        Some(m) => m as usize,
    };
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = s.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(ApiError::invalid(
            Some("top_k"),
            format!("top_k must be 0 (off) or positive, got {top_k}"),
        ));
    }
    let stop = s.stop.map(StopField::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("at most 4 stop sequences, got {}", stop.len()),
        ));
    }
    Ok(GenerationRequest {
        prompt,
        n: n as usize,
        max_tokens,
        sampler: SamplerConfig {
            temperature,
            top_p,
            top_k: top_k as usize,
        },
        seed: s.seed.unwrap_or_else(rand::random),
        stop: StopStrings::new(stop),
        greedy_first_row: false,
    })
}

fn usage(out: &GenerationOutput) -> Usage {
    Usage {
        prompt_tokens: out.prompt_tokens,
        completion_tokens: out.completion_tokens,
        total_tokens: out.prompt_tokens + out.completion_tokens,
        energy: out.energy.map(energy_usage),
    }
}

fn energy_usage(e: RequestJoules) -> EnergyUsage {
    EnergyUsage {
        joules: e.joules,
        source: e.source,
        measured: e.source.is_measured(),
    }
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let card = ModelCard {
        id: state.engine.engine().name().to_owned(),
        object: "model",
        created: 0,
        owned_by: "ttc-operator",
    };
    Json(json!({ "object": "list", "data": [card] }))
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: ChatCompletionRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages must not be empty",
        ));
    }
    if let Some((i, m)) = req
        .messages
        .iter()
        .enumerate()
        .find(|(_, m)| !MESSAGE_ROLES.contains(&m.role.as_str()))
    {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "messages[{i}].role must be one of {}; got {:?}",
                MESSAGE_ROLES.join(", "),
                m.role
            ),
        ));
    }
    let messages = req
        .messages
        .iter()
        .map(InputMessage::to_chat)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ApiError::invalid(Some("messages"), "only text content is supported"))?;
    let engine = state.engine.engine();
    if req.model != engine.name() {
        return Err(ApiError::unknown_model(&req.model, engine.name()));
    }
    let prompt = engine.encode_chat(&messages)?;
    // The last message is the question; HTTP verifiers and prompt features look at it.
    let prompt_text = messages
        .last()
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let request = Prepared {
        kind: Kind::Chat,
        model: req.model,
        prompt,
        prompt_text,
        sampling: req.sampling,
    };
    answer_by_deadline(state, &headers, request, started).await
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: CompletionRequest = parse(&body)?;
    let text = match req.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "prompt must be one string (batches of prompts are not supported)",
            ));
        }
    };
    let engine = state.engine.engine();
    if req.model != engine.name() {
        return Err(ApiError::unknown_model(&req.model, engine.name()));
    }
    let prompt = engine.encode(&text)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "prompt must not be empty",
        ));
    }
    let request = Prepared {
        kind: Kind::Text,
        model: req.model,
        prompt,
        prompt_text: text,
        sampling: req.sampling,
    };
    answer_by_deadline(state, &headers, request, started).await
}

/// `POST /v1/ttc/feedback`: whether an answer chosen by test-time compute was right, so the
/// pod learns whether depth makes this workload's answers right ([`ttc_core::feedback`]).
async fn feedback(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: FeedbackRequest = parse(&body)?;
    let verdict = match (req.correct, req.expected) {
        (Some(correct), None) => Feedback::Correct(correct),
        (None, Some(expected)) => Feedback::Expected(expected),
        _ => {
            return Err(ApiError::invalid(
                Some("correct"),
                "give exactly one of `correct` (true or false) and `expected` (the right answer)",
            ));
        }
    };
    let Some(service) = &state.ttc else {
        return Err(ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            ..ApiError::invalid(
                None,
                "test-time compute is not enabled on this pod: no InferencePolicy governs it",
            )
        });
    };
    let receipt = service
        .feedback(&req.ticket, &verdict)
        .map_err(|e| match e {
            FeedbackError::BadTicket(_) => ApiError::invalid(Some("ticket"), e.to_string()),
            FeedbackError::Unextractable { .. } => {
                ApiError::invalid(Some("expected"), e.to_string())
            }
            FeedbackError::Duplicate => ApiError {
                status: axum::http::StatusCode::CONFLICT,
                code: Some("duplicate_feedback"),
                ..ApiError::invalid(Some("ticket"), e.to_string())
            },
        })?;
    if let Some(metrics) = &state.metrics {
        metrics.record_feedback(receipt.gain.is_some());
    }
    publish_ttc_state(&state);
    Ok(Json(receipt).into_response())
}

/// Which endpoint a request came through; decides the response's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// A parsed, tokenized request, common to both endpoints.
struct Prepared {
    kind: Kind,
    model: String,
    prompt: Vec<u32>,
    prompt_text: String,
    sampling: SamplingFields,
}

/// Runs a request (under test-time compute, as a stream, or as plain sampling) and shapes the
/// response for its endpoint.
async fn answer(state: AppState, req: Prepared, started: Instant) -> Result<Response, ApiError> {
    let chat = req.kind == Kind::Chat;
    let include_usage = req
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let stream = req.sampling.stream;
    let ttc = ttc_for(&state, &req.sampling).cloned();
    let wishes = ttc_wishes(&req.sampling)?;
    let prompt_param = if chat { "messages" } else { "prompt" };
    let request = build_request(&state, req.prompt, prompt_param, req.sampling)?;
    let meta = StreamMeta {
        id: request_id(if chat { "chatcmpl" } else { "cmpl" }),
        created: now(),
        model: req.model,
        include_usage,
        chat,
    };
    let (completions, usage, outcome) = match ttc {
        Some(service) => {
            let (chosen, usage, outcome) =
                run_ttc(&service, &state, &meta.id, request, req.prompt_text, wishes).await?;
            (
                vec![Completion { index: 0, ..chosen }],
                usage,
                Some(outcome),
            )
        }
        None if stream => {
            return Ok(stream_response(&state, request, meta)
                .await?
                .into_response());
        }
        None => {
            let out = state.engine.generate(request).await?;
            let usage = usage(&out);
            (out.completions, usage, None)
        }
    };
    let (strategy, depth) = outcome.as_ref().map_or(("none", completions.len()), |o| {
        (o.strategy.label(), o.samples)
    });
    let operation = if chat { "chat" } else { "text_completion" };
    record(
        &state,
        Served {
            operation,
            usage: &usage,
            started,
            strategy,
            depth,
            stop_reason: outcome.as_ref().and_then(|o| o.stop_reason),
            shed_samples: outcome.as_ref().map_or(0, |o| o.shed_samples),
        },
    );
    let source = usage
        .energy
        .as_ref()
        .map_or(ttc_api::EnergySource::Estimate, |e| e.source);
    let ttc = outcome.as_ref().map(|o| TtcObject::new(o, source));
    if stream {
        return Ok(answered_stream(meta, completions, usage, ttc).into_response());
    }
    let response = if chat {
        Json(ChatCompletion {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            usage,
            ttc,
            choices: completions
                .into_iter()
                .map(|c| ChatChoice {
                    index: c.index,
                    message: OutputMessage {
                        role: "assistant",
                        content: c.text,
                    },
                    finish_reason: c.finish,
                    logprobs: None,
                })
                .collect(),
        })
        .into_response()
    } else {
        Json(TextCompletion {
            id: meta.id,
            object: "text_completion",
            created: meta.created,
            model: meta.model,
            usage,
            ttc,
            choices: completions
                .into_iter()
                .map(|c| TextChoice {
                    index: c.index,
                    text: c.text,
                    finish_reason: c.finish,
                    logprobs: None,
                })
                .collect(),
        })
        .into_response()
    };
    Ok(response)
}

struct StreamMeta {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    chat: bool,
}

impl StreamMeta {
    fn chunk(&self, choices: serde_json::Value, usage: Option<&Usage>) -> Event {
        Event::default().data(self.chunk_body(choices, usage).to_string())
    }

    fn chunk_body(&self, choices: serde_json::Value, usage: Option<&Usage>) -> serde_json::Value {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut body = json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices });
        if let Some(usage) = usage {
            body["usage"] = json!(usage);
        }
        body
    }

    fn choice(
        &self,
        index: usize,
        text: Option<String>,
        finish: Option<crate::engine::FinishReason>,
    ) -> serde_json::Value {
        if self.chat {
            let delta = match text {
                Some(t) => json!({ "content": t }),
                None if finish.is_none() => json!({ "role": "assistant", "content": "" }),
                None => json!({}),
            };
            json!([{ "index": index, "delta": delta, "finish_reason": finish, "logprobs": null }])
        } else {
            json!([{ "index": index, "text": text.unwrap_or_default(), "finish_reason": finish, "logprobs": null }])
        }
    }
}

/// A finished answer as a stream: the role, the whole text as one chunk, the finish, the usage
/// (when asked for) and the `ttc` object in the last chunk.
fn answered_stream(
    meta: StreamMeta,
    completions: Vec<Completion>,
    usage: Usage,
    ttc: Option<TtcObject>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let mut events = Vec::new();
    for c in &completions {
        if meta.chat {
            events.push(meta.chunk(meta.choice(c.index, None, None), None));
        }
        events.push(meta.chunk(meta.choice(c.index, Some(c.text.clone()), None), None));
        events.push(meta.chunk(meta.choice(c.index, None, Some(c.finish)), None));
    }
    let mut last = meta.chunk_body(json!([]), meta.include_usage.then_some(&usage));
    if let Some(ttc) = ttc {
        last["ttc"] = json!(ttc);
    }
    events.push(Event::default().data(last.to_string()));
    events.push(Event::default().data("[DONE]"));
    Sse::new(futures::stream::iter(events.into_iter().map(Ok)))
}

/// A plain stream; admitted (or refused) before the response starts.
async fn stream_response(
    state: &AppState,
    request: GenerationRequest,
    meta: StreamMeta,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    let n = request.n;
    let submission = state.engine.submit(request, true).await?;
    let stream = async_stream::stream! {
        let Some(mut events) = submission.events else {
            yield Ok(Event::default().data(ApiError::internal("no event stream").body().to_string()));
            return;
        };
        if meta.chat {
            for index in 0..n {
                yield Ok(meta.chunk(meta.choice(index, None, None), None));
            }
        }
        while let Some(event) = events.recv().await {
            let choice = match event {
                GenerationEvent::Text { index, delta } => meta.choice(index, Some(delta), None),
                GenerationEvent::Finished { index, finish } => meta.choice(index, None, Some(finish)),
            };
            yield Ok(meta.chunk(choice, None));
        }
        match submission.done.await {
            Ok(Ok(out)) if meta.include_usage => yield Ok(meta.chunk(json!([]), Some(&usage(&out)))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => yield Ok(Event::default().data(ApiError::from(e).body().to_string())),
            Err(_) => yield Ok(Event::default().data(ApiError::internal("the engine stopped").body().to_string())),
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
