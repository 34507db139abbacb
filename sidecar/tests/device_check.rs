//! The GPU check's engine and api stages (`e2e/gpu-check`), run here on the CPU against the
//! stand-in NVML library's simulated GPU: the device check compares logits with a reference
//! written by another compute path, prints throughput, meters decoding with NVML beside
//! integrated power, and asks whether the power limit may be set; the served API reports
//! usage.energy from NVML. What only a GPU can show (CUDA itself) is left to the GPU machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The stand-in NVML library (the energy crate's tests/fake_nvml), compiled into `dir` with
/// `script` beside it.
fn fake_nvml(dir: &Path, script: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("energy/tests/fake_nvml/fake_nvml.c");
    let lib = dir.join("libnvidia-ml-fake.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-lpthread")
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling {}", src.display());
    std::fs::write(dir.join("libnvidia-ml-fake.so.script"), script).unwrap();
    lib
}

fn sidecar() -> &'static str {
    env!("CARGO_BIN_EXE_ttc-sidecar")
}

/// A bundle as e2e/cuda/bundle.sh makes one, with the CPU sidecar and a reference of a 2-layer
/// generated model written on candle's path (the check then runs our kernels against it).
fn bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let out = Command::new(sidecar())
        .args(["device-check", "--layers", "2", "--kernels", "candle"])
        .arg("--model-dir")
        .arg(dir.join("models"))
        .arg("--write-reference")
        .arg(bundle.join("reference.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle
}

fn gpu_check(
    dir: &Path,
    bundle: &Path,
    nvml_script: &str,
) -> (i32, String, Vec<serde_json::Value>) {
    let lib = fake_nvml(dir, nvml_script);
    let out = dir.join("out");
    let check = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/gpu-check");
    let output = Command::new("bash")
        .arg(&check)
        .env("GPU_CHECK_BUNDLE", bundle)
        .env("GPU_CHECK_STAGES", "engine api")
        .env("GPU_CHECK_DEVICE", "cpu")
        .env("GPU_CHECK_SIDECAR", sidecar())
        .env("GPU_CHECK_LAYERS", "2")
        .env("GPU_CHECK_ENGINE_SECONDS", "2")
        .env("GPU_CHECK_NVML_LIB", &lib)
        .env("OUT", &out)
        .env_remove("NVIDIA_VISIBLE_DEVICES")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .expect("run e2e/gpu-check");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    let results = std::fs::read_to_string(out.join("gpu-check.json"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (output.status.code().unwrap_or(-1), text, results)
}

#[test]
fn the_engine_and_api_stages_pass_on_a_steady_simulated_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let (code, text, results) = gpu_check(
        dir.path(),
        &bundle,
        "devices GPU-sim-0001\nrate 0 250000 20\n",
    );
    assert_eq!(code, 0, "{text}");
    let engine = &results[0];
    let agreement = &engine["agreement"];
    assert!(agreement["steps"].as_u64() == Some(16), "{text}");
    assert!(
        agreement["max_relative_diff"].as_f64().unwrap() < 0.06,
        "{text}"
    );
    assert_eq!(engine["decode"].as_array().unwrap().len(), 3, "{text}");
    let energy = &engine["energy"];
    assert_eq!(energy["source"], "nvml", "{text}");
    assert!(energy["diff_pct"].as_f64().unwrap().abs() < 5.0, "{text}");
    assert!(energy["joules_per_token"].as_f64().unwrap() > 0.0, "{text}");
    assert!(
        engine["power_limit"]
            .as_str()
            .unwrap()
            .starts_with("refused"),
        "{text}"
    );
    let api = &results[1];
    assert_eq!(api["energy"]["source"], "nvml", "{text}");
    assert!(api["energy"]["joules"].as_f64().unwrap() > 0.0, "{text}");
    assert!(text.contains("gpu-check: PASS"), "{text}");
}

#[test]
fn the_engine_stage_fails_when_power_reads_low_or_the_reference_is_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let (code, text, _) = gpu_check(
        dir.path(),
        &bundle,
        "devices GPU-sim-0001\nrate 0 250000 20 200000\n",
    );
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("differ from integrated power"), "{text}");

    // A reference of another seed's model is not compared, and says so.
    let reference = bundle.join("reference.json");
    let text = std::fs::read_to_string(&reference).unwrap();
    std::fs::write(&reference, text.replace("seed1", "seed2")).unwrap();
    let (code, text, _) = gpu_check(
        dir.path(),
        &bundle,
        "devices GPU-sim-0001\nrate 0 250000 20\n",
    );
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("the reference is of"), "{text}");
}
