//! `parallax-operator`: leader election, the health server, then the controller.

use anyhow::Context as _;
use kube::runtime::events::Reporter;
use parallax_operator::{controller, http, leader};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const USAGE: &str = "usage: parallax-operator [render POOL.yaml [--nodes N] [--gpus-per-node G] [--gpu-memory-mib M]]\n       parallax-operator simulate --trace FILE [--pool POOL.yaml] [--replica-rps R] [--startup-s S] [--slo-p95-ms M] [--json] [--plot FILE.png]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("render") => return render(&args[1..]),
        Some("simulate") => return simulate(&args[1..]),
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

    // The pools' PodMonitors (the chart's `monitoring` values): refused by name before anything
    // starts.
    let pod_monitors =
        parallax_operator::monitoring::PodMonitorSettings::from_env(|key| std::env::var(key).ok())
            .map_err(anyhow::Error::msg)?;

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
    let controller_settings = controller::Settings {
        pod_monitors,
        ..controller::Settings::new(agent_image)
    };
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
            controller_settings,
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
        () = controller::run(client, health.metrics.clone(), reporter, controller_settings, shutdown) => Ok(()),
        lost = leader::hold(&leases, &settings) => Err(lost).context("stopping: leadership lost"),
    }
}

/// Replays a trace through every autoscaling policy and prints what each costs and misses.
fn simulate(args: &[String]) -> anyhow::Result<()> {
    use parallax_operator::autoscale::reactive::Rules;
    use parallax_operator::autoscale::simulate::{Setup, Trace, compare};
    let (mut trace, mut pool, mut replica_rps, mut json) = (None, None, None, false);
    let mut plot = None;
    let (mut startup_s, mut slo_ms) = (180.0, 300.0);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let number = |flag: &str, text: String| {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .with_context(|| format!("{flag} needs a positive number, not {text:?}"))
        };
        match arg.as_str() {
            "--trace" => trace = Some(value("--trace")?),
            "--pool" => pool = Some(value("--pool")?),
            "--replica-rps" => {
                replica_rps = Some(number("--replica-rps", value("--replica-rps")?)?)
            }
            "--startup-s" => startup_s = number("--startup-s", value("--startup-s")?)?,
            "--slo-p95-ms" => slo_ms = number("--slo-p95-ms", value("--slo-p95-ms")?)?,
            "--json" => json = true,
            "--plot" => plot = Some(value("--plot")?),
            other => anyhow::bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let path = trace.context(USAGE)?;
    let trace =
        Trace::parse(&std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?)
            .with_context(|| format!("the trace {path}"))?;
    let mut rules = Rules {
        max_replicas: u32::MAX,
        ..Rules::default()
    };
    let mut gpus_per_group = 1;
    if let Some(pool) = pool {
        let pool: parallax_crds::InferencePool = serde_yaml::from_str(
            &std::fs::read_to_string(&pool).with_context(|| format!("reading {pool}"))?,
        )
        .with_context(|| format!("{pool} is not an InferencePool"))?;
        rules.min_replicas = pool.spec.min_replicas.max(0) as u32;
        rules.max_replicas = pool.spec.max_replicas.max(0) as u32;
        if let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) =
            pool.spec.tensor_parallel_size
        {
            gpus_per_group = n.max(1) as u32;
        }
    }
    // Without a capacity, one that needs ten groups at the trace's peak.
    let replica_rps = replica_rps.unwrap_or(trace.peak() / 10.0).max(1e-9);
    let setup = Setup {
        replica_rps,
        startup_s,
        drain_s: 30.0,
        slo_p95_s: slo_ms / 1e3,
        base_p95_s: 0.1,
        gpus_per_group,
        lead_s: 300.0,
        rules,
    };
    let reports = compare(&trace, &setup);
    if let Some(file) = plot {
        let name = std::path::Path::new(&path)
            .file_name()
            .map_or(path.clone(), |n| n.to_string_lossy().into_owned());
        let image = parallax_operator::autoscale::plot::draw(&reports, &name);
        std::fs::write(&file, image).with_context(|| format!("writing {file}"))?;
    }
    if json {
        for report in &reports {
            println!("{}", serde_json::to_string(report)?);
        }
        return Ok(());
    }
    println!(
        "{path}: {:.1} h, peak {:.2} req/s; {replica_rps:.2} req/s per group, startup {startup_s} s, SLO p95 {slo_ms} ms",
        trace.duration() / 3600.0,
        trace.peak()
    );
    println!(
        "{:<22}{:>11}{:>8}{:>10}{:>9}{:>9}{:>8}",
        "policy", "GPU-hours", "saved", "SLO miss", "MAPE", "naive", "events"
    );
    let percent = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0));
    for r in &reports {
        println!(
            "{:<22}{:>11.1}{:>8}{:>10}{:>9}{:>9}{:>8}",
            r.policy,
            r.gpu_hours,
            percent(Some(r.saved_fraction)),
            percent(Some(r.slo_miss_fraction)),
            percent(r.forecast_mape),
            percent(r.naive_mape),
            r.scale_events
        );
    }
    Ok(())
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
