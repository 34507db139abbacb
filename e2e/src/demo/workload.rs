//! The demo's stream of questions: items with known answers, sent to the sidecars over the
//! OpenAI API the way a client behind a Service would (round robin over the pods), and what each
//! answer cost as the sidecar reports it (`usage.energy`, the `ttc` object).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use ttc_eval::tasks::{TaskFamily, TaskItem, generate};

/// Families the `chat` policy's pods are asked from: short answers the default model gets right
/// often but not always. Its errors are systematic, so a vote over more samples wins little.
pub const FAMILIES: [TaskFamily; 5] = [
    TaskFamily::SingleDigitAddition,
    TaskFamily::TwoDigitAdditionNoCarry,
    TaskFamily::LargerOfTwo,
    TaskFamily::YesNoFacts,
    TaskFamily::MultipleChoice,
];

/// Families the `checked` policy's pods are asked from: answers a tool can check from the
/// question alone, so best-of-N with the checking tool as verifier turns depth into accuracy.
pub const CHECKED_FAMILIES: [TaskFamily; 2] =
    [TaskFamily::SingleDigitAddition, TaskFamily::LargerOfTwo];

/// `count` questions of `families`, the families taking turns; the same for a seed.
pub fn questions(families: &[TaskFamily], count: usize, seed: u64) -> Vec<TaskItem> {
    let per_family = count.div_ceil(families.len());
    let drawn: Vec<Vec<TaskItem>> = families
        .iter()
        .map(|family| generate(*family, per_family, seed))
        .collect();
    (0..per_family)
        .flat_map(|i| drawn.iter().map(move |items| items[i].clone()))
        .take(count)
        .collect()
}

/// A sidecar the demo can ask: its pod and its API's base URL.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The pod's name.
    pub pod: String,
    /// `http://<pod IP>:<port>`.
    pub url: String,
}

/// One answered question.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    /// The policy whose pod answered.
    pub policy: String,
    /// Which phase of the demo (0-based).
    pub phase: usize,
    /// The policy's joules-per-request budget during the phase.
    pub budget_joules_per_request: f64,
    /// The item's id (`family/index`).
    pub item: String,
    /// The pod that answered.
    pub pod: String,
    /// Whether the returned answer is right.
    pub correct: bool,
    /// Joules the sidecar attributes to the request.
    pub joules: f64,
    /// Where those joules come from (`nvml`, `rapl`, `estimate`).
    pub energy_source: String,
    /// Whether they were measured (false: estimated).
    pub measured: bool,
    /// Samples drawn (the TTC depth).
    pub samples: usize,
    /// Seconds from the start of the stream until the answer came.
    pub at_seconds: f64,
    /// Seconds the request took.
    pub latency_seconds: f64,
}

/// What one answer says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The returned message.
    pub content: String,
    /// Joules of the request.
    pub joules: f64,
    /// Energy source label.
    pub energy_source: String,
    /// Whether measured.
    pub measured: bool,
    /// Samples drawn.
    pub samples: usize,
}

/// Reads an OpenAI chat completion with the sidecar's `usage.energy` and `ttc` extensions.
pub fn parse_answer(body: &Value) -> anyhow::Result<Answer> {
    let content = body
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .context("the answer has no choices[0].message.content")?
        .to_string();
    let energy = body
        .pointer("/usage/energy")
        .context("the answer has no usage.energy")?;
    Ok(Answer {
        content,
        joules: energy
            .get("joules")
            .and_then(Value::as_f64)
            .context("usage.energy.joules is missing")?,
        energy_source: energy
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        measured: energy
            .get("measured")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        samples: body
            .pointer("/ttc/samples")
            .and_then(Value::as_u64)
            .map_or(1, |n| n as usize),
    })
}

/// The model `endpoint` serves (the first of `/v1/models`): the file's name when the policy
/// names a path.
pub async fn served_model(http: &reqwest::Client, endpoint: &Endpoint) -> anyhow::Result<String> {
    let models: Value = http
        .get(format!("{}/v1/models", endpoint.url))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("listing the models of {}", endpoint.pod))?
        .json()
        .await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} lists no model: {models}", endpoint.pod))
}

/// Asks `endpoint` one question.
pub async fn ask(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    model: &str,
    item: &TaskItem,
) -> anyhow::Result<Answer> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": item.prompt}],
        "max_tokens": 32,
        "temperature": 0.7,
        "ttc": {"answerType": item.answer_type},
    });
    let response = http
        .post(format!("{}/v1/chat/completions", endpoint.url))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("asking {} ({})", endpoint.pod, endpoint.url))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("{} answered {status}: {text}", endpoint.pod);
    }
    parse_answer(&serde_json::from_str(&text)?)
        .with_context(|| format!("reading the answer of {}", endpoint.pod))
}

/// One phase of the stream: its questions, sent with `concurrency` requests in flight.
pub struct Phase<'a> {
    /// The policy whose pods are asked.
    pub policy: &'a str,
    /// Phase number.
    pub index: usize,
    /// The budget in force.
    pub budget_joules_per_request: f64,
    /// The questions.
    pub items: &'a [TaskItem],
}

/// Sends a phase's questions round robin over `endpoints`; `progress` sees every record as it
/// comes. Stops at the first failed request.
pub async fn drive(
    http: &reqwest::Client,
    endpoints: &[Endpoint],
    model: &str,
    phase: Phase<'_>,
    concurrency: usize,
    started: Instant,
    progress: &(dyn Fn(&Record) + Sync),
) -> anyhow::Result<Vec<Record>> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers = (0..concurrency.max(1)).map(|_| {
        let next = next.clone();
        let phase = &phase;
        async move {
            let mut records = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = phase.items.get(i) else {
                    return anyhow::Ok(records);
                };
                let endpoint = &endpoints[i % endpoints.len()];
                let sent = Instant::now();
                let answer = ask(http, endpoint, model, item).await?;
                let record = Record {
                    policy: phase.policy.to_string(),
                    phase: phase.index,
                    budget_joules_per_request: phase.budget_joules_per_request,
                    item: item.id.clone(),
                    pod: endpoint.pod.clone(),
                    correct: item.is_correct(&answer.content),
                    joules: answer.joules,
                    energy_source: answer.energy_source,
                    measured: answer.measured,
                    samples: answer.samples,
                    at_seconds: started.elapsed().as_secs_f64(),
                    latency_seconds: sent.elapsed().as_secs_f64(),
                };
                progress(&record);
                records.push(record);
            }
        }
    });
    let mut records: Vec<Record> = futures::future::try_join_all(workers)
        .await?
        .into_iter()
        .flatten()
        .collect();
    records.sort_by(|a, b| a.at_seconds.total_cmp(&b.at_seconds));
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_take_turns_and_repeat_for_a_seed() {
        let a = questions(&FAMILIES, 12, 7);
        assert_eq!(a.len(), 12);
        assert_eq!(a, questions(&FAMILIES, 12, 7));
        for (i, item) in a.iter().take(FAMILIES.len()).enumerate() {
            assert_eq!(item.family, FAMILIES[i]);
        }
        assert_ne!(a, questions(&FAMILIES, 12, 8));
        assert!(
            questions(&CHECKED_FAMILIES, 6, 7)
                .iter()
                .all(|q| q.family.is_tool_checkable())
        );
    }

    #[test]
    fn parses_energy_and_depth_and_rejects_answers_without_energy() {
        let body = json!({
            "choices": [{"message": {"role": "assistant", "content": "7"}}],
            "usage": {"energy": {"joules": 3.5, "source": "estimate", "measured": false}},
            "ttc": {"samples": 4}
        });
        let answer = parse_answer(&body).unwrap();
        assert_eq!(answer.content, "7");
        assert_eq!(answer.joules, 3.5);
        assert_eq!(answer.energy_source, "estimate");
        assert!(!answer.measured);
        assert_eq!(answer.samples, 4);
        let err = parse_answer(&json!({"choices": [{"message": {"content": "7"}}]})).unwrap_err();
        assert!(err.to_string().contains("usage.energy"), "{err}");
    }
}
