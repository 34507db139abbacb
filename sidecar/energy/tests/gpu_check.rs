//! Runs `e2e/gpu-check`'s NVML stage (the script for GPU machines) end to end against the
//! simulated GPU of the stand-in NVML library: it must pass when power and counter agree and fail
//! when the power sensor reads 20 % low.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples next to the test binaries' `deps/` folder.
fn gpu_meter() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join("gpu_meter");
    assert!(
        bin.exists(),
        "{} is missing: run all of `cargo test -p ttc-energy` (it builds the examples) or \
         `cargo build -p ttc-energy --example gpu_meter`",
        bin.display()
    );
    bin
}

fn gpu_check(script: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let lib = common::fake_nvml(dir.path(), script);
    let check = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../e2e/gpu-check");
    let out = dir.path().join("out");
    let output = Command::new("bash")
        .arg(&check)
        .env("GPU_CHECK_STAGES", "nvml")
        .env("GPU_METER_BIN", gpu_meter())
        .env("GPU_CHECK_LOAD", "none")
        .env("GPU_CHECK_SECONDS", "2")
        .env("GPU_CHECK_NVML_LIB", &lib)
        .env("OUT", &out)
        .env_remove("NVIDIA_VISIBLE_DEVICES")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .expect("run e2e/gpu-check");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    let json = std::fs::read_to_string(out.join("gpu-check.json")).unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_default();
    if output.status.code() == Some(0) {
        assert_eq!(result["books_balance"], true, "{text}");
        assert!(result["requests"].as_u64().unwrap_or(0) > 0, "{text}");
        assert!(
            result["first_requests"][0]["joules"]
                .as_f64()
                .unwrap_or(0.0)
                > 0.0
        );
    }
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn passes_when_counter_and_power_agree() {
    let (code, text) = gpu_check("devices GPU-sim-0001\nrate 0 250000 100\n");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("gpu-check: PASS"), "{text}");
    assert!(text.contains("per-request energy"), "{text}");
}

#[test]
fn fails_when_power_reads_low() {
    let (code, text) = gpu_check("devices GPU-sim-0001\nrate 0 250000 100 200000\n");
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("integrated power differs"), "{text}");
}
