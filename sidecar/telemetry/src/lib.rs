//! Sidecar telemetry.
