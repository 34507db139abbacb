//! The two compute paths side by side: candle's ops (the path a GPU takes) against our fused CPU
//! kernels, on the same Q8_0 weights and the default model.
//!
//! Both quantize activations per block of 32 values here, as llama.cpp's Q8_0 path does: this
//! binary turns our 512-bit kernel off ([`ttc_kernels::q8::use_block_activations`]), whose groups
//! of 256 values round activations more coarsely (on a CPU with AVX-512 VNNI its logits part from
//! candle's by 8 % of the largest at a prefill, and greedy picks part at near-ties). That kernel
//! is checked against the float product in its crate and against llama.cpp's tokens in
//! `tests/engine.rs`.

mod common;

use candle_core::{Device, Tensor};
use common::{greedy, user};
use ttc_sidecar::engine::llama::{Kernels, Llama, WeightFormat};
use ttc_sidecar::engine::{Engine, EngineOptions};
use ttc_sidecar::gguf::GgufFile;
use ttc_sidecar::model_store::DEFAULT_MODEL;

const PATHS: [Kernels; 2] = [Kernels::Fused, Kernels::Candle];

/// The default model on a compute path, our kernels on blocks of 32 activations.
fn engine_on(kernels: Kernels) -> Engine {
    ttc_kernels::q8::use_block_activations();
    let options = EngineOptions {
        kernels,
        ..EngineOptions::default()
    };
    Engine::load(&common::default_model_path(), DEFAULT_MODEL.name, &options)
        .unwrap_or_else(|e| panic!("loading the default model: {e}"))
}

/// The largest difference between the two paths' logits at any step, relative to the step's
/// largest logit magnitude. Both run the same Q8_0 weights on activations quantized to 8 bits
/// per layer; a sum in another order (1e-5) flips some activation's rounding, and over 30
/// layers such flips move SmolLM2's logits by a few percent of the largest. Measured on
/// 2026-12-07 with this test: up to 4.5 % on an x86-64 CPU with AVX2 (1.2 of 26.4 at the
/// prefill), up to 6.1 % on an AMD EPYC with AVX-512 (1.6 of 26.4 at the prefill; 2.3-5.6 %
/// over the 31 decode steps), where attention and the activations run 512-bit code.
const PATHS_TOLERANCE: f32 = 0.08;

/// The lead of the top logit over the runner-up past which both paths must pick it.
const CLEAR_LEAD: f32 = 1.0;

/// candle's ops (the GPU's path) compute our kernels' logits: 32 greedy steps after a chat
/// prompt, logits within [`PATHS_TOLERANCE`] at every step, the same token picked wherever
/// the lead is clear ([`CLEAR_LEAD`]).
#[test]
fn the_candle_path_computes_the_fused_paths_logits() {
    let prompt = engine_on(Kernels::Fused)
        .encode_chat(&user("Write a short poem about the sea."))
        .unwrap();
    ttc_kernels::q8::use_block_activations();
    let models = PATHS.map(|kernels| {
        let mut gguf = GgufFile::open(&common::default_model_path()).unwrap();
        Llama::load(&mut gguf, WeightFormat::Q8_0, kernels, &Device::Cpu).unwrap()
    });
    let mut caches = models.each_ref().map(Llama::new_cache);
    let mut input = prompt;
    let mut worst = 0f32;
    for step in 0..32 {
        let tokens = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let [fused, candle]: [Vec<f32>; 2] = [0, 1].map(|i| {
            models[i]
                .forward(&tokens, &mut caches[i])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        });
        let spread = fused.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = fused
            .iter()
            .zip(&candle)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(diff / spread);
        assert!(
            diff <= PATHS_TOLERANCE * spread,
            "step {step}: logits differ by {diff} (largest logit {spread})"
        );
        let [(top, lead), (candle_top, _)] = [&fused, &candle].map(|l| top_and_lead(l));
        if lead > CLEAR_LEAD {
            assert_eq!(
                top, candle_top,
                "step {step}: greedy picks differ (lead {lead})"
            );
        }
        input = vec![top];
    }
    eprintln!("largest relative logit difference over 32 steps: {worst:.2e}");
}

/// The index of the largest logit and its lead over the runner-up.
fn top_and_lead(logits: &[f32]) -> (u32, f32) {
    let (mut top, mut first, mut second) = (0, f32::MIN, f32::MIN);
    for (i, &x) in logits.iter().enumerate() {
        if x > first {
            (top, first, second) = (i, x, first);
        } else if x > second {
            second = x;
        }
    }
    (top as u32, first - second)
}

/// Greedy generation through the engine (prefill, shared-prefix decode, sampling) starts with
/// the same tokens on both paths. Past a near-tie the paths may part, as two GPUs may: on the
/// AMD EPYC above they parted at the 12th token (in the logits test, 5 of the 32 steps have a
/// lead under 0.1), while wiring gone wrong parts them from the first.
#[test]
fn greedy_generation_starts_the_same_on_both_paths() {
    let [fused, candle] = PATHS.map(|kernels| {
        let engine = engine_on(kernels);
        let prompt = engine
            .encode_chat(&user("Name the planets of the solar system."))
            .unwrap();
        let out = engine
            .generate(greedy(prompt, 1, 32), &mut |_| true)
            .unwrap();
        out.completions[0].token_ids.clone()
    });
    assert!(fused.len() > 8, "{fused:?}");
    assert_eq!(fused[..8], candle[..8], "{fused:?}\n{candle:?}");
}
