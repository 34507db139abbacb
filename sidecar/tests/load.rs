//! The load generator (`ttc-load`) against the sidecar serving a small generated model: the
//! short version of the soak run (`sidecar/bench/soak.sh` runs it for 30 minutes beside
//! llama-server). Every request of the steady mix is answered, and the figures it prints (rates,
//! latency percentiles, windows over time, the server's RSS) are all there.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ttc_sidecar::synthetic_model::SyntheticModel;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the sidecar answers `GET /readyz` with 200.
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.1 200")
}

#[test]
fn the_steady_mix_is_answered_and_measured() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small.gguf");
    SyntheticModel::smollm2(Some(2), 1).write(&model).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_ttc-sidecar"))
            .args(["serve", "--energy-source", "estimate", "--threads", "1"])
            .arg("--model")
            .arg(&model)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !ready(port) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the sidecar did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ttc-load"))
        .args([
            "--url",
            &url,
            "--clients",
            "4",
            "--seconds",
            "4",
            "--interval",
            "2",
        ])
        .args(["--max-tokens", "8", "--samples", "4", "--label", "sidecar"])
        .args(["--pid", &server.0.id().to_string()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    let result: serde_json::Value = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no RESULT line: {text}"));
    assert!(result["answered"].as_u64().unwrap() >= 4, "{text}");
    assert_eq!(result["errors"], serde_json::json!({}), "{text}");
    assert!(result["tokens_per_s"].as_f64().unwrap() > 0.0, "{text}");
    assert!(result["p99_s"].as_f64().unwrap() >= result["p50_s"].as_f64().unwrap());
    assert!(!result["windows"].as_array().unwrap().is_empty(), "{text}");
    assert!(result["rss_end_mib"].as_f64().unwrap() > 10.0, "{text}");
}
