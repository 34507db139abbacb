//! Verifiers: check a candidate answer against a JSON schema, a regular expression or the user's
//! HTTP scoring endpoint.
//!
//! A verifier never fails a request: anything that goes wrong while checking one candidate
//! (invalid JSON, a timeout, an endpoint answering 500) is a rejection of that candidate with the
//! reason, so best-of-N simply moves on to the next sample. Only building a verifier from an
//! invalid spec is an error, and that is the policy author's to fix.
//!
//! The HTTP call itself is the sidecar's: a [`ScoreTransport`] carries it, so this crate has no
//! HTTP client.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::answer::parse_first_json;

/// How candidate answers are checked: the InferencePolicy's `ttc.verifier`, one of its three
/// kinds (serialised as the CRD writes it: `{"jsonSchema": ...}`, `{"regex": ...}`,
/// `{"http": {...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VerifierSpec {
    /// A JSON Schema (as JSON text) the answer's first JSON object or array must satisfy.
    JsonSchema(String),
    /// A regular expression the answer must match.
    Regex(String),
    /// The user's endpoint that scores answers.
    Http(HttpEndpoint),
}

/// The user's scoring endpoint: it takes `{"prompt", "answer"}` and answers `{"score": <number>}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpEndpoint {
    /// URL to POST to (`http://` or `https://`).
    pub url: String,
    /// Timeout of one call.
    pub timeout: Duration,
    /// Score at or above which a candidate is accepted.
    pub accept_score: f64,
}

/// A future the transport returns.
pub type ScoreFuture<'a> = Pin<Box<dyn Future<Output = Result<f64, String>> + Send + 'a>>;

/// Carries one scoring call to an [`HttpEndpoint`]: the endpoint's score, or why there is none
/// (timeout, refused connection, an HTTP error status, an answer without a finite `score`). The
/// sidecar implements it with its HTTP client; tests with a closure.
pub trait ScoreTransport: Send + Sync + fmt::Debug {
    /// Scores `answer` to `prompt` at `endpoint`, within `endpoint.timeout`.
    fn score<'a>(
        &'a self,
        endpoint: &'a HttpEndpoint,
        prompt: &'a str,
        answer: &'a str,
    ) -> ScoreFuture<'a>;
}

/// Why a verifier could not be built from its spec.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// jsonSchema is not JSON.
    #[error("ttc.verifier.jsonSchema is not valid JSON: {0}")]
    SchemaNotJson(#[source] serde_json::Error),
    /// jsonSchema is JSON but not a usable schema.
    #[error("ttc.verifier.jsonSchema is not a valid JSON Schema: {0}")]
    InvalidSchema(String),
    /// regex does not compile.
    #[error("ttc.verifier.regex does not compile: {0}")]
    InvalidRegex(#[source] regex::Error),
    /// An HTTP verifier where nothing can carry its calls.
    #[error("ttc.verifier.http is not available here: no HTTP transport")]
    NoTransport,
}

/// A verifier's judgement of one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// Whether the candidate passed.
    pub accepted: bool,
    /// The endpoint's score (HTTP verifiers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Why it was rejected (absent when accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Verdict {
    /// An acceptance, with the endpoint's score if any.
    pub fn accept(score: Option<f64>) -> Self {
        Self {
            accepted: true,
            score,
            reason: None,
        }
    }

    /// A rejection with its reason.
    pub fn reject(reason: impl Into<String>, score: Option<f64>) -> Self {
        Self {
            accepted: false,
            score,
            reason: Some(reason.into()),
        }
    }
}

/// A verifier built from its spec, ready to check candidates.
#[derive(Debug)]
pub enum Verifier {
    /// The completion's first JSON value must satisfy the schema.
    JsonSchema(Box<jsonschema::Validator>),
    /// The completion must match the expression.
    Regex(Regex),
    /// The user's endpoint scores the completion.
    Http(HttpEndpoint, Arc<dyn ScoreTransport>),
}

impl Verifier {
    /// Builds the verifier `spec` describes; HTTP verifiers call through `transport`.
    pub fn from_spec(
        spec: &VerifierSpec,
        transport: Option<Arc<dyn ScoreTransport>>,
    ) -> Result<Self, VerifierError> {
        match spec {
            VerifierSpec::JsonSchema(schema) => {
                let schema: serde_json::Value =
                    serde_json::from_str(schema).map_err(VerifierError::SchemaNotJson)?;
                let validator = jsonschema::validator_for(&schema)
                    .map_err(|e| VerifierError::InvalidSchema(e.to_string()))?;
                Ok(Self::JsonSchema(Box::new(validator)))
            }
            VerifierSpec::Regex(expression) => Ok(Self::Regex(
                Regex::new(expression).map_err(VerifierError::InvalidRegex)?,
            )),
            VerifierSpec::Http(endpoint) => {
                let transport = transport.ok_or(VerifierError::NoTransport)?;
                Ok(Self::Http(endpoint.clone(), transport))
            }
        }
    }

    /// Checks a window of candidates at once (HTTP calls run concurrently); verdicts in order.
    pub async fn verify_all(&self, prompt: &str, answers: &[&str]) -> Vec<Verdict> {
        futures::future::join_all(answers.iter().map(|answer| self.verify(prompt, answer))).await
    }

    /// A short label for metrics (`json_schema`, `regex`, `http`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "json_schema",
            Self::Regex(_) => "regex",
            Self::Http(..) => "http",
        }
    }

    /// Checks one candidate completion `answer` of `prompt` (its answer part: a `<think>`
    /// block is skipped). Never fails: problems are rejections with a reason.
    pub async fn verify(&self, prompt: &str, answer: &str) -> Verdict {
        let answer = crate::reasoning::answer_part(answer);
        match self {
            Self::JsonSchema(validator) => verify_json(validator, answer),
            Self::Regex(re) => {
                if re.is_match(answer.trim()) {
                    Verdict::accept(None)
                } else {
                    Verdict::reject(format!("does not match /{}/", re.as_str()), None)
                }
            }
            Self::Http(endpoint, transport) => {
                match transport.score(endpoint, prompt, answer).await {
                    Err(reason) => Verdict::reject(reason, None),
                    Ok(score) if !score.is_finite() => {
                        Verdict::reject("verifier score is not a finite number", None)
                    }
                    Ok(score) if score >= endpoint.accept_score => Verdict::accept(Some(score)),
                    Ok(score) => Verdict::reject(
                        format!("score {score} below {}", endpoint.accept_score),
                        Some(score),
                    ),
                }
            }
        }
    }
}

fn verify_json(validator: &jsonschema::Validator, answer: &str) -> Verdict {
    let Some(value) = parse_first_json(answer) else {
        return Verdict::reject("no JSON object or array in the answer", None);
    };
    match validator.validate(&value) {
        Ok(()) => Verdict::accept(None),
        Err(error) => Verdict::reject(format!("schema violation: {error}"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_spec(schema: &str) -> VerifierSpec {
        VerifierSpec::JsonSchema(schema.to_string())
    }

    const PERSON: &str = r#"{"type":"object","required":["name","age"],
        "properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0}}}"#;

    fn build(spec: &VerifierSpec) -> Result<Verifier, VerifierError> {
        Verifier::from_spec(spec, None)
    }

    #[tokio::test]
    async fn json_schema_accepts_valid_and_rejects_with_reason() -> Result<(), VerifierError> {
        let v = build(&schema_spec(PERSON))?;
        assert_eq!(v.kind(), "json_schema");
        let ok = v
            .verify("p", "Sure: {\"name\": \"Ada\", \"age\": 36}")
            .await;
        assert!(ok.accepted, "{ok:?}");
        let bad = v.verify("p", "{\"name\": \"Ada\", \"age\": \"old\"}").await;
        assert!(!bad.accepted);
        assert!(
            bad.reason
                .as_deref()
                .unwrap_or("")
                .contains("schema violation")
        );
        let none = v.verify("p", "Ada is 36").await;
        assert!(!none.accepted);
        assert!(none.reason.as_deref().unwrap_or("").contains("no JSON"));
        Ok(())
    }

    #[tokio::test]
    async fn regex_verifier() -> Result<(), VerifierError> {
        let v = build(&VerifierSpec::Regex(r"^-?\d+$".into()))?;
        assert!(v.verify("p", " 42\n").await.accepted);
        let r = v.verify("p", "forty-two").await;
        assert!(!r.accepted);
        assert!(r.reason.as_deref().unwrap_or("").contains("does not match"));
        Ok(())
    }

    #[test]
    fn invalid_specs_are_errors_that_name_the_field() {
        let err = |spec: VerifierSpec| match build(&spec) {
            Ok(_) => String::from("built"),
            Err(e) => e.to_string(),
        };
        assert!(err(schema_spec("{not json")).contains("jsonSchema is not valid JSON"));
        assert!(err(schema_spec(r#"{"type": 12}"#)).contains("not a valid JSON Schema"));
        assert!(err(VerifierSpec::Regex("(".into())).contains("regex does not compile"));
        let http = VerifierSpec::Http(HttpEndpoint {
            url: "http://x".into(),
            timeout: Duration::from_millis(10),
            accept_score: 0.5,
        });
        assert!(err(http).contains("no HTTP transport"));
    }

    #[tokio::test]
    async fn remote_schema_references_are_refused_not_fetched() {
        // Building happens inside the async server: a remote $ref must fail cleanly (the
        // blocking HTTP resolver is compiled out), never block or panic.
        let spec = schema_spec(r#"{"$ref": "http://127.0.0.1:9/schema.json"}"#);
        match build(&spec) {
            Ok(v) => panic!("built {v:?}"),
            Err(e) => assert!(e.to_string().contains("not a valid JSON Schema"), "{e}"),
        }
    }

    /// A transport that answers from a table: score by answer, or an error.
    #[derive(Debug)]
    struct Scripted;

    impl ScoreTransport for Scripted {
        fn score<'a>(
            &'a self,
            _: &'a HttpEndpoint,
            prompt: &'a str,
            answer: &'a str,
        ) -> ScoreFuture<'a> {
            Box::pin(async move {
                match (prompt, answer) {
                    ("q", "42") => Ok(0.9),
                    ("q", "nan") => Ok(f64::NAN),
                    ("q", "down") => Err("verifier request failed: refused".to_string()),
                    _ => Ok(0.1),
                }
            })
        }
    }

    #[tokio::test]
    async fn http_scores_are_judged_against_the_accept_score() -> Result<(), VerifierError> {
        let spec = VerifierSpec::Http(HttpEndpoint {
            url: "http://scorer".into(),
            timeout: Duration::from_millis(100),
            accept_score: 0.5,
        });
        let v = Verifier::from_spec(&spec, Some(Arc::new(Scripted)))?;
        assert_eq!(v.kind(), "http");
        assert_eq!(v.verify("q", "42").await, Verdict::accept(Some(0.9)));
        let low = v.verify("q", "41").await;
        assert_eq!((low.accepted, low.score), (false, Some(0.1)));
        let nan = v.verify("q", "nan").await;
        assert!(
            nan.reason.as_deref().unwrap_or("").contains("finite"),
            "{nan:?}"
        );
        let down = v.verify("q", "down").await;
        assert!(
            !down.accepted && down.reason.as_deref() == Some("verifier request failed: refused")
        );
        let both = v.verify_all("q", &["41", "42"]).await;
        assert_eq!(
            both.iter().map(|v| v.accepted).collect::<Vec<_>>(),
            [false, true]
        );
        Ok(())
    }
}
