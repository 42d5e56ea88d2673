//! `reconcile()` against a mocked API server (tower-test): every request it makes is asserted in
//! order — method, path, query, patch type and the body that matters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use parallax_crds::InferencePool;
use parallax_operator::children::ChildBuilder;
use parallax_operator::inventory::GpuInventory;
use parallax_operator::metrics::Metrics;
use parallax_operator::reconcile::{Context, FINALIZER, reconcile};
use parallax_operator::tp;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{self, Handle};

type MockHandle = Handle<Request<Body>, Response<Body>>;

const AGENT_IMAGE: &str = "registry.example/parallax-agent:test";

fn context(nodes: Vec<Node>) -> (Arc<Context>, MockHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (store, mut writer) = reflector::store();
    for node in nodes {
        writer.apply_watcher_event(&watcher::Event::Apply(node));
    }
    let reporter = Reporter {
        controller: "parallax-operator".into(),
        instance: None,
    };
    let ctx = Context {
        client: client.clone(),
        nodes: store,
        recorder: Recorder::new(client, reporter),
        metrics: Arc::new(Metrics::default()),
        agent_image: AGENT_IMAGE.into(),
        agents: parallax_operator::agents::AgentProbe::default(),
        pod_monitors: parallax_operator::monitoring::PodMonitors::off(),
    };
    (Arc::new(ctx), handle)
}

fn gpu_node() -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": "gpu-a", "labels": {"nvidia.com/gpu.memory": "81559"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}}
    }))
    .unwrap()
}

fn pool(spec: Value, finalized: bool) -> InferencePool {
    let finalizers = if finalized {
        json!([FINALIZER])
    } else {
        json!(null)
    };
    serde_json::from_value(json!({
        "apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "uid-1", "generation": 1, "resourceVersion": "7", "finalizers": finalizers},
        "spec": spec,
    }))
    .unwrap()
}

/// One expected request: method, path, query parameters, content type.
struct Expect {
    method: Method,
    path: &'static str,
    query: &'static [(&'static str, &'static str)],
    content_type: Option<&'static str>,
}

const APPLY: &[(&str, &str)] = &[("fieldManager", "parallax-operator"), ("force", "true")];

fn apply(path: &'static str) -> Expect {
    Expect {
        method: Method::PATCH,
        path,
        query: APPLY,
        content_type: Some("application/apply-patch+yaml"),
    }
}

fn event() -> Expect {
    Expect {
        method: Method::POST,
        path: "/apis/events.k8s.io/v1/namespaces/ml/events",
        query: &[],
        content_type: Some("application/json"),
    }
}

/// Answers the next request after checking it against `expect`; returns its JSON body.
async fn next(
    handle: &mut MockHandle,
    expect: Expect,
    reply: impl FnOnce(&Value) -> Value,
) -> Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no request came; expected {} {}",
                expect.method, expect.path
            )
        })
        .expect("the service is alive");
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    assert_eq!(
        (request.method(), request.uri().path()),
        (&expect.method, expect.path),
        "query {query:?}"
    );
    let wanted: BTreeMap<String, String> = expect
        .query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(query, wanted, "query of {} {}", expect.method, expect.path);
    let content_type = request
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    if let Some(ct) = expect.content_type {
        assert_eq!(
            content_type.as_deref(),
            Some(ct),
            "content type of {}",
            expect.path
        );
    }
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let response = reply(&body);
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&response).unwrap()))
            .unwrap(),
    );
    body
}

/// Answers the next request, which must be a GET of `path`, with 404: nothing of that name.
async fn absent(handle: &mut MockHandle, path: &'static str) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request came; expected GET {path}"))
        .expect("the service is alive");
    assert_eq!(
        (request.method(), request.uri().path()),
        (&Method::GET, path)
    );
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "NotFound", "code": 404, "message": "not found"});
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(serde_json::to_vec(&status).unwrap()))
            .unwrap(),
    );
}

/// The pool's serving spec is kept as a ControllerRevision before anything else: listed, and
/// created when absent. Returns the revision created.
async fn revision_kept(handle: &mut MockHandle) -> Value {
    let list = Expect {
        method: Method::GET,
        path: "/apis/apps/v1/namespaces/ml/controllerrevisions",
        query: &[("labelSelector", "parallax.dev/pool=llama")],
        content_type: None,
    };
    next(handle, list, empty_list).await;
    let create = Expect {
        method: Method::POST,
        path: "/apis/apps/v1/namespaces/ml/controllerrevisions",
        query: &[],
        content_type: Some("application/json"),
    };
    let revision = next(handle, create, echo).await;
    assert_eq!(revision["revision"], 1);
    assert_eq!(revision["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert!(
        revision["data"]["model"]["source"].is_string(),
        "{revision}"
    );
    revision
}

fn echo(body: &Value) -> Value {
    body.clone()
}

fn empty_list(_: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []})
}

#[tokio::test]
async fn a_new_pool_gets_its_children_applied_then_its_status() {
    let (ctx, mut handle) = context(vec![gpu_node()]);
    let pool = pool(
        json!({"model": {"source": "/models/llama.gguf"}, "tensorParallelSize": 1, "replicas": 1}),
        true,
    );
    let layout = tp::resolve(
        &pool.spec,
        &GpuInventory::from_nodes(&[gpu_node()], &pool.spec.resources),
    )
    .unwrap();
    let config_name = ChildBuilder::with_agent_image(&pool, &layout, AGENT_IMAGE).config_map_name();
    assert!(config_name.starts_with("llama-agent-"), "{config_name}");
    let server = tokio::spawn(async move {
        revision_kept(&mut handle).await;
        let pods = Expect {
            method: Method::GET,
            path: "/api/v1/namespaces/ml/pods",
            query: &[("labelSelector", "parallax.dev/pool=llama")],
            content_type: None,
        };
        next(&mut handle, pods, empty_list).await;
        // The router's Deployment is read for its pods' readiness (not made yet here): the
        // pool's Service goes to the leaders until a router pod is ready.
        absent(
            &mut handle,
            "/apis/apps/v1/namespaces/ml/deployments/llama-router",
        )
        .await;
        // Each pod template has its configuration, named by its hash. Every child is looked up
        // first: a name held by something the pool does not own is never taken over.
        let cm_path: &'static str =
            Box::leak(format!("/api/v1/namespaces/ml/configmaps/{config_name}").into_boxed_str());
        absent(&mut handle, cm_path).await;
        let cm = next(&mut handle, apply(cm_path), echo).await;
        assert_eq!(
            (cm["apiVersion"].as_str(), cm["kind"].as_str()),
            (Some("v1"), Some("ConfigMap"))
        );
        let config: Value =
            serde_json::from_str(cm["data"]["agent.json"].as_str().unwrap()).unwrap();
        assert_eq!(config["tensorParallelSize"], 1);
        assert_eq!(config["model"]["servedName"], "llama");
        assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        absent(&mut handle, "/api/v1/namespaces/ml/services/llama").await;
        let svc = next(
            &mut handle,
            apply("/api/v1/namespaces/ml/services/llama"),
            echo,
        )
        .await;
        assert_eq!(svc["spec"]["ports"][0]["port"], 8000);
        absent(&mut handle, "/api/v1/namespaces/ml/services/llama-pods").await;
        let headless = next(
            &mut handle,
            apply("/api/v1/namespaces/ml/services/llama-pods"),
            echo,
        )
        .await;
        assert_eq!(headless["spec"]["clusterIP"], "None");
        absent(
            &mut handle,
            "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama",
        )
        .await;
        let pdb = next(
            &mut handle,
            apply("/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama"),
            echo,
        )
        .await;
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        // The router: its leaders' Service, its Deployment, its disruption budget; the pool's
        // Service is its.
        absent(&mut handle, "/api/v1/namespaces/ml/services/llama-leaders").await;
        let leaders = next(
            &mut handle,
            apply("/api/v1/namespaces/ml/services/llama-leaders"),
            echo,
        )
        .await;
        assert_eq!(leaders["spec"]["selector"]["parallax.dev/rank"], "0");
        // The Deployment read at the start of the pass is not read again before its apply.
        let router = next(
            &mut handle,
            apply("/apis/apps/v1/namespaces/ml/deployments/llama-router"),
            echo,
        )
        .await;
        assert_eq!(
            (router["apiVersion"].as_str(), router["kind"].as_str()),
            (Some("apps/v1"), Some("Deployment"))
        );
        absent(
            &mut handle,
            "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama-router",
        )
        .await;
        let router_pdb = next(
            &mut handle,
            apply("/apis/policy/v1/namespaces/ml/poddisruptionbudgets/llama-router"),
            echo,
        )
        .await;
        assert_eq!(
            router_pdb["spec"]["selector"]["matchLabels"],
            json!({"parallax.dev/router": "llama"})
        );
        assert_eq!(
            svc["spec"]["selector"],
            json!({"parallax.dev/pool": "llama", "parallax.dev/rank": "0"})
        );
        assert_eq!(
            router["spec"]["template"]["metadata"]["labels"]["parallax.dev/router"],
            "llama"
        );
        // Pods are created, never applied: one of the same name that is not the pool's fails
        // the create instead of being adopted.
        let create_pod = Expect {
            method: Method::POST,
            path: "/api/v1/namespaces/ml/pods",
            query: &[],
            content_type: Some("application/json"),
        };
        let pod = next(&mut handle, create_pod, echo).await;
        assert_eq!(pod["metadata"]["name"], "llama-0-0");
        assert_eq!(
            pod["spec"]["volumes"][0]["configMap"]["name"],
            cm["metadata"]["name"]
        );
        // Configurations no pod reads any more are looked for (none here).
        let configs = Expect {
            method: Method::GET,
            path: "/api/v1/namespaces/ml/configmaps",
            query: &[("labelSelector", "parallax.dev/pool=llama")],
            content_type: None,
        };
        next(&mut handle, configs, empty_list).await;
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(
            pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "1"
        );
        let created = next(&mut handle, event(), echo).await;
        assert_eq!(created["reason"], "GroupCreated");
        let resolved = next(&mut handle, event(), echo).await;
        assert_eq!(resolved["reason"], "TensorParallelSizeResolved");
        let status_path = Expect {
            method: Method::PATCH,
            path: "/apis/parallax.dev/v1alpha1/namespaces/ml/inferencepools/llama/status",
            query: &[],
            content_type: Some("application/merge-patch+json"),
        };
        let status = next(&mut handle, status_path, |b| {
            let mut pool = json!({"apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "llama", "namespace": "ml"}, "spec": {"model": {"source": "/models/llama.gguf"}}});
            pool["status"] = b["status"].clone();
            pool
        })
        .await;
        let status = &status["status"];
        assert_eq!(status["tensorParallelSize"], 1);
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(
            status["selector"],
            "parallax.dev/pool=llama,parallax.dev/rank=0"
        );
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("GroupsNotReady"))
        );
    });
    let action = reconcile(Arc::new(pool), ctx)
        .await
        .expect("reconcile succeeds");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_pool_without_gpu_nodes_writes_only_a_warning_and_its_status() {
    let (ctx, mut handle) = context(vec![]);
    let pool = pool(
        json!({"model": {"source": "/m.gguf", "shape": {"preset": "llama-3.2-1b"}}}),
        true,
    );
    let server = tokio::spawn(async move {
        revision_kept(&mut handle).await;
        let pods = Expect {
            method: Method::GET,
            path: "/api/v1/namespaces/ml/pods",
            query: &[("labelSelector", "parallax.dev/pool=llama")],
            content_type: None,
        };
        next(&mut handle, pods, empty_list).await;
        absent(
            &mut handle,
            "/apis/apps/v1/namespaces/ml/deployments/llama-router",
        )
        .await;
        let warning = next(&mut handle, event(), echo).await;
        assert_eq!(
            (warning["type"].as_str(), warning["reason"].as_str()),
            (Some("Warning"), Some("NoGpuNodes"))
        );
        let status_path = Expect {
            method: Method::PATCH,
            path: "/apis/parallax.dev/v1alpha1/namespaces/ml/inferencepools/llama/status",
            query: &[],
            content_type: Some("application/merge-patch+json"),
        };
        let body = next(&mut handle, status_path, |b| json!({"apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "llama"}, "spec": {"model": {"source": "/m.gguf"}}, "status": b["status"]})).await;
        let ready = body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("NoGpuNodes"))
        );
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("allocatable nvidia.com/gpu")
        );
    });
    let action = reconcile(Arc::new(pool), ctx)
        .await
        .expect("reconcile succeeds");
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(30)),
        "layout failures are retried soon"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_pool_without_the_finalizer_only_gets_it_added() {
    let (ctx, mut handle) = context(vec![gpu_node()]);
    let pool = pool(
        json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 1}),
        false,
    );
    let server = tokio::spawn(async move {
        let patch = Expect {
            method: Method::PATCH,
            path: "/apis/parallax.dev/v1alpha1/namespaces/ml/inferencepools/llama",
            query: &[],
            content_type: Some("application/json-patch+json"),
        };
        let body = next(&mut handle, patch, |_| json!({"apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "llama", "finalizers": [FINALIZER]}, "spec": {"model": {"source": "/m.gguf"}}})).await;
        assert_eq!(
            body[1],
            json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]})
        );
    });
    let action = reconcile(Arc::new(pool), ctx)
        .await
        .expect("reconcile succeeds");
    assert_eq!(action, Action::await_change());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}
