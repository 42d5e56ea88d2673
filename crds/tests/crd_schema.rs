//! The committed CRD matches the types, and its CEL rules accept and refuse what they should,
//! evaluated by kube's client-side CEL validator against the generated schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::core::cel::validate_cel;
use parallax_crds::{CRD_PATH, InferencePool, crd_yaml};
use serde_json::{Value, json};

#[test]
fn committed_crd_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_PATH);
    let committed = std::fs::read_to_string(&path).expect("the CRD file is committed");
    assert!(
        committed == crd_yaml(),
        "{CRD_PATH} is stale: run `cargo run -p parallax-crds --bin crdgen` and commit the result"
    );
}

fn pool(spec: Value) -> InferencePool {
    serde_json::from_value(json!({
        "apiVersion": "parallax.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": spec,
    }))
    .expect("spec deserializes")
}

fn errors(spec: Value) -> Vec<String> {
    match validate_cel(&pool(spec)) {
        Ok(()) => Vec::new(),
        Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_refused(spec: Value, message: &str) {
    let errors = errors(spec.clone());
    assert!(
        errors.iter().any(|e| e.contains(message)),
        "expected an error containing {message:?} for {spec}, got {errors:?}"
    );
}

fn shaped() -> Value {
    json!({"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "shape": {"preset": "llama-3.1-8b"}})
}

#[test]
fn a_minimal_pool_with_defaults_is_accepted() {
    assert_eq!(errors(json!({"model": shaped()})), Vec::<String>::new());
    assert_eq!(
        errors(json!({"model": {"source": "/models/m.gguf"}, "tensorParallelSize": 4})),
        Vec::<String>::new()
    );
}

#[test]
fn the_agents_environment_may_not_set_the_operators_names() {
    let with_env = |name: &str| {
        json!({"model": shaped(), "agent": {"env": [
            {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}, {"name": name, "value": "x"}]}})
    };
    assert_eq!(errors(with_env("HTTPS_PROXY")), Vec::<String>::new());
    for name in [
        "PARALLAX_RANK",
        "PARALLAX_COLLECTIVE",
        "POD_NAME",
        "POD_NAMESPACE",
        "HF_TOKEN",
    ] {
        assert_refused(with_env(name), "agent.env must not set PARALLAX_*");
    }
}

#[test]
fn scale_to_zero_needs_a_floor_of_zero_and_the_router() {
    let zero = |min: i32, router: bool| {
        json!({"model": shaped(), "replicas": 1, "minReplicas": min,
            "autoscaling": {"enabled": true, "scaleToZeroAfterSeconds": 600},
            "router": {"enabled": router}})
    };
    assert_eq!(errors(zero(0, true)), Vec::<String>::new());
    let message = "autoscaling.scaleToZeroAfterSeconds needs minReplicas 0 and the router";
    assert_refused(zero(1, true), message);
    assert_refused(zero(0, false), message);
}

#[test]
fn replica_bounds_are_enforced() {
    assert_refused(
        json!({"model": shaped(), "minReplicas": 3, "maxReplicas": 2, "replicas": 2}),
        "minReplicas must not exceed maxReplicas",
    );
    assert_refused(
        json!({"model": shaped(), "minReplicas": 1, "maxReplicas": 4, "replicas": 5}),
        "replicas must lie between minReplicas and maxReplicas",
    );
    assert_refused(
        json!({"model": shaped(), "minReplicas": 2, "maxReplicas": 4, "replicas": 1}),
        "replicas must lie between minReplicas and maxReplicas",
    );
}

#[test]
fn tensor_parallel_size_is_a_power_of_two_or_auto() {
    for ok in [json!(1), json!(8), json!("auto")] {
        assert_eq!(
            errors(json!({"model": shaped(), "tensorParallelSize": ok})),
            Vec::<String>::new(),
            "{ok} was refused"
        );
    }
    for bad in [json!(3), json!(0), json!(128), json!("max")] {
        assert_refused(
            json!({"model": shaped(), "tensorParallelSize": bad}),
            "tensorParallelSize must be auto or a power of two",
        );
    }
}

#[test]
fn tensor_parallel_size_is_never_stored_as_null() {
    // A null is pruned from a field that is not nullable, and the API server's default (auto)
    // fills it: the operator never reads a pool without a size.
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(InferencePool::crd()).unwrap();
    let field = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["tensorParallelSize"];
    assert_eq!(field["nullable"], json!(false), "{field}");
    assert_eq!(field["default"], json!("auto"));
}

#[test]
fn auto_tensor_parallelism_needs_a_model_shape() {
    assert_refused(
        json!({"model": {"source": "/models/m.gguf"}}),
        "tensorParallelSize auto needs model.shape",
    );
    assert_refused(
        json!({"model": {"source": "/m.gguf", "shape": {"layers": 2}}, "tensorParallelSize": 1}),
        "model.shape needs a preset, or weightBytes, layers and hiddenSize",
    );
}

#[test]
fn bins_must_be_ordered_and_batch_ranges_consistent() {
    let bins = |fast: i32, medium: i32| {
        json!({"fast": {"maxExecutionTimeMs": fast, "minBatchSize": 1, "maxBatchSize": 8, "weight": 3},
               "medium": {"maxExecutionTimeMs": medium, "minBatchSize": 1, "maxBatchSize": 8, "weight": 2},
               "slow": {"minBatchSize": 9, "maxBatchSize": 8, "weight": 1}})
    };
    let errs = errors(json!({"model": shaped(), "batching": {"bins": bins(600, 500)}}));
    assert!(
        errs.iter().any(|e| e.contains("bins must be ordered")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("minBatchSize must not exceed")),
        "{errs:?}"
    );
    // Both bounds or neither: alone, one would be compared with a bound that moves.
    let mut one = bins(100, 500);
    one["medium"]
        .as_object_mut()
        .unwrap()
        .remove("maxExecutionTimeMs");
    one["slow"]["minBatchSize"] = json!(1);
    assert_refused(
        json!({"model": shaped(), "batching": {"bins": one.clone()}}),
        "set both fast.maxExecutionTimeMs and medium.maxExecutionTimeMs",
    );
    one["fast"]
        .as_object_mut()
        .unwrap()
        .remove("maxExecutionTimeMs");
    assert_eq!(
        errors(json!({"model": shaped(), "batching": {"bins": one}})),
        Vec::<String>::new()
    );
}

#[test]
fn rollout_bounds_are_counts_or_percentages_and_not_both_zero() {
    let with = |rollout: Value| json!({"model": shaped(), "rollout": rollout});
    assert_eq!(
        errors(with(json!({"maxSurge": 1, "maxUnavailable": 0}))),
        Vec::<String>::new()
    );
    assert_eq!(
        errors(with(json!({"maxSurge": "25%", "maxUnavailable": "0%"}))),
        Vec::<String>::new()
    );
    assert_refused(
        with(json!({"maxSurge": "a lot"})),
        "must be a non-negative number of groups or a percentage",
    );
    assert_refused(
        with(json!({"maxUnavailable": -1})),
        "must be a non-negative number of groups or a percentage",
    );
    assert_refused(
        with(json!({"maxSurge": 0, "maxUnavailable": "0%"})),
        "cannot both be 0",
    );
    // Defaults: no surge, one group at a time.
    let defaults = pool(json!({"model": shaped()})).spec.rollout;
    assert_eq!(defaults.resolve(4), (0, 1));
    let percent = pool(with(json!({"maxSurge": "25%", "maxUnavailable": "25%"})))
        .spec
        .rollout;
    assert_eq!(
        percent.resolve(1),
        (1, 0),
        "surge rounds up, unavailable down"
    );
    assert_eq!(percent.resolve(8), (2, 2));
}

#[test]
fn memory_fraction_and_block_size_are_bounded() {
    for bad in [0.0, 1.5, -0.1] {
        assert_refused(
            json!({"model": shaped(), "kvCache": {"gpuMemoryFraction": bad}}),
            "gpuMemoryFraction must be in (0, 1]",
        );
    }
    assert_eq!(
        errors(json!({"model": shaped(), "kvCache": {"gpuMemoryFraction": 1.0}})),
        Vec::<String>::new()
    );
    assert_refused(
        json!({"model": shaped(), "kvCache": {"blockSize": 12}}),
        "blockSize must be one of",
    );
}

#[test]
fn documented_examples_are_valid_pools() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("docs/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let pool: InferencePool =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(errors) = validate_cel(&pool) {
                panic!("{} breaks CEL rules: {errors:?}", path.display());
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the two documented examples, found {seen}"
    );
}

#[test]
fn a_prometheus_metrics_source_must_be_reached_over_http() {
    let source = |url: &str| {
        json!({"model": shaped(), "autoscaling": {"enabled": true,
            "metricsSource": {"prometheus": {"url": url}}}})
    };
    assert_refused(
        source("https://prometheus.monitoring:9090"),
        "metricsSource.prometheus.url must be an http:// URL",
    );
    assert!(
        errors(source("http://prometheus.monitoring:9090")).is_empty(),
        "an http URL is accepted"
    );
}
