//! The engine loop: one thread owns the model, the KV cache and the scheduler. Callers hold a
//! cloneable [`EngineHandle`], submit token ids with sampling parameters and receive a stream of
//! [`Event`]s; dropping the stream cancels the request, whose blocks are freed before the next
//! step.

use super::admission::{
    Bin, BinShare, Discipline, Priority, QueuePolicy, Queued, SLOW_PREFILL_CHUNK, STEP_WEIGHTS,
    Stall, Ticket,
};
use super::breaker::{Breaker, BreakerConfig};
use super::error::{EngineError, Result};
use super::kv_cache::{BlockAllocator, BlockHash, BlockTable, KvStore};
use super::model::{Llama, SeqInput, Workspace};
use super::sampling::{Rng, SamplingParams, sample};
use super::scheduler::{Preemption, Schedulable, Scheduled, Scheduler, SchedulerConfig};
use super::tokenizer::{IncrementalDecoder, TextCodec};
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
    /// This fraction of the memory available after the weights are loaded.
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
    pub context_length: usize,
    pub vocab_size: usize,
    pub block_size: usize,
    pub kv_blocks: usize,
    pub weight_bytes: usize,
    pub max_num_seqs: usize,
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
pub fn start(model: Llama, codec: TextCodec, config: EngineConfig) -> Result<EngineHandle> {
    start_observed(model, codec, config, Arc::new(NoObserver))
}

/// Starts the engine thread, telling `observer` about every step.
pub fn start_observed(
    model: Llama,
    codec: TextCodec,
    config: EngineConfig,
    observer: Arc<dyn StepObserver>,
) -> Result<EngineHandle> {
    let c = &model.config;
    let width = c.kv_width();
    let per_block = KvStore::bytes_per_block(c.layers, config.block_size, width);
    let most_useful = config.max_num_seqs.max(1) * c.context_length.div_ceil(config.block_size);
    let blocks = match config.kv_cache {
        KvCacheSize::Blocks(n) => n,
        KvCacheSize::MemoryFraction(f) => {
            ((available_memory() as f64 * f) as usize / per_block).min(most_useful)
        }
    };
    if blocks == 0 {
        return Err(EngineError::InvalidRequest(
            "the KV cache would have no blocks; raise --kv-memory-fraction or set --kv-blocks"
                .into(),
        ));
    }
    let info = Arc::new(EngineInfo {
        context_length: c.context_length,
        vocab_size: c.vocab_size,
        block_size: config.block_size,
        kv_blocks: blocks,
        weight_bytes: model.weight_bytes(),
        max_num_seqs: config.max_num_seqs,
    });
    let stats = Arc::new(EngineStats::default());
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
            let kv = KvStore::new(model.config.layers, blocks, config.block_size, width);
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
                model,
                codec,
                kv,
                allocator,
                scheduler,
                stats,
                observer,
                breaker: Breaker::new(config.breaker),
                #[cfg(feature = "fault-injection")]
                fault: config.poison_token,
                #[cfg(not(feature = "fault-injection"))]
                fault: None,
                workspace: Workspace::default(),
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

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// `MemAvailable` from /proc/meminfo, or 1 GiB where it cannot be read.
fn available_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(1 << 30, |kib| kib * 1024)
}

struct Sequence {
    ticket: Ticket,
    /// When the sequence first ran (its queue time ends there).
    started: Option<Instant>,
    run_time: RunTime,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    table: BlockTable,
    /// The last prefix-cache look-up (tokens looked up, tokens found), until the engine counts
    /// it.
    lookup: Option<(usize, usize)>,
    /// Prompt tokens found in the prefix cache when it was first scheduled.
    cached_tokens: Option<usize>,
    params: SamplingParams,
    rng: Rng,
    decoder: IncrementalDecoder,
    /// Output text not yet sent (held back while it may begin a stop string).
    pending: String,
    events: mpsc::UnboundedSender<Event>,
    finished: bool,
}

impl Schedulable for Sequence {
    fn total_tokens(&self) -> usize {
        self.tokens.len()
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn reset(&mut self) {
        self.computed = 0;
        self.lookup = None;
    }
    fn reuse_cached_prefix(&mut self) {
        if self.computed == 0 {
            self.computed = self.table.reuse_cached_prefix(&self.tokens);
            self.lookup = Some((self.tokens.len(), self.computed));
        }
    }
    fn frontier(&self) -> Option<BlockHash> {
        self.table.frontier(&self.tokens, self.computed)
    }
    fn table(&mut self) -> &mut BlockTable {
        &mut self.table
    }
    fn table_ref(&self) -> &BlockTable {
        &self.table
    }
}

impl Queued for Sequence {
    fn ticket(&self) -> Ticket {
        self.ticket
    }
}

struct EngineLoop {
    model: Llama,
    codec: Arc<TextCodec>,
    kv: KvStore,
    allocator: BlockAllocator,
    scheduler: Scheduler<Sequence>,
    stats: Arc<EngineStats>,
    observer: Arc<dyn StepObserver>,
    breaker: Breaker,
    /// A token that makes the forward pass fail (fault injection; always `None` in builds
    /// without the `fault-injection` feature).
    fault: Option<u32>,
    workspace: Workspace,
    block_size: usize,
    next_id: u64,
}

impl EngineLoop {
    fn run(mut self, submissions: std_mpsc::Receiver<Submission>) {
        let mut idle_step = false;
        loop {
            if self.scheduler.is_idle() {
                match submissions.recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => return,
                }
            } else if idle_step {
                // Only requests holding out for company wait: sleep until one may go alone, or
                // until a new request arrives.
                let wait = self
                    .scheduler
                    .next_release()
                    .map_or(Duration::from_millis(5), |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                match submissions.recv_timeout(wait) {
                    Ok(s) => self.admit(s),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = submissions.try_recv() {
                self.admit(s);
            }
            // Requests whose receiver went away are dropped before the step (their blocks too).
            drop(self.scheduler.retain(|s| !s.events.is_closed()));
            idle_step = !self.step();
        }
    }

    fn admit(&mut self, s: Submission) {
        self.next_id += 1;
        let seed = s
            .params
            .seed
            .unwrap_or(self.next_id.wrapping_mul(0x2545_f491_4f6c_dd1d));
        self.stats
            .prompt_tokens
            .fetch_add(s.prompt.len() as u64, Ordering::Relaxed);
        self.scheduler.add(Sequence {
            ticket: s.ticket,
            started: None,
            run_time: RunTime::default(),
            prompt_len: s.prompt.len(),
            tokens: s.prompt,
            computed: 0,
            table: BlockTable::new(&self.allocator, self.block_size),
            lookup: None,
            cached_tokens: None,
            rng: Rng::new(seed),
            params: s.params,
            decoder: IncrementalDecoder::default(),
            pending: String::new(),
            events: s.events,
            finished: false,
        });
    }

    /// One step; false if nothing could run.
    fn step(&mut self) -> bool {
        let now = Instant::now();
        let single = self.breaker.single_request(now);
        self.scheduler.set_batch_limit(single.then_some(1));
        self.stats
            .breaker_state
            .store(self.breaker.state(now).code(), Ordering::Relaxed);
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            self.publish();
            return false;
        }
        self.count_prefix_lookups(&plan);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let began = Instant::now();
        let running = self.scheduler.running();
        let samples: Vec<bool> = plan
            .iter()
            .map(|p| {
                let seq = &running[p.index];
                seq.computed + p.tokens == seq.tokens.len()
            })
            .collect();
        let sampled = samples.iter().filter(|s| **s).count();
        let mut groups = Vec::new();
        let mut failed = Vec::new();
        forward_isolating(
            Forward {
                model: &self.model,
                kv: &mut self.kv,
                workspace: &mut self.workspace,
                running,
                fault: self.fault,
            },
            &plan,
            0,
            0,
            &mut groups,
            &mut failed,
        );
        // The forward pass's time: the step log's and each sequence's run time.
        let took = began.elapsed();
        if failed.is_empty() {
            self.breaker.success(began);
        } else {
            self.breaker.failure(Instant::now());
            self.stats.failed_steps.fetch_add(1, Ordering::Relaxed);
            self.stats
                .isolated_requests
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                failed = failed.len(),
                batch = plan.len(),
                breaker = self.breaker.state(Instant::now()).as_str(),
                "a step failed: the failing requests were isolated by bisection and end with an error"
            );
        }
        if tracing::enabled!(target: "parallax::step", tracing::Level::DEBUG) {
            // Rows and prefill tokens by bin (fast, medium, slow).
            let (mut rows, mut prefill) = ([0usize; 3], [0usize; 3]);
            for p in &plan {
                let bin = running[p.index].ticket.bin as usize;
                if p.tokens > 1 {
                    prefill[bin] += p.tokens;
                } else {
                    rows[bin] += 1;
                }
            }
            tracing::debug!(
                target: "parallax::step",
                micros = took.as_micros() as u64,
                ?rows,
                ?prefill,
                "step"
            );
        }
        let vocab = self.model.config.vocab_size;
        let context = self.model.config.context_length;
        let mut row_of: Vec<Option<&[f32]>> = vec![None; plan.len()];
        for (first, logits) in &groups {
            let mut rows = logits.chunks_exact(vocab);
            for (k, slot) in row_of.iter_mut().enumerate().skip(*first) {
                if !samples[k] {
                    continue;
                }
                match rows.next() {
                    Some(row) => *slot = Some(row),
                    None => break,
                }
            }
        }
        // Events go out after the step's bookkeeping, so whoever sees a request finish also sees
        // the counters without it.
        let mut outbox = Vec::new();
        let running = self.scheduler.running_mut();
        for (k, p) in plan.iter().enumerate() {
            let seq = &mut running[p.index];
            seq.run_time.total += took;
            if seq.tokens.len() == seq.prompt_len {
                seq.run_time.prefill = seq.run_time.total;
            }
            if failed.contains(&k) {
                seq.finished = true;
                outbox.push((
                    seq.events.clone(),
                    Event::Failed {
                        message: "the model failed on this request (isolated from its batch; the other requests were not affected)".into(),
                    },
                ));
                continue;
            }
            if seq.started.is_none() {
                seq.started = Some(began);
                outbox.push((
                    seq.events.clone(),
                    Event::Started {
                        queue_time: began - seq.ticket.arrived,
                        batch_size: plan.len(),
                    },
                ));
            }
            seq.computed += p.tokens;
            seq.table.cache_computed(&seq.tokens, seq.computed);
            let Some(row) = row_of[k] else {
                continue;
            };
            let sampled = sample(row, &seq.params, &mut seq.rng);
            seq.tokens.push(sampled.token);
            self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
            let generated = seq.tokens.len() - seq.prompt_len;
            let stop_token = seq.params.stop_token_ids.contains(&sampled.token)
                || (!seq.params.ignore_eos && self.codec.eos.contains(&sampled.token));
            let mut reason = if stop_token {
                Some(FinishReason::Stop)
            } else if generated >= seq.params.max_tokens || seq.tokens.len() >= context {
                Some(FinishReason::Length)
            } else {
                None
            };
            // Text: the stop token's own text is not part of the output.
            let new_text = if stop_token {
                String::new()
            } else {
                seq.decoder
                    .step(&self.codec, &seq.tokens[seq.prompt_len..])
                    .unwrap_or_default()
            };
            seq.pending.push_str(&new_text);
            if let Some(cut) = find_stop(&seq.pending, &seq.params.stop) {
                seq.pending.truncate(cut);
                reason = Some(FinishReason::Stop);
            }
            let text = match reason {
                Some(_) => String::new(),
                None => take_safe_prefix(&mut seq.pending, &seq.params.stop),
            };
            outbox.push((
                seq.events.clone(),
                Event::Token {
                    id: sampled.token,
                    text,
                    logprob: sampled.logprob,
                    top_logprobs: sampled.top,
                },
            ));
            if let Some(reason) = reason {
                let text = std::mem::take(&mut seq.pending);
                outbox.push((
                    seq.events.clone(),
                    Event::Finished {
                        text,
                        reason,
                        prompt_tokens: seq.prompt_len,
                        completion_tokens: generated,
                        cached_tokens: seq.cached_tokens.unwrap_or(0),
                        queue_time: seq.started.unwrap_or(began) - seq.ticket.arrived,
                        run_time: seq.run_time,
                    },
                ));
                seq.finished = true;
            }
        }
        drop(self.scheduler.retain(|s| !s.finished));
        self.observer.step(&StepReport {
            duration: began.elapsed(),
            sequences: plan.len(),
            tokens: plan.iter().map(|p| p.tokens).sum(),
            sampled,
        });
        self.publish();
        for (events, event) in outbox {
            let _ = events.send(event);
        }
        true
    }

    /// Counts the prefix-cache look-ups of the sequences admitted into this step; a request's
    /// first one is its `cached_tokens`.
    fn count_prefix_lookups(&mut self, plan: &[Scheduled]) {
        let running = self.scheduler.running_mut();
        for p in plan {
            let seq = &mut running[p.index];
            if let Some((queried, hit)) = seq.lookup.take() {
                self.stats
                    .prefix_queries
                    .fetch_add(queried as u64, Ordering::Relaxed);
                self.stats
                    .prefix_hits
                    .fetch_add(hit as u64, Ordering::Relaxed);
                seq.cached_tokens.get_or_insert(hit);
            }
        }
    }

    fn publish(&mut self) {
        let used = self.allocator.used();
        let usage = used as f64 / self.allocator.total().max(1) as f64;
        let pressure = self.scheduler.under_pressure();
        if !pressure && usage > KV_PRESSURE_ON {
            tracing::warn!(usage, "KV cache nearly full: admissions paused");
            self.scheduler.set_pressure(true);
        } else if pressure && usage < KV_PRESSURE_OFF {
            tracing::info!(usage, "KV cache usage down again: admissions resumed");
            self.scheduler.set_pressure(false);
        }
        self.stats
            .kv_pressure
            .store(self.scheduler.under_pressure(), Ordering::Relaxed);
        let depths = self.scheduler.queue_depths();
        for (bin, row) in depths.iter().enumerate() {
            for (priority, depth) in row.iter().enumerate() {
                self.stats.queue_depths[bin][priority].store(*depth, Ordering::Relaxed);
            }
        }
        for (counter, reason) in self.stats.preemptions.iter().zip(Preemption::ALL) {
            counter.store(self.scheduler.preemptions_for(reason), Ordering::Relaxed);
        }
        for (counter, reason) in self.stats.admission_stalls.iter().zip(Stall::ALL) {
            counter.store(self.scheduler.stalls(reason), Ordering::Relaxed);
        }
        self.stats
            .kv_blocks_cached
            .store(self.allocator.cached(), Ordering::Relaxed);
        self.stats.kv_blocks_used.store(used, Ordering::Relaxed);
        self.stats.kv_blocks_peak.fetch_max(used, Ordering::Relaxed);
        self.stats
            .running
            .store(self.scheduler.running().len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.scheduler.num_waiting(), Ordering::Relaxed);
    }
}

/// What a forward pass needs, borrowed from the engine loop.
struct Forward<'a> {
    model: &'a Llama,
    kv: &'a mut KvStore,
    workspace: &'a mut Workspace,
    running: &'a [Sequence],
    fault: Option<u32>,
}

/// Runs the forward pass for `plan`; if it fails (panics), splits the batch in two and retries
/// each half after an exponential backoff, down to single sequences, which are the failures.
/// A sequence's outputs do not depend on its batch, so the others' tokens are unchanged; their
/// cache writes are simply repeated. Successful groups land in `groups` as (index of their first
/// plan entry, logits of their sampling sequences), in plan order; failures in `failed`.
fn forward_isolating(
    f: Forward<'_>,
    plan: &[Scheduled],
    first: usize,
    depth: u32,
    groups: &mut Vec<(usize, Vec<f32>)>,
    failed: &mut Vec<usize>,
) {
    let Forward {
        model,
        kv,
        workspace,
        running,
        fault,
    } = f;
    let inputs: Vec<SeqInput<'_>> = plan
        .iter()
        .map(|p| {
            let seq = &running[p.index];
            SeqInput {
                tokens: &seq.tokens[seq.computed..seq.computed + p.tokens],
                start: seq.computed,
                blocks: seq.table.blocks(),
                logits: seq.computed + p.tokens == seq.tokens.len(),
            }
        })
        .collect();
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(poison) = fault
            && inputs.iter().any(|i| i.tokens.contains(&poison))
        {
            panic!("injected fault: token {poison} is in the batch");
        }
        model.forward(&inputs, kv, workspace)
    }));
    match attempt {
        Ok(logits) => groups.push((first, logits)),
        Err(_) if plan.len() == 1 => failed.push(first),
        Err(_) => {
            // A transient failure gets time to pass; a real one is found in log₂(batch) rounds.
            std::thread::sleep(Duration::from_millis(1 << depth.min(6)));
            let mid = plan.len() / 2;
            for (part, at) in [(&plan[..mid], first), (&plan[mid..], first + mid)] {
                let again = Forward {
                    model,
                    kv: &mut *kv,
                    workspace: &mut *workspace,
                    running,
                    fault,
                };
                forward_isolating(again, part, at, depth + 1, groups, failed);
            }
        }
    }
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Takes the part of `pending` that cannot be the beginning of a stop string.
fn take_safe_prefix(pending: &mut String, stops: &[String]) -> String {
    let mut keep_from = pending.len();
    for stop in stops {
        // The longest suffix of `pending` that is a proper prefix of `stop`.
        for (i, _) in pending.char_indices() {
            if stop.starts_with(&pending[i..]) {
                keep_from = keep_from.min(i);
                break;
            }
        }
    }
    let rest = pending.split_off(keep_from);
    std::mem::replace(pending, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["###".to_owned()];
        let mut pending = "hello #".to_owned();
        assert_eq!(take_safe_prefix(&mut pending, &stops), "hello ");
        assert_eq!(pending, "#");
        pending.push_str("# x");
        assert_eq!(take_safe_prefix(&mut pending, &stops), "## x");
        assert_eq!(find_stop("ab###c", &stops), Some(2));
        let mut none = "abc".to_owned();
        assert_eq!(take_safe_prefix(&mut none, &[]), "abc");
    }
}
