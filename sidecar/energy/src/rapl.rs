use std::fs;
use std::path::{Path, PathBuf};

use crate::sensor::{CounterTracker, DeviceReading, EnergySensor, HwType, SensorReading};
use crate::{EnergyError, EnergySource};

/// Where to find the powercap tree.
#[derive(Debug, Clone, PartialEq)]
pub struct RaplConfig {
    /// Root of the powercap class; `/sys/class/powercap` on a host, a fixture directory in tests.
    pub root: PathBuf,
}

impl Default for RaplConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/sys/class/powercap"),
        }
    }
}

#[derive(Debug)]
struct RaplDomain {
    name: String,
    energy_path: PathBuf,
    counter: CounterTracker,
}

/// Reads the CPU packages' RAPL energy counters (`intel-rapl:N/energy_uj`), which wrap at
/// `max_energy_range_uj` every few minutes to hours under load. AMD CPUs expose the same files.
///
/// RAPL measures whole packages: on a node shared with other pods their joules are in it too,
/// so it suits dedicated CPU inference nodes; elsewhere `estimate` is the honest choice.
#[derive(Debug)]
pub struct RaplSensor {
    domains: Vec<RaplDomain>,
}

impl RaplSensor {
    /// Finds the package domains under `config.root` and takes a first reading of each.
    ///
    /// Only top-level package domains (`intel-rapl:0`, `intel-rapl:1`, ...) are summed: their
    /// sub-domains (core, uncore, dram) are parts of them, and `psys` covers the packages too,
    /// so adding either would count the same joules twice.
    pub fn open(config: &RaplConfig) -> Result<Self, EnergyError> {
        let entries = fs::read_dir(&config.root).map_err(|source| EnergyError::RaplIo {
            path: config.root.clone(),
            source,
        })?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("intel-rapl:"))
                    .is_some_and(|rest| {
                        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .collect();
        dirs.sort();
        let mut domains = Vec::new();
        for dir in dirs {
            let name = fs::read_to_string(dir.join("name"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| dir.display().to_string());
            if name == "psys" {
                continue;
            }
            let energy_path = dir.join("energy_uj");
            let first = read_u64(&energy_path)?;
            // Without a known range a decrease is taken as a reset, which undercounts one wrap.
            let wrap_at = read_u64(&dir.join("max_energy_range_uj"))
                .ok()
                .filter(|&m| m > 0);
            domains.push(RaplDomain {
                name,
                energy_path,
                counter: CounterTracker::new(first, wrap_at),
            });
        }
        if domains.is_empty() {
            return Err(EnergyError::NoRaplDomain(config.root.clone()));
        }
        Ok(Self { domains })
    }
}

impl EnergySensor for RaplSensor {
    fn source(&self) -> EnergySource {
        EnergySource::Rapl
    }

    fn read(&mut self) -> Result<SensorReading, EnergyError> {
        let mut devices = Vec::with_capacity(self.domains.len());
        let mut total_uj = 0u64;
        for domain in &mut self.domains {
            let raw = read_u64(&domain.energy_path)?;
            domain.counter.update(raw);
            total_uj = total_uj.saturating_add(domain.counter.total());
            devices.push(DeviceReading {
                id: domain.name.clone(),
                hw_type: HwType::Cpu,
                energy_uj: domain.counter.total(),
                power_w: None,
            });
        }
        Ok(SensorReading { total_uj, devices })
    }
}

fn read_u64(path: &Path) -> Result<u64, EnergyError> {
    let text = fs::read_to_string(path).map_err(|source| EnergyError::RaplIo {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| EnergyError::RaplParse {
        path: path.to_path_buf(),
        value: text.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(root: &Path, dir: &str, name: &str, energy: u64, max: u64) {
        let d = root.join(dir);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("name"), format!("{name}\n")).unwrap();
        fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    fn set_energy(root: &Path, dir: &str, energy: u64) {
        fs::write(root.join(dir).join("energy_uj"), format!("{energy}\n")).unwrap();
    }

    #[test]
    fn sums_packages_only_and_handles_wrap() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        domain(root, "intel-rapl:0", "package-0", 1_000, 10_000);
        domain(root, "intel-rapl:1", "package-1", 9_000, 10_000);
        // Sub-domain and psys would double count.
        domain(root, "intel-rapl:0:0", "core", 500, 10_000);
        domain(root, "intel-rapl:2", "psys", 7, 10_000);
        fs::create_dir_all(root.join("intel-rapl-mmio:0")).unwrap();

        let mut sensor = RaplSensor::open(&RaplConfig {
            root: root.to_path_buf(),
        })
        .unwrap();
        assert_eq!(sensor.source(), EnergySource::Rapl);
        let first = sensor.read().unwrap();
        assert_eq!(first.total_uj, 0);
        let ids: Vec<_> = first.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["package-0", "package-1"]);

        set_energy(root, "intel-rapl:0", 3_000); // +2000
        set_energy(root, "intel-rapl:1", 500); // wrapped: +1000 to the top, +500 after
        set_energy(root, "intel-rapl:0:0", 9_999);
        let second = sensor.read().unwrap();
        assert_eq!(second.devices[0].energy_uj, 2_000);
        assert_eq!(second.devices[1].energy_uj, 1_500);
        assert_eq!(second.total_uj, 3_500);
        assert!(second.devices.iter().all(|d| d.hw_type == HwType::Cpu));
    }

    #[test]
    fn reports_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let config = RaplConfig {
            root: tmp.path().to_path_buf(),
        };
        assert!(matches!(
            RaplSensor::open(&config),
            Err(EnergyError::NoRaplDomain(_))
        ));
        domain(tmp.path(), "intel-rapl:0", "package-0", 1, 10);
        fs::write(tmp.path().join("intel-rapl:0/energy_uj"), "garbage").unwrap();
        let err = RaplSensor::open(&config).unwrap_err();
        assert!(matches!(err, EnergyError::RaplParse { .. }), "{err}");
        assert!(err.to_string().contains("garbage"));
    }
}
