//! A checking tool behind the HTTP verifier protocol (`POST {"prompt", "answer"}` →
//! `{"score"}`), for the task families a tool can check: addition, which of two numbers is larger,
//! and letter counting.
//!
//! It is what a platform team would put behind `ttc.verifier.http` for tool-checkable answers (a
//! calculator, a unit-test runner, a type checker): it reads the question, computes what it asks
//! and scores the candidate 1 when the candidate's final number is that value, else 0. It is never
//! given the answer key, but on these families recomputing the question is as strong as knowing
//! it, so best-of-N with this tool is the ceiling of what a verifier can buy (pass@k), reached
//! by sampling only until the first accepted candidate.
//!
//! A question it cannot read gets HTTP 422 with the reason; the sidecar's verifier turns that into
//! a rejection, so the request still completes (unverified).

use std::net::SocketAddr;
use std::sync::LazyLock;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use regex::Regex;
use serde::Deserialize;
use serde_json::json;

use ttc_core::{AnswerType, extract_answer};

/// Why a question could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the checking tool cannot read this question: {0}")]
pub struct Unreadable(String);

/// The value the question asks for, computed from the question alone.
pub fn expected_value(question: &str) -> Result<u64, Unreadable> {
    static ADDITION: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"What is (\d+) \+ (\d+)\?").expect("static regex"));
    static LARGER: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"Which number is larger, (\d+) or (\d+)\?").expect("static regex")
    });
    static COUNT: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"the letter '(.)' appear in the word '([^']+)'").expect("static regex")
    });
    let number = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| Unreadable(format!("{s:?} is not a number: {e}")))
    };
    if let Some(c) = ADDITION.captures(question) {
        return number(&c[1])?
            .checked_add(number(&c[2])?)
            .ok_or_else(|| Unreadable("the sum overflows".into()));
    }
    if let Some(c) = LARGER.captures(question) {
        return Ok(number(&c[1])?.max(number(&c[2])?));
    }
    if let Some(c) = COUNT.captures(question) {
        let letter = c[1].chars().next().unwrap_or_default();
        return Ok(c[2].chars().filter(|ch| *ch == letter).count() as u64);
    }
    Err(Unreadable(
        "expected \"What is A + B?\", \"Which number is larger, A or B?\" or \"How many times does the letter 'L' appear in the word 'W'?\"".into(),
    ))
}

/// The candidate's score: 1 when its final number is what the question asks for, else 0.
pub fn score(question: &str, answer: &str) -> Result<f64, Unreadable> {
    let expected = expected_value(question)?.to_string();
    let given = extract_answer(answer, AnswerType::Number);
    Ok(if given.as_deref() == Some(expected.as_str()) {
        1.0
    } else {
        0.0
    })
}

#[derive(Deserialize)]
struct ScoreRequest {
    prompt: String,
    answer: String,
}

async fn score_handler(
    body: Result<Json<ScoreRequest>, axum::extract::rejection::JsonRejection>,
) -> (StatusCode, Json<serde_json::Value>) {
    let Json(request) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": rejection.body_text() })),
            );
        }
    };
    match score(&request.prompt, &request.answer) {
        Ok(score) => (StatusCode::OK, Json(json!({ "score": score }))),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": e.to_string() })),
        ),
    }
}

/// The checking tool served on a local port; stops when dropped.
pub struct CheckerServer {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl CheckerServer {
    /// Serves the tool on 127.0.0.1 on a free port (call inside a tokio runtime).
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves the tool on `addr` (port 0: a free one), e.g. an address pods can reach.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let address = listener.local_addr()?;
        let app = axum::Router::new().route("/score", post(score_handler));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { address, task })
    }

    /// The URL to put in `ttc.verifier.http.url`.
    pub fn url(&self) -> String {
        format!("http://{}/score", self.address)
    }
}

impl Drop for CheckerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{TaskFamily, generate};
    use std::sync::Arc;
    use std::time::Duration;

    use ttc_core::{HttpEndpoint, Verifier, VerifierSpec};
    use ttc_sidecar::score_client::HttpScoreClient;

    #[test]
    fn recomputes_every_tool_checkable_family_without_the_key() {
        for family in TaskFamily::ALL
            .into_iter()
            .filter(|f| f.is_tool_checkable())
        {
            for item in generate(family, 30, 11) {
                assert_eq!(
                    expected_value(&item.prompt).map(|v| v.to_string()),
                    Ok(item.expected.clone()),
                    "{}",
                    item.prompt
                );
                assert_eq!(score(&item.prompt, &item.expected), Ok(1.0));
                let wrong = item.expected.parse::<u64>().unwrap() + 1;
                assert_eq!(score(&item.prompt, &format!("It is {wrong}.")), Ok(0.0));
                assert_eq!(score(&item.prompt, "I do not know."), Ok(0.0));
            }
        }
    }

    #[test]
    fn other_questions_are_unreadable() {
        for family in [TaskFamily::YesNoFacts, TaskFamily::StructuredOutput] {
            let item = &generate(family, 1, 3)[0];
            assert!(expected_value(&item.prompt).is_err(), "{}", item.prompt);
        }
    }

    #[tokio::test]
    async fn serves_the_http_verifier_protocol() {
        let server = CheckerServer::start().await.unwrap();
        let spec = VerifierSpec::Http(HttpEndpoint {
            url: server.url(),
            timeout: Duration::from_secs(2),
            accept_score: 0.5,
        });
        let client: Arc<HttpScoreClient> = Arc::new(HttpScoreClient::new().unwrap());
        let verifier = Verifier::from_spec(&spec, Some(client)).unwrap();
        let question = "What is 7 + 8? Answer with the number only.";
        assert!(verifier.verify(question, "15").await.accepted);
        let wrong = verifier.verify(question, "The answer is 16.").await;
        assert!(!wrong.accepted);
        assert_eq!(wrong.score, Some(0.0));
        // A question the tool cannot read is a rejection with the HTTP status, not a failure.
        let unreadable = verifier.verify("Is snow white?", "yes").await;
        assert!(!unreadable.accepted);
        assert!(unreadable.reason.unwrap().contains("422"));
        // Malformed bodies get a 4xx.
        let response = reqwest::Client::new()
            .post(server.url())
            .body("{not json")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
    }
}
