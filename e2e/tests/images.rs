//! The Dockerfiles against the workspace, for the builds this machine cannot run (their Rust
//! builder stage needs a registry; `e2e/images/build.sh` replaces it with host-built binaries):
//! every file they copy exists, they copy every workspace member (cargo loads the whole
//! workspace), they build a package and binary that exist with the workspace's Rust version, and
//! they expose the ports the chart and the operator use. `containers.rs` runs the images.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The workspace's members and Rust version, from the root Cargo.toml.
fn workspace() -> (Vec<String>, String) {
    let manifest = read("Cargo.toml");
    let line = |key: &str| {
        manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key} in Cargo.toml"))
            .trim()
            .to_string()
    };
    let members = line("members")
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect();
    (members, line("rust-version").trim_matches('"').to_string())
}

/// The arguments of every `instruction` line of `dockerfile`, continuation lines joined.
fn instructions(dockerfile: &str, instruction: &str) -> Vec<String> {
    dockerfile
        .replace("\\\n", " ")
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{instruction} ")))
        .map(str::to_string)
        .collect()
}

struct Image {
    dockerfile: &'static str,
    package: &'static str,
    ports: Vec<u16>,
}

fn images() -> Vec<Image> {
    let values: Value =
        serde_yaml::from_str(&read("charts/ttc-operator/values.yaml")).expect("chart values");
    let port = |name: &str| {
        values["operator"]["ports"][name]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("operator.ports.{name} in the chart values"))
    };
    vec![
        Image {
            dockerfile: "operator/Dockerfile",
            package: "ttc-operator",
            ports: vec![port("webhook"), port("receiver"), port("admin")],
        },
        Image {
            dockerfile: "sidecar/Dockerfile",
            package: "ttc-sidecar",
            ports: vec![ttc_api::policy::DEFAULT_SIDECAR_PORT],
        },
    ]
}

#[test]
fn dockerfiles_copy_the_whole_workspace_and_build_what_exists() {
    let (members, rust_version) = workspace();
    for image in images() {
        let dockerfile = read(image.dockerfile);
        let name = image.dockerfile;
        let copied: Vec<String> = instructions(&dockerfile, "COPY")
            .iter()
            .filter(|args| !args.starts_with("--from"))
            .flat_map(|args| {
                let mut parts: Vec<String> = args.split_whitespace().map(str::to_string).collect();
                parts.pop(); // the destination
                parts
            })
            .collect();
        for source in &copied {
            assert!(
                repo().join(source).exists(),
                "{name} copies {source}, which is not in the repository"
            );
        }
        for member in &members {
            assert!(
                copied
                    .iter()
                    .any(|c| member == c || member.starts_with(&format!("{c}/"))),
                "{name} does not copy workspace member {member}: cargo cannot load the workspace"
            );
        }
        let build = instructions(&dockerfile, "RUN").join(" ");
        assert!(
            build.contains(&format!("-p {}", image.package))
                && build.contains(&format!("target/release/{}", image.package)),
            "{name} does not build and install {}: {build}",
            image.package
        );
        let package_manifest = members
            .iter()
            .map(|m| read(&format!("{m}/Cargo.toml")))
            .find(|m| m.contains(&format!("name = \"{}\"", image.package)));
        assert!(
            package_manifest.is_some(),
            "{name} builds {}, which is no workspace package",
            image.package
        );
        let builder = dockerfile
            .lines()
            .find_map(|l| {
                l.strip_prefix("FROM rust:")
                    .or_else(|| l.strip_prefix("ARG BUILDER=rust:"))
            })
            .unwrap_or_else(|| panic!("{name} names no Rust builder image"));
        assert!(
            builder.starts_with(&format!("{rust_version}-")),
            "{name} builds with rust:{builder}, the workspace needs {rust_version}"
        );
        let exposed: Vec<u16> = instructions(&dockerfile, "EXPOSE")
            .iter()
            .flat_map(|args| {
                args.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u16>>()
            })
            .collect();
        assert_eq!(
            exposed, image.ports,
            "{name} exposes other ports than the chart and defaults use"
        );
    }
}
