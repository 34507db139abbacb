//! Verifiers: check a candidate answer against a JSON schema, a regular expression or the user's
//! HTTP scoring endpoint.
//!
//! A verifier never fails a request: anything that goes wrong while checking one candidate
//! (invalid JSON, a timeout, an endpoint answering 500) is a rejection of that candidate with the
//! reason, so best-of-N simply moves on to the next sample. Only building a verifier from an
//! invalid spec is an error, and that is the policy author's to fix.

use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::answer::parse_first_json;

/// How candidate answers are checked: the InferencePolicy's `ttc.verifier` (exactly one of
/// `jsonSchema`, `regex`, `http`).
pub use ttc_api::policy::{HttpVerifier as HttpVerifierSpec, Verifier as VerifierSpec};

/// Why a verifier could not be built from its spec.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// None or several of jsonSchema, regex and http were set.
    #[error("ttc.verifier needs exactly one of jsonSchema, regex, http (found {found})")]
    NotExactlyOne {
        /// How many were set.
        found: usize,
    },
    /// jsonSchema is not JSON.
    #[error("ttc.verifier.jsonSchema is not valid JSON: {0}")]
    SchemaNotJson(#[source] serde_json::Error),
    /// jsonSchema is JSON but not a usable schema.
    #[error("ttc.verifier.jsonSchema is not a valid JSON Schema: {0}")]
    InvalidSchema(String),
    /// regex does not compile.
    #[error("ttc.verifier.regex does not compile: {0}")]
    InvalidRegex(#[source] regex::Error),
    /// http.url is not an http(s) URL.
    #[error("ttc.verifier.http.url must be an http:// or https:// URL, got {0:?}")]
    InvalidUrl(String),
    /// http.timeoutMs is zero.
    #[error("ttc.verifier.http.timeoutMs must be at least 1")]
    ZeroTimeout,
    /// The HTTP client could not be built.
    #[error("could not build the HTTP verifier client: {0}")]
    Client(#[source] reqwest::Error),
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
    Http(HttpScorer),
}

/// A client of the user's HTTP scoring endpoint.
#[derive(Debug)]
pub struct HttpScorer {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
    accept_score: f64,
}

#[derive(Serialize)]
struct ScoreRequest<'a> {
    prompt: &'a str,
    answer: &'a str,
}

#[derive(Deserialize)]
struct ScoreResponse {
    score: f64,
}

impl Verifier {
    /// Builds the verifier `spec` describes.
    pub fn from_spec(spec: &VerifierSpec) -> Result<Self, VerifierError> {
        let found = usize::from(spec.json_schema.is_some())
            + usize::from(spec.regex.is_some())
            + usize::from(spec.http.is_some());
        if found != 1 {
            return Err(VerifierError::NotExactlyOne { found });
        }
        if let Some(schema) = &spec.json_schema {
            let schema: serde_json::Value =
                serde_json::from_str(schema).map_err(VerifierError::SchemaNotJson)?;
            let validator = jsonschema::validator_for(&schema)
                .map_err(|e| VerifierError::InvalidSchema(e.to_string()))?;
            return Ok(Self::JsonSchema(Box::new(validator)));
        }
        if let Some(expression) = &spec.regex {
            return Ok(Self::Regex(
                Regex::new(expression).map_err(VerifierError::InvalidRegex)?,
            ));
        }
        let Some(http) = &spec.http else {
            return Err(VerifierError::NotExactlyOne { found: 0 });
        };
        if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
            return Err(VerifierError::InvalidUrl(http.url.clone()));
        }
        if http.timeout_ms == 0 {
            return Err(VerifierError::ZeroTimeout);
        }
        let timeout = Duration::from_millis(u64::from(http.timeout_ms));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(VerifierError::Client)?;
        Ok(Self::Http(HttpScorer {
            client,
            url: http.url.clone(),
            timeout,
            accept_score: http.accept_score,
        }))
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
            Self::Http(_) => "http",
        }
    }

    /// Checks one candidate completion `answer` of `prompt` (its answer part: a `<think>`
    /// block is skipped). Never fails: problems are rejections with a reason.
    pub async fn verify(&self, prompt: &str, answer: &str) -> Verdict {
        let answer = super::reasoning::answer_part(answer);
        match self {
            Self::JsonSchema(validator) => verify_json(validator, answer),
            Self::Regex(re) => {
                if re.is_match(answer.trim()) {
                    Verdict::accept(None)
                } else {
                    Verdict::reject(format!("does not match /{}/", re.as_str()), None)
                }
            }
            Self::Http(scorer) => scorer.score(prompt, answer).await,
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

impl HttpScorer {
    async fn score(&self, prompt: &str, answer: &str) -> Verdict {
        let sent = self
            .client
            .post(&self.url)
            .json(&ScoreRequest { prompt, answer })
            .send();
        // reqwest's own timeout covers the body too; this outer one also bounds DNS and connect
        // stalls on every platform.
        let response = match tokio::time::timeout(self.timeout, sent).await {
            Err(_) => return Verdict::reject(self.timed_out(), None),
            Ok(Err(e)) if e.is_timeout() => return Verdict::reject(self.timed_out(), None),
            Ok(Err(e)) => return Verdict::reject(format!("verifier request failed: {e}"), None),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            return Verdict::reject(format!("verifier answered HTTP {status}"), None);
        }
        let body = match tokio::time::timeout(self.timeout, response.json::<ScoreResponse>()).await
        {
            Err(_) => return Verdict::reject(self.timed_out(), None),
            Ok(Err(e)) => {
                return Verdict::reject(
                    format!("verifier answer is not {{\"score\": <number>}}: {e}"),
                    None,
                );
            }
            Ok(Ok(body)) => body,
        };
        if !body.score.is_finite() {
            return Verdict::reject("verifier score is not a finite number", None);
        }
        if body.score >= self.accept_score {
            Verdict::accept(Some(body.score))
        } else {
            Verdict::reject(
                format!("score {} below {}", body.score, self.accept_score),
                Some(body.score),
            )
        }
    }

    fn timed_out(&self) -> String {
        format!("verifier timed out after {} ms", self.timeout.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{Json, Router, http::StatusCode, routing::post};

    fn schema_spec(schema: &str) -> VerifierSpec {
        VerifierSpec {
            json_schema: Some(schema.to_string()),
            ..Default::default()
        }
    }

    fn http_spec(url: String, timeout_ms: u32) -> VerifierSpec {
        VerifierSpec {
            http: Some(HttpVerifierSpec {
                url,
                timeout_ms,
                accept_score: 0.5,
            }),
            ..Default::default()
        }
    }

    const PERSON: &str = r#"{"type":"object","required":["name","age"],
        "properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0}}}"#;

    #[tokio::test]
    async fn json_schema_accepts_valid_and_rejects_with_reason() -> Result<(), VerifierError> {
        let v = Verifier::from_spec(&schema_spec(PERSON))?;
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
        let v = Verifier::from_spec(&VerifierSpec {
            regex: Some(r"^-?\d+$".into()),
            ..Default::default()
        })?;
        assert!(v.verify("p", " 42\n").await.accepted);
        let r = v.verify("p", "forty-two").await;
        assert!(!r.accepted);
        assert!(r.reason.as_deref().unwrap_or("").contains("does not match"));
        Ok(())
    }

    #[test]
    fn invalid_specs_are_errors_that_name_the_field() {
        let err = |spec: VerifierSpec| match Verifier::from_spec(&spec) {
            Ok(_) => String::from("built"),
            Err(e) => e.to_string(),
        };
        assert!(err(VerifierSpec::default()).contains("exactly one"));
        assert!(
            err(VerifierSpec {
                regex: Some("x".into()),
                json_schema: Some("{}".into()),
                ..Default::default()
            })
            .contains("found 2")
        );
        assert!(err(schema_spec("{not json")).contains("jsonSchema is not valid JSON"));
        assert!(err(schema_spec(r#"{"type": 12}"#)).contains("not a valid JSON Schema"));
        assert!(
            err(VerifierSpec {
                regex: Some("(".into()),
                ..Default::default()
            })
            .contains("regex does not compile")
        );
        assert!(err(http_spec("ftp://x".into(), 10)).contains("http.url"));
        assert!(err(http_spec("http://x".into(), 0)).contains("timeoutMs"));
    }

    #[tokio::test]
    async fn remote_schema_references_are_refused_not_fetched() {
        // Building happens inside the async server: a remote $ref must fail cleanly (the
        // blocking HTTP resolver is compiled out), never block or panic.
        let spec = schema_spec(r#"{"$ref": "http://127.0.0.1:9/schema.json"}"#);
        match Verifier::from_spec(&spec) {
            Ok(v) => panic!("built {v:?}"),
            Err(e) => assert!(e.to_string().contains("not a valid JSON Schema"), "{e}"),
        }
    }

    async fn serve(router: Router) -> Result<String, std::io::Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(format!("http://{addr}"))
    }

    #[tokio::test]
    async fn http_scores_accept_reject_and_failures_are_rejections()
    -> Result<(), Box<dyn std::error::Error>> {
        let router = Router::new()
            .route(
                "/score",
                post(|Json(body): Json<serde_json::Value>| async move {
                    let right = body["answer"] == "42" && body["prompt"] == "q";
                    Json(serde_json::json!({ "score": if right { 0.9 } else { 0.1 } }))
                }),
            )
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_millis(2000)).await;
                    Json(serde_json::json!({ "score": 1.0 }))
                }),
            )
            .route(
                "/broken",
                post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .route("/garbage", post(|| async { "not json" }));
        let base = serve(router).await?;

        let v = Verifier::from_spec(&http_spec(format!("{base}/score"), 1000))?;
        let good = v.verify("q", "42").await;
        assert_eq!(good, Verdict::accept(Some(0.9)));
        let low = v.verify("q", "41").await;
        assert!(!low.accepted);
        assert_eq!(low.score, Some(0.1));

        let both = v.verify_all("q", &["41", "42"]).await;
        assert_eq!(
            both.iter().map(|v| v.accepted).collect::<Vec<_>>(),
            [false, true]
        );

        let slow = Verifier::from_spec(&http_spec(format!("{base}/slow"), 50))?;
        let started = std::time::Instant::now();
        let r = slow.verify("q", "42").await;
        assert!(!r.accepted);
        assert!(
            r.reason.as_deref().unwrap_or("").contains("timed out"),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));

        let broken = Verifier::from_spec(&http_spec(format!("{base}/broken"), 1000))?;
        let r = broken.verify("q", "42").await;
        assert!(r.reason.as_deref().unwrap_or("").contains("500"), "{r:?}");

        let garbage = Verifier::from_spec(&http_spec(format!("{base}/garbage"), 1000))?;
        let r = garbage.verify("q", "42").await;
        assert!(!r.accepted);
        assert!(r.reason.as_deref().unwrap_or("").contains("score"), "{r:?}");

        // Nothing listens on port 9 of localhost (discard, never served in CI).
        let gone = Verifier::from_spec(&http_spec("http://127.0.0.1:9/score".into(), 500))?;
        let r = gone.verify("q", "42").await;
        assert!(!r.accepted);
        assert!(r.reason.is_some());
        Ok(())
    }
}
