//! Wires the reconcile loop: the pool controller, the children it owns and the node inventory.

use crate::agents::AgentProbe;
use crate::children::POOL_LABEL;
use crate::metrics::Metrics;
use crate::monitoring::{self, PodMonitorSettings, PodMonitors};
use crate::reconcile::{Context, error_policy, reconcile};
use crate::scaler::Scaler;
use futures::{Future, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use parallax_crds::InferencePool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How the controller treats pools' pods.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The agent image of pools that pin none.
    pub agent_image: String,
    /// How the agents' download progress is read.
    pub agents: AgentProbe,
    /// How often the built-in autoscaler reads the agents' metrics.
    pub autoscale_every: Duration,
    /// The pools' PodMonitors where the cluster serves them; `None`: none.
    pub pod_monitors: Option<PodMonitorSettings>,
    /// How often API discovery is asked whether the cluster serves PodMonitors.
    pub discover_every: Duration,
}

impl Settings {
    /// Pools that pin no image get `agent_image`; agents are asked on their usual port.
    pub fn new(agent_image: String) -> Self {
        Self {
            agent_image,
            agents: AgentProbe::default(),
            autoscale_every: Duration::from_secs(15),
            pod_monitors: Some(PodMonitorSettings::default()),
            discover_every: Duration::from_secs(60),
        }
    }
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (nodes, writer) = reflector::store();
    let node_watch = reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects()
    .for_each(|_| futures::future::ready(()));
    let node_task = tokio::spawn(node_watch);
    if nodes.wait_until_ready().await.is_err() {
        return;
    }
    info!(nodes = nodes.state().len(), "node inventory ready");

    // The built-in autoscaler, for pools that enable it.
    let scaler = tokio::spawn(
        Scaler::new(
            client.clone(),
            Recorder::new(client.clone(), reporter.clone()),
            metrics.clone(),
            settings.agents.clone(),
        )
        .run(settings.autoscale_every),
    );
    // Whether the cluster serves PodMonitors: asked now, so that the first reconciles know,
    // then every `discover_every`; a change reconciles every pool. Asked even with monitors
    // off, so that the pools' old ones go.
    let (served, served_now) = watch::channel(false);
    let found = monitoring::served(&client).await.unwrap_or_else(|error| {
        warn!(%error, "API discovery of {} failed", monitoring::GROUP_VERSION);
        false
    });
    info!(served = found, "PodMonitor API");
    served.send_replace(found);
    let discovery = tokio::spawn(monitoring::discover(
        client.clone(),
        settings.discover_every,
        served,
    ));
    let monitors_changed = futures::stream::unfold(served_now.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes,
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        agent_image: settings.agent_image,
        agents: settings.agents,
        pod_monitors: PodMonitors {
            settings: settings.pod_monitors,
            served: served_now,
        },
    });
    let children = watcher::Config::default().labels(POOL_LABEL);
    Controller::new(
        Api::<InferencePool>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    // Pods by the pool's label, not by owner: a LeaderWorkerSet's pods are its StatefulSets'.
    .watches(Api::<Pod>::all(client.clone()), children.clone(), |pod| {
        let pool = pod.labels().get(POOL_LABEL)?;
        Some(ObjectRef::new(pool).within(pod.namespace().as_deref()?))
    })
    .owns(Api::<Service>::all(client.clone()), children.clone())
    .owns(Api::<ConfigMap>::all(client.clone()), children.clone())
    .owns(
        Api::<PodDisruptionBudget>::all(client.clone()),
        children.clone(),
    )
    .owns(Api::<Deployment>::all(client.clone()), children)
    .reconcile_all_on(monitors_changed)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((pool, _)) => debug!(pool = %pool.name, "reconciled"),
            Err(error) => debug!(%error, "reconcile did not complete"),
        }
    })
    .await;
    scaler.abort();
    node_task.abort();
    discovery.abort();
}
