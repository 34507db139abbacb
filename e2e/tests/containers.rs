//! The images built by `e2e/images/build.sh` run as the chart runs them: as uid 65532, with a
//! read-only root filesystem, every capability dropped and no privilege escalation. The operator
//! with the chart's configuration serves /healthz, /readyz, /metrics and its TLS webhook against
//! the test cluster; the sidecar serves the default model from a read-only volume and answers a
//! chat completion; neither image holds a shell or a package manager.
//!
//! Needs `TTC_IMAGES_DIR` (set by `e2e/test.sh`), the default model at `TTC_DEFAULT_MODEL_FILE`
//! and a cluster (`KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use ttc_cluster::images::Images;
use ttc_cluster::pki::Pki;
use ttc_cluster::testing::{TestNamespace, ask_sidecar, free_port, wait_until_up};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The flags the chart's securityContext amounts to (runAsNonRoot with the image's user 65532,
/// readOnlyRootFilesystem, drop ALL, allowPrivilegeEscalation false), on the host network so the
/// containers reach the test cluster on loopback.
const RESTRICTED: [&str; 8] = [
    "--read-only",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--user=65532:65532",
    "--network=host",
    "--pull=never",
    "--tmpfs=/tmp:rw,size=256m,mode=1777",
    "--read-only-tmpfs=false",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn output(command: &mut Command) -> Result<String, String> {
    let described = format!("{command:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .map_err(|e| format!("{described}: cannot start: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{described} failed ({status}): {}",
            String::from_utf8_lossy(&stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// A detached container, removed when dropped (its log printed first, for failures).
struct Container<'a> {
    images: &'a Images,
    id: String,
}

impl<'a> Container<'a> {
    fn run(images: &'a Images, args: &[String]) -> Result<Self, String> {
        let id = output(
            images
                .podman()
                .args(["run", "--detach"])
                .args(RESTRICTED)
                .args(args),
        )?;
        Ok(Container {
            images,
            id: id.trim().to_string(),
        })
    }

    fn logs(&self) -> String {
        let out = self.images.podman().args(["logs", &self.id]).output();
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
    }

    fn inspect(&self, format: &str) -> Result<String, String> {
        output(
            self.images
                .podman()
                .args(["inspect", "--format", format, &self.id]),
        )
        .map(|s| s.trim().to_string())
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("container {} log:\n{}", self.id, self.logs());
        }
        let _ = self
            .images
            .podman()
            .args(["rm", "--force", "--time=2", &self.id])
            .output();
    }
}

/// The container's process, as the kernel sees it: uid 65532, no capabilities at all, no
/// privilege escalation, and a root filesystem mounted read-only.
fn assert_restricted(container: &Container) -> Result<(), String> {
    let pid = container.inspect("{{.State.Pid}}")?;
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), ["65532"; 4], "{status}");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(set), ["0000000000000000"], "{set} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");
    let mounts =
        std::fs::read_to_string(format!("/proc/{pid}/mounts")).map_err(|e| e.to_string())?;
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .ok_or("no root mount")?;
    let options = root.split_whitespace().nth(3).unwrap_or_default();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "root is not read-only: {root}"
    );
    Ok(())
}

/// Every file of `image` with its mode, from `podman export` of a container never started.
fn files(images: &Images, image: &str) -> Result<Vec<(String, String)>, String> {
    let id = output(images.podman().args(["create", "--pull=never", image]))?;
    let id = id.trim();
    let listing = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" export \"$1\" | tar -tvf -")
        .arg("podman")
        .arg(id)
        .envs(images.podman_env().iter().map(|(k, v)| (k, v)))
        .output();
    let _ = images.podman().args(["rm", id]).output();
    let listing = listing.map_err(|e| e.to_string())?;
    if !listing.status.success() {
        return Err(String::from_utf8_lossy(&listing.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| {
            let mode = line.split_whitespace().next()?.to_string();
            let path = line.split_whitespace().nth(5)?.trim_start_matches("./");
            Some((path.to_string(), mode))
        })
        .collect())
}

#[test]
fn images_hold_no_shell_or_package_manager() -> TestResult {
    let images = Images::from_env()?;
    const FORBIDDEN: [&str; 14] = [
        "sh", "bash", "dash", "ash", "busybox", "apt", "apt-get", "dpkg", "rpm", "yum", "dnf",
        "microdnf", "apk", "pip",
    ];
    for (image, entrypoint) in [
        (&images.operator, "usr/local/bin/ttc-operator"),
        (&images.sidecar, "usr/local/bin/ttc-sidecar"),
    ] {
        let files = files(&images, image)?;
        assert!(
            files.iter().any(|(p, _)| p == entrypoint),
            "{image} has no {entrypoint}"
        );
        for (path, mode) in &files {
            let name = path.rsplit('/').next().unwrap_or(path);
            assert!(
                !FORBIDDEN.contains(&name),
                "{image} holds {path}: the image must have no shell or package manager"
            );
            // Executables: the entrypoint and shared libraries (and the dynamic loader) only.
            let executable = mode.starts_with('-') && mode.contains('x');
            assert!(
                !executable || path == entrypoint || name.contains(".so"),
                "{image} holds the program {path} ({mode}); only {entrypoint} should run"
            );
        }
        let size =
            output(
                images
                    .podman()
                    .args(["image", "inspect", "--format", "{{.Size}}", image]),
            )?;
        let size: f64 = size.trim().parse()?;
        println!("{image}: {:.1} MB, {} files", size / 1e6, files.len());
    }
    Ok(())
}

/// The operator's environment as the chart's ConfigMap sets it (`helm template` with the
/// defaults), with its servers moved to free loopback ports (the containers share the host's
/// network with the tests).
fn chart_operator_env(ns: &TestNamespace) -> Result<Vec<(String, String)>, String> {
    let chart = repo_root().join("charts/ttc-operator");
    let rendered = output(
        ns.cluster()
            .helm()
            .args(["template", "ttc", "--namespace", ns.name(), "--show-only"])
            .arg("templates/configmap.yaml")
            .arg(&chart),
    )?;
    let config_map: Value = serde_yaml::from_str(&rendered).map_err(|e| e.to_string())?;
    let data = config_map["data"]
        .as_object()
        .ok_or("the chart's ConfigMap has no data")?;
    let mut env: Vec<(String, String)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    for (key, value) in &mut env {
        if key.ends_with("_ADDR") {
            let port = free_port().map_err(|e| e.to_string())?;
            *value = format!("127.0.0.1:{port}");
        }
    }
    env.push(("POD_NAME".into(), "ttc-operator-container".into()));
    env.push(("POD_NAMESPACE".into(), ns.name().into()));
    // Report tokens are reviewed by the API server, which this test's sidecar-less run never
    // needs; the rest is exactly the chart's.
    Ok(env)
}

fn addr(env: &[(String, String)], key: &str) -> String {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("the chart's ConfigMap sets no {key}"))
}

#[tokio::test]
async fn operator_image_serves_health_metrics_and_its_tls_webhook() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let images = Images::from_env()?;
    let ns = TestNamespace::create("operator-image").await?;
    let crd = repo_root().join("charts/ttc-operator/crds/inferencepolicy.crd.yaml");
    output(
        ns.kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(&crd),
    )?;

    // The webhook's certificate as the chart's Secret mounts it: tls.crt, tls.key, ca.crt.
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate(&dir.path().join("pki"))?;
    let tls = dir.path().join("webhook-tls");
    std::fs::create_dir(&tls)?;
    for (from, to) in [
        (&pki.serving_cert, "tls.crt"),
        (&pki.serving_key, "tls.key"),
        (&pki.ca_cert, "ca.crt"),
    ] {
        std::fs::copy(from, tls.join(to))?;
    }
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::copy(ns.cluster().kubeconfig(), &kubeconfig)?;
    for path in [&kubeconfig, &tls.join("tls.key")] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }

    let env = chart_operator_env(&ns)?;
    let mut args = vec![
        format!("--volume={}:/etc/ttc/webhook-tls:ro", tls.display()),
        format!("--volume={}:/etc/ttc/kubeconfig:ro", kubeconfig.display()),
        "--env=KUBECONFIG=/etc/ttc/kubeconfig".to_string(),
    ];
    args.extend(env.iter().map(|(k, v)| format!("--env={k}={v}")));
    args.push(images.operator.clone());
    let container = Container::run(&images, &args)?;
    assert_restricted(&container)?;

    let admin = format!("http://{}", addr(&env, "TTC_ADMIN_ADDR"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    for path in ["/healthz", "/readyz"] {
        wait_until_up(&http, &format!("{admin}{path}"), Duration::from_secs(60)).await?;
    }
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("# TYPE") && metrics.contains("ttc_"),
        "/metrics is no Prometheus exposition of the operator's metrics:\n{metrics}"
    );

    // The webhook speaks TLS with the mounted certificate and answers an AdmissionReview.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_cert)?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(5))
        .build()?;
    let webhook = addr(&env, "TTC_WEBHOOK_ADDR").replace("127.0.0.1", "localhost");
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0f6bd5d2-2c1a-4e0e-9d67-6c0c5f1d1a01",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns.name(),
            "operation": "CREATE",
            "userInfo": {"username": "test"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": ns.name()},
                "spec": {"containers": [{"name": "app", "image": "app"}]}
            }
        }
    });
    let response: Value = https
        .post(format!("https://{webhook}/mutate"))
        .json(&review)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(
        response["response"]["uid"], review["request"]["uid"],
        "the webhook's answer: {response}"
    );
    assert_eq!(response["response"]["allowed"], true, "{response}");
    drop(container);
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn sidecar_image_serves_the_default_model_from_a_read_only_volume() -> TestResult {
    let images = Images::from_env()?;
    let model = PathBuf::from(std::env::var("TTC_DEFAULT_MODEL_FILE").map_err(
        |_| "TTC_DEFAULT_MODEL_FILE is not set (e2e/test.sh sets it to the fetched default model)",
    )?);
    let file = model
        .file_name()
        .ok_or("no model file name")?
        .to_string_lossy();
    let dir = model.parent().ok_or("no model directory")?;
    let port = free_port()?;
    let args = vec![
        format!("--volume={}:/models:ro", dir.display()),
        format!("--env=TTC_LISTEN=127.0.0.1:{port}"),
        format!("--env=TTC_MODEL=/models/{file}"),
        "--env=TTC_THREADS=1".to_string(),
        images.sidecar.clone(),
    ];
    let container = Container::run(&images, &args)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&http, &format!("{base}/readyz"), Duration::from_secs(120)).await?;
    let answer = ask_sidecar(&http, &base, "What is 2 + 3?", 8).await?;
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!content.is_empty(), "no answer: {answer}");
    assert!(
        answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "no tokens counted: {answer}"
    );
    assert_restricted(&container)?;
    Ok(())
}
