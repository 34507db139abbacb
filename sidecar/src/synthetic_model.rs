//! GGUF files of a real model's shape with seeded random weights: what a GPU check runs where no
//! model file can be carried (time and energy per token depend on shapes, not values), and the
//! same file, bit for bit, wherever the seed is the same, so logits computed on one machine check
//! another's.
//!
//! The vocabulary is synthetic too: the 256 byte-level symbols, the chat's special tokens, and
//! pairs of symbols with the merges that make them, as many as the shape's vocabulary size.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// A llama-architecture shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// What the shape is of.
    pub name: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
}

/// SmolLM2-135M-Instruct, the default model: 30 layers, 576 wide, 9 heads over 3 KV heads, a
/// 49,152-token vocabulary tied to the output.
pub const SMOLLM2_135M: ModelShape = ModelShape {
    name: "SmolLM2-135M",
    layers: 30,
    hidden: 576,
    ffn: 1536,
    heads: 9,
    kv_heads: 3,
    vocab: 49_152,
    context: 8192,
    rope_base: 100_000.0,
};

/// The special tokens, at the ids SmolLM2 has them.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// What to write: a shape (possibly with fewer layers), a seed, and the weights' block type.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticModel {
    pub shape: ModelShape,
    pub seed: u64,
    pub dtype: GgmlDType,
}

impl SyntheticModel {
    /// The default model's shape at Q8_0, with `layers` layers (all 30 when `None`).
    pub fn smollm2(layers: Option<usize>, seed: u64) -> Self {
        let mut shape = SMOLLM2_135M;
        if let Some(layers) = layers {
            shape.layers = layers.max(1);
        }
        Self {
            shape,
            seed,
            dtype: GgmlDType::Q8_0,
        }
    }

    /// A name saying what the file holds, for file names and reports.
    pub fn label(&self) -> String {
        format!(
            "{}-{}layers-seed{}-{:?}",
            self.shape.name, self.shape.layers, self.seed, self.dtype
        )
        .to_lowercase()
    }

    /// Writes the GGUF file.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let s = &self.shape;
        let head_dim = s.hidden / s.heads;
        let mut rng = SplitMix64(self.seed);
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: String, shape: &[usize], scale: f32, rng: &mut SplitMix64| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| rng.uniform() * scale).collect();
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
            tensors.push((name, QTensor::quantize(&tensor, self.dtype)?));
            anyhow::Ok(())
        };
        let ones = |n: usize| -> anyhow::Result<QTensor> {
            let tensor = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?;
            Ok(QTensor::quantize(&tensor, GgmlDType::F32)?)
        };
        // Weights uniform in +-sqrt(3 / fan-in): unit variance through each projection, so
        // activations keep the scale a trained model's have.
        let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        add(
            "token_embd.weight".into(),
            &[s.vocab, s.hidden],
            1.0,
            &mut rng,
        )?;
        for l in 0..s.layers {
            let b = |part: &str| format!("blk.{l}.{part}.weight");
            add(
                b("attn_q"),
                &[s.heads * head_dim, s.hidden],
                scale(s.hidden),
                &mut rng,
            )?;
            add(
                b("attn_k"),
                &[s.kv_heads * head_dim, s.hidden],
                scale(s.hidden),
                &mut rng,
            )?;
            add(
                b("attn_v"),
                &[s.kv_heads * head_dim, s.hidden],
                scale(s.hidden),
                &mut rng,
            )?;
            add(
                b("attn_output"),
                &[s.hidden, s.hidden],
                scale(s.hidden),
                &mut rng,
            )?;
            add(b("ffn_gate"), &[s.ffn, s.hidden], scale(s.hidden), &mut rng)?;
            add(b("ffn_up"), &[s.ffn, s.hidden], scale(s.hidden), &mut rng)?;
            add(b("ffn_down"), &[s.hidden, s.ffn], scale(s.ffn), &mut rng)?;
        }
        let mut norms = vec![("output_norm.weight".to_owned(), ones(s.hidden)?)];
        for l in 0..s.layers {
            norms.push((format!("blk.{l}.attn_norm.weight"), ones(s.hidden)?));
            norms.push((format!("blk.{l}.ffn_norm.weight"), ones(s.hidden)?));
        }
        tensors.extend(norms);

        let (tokens, merges) = vocabulary(s.vocab);
        let types: Vec<Value> = (0..tokens.len())
            .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
            .collect();
        let u32v = |v: usize| Value::U32(v as u32);
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String(self.label())),
            ("llama.block_count", u32v(s.layers)),
            ("llama.context_length", u32v(s.context)),
            ("llama.embedding_length", u32v(s.hidden)),
            ("llama.feed_forward_length", u32v(s.ffn)),
            ("llama.attention.head_count", u32v(s.heads)),
            ("llama.attention.head_count_kv", u32v(s.kv_heads)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(s.rope_base)),
            ("llama.rope.dimension_count", u32v(head_dim)),
            ("llama.vocab_size", u32v(s.vocab)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", strings(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", strings(merges)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ];
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let partial = path.with_extension("gguf.partial");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        gguf_file::write(&mut file, &metadata_refs, &tensor_refs)?;
        drop(file);
        std::fs::rename(&partial, path)?;
        Ok(())
    }
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for the
/// characters from U+0100 on, in byte order.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a Latin-1 code point")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("a code point below U+0200")
            }
        })
        .collect()
}

/// `size` tokens (the specials, the byte symbols, then pairs of symbols) and the merges that
/// build the pairs.
fn vocabulary(size: usize) -> (Vec<String>, Vec<String>) {
    let symbols = byte_symbols();
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(symbols.iter().map(char::to_string));
    let mut merges = Vec::new();
    'pairs: for a in &symbols {
        for b in &symbols {
            if tokens.len() >= size {
                break 'pairs;
            }
            tokens.push(format!("{a}{b}"));
            merges.push(format!("{a} {b}"));
        }
    }
    (tokens, merges)
}

/// SplitMix64: the same weights from the same seed on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineOptions};

    #[test]
    fn the_vocabulary_has_the_shapes_size_and_merges_for_its_pairs() {
        let (tokens, merges) = vocabulary(SMOLLM2_135M.vocab);
        assert_eq!(tokens.len(), SMOLLM2_135M.vocab);
        assert_eq!(merges.len(), tokens.len() - 256 - SPECIALS.len());
        assert_eq!(tokens[1], "<|im_start|>");
        let unique: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(unique.len(), tokens.len(), "duplicate tokens");
    }

    #[test]
    fn a_two_layer_file_loads_chats_and_is_the_same_for_the_same_seed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a.gguf"),
            dir.path().join("b.gguf"),
            dir.path().join("c.gguf"),
        );
        SyntheticModel::smollm2(Some(2), 7).write(&a).unwrap();
        SyntheticModel::smollm2(Some(2), 7).write(&b).unwrap();
        SyntheticModel::smollm2(Some(2), 8).write(&c).unwrap();
        let bytes = |p: &Path| std::fs::read(p).unwrap();
        assert_eq!(bytes(&a), bytes(&b));
        assert_ne!(bytes(&a), bytes(&c));
        let engine = Engine::load(&a, "synthetic", &EngineOptions::default()).unwrap();
        let ids = engine
            .encode_chat(&[crate::chat_template::ChatMessage {
                role: "user".into(),
                content: "Hello, world".into(),
            }])
            .unwrap();
        assert_eq!(ids[0], 1, "starts with <|im_start|>");
        let text = engine.tokenizer().decode(&ids).unwrap();
        assert!(text.contains("Hello, world"), "{text:?}");
        assert_eq!(engine.model().config().n_layer, 2);
    }
}
