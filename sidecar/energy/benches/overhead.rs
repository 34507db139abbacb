//! Time the meter adds per batch and per request, for each source, in release builds:
//! `cargo bench -p ttc-energy`. NVML goes through the real nvml-wrapper crate to the simulated
//! GPU of the stand-in library, so it measures our code and the wrapper, not the driver (the
//! driver's own latency is printed by `e2e/gpu-check`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use ttc_energy::{
    EnergyMeter, EstimateModel, EstimateSensor, MeterConfig, NvmlConfig, RaplConfig, RaplSensor,
    SourceChoice, VisibleDevices,
};

/// A decode step (one batch) of a small model on a GPU, and of a large one.
const STEPS: [Duration; 2] = [Duration::from_millis(5), Duration::from_millis(20)];

fn bench(name: &str, meter: &EnergyMeter) {
    for size in [1usize, 8, 64] {
        let requests: Vec<(u64, u64)> = (0..size as u64).map(|i| (i, 1 + i % 7)).collect();
        // Warm up, then time enough batches for a stable mean.
        for _ in 0..200 {
            let _ = meter.begin_batch().finish(&requests);
        }
        let iterations = 5_000;
        let start = Instant::now();
        let mut checksum = 0u64;
        for _ in 0..iterations {
            checksum = checksum.wrapping_add(meter.begin_batch().finish(&requests).energy_uj);
        }
        std::hint::black_box(checksum);
        let per_batch = start.elapsed() / iterations;
        println!(
            "{name:<9} batch of {size:>2}: {:>8.2} us per batch, {:>7.3} us per request; \
             {:.3} % of a {:?} step, {:.3} % of a {:?} step",
            per_batch.as_secs_f64() * 1e6,
            per_batch.as_secs_f64() * 1e6 / size as f64,
            per_batch.as_secs_f64() / STEPS[0].as_secs_f64() * 100.0,
            STEPS[0],
            per_batch.as_secs_f64() / STEPS[1].as_secs_f64() * 100.0,
            STEPS[1],
        );
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");

    let estimate = EnergyMeter::with_sensor(
        Box::new(EstimateSensor::new(EstimateModel::default()).expect("estimate sensor")),
        EstimateModel::default(),
    )
    .expect("estimate meter");
    bench("estimate", &estimate);

    let rapl_root = dir.path().join("powercap");
    let package = rapl_root.join("intel-rapl:0");
    std::fs::create_dir_all(&package).expect("fixture");
    std::fs::write(package.join("name"), "package-0\n").expect("fixture");
    std::fs::write(package.join("energy_uj"), "123456789\n").expect("fixture");
    std::fs::write(package.join("max_energy_range_uj"), "262143328850\n").expect("fixture");
    let rapl = EnergyMeter::with_sensor(
        Box::new(RaplSensor::open(&RaplConfig { root: rapl_root }).expect("rapl sensor")),
        EstimateModel::default(),
    )
    .expect("rapl meter");
    bench("rapl", &rapl);

    let lib = common::fake_nvml(dir.path(), "devices GPU-bench\nrate 0 300000 100\n");
    let nvml = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Nvml,
        nvml: NvmlConfig {
            lib_path: Some(lib),
            visible: VisibleDevices::All,
            ..NvmlConfig::default()
        },
        ..MeterConfig::default()
    })
    .expect("nvml meter");
    bench("nvml", &nvml);
}
