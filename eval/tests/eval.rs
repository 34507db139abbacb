//! End to end with the real default model: the evaluation on 1 family x 3 items x depths 1,2
//! writes a table, CSV, JSON and a PNG that parse, with accuracies in [0, 1] and labelled,
//! positive joules, and carries a model-size point (here the same model under a second name,
//! whose greedy answers must equal greedy's).

use ttc_energy::{EnergyMeter, MeterConfig, SourceChoice};
use ttc_eval::tasks::TaskFamily;
use ttc_eval::{EvalReport, EvalSettings};
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::model_store::{DEFAULT_MODEL, ModelStore};

/// The default model, fetched into the cache on first use.
fn default_model_path() -> std::path::PathBuf {
    ModelStore::default_location()
        .ensure(&DEFAULT_MODEL, false)
        .unwrap_or_else(|e| panic!("the evaluation tests need the default model: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn small_evaluation_writes_results_that_parse() {
    let engine = Engine::load(
        &default_model_path(),
        DEFAULT_MODEL.name,
        &EngineOptions::default(),
    )
    .expect("the default model loads");
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Auto,
        ..MeterConfig::default()
    })
    .expect("a meter (auto falls back to the estimate)");
    let handle = EngineHandle::spawn(engine, meter).expect("engine thread");
    let settings = EvalSettings {
        families: vec![TaskFamily::SingleDigitAddition],
        items: 3,
        depths: vec![1, 2],
        max_samples: 2,
        max_tokens: Some(12),
        ..EvalSettings::default()
    };
    let copy = Engine::load(
        &default_model_path(),
        "smollm2-copy",
        &EngineOptions::default(),
    )
    .expect("the default model loads");
    let meter = EnergyMeter::from_config(&MeterConfig::default()).expect("a meter");
    let size_models = [EngineHandle::spawn(copy, meter).expect("engine thread")];
    let report = ttc_eval::run(&handle, &size_models, &settings, |_| {})
        .await
        .expect("the evaluation runs");

    // greedy, the model-size point, vote@1, vote@2, the sidecar's vote of 2 (greedy first),
    // early-stop, adaptive (plain, with each answer's correctness fed back, and with the
    // checking tool), and best-of-N checked by the checking tool over HTTP (the family has no
    // schema).
    let labels: Vec<&str> = report.results.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels.len(), 10, "{labels:?}");
    let policy_vote = report
        .results
        .iter()
        .find(|r| r.label == "policy-vote@2")
        .expect("policy-vote@2");
    assert!(policy_vote.items.iter().all(|i| i.samples == 2));
    for adaptive in [
        "adaptive(=vote@2 J)",
        "adaptive+feedback(=vote@2 J)",
        "adaptive+tool(=vote@2 J)",
    ] {
        assert!(labels.contains(&adaptive), "{adaptive} in {labels:?}");
    }
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.contains("told which answers were right")),
        "{:?}",
        report.findings
    );
    let answers = |label: &str| {
        let r = report.results.iter().find(|r| r.label == label);
        let r = r.unwrap_or_else(|| panic!("{label} in {labels:?}"));
        (
            r.model.clone(),
            r.items.iter().map(|i| i.answer.clone()).collect::<Vec<_>>(),
        )
    };
    let (model, copy_answers) = answers("greedy [smollm2-copy]");
    assert_eq!(model.as_deref(), Some("smollm2-copy"));
    assert_eq!(copy_answers, answers("greedy").1);
    assert!(
        labels.contains(&"greedy") && labels.contains(&"vote@2"),
        "{labels:?}"
    );
    let best = report
        .results
        .iter()
        .find(|r| r.label == "best-of-2+tool")
        .expect("best-of-2+tool");
    for item in &best.items {
        // The tool accepts exactly the right answers: verified iff correct.
        assert_eq!(item.verified, Some(item.correct), "{item:?}");
    }
    for r in &report.results {
        assert_eq!(r.items.len(), 3, "{}", r.label);
        let a = r.accuracy;
        assert!((0.0..=1.0).contains(&a.estimate) && a.low <= a.estimate && a.estimate <= a.high);
        assert!(r.mean_joules > 0.0, "{}: {}", r.label, r.mean_joules);
        assert!(["nvml", "rapl", "estimate"].contains(&r.energy_source.as_str()));
        assert!(r.mean_latency_s > 0.0 && r.mean_samples >= 1.0);
    }
    let vote2 = report
        .results
        .iter()
        .find(|r| r.label == "vote@2")
        .expect("vote@2");
    let pass2 = vote2.pass_at_k.expect("pass@k on vote rows");
    assert!((0.0..=1.0).contains(&pass2.value) && pass2.k == 2);
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.contains("uniform best-of-2 with the same tool")),
        "{:#?}",
        report.findings
    );
    let table = ttc_eval::report::table(&report);
    assert_eq!(table.lines().count(), 2 + report.results.len(), "{table}");

    let dir = tempfile::tempdir().expect("temp dir");
    let written = ttc_eval::report::write_all(&report, dir.path()).expect("results written");
    assert_eq!(written.len(), 3, "{written:?}");

    let json = std::fs::read_to_string(dir.path().join("results.json")).expect("results.json");
    let parsed: EvalReport = serde_json::from_str(&json).expect("results.json parses");
    assert_eq!(parsed.results.len(), report.results.len());

    let csv = std::fs::read_to_string(dir.path().join("results.csv")).expect("results.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (accuracy, joules, source) = (col("accuracy"), col("mean_joules"), col("energy_source"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), report.results.len());
    for row in rows {
        assert_eq!(row.len(), header.len(), "{row:?}");
        let acc: f64 = row[accuracy].parse().expect("accuracy is a number");
        assert!((0.0..=1.0).contains(&acc));
        let j: f64 = row[joules].parse().expect("joules is a number");
        assert!(j > 0.0);
        assert!(
            ["nvml", "rapl", "estimate"].contains(&row[source]),
            "{row:?}"
        );
    }

    let png = std::fs::read(dir.path().join("frontier_single_digit_addition.png")).expect("png");
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"));
}
