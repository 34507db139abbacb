//! Pure decision logic on plain values: no client, no I/O, no clock.
//!
//! The controller, webhook and receiver gather inputs from caches and feed them here.

pub mod allocation;
pub mod cluster_split;
pub mod injection;
pub mod selection;
pub mod silence;
pub mod status;
