//! The ttc-operator sidecar: serves a GGUF model with candle behind an OpenAI-compatible API.
//!
//! Layers, from the bottom: [`model_store`] finds or fetches model files, [`gguf`] reads their
//! metadata, [`tokenizer`] and [`chat_template`] turn messages into token ids, [`engine`] runs the
//! model (shared-prefix batched sampling), [`ttc_service`] runs the TTC core's decisions (`ttc_core`) against the engine, [`ttc_policy`] maps
//! the InferencePolicy onto them, [`score_client`] carries HTTP verifiers' calls,
//! [`api`] serves HTTP.

pub mod admission;
pub mod api;
pub mod chat_template;
pub mod device_check;
pub mod engine;
pub mod gguf;
pub mod model_store;
pub mod policy_link;
pub mod score_client;
pub mod synthetic_model;
pub mod tokenizer;
pub mod ttc_policy;
pub mod ttc_service;
