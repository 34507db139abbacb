//! The load generator (`ttc-load`) against the sidecar serving a small generated model: the
//! short version of the soak run (`sidecar/bench/soak.sh` runs it for 30 minutes beside
//! llama-server). Every request of the steady mix is answered, and the figures it prints (rates,
//! latency percentiles, windows over time, the server's RSS) are all there; an open loop sends
//! the rate it was given; a failed connection is counted by what failed.

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

/// A sidecar serving a small generated model on a free port; its URL.
fn small_sidecar(dir: &std::path::Path, serve_args: &[&str]) -> (Server, String) {
    let model = dir.join("small.gguf");
    SyntheticModel::smollm2(Some(2), 1).write(&model).unwrap();
    let port = free_port();
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_ttc-sidecar"))
            .args(["serve", "--energy-source", "estimate", "--threads", "1"])
            .arg("--model")
            .arg(&model)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(serve_args)
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
    (server, format!("http://127.0.0.1:{port}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `ttc-load` against `url`; its output and its RESULT line.
fn load(url: &str, args: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_ttc-load"))
        .args(["--url", url, "--label", "sidecar"])
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    let result = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no RESULT line: {text}"));
    (text, result)
}

#[test]
fn the_steady_mix_is_answered_and_measured() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = small_sidecar(dir.path(), &[]);
    let pid = server.0.id().to_string();
    let (text, result) = load(
        &url,
        &[
            "--clients",
            "4",
            "--seconds",
            "4",
            "--interval",
            "2",
            "--max-tokens",
            "8",
            "--samples",
            "4",
            "--pid",
            &pid,
        ],
    );
    assert!(result["answered"].as_u64().unwrap() >= 4, "{text}");
    assert_eq!(result["errors"], serde_json::json!({}), "{text}");
    assert!(result["tokens_per_s"].as_f64().unwrap() > 0.0, "{text}");
    assert!(result["p99_s"].as_f64().unwrap() >= result["p50_s"].as_f64().unwrap());
    assert!(!result["windows"].as_array().unwrap().is_empty(), "{text}");
    assert!(result["rss_end_mib"].as_f64().unwrap() > 10.0, "{text}");
    // The sidecar meters energy (an estimate here): joules per request, no budget without TTC.
    assert!(
        result["joules_per_request"].as_f64().unwrap() > 0.0,
        "{text}"
    );
    assert!(result["budget"].is_null(), "{text}");
}

/// An open loop sends its rate whatever the server does: 5 per second for 4 s is 20 arrivals
/// (one more when the last falls on the stop), every one answered; under a budget, the budget
/// controller's allocation and mean are read.
#[test]
fn an_open_loop_sends_the_rate_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = small_sidecar(dir.path(), &["--ttc", "--joules-per-request", "5"]);
    let (text, result) = load(
        &url,
        &[
            "--rate",
            "5",
            "--seconds",
            "4",
            "--interval",
            "2",
            "--max-tokens",
            "4",
        ],
    );
    let requests = result["requests"].as_u64().unwrap();
    assert!((20..=21).contains(&requests), "{text}");
    assert_eq!(result["answered"].as_u64().unwrap(), requests, "{text}");
    assert_eq!(result["rate"], 5.0, "{text}");
    assert_eq!(result["budget"]["allocation_j"], 5.0, "{text}");
    assert!(result["budget"]["mean_j"].as_f64().unwrap() > 0.0, "{text}");
}

/// A server that lists a model and then drops every connection it is sent a request on: the
/// load generator counts the failures by what failed, not as a bare status 0.
#[test]
fn a_dropped_connection_is_counted_by_what_failed() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            if request[..n].starts_with(b"GET /v1/models") {
                let body = r#"{"data":[{"id":"m"}]}"#;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        }
    });
    let (text, result) = load(
        &url,
        &["--clients", "1", "--seconds", "1", "--interval", "1"],
    );
    let errors = result["errors"].as_object().unwrap();
    assert!(!errors.is_empty(), "{text}");
    assert!(
        errors.keys().all(|k| k.starts_with("transport: ")),
        "{text}"
    );
    assert_eq!(result["answered"], 0, "{text}");
    assert!(result["joules_per_request"].is_null(), "{text}");
}
