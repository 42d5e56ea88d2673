//! The engine: one thread owns the executor (weights and KV memory), the block pool and the
//! scheduler. Callers hold a cloneable [`EngineHandle`], submit token ids with sampling
//! parameters and receive a stream of [`Event`]s; dropping the stream cancels the request, whose
//! blocks are freed before the next step.

mod engine_loop;
pub mod memory;
mod sequence;

use super::backend::{Executor, FaultFlag};
use super::error::{EngineError, Result};
use super::model::tokenizer::TextCodec;
use super::sampling::SamplingParams;
use super::scheduling::admission::{
    Bin, BinShare, Discipline, Priority, QueuePolicy, SLOW_PREFILL_CHUNK, STEP_WEIGHTS, Stall,
    Ticket,
};
use super::scheduling::blocks::BlockAllocator;
use super::scheduling::breaker::{Breaker, BreakerConfig};
use super::scheduling::scheduler::{Preemption, Scheduler, SchedulerConfig};
use engine_loop::{EngineLoop, Faults};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How big the KV cache is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheSize {
    /// Exactly this many blocks.
    Blocks(usize),
    /// On the CPU: this fraction of the memory available after the weights are loaded. On a
    /// GPU: this fraction of the card for everything (vLLM's `gpu_memory_utilization`), the KV
    /// cache getting what the weights and the largest step leave ([`memory::MemoryPlan`]).
    MemoryFraction(f64),
}

/// Engine limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub block_size: usize,
    pub kv_cache: KvCacheSize,
    /// The admission order: first come first served, or bins and priorities.
    pub discipline: Discipline,
    /// Each bin's share of the batch (min, max, weight), by [`Bin`]; `None` for the defaults.
    pub bin_shares: Option<[BinShare; 3]>,
    /// Multi-bin only: how often slower bins' sequences run while faster ones do
    /// ([`QueuePolicy::step_weights`]).
    pub step_weights: [u32; 3],
    /// Multi-bin only: the most prompt tokens a medium or slow sequence prefills in one step
    /// ([`QueuePolicy::slow_prefill_chunk`]).
    pub slow_prefill_chunk: usize,
    /// Share the KV blocks of common prompt prefixes between requests (on by default, as vLLM).
    pub prefix_caching: bool,
    /// When repeated step failures switch the engine to one request at a time.
    pub breaker: BreakerConfig,
    /// Tests only: the forward pass fails whenever this token is in its batch.
    #[cfg(feature = "fault-injection")]
    pub poison_token: Option<u32>,
    /// Tests only: the device fails for good (as a CUDA error would) when this token is in a
    /// batch.
    #[cfg(feature = "fault-injection")]
    pub device_fault_token: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_batched_tokens: 512,
            block_size: 16,
            kv_cache: KvCacheSize::MemoryFraction(0.1),
            discipline: Discipline::MultiBin,
            bin_shares: None,
            step_weights: STEP_WEIGHTS,
            slow_prefill_chunk: SLOW_PREFILL_CHUNK,
            prefix_caching: true,
            breaker: BreakerConfig::default(),
            #[cfg(feature = "fault-injection")]
            poison_token: None,
            #[cfg(feature = "fault-injection")]
            device_fault_token: None,
        }
    }
}

/// KV usage above this stops admissions until it falls below [`KV_PRESSURE_OFF`].
pub const KV_PRESSURE_ON: f64 = 0.95;
pub const KV_PRESSURE_OFF: f64 = 0.85;

/// How a request is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestOptions {
    pub priority: Priority,
    pub bin: Bin,
    /// Run alone, in steps of its own.
    pub exclusive: bool,
    /// Wait up to this long for a batch to join.
    pub max_wait: Option<Duration>,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (empty while a character is incomplete or a
    /// possible stop string is held back).
    Token {
        id: u32,
        text: String,
        logprob: f32,
        top_logprobs: Vec<(u32, f32)>,
    },
    /// The request ran its first step, after waiting `queue_time`, in a batch of `batch_size`
    /// sequences. Comes before any token.
    Started {
        queue_time: Duration,
        batch_size: usize,
    },
    /// The request failed: the forward pass failed on it alone (found by bisecting its batch).
    /// The last event.
    Failed { message: String },
    /// The last event: remaining text, why it ended, the token counts (`cached_tokens`: prompt
    /// tokens found in the prefix cache when it was first scheduled), how long the request
    /// waited before its first step and how long it spent in steps.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
        queue_time: Duration,
        run_time: RunTime,
    },
}

/// The time a request spent in the steps it ran in: its execution time, without its waits (queue,
/// steps its bin sat out). What the predictor learns from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunTime {
    /// Up to its first output token.
    pub prefill: Duration,
    pub total: Duration,
}

/// What one forward step did, for whoever watches the engine (metrics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Wall time of the forward pass and sampling.
    pub duration: Duration,
    /// Sequences in the step.
    pub sequences: usize,
    /// Tokens in the step: prefill chunks plus one per decoding sequence.
    pub tokens: usize,
    /// Of those sequences, how many sampled a token (the others were mid-prefill).
    pub sampled: usize,
}

/// Told about every step, on the engine thread: keep it cheap.
pub trait StepObserver: Send + Sync {
    fn step(&self, report: &StepReport);
}

/// Watches nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn step(&self, _: &StepReport) {}
}

/// Live counters, readable from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_peak: AtomicUsize,
    /// Blocks whose content is in the prefix cache, held or not.
    pub kv_blocks_cached: AtomicUsize,
    /// Preemptions by reason, indexed like [`Preemption::ALL`].
    pub preemptions: [AtomicU64; Preemption::ALL.len()],
    /// Prefix cache look-ups: tokens looked up (each admission's, resumed ones too) and tokens
    /// found.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    /// Steps that left requests waiting, by why, indexed like [`Stall::ALL`].
    pub admission_stalls: [AtomicU64; Stall::ALL.len()],
    pub steps: AtomicU64,
    /// Forward passes a captured CUDA graph ran (`--cuda-graphs`).
    pub graph_steps: AtomicU64,
    /// Most sequences a step may run, set from outside the engine (a GPU on probation); 0 for
    /// the configured maximum.
    pub batch_limit: AtomicUsize,
    /// Admissions stopped because the KV cache is nearly full.
    pub kv_pressure: AtomicBool,
    /// Waiting requests, `[bin][priority]`.
    pub queue_depths: [[AtomicUsize; 3]; 3],
    /// Steps whose forward pass failed for some of their requests.
    pub failed_steps: AtomicU64,
    /// Requests ended because the forward pass failed on them.
    pub isolated_requests: AtomicU64,
    /// The circuit breaker: 0 closed, 1 open (one request at a time), 2 half-open.
    pub breaker_state: std::sync::atomic::AtomicU8,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Why the engine stopped, or cannot go on, when its device (or a tensor-parallel rank)
    /// failed for good.
    pub fault: FaultFlag,
}

impl EngineStats {
    /// Preemptions so far, every reason.
    pub fn preemptions_total(&self) -> u64 {
        self.preemptions
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }

    /// KV usage, 0.0–1.0.
    pub fn kv_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Ordering::Relaxed);
        if total == 0 {
            0.0
        } else {
            self.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64
        }
    }
}

/// Facts about the loaded engine that callers validate requests against.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Which backend runs on which device (`int8 on cpu`, …).
    pub backend: String,
    /// The cached keys' and values' element type (`float32`, `bfloat16`, …).
    pub kv_dtype: &'static str,
    pub context_length: usize,
    pub vocab_size: usize,
    pub block_size: usize,
    pub kv_blocks: usize,
    pub weight_bytes: usize,
    pub max_num_seqs: usize,
    /// Ranks the model is split over across the group (1: the whole model here).
    pub tensor_parallel_size: usize,
    /// How the GPU's memory was shared, on a GPU sized by memory fraction.
    pub memory: Option<memory::MemoryPlan>,
}

struct Submission {
    ticket: Ticket,
    prompt: Vec<u32>,
    params: SamplingParams,
    events: mpsc::UnboundedSender<Event>,
}

/// A request in flight. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestStream {
    events: mpsc::UnboundedReceiver<Event>,
}

impl RequestStream {
    /// The next event, waiting for it (async).
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the thread (not for async code).
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
}

/// A cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    submissions: std_mpsc::Sender<Submission>,
    alive: Arc<AtomicBool>,
    pub info: Arc<EngineInfo>,
    pub stats: Arc<EngineStats>,
    pub codec: Arc<TextCodec>,
}

impl EngineHandle {
    /// False once the engine thread has ended (it stopped or panicked).
    pub fn is_running(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Why the engine stopped, if its device failed.
    pub fn fault(&self) -> Option<String> {
        self.stats
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Validates and queues a request (medium priority, fast bin, no batching preference).
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestStream> {
        self.submit_with(prompt, params, RequestOptions::default())
    }

    /// Validates and queues a request with its queueing options.
    pub fn submit_with(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        options: RequestOptions,
    ) -> Result<RequestStream> {
        params.validate().map_err(EngineError::InvalidRequest)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt has no tokens".into(),
            ));
        }
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= self.info.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.info.vocab_size
            )));
        }
        let info = &self.info;
        if prompt.len() + params.max_tokens > info.context_length {
            return Err(EngineError::ContextExceeded {
                prompt: prompt.len(),
                max_tokens: params.max_tokens,
                context: info.context_length,
            });
        }
        let needed = (prompt.len() + params.max_tokens).div_ceil(info.block_size);
        if needed > info.kv_blocks {
            return Err(EngineError::RequestTooLarge {
                blocks: info.kv_blocks,
                block_size: info.block_size,
                needed,
            });
        }
        let (events, receiver) = mpsc::unbounded_channel();
        let now = Instant::now();
        self.submissions
            .send(Submission {
                ticket: Ticket {
                    priority: options.priority,
                    bin: options.bin,
                    arrived: now,
                    exclusive: options.exclusive,
                    hold_until: options.max_wait.map(|w| now + w),
                },
                prompt,
                params,
                events,
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(RequestStream { events: receiver })
    }
}

/// Starts the engine thread.
pub fn start(
    executor: Box<dyn Executor>,
    codec: TextCodec,
    config: EngineConfig,
) -> Result<EngineHandle> {
    start_observed(executor, codec, config, Arc::new(NoObserver))
}

/// Starts the engine thread, telling `observer` about every step. Sizes and allocates the KV
/// cache first.
pub fn start_observed(
    mut executor: Box<dyn Executor>,
    codec: TextCodec,
    config: EngineConfig,
    observer: Arc<dyn StepObserver>,
) -> Result<EngineHandle> {
    let c = executor.config().clone();
    let per_block = executor.kv_block_bytes(config.block_size);
    let most_useful = config.max_num_seqs.max(1) * c.context_length.div_ceil(config.block_size);
    let mut plan = None;
    let blocks = match (config.kv_cache, executor.device_memory()) {
        (KvCacheSize::Blocks(n), _) => n,
        (KvCacheSize::MemoryFraction(f), None) => {
            ((executor.available_memory() as f64 * f) as usize / per_block).min(most_useful)
        }
        (KvCacheSize::MemoryFraction(utilization), Some(_)) => {
            let peak = executor.profile(
                config.max_batched_tokens,
                config.max_num_seqs,
                config.block_size,
            )?;
            let after = executor.device_memory().ok_or_else(|| {
                EngineError::Unsupported("the device stopped reporting its memory".into())
            })?;
            let memory = memory::MemoryPlan::new(
                after.total,
                after.free,
                executor.weight_bytes(),
                peak,
                utilization,
                per_block,
            )?;
            tracing::info!(
                total_gib = gib(memory.total),
                utilization = memory.utilization,
                in_use_gib = gib(memory.in_use),
                weights_gib = gib(memory.weights),
                activation_peak_gib = gib(memory.activation_peak),
                kv_cache_gib = gib(memory.kv_bytes),
                kv_blocks = memory.kv_blocks,
                "GPU memory"
            );
            plan = Some(memory);
            memory.kv_blocks.min(most_useful)
        }
    };
    if blocks == 0 {
        return Err(EngineError::InvalidRequest(
            "the KV cache would have no blocks; raise --kv-memory-fraction or set --kv-blocks"
                .into(),
        ));
    }
    executor.allocate_kv(blocks, config.block_size)?;
    let info = Arc::new(EngineInfo {
        backend: executor.describe(),
        kv_dtype: executor.kv_dtype(),
        context_length: c.context_length,
        vocab_size: c.vocab_size,
        block_size: config.block_size,
        kv_blocks: blocks,
        weight_bytes: executor.weight_bytes(),
        max_num_seqs: config.max_num_seqs,
        tensor_parallel_size: executor.tensor_parallel_size(),
        memory: plan,
    });
    let mut stats = EngineStats::default();
    if let Some(faults) = executor.faults() {
        stats.fault = faults;
    }
    let stats = Arc::new(stats);
    stats.kv_blocks_total.store(blocks, Ordering::Relaxed);
    let codec = Arc::new(codec);
    let (submissions, receiver) = std_mpsc::channel();
    let alive = Arc::new(AtomicBool::new(true));
    let handle = EngineHandle {
        submissions,
        alive: alive.clone(),
        info,
        stats: stats.clone(),
        codec: codec.clone(),
    };
    std::thread::Builder::new()
        .name("parallax-engine".into())
        .spawn(move || {
            // Marks the engine stopped however the thread ends, a panic included.
            let _alive = AliveGuard(alive);
            let allocator = BlockAllocator::with_prefix_caching(blocks, config.prefix_caching);
            let scheduler = Scheduler::new(SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_batched_tokens: config.max_batched_tokens,
                policy: {
                    let defaults = QueuePolicy::multi_bin(config.max_num_seqs);
                    QueuePolicy {
                        discipline: config.discipline,
                        shares: config.bin_shares.map_or(defaults.shares, |shares| {
                            shares.map(|s| BinShare {
                                min: s.min.min(config.max_num_seqs),
                                max: s.max.min(config.max_num_seqs).max(1),
                                weight: s.weight.max(1),
                            })
                        }),
                        step_weights: config.step_weights,
                        slow_prefill_chunk: config.slow_prefill_chunk,
                        ..defaults
                    }
                },
            });
            EngineLoop {
                executor,
                codec,
                allocator,
                scheduler,
                stats,
                observer,
                breaker: Breaker::new(config.breaker),
                #[cfg(feature = "fault-injection")]
                fault: Faults {
                    poison: config.poison_token,
                    device: config.device_fault_token,
                },
                #[cfg(not(feature = "fault-injection"))]
                fault: Faults::default(),
                block_size: config.block_size,
                next_id: 0,
            }
            .run(receiver);
        })
        .map_err(|e| EngineError::Io {
            path: "engine thread".into(),
            source: e,
        })?;
    Ok(handle)
}

fn gib(bytes: usize) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}
