//! A llama-family transformer over quantized GGUF weights, with the KV cache held outside the
//! weights so that one prompt's cache can be shared by many sampled rows and rows can leave the
//! batch as they finish.
//!
//! The family: llama (SmolLM2), qwen2 (q/k/v biases, NeoX rotary; the R1-distill models) and
//! gemma3 (scaled embeddings, per-head q/k norms, norms after attention and feed-forward too,
//! GELU, and sliding-window layers with their own rotary base between global ones).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::RmsNorm;
use std::sync::Arc;

use super::kv_cache::{INITIAL_CAPACITY, KvCache, LayerKv};

use crate::gguf::{GgufError, GgufFile};
use ttc_kernels::WeightMatrix;
use ttc_kernels::activation::{self, Gate};
use ttc_kernels::attention;
use ttc_kernels::q4::Q4Rows;
use ttc_kernels::q8::{self, Q8Rows};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error(
        "model file {path}: architecture `{arch}` is not supported yet (supported: llama, qwen2, gemma3)"
    )]
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
    /// As stored in the file. On CPU our batched kernels run Q4_1 ([`ttc_kernels::q4`]) and Q8_0
    /// ([`ttc_kernels::q8`]) weights; candle's quantized matmul runs other types, and all of them
    /// on GPU.
    Native,
    /// Requantized to Q8_0 at load, for our Q8_0 kernel on CPU: any block type, at 36 bytes per
    /// 32 weights.
    #[default]
    Q8_0,
}

/// Which code computes the linear layers and decode attention.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kernels {
    /// The project's CPU kernels ([`ttc_kernels`]) for Q4_1/Q8_0 linear layers and decode
    /// attention straight over the KV buffers; candle's ops for the rest. CPU only: any other
    /// device runs [`Kernels::Candle`].
    #[default]
    Fused,
    /// candle's tensor ops only, the path every non-CPU device takes. Selectable on the CPU so
    /// that the GPU's code path is tested where no GPU is.
    Candle,
}

/// Shape parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub family: Family,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// Linear rotary scaling of the global layers: positions are divided by it.
    pub rope_scale: f32,
    pub rope: RopeLayout,
    /// Multiplies the token embeddings (Gemma: the square root of the width).
    pub embedding_scale: Option<f32>,
    /// The feed-forward gate's nonlinearity.
    pub activation: Gate,
    /// Sliding-window layers: their window (positions attended, the new one included), the
    /// rotary base they use, and every how many layers a global one comes (Gemma 3: 512,
    /// 10 000, 6).
    pub sliding_window: Option<SlidingWindow>,
}

/// Sliding-window attention between global layers.
#[derive(Debug, Clone, Copy)]
pub struct SlidingWindow {
    pub width: usize,
    pub rope_base: f32,
    /// Layer `i` is global when `(i + 1) % global_every == 0`.
    pub global_every: usize,
}

impl SlidingWindow {
    fn applies_to(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.global_every)
    }
}

/// The architectures the loader reads: llama and close relatives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Gemma3,
}

impl Family {
    const ALL: [Family; 3] = [Family::Llama, Family::Qwen2, Family::Gemma3];

    /// The `general.architecture` name, which also prefixes the family's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }

    fn rope(self) -> RopeLayout {
        match self {
            Self::Llama => RopeLayout::Interleaved,
            Self::Qwen2 | Self::Gemma3 => RopeLayout::Neox,
        }
    }

    /// What multiplies the token embeddings of a model `hidden` wide.
    fn embedding_scale(self, hidden: usize) -> Option<f32> {
        (self == Self::Gemma3).then(|| (hidden as f32).sqrt())
    }

    fn activation(self) -> Gate {
        match self {
            Self::Llama | Self::Qwen2 => Gate::Silu,
            Self::Gemma3 => Gate::GeluTanh,
        }
    }

    /// The sliding-window layout of a model whose metadata gives a window `width`: llama.cpp's
    /// Gemma 3 makes every sixth layer global and the others local with rotary base 10 000.
    fn sliding_window(self, width: Option<u32>) -> Option<SlidingWindow> {
        let width = width.filter(|_| self == Self::Gemma3)?;
        Some(SlidingWindow {
            width: width as usize,
            rope_base: 10_000.0,
            global_every: 6,
        })
    }
}

/// How the rotary embedding pairs a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1): llama GGUF files store Q/K rows permuted for it.
    Interleaved,
    /// Pairs (i, i + d/2), GPT-NeoX style: Qwen2 stores Q/K as trained.
    Neox,
}

/// One or more linear maps of the same input (q, k and v; gate and up).
enum Projection {
    /// candle's quantized matmul, one per part: GPU, or block types our kernels lack.
    Candle(Vec<QMatMul>),
    /// Our kernel over the parts stacked into one matrix: one pass over the input, and the
    /// weights stream once per forward pass whatever the number of rows.
    Ours {
        matrix: Box<dyn WeightMatrix>,
        parts: Vec<usize>,
    },
}

impl Projection {
    fn new(
        parts: Vec<Arc<QTensor>>,
        format: WeightFormat,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, ModelError> {
        if kernels == Kernels::Fused
            && let Some(matrix) = ours(&parts, format, device)?
        {
            return Ok(Self::Ours {
                parts: parts.iter().map(|q| q.shape().dims()[0]).collect(),
                matrix,
            });
        }
        Ok(Self::Candle(
            parts
                .into_iter()
                .map(|q| matmul(q, format, device))
                .collect::<Result<_, _>>()?,
        ))
    }

    /// `x` (.., in) through every part: one tensor (.., out_i) per part.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Candle(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::Ours { matrix, parts } => {
                let dims = x.dims();
                let cols = dims[dims.len() - 1];
                let m = x.elem_count() / cols;
                // Read in place (a copy only if `x` is a strided view).
                let out = with_cpu_f32(&x.contiguous()?, |input| matrix.matmul(input, m))?;
                let shape = |width: usize| {
                    let mut shape = dims.to_vec();
                    *shape.last_mut().expect("at least one dimension") = width;
                    shape
                };
                if let [width] = parts[..] {
                    return Ok(vec![Tensor::from_vec(out, shape(width), x.device())?]);
                }
                let n = matrix.rows();
                let mut start = 0;
                parts
                    .iter()
                    .map(|&width| {
                        let part: Vec<f32> = out
                            .chunks_exact(n)
                            .flat_map(|row| &row[start..start + width])
                            .copied()
                            .collect();
                        start += width;
                        Tensor::from_vec(part, shape(width), x.device())
                    })
                    .collect()
            }
        }
    }

    /// The single part's output.
    fn forward_one(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward(x)?.swap_remove(0))
    }

    /// `act(gate) * up` of a gate/up projection: on our kernels one pass over the fused output,
    /// without splitting it into two tensors first.
    fn gated(&self, x: &Tensor, gate: Gate) -> candle_core::Result<Tensor> {
        if let Self::Ours { matrix, parts } = self
            && let [width, up] = parts[..]
            && width == up
        {
            let dims = x.dims();
            let m = x.elem_count() / dims[dims.len() - 1];
            let fused = with_cpu_f32(&x.contiguous()?, |input| matrix.matmul(input, m))?;
            let mut shape = dims.to_vec();
            *shape.last_mut().expect("at least one dimension") = width;
            return Tensor::from_vec(activation::gated(&fused, m, width, gate), shape, x.device());
        }
        let [g, up]: [Tensor; 2] = self
            .forward(x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate_up has two parts".into()))?;
        let g = match gate {
            Gate::Silu => candle_nn::ops::silu(&g)?,
            Gate::GeluTanh => g.gelu()?,
        };
        g * up
    }
}

struct Layer {
    attn_norm: RmsNorm,
    /// q, k, v.
    qkv: Projection,
    /// Biases of q, k and v, concatenated (Qwen2 has them, llama does not).
    qkv_bias: Option<Tensor>,
    wo: Projection,
    ffn_norm: RmsNorm,
    /// gate, up.
    gate_up: Projection,
    w_down: Projection,
    /// Per-head RMS norms of queries and keys, before the rotary embedding (Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Norms of the attention and feed-forward outputs, before the residual adds (Gemma 3).
    post_attn_norm: Option<RmsNorm>,
    post_ffn_norm: Option<RmsNorm>,
    /// Sliding-window width; `None`: the whole context.
    window: Option<usize>,
    /// Which of [`Llama`]'s rotary tables the layer uses.
    rope: usize,
}

/// The loaded weights; immutable, so several caches (requests) can use them.
pub struct Llama {
    config: LlamaConfig,
    /// Token embeddings as stored in the file, rows dequantized per looked-up token (Gemma's
    /// 262k x 640 table would take 671 MB as f32); shared with the output projection when tied.
    embeddings: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Projection,
    /// Rotary (cos, sin) tables: the global one, then the sliding-window layers' if they differ.
    ropes: Vec<(Tensor, Tensor)>,
    device: Device,
    /// What computes the linear layers and decode attention ([`Kernels::Fused`] on CPU only).
    kernels: Kernels,
}

/// A contiguous f32 CPU tensor's values, for our kernels.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    Ok(f(cpu_f32(&storage, layout)?))
}

/// The values of a contiguous f32 CPU tensor's storage (held by the caller's guard).
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
            Ok(&cpu.as_slice::<f32>()?[start..end])
        }
        _ => candle_core::bail!("expected a contiguous f32 tensor on the CPU"),
    }
}

fn tensor(gguf: &mut GgufFile, name: &str, device: &Device) -> Result<Arc<QTensor>, ModelError> {
    let path = gguf.path.display().to_string();
    gguf.content
        .tensor(&mut gguf.reader, name, device)
        .map(Arc::new)
        .map_err(|source| ModelError::Tensor {
            path,
            name: name.to_owned(),
            source: Box::new(source),
        })
}

fn matmul(q: Arc<QTensor>, format: WeightFormat, device: &Device) -> Result<QMatMul, ModelError> {
    match format {
        WeightFormat::Q8_0
            if q.dtype() != GgmlDType::Q8_0
                && q.shape().dims().last().is_some_and(|d| d % 32 == 0) =>
        {
            let requantized = QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?;
            Ok(QMatMul::from_qtensor(requantized)?)
        }
        _ => Ok(QMatMul::from_arc(q)?),
    }
}

/// The parts stacked for one of our kernels, if one fits: Q4_1 as stored (`Native`), or any
/// type requantized to Q8_0 (`Q8_0`). `None`: candle's matmul runs them.
fn ours(
    parts: &[Arc<QTensor>],
    format: WeightFormat,
    device: &Device,
) -> Result<Option<Box<dyn WeightMatrix>>, ModelError> {
    let mut shapes = Vec::with_capacity(parts.len());
    for q in parts {
        let (rows, cols) = q.shape().dims2()?;
        if !cols.is_multiple_of(q8::BLOCK) {
            return Ok(None);
        }
        shapes.push((rows, cols));
    }
    let all = |dtype: GgmlDType| parts.iter().all(|q| q.dtype() == dtype);
    match format {
        WeightFormat::Native if all(GgmlDType::Q4_1) => {
            let mut matrices = Vec::with_capacity(parts.len());
            for (q, &(rows, cols)) in parts.iter().zip(&shapes) {
                let matrix = Q4Rows::from_ggml(&q.data()?, rows, cols)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                matrices.push(matrix);
            }
            Ok(Some(Box::new(Q4Rows::stack(&matrices))))
        }
        // Q8_0 blocks requantize to themselves, so a Q8_0 file keeps its exact weights.
        WeightFormat::Native if !all(GgmlDType::Q8_0) => Ok(None),
        WeightFormat::Native | WeightFormat::Q8_0 => {
            let mut matrices = Vec::with_capacity(parts.len());
            for (q, &(rows, cols)) in parts.iter().zip(&shapes) {
                let values = q.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?;
                matrices.push(Q8Rows::quantize(&values, rows, cols));
            }
            Ok(Some(Box::new(Q8Rows::stack(&matrices))))
        }
    }
}

fn rms_norm(q: Arc<QTensor>, eps: f64, device: &Device) -> Result<RmsNorm, ModelError> {
    Ok(RmsNorm::new(q.dequantize(device)?, eps))
}

/// A norm the file may or may not have.
fn optional_norm(
    gguf: &mut GgufFile,
    name: &str,
    eps: f64,
    device: &Device,
) -> Result<Option<RmsNorm>, ModelError> {
    if !gguf.content.tensor_infos.contains_key(name) {
        return Ok(None);
    }
    rms_norm(tensor(gguf, name, device)?, eps, device).map(Some)
}

impl Llama {
    /// Loads a llama-architecture GGUF model. `kernels` is a preference: a device other than
    /// the CPU always runs [`Kernels::Candle`].
    pub fn load(
        gguf: &mut GgufFile,
        format: WeightFormat,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let kernels = if device.is_cpu() {
            kernels
        } else {
            Kernels::Candle
        };
        let arch = gguf.string("general.architecture")?.to_owned();
        let Some(family) = Family::ALL.into_iter().find(|f| f.name() == arch) else {
            return Err(ModelError::Architecture {
                path: gguf.path.display().to_string(),
                arch,
            });
        };
        let key = |name: &str| format!("{arch}.{name}");
        let n_head = gguf.u32(&key("attention.head_count"))? as usize;
        let hidden = gguf.u32(&key("embedding_length"))? as usize;
        // Gemma's heads are wider than width / heads, and say so in `key_length`.
        let head_dim = gguf
            .u32_opt(&key("attention.key_length"))
            .or_else(|| gguf.u32_opt(&key("rope.dimension_count")))
            .map(|d| d as usize)
            .unwrap_or(hidden / n_head);
        let linear_scaling = gguf
            .string(&key("rope.scaling.type"))
            .is_ok_and(|t| t == "linear");
        let config = LlamaConfig {
            family,
            n_layer: gguf.u32(&key("block_count"))? as usize,
            n_head,
            n_kv_head: gguf
                .u32_opt(&key("attention.head_count_kv"))
                .map(|d| d as usize)
                .unwrap_or(n_head),
            head_dim,
            hidden,
            context_length: gguf
                .u32_opt(&key("context_length"))
                .map(|d| d as usize)
                .unwrap_or(2048),
            rms_eps: gguf
                .f32(&key("attention.layer_norm_rms_epsilon"))
                .map(f64::from)
                .unwrap_or(1e-5),
            rope_base: gguf.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scale: match gguf.f32(&key("rope.scaling.factor")) {
                Ok(factor) if linear_scaling && factor > 0.0 => factor,
                _ => 1.0,
            },
            rope: family.rope(),
            embedding_scale: family.embedding_scale(hidden),
            activation: family.activation(),
            sliding_window: family.sliding_window(gguf.u32_opt(&key("attention.sliding_window"))),
        };
        let mut ropes = vec![rope_tables(
            &config,
            config.rope_base,
            config.rope_scale,
            device,
        )?];
        if let Some(window) = config.sliding_window {
            ropes.push(rope_tables(&config, window.rope_base, 1.0, device)?);
        }
        let embeddings = tensor(gguf, "token_embd.weight", device)?;
        // Small models tie the output projection to the embeddings and store no `output.weight`.
        let output_q = if gguf.content.tensor_infos.contains_key("output.weight") {
            tensor(gguf, "output.weight", device)?
        } else {
            embeddings.clone()
        };
        let output = Projection::new(vec![output_q], format, kernels, device)?;
        let norm = rms_norm(
            tensor(gguf, "output_norm.weight", device)?,
            config.rms_eps,
            device,
        )?;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let biases = ["attn_q", "attn_k", "attn_v"].map(|p| format!("blk.{i}.{p}.bias"));
            let qkv_bias = if biases
                .iter()
                .all(|name| gguf.content.tensor_infos.contains_key(name))
            {
                let mut parts = Vec::with_capacity(3);
                for name in &biases {
                    parts.push(tensor(gguf, name, device)?.dequantize(device)?);
                }
                Some(Tensor::cat(&parts, 0)?)
            } else {
                None
            };
            let eps = config.rms_eps;
            let norm = |gguf: &mut GgufFile, suffix: &str| {
                optional_norm(gguf, &format!("blk.{i}.{suffix}.weight"), eps, device)
            };
            let q_norm = norm(gguf, "attn_q_norm")?;
            let k_norm = norm(gguf, "attn_k_norm")?;
            let post_attn_norm = norm(gguf, "post_attention_norm")?;
            let post_ffn_norm = norm(gguf, "post_ffw_norm")?;
            let local = config.sliding_window.filter(|w| w.applies_to(i));
            let mut load = |suffix: &str| tensor(gguf, &format!("blk.{i}.{suffix}.weight"), device);
            layers.push(Layer {
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                window: local.map(|w| w.width),
                rope: usize::from(local.is_some()),
                qkv_bias,
                attn_norm: rms_norm(load("attn_norm")?, config.rms_eps, device)?,
                qkv: Projection::new(
                    vec![load("attn_q")?, load("attn_k")?, load("attn_v")?],
                    format,
                    kernels,
                    device,
                )?,
                wo: Projection::new(vec![load("attn_output")?], format, kernels, device)?,
                ffn_norm: rms_norm(load("ffn_norm")?, config.rms_eps, device)?,
                gate_up: Projection::new(
                    vec![load("ffn_gate")?, load("ffn_up")?],
                    format,
                    kernels,
                    device,
                )?,
                w_down: Projection::new(vec![load("ffn_down")?], format, kernels, device)?,
            });
        }
        Ok(Self {
            config,
            embeddings,
            layers,
            norm,
            output,
            ropes,
            device: device.clone(),
            kernels,
        })
    }

    /// What computes the linear layers and decode attention.
    pub fn kernels(&self) -> Kernels {
        self.kernels
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
        let mut logits = self.forward_many(&mut [Segment { tokens, cache }])?;
        Ok(logits.swap_remove(0))
    }

    /// One pass over several caches' rows at once: concurrent requests sharing a decode step.
    /// The linear layers (nearly all the work) run once over every row, so the weights stream
    /// once for all requests; attention runs per cache, at its own position. Every segment has
    /// the same number of new positions. Returns each segment's logits, in order.
    pub fn forward_many(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Tensor>, ModelError> {
        let Some(first) = segments.first() else {
            return Ok(Vec::new());
        };
        let seq_len = first.tokens.dims2()?.1;
        let mut rows = Vec::with_capacity(segments.len());
        for segment in segments.iter() {
            let (r, s) = segment.tokens.dims2()?;
            if s != seq_len {
                return Err(candle_core::Error::Msg(format!(
                    "segments of one pass need equal lengths ({s} vs {seq_len})"
                ))
                .into());
            }
            if segment.cache.rows != 0 && segment.cache.rows != r {
                return Err(candle_core::Error::Msg(format!(
                    "{r} rows of tokens for a cache of {} rows",
                    segment.cache.rows
                ))
                .into());
            }
            let end = segment.cache.len + seq_len;
            if end > self.config.context_length {
                return Err(candle_core::Error::Msg(format!(
                    "sequence of {end} tokens exceeds the context length {}",
                    self.config.context_length
                ))
                .into());
            }
            rows.push(r);
        }
        let tokens: Vec<&Tensor> = segments.iter().map(|s| s.tokens).collect();
        let mut x = self.embeddings.embedding(&cat_rows(&tokens)?)?;
        if let Some(scale) = self.config.embedding_scale {
            x = (x * f64::from(scale))?;
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v]: [Tensor; 3] = layer
                .qkv
                .forward(&h)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("qkv has three parts".into()))?;
            let (q, k, v) = match &layer.qkv_bias {
                Some(bias) => {
                    let (nq, nk) = (q.dims()[2], k.dims()[2]);
                    (
                        q.broadcast_add(&bias.narrow(0, 0, nq)?)?,
                        k.broadcast_add(&bias.narrow(0, nq, nk)?)?,
                        v.broadcast_add(&bias.narrow(0, nq + nk, nk)?)?,
                    )
                }
                None => (q, k, v),
            };
            let mut start = 0;
            let mut attended = Vec::with_capacity(segments.len());
            for (segment, &r) in segments.iter_mut().zip(&rows) {
                let cache = &mut *segment.cache;
                let prefix = match &cache.shared {
                    Some(shared) => Some((
                        shared.layers[index].as_ref().ok_or_else(|| {
                            candle_core::Error::Msg("a shared prefix without this layer".into())
                        })?,
                        shared.len,
                    )),
                    None => None,
                };
                let (q, k, v) = (
                    q.narrow(0, start, r)?,
                    k.narrow(0, start, r)?,
                    v.narrow(0, start, r)?,
                );
                let slot = &mut cache.layers[index];
                attended.push(self.attend(layer, &q, &k, &v, slot, prefix, cache.len)?);
                start += r;
            }
            let attended: Vec<&Tensor> = attended.iter().collect();
            let attention = post_norm(
                &layer.post_attn_norm,
                layer.wo.forward_one(&cat_rows(&attended)?)?,
            )?;
            let x1 = (attention + residual)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let gated = layer.gate_up.gated(&h, self.config.activation)?;
            let h = post_norm(&layer.post_ffn_norm, layer.w_down.forward_one(&gated)?)?;
            x = (h + x1)?;
        }
        for (segment, &r) in segments.iter_mut().zip(&rows) {
            segment.cache.len += seq_len;
            segment.cache.rows = r;
        }
        // The last position's slice is strided when rows > 1; the matmul needs it contiguous.
        let last = x.i((.., seq_len - 1, ..))?.contiguous()?;
        let logits = self
            .output
            .forward_one(&self.norm.forward(&last)?)?
            .to_dtype(DType::F32)?;
        let mut start = 0;
        rows.iter()
            .map(|&r| {
                let part = logits.narrow(0, start, r);
                start += r;
                Ok(part?)
            })
            .collect()
    }

    /// Attention of `q`, `k`, `v` (rows, new positions, heads x head dim) after the `pos`
    /// positions cached: those of the shared `prefix` (its layer and length), if any, then those
    /// `slot` holds; appends `k` and `v` to `slot`. Returns (rows, new, heads x head dim).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        slot: &mut Option<LayerKv>,
        prefix: Option<(&LayerKv, usize)>,
        pos: usize,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (rows, seq_len, _) = q.dims3()?;
        let heads = |t: &Tensor, n: usize, norm: &Option<RmsNorm>| -> candle_core::Result<Tensor> {
            let t = t.reshape((rows, seq_len, n, c.head_dim))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            t.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (
            heads(q, c.n_head, &layer.q_norm)?,
            heads(k, c.n_kv_head, &layer.k_norm)?,
            heads(v, c.n_kv_head, &None)?,
        );
        let (cos, sin) = &self.ropes[layer.rope];
        let cos = cos.narrow(0, pos, seq_len)?;
        let sin = sin.narrow(0, pos, seq_len)?;
        let rope = match c.rope {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i,
            RopeLayout::Neox => candle_nn::rotary_emb::rope,
        };
        let (q, k) = (rope(&q, &cos, &sin)?, rope(&k, &cos, &sin)?);
        let shared = prefix.map_or(0, |(_, len)| len);
        let layer_kv = match slot {
            Some(layer_kv) => layer_kv,
            // A prompt's prefill gets room for its own positions only (it usually becomes a
            // shared prefix); decoded rows get room to grow.
            None => slot.insert(LayerKv::with_capacity(
                &k,
                &v,
                0,
                if seq_len > 1 {
                    seq_len
                } else {
                    INITIAL_CAPACITY
                },
            )?),
        };
        layer_kv.write(&k, &v, pos - shared)?;
        if seq_len == 1 && self.kernels == Kernels::Fused {
            // A decode step: our kernel, straight over the cache buffers.
            let shape = attention::DecodeShape {
                rows,
                heads: c.n_head,
                kv_heads: c.n_kv_head,
                head_dim: c.head_dim,
                capacity: layer_kv.capacity(),
                shared,
                shared_capacity: prefix.map_or(0, |(p, _)| p.capacity()),
                len: pos + 1,
                start: layer.window.map_or(0, |w| (pos + 1).saturating_sub(w)),
            };
            let q = q.contiguous()?;
            let guards = [&q, &layer_kv.k, &layer_kv.v].map(Tensor::storage_and_layout);
            let [q, k, v] = [0, 1, 2].map(|i| cpu_f32(&guards[i].0, guards[i].1));
            let prefix_guards = prefix.map(|(p, _)| [&p.k, &p.v].map(Tensor::storage_and_layout));
            let prefix = match &prefix_guards {
                Some([k, v]) => Some(attention::Kv {
                    k: cpu_f32(&k.0, k.1)?,
                    v: cpu_f32(&v.0, v.1)?,
                }),
                None => None,
            };
            let y = attention::decode(q?, attention::Kv { k: k?, v: v? }, prefix, shape);
            return Ok(Tensor::from_vec(
                y,
                (rows, 1, c.n_head * c.head_dim),
                &self.device,
            )?);
        }
        let own = layer_kv.filled(pos + seq_len - shared)?;
        let prefix = match prefix {
            Some((p, len)) => Some(p.filled(len)?),
            None => None,
        };
        let y = self.attend_with_ops(&q, own, prefix, pos, layer.window)?;
        Ok(y.transpose(1, 2)?
            .reshape((rows, seq_len, c.n_head * c.head_dim))?)
    }

    /// Attention on candle's ops (the path of every non-CPU device): `q` (rows, heads, new,
    /// head dim) after `pos` positions, over the rows' own keys and values `own` (rows, kv heads,
    /// positions after the prefix, head dim) and the shared prefix's (one row), if any. Returns
    /// (rows, heads, new, head dim).
    ///
    /// The prefix is read once for all rows, never copied per row: its scores come from one
    /// matmul of every row's queries, folded into the query axis, against its keys, and its
    /// values are weighted the same way. A vote of 16 samples after a 1,000-token prompt would
    /// otherwise copy 16 x 1,000 positions of keys and values per layer at every step.
    fn attend_with_ops(
        &self,
        q: &Tensor,
        own: (Tensor, Tensor),
        prefix: Option<(Tensor, Tensor)>,
        pos: usize,
        window: Option<usize>,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (rows, _, seq_len, head_dim) = q.dims4()?;
        let (k, v) = own;
        let group = c.n_head / c.n_kv_head;
        let queries = group * seq_len;
        let scale = 1.0 / (head_dim as f64).sqrt();
        // Grouped-query attention: fold the query heads that share a KV head into the sequence
        // axis instead of copying keys and values `group` times.
        let q = q.reshape((rows, c.n_kv_head, queries, head_dim))?;
        // (rows, kv heads, queries, d) <-> (1, kv heads, rows x queries, d): every row's queries
        // as one sequence, for the prefix's single row.
        let fold = |t: &Tensor| -> candle_core::Result<Tensor> {
            let d = t.dims()[3];
            t.transpose(0, 1)?
                .contiguous()?
                .reshape((1, c.n_kv_head, rows * queries, d))
        };
        let unfold = |t: &Tensor| -> candle_core::Result<Tensor> {
            let d = t.dims()[3];
            t.reshape((c.n_kv_head, rows, queries, d))?.transpose(0, 1)
        };
        let own_scores = (q.matmul(&k.t()?)? * scale)?;
        let (scores, shared) = match &prefix {
            Some((pk, _)) => {
                let prefix_scores = (fold(&q)?.matmul(&pk.t()?)? * scale)?;
                let shared = pk.dims()[2];
                (
                    Tensor::cat(&[&unfold(&prefix_scores)?, &own_scores], 3)?,
                    shared,
                )
            }
            None => (own_scores, 0),
        };
        let total = scores.dims()[3];
        let scores = if seq_len > 1 || window.is_some_and(|w| total > w) {
            let mask = causal_mask(seq_len, pos, window, &self.device)?;
            scores
                .reshape((rows, c.n_kv_head, group, seq_len, total))?
                .broadcast_add(&mask)?
                .reshape((rows, c.n_kv_head, queries, total))?
        } else {
            scores
        };
        // `cat` along a later axis may leave the scores strided; the softmax needs them dense.
        let weights = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?;
        let mut y = weights
            .narrow(3, shared, total - shared)?
            .contiguous()?
            .matmul(&v)?;
        if let Some((_, pv)) = &prefix {
            let from_prefix = fold(&weights.narrow(3, 0, shared)?)?.matmul(pv)?;
            y = (y + unfold(&from_prefix)?)?;
        }
        Ok(y.reshape((rows, c.n_head, seq_len, head_dim))?)
    }
}

/// One cache's rows in a [`Llama::forward_many`] pass.
pub struct Segment<'a> {
    /// New tokens: rows x positions.
    pub tokens: &'a Tensor,
    /// The rows' cache (as many rows as `tokens`, or empty before a prefill).
    pub cache: &'a mut KvCache,
}

/// Tensors stacked along the first (row) dimension; one tensor is returned as it is.
fn cat_rows(parts: &[&Tensor]) -> candle_core::Result<Tensor> {
    match parts {
        [one] => Ok((*one).clone()),
        _ => Tensor::cat(parts, 0),
    }
}

/// A layer's output through its post-norm, if it has one.
fn post_norm(norm: &Option<RmsNorm>, x: Tensor) -> candle_core::Result<Tensor> {
    match norm {
        Some(norm) => norm.forward(&x),
        None => Ok(x),
    }
}

/// Rotary (cos, sin) for every position of the context: (context, head_dim / 2) each.
fn rope_tables(
    c: &LlamaConfig,
    base: f32,
    scale: f32,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..c.head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / c.head_dim as f32) / scale)
        .collect();
    let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
    let positions = Tensor::arange(0u32, c.context_length as u32, device)?.to_dtype(DType::F32)?;
    let angles = positions
        .unsqueeze(1)?
        .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Additive mask (seq x (past + seq)): 0 where a position may attend (itself, earlier ones, and
/// within a sliding window only the last `window`), -inf elsewhere.
fn causal_mask(
    seq_len: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = past + seq_len;
    let window = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            let at = past + i;
            (0..total).map(move |j| {
                if j > at || at - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_slice(&mask, (seq_len, total), device)
}

/// Index of the largest logit in a 1-D tensor.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
