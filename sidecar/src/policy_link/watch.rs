//! A read-only watch of this pod's one InferencePolicy, published as a [`PolicyView`].

use futures::StreamExt;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use ttc_api::InferencePolicy;

use super::identity::PodIdentity;
use super::view::PolicyView;

/// Watches the policy `identity.policy` in `identity.namespace` and publishes this pod's view of
/// it: `Some` while the policy exists, `None` before it is first seen, when it does not exist and
/// after it is deleted.
///
/// Only `list` and `watch` on that one object (field selector `metadata.name`) are used. Errors
/// (API server unreachable, missing RBAC, an object that does not parse) are logged and the watch
/// retried with exponential backoff, keeping the last published view meanwhile. Receivers are
/// woken only when the view changes. The watch task runs until every receiver is dropped.
///
/// Must be called inside a tokio runtime.
pub fn watch_policy(
    client: kube::Client,
    identity: PodIdentity,
) -> watch::Receiver<Option<PolicyView>> {
    let (sender, receiver) = watch::channel(None);
    tokio::spawn(run_watch(client, identity, sender));
    receiver
}

async fn run_watch(
    client: kube::Client,
    identity: PodIdentity,
    sender: watch::Sender<Option<PolicyView>>,
) {
    let api: Api<InferencePolicy> = Api::namespaced(client, &identity.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", identity.policy));
    let mut events = watcher(api, config).default_backoff().boxed();
    // Views of the current (re)list, published together at its end so that a relist of a
    // policy deleted meanwhile yields None.
    let mut listed: Option<PolicyView> = None;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            () = sender.closed() => {
                debug!(policy = %identity.policy, "policy watch stopped: no receivers left");
                return;
            }
            event = events.next() => event,
        };
        let Some(event) = event else {
            // The watcher stream is endless; this only guards against a change of that.
            warn!(policy = %identity.policy, "policy watch stream ended");
            return;
        };
        match event {
            Ok(event) => {
                if failing {
                    info!(policy = %identity.policy, "policy watch recovered");
                    failing = false;
                }
                match event {
                    watcher::Event::Init => listed = None,
                    watcher::Event::InitApply(policy) => {
                        listed = Some(PolicyView::from_policy(&policy, &identity.pod));
                    }
                    watcher::Event::InitDone => publish(&sender, &identity, listed.take()),
                    watcher::Event::Apply(policy) => publish(
                        &sender,
                        &identity,
                        Some(PolicyView::from_policy(&policy, &identity.pod)),
                    ),
                    watcher::Event::Delete(_) => publish(&sender, &identity, None),
                }
            }
            Err(error) => {
                failing = true;
                warn!(
                    policy = %identity.policy,
                    namespace = %identity.namespace,
                    %error,
                    "watching the InferencePolicy failed; keeping the last view and retrying \
                     with backoff (the pod's service account needs get, list and watch on \
                     inferencepolicies.energy.ttc.dev)"
                );
            }
        }
    }
}

fn publish(
    sender: &watch::Sender<Option<PolicyView>>,
    identity: &PodIdentity,
    view: Option<PolicyView>,
) {
    sender.send_if_modified(|current| {
        if *current == view {
            return false;
        }
        match &view {
            Some(view) => info!(
                policy = %identity.policy,
                joules_per_request = ?view.joules_per_request,
                watts = ?view.watts,
                generation = ?view.generation,
                "policy view updated"
            ),
            None => info!(policy = %identity.policy, "policy absent: no allocation"),
        }
        *current = view;
        true
    });
}
