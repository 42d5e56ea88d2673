//! `serve`: the OpenAI-compatible server over the engine, configured by flags or by the
//! operator's agent configuration file.

use super::EngineArgs;
use crate::engine::ModelFiles;
use crate::engine::parallel::{group, link};
use crate::engine::scheduling::admission::{Bin, BinShare};
use crate::engine::{BackendKind, KvCacheType, Precision};
use crate::hub::HubModel;
use crate::server::prediction::{BinBounds, Binning};
use crate::server::{self, Server, ServerConfig};
use anyhow::{Context, bail};
use clap::Args;
use parallax_crds::agent_config::served_name_of;
use parallax_crds::inference_pool::{KvCacheDtype, ModelFormat};
use parallax_crds::{AGENT_GROUP_PORT, AgentConfig};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// An agent configuration file (the operator mounts one): model, served name, port, batch
    /// size and KV block size. --model, --port and --served-model-name override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (default 8000).
    #[arg(long)]
    pub port: Option<u16>,
    /// The model's name in the API (default: the model file's name without `.gguf`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds requests in flight may run on after SIGTERM/SIGINT before they are ended.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Most requests waiting to start; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue_requests: usize,
    /// Most prompt tokens waiting to start; more are refused with 429 and Retry-After.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_queue_tokens: usize,
    /// Default X-Max-Wait-Time (milliseconds): how long `X-Batch-Preference: enable` waits for a
    /// batch to join.
    #[arg(long, default_value_t = 50)]
    pub max_wait_ms: u64,
    /// Refuse (400, naming it) a request field no API defines, instead of ignoring it with a
    /// warning as vLLM does.
    #[arg(long)]
    pub strict_request_fields: bool,
    /// Requests predicted to run under this many milliseconds are in the fast bin (with
    /// --medium-bin-ms). Without both, the bounds adapt to the traffic: the natural breaks of
    /// recent predicted times.
    #[arg(long, requires = "medium_bin_ms")]
    pub fast_bin_ms: Option<u64>,
    /// Requests predicted under this many milliseconds (and not fast) are in the medium bin;
    /// the rest are slow (with --fast-bin-ms).
    #[arg(long, requires = "fast_bin_ms")]
    pub medium_bin_ms: Option<u64>,
    /// This pod's rank in its multi-pod tensor-parallel group (the operator sets PARALLAX_RANK):
    /// rank 0 leads — it serves the API, schedules and commands the others — and the others
    /// hold their shards and follow.
    #[arg(long, env = "PARALLAX_RANK", default_value_t = 0)]
    pub group_rank: usize,
    /// Pods (processes) in the group (PARALLAX_WORLD_SIZE); the tensor-parallel ranks are split
    /// evenly over them. 1: this process holds every rank.
    #[arg(long, env = "PARALLAX_WORLD_SIZE", default_value_t = 1)]
    pub group_size: usize,
    /// The leader's address, `HOST` or `HOST:PORT` (PARALLAX_LEADER_ADDRESS): where the other
    /// ranks connect (on --group-port unless a port is given).
    #[arg(long, env = "PARALLAX_LEADER_ADDRESS")]
    pub group_leader: Option<String>,
    /// Port the group's leader accepts the other pods on (on --host).
    #[arg(long, default_value_t = AGENT_GROUP_PORT)]
    pub group_port: u16,
    /// The group's tensor-parallel size as the operator sized its GPUs
    /// (PARALLAX_TENSOR_PARALLEL_SIZE): serve refuses to start with another.
    #[arg(long, env = "PARALLAX_TENSOR_PARALLEL_SIZE", hide = true)]
    pub sized_tensor_parallel_size: Option<usize>,
    /// Where this pod stands, as the operator names it (PARALLAX_POOL, PARALLAX_GROUP, POD_NAME,
    /// POD_NAMESPACE): logged at start, so that a pod's logs say which group they come from.
    #[arg(long, env = "PARALLAX_POOL", hide = true)]
    pub pool: Option<String>,
    #[arg(long, env = "PARALLAX_GROUP", hide = true)]
    pub group: Option<String>,
    #[arg(long, env = "POD_NAME", hide = true)]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,
    #[command(flatten)]
    pub gpu: super::GpuArgs,
}

/// This process's part in its tensor-parallel group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupRole {
    /// Every rank is here (threads, one GPU each).
    Whole,
    /// Pod rank 0 of `pods`: serves the API and commands the others.
    Leader { pods: usize },
    /// Pod rank `rank` of `pods`: follows the leader at `leader` (`HOST:PORT`).
    Worker {
        rank: usize,
        pods: usize,
        leader: String,
    },
}

/// `host` with `port` unless it names one already (`HOST:PORT`, `[V6]:PORT`).
fn with_port(host: &str, port: u16) -> String {
    let has_port = match host.rsplit_once(':') {
        Some((name, p)) => p.parse::<u16>().is_ok() && (!name.contains(':') || name.ends_with(']')),
        None => false,
    };
    match (has_port, host.contains(':')) {
        (true, _) => host.to_owned(),
        (false, true) => format!("[{host}]:{port}"),
        (false, false) => format!("{host}:{port}"),
    }
}

/// Fixed bounds from two millisecond values, or adaptive ones from none.
fn binning(fast_ms: Option<u64>, medium_ms: Option<u64>) -> anyhow::Result<Binning> {
    match (fast_ms, medium_ms) {
        (None, None) => Ok(Binning::Adaptive),
        (Some(fast), Some(medium)) if fast < medium => Ok(Binning::Fixed(BinBounds {
            fast: Duration::from_millis(fast),
            medium: Duration::from_millis(medium),
        })),
        (Some(_), Some(_)) => bail!("the fast bin's bound must be below the medium bin's"),
        _ => bail!("give both bin bounds (fast and medium) or neither"),
    }
}

impl ServeArgs {
    /// The engine options, the port and the server's configuration (the served name with it),
    /// with the configuration file applied.
    fn resolve(&self) -> anyhow::Result<(EngineArgs, u16, ServerConfig)> {
        let mut engine = self.engine.clone();
        let mut served = self.served_model_name.clone();
        let mut port = self.port;
        let mut server = ServerConfig {
            served_name: String::new(),
            max_body_bytes: self.max_body_bytes,
            shutdown_timeout: Duration::from_secs_f64(self.shutdown_timeout.max(0.0)),
            max_queue_requests: self.max_queue_requests,
            max_queue_tokens: self.max_queue_tokens,
            default_max_wait: Duration::from_millis(self.max_wait_ms),
            bins: binning(self.fast_bin_ms, self.medium_bin_ms)?,
            strict_request_fields: self.strict_request_fields,
        };
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let config: AgentConfig = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a valid agent configuration", path.display())
            })?;
            engine
                .tensor_parallel_size
                .get_or_insert(config.tensor_parallel_size as usize);
            engine.model.get_or_insert(config.model.source);
            served.get_or_insert(config.model.served_name);
            port.get_or_insert(config.port);
            // Flags win over the file, the file over the hardware profile.
            engine.max_num_seqs.get_or_insert(
                usize::try_from(config.batching.max_batch_size)
                    .context("batching.maxBatchSize must be positive")?,
            );
            engine.block_size.get_or_insert(
                usize::try_from(config.kv_cache.block_size)
                    .context("kvCache.blockSize must be positive")?,
            );
            engine
                .gpu_memory_utilization
                .get_or_insert(config.kv_cache.gpu_memory_fraction);
            let bins = &config.batching.bins;
            let count = |n: i32| usize::try_from(n).unwrap_or(0);
            let weight = |n: i32| u32::try_from(n).unwrap_or(1);
            engine.bin_shares = vec![
                (
                    Bin::Fast,
                    BinShare {
                        min: count(bins.fast.min_batch_size),
                        max: count(bins.fast.max_batch_size),
                        weight: weight(bins.fast.weight),
                    },
                ),
                (
                    Bin::Medium,
                    BinShare {
                        min: count(bins.medium.min_batch_size),
                        max: count(bins.medium.max_batch_size),
                        weight: weight(bins.medium.weight),
                    },
                ),
                (
                    Bin::Slow,
                    BinShare {
                        min: count(bins.slow.min_batch_size),
                        max: count(bins.slow.max_batch_size),
                        weight: weight(bins.slow.weight),
                    },
                ),
            ];
            let millis = |ms: i32| u64::try_from(ms).unwrap_or(0);
            server.default_max_wait =
                Duration::from_millis(millis(config.batching.batch_timeout_ms));
            if self.fast_bin_ms.is_none() {
                server.bins = binning(
                    bins.fast.max_execution_time_ms.map(millis),
                    bins.medium.max_execution_time_ms.map(millis),
                )
                .context("batching.bins")?;
            }
            engine.no_enable_prefix_caching |= !config.kv_cache.prefix_caching;
            kv_cache_dtype(config.kv_cache.dtype, &engine)?;
            model_format(config.model.format, engine.model()?)?;
        }
        let model = engine.model()?.to_owned();
        if let Some(hub) = HubModel::parse(&model) {
            hub?;
        }
        engine.config(&engine.profile()?)?;
        if let Some(sized) = self.sized_tensor_parallel_size
            && sized != engine.tensor_parallel_size()
        {
            bail!(
                "tensor parallel size {} differs from the {sized} this pod's GPUs were sized for (PARALLAX_TENSOR_PARALLEL_SIZE): drop -t from the pool's agent.extraArgs",
                engine.tensor_parallel_size()
            );
        }
        if !(self.shutdown_timeout >= 0.0 && self.shutdown_timeout.is_finite()) {
            bail!("--shutdown-timeout must be a number of seconds ≥ 0");
        }
        server.served_name = served.unwrap_or_else(|| served_name_of(&model));
        Ok((
            engine,
            port.unwrap_or(parallax_crds::agent_config::AGENT_HTTP_PORT),
            server,
        ))
    }
}

/// `kvCache.dtype`: the KV cache holds the engine's activation type (`--dtype`); a pool may name
/// it, not change it.
fn kv_cache_dtype(dtype: KvCacheDtype, engine: &EngineArgs) -> anyhow::Result<()> {
    let backend = engine.backend();
    let engine_type = match (backend.resolved_kind(), backend.resolved_precision()) {
        _ if backend.kv_cache == KvCacheType::Int8 => "int8",
        (BackendKind::Int8, _) | (_, Precision::F32) => "f32",
        (_, Precision::F16) => "f16",
        (_, Precision::Bf16) => "bf16",
    };
    let asked = match dtype {
        KvCacheDtype::Auto => return Ok(()),
        KvCacheDtype::F16 => "f16",
        KvCacheDtype::Bf16 => "bf16",
    };
    if asked != engine_type {
        bail!(
            "kvCache.dtype {asked} is not supported: this agent keeps the KV cache in the engine's own type ({engine_type} here, set by --dtype and --kv-cache-dtype); use kvCache.dtype auto"
        );
    }
    Ok(())
}

/// `model.format`: it must describe the source (a `.gguf` file is GGUF, a folder or a hub
/// repository safetensors).
fn model_format(format: ModelFormat, model: &str) -> anyhow::Result<()> {
    let gguf = model.ends_with(".gguf");
    let dummy = model.starts_with("dummy:");
    match format {
        ModelFormat::Auto => Ok(()),
        ModelFormat::Gguf if gguf => Ok(()),
        ModelFormat::Safetensors if !gguf && !dummy => Ok(()),
        ModelFormat::Gguf | ModelFormat::Safetensors => bail!(
            "model.format {} does not describe the source {model:?} (a .gguf file is gguf; a folder or a hub repository safetensors); use model.format auto",
            serde_json::to_value(format)?.as_str().unwrap_or_default()
        ),
    }
}

/// `check-config FILE`: the file resolved as `serve --config FILE` resolves it (the same
/// environment, flags' defaults and refusals), without loading anything. Returns a summary.
pub fn check_config(file: &std::path::Path) -> anyhow::Result<String> {
    use clap::Parser;
    let file = file.to_string_lossy();
    let cli = super::Cli::try_parse_from(["parallax-agent", "serve", "--config", file.as_ref()])?;
    let super::Command::Serve(args) = cli.command else {
        unreachable!("the arguments name serve");
    };
    let (engine, port, server) = args.resolve()?;
    let role = args.role(engine.tensor_parallel_size())?;
    Ok(format!(
        "{file}: ok (model {}, served as {}, tensor parallel size {}, port {port}, {role:?})",
        engine.model()?,
        server.served_name,
        engine.tensor_parallel_size(),
    ))
}

impl ServeArgs {
    /// This process's part in a group of `tensor_parallel_size` ranks.
    pub fn role(&self, tensor_parallel_size: usize) -> anyhow::Result<GroupRole> {
        let (rank, pods) = (self.group_rank, self.group_size);
        if pods == 0 || rank >= pods {
            bail!(
                "--group-rank {rank} must be below --group-size {pods} (PARALLAX_RANK, PARALLAX_WORLD_SIZE)"
            );
        }
        if pods == 1 {
            return Ok(GroupRole::Whole);
        }
        if tensor_parallel_size < pods || !tensor_parallel_size.is_multiple_of(pods) {
            bail!(
                "tensor parallel size {tensor_parallel_size} cannot be split evenly over {pods} pods (--group-size)"
            );
        }
        if rank == 0 {
            return Ok(GroupRole::Leader { pods });
        }
        let leader = self
            .group_leader
            .as_deref()
            .filter(|l| !l.is_empty())
            .context("--group-leader (PARALLAX_LEADER_ADDRESS) is required on pod ranks above 0")?;
        Ok(GroupRole::Worker {
            rank,
            pods,
            leader: with_port(leader, self.group_port),
        })
    }
}

pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let (engine, port, server_config) = args.resolve()?;
    if let Some(pool) = &args.pool {
        tracing::info!(
            pool,
            group = args.group.as_deref().unwrap_or_default(),
            pod = args.pod_name.as_deref().unwrap_or_default(),
            namespace = args.pod_namespace.as_deref().unwrap_or_default(),
            "serving a pool's group"
        );
    }
    let role = args.role(engine.tensor_parallel_size())?;
    // The leader takes its group port before anything loads, so a port in use fails at once.
    let group_listener = match role {
        GroupRole::Leader { .. } => {
            let listener = std::net::TcpListener::bind((args.host.as_str(), args.group_port))
                .with_context(|| {
                    format!(
                        "cannot listen on {}:{} (--group-port)",
                        args.host, args.group_port
                    )
                })?;
            tracing::info!(address = %listener.local_addr()?, "accepting the group's other pods");
            Some(listener)
        }
        _ => None,
    };
    // GPU health is watched from the start: a GPU that fails while the model loads is known.
    let gpus = args.gpu.watch()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {}:{port}", args.host))?;
        tracing::info!(address = %listener.local_addr()?, model = %server_config.served_name, "listening");
        let server = Server::new(server_config);
        if let Some(gpus) = gpus {
            server.watch_gpus(gpus);
        }
        if let GroupRole::Worker { rank, pods, .. } = &role {
            server.serve_as_worker(format!("tensor-parallel group pod {rank} of {pods}"));
        }
        // The model loads while the server already answers /health (and /ready says 503). A
        // worker's thread runs until its leader stops it.
        let working = {
            let server = server.clone();
            tokio::task::spawn_blocking(move || {
                // A hub model downloads first; /ready says how far it has come.
                let engine = engine.fetched(&|progress| server.downloading(progress))?;
                match role {
                GroupRole::Whole => {
                    server.attach(engine.start_observed(server.metrics())?);
                    Ok(())
                }
                GroupRole::Leader { pods } => {
                    let listener = group_listener.expect("the leader took its group port");
                    server.attach(engine.start_with(server.metrics(), |files, backend| {
                        group::leader(files, backend, pods, &listener)
                    })?);
                    Ok(())
                }
                GroupRole::Worker { rank, pods, leader } => {
                    follow(&engine, &server, rank, pods, &leader)
                }
                }
            })
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            tokio::select! {
                () = server::termination() => {}
                _ = stopped => {}
            }
        };
        let serving = server.run(listener, shutdown);
        tokio::pin!(serving);
        tokio::select! {
            served = &mut serving => served?,
            worked = working => {
                worked.context("the loading thread failed")??;
                if args.group_rank > 0 {
                    tracing::info!("the group's leader stopped this pod");
                    let _ = stop.send(());
                }
                serving.await?;
            }
        }
        tracing::info!("stopped");
        Ok(())
    });
    // A model still loading, or a worker's shards, stop with the process rather than hold it.
    runtime.shutdown_background();
    served
}

/// A worker pod: joins the leader, loads its shards, and runs the leader's commands until the
/// leader stops it (`Ok`) or fails or goes away (`Err`: the pod ends and is restarted).
fn follow(
    engine: &EngineArgs,
    server: &Server,
    rank: usize,
    pods: usize,
    leader: &str,
) -> anyhow::Result<()> {
    engine.set_threads()?;
    let mut files = ModelFiles::open(&engine.source()?)?;
    tracing::info!(leader, rank, pods, "joining the group's leader");
    let link = link::connect(leader, rank as u32, group::JOIN_DEADLINE)?;
    group::worker(&mut files, &engine.backend(), rank, pods, link, || {
        server.worker_joined()
    })
    .context("serving the group's leader")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::engine::backend::profile::CPU;
    use clap::Parser;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["parallax-agent", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .expect("the arguments parse")
            .command
        {
            Command::Serve(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    fn config_file(name: &str, tensor_parallel_size: u32) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("parallax-{name}-{}.json", std::process::id()));
        let config = serde_json::json!({
            "model": {"source": "dummy:smollm2-135m", "format": "auto", "servedName": "small"},
            "tensorParallelSize": tensor_parallel_size,
            "port": 8000,
            "batching": {"maxBatchSize": 48},
            "kvCache": {"blockSize": 32},
        });
        std::fs::write(&path, config.to_string()).expect("the temp folder is writable");
        path
    }

    #[test]
    fn the_configuration_file_sets_what_flags_do_not() {
        let path = config_file("serve-config", 1);
        let file = path.to_string_lossy().into_owned();
        let (engine, port, server) = serve_args(&["--config", &file]).resolve().unwrap();
        assert_eq!(engine.model.as_deref(), Some("dummy:smollm2-135m"));
        assert_eq!((server.served_name.as_str(), port), ("small", 8000));
        assert_eq!(
            (engine.max_num_seqs, engine.block_size),
            (Some(48), Some(32))
        );
        assert_eq!(
            engine.gpu_memory_utilization,
            Some(0.9),
            "the pool's default fraction"
        );
        // The pool's bins (the API's defaults here) become the batch shares.
        let shares = engine.config(&CPU).unwrap().bin_shares.unwrap();
        assert_eq!(
            shares[Bin::Slow as usize],
            BinShare {
                min: 4,
                max: 16,
                weight: 1
            }
        );
        assert_eq!(
            shares[Bin::Fast as usize],
            BinShare {
                min: 32,
                max: 64,
                weight: 3
            }
        );
        let (_, port, server) = serve_args(&[
            "--config",
            &file,
            "--port",
            "9000",
            "--served-model-name",
            "x",
        ])
        .resolve()
        .unwrap();
        assert_eq!((server.served_name.as_str(), port), ("x", 9000));
        // A flag wins over the file.
        let (engine, _, _) = serve_args(&["--config", &file, "--max-num-seqs", "7"])
            .resolve()
            .unwrap();
        assert_eq!(engine.max_num_seqs, Some(7));
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn the_group_role_comes_from_the_operators_environment_and_bad_ones_are_refused() {
        let path = config_file("serve-tp", 4);
        let file = path.to_string_lossy().into_owned();
        let args = serve_args(&["--config", &file, "--group-size", "2", "--group-rank", "1"]);
        let (engine, _, _) = args.resolve().unwrap();
        assert_eq!(engine.tensor_parallel_size(), 4, "the file's size");
        let error = args.role(4).unwrap_err();
        assert!(error.to_string().contains("--group-leader"), "{error}");
        let args = serve_args(&[
            "--config",
            &file,
            "--group-size",
            "2",
            "--group-rank",
            "1",
            "--group-leader",
            "pool-0-0.pool-pods.ml.svc",
        ]);
        assert_eq!(
            args.role(4).unwrap(),
            GroupRole::Worker {
                rank: 1,
                pods: 2,
                leader: "pool-0-0.pool-pods.ml.svc:8001".into()
            }
        );
        let leader = serve_args(&["--config", &file, "--group-size", "2"]);
        assert_eq!(leader.role(4).unwrap(), GroupRole::Leader { pods: 2 });
        assert_eq!(serve_args(&[]).role(4).unwrap(), GroupRole::Whole);
        let error = leader.role(3).unwrap_err();
        assert!(
            error.to_string().contains("split evenly over 2 pods"),
            "{error}"
        );
        let error = serve_args(&["--group-size", "2", "--group-rank", "2"])
            .role(2)
            .unwrap_err();
        assert!(error.to_string().contains("--group-rank 2"), "{error}");
        // A flag wins over the file.
        let (engine, _, _) = serve_args(&["--config", &file, "-t", "2"])
            .resolve()
            .unwrap();
        assert_eq!(engine.tensor_parallel_size(), 2);
        std::fs::remove_file(path).ok();
        assert_eq!(with_port("10.0.0.1:9", 8001), "10.0.0.1:9");
        assert_eq!(with_port("leader", 8001), "leader:8001");
        assert_eq!(with_port("::1", 8001), "[::1]:8001");
        assert_eq!(with_port("[::1]:7", 8001), "[::1]:7");
    }

    #[test]
    fn fields_the_agent_cannot_honour_are_refused_by_name_at_check_and_start() {
        let path = config_file("serve-refusals", 1);
        let file = path.to_string_lossy().into_owned();
        let summary = check_config(&path).unwrap();
        assert!(
            summary.contains("ok (model dummy:smollm2-135m, served as small"),
            "{summary}"
        );
        let edit = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            change(&mut config);
            std::fs::write(&path, config.to_string()).unwrap();
        };
        // The engine's own type may be named, no other.
        edit(&|c| c["kvCache"]["dtype"] = "bf16".into());
        for error in [
            check_config(&path).unwrap_err(),
            serve_args(&["--config", &file]).resolve().unwrap_err(),
        ] {
            let text = error.to_string();
            assert!(
                text.contains("kvCache.dtype bf16 is not supported") && text.contains("(f32 here"),
                "{error}"
            );
        }
        edit(&|c| c["kvCache"]["dtype"] = "int8".into());
        let error = format!("{:#}", check_config(&path).unwrap_err());
        assert!(error.contains("unknown variant `int8`"), "{error}");
        edit(&|c| c["kvCache"]["dtype"] = "bf16".into());
        serve_args(&["--config", &file, "--backend", "candle", "--dtype", "bf16"])
            .resolve()
            .unwrap();
        edit(&|c| {
            c["kvCache"]["dtype"] = "auto".into();
            c["model"]["format"] = "gguf".into();
        });
        let error = check_config(&path).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("model.format gguf does not describe"),
            "{error}"
        );
        edit(&|c| {
            c["model"]["format"] = "safetensors".into();
            c["model"]["source"] = "hf://org/na me".into();
        });
        let error = check_config(&path).unwrap_err();
        assert!(
            error.to_string().contains("organisation and name"),
            "{error}"
        );
        edit(&|c| c["model"]["source"] = "hf://org/name@v1".into());
        check_config(&path).unwrap();
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn the_size_the_operator_gave_the_gpus_for_is_the_size_served() {
        let path = config_file("serve-sized", 2);
        let file = path.to_string_lossy().into_owned();
        let sized = ["--config", &file, "--sized-tensor-parallel-size", "2"];
        serve_args(&sized).resolve().unwrap();
        let mut other = sized.to_vec();
        other.extend(["-t", "4"]);
        let error = serve_args(&other).resolve().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("tensor parallel size 4 differs from the 2 this pod's GPUs"),
            "{error}"
        );
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn serve_refuses_what_it_cannot_do_by_name() {
        let error = serve_args(&[]).resolve().unwrap_err();
        assert!(error.to_string().contains("--model is required"), "{error}");
        assert_eq!(served_name_of("/models/SmolLM2.Q4_1.gguf"), "SmolLM2.Q4_1");
    }
}
