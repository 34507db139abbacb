//! `ttc-eval`: where test-time compute buys accuracy per joule, and where it does not.
//!
//! Runs seeded task families under greedy, fixed votes, early-stop voting, the adaptive policy
//! under an allocation and verifier best-of-N; prints a table and the findings; writes
//! `results.csv`, `results.json` and one `frontier_<family>.png` per family into `--out`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ttc_energy::{EnergyMeter, MeterConfig, SourceChoice};
use ttc_eval::tasks::TaskFamily;
use ttc_eval::{EvalReport, EvalSettings};
use ttc_sidecar::engine::llama::WeightFormat;
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::model_store::{DEFAULT_MODEL, ModelStore};

#[derive(Parser)]
#[command(
    name = "ttc-eval",
    about = "Accuracy vs joules of test-time compute strategies on seeded task families"
)]
struct Args {
    /// Items per family.
    #[arg(long, default_value_t = 20)]
    items: usize,
    /// Task families (comma-separated): single_digit_addition, two_digit_addition_no_carry,
    /// two_digit_addition_carry, larger_of_two, yes_no_facts, multiple_choice, letter_counting,
    /// structured_output, or `all`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single_digit_addition,larger_of_two,structured_output"
    )]
    families: Vec<String>,
    /// Fixed vote depths.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    depths: Vec<usize>,
    /// Output folder.
    #[arg(long, default_value = "eval-results")]
    out: PathBuf,
    /// Seed of items and samples.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Sampling temperature of the sampled configurations.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Token limit per sample (default 32, 64 for JSON answers).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Most samples of early-stop, adaptive and best-of-N.
    #[arg(long, default_value_t = 8)]
    max_samples: usize,
    /// Samples per window of early-stop, adaptive and best-of-N (the vote is checked after each).
    #[arg(long, default_value_t = ttc_core::TtcOptions::default().window)]
    window: usize,
    /// A known model name or a GGUF path.
    #[arg(long, default_value = DEFAULT_MODEL.name)]
    model: String,
    /// Other models (known names or GGUF paths, comma-separated) to run greedy on, as
    /// model-size points on the frontier; e.g. gemma3-270m.
    #[arg(long, value_delimiter = ',')]
    size_models: Vec<String>,
    /// In-memory weight format.
    #[arg(long, value_enum, default_value_t = WeightFormat::Q8_0)]
    weights: WeightFormat,
    /// Run on the first CUDA device (a build with the `cuda` feature).
    #[arg(long)]
    cuda: bool,
    /// Re-print and re-write the outputs of an earlier run from its results.json (runs nothing).
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Energy source: auto (nvml, then rapl, then estimate), nvml, rapl or estimate.
    #[arg(long, default_value = "auto")]
    energy_source: SourceChoice,
}

fn family(name: &str) -> anyhow::Result<Vec<TaskFamily>> {
    if name == "all" {
        return Ok(TaskFamily::ALL.to_vec());
    }
    TaskFamily::ALL
        .iter()
        .copied()
        .find(|f| f.name() == name)
        .map(|f| vec![f])
        .with_context(|| format!("unknown family `{name}`"))
}

fn print_and_write(report: &EvalReport, out: &std::path::Path) -> anyhow::Result<()> {
    println!("{}", ttc_eval::report::table(report));
    println!("Findings:");
    for f in &report.findings {
        println!("- {f}");
    }
    println!("Notes:");
    for n in &report.notes {
        println!("- {n}");
    }
    for p in ttc_eval::report::write_all(report, out)? {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.from_json {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: EvalReport =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        return print_and_write(&report, &args.out);
    }
    // SAFETY: before any other thread exists.
    unsafe { ttc_sidecar::engine::set_compute_threads(Some(args.threads)) };
    let mut families = Vec::new();
    for name in &args.families {
        families.extend(family(name.trim())?);
    }
    let settings = EvalSettings {
        families,
        items: args.items,
        depths: args.depths.clone(),
        seed: args.seed,
        temperature: args.temperature,
        max_tokens: args.max_tokens,
        max_samples: args.max_samples,
        window: args.window,
        ..EvalSettings::default()
    };
    let options = EngineOptions {
        weights: args.weights,
        cuda: args.cuda,
        ..EngineOptions::default()
    };
    let store = ModelStore::default_location();
    let path = store.resolve(&args.model)?;
    let engine = Engine::load(&path, &args.model, &options)?;
    let new_meter = || {
        EnergyMeter::from_config(&MeterConfig {
            source: args.energy_source,
            ..MeterConfig::default()
        })
        .context("opening the energy meter")
    };
    let meter = new_meter()?;
    let mut size_models = Vec::new();
    for name in &args.size_models {
        let name = name.trim();
        let path = store.resolve(name)?;
        let engine = Engine::load(&path, name, &options)
            .with_context(|| format!("loading {}", path.display()))?;
        size_models
            .push(EngineHandle::spawn(engine, new_meter()?).context("starting the engine thread")?);
    }
    eprintln!(
        "model {} | {} threads | energy source {} ({})",
        path.display(),
        args.threads,
        meter.source(),
        if meter.source().is_measured() {
            "measured"
        } else {
            "NOT measured: CPU time x declared watts"
        }
    );
    let handle = EngineHandle::spawn(engine, meter).context("starting the engine thread")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(ttc_eval::run(&handle, &size_models, &settings, |line| {
        eprintln!("{line}")
    }))?;
    print_and_write(&report, &args.out)
}
