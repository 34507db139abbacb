//! The sidecar's own CPU compute kernels, where candle's are missing or slow for test-time
//! compute's shape of work (many sampled rows of one prompt per step).
//!
//! A crate of its own so that debug builds still optimise it (see the workspace's
//! `profile.dev.package.ttc-kernels`): the engine's tests run the real model through it.

pub mod attention;
pub mod q8;
