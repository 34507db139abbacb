//! The OpenAI-compatible HTTP API on the real default model: answers, streaming, and a 4xx with
//! an OpenAI-style error body for every kind of bad request.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;
use ttc_core::{StopReason, TtcPolicy};
use ttc_energy::{EnergyMeter, MeterConfig, SourceChoice};
use ttc_sidecar::admission::{Admission, AdmissionConfig};
use ttc_sidecar::api::{AppState, Limits, router};
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::model_store::DEFAULT_MODEL;
use ttc_sidecar::ttc_policy::ttc_policy;
use ttc_sidecar::ttc_service::TtcService;
use ttc_telemetry::{SidecarMetrics, TelemetryConfig};

fn handle() -> EngineHandle {
    static HANDLE: std::sync::OnceLock<EngineHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let engine = Engine::load(
                &common::default_model_path(),
                DEFAULT_MODEL.name,
                &EngineOptions::default(),
            )
            .unwrap();
            let meter = EnergyMeter::from_config(&MeterConfig {
                source: SourceChoice::Estimate,
                ..MeterConfig::default()
            })
            .unwrap();
            EngineHandle::spawn(engine, meter).unwrap()
        })
        .clone()
}

fn app() -> axum::Router {
    router(AppState {
        engine: handle(),
        limits: Limits::default(),
        ttc: None,
        metrics: Some(metrics()),
    })
}

/// Metrics with OTLP off (no OTEL_* variables in tests): Prometheus only.
fn metrics() -> SidecarMetrics {
    static METRICS: std::sync::OnceLock<SidecarMetrics> = std::sync::OnceLock::new();
    METRICS
        .get_or_init(|| {
            SidecarMetrics::new(&TelemetryConfig::from_env(DEFAULT_MODEL.name), None).unwrap()
        })
        .clone()
}

async fn send(method: &str, path: &str, body: &str) -> (StatusCode, String) {
    send_to(app(), method, path, body).await
}

/// Sends one request to `app`; returns the status, the headers and the body.
async fn respond(
    app: axum::Router,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, bytes.to_vec())
}

/// Sends one request to `app`; returns the status and the body as text.
async fn send_to(app: axum::Router, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    let (status, _, bytes) = respond(app, method, path, body, &[]).await;
    (status, String::from_utf8(bytes).unwrap())
}

/// Posts a chat completion to `app`, expecting 200 and a JSON answer.
async fn chat_to(app: &axum::Router, body: &Value) -> Value {
    let (status, text) = send_to(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn post(path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = send("POST", path, &body.to_string()).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn chat(extra: Value) -> Value {
    let mut body = json!({ "model": DEFAULT_MODEL.name, "messages": [{ "role": "user", "content": "Say hi." }], "max_tokens": 8 });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn assert_openai_error(
    status: StatusCode,
    body: &Value,
    expected: StatusCode,
    param: Option<&str>,
) {
    assert_eq!(status, expected, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string(), "{body}");
    if let Some(param) = param {
        assert_eq!(body["error"]["param"], param, "{body}");
    }
}

#[tokio::test]
async fn chat_completion_with_n_samples() {
    let (status, body) = post(
        "/v1/chat/completions",
        chat(json!({ "n": 3, "seed": 1, "temperature": 0.8 })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], DEFAULT_MODEL.name);
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
        assert!(
            c["finish_reason"] == "stop" || c["finish_reason"] == "length",
            "{c}"
        );
    }
    let usage = &body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    // No hardware meter here: the figure is there, and labelled as the estimate it is.
    assert!(usage["energy"]["joules"].as_f64().unwrap() > 0.0, "{usage}");
    assert_eq!(usage["energy"]["source"], "estimate");
    assert_eq!(usage["energy"]["measured"], false);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn text_completion_respects_max_tokens() {
    let (status, body) =
        post("/v1/completions", json!({ "model": DEFAULT_MODEL.name, "prompt": "The sky is", "max_tokens": 4, "temperature": 0 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn streaming_sends_chunks_then_done() {
    let body = chat(
        json!({ "stream": true, "n": 2, "stream_options": { "include_usage": true }, "temperature": 0 }),
    );
    let (status, text) = send("POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut content = [String::new(), String::new()];
    let mut finishes = 0;
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) {
            let i = choice["index"].as_u64().unwrap() as usize;
            if let Some(t) = choice["delta"]["content"].as_str() {
                content[i].push_str(t);
            }
            finishes += usize::from(!choice["finish_reason"].is_null());
        }
    }
    assert_eq!(finishes, 2);
    assert!(!content[0].is_empty());
    assert_eq!(content[0], content[1], "greedy rows differ");
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn models_and_health() {
    let (status, text) = send("GET", "/v1/models", "").await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["data"][0]["id"], DEFAULT_MODEL.name);
    assert_eq!(send("GET", "/healthz", "").await.0, StatusCode::OK);
    // A served request shows up in the Prometheus metrics.
    let (status, _) = post(
        "/v1/completions",
        json!({ "model": DEFAULT_MODEL.name, "prompt": "Hi", "max_tokens": 2 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = send("GET", "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("gen_ai_server_request_duration"), "{text}");
    assert!(text.contains("text_completion"), "{text}");
    assert_eq!(send("GET", "/readyz", "").await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let (status, text) = send("POST", "/v1/chat/completions", "{not json").await;
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("body"));

    let (status, body) = post(
        "/v1/chat/completions",
        json!({ "model": DEFAULT_MODEL.name }),
    )
    .await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, None);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages"),
        "{body}"
    );

    let (status, body) = post("/v1/chat/completions", chat(json!({ "n": "two" }))).await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, None);

    for (field, value) in [
        ("reasoning_effort", json!("extreme")),
        ("thinking_token_budget", json!(-5)),
        ("reasoning_budget", json!(-2)),
    ] {
        let (status, body) = post("/v1/chat/completions", chat(json!({ field: value }))).await;
        assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some(field));
    }

    for role in ["", "wizard", "User"] {
        let messages =
            json!([{ "role": "user", "content": "Hi." }, { "role": role, "content": "Hi." }]);
        let (status, body) = post(
            "/v1/chat/completions",
            chat(json!({ "messages": messages })),
        )
        .await;
        assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("messages"));
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("messages[1].role"),
            "{body}"
        );
    }

    let (status, body) = post("/v1/chat/completions", chat(json!({ "model": "gpt-4o" }))).await;
    assert_openai_error(status, &body, StatusCode::NOT_FOUND, Some("model"));
    assert_eq!(body["error"]["code"], "model_not_found");

    for (field, value) in [
        ("n", json!(0)),
        ("n", json!(65)),
        ("temperature", json!(3.5)),
        ("top_p", json!(0)),
        ("max_tokens", json!(0)),
    ] {
        let (status, body) = post("/v1/chat/completions", chat(json!({ field: value }))).await;
        assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some(field));
    }

    let (status, body) = post(
        "/v1/chat/completions",
        chat(json!({ "max_tokens": 100000 })),
    )
    .await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("max_tokens"));
    assert_eq!(body["error"]["code"], "context_length_exceeded");

    let long = "word ".repeat(9000);
    let (status, body) = post(
        "/v1/completions",
        json!({ "model": DEFAULT_MODEL.name, "prompt": long }),
    )
    .await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("prompt"));
    assert_eq!(body["error"]["code"], "context_length_exceeded");

    let (status, body) = post("/v1/chat/completions", chat(json!({ "messages": [] }))).await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("messages"));

    let (status, body) = post(
        "/v1/completions",
        json!({ "model": DEFAULT_MODEL.name, "prompt": "" }),
    )
    .await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("prompt"));

    let (status, text) = send("GET", "/v1/nothing", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");

    // The server still answers after all of that.
    let (status, _) = post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, StatusCode::OK);
}

/// With a policy in force, a request without `n` gets samples voted on, one chosen answer, and a
/// `ttc` report; a request that opts out gets one plain sample.
#[tokio::test]
async fn ttc_votes_and_reports_depth_and_energy() {
    let policy: TtcPolicy = ttc_policy(
        &serde_json::from_value(json!({
            "strategy": "MajorityVote", "minSamples": 3, "maxSamples": 4, "difficultyAware": false
        }))
        .unwrap(),
    );
    let service = Arc::new(TtcService::new(policy).unwrap());
    service.set_allocation(Some(50.0));
    let app = router(AppState {
        engine: handle(),
        limits: Limits::default(),
        ttc: Some(service.clone()),
        metrics: Some(metrics()),
    });
    let body = json!({
        "model": DEFAULT_MODEL.name,
        "messages": [{ "role": "user", "content": "What is 2+3? Answer with a number." }],
        "max_tokens": 12, "temperature": 0.7, "seed": 5,
        "ttc": { "answerType": { "type": "number" } }
    });
    let v = chat_to(&app, &body).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    let samples = v["ttc"]["samples"].as_u64().unwrap();
    assert!((3..=4).contains(&samples), "policy bounds not obeyed: {v}");
    assert_eq!(v["ttc"]["strategy"], "MajorityVote");
    // The API's object, not the core's internals.
    for internal in [
        "probe",
        "answers",
        "greedySettles",
        "difficultyBin",
        "decodePasses",
    ] {
        assert!(
            v["ttc"].get(internal).is_none(),
            "{internal} leaked: {}",
            v["ttc"]
        );
    }
    assert_eq!(v["ttc"]["energySource"], v["usage"]["energy"]["source"]);
    assert_eq!(v["usage"]["energy"]["source"], "estimate");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= samples,
        "{v}"
    );
    assert!(
        (v["ttc"]["joules"].as_f64().unwrap() - v["usage"]["energy"]["joules"].as_f64().unwrap())
            .abs()
            < 1e-9
    );

    // The pod's target and its headroom are exported once a request ran under the budget.
    let (_, text) = send_to(app.clone(), "GET", "/metrics", "").await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("ttc_budget_allocation_joules ") && l.ends_with(" 50.0")),
        "{text}"
    );
    let stop: StopReason = serde_json::from_value(v["ttc"]["stopReason"].clone())
        .expect("a TTC answer says why it stopped");
    let stopped = format!("ttc_stops_total{{ttc_stop_reason=\"{}\"}} ", stop.label());
    assert!(
        text.lines().any(|l| l.starts_with(&stopped)),
        "{stopped}: {text}"
    );
    let headroom: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ttc_budget_remaining_joules "))
        .expect("ttc_budget_remaining_joules exported")
        .parse()
        .unwrap();
    let joules = v["usage"]["energy"]["joules"].as_f64().unwrap();
    assert!(
        (headroom - (50.0 - joules)).abs() < 1e-6,
        "{headroom} vs {joules}"
    );
    // Low effort: the policy's minimum depth.
    let mut low = chat(json!({ "max_tokens": 8, "reasoning_effort": "low" }));
    low["messages"] = body["messages"].clone();
    let low = chat_to(&app, &low).await;
    assert_eq!(low["ttc"]["maxSamples"], 3, "{low}");

    let mut opt_out = body.clone();
    opt_out["ttc"] = json!({ "enabled": false });
    let v = chat_to(&app, &opt_out).await;
    assert!(v.get("ttc").is_none(), "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
}

/// A client's verdict on a TTC answer: the response carries a ticket; posting it back with the
/// expected answer (or right/wrong) is taken once, counted in the metrics, and every malformed
/// verdict gets a 4xx naming its field.
#[tokio::test]
async fn feedback_on_a_ttc_answer_is_taken_once_and_bad_verdicts_get_4xx() {
    let policy: TtcPolicy = ttc_policy(
        &serde_json::from_value(json!({
            "strategy": "MajorityVote", "minSamples": 3, "maxSamples": 3, "difficultyAware": true
        }))
        .unwrap(),
    );
    let app = router(AppState {
        engine: handle(),
        limits: Limits::default(),
        ttc: Some(Arc::new(TtcService::new(policy).unwrap())),
        metrics: Some(metrics()),
    });
    let v = chat_to(
        &app,
        &json!({
            "model": DEFAULT_MODEL.name,
            "messages": [{ "role": "user", "content": "What is 2+3? Answer with a number." }],
            "max_tokens": 12, "temperature": 0.7, "seed": 9,
            "ttc": { "answerType": { "type": "number" } }
        }),
    )
    .await;
    let ticket = v["ttc"]["feedbackTicket"]
        .as_str()
        .unwrap_or_else(|| panic!("no ticket: {v}"))
        .to_owned();
    let feedback = |body: Value| {
        let app = app.clone();
        async move {
            let (status, text) = send_to(app, "POST", "/v1/ttc/feedback", &body.to_string()).await;
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    // A ticket altered by the caller (one character of its signed payload) is refused: whoever
    // can call the API cannot steer what the pod learns.
    let altered = {
        let mut bytes = ticket.clone().into_bytes();
        let at = "ttc2.".len() + 2;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let (status, body) = feedback(json!({ "ticket": altered, "correct": true })).await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some("ticket"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("signature does not match"),
        "{body}"
    );
    // Malformed verdicts are refused by field, and nothing is recorded.
    for (body, param) in [
        (json!({ "ticket": ticket }), "correct"),
        (
            json!({ "ticket": ticket, "correct": true, "expected": "5" }),
            "correct",
        ),
        (
            json!({ "ticket": "not-a-ticket", "correct": true }),
            "ticket",
        ),
        (
            json!({ "ticket": ticket, "expected": "none given" }),
            "expected",
        ),
    ] {
        let (status, body) = feedback(body).await;
        assert_openai_error(status, &body, StatusCode::BAD_REQUEST, Some(param));
    }
    let (status, body) = feedback(json!({ "ticket": ticket, "correct": true, "extra": 1 })).await;
    assert_openai_error(status, &body, StatusCode::BAD_REQUEST, None);
    // Minimum depth is all three samples: the verdict is taken, but says nothing about depth.
    let (status, receipt) = feedback(json!({ "ticket": ticket, "expected": "5" })).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["gain"], Value::Null, "{receipt}");
    assert_eq!(
        receipt["class"]["answerType"]["type"], "number",
        "{receipt}"
    );
    assert_eq!(receipt["depthPays"], true, "{receipt}");
    // A retry of the same verdict is not counted twice.
    let (status, body) = feedback(json!({ "ticket": ticket, "correct": true })).await;
    assert_openai_error(status, &body, StatusCode::CONFLICT, Some("ticket"));
    let (_, text) = send_to(app.clone(), "GET", "/metrics", "").await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("ttc_feedback_total{ttc_feedback_informative=\"false\"} ")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("ttc_depth_pays{")
            && l.contains("ttc_answer_type=\"number\"")
            && l.ends_with(" 1.0")),
        "{text}"
    );
    // Without a policy there is nothing to take feedback.
    let (status, body) = post(
        "/v1/ttc/feedback",
        json!({ "ticket": ticket, "correct": true }),
    )
    .await;
    assert_openai_error(status, &body, StatusCode::NOT_FOUND, None);
}

/// Budget forcing on the default model, which never closes a `<think>` block, so every request
/// is forced: the reasoning stops at its budget, `</think>` and the answer cue are appended, the
/// answer continues from there within the request's `max_tokens`, and both passes are billed.
#[tokio::test]
async fn a_reasoning_budget_forces_the_answer_when_the_budget_runs_out() {
    let policy: TtcPolicy = ttc_policy(
        &serde_json::from_value(json!({
            "strategy": "ReasoningBudget", "minReasoningTokens": 8, "maxReasoningTokens": 8,
            "difficultyAware": false
        }))
        .unwrap(),
    );
    let service = Arc::new(TtcService::new(policy).unwrap());
    let app = router(AppState {
        engine: handle(),
        limits: Limits::default(),
        ttc: Some(service),
        metrics: None,
    });
    let body = json!({
        "model": DEFAULT_MODEL.name,
        "messages": [{ "role": "user", "content": "Explain why 2 + 2 is 4, step by step." }],
        "max_tokens": 6, "temperature": 0.0,
        "ttc": { "answerType": { "type": "number" } }
    });
    let v = chat_to(&app, &body).await;
    assert_eq!(v["ttc"]["strategy"], "ReasoningBudget", "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let (reasoning, answer) = text
        .split_once("</think>\n\nFinal answer: ")
        .unwrap_or_else(|| panic!("no forced answer cue in {text:?}"));
    assert!(!reasoning.is_empty() && !answer.is_empty(), "{text:?}");
    // 8 reasoning tokens, the cue, at most 6 answer tokens.
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (9..=8 + 6).contains(&tokens),
        "{tokens} completion tokens: {v}"
    );
    assert!(v["usage"]["energy"]["joules"].as_f64().unwrap() > 0.0);
}

/// A power cap holds the depth to the joules per request it allows at the measured rate: a cap
/// far below what one sample costs leaves every request after the first at the minimum depth.
#[tokio::test]
async fn a_power_cap_holds_requests_to_the_minimum_depth() {
    let policy: TtcPolicy = ttc_policy(
        &serde_json::from_value(json!({
            "strategy": "MajorityVote", "minSamples": 1, "maxSamples": 6, "difficultyAware": false
        }))
        .unwrap(),
    );
    let service = Arc::new(TtcService::new(policy).unwrap());
    service.set_power_limits(Some(0.001), None, None);
    let app = router(AppState {
        engine: handle(),
        limits: Limits::default(),
        ttc: Some(service.clone()),
        metrics: None,
    });
    let body = json!({
        "model": DEFAULT_MODEL.name,
        "messages": [{ "role": "user", "content": "What is 4+4? Answer with a number." }],
        "max_tokens": 8, "temperature": 0.7, "seed": 9,
        "ttc": { "answerType": { "type": "number" } }
    });
    let mut outcomes = Vec::new();
    let mut spent = Vec::new();
    for _ in 0..3 {
        let v = chat_to(&app, &body).await;
        outcomes.push(v["ttc"].clone());
        spent.push(v["usage"]["energy"]["joules"].as_f64().unwrap());
    }
    // No rate before the first request: the cap cannot bind yet, so it may go deep.
    for ttc in &outcomes[1..] {
        assert_eq!(ttc["samples"], 1, "{ttc}");
        assert_eq!(ttc["budgetState"], "degraded", "{ttc}");
    }
    let target = service
        .report()
        .budget
        .allocation_joules_per_request
        .unwrap();
    // 1 mW times the seconds between requests: a small fraction of what one sample costs,
    // however slow the machine.
    let cheapest = spent.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        target < cheapest / 10.0,
        "a 1 mW cap allowed {target} J per request; one request cost {cheapest} J"
    );
}

/// A stream that opts in to test-time compute gets the voted answer as one chunk, then the
/// usage and the `ttc` object; without opting in, a stream is sampled token by token.
#[tokio::test]
async fn a_stream_that_opts_in_gets_the_voted_answer_with_its_ttc_report() {
    let policy: TtcPolicy = ttc_policy(
        &serde_json::from_value(json!({
            "strategy": "MajorityVote", "minSamples": 2, "maxSamples": 3, "difficultyAware": false
        }))
        .unwrap(),
    );
    let app = router(AppState {
        engine: handle(),
        limits: Limits::default(),
        ttc: Some(Arc::new(TtcService::new(policy).unwrap())),
        metrics: None,
    });
    let stream_body = |ttc: Value| {
        json!({
            "model": DEFAULT_MODEL.name,
            "messages": [{ "role": "user", "content": "What is 1+2? Answer with a number." }],
            "max_tokens": 8, "temperature": 0.7, "seed": 1, "stream": true,
            "stream_options": { "include_usage": true },
            "ttc": ttc
        })
    };
    let events = |text: String| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    };
    let send_stream = |body: Value| {
        let app = app.clone();
        async move {
            let (status, text) =
                send_to(app, "POST", "/v1/chat/completions", &body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            text
        }
    };

    let voted = events(
        send_stream(stream_body(
            json!({ "enabled": true, "answerType": { "type": "number" } }),
        ))
        .await,
    );
    assert_eq!(
        voted.last().map(String::as_str),
        Some("[DONE]"),
        "{voted:?}"
    );
    let chunks: Vec<Value> = voted[..voted.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(
        content.len(),
        1,
        "the answer comes as one chunk: {chunks:?}"
    );
    let last = chunks.last().unwrap();
    let samples = last["ttc"]["samples"].as_u64().unwrap();
    assert!((2..=3).contains(&samples), "{last}");
    assert!(
        last["usage"]["energy"]["joules"].as_f64().unwrap() > 0.0,
        "{last}"
    );

    // Without opting in, the stream is plain token-by-token sampling: no ttc object.
    let plain = events(send_stream(stream_body(json!({}))).await);
    assert_eq!(plain.last().map(String::as_str), Some("[DONE]"));
    assert!(plain.iter().all(|e| !e.contains("\"ttc\"")), "{plain:?}");
}

/// An app on the shared engine with its own admission control.
fn app_with_admission(
    config: AdmissionConfig,
    ttc: Option<Arc<TtcService>>,
) -> (axum::Router, Arc<Admission>) {
    let engine = handle();
    let admission = Arc::new(Admission::new(
        config,
        engine.engine().kv_bytes_per_position(),
    ));
    // Metrics of its own: their admission gauges read this admission control.
    let metrics =
        SidecarMetrics::new(&TelemetryConfig::from_env(DEFAULT_MODEL.name), None).unwrap();
    let app = router(AppState {
        engine: engine.with_admission(admission.clone()),
        limits: Limits::default(),
        ttc,
        metrics: Some(metrics),
    });
    (app, admission)
}

/// Posts a chat completion with extra headers; the status, headers and JSON body.
async fn post_with(
    app: &axum::Router,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let (status, headers, bytes) = respond(
        app.clone(),
        "POST",
        "/v1/chat/completions",
        &body.to_string(),
        headers,
    )
    .await;
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn admission_config(budget_bytes: u64, max_rows: usize) -> AdmissionConfig {
    AdmissionConfig {
        memory_budget_bytes: budget_bytes,
        max_rows,
        max_waiting: 4,
        max_wait: std::time::Duration::from_millis(150),
    }
}

/// A pod at capacity refuses whole requests with 429, `Retry-After` and an OpenAI error body
/// once their wait runs out, serves them again when room comes back, and refuses at once (400)
/// a request that could never fit.
#[tokio::test]
async fn a_full_pod_refuses_with_429_and_a_request_larger_than_the_pod_with_400() {
    let budget = 64 << 20;
    let (app, admission) = app_with_admission(admission_config(budget, 64), None);
    let body = chat(json!({ "n": 2, "max_tokens": 8 }));
    // Someone holds the whole budget.
    let whole = ttc_sidecar::admission::Demand {
        rows: 1,
        bytes: budget,
    };
    let held = admission.try_admit(whole).expect("an idle pod has room");
    let started = std::time::Instant::now();
    let (status, headers, error) = post_with(&app, &body, &[]).await;
    assert_openai_error(status, &error, StatusCode::TOO_MANY_REQUESTS, None);
    assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");
    assert_eq!(headers["retry-after"], "1");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refused within its wait"
    );
    drop(held);
    let (status, _, answer) = post_with(&app, &body, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["choices"].as_array().map(Vec::len), Some(2));
    // 64 rows of 2048 tokens need gigabytes: never, whatever waits.
    let huge = chat(json!({ "n": 64, "max_tokens": 2048 }));
    let (status, headers, error) = post_with(&app, &huge, &[]).await;
    assert_openai_error(status, &error, StatusCode::BAD_REQUEST, Some("n"));
    assert!(headers.get("retry-after").is_none());
    assert_eq!(admission.state().rows_in_flight, 0);
    let (_, text) = send_to(app.clone(), "GET", "/metrics", "").await;
    assert!(
        text.contains("ttc_refusals_total{ttc_refusal_reason=\"no_room\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("ttc_memory_budget_limit_bytes {budget}\n")),
        "{text}"
    );
    assert!(
        text.contains("ttc_refusals_total{ttc_refusal_reason=\"too_large\"} 1\n"),
        "{text}"
    );
}

/// Under load test-time compute sheds depth before anything is refused: a vote of up to 8
/// samples on a pod with room for 2 rows draws at most 2 and says so.
#[tokio::test]
async fn ttc_sheds_depth_to_the_rows_the_pod_has_room_for() {
    let policy: TtcPolicy = ttc_policy(
        &serde_json::from_value(json!({
            "strategy": "MajorityVote", "minSamples": 1, "maxSamples": 8, "difficultyAware": false
        }))
        .unwrap(),
    );
    let service = Arc::new(TtcService::new(policy).unwrap());
    let (app, admission) = app_with_admission(admission_config(256 << 20, 2), Some(service));
    let v = chat_to(&app, &chat(json!({ "max_tokens": 8, "temperature": 0.8 }))).await;
    let ttc = &v["ttc"];
    assert!(ttc["samples"].as_u64().unwrap() <= 2, "{ttc}");
    assert_eq!(ttc["maxSamples"], 2, "{ttc}");
    assert_eq!(ttc["shedSamples"], 6, "{ttc}");
    assert_eq!(admission.state().rows_in_flight, 0);
    let (_, text) = send_to(app.clone(), "GET", "/metrics", "").await;
    assert!(text.contains("ttc_depth_shed_total"), "{text}");
}

/// A request past its deadline (the client's X-Request-Timeout) gets 504 and its rows leave
/// the batch: the room they held comes back.
#[tokio::test]
async fn a_request_past_its_deadline_is_cancelled_with_504() {
    let (app, admission) = app_with_admission(admission_config(256 << 20, 64), None);
    let long = chat(json!({ "n": 4, "max_tokens": 400, "temperature": 0.8, "seed": 3 }));
    let (status, _, error) = post_with(&app, &long, &[("x-request-timeout", "0.05")]).await;
    assert_openai_error(status, &error, StatusCode::GATEWAY_TIMEOUT, None);
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    let started = std::time::Instant::now();
    while admission.state().rows_in_flight > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the cancelled rows still hold their room"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, _, error) = post_with(&app, &long, &[("x-request-timeout", "soon")]).await;
    assert_openai_error(
        status,
        &error,
        StatusCode::BAD_REQUEST,
        Some("x-request-timeout"),
    );
    // Counted once, as a deadline refusal; a malformed header is no refusal under load.
    let (_, text) = send_to(app.clone(), "GET", "/metrics", "").await;
    assert!(
        text.contains("ttc_refusals_total{ttc_refusal_reason=\"deadline\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("ttc_refusal_reason=\"no_room\""), "{text}");
}
