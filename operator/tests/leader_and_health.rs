//! Leader election against the fake API server, and the operator's HTTP endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use parallax_operator::http::{Health, router};
use parallax_operator::leader::{LeaseSettings, try_acquire_or_renew};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::fake_api::FakeApiServer;
use tower::ServiceExt;

fn settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: "parallax-operator-leader".into(),
        namespace: "parallax-system".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn one_candidate_wins_and_keeps_the_lease() {
    let server = FakeApiServer::default();
    let leases: Api<Lease> = Api::namespaced(server.client(), "parallax-system");
    assert!(
        try_acquire_or_renew(&leases, &settings("a")).await.unwrap(),
        "the first candidate creates the lease"
    );
    assert!(
        !try_acquire_or_renew(&leases, &settings("b")).await.unwrap(),
        "a live claim keeps others out"
    );
    assert!(
        try_acquire_or_renew(&leases, &settings("a")).await.unwrap(),
        "the holder renews"
    );
    let lease = leases
        .get("parallax-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("a"));
    assert_eq!(lease.lease_duration_seconds, Some(15));
}

#[tokio::test]
async fn a_stale_write_loses_to_a_concurrent_one() {
    let server = FakeApiServer::default();
    let leases: Api<Lease> = Api::namespaced(server.client(), "parallax-system");
    assert!(try_acquire_or_renew(&leases, &settings("a")).await.unwrap());
    // Someone else replaces the lease with an expired claim: the resourceVersion moves on.
    let mut lease = leases.get("parallax-operator-leader").await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("c".into());
    spec.renew_time = Some(MicroTime(Timestamp::UNIX_EPOCH));
    leases
        .replace("parallax-operator-leader", &Default::default(), &lease)
        .await
        .unwrap();
    // The expired claim is taken over, and the transition counted.
    assert!(try_acquire_or_renew(&leases, &settings("b")).await.unwrap());
    let spec = leases
        .get("parallax-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_transitions),
        (Some("b"), Some(1))
    );
}

async fn get(app: axum::Router, path: &str) -> (u16, String) {
    let response = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let health = Arc::new(Health::default());
    assert_eq!(get(router(health.clone()), "/healthz").await.0, 200);
    assert_eq!(
        get(router(health.clone()), "/readyz").await.0,
        503,
        "not ready before start-up ends"
    );
    health.ready.store(true, Ordering::Relaxed);
    assert_eq!(get(router(health.clone()), "/readyz").await.0, 200);

    drop(health.metrics.reconcile_started());
    health.metrics.reconcile_failed("conflict");
    let (status, text) = get(router(health), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("parallax_operator_reconciliations_total 1"),
        "{text}"
    );
    assert!(
        text.contains("parallax_operator_reconcile_errors_total{category=\"conflict\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("parallax_operator_reconcile_duration_seconds_count 1"),
        "{text}"
    );
}
