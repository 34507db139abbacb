//! Against the real local control plane (e2e/): the CRD installs, the API server accepts the valid
//! manifests and the examples (`examples/`) and rejects each invalid manifest naming its field,
//! the webhook injects the sidecar in opted-in namespaces only, status converges from reports sent
//! the way a sidecar sends them, and a budget change re-splits the allocation.
//!
//! Needs `KUBECONFIG_FOR_TESTS` or `TTC_CONTROL_PLANE_BIN` (see `e2e/test.sh`); without either
//! these tests fail.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use ttc_api::{EnergyReport, EnergySource, InferencePolicy, InferencePolicyStatus};
use ttc_cluster::testing::{TestNamespace, eventually};
use ttc_operator::run::OperatorConfig;

mod common;

use common::{LocalPorts, TestResult, api_dir, install_crd, local_operator, policy_api};

fn manifests(kind: &str) -> Result<Vec<(String, String)>, std::io::Error> {
    yaml_files(&api_dir().join("tests/manifests").join(kind))
}

/// (file name, text) of the YAML files of a directory, sorted by name.
fn yaml_files(dir: &Path) -> Result<Vec<(String, String)>, std::io::Error> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((name, std::fs::read_to_string(&path)?));
        }
    }
    files.sort();
    Ok(files)
}

#[tokio::test]
async fn api_server_accepts_valid_and_rejects_invalid_manifests_naming_the_field() -> TestResult {
    let ns = TestNamespace::create("ipol-validation").await?;
    install_crd(ns.client()).await?;
    let api = policy_api(ns.client(), ns.name());

    for (file, text) in manifests("valid")? {
        let object: DynamicObject = serde_yaml::from_str(&text)?;
        api.create(&PostParams::default(), &object)
            .await
            .map_err(|e| format!("{file}: rejected: {e}"))?;
    }
    // The API server filled in the defaults.
    let typed: Api<InferencePolicy> = ns.api();
    let minimal = typed.get("minimal").await?;
    assert_eq!(minimal.spec.ttc, ttc_api::TtcSpec::default());
    assert_eq!(minimal.spec.budget.window_seconds, 300);

    let mut failures = Vec::new();
    for (file, text) in manifests("invalid")? {
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# field: "))
            .ok_or(format!("{file}: no # field: header"))?
            .trim()
            .to_string();
        let object: DynamicObject = serde_yaml::from_str(&text)?;
        let name = object
            .metadata
            .name
            .clone()
            .ok_or("manifest without a name")?;
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => failures.push(format!("{file}: accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(&field) {
                    failures.push(format!(
                        "{file}: expected 422 naming {field}, got {}: {}",
                        status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{file}: {e}")),
        }
        if api.get_opt(&name).await?.is_some() {
            failures.push(format!("{file}: stored although rejected"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ns.delete().await?;
    Ok(())
}

/// Every annotated example under `examples/` is accepted as it is, by server-side apply into a
/// test namespace (the example's own namespace is overridden).
#[tokio::test]
async fn api_server_accepts_the_examples() -> TestResult {
    let ns = TestNamespace::create("ipol-examples").await?;
    install_crd(ns.client()).await?;
    let api = policy_api(ns.client(), ns.name());
    let examples = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"))?;
    assert!(examples.len() >= 4, "only {} examples", examples.len());

    let mut failures = Vec::new();
    for (file, text) in &examples {
        let mut object: DynamicObject = serde_yaml::from_str(text)?;
        object.metadata.namespace = Some(ns.name().to_string());
        let name = object
            .metadata
            .name
            .clone()
            .ok_or("example without a name")?;
        let params = PatchParams::apply("ttc-examples-test");
        match api.patch(&name, &params, &Patch::Apply(&object)).await {
            Ok(stored) if stored.data["spec"].is_object() => {}
            Ok(stored) => failures.push(format!("{file}: stored without a spec: {stored:?}")),
            Err(e) => failures.push(format!("{file}: rejected: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // They parse as the operator reads them, with the API server's defaults filled in.
    let typed: Api<InferencePolicy> = ns.api();
    let stored = typed.list(&Default::default()).await?;
    assert_eq!(stored.items.len(), examples.len());
    ns.delete().await?;
    Ok(())
}

/// `--report-auth token-review` against the real API server: a projected token bound to a pod
/// names that pod (reviewed with the operator's own RBAC rights), a token for another audience or
/// bound to nothing is refused, and through the receiver a pod's token reports for that pod only.
#[tokio::test]
async fn a_report_token_speaks_for_the_pod_it_is_bound_to_only() -> TestResult {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    use ttc_operator::report_auth::{AuthError, ReportAuthenticator, ReportingPod, TokenReviewer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = TestNamespace::create("report-auth").await?;
    let pod = ns
        .api::<Pod>()
        .create(&PostParams::default(), &pod("inference-0", "inference"))
        .await?;
    // What the kubelet mints for a projected volume: bound to the pod, for one audience.
    let token = |audience: &str, bound: bool| {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                bound_object_ref: bound.then(|| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                expiration_seconds: Some(600),
            },
            ..Default::default()
        };
        let accounts = ns.api::<ServiceAccount>();
        async move {
            let minted = accounts
                .create_token_request("default", &PostParams::default(), &request)
                .await?;
            Ok::<_, kube::Error>(minted.status.map(|s| s.token).unwrap_or_default())
        }
    };
    let audience = ttc_api::report::REPORT_TOKEN_AUDIENCE;
    let operator = client_with_role(&ns, "ttc-operator", Rights::Operator).await?;
    let reviewer = TokenReviewer::new(operator);
    let bound = token(audience, true).await?;
    assert_eq!(
        reviewer.authenticate(&bound).await?,
        ReportingPod {
            namespace: ns.name().into(),
            pod: "inference-0".into()
        }
    );
    assert!(matches!(
        reviewer
            .authenticate(&token("another-audience", true).await?)
            .await,
        Err(AuthError::Rejected(_))
    ));
    assert!(matches!(
        reviewer.authenticate(&token(audience, false).await?).await,
        Err(AuthError::NotBound(_))
    ));
    assert!(matches!(
        reviewer.authenticate("not-a-token").await,
        Err(AuthError::Rejected(_))
    ));

    // Through the receiver, the way the sidecar's exporter sends it.
    let receiver = std::sync::Arc::new(ttc_operator::receiver::ReportReceiver {
        book: std::sync::Arc::new(ttc_operator::reports::ReportBook::new(Duration::from_secs(
            60,
        ))),
        metrics: std::sync::Arc::new(ttc_operator::metrics::Metrics::default()),
        wake: None,
        auth: Some(std::sync::Arc::new(reviewer)),
        refusals: Default::default(),
        leader: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}{}",
        listener.local_addr()?,
        ttc_api::report::JSON_REPORTS_PATH
    );
    let app = ttc_operator::receiver::router(receiver.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let report = |namespace: &str, pod: &str| EnergyReport {
        namespace: namespace.into(),
        pod: pod.into(),
        policy: "chat".into(),
        source: EnergySource::Estimate,
        joules_total: 12.0,
        requests_total: 3,
        samples_total: 6,
        watts: None,
        started_unix_nanos: None,
    };
    let http = reqwest::Client::new();
    // Another pod of its namespace, and the same pod name in another namespace, are refused.
    for (namespace, pod, expected) in [
        (ns.name(), "inference-1", 403),
        ("another-team", "inference-0", 403),
        (ns.name(), "inference-0", 204),
    ] {
        let status = http
            .post(&url)
            .bearer_auth(&bound)
            .json(&report(namespace, pod))
            .send()
            .await?
            .status();
        assert_eq!(status.as_u16(), expected, "report for {namespace}/{pod}");
    }
    let status = http
        .post(&url)
        .json(&report(ns.name(), "inference-0"))
        .send()
        .await?
        .status();
    assert_eq!(status.as_u16(), 401);
    assert_eq!(receiver.book.len(), 1);
    server.abort();
    ns.delete().await?;
    Ok(())
}

/// What each ServiceAccount the chart creates may do, as the API server computes it
/// (`kubectl auth can-i --list`: a SelfSubjectRulesReview as that account), printed as a table and
/// asserted to be exactly the least each needs: the operator reads policies, pods and
/// namespaces, writes policy status and events, reviews report tokens and holds its Lease; a
/// sidecar reads policies. Neither may read Secrets or change pods.
#[tokio::test]
async fn each_chart_account_may_do_exactly_what_it_needs() -> TestResult {
    use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
    use std::collections::{BTreeMap, BTreeSet};
    let ns = TestNamespace::create("rights").await?;
    let table = |rows: &[(&str, &str)]| -> BTreeMap<String, String> {
        rows.iter()
            .map(|(r, v)| (r.to_string(), v.to_string()))
            .collect()
    };
    let expected = [
        (
            "ttc-operator",
            Rights::Operator,
            table(&[
                ("authentication.k8s.io/tokenreviews", "create"),
                (
                    "coordination.k8s.io/leases",
                    "create get list patch update watch",
                ),
                ("core/namespaces", "get list watch"),
                ("core/pods", "get list watch"),
                ("energy.ttc.dev/inferencepolicies", "get list watch"),
                (
                    "energy.ttc.dev/inferencepolicies/status",
                    "get patch update",
                ),
                ("events.k8s.io/events", "create patch"),
            ]),
        ),
        (
            "inference",
            Rights::Sidecar,
            table(&[("energy.ttc.dev/inferencepolicies", "get list watch")]),
        ),
    ];
    for (account, rights, expected) in expected {
        let client = client_with_role(&ns, account, rights).await?;
        let review = SelfSubjectRulesReview {
            spec: SelfSubjectRulesReviewSpec {
                namespace: Some(ns.name().into()),
            },
            ..Default::default()
        };
        let review = Api::<SelfSubjectRulesReview>::all(client)
            .create(&PostParams::default(), &review)
            .await?;
        let mut rights: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for rule in review.status.map(|s| s.resource_rules).unwrap_or_default() {
            for group in rule.api_groups.unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    let group = if group.is_empty() { "core" } else { &group };
                    // What every authenticated user may do: ask what it may do.
                    if resource.starts_with("selfsubject") {
                        continue;
                    }
                    rights
                        .entry(format!("{group}/{resource}"))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
        let rights: BTreeMap<String, String> = rights
            .into_iter()
            .map(|(r, v)| (r, v.into_iter().collect::<Vec<_>>().join(" ")))
            .collect();
        println!("{account} ({} namespace):", ns.name());
        println!("  {:<45} verbs", "resource");
        for (resource, verbs) in &rights {
            println!("  {resource:<45} {verbs}");
        }
        assert_eq!(rights, expected, "{account}");
    }
    ns.delete().await?;
    Ok(())
}

/// Whose rights a test client gets: the chart's roles, rendered by helm (the one definition of
/// what the operator and the sidecars may do).
#[derive(Clone, Copy, PartialEq)]
enum Rights {
    /// The operator as the chart installs it (the chart owns the webhook configuration).
    Operator,
    /// The operator run without the chart, with `--webhook-config-name`: the chart's rights and
    /// the one it leaves out, managing its own MutatingWebhookConfiguration.
    OperatorManagingWebhook,
    /// An injected sidecar.
    Sidecar,
}

/// Name the chart's objects get in these tests (`fullnameOverride`).
const CHART_RIGHTS: &str = "ttc-rights";

/// The chart's `templates/rbac.yaml`, rendered for `namespace` with sidecar token reviews on.
fn chart_rbac(
    ns: &TestNamespace,
) -> Result<Vec<serde_yaml::Value>, Box<dyn std::error::Error + Send + Sync>> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ttc-operator");
    let out = ns
        .cluster()
        .helm()
        .arg("template")
        .arg(CHART_RIGHTS)
        .arg(&chart)
        .args(["--namespace", ns.name()])
        .args(["--set", &format!("fullnameOverride={CHART_RIGHTS}")])
        .args(["--set", "operator.reportAuth=token-review"])
        .args(["--show-only", "templates/rbac.yaml"])
        .output()?;
    if !out.status.success() {
        return Err(format!("helm template: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Applies the chart's roles and returns a client acting as ServiceAccount `account` of
/// `namespace`, bound to the roles of `rights` as the chart binds them.
async fn client_with_role(
    ns: &TestNamespace,
    account: &str,
    rights: Rights,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
    };
    let admin = ns.client().clone();
    let apply = PatchParams::apply("ttc-operator-tests").force();
    let mut roles = Vec::new();
    for document in chart_rbac(ns)? {
        match document["kind"].as_str() {
            Some("ClusterRole") => {
                let role: ClusterRole = serde_yaml::from_value(document)?;
                let name = role
                    .metadata
                    .name
                    .clone()
                    .ok_or("ClusterRole without a name")?;
                Api::<ClusterRole>::all(admin.clone())
                    .patch(&name, &apply, &Patch::Apply(&role))
                    .await?;
                roles.push(name);
            }
            Some("Role") => {
                let role: Role = serde_yaml::from_value(document)?;
                let name = role.metadata.name.clone().ok_or("Role without a name")?;
                ns.api::<Role>()
                    .patch(&name, &apply, &Patch::Apply(&role))
                    .await?;
            }
            _ => {} // Bindings: made below for the test's own ServiceAccount.
        }
    }
    let (cluster_role, leader_election) = match rights {
        Rights::Operator | Rights::OperatorManagingWebhook => (
            CHART_RIGHTS.to_string(),
            Some(format!("{CHART_RIGHTS}-leader-election")),
        ),
        Rights::Sidecar => (format!("{CHART_RIGHTS}-sidecar"), None),
    };
    assert!(
        roles.contains(&cluster_role),
        "the chart renders no ClusterRole {cluster_role}: {roles:?}"
    );
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(account.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await?;
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: account.into(),
        namespace: Some(ns.name().into()),
        api_group: None,
    };
    let role_ref = |kind: &str, name: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: name.into(),
    };
    let mut cluster_roles = vec![cluster_role];
    if rights == Rights::OperatorManagingWebhook {
        let name = format!("{}-{account}-webhook-config", ns.name());
        let role = ClusterRole {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["admissionregistration.k8s.io".into()]),
                resources: Some(vec!["mutatingwebhookconfigurations".into()]),
                verbs: vec!["get".into(), "create".into(), "patch".into()],
                ..Default::default()
            }]),
            ..Default::default()
        };
        Api::<ClusterRole>::all(admin.clone())
            .patch(&name, &apply, &Patch::Apply(&role))
            .await?;
        cluster_roles.push(name);
    }
    for (i, role) in cluster_roles.iter().enumerate() {
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("{}-{account}-{i}", ns.name())),
                ..Default::default()
            },
            role_ref: role_ref("ClusterRole", role),
            subjects: Some(vec![subject.clone()]),
        };
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await?;
    }
    if let Some(role) = leader_election {
        let leader = RoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("{account}-leader-election")),
                ..Default::default()
            },
            role_ref: role_ref("Role", &role),
            subjects: Some(vec![subject]),
        };
        ns.api::<RoleBinding>()
            .create(&PostParams::default(), &leader)
            .await?;
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(ns.cluster().kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{}:{account}", ns.name()));
    Ok(Client::try_from(config)?)
}

async fn delete_bindings(ns: &TestNamespace, accounts: &[&str]) -> TestResult {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let bindings = Api::<ClusterRoleBinding>::all(ns.client().clone());
    let roles = Api::<ClusterRole>::all(ns.client().clone());
    for account in accounts {
        let prefix = format!("{}-{account}-", ns.name());
        for binding in bindings.list(&Default::default()).await? {
            let name = binding.metadata.name.unwrap_or_default();
            if name.starts_with(&prefix) {
                bindings.delete(&name, &DeleteParams::default()).await?;
            }
        }
        let webhook_role = format!("{prefix}webhook-config");
        if roles.get_opt(&webhook_role).await?.is_some() {
            roles
                .delete(&webhook_role, &DeleteParams::default())
                .await?;
        }
    }
    Ok(())
}

/// The status line of `GET path` on 127.0.0.1:`port`.
async fn get_status_line(port: u16, path: &str) -> Result<String, std::io::Error> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.lines().next().unwrap_or_default().to_string())
}

/// Sends one JSON energy report the way a sidecar does (plain HTTP/1.1 POST).
async fn send_report(port: u16, report: &EnergyReport) -> TestResult {
    let body = serde_json::to_vec(report)?;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        ttc_api::report::JSON_REPORTS_PATH,
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    assert!(
        response.starts_with("HTTP/1.1 204"),
        "report refused: {response}"
    );
    Ok(())
}

fn pod(name: &str, app: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("app:latest".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .any(|c| c.name == ttc_api::labels::SIDECAR_CONTAINER_NAME)
    })
}

async fn status_where(
    api: &Api<InferencePolicy>,
    what: &str,
    check: impl Fn(&InferencePolicyStatus) -> bool,
) -> Result<InferencePolicyStatus, String> {
    eventually(what, Duration::from_secs(60), || {
        let api = api.clone();
        let check = &check;
        async move {
            let policy = api.get("chat").await.map_err(|e| e.to_string())?;
            let status = policy.status.ok_or("no status yet")?;
            if check(&status) {
                Ok(Some(status))
            } else {
                Err(serde_json::to_string(&status).unwrap_or_default())
            }
        }
    })
    .await
}

#[tokio::test]
async fn operator_injects_converges_and_resplits() -> TestResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = TestNamespace::create("ipol-operator").await?;
    let other = TestNamespace::create("ipol-not-opted-in").await?;
    let client = ns.client().clone();
    install_crd(&client).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let label = json!({"metadata": {"labels": {ttc_api::labels::INJECTION_NAMESPACE_LABEL: ttc_api::labels::INJECTION_ENABLED}}});
    namespaces
        .patch(ns.name(), &PatchParams::default(), &Patch::Merge(&label))
        .await?;

    let webhook_config = format!("ttc-test-{}", ns.name());
    let (config, ports) = local_operator(ns.name(), Some(webhook_config.clone()))?;
    let LocalPorts {
        admin: admin_port,
        receiver: receiver_port,
        ..
    } = ports;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // The operator runs with the chart's rights (and, managing its own webhook configuration
    // here, the one the chart leaves out), nothing more.
    let operator_client =
        client_with_role(&ns, "ttc-operator", Rights::OperatorManagingWebhook).await?;
    let operator = tokio::spawn(ttc_operator::run::run(
        operator_client.clone(),
        config.clone(),
        shutdown_rx,
    ));

    let spec = json!({
        "selector": {"matchLabels": {"app": "chat"}},
        "budget": {"joulesPerRequest": 2.0, "powerCapWatts": 100.0, "windowSeconds": 60}
    });
    for namespace in [ns.name(), other.name()] {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
            "metadata": {"name": "chat", "namespace": namespace}, "spec": spec
        }))?;
        policy_api(&client, namespace)
            .create(&PostParams::default(), &object)
            .await?;
    }
    let policies: Api<InferencePolicy> = ns.api();
    // Status appears once the leader reconciles; by then the webhook configuration is applied.
    status_where(&policies, "first status", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
    .await?;
    // Readiness (the Deployment's probe, hence the Service's endpoints) follows the caches.
    eventually(
        "/readyz answers 200",
        Duration::from_secs(30),
        || async move {
            let line = get_status_line(admin_port, "/readyz")
                .await
                .map_err(|e| e.to_string())?;
            Ok(line.contains(" 200 ").then_some(()))
        },
    )
    .await?;

    let pods: Api<Pod> = ns.api();
    // The webhook's policy cache may trail the controller's by a moment; retry the first pod.
    let first = eventually("injected pod", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let created = pods
                .create(&PostParams::default(), &pod("chat-a", "chat"))
                .await
                .map_err(|e| e.to_string())?;
            if has_sidecar(&created) {
                return Ok(Some(created));
            }
            pods.delete(
                "chat-a",
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            eventually("pod gone", Duration::from_secs(30), || {
                let pods = pods.clone();
                async move {
                    Ok(pods
                        .get_opt("chat-a")
                        .await
                        .map_err(|e| e.to_string())?
                        .is_none()
                        .then_some(()))
                }
            })
            .await?;
            Err("created without sidecar".into())
        }
    })
    .await?;
    let sidecar = first
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "ttc-sidecar"))
        .ok_or("no sidecar")?;
    assert_eq!(sidecar.image.as_deref(), Some("ttc-sidecar:test"));
    assert_eq!(
        sidecar
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let second = pods
        .create(&PostParams::default(), &pod("chat-b", "chat"))
        .await?;
    assert!(has_sidecar(&second), "second pod lacks the sidecar");
    let unselected = pods
        .create(&PostParams::default(), &pod("search", "search"))
        .await?;
    assert!(
        !has_sidecar(&unselected),
        "a pod no policy selects got the sidecar"
    );
    let elsewhere = other
        .api::<Pod>()
        .create(&PostParams::default(), &pod("chat-a", "chat"))
        .await?;
    assert!(
        !has_sidecar(&elsewhere),
        "a pod in a namespace that did not opt in got the sidecar"
    );

    let elsewhere_policies: Api<InferencePolicy> = other.api();
    eventually(
        "not-opted-in namespace reported",
        Duration::from_secs(60),
        || {
            let api = elsewhere_policies.clone();
            async move {
                let status = api.get("chat").await.map_err(|e| e.to_string())?.status;
                let not_ready = status.is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Ready"
                            && c.status == "False"
                            && c.reason == "NamespaceNotOptedIn"
                    })
                });
                Ok(not_ready.then_some(()))
            }
        },
    )
    .await?;
    status_where(&policies, "two injected pods", |s| {
        s.matched_pods == 2 && s.injected_pods == 2
    })
    .await?;

    // Reports as a sidecar sends them: cumulative counters, twice, some time apart.
    let report = |pod: &str, joules: f64, requests: u64, watts: f64| EnergyReport {
        namespace: ns.name().into(),
        pod: pod.into(),
        policy: "chat".into(),
        source: EnergySource::Nvml,
        joules_total: joules,
        requests_total: requests,
        samples_total: requests * 4,
        watts: Some(watts),
        started_unix_nanos: None,
    };
    send_report(receiver_port, &report("chat-a", 0.0, 0, 30.0)).await?;
    send_report(receiver_port, &report("chat-b", 0.0, 0, 10.0)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    send_report(receiver_port, &report("chat-a", 45.0, 30, 30.0)).await?;
    send_report(receiver_port, &report("chat-b", 15.0, 10, 10.0)).await?;
    let status = status_where(&policies, "observed energy", |s| {
        s.observed.as_ref().is_some_and(|o| o.requests == 40)
    })
    .await?;
    let observed = status.observed.as_ref().ok_or("observed")?;
    assert_eq!(observed.joules_per_request, Some(1.5));
    assert_eq!(observed.watts, 40.0);
    assert_eq!(observed.source, EnergySource::Nvml);
    assert_eq!(status.mean_depth, Some(4.0));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "BudgetMet" && c.status == "True")
    );
    let share = |s: &InferencePolicyStatus, pod: &str| {
        s.allocations.iter().find(|a| a.pod == pod).map(|a| a.share)
    };
    assert!(
        share(&status, "chat-a") > share(&status, "chat-b"),
        "the busier pod should get more: {:?}",
        status.allocations
    );

    // A budget change re-splits the allocation and flags the excess.
    let tighter = json!({"spec": {"budget": {"powerCapWatts": 20.0}}});
    policies
        .patch("chat", &PatchParams::default(), &Patch::Merge(&tighter))
        .await?;
    let status = status_where(&policies, "re-split", |s| {
        s.allocations.iter().filter_map(|a| a.watts).sum::<f64>() <= 20.01
            && s.conditions
                .iter()
                .any(|c| c.type_ == "BudgetMet" && c.status == "False")
    })
    .await?;
    assert_eq!(status.allocations.len(), 2);

    // A sidecar reads its allocation with read-only rights and cannot write status.
    let sidecar_client = client_with_role(&ns, "inference", Rights::Sidecar).await?;
    let as_sidecar: Api<InferencePolicy> = Api::namespaced(sidecar_client, ns.name());
    let seen = as_sidecar.get("chat").await?;
    let mine = seen
        .status
        .as_ref()
        .and_then(|s| s.allocations.iter().find(|a| a.pod == "chat-a"))
        .ok_or("no allocation for chat-a")?;
    assert!(mine.watts.is_some_and(|w| w > 0.0));
    let write = as_sidecar
        .patch_status(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"matchedPods": 0}})),
        )
        .await;
    assert!(
        matches!(write, Err(kube::Error::Api(ref s)) if s.code == 403),
        "sidecar could write status: {write:?}"
    );
    assert!(
        status
            .allocations
            .iter()
            .all(|a| a.watts.is_some_and(|w| w > 0.0))
    );

    // A pod created while no policy selects it shows up as missing its sidecar once selected.
    let late = pods
        .create(&PostParams::default(), &pod("late", "other"))
        .await?;
    assert!(!has_sidecar(&late));
    let relabel = json!({"metadata": {"labels": {"app": "chat"}}});
    pods.patch("late", &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    let status = status_where(&policies, "pod without sidecar reported", |s| {
        s.matched_pods == 3
            && s.conditions.iter().any(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "PodsWithoutSidecar"
            })
    })
    .await?;
    assert_eq!(status.injected_pods, 2);

    // Stop the operator and start a new replica: it takes over the released lease, keeps the
    // stored status and converges again from the sidecars' next reports.
    shutdown_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await??
        .map_err(|e| e.to_string())?;
    let config = OperatorConfig {
        identity: Some("test-replica-2".into()),
        ..config
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let restarted = Instant::now();
    let operator = tokio::spawn(ttc_operator::run::run(
        operator_client.clone(),
        config,
        shutdown_rx,
    ));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
    eventually(
        "new replica holds the lease",
        Duration::from_secs(30),
        || {
            let leases = leases.clone();
            async move {
                let lease = leases
                    .get("ttc-operator")
                    .await
                    .map_err(|e| e.to_string())?;
                let holder = lease.spec.and_then(|s| s.holder_identity);
                Ok((holder.as_deref() == Some("test-replica-2")).then_some(()))
            }
        },
    )
    .await?;
    assert!(
        restarted.elapsed() < Duration::from_secs(10),
        "the lease was not released on shutdown"
    );
    for (joules, requests) in [(60.0, 40), (90.0, 60)] {
        send_report(receiver_port, &report("chat-a", joules, requests, 30.0)).await?;
        send_report(
            receiver_port,
            &report("chat-b", joules / 3.0, requests / 3, 10.0),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let status = status_where(&policies, "converged after restart", |s| {
        s.observed.as_ref().is_some_and(|o| o.requests == 20 + 7) && s.matched_pods == 3
    })
    .await?;
    assert_eq!(status.allocations.len(), 3);

    shutdown_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await??
        .map_err(|e| e.to_string())?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&webhook_config, &DeleteParams::default())
        .await?;
    delete_bindings(&ns, &["ttc-operator", "inference"]).await?;
    other.delete().await?;
    ns.delete().await?;
    Ok(())
}
