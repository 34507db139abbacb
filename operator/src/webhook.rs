//! The mutating admission webhook that injects the sidecar, its TLS material and its
//! MutatingWebhookConfiguration.
//!
//! Failure policy: `Ignore`. When no replica answers, pods are created without the sidecar
//! rather than not at all, so an operator outage never blocks workloads. Such pods are visible:
//! the policy's `Degraded` condition (reason `PodsWithoutSidecar`) names them until they are
//! restarted. The webhook itself never denies a pod.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::Store;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, warn};
use ttc_api::InferencePolicy;
use ttc_api::labels::{INJECTION_ENABLED, INJECTION_NAMESPACE_LABEL};

use crate::controller::FIELD_MANAGER;
use crate::domain::injection::{
    InjectionDecision, SidecarDefaults, decide, injection_patch, overlap_patch,
};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Path the API server posts AdmissionReviews to.
pub const MUTATE_PATH: &str = "/mutate";
/// Name of the webhook inside its configuration.
pub const WEBHOOK_NAME: &str = "inject.energy.ttc.dev";

/// The webhook's state: the policy cache and the sidecar defaults.
pub struct Injector {
    /// All InferencePolicies.
    pub policies: Store<InferencePolicy>,
    /// Defaults for what policies leave unset.
    pub defaults: SidecarDefaults,
    /// The report receiver's CA as now loaded, which new sidecars get instead of the one in
    /// `defaults` (where sidecars trust it at all).
    pub report_ca: Option<watch::Receiver<String>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Injector {
    /// The defaults with the receiver's CA as now loaded.
    fn current_defaults(&self) -> std::borrow::Cow<'_, SidecarDefaults> {
        match (&self.report_ca, &self.defaults.report_ca_pem) {
            (Some(current), Some(_)) => std::borrow::Cow::Owned(SidecarDefaults {
                report_ca_pem: Some(current.borrow().clone()),
                ..self.defaults.clone()
            }),
            _ => std::borrow::Cow::Borrowed(&self.defaults),
        }
    }

    /// The response to one admission request: always allowed, possibly with a patch.
    pub fn admit(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let response = AdmissionResponse::from(request);
        let (Operation::Create, Some(pod)) = (&request.operation, &request.object) else {
            return response;
        };
        // Pods of a Deployment have no name yet, and may lack metadata.namespace too.
        let Some(namespace) = request.namespace.clone().or_else(|| pod.namespace()) else {
            return response;
        };
        let policies = self
            .policies
            .state_filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()));
        let specs: Vec<(&str, &ttc_api::InferencePolicySpec)> = policies
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, &p.spec)))
            .collect();
        let (outcome, ops) = match decide(pod, &specs) {
            InjectionDecision::Skip => ("skipped", None),
            InjectionDecision::Inject { policy } => {
                let spec = specs.iter().find(|(n, _)| *n == policy).map(|(_, s)| *s);
                match spec {
                    Some(spec) => (
                        "injected",
                        Some(injection_patch(
                            pod,
                            &policy,
                            spec,
                            &self.current_defaults(),
                        )),
                    ),
                    None => ("skipped", None),
                }
            }
            InjectionDecision::Overlapping { policies } => {
                warn!(%namespace, ?policies, "pod selected by several policies; not injecting");
                ("overlapping", Some(overlap_patch(pod, &policies)))
            }
        };
        let Some(ops) = ops else {
            self.metrics.admitted(outcome);
            return response;
        };
        let patched = serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
            .map_err(|e| e.to_string())
            .and_then(|patch| {
                response
                    .clone()
                    .with_patch(patch)
                    .map_err(|e| e.to_string())
            });
        match patched {
            Ok(patched) => {
                debug!(%namespace, outcome, "admitted pod");
                self.metrics.admitted(outcome);
                patched
            }
            Err(error) => {
                warn!(%namespace, %error, "could not build the injection patch; admitting unchanged");
                self.metrics.admitted("error");
                response
            }
        }
    }
}

async fn mutate(
    State(injector): State<Arc<Injector>>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let started = Instant::now();
    let parsed: Result<AdmissionRequest<Pod>, _> = review.try_into();
    let response = match parsed {
        Ok(request) => injector.admit(&request),
        Err(error) => {
            injector.metrics.admitted("error");
            AdmissionResponse::invalid(error.to_string())
        }
    };
    injector
        .metrics
        .admission_duration
        .observe(started.elapsed().as_secs_f64());
    Json(response.into_review())
}

/// The webhook's routes.
pub fn router(injector: Arc<Injector>) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .with_state(injector)
}

/// Where the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookTarget {
    /// A Service in the cluster (`namespace`, `name`, `port`).
    Service {
        /// Namespace of the Service.
        namespace: String,
        /// Name of the Service.
        name: String,
        /// Port of the Service.
        port: i32,
    },
    /// A URL (for a control plane that runs outside the cluster network, like e2e/).
    Url(String),
}

/// The MutatingWebhookConfiguration that sends pod creations in opted-in namespaces here.
pub fn webhook_configuration(
    name: &str,
    target: &WebhookTarget,
    ca_pem: &str,
) -> MutatingWebhookConfiguration {
    let client_config = match target {
        WebhookTarget::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(MUTATE_PATH.into()),
                port: Some(*port),
            }),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            url: None,
        },
        WebhookTarget::Url(url) => WebhookClientConfig {
            url: Some(format!("{}{MUTATE_PATH}", url.trim_end_matches('/'))),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            service: None,
        },
    };
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            client_config,
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(
                    [(
                        INJECTION_NAMESPACE_LABEL.to_string(),
                        INJECTION_ENABLED.to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            }),
            failure_policy: Some("Ignore".into()),
            side_effects: "None".into(),
            admission_review_versions: vec!["v1".into()],
            timeout_seconds: Some(5),
            reinvocation_policy: Some("IfNeeded".into()),
            ..Default::default()
        }]),
    }
}

/// Creates or updates the webhook configuration (server-side apply).
pub async fn apply_webhook_configuration(
    client: kube::Client,
    configuration: &MutatingWebhookConfiguration,
) -> Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let name = configuration
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("name"))?;
    let mut body = serde_json::to_value(configuration)?;
    body["apiVersion"] = "admissionregistration.k8s.io/v1".into();
    body["kind"] = "MutatingWebhookConfiguration".into();
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::TlsMaterial;
    use kube::runtime::reflector::store;
    use kube::runtime::watcher;
    use serde_json::json;

    fn injector(policies: Vec<InferencePolicy>) -> Injector {
        let (reader, mut writer) = store::<InferencePolicy>();
        for p in policies {
            writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        Injector {
            policies: reader,
            defaults: SidecarDefaults {
                image: "ttc-sidecar:dev".into(),
                model_name: "smollm2-135m-instruct".into(),
                otlp_endpoint: "http://op:4318".into(),
                resources: None,
                report_token: false,
                report_ca_pem: None,
            },
            report_ca: None,
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn policy(name: &str, app: &str) -> InferencePolicy {
        serde_json::from_value(json!({
            "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {"selector": {"matchLabels": {"app": app}}, "budget": {"joulesPerRequest": 2.0}}
        }))
        .expect("policy")
    }

    fn review(labels: Value) -> AdmissionReview<Pod> {
        serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ml", "operation": "CREATE",
                "userInfo": {}, "dryRun": false,
                "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "chat-", "labels": labels},
                    "spec": {"containers": [{"name": "app", "image": "app"}]}}
            }
        }))
        .expect("review")
    }

    fn into_request(
        review: AdmissionReview<Pod>,
    ) -> std::result::Result<
        AdmissionRequest<Pod>,
        kube::core::admission::ConvertAdmissionReviewError,
    > {
        review.try_into()
    }

    fn patch_of(response: &AdmissionResponse) -> Vec<Value> {
        let bytes = response.patch.as_ref().expect("a patch");
        serde_json::from_slice(bytes).expect("patch is JSON")
    }

    #[test]
    fn selected_pod_gets_the_sidecar() {
        let injector = injector(vec![policy("chat", "chat"), policy("search", "search")]);
        let request = into_request(review(json!({"app": "chat"}))).expect("request");
        let response = injector.admit(&request);
        assert!(response.allowed);
        let ops = patch_of(&response);
        assert_eq!(ops[0]["path"], "/spec/containers/-");
        assert_eq!(ops[0]["value"]["name"], "ttc-sidecar");
        assert!(
            ops.iter()
                .any(|op| op["value"]["energy.ttc.dev/policy"] == "chat")
        );
    }

    #[test]
    fn new_sidecars_get_the_receivers_ca_as_now_loaded() {
        let ca_of = |injector: &Injector| {
            let request = into_request(review(json!({"app": "chat"}))).expect("request");
            let ops = patch_of(&injector.admit(&request));
            ops[0]["value"]["env"]
                .as_array()
                .expect("env")
                .iter()
                .find(|e| e["name"] == ttc_api::report::sidecar_env::REPORT_CA_PEM)
                .map(|e| e["value"].as_str().expect("a value").to_owned())
        };
        let mut injector = injector(vec![policy("chat", "chat")]);
        injector.defaults.report_ca_pem = Some("CA at start".into());
        let (current, followed) = watch::channel("CA at start".to_owned());
        injector.report_ca = Some(followed);
        assert_eq!(ca_of(&injector).as_deref(), Some("CA at start"));
        current.send_replace("renewed CA".into());
        assert_eq!(ca_of(&injector).as_deref(), Some("renewed CA"));
        // Where sidecars do not trust the receiver's CA (plain HTTP reports), none is injected.
        injector.defaults.report_ca_pem = None;
        assert_eq!(ca_of(&injector), None);
    }

    #[test]
    fn unselected_pod_is_admitted_unchanged() {
        let injector = injector(vec![policy("chat", "chat")]);
        let request = into_request(review(json!({"app": "other"}))).expect("request");
        let response = injector.admit(&request);
        assert!(response.allowed);
        assert!(response.patch.is_none());
    }

    #[test]
    fn overlapping_policies_annotate_instead_of_injecting() {
        let injector = injector(vec![policy("a", "chat"), policy("b", "chat")]);
        let request = into_request(review(json!({"app": "chat"}))).expect("request");
        let response = injector.admit(&request);
        assert!(response.allowed);
        let ops = patch_of(&response);
        assert_eq!(ops.len(), 1);
        assert!(ops[0]["value"].to_string().contains("a, b"));
    }

    #[test]
    fn configuration_targets_opted_in_namespaces_and_ignores_failures() {
        let config = webhook_configuration(
            "ttc",
            &WebhookTarget::Url("https://127.0.0.1:8443".into()),
            "CA",
        );
        let webhook = &config.webhooks.expect("webhooks")[0];
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(
            webhook.client_config.url.as_deref(),
            Some("https://127.0.0.1:8443/mutate")
        );
        let selector = webhook
            .namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .expect("selector");
        assert_eq!(
            selector.get(INJECTION_NAMESPACE_LABEL).map(String::as_str),
            Some(INJECTION_ENABLED)
        );
    }

    #[test]
    fn self_signed_material_is_pem() {
        let tls =
            TlsMaterial::self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("cert");
        assert!(tls.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(tls.key_pem.contains("PRIVATE KEY"));
    }
}
