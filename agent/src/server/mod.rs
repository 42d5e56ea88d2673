//! The agent's HTTP face: the OpenAI-compatible API, health, readiness, metrics and the OpenAPI
//! document, on axum. The engine runs on its own thread; handlers hold its cloneable handle.
//!
//! Life of a server: it listens at once and answers `/health`, while `/ready` and the API say
//! 503 until [`Server::attach`] hands it a loaded engine. On shutdown it stops accepting, turns
//! `/ready` to 503 and lets requests in flight finish until the deadline, then ends them with an
//! explicit `server_shutting_down` error.

pub mod degradation;
pub mod error;
mod generation;
mod gpu_metrics;
mod handlers;
pub mod metrics;
pub mod openapi;
pub mod overload;
pub mod prediction;
pub mod protocol;
pub mod validation;

use crate::engine::EngineHandle;
use crate::gpu::monitor::GpuWatch;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use error::ApiError;
use metrics::{EngineView, Metrics};
use overload::QueueBudget;
use prediction::{Binning, Predictor};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use validation::ModelLimits;

/// How the server behaves, apart from the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The name clients put in `model`.
    pub served_name: String,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// How long requests in flight may run on after shutdown begins.
    pub shutdown_timeout: Duration,
    /// Most requests waiting to start; more get 429.
    pub max_queue_requests: usize,
    /// Most prompt tokens waiting to start; more get 429.
    pub max_queue_tokens: usize,
    /// `X-Max-Wait-Time` when a request does not say.
    pub default_max_wait: Duration,
    /// How requests are put into bins by predicted time.
    pub bins: Binning,
    /// Refuse request fields no API defines (by default they are ignored with a warning).
    pub strict_request_fields: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            served_name: "model".into(),
            max_body_bytes: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
            max_queue_requests: 256,
            max_queue_tokens: 256 * 1024,
            default_max_wait: Duration::from_millis(50),
            bins: Binning::Adaptive,
            strict_request_fields: false,
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub served_name: String,
    pub metrics: Arc<Metrics>,
    engine: OnceLock<EngineHandle>,
    draining: AtomicBool,
    /// Becomes true when the shutdown deadline passes: requests in flight end.
    abort: watch::Sender<bool>,
    max_body_bytes: usize,
    pub predictor: Mutex<Predictor>,
    pub budget: Arc<QueueBudget>,
    pub default_max_wait: Duration,
    /// Refuse request fields no API defines.
    pub strict_request_fields: bool,
    /// Set on a tensor-parallel worker pod: what it is, and whether its shards are loaded and
    /// joined to the leader. Such a pod serves health and readiness, no requests.
    worker: OnceLock<WorkerRole>,
    /// What loading is doing now, for `/ready`.
    loading: Mutex<Option<String>>,
    /// A download under way, for `/ready` (and through it the operator's status).
    download: Mutex<Option<crate::hub::Progress>>,
    /// The GPUs' health, where it is watched.
    gpus: OnceLock<Arc<GpuWatch>>,
}

/// A worker pod of a multi-pod group.
#[derive(Debug)]
struct WorkerRole {
    description: String,
    joined: AtomicBool,
}

impl AppState {
    /// The engine, if requests may be taken now.
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::ShuttingDown);
        }
        if let Some(reason) = self.gpus.get().and_then(|g| g.unhealthy()) {
            return Err(ApiError::GpuUnhealthy(reason));
        }
        if let Some(worker) = self.worker.get() {
            return Err(ApiError::NotLeader(format!(
                "this pod is {}; the group's leader (pod rank 0) serves requests",
                worker.description
            )));
        }
        self.engine.get().ok_or(ApiError::Loading)
    }

    pub fn limits(engine: &EngineHandle) -> ModelLimits {
        ModelLimits {
            context_length: engine.info.context_length,
            vocab_size: engine.info.vocab_size,
            kv_tokens: engine.info.kv_blocks * engine.info.block_size,
        }
    }

    /// Answers with an error, counting it.
    pub fn refuse(&self, error: ApiError) -> axum::response::Response {
        self.metrics.record_error(error.code());
        if error.status().is_server_error() {
            tracing::warn!(code = error.code(), "{error}");
        } else {
            tracing::debug!(code = error.code(), "{error}");
        }
        axum::response::IntoResponse::into_response(error)
    }

    pub fn abort_signal(&self) -> watch::Receiver<bool> {
        self.abort.subscribe()
    }

    fn loading_now(&self) -> Option<String> {
        self.loading.lock().ok().and_then(|l| l.clone())
    }

    /// The download under way, while the model is not ready.
    pub fn download_now(&self) -> Option<crate::hub::Progress> {
        self.download.lock().ok().and_then(|d| d.clone())
    }

    /// The GPUs' health, where it is watched.
    pub fn gpus(&self) -> Option<&Arc<GpuWatch>> {
        self.gpus.get()
    }

    fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        if let Some(reason) = self.gpus.get().and_then(|g| g.unhealthy()) {
            return Err(reason);
        }
        if let Some(worker) = self.worker.get() {
            return if worker.joined.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err(format!(
                    "{}: {}",
                    worker.description,
                    self.loading_now()
                        .unwrap_or_else(|| "loading and joining the group".into())
                ))
            };
        }
        match self.engine.get() {
            None => Err(self
                .loading_now()
                .unwrap_or_else(|| "loading the model".into())),
            Some(engine) => match engine.fault() {
                Some(reason) => Err(format!("the engine stopped: the device failed ({reason})")),
                None if !engine.is_running() => Err("the engine stopped".into()),
                None => Ok(()),
            },
        }
    }
}

/// A server for one model.
#[derive(Debug, Clone)]
pub struct Server {
    state: Arc<AppState>,
    shutdown_timeout: Duration,
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let (abort, _) = watch::channel(false);
        Self {
            state: Arc::new(AppState {
                metrics: Arc::new(Metrics::new(&config.served_name)),
                served_name: config.served_name,
                engine: OnceLock::new(),
                draining: AtomicBool::new(false),
                abort,
                max_body_bytes: config.max_body_bytes,
                predictor: Mutex::new(Predictor::new(config.bins)),
                budget: Arc::new(QueueBudget::new(
                    config.max_queue_requests,
                    config.max_queue_tokens,
                )),
                default_max_wait: config.default_max_wait,
                strict_request_fields: config.strict_request_fields,
                worker: OnceLock::new(),
                loading: Mutex::new(None),
                download: Mutex::new(None),
                gpus: OnceLock::new(),
            }),
            shutdown_timeout: config.shutdown_timeout,
        }
    }

    /// The metrics, which the engine should be started to report its steps to
    /// ([`crate::engine::start_observed`]).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// Makes this server a tensor-parallel worker's (`description`: which one): it serves health
    /// and readiness, and refuses requests, pointing at the group's leader.
    pub fn serve_as_worker(&self, description: String) {
        let _ = self.state.worker.set(WorkerRole {
            description,
            joined: AtomicBool::new(false),
        });
    }

    /// Tells `/ready` what loading is doing until the engine is attached.
    pub fn loading(&self, what: String) {
        if let Ok(mut loading) = self.state.loading.lock() {
            *loading = Some(what);
        }
    }

    /// Tells `/ready` how far the model's download has come, in words and as numbers.
    pub fn downloading(&self, progress: &crate::hub::Progress) {
        self.loading(progress.to_string());
        if let Ok(mut download) = self.state.download.lock() {
            *download = Some(progress.clone());
        }
    }

    /// A worker's shards are loaded and joined to its leader: it is ready.
    pub fn worker_joined(&self) {
        if let Some(worker) = self.state.worker.get() {
            worker.joined.store(true, Ordering::Relaxed);
            tracing::info!(worker = %worker.description, "joined the group: ready");
        }
    }

    /// Watches the agent's GPUs: an unhealthy one makes the server unready and refuse new
    /// requests; one on probation holds the engine to a smaller batch.
    pub fn watch_gpus(&self, watch: Arc<GpuWatch>) {
        self.state.metrics.attach_gpus(watch.clone());
        if let Some(engine) = self.state.engine.get() {
            watch.limit_engine(engine.stats.clone(), engine.info.max_num_seqs);
        }
        let _ = self.state.gpus.set(watch);
    }

    /// Hands over the loaded engine: the server becomes ready.
    pub fn attach(&self, engine: EngineHandle) {
        self.state.metrics.attach(EngineView {
            stats: engine.stats.clone(),
            info: engine.info.clone(),
        });
        if let Some(gpus) = self.state.gpus.get() {
            gpus.limit_engine(engine.stats.clone(), engine.info.max_num_seqs);
        }
        if self.state.engine.set(engine).is_ok() {
            tracing::info!(model = %self.state.served_name, "ready");
        }
    }

    pub fn router(&self) -> Router {
        use openapi::*;
        Router::new()
            .route(COMPLETIONS, post(handlers::completions))
            .route(CHAT_COMPLETIONS, post(handlers::chat_completions))
            .route(MODELS, get(handlers::models))
            .route(HEALTH, get(handlers::health))
            .route(READY, get(handlers::ready))
            .route(METRICS, get(handlers::metrics))
            .route(OPENAPI, get(handlers::openapi))
            .fallback(handlers::not_found)
            .layer(DefaultBodyLimit::max(self.state.max_body_bytes))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then drains (see the module docs).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let deadline = self.shutdown_timeout;
        let signal = async move {
            shutdown.await;
            state.draining.store(true, Ordering::Relaxed);
            tracing::info!(
                deadline_s = deadline.as_secs_f64(),
                "shutting down: no new requests; requests in flight may finish until the deadline"
            );
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                if state.abort.send(true).is_ok() {
                    tracing::warn!("shutdown deadline passed: ending the requests still in flight");
                }
            });
        };
        axum::serve(listener, self.router())
            .with_graceful_shutdown(signal)
            .await
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
