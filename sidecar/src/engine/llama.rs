//! A llama-family transformer over quantized GGUF weights, with the KV cache held outside the
//! weights so that one prompt's cache can be shared by many sampled rows and rows can leave the
//! batch as they finish.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, RmsNorm};

use crate::gguf::{GgufError, GgufFile};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error("model file {path}: architecture `{arch}` is not supported yet (supported: llama)")]
    Architecture { path: String, arch: String },
    #[error("model file {path}: tensor `{name}`: {source}")]
    Tensor {
        path: String,
        name: String,
        source: Box<candle_core::Error>,
    },
    // Boxed: candle's error is large, and every Result of the engine carries its size.
    #[error("model computation failed: {0}")]
    Compute(Box<candle_core::Error>),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Compute(Box::new(e))
    }
}

/// How weights are kept in memory.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum WeightFormat {
    /// As stored in the file.
    Native,
    /// Requantized to Q8_0 at load: on CPU candle has SIMD kernels for Q8_0 but not for Q4_1,
    /// measured 1.5x decode and 2.8x prefill speed for twice the weight memory.
    #[default]
    Q8_0,
}

/// Shape parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
}

struct Layer {
    attn_norm: RmsNorm,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: RmsNorm,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// The loaded weights; immutable, so several caches (requests) can use them.
pub struct Llama {
    config: LlamaConfig,
    embeddings: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Per-layer keys and values of `rows` sequences that share one position counter.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of positions cached.
    pub len: usize,
}

impl KvCache {
    /// An empty cache for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Bytes of the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Number of rows (sequences) the cache holds; 0 when empty.
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[0])
            .unwrap_or(0)
    }

    /// Repeats a one-row cache (a prefilled prompt) into `n` identical rows.
    pub fn repeat_rows(&self, n: usize) -> candle_core::Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| Ok((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?)))
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// Keeps only the given rows, in the given order (rows that finished leave the batch).
    pub fn select_rows(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone())
        else {
            return Ok(());
        };
        let index = Tensor::new(rows, &device)?;
        for layer in self.layers.iter_mut().flatten() {
            *layer = (
                layer.0.index_select(&index, 0)?,
                layer.1.index_select(&index, 0)?,
            );
        }
        Ok(())
    }
}

fn tensor(gguf: &mut GgufFile, name: &str, device: &Device) -> Result<QTensor, ModelError> {
    let path = gguf.path.display().to_string();
    gguf.content
        .tensor(&mut gguf.reader, name, device)
        .map_err(|source| ModelError::Tensor {
            path,
            name: name.to_owned(),
            source: Box::new(source),
        })
}

fn matmul(q: QTensor, format: WeightFormat, device: &Device) -> Result<QMatMul, ModelError> {
    let q = match format {
        WeightFormat::Q8_0
            if q.dtype() != GgmlDType::Q8_0
                && q.shape().dims().last().is_some_and(|d| d % 32 == 0) =>
        {
            QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?
        }
        _ => q,
    };
    Ok(QMatMul::from_qtensor(q)?)
}

fn rms_norm(q: QTensor, eps: f64, device: &Device) -> Result<RmsNorm, ModelError> {
    Ok(RmsNorm::new(q.dequantize(device)?, eps))
}

impl Llama {
    /// Loads a llama-architecture GGUF model.
    pub fn load(
        gguf: &mut GgufFile,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let arch = gguf.string("general.architecture")?.to_owned();
        if arch != "llama" {
            return Err(ModelError::Architecture {
                path: gguf.path.display().to_string(),
                arch,
            });
        }
        let n_head = gguf.u32("llama.attention.head_count")? as usize;
        let hidden = gguf.u32("llama.embedding_length")? as usize;
        let head_dim = gguf
            .u32_opt("llama.rope.dimension_count")
            .map(|d| d as usize)
            .unwrap_or(hidden / n_head);
        let config = LlamaConfig {
            n_layer: gguf.u32("llama.block_count")? as usize,
            n_head,
            n_kv_head: gguf
                .u32_opt("llama.attention.head_count_kv")
                .map(|d| d as usize)
                .unwrap_or(n_head),
            head_dim,
            hidden,
            context_length: gguf
                .u32_opt("llama.context_length")
                .map(|d| d as usize)
                .unwrap_or(2048),
            rms_eps: gguf
                .f32("llama.attention.layer_norm_rms_epsilon")
                .map(f64::from)
                .unwrap_or(1e-5),
            rope_base: gguf.f32("llama.rope.freq_base").unwrap_or(10_000.0),
        };
        let (cos, sin) = rope_tables(&config, device)?;
        let embedding_q = tensor(gguf, "token_embd.weight", device)?;
        let embeddings = Embedding::new(embedding_q.dequantize(device)?, hidden);
        // Small models tie the output projection to the embeddings and store no `output.weight`.
        let output_q = if gguf.content.tensor_infos.contains_key("output.weight") {
            tensor(gguf, "output.weight", device)?
        } else {
            embedding_q
        };
        let output = matmul(output_q, format, device)?;
        let norm = rms_norm(
            tensor(gguf, "output_norm.weight", device)?,
            config.rms_eps,
            device,
        )?;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut load = |suffix: &str| tensor(gguf, &format!("blk.{i}.{suffix}.weight"), device);
            layers.push(Layer {
                attn_norm: rms_norm(load("attn_norm")?, config.rms_eps, device)?,
                wq: matmul(load("attn_q")?, format, device)?,
                wk: matmul(load("attn_k")?, format, device)?,
                wv: matmul(load("attn_v")?, format, device)?,
                wo: matmul(load("attn_output")?, format, device)?,
                ffn_norm: rms_norm(load("ffn_norm")?, config.rms_eps, device)?,
                w_gate: matmul(load("ffn_gate")?, format, device)?,
                w_up: matmul(load("ffn_up")?, format, device)?,
                w_down: matmul(load("ffn_down")?, format, device)?,
            });
        }
        Ok(Self {
            config,
            embeddings,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layer)
    }

    /// Runs `tokens` (rows x new positions) after what `cache` holds, appends their keys and
    /// values to it, and returns the logits of each row's last position (rows x vocab, f32).
    pub fn forward(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let (rows, seq_len) = tokens.dims2()?;
        let pos = cache.len;
        if pos + seq_len > self.config.context_length {
            return Err(ModelError::Compute(Box::new(candle_core::Error::Msg(
                format!(
                    "sequence of {} tokens exceeds the context length {}",
                    pos + seq_len,
                    self.config.context_length
                ),
            ))));
        }
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        let mask = if seq_len > 1 {
            Some(causal_mask(seq_len, pos, &self.device)?)
        } else {
            None
        };
        let mut x = self.embeddings.forward(tokens)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, &h, slot, &cos, &sin, mask.as_ref(), rows, seq_len)?;
            let x1 = (h + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let h = layer.w_down.forward(&(gate * layer.w_up.forward(&h)?)?)?;
            x = (h + x1)?;
        }
        cache.len += seq_len;
        // The last position's slice is strided when rows > 1; the matmul needs it contiguous.
        let last = x.i((.., seq_len - 1, ..))?.contiguous()?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        rows: usize,
        seq_len: usize,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let q = layer
            .wq
            .forward(x)?
            .reshape((rows, seq_len, c.n_head, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = layer
            .wk
            .forward(x)?
            .reshape((rows, seq_len, c.n_kv_head, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = layer
            .wv
            .forward(x)?
            .reshape((rows, seq_len, c.n_kv_head, c.head_dim))?
            .transpose(1, 2)?;
        // GGUF stores Q/K rows permuted for llama.cpp's interleaved rotary embedding.
        let q = candle_nn::rotary_emb::rope_i(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, cos, sin)?;
        let (k, v) = match slot.take() {
            Some((k_cache, v_cache)) => (
                Tensor::cat(&[&k_cache, &k], 2)?,
                Tensor::cat(&[&v_cache, &v], 2)?,
            ),
            None => (k, v.contiguous()?),
        };
        *slot = Some((k.clone(), v.clone()));
        let group = c.n_head / c.n_kv_head;
        let total = k.dims()[2];
        // Grouped-query attention: fold the query heads that share a KV head into the sequence
        // axis instead of copying keys and values `group` times.
        let q = q.reshape((rows, c.n_kv_head, group * seq_len, c.head_dim))?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(mask) => {
                let att = att.reshape((rows, c.n_kv_head, group, seq_len, total))?;
                att.broadcast_add(mask)?
                    .reshape((rows, c.n_kv_head, group * seq_len, total))?
            }
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?;
        let y = y
            .reshape((rows, c.n_head, seq_len, c.head_dim))?
            .transpose(1, 2)?
            .reshape((rows, seq_len, c.hidden))?;
        Ok(layer.wo.forward(&y)?)
    }
}

fn rope_tables(c: &LlamaConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..c.head_dim)
        .step_by(2)
        .map(|i| 1.0 / c.rope_base.powf(i as f32 / c.head_dim as f32))
        .collect();
    let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
    let positions = Tensor::arange(0u32, c.context_length as u32, device)?.to_dtype(DType::F32)?;
    let angles = positions
        .unsqueeze(1)?
        .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Additive mask (seq x (past + seq)): 0 where a position may attend, -inf elsewhere.
fn causal_mask(seq_len: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_slice(&mask, (seq_len, total), device)
}

/// Index of the largest logit in a 1-D tensor.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
