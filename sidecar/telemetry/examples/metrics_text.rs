//! Prints the sidecar's Prometheus text after a few recorded requests, metered by the declared
//! estimate (no OTLP): `cargo run -p ttc-telemetry --example metrics_text`.

use std::time::Duration;

use ttc_energy::{EnergyMeter, EstimateModel, MeterConfig, SourceChoice};
use ttc_telemetry::{OtlpExport, RequestRecord, SidecarMetrics, TelemetryConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Estimate,
        estimate: EstimateModel {
            watts_per_core: 7.5,
            idle_watts: 20.0,
        },
        ..MeterConfig::default()
    })?;
    let mut config = TelemetryConfig::from_env("smollm2-135m");
    config.otlp = OtlpExport::Disabled;
    config.pod_name = Some("infer-0".into());
    config.namespace = Some("llm".into());
    config.policy = Some("gold".into());
    let metrics = SidecarMetrics::new(&config, Some(meter.clone()))?;

    let guard = meter.begin_batch();
    let mut x = 0u64;
    for i in 0..20_000_000u64 {
        x = x.wrapping_mul(31).wrapping_add(i);
    }
    std::hint::black_box(x);
    let batch = guard.finish(&[("a", 40), ("b", 10)]);
    for r in &batch.requests {
        metrics.record_request(&RequestRecord {
            operation: "chat",
            input_tokens: 20,
            output_tokens: r.tokens,
            duration: batch.duration,
            time_per_output_token: Some(batch.duration / r.tokens.max(1) as u32),
            energy: Some((r.joules(), r.source)),
            strategy: "vote",
            depth: 3,
            error_type: None,
        });
    }
    metrics.set_budget(3600.0, 3599.0);
    metrics.record_request_duration("chat", Duration::from_secs(31), Some("timeout"));
    print!("{}", metrics.encode_prometheus()?);
    Ok(())
}
