//! Hostile input, many cases each, seeded (property tests where cargo-fuzz needs a nightly
//! toolchain): GGUF headers that claim huge counts, sizes or offsets, or stop anywhere; arbitrary
//! text for the tokenizer; arbitrary request bodies for the API. Each must end in an error or an
//! answer, never a panic, a hang or an allocation beyond the file. Each test prints how many
//! cases it ran.

mod common;

use std::io::Write;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tower::ServiceExt;
use ttc_energy::{EnergyMeter, MeterConfig, SourceChoice};
use ttc_sidecar::api::{AppState, Limits, router};
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::gguf::GgufFile;
use ttc_sidecar::model_store::DEFAULT_MODEL;
use ttc_sidecar::tokenizer::GgufTokenizer;

/// A GGUF v3 string.
fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A small valid GGUF v3 file: one u32 metadata entry and one F32 tensor of `dims`.
fn gguf(tensor_count: u64, kv_count: u64, dims: &[u64], offset: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend(tensor_count.to_le_bytes());
    out.extend(kv_count.to_le_bytes());
    string(&mut out, "general.alignment");
    out.extend(4u32.to_le_bytes()); // UINT32
    out.extend(32u32.to_le_bytes());
    string(&mut out, "w");
    out.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(0u32.to_le_bytes()); // F32
    out.extend(offset.to_le_bytes());
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(0u8, 16));
    out
}

fn open(dir: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join("case.gguf");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(bytes))
        .expect("a temp file");
    GgufFile::open(&path).map(drop).map_err(|e| e.to_string())
}

#[test]
fn hostile_gguf_headers_are_errors_never_panics() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let valid = gguf(1, 1, &[4], 0);
    assert_eq!(
        open(dir.path(), &valid),
        Ok(()),
        "the well-formed file opens"
    );
    let mut cases = 1;
    // Claims no file can hold: each an error that says so.
    for (what, bytes) in [
        ("tensor count", gguf(u64::MAX, 1, &[4], 0)),
        ("metadata count", gguf(1, u64::MAX, &[4], 0)),
        ("dimensions", gguf(1, 1, &[u64::MAX, u64::MAX], 0)),
        ("offset", gguf(1, 1, &[4], u64::MAX - 8)),
        ("size", gguf(1, 1, &[1 << 40, 1 << 20], 0)),
    ] {
        let err = open(dir.path(), &bytes).expect_err(what);
        assert!(
            err.contains("GGUF") || err.contains("truncated"),
            "{what}: {err}"
        );
        cases += 1;
    }
    // Stopped anywhere.
    for len in 0..valid.len() {
        assert!(
            open(dir.path(), &valid[..len]).is_err(),
            "truncated at {len} opened"
        );
        cases += 1;
    }
    // Random damage: bytes flipped, fields overwritten with huge values.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..3000 {
        let mut bytes = valid.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..bytes.len());
            if rng.random_bool(0.5) && at + 8 <= bytes.len() {
                let huge = u64::MAX >> rng.random_range(0..40);
                bytes[at..at + 8].copy_from_slice(&huge.to_le_bytes());
            } else {
                bytes[at] = rng.random();
            }
        }
        let _ = open(dir.path(), &bytes);
        cases += 1;
    }
    println!("GGUF headers: {cases} cases, none panicked");
}

#[test]
fn the_real_models_header_damaged_is_an_error_or_a_model_never_a_panic() {
    let model = std::fs::read(common::default_model_path()).expect("the default model");
    let dir = tempfile::tempdir().expect("a temp dir");
    // The header and vocabulary are in the first 2 MiB; damage there, keep the weights.
    let mut rng = StdRng::seed_from_u64(11);
    let cases = 60;
    for _ in 0..cases {
        let mut bytes = model.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..(2 << 20).min(bytes.len()));
            bytes[at] = rng.random();
        }
        if rng.random_bool(0.3) {
            bytes.truncate(rng.random_range(0..bytes.len()));
        }
        let _ = open(dir.path(), &bytes);
    }
    println!("damaged model headers: {cases} cases, none panicked");
}

#[test]
fn the_tokenizer_takes_arbitrary_text() {
    let gguf = GgufFile::open_header(&common::default_model_path()).expect("the default model");
    let tokenizer = GgufTokenizer::from_gguf(&gguf).expect("its tokenizer");
    let vocab = tokenizer.vocab_size() as u32;
    let mut rng = StdRng::seed_from_u64(3);
    let cases = 3000;
    for i in 0..cases {
        let len = if i % 100 == 0 {
            20_000
        } else {
            rng.random_range(0..64)
        };
        let text = match i % 3 {
            // Arbitrary bytes, as a lossy string.
            0 => String::from_utf8_lossy(&(0..len).map(|_| rng.random()).collect::<Vec<u8>>())
                .into_owned(),
            // Arbitrary code points (controls, combining marks, CJK, emoji, private use).
            1 => (0..len)
                .filter_map(|_| char::from_u32(rng.random_range(0..0x11_0000)))
                .collect(),
            // Long runs of one character: the pre-tokenizer's worst case.
            _ => std::iter::repeat_n(['a', ' ', '\n', '1', '🦀'][i % 5], len).collect(),
        };
        match tokenizer.encode(&text) {
            Ok(ids) => assert!(
                ids.iter().all(|&id| id < vocab),
                "an id beyond the vocabulary"
            ),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    println!("tokenizer: {cases} texts, none panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_request_bodies_get_an_answer_or_a_4xx() {
    let engine = Engine::load(
        &common::default_model_path(),
        DEFAULT_MODEL.name,
        &EngineOptions::default(),
    )
    .expect("the default model");
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Estimate,
        ..MeterConfig::default()
    })
    .expect("a meter");
    let app = router(AppState {
        engine: EngineHandle::spawn(engine, meter).expect("the engine"),
        limits: Limits::default(),
        ttc: None,
        metrics: None,
    });
    let valid = format!(
        r#"{{"model":"{}","messages":[{{"role":"user","content":"Hi"}}],"max_tokens":1,"n":1,"temperature":0.5}}"#,
        DEFAULT_MODEL.name
    );
    let mut rng = StdRng::seed_from_u64(5);
    let (mut answered, mut refused) = (0, 0);
    let cases = 400;
    for i in 0..cases {
        let mut body = valid.clone().into_bytes();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..body.len());
            match rng.random_range(0..3) {
                0 => body[at] = rng.random(),
                1 => {
                    body.remove(at);
                }
                _ => body.insert(at, b"{}[]\",:0-9e\\"[rng.random_range(0..12)]),
            }
        }
        let path = if i % 2 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("a request");
        let response = app.clone().oneshot(request).await.expect("a response");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        assert!(
            status.is_success() || status.is_client_error(),
            "{status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        if status.is_success() {
            answered += 1;
        } else {
            refused += 1;
            let error: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error");
            assert!(error["error"]["message"].is_string(), "{error}");
        }
    }
    println!("request bodies: {cases} cases, {answered} answered, {refused} refused with 4xx");
}
