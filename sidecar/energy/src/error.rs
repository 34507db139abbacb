use std::path::PathBuf;

/// Everything that can go wrong while setting up or reading an energy meter.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    /// An NVML call failed.
    #[error("NVML {op} failed: {source}")]
    Nvml {
        /// The call that failed.
        op: &'static str,
        /// NVML's error.
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    /// The pod was given no GPU (NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES say none).
    #[error("no GPU is visible to this process ({0}); choose the `rapl` or `estimate` source")]
    NoVisibleGpu(String),
    /// A device named in NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES is not known to NVML.
    #[error(
        "visible device `{id}` is not among the GPUs NVML reports ({available:?}); check NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES"
    )]
    DeviceNotFound {
        /// The identifier from the environment.
        id: String,
        /// The UUIDs NVML reports.
        available: Vec<String>,
    },
    /// The pod was given a MIG instance, whose energy NVML does not report on its own.
    #[error(
        "visible device `{0}` is a MIG instance: NVML reports energy only for whole GPUs, which other tenants share; give the pod a whole GPU or choose the `estimate` source"
    )]
    MigInstance(String),
    /// A GPU offers neither an energy counter nor power readings.
    #[error(
        "GPU {uuid} reports neither total energy nor power usage; choose the `estimate` source"
    )]
    NothingToMeasure {
        /// The GPU's UUID.
        uuid: String,
    },
    /// A powercap file could not be read.
    #[error(
        "cannot read RAPL file {path}: {source} (energy_uj is root-only on most hosts since CVE-2020-8694)"
    )]
    RaplIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A powercap file did not hold a number.
    #[error("RAPL file {path} holds `{value}`, not a number of microjoules")]
    RaplParse {
        /// The file.
        path: PathBuf,
        /// What it held.
        value: String,
    },
    /// No RAPL package domain was found.
    #[error("no RAPL package domain (intel-rapl:N) under {0}")]
    NoRaplDomain(PathBuf),
    /// The process's CPU time could not be read.
    #[error("cannot read this process's CPU time: {0}")]
    CpuTime(#[source] std::io::Error),
    /// The estimate model's figures are unusable.
    #[error("invalid energy estimate model: {0}")]
    InvalidModel(String),
    /// An unknown energy source was named in configuration.
    #[error("unknown energy source `{0}`; expected auto, nvml, rapl or estimate")]
    UnknownSource(String),
}

impl EnergyError {
    pub(crate) fn nvml(op: &'static str) -> impl FnOnce(nvml_wrapper::error::NvmlError) -> Self {
        move |source| EnergyError::Nvml { op, source }
    }
}
