//! `ttc-load`: a load generator for OpenAI-compatible servers: the sidecar, or a peer such as
//! llama.cpp's `llama-server`, driven the same way so that their figures compare.
//!
//! `clients` loops send requests back to back for `seconds` (a closed loop: the server sets the
//! pace, so this finds its capacity), or with `--rate` requests arrive at that many per second
//! whatever the server does (an open loop: a load below capacity, latency measured from each
//! request's arrival). The steady mix rotates chat (one sample), chat with several samples, a
//! text completion and a streamed chat; the vote workload asks for `samples` samples of one
//! prompt, as `n` or as that many parallel requests (for servers without `n`). Every `interval`
//! it prints the window's requests, errors, p50/p99 latency and the server's RSS (with `--pid`);
//! at the end the totals, the RSS slope, and one `RESULT {json}` line. Errors are counted by
//! HTTP status, or by what failed in transport (`transport: connection closed`, ...). Where the
//! server's `/metrics` has the sidecar's energy figures, each window also shows the joules per
//! metered request and, under a budget, the budget controller's mean over the requests it
//! governs (those under test-time compute) against its allocation: the budget held over time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Chat n=1, chat with `samples` samples, a text completion, a streamed chat, in turn.
    Steady,
    /// `samples` samples of one prompt per request.
    Vote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Samples {
    /// One request with `n`.
    N,
    /// That many parallel requests of one sample.
    Parallel,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ttc-load",
    about = "Drives an OpenAI-compatible server and prints its figures"
)]
struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent client loops (closed loop).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests per second arriving at even intervals, however many are in flight (open loop);
    /// replaces the client loops.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Seconds per printed window.
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    #[arg(long, value_enum, default_value_t = Workload::Steady)]
    workload: Workload,
    /// Samples of the multi-sample requests.
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// How several samples are asked for.
    #[arg(long, value_enum, default_value_t = Samples::N)]
    samples_as: Samples,
    /// Tokens per answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// The server's process, for its RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// A label for the RESULT line (e.g. the server's name).
    #[arg(long, default_value = "server")]
    label: String,
}

/// One finished request.
#[derive(Debug, Clone)]
struct Done {
    at: Duration,
    latency: Duration,
    outcome: Outcome,
    tokens: u64,
}

/// How a request ended: an HTTP status, or a failure in transport.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Status(u16),
    Transport(String),
}

impl Outcome {
    fn ok(&self) -> bool {
        *self == Self::Status(200)
    }

    /// What failed, from the innermost cause (`connection closed before message completed`).
    fn transport(e: &reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_connect() {
            "cannot connect".to_string()
        } else {
            let mut cause: &dyn std::error::Error = e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            cause.to_string()
        };
        Self::Transport(what)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(code) => write!(f, "{code}"),
            Self::Transport(what) => write!(f, "transport: {what}"),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Least-squares slope of (seconds, MiB) points, MiB per minute, over all but the first fifth
/// of the run (the warm-up: caches and the allocator's arenas filling).
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let points = &points[points.len() / 5..];
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// The sidecar's energy figures on its `/metrics`: joules and requests metered so far, and the
/// budget.
#[derive(Debug, Clone, Copy, Default)]
struct Energy {
    joules: f64,
    requests: f64,
    budget: Option<Budget>,
}

/// The budget controller's view, in joules per request: its allocation and the mean of its
/// window (the requests under test-time compute).
#[derive(Debug, Clone, Copy)]
struct Budget {
    allocation: f64,
    mean: f64,
}

impl Energy {
    /// Reads them; `None` where the server has no such metrics, or has metered no request yet
    /// (then an earlier reading counts as zero).
    async fn scrape(http: &reqwest::Client, url: &str) -> Option<Self> {
        let response = http.get(format!("{url}/metrics")).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let text = response.text().await.ok()?;
        let sum = |name: &str| {
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .reduce(|a, b| a + b)
        };
        Some(Self {
            joules: sum("ttc_request_energy_joules_sum")?,
            requests: sum("ttc_request_energy_joules_count")?,
            // The allocation is 0 until a budget is in force; remaining = allocation - mean.
            budget: sum("ttc_budget_allocation_joules")
                .filter(|a| *a > 0.0)
                .map(|allocation| Budget {
                    allocation,
                    mean: allocation - sum("ttc_budget_remaining_joules").unwrap_or(0.0),
                }),
        })
    }

    /// Joules per metered request since `earlier`.
    fn per_request_since(&self, earlier: &Self) -> Option<f64> {
        let requests = self.requests - earlier.requests;
        (requests > 0.0).then(|| (self.joules - earlier.joules) / requests)
    }
}

const PROMPTS: [&str; 4] = [
    "What is 17 + 25? Answer with the number only.",
    "Name a primary colour.",
    "Write one sentence about the sea.",
    "Is the sun a star? Answer yes or no.",
];

/// Sends one request of kind `turn`; returns how it ended and its completion tokens.
async fn send(http: &reqwest::Client, args: &Args, model: &str, turn: usize) -> (Outcome, u64) {
    let prompt = PROMPTS[turn % PROMPTS.len()];
    // One sample is asked for as OpenAI's default, without `n`: on the sidecar such a request
    // runs under test-time compute where a policy is in force; several with `n`, which it
    // honours as asked.
    let chat = |n: usize, stream: bool| {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "stream": stream,
            "temperature": 0.8,
        });
        if n > 1 {
            body["n"] = n.into();
        }
        body
    };
    let multi = || async {
        match args.samples_as {
            Samples::N => {
                post(
                    http,
                    args,
                    "/v1/chat/completions",
                    chat(args.samples, false),
                )
                .await
            }
            Samples::Parallel => {
                let all = (0..args.samples)
                    .map(|_| post(http, args, "/v1/chat/completions", chat(1, false)));
                let results = futures::future::join_all(all).await;
                let tokens = results.iter().map(|r| r.1).sum();
                let outcome = results
                    .into_iter()
                    .map(|r| r.0)
                    .find(|o| !o.ok())
                    .unwrap_or(Outcome::Status(200));
                (outcome, tokens)
            }
        }
    };
    match (args.workload, turn % 4) {
        (Workload::Vote, _) | (Workload::Steady, 1) => multi().await,
        (Workload::Steady, 0) => post(http, args, "/v1/chat/completions", chat(1, false)).await,
        (Workload::Steady, 2) => {
            let body = json!({
                "model": model,
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "temperature": 0.8,
            });
            post(http, args, "/v1/completions", body).await
        }
        _ => stream(http, args, chat(1, true)).await,
    }
}

async fn post(http: &reqwest::Client, args: &Args, path: &str, body: Value) -> (Outcome, u64) {
    match http
        .post(format!("{}{path}", args.url))
        .json(&body)
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            let tokens = response
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["usage"]["completion_tokens"].as_u64())
                .unwrap_or(0);
            (Outcome::Status(status), tokens)
        }
        Err(e) => (Outcome::transport(&e), 0),
    }
}

/// A streamed chat read to its end; tokens are the chunks that carried content.
async fn stream(http: &reqwest::Client, args: &Args, body: Value) -> (Outcome, u64) {
    let mut response = match http
        .post(format!("{}/v1/chat/completions", args.url))
        .json(&body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => return (Outcome::transport(&e), 0),
    };
    let status = response.status().as_u16();
    let mut tokens = 0;
    let mut pending = String::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return (Outcome::transport(&e), tokens),
        };
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if let Some(data) = line.trim().strip_prefix("data:")
                && let Ok(v) = serde_json::from_str::<Value>(data.trim())
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            {
                tokens += 1;
            }
        }
    }
    (Outcome::Status(status), tokens)
}

/// What every request of a run shares.
#[derive(Clone)]
struct Load {
    http: reqwest::Client,
    args: Arc<Args>,
    model: Arc<str>,
    started: Instant,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Done>>>,
}

impl Load {
    /// Sends request `turn` and records it, its latency counted from `arrival`.
    async fn request(&self, turn: usize, arrival: Instant) {
        let (outcome, tokens) = send(&self.http, &self.args, &self.model, turn).await;
        self.done.lock().await.push(Done {
            at: self.started.elapsed(),
            latency: arrival.elapsed(),
            outcome,
            tokens,
        });
    }

    /// A closed loop: the next request as soon as the last is answered.
    async fn client_loop(self, client: usize) {
        let mut turn = client;
        while !self.stop.load(Ordering::Relaxed) {
            self.request(turn, Instant::now()).await;
            turn += 1;
        }
    }

    /// An open loop: `rate` arrivals per second at even intervals, each sent at once however
    /// many are in flight; returns when all are answered.
    async fn arrivals(self, rate: f64) {
        let spacing = Duration::from_secs_f64(1.0 / rate.max(1e-3));
        let mut in_flight = tokio::task::JoinSet::new();
        let mut turn = 0;
        loop {
            let arrival = self.started + spacing * turn as u32;
            tokio::time::sleep_until(arrival.into()).await;
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let load = self.clone();
            in_flight.spawn(async move { load.request(turn, arrival).await });
            turn += 1;
        }
        while in_flight.join_next().await.is_some() {}
    }
}

/// `  J/request 5.9 of 30.0`, where the server meters energy.
fn budget_text(joules_per_request: Option<f64>, budget: Option<Budget>) -> String {
    let mut text = String::new();
    if let Some(j) = joules_per_request {
        text += &format!("  J/request {j:.1}");
    }
    if let Some(b) = budget {
        text += &format!("  budget {:.1} of {:.1} J/request", b.mean, b.allocation);
    }
    text
}

fn budget_json(budget: Option<Budget>) -> Value {
    budget.map_or(
        Value::Null,
        |b| json!({"allocation_j": b.allocation, "mean_j": b.mean}),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()?;
    let models: Value = http
        .get(format!("{}/v1/models", args.url))
        .send()
        .await?
        .json()
        .await?;
    let model = models["data"][0]["id"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let pace = match args.rate {
        Some(rate) => format!("{rate} requests/s (open loop)"),
        None => format!("{} clients", args.clients),
    };
    println!(
        "{pace}, {:?} workload, {} s against {} ({model})",
        args.workload, args.seconds, args.url
    );
    let energy_start = Energy::scrape(&http, &args.url).await;
    let mut energy_last = energy_start;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let load = Load {
        http: http.clone(),
        args: Arc::new(args.clone()),
        model: Arc::from(model),
        started,
        stop: stop.clone(),
        done: done.clone(),
    };
    let mut loops = Vec::new();
    match args.rate {
        Some(rate) => loops.push(tokio::spawn(load.arrivals(rate))),
        None => {
            for client in 0..args.clients {
                loops.push(tokio::spawn(load.clone().client_loop(client)));
            }
        }
    }
    let mut rss: Vec<(f64, f64)> = Vec::new();
    let mut windows = Vec::new();
    let interval = Duration::from_secs_f64(args.interval.max(0.5));
    let mut next = interval;
    while started.elapsed().as_secs_f64() < args.seconds {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(pid) = args.pid
            && let Some(mib) = rss_mib(pid)
        {
            rss.push((started.elapsed().as_secs_f64(), mib));
        }
        if started.elapsed() >= next {
            let energy = Energy::scrape(&http, &args.url).await;
            let joules_per_request =
                energy.and_then(|now| now.per_request_since(&energy_last.unwrap_or_default()));
            let budget = energy.and_then(|e| e.budget);
            energy_last = energy.or(energy_last);
            let done = done.lock().await;
            let window: Vec<&Done> = done
                .iter()
                .filter(|d| d.at + interval > next && d.at <= next)
                .collect();
            let mut latencies: Vec<f64> = window
                .iter()
                .filter(|d| d.outcome.ok())
                .map(|d| d.latency.as_secs_f64())
                .collect();
            latencies.sort_by(f64::total_cmp);
            let errors = window.iter().filter(|d| !d.outcome.ok()).count();
            let line = json!({
                "t": next.as_secs_f64(),
                "requests": window.len(),
                "errors": errors,
                "p50_s": percentile(&latencies, 0.5),
                "p99_s": percentile(&latencies, 0.99),
                "rss_mib": rss.last().map(|r| r.1),
                "joules_per_request": joules_per_request,
                "budget": budget_json(budget),
            });
            println!(
                "t={:>6.0}s  requests {:>5}  errors {:>3}  p50 {:>6.2}s  p99 {:>6.2}s  rss {}{}",
                next.as_secs_f64(),
                window.len(),
                errors,
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                rss.last().map_or("-".into(), |r| format!("{:.0} MiB", r.1)),
                budget_text(joules_per_request, budget),
            );
            windows.push(line);
            next += interval;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.lock().await;
    let ok: Vec<&Done> = done.iter().filter(|d| d.outcome.ok()).collect();
    let mut latencies: Vec<f64> = ok.iter().map(|d| d.latency.as_secs_f64()).collect();
    latencies.sort_by(f64::total_cmp);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for d in done.iter().filter(|d| !d.outcome.ok()) {
        *errors.entry(d.outcome.to_string()).or_default() += 1;
    }
    let tokens: u64 = ok.iter().map(|d| d.tokens).sum();
    let energy_end = Energy::scrape(&http, &args.url).await;
    let joules_per_request =
        energy_end.and_then(|end| end.per_request_since(&energy_start.unwrap_or_default()));
    let budget = energy_end.and_then(|e| e.budget);
    let result = json!({
        "label": args.label,
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "clients": args.clients,
        "rate": args.rate,
        "seconds": elapsed,
        "requests": done.len(),
        "answered": ok.len(),
        "errors": errors,
        "requests_per_s": ok.len() as f64 / elapsed,
        "tokens_per_s": tokens as f64 / elapsed,
        "p50_s": percentile(&latencies, 0.5),
        "p99_s": percentile(&latencies, 0.99),
        "rss_start_mib": rss.first().map(|r| r.1),
        "rss_end_mib": rss.last().map(|r| r.1),
        "rss_slope_mib_per_min": slope_per_minute(&rss),
        "joules_per_request": joules_per_request,
        "budget": budget_json(budget),
        "windows": windows,
    });
    println!(
        "{}: {} answered ({:.2} req/s, {:.1} tok/s), errors {:?}, p50 {:.2} s, p99 {:.2} s, RSS slope {:+.1} MiB/min{}",
        args.label,
        ok.len(),
        ok.len() as f64 / elapsed,
        tokens as f64 / elapsed,
        errors,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        slope_per_minute(&rss),
        budget_text(joules_per_request, budget),
    );
    println!("RESULT {result}");
    Ok(())
}
