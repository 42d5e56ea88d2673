//! The router (`parallax-agent route`): one Deployment per pool in front of its groups. Each
//! request goes to one group's leader, picked from live load with prefix affinity and priority
//! ([`policy`]); a group that refuses before starting (429, 503) or cannot be reached is skipped
//! and the request tries another; a circuit breaker per group keeps failing groups out
//! ([`breaker`]); when no group is ready — a pool waking from zero — requests are held until one
//! is, or until the hold times out (503 with Retry-After). Responses, streams included, pass
//! through as they come. The router knows the engine not at all: only the agents' HTTP API.

pub mod affinity;
pub mod breaker;
pub mod members;
pub mod metrics;
pub mod policy;
mod proxy;

use axum::Json;
use axum::Router as App;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use members::{Members, lock};
use metrics::RouterMetrics;
use policy::{Groups, PolicyConfig};
use serde_json::json;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often the members' name is resolved again.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

/// How the router behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub members: Members,
    /// How often members are resolved and polled.
    pub poll_interval: Duration,
    /// How long a poll waits for each answer.
    pub poll_timeout: Duration,
    /// How long a request waits for a connection to a group.
    pub connect_timeout: Duration,
    /// How long a request is held while no group can take it.
    pub hold_timeout: Duration,
    /// Groups one request is sent to at most (the first and its retries).
    pub max_attempts: usize,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    pub policy: PolicyConfig,
}

impl RouterConfig {
    pub fn new(members: Members) -> Self {
        Self {
            members,
            poll_interval: Duration::from_millis(250),
            poll_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            hold_timeout: Duration::from_secs(60),
            max_attempts: 3,
            max_body_bytes: 4 << 20,
            policy: PolicyConfig::default(),
        }
    }
}

/// What every request shares.
#[derive(Debug)]
struct RouterState {
    groups: Arc<Mutex<Groups>>,
    /// Bumped whenever what the groups can take may have changed; held requests watch it.
    changes: watch::Sender<u64>,
    client: reqwest::Client,
    metrics: RouterMetrics,
    config: RouterConfig,
}

impl RouterState {
    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn available(&self) -> bool {
        lock(&self.groups).any_available(Instant::now())
    }
}

/// A router over one pool's groups.
#[derive(Debug, Clone)]
pub struct Router {
    state: Arc<RouterState>,
}

impl Router {
    pub fn new(config: RouterConfig) -> Self {
        let groups = Arc::new(Mutex::new(Groups::new(config.policy)));
        let client = crate::http_client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .expect("a default HTTP client builds once its TLS provider is installed");
        Self {
            state: Arc::new(RouterState {
                metrics: RouterMetrics::new(groups.clone()),
                groups,
                changes: watch::channel(0).0,
                client,
                config,
            }),
        }
    }

    pub fn app(&self) -> App {
        App::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .fallback(proxy::forward)
            .with_state(self.state.clone())
    }

    /// Resolves the members and polls the groups once (the loop in [`Self::run`] polls every
    /// poll interval and resolves every few seconds).
    pub async fn poll(&self) {
        self.poll_resolving(true).await;
    }

    async fn poll_resolving(&self, resolve: bool) {
        let state = &self.state;
        let changed = members::poll(
            &state.groups,
            resolve.then_some(&state.config.members),
            &state.client,
            state.config.poll_timeout,
        )
        .await;
        if changed {
            state.changed();
        }
    }

    /// Polls the groups and serves on `listener` until `shutdown` resolves; requests in flight
    /// then finish (streams included) before this returns.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let poller = self.clone();
        let polling = tokio::spawn(async move {
            let every = poller.state.config.poll_interval;
            // Names are resolved less often than groups are read: DNS is asked every few
            // seconds, not several times a second.
            let resolve_every = (RESOLVE_INTERVAL.as_millis() / every.as_millis().max(1)).max(1);
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for tick in 0u128.. {
                ticks.tick().await;
                poller.poll_resolving(tick % resolve_every == 0).await;
                // Breakers reopen to a trial by the clock alone: held requests look again.
                poller.state.changed();
            }
        });
        let served = axum::serve(listener, self.app())
            .with_graceful_shutdown(shutdown)
            .await;
        polling.abort();
        served
    }
}

async fn health() -> &'static str {
    "ok"
}

/// Always 200 once listening: the router holds requests while no group is ready, so it stays in
/// its Service; the body lists the groups as it sees them.
async fn ready(State(state): State<Arc<RouterState>>) -> Response {
    let groups = lock(&state.groups);
    let config = groups.config;
    let rows: Vec<_> = groups
        .all()
        .iter()
        .map(|g| {
            json!({
                "url": g.url,
                "ready": g.ready,
                "in_flight": g.in_flight,
                "queue": g.queue(&config),
                "load": g.load.map(|l| json!({
                    "running": l.running,
                    "waiting": l.waiting,
                    "kv_cache_usage": l.kv_usage,
                    "batch_limit": l.batch_limit,
                })),
                "breaker": g.breaker.name(),
            })
        })
        .collect();
    let available = groups.any_available(Instant::now());
    Json(json!({"status": "ok", "available": available, "groups": rows})).into_response()
}

async fn metrics(State(state): State<Arc<RouterState>>) -> Response {
    let (text, content_type) = state.metrics.encode();
    ([(axum::http::header::CONTENT_TYPE, content_type)], text).into_response()
}
