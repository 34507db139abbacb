//! The keys and values of the rows being decoded: per-layer buffers written in place, and a
//! shared prefix (a prompt's positions, prefilled once and read by every sample of it).

use std::sync::Arc;

use candle_core::Tensor;

/// Per-layer keys and values of `rows` sequences that share one position counter.
///
/// The samples of one prompt read the prompt's positions from one shared prefix (a one-row cache
/// behind an `Arc`, also what the prefix cache keeps) and hold only the positions they decoded
/// themselves: n samples of a long prompt store and stream its keys and values once, not n
/// times.
pub struct KvCache {
    /// Positions `0..shared.len` of every row, when the rows share a prefix.
    pub(super) shared: Option<Arc<KvCache>>,
    /// Each layer's own positions, from the end of the shared prefix on.
    pub(super) layers: Vec<Option<LayerKv>>,
    /// Rows (sequences); 0 until the first pass of a fresh cache.
    pub(super) rows: usize,
    /// Number of positions cached, the shared prefix's included.
    pub len: usize,
}

/// Positions a decoding row's own buffers have room for before their first growth.
pub(super) const INITIAL_CAPACITY: usize = 256;

impl KvCache {
    /// An empty cache for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            shared: None,
            layers: (0..n_layers).map(|_| None).collect(),
            rows: 0,
            len: 0,
        }
    }

    /// `rows` rows that all continue `prefix` (a one-row cache of a prefilled prompt without a
    /// prefix of its own), reading its positions in place rather than copies of them.
    pub fn sharing(prefix: Arc<KvCache>, rows: usize) -> candle_core::Result<Self> {
        if prefix.shared.is_some() || prefix.rows > 1 {
            candle_core::bail!("a shared prefix must be one row with no prefix of its own");
        }
        Ok(Self {
            layers: (0..prefix.layers.len()).map(|_| None).collect(),
            rows,
            len: prefix.len,
            shared: Some(prefix),
        })
    }

    /// Positions in the shared prefix (0 without one).
    pub(super) fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |p| p.len)
    }

    /// Bytes of the cached keys and values (filled positions, the shared prefix's counted once;
    /// buffers may hold more).
    pub fn bytes(&self) -> usize {
        let own = self.len - self.shared_len();
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let per_position = l.k.elem_count() / l.capacity().max(1);
                2 * per_position * own * l.k.dtype().size_in_bytes()
            })
            .sum::<usize>()
            + self.shared.as_ref().map_or(0, |p| p.bytes())
    }

    /// Number of rows (sequences) the cache holds; 0 before the first pass.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Keeps only the given rows, in the given order (rows that finished leave the batch).
    pub fn select_rows(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        if let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|l| l.k.device().clone())
        {
            let index = Tensor::new(rows, &device)?;
            for layer in self.layers.iter_mut().flatten() {
                layer.k = layer.k.index_select(&index, 0)?;
                layer.v = layer.v.index_select(&index, 0)?;
            }
        }
        self.rows = rows.len();
        Ok(())
    }
}

/// One layer's keys and values: buffers of shape (rows, kv heads, capacity, head dim), of which
/// the first positions are filled (the cache's, or those after its shared prefix). New positions
/// are written in place, so a decode step copies only its own keys and values, not the history.
pub(super) struct LayerKv {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
}

impl LayerKv {
    pub(super) fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// Buffers of `capacity` positions holding the first `len` positions of `k` and `v`
    /// (contiguous copies; never shares storage with them).
    pub(super) fn with_capacity(
        k: &Tensor,
        v: &Tensor,
        len: usize,
        capacity: usize,
    ) -> candle_core::Result<Self> {
        let (rows, heads, _, head_dim) = k.dims4()?;
        let shape = (rows, heads, capacity, head_dim);
        let layer = Self {
            k: Tensor::zeros(shape, k.dtype(), k.device())?,
            v: Tensor::zeros(shape, v.dtype(), v.device())?,
        };
        if len > 0 {
            layer
                .k
                .slice_set(&k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            layer
                .v
                .slice_set(&v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        Ok(layer)
    }

    /// Writes `k` and `v` (rows, kv heads, new, head dim) at position `pos`, growing the buffers
    /// (doubling) when they are full.
    pub(super) fn write(&mut self, k: &Tensor, v: &Tensor, pos: usize) -> candle_core::Result<()> {
        let new = k.dims()[2];
        if pos + new > self.capacity() {
            let capacity = (pos + new).max(2 * self.capacity()).next_multiple_of(64);
            *self = Self::with_capacity(&self.k, &self.v, pos, capacity)?;
        }
        self.k.slice_set(&k.contiguous()?, 2, pos)?;
        self.v.slice_set(&v.contiguous()?, 2, pos)
    }

    /// Views of the first `len` positions.
    pub(super) fn filled(&self, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(2, 0, len)?, self.v.narrow(2, 0, len)?))
    }
}
