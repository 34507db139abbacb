//! Prefilled prompts kept for reuse: the keys and values of a prompt and the logits of its last
//! position, so that a request with the same prompt (the next window of a test-time-compute
//! request, or another client asking the same) starts decoding without a prefill.
//!
//! The model is deterministic, so a hit gives exactly what a fresh prefill would. Entries are
//! evicted least recently used first, within a byte budget.

use candle_core::Tensor;
use std::sync::Arc;

use super::kv_cache::KvCache;

/// One prefilled prompt.
#[derive(Clone)]
pub struct Prefill {
    /// Keys and values of the prompt (one row), shared with the generations that continue it.
    pub cache: Arc<KvCache>,
    /// Logits of the prompt's last position (one row).
    pub logits: Tensor,
}

impl Prefill {
    fn bytes(&self) -> usize {
        self.cache.bytes() + self.logits.elem_count() * self.logits.dtype().size_in_bytes()
    }
}

/// Prefilled prompts, least recently used first.
pub struct PrefixCache {
    entries: Vec<(Vec<u32>, Prefill, usize)>,
    bytes: usize,
    max_bytes: usize,
    hits: u64,
    misses: u64,
}

impl PrefixCache {
    /// An empty cache that holds at most `max_bytes` of tensors (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            max_bytes,
            hits: 0,
            misses: 0,
        }
    }

    /// The prefill of exactly `prompt`, if kept; counts a hit or a miss.
    pub fn get(&mut self, prompt: &[u32]) -> Option<Prefill> {
        match self.entries.iter().position(|(p, _, _)| p == prompt) {
            Some(at) => {
                self.hits += 1;
                let entry = self.entries.remove(at);
                let prefill = entry.1.clone();
                self.entries.push(entry);
                Some(prefill)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Keeps the prefill of `prompt`, evicting the least recently used entries to make room; a
    /// prefill larger than the whole budget is not kept.
    pub fn insert(&mut self, prompt: &[u32], prefill: Prefill) {
        let size = prefill.bytes();
        if size > self.max_bytes {
            return;
        }
        if let Some(at) = self.entries.iter().position(|(p, _, _)| p == prompt) {
            let (_, _, old) = self.entries.remove(at);
            self.bytes -= old;
        }
        while self.bytes + size > self.max_bytes && !self.entries.is_empty() {
            let (_, _, evicted) = self.entries.remove(0);
            self.bytes -= evicted;
        }
        self.bytes += size;
        self.entries.push((prompt.to_vec(), prefill, size));
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Prompts kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of tensors kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lookups that found their prompt, and those that did not.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn prefill(values: usize) -> Prefill {
        Prefill {
            cache: Arc::new(KvCache::new(0)),
            logits: Tensor::zeros(values, DType::F32, &Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn keeps_the_most_recently_used_within_the_byte_budget() {
        // Each entry is 10 f32 = 40 bytes; room for two.
        let mut cache = PrefixCache::new(100);
        cache.insert(&[1], prefill(10));
        cache.insert(&[2], prefill(10));
        assert!(cache.get(&[1]).is_some()); // [1] is now the most recent
        cache.insert(&[3], prefill(10)); // evicts [2]
        assert!(cache.get(&[2]).is_none());
        assert!(cache.get(&[1]).is_some());
        assert!(cache.get(&[3]).is_some());
        assert_eq!((cache.len(), cache.bytes()), (2, 80));
        assert_eq!(cache.hits_and_misses(), (3, 1));
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_kept_and_zero_disables() {
        let mut cache = PrefixCache::new(100);
        cache.insert(&[1], prefill(30));
        assert!(cache.is_empty());
        let mut off = PrefixCache::new(0);
        off.insert(&[1], prefill(1));
        assert!(off.get(&[1]).is_none());
    }

    #[test]
    fn reinserting_a_prompt_replaces_it() {
        let mut cache = PrefixCache::new(1000);
        cache.insert(&[1, 2], prefill(10));
        cache.insert(&[1, 2], prefill(20));
        assert_eq!((cache.len(), cache.bytes()), (1, 80));
    }
}
