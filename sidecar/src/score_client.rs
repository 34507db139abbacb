//! The HTTP client of `ttc.verifier.http`: posts `{"prompt", "answer"}` to the user's scoring
//! endpoint and reads `{"score": <number>}` back, for the TTC core's verifiers.

use serde::{Deserialize, Serialize};
use ttc_core::{HttpEndpoint, ScoreFuture, ScoreTransport};

/// Calls scoring endpoints over HTTP(S), one connection pool for all of them.
#[derive(Debug, Clone)]
pub struct HttpScoreClient {
    client: reqwest::Client,
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

impl HttpScoreClient {
    /// A client; fails only when no TLS backend can be set up.
    pub fn new() -> Result<Self, reqwest::Error> {
        Ok(Self {
            client: reqwest::Client::builder().build()?,
        })
    }

    async fn call(
        &self,
        endpoint: &HttpEndpoint,
        prompt: &str,
        answer: &str,
    ) -> Result<f64, String> {
        let timed_out = || {
            format!(
                "verifier timed out after {} ms",
                endpoint.timeout.as_millis()
            )
        };
        let sent = self
            .client
            .post(&endpoint.url)
            .timeout(endpoint.timeout)
            .json(&ScoreRequest { prompt, answer })
            .send();
        // reqwest's own timeout covers the body too; this outer one also bounds DNS and connect
        // stalls on every platform.
        let response = match tokio::time::timeout(endpoint.timeout, sent).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if e.is_timeout() => return Err(timed_out()),
            Ok(Err(e)) => return Err(format!("verifier request failed: {e}")),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            return Err(format!("verifier answered HTTP {status}"));
        }
        match tokio::time::timeout(endpoint.timeout, response.json::<ScoreResponse>()).await {
            Err(_) => Err(timed_out()),
            Ok(Err(e)) => Err(format!(
                "verifier answer is not {{\"score\": <number>}}: {e}"
            )),
            Ok(Ok(body)) => Ok(body.score),
        }
    }
}

impl ScoreTransport for HttpScoreClient {
    fn score<'a>(
        &'a self,
        endpoint: &'a HttpEndpoint,
        prompt: &'a str,
        answer: &'a str,
    ) -> ScoreFuture<'a> {
        Box::pin(self.call(endpoint, prompt, answer))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use axum::{Json, Router, http::StatusCode, routing::post};
    use ttc_core::{Verdict, Verifier, VerifierSpec};

    fn verifier(url: String, timeout_ms: u64) -> Verifier {
        let spec = VerifierSpec::Http(HttpEndpoint {
            url,
            timeout: Duration::from_millis(timeout_ms),
            accept_score: 0.5,
        });
        let client = HttpScoreClient::new().expect("an HTTP client");
        Verifier::from_spec(&spec, Some(Arc::new(client))).expect("an HTTP verifier")
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

        let v = verifier(format!("{base}/score"), 1000);
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

        let slow = verifier(format!("{base}/slow"), 50);
        let started = std::time::Instant::now();
        let r = slow.verify("q", "42").await;
        assert!(!r.accepted);
        assert!(
            r.reason.as_deref().unwrap_or("").contains("timed out"),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));

        let broken = verifier(format!("{base}/broken"), 1000);
        let r = broken.verify("q", "42").await;
        assert!(r.reason.as_deref().unwrap_or("").contains("500"), "{r:?}");

        let garbage = verifier(format!("{base}/garbage"), 1000);
        let r = garbage.verify("q", "42").await;
        assert!(!r.accepted);
        assert!(r.reason.as_deref().unwrap_or("").contains("score"), "{r:?}");

        // Nothing listens on port 9 of localhost (discard, never served in CI).
        let gone = verifier("http://127.0.0.1:9/score".into(), 500);
        let r = gone.verify("q", "42").await;
        assert!(!r.accepted);
        assert!(r.reason.is_some());
        Ok(())
    }
}
