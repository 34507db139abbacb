//! The NVML path through the real nvml-wrapper crate, against a scripted stand-in library.

mod common;

use std::time::Duration;

use ttc_energy::{
    EnergyError, EnergyMeter, EnergySensor, EnergySource, EstimateModel, MeterConfig, NvmlConfig,
    NvmlSensor, SourceChoice, VisibleDevices,
};

fn config(lib: std::path::PathBuf, visible: VisibleDevices) -> NvmlConfig {
    NvmlConfig {
        lib_path: Some(lib),
        visible,
        counter_update_period: Duration::from_millis(100),
        power_sample_interval: Duration::from_millis(5),
    }
}

fn meter(script: &str) -> (tempfile::TempDir, EnergyMeter) {
    let dir = tempfile::tempdir().unwrap();
    let lib = common::fake_nvml(dir.path(), script);
    let cfg = MeterConfig {
        source: SourceChoice::Nvml,
        nvml: config(lib, VisibleDevices::All),
        ..MeterConfig::default()
    };
    let meter = EnergyMeter::from_config(&cfg).unwrap();
    (dir, meter)
}

fn assert_books_balance(meter: &EnergyMeter) {
    let t = meter.totals();
    assert_eq!(
        t.requests_uj + t.idle_uj + t.unattributed_uj + t.in_flight_uj,
        t.metered_uj + t.pending_estimate_uj,
        "{t:?}"
    );
}

// Each meter step reads the counter once: open, the meter's first read, begin, finish, totals.
// A power answer is taken only when the counter has not moved since the last read.

#[test]
fn counter_deltas_are_shared_by_tokens() {
    let (_dir, meter) = meter("devices GPU-aaaa\nenergy 0 1000 1000 3000 7000 8000\npower 0 0\n");
    assert_eq!(meter.source(), EnergySource::Nvml);
    let batch = meter.begin_batch().finish(&[("a", 1), ("b", 3)]);
    assert_eq!(batch.energy_uj, 4_000_000, "7000 - 3000 mJ");
    assert_eq!(batch.source, EnergySource::Nvml);
    let per_request: Vec<_> = batch
        .requests
        .iter()
        .map(|r| (r.request_id, r.energy_uj))
        .collect();
    assert_eq!(per_request, [("a", 1_000_000), ("b", 3_000_000)]);
    assert_eq!(batch.requests[1].joules(), 3.0);
    let json = serde_json::to_value(&batch.requests[0]).unwrap();
    assert_eq!(json["source"], "nvml");

    let t = meter.totals();
    assert_eq!(t.metered_uj, 7_000_000);
    assert_eq!(t.requests_uj, 4_000_000);
    assert_eq!(t.idle_uj, 3_000_000, "before and after the batch");
    assert_eq!(t.devices[0].id, "GPU-aaaa");
    assert_eq!(t.devices[0].energy_uj, 7_000_000);
    assert_eq!(t.by_source(), [(EnergySource::Nvml, 7_000_000)]);
    assert_books_balance(&meter);
}

#[test]
fn missing_counter_integrates_power_samples() {
    let (_dir, meter) = meter("devices GPU-aaaa\nenergy 0 NS\npower 0 200000\n");
    assert_eq!(meter.source(), EnergySource::Nvml);
    let guard = meter.begin_batch();
    std::thread::sleep(Duration::from_millis(200));
    let batch = guard.finish(&[(1u32, 10)]);
    let joules = batch.joules();
    // 200 W for the batch's duration, give or take one sample interval and scheduling.
    let expected = 200.0 * batch.duration.as_secs_f64();
    assert!(
        (joules - expected).abs() < 0.15 * expected,
        "{joules} J vs {expected} J"
    );
    assert_eq!(batch.source, EnergySource::Nvml);
    let t = meter.totals();
    assert_eq!(t.devices[0].power_w, Some(200.0));
    assert_books_balance(&meter);
}

#[test]
fn failed_read_mid_run_is_labelled_estimate_and_not_counted_twice() {
    // open, first, begin A (+1 J idle), finish A fails, begin B fails, finish B (+3 J), totals.
    let (_dir, meter) =
        meter("devices GPU-aaaa\nenergy 0 1000 1000 2000 E999 E15 5000 5000\npower 0 0\n");
    // Long enough idle span that the average power before A is a few watts.
    std::thread::sleep(Duration::from_millis(200));
    let a = meter.begin_batch();
    std::thread::sleep(Duration::from_millis(20));
    let a = a.finish(&[("a", 5)]);
    assert_eq!(a.source, EnergySource::Estimate);
    assert!(
        a.requests
            .iter()
            .all(|r| r.source == EnergySource::Estimate)
    );
    assert!(
        a.energy_uj > 0 && a.energy_uj < 3_000_000,
        "{}",
        a.energy_uj
    );

    let b = meter.begin_batch().finish(&[("b", 5)]);
    assert_eq!(b.source, EnergySource::Nvml);
    assert_eq!(
        a.energy_uj + b.energy_uj,
        3_000_000,
        "B gets the counter's 3 J less A's estimate"
    );

    let t = meter.totals();
    assert_eq!(t.read_errors, 2);
    assert_eq!(t.pending_estimate_uj, 0);
    assert_eq!(t.estimated_uj, a.energy_uj);
    assert_eq!(t.metered_uj, 4_000_000);
    assert_eq!(t.requests_uj + t.idle_uj, 4_000_000);
    assert_eq!(
        t.by_source(),
        [
            (EnergySource::Nvml, 4_000_000 - a.energy_uj),
            (EnergySource::Estimate, a.energy_uj)
        ]
    );
    assert_books_balance(&meter);
}

#[test]
fn counter_reset_counts_from_zero() {
    // open 1000, first 1000, begin 2000 (+1 J idle), finish 500 (reset: +0.5 J), totals 1500.
    let (_dir, meter) = meter("devices GPU-aaaa\nenergy 0 1000 1000 2000 500 1500\npower 0 0\n");
    let batch = meter.begin_batch().finish(&[("a", 1)]);
    assert_eq!(batch.energy_uj, 500_000);
    let t = meter.totals();
    assert_eq!(t.metered_uj, 2_500_000);
    assert_eq!(t.idle_uj, 2_000_000);
    assert_books_balance(&meter);
}

#[test]
fn short_batch_is_bridged_with_power_and_stays_monotone() {
    // The counter never moves during the batch (shorter than the update period); then it
    // advances less than the bridge already handed out.
    let (_dir, meter) =
        meter("devices GPU-aaaa\nenergy 0 1000 1000 1000 1000 1500 1500\npower 0 300000\n");
    let guard = meter.begin_batch();
    std::thread::sleep(Duration::from_millis(20));
    let batch = guard.finish(&[("a", 1)]);
    // 300 W x ~20 ms; never more than one update period (30 J).
    assert!(batch.energy_uj >= 5_000_000, "{}", batch.energy_uj);
    assert!(batch.energy_uj <= 30_000_000, "{}", batch.energy_uj);
    let before = meter.totals().metered_uj;
    let after = meter.totals().metered_uj;
    assert!(after >= before, "readings never go backwards");
    assert!(before >= batch.energy_uj);
    assert_books_balance(&meter);
}

#[test]
fn sums_the_pods_gpus_only() {
    let script = "devices GPU-aaaa GPU-bbbb GPU-cccc\n\
                  energy 0 0 100000\nenergy 1 0 0 1000 2000\nenergy 2 0 0 10 20\npower 1 0\npower 2 0\n";
    let dir = tempfile::tempdir().unwrap();
    let lib = common::fake_nvml(dir.path(), script);
    let visible = VisibleDevices::from_vars(Some("GPU-bbbb,GPU-cc"), None);
    let mut sensor = NvmlSensor::open(&config(lib.clone(), visible)).unwrap();
    assert_eq!(sensor.uuids(), ["GPU-bbbb", "GPU-cccc"]);
    let first = sensor.read().unwrap();
    assert_eq!(first.total_uj, 0);
    let second = sensor.read().unwrap();
    assert_eq!(second.total_uj, 1_010_000);
    assert_eq!(second.devices.len(), 2);

    let by_index = NvmlSensor::open(&config(lib.clone(), VisibleDevices::parse("2"))).unwrap();
    assert_eq!(by_index.uuids(), ["GPU-cccc"]);
    // As many indices as GPUs NVML sees: the runtime already narrowed them down.
    let remapped = NvmlSensor::open(&config(lib.clone(), VisibleDevices::parse("4,5,7"))).unwrap();
    assert_eq!(remapped.uuids().len(), 3);
    let missing = NvmlSensor::open(&config(lib.clone(), VisibleDevices::parse("GPU-zzzz")));
    assert!(matches!(missing, Err(EnergyError::DeviceNotFound { .. })));
    let mig = NvmlSensor::open(&config(
        lib.clone(),
        VisibleDevices::parse("MIG-4a2b1c3d-0000-0000-0000-000000000000"),
    ));
    assert!(matches!(mig, Err(EnergyError::MigInstance(_))));
    let none = NvmlSensor::open(&config(lib, VisibleDevices::parse("none")));
    assert!(matches!(none, Err(EnergyError::NoVisibleGpu(_))));
}

#[test]
fn gpu_with_nothing_to_measure_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lib = common::fake_nvml(dir.path(), "devices GPU-aaaa\nenergy 0 NS\npower 0 NS\n");
    let err = NvmlSensor::open(&config(lib, VisibleDevices::All)).unwrap_err();
    assert!(matches!(err, EnergyError::NothingToMeasure { .. }), "{err}");
}

#[test]
fn auto_falls_back_to_a_labelled_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MeterConfig {
        source: SourceChoice::Auto,
        nvml: config(
            dir.path().join("no-such-libnvidia-ml.so"),
            VisibleDevices::All,
        ),
        rapl: ttc_energy::RaplConfig {
            root: dir.path().to_path_buf(),
        },
        estimate: EstimateModel::default(),
    };
    let meter = EnergyMeter::from_config(&cfg).unwrap();
    assert_eq!(meter.source(), EnergySource::Estimate);
    let batch = meter.begin_batch().finish(&[("a", 1)]);
    assert_eq!(batch.source, EnergySource::Estimate);
    assert!(!batch.source.is_measured());
    let json = serde_json::to_string(&batch.requests[0]).unwrap();
    assert!(json.contains(r#""source":"estimate""#), "{json}");

    let explicit = MeterConfig {
        source: SourceChoice::Nvml,
        ..cfg
    };
    let err = EnergyMeter::from_config(&explicit).unwrap_err();
    assert!(matches!(err, EnergyError::Nvml { op: "init", .. }), "{err}");
}

#[test]
fn simulated_gpu_short_batches_get_their_share() {
    // 250 W steadily; the counter refreshes every 100 ms, so most batches here are shorter
    // than one refresh.
    let (_dir, meter) = meter("devices GPU-aaaa\nrate 0 250000 100\n");
    let started = std::time::Instant::now();
    let mut batches = Vec::new();
    for ms in [10u64, 30, 5, 150, 20, 60, 10, 40, 120, 15]
        .into_iter()
        .cycle()
        .take(30)
    {
        let guard = meter.begin_batch();
        std::thread::sleep(Duration::from_millis(ms));
        batches.push(guard.finish(&[("r", 1)]));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t = meter.totals();
    let metered = t.metered_uj as f64 / 1e6;
    // The counter lags by at most one refresh; the bridge leads by at most one.
    assert!(
        (metered - 250.0 * elapsed).abs() <= 250.0 * 0.1 + 1e-6,
        "{metered} J in {elapsed} s"
    );
    // Within a refresh period the counter's phase is unknown, so a batch may be off by up to
    // one period's energy either way; never more.
    let errors: Vec<f64> = batches
        .iter()
        .map(|b| b.joules() - 250.0 * b.duration.as_secs_f64())
        .collect();
    let mean_abs = errors.iter().map(|e| e.abs()).sum::<f64>() / errors.len() as f64;
    eprintln!("per-batch error: mean |e| {mean_abs:.2} J, errors {errors:.1?}");
    assert!(
        errors.iter().all(|e| e.abs() <= 250.0 * 0.1 + 2.0),
        "{errors:?}"
    );
    let batch_j: f64 = batches.iter().map(|b| b.joules()).sum();
    let batch_s: f64 = batches.iter().map(|b| b.duration.as_secs_f64()).sum();
    assert!(
        (batch_j / batch_s - 250.0).abs() < 0.2 * 250.0,
        "batches average {} W",
        batch_j / batch_s
    );
    assert_eq!(t.requests_uj + t.idle_uj, t.metered_uj);
}

/// The cross-check integrates power beside the counter: a steady simulated GPU gives both the
/// same joules; a power sensor reading 20 % low shows as a -20 % difference.
#[test]
fn cross_check_compares_integrated_power_with_the_counter() {
    use ttc_energy::cross_check::PowerIntegrator;
    for (script, expected_pct) in [
        ("devices GPU-aaaa\nrate 0 250000 20\n", 0.0),
        ("devices GPU-aaaa\nrate 0 250000 20 200000\n", -20.0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let lib = common::fake_nvml(dir.path(), script);
        let uuids = vec!["GPU-aaaa".to_string()];
        let integrator =
            PowerIntegrator::start(Some(&lib), &uuids, Duration::from_millis(5)).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let check = integrator.finish().unwrap();
        assert!(check.counter_j > 100.0, "{check:?}");
        assert!(check.samples > 20 && check.sample_errors == 0, "{check:?}");
        // The counter refreshes every 20 ms, so either edge may lag by one refresh (5 J of
        // about 150).
        assert!(
            (check.diff_pct() - expected_pct).abs() < 6.0,
            "{script}: {:.2} %, expected {expected_pct} % ({check:?})",
            check.diff_pct()
        );
    }
}

#[test]
fn power_limit_access_says_whether_the_limit_may_be_set() {
    use ttc_energy::cross_check::{PowerLimitAccess, power_limit_access};
    let dir = tempfile::tempdir().unwrap();
    let lib = common::fake_nvml(dir.path(), "devices GPU-aaaa\nrate 0 250000 20\n");
    match power_limit_access(Some(&lib), "GPU-aaaa").unwrap() {
        PowerLimitAccess::Refused { reason } => {
            assert!(reason.to_lowercase().contains("permission"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let lib = common::fake_nvml(
        dir.path(),
        "devices GPU-aaaa\nrate 0 250000 20\nlimit-settable\n",
    );
    assert_eq!(
        power_limit_access(Some(&lib), "GPU-aaaa").unwrap(),
        PowerLimitAccess::Permitted {
            limit_w: 300.0,
            min_w: 100.0,
            max_w: 400.0
        }
    );
}
