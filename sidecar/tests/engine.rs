//! The engine on the real default model: tokenizer ids, chat template, shared-prefix batched
//! sampling, model-file errors, and best-of-N's window cut short by an accepted row.
//!
//! Every feature test runs on both compute paths: our fused CPU kernels and candle's ops only
//! (the path a GPU takes), so the GPU's code path is exercised where no GPU is; `tests/paths.rs`
//! compares the two paths' figures.

mod common;

use common::{greedy, user};

use std::sync::{Arc, OnceLock};

use ttc_core::{Verifier, VerifierSpec};
use ttc_energy::{EnergyMeter, MeterConfig, SourceChoice};
use ttc_sidecar::engine::llama::{Kernels, WeightFormat};
use ttc_sidecar::engine::sampler::SamplerConfig;
use ttc_sidecar::engine::stop::StopStrings;
use ttc_sidecar::engine::worker::EngineHandle;
use ttc_sidecar::engine::{
    Engine, EngineOptions, FinishReason, GenerationEvent, GenerationRequest,
};
use ttc_sidecar::gguf::{GgufError, GgufFile};
use ttc_sidecar::model_store::DEFAULT_MODEL;
use ttc_sidecar::ttc_service::verified_window;

/// Both compute paths.
const PATHS: [Kernels; 2] = [Kernels::Fused, Kernels::Candle];

fn options(kernels: Kernels) -> EngineOptions {
    EngineOptions {
        kernels,
        ..EngineOptions::default()
    }
}

/// The default model on our kernels, loaded once per test binary.
fn engine() -> Arc<Engine> {
    engine_on(Kernels::Fused)
}

/// The default model on a compute path, loaded once per test binary.
fn engine_on(kernels: Kernels) -> Arc<Engine> {
    static ENGINES: [OnceLock<Arc<Engine>>; 2] = [OnceLock::new(), OnceLock::new()];
    ENGINES[kernels as usize]
        .get_or_init(|| {
            let engine = Engine::load(
                &common::default_model_path(),
                DEFAULT_MODEL.name,
                &options(kernels),
            )
            .unwrap_or_else(|e| panic!("loading the default model: {e}"));
            Arc::new(engine)
        })
        .clone()
}

/// A worker thread of its own over the default model, metered by the estimate.
fn worker(kernels: Kernels) -> EngineHandle {
    let meter = EnergyMeter::from_config(&MeterConfig {
        source: SourceChoice::Estimate,
        ..MeterConfig::default()
    })
    .unwrap();
    EngineHandle::spawn(
        Engine::load(
            &common::default_model_path(),
            DEFAULT_MODEL.name,
            &options(kernels),
        )
        .unwrap(),
        meter,
    )
    .unwrap()
}

/// Ids from llama.cpp (llama-cpp-python 0.3.36, `tokenize(special=True)`) on the same file.
#[test]
fn tokenizer_matches_llama_cpp_ids() {
    let engine = engine();
    let t = engine.tokenizer();
    let cases: &[(&str, &[u32])] = &[("<|im_start|>assistant\n", &[1, 520, 9531, 198])];
    for (text, ids) in cases {
        assert_eq!(t.encode(text).unwrap(), *ids, "ids of {text:?}");
        assert_eq!(
            t.decode(ids).unwrap(),
            text.replace("<|im_start|>", ""),
            "round trip of {text:?}"
        );
    }
}

/// llama.cpp's greedy paths on the same file (llama-cpp-python 0.3.36, one token at a time),
/// with its lead over the runner-up at each step (0.014 logits at one step of the story: a coin
/// flip for any two engines).
fn llama_cpp_paths() -> [common::LlamaCppPath; 2] {
    [
        common::LlamaCppPath {
            prompt: "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
                .into(),
            prompt_tokens: 16,
            tokens: [504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1],
            leads: [
                1.689, 5.806, 5.564, 5.564, 4.573, 5.373, 1.373, 2.037, 9.163, 3.023, 8.23, 11.316,
                4.6, 1.694, 10.249, 7.195,
            ],
        },
        common::LlamaCppPath {
            prompt: "Once upon a time".into(),
            prompt_tokens: 4,
            tokens: [
                28, 260, 2240, 282, 23324, 27108, 436, 253, 15114, 39228, 28, 351, 25854, 41658,
                284, 14055,
            ],
            leads: [
                4.031, 0.343, 0.475, 0.687, 0.014, 1.7, 1.044, 0.538, 0.717, 1.464, 0.978, 0.555,
                2.411, 1.775, 0.874, 1.315,
            ],
        },
    ]
}

/// Along llama.cpp's paths our logits pick its tokens wherever its lead is clear, on the file's
/// own Q4_1 weights (our Q4_1 kernel, or candle's) and on weights requantized to Q8_0 at load,
/// on both compute paths.
#[test]
fn follows_llama_cpp_on_native_and_q8_weights() {
    for kernels in PATHS {
        for weights in [WeightFormat::Native, WeightFormat::Q8_0] {
            common::follows_llama_cpp(
                &common::default_model_path(),
                weights,
                kernels,
                &llama_cpp_paths(),
            );
        }
    }
}

#[test]
fn chat_template_from_gguf_adds_default_system_prompt() {
    let engine = engine();
    let ids = engine.encode_chat(&user("Hi")).unwrap();
    let text = engine.tokenizer().decode(&ids).unwrap();
    assert!(
        text.starts_with("system\nYou are a helpful AI assistant named SmolLM"),
        "{text:?}"
    );
    assert_eq!(ids[0], 1, "starts with <|im_start|>");
    assert_eq!(
        &ids[ids.len() - 4..],
        &[1, 520, 9531, 198],
        "ends with the assistant header"
    );
}

#[test]
fn batched_greedy_rows_equal_single_greedy() {
    for kernels in PATHS {
        batched_greedy_rows_equal_single_greedy_on(kernels);
    }
}

fn batched_greedy_rows_equal_single_greedy_on(kernels: Kernels) {
    let engine = engine_on(kernels);
    let prompt = engine
        .encode_chat(&user("What is the capital of France?"))
        .unwrap();
    let single = engine
        .generate(greedy(prompt.clone(), 1, 24), &mut |_| true)
        .unwrap();
    let batch = engine
        .generate(greedy(prompt, 4, 24), &mut |_| true)
        .unwrap();
    assert_eq!(batch.completions.len(), 4);
    assert!(!single.completions[0].text.is_empty());
    // Our kernels compute a row the same whatever the batch; candle's matmuls pick other tiles
    // for more rows (sums in other orders, see `tests/paths.rs`), so there the rows of a batch
    // agree with each other and start as the single row does, and may part from it at a
    // near-tie further on, as on a GPU.
    let expected = match kernels {
        Kernels::Fused => &single.completions[0].token_ids,
        Kernels::Candle => {
            assert_eq!(
                batch.completions[0].token_ids[..4],
                single.completions[0].token_ids[..4],
                "candle: the batch starts elsewhere"
            );
            &batch.completions[0].token_ids
        }
    };
    for c in &batch.completions {
        assert_eq!(
            &c.token_ids, expected,
            "{kernels:?}: row {} differs",
            c.index
        );
    }
    // The prompt is computed once, whatever n is: by the single request; the batch reuses it
    // (the prefix cache) and decodes its four rows together.
    assert_eq!(single.passes[0].tokens, single.prompt_tokens);
    assert!(
        batch.passes.iter().all(|p| p.tokens <= 4),
        "{:?}",
        batch.passes
    );
    assert_eq!(batch.passes[0].tokens, 4);
}

/// Requests submitted together decode in shared passes (rows of several requests in one pass,
/// each at its own position) and get exactly the tokens each gets alone.
#[tokio::test]
async fn concurrent_requests_share_decode_passes_and_decode_as_alone() {
    for kernels in PATHS {
        concurrent_requests_share_decode_passes_and_decode_as_alone_on(kernels).await;
    }
}

async fn concurrent_requests_share_decode_passes_and_decode_as_alone_on(kernels: Kernels) {
    let engine = engine_on(kernels);
    let prompts: Vec<Vec<u32>> = [
        "What is 2 + 2?",
        "Name a color.",
        "Write one short sentence about the sea and the sky.",
    ]
    .iter()
    .map(|q| engine.encode_chat(&user(q)).unwrap())
    .collect();
    let alone: Vec<Vec<Vec<u32>>> = prompts
        .iter()
        .map(|p| {
            let out = engine
                .generate(greedy(p.clone(), 2, 12), &mut |_| true)
                .unwrap();
            out.completions.into_iter().map(|c| c.token_ids).collect()
        })
        .collect();
    let handle = worker(kernels);
    // All queued before any is awaited (without admission control, submitting waits for nothing).
    let mut submissions = Vec::new();
    for p in &prompts {
        submissions.push(
            handle
                .submit(greedy(p.clone(), 2, 12), false)
                .await
                .unwrap(),
        );
    }
    let mut widest = 0;
    for (submission, alone) in submissions.into_iter().zip(&alone) {
        let out = submission.done.await.unwrap().unwrap();
        let ids: Vec<Vec<u32>> = out.completions.into_iter().map(|c| c.token_ids).collect();
        assert_eq!(&ids, alone, "{kernels:?}");
        assert!(out.energy.is_some_and(|e| e.joules > 0.0));
        widest = widest.max(out.passes.iter().map(|p| p.batch_rows).max().unwrap_or(0));
    }
    assert!(
        widest > 2,
        "{kernels:?}: no decode pass held rows of more than one request (widest {widest})"
    );
}

/// The default model has no `<think>` block (neither in its template nor as a token), so the
/// adaptive policy never plans a reasoning budget for it.
#[test]
fn the_default_model_is_not_a_reasoning_model() {
    assert!(!engine().is_reasoning_model());
}

#[test]
fn seeded_sampling_is_reproducible_and_rows_differ() {
    for kernels in PATHS {
        seeded_sampling_is_reproducible_and_rows_differ_on(kernels);
    }
}

fn seeded_sampling_is_reproducible_and_rows_differ_on(kernels: Kernels) {
    let engine = engine_on(kernels);
    let prompt = engine.encode_chat(&user("Write a word.")).unwrap();
    let request = GenerationRequest {
        prompt,
        n: 6,
        max_tokens: 12,
        sampler: SamplerConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        },
        seed: 42,
        stop: StopStrings::default(),
        greedy_first_row: false,
    };
    let a = engine.generate(request.clone(), &mut |_| true).unwrap();
    let b = engine.generate(request.clone(), &mut |_| true).unwrap();
    assert_eq!(a.completions, b.completions);
    let distinct: std::collections::HashSet<_> =
        a.completions.iter().map(|c| c.token_ids.clone()).collect();
    assert!(
        distinct.len() > 1,
        "six samples at temperature 1 were all identical"
    );
    // A greedy first row decodes what greedy decoding does and leaves the other rows' samples
    // as they were.
    let with_greedy = engine
        .generate(
            GenerationRequest {
                greedy_first_row: true,
                ..request.clone()
            },
            &mut |_| true,
        )
        .unwrap();
    let alone = engine
        .generate(greedy(request.prompt.clone(), 1, 12), &mut |_| true)
        .unwrap();
    let ids = |out: &ttc_sidecar::engine::GenerationOutput| -> Vec<Vec<u32>> {
        out.completions
            .iter()
            .map(|c| c.token_ids.clone())
            .collect()
    };
    assert_eq!(ids(&with_greedy)[0], ids(&alone)[0]);
    assert_eq!(ids(&with_greedy)[1..], ids(&a)[1..]);
}

/// The second request with a prompt starts from the kept prefill: no prefill pass, and exactly
/// the samples a fresh prefill gives (the first request computed those).
#[test]
fn a_repeated_prompt_skips_its_prefill_and_samples_the_same() {
    for kernels in PATHS {
        a_repeated_prompt_skips_its_prefill_and_samples_the_same_on(kernels);
    }
}

fn a_repeated_prompt_skips_its_prefill_and_samples_the_same_on(kernels: Kernels) {
    let engine = Engine::load(
        &common::default_model_path(),
        DEFAULT_MODEL.name,
        &options(kernels),
    )
    .unwrap();
    let prompt = engine
        .encode_chat(&user("Name three colours of the rainbow."))
        .unwrap();
    let request = GenerationRequest {
        sampler: SamplerConfig {
            temperature: 0.8,
            ..Default::default()
        },
        seed: 3,
        ..greedy(prompt.clone(), 3, 12)
    };
    let fresh = engine.generate(request.clone(), &mut |_| true).unwrap();
    let reused = engine.generate(request, &mut |_| true).unwrap();
    assert_eq!(fresh.passes[0].tokens, prompt.len());
    assert!(
        reused.passes.iter().all(|p| p.tokens <= 3),
        "the second request ran a prefill: {:?}",
        reused.passes
    );
    assert_eq!(fresh.completions, reused.completions);
    let (hits, misses, bytes) = engine.prefix_cache_stats();
    assert_eq!((hits, misses), (1, 1));
    assert!(bytes > 0);
    engine.clear_prefix_cache();
    let again = engine
        .generate(greedy(prompt.clone(), 1, 4), &mut |_| true)
        .unwrap();
    assert_eq!(
        again.passes[0].tokens,
        prompt.len(),
        "cleared, yet no prefill"
    );
}

#[test]
fn stop_strings_and_limits_end_rows_and_events_add_up() {
    for kernels in PATHS {
        stop_strings_and_limits_end_rows_and_events_add_up_on(kernels);
    }
}

fn stop_strings_and_limits_end_rows_and_events_add_up_on(kernels: Kernels) {
    let engine = engine_on(kernels);
    let prompt = engine
        .encode_chat(&user("Count from 1 to 20, separated by commas."))
        .unwrap();
    let mut request = greedy(prompt, 2, 40);
    request.stop = StopStrings::new(["5".to_owned()]);
    let mut streamed = vec![String::new(); 2];
    let mut finished = [None; 2];
    let out = engine
        .generate(request, &mut |e| {
            match e {
                GenerationEvent::Text { index, delta } => streamed[index].push_str(&delta),
                GenerationEvent::Finished { index, finish } => finished[index] = Some(finish),
            }
            true
        })
        .unwrap();
    for c in &out.completions {
        assert!(!c.text.contains('5'), "stop string leaked: {:?}", c.text);
        assert_eq!(
            streamed[c.index], c.text,
            "streamed text differs from the final text"
        );
        assert_eq!(finished[c.index], Some(c.finish));
    }
    let short = engine
        .generate(
            greedy(engine.encode("Once upon a time").unwrap(), 1, 3),
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(short.completions[0].finish, FinishReason::Length);
    assert_eq!(short.completions[0].token_ids.len(), 3);
}

#[test]
fn cancelling_stops_generation() {
    for kernels in PATHS {
        let engine = engine_on(kernels);
        let out = engine
            .generate(
                greedy(engine.encode("Once upon a time").unwrap(), 2, 50),
                &mut |e| !matches!(e, GenerationEvent::Text { .. }),
            )
            .unwrap();
        assert!(
            out.completions
                .iter()
                .all(|c| c.finish == FinishReason::Cancelled),
            "{kernels:?}"
        );
        assert!(out.completion_tokens < 10, "{kernels:?}");
    }
}

#[test]
fn model_file_errors_name_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.gguf");
    let err = Engine::load(&missing, "x", &EngineOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("absent.gguf") && err.contains("fetch-model"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    assert!(matches!(
        GgufFile::open(&garbage),
        Err(GgufError::Invalid { .. })
    ));

    let truncated = dir.path().join("truncated.gguf");
    let full = std::fs::read(common::default_model_path()).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let err = Engine::load(&truncated, "x", &EngineOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("truncated.gguf") && err.contains("truncated"),
        "{err}"
    );
}

/// Best-of-N's window: rows are verified as they finish and the first accepted one cancels the
/// rest, which stop short of their token limit instead of running on.
#[tokio::test]
async fn an_accepted_row_ends_its_window_and_cuts_the_others_short() {
    for kernels in PATHS {
        an_accepted_row_ends_its_window_and_cuts_the_others_short_on(kernels).await;
    }
}

async fn an_accepted_row_ends_its_window_and_cuts_the_others_short_on(kernels: Kernels) {
    let handle = worker(kernels);
    let prompt = engine_on(kernels)
        .encode_chat(&user("What is 2 + 3? Answer with the number only."))
        .unwrap();
    let max_tokens = 64;
    let request = GenerationRequest {
        sampler: SamplerConfig {
            temperature: 1.5,
            ..Default::default()
        },
        seed: 5,
        greedy_first_row: true,
        ..greedy(prompt, 4, max_tokens)
    };
    // Accepts any answer: whichever row finishes first wins.
    let verifier = Verifier::from_spec(&VerifierSpec::Regex(".".into()), None).unwrap();
    let (out, verdicts) = verified_window(&handle, request, &verifier, "What is 2 + 3?")
        .await
        .unwrap();
    assert_eq!(out.completions.len(), 4);
    let accepted: Vec<usize> = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| v.as_ref().is_some_and(|v| v.accepted))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(accepted.len(), 1, "{verdicts:?}");
    let first = &out.completions[accepted[0]];
    assert_ne!(first.finish, FinishReason::Cancelled);
    let cut: Vec<_> = out
        .completions
        .iter()
        .filter(|c| c.finish == FinishReason::Cancelled)
        .collect();
    assert!(
        !cut.is_empty(),
        "no row was still running when {} tokens were accepted: {:?}",
        first.token_ids.len(),
        out.completions
    );
    for c in cut {
        assert!(
            c.token_ids.len() < max_tokens && verdicts[c.index].is_none(),
            "{c:?}"
        );
    }
}

/// A build without the `cuda` feature asked for the GPU says what to run instead.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_cpu_build_names_the_fix() {
    let options = EngineOptions {
        cuda: true,
        ..EngineOptions::default()
    };
    let err = Engine::load(&common::default_model_path(), "x", &options)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("e2e/cuda/build.sh"), "{err}");
}
