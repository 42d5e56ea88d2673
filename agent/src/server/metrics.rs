//! Prometheus metrics under vLLM's names and meanings (so vLLM dashboards, KEDA triggers and
//! Gateway API Inference Extension endpoint pickers work unchanged), every one labelled with
//! `model_name`, plus `parallax_*` for what vLLM does not have. Request metrics are recorded by
//! the request's [`RequestTimer`]; engine gauges are read from its live counters at scrape time;
//! step metrics come from the engine thread through [`StepObserver`].

use super::degradation::{DegradationWatch, WatchConfig};
use super::gpu_metrics::GpuCollector;
use super::prediction::BinBounds;
use crate::engine::runtime::{EngineInfo, EngineStats};
use crate::engine::scheduling::admission::{Bin, Priority, Stall};
use crate::engine::scheduling::scheduler::Preemption;
use crate::engine::{FinishReason, StepObserver, StepReport};
use crate::gpu::monitor::GpuWatch;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// vLLM's buckets, so dashboards built for it read the same.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const STEP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// How a request ended, as vLLM labels it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabel {
    finished_reason: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    code: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    bin: &'static str,
    priority: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BinLabel {
    bin: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FieldLabel {
    field: String,
}

/// Distinct field names counted by name; the rest count as `other` (clients choose the names).
const MAX_IGNORED_FIELD_NAMES: usize = 64;

const ERROR_BUCKETS: &[f64] = &[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0];

/// The engine as the metrics see it, once it is loaded.
#[derive(Debug, Clone)]
pub struct EngineView {
    pub stats: Arc<EngineStats>,
    pub info: Arc<EngineInfo>,
}

type ClassHistograms = Family<ClassLabel, Histogram, fn() -> Histogram>;

/// vLLM's request latencies again, by the request's predicted bin and priority (vLLM's own carry
/// no such labels, and dashboards built for them sum over none).
#[derive(Debug)]
struct ClassLatency {
    ttft: ClassHistograms,
    inter_token: ClassHistograms,
    e2e: ClassHistograms,
    queue: ClassHistograms,
}

/// One class's histograms of [`ClassLatency`].
#[derive(Debug)]
struct ClassHistogramSet {
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
}

impl Default for ClassLatency {
    fn default() -> Self {
        Self {
            ttft: Family::new_with_constructor(|| Histogram::new(TTFT_BUCKETS.iter().copied())),
            inter_token: Family::new_with_constructor(|| {
                Histogram::new(ITL_BUCKETS.iter().copied())
            }),
            e2e: Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS.iter().copied())),
            queue: Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS.iter().copied())),
        }
    }
}

impl ClassLatency {
    fn register(&self, registry: &mut Registry) {
        for (name, help, family) in [
            (
                "parallax_time_to_first_token_seconds",
                "Time from the request's arrival to its first token, by predicted bin and priority",
                &self.ttft,
            ),
            (
                "parallax_inter_token_latency_seconds",
                "Time between consecutive output tokens, by the request's predicted bin and priority",
                &self.inter_token,
            ),
            (
                "parallax_e2e_request_latency_seconds",
                "Time from a request's arrival to its last token, by predicted bin and priority",
                &self.e2e,
            ),
            (
                "parallax_request_queue_time_seconds",
                "Time a request waited before its first step, by predicted bin and priority",
                &self.queue,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
    }
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
    by_class: ClassLatency,
    success: Family<FinishedLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    step_duration: Histogram,
    batch_size: Histogram,
    batch_tokens: Histogram,
    admissions: Family<ClassLabel, Counter>,
    rejections: Family<ReasonLabel, Counter>,
    ignored_fields: Family<FieldLabel, Counter>,
    ignored_names: Mutex<std::collections::BTreeSet<String>>,
    prediction_error: Histogram,
    bin_bounds: Family<BinLabel, Gauge<f64, AtomicU64>>,
    engine: Arc<OnceLock<EngineView>>,
    watch: Arc<Mutex<DegradationWatch>>,
    gpus: Arc<OnceLock<Arc<GpuWatch>>>,
}

/// Every metric of `registry` as OpenMetrics text, or else the Prometheus text format 0.0.4;
/// with its content type.
pub fn encode(registry: &Registry, openmetrics: bool) -> (String, &'static str) {
    use prometheus_client::encoding::{prometheus_text, text};
    let mut out = String::new();
    // Writing into a String cannot fail.
    if openmetrics {
        let _ = text::encode(&mut out, registry);
        (
            out,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        let _ = prometheus_text::encode(&mut out, registry);
        (out, prometheus_text::CONTENT_TYPE)
    }
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        let mut registry = Registry::with_labels(
            [(
                Cow::Borrowed("model_name"),
                Cow::Owned(model_name.to_owned()),
            )]
            .into_iter(),
        );
        let histogram = |buckets: &[f64]| Histogram::new(buckets.iter().copied());
        let metrics = Self {
            ttft: histogram(TTFT_BUCKETS),
            inter_token: histogram(ITL_BUCKETS),
            e2e: histogram(REQUEST_BUCKETS),
            queue: histogram(REQUEST_BUCKETS),
            by_class: ClassLatency::default(),
            success: Family::default(),
            errors: Family::default(),
            step_duration: histogram(STEP_BUCKETS),
            batch_size: histogram(BATCH_BUCKETS),
            batch_tokens: histogram(BATCH_BUCKETS),
            admissions: Family::default(),
            rejections: Family::default(),
            ignored_fields: Family::default(),
            ignored_names: Mutex::new(std::collections::BTreeSet::new()),
            prediction_error: histogram(ERROR_BUCKETS),
            bin_bounds: Family::default(),
            engine: Arc::new(OnceLock::new()),
            watch: Arc::new(Mutex::new(DegradationWatch::new(
                WatchConfig::default(),
                Instant::now(),
            ))),
            gpus: Arc::new(OnceLock::new()),
            registry: Registry::default(),
        };
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Time from the request's arrival to its first token",
            metrics.ttft.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens of a request",
            metrics.inter_token.clone(),
        );
        registry.register(
            "vllm:e2e_request_latency_seconds",
            "Time from a request's arrival to its last token",
            metrics.e2e.clone(),
        );
        registry.register(
            "vllm:request_queue_time_seconds",
            "Time a request waited before its first step",
            metrics.queue.clone(),
        );
        metrics.by_class.register(&mut registry);
        registry.register(
            "vllm:request_success",
            "Requests finished, by why they finished (stop, length, abort, error)",
            metrics.success.clone(),
        );
        registry.register(
            "parallax_request_errors",
            "Requests refused or failed, by error code",
            metrics.errors.clone(),
        );
        registry.register(
            "parallax_step_duration_seconds",
            "Wall time of one engine step (forward pass and sampling)",
            metrics.step_duration.clone(),
        );
        registry.register(
            "parallax_batch_size",
            "Sequences in one engine step",
            metrics.batch_size.clone(),
        );
        registry.register(
            "parallax_batch_tokens",
            "Tokens in one engine step (prefill chunks and decode tokens)",
            metrics.batch_tokens.clone(),
        );
        registry.register(
            "parallax_admissions",
            "Requests queued for the engine, by predicted bin and priority",
            metrics.admissions.clone(),
        );
        registry.register(
            "parallax_request_ignored_fields",
            "Request fields no API defines, accepted and ignored (as vLLM does), by name (the first 64 names; the rest as other)",
            metrics.ignored_fields.clone(),
        );
        registry.register(
            "parallax_rejections",
            "Requests refused at admission (queue_full, queue_tokens) or ended waiting (queue_timeout)",
            metrics.rejections.clone(),
        );
        registry.register(
            "parallax_prediction_relative_error",
            "Relative error of the predicted execution time, |predicted - actual| / actual",
            metrics.prediction_error.clone(),
        );
        registry.register(
            "parallax_bin_bound_seconds",
            "Predicted execution time below which a request is in the bin (fast, medium): fixed, or adapted to the traffic",
            metrics.bin_bounds.clone(),
        );
        registry.register_collector(Box::new(EngineCollector {
            engine: metrics.engine.clone(),
        }));
        registry.register_collector(Box::new(WatchCollector {
            watch: metrics.watch.clone(),
        }));
        registry.register_collector(Box::new(GpuCollector {
            watch: metrics.gpus.clone(),
        }));
        Self {
            registry,
            ..metrics
        }
    }

    /// Connects the engine's live counters, once it is loaded.
    pub fn attach(&self, view: EngineView) {
        let _ = self.engine.set(view);
    }

    /// Connects the GPUs' readings and health.
    pub fn attach_gpus(&self, watch: Arc<GpuWatch>) {
        let _ = self.gpus.set(watch);
    }

    /// Every metric as OpenMetrics text, or else the Prometheus text format 0.0.4 that older
    /// scrapers parse (Go's `expfmt`, as endpoint pickers and KEDA use); with its content type.
    pub fn encode(&self, openmetrics: bool) -> (String, &'static str) {
        encode(&self.registry, openmetrics)
    }

    pub fn record_error(&self, code: &'static str) {
        self.errors.get_or_create(&ErrorLabel { code }).inc();
    }

    pub fn record_admission(&self, bin: Bin, priority: Priority) {
        self.admissions
            .get_or_create(&ClassLabel {
                bin: bin.as_str(),
                priority: priority.as_str(),
            })
            .inc();
    }

    /// Counts a request field that was ignored.
    pub fn record_ignored_field(&self, field: &str) {
        let field = {
            let mut names = self.ignored_names.lock().unwrap_or_else(|e| e.into_inner());
            if names.contains(field) || names.len() < MAX_IGNORED_FIELD_NAMES {
                names.insert(field.to_owned());
                field.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.ignored_fields
            .get_or_create(&FieldLabel { field })
            .inc();
    }

    pub fn record_rejection(&self, reason: &'static str) {
        self.rejections.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn record_prediction_error(&self, relative: f64) {
        self.prediction_error.observe(relative);
    }

    /// The bin bounds in force.
    pub fn set_bin_bounds(&self, bounds: BinBounds) {
        for (bin, bound) in [(Bin::Fast, bounds.fast), (Bin::Medium, bounds.medium)] {
            self.bin_bounds
                .get_or_create(&BinLabel { bin: bin.as_str() })
                .set(bound.as_secs_f64());
        }
    }

    /// Starts timing a request of bin `bin` and priority `priority` that arrived at `arrived`.
    pub fn timer(self: &Arc<Self>, arrived: Instant, bin: Bin, priority: Priority) -> RequestTimer {
        let class = ClassLabel {
            bin: bin.as_str(),
            priority: priority.as_str(),
        };
        let of_class = |family: &ClassHistograms| family.get_or_create(&class).clone();
        RequestTimer {
            metrics: self.clone(),
            class: ClassHistogramSet {
                ttft: of_class(&self.by_class.ttft),
                inter_token: of_class(&self.by_class.inter_token),
                e2e: of_class(&self.by_class.e2e),
                queue: of_class(&self.by_class.queue),
            },
            arrived,
            last_token: None,
            finished: false,
        }
    }
}

impl Metrics {
    fn watch(&self) -> std::sync::MutexGuard<'_, DegradationWatch> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StepObserver for Metrics {
    fn step(&self, report: &StepReport) {
        self.watch()
            .step(Instant::now(), report.duration, report.tokens);
        self.step_duration.observe(report.duration.as_secs_f64());
        self.batch_size.observe(report.sequences as f64);
        self.batch_tokens.observe(report.tokens as f64);
    }
}

/// Reads the engine's counters at scrape time.
#[derive(Debug)]
struct EngineCollector {
    engine: Arc<OnceLock<EngineView>>,
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: ConstGauge<N>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let metric = encoder.encode_descriptor(name, help, None, value.metric_type())?;
    value.encode(metric)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let value = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, value.metric_type())?;
    value.encode(metric)
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let view = self.engine.get();
        let stat = |f: fn(&EngineStats) -> u64| view.map_or(0, |v| f(&v.stats));
        gauge(
            &mut encoder,
            "vllm:num_requests_running",
            "Requests in the running batch",
            ConstGauge::new(stat(|s| s.running.load(Relaxed) as u64) as i64),
        )?;
        if let Some(view) = view {
            gauge(
                &mut encoder,
                "parallax_tensor_parallel_size",
                "Ranks (GPUs) the model is split over across the group; 1 for a whole model",
                ConstGauge::new(view.info.tensor_parallel_size as i64),
            )?;
            let limit = view.stats.batch_limit.load(Relaxed);
            gauge(
                &mut encoder,
                "parallax_batch_limit",
                "Most sequences a step may run now: the configured maximum, less while a GPU is on probation",
                ConstGauge::new(if limit == 0 {
                    view.info.max_num_seqs
                } else {
                    limit
                } as i64),
            )?;
        }
        gauge(
            &mut encoder,
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled",
            ConstGauge::new(stat(|s| s.waiting.load(Relaxed) as u64) as i64),
        )?;
        gauge(
            &mut encoder,
            "vllm:kv_cache_usage_perc",
            "KV cache usage, 1 means 100 percent",
            ConstGauge::new(view.map_or(0.0, |v| v.stats.kv_usage())),
        )?;
        counter(
            &mut encoder,
            "vllm:prompt_tokens",
            "Prompt tokens admitted",
            stat(|s| s.prompt_tokens.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "vllm:generation_tokens",
            "Tokens generated",
            stat(|s| s.generation_tokens.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "vllm:num_preemptions",
            "Sequences preempted (their KV freed, to be recomputed)",
            stat(EngineStats::preemptions_total),
        )?;
        counter(
            &mut encoder,
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (each admission, resumed ones too)",
            stat(|s| s.prefix_queries.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed again)",
            stat(|s| s.prefix_hits.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "parallax_engine_steps",
            "Engine steps run",
            stat(|s| s.steps.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "parallax_cuda_graph_steps",
            "Forward passes replayed from a captured CUDA graph (--cuda-graphs)",
            stat(|s| s.graph_steps.load(Relaxed)),
        )?;
        let (all_reduces, all_reduce_seconds) =
            crate::engine::parallel::collective::ALL_REDUCES.totals();
        counter(
            &mut encoder,
            "parallax_tensor_parallel_all_reduces",
            "Tensor-parallel all-reduces by rank 0 (two a layer a step; 0 without tensor parallelism)",
            all_reduces,
        )?;
        let seconds = ConstCounter::new(all_reduce_seconds);
        let metric = encoder.encode_descriptor(
            "parallax_tensor_parallel_all_reduce_seconds",
            "Rank 0's time in tensor-parallel all-reduces: on the host, waiting for the slowest rank, the sum and the link to other pods; through NCCL, the enqueue only (the sum runs on the GPU)",
            None,
            seconds.metric_type(),
        )?;
        seconds.encode(metric)?;
        gauge(
            &mut encoder,
            "parallax_model_loaded",
            "1 once the model is loaded and the engine runs",
            ConstGauge::new(i64::from(view.is_some())),
        )?;
        if let Some(view) = view {
            let stats = &view.stats;
            let metric = encoder.encode_descriptor(
                "parallax_queue_depth",
                "Requests waiting, by predicted bin and priority",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            );
            let mut metric = metric?;
            for bin in Bin::ALL {
                for priority in Priority::ALL {
                    let depth = stats.queue_depths[bin as usize][priority as usize].load(Relaxed);
                    let labels = ClassLabel {
                        bin: bin.as_str(),
                        priority: priority.as_str(),
                    };
                    ConstGauge::new(depth as i64).encode(metric.encode_family(&labels)?)?;
                }
            }
            let mut metric = encoder.encode_descriptor(
                "parallax_preemptions",
                "Sequences preempted, by reason (out_of_blocks, priority, bin_share)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, n) in Preemption::ALL.iter().zip(&stats.preemptions) {
                let labels = ReasonLabel {
                    reason: reason.as_str(),
                };
                ConstCounter::new(n.load(Relaxed)).encode(metric.encode_family(&labels)?)?;
            }
            let mut metric = encoder.encode_descriptor(
                "parallax_admission_stalls",
                "Engine steps that left requests waiting, by why admission stopped (token_budget, sequence_cap, blocks, kv_pressure, resting_bin, exclusive, held)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, n) in Stall::ALL.iter().zip(&stats.admission_stalls) {
                let labels = ReasonLabel {
                    reason: reason.as_str(),
                };
                ConstCounter::new(n.load(Relaxed)).encode(metric.encode_family(&labels)?)?;
            }
            gauge(
                &mut encoder,
                "parallax_prefix_cache_blocks",
                "KV blocks whose content is in the prefix cache, held by a request or not",
                ConstGauge::new(stats.kv_blocks_cached.load(Relaxed) as i64),
            )?;
            gauge(
                &mut encoder,
                "parallax_batch_utilization",
                "Running sequences over the most allowed (max batch size)",
                ConstGauge::new(
                    stats.running.load(Relaxed) as f64 / view.info.max_num_seqs.max(1) as f64,
                ),
            )?;
            gauge(
                &mut encoder,
                "parallax_circuit_breaker_state",
                "The engine's circuit breaker: 0 closed, 1 open (one request at a time), 2 half-open",
                ConstGauge::new(i64::from(stats.breaker_state.load(Relaxed))),
            )?;
            counter(
                &mut encoder,
                "parallax_failed_steps",
                "Steps whose forward pass failed for some of their requests",
                stats.failed_steps.load(Relaxed),
            )?;
            counter(
                &mut encoder,
                "parallax_isolated_requests",
                "Requests ended with an error because the forward pass failed on them alone",
                stats.isolated_requests.load(Relaxed),
            )?;
            gauge(
                &mut encoder,
                "parallax_kv_pressure",
                "1 while admissions are paused because the KV cache is over 95 % full (until 85 %)",
                ConstGauge::new(i64::from(stats.kv_pressure.load(Relaxed))),
            )?;
            if let Some(plan) = view.info.memory {
                let mut metric = encoder.encode_descriptor(
                    "parallax_gpu_memory_bytes",
                    "How the GPU's memory was shared at start: total, in use before the KV cache (weights, context, libraries), weights, the largest step's activation peak, KV cache",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                for (kind, bytes) in [
                    ("total", plan.total),
                    ("in_use", plan.in_use),
                    ("weights", plan.weights),
                    ("activation_peak", plan.activation_peak),
                    ("kv_cache", plan.kv_bytes),
                ] {
                    ConstGauge::new(bytes as i64)
                        .encode(metric.encode_family(&KindLabel { kind })?)?;
                }
            }
            // vLLM's label names; on CPU the blocks are in host memory all the same.
            let info = Info::new(vec![
                ("block_size", view.info.block_size.to_string()),
                ("num_gpu_blocks", view.info.kv_blocks.to_string()),
                ("cache_dtype", view.info.kv_dtype.to_owned()),
                ("max_model_len", view.info.context_length.to_string()),
            ]);
            let metric = encoder.encode_descriptor(
                "vllm:cache_config",
                "The KV cache's configuration",
                None,
                info.metric_type(),
            )?;
            info.encode(metric)?;
        }
        Ok(())
    }
}

/// Exports the degradation watch's flags and ratios.
#[derive(Debug)]
struct WatchCollector {
    watch: Arc<Mutex<DegradationWatch>>,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    signal: &'static str,
}

impl Collector for WatchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (flags, ratios) = {
            let mut watch = self.watch.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            (watch.flags(now), watch.ratios(now))
        };
        let mut metric = encoder.encode_descriptor(
            "parallax_degraded",
            "1 while a signal is degraded against its rolling baseline: latency (p95 per output token up > 20 %), throughput (tokens per busy second down > 15 %), errors (> 1 % of requests)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (signal, on) in [
            ("latency", flags.latency),
            ("throughput", flags.throughput),
            ("errors", flags.errors),
        ] {
            ConstGauge::new(i64::from(on))
                .encode(metric.encode_family(&SignalLabel { signal })?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "parallax_degradation_ratio",
            "The last closed window against its baseline (latency, throughput), and its error rate",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (signal, value) in [
            ("latency", ratios.0),
            ("throughput", ratios.1),
            ("errors", Some(ratios.2)),
        ] {
            if let Some(value) = value {
                ConstGauge::new(value).encode(metric.encode_family(&SignalLabel { signal })?)?;
            }
        }
        Ok(())
    }
}

/// Times one request; records it as aborted if dropped before [`RequestTimer::finish`].
#[derive(Debug)]
pub struct RequestTimer {
    metrics: Arc<Metrics>,
    /// The request's class's histograms, looked up once.
    class: ClassHistogramSet,
    arrived: Instant,
    last_token: Option<Instant>,
    finished: bool,
}

impl RequestTimer {
    /// A token arrived now.
    pub fn token(&mut self) {
        let now = Instant::now();
        let (vllm, ours, seconds) = match self.last_token {
            None => (&self.metrics.ttft, &self.class.ttft, now - self.arrived),
            Some(last) => (
                &self.metrics.inter_token,
                &self.class.inter_token,
                now - last,
            ),
        };
        vllm.observe(seconds.as_secs_f64());
        ours.observe(seconds.as_secs_f64());
        self.last_token = Some(now);
    }

    /// The request failed in the engine.
    pub fn failed(&mut self) {
        self.finished = true;
        self.metrics.watch().error(Instant::now());
        self.metrics
            .success
            .get_or_create(&FinishedLabel {
                finished_reason: "error",
            })
            .inc();
    }

    pub fn finish(
        &mut self,
        reason: FinishReason,
        queue_time: std::time::Duration,
        output_tokens: usize,
    ) {
        self.finished = true;
        let e2e = self.arrived.elapsed().as_secs_f64();
        let queue = queue_time.as_secs_f64();
        self.metrics.e2e.observe(e2e);
        self.class.e2e.observe(e2e);
        self.metrics
            .watch()
            .request(Instant::now(), e2e, output_tokens);
        self.metrics.queue.observe(queue);
        self.class.queue.observe(queue);
        self.metrics
            .success
            .get_or_create(&FinishedLabel {
                finished_reason: reason.as_str(),
            })
            .inc();
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .success
                .get_or_create(&FinishedLabel {
                    finished_reason: "abort",
                })
                .inc();
        }
    }
}
