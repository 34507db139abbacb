//! `ttc-load`: a load generator for OpenAI-compatible servers: the sidecar, or a peer such as
//! llama.cpp's `llama-server`, driven the same way so that their figures compare.
//!
//! `clients` loops send requests back to back for `seconds`. The steady mix rotates chat (one
//! sample), chat with several samples, a text completion and a streamed chat; the vote workload
//! asks for `samples` samples of one prompt, as `n` or as that many parallel requests (for
//! servers without `n`). Every `interval` it prints the window's requests, errors, p50/p99
//! latency and the server's RSS (with `--pid`); at the end the totals, the RSS slope, and one
//! `RESULT {json}` line.

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
    /// Concurrent client loops.
    #[arg(long, default_value_t = 8)]
    clients: usize,
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
    status: u16,
    tokens: u64,
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

const PROMPTS: [&str; 4] = [
    "What is 17 + 25? Answer with the number only.",
    "Name a primary colour.",
    "Write one sentence about the sea.",
    "Is the sun a star? Answer yes or no.",
];

/// Sends one request of kind `turn`; returns (status, completion tokens).
async fn send(http: &reqwest::Client, args: &Args, model: &str, turn: usize) -> (u16, u64) {
    let prompt = PROMPTS[turn % PROMPTS.len()];
    let chat = |n: usize, stream: bool| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "n": n,
            "stream": stream,
            "temperature": 0.8,
        })
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
                let status = results
                    .iter()
                    .map(|r| r.0)
                    .find(|s| *s != 200)
                    .unwrap_or(200);
                (status, results.iter().map(|r| r.1).sum())
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

async fn post(http: &reqwest::Client, args: &Args, path: &str, body: Value) -> (u16, u64) {
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
            (status, tokens)
        }
        Err(_) => (0, 0),
    }
}

/// A streamed chat read to its end; tokens are the chunks that carried content.
async fn stream(http: &reqwest::Client, args: &Args, body: Value) -> (u16, u64) {
    let Ok(mut response) = http
        .post(format!("{}/v1/chat/completions", args.url))
        .json(&body)
        .send()
        .await
    else {
        return (0, 0);
    };
    let status = response.status().as_u16();
    let mut tokens = 0;
    let mut pending = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
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
    (status, tokens)
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
    println!(
        "{} clients, {:?} workload, {} s against {} ({model})",
        args.clients, args.workload, args.seconds, args.url
    );
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<Vec<Done>>> = Arc::default();
    let mut loops = Vec::new();
    for client in 0..args.clients {
        let (http, args, model, stop, done) = (
            http.clone(),
            args.clone(),
            model.clone(),
            stop.clone(),
            done.clone(),
        );
        loops.push(tokio::spawn(async move {
            let mut turn = client;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let (status, tokens) = send(&http, &args, &model, turn).await;
                done.lock().await.push(Done {
                    at: started.elapsed(),
                    latency: t0.elapsed(),
                    status,
                    tokens,
                });
                turn += 1;
            }
        }));
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
            let done = done.lock().await;
            let window: Vec<&Done> = done
                .iter()
                .filter(|d| d.at + interval > next && d.at <= next)
                .collect();
            let mut latencies: Vec<f64> = window
                .iter()
                .filter(|d| d.status == 200)
                .map(|d| d.latency.as_secs_f64())
                .collect();
            latencies.sort_by(f64::total_cmp);
            let errors = window.iter().filter(|d| d.status != 200).count();
            let line = json!({
                "t": next.as_secs_f64(),
                "requests": window.len(),
                "errors": errors,
                "p50_s": percentile(&latencies, 0.5),
                "p99_s": percentile(&latencies, 0.99),
                "rss_mib": rss.last().map(|r| r.1),
            });
            println!(
                "t={:>6.0}s  requests {:>5}  errors {:>3}  p50 {:>6.2}s  p99 {:>6.2}s  rss {}",
                next.as_secs_f64(),
                window.len(),
                errors,
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                rss.last().map_or("-".into(), |r| format!("{:.0} MiB", r.1))
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
    let ok: Vec<&Done> = done.iter().filter(|d| d.status == 200).collect();
    let mut latencies: Vec<f64> = ok.iter().map(|d| d.latency.as_secs_f64()).collect();
    latencies.sort_by(f64::total_cmp);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for d in done.iter().filter(|d| d.status != 200) {
        *errors.entry(d.status.to_string()).or_default() += 1;
    }
    let tokens: u64 = ok.iter().map(|d| d.tokens).sum();
    let result = json!({
        "label": args.label,
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "clients": args.clients,
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
        "windows": windows,
    });
    println!(
        "{}: {} answered ({:.2} req/s, {:.1} tok/s), errors {:?}, p50 {:.2} s, p99 {:.2} s, RSS slope {:+.1} MiB/min",
        args.label,
        ok.len(),
        ok.len() as f64 / elapsed,
        tokens as f64 / elapsed,
        errors,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        slope_per_minute(&rss)
    );
    println!("RESULT {result}");
    Ok(())
}
