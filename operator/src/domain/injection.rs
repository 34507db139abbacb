//! The sidecar container and the JSON patch that injects it into a pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use ttc_api::labels::{
    INJECT_POD_ANNOTATION, INJECTED_POLICY_ANNOTATION, INJECTION_SKIPPED_ANNOTATION,
    SIDECAR_CONTAINER_NAME, SIDECAR_PORT_NAME,
};
use ttc_api::report::{ATTR_NAMESPACE, ATTR_POD_NAME, ATTR_POLICY, sidecar_env};
use ttc_api::{InferencePolicySpec, report};

use crate::domain::selection::selects;

/// Mount point of the model volume in the sidecar.
pub const MODEL_MOUNT_PATH: &str = "/models";
const MODEL_VOLUME: &str = "ttc-model";
const TMP_VOLUME: &str = "ttc-tmp";
const REPORT_TOKEN_VOLUME: &str = "ttc-report-token";
const FEEDBACK_KEYS_VOLUME: &str = "ttc-feedback-keys";
/// Where the sidecar caches fetched models (on the /tmp emptyDir).
pub const MODEL_CACHE_PATH: &str = "/tmp/models";
/// UID the sidecar runs as (non-root).
pub const SIDECAR_UID: i64 = 65532;

/// The operator's defaults for what a policy leaves unset.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarDefaults {
    /// Sidecar image.
    pub image: String,
    /// Model served when the policy names none.
    pub model_name: String,
    /// OTLP/HTTP endpoint of the operator's report receiver.
    pub otlp_endpoint: String,
    /// Resources when the policy sets none.
    pub resources: Option<ResourceRequirements>,
    /// Whether the receiver authenticates reports (`--report-auth token-review`): the sidecar
    /// then gets a projected service-account token for the receiver's audience.
    pub report_token: bool,
    /// The receiver's CA (PEM) where it serves TLS (`--receiver-tls`): sidecars that report to
    /// it get it in `TTC_REPORT_CA_PEM` and trust only it.
    pub report_ca_pem: Option<String>,
}

/// What the webhook does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum InjectionDecision {
    /// Inject the sidecar of this policy.
    Inject {
        /// Name of the policy.
        policy: String,
    },
    /// Leave the pod alone; no policy selects it, or it opted out, or it has the sidecar.
    Skip,
    /// Several policies select the pod: inject none and say so on the pod.
    Overlapping {
        /// Names of the policies, sorted.
        policies: Vec<String>,
    },
}

/// Decides for a pod being created, given the policies of its namespace `(name, spec)`.
pub fn decide(pod: &Pod, policies: &[(&str, &InferencePolicySpec)]) -> InjectionDecision {
    let annotations = pod.metadata.annotations.as_ref();
    if annotations
        .and_then(|a| a.get(INJECT_POD_ANNOTATION))
        .is_some_and(|v| v == "false")
    {
        return InjectionDecision::Skip;
    }
    let has_sidecar = pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .any(|c| c.name == SIDECAR_CONTAINER_NAME)
    });
    if has_sidecar {
        return InjectionDecision::Skip;
    }
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut matching: Vec<String> = policies
        .iter()
        .filter(|(_, spec)| selects(&spec.selector, labels).unwrap_or(false))
        .map(|(name, _)| name.to_string())
        .collect();
    matching.sort();
    match matching.len() {
        0 => InjectionDecision::Skip,
        1 => InjectionDecision::Inject {
            policy: matching.remove(0),
        },
        _ => InjectionDecision::Overlapping { policies: matching },
    }
}

/// The sidecar container for a pod governed by `policy`.
pub fn sidecar_container(
    policy: &str,
    spec: &InferencePolicySpec,
    defaults: &SidecarDefaults,
) -> Container {
    let port = spec.sidecar.port_or_default();
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let from = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(field(path)),
        ..Default::default()
    };
    let mut env = vec![
        value(sidecar_env::POLICY_NAME, policy.to_string()),
        from(sidecar_env::POD_NAMESPACE, "metadata.namespace"),
        from(sidecar_env::POD_NAME, "metadata.name"),
        from(sidecar_env::POD_UID, "metadata.uid"),
        from(sidecar_env::NODE_NAME, "spec.nodeName"),
        value(sidecar_env::LISTEN, format!("0.0.0.0:{port}")),
        value(sidecar_env::ENABLE_TTC, "true".into()),
        value(sidecar_env::MODEL_CACHE, MODEL_CACHE_PATH.into()),
    ];
    let model = spec
        .model
        .path
        .clone()
        .or_else(|| spec.model.name.clone())
        .unwrap_or_else(|| defaults.model_name.clone());
    env.push(value(sidecar_env::MODEL, model));
    let otlp = spec
        .sidecar
        .otlp_endpoint
        .clone()
        .unwrap_or_else(|| defaults.otlp_endpoint.clone());
    // The receiver's CA, for reports to the receiver (a policy's own collector has its own).
    if let Some(ca) = defaults
        .report_ca_pem
        .as_ref()
        .filter(|_| otlp == defaults.otlp_endpoint)
    {
        env.push(value(sidecar_env::REPORT_CA_PEM, ca.clone()));
    }
    env.push(value(sidecar_env::OTLP_ENDPOINT, otlp));
    // $(VAR) refers to the variables defined above; the kubelet expands them.
    env.push(value(
        sidecar_env::OTEL_RESOURCE_ATTRIBUTES,
        format!(
            "{ATTR_NAMESPACE}=$({}),{ATTR_POD_NAME}=$({}),{ATTR_POLICY}={policy}",
            sidecar_env::POD_NAMESPACE,
            sidecar_env::POD_NAME
        ),
    ));
    let resources = spec
        .sidecar
        .resources
        .clone()
        .or_else(|| defaults.resources.clone());
    // A sidecar given a GPU runs on it (the image must be a CUDA build).
    if resources.as_ref().is_some_and(gives_a_gpu) {
        env.push(value(sidecar_env::CUDA, "true".into()));
    }
    let mut mounts = vec![VolumeMount {
        name: TMP_VOLUME.into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if defaults.report_token {
        env.push(value(
            sidecar_env::REPORT_TOKEN_FILE,
            report::REPORT_TOKEN_PATH.into(),
        ));
        mounts.push(VolumeMount {
            name: REPORT_TOKEN_VOLUME.into(),
            mount_path: mount_location(report::REPORT_TOKEN_PATH).0.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    env.push(value(
        sidecar_env::FEEDBACK_KEY_FILE,
        report::FEEDBACK_KEY_PATH.into(),
    ));
    mounts.push(VolumeMount {
        name: FEEDBACK_KEYS_VOLUME.into(),
        mount_path: mount_location(report::FEEDBACK_KEY_PATH).0.into(),
        read_only: Some(true),
        ..Default::default()
    });
    if spec.model.volume_claim.is_some() {
        mounts.push(VolumeMount {
            name: MODEL_VOLUME.into(),
            mount_path: MODEL_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: SIDECAR_CONTAINER_NAME.into(),
        image: Some(
            spec.sidecar
                .image
                .clone()
                .unwrap_or_else(|| defaults.image.clone()),
        ),
        args: Some(vec!["serve".into()]),
        env: Some(env),
        // The sidecar listens only once its model is loaded (fetched first, where the cache is
        // empty): up to 10 minutes to start, then ready while it listens, and restarted when it
        // stops answering for a minute (the engine runs beside the HTTP server, so a long batch
        // does not hold the probes up).
        startup_probe: Some(http_probe("/healthz", 5, 120)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        ports: Some(vec![ContainerPort {
            name: Some(SIDECAR_PORT_NAME.into()),
            container_port: i32::from(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources,
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// Whether the resources hold at least one `nvidia.com/gpu` (limits, or requests).
fn gives_a_gpu(resources: &ResourceRequirements) -> bool {
    [&resources.limits, &resources.requests]
        .into_iter()
        .flatten()
        .filter_map(|r| r.get(GPU_RESOURCE))
        .any(|q| q.0.trim() != "0")
}

/// The NVIDIA device plugin's resource name.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// An HTTP GET probe of `path` on the sidecar's port, every `period` seconds, failing after
/// `failures` failures in a row (each may take 5 s).
fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(SIDECAR_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The security context of the Pod Security Standards' "restricted" profile.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// A file's path in the sidecar as (directory, file name): the directory is mounted, the file
/// is the volume's item.
fn mount_location(path: &'static str) -> (&'static str, &'static str) {
    path.rsplit_once('/').unwrap_or(("/", path))
}

fn sidecar_volumes(spec: &InferencePolicySpec, defaults: &SidecarDefaults) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: TMP_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    if defaults.report_token {
        let (_, file) = mount_location(report::REPORT_TOKEN_PATH);
        volumes.push(Volume {
            name: REPORT_TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(report::REPORT_TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: file.into(),
                    }),
                    ..Default::default()
                }]),
                default_mode: None,
            }),
            ..Default::default()
        });
    }
    // The namespace's feedback keys, when someone created them: optional, so pods start
    // without (each sidecar then signs with a key of its own).
    volumes.push(Volume {
        name: FEEDBACK_KEYS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(report::FEEDBACK_KEY_SECRET.into()),
            optional: Some(true),
            items: Some(vec![KeyToPath {
                key: report::FEEDBACK_KEY_SECRET_KEY.into(),
                path: mount_location(report::FEEDBACK_KEY_PATH).1.into(),
                mode: None,
            }]),
            default_mode: None,
        }),
        ..Default::default()
    });
    if let Some(claim) = &spec.model.volume_claim {
        volumes.push(Volume {
            name: MODEL_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
    }
    volumes
}

/// Escapes a key for a JSON pointer (RFC 6901).
fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn annotate(pod: &Pod, key: &str, value: &str) -> Value {
    if pod.metadata.annotations.is_some() {
        json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_token(key)), "value": value})
    } else {
        json!({"op": "add", "path": "/metadata/annotations", "value": {key: value}})
    }
}

/// JSON patch operations (RFC 6902) that inject the sidecar of `policy` into `pod`.
pub fn injection_patch(
    pod: &Pod,
    policy: &str,
    spec: &InferencePolicySpec,
    defaults: &SidecarDefaults,
) -> Vec<Value> {
    let container =
        serde_json::to_value(sidecar_container(policy, spec, defaults)).unwrap_or(Value::Null);
    let mut ops = vec![json!({"op": "add", "path": "/spec/containers/-", "value": container})];
    let volumes: Vec<Value> = sidecar_volumes(spec, defaults)
        .into_iter()
        .map(|v| serde_json::to_value(v).unwrap_or(Value::Null))
        .collect();
    if pod.spec.as_ref().is_some_and(|s| s.volumes.is_some()) {
        ops.extend(
            volumes
                .into_iter()
                .map(|v| json!({"op": "add", "path": "/spec/volumes/-", "value": v})),
        );
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    ops.push(annotate(pod, INJECTED_POLICY_ANNOTATION, policy));
    ops
}

/// JSON patch that records on the pod why the sidecar was not injected.
pub fn overlap_patch(pod: &Pod, policies: &[String]) -> Vec<Value> {
    vec![annotate(
        pod,
        INJECTION_SKIPPED_ANNOTATION,
        &format!(
            "selected by several InferencePolicies: {}",
            policies.join(", ")
        ),
    )]
}

/// The default OTLP endpoint for a receiver reachable at `host`.
pub fn receiver_endpoint(host: &str) -> String {
    format!("http://{host}:{}", report::DEFAULT_RECEIVER_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use ttc_api::{EnergyBudget, ModelSpec};

    fn spec(app: &str) -> InferencePolicySpec {
        serde_json::from_value(json!({
            "selector": {"matchLabels": {"app": app}},
            "budget": {"joulesPerRequest": 2.0}
        }))
        .expect("spec")
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn defaults() -> SidecarDefaults {
        SidecarDefaults {
            image: "ttc-sidecar:dev".into(),
            model_name: "smollm2-135m-instruct".into(),
            otlp_endpoint: "http://ttc-operator.ttc-system.svc:4318".into(),
            resources: None,
            report_token: false,
            report_ca_pem: None,
        }
    }

    #[test]
    fn one_matching_policy_injects() {
        let chat = spec("chat");
        let search = spec("search");
        let policies = [("chat", &chat), ("search", &search)];
        assert_eq!(
            decide(&pod(&[("app", "chat")]), &policies),
            InjectionDecision::Inject {
                policy: "chat".into()
            }
        );
        assert_eq!(
            decide(&pod(&[("app", "other")]), &policies),
            InjectionDecision::Skip
        );
    }

    #[test]
    fn overlap_injects_nothing() {
        let a = spec("chat");
        let b = InferencePolicySpec {
            selector: Default::default(),
            ..spec("x")
        };
        let decision = decide(&pod(&[("app", "chat")]), &[("b", &b), ("a", &a)]);
        assert_eq!(
            decision,
            InjectionDecision::Overlapping {
                policies: vec!["a".into(), "b".into()]
            }
        );
    }

    #[test]
    fn opted_out_or_already_injected_pods_are_skipped() {
        let chat = spec("chat");
        let mut opted_out = pod(&[("app", "chat")]);
        opted_out.metadata.annotations =
            Some([(INJECT_POD_ANNOTATION.to_string(), "false".to_string())].into());
        assert_eq!(
            decide(&opted_out, &[("chat", &chat)]),
            InjectionDecision::Skip
        );
        let mut injected = pod(&[("app", "chat")]);
        if let Some(s) = injected.spec.as_mut() {
            s.containers.push(Container {
                name: SIDECAR_CONTAINER_NAME.into(),
                ..Default::default()
            });
        }
        assert_eq!(
            decide(&injected, &[("chat", &chat)]),
            InjectionDecision::Skip
        );
    }

    /// The namespace's feedback keys are mounted when they exist (optional), and the sidecar is
    /// told where; replicas then sign tickets alike.
    #[test]
    fn the_namespaces_feedback_keys_are_mounted_optionally() {
        let spec = spec("chat");
        let c = sidecar_container("chat", &spec, &defaults());
        let env = c.env.unwrap();
        assert!(env.iter().any(|e| e.name == sidecar_env::FEEDBACK_KEY_FILE
            && e.value.as_deref() == Some(report::FEEDBACK_KEY_PATH)));
        let mount = c
            .volume_mounts
            .unwrap()
            .into_iter()
            .find(|m| m.name == FEEDBACK_KEYS_VOLUME)
            .expect("a mount of the keys");
        assert_eq!(
            format!("{}/keys", mount.mount_path),
            report::FEEDBACK_KEY_PATH
        );
        let volume = sidecar_volumes(&spec, &defaults())
            .into_iter()
            .find(|v| v.name == FEEDBACK_KEYS_VOLUME)
            .expect("a volume of the keys");
        let secret = volume.secret.expect("from a Secret");
        assert_eq!(
            secret.secret_name.as_deref(),
            Some(report::FEEDBACK_KEY_SECRET)
        );
        assert_eq!(secret.optional, Some(true));
    }

    #[test]
    fn a_sidecar_given_a_gpu_runs_on_it() {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let cuda = |resources: Option<ResourceRequirements>| {
            let mut spec = spec("chat");
            spec.sidecar.resources = resources;
            sidecar_container("chat", &spec, &defaults())
                .env
                .unwrap()
                .iter()
                .any(|e| e.name == sidecar_env::CUDA && e.value.as_deref() == Some("true"))
        };
        let with = |name: &str, amount: &str| ResourceRequirements {
            limits: Some([(name.to_string(), Quantity(amount.into()))].into()),
            ..Default::default()
        };
        assert!(cuda(Some(with(GPU_RESOURCE, "1"))));
        assert!(!cuda(Some(with(GPU_RESOURCE, "0"))));
        assert!(!cuda(Some(with("memory", "4Gi"))));
        assert!(!cuda(None));
    }

    #[test]
    fn container_carries_identity_endpoint_and_restricted_context() {
        let c = sidecar_container("chat", &spec("chat"), &defaults());
        assert_eq!(c.name, SIDECAR_CONTAINER_NAME);
        assert_eq!(c.image.as_deref(), Some("ttc-sidecar:dev"));
        let env = c.env.expect("env");
        let get = |name: &str| env.iter().find(|e| e.name == name).cloned().expect(name);
        assert_eq!(get(sidecar_env::POLICY_NAME).value.as_deref(), Some("chat"));
        let pod_name = get(sidecar_env::POD_NAME)
            .value_from
            .and_then(|v| v.field_ref)
            .expect("fieldRef");
        assert_eq!(pod_name.field_path, "metadata.name");
        assert_eq!(
            get(sidecar_env::OTLP_ENDPOINT).value.as_deref(),
            Some("http://ttc-operator.ttc-system.svc:4318")
        );
        assert_eq!(
            get(sidecar_env::MODEL).value.as_deref(),
            Some("smollm2-135m-instruct")
        );
        assert_eq!(
            get(sidecar_env::LISTEN).value.as_deref(),
            Some("0.0.0.0:8090")
        );
        assert_eq!(get(sidecar_env::ENABLE_TTC).value.as_deref(), Some("true"));
        assert_eq!(
            get(sidecar_env::MODEL_CACHE).value.as_deref(),
            Some(MODEL_CACHE_PATH)
        );
        let attrs = get(sidecar_env::OTEL_RESOURCE_ATTRIBUTES)
            .value
            .expect("attrs");
        assert!(
            attrs.contains("k8s.pod.name=$(TTC_POD_NAME)")
                && attrs.ends_with("ttc.policy.name=chat")
        );
        // Variables referenced by $(..) must be defined before the one that references them.
        let pos = |name: &str| env.iter().position(|e| e.name == name).expect(name);
        assert!(pos(sidecar_env::POD_NAME) < pos(sidecar_env::OTEL_RESOURCE_ATTRIBUTES));
        let sc = c.security_context.expect("securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp_profile.map(|s| s.type_),
            Some("RuntimeDefault".to_string())
        );
    }

    #[test]
    fn policy_overrides_defaults_and_mounts_the_model_claim() {
        let mut s = spec("chat");
        s.sidecar.image = Some("custom:1".into());
        s.sidecar.port = Some(9000);
        s.model = ModelSpec {
            name: None,
            path: Some("/models/m.gguf".into()),
            volume_claim: Some("models".into()),
        };
        s.budget = EnergyBudget {
            power_cap_watts: Some(10.0),
            ..s.budget
        };
        let c = sidecar_container("chat", &s, &defaults());
        assert_eq!(c.image.as_deref(), Some("custom:1"));
        assert_eq!(c.ports.expect("ports")[0].container_port, 9000);
        let mounts = c.volume_mounts.expect("mounts");
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == MODEL_MOUNT_PATH && m.read_only == Some(true))
        );
        let env = c.env.expect("env");
        assert!(
            env.iter()
                .any(|e| e.name == sidecar_env::MODEL
                    && e.value.as_deref() == Some("/models/m.gguf"))
        );
        assert!(
            env.iter().any(
                |e| e.name == sidecar_env::LISTEN && e.value.as_deref() == Some("0.0.0.0:9000")
            )
        );
    }

    /// `pod` with the JSON patch `ops` applied.
    fn patched(pod: &Pod, ops: Vec<Value>) -> Pod {
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops)).expect("valid JSON patch");
        let mut doc = serde_json::to_value(pod).expect("pod");
        json_patch::patch(&mut doc, &patch).expect("patch applies");
        serde_json::from_value(doc).expect("still a pod")
    }

    #[test]
    fn patch_applies_to_a_pod_without_volumes_or_annotations() {
        let p = pod(&[("app", "chat")]);
        let patched = patched(&p, injection_patch(&p, "chat", &spec("chat"), &defaults()));
        let spec = patched.spec.expect("spec");
        assert_eq!(spec.containers.len(), 2);
        // The sidecar's /tmp and the namespace's feedback keys.
        assert_eq!(spec.volumes.expect("volumes").len(), 2);
        let annotations = patched.metadata.annotations.expect("annotations");
        assert_eq!(
            annotations
                .get(INJECTED_POLICY_ANNOTATION)
                .map(String::as_str),
            Some("chat")
        );
    }

    #[test]
    fn with_report_auth_the_sidecar_gets_a_projected_token_for_the_receiver() {
        let with_auth = SidecarDefaults {
            report_token: true,
            ..defaults()
        };
        let p = pod(&[("app", "chat")]);
        let patched = patched(&p, injection_patch(&p, "chat", &spec("chat"), &with_auth));
        let pod_spec = patched.spec.expect("spec");
        let volumes = pod_spec.volumes.expect("volumes");
        let projection = volumes
            .iter()
            .find_map(|v| v.projected.as_ref())
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s.first())
            .and_then(|s| s.service_account_token.clone())
            .expect("a projected service-account token");
        assert_eq!(
            projection.audience.as_deref(),
            Some(report::REPORT_TOKEN_AUDIENCE)
        );
        assert_eq!(projection.expiration_seconds, Some(3600));
        let sidecar = pod_spec
            .containers
            .iter()
            .find(|c| c.name == SIDECAR_CONTAINER_NAME)
            .expect("sidecar");
        let file = sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == sidecar_env::REPORT_TOKEN_FILE)
            .and_then(|e| e.value.clone())
            .expect("token file variable");
        let mount = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == REPORT_TOKEN_VOLUME)
            .expect("token mount");
        assert_eq!(file, format!("{}/{}", mount.mount_path, projection.path));
        assert_eq!(mount.read_only, Some(true));
        // Without report auth, none of it.
        let plain = sidecar_container("chat", &spec("chat"), &defaults());
        assert!(
            plain
                .env
                .iter()
                .flatten()
                .all(|e| e.name != sidecar_env::REPORT_TOKEN_FILE)
        );
    }

    #[test]
    fn the_sidecar_is_probed_on_its_port_with_time_to_fetch_its_model() {
        let sidecar = sidecar_container("chat", &spec("chat"), &defaults());
        let get = |probe: Option<Probe>| {
            let probe = probe.expect("probe");
            let action = probe.http_get.clone().expect("HTTP probe");
            (
                action.path.unwrap_or_default(),
                action.port,
                probe.period_seconds.unwrap_or(10) * probe.failure_threshold.unwrap_or(3),
            )
        };
        let port = IntOrString::String(SIDECAR_PORT_NAME.into());
        let (path, on, startup_window) = get(sidecar.startup_probe.clone());
        assert_eq!((path.as_str(), &on), ("/healthz", &port));
        assert!(
            startup_window >= 600,
            "a model fetch needs minutes: {startup_window} s"
        );
        let (path, on, _) = get(sidecar.readiness_probe.clone());
        assert_eq!((path.as_str(), &on), ("/readyz", &port));
        let (path, on, _) = get(sidecar.liveness_probe.clone());
        assert_eq!((path.as_str(), &on), ("/healthz", &port));
        assert!(
            sidecar
                .ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some(SIDECAR_PORT_NAME))
        );
    }

    #[test]
    fn with_a_tls_receiver_the_sidecar_trusts_its_ca_for_reports_to_it_only() {
        let env_of = |spec: &InferencePolicySpec, defaults: &SidecarDefaults| {
            sidecar_container("chat", spec, defaults)
                .env
                .unwrap_or_default()
        };
        let ca = |env: &[EnvVar]| {
            env.iter()
                .find(|e| e.name == sidecar_env::REPORT_CA_PEM)
                .and_then(|e| e.value.clone())
        };
        let tls = SidecarDefaults {
            otlp_endpoint: "https://ttc-operator.ttc-system.svc:4318".into(),
            report_ca_pem: Some(
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            ),
            ..defaults()
        };
        let env = env_of(&spec("chat"), &tls);
        assert_eq!(ca(&env), tls.report_ca_pem);
        assert!(env.iter().any(|e| e.name == sidecar_env::OTLP_ENDPOINT
            && e.value.as_deref() == Some("https://ttc-operator.ttc-system.svc:4318")));
        // A policy that sends its metrics to a collector of its own gets no operator CA.
        let mut own = spec("chat");
        own.sidecar.otlp_endpoint = Some("https://collector.monitoring:4318".into());
        assert_eq!(ca(&env_of(&own, &tls)), None);
        assert_eq!(ca(&env_of(&spec("chat"), &defaults())), None);
    }

    #[test]
    fn patch_appends_to_existing_volumes_and_annotations() {
        let mut p = pod(&[("app", "chat")]);
        p.metadata.annotations = Some([("x".to_string(), "y".to_string())].into());
        if let Some(s) = p.spec.as_mut() {
            s.volumes = Some(vec![Volume {
                name: "data".into(),
                ..Default::default()
            }]);
        }
        let mut s = spec("chat");
        s.model = ModelSpec {
            name: None,
            path: Some("/models/m.gguf".into()),
            volume_claim: Some("models".into()),
        };
        let patched = patched(&p, injection_patch(&p, "chat", &s, &defaults()));
        // The pod's own, the sidecar's /tmp, the feedback keys and the model claim.
        assert_eq!(
            patched.spec.expect("spec").volumes.expect("volumes").len(),
            4
        );
        assert_eq!(patched.metadata.annotations.expect("annotations").len(), 2);
    }
}
