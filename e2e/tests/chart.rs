//! The Helm chart (`charts/ttc-operator`) against the real local API server: lint, server-side
//! dry run of the rendered manifests, install / upgrade / uninstall without orphans.
//!
//! The operator's image does not run here (kwok only marks pods Running), so these tests check
//! the objects, not the operator's behaviour. Each test uses its own namespace and a release
//! named after it, so cluster-scoped objects (named after the release) never collide.
//!
//! Needs `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`), except the
//! check that the chart's CRD is the generated one.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Deserialize as _;
use serde_json::Value;
use ttc_cluster::testing::{TestCluster, TestNamespace, shared_cluster};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CRD_FILE: &str = "inferencepolicy.crd.yaml";
const CRD_NAME: &str = "inferencepolicies.energy.ttc.dev";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/ttc-operator")
}

/// Runs `command` (with `stdin` piped in when given) and returns its stdout; fails with its
/// stderr when it exits non-zero.
fn run(command: &mut Command, stdin: Option<&[u8]>) -> Result<String, String> {
    let described = format!("{command:?}");
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("{described}: cannot start: {e}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input)
            .map_err(|e| format!("{described}: writing stdin: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{described}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "{described} failed ({}):\n{}\n{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(stdout)
}

async fn cluster() -> Result<&'static TestCluster, Box<dyn std::error::Error + Send + Sync>> {
    Ok(tokio::task::spawn_blocking(shared_cluster).await??)
}

/// Installs the chart's CRD (server-side apply: the same object other tests may create).
fn install_crd(cluster: &TestCluster) -> Result<(), String> {
    let crd = chart_dir().join("crds").join(CRD_FILE);
    run(
        cluster.kubectl().args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=ttc-e2e-chart",
            "-f",
            "-",
        ]),
        Some(&std::fs::read(&crd).map_err(|e| format!("{}: {e}", crd.display()))?),
    )?;
    run(
        cluster.kubectl().args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{CRD_NAME}"),
        ]),
        None,
    )?;
    Ok(())
}

/// `kubectl get <kinds> -o json` items (an empty list when none).
fn get_items(
    command: &mut Command,
) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
    let out = run(command.args(["-o", "json"]), None)?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn get_one(command: &mut Command) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let out = run(command.args(["-o", "json"]), None)?;
    Ok(serde_json::from_str(&out)?)
}

#[test]
fn chart_crd_is_the_generated_manifest() {
    let generated = repo_root().join("api").join(CRD_FILE);
    let copy = chart_dir().join("crds").join(CRD_FILE);
    let generated_text = std::fs::read_to_string(&generated).expect("generated CRD manifest");
    let copy_text = std::fs::read_to_string(&copy).expect("chart's CRD manifest");
    assert!(
        generated_text == copy_text,
        "{} differs from {}; copy it: cp {} {}",
        copy.display(),
        generated.display(),
        generated.display(),
        copy.display()
    );
}

#[tokio::test]
async fn helm_lint_is_clean() -> TestResult {
    let cluster = cluster().await?;
    let chart = chart_dir();
    for extra in [
        &[][..],
        &["--set", "webhook.certManager.enabled=true"][..],
        &["--set", "operator.reportAuth=token-review"][..],
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "monitoring.serviceMonitor.enabled=true",
            "--set",
            "monitoring.podMonitor.enabled=true",
        ][..],
        &[
            "--set",
            "model.hostPath=/var/lib/models",
            "--set",
            "model.namespaces={ml}",
            "--set",
            "clusterPowerCapWatts=500",
        ][..],
    ] {
        let out = run(
            cluster
                .helm()
                .arg("lint")
                .arg("--strict")
                .arg(&chart)
                .args(extra),
            None,
        )?;
        assert!(
            out.contains("0 chart(s) failed") && !out.contains("[WARNING]"),
            "helm lint {extra:?}:\n{out}"
        );
    }
    Ok(())
}

/// `values.schema.json` names every value of `values.yaml` and nothing that is not there (so
/// that a new value cannot be forgotten in it, and a misspelt key is refused), except `global`
/// (a parent chart's) and the keys of maps that are empty by default (`issuerRef`).
#[test]
fn values_schema_describes_every_value() {
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json"))
            .expect("values.schema.json"),
    )
    .expect("values.schema.json parses");
    let mut problems = Vec::new();
    compare_with_schema("", &values, &schema, &mut problems);
    assert!(
        problems.is_empty(),
        "values.schema.json:\n{}",
        problems.join("\n")
    );
}

/// Walks `value` (from values.yaml at `path`) against its `schema`, noting keys one has and the
/// other lacks where the schema lists the properties of a closed object.
fn compare_with_schema(path: &str, value: &Value, schema: &Value, problems: &mut Vec<String>) {
    if schema.get("description").is_none() {
        problems.push(format!("{path}: no description"));
    }
    let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object())
    else {
        return;
    };
    if schema["additionalProperties"] != Value::Bool(false) {
        problems.push(format!(
            "{path}: open to unknown keys (additionalProperties)"
        ));
    }
    for (key, child) in object {
        match properties.get(key) {
            Some(child_schema) => {
                compare_with_schema(&format!("{path}.{key}"), child, child_schema, problems)
            }
            None => problems.push(format!("{path}.{key}: in values.yaml, not in the schema")),
        }
    }
    if !object.is_empty() {
        let parents_only = |key: &str| path.is_empty() && key == "global";
        for key in properties.keys() {
            if !object.contains_key(key) && !parents_only(key) {
                problems.push(format!("{path}.{key}: in the schema, not in values.yaml"));
            }
        }
    }
}

/// Bad values are refused by `helm template` (and so by install and upgrade) with the path of
/// the value, before anything reaches the cluster; good values of other shapes pass.
#[tokio::test]
async fn values_schema_refuses_bad_values_naming_them() -> TestResult {
    let cluster = cluster().await?;
    for (set, named) in [
        ("operator.reportAuth=tokenreview", "/operator/reportAuth"),
        ("operater.replicas=3", "'operater' not allowed"),
        ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
        ("webhook.failurePolicy=ignore", "/webhook/failurePolicy"),
        ("clusterPowerCapWatts=lots", "/clusterPowerCapWatts"),
        ("operator.ports.admin=70000", "/operator/ports/admin"),
        ("operator.resyncSeconds=0", "/operator/resyncSeconds"),
        (
            "webhook.certManager.duration=1y",
            "/webhook/certManager/duration",
        ),
        ("sidecar.rbac.bindings[0].namespace=ml", "serviceAccount"),
        (
            "sidecar.otlpEndpoint=collector:4318",
            "/sidecar/otlpEndpoint",
        ),
    ] {
        let refused = template(cluster, "schema", &[set])
            .err()
            .ok_or_else(|| format!("--set {set} was accepted"))?;
        assert!(
            refused.contains("schema") && refused.contains(named),
            "--set {set}: the error does not name {named}:\n{refused}"
        );
    }
    for set in [
        "operator.image.tag=1.2",
        "clusterPowerCapWatts=1500",
        "clusterPowerCapWatts=1500.5",
        "operator.podDisruptionBudget.minAvailable=50%",
        "sidecar.otlpEndpoint=https://collector.monitoring:4318",
        "webhook.url=https://10.0.0.1:8443/mutate",
    ] {
        template(cluster, "schema", &[set])?;
    }
    Ok(())
}

#[tokio::test]
async fn cert_manager_option_renders_a_certificate_and_ca_injection() -> TestResult {
    let cluster = cluster().await?;
    let out = run(
        cluster
            .helm()
            .args(["template", "cm", "--namespace", "ttc-system"])
            .arg(chart_dir())
            .args(["--set", "webhook.certManager.enabled=true"]),
        None,
    )?;
    assert!(out.contains("kind: Certificate"), "{out}");
    assert!(
        out.contains("cert-manager.io/inject-ca-from: ttc-system/cm-ttc-operator-webhook"),
        "{out}"
    );
    assert!(!out.contains("caBundle:"), "{out}");
    assert!(!out.contains("kind: Secret"), "{out}");
    // The serving certificate comes from a CA of the chart's own, so its renewals keep the CA
    // that the API server and the injected sidecars trust.
    let docs = template(cluster, "cm", &["webhook.certManager.enabled=true"])?;
    let named = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .ok_or(format!("no {kind} {name}"))
    };
    let ca = named("Certificate", "cm-ttc-operator-ca")?;
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(
        ca["spec"]["issuerRef"]["name"],
        "cm-ttc-operator-selfsigned"
    );
    let ca_issuer = named("Issuer", "cm-ttc-operator-ca")?;
    assert_eq!(
        ca_issuer["spec"]["ca"]["secretName"],
        ca["spec"]["secretName"]
    );
    let serving = named("Certificate", "cm-ttc-operator-webhook")?;
    assert_eq!(serving["spec"]["issuerRef"]["name"], "cm-ttc-operator-ca");
    // An issuer of the user's replaces all of it.
    let docs = template(
        cluster,
        "cm",
        &[
            "webhook.certManager.enabled=true",
            "webhook.certManager.issuerRef.name=corp-ca",
            "webhook.certManager.issuerRef.kind=ClusterIssuer",
        ],
    )?;
    assert!(!docs.iter().any(|d| d["kind"] == "Issuer"));
    let serving = docs
        .iter()
        .find(|d| d["kind"] == "Certificate")
        .ok_or("no Certificate")?;
    assert_eq!(serving["spec"]["issuerRef"]["name"], "corp-ca");
    Ok(())
}

/// The chart rendered as release `release` in ttc-system with `sets` (`--set` each), one value
/// per document.
fn template(cluster: &TestCluster, release: &str, sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut helm = cluster.helm();
    helm.args(["template", release, "--namespace", "ttc-system"])
        .arg(chart_dir());
    for set in sets {
        helm.args(["--set", set]);
    }
    let out = run(&mut helm, None)?;
    Ok(serde_yaml::Deserializer::from_str(&out)
        .map(|doc| Value::deserialize(doc).unwrap_or(Value::Null))
        .collect())
}

/// The monitors scrape the operator's Service port `metrics` and every injected sidecar's
/// `ttc-http` port; the NetworkPolicy lets sidecars' namespaces reach the receiver and the
/// configured peers the metrics. All off by default.
#[tokio::test]
async fn monitoring_and_network_policy_options_render() -> TestResult {
    let cluster = cluster().await?;
    let kinds = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .filter_map(|d| d["kind"].as_str().map(str::to_string))
            .collect()
    };
    let plain = template(cluster, "mon", &[])?;
    for kind in ["ServiceMonitor", "PodMonitor", "NetworkPolicy"] {
        assert!(
            !kinds(&plain).iter().any(|k| k == kind),
            "{kind} rendered by default"
        );
    }
    let docs = template(
        cluster,
        "mon",
        &[
            "monitoring.serviceMonitor.enabled=true",
            "monitoring.podMonitor.enabled=true",
            "monitoring.podMonitor.labels.release=kps",
            "networkPolicy.enabled=true",
        ],
    )?;
    let one = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .ok_or(format!("no {kind}"))
    };
    let service_monitor = one("ServiceMonitor")?;
    assert_eq!(service_monitor["spec"]["endpoints"][0]["port"], "metrics");
    let pod_monitor = one("PodMonitor")?;
    assert_eq!(
        pod_monitor["spec"]["podMetricsEndpoints"][0]["port"],
        "ttc-http"
    );
    assert_eq!(pod_monitor["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(pod_monitor["metadata"]["labels"]["release"], "kps");
    let policy = one("NetworkPolicy")?;
    let rules = policy["spec"]["ingress"]
        .as_array()
        .ok_or("no ingress rules")?;
    let receiver = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "otlp-http")
        .ok_or("no receiver rule")?;
    assert_eq!(
        receiver["from"][0]["namespaceSelector"]["matchLabels"]["energy.ttc.dev/injection"],
        "enabled"
    );
    let webhook = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "webhook")
        .ok_or("no webhook rule")?;
    assert!(
        webhook.get("from").is_none(),
        "the API server must reach the webhook"
    );
    Ok(())
}

/// The receiver serves TLS by default and sidecars are sent to its https:// URL; switched off,
/// plain HTTP on both ends.
#[tokio::test]
async fn receiver_tls_option_sets_the_receiver_and_the_sidecars_endpoint() -> TestResult {
    let cluster = cluster().await?;
    for (set, tls, scheme) in [
        (None, "true", "https"),
        (Some("operator.receiverTls=false"), "false", "http"),
    ] {
        let docs = template(cluster, "tls", set.as_slice())?;
        let config = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["data"]["TTC_RECEIVER_TLS"].is_string())
            .ok_or("no ConfigMap with TTC_RECEIVER_TLS")?;
        assert_eq!(config["data"]["TTC_RECEIVER_TLS"], tls);
        assert_eq!(
            config["data"]["TTC_OTLP_ENDPOINT"],
            format!("{scheme}://tls-ttc-operator.ttc-system.svc:4318").as_str()
        );
    }
    Ok(())
}

#[tokio::test]
async fn report_auth_option_configures_the_operator_and_grants_token_reviews() -> TestResult {
    let cluster = cluster().await?;
    for (value, reviews) in [("none", false), ("token-review", true)] {
        let docs = template(cluster, "auth", &[&format!("operator.reportAuth={value}")])?;
        let config = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["data"]["TTC_REPORT_AUTH"].is_string())
            .ok_or("no ConfigMap with TTC_REPORT_AUTH")?;
        assert_eq!(config["data"]["TTC_REPORT_AUTH"], value);
        let role = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "auth-ttc-operator")
            .ok_or("no operator ClusterRole")?;
        let grants_reviews = role["rules"].as_array().is_some_and(|rules| {
            rules.iter().any(|r| {
                r["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|x| x == "tokenreviews"))
            })
        });
        assert_eq!(grants_reviews, reviews, "{value}: {role}");
    }
    Ok(())
}

#[tokio::test]
async fn webhook_url_option_calls_the_url_with_a_certificate_for_its_host() -> TestResult {
    let cluster = cluster().await?;
    for (url, host) in [
        ("https://127.0.0.1:9443/mutate", "127.0.0.1"),
        (
            "https://webhook.example.com:8443/mutate",
            "webhook.example.com",
        ),
    ] {
        let out = run(
            cluster
                .helm()
                .args(["template", "url", "--namespace", "ttc-system"])
                .arg(chart_dir())
                .args(["--set", &format!("webhook.url={url}")]),
            None,
        )?;
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out)
            .map(|doc| Value::deserialize(doc).unwrap_or(Value::Null))
            .collect();
        let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).cloned();
        let webhook = kind("MutatingWebhookConfiguration").ok_or("no webhook configuration")?;
        let client_config = &webhook["webhooks"][0]["clientConfig"];
        assert_eq!(client_config["url"], url, "{client_config}");
        assert!(client_config.get("service").is_none(), "{client_config}");
        assert!(client_config["caBundle"].is_string(), "{client_config}");
        let secret = kind("Secret").ok_or("no webhook Secret")?;
        check_webhook_certificate(&secret, host)?;
        // The Service name stays valid for replicas that are called through it.
        check_webhook_certificate(&secret, "url-ttc-operator.ttc-system.svc")?;
    }
    Ok(())
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server() -> TestResult {
    let ns = TestNamespace::create("chart-template").await?;
    let cluster = ns.cluster();
    install_crd(cluster)?;
    let release = ns.name().to_string();
    for extra in [
        &[][..],
        &[
            "--set",
            "clusterPowerCapWatts=750",
            "--set-json",
            r#"sidecar.resources={"limits":{"nvidia.com/gpu":"1","memory":"4Gi"}}"#,
            "--set",
            "sidecar.otlpEndpoint=http://otel-collector.observability:4318",
            "--set",
            "model.default=/models/qwen.gguf",
            "--set",
            "model.hostPath=/var/lib/models",
            "--set",
            &format!("model.namespaces={{{release}}}"),
            "--set-json",
            &format!(
                r#"sidecar.rbac.bindings=[{{"namespace":"{release}","serviceAccount":"default"}}]"#
            ),
            "--set",
            "operator.logLevel=debug",
            "--set",
            "networkPolicy.enabled=true",
            "--set-json",
            r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
        ][..],
    ] {
        let rendered = run(
            cluster
                .helm()
                .args([
                    "template",
                    &release,
                    "--include-crds",
                    "--namespace",
                    &release,
                ])
                .arg(chart_dir())
                .args(extra),
            None,
        )?;
        let applied = run(
            cluster
                .kubectl()
                .args(["apply", "--dry-run=server", "-f", "-"]),
            Some(rendered.as_bytes()),
        )?;
        for expected in [
            "deployment.apps/",
            "mutatingwebhookconfiguration.admissionregistration.k8s.io/",
            "poddisruptionbudget.policy/",
            "clusterrole.rbac.authorization.k8s.io/",
            "service/",
            "secret/",
        ] {
            assert!(
                applied.contains(expected),
                "dry run {extra:?} lacks {expected}:\n{applied}"
            );
        }
        // The API server takes the NetworkPolicy where it is on.
        assert_eq!(
            applied.contains("networkpolicy.networking.k8s.io/"),
            extra.contains(&"networkPolicy.enabled=true"),
            "{applied}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn install_upgrade_uninstall_leaves_no_orphans() -> TestResult {
    let ns = TestNamespace::create("chart-install").await?;
    let cluster = ns.cluster();
    let release = ns.name().to_string();
    let selector = format!("app.kubernetes.io/instance={release}");
    let helm = || {
        let mut command = cluster.helm();
        command.args(["--namespace", &release]);
        command
    };

    // The operator's pods must pass the "restricted" Pod Security Standard.
    run(
        ns.kubectl().args([
            "label",
            "namespace",
            &release,
            "pod-security.kubernetes.io/enforce=restricted",
        ]),
        None,
    )?;

    run(
        helm().args(["install", &release]).arg(chart_dir()).args([
            "--set",
            "model.hostPath=/var/lib/models",
            "--set",
            &format!("model.namespaces={{{release}}}"),
            "--set-json",
            &format!(
                r#"sidecar.rbac.bindings=[{{"namespace":"{release}","serviceAccount":"default"}}]"#
            ),
            // Other tests on the shared cluster create pods in opted-in namespaces: keep this
            // release's webhook (which has no running backend) away from them.
            "--set-json",
            &format!(
                r#"webhook.objectSelector={{"matchLabels":{{"ttc-e2e/chart-release":"{release}"}}}}"#
            ),
        ]),
        None,
    )?;

    // The CRD is installed (or was already there) and established.
    install_crd(cluster)?;

    // The objects, as the API server keeps them.
    let fullname = format!("{release}-ttc-operator");
    let deployment = get_one(ns.kubectl().args(["get", "deployment", &fullname]))?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert_eq!(
        container["image"],
        "ghcr.io/ttc-operator/ttc-operator:0.1.0"
    );

    let config = get_one(ns.kubectl().args(["get", "configmap", &fullname]))?;
    assert_eq!(config["data"]["TTC_LEASE_NAME"], fullname.as_str());
    assert_eq!(
        config["data"]["TTC_OTLP_ENDPOINT"],
        format!("https://{fullname}.{release}.svc:4318").as_str()
    );
    assert_eq!(config["data"]["TTC_RECEIVER_TLS"], "true");
    assert!(config["data"].get("TTC_CLUSTER_POWER_CAP_WATTS").is_none());

    let service = get_one(ns.kubectl().args(["get", "service", &fullname]))?;
    let ports: Vec<i64> = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [443, 4318, 8080]);

    let secret_name = format!("{fullname}-webhook-tls");
    let secret = get_one(ns.kubectl().args(["get", "secret", &secret_name]))?;
    let ca = secret["data"]["ca.crt"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!ca.is_empty(), "the webhook Secret has a CA: {secret}");
    check_webhook_certificate(&secret, &format!("{fullname}.{release}.svc"))?;

    let webhook =
        get_one(
            cluster
                .kubectl()
                .args(["get", "mutatingwebhookconfiguration", &fullname]),
        )?;
    let hook = &webhook["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(
        hook["namespaceSelector"]["matchLabels"][ttc_api_label()],
        "enabled"
    );
    assert_eq!(hook["clientConfig"]["caBundle"], ca.as_str());
    assert_eq!(
        hook["objectSelector"]["matchLabels"]["ttc-e2e/chart-release"],
        release.as_str()
    );
    assert_eq!(hook["clientConfig"]["service"]["name"], fullname.as_str());
    assert_eq!(
        hook["clientConfig"]["service"]["namespace"],
        release.as_str()
    );

    let pdb = get_one(ns.kubectl().args(["get", "pdb", &fullname]))?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    for role in [fullname.clone(), format!("{fullname}-sidecar")] {
        get_one(cluster.kubectl().args(["get", "clusterrole", &role]))?;
    }
    get_one(ns.kubectl().args(["get", "pvc", "ttc-models"]))?;

    // Least privilege: what the operator and the bound sidecar account may and may not do.
    let operator_sa = format!("system:serviceaccount:{release}:{fullname}");
    let sidecar_sa = format!("system:serviceaccount:{release}:default");
    let everywhere = ["--all-namespaces"];
    let here = ["--namespace", release.as_str()];
    let elsewhere = ["--namespace", "default"];
    let status_everywhere = ["--all-namespaces", "--subresource=status"];
    let status_here = ["--namespace", release.as_str(), "--subresource=status"];
    for (who, verb, resource, scope, allowed) in [
        (
            &operator_sa,
            "watch",
            "inferencepolicies.energy.ttc.dev",
            &everywhere[..],
            true,
        ),
        (
            &operator_sa,
            "patch",
            "inferencepolicies.energy.ttc.dev",
            &status_everywhere[..],
            true,
        ),
        (
            &operator_sa,
            "update",
            "inferencepolicies.energy.ttc.dev",
            &everywhere[..],
            false,
        ),
        (&operator_sa, "list", "pods", &everywhere[..], true),
        (&operator_sa, "patch", "pods", &everywhere[..], false),
        (&operator_sa, "watch", "namespaces", &everywhere[..], true),
        (
            &operator_sa,
            "create",
            "events.events.k8s.io",
            &elsewhere[..],
            true,
        ),
        (
            &operator_sa,
            "update",
            "leases.coordination.k8s.io",
            &here[..],
            true,
        ),
        (
            &operator_sa,
            "create",
            "leases.coordination.k8s.io",
            &elsewhere[..],
            false,
        ),
        (&operator_sa, "get", "secrets", &here[..], false),
        (
            &operator_sa,
            "create",
            "mutatingwebhookconfigurations",
            &everywhere[..],
            false,
        ),
        (
            &sidecar_sa,
            "watch",
            "inferencepolicies.energy.ttc.dev",
            &here[..],
            true,
        ),
        (
            &sidecar_sa,
            "list",
            "inferencepolicies.energy.ttc.dev",
            &elsewhere[..],
            false,
        ),
        (
            &sidecar_sa,
            "patch",
            "inferencepolicies.energy.ttc.dev",
            &status_here[..],
            false,
        ),
    ] {
        let out = cluster
            .kubectl()
            .args(["auth", "can-i", verb, resource, "--as", who])
            .args(scope)
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(
            answer == "yes",
            allowed,
            "{who} {verb} {resource} {scope:?}: kubectl auth can-i says {answer:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Both replicas are created under the restricted policy (kwok marks them Running).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let pods = get_items(ns.kubectl().args(["get", "pods", "-l", &selector]))?;
        if pods.len() == 2 {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let events = run(ns.kubectl().args(["get", "events"]), None)?;
            panic!("{} operator pods after 60s; events:\n{events}", pods.len());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // The README's quickstart policy is accepted in the release's world.
    run(
        ns.kubectl().args(["apply", "-f", "-"]),
        Some(QUICKSTART_POLICY.as_bytes()),
    )?;

    // Upgrade with a changed value: the configuration follows, the certificate stays.
    run(
        helm().args(["upgrade", &release]).arg(chart_dir()).args([
            "--reuse-values",
            "--set",
            "clusterPowerCapWatts=750",
        ]),
        None,
    )?;
    let config = get_one(ns.kubectl().args(["get", "configmap", &fullname]))?;
    assert_eq!(config["data"]["TTC_CLUSTER_POWER_CAP_WATTS"], "750");
    let secret = get_one(ns.kubectl().args(["get", "secret", &secret_name]))?;
    assert_eq!(
        secret["data"]["ca.crt"],
        ca.as_str(),
        "an upgrade keeps the webhook certificate"
    );
    let webhook =
        get_one(
            cluster
                .kubectl()
                .args(["get", "mutatingwebhookconfiguration", &fullname]),
        )?;
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"],
        ca.as_str()
    );
    let status = run(helm().args(["status", &release, "-o", "json"]), None)?;
    let status: Value = serde_json::from_str(&status)?;
    assert_eq!(status["version"], 2);

    // Uninstall: nothing of the release is left, the CRD stays.
    run(helm().args(["uninstall", &release, "--wait"]), None)?;
    // Owned objects (ReplicaSets, Pods) go with the garbage collector, in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let namespaced = get_items(ns.kubectl().args([
            "get",
            "deployments,replicasets,pods,services,configmaps,secrets,serviceaccounts,roles,\
             rolebindings,poddisruptionbudgets,persistentvolumeclaims",
            "-l",
            &selector,
        ]))?;
        let cluster_scoped = get_items(cluster.kubectl().args([
            "get",
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,persistentvolumes",
            "-l",
            &selector,
        ]))?;
        if namespaced.is_empty() && cluster_scoped.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left after uninstall: in the namespace {:?}, cluster-scoped {:?}",
            names(&namespaced),
            names(&cluster_scoped)
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    get_one(cluster.kubectl().args(["get", "crd", CRD_NAME]))?;
    Ok(())
}

/// The policy of the README's Helm quickstart (namespace left to kubectl).
const QUICKSTART_POLICY: &str = r#"
apiVersion: energy.ttc.dev/v1alpha1
kind: InferencePolicy
metadata: {name: chat}
spec:
  selector: {matchLabels: {app: chat}}
  budget: {joulesPerRequest: 2, windowSeconds: 300}
  ttc: {strategy: Adaptive, minSamples: 1, maxSamples: 8}
  model: {name: smollm2-135m-instruct}
"#;

/// The webhook Secret holds a key rustls can serve with and a certificate for the Service's
/// name that verifies against the CA the API server is given.
fn check_webhook_certificate(
    secret: &Value,
    host: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use base64::Engine as _;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    let field = |name: &str| -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let encoded = secret["data"][name]
            .as_str()
            .ok_or_else(|| format!("the webhook Secret lacks {name}"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::from_pem_slice(&field("tls.key")?)?;
    provider.key_provider.load_private_key(key)?;
    let cert = CertificateDer::from_pem_slice(&field("tls.crt")?)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&field("ca.crt")?)?)?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()?;
    verifier.verify_server_cert(
        &cert,
        &[],
        &ServerName::try_from(host.to_string())?,
        &[],
        UnixTime::now(),
    )?;
    Ok(())
}

fn ttc_api_label() -> &'static str {
    ttc_api::labels::INJECTION_NAMESPACE_LABEL
}

fn names(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["kind"].as_str().unwrap_or("?"),
                i["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}
