//! The real kube-runtime `Controller` against the in-process fake API server: a pool's whole life.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Client, ResourceExt};
use parallax_crds::InferencePool;
use parallax_operator::agents::AgentProbe;
use parallax_operator::children::TEMPLATE_HASH_ANNOTATION;
use parallax_operator::controller;
use parallax_operator::metrics::Metrics;
use parallax_operator::monitoring::PodMonitorSettings;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::eventually;
use support::fake_api::FakeApiServer;

const TIMEOUT: Duration = Duration::from_secs(30);

fn gpu_node(name: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "spec": {},
        "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "192", "memory": "2Ti"}}
    }))
    .unwrap()
}

fn pool() -> InferencePool {
    serde_json::from_value(json!({
        "apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {
            "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "shape": {"preset": "llama-3.1-8b"}},
            "replicas": 2, "minReplicas": 1, "maxReplicas": 4
        }
    }))
    .unwrap()
}

/// The operator's controller running on a task until stopped.
struct RunningController {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    fn start(client: &Client) -> Self {
        Self::start_with(
            client,
            controller::Settings::new("registry.example/parallax-agent:test".into()),
        )
    }

    /// With the agents (stand-ins on loopback) answering on `port`.
    fn with_agents_on(client: &Client, port: u16) -> Self {
        Self::start_with(
            client,
            controller::Settings {
                agents: AgentProbe::on_port(port),
                ..controller::Settings::new("registry.example/parallax-agent:test".into())
            },
        )
    }

    fn start_with(client: &Client, settings: controller::Settings) -> Self {
        Self::start_observed(client, settings, Arc::new(Metrics::default()))
    }

    /// Agents (stand-ins) on `port`, their metrics read every `every`.
    fn scaling(client: &Client, port: u16, every: Duration) -> Self {
        Self::scaling_observed(client, port, every, Arc::new(Metrics::default()))
    }

    fn scaling_observed(
        client: &Client,
        port: u16,
        every: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_observed(
            client,
            controller::Settings {
                agents: AgentProbe::on_port(port),
                autoscale_every: every,
                ..controller::Settings::new("registry.example/parallax-agent:test".into())
            },
            metrics,
        )
    }

    /// Recording into `metrics`.
    fn start_observed(
        client: &Client,
        settings: controller::Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let reporter = Reporter {
            controller: "parallax-operator".into(),
            instance: None,
        };
        let shutdown = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(controller::run(
            client.clone(),
            metrics,
            reporter,
            settings,
            shutdown,
        ));
        Self { stop, task }
    }

    /// Stops the controller and waits for it to finish its in-flight work.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn pods(client: &Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "ml")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// The pool's pods (its groups'), not the router's.
async fn group_pods(client: &Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "ml")
        .list(&ListParams::default().labels("parallax.dev/pool=llama"))
        .await
        .unwrap()
        .items
}

/// Plays the kubelet: every pod that is not ready yet becomes ready.
async fn mark_pods_ready(client: &Client) {
    let api = Api::<Pod>::namespaced(client.clone(), "ml");
    for pod in pods(client).await {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready && pod.metadata.deletion_timestamp.is_none() {
            let status = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
            api.patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .unwrap();
        }
    }
}

/// The pool's agent configurations, one per pod template still in use.
async fn agent_configs(client: &Client) -> Vec<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), "ml")
        .list(&ListParams::default().labels("parallax.dev/pool=llama"))
        .await
        .unwrap()
        .items
}

async fn current_pool(client: &Client) -> Option<InferencePool> {
    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .get_opt("llama")
        .await
        .unwrap()
}

/// Creates the test pool with one group and waits for its pod; the pools' API.
async fn one_group_pool(
    client: &Client,
    changes: &mut tokio::sync::watch::Receiver<u64>,
) -> Api<InferencePool> {
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut one = pool();
    one.spec.replicas = 1;
    pools.create(&PostParams::default(), &one).await.unwrap();
    eventually("the pod exists", changes, TIMEOUT, || async {
        pods(client).await.len() == 1
    })
    .await;
    pools
}

/// A fake API server holding GPU nodes of these names, a client of it, and its change feed.
async fn cluster(nodes: &[&str]) -> (FakeApiServer, Client, tokio::sync::watch::Receiver<u64>) {
    support::init_logs();
    let server = FakeApiServer::default();
    let client = server.client();
    let changes = server.changes();
    for name in nodes {
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &gpu_node(name))
            .await
            .unwrap();
    }
    (server, client, changes)
}

/// The events recorded so far: (reason, note).
fn events(server: &FakeApiServer) -> Vec<(String, String)> {
    server
        .objects("apis/events.k8s.io/v1/events")
        .iter()
        .map(|e| {
            let text = |key: &str| e[key].as_str().unwrap_or_default().to_owned();
            (text("reason"), text("note"))
        })
        .collect()
}

/// Whether an event of `reason` whose note mentions `about` was recorded.
fn recorded(server: &FakeApiServer, reason: &str, about: &str) -> bool {
    events(server)
        .iter()
        .any(|(r, note)| r == reason && note.contains(about))
}

/// Waits until the pool's condition `type_` has `(status, reason)`.
async fn until_condition(
    client: &Client,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    type_: &str,
    (status, reason): (&str, &str),
) {
    let what = format!("{type_}={status} with reason {reason}");
    eventually(&what, changes, TIMEOUT, || async {
        current_pool(client)
            .await
            .is_some_and(|p| condition(&p, type_) == Some((status.to_owned(), reason.to_owned())))
    })
    .await;
}

/// The message of the pool's condition `type_` (empty when there is none).
fn condition_message(pool: &InferencePool, type_: &str) -> String {
    pool.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn condition(pool: &InferencePool, type_: &str) -> Option<(String, String)> {
    let status = pool.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn a_pool_lives_and_dies_through_the_controller() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;

    let controller = RunningController::start(&client);

    // Create: children appear, TP auto resolves to 2 H100s, Ready=False until pods are ready.
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    pools.create(&PostParams::default(), &pool()).await.unwrap();
    eventually(
        "two pods and every child exist",
        &mut changes,
        TIMEOUT,
        || async {
            pods(&client).await.len() == 2
                && Api::<Service>::namespaced(client.clone(), "ml")
                    .get_opt("llama")
                    .await
                    .unwrap()
                    .is_some()
                && Api::<Service>::namespaced(client.clone(), "ml")
                    .get_opt("llama-pods")
                    .await
                    .unwrap()
                    .is_some()
                && !agent_configs(&client).await.is_empty()
                && Api::<PodDisruptionBudget>::namespaced(client.clone(), "ml")
                    .get_opt("llama")
                    .await
                    .unwrap()
                    .is_some()
        },
    )
    .await;
    eventually(
        "status reports TP 2 and Ready=False",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                p.status.as_ref().and_then(|s| s.tensor_parallel_size) == Some(2)
                    && condition(&p, "Ready") == Some(("False".into(), "GroupsNotReady".into()))
            })
        },
    )
    .await;
    let pod = pods(&client).await.remove(0);
    let owner = &pod.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("InferencePool", "llama")
    );
    let gpus = &pod.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap()["nvidia.com/gpu"];
    assert_eq!(gpus.0, "2");

    // Pods ready → Ready=True with readyReplicas.
    mark_pods_ready(&client).await;
    eventually(
        "Ready=True with 2 ready replicas",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let s = p.status.clone().unwrap_or_default();
                s.ready_replicas == 2
                    && s.observed_generation == p.metadata.generation
                    && condition(&p, "Ready") == Some(("True".into(), "GroupsReady".into()))
            })
        },
    )
    .await;

    // The layout is pinned to the spec: with the pool's only node gone (cordoned, drained,
    // replaced), nothing is resized or rolled. A pod whose image cannot be pulled is named in
    // Degraded, and the condition clears when the kubelet gets it running.
    let pinned = current_pool(&client).await.unwrap().status.unwrap();
    assert_eq!(pinned.layout_generation, Some(1));
    assert_eq!(pinned.gpu_products, ["NVIDIA-H100-80GB-HBM3"]);
    let hashes = |pods: Vec<Pod>| -> Vec<String> {
        pods.iter()
            .map(|p| p.annotations()[TEMPLATE_HASH_ANNOTATION].clone())
            .collect()
    };
    let before = hashes(pods(&client).await);
    Api::<Node>::all(client.clone())
        .delete("gpu-a", &DeleteParams::default())
        .await
        .unwrap();
    let container_state = |state: Value| {
        json!({"status": {"containerStatuses": [{"name": "agent", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0, "state": state}]}})
    };
    let pod_api = Api::<Pod>::namespaced(client.clone(), "ml");
    let stuck = container_state(json!({"waiting": {"reason": "ImagePullBackOff",
        "message": "Back-off pulling image \"ghcr.io/parallax-dev/parallax-agent:0.1.0-cuda\""}}));
    pod_api
        .patch_status("llama-0-0", &PatchParams::default(), &Patch::Merge(&stuck))
        .await
        .unwrap();
    eventually(
        "Degraded names the pod that cannot pull its image",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let message = condition_message(&p, "Degraded");
                condition(&p, "Degraded") == Some(("True".into(), "ImagePullFailing".into()))
                    && condition(&p, "Ready") == Some(("True".into(), "GroupsReady".into()))
                    && p.status.as_ref().and_then(|s| s.tensor_parallel_size) == Some(2)
                    && message
                        .starts_with("pod llama-0-0: ImagePullBackOff: Back-off pulling image")
            })
        },
    )
    .await;
    let running = container_state(json!({"running": {"startedAt": "2026-12-02T00:00:00Z"}}));
    pod_api
        .patch_status(
            "llama-0-0",
            &PatchParams::default(),
            &Patch::Merge(&running),
        )
        .await
        .unwrap();
    until_condition(&client, &mut changes, "Degraded", ("False", "AsExpected")).await;
    assert_eq!(hashes(pods(&client).await), before, "no group was rolled");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &gpu_node("gpu-a"))
        .await
        .unwrap();

    // Spec change → configmap follows, pods roll one group at a time, observedGeneration moves.
    let old_hash = pods(&client).await[0].annotations()[TEMPLATE_HASH_ANNOTATION].clone();
    let patch = json!({"spec": {"batching": {"maxBatchSize": 32}}});
    let patched = pools
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let generation = patched.metadata.generation;
    assert_eq!(generation, Some(2));
    eventually(
        "every pod runs the new template and the pool is ready again",
        &mut changes,
        TIMEOUT,
        || async {
            mark_pods_ready(&client).await;
            let pods = pods(&client).await;
            let rolled = pods.len() == 2
                && pods
                    .iter()
                    .all(|p| p.annotations()[TEMPLATE_HASH_ANNOTATION] != old_hash);
            rolled
                && current_pool(&client).await.is_some_and(|p| {
                    let s = p.status.clone().unwrap_or_default();
                    s.observed_generation == generation
                        && s.updated_replicas == 2
                        && s.ready_replicas == 2
                })
        },
    )
    .await;
    // The old revision's configuration went with its last pod; the pods read the new one.
    eventually(
        "one agent configuration remains, the one every pod mounts",
        &mut changes,
        TIMEOUT,
        || async {
            let configs = agent_configs(&client).await;
            let mounted: Vec<String> = pods(&client)
                .await
                .iter()
                .map(|p| {
                    let volumes = p.spec.as_ref().unwrap().volumes.as_ref().unwrap();
                    volumes[0].config_map.as_ref().unwrap().name.clone()
                })
                .collect();
            configs.len() == 1 && mounted.iter().all(|m| *m == configs[0].name_any())
        },
    )
    .await;
    let config = agent_configs(&client).await.remove(0);
    assert!(config.data.unwrap()["agent.json"].contains("\"maxBatchSize\": 32"));

    // Drift: a deleted child comes back.
    Api::<Service>::namespaced(client.clone(), "ml")
        .delete("llama-pods", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the headless Service is recreated",
        &mut changes,
        TIMEOUT,
        || async {
            Api::<Service>::namespaced(client.clone(), "ml")
                .get_opt("llama-pods")
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;

    // A failed pod: its group is recreated.
    let failed = pods(&client)
        .await
        .into_iter()
        .find(|p| p.labels()["parallax.dev/group"] == "1")
        .unwrap();
    let failed_uid = failed.uid().unwrap();
    let phase = json!({"status": {"phase": "Failed"}});
    Api::<Pod>::namespaced(client.clone(), "ml")
        .patch_status(
            &failed.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&phase),
        )
        .await
        .unwrap();
    eventually(
        "the failed group is recreated",
        &mut changes,
        TIMEOUT,
        || async {
            pods(&client)
                .await
                .iter()
                .any(|p| p.name_any() == "llama-1-0" && p.uid() != Some(failed_uid.clone()))
        },
    )
    .await;

    // Scale through spec.replicas (what the scale subresource writes): group 1 goes.
    pools
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    eventually("one group remains", &mut changes, TIMEOUT, || async {
        let pods = pods(&client).await;
        pods.len() == 1 && pods[0].name_any() == "llama-0-0"
    })
    .await;

    // Delete: the finalizer cleans every owned child, then the pool goes.
    pools
        .delete("llama", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the pool and every child are gone",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_none()
                && pods(&client).await.is_empty()
                && server.objects("api/v1/services").is_empty()
                && server.objects("api/v1/configmaps").is_empty()
                && server
                    .objects("apis/policy/v1/poddisruptionbudgets")
                    .is_empty()
        },
    )
    .await;

    // Events explain the decisions.
    let reasons: Vec<String> = events(&server).into_iter().map(|(r, _)| r).collect();
    for expected in [
        "TensorParallelSizeResolved",
        "GroupCreated",
        "GroupUpdated",
        "GroupRecreated",
        "GroupRemoved",
        "Deleted",
    ] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "no {expected} event in {reasons:?}"
        );
    }

    controller.stop().await;
}

#[tokio::test]
async fn a_one_group_pool_with_surge_is_updated_without_an_outage() {
    let (_server, client, mut changes) = cluster(&["gpu-a"]).await;
    let controller = RunningController::start(&client);
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut one = pool();
    one.spec.replicas = 1;
    one.spec.rollout.max_surge = IntOrString::Int(1);
    one.spec.rollout.max_unavailable = IntOrString::Int(0);
    pools.create(&PostParams::default(), &one).await.unwrap();
    eventually("the group is ready", &mut changes, TIMEOUT, || async {
        mark_pods_ready(&client).await;
        current_pool(&client)
            .await
            .is_some_and(|p| condition(&p, "Ready") == Some(("True".into(), "GroupsReady".into())))
    })
    .await;
    let old = pods(&client).await;
    assert_eq!(old.len(), 1);
    let old_hash = old[0].annotations()[TEMPLATE_HASH_ANNOTATION].clone();

    // A new template: a second group comes up beside the first, which keeps serving.
    let patch = json!({"spec": {"batching": {"maxBatchSize": 32}}});
    pools
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(
        "a surge group on the new template",
        &mut changes,
        TIMEOUT,
        || async {
            let pods = pods(&client).await;
            pods.len() == 2
                && pods.iter().any(|p| p.name_any() == "llama-1-0")
                && current_pool(&client).await.is_some_and(|p| {
                    condition(&p, "Progressing") == Some(("True".into(), "RollingUpdate".into()))
                })
        },
    )
    .await;
    let pool_now = current_pool(&client).await.unwrap();
    assert_eq!(
        condition(&pool_now, "Ready"),
        Some(("True".into(), "GroupsReady".into())),
        "the old group still serves"
    );
    assert!(
        pods(&client)
            .await
            .iter()
            .any(|p| p.name_any() == "llama-0-0"
                && p.annotations()[TEMPLATE_HASH_ANNOTATION] == old_hash)
    );

    // Ready: the old group goes, and the pool is whole on the new template.
    mark_pods_ready(&client).await;
    eventually(
        "only the new group remains and it is ready",
        &mut changes,
        TIMEOUT,
        || async {
            let pods = pods(&client).await;
            pods.len() == 1
                && pods[0].name_any() == "llama-1-0"
                && current_pool(&client).await.is_some_and(|p| {
                    let s = p.status.clone().unwrap_or_default();
                    s.updated_replicas == 1
                        && s.ready_replicas == 1
                        && condition(&p, "Progressing") == Some(("False".into(), "Stable".into()))
                })
        },
    )
    .await;
    controller.stop().await;
}

/// Serves `app` on a free loopback port: the port, and the task to abort.
async fn serve_on_loopback(app: axum::Router) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (port, task)
}

/// An agent on loopback that answers `/ready` as one downloading its model does.
async fn downloading_agent(
    done: Arc<std::sync::atomic::AtomicU64>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    let app = axum::Router::new().route(
        "/ready",
        axum::routing::get(move || {
            let done = done.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                let body = json!({
                    "status": format!("downloading hf://meta-llama/Llama-3.1-8B-Instruct@main: {done} bytes"),
                    "download": {"model": "hf://meta-llama/Llama-3.1-8B-Instruct@main",
                        "filesDone": 1, "files": 4, "bytesDone": done, "bytes": 16_000_000_000_u64},
                });
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body))
            }
        }),
    );
    serve_on_loopback(app).await
}

#[tokio::test]
async fn the_pool_says_how_far_its_pods_have_downloaded_the_model() {
    let (_server, client, mut changes) = cluster(&["gpu-a"]).await;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(4_000_000_000));
    let (port, agent) = downloading_agent(done.clone()).await;
    let controller = RunningController::with_agents_on(&client, port);
    one_group_pool(&client, &mut changes).await;
    // The kubelet started the container; the agent downloads and is not ready.
    let running = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "False"}]}});
    Api::<Pod>::namespaced(client.clone(), "ml")
        .patch_status(
            "llama-0-0",
            &PatchParams::default(),
            &Patch::Merge(&running),
        )
        .await
        .unwrap();
    eventually(
        "Progressing says the model downloads, and how far",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let status = p.status.clone().unwrap_or_default();
                let message = condition_message(&p, "Progressing");
                condition(&p, "Progressing") == Some(("True".into(), "DownloadingModel".into()))
                    && message.contains("pod llama-0-0: 1 of 4 files, 3.73 of 14.90 GiB (25%)")
                    && status.model_download.is_some_and(|d| {
                        (d.pods, d.bytes_done, d.bytes) == (1, 4_000_000_000, 16_000_000_000)
                    })
            })
        },
    )
    .await;
    // Progress is read again as bytes arrive (on a 15 s timer when no object changes).
    done.store(12_000_000_000, std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let at = current_pool(&client)
            .await
            .and_then(|p| p.status)
            .and_then(|s| s.model_download)
            .map(|d| d.bytes_done);
        if at == Some(12_000_000_000) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the download's progress was not read again"
        );
        tokio::time::timeout(Duration::from_secs(20), changes.changed())
            .await
            .ok();
    }
    // Ready: nothing downloads any more.
    mark_pods_ready(&client).await;
    eventually(
        "the download is gone from status",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let status = p.status.clone().unwrap_or_default();
                status.model_download.is_none() && status.ready_replicas == 1
            })
        },
    )
    .await;
    controller.stop().await;
    agent.abort();
}

const LWS: &str = "apis/leaderworkerset.x-k8s.io/v1/leaderworkersets";

/// Plays the LeaderWorkerSet controller: a ready pod per group from its template, named and
/// labelled as LWS names them, owned by a StatefulSet (not by the pool).
async fn lws_makes_its_pods(client: &Client, lws: &Value) {
    let name = lws["metadata"]["name"].as_str().unwrap();
    let template = &lws["spec"]["leaderWorkerTemplate"]["workerTemplate"];
    let api = Api::<Pod>::namespaced(client.clone(), "ml");
    for group in 0..lws["spec"]["replicas"].as_u64().unwrap() {
        let mut labels = template["metadata"]["labels"].clone();
        labels["leaderworkerset.sigs.k8s.io/name"] = name.into();
        labels["leaderworkerset.sigs.k8s.io/group-index"] = group.to_string().into();
        labels["leaderworkerset.sigs.k8s.io/worker-index"] = "0".into();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-{group}"), "labels": labels,
                "annotations": template["metadata"]["annotations"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "name": name, "uid": "statefulset-uid", "controller": true}]},
            "spec": template["spec"],
        }))
        .unwrap();
        api.create(&PostParams::default(), &pod).await.unwrap();
    }
    mark_pods_ready(client).await;
}

#[tokio::test]
async fn a_pool_on_a_leader_worker_set_is_sized_by_parallax_and_run_by_lws() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    let controller = RunningController::start(&client);
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut one = pool();
    one.spec.replicas = 1;
    pools.create(&PostParams::default(), &one).await.unwrap();
    eventually("the pool's own pod", &mut changes, TIMEOUT, || async {
        pods(&client).await.len() == 1
    })
    .await;

    // Moved to LWS: one LeaderWorkerSet for both groups, and the pool's own pod goes.
    let patch = json!({"spec": {"groupWorkload": "leaderworkerset", "replicas": 2}});
    pools
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(
        "a LeaderWorkerSet of two groups, and no pod of the pool's own",
        &mut changes,
        TIMEOUT,
        || async {
            let sets = server.objects(LWS);
            sets.len() == 1
                && sets[0]["spec"]["replicas"] == 2
                && sets[0]["spec"]["leaderWorkerTemplate"]["size"] == 1
                && pods(&client).await.is_empty()
        },
    )
    .await;
    let lws = server.objects(LWS).remove(0);
    assert_eq!(lws["metadata"]["name"], "llama-groups");
    assert_eq!(
        lws["metadata"]["ownerReferences"][0]["kind"],
        "InferencePool"
    );
    lws_makes_its_pods(&client, &lws).await;
    eventually(
        "the pool counts LWS's groups: ready and current",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let s = p.status.clone().unwrap_or_default();
                s.ready_replicas == 2
                    && s.updated_replicas == 2
                    && condition(&p, "Ready") == Some(("True".into(), "GroupsReady".into()))
            })
        },
    )
    .await;
    assert_eq!(
        pods(&client).await.len(),
        2,
        "the operator never deletes LWS's pods"
    );

    // Back to pods: the LeaderWorkerSet goes, and the pool makes its own groups again.
    let patch = json!({"spec": {"groupWorkload": "pods"}});
    pools
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(
        "the LeaderWorkerSet is gone and the pool's own pods are back",
        &mut changes,
        TIMEOUT,
        || async {
            let own = pods(&client)
                .await
                .iter()
                .filter(|p| {
                    p.owner_references()
                        .iter()
                        .any(|o| o.kind == "InferencePool")
                })
                .count();
            server.objects(LWS).is_empty() && own == 2
        },
    )
    .await;
    controller.stop().await;
}

#[tokio::test]
async fn without_the_leader_worker_set_api_the_pool_says_what_is_missing() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    server.without(LWS);
    let controller = RunningController::start(&client);
    let mut lws = pool();
    lws.spec.group_workload = parallax_crds::GroupWorkload::LeaderWorkerSet;
    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &lws)
        .await
        .unwrap();
    until_condition(
        &client,
        &mut changes,
        "Degraded",
        ("True", "LeaderWorkerSetMissing"),
    )
    .await;
    let p = current_pool(&client).await.unwrap();
    assert_eq!(
        condition(&p, "Ready"),
        Some(("False".into(), "LeaderWorkerSetMissing".into()))
    );
    let message = &p.status.unwrap().conditions[0].message;
    assert!(
        message.contains("leaderworkerset.x-k8s.io/v1/leaderworkersets"),
        "{message}"
    );
    assert!(pods(&client).await.is_empty());
    controller.stop().await;
}

const POD_MONITORS: &str = "apis/monitoring.coreos.com/v1/podmonitors";

/// The test pool's PodMonitor, if there is one.
fn pod_monitor(server: &FakeApiServer) -> Option<Value> {
    server
        .objects(POD_MONITORS)
        .into_iter()
        .find(|m| m["metadata"]["name"] == "llama-agents")
}

#[tokio::test]
async fn a_pool_gets_a_pod_monitor_once_the_cluster_serves_the_api_and_loses_it_when_monitors_are_off()
 {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    let settings = |on: bool| controller::Settings {
        pod_monitors: on.then(|| PodMonitorSettings {
            labels: [("release".to_owned(), "prometheus".to_owned())].into(),
            interval: "30s".into(),
        }),
        discover_every: Duration::from_millis(50),
        ..controller::Settings::new("registry.example/parallax-agent:test".into())
    };
    let controller = RunningController::start_with(&client, settings(true));
    let pools = one_group_pool(&client, &mut changes).await;
    // No Prometheus Operator: nothing is asked of its API.
    assert!(pod_monitor(&server).is_none());

    // It is installed: discovery finds it and every pool is reconciled at once.
    server.discoverable("monitoring.coreos.com/v1", "podmonitors", "PodMonitor");
    eventually(
        "the pool's PodMonitor exists",
        &mut changes,
        TIMEOUT,
        || async { pod_monitor(&server).is_some() },
    )
    .await;
    let monitor = pod_monitor(&server).unwrap();
    assert_eq!(monitor["metadata"]["namespace"], "ml");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        monitor["metadata"]["ownerReferences"][0]["kind"],
        "InferencePool"
    );
    assert_eq!(
        monitor["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (&endpoint["port"], &endpoint["path"], &endpoint["interval"]),
        (&json!("http"), &json!("/metrics"), &json!("30s"))
    );
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "pool");
    // It selects every pod of the pool and the router's pods, by labels they carry, on a port
    // they name; the `pool` label comes from one they all carry with the pool's name.
    let selector = &monitor["spec"]["selector"];
    let selects = |labels: &Value| {
        let labels = labels.as_object().unwrap();
        let matched = selector["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
        matched
            && selector["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| {
                    e["operator"] == "In"
                        && labels
                            .get(e["key"].as_str().unwrap())
                            .is_some_and(|v| e["values"].as_array().unwrap().contains(v))
                })
    };
    let source = endpoint["relabelings"][0]["sourceLabels"][0]
        .as_str()
        .unwrap();
    let pool_label = source.trim_start_matches("__meta_kubernetes_pod_label_");
    let mut templates: Vec<Value> = pods(&client)
        .await
        .into_iter()
        .map(|pod| serde_json::to_value(pod).unwrap())
        .collect();
    let routers = server.objects("apis/apps/v1/deployments");
    assert_eq!(routers.len(), 1, "the pool's router");
    templates.extend(routers.into_iter().map(|d| d["spec"]["template"].clone()));
    for pod in templates {
        let labels = &pod["metadata"]["labels"];
        assert!(selects(labels), "{selector} does not select {labels}");
        let named = labels
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.replace(['.', '/', '-'], "_") == pool_label);
        assert_eq!(named.map(|(_, v)| v), Some(&json!("llama")), "{labels}");
        let ports = pod["spec"]["containers"][0]["ports"].as_array().unwrap();
        assert!(ports.iter().any(|p| p["name"] == "http"));
    }

    // Monitors turned off: the pool's goes.
    controller.stop().await;
    let controller = RunningController::start_with(&client, settings(false));
    eventually("the PodMonitor is gone", &mut changes, TIMEOUT, || async {
        pod_monitor(&server).is_none()
    })
    .await;
    controller.stop().await;

    // On again, then the pool is deleted: it goes with the pool.
    let controller = RunningController::start_with(&client, settings(true));
    eventually("the PodMonitor is back", &mut changes, TIMEOUT, || async {
        pod_monitor(&server).is_some()
    })
    .await;
    pools
        .delete("llama", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the pool and its PodMonitor are gone",
        &mut changes,
        TIMEOUT,
        || async { current_pool(&client).await.is_none() && pod_monitor(&server).is_none() },
    )
    .await;
    controller.stop().await;
}

/// An agent on loopback whose `/ready` answers 503 with `body`.
async fn unready_agent(body: Value) -> (u16, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    let app = axum::Router::new().route(
        "/ready",
        axum::routing::get(move || {
            let body = body.clone();
            async move { (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)) }
        }),
    );
    serve_on_loopback(app).await
}

#[tokio::test]
async fn a_group_whose_gpu_stays_unhealthy_moves_off_its_node() {
    let (server, client, mut changes) = cluster(&["gpu-a", "gpu-b"]).await;
    let reason = "GPU 1 (GPU-bad) is unhealthy: XID 79: GPU has fallen off the bus";
    let (port, agent) = unready_agent(json!({"status": reason, "gpus": [
        {"index": 0, "uuid": "GPU-good", "name": "H100", "state": "healthy"},
        {"index": 1, "uuid": "GPU-bad", "name": "H100", "state": "unhealthy",
         "reason": "XID 79: GPU has fallen off the bus", "last_xid": 79}]}))
    .await;
    let controller = RunningController::with_agents_on(&client, port);
    let pools = one_group_pool(&client, &mut changes).await;
    // Scheduled on gpu-a, running, and its agent reports GPU 1 unhealthy.
    let pod_api = Api::<Pod>::namespaced(client.clone(), "ml");
    pod_api
        .patch(
            "llama-0-0",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"nodeName": "gpu-a"}})),
        )
        .await
        .unwrap();
    let running = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "False"}]}});
    pod_api
        .patch_status(
            "llama-0-0",
            &PatchParams::default(),
            &Patch::Merge(&running),
        )
        .await
        .unwrap();
    let first_uid = pod_api.get("llama-0-0").await.unwrap().uid();
    eventually(
        "Degraded names the pod, the node, the GPU and the XID",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let status = p.status.clone().unwrap_or_default();
                let message = condition_message(&p, "Degraded");
                condition(&p, "Degraded") == Some(("True".into(), "GpuUnhealthy".into()))
                    && message.starts_with("pod llama-0-0 on node gpu-a: GPU 1 (GPU-bad) is unhealthy: XID 79: GPU has fallen off the bus; its group moves off the node in")
                    && status.gpu_faults.len() == 1
            })
        },
    )
    .await;
    assert!(recorded(&server, "GpuUnhealthy", "GPU 1 (GPU-bad)"));
    assert_eq!(
        pod_api.get("llama-0-0").await.unwrap().uid(),
        first_uid,
        "within the grace nothing moves"
    );

    // The grace runs out: the group comes back on another node, and gpu-a is avoided.
    pools
        .patch(
            "llama",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"gpuHealth": {"unhealthyGraceSeconds": 0}}})),
        )
        .await
        .unwrap();
    eventually(
        "the group is recreated with a node affinity that keeps it off gpu-a",
        &mut changes,
        TIMEOUT,
        || async {
            let Ok(pod) = pod_api.get("llama-0-0").await else {
                return false;
            };
            let terms = pod
                .spec
                .as_ref()
                .and_then(|s| s.affinity.as_ref())
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|n| {
                    n.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|r| r.node_selector_terms.clone())
                .unwrap_or_default();
            pod.uid() != first_uid
                && !terms.is_empty()
                && terms.iter().all(|t| {
                    t.match_expressions.iter().flatten().any(|e| {
                        e.key == "kubernetes.io/hostname"
                            && e.operator == "NotIn"
                            && e.values.as_deref() == Some(&["gpu-a".to_owned()][..])
                    })
                })
        },
    )
    .await;
    eventually(
        "status keeps gpu-a avoided and the fault is gone with its pod",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let status = p.status.clone().unwrap_or_default();
                status.avoided_nodes.iter().any(|a| a.node == "gpu-a")
                    && status.gpu_faults.is_empty()
                    && condition(&p, "Degraded") == Some(("False".into(), "AsExpected".into()))
            })
        },
    )
    .await;
    assert!(recorded(&server, "GroupRescheduled", "away from its node"));
    controller.stop().await;
    agent.abort();
}

/// An agent on loopback whose `/metrics` says what `body` holds now.
async fn metrics_agent(body: Arc<std::sync::Mutex<String>>) -> (u16, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = body.lock().unwrap().clone();
            async move { text }
        }),
    );
    serve_on_loopback(app).await
}

fn agent_metrics(waiting: u32, utilization: f64) -> String {
    format!(
        "vllm:num_requests_waiting{{model_name=\"llama\"}} {waiting}\n\
         parallax_batch_utilization{{model_name=\"llama\"}} {utilization}\n\
         vllm:request_success_total{{finished_reason=\"stop\",model_name=\"llama\"}} 10\n"
    )
}

#[tokio::test]
async fn the_autoscaler_scales_on_the_agents_metrics_and_stands_aside_for_an_hpa() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    let body = Arc::new(std::sync::Mutex::new(agent_metrics(35, 0.9)));
    let (port, agent) = metrics_agent(body.clone()).await;
    let controller = RunningController::scaling(&client, port, Duration::from_millis(100));
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut scaled = pool();
    scaled.spec.replicas = 1;
    scaled.spec.max_replicas = 3;
    scaled.spec.autoscaling.enabled = true;
    scaled.spec.autoscaling.scale_down_window_seconds = 0;
    scaled.spec.autoscaling.scale_down_cooldown_seconds = 0;
    pools.create(&PostParams::default(), &scaled).await.unwrap();
    // The group's leader is ready at 127.0.0.1, where the stand-in agent answers.
    eventually("the first pod", &mut changes, TIMEOUT, || async {
        pods(&client).await.len() == 1
    })
    .await;
    ready_at(&client, "llama-0-0", "127.0.0.1").await;

    // 35 requests wait: one more group, through the scale subresource.
    eventually(
        "a scale-up to 2 groups with its event and condition",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                p.spec.replicas == 2
                    && condition(&p, "ScalingActive")
                        == Some(("True".into(), "ReactiveRules".into()))
            }) && recorded(
                &server,
                "ScaledUp",
                "from 1 to 2 groups: scale-up (queue 35 > 20)",
            )
        },
    )
    .await;
    // The new group is starting: no second step for the same queue.
    assert_eq!(current_pool(&client).await.unwrap().spec.replicas, 2);

    // The queue drains and the groups idle: back to one after the (zero) window.
    *body.lock().unwrap() = agent_metrics(0, 0.1);
    eventually("a scale-down to 1 group", &mut changes, TIMEOUT, || async {
        current_pool(&client)
            .await
            .is_some_and(|p| p.spec.replicas == 1)
            && recorded(&server, "ScaledDown", "utilization 10 % < 60 %")
    })
    .await;

    // An HPA that targets the pool: the built-in autoscaler stands aside and says so.
    let hpa: k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler =
        serde_json::from_value(json!({
            "metadata": {"name": "llama-keda", "namespace": "ml"},
            "spec": {"scaleTargetRef": {"apiVersion": "parallax.dev/v1alpha1",
                "kind": "InferencePool", "name": "llama"}, "maxReplicas": 3}
        }))
        .unwrap();
    Api::<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>::namespaced(
        client.clone(),
        "ml",
    )
    .create(&PostParams::default(), &hpa)
    .await
    .unwrap();
    *body.lock().unwrap() = agent_metrics(200, 1.0);
    until_condition(
        &client,
        &mut changes,
        "ScalingActive",
        ("False", "ExternalAutoscaler"),
    )
    .await;
    assert_eq!(current_pool(&client).await.unwrap().spec.replicas, 1);
    controller.stop().await;
    agent.abort();
}

#[tokio::test]
async fn the_pools_service_goes_to_its_router_only_while_a_router_pod_is_ready() {
    let (_server, client, mut changes) = cluster(&["gpu-a"]).await;
    let controller = RunningController::start(&client);
    one_group_pool(&client, &mut changes).await;
    mark_pods_ready(&client).await;
    until_condition(&client, &mut changes, "Ready", ("True", "GroupsReady")).await;
    let services = Api::<Service>::namespaced(client.clone(), "ml");
    let selects = |router: bool| {
        let services = services.clone();
        async move {
            let selector = services
                .get("llama")
                .await
                .unwrap()
                .spec
                .unwrap()
                .selector
                .unwrap();
            if router {
                selector.get("parallax.dev/router").map(String::as_str) == Some("llama")
            } else {
                selector.get("parallax.dev/rank").map(String::as_str) == Some("0")
            }
        }
    };
    // The Deployment has said nothing yet: the leaders take the requests.
    assert!(selects(false).await);
    // The Deployment controller's word on the router's pods (the fake cluster runs none).
    let routers = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), "ml");
    let say = |ready: i32| json!({"status": {"replicas": 1, "readyReplicas": ready}});
    routers
        .patch_status(
            "llama-router",
            &PatchParams::default(),
            &Patch::Merge(&say(1)),
        )
        .await
        .unwrap();
    eventually(
        "the Service selects the router",
        &mut changes,
        TIMEOUT,
        || selects(true),
    )
    .await;
    until_condition(&client, &mut changes, "Degraded", ("False", "AsExpected")).await;
    // Its pod stops being ready: back to the leaders, the pool ready, and degraded.
    routers
        .patch_status(
            "llama-router",
            &PatchParams::default(),
            &Patch::Merge(&say(0)),
        )
        .await
        .unwrap();
    eventually(
        "the Service selects the leaders",
        &mut changes,
        TIMEOUT,
        || selects(false),
    )
    .await;
    until_condition(
        &client,
        &mut changes,
        "Degraded",
        ("True", "RouterNotReady"),
    )
    .await;
    let pool = current_pool(&client).await.unwrap();
    assert_eq!(
        condition(&pool, "Ready"),
        Some(("True".into(), "GroupsReady".into()))
    );
    controller.stop().await;
}

#[tokio::test]
async fn an_idle_pool_scales_to_zero_and_wakes_for_the_request_its_router_holds() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    // One stand-in answers for the leader and for the router: each reads its own series.
    let body = Arc::new(std::sync::Mutex::new(agent_metrics(0, 0.0)));
    let (port, agent) = metrics_agent(body.clone()).await;
    let controller = RunningController::scaling(&client, port, Duration::from_millis(100));
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut idle = pool();
    idle.spec.replicas = 1;
    idle.spec.min_replicas = 0;
    idle.spec.autoscaling.enabled = true;
    idle.spec.autoscaling.scale_to_zero_after_seconds = Some(0);
    pools.create(&PostParams::default(), &idle).await.unwrap();
    eventually("the first pod", &mut changes, TIMEOUT, || async {
        pods(&client).await.len() == 1
    })
    .await;
    ready_at(&client, "llama-0-0", "127.0.0.1").await;

    // No request arrives, waits or runs: zero groups, and the group's pod goes.
    eventually(
        "a scale to zero with its event, and no pod",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client)
                .await
                .is_some_and(|p| p.spec.replicas == 0)
                && recorded(
                    &server,
                    "ScaledDown",
                    "from 1 to 0 groups: scale-to-zero (no requests for 0 s)",
                )
                && pods(&client).await.is_empty()
        },
    )
    .await;

    // The router (its pod ready at the stand-in) holds a request: the pool wakes.
    let router: Pod = serde_json::from_value(json!({
        "metadata": {"name": "llama-router-abc", "namespace": "ml",
            "labels": {"parallax.dev/router": "llama"}},
        "spec": {"containers": [{"name": "router", "image": "agent"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &router)
        .await
        .unwrap();
    ready_at(&client, "llama-router-abc", "127.0.0.1").await;
    // Router pods are no group's: the pool still has none.
    assert!(group_pods(&client).await.is_empty());
    body.lock()
        .unwrap()
        .push_str("parallax_router_held_requests 1\n");
    eventually("a wake to one group", &mut changes, TIMEOUT, || async {
        current_pool(&client)
            .await
            .is_some_and(|p| p.spec.replicas == 1)
            && recorded(
                &server,
                "ScaledUp",
                "from 0 to 1 groups: wake (1 request held by the router)",
            )
            && group_pods(&client).await.len() == 1
    })
    .await;
    controller.stop().await;
    agent.abort();
}

#[tokio::test]
async fn the_autoscaler_reads_a_prometheus_that_scrapes_the_agents() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    // A stand-in Prometheus: every answer has the leader's counter a little further on and 35
    // requests waiting; it remembers the queries.
    let queries = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let asked = queries.clone();
    let app = axum::Router::new().route(
        "/api/v1/query",
        axum::routing::get(
            move |query: axum::extract::Query<std::collections::HashMap<String, String>>| {
                let answer = {
                    let mut asked = asked.lock().unwrap();
                    asked.push(query.0.get("query").cloned().unwrap_or_default());
                    let n = asked.len() * 10;
                    let sample = |name: &str, value: String| {
                        json!({"metric": {"__name__": name, "namespace": "ml", "pod": "llama-0-0"},
                            "value": [1.0, value]})
                    };
                    json!({"status": "success", "data": {"resultType": "vector", "result": [
                        sample("vllm:request_success_total", n.to_string()),
                        sample("vllm:num_requests_waiting", "35".into()),
                        sample("parallax_batch_utilization", "0.9".into()),
                    ]}})
                };
                async move { axum::Json(answer) }
            },
        ),
    );
    let (port, prometheus) = serve_on_loopback(app).await;
    let controller = RunningController::start_with(
        &client,
        controller::Settings {
            // No agent answers: the leader's metrics can only come from Prometheus.
            agents: AgentProbe::on_port(1),
            autoscale_every: Duration::from_millis(100),
            ..controller::Settings::new("registry.example/parallax-agent:test".into())
        },
    );
    let mut scaled = pool();
    scaled.spec.replicas = 1;
    scaled.spec.autoscaling.enabled = true;
    scaled.spec.autoscaling.metrics_source =
        serde_json::from_value(json!({"prometheus": {"url": format!("http://127.0.0.1:{port}/")}}))
            .unwrap();
    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &scaled)
        .await
        .unwrap();
    eventually("the first pod", &mut changes, TIMEOUT, || async {
        pods(&client).await.len() == 1
    })
    .await;
    // Ready, with no pod IP to reach it at.
    let ready = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    Api::<Pod>::namespaced(client.clone(), "ml")
        .patch_status("llama-0-0", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    eventually(
        "a scale-up read from Prometheus",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client)
                .await
                .is_some_and(|p| p.spec.replicas == 2)
                && recorded(&server, "ScaledUp", "queue 35 > 20")
        },
    )
    .await;
    let query = queries.lock().unwrap()[0].clone();
    assert!(
        query.contains("namespace=\"ml\",pod=~\"llama-0-0\"")
            && query.contains("vllm:num_requests_waiting"),
        "{query}"
    );
    controller.stop().await;
    prometheus.abort();
}

/// An agent on `listener` that serves steadily: each `/metrics` answer says 20 more requests
/// finished, all within `latency` seconds (a bucket bound), with 100 tokens each at half
/// batch. `scraped` counts the answers.
async fn steady_agent(
    listener: tokio::net::TcpListener,
    latency: &'static str,
    scraped: Arc<tokio::sync::watch::Sender<u64>>,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            scraped.send_modify(|n| *n += 1);
            let n = 20 * *scraped.borrow();
            let fast = if latency == "0.1" { n } else { 0 };
            async move {
                format!(
                    "vllm:request_success_total{{finished_reason=\"stop\",model_name=\"llama\"}} {n}\n\
                     vllm:generation_tokens_total{{model_name=\"llama\"}} {}\n\
                     parallax_batch_utilization{{model_name=\"llama\"}} 0.5\n\
                     vllm:num_requests_waiting{{model_name=\"llama\"}} 0\n\
                     vllm:e2e_request_latency_seconds_bucket{{le=\"0.1\",model_name=\"llama\"}} {fast}\n\
                     vllm:e2e_request_latency_seconds_bucket{{le=\"0.5\",model_name=\"llama\"}} {n}\n\
                     vllm:e2e_request_latency_seconds_bucket{{le=\"+Inf\",model_name=\"llama\"}} {n}\n",
                    n * 100
                )
            }
        }),
    );
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

/// Plays the kubelet for one pod: running and ready at `ip`.
async fn ready_at(client: &Client, pod: &str, ip: &str) {
    let ready = json!({"status": {"phase": "Running", "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True"}]}});
    Api::<Pod>::namespaced(client.clone(), "ml")
        .patch_status(pod, &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_revision_that_serves_slower_is_rolled_back_to_the_last_good_one() {
    support::init_logs();
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    // The old revision's leader answers at 127.0.0.1, the new one's at 127.0.0.2, same port.
    let fast_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = fast_listener.local_addr().unwrap().port();
    let slow_listener = tokio::net::TcpListener::bind(("127.0.0.2", port))
        .await
        .unwrap();
    let fast_scraped = Arc::new(tokio::sync::watch::Sender::new(0));
    let slow_scraped = Arc::new(tokio::sync::watch::Sender::new(0));
    let fast = steady_agent(fast_listener, "0.1", fast_scraped.clone()).await;
    let slow = steady_agent(slow_listener, "0.5", slow_scraped.clone()).await;
    let controller = RunningController::scaling(&client, port, Duration::from_millis(100));
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut one = pool();
    one.spec.replicas = 1;
    one.spec.rollout.max_surge = IntOrString::Int(1);
    one.spec.rollout.max_unavailable = IntOrString::Int(0);
    one.spec.rollback.window_seconds = 1;
    one.spec.rollback.min_requests = 10;
    let good = one.spec.serving_revision();
    pools.create(&PostParams::default(), &one).await.unwrap();
    eventually("the first group", &mut changes, TIMEOUT, || async {
        pods(&client).await.len() == 1
    })
    .await;
    ready_at(&client, "llama-0-0", "127.0.0.1").await;
    eventually(
        "the first revision is the stable one",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                p.status
                    .and_then(|s| s.rollback)
                    .and_then(|r| r.stable_revision)
                    == Some(good.clone())
            })
        },
    )
    .await;
    // A baseline of the first revision's traffic.
    let mut scrapes = fast_scraped.subscribe();
    tokio::time::timeout(TIMEOUT, scrapes.wait_for(|n| *n >= 12))
        .await
        .expect("the old revision's leader is read")
        .unwrap();

    // A new agent image: the new revision's group comes up beside the old one, then serves alone
    // — five times slower.
    let patch = json!({"spec": {"agent": {"image": "registry.example/parallax-agent:slow"}}});
    pools
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let bad = current_pool(&client).await.unwrap().spec.serving_revision();
    assert_ne!(bad, good);
    eventually(
        "the new revision's group",
        &mut changes,
        TIMEOUT,
        || async {
            pods(&client)
                .await
                .iter()
                .any(|p| p.name_any() == "llama-1-0")
        },
    )
    .await;
    ready_at(&client, "llama-1-0", "127.0.0.2").await;
    until_condition(
        &client,
        &mut changes,
        "RolledBack",
        ("True", "LatencyRegression"),
    )
    .await;
    let rolled = current_pool(&client).await.unwrap();
    let message = condition_message(&rolled, "RolledBack");
    assert!(
        message.contains(&format!(
            "revision {bad} regressed: p95 480 ms against 95 ms"
        )),
        "{message}"
    );
    let status = rolled.status.clone().unwrap().rollback.unwrap();
    assert_eq!(
        (status.failed_revision, status.stable_revision),
        (Some(bad.clone()), Some(good.clone()))
    );
    assert!(recorded(
        &server,
        "RolledBack",
        &format!("rolled back from revision {bad} to {good}: latency regressed")
    ));
    assert!(
        *slow_scraped.borrow() >= 2,
        "the new revision was judged on its own intervals"
    );

    // The groups go back to the last good revision (group 0 anew, the old one gone); the spec
    // is left as written.
    eventually(
        "a group on the last good revision",
        &mut changes,
        TIMEOUT,
        || async {
            pods(&client).await.iter().any(|p| {
                p.annotations().get("parallax.dev/revision") == Some(&good)
                    && p.spec.as_ref().unwrap().containers[0].image.as_deref()
                        == Some("registry.example/parallax-agent:test")
            })
        },
    )
    .await;
    assert_eq!(
        current_pool(&client)
            .await
            .unwrap()
            .spec
            .agent
            .image
            .as_deref(),
        Some("registry.example/parallax-agent:slow")
    );
    let revisions = server.objects("apis/apps/v1/controllerrevisions");
    assert_eq!(revisions.len(), 2, "one revision per serving spec");
    controller.stop().await;
    fast.abort();
    slow.abort();
}

/// The repository's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Series an autoscaled pool has only after a forecast sample (five minutes of its history) or
/// a rollback: the queries of the scaling dashboard that read them cannot have data in a test.
/// Whether Prometheus at `address` answers `expr` with a finite value.
async fn has_data(http: &AgentProbe, address: std::net::SocketAddr, expr: &str) -> bool {
    let url = format!(
        "http://{address}/api/v1/query?query={}",
        parallax_operator::autoscale::signals::url_encode(expr)
    );
    let Ok(body) = http.get_url(&url, 1 << 20).await else {
        return false;
    };
    let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
    answer["data"]["result"].as_array().is_some_and(|r| {
        r.iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        })
    })
}

/// The dashboard queries that still have no data after a minute of asking.
async fn without_data<'a>(
    http: &AgentProbe,
    address: std::net::SocketAddr,
    queries: Vec<&'a Value>,
) -> Vec<&'a Value> {
    let mut missing = queries;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for q in missing {
            if !has_data(http, address, q["expr"].as_str().unwrap()).await {
                still.push(q);
            }
        }
        missing = still;
        if !missing.is_empty() {
            // Prometheus scrapes every second: ask again after the next scrape.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    missing
}

/// Series the operator writes only after a forecast sample (5 minutes of traffic, a lead later
/// for the errors) or a rollback: the test records them through the paths the scaler takes.
const NEEDS_HISTORY: [&str; 4] = [
    "signal=\"forecast\"",
    "signal=\"forecast_mape\"",
    "signal=\"naive_mape\"",
    "parallax_operator_rollbacks_total",
];

#[tokio::test]
async fn the_scaling_dashboards_queries_have_data_from_a_live_operator() {
    let prometheus_binary = root().join(".tools/bin/prometheus");
    if !prometheus_binary.exists() {
        eprintln!(
            "\n*** SKIPPED: {} is missing (scripts/install-tools) ***\n",
            prometheus_binary.display()
        );
        return;
    }
    let output = std::process::Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/observability.py"))
        .args(["--queries", "ml", "llama"])
        .output()
        .expect("python runs the dashboards' generator");
    assert!(output.status.success(), "{output:?}");
    let queries: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|q: &Value| q["expr"].as_str().unwrap().contains("parallax_operator_"))
        .collect();
    assert!(queries.len() >= 9, "{queries:?}");

    // The operator, its metrics served on loopback, autoscaling a pool whose agent says 35
    // requests wait: it scales up, counts GPU-hours and reports its signals.
    let (_server, client, mut changes) = cluster(&["gpu-a"]).await;
    let body = Arc::new(std::sync::Mutex::new(agent_metrics(35, 0.9)));
    let (agent_port, agent) = metrics_agent(body.clone()).await;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(parallax_operator::http::Health {
        metrics: metrics.clone(),
        ..Default::default()
    });
    let (metrics_port, metrics_server) =
        serve_on_loopback(parallax_operator::http::router(health)).await;
    let controller = RunningController::scaling_observed(
        &client,
        agent_port,
        Duration::from_millis(200),
        metrics.clone(),
    );
    let mut scaled = pool();
    scaled.spec.replicas = 1;
    scaled.spec.max_replicas = 3;
    scaled.spec.autoscaling.enabled = true;
    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &scaled)
        .await
        .unwrap();
    eventually("the first pod", &mut changes, TIMEOUT, || async {
        pods(&client).await.len() == 1
    })
    .await;
    ready_at(&client, "llama-0-0", "127.0.0.1").await;
    eventually("a scale-up", &mut changes, TIMEOUT, || async {
        current_pool(&client)
            .await
            .is_some_and(|p| p.spec.replicas == 2)
    })
    .await;

    let dir = std::env::temp_dir().join(format!(
        "parallax-operator-prometheus-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n  - job_name: parallax-operator\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"),
    )
    .unwrap();
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut prometheus = std::process::Command::new(&prometheus_binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={address}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = AgentProbe::on_port(address.port());
    let (later, asked): (Vec<&Value>, Vec<&Value>) = queries.iter().partition(|q| {
        let expr = q["expr"].as_str().unwrap();
        NEEDS_HISTORY.iter().any(|n| expr.contains(n))
    });
    let mut missing = without_data(&http, address, asked.clone()).await;
    // A forecast with its errors, and a rollback, as the scaler records them.
    let forecast = parallax_crds::AutoscalingStatus {
        forecast_requests_per_second: Some(42.0),
        forecast_mape: Some(0.12),
        naive_mape: Some(0.15),
        ..Default::default()
    };
    metrics.record_signals("ml", "llama", &forecast);
    metrics.rolled_back("ml", "llama", "latency");
    missing.extend(without_data(&http, address, later.clone()).await);
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    controller.stop().await;
    agent.abort();
    metrics_server.abort();
    assert!(
        missing.is_empty(),
        "operator queries without data:\n{}",
        missing
            .iter()
            .map(|q| format!("{} / {}: {}", q["dashboard"], q["panel"], q["expr"]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(asked.len() + later.len(), queries.len());
    eprintln!(
        "{} operator queries had data from the running scaler, {} once a forecast and a rollback were recorded",
        asked.len(),
        later.len()
    );
}

#[tokio::test]
async fn spot_groups_keep_an_on_demand_floor_and_come_back_on_demand_when_spot_is_wanting() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    let controller = RunningController::start_with(
        &client,
        controller::Settings {
            autoscale_every: Duration::from_millis(100),
            ..controller::Settings::new("registry.example/parallax-agent:test".into())
        },
    );
    let pools = Api::<InferencePool>::namespaced(client.clone(), "ml");
    let mut spot: InferencePool = pool();
    spot.spec.replicas = 3;
    spot.spec.placement = serde_json::from_value(json!({
        "spotShare": 1.0, "onDemandFloor": 1,
        "spotNodeSelector": {"karpenter.sh/capacity-type": "spot"},
        "spotTolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        "onDemandNodeSelector": {"karpenter.sh/capacity-type": "on-demand"}}))
    .unwrap();
    pools.create(&PostParams::default(), &spot).await.unwrap();
    let by_type = |pods: &[Pod], capacity: &str| {
        pods.iter()
            .filter(|p| {
                p.labels()
                    .get("parallax.dev/capacity-type")
                    .map(String::as_str)
                    == Some(capacity)
            })
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    };
    eventually(
        "one on-demand group and two spot ones",
        &mut changes,
        TIMEOUT,
        || async {
            let pods = pods(&client).await;
            by_type(&pods, "on-demand").len() == 1 && by_type(&pods, "spot").len() == 2
        },
    )
    .await;
    let all = pods(&client).await;
    let spot_pod = all
        .iter()
        .find(|p| p.labels()["parallax.dev/capacity-type"] == "spot")
        .unwrap();
    let spec = spot_pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["karpenter.sh/capacity-type"],
        "spot"
    );
    assert_eq!(
        spec.tolerations
            .as_ref()
            .unwrap()
            .last()
            .unwrap()
            .key
            .as_deref(),
        Some("spot")
    );

    // A spot node is reclaimed and takes its pod: the group comes back, on spot, and the
    // on-demand floor holds.
    let reclaimed = spot_pod.name_any();
    let pod_api = Api::<Pod>::namespaced(client.clone(), "ml");
    pod_api
        .delete(&reclaimed, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the reclaimed group is back on spot",
        &mut changes,
        TIMEOUT,
        || async {
            let pods = pods(&client).await;
            pods.iter().any(|p| p.name_any() == reclaimed)
                && by_type(&pods, "on-demand").len() == 1
                && by_type(&pods, "spot").len() == 2
        },
    )
    .await;

    // GPU-hours are counted by capacity type from running pods.
    for pod in pods(&client).await {
        let running = json!({"status": {"phase": "Running"}});
        pod_api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&running),
            )
            .await
            .unwrap();
    }
    eventually(
        "GPU-hours of both kinds in status",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                p.status
                    .and_then(|s| s.gpu_hours)
                    .is_some_and(|h| h.on_demand > 0.0 && h.spot > 0.0)
            })
        },
    )
    .await;

    // No spot capacity: a spot pod unschedulable for five minutes makes its group come back on
    // on-demand nodes.
    let stranded = reclaimed;
    pod_api
        .patch(
            &stranded,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}})),
        )
        .await
        .unwrap();
    let unschedulable = json!({"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled",
        "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."}]}});
    pod_api
        .patch_status(
            &stranded,
            &PatchParams::default(),
            &Patch::Merge(&unschedulable),
        )
        .await
        .unwrap();
    eventually(
        "the stranded group is back on on-demand",
        &mut changes,
        TIMEOUT,
        || async {
            let pods = pods(&client).await;
            by_type(&pods, "on-demand").len() == 2
                && by_type(&pods, "spot").len() == 1
                && current_pool(&client)
                    .await
                    .is_some_and(|p| p.status.and_then(|s| s.spot_unavailable_since).is_some())
        },
    )
    .await;
    assert!(recorded(&server, "GroupRescheduled", "on-demand nodes"));
    controller.stop().await;
}

#[tokio::test]
async fn a_pool_that_fits_no_node_is_not_ready_with_a_reason() {
    let (_server, client, mut changes) = cluster(&[]).await;
    let controller = RunningController::start(&client);

    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &pool())
        .await
        .unwrap();
    until_condition(&client, &mut changes, "Ready", ("False", "NoGpuNodes")).await;
    assert!(pods(&client).await.is_empty(), "no pods without a layout");
    controller.stop().await;
}

#[tokio::test]
async fn what_the_pool_does_not_own_is_never_adopted_counted_changed_or_deleted() {
    let (server, client, mut changes) = cluster(&["gpu-a"]).await;
    // Somebody's pod with the pool's labels and the name group 1 would take.
    let squatter: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "llama-1-0", "namespace": "ml", "labels": {
            "parallax.dev/pool": "llama", "parallax.dev/group": "1", "parallax.dev/rank": "0"}},
        "spec": {"containers": [{"name": "x", "image": "busybox"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();
    let pod_api = Api::<Pod>::namespaced(client.clone(), "ml");
    pod_api
        .create(&PostParams::default(), &squatter)
        .await
        .unwrap();
    // And somebody's Service of the pool's name.
    let theirs: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"ports": [{"name": "web", "port": 80}], "selector": {"app": "web"}}
    }))
    .unwrap();
    let services = Api::<Service>::namespaced(client.clone(), "ml");
    services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    // And, where the cluster serves PodMonitors, somebody's of the name the pool's would have.
    server.discoverable("monitoring.coreos.com/v1", "podmonitors", "PodMonitor");
    let monitors = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        "ml",
        &parallax_operator::monitoring::resource(),
    );
    let their_monitor: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": "llama-agents", "namespace": "ml"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}}
    }))
    .unwrap();
    monitors
        .create(&PostParams::default(), &their_monitor)
        .await
        .unwrap();
    let controller = RunningController::start(&client);
    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &pool())
        .await
        .unwrap();
    eventually(
        "group 0 is created, group 1's name is reported taken",
        &mut changes,
        TIMEOUT,
        || async {
            let taken = recorded(&server, "PodNameTaken", "llama-1-0");
            let service_taken = recorded(&server, "ChildNameTaken", "Service/llama");
            let monitor_taken = recorded(&server, "ChildNameTaken", "PodMonitor/llama-agents");
            taken
                && service_taken
                && monitor_taken
                && pod_api.get_opt("llama-0-0").await.unwrap().is_some()
        },
    )
    .await;
    mark_pods_ready(&client).await;
    eventually(
        "only the pool's own ready group counts",
        &mut changes,
        TIMEOUT,
        || async {
            current_pool(&client).await.is_some_and(|p| {
                let s = p.status.unwrap_or_default();
                s.replicas == 1 && s.ready_replicas == 1
            })
        },
    )
    .await;
    let untouched = pod_api.get("llama-1-0").await.unwrap();
    assert!(
        untouched.owner_references().is_empty(),
        "the pod was adopted"
    );
    assert_eq!(
        untouched.spec.unwrap().containers[0].image.as_deref(),
        Some("busybox")
    );
    let service = services.get("llama").await.unwrap();
    assert!(
        service.owner_references().is_empty(),
        "the Service was adopted"
    );
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 80);
    let monitor = monitors.get("llama-agents").await.unwrap();
    assert!(
        monitor.metadata.owner_references.is_none(),
        "the PodMonitor was adopted"
    );
    assert_eq!(
        monitor.data["spec"]["selector"]["matchLabels"]["app"],
        "web"
    );

    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .delete("llama", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the pool and its own pods are gone, the other pod stays",
        &mut changes,
        TIMEOUT,
        || async {
            let names: Vec<String> = pods(&client).await.iter().map(|p| p.name_any()).collect();
            current_pool(&client).await.is_none()
                && names == ["llama-1-0"]
                && services.get_opt("llama").await.unwrap().is_some()
                && services.get_opt("llama-pods").await.unwrap().is_none()
                && monitors.get_opt("llama-agents").await.unwrap().is_some()
        },
    )
    .await;
    controller.stop().await;
}

#[tokio::test]
async fn a_group_on_a_lost_node_comes_back_under_new_names_while_its_old_pod_hangs() {
    let (server, client, mut changes) = cluster(&["gpu-a", "gpu-b"]).await;
    let nodes = Api::<Node>::all(client.clone());
    let controller = RunningController::start(&client);
    let mut one = pool();
    one.spec.replicas = 1;
    Api::<InferencePool>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &one)
        .await
        .unwrap();
    let pod_api = Api::<Pod>::namespaced(client.clone(), "ml");
    eventually("the group's pod exists", &mut changes, TIMEOUT, || async {
        pod_api.get_opt("llama-0-0").await.unwrap().is_some()
    })
    .await;
    // Scheduled on gpu-a; a finalizer stands for the kubelet that will never confirm the
    // deletion once the node is gone.
    let placed = json!({"metadata": {"finalizers": ["test.parallax.dev/kubelet"]},
        "spec": {"nodeName": "gpu-a"}});
    pod_api
        .patch("llama-0-0", &PatchParams::default(), &Patch::Merge(&placed))
        .await
        .unwrap();
    mark_pods_ready(&client).await;

    // gpu-a has been NotReady for an hour (as the node lifecycle controller reports it).
    let down = json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown",
        "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "NodeStatusUnknown"}]}});
    nodes
        .patch_status("gpu-a", &PatchParams::default(), &Patch::Merge(&down))
        .await
        .unwrap();
    let mut poke = 0;
    eventually(
        "the group is recreated as llama-0-0-i1 while llama-0-0 hangs in deletion",
        &mut changes,
        TIMEOUT,
        || {
            // The node lifecycle controller marks the pod not ready, which wakes the operator.
            poke += 1;
            let pod_api = pod_api.clone();
            async move {
                let note = json!({"metadata": {"annotations": {"test.parallax.dev/poke": poke.to_string()}}});
                let _ = pod_api
                    .patch("llama-0-0", &PatchParams::default(), &Patch::Merge(&note))
                    .await;
                let old = pod_api.get_opt("llama-0-0").await.unwrap();
                let new = pod_api.get_opt("llama-0-0-i1").await.unwrap();
                old.is_some_and(|p| p.metadata.deletion_timestamp.is_some()) && new.is_some()
            }
        },
    )
    .await;
    let new = pod_api.get("llama-0-0-i1").await.unwrap();
    assert_eq!(new.labels()["parallax.dev/incarnation"], "1");
    assert!(
        recorded(&server, "GroupRescheduled", "group 0"),
        "{:?}",
        events(&server)
    );

    // The new incarnation serves; the old pod does not count.
    mark_pods_ready(&client).await;
    eventually("the pool is ready again", &mut changes, TIMEOUT, || async {
        current_pool(&client).await.is_some_and(|p| {
            let s = p.status.unwrap_or_default();
            s.replicas == 1 && s.ready_replicas == 1
        })
    })
    .await;
    controller.stop().await;
}
