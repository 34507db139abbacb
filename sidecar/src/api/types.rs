//! OpenAI-compatible request and response bodies.

use serde::{Deserialize, Serialize};

use crate::chat_template::ChatMessage;
use crate::engine::FinishReason;

/// `stop` may be one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which the text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A message as clients send it.
#[derive(Debug, Clone, Deserialize)]
pub struct InputMessage {
    pub role: String,
    pub content: MessageContent,
}

impl InputMessage {
    /// The message as the chat template sees it; `None` if it has non-text parts.
    pub fn to_chat(&self) -> Option<ChatMessage> {
        let content = match &self.content {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => return None,
                    }
                }
                text
            }
        };
        Some(ChatMessage {
            role: self.role.clone(),
            content,
        })
    }
}

/// Options the OpenAI API has for streams.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub n: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    /// OpenAI's reasoning effort (`low`, `medium`, `high`): under test-time compute, the depth
    /// within the policy's range.
    pub reasoning_effort: Option<String>,
    /// vLLM's cap on reasoning tokens; under test-time compute, of a reasoning-budget plan.
    pub thinking_token_budget: Option<i64>,
    /// llama.cpp's cap on reasoning tokens (-1: none), as `thinking_token_budget`.
    pub reasoning_budget: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; common in compatible servers.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Not in OpenAI's API: how test-time compute treats this request.
    #[serde(default)]
    pub ttc: TtcRequestOptions,
}

/// Per-request test-time-compute options (the `ttc` field of a request body).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TtcRequestOptions {
    /// How answers are extracted and compared for the vote (default: short text).
    pub answer_type: Option<ttc_core::AnswerType>,
    /// `false` opts this request out of test-time compute (one plain sample).
    pub enabled: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<InputMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt` may be a string or a list holding one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Token counts and, as an extension of the OpenAI format, the request's energy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<EnergyUsage>,
}

/// A request's energy: `measured` is false when `source` is `estimate`, so no client mistakes a
/// modelled figure for a measurement.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnergyUsage {
    pub joules: f64,
    pub source: ttc_energy::EnergySource,
    pub measured: bool,
}

/// An assistant message in a response.
#[derive(Debug, Clone, Serialize)]
pub struct OutputMessage {
    pub role: &'static str,
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: OutputMessage,
    pub finish_reason: FinishReason,
    pub logprobs: Option<()>,
}

/// A chat completion response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// Not in OpenAI's API: what test-time compute did, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttc: Option<super::ttc_object::TtcObject>,
}

/// One choice of a text completion.
#[derive(Debug, Clone, Serialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: FinishReason,
    pub logprobs: Option<()>,
}

/// A text completion response.
#[derive(Debug, Clone, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    pub usage: Usage,
    /// Not in OpenAI's API: what test-time compute did, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttc: Option<super::ttc_object::TtcObject>,
}

/// `GET /v1/models` entry.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// `POST /v1/ttc/feedback`: a client's verdict on an answer chosen by test-time compute.
/// Exactly one of `correct` and `expected`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The response's `ttc.feedbackTicket`, unchanged.
    pub ticket: String,
    /// Whether the answer was right.
    #[serde(default)]
    pub correct: Option<bool>,
    /// The expected answer (normalised like the samples' answers).
    #[serde(default)]
    pub expected: Option<String>,
}
