//! `parallax-operator`: leader election, the health server, then the controller.

use anyhow::Context as _;
use kube::runtime::events::Reporter;
use parallax_operator::{controller, http, leader};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("PARALLAX_LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().init()
    } else {
        logs.init()
    }

    let address = std::env::var("PARALLAX_HTTP_ADDRESS").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("parallax-operator-{}", std::process::id()));
    let health = Arc::new(http::Health::default());
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tokio::spawn(axum::serve(listener, http::router(health.clone())).into_future());

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    client
        .apiserver_version()
        .await
        .context("the API server did not answer")?;
    health.ready.store(true, Ordering::Relaxed);

    let reporter = Reporter {
        controller: "parallax-operator".into(),
        instance: Some(identity.clone()),
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if std::env::var("PARALLAX_LEADER_ELECTION").as_deref() == Ok("false") {
        controller::run(client, health.metrics.clone(), reporter, shutdown).await;
        return Ok(());
    }
    let settings = leader::LeaseSettings {
        name: "parallax-operator-leader".into(),
        namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into()),
        identity,
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    let leases = kube::Api::namespaced(client.clone(), &settings.namespace);
    leader::acquire(&leases, &settings).await?;
    health.metrics.leader.set(1);
    tokio::select! {
        () = controller::run(client, health.metrics.clone(), reporter, shutdown) => Ok(()),
        lost = leader::hold(&leases, &settings) => Err(lost).context("stopping: leadership lost"),
    }
}
