//! `ttc-sidecar device-check`: the engine on this machine's device, checked and measured in one
//! run, for a new GPU node (and for the GPU check, `e2e/gpu-check`, where no model file can be
//! carried): logits against reference numbers computed elsewhere on the same generated model,
//! prefill and decode throughput, joules per token from the meter beside integrated power, the
//! meter's overhead, and whether NVML lets the pod set the GPU's power limit.
//!
//! Prints figures as it goes, then `RESULT {json}` and PASS or FAIL (exit 3).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use ttc_energy::cross_check::{PowerIntegrator, PowerLimitAccess, power_limit_access};
use ttc_energy::{EnergyMeter, EnergySource, MeterConfig, NvmlConfig, NvmlSensor, SourceChoice};

use crate::engine::kv_cache::KvCache;
use crate::engine::llama::{Kernels, Llama};
use crate::engine::throughput::{self, Decode, TOKEN};
use crate::engine::{Engine, EngineOptions};
use crate::synthetic_model::SyntheticModel;

/// Logit steps the reference holds: a prompt's prefill, then decode steps fed the reference's
/// own greedy tokens.
const STEPS: usize = 16;
/// Logits kept per step in a reference.
const TOP: usize = 16;

/// What to check, and how long.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceCheckArgs {
    /// Run on the first CUDA GPU (needs a build with the `cuda` feature).
    #[arg(long)]
    pub cuda: bool,
    /// On the CPU: our kernels, or candle's ops only (the GPU's path).
    #[arg(long, value_enum, default_value_t = Kernels::Fused)]
    pub kernels: Kernels,
    /// A GGUF file to check instead of a generated one (no reference applies then).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Layers of the generated model (the default model's shape; all 30 by default).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Seed of the generated model's weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the generated model is written and kept for the next run ($TMPDIR/ttc-device-check
    /// by default).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Reference logits (from `--write-reference` on another machine) to compare against.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Write this run's logits as a reference, and stop.
    #[arg(long)]
    pub write_reference: Option<PathBuf>,
    /// Largest logit difference from the reference, relative to the largest logit (two CPUs'
    /// sums in other orders differ by up to 6 % on the default model).
    #[arg(long, default_value_t = 0.08)]
    pub tolerance: f32,
    /// Prompt tokens for the prefill and the decode figures.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode batch sizes (rows sharing one prompt).
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    pub batches: Vec<usize>,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Seconds of metered decoding for the energy figures (0: none).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Rows of the metered decoding.
    #[arg(long, default_value_t = 16)]
    pub energy_rows: usize,
    /// Allowed difference between the meter's joules and integrated power, percent.
    #[arg(long, default_value_t = 5.0)]
    pub energy_tolerance_pct: f64,
    /// Energy source: auto (nvml, then rapl, then estimate), nvml, rapl or estimate.
    #[arg(long, default_value = "auto")]
    pub energy_source: SourceChoice,
    /// Path of libnvidia-ml (default: found by the loader).
    #[arg(long)]
    pub nvml_library: Option<PathBuf>,
}

/// Logits of one step: the input token, the largest logit's magnitude, and the top logits.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    input: Vec<u32>,
    spread: f32,
    top: Vec<(u32, f32)>,
}

/// Reference logits of a generated model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reference {
    model: String,
    device: String,
    kernels: Kernels,
    steps: Vec<Step>,
}

/// How close this device's logits came to the reference's.
#[derive(Debug, Clone, Serialize)]
struct Agreement {
    reference_device: String,
    steps: usize,
    max_relative_diff: f32,
    greedy_agree: usize,
    greedy_clear: usize,
}

/// The figures, as `RESULT` prints them.
#[derive(Debug, Clone, Serialize, Default)]
struct Report {
    device: String,
    kernels: String,
    model: String,
    load_s: f64,
    agreement: Option<Agreement>,
    prefill_tok_s: f64,
    decode: Vec<DecodeFigures>,
    energy: Option<EnergyFigures>,
    power_limit: Option<String>,
    failures: Vec<String>,
}

/// One batch size's decode figures.
#[derive(Debug, Clone, Serialize)]
struct DecodeFigures {
    rows: usize,
    #[serde(flatten)]
    decode: Decode,
}

#[derive(Debug, Clone, Serialize)]
struct EnergyFigures {
    source: EnergySource,
    window_s: f64,
    tokens: u64,
    joules_per_token: f64,
    integrated_joules_per_token: Option<f64>,
    counter_joules_per_token: Option<f64>,
    diff_pct: Option<f64>,
    meter_overhead_us: f64,
    meter_overhead_pct_of_step: f64,
}

/// Runs the check; `Ok(false)` when a figure failed its bound.
pub fn run(args: &DeviceCheckArgs) -> anyhow::Result<bool> {
    let (path, label): (PathBuf, String) = match &args.model {
        Some(path) => (path.clone(), path.display().to_string()),
        None => {
            let model = SyntheticModel::smollm2(args.layers, args.seed);
            let dir = args
                .model_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("ttc-device-check"));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("{}.gguf", model.label()));
            if !path.exists() {
                let started = Instant::now();
                model.write(&path).context("writing the generated model")?;
                println!(
                    "generated {} ({} MB) in {:.1} s",
                    path.display(),
                    std::fs::metadata(&path)?.len() >> 20,
                    started.elapsed().as_secs_f64()
                );
            }
            (path, model.label())
        }
    };
    if args.write_reference.is_some() || args.reference.is_some() {
        // References hold the arithmetic of llama.cpp's Q8_0 path and of candle's ops, on any
        // device: activations quantized per block of 32, not per 256 as our 512-bit kernel does.
        ttc_kernels::q8::use_block_activations();
    }
    let started = Instant::now();
    let engine = Engine::load(
        &path,
        &label,
        &EngineOptions {
            cuda: args.cuda,
            kernels: args.kernels,
            ..EngineOptions::default()
        },
    )?;
    let model = engine.model();
    let mut report = Report {
        device: device_name(model),
        kernels: format!("{:?}", model.kernels()).to_lowercase(),
        model: label.to_string(),
        load_s: started.elapsed().as_secs_f64(),
        ..Report::default()
    };
    println!(
        "model {label} on {} ({} kernels), loaded in {:.1} s",
        report.device, report.kernels, report.load_s
    );

    let reference: Option<Reference> = match &args.reference {
        Some(path) => Some(
            serde_json::from_slice(&std::fs::read(path)?)
                .with_context(|| format!("reading the reference {}", path.display()))?,
        ),
        None => None,
    };
    let steps = logit_steps(model, reference.as_ref())?;
    if let Some(out) = &args.write_reference {
        let reference = Reference {
            model: label.to_string(),
            device: report.device.clone(),
            kernels: model.kernels(),
            steps,
        };
        std::fs::write(out, serde_json::to_string(&reference)?)?;
        println!("reference written to {}", out.display());
        return Ok(true);
    }
    if let Some(reference) = &reference {
        if reference.model != label {
            report.failures.push(format!(
                "the reference is of {}, this run's model is {label}",
                reference.model
            ));
        } else {
            let agreement = agree(reference, &steps);
            println!(
                "logits vs {} ({} steps): largest difference {:.2} % of the largest logit; greedy picks agree {} of {} clear steps",
                agreement.reference_device,
                agreement.steps,
                agreement.max_relative_diff * 100.0,
                agreement.greedy_agree,
                agreement.greedy_clear
            );
            if agreement.max_relative_diff > args.tolerance {
                report.failures.push(format!(
                    "logits differ from the reference by {:.2} % (tolerance {:.2} %)",
                    agreement.max_relative_diff * 100.0,
                    args.tolerance * 100.0
                ));
            }
            if agreement.greedy_agree < agreement.greedy_clear {
                report
                    .failures
                    .push("a clear greedy pick differs from the reference".into());
            }
            report.agreement = Some(agreement);
        }
    }

    report.prefill_tok_s = throughput::prefill_tok_s(model, args.prompt_tokens, 2)?;
    println!(
        "prefill of {} tokens: {:.0} tok/s",
        args.prompt_tokens, report.prefill_tok_s
    );
    for &rows in &args.batches {
        let d = throughput::decode(model, args.prompt_tokens, rows, args.decode_steps, 2)?;
        println!(
            "decode, batch {rows:>3}: {:>8.2} ms/step, {:>9.0} tok/s",
            d.step_ms, d.summed_tok_s
        );
        report.decode.push(DecodeFigures { rows, decode: d });
    }

    // The GPUs NVML meters for this process (none when the meter is not NVML's), looked up once.
    let gpus = nvml_gpus(args);
    if args.seconds > 0.0 {
        let energy = metered_decode(model, args, &gpus)?;
        if let Some(diff) = energy.diff_pct
            && (diff.is_nan() || diff.abs() > args.energy_tolerance_pct)
        {
            report.failures.push(format!(
                "the meter's joules differ from integrated power by {diff:.2} % (tolerance {} %)",
                args.energy_tolerance_pct
            ));
        }
        report.energy = Some(energy);
    }
    if let Some(uuid) = gpus.first() {
        let access = match power_limit_access(args.nvml_library.as_deref(), uuid) {
            Ok(PowerLimitAccess::Permitted {
                limit_w,
                min_w,
                max_w,
            }) => format!("permitted (limit {limit_w:.0} W, range {min_w:.0}-{max_w:.0} W)"),
            Ok(PowerLimitAccess::Refused { reason }) => format!("refused: {reason}"),
            Err(e) => format!("unknown: {e}"),
        };
        println!("setting the power limit of {uuid}: {access}");
        report.power_limit = Some(access);
    }
    println!("RESULT {}", serde_json::to_string(&report)?);
    if report.failures.is_empty() {
        println!("PASS");
    } else {
        println!("FAIL: {}", report.failures.join("; "));
    }
    Ok(report.failures.is_empty())
}

fn device_name(model: &Llama) -> String {
    match model.device() {
        candle_core::Device::Cpu => "cpu".into(),
        candle_core::Device::Cuda(_) => "cuda:0".into(),
        other => format!("{other:?}"),
    }
}

/// The prefill's and then `STEPS - 1` decode steps' logits; the inputs after the prompt are the
/// reference's (so both sides see the same positions), else this run's greedy picks.
fn logit_steps(model: &Llama, reference: Option<&Reference>) -> anyhow::Result<Vec<Step>> {
    let given: Option<Vec<&Vec<u32>>> =
        reference.map(|r| r.steps.iter().map(|s| &s.input).collect());
    // A prompt of ordinary byte-pair ids (any ids do: the weights are random).
    let mut input: Vec<u32> = (0..24).map(|i| 300 + 97 * i % 40_000).collect();
    let mut cache = model.new_cache();
    let mut steps = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        if let Some(given) = &given
            && let Some(tokens) = given.get(step)
        {
            input = (*tokens).clone();
        }
        let tokens = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let logits: Vec<f32> = model
            .forward(&tokens, &mut cache)?
            .flatten_all()?
            .to_vec1()?;
        let spread = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.select_nth_unstable_by(TOP, |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        let mut top: Vec<(u32, f32)> = order[..TOP]
            .iter()
            .map(|&i| (i, logits[i as usize]))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        steps.push(Step {
            input: std::mem::replace(&mut input, vec![top[0].0]),
            spread,
            top,
        });
    }
    Ok(steps)
}

/// This run's steps against the reference's: the largest difference at the reference's top
/// ids relative to its largest logit; greedy picks where the reference's lead is clear.
fn agree(reference: &Reference, ours: &[Step]) -> Agreement {
    let mut agreement = Agreement {
        reference_device: format!("{} ({:?})", reference.device, reference.kernels),
        steps: reference.steps.len().min(ours.len()),
        max_relative_diff: 0.0,
        greedy_agree: 0,
        greedy_clear: 0,
    };
    for (theirs, ours) in reference.steps.iter().zip(ours) {
        let ours_at = |id: u32| ours.top.iter().find(|(i, _)| *i == id).map(|(_, v)| *v);
        // An id missing from our top list is at most our smallest kept logit.
        let floor = ours.top.last().map_or(0.0, |(_, v)| *v);
        for &(id, value) in &theirs.top {
            let diff = match ours_at(id) {
                Some(v) => (v - value).abs(),
                None => (value - floor).max(0.0),
            };
            agreement.max_relative_diff = agreement
                .max_relative_diff
                .max(diff / theirs.spread.max(1e-6));
        }
        let lead = theirs.top[0].1 - theirs.top[1].1;
        if lead > 0.02 * theirs.spread {
            agreement.greedy_clear += 1;
            if ours.top[0].0 == theirs.top[0].0 {
                agreement.greedy_agree += 1;
            }
        }
    }
    agreement
}

/// The GPUs NVML meters for this process, when the meter may be NVML's.
fn nvml_gpus(args: &DeviceCheckArgs) -> Vec<String> {
    if matches!(
        args.energy_source,
        SourceChoice::Estimate | SourceChoice::Rapl
    ) {
        return Vec::new();
    }
    NvmlSensor::open(&nvml_config(args))
        .map(|s| s.uuids())
        .unwrap_or_default()
}

fn nvml_config(args: &DeviceCheckArgs) -> NvmlConfig {
    NvmlConfig {
        lib_path: args.nvml_library.clone(),
        ..NvmlConfig::default()
    }
}

/// Decode steps of `energy_rows` rows for `seconds`, each step metered as one batch; beside
/// the meter, NVML's power integrated over the same window when the meter is NVML's.
fn metered_decode(
    model: &Llama,
    args: &DeviceCheckArgs,
    gpus: &[String],
) -> anyhow::Result<EnergyFigures> {
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: args.energy_source,
        nvml: nvml_config(args),
        ..MeterConfig::default()
    })
    .context("opening the energy meter")?;
    let source = meter.source();
    let rows = args.energy_rows.max(1);
    let prompt = Tensor::new(vec![TOKEN; args.prompt_tokens], model.device())?.unsqueeze(0)?;
    let step = Tensor::new(vec![TOKEN; rows], model.device())?.unsqueeze(1)?;
    let fresh = || -> anyhow::Result<KvCache> {
        let mut prefix = model.new_cache();
        model.forward(&prompt, &mut prefix)?;
        Ok(KvCache::sharing(Arc::new(prefix), rows)?)
    };
    let mut cache = fresh()?;
    let uuids: &[String] = match source {
        EnergySource::Nvml => gpus,
        _ => &[],
    };
    let integrator = (!uuids.is_empty())
        .then(|| {
            PowerIntegrator::start(
                args.nvml_library.as_deref(),
                uuids,
                Duration::from_millis(20),
            )
        })
        .transpose()?;
    let window = Instant::now();
    let (mut joules, mut tokens, mut overhead, mut compute) = (0.0, 0u64, Duration::ZERO, 0.0);
    let mut batches = 0u32;
    while window.elapsed().as_secs_f64() < args.seconds {
        if cache.len + 1 >= model.config().context_length {
            cache = fresh()?;
        }
        let t0 = Instant::now();
        let guard = meter.begin_batch();
        let begin = t0.elapsed();
        model.forward(&step, &mut cache)?;
        model.device().synchronize()?;
        let t1 = Instant::now();
        let energy = guard.finish(&[("decode", rows as u64)]);
        overhead += begin + t1.elapsed();
        compute += energy.duration.as_secs_f64();
        joules += energy.joules();
        tokens += rows as u64;
        batches += 1;
    }
    let window_s = window.elapsed().as_secs_f64();
    let check = integrator.map(PowerIntegrator::finish).transpose()?;
    let per_token = |j: f64| j / tokens.max(1) as f64;
    let integrated = check.as_ref().map(|c| per_token(c.integrated_j));
    let diff_pct = integrated.map(|i| (i - per_token(joules)) / per_token(joules) * 100.0);
    let overhead_us = overhead.as_secs_f64() * 1e6 / f64::from(batches.max(1));
    let figures = EnergyFigures {
        source,
        window_s,
        tokens,
        joules_per_token: per_token(joules),
        integrated_joules_per_token: integrated,
        counter_joules_per_token: check.as_ref().map(|c| per_token(c.counter_j)),
        diff_pct,
        meter_overhead_us: overhead_us,
        meter_overhead_pct_of_step: overhead_us / (compute * 1e6 / f64::from(batches.max(1)))
            * 100.0,
    };
    println!(
        "energy, {rows} rows decoding for {window_s:.1} s: {:.4} J/token from the meter ({source}){}",
        figures.joules_per_token,
        match (integrated, diff_pct) {
            (Some(i), Some(d)) => format!(", {i:.4} J/token from integrated power ({d:+.2} %)"),
            _ => String::new(),
        }
    );
    println!(
        "meter overhead: {:.1} us per step, {:.3} % of a step",
        figures.meter_overhead_us, figures.meter_overhead_pct_of_step
    );
    Ok(figures)
}
