//! Runs the operator's controller in-process against the cluster `KUBECONFIG` points at: the CRD
//! is applied, a pool created in a fresh namespace, its children and status checked, and the
//! namespace removed. Without `KUBECONFIG` every test says it was skipped and passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Client, CustomResourceExt};
use parallax_crds::InferencePool;
use parallax_operator::{controller, metrics::Metrics};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cluster_configured() -> bool {
    if std::env::var_os("KUBECONFIG").is_some() {
        return true;
    }
    eprintln!(
        "SKIPPED: KUBECONFIG is not set; tests/e2e needs a real cluster (e.g. kind) and did not run"
    );
    false
}

/// Polls a real cluster: there is no change feed to wait on from here, so a short interval
/// bounded by `timeout` is the condition wait.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_pool_gets_children_and_status_on_a_real_cluster() {
    if !cluster_configured() {
        return;
    }
    let client = Client::try_default().await.expect("KUBECONFIG is usable");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "inferencepools.parallax.dev",
        &PatchParams::apply("parallax-e2e").force(),
        &Patch::Apply(InferencePool::crd()),
    )
    .await
    .expect("the CRD applies");
    wait_for(
        "the CRD is established",
        Duration::from_secs(60),
        || async {
            crds.get("inferencepools.parallax.dev")
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await;

    let namespace = format!("parallax-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .unwrap();

    let reporter = Reporter {
        controller: "parallax-operator-e2e".into(),
        instance: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(controller::run(
        client.clone(),
        Arc::new(Metrics::default()),
        reporter,
        controller::Settings::new(
            std::env::var("PARALLAX_AGENT_IMAGE")
                .unwrap_or_else(|_| parallax_operator::children::default_agent_image()),
        ),
        async {
            let _ = stopped.await;
        },
    ));

    let pools: Api<InferencePool> = Api::namespaced(client.clone(), &namespace);
    let pool: InferencePool = serde_json::from_value(json!({
        "apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "e2e"},
        "spec": {"model": {"source": "/models/smollm2.gguf"}, "tensorParallelSize": 1, "replicas": 1}
    }))
    .unwrap();
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("the pool is accepted");

    // The API server's CEL rules refuse bad specs with their messages.
    let bad: InferencePool = serde_json::from_value(json!({
        "apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "bad"},
        "spec": {"model": {"source": "/m.gguf"}, "tensorParallelSize": 3}
    }))
    .unwrap();
    let refused = pools
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("TP 3 is refused");
    assert!(refused.to_string().contains("power of two"), "{refused}");

    wait_for(
        "pod, Services, router and ConfigMap exist and status is written",
        Duration::from_secs(120),
        || async {
            let pods = Api::<Pod>::namespaced(client.clone(), &namespace)
                .list(&ListParams::default().labels("parallax.dev/pool=e2e"))
                .await
                .map(|l| l.items.len())
                .unwrap_or(0);
            let svc = Api::<Service>::namespaced(client.clone(), &namespace)
                .get_opt("e2e")
                .await
                .ok()
                .flatten()
                .is_some();
            // The router's Deployment, as the real API server's schema took it.
            let router = Api::<Deployment>::namespaced(client.clone(), &namespace)
                .get_opt("e2e-router")
                .await
                .ok()
                .flatten()
                .is_some();
            let cm = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
                .list(&ListParams::default().labels("parallax.dev/pool=e2e"))
                .await
                .is_ok_and(|list| !list.items.is_empty());
            let status = pools
                .get("e2e")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready"));
            pods == 1 && svc && router && cm && status
        },
    )
    .await;

    // The scale subresource moves spec.replicas.
    let scale = json!({"spec": {"replicas": 2}});
    pools
        .patch_scale("e2e", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("scale subresource");
    assert_eq!(pools.get("e2e").await.unwrap().spec.replicas, 2);

    // Where the Prometheus Operator is installed, the pool's agents get a PodMonitor that its
    // API server (and schema) accepted.
    if parallax_operator::monitoring::served(&client)
        .await
        .unwrap()
    {
        let monitors: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &namespace,
            &parallax_operator::monitoring::resource(),
        );
        wait_for(
            "the pool's PodMonitor",
            Duration::from_secs(120),
            || async {
                monitors
                    .get_opt("e2e-agents")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|m| {
                        m.data["spec"]["selector"]["matchLabels"]["parallax.dev/pool"] == "e2e"
                    })
            },
        )
        .await;
    } else {
        eprintln!("the cluster serves no PodMonitor: the pool's is not checked");
    }

    // As a LeaderWorkerSet: where LWS is installed its API server (and webhook) takes the one
    // the operator renders; where it is not, the pool says what is missing.
    let lws_installed = crds
        .get_opt("leaderworkersets.leaderworkerset.x-k8s.io")
        .await
        .unwrap()
        .is_some();
    let to_lws = json!({"spec": {"groupWorkload": "leaderworkerset"}});
    pools
        .patch("e2e", &PatchParams::default(), &Patch::Merge(&to_lws))
        .await
        .expect("groupWorkload is accepted");
    let lws_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &parallax_operator::lws::resource(),
    );
    wait_for(
        if lws_installed {
            "a LeaderWorkerSet of two groups"
        } else {
            "Degraded says LeaderWorkerSet is missing"
        },
        Duration::from_secs(120),
        || async {
            if lws_installed {
                lws_api
                    .get_opt("e2e-groups")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|lws| lws.data["spec"]["replicas"] == 2)
            } else {
                pools
                    .get("e2e")
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Degraded" && c.reason == "LeaderWorkerSetMissing")
                    })
            }
        },
    )
    .await;

    pools.delete("e2e", &DeleteParams::default()).await.unwrap();
    wait_for("the pool is gone", Duration::from_secs(120), || async {
        pools.get_opt("e2e").await.ok().flatten().is_none()
    })
    .await;
    stop.send(()).ok();
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .ok();
}
