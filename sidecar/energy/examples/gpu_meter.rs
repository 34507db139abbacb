//! Meters simulated inference batches on this machine's GPUs while something else loads them,
//! and checks the NVML energy counter against power samples integrated over the same window.
//! Built where Rust is, run by `e2e/gpu-check` where the GPU is.
//!
//! ```text
//! gpu_meter [--seconds 30] [--sample-ms 20] [--show 12] [--tolerance-pct 5] [--nvml-lib PATH]
//! ```
//!
//! Prints per-request joules, the comparison and the meter's overhead, then one line
//! `RESULT {json}` for scripts, then PASS (exit 0) or FAIL (exit 3): the counter moved, the two
//! figures agree within the tolerance, and the per-request books balance.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use ttc_energy::cross_check::{PowerIntegrator, percentile};
use ttc_energy::{EnergyMeter, EstimateModel, NvmlConfig, NvmlSensor, RequestEnergy};

struct Args {
    seconds: f64,
    sample: Duration,
    show: usize,
    tolerance_pct: f64,
    nvml_lib: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 30.0,
        sample: Duration::from_millis(20),
        show: 12,
        tolerance_pct: 5.0,
        nvml_lib: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--sample-ms" => {
                let ms: u64 = value()?.parse().map_err(|e| format!("--sample-ms: {e}"))?;
                args.sample = Duration::from_millis(ms.max(1));
            }
            "--tolerance-pct" => {
                args.tolerance_pct = value()?
                    .parse()
                    .map_err(|e| format!("--tolerance-pct: {e}"))?
            }
            "--show" => args.show = value()?.parse().map_err(|e| format!("--show: {e}"))?,
            "--nvml-lib" => args.nvml_lib = Some(value()?.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Polls one GPU's energy counter tightly and returns the median time between changes: the
/// driver's refresh period, which `NvmlConfig::counter_update_period` should match.
fn probe_refresh_period(
    nvml: &Nvml,
    uuid: &str,
    for_how_long: Duration,
) -> Result<Option<Duration>, nvml_wrapper::error::NvmlError> {
    let device = nvml.device_by_uuid(uuid)?;
    let start = Instant::now();
    let mut last = device.total_energy_consumption()?;
    let mut changes = Vec::new();
    while start.elapsed() < for_how_long {
        let now = device.total_energy_consumption()?;
        if now != last {
            changes.push(Instant::now());
            last = now;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut gaps: Vec<Duration> = changes.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    Ok(gaps.get(gaps.len() / 2).copied())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("gpu_meter: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let config = NvmlConfig {
        lib_path: args.nvml_lib.clone(),
        ..NvmlConfig::default()
    };
    let sensor = NvmlSensor::open(&config)?;
    let uuids = sensor.uuids();
    println!("metering GPUs {uuids:?} (NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES)");

    // A second, independent NVML handle for the reference measurement.
    let nvml = match &args.nvml_lib {
        Some(p) => Nvml::builder().lib_path(p.as_os_str()).init()?,
        None => Nvml::init()?,
    };
    let first = uuids.first().ok_or("no GPU to meter")?;
    let refresh = probe_refresh_period(&nvml, first, Duration::from_secs(1))?;
    match refresh {
        Some(p) => println!(
            "energy counter refresh period of {first}: about {p:?} (median of changes seen in 1 s of tight polling)"
        ),
        None => println!("energy counter of {first} did not change in 1 s of polling"),
    }
    let meter = EnergyMeter::with_sensor(Box::new(sensor), EstimateModel::default())?;
    let integrator = PowerIntegrator::start(args.nvml_lib.as_deref(), &uuids, args.sample)?;
    let window_start = Instant::now();

    // Simulated batches of the lengths an engine produces, several shorter than the counter's
    // refresh period; the GPU work itself comes from the load gpu-check runs beside us.
    let lengths_ms = [5u64, 10, 20, 40, 80, 160, 320, 15, 30, 60];
    let mut overhead = Vec::new();
    let mut requests: Vec<RequestEnergy<String>> = Vec::new();
    let mut batch_time = Duration::ZERO;
    let mut n = 0usize;
    while window_start.elapsed().as_secs_f64() < args.seconds {
        let ms = lengths_ms[n % lengths_ms.len()];
        let size = 1 + n % 8;
        let t0 = Instant::now();
        let guard = meter.begin_batch();
        let begin = t0.elapsed();
        std::thread::sleep(Duration::from_millis(ms));
        let batch: Vec<(String, u64)> = (0..size)
            .map(|r| (format!("req-{n}-{r}"), 16 + 37 * r as u64))
            .collect();
        let t1 = Instant::now();
        let energy = guard.finish(&batch);
        overhead.push(begin + t1.elapsed());
        batch_time += energy.duration;
        requests.extend(energy.requests);
        n += 1;
    }
    let totals = meter.totals();
    let check = integrator.finish()?;
    let (window, counter_j, integrated_j, diff_pct) = (
        check.window_s,
        check.counter_j,
        check.integrated_j,
        check.diff_pct(),
    );
    let metered_j = totals.metered_uj as f64 / 1e6;
    let books = totals.requests_uj + totals.idle_uj + totals.unattributed_uj + totals.in_flight_uj
        == totals.metered_uj + totals.pending_estimate_uj;

    println!(
        "\nper-request energy (first {} of {}):",
        args.show,
        requests.len()
    );
    println!(
        "{:<14} {:>7} {:>10} {:>9}",
        "request", "tokens", "joules", "source"
    );
    for r in requests.iter().take(args.show) {
        println!(
            "{:<14} {:>7} {:>10.4} {:>9}",
            r.request_id,
            r.tokens,
            r.joules(),
            r.source
        );
    }
    let request_j: f64 = requests.iter().map(|r| r.joules()).sum();
    let tokens: u64 = requests.iter().map(|r| r.tokens).sum();
    let mut sorted = overhead.clone();
    sorted.sort();
    let mean_batch = batch_time / n.max(1) as u32;
    let overhead_mean = overhead.iter().sum::<Duration>() / overhead.len().max(1) as u32;

    println!(
        "\nwindow {window:.1} s, {n} batches, {} requests",
        requests.len()
    );
    println!("NVML counter delta        {counter_j:>12.1} J");
    println!(
        "integrated power samples  {integrated_j:>12.1} J   ({} samples every {:?}, {} errors)",
        check.samples, check.sample_every, check.sample_errors
    );
    println!("difference                {diff_pct:>12.2} %");
    println!(
        "meter total               {metered_j:>12.1} J   (requests {:.1} J, idle {:.1} J)",
        totals.requests_uj as f64 / 1e6,
        totals.idle_uj as f64 / 1e6
    );
    println!("books balance (requests + idle = metered, in uJ): {books}");
    println!(
        "mean per request          {:>12.3} J   ({:.4} J/token)",
        request_j / requests.len().max(1) as f64,
        request_j / tokens.max(1) as f64
    );
    println!(
        "meter overhead per batch  mean {:?}, p50 {:?}, p99 {:?} = {:.4} % of a mean batch ({:?})",
        overhead_mean,
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        overhead_mean.as_secs_f64() / mean_batch.as_secs_f64().max(1e-9) * 100.0,
        mean_batch
    );
    println!(
        "NVML power read           p50 {:?}, p99 {:?}",
        check.power_read_p50, check.power_read_p99
    );

    let result = serde_json::json!({
        "gpus": uuids,
        "window_s": window,
        "batches": n,
        "requests": requests.len(),
        "counter_j": counter_j,
        "integrated_j": integrated_j,
        "diff_pct": diff_pct,
        "metered_j": metered_j,
        "request_j": request_j,
        "idle_j": totals.idle_uj as f64 / 1e6,
        "books_balance": books,
        "read_errors": totals.read_errors,
        "mean_j_per_request": request_j / requests.len().max(1) as f64,
        "overhead_us_mean": overhead_mean.as_secs_f64() * 1e6,
        "overhead_us_p99": percentile(&sorted, 0.99).as_secs_f64() * 1e6,
        "overhead_pct_of_batch": overhead_mean.as_secs_f64() / mean_batch.as_secs_f64().max(1e-9) * 100.0,
        "power_samples": check.samples,
        "counter_refresh_ms": refresh.map(|p| p.as_secs_f64() * 1e3),
        "sample_errors": check.sample_errors,
        "first_requests": requests.iter().take(args.show).map(|r| serde_json::json!({
            "id": r.request_id, "tokens": r.tokens, "joules": r.joules(), "source": r.source,
        })).collect::<Vec<_>>(),
    });
    println!("RESULT {result}");

    let mut failures = Vec::new();
    if counter_j <= 0.0 {
        failures.push("the energy counter did not move".to_string());
    }
    // NaN (no counter movement) fails too.
    if diff_pct.is_nan() || diff_pct.abs() > args.tolerance_pct {
        failures.push(format!(
            "integrated power differs from the counter by {diff_pct:.2} % (tolerance {} %)",
            args.tolerance_pct
        ));
    }
    if !books {
        failures.push("per-request energy and idle do not add up to the meter total".to_string());
    }
    if failures.is_empty() {
        println!("PASS");
    } else {
        println!("FAIL: {}", failures.join("; "));
    }
    Ok(failures.is_empty())
}
