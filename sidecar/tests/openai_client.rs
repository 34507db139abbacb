//! The standalone sidecar, started as its users start it, answers the official OpenAI Python
//! client: models, chat with n=8, streaming, text completions, and a 404 for an unknown model.
//! Needs `python3` with the `openai` package (e2e/test.sh installs it).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ttc_sidecar::model_store::DEFAULT_MODEL;

/// Kills the sidecar when the test ends, whatever happens.
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_official_openai_client_works_against_the_sidecar() {
    common::default_model_path();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut sidecar = Sidecar(
        Command::new(env!("CARGO_BIN_EXE_ttc-sidecar"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--energy-source",
                "estimate",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting ttc-sidecar"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = sidecar.0.try_wait() {
            panic!("ttc-sidecar exited before it was ready: {status}");
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ttc-sidecar did not listen within 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let output = Command::new(std::env::var("TTC_PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(script)
        .env("SIDECAR_URL", &url)
        .env("SIDECAR_MODEL", DEFAULT_MODEL.name)
        .output()
        .expect("running python3");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the OpenAI client script failed (is the `openai` package installed? `pip install openai`):\n{stderr}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("openai client: ok"));
}
