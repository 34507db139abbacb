//! How the operator watches the API server: all policies (a malformed one skipped, never fatal),
//! and the metadata of all pods and namespaces. Each watch retries by its own short back-off;
//! `triggers` turns a watch, once reflected into its store, into what the controller
//! reconciles.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject, PartialObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::warn;
use ttc_api::InferencePolicy;

use crate::metrics::Metrics;

/// Whether a deleted object triggers a reconcile (of the policies that select it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    Triggers,
    Ignored,
}

/// The objects a reflected watch asks the controller to reconcile. An applied object (and a
/// deleted one, with [`Deleted::Triggers`]) at once; the objects of a list, made at the start
/// and again whenever a watch must start over (after an API server restart its resource version
/// has expired), only when the list is complete. The store takes a list whole at its end, so a
/// reconcile triggered by a listed object before then read the object as it was before: a policy
/// changed while the watch was down was reconciled unchanged and then not again until its next
/// resync. Errors are logged and dropped: the watch has waited already, by its own back-off
/// ([`WatchBackoff`]); passed on, each would also pause the controller's merged trigger stream
/// (kube-runtime's trigger back-off, up to 30 s), and with it every other watch. Every watch the
/// controller reads goes through here, so that back-off never applies.
pub(crate) fn triggers<K: Send + 'static>(
    watch: &'static str,
    deleted: Deleted,
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send {
    use watcher::Event;
    events
        .scan(Vec::new(), move |listed, event| {
            let now = match event {
                Ok(Event::Apply(object)) => vec![object],
                Ok(Event::Delete(object)) if deleted == Deleted::Triggers => vec![object],
                Ok(Event::Delete(_)) => Vec::new(),
                Ok(Event::Init) => {
                    listed.clear();
                    Vec::new()
                }
                Ok(Event::InitApply(object)) => {
                    listed.push(object);
                    Vec::new()
                }
                Ok(Event::InitDone) => std::mem::take(listed),
                Err(e) => {
                    warn!(watch, error = %e, "watch failed; retrying");
                    Vec::new()
                }
            };
            std::future::ready(Some(futures::stream::iter(now.into_iter().map(Ok))))
        })
        .flatten()
}

/// Parses a policy; a malformed object is logged, counted and skipped, never fatal to the watch.
fn parse_policy(object: DynamicObject, metrics: &Metrics) -> Option<InferencePolicy> {
    let name = format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    );
    match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(policy) => Some(policy),
        Err(e) => {
            metrics.malformed_objects.inc();
            warn!(policy = %name, error = %e, "skipping malformed InferencePolicy");
            None
        }
    }
}

fn parse_event(
    event: watcher::Event<DynamicObject>,
    metrics: &Metrics,
) -> Option<watcher::Event<InferencePolicy>> {
    use watcher::Event;
    Some(match event {
        Event::Apply(o) => Event::Apply(parse_policy(o, metrics)?),
        Event::InitApply(o) => Event::InitApply(parse_policy(o, metrics)?),
        Event::Delete(o) => Event::Delete(parse_policy(o, metrics)?),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    })
}

/// How long a watch waits before it tries again after an error: 250 ms, doubling to at most 5 s,
/// back to 250 ms after any success. kube-runtime's default backs off by up to 30 s plus as much
/// jitter and relaxes only after two quiet minutes; after an API server restart each watch meets
/// several errors in a row (refused connections, then its resource version expired), and with
/// the defaults the operator saw no change for 80-150 s. Three watches of one operator retrying
/// every 5 s are no load on an API server.
#[derive(Debug, Clone)]
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MOST: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (wait * 2).min(Self::MOST);
        Some(wait)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// A watch of all policies, tolerant of malformed objects.
pub(crate) fn policy_events(
    client: Client,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<watcher::Event<InferencePolicy>, watcher::Error>> + Send {
    let api: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<InferencePolicy>(&()));
    watcher(api, watcher::Config::default())
        .backoff(WatchBackoff::default())
        .filter_map(move |event| {
            let parsed = match event {
                Ok(event) => parse_event(event, &metrics).map(Ok),
                Err(e) => Some(Err(e)),
            };
            std::future::ready(parsed)
        })
}

/// A metadata-only watch of all objects of kind `K`, managed fields dropped.
pub(crate) fn metadata_watch<K>(
    client: &Client,
    config: watcher::Config,
) -> impl Stream<Item = std::result::Result<watcher::Event<PartialObjectMeta<K>>, watcher::Error>>
+ Send
+ use<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    K: serde::de::DeserializeOwned,
{
    watcher(Api::<PartialObjectMeta<K>>::all(client.clone()), config)
        .backoff(WatchBackoff::default())
        .modify(|o| o.managed_fields_mut().clear())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "energy.ttc.dev/v1alpha1", "kind": "InferencePolicy",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": spec
        }))
        .expect("dynamic object")
    }

    #[test]
    fn a_watch_retries_within_five_seconds_and_starts_over_after_a_success() {
        use kube::runtime::utils::Backoff as _;
        let mut backoff = WatchBackoff::default();
        let waits: Vec<u128> = backoff.by_ref().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_malformed_policy_is_skipped_and_counted_not_fatal() {
        let metrics = Metrics::default();
        let good = object(json!({"selector": {}, "budget": {"joulesPerRequest": 1.0}}));
        let bad = object(json!({"selector": "everything", "budget": 7}));
        assert!(matches!(
            parse_event(watcher::Event::Apply(good), &metrics),
            Some(watcher::Event::Apply(_))
        ));
        assert!(parse_event(watcher::Event::InitApply(bad.clone()), &metrics).is_none());
        assert!(parse_event(watcher::Event::Apply(bad), &metrics).is_none());
        assert!(matches!(
            parse_event(watcher::Event::InitDone, &metrics),
            Some(watcher::Event::InitDone)
        ));
        assert!(
            metrics
                .render()
                .contains("ttc_operator_malformed_objects_total 2")
        );
    }

    fn names(objects: Vec<Result<DynamicObject, watcher::Error>>) -> Vec<String> {
        objects
            .into_iter()
            .map(|o| o.expect("no errors pass").name_any())
            .collect()
    }

    fn named(name: &str) -> DynamicObject {
        let mut o = object(json!({}));
        o.metadata.name = Some(name.into());
        o
    }

    /// A list's objects reach the controller only once the list is complete (when the store has
    /// taken it whole); applied objects at once; deletions only where asked for; errors never.
    #[tokio::test]
    async fn listed_objects_trigger_once_the_list_is_complete() {
        use watcher::Event;
        let events = || {
            futures::stream::iter(vec![
                Ok(Event::Apply(named("before"))),
                Err(watcher::Error::NoResourceVersion),
                Ok(Event::Init),
                Ok(Event::InitApply(named("a"))),
                Ok(Event::InitApply(named("b"))),
                Ok(Event::InitDone),
                Ok(Event::Apply(named("c"))),
                Ok(Event::Delete(named("d"))),
                Ok(Event::Init),
                Ok(Event::InitApply(named("never-completed"))),
            ])
        };
        let seen = triggers("test", Deleted::Ignored, events()).collect().await;
        assert_eq!(names(seen), ["before", "a", "b", "c"]);
        let seen = triggers("test", Deleted::Triggers, events())
            .collect()
            .await;
        assert_eq!(names(seen), ["before", "a", "b", "c", "d"]);
    }
}
