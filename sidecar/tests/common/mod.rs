//! Shared set-up for tests that run the real default model (fetched once into the cache).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ttc_sidecar::chat_template::ChatMessage;
use ttc_sidecar::engine::GenerationRequest;
use ttc_sidecar::engine::llama::{Kernels, Llama, WeightFormat};
use ttc_sidecar::engine::sampler::SamplerConfig;
use ttc_sidecar::engine::stop::StopStrings;
use ttc_sidecar::gguf::GgufFile;
use ttc_sidecar::model_store::{DEFAULT_MODEL, KnownModel, ModelStore};
use ttc_sidecar::tokenizer::GgufTokenizer;

/// Path of the default model, fetched into the cache on first use.
#[allow(dead_code)] // Not every test binary uses every model.
pub fn default_model_path() -> PathBuf {
    model_path(&DEFAULT_MODEL)
}

/// Path of a known model, fetched into the cache on first use.
#[allow(dead_code)] // Not every test binary uses every model.
pub fn model_path(model: &KnownModel) -> PathBuf {
    ModelStore::default_location()
        .ensure(model, false)
        .unwrap_or_else(|e| panic!("the tests need the model {}: {e}", model.name))
}

/// A greedy path of llama.cpp (llama-cpp-python 0.3.36, one token at a time) on the same file,
/// with the lead of its top logit over the runner-up at each step.
pub struct LlamaCppPath {
    pub prompt: String,
    pub prompt_tokens: usize,
    pub tokens: [u32; 16],
    pub leads: [f32; 16],
}

/// Models are often torn between tokens (leads of 0.01 logits), where any two engines'
/// rounding picks differently, so this follows llama.cpp's path (feeding its tokens) and checks
/// our logits step by step: our top token is llama.cpp's wherever its lead is clear, and
/// llama.cpp's token is never far below our top one.
#[allow(dead_code)] // Not every test binary uses it.
pub fn follows_llama_cpp(
    model: &Path,
    weights: WeightFormat,
    kernels: Kernels,
    paths: &[LlamaCppPath],
) {
    let mut gguf = GgufFile::open(model).unwrap();
    let tokenizer = GgufTokenizer::from_gguf(&gguf).unwrap();
    let model = Llama::load(&mut gguf, weights, kernels, &Device::Cpu).unwrap();
    for path in paths {
        let ids = tokenizer.encode(&path.prompt).unwrap();
        assert_eq!(ids.len(), path.prompt_tokens);
        let mut cache = model.new_cache();
        let mut input = ids;
        for (step, (&token, &lead)) in path.tokens.iter().zip(&path.leads).enumerate() {
            let tokens = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<f32> = model
                .forward(&tokens, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let (top, max) = logits
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a });
            let context = format!(
                "{weights:?} weights, {kernels:?} kernels, {}-token prompt, step {step}: ours picks {top} ({max:.2}), llama.cpp {token} (ours {:.2}, its lead {lead})",
                path.prompt_tokens, logits[token as usize]
            );
            if lead >= 0.5 {
                assert_eq!(top, token as usize, "{context}");
            }
            assert!(max - logits[token as usize] < 0.5, "{context}");
            input = vec![token];
        }
    }
}

/// One user message.
#[allow(dead_code)] // Not every test binary uses it.
pub fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

/// A greedy request for `n` rows of up to `max_tokens`.
#[allow(dead_code)] // Not every test binary uses it.
pub fn greedy(prompt: Vec<u32>, n: usize, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        n,
        max_tokens,
        sampler: SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        },
        seed: 0,
        stop: StopStrings::default(),
        greedy_first_row: false,
    }
}
