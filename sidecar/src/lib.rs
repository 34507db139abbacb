//! The ttc-operator sidecar: serves a GGUF model with candle behind an OpenAI-compatible API.
//!
//! Layers, from the bottom: [`model_store`] finds or fetches model files, [`gguf`] reads their
//! metadata, [`tokenizer`] and [`chat_template`] turn messages into token ids, [`engine`] runs the
//! model (shared-prefix batched sampling), [`ttc`] decides how much compute each request gets,
//! [`api`] serves HTTP.

pub mod api;
pub mod chat_template;
pub mod engine;
pub mod eval;
pub mod gguf;
pub mod model_store;
pub mod policy_link;
pub mod tokenizer;
pub mod ttc;
pub mod ttc_service;
