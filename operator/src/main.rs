//! `parallax-operator`: leader election, the health server, then the controller.

use anyhow::Context as _;
use kube::runtime::events::Reporter;
use parallax_operator::{controller, http, leader};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const USAGE: &str = "usage: parallax-operator [render POOL.yaml [--nodes N] [--gpus-per-node G] [--gpu-memory-mib M]]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("render") => return render(&args[1..]),
        Some(other) => anyhow::bail!("unknown command {other:?}\n{USAGE}"),
    }
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

    // The chart sets the agent image of its version (PARALLAX_AGENT_IMAGE).
    let agent_image = std::env::var("PARALLAX_AGENT_IMAGE")
        .ok()
        .filter(|image| !image.is_empty())
        .unwrap_or_else(parallax_operator::children::default_agent_image);
    let reporter = Reporter {
        controller: "parallax-operator".into(),
        instance: Some(identity.clone()),
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if std::env::var("PARALLAX_LEADER_ELECTION").as_deref() == Ok("false") {
        controller::run(
            client,
            health.metrics.clone(),
            reporter,
            controller::Settings::new(agent_image),
            shutdown,
        )
        .await;
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
        () = controller::run(client, health.metrics.clone(), reporter, controller::Settings::new(agent_image), shutdown) => Ok(()),
        lost = leader::hold(&leases, &settings) => Err(lost).context("stopping: leadership lost"),
    }
}

/// Prints the children of a pool file, sized against assumed nodes (default: 8 × 80 GB GPUs).
fn render(args: &[String]) -> anyhow::Result<()> {
    let mut nodes = parallax_operator::render::AssumedNodes {
        count: 2,
        gpus_per_node: 8,
        gpu_memory_mib: 81559,
    };
    let mut file = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?
                .parse::<u64>()
                .with_context(|| format!("{flag} needs a number"))
        };
        match arg.as_str() {
            "--nodes" => nodes.count = value("--nodes")? as u32,
            "--gpus-per-node" => nodes.gpus_per_node = value("--gpus-per-node")? as u32,
            "--gpu-memory-mib" => nodes.gpu_memory_mib = value("--gpu-memory-mib")?,
            path if file.is_none() && !path.starts_with("--") => file = Some(path.to_owned()),
            other => anyhow::bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let file = file.context(USAGE)?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    print!(
        "{}",
        parallax_operator::render::render(&text, nodes).map_err(anyhow::Error::msg)?
    );
    Ok(())
}
