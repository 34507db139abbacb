//! End to end: the one-command demo (a real node, the chart, two policies and their budgets) on
//! the local cluster of `ttc-cluster`. The tests beside it run the components together: images,
//! the chart on a real node, the operator's receiver with the sidecar's telemetry.

pub mod demo;
