//! The InferencePolicy API (energy.ttc.dev/v1alpha1).
