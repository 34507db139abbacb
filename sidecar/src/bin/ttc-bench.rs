//! `ttc-bench`: our engine against llama.cpp on the same GGUF file, workload and thread count.
//!
//! Both sides time only the model's forward passes: a prompt prefill, then decode steps of `b`
//! sequences sharing the prompt's KV cache. The llama.cpp side runs through llama-cpp-python
//! (`sidecar/bench/llama_cpp_peer.py`); without it, only our figures are printed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use clap::Parser;
use ttc_sidecar::engine::kv_cache::KvCache;
use ttc_sidecar::engine::llama::{Kernels, Llama, Segment, WeightFormat};
use ttc_sidecar::engine::throughput::{self, Decode, TOKEN};
use ttc_sidecar::gguf::GgufFile;
use ttc_sidecar::model_store::{DEFAULT_MODEL, ModelStore};

#[derive(Parser)]
#[command(
    name = "ttc-bench",
    about = "Engine throughput, ours vs llama.cpp, printed as ratios"
)]
struct Args {
    /// A known model name or a GGUF path.
    #[arg(long, default_value = DEFAULT_MODEL.name)]
    model: String,
    /// Compute threads, for both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompt length for the prefill.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    decode_steps: usize,
    /// Batch sizes (sequences decoded together).
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    batches: Vec<usize>,
    /// Repeats per figure (the best is kept).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Concurrent one-row requests (prompts of different lengths) for the shared-pass figure.
    #[arg(long, default_value_t = 4)]
    concurrent: usize,
    /// Our in-memory weight format.
    #[arg(long, value_enum, default_value_t = WeightFormat::Q8_0)]
    weights: WeightFormat,
    /// What computes our linear layers and decode attention: our CPU kernels, or candle's ops
    /// only (the path a GPU takes).
    #[arg(long, value_enum, default_value_t = Kernels::Fused)]
    kernels: Kernels,
    /// Python with llama-cpp-python installed.
    #[arg(long, env = "TTC_PYTHON", default_value = "python3")]
    python: String,
}

#[derive(Debug, Default, serde::Deserialize)]
struct Figures {
    prefill_tok_s: f64,
    /// Concurrent requests' decode, tok/s summed: one shared pass per step, and one pass per
    /// request per step (ours only).
    #[serde(skip)]
    concurrent: Option<(f64, f64)>,
    /// Batch size -> figures.
    decode: std::collections::BTreeMap<String, Decode>,
}

fn ours(args: &Args, path: &std::path::Path) -> anyhow::Result<Figures> {
    let mut gguf = GgufFile::open(path)?;
    let model = Llama::load(
        &mut gguf,
        args.weights,
        args.kernels,
        &candle_core::Device::Cpu,
    )?;
    let mut figures = Figures {
        prefill_tok_s: throughput::prefill_tok_s(&model, args.prompt_tokens, args.repeats)?,
        ..Figures::default()
    };
    for &b in &args.batches {
        figures.decode.insert(
            b.to_string(),
            throughput::decode(
                &model,
                args.prompt_tokens,
                b,
                args.decode_steps,
                args.repeats,
            )?,
        );
    }
    if args.concurrent > 1 {
        figures.concurrent = Some(concurrent(args, &model)?);
    }
    Ok(figures)
}

/// `args.concurrent` one-row requests whose prompts differ in length (so their caches sit at
/// different positions) decoded `args.decode_steps` steps: in one shared pass per step
/// (`Llama::forward_many`, what the worker does) and in one pass per request per step. Summed
/// tok/s of each.
fn concurrent(args: &Args, model: &Llama) -> anyhow::Result<(f64, f64)> {
    let device = model.device().clone();
    let caches = || -> anyhow::Result<Vec<KvCache>> {
        (0..args.concurrent)
            .map(|i| {
                let len = (args.prompt_tokens * (i + 1) / args.concurrent).max(1);
                let prompt = Tensor::new(vec![TOKEN; len], &device)?.unsqueeze(0)?;
                let mut cache = model.new_cache();
                model.forward(&prompt, &mut cache)?;
                Ok(cache)
            })
            .collect()
    };
    let step = Tensor::new(&[TOKEN], &device)?.unsqueeze(0)?;
    let tokens = (args.concurrent * args.decode_steps) as f64;
    let (mut shared, mut separate) = (f64::MAX, f64::MAX);
    for _ in 0..args.repeats {
        let mut group = caches()?;
        let t = Instant::now();
        for _ in 0..args.decode_steps {
            let mut segments: Vec<Segment<'_>> = group
                .iter_mut()
                .map(|cache| Segment {
                    tokens: &step,
                    cache,
                })
                .collect();
            model.forward_many(&mut segments)?;
        }
        shared = shared.min(t.elapsed().as_secs_f64());
        let mut group = caches()?;
        let t = Instant::now();
        for _ in 0..args.decode_steps {
            for cache in &mut group {
                model.forward(&step, cache)?;
            }
        }
        separate = separate.min(t.elapsed().as_secs_f64());
    }
    Ok((tokens / shared, tokens / separate))
}

fn peer(args: &Args, path: &std::path::Path) -> anyhow::Result<Figures> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/llama_cpp_peer.py");
    let batches = args
        .batches
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--model")
        .arg(path)
        .args(["--threads", &args.threads.to_string()])
        .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
        .args(["--decode-steps", &args.decode_steps.to_string()])
        .args(["--batches", &batches])
        .args(["--repeats", &args.repeats.to_string()])
        .output()
        .with_context(|| format!("running {}", args.python))?;
    anyhow::ensure!(
        output.status.success(),
        "llama.cpp peer failed (install it with: CMAKE_ARGS=\"-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF\" pip install llama-cpp-python==0.3.36): {}",
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .last()
        .context("llama.cpp peer printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn row(name: &str, ours: f64, peer: Option<f64>, unit: &str) {
    match peer {
        Some(p) => println!(
            "| {name} | {ours:.1} {unit} | {p:.1} {unit} | {:.2} |",
            ours / p
        ),
        None => println!("| {name} | {ours:.1} {unit} | - | - |"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: before any other thread exists.
    unsafe { ttc_sidecar::engine::set_compute_threads(Some(args.threads)) };
    let path = ModelStore::default_location().resolve(&args.model)?;
    eprintln!(
        "model {} | {} threads | prompt {} tokens | {} decode steps | best of {}",
        path.display(),
        args.threads,
        args.prompt_tokens,
        args.decode_steps,
        args.repeats
    );
    let ours = ours(&args, &path)?;
    let peer = match peer(&args, &path) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("llama.cpp figures unavailable: {e:#}");
            None
        }
    };
    println!(
        "| figure | ours ({:?}) | llama.cpp | ours / llama.cpp |",
        args.weights
    );
    println!("|---|---|---|---|");
    row(
        "prefill",
        ours.prefill_tok_s,
        peer.as_ref().map(|p| p.prefill_tok_s),
        "tok/s",
    );
    for b in &args.batches {
        let key = b.to_string();
        let mine = &ours.decode[&key];
        let theirs = peer.as_ref().and_then(|p| p.decode.get(&key));
        let label = if *b == 1 {
            "decode b=1".to_owned()
        } else {
            format!("decode summed b={b}")
        };
        row(
            &label,
            mine.summed_tok_s,
            theirs.map(|d| d.summed_tok_s),
            "tok/s",
        );
    }
    if let Some((shared, separate)) = ours.concurrent {
        println!(
            "| {} concurrent requests, one shared pass per step vs one pass each | {shared:.1} vs {separate:.1} tok/s, {:.2}x | - | - |",
            args.concurrent,
            shared / separate
        );
    }
    if let (Some(one), Some(eight)) = (ours.decode.get("1"), ours.decode.get("8")) {
        let cost = |o: &Decode, e: &Decode| e.step_ms / o.step_ms;
        let theirs = peer
            .as_ref()
            .and_then(|p| Some(cost(p.decode.get("1")?, p.decode.get("8")?)));
        // Lower is better here, so the ratio is theirs / ours.
        match theirs {
            Some(t) => println!(
                "| cost of 8 samples vs 1 (per step) | {:.2}x | {t:.2}x | {:.2} |",
                cost(one, eight),
                t / cost(one, eight)
            ),
            None => println!(
                "| cost of 8 samples vs 1 (per step) | {:.2}x | - | - |",
                cost(one, eight)
            ),
        }
    }
    Ok(())
}
